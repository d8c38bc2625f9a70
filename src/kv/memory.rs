//! The KV cache's state in llama.cpp's byte layout (`llama_kv_cache::state_write/state_read`),
//! and [`KvMemory`], the KV cache together with its tensors.
//!
//! Reading is two-phase: [`KvMemory::state_read`] first parses and validates the whole blob
//! into a plan (stream count, cell counts against capacity, positions, sequence ids, layer
//! count, types, row sizes, V layout, every length bounds- and overflow-checked), and only then
//! changes the memory. The one check that needs the memory itself, finding free cells for a
//! sequence, is undone exactly if it fails. So a failed restore leaves the memory as it was,
//! where llama.cpp erases the destination sequence (or, for a whole restore, the whole cache).

use std::any::Any;

use super::{is_masked_swa, KvCache, KvContext};
use crate::cells::CellExt;
use crate::error::{err, Result};
use crate::failpoint;
use crate::memory::{Memory, MemoryContext};
use crate::state::io::{StateIn, StateOut};
use crate::storage::{row_size, type_size, KvStorage, StorageLayer};
use crate::ubatch::{Ubatch, UbatchBuf};

/// A KV cache and, when it was created with one, its K/V tensor storage.
#[derive(Debug)]
pub struct KvMemory {
    /// Cells, heads, pending work.
    pub cache: KvCache,
    /// The tensors; `None` for a cells-only cache (its states have zero layers).
    pub storage: Option<KvStorage>,
}

impl KvMemory {
    /// A cache with optional storage; the two must agree on size, streams and V layout.
    pub fn new(cache: KvCache, storage: Option<KvStorage>) -> Result<Self> {
        if let Some(st) = &storage {
            let sp = st.spec();
            let p = cache.params();
            if sp.size != p.size || sp.n_stream != cache.n_stream() || sp.v_trans != p.v_trans {
                return Err(err!(
                    InvalidArgument,
                    "storage (size {}, {} streams, v_trans {}) does not match the cache (size {}, {} streams, v_trans {})",
                    sp.size,
                    sp.n_stream,
                    sp.v_trans,
                    p.size,
                    cache.n_stream(),
                    p.v_trans
                ));
            }
            if p.v_trans && !sp.is_mla && st.n_embd_v_gqa_max() != p.n_embd_v_gqa_max {
                return Err(err!(
                    InvalidArgument,
                    "n_embd_v_gqa_max is {} but the widest V layer has {}",
                    p.n_embd_v_gqa_max,
                    st.n_embd_v_gqa_max()
                ));
            }
        }
        Ok(KvMemory { cache, storage })
    }

    /// `llama_kv_cache::state_clear(seq_id)`, what a composite calls after a failed restore:
    /// `seq_id == -1` clears everything, data included; otherwise the sequence's cells are
    /// removed (`seq_rm(seq_id, -1, -1)`) and the K/V rows of the cells only it held are
    /// zeroed, since attention may still read free cells. Ranges as upstream's.
    pub fn state_clear(&mut self, seq_id: i32) -> Result<()> {
        if seq_id == -1 {
            Memory::clear(self, true);
            return Ok(());
        }
        let mut sole = Vec::new();
        let strm = self.cache.state_clear_cells(seq_id, &mut sole)?;
        let Some(st) = self.storage.as_mut() else {
            return Ok(());
        };
        // Runs of consecutive cells, each zeroed with one write per row block.
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &i in &sole {
            match runs.last_mut() {
                Some((a, n)) if *a + *n == i => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        let longest = runs.iter().map(|r| r.1 as usize).max().unwrap_or(0);
        let (type_k, type_v, v_trans) = (st.spec().type_k, st.spec().type_v, st.spec().v_trans);
        let size = self.cache.size() as usize;
        let layers: Vec<StorageLayer> = st.layers().to_vec();
        let mut zeros = Vec::new();
        for l in &layers {
            let row = row_size(type_k, l.n_embd_k_gqa)?;
            let base = strm as usize * st.stream_stride(l.k)?;
            zeros.resize(zeros.len().max(longest * row), 0u8);
            for &(a, n) in &runs {
                st.set(l.k, base + a as usize * row, &zeros[..n as usize * row])?;
            }
        }
        for l in layers.iter().filter(|l| !l.v.is_null()) {
            let base = strm as usize * st.stream_stride(l.v)?;
            if !v_trans {
                let row = row_size(type_v, l.n_embd_v_gqa)?;
                zeros.resize(zeros.len().max(longest * row), 0u8);
                for &(a, n) in &runs {
                    st.set(l.v, base + a as usize * row, &zeros[..n as usize * row])?;
                }
            } else {
                let el = type_size(type_v);
                zeros.resize(zeros.len().max(longest * el), 0u8);
                for j in 0..l.n_embd_v_gqa as usize {
                    for &(a, n) in &runs {
                        let off = base + (a as usize + j * size) * el;
                        st.set(l.v, off, &zeros[..n as usize * el])?;
                    }
                }
            }
        }
        Ok(())
    }

    fn layers(&self) -> &[StorageLayer] {
        self.storage.as_ref().map_or(&[], |s| s.layers())
    }

    fn n_rot(&self) -> (u32, u32) {
        self.storage
            .as_ref()
            .map_or((0, 0), |s| (s.spec().n_rot_k, s.spec().n_rot_v))
    }

    fn check_dest(&self, seq: i32) -> Result<()> {
        if seq != -1 && (seq < 0 || seq as u32 >= self.cache.seq_limit()) {
            return Err(err!(
                InvalidSeqId,
                "seq_id {seq} outside [-1, {})",
                self.cache.seq_limit()
            ));
        }
        Ok(())
    }

    /// The selected cells of stream `s` for `seq` (-1: all), ascending, as llama.cpp selects
    /// them (non-empty, holding `seq`, not masked by the sliding window).
    fn selected_cells(&self, s: u32, seq: i32, out: &mut Vec<u32>) {
        out.clear();
        let cells = self.cache.cells(s);
        if seq == -1 {
            let mut i = 0;
            while let Some(c) = cells.next_used(i) {
                out.push(c);
                i = c + 1;
            }
            return;
        }
        if self.cache.stream_of(seq) != s || cells.seq_len(seq) == 0 {
            return;
        }
        let p = self.cache.params();
        let pos_max = cells.seq_pos_max(seq);
        out.extend(
            cells
                .seq_pos_iter(seq)
                .filter(|&(pos, _)| !is_masked_swa(p.n_swa, p.swa_type, pos, pos_max))
                .map(|(_, c)| c),
        );
        out.sort_unstable();
    }

    /// Writes the state of `seq` (-1: everything) in llama.cpp's layout.
    pub fn state_write(&self, seq: i32, out: &mut StateOut<'_, '_>) -> Result<()> {
        self.check_dest(seq)?;
        let n_stream = self.cache.n_stream();
        let n_seq_max = self.cache.n_seq_max();
        let has_ext = self.cache.has_cell_ext();
        out.sink.u32(n_stream)?;
        let mut sel = Vec::new();
        let mut ranges = Vec::new();
        for s in 0..n_stream {
            self.selected_cells(s, seq, &mut sel);
            out.sink.u32(sel.len() as u32)?;
            if sel.is_empty() {
                continue;
            }
            let cells = self.cache.cells(s);
            for &c in &sel {
                out.sink.i32(cells.pos_get(c))?;
                if seq == -1 {
                    let set = cells.seq_get_all(c);
                    let n = set
                        .iter_ones()
                        .take_while(|&q| (q as u32) < n_seq_max)
                        .count();
                    out.sink.u32(n as u32)?;
                    self.put_ext(out, has_ext, cells.ext_get(c))?;
                    for q in set.iter_ones().take(n) {
                        out.sink.i32(q as i32)?;
                    }
                } else {
                    out.sink.u32(1)?;
                    self.put_ext(out, has_ext, cells.ext_get(c))?;
                    out.sink.i32(seq)?;
                }
            }
            ranges.clear();
            for &c in &sel {
                match ranges.last_mut() {
                    Some((_, end)) if *end == c => *end = c + 1,
                    _ => ranges.push((c, c + 1)),
                }
            }
            self.write_data(s, &ranges, out)?;
        }
        Ok(())
    }

    fn put_ext(&self, out: &mut StateOut<'_, '_>, has_ext: bool, e: CellExt) -> Result<()> {
        if has_ext {
            out.sink.i32(e.x)?;
            out.sink.i32(e.y)?;
            out.sink.i32(e.tok)?;
        }
        Ok(())
    }

    fn write_data(&self, s: u32, ranges: &[(u32, u32)], out: &mut StateOut<'_, '_>) -> Result<()> {
        let p = self.cache.params();
        let (n_rot_k, n_rot_v) = self.n_rot();
        out.sink.u32(p.v_trans as u32)?;
        out.sink.u32(self.layers().len() as u32)?;
        out.sink.u32(n_rot_k)?;
        out.sink.u32(n_rot_v)?;
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let sp = st.spec();
        let size = p.size as usize;
        // Copies `len` bytes at `off` of `t`: from the host slice when there is one (one
        // bounds check per copy, no FFI), else through ggml.
        let copy = |out: &mut StateOut<'_, '_>, t, host: Option<&[u8]>, off: usize, len: usize| {
            if let Some(dst) = out.data(len)? {
                match host {
                    Some(h) => dst.copy_from_slice(
                        h.get(off..off + len)
                            .ok_or_else(|| err!(InvalidArgument, "range outside the tensor"))?,
                    ),
                    None => st.get(t, off, dst)?,
                }
            }
            Ok::<(), crate::error::Error>(())
        };
        let copy_rows = |out: &mut StateOut<'_, '_>, t, row: usize| -> Result<()> {
            let base = s as usize * st.stream_stride(t)?;
            let host = st.host_bytes(t)?;
            for &(a, b) in ranges {
                copy(
                    out,
                    t,
                    host,
                    base + a as usize * row,
                    (b - a) as usize * row,
                )?;
            }
            Ok(())
        };
        for l in st.layers() {
            let row = row_size(sp.type_k, l.n_embd_k_gqa)?;
            out.sink.i32(sp.type_k as i32)?;
            out.sink.u64(row as u64)?;
            copy_rows(out, l.k, row)?;
        }
        for l in st.layers().iter().filter(|l| !l.v.is_null()) {
            out.sink.i32(sp.type_v as i32)?;
            if !p.v_trans {
                let row = row_size(sp.type_v, l.n_embd_v_gqa)?;
                out.sink.u64(row as u64)?;
                copy_rows(out, l.v, row)?;
            } else {
                let el = type_size(sp.type_v);
                out.sink.u32(el as u32)?;
                out.sink.u32(l.n_embd_v_gqa)?;
                let base = s as usize * st.stream_stride(l.v)?;
                let host = st.host_bytes(l.v)?;
                for j in 0..l.n_embd_v_gqa as usize {
                    for &(a, b) in ranges {
                        let off = base + (j * size + a as usize) * el;
                        copy(out, l.v, host, off, (b - a) as usize * el)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses and validates a whole state into a plan without touching the memory.
    fn parse<'a>(&self, seq: i32, inp: &mut StateIn<'a>) -> Result<Vec<StreamPlan<'a>>> {
        let p = self.cache.params();
        let n_stream = self.cache.n_stream();
        let n_seq_max = self.cache.n_seq_max();
        let has_ext = self.cache.has_cell_ext();
        let got = inp.meta.u32("n_stream")?;
        if got != n_stream {
            return Err(err!(
                InvalidState,
                "the state has {got} streams, this cache {n_stream}"
            ));
        }
        let mut plans = Vec::new();
        for s in 0..n_stream {
            let cell_count = inp.meta.u32("cell_count")?;
            if cell_count == 0 {
                continue;
            }
            if cell_count > p.size {
                return Err(err!(
                    InvalidState,
                    "stream {s}: {cell_count} cells do not fit in {} cells",
                    p.size
                ));
            }
            if seq != -1 && !plans.is_empty() {
                return Err(err!(
                    InvalidState,
                    "a sequence state has cells in more than one stream"
                ));
            }
            let n = cell_count as usize;
            let mut plan = StreamPlan {
                s,
                pos: Vec::with_capacity(n),
                ext: Vec::with_capacity(if has_ext { n } else { 0 }),
                seq_off: Vec::with_capacity(if seq == -1 { n + 1 } else { 0 }),
                seq_ids: Vec::new(),
                k: Vec::new(),
                v: Vec::new(),
            };
            if seq == -1 {
                plan.seq_off.push(0);
            }
            for i in 0..n {
                let pos = inp.meta.i32("cell pos")?;
                if pos < 0 {
                    return Err(err!(
                        InvalidState,
                        "stream {s} cell {i}: position {pos} < 0"
                    ));
                }
                let n_seq_id = inp.meta.u32("cell n_seq_id")?;
                if seq != -1 && n_seq_id != 1 {
                    return Err(err!(
                        InvalidState,
                        "stream {s} cell {i}: {n_seq_id} sequence ids in a sequence state (expected 1)"
                    ));
                }
                if n_seq_id > n_seq_max {
                    return Err(err!(
                        InvalidState,
                        "stream {s} cell {i}: {n_seq_id} sequence ids, more than n_seq_max {n_seq_max}"
                    ));
                }
                if has_ext {
                    let x = inp.meta.i32("cell ext.x")?;
                    let y = inp.meta.i32("cell ext.y")?;
                    let tok = inp.meta.i32("cell ext.tok")?;
                    plan.ext.push(CellExt { x, y, tok });
                }
                for _ in 0..n_seq_id {
                    let q = inp.meta.i32("cell seq_id")?;
                    if seq != -1 {
                        // llama.cpp ignores the stored id of a sequence state: the cell goes
                        // to the destination sequence.
                        continue;
                    }
                    if q < 0 || q as u32 >= n_seq_max {
                        return Err(err!(
                            InvalidState,
                            "stream {s} cell {i}: seq_id {q} outside [0, {n_seq_max})"
                        ));
                    }
                    if n_stream > 1 && q as u32 != s {
                        return Err(err!(
                            InvalidState,
                            "stream {s} cell {i}: seq_id {q} belongs to stream {q}"
                        ));
                    }
                    plan.seq_ids.push(q);
                }
                if seq == -1 {
                    plan.seq_off.push(plan.seq_ids.len() as u32);
                }
                plan.pos.push(pos);
            }
            self.parse_data(s, n, inp, &mut plan)?;
            plans.push(plan);
        }
        Ok(plans)
    }

    fn parse_data<'a>(
        &self,
        s: u32,
        n: usize,
        inp: &mut StateIn<'a>,
        plan: &mut StreamPlan<'a>,
    ) -> Result<()> {
        let p = self.cache.params();
        let v_trans = inp.meta.u32("v_trans")?;
        let n_layer = inp.meta.u32("n_layer")?;
        let n_rot_k = inp.meta.u32("n_rot_k")?;
        let n_rot_v = inp.meta.u32("n_rot_v")?;
        if v_trans > 1 || (v_trans == 1) != p.v_trans {
            return Err(err!(
                InvalidState,
                "stream {s}: v_trans {v_trans}, this cache has {}",
                p.v_trans as u32
            ));
        }
        if n_layer as usize != self.layers().len() {
            return Err(err!(
                InvalidState,
                "stream {s}: {n_layer} layers, this cache has {}",
                self.layers().len()
            ));
        }
        if (n_rot_k, n_rot_v) != self.n_rot() {
            return Err(err!(
                InvalidState,
                "stream {s}: attention rotation {n_rot_k}/{n_rot_v}, this cache has {}/{}",
                self.n_rot().0,
                self.n_rot().1
            ));
        }
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let sp = st.spec();
        let check_type = |what: &str, il: u32, got: i32, want: u32| -> Result<()> {
            if got as i64 != want as i64 {
                return Err(err!(
                    InvalidState,
                    "stream {s} layer {il}: {what} type {got}, this cache has {want}"
                ));
            }
            Ok(())
        };
        for l in st.layers() {
            check_type("K", l.il, inp.meta.i32("K type")?, sp.type_k)?;
            let row = row_size(sp.type_k, l.n_embd_k_gqa)?;
            let got = inp.meta.u64("K row size")?;
            if got != row as u64 {
                return Err(err!(
                    InvalidState,
                    "stream {s} layer {}: K row size {got}, this cache has {row}",
                    l.il
                ));
            }
            plan.k.push(inp.data(n, row, "K rows")?);
        }
        for l in st.layers().iter().filter(|l| !l.v.is_null()) {
            check_type("V", l.il, inp.meta.i32("V type")?, sp.type_v)?;
            if !p.v_trans {
                let row = row_size(sp.type_v, l.n_embd_v_gqa)?;
                let got = inp.meta.u64("V row size")?;
                if got != row as u64 {
                    return Err(err!(
                        InvalidState,
                        "stream {s} layer {}: V row size {got}, this cache has {row}",
                        l.il
                    ));
                }
                plan.v.push(inp.data(n, row, "V rows")?);
            } else {
                let el = type_size(sp.type_v);
                let got_el = inp.meta.u32("V element size")?;
                let got_n = inp.meta.u32("V n_embd_v_gqa")?;
                if got_el as usize != el || got_n != l.n_embd_v_gqa {
                    return Err(err!(
                        InvalidState,
                        "stream {s} layer {}: transposed V of {got_n} x {got_el}-byte elements, this cache has {} x {el}",
                        l.il,
                        l.n_embd_v_gqa
                    ));
                }
                let row = n
                    .checked_mul(el)
                    .ok_or_else(|| err!(InvalidState, "V size overflows"))?;
                plan.v
                    .push(inp.data(l.n_embd_v_gqa as usize, row, "V elements")?);
            }
        }
        Ok(())
    }

    /// Restores a state written by [`KvMemory::state_write`] or llama.cpp into `seq` (-1: the
    /// whole cache, replacing everything). On error nothing was changed.
    pub fn state_read(&mut self, seq: i32, inp: &mut StateIn<'_>) -> Result<()> {
        self.check_dest(seq)?;
        let plans = self.parse(seq, inp)?;
        if let Some(st) = &inp.stash {
            if st.remaining() != 0 {
                return Err(err!(
                    InvalidState,
                    "the stashed tensor data has {} bytes more than the state describes",
                    st.remaining()
                ));
            }
        }
        if seq == -1 {
            self.restore_whole(&plans)
        } else {
            match plans.first() {
                Some(plan) => self.restore_seq(seq, plan),
                None => {
                    // llama.cpp leaves the destination alone when the state has no cells.
                    Ok(())
                }
            }
        }
    }

    fn restore_whole(&mut self, plans: &[StreamPlan<'_>]) -> Result<()> {
        // Every check first: the clear below is the first change to the memory.
        for plan in plans {
            self.check_plan_data(plan, &[(0, plan.pos.len() as u32)])?;
        }
        failpoint::hit("restore_whole: before the clear")?;
        self.cache.clear();
        if let Some(st) = &mut self.storage {
            st.clear();
        }
        let has_ext = self.cache.has_cell_ext();
        for plan in plans {
            let cells = self.cache.cells_mut(plan.s);
            for (i, &pos) in plan.pos.iter().enumerate() {
                let c = i as u32;
                cells.pos_set(c, pos);
                if has_ext {
                    cells.ext_set(c, plan.ext[i]);
                }
                for &q in &plan.seq_ids[plan.seq_off[i] as usize..plan.seq_off[i + 1] as usize] {
                    if !cells.seq_has(c, q) {
                        cells.seq_add(c, q);
                    }
                }
            }
            let n = plan.pos.len() as u32;
            self.write_plan_data(plan, &[(0, n)])?;
        }
        Ok(())
    }

    fn restore_seq(&mut self, dest: i32, plan: &StreamPlan<'_>) -> Result<()> {
        let strm = self.cache.stream_of(dest);
        let n = plan.pos.len();
        let has_ext = self.cache.has_cell_ext();
        let n_pos = self.cache.params().n_pos_per_embd as usize;

        // What seq_rm(dest) will take away, to put back if no slot is found.
        let head = self.cache.head(strm);
        let cells = self.cache.cells(strm);
        let undo: Vec<(u32, i32, i32, CellExt)> = cells
            .seq_pos_iter(dest)
            .map(|(pos, c)| (c, pos, cells.get_shift(c), cells.ext_get(c)))
            .collect();

        let mut ub = UbatchBuf {
            n_seq_tokens: n as u32,
            n_seqs: 1,
            n_pos: n_pos as u32,
            equal_seqs: true,
            token: Some(vec![0; n]),
            pos: vec![0; n * n_pos],
            seq_off: (0..=n as u32).collect(),
            seq_ids: vec![dest; n],
            seq_id_unq: vec![dest],
            output: None,
        };
        ub.pos[..n].copy_from_slice(&plan.pos);
        if has_ext {
            for (i, e) in plan.ext.iter().enumerate() {
                if n_pos > 1 {
                    ub.pos[i + n] = e.y;
                    ub.pos[i + 2 * n] = e.x;
                }
                if let Some(t) = ub.token.as_mut() {
                    t[i] = e.tok;
                }
            }
        }

        let undo_rm = |kv: &mut KvCache| {
            let cells = kv.cells_mut(strm);
            for &(c, pos, shift, ext) in &undo {
                if cells.is_empty(c) {
                    cells.copy_from_stream(c, pos, shift, ext, dest);
                } else {
                    cells.seq_add(c, dest);
                }
            }
            kv.set_head(strm, head);
        };
        self.cache.seq_rm(dest, -1, -1)?;
        let slot = match self.cache.find_slot(&ub.view(), false) {
            Some(slot) => slot,
            None => {
                undo_rm(&mut self.cache);
                return Err(err!(
                    NoSlot,
                    "no room for {n} cells of sequence {dest} (the memory is unchanged)"
                ));
            }
        };
        let idxs = &slot.idxs[0];
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &c in idxs {
            match runs.last_mut() {
                Some((_, end)) if *end == c => *end = c + 1,
                _ => runs.push((c, c + 1)),
            }
        }
        let plan = StreamPlan {
            s: strm,
            ..plan.clone()
        };
        // The last fallible step before the cells and tensors change: undo the removal.
        if let Err(e) = self
            .check_plan_data(&plan, &runs)
            .and_then(|()| failpoint::hit("restore_seq: after the slot search"))
        {
            undo_rm(&mut self.cache);
            return Err(e);
        }
        self.cache.apply_ubatch(&slot, &ub.view());
        if has_ext {
            let cells = self.cache.cells_mut(strm);
            for (i, &c) in idxs.iter().enumerate() {
                cells.ext_set(c, plan.ext[i]);
            }
        }
        self.write_plan_data(&plan, &runs)
    }

    /// Every check [`Self::write_plan_data`] makes, without writing: the tensors exist, and the
    /// last byte each one receives lies inside it. Run before the first change to the memory,
    /// so the write cannot fail half-way.
    fn check_plan_data(&self, plan: &StreamPlan<'_>, runs: &[(u32, u32)]) -> Result<()> {
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let p = self.cache.params();
        let n = plan.pos.len();
        let end = runs.last().map_or(0, |r| r.1) as usize;
        let s = plan.s as usize;
        let fits = |t, base: usize, row: usize, last_end: usize| -> Result<()> {
            failpoint::hit("check_plan_data: a tensor")?;
            let n_bytes = st.n_bytes(t)?;
            let top = last_end
                .checked_mul(row)
                .and_then(|v| v.checked_add(base))
                .ok_or_else(|| err!(InvalidState, "tensor offset overflows"))?;
            if top > n_bytes {
                return Err(err!(
                    InvalidState,
                    "the state writes {top} bytes into a {n_bytes}-byte tensor"
                ));
            }
            Ok(())
        };
        for (l, src) in st.layers().iter().zip(&plan.k) {
            let base = s * st.stream_stride(l.k)?;
            fits(l.k, base, src.len() / n.max(1), end)?;
        }
        for (l, src) in st.layers().iter().filter(|l| !l.v.is_null()).zip(&plan.v) {
            let base = s * st.stream_stride(l.v)?;
            if p.v_trans {
                let el = type_size(st.spec().type_v);
                let last_row = (l.n_embd_v_gqa as usize).saturating_sub(1) * p.size as usize;
                fits(l.v, base + last_row * el, el, end)?;
            } else {
                fits(l.v, base, src.len() / n.max(1), end)?;
            }
        }
        Ok(())
    }

    /// Copies a plan's tensor bytes into stream `plan.s`, blob cell k going to the k-th cell of
    /// `runs` (runs of consecutive destination cells).
    fn write_plan_data(&mut self, plan: &StreamPlan<'_>, runs: &[(u32, u32)]) -> Result<()> {
        let size = self.cache.params().size as usize;
        let v_trans = self.cache.params().v_trans;
        let Some(st) = &mut self.storage else {
            return Ok(());
        };
        let n = plan.pos.len();
        let layers: Vec<StorageLayer> = st.layers().to_vec();
        let s = plan.s as usize;
        for (l, src) in layers.iter().zip(&plan.k) {
            let row = src.len() / n.max(1);
            let base = s * st.stream_stride(l.k)?;
            scatter_rows(st, l.k, base, row, src, runs)?;
        }
        for (l, src) in layers.iter().filter(|l| !l.v.is_null()).zip(&plan.v) {
            let base = s * st.stream_stride(l.v)?;
            if !v_trans {
                let row = src.len() / n.max(1);
                scatter_rows(st, l.v, base, row, src, runs)?;
            } else {
                let el = type_size(st.spec().type_v);
                for j in 0..l.n_embd_v_gqa as usize {
                    let chunk = &src[j * n * el..(j + 1) * n * el];
                    scatter_rows(st, l.v, base + j * size * el, el, chunk, runs)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes consecutive `row`-byte records of `src` to the cells of `runs`, at `base` of `t`.
fn scatter_rows(
    st: &mut KvStorage,
    t: *mut ggml_sys::ggml_tensor,
    base: usize,
    row: usize,
    src: &[u8],
    runs: &[(u32, u32)],
) -> Result<()> {
    let mut k = 0usize;
    if let Some(h) = st.host_bytes_mut(t)? {
        for &(a, b) in runs {
            let len = (b - a) as usize * row;
            let off = base + a as usize * row;
            h.get_mut(off..off + len)
                .ok_or_else(|| err!(InvalidArgument, "range outside the tensor"))?
                .copy_from_slice(&src[k..k + len]);
            k += len;
        }
        return Ok(());
    }
    for &(a, b) in runs {
        let len = (b - a) as usize * row;
        st.set(t, base + a as usize * row, &src[k..k + len])?;
        k += len;
    }
    Ok(())
}

/// One stream of a parsed state.
#[derive(Clone, Debug)]
struct StreamPlan<'a> {
    s: u32,
    pos: Vec<i32>,
    ext: Vec<CellExt>,
    seq_off: Vec<u32>,
    seq_ids: Vec<i32>,
    /// Per layer, the K bytes of the stream's cells.
    k: Vec<&'a [u8]>,
    /// Per layer with V, the V bytes (row-major, or `[channel][cell]` when transposed).
    v: Vec<&'a [u8]>,
}

impl Memory for KvMemory {
    fn clear(&mut self, data: bool) {
        self.cache.clear();
        if data {
            if let Some(st) = &mut self.storage {
                st.clear();
            }
        }
    }
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        self.cache.seq_rm(seq_id, p0, p1)
    }
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        self.cache.seq_cp(src, dst, p0, p1)
    }
    fn seq_keep(&mut self, seq_id: i32) -> Result<()> {
        self.cache.seq_keep(seq_id)
    }
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        self.cache.seq_add(seq_id, p0, p1, delta)
    }
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        self.cache.seq_div(seq_id, p0, p1, d)
    }
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32> {
        self.cache.seq_pos_min(seq_id)
    }
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32> {
        self.cache.seq_pos_max(seq_id)
    }
    fn can_shift(&self) -> bool {
        self.cache.can_shift()
    }
    fn n_seq_max(&self) -> u32 {
        self.cache.n_seq_max()
    }
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>> {
        // Keep the spare's box as well as its buffers: the next context lives in it.
        let mut b = spare
            .and_then(|b| b.into_any().downcast::<KvContext>().ok())
            .unwrap_or_default();
        let old = std::mem::take(&mut *b);
        *b = self.cache.init_batch(ubatches, Some(old))?;
        Ok(b)
    }
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>> {
        Ok(Box::new(self.cache.init_full()))
    }
    fn init_update(&mut self, _optimize: bool) -> Result<Box<dyn MemoryContext>> {
        Ok(Box::new(self.cache.init_update()?))
    }
    fn state_write(&self, seq: i32, _flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        // A plain KV cache has no partial part: PARTIAL_ONLY writes everything, as llama.cpp.
        KvMemory::state_write(self, seq, out)
    }
    fn state_read(&mut self, seq: i32, _flags: u32, inp: &mut StateIn<'_>) -> Result<()> {
        KvMemory::state_read(self, seq, inp)
    }
    fn has_layer(&self, il: u32) -> bool {
        self.storage.as_ref().is_some_and(|s| s.layer(il).is_some())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    //! Restores with a failure injected at each fallible step, on a memory with tensors: each
    //! failed restore must leave the cells, heads and every tensor byte as they were.

    use super::*;
    use crate::kv::KvParams;
    use crate::state;
    use crate::storage::{LayerSpec, StorageSpec};
    use ggml_sys::GGML_TYPE_F16;

    fn memory(v_trans: bool, unified: bool) -> KvMemory {
        let p = KvParams {
            size: 64,
            n_seq_max: 3,
            unified,
            v_trans,
            n_embd_v_gqa_max: 32,
            ..Default::default()
        };
        let cache = KvCache::new(p).unwrap();
        let storage = KvStorage::new(StorageSpec {
            type_k: GGML_TYPE_F16,
            type_v: GGML_TYPE_F16,
            v_trans,
            is_mla: false,
            size: 64,
            n_stream: cache.n_stream(),
            n_rot_k: 0,
            n_rot_v: 0,
            layers: LayerSpec::uniform(2, 32, 32),
        })
        .unwrap();
        let mut m = KvMemory::new(cache, Some(storage)).unwrap();
        // Fragmented sequences: 0 and 1 interleaved, 2 alone.
        for (seq, p0, n) in [(0, 0, 5), (1, 0, 3), (0, 5, 4), (2, 0, 6), (1, 3, 2)] {
            let pos: Vec<i32> = (p0..p0 + n).collect();
            let seqs: Vec<&[i32]> = (0..n).map(|_| std::slice::from_ref(&seq)).collect();
            let ub = UbatchBuf::new(&pos, &pos, &seqs);
            let slot = m.cache.find_slot(&ub.view(), false).unwrap();
            m.cache.apply_ubatch(&slot, &ub.view());
        }
        let st = m.storage.as_mut().unwrap();
        for l in st.layers().to_vec() {
            for t in [l.k, l.v] {
                let bytes = st.host_bytes_mut(t).unwrap().unwrap();
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = (i * 7 + 3) as u8;
                }
            }
        }
        m
    }

    /// Everything a restore could change.
    fn snapshot(m: &KvMemory) -> Vec<u8> {
        let mut out = Vec::new();
        for s in 0..m.cache.n_stream() {
            let c = m.cache.cells(s);
            out.extend(format!("{s}:{}:{};", m.cache.head(s), c.get_used()).bytes());
            for i in 0..c.size() {
                out.extend(
                    format!(
                        "{}/{}/{:?},",
                        c.pos_get(i),
                        c.get_shift(i),
                        c.seq_get_all(i)
                    )
                    .bytes(),
                );
            }
        }
        let st = m.storage.as_ref().unwrap();
        for l in st.layers() {
            out.extend_from_slice(st.host_bytes(l.k).unwrap().unwrap());
            out.extend_from_slice(st.host_bytes(l.v).unwrap().unwrap());
        }
        out
    }

    /// Arms each failpoint in turn until a restore runs past all of them; returns how many
    /// failures were injected.
    fn each_failure(
        m: &mut KvMemory,
        mut restore: impl FnMut(&mut KvMemory) -> Result<usize>,
    ) -> u32 {
        let before = snapshot(m);
        let mut at = 0;
        loop {
            failpoint::arm(Some(at));
            let r = restore(m);
            let hits = failpoint::arm(None);
            if hits <= at {
                r.expect("the restore succeeds once no failpoint fires");
                return at;
            }
            let e = r.expect_err("an armed failpoint was hit, so the restore fails");
            assert!(e.message().contains("injected"), "{}", e.message());
            assert!(snapshot(m) == before, "failure {at} changed the memory");
            at += 1;
        }
    }

    #[test]
    fn an_injected_failure_at_any_step_leaves_the_memory_unchanged() {
        for (v_trans, unified) in [(true, true), (false, true), (true, false)] {
            let mut m = memory(v_trans, unified);
            let stash = state::Stash::new();
            let mut blob = vec![0u8; state::seq_get_size(&m, 0, 0).unwrap()];
            state::seq_get_data(&m, &mut blob, 0, 0, &mut state::Stash::new()).unwrap();
            let mut whole = vec![0u8; state::get_size(&m).unwrap()];
            state::get_data(&m, &mut whole).unwrap();
            // Into another sequence (its cells removed first, then the slot search) and into
            // the same one; then the whole memory.
            let dest = if unified { 2 } else { 0 };
            let n_seq = each_failure(&mut m, |m| state::seq_set_data(m, &blob, dest, 0, &stash));
            let n_whole = each_failure(&mut m, |m| state::set_data(m, &whole));
            // One failpoint per tensor check plus the one before the first change.
            assert_eq!(n_seq, 4 + 1, "v_trans {v_trans}");
            assert_eq!(n_whole, 4 * m.cache.n_stream() + 1, "v_trans {v_trans}");
        }
    }
}
