//! The KV cache's state in llama.cpp's byte layout (`llama_kv_cache::state_write/state_read`),
//! and [`KvMemory`], the KV cache together with its tensors.
//!
//! One parser serves both inputs: a blob ([`KvMemory::state_read`]) and a caller's reader
//! ([`KvMemory::state_read_io`], llama.cpp's `llama_io_read_i`), field by field through
//! [`FieldSource`]: stream count, cell counts against capacity, positions, sequence ids, layer
//! count, types, row sizes, V layout, every length bounds- and overflow-checked. The tensor
//! bytes of each stream are described as blocks (`Block`) whose tensor ranges are the ones
//! llama.cpp's `state_write_data`/`state_read_data` pass to `write_tensor`/`read_tensor`;
//! writing, copying a blob's bytes in, reading through a reader and checking all go through
//! the same range walk.
//!
//! A blob is parsed whole before the memory changes. A reader cannot be rewound, so its
//! tensor bytes go to their final offsets as they come: the cells of a stream are read and
//! placed first (for a sequence: its old cells removed and a slot found), then its data. The
//! one check that needs the memory itself, finding free cells for a sequence, is undone
//! exactly on any later failure. So a failed restore leaves the cells as they were (and, from
//! a blob or a reader that applies its tensor bytes at the end, every tensor byte), where
//! llama.cpp erases the destination sequence (or, for a whole restore, the whole cache).

use super::memory::KvMemory;
use super::{is_masked_swa, SlotInfo};
use crate::cells::CellExt;
use crate::error::{err, Result};
use crate::failpoint;
use crate::io::{FieldSource, IoRead, StateIn, StateOut};
use crate::memory::{LogLevel, Memory, ReadStage};
use crate::storage::{row_size, type_size, KvStorage, StorageLayer};
use crate::ubatch::UbatchBuf;

impl KvMemory {
    fn layers(&self) -> &[StorageLayer] {
        self.storage.as_ref().map_or(&[], |s| s.layers())
    }

    fn n_rot(&self) -> (u32, u32) {
        self.storage
            .as_ref()
            .map_or((0, 0), |s| (s.spec().n_rot_k, s.spec().n_rot_v))
    }

    fn check_dest(&self, seq: i32) -> Result<()> {
        crate::memory::check_dest(seq, self.cache.seq_limit())
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

    /// The tensor blocks of a stream's state, in the order llama.cpp writes them: K of every
    /// layer, then V of every layer that has one (none with MLA).
    fn blocks(&self) -> Result<Vec<Block>> {
        match &self.storage {
            Some(st) => blocks_of(st, self.cache.params().v_trans),
            None => Ok(Vec::new()),
        }
    }

    /// Byte offset of stream `s` in `t`, and `t`'s size.
    fn stream_base(&self, t: *mut ggml_sys::ggml_tensor, s: u32) -> Result<(usize, usize)> {
        let st = self
            .storage
            .as_ref()
            .ok_or_else(|| err!(InvalidState, "this cache has no tensors"))?;
        Ok((s as usize * st.stream_stride(t)?, st.n_bytes(t)?))
    }

    /// Writes the state of `seq` (-1: everything) in llama.cpp's layout. Tensor bytes go
    /// through [`StateOut::tensor`]: to a caller's writer (`Sink::Io`) as the ranges
    /// llama.cpp's `state_write_data` passes to `write_tensor` (per layer, K rows per run of
    /// cells, then V rows per run or, transposed, each channel's elements per run). llama.cpp
    /// passes the stream's view of the tensor; here it is the whole tensor, with the stream's
    /// offset added: the same bytes.
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
                } else if (seq as u32) < n_seq_max {
                    out.sink.u32(1)?;
                    self.put_ext(out, has_ext, cells.ext_get(c))?;
                    out.sink.i32(seq)?;
                } else {
                    // An id in [n_seq_max, 256), which only stock-compatible mode lets a
                    // sequence have: llama.cpp lists a cell's ids below n_seq_max only, so
                    // its cells carry none (bytes no restore accepts, llama.cpp's included).
                    out.sink.u32(0)?;
                    self.put_ext(out, has_ext, cells.ext_get(c))?;
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
        for b in self.blocks()? {
            match b.hdr {
                Header::K => {
                    out.sink.i32(sp.type_k as i32)?;
                    out.sink.u64(b.row as u64)?;
                }
                Header::V => {
                    out.sink.i32(sp.type_v as i32)?;
                    out.sink.u64(b.row as u64)?;
                }
                Header::VTrans => {
                    out.sink.i32(sp.type_v as i32)?;
                    out.sink.u32(b.row as u32)?;
                    out.sink.u32(b.chans)?;
                }
            }
            let (base, _) = self.stream_base(b.t, s)?;
            // From the host slice when there is one (one bounds check per copy, no FFI),
            // else through ggml.
            let host = st.host_bytes(b.t)?;
            b.ranges(base, size, ranges, |off, len| {
                out.tensor(b.t, off, len, |dst| match host {
                    Some(h) => {
                        dst.copy_from_slice(
                            h.get(off..off + len)
                                .ok_or_else(|| err!(InvalidArgument, "range outside the tensor"))?,
                        );
                        Ok(())
                    }
                    None => st.get(b.t, off, dst),
                })
            })?;
        }
        Ok(())
    }

    /// Reads and checks the stream count.
    fn parse_n_stream(&self, inp: &mut (impl FieldSource + ?Sized)) -> Result<()> {
        let n_stream = self.cache.n_stream();
        let got = inp.u32("n_stream")?;
        if got != n_stream {
            return Err(err!(
                InvalidState,
                "the state has {got} streams, this cache {n_stream}"
            ));
        }
        self.stage.set(ReadStage::Count);
        Ok(())
    }

    /// Reads and checks the cell count of stream `s`; `seen`: an earlier stream had cells.
    fn parse_cell_count(
        &self,
        s: u32,
        seq: i32,
        seen: bool,
        inp: &mut (impl FieldSource + ?Sized),
    ) -> Result<u32> {
        let size = self.cache.params().size;
        self.stage.set(ReadStage::Count);
        let cell_count = inp.u32("cell_count")?;
        if cell_count == 0 {
            return Ok(0);
        }
        self.stage.set(ReadStage::Meta);
        if cell_count > size {
            self.log_error("state_read_meta: not enough cells in kv cache");
            return Err(err!(
                InvalidState,
                "stream {s}: {cell_count} cells do not fit in {size} cells"
            ));
        }
        if seq != -1 && seen {
            return Err(err!(
                InvalidState,
                "a sequence state has cells in more than one stream"
            ));
        }
        Ok(cell_count)
    }

    /// Reads and validates the `n` cells of stream `s` (`state_read_meta`'s input).
    fn parse_meta(
        &self,
        s: u32,
        seq: i32,
        n: u32,
        inp: &mut (impl FieldSource + ?Sized),
    ) -> Result<CellPlan> {
        let n_stream = self.cache.n_stream();
        let n_seq_max = self.cache.n_seq_max();
        let has_ext = self.cache.has_cell_ext();
        let n = n as usize;
        let mut plan = CellPlan {
            pos: Vec::with_capacity(n),
            ext: Vec::with_capacity(if has_ext { n } else { 0 }),
            seq_off: Vec::with_capacity(if seq == -1 { n + 1 } else { 0 }),
            seq_ids: Vec::new(),
        };
        if seq == -1 {
            plan.seq_off.push(0);
        }
        for i in 0..n {
            let pos = inp.i32("cell pos")?;
            if pos < 0 {
                return Err(err!(
                    InvalidState,
                    "stream {s} cell {i}: position {pos} < 0"
                ));
            }
            let n_seq_id = inp.u32("cell n_seq_id")?;
            if seq != -1 && n_seq_id != 1 {
                self.log_error("state_read_meta: invalid seq_id-agnostic kv cell");
                return Err(err!(
                    InvalidState,
                    "stream {s} cell {i}: {n_seq_id} sequence ids in a sequence state (expected 1)"
                ));
            }
            if has_ext {
                let x = inp.i32("cell ext.x")?;
                let y = inp.i32("cell ext.y")?;
                let tok = inp.i32("cell ext.tok")?;
                plan.ext.push(CellExt { x, y, tok });
            }
            // each sequence once per cell (the count may list one again): at most n_seq_max ids
            // are kept however long the list is
            let mut seen = crate::cells::SeqSet::ZERO;
            for _ in 0..n_seq_id {
                let q = inp.i32("cell seq_id")?;
                if seq != -1 {
                    // llama.cpp ignores the stored id of a sequence state: the cell goes
                    // to the destination sequence.
                    continue;
                }
                if q < 0 || q as u32 >= n_seq_max {
                    self.log_error(&format!(
                        "state_read_meta: invalid seq_id, {q} is out of range [0, {n_seq_max})"
                    ));
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
                if !seen[q as usize] {
                    seen.set(q as usize, true);
                    plan.seq_ids.push(q);
                }
            }
            if seq == -1 {
                plan.seq_off.push(plan.seq_ids.len() as u32);
            }
            plan.pos.push(pos);
        }
        Ok(plan)
    }

    /// Reads and validates the data part of stream `s` (`state_read_data`'s input): the
    /// header, then each block's header, handing each block's bytes to `data(source, block)`.
    fn parse_data<S: FieldSource + ?Sized>(
        &self,
        s: u32,
        inp: &mut S,
        mut data: impl FnMut(&mut S, &Block) -> Result<()>,
    ) -> Result<()> {
        let p = self.cache.params();
        self.stage.set(ReadStage::Data);
        let v_trans = inp.u32("v_trans")?;
        let n_layer = inp.u32("n_layer")?;
        let n_rot_k = inp.u32("n_rot_k")?;
        let n_rot_v = inp.u32("n_rot_v")?;
        // llama.cpp's order and lines; a v_trans other than 0 and 1 is refused (llama.cpp reads
        // any non-zero value as 1)
        if n_layer as usize != self.layers().len() {
            self.log_error(&format!(
                "state_read_data: mismatched layer count ({n_layer} instead of {})",
                self.layers().len()
            ));
            return Err(err!(
                InvalidState,
                "stream {s}: {n_layer} layers, this cache has {}",
                self.layers().len()
            ));
        }
        if (v_trans != 0) != p.v_trans {
            self.log_error("state_read_data: incompatible V transposition");
        }
        if v_trans > 1 || (v_trans == 1) != p.v_trans {
            return Err(err!(
                InvalidState,
                "stream {s}: v_trans {v_trans}, this cache has {}",
                p.v_trans as u32
            ));
        }
        let (rot_k, rot_v) = self.n_rot();
        if n_rot_k != rot_k {
            self.log_error(&format!(
                "state_read_data: incompatible key rotation ({n_rot_k} instead of {rot_k})"
            ));
        } else if n_rot_v != rot_v {
            self.log_error(&format!(
                "state_read_data: incompatible value rotation ({n_rot_v} instead of {rot_v})"
            ));
        }
        if (n_rot_k, n_rot_v) != (rot_k, rot_v) {
            return Err(err!(
                InvalidState,
                "stream {s}: attention rotation {n_rot_k}/{n_rot_v}, this cache has {rot_k}/{rot_v}"
            ));
        }
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let sp = st.spec();
        let check_type = |what: &str, il: u32, got: i32, want: u32| -> Result<()> {
            if got as i64 != want as i64 {
                let name = if what == "K" { "key" } else { "value" };
                self.log_error(&format!(
                    "state_read_data: mismatched {name} type ({} != {got}, layer {il})",
                    want as i32
                ));
                return Err(err!(
                    InvalidState,
                    "stream {s} layer {il}: {what} type {got}, this cache has {want}"
                ));
            }
            Ok(())
        };
        let check_row = |what: &str, il: u32, got: u64, want: usize| -> Result<()> {
            if got != want as u64 {
                let name = if what == "K" { "key" } else { "value" };
                self.log_error(&format!(
                    "state_read_data: mismatched {name} row size ({want} != {got}, layer {il})"
                ));
                return Err(err!(
                    InvalidState,
                    "stream {s} layer {il}: {what} row size {got}, this cache has {want}"
                ));
            }
            Ok(())
        };
        for b in self.blocks()? {
            match b.hdr {
                Header::K => {
                    check_type("K", b.il, inp.i32("K type")?, sp.type_k)?;
                    check_row("K", b.il, inp.u64("K row size")?, b.row)?;
                }
                Header::V => {
                    check_type("V", b.il, inp.i32("V type")?, sp.type_v)?;
                    check_row("V", b.il, inp.u64("V row size")?, b.row)?;
                }
                Header::VTrans => {
                    check_type("V", b.il, inp.i32("V type")?, sp.type_v)?;
                    let got_el = inp.u32("V element size")?;
                    if got_el as usize != b.row {
                        self.log_error(&format!(
                            "state_read_data: mismatched value element size ({} != {got_el}, layer {})",
                            b.row, b.il
                        ));
                    }
                    let got_n = if got_el as usize == b.row {
                        let n = inp.u32("V n_embd_v_gqa")?;
                        if n != b.chans {
                            self.log_error(&format!(
                                "state_read_data: mismatched GQA embedding size ({} != {n}, layer {})",
                                b.chans, b.il
                            ));
                        }
                        n
                    } else {
                        0
                    };
                    if got_el as usize != b.row || got_n != b.chans {
                        return Err(err!(
                            InvalidState,
                            "stream {s} layer {}: transposed V of {got_n} x {got_el}-byte elements, this cache has {} x {}",
                            b.il,
                            b.chans,
                            b.row
                        ));
                    }
                }
            }
            data(inp, &b)?;
        }
        Ok(())
    }

    /// Parses and validates a whole blob into a plan without touching the memory.
    fn parse<'a>(&self, seq: i32, inp: &mut StateIn<'a>) -> Result<Vec<StreamPlan<'a>>> {
        self.parse_n_stream(&mut inp.meta)?;
        let mut plans = Vec::new();
        for s in 0..self.cache.n_stream() {
            let n = self.parse_cell_count(s, seq, !plans.is_empty(), &mut inp.meta)?;
            if n == 0 {
                continue;
            }
            let cells = self.parse_meta(s, seq, n, &mut inp.meta)?;
            let mut data = Vec::new();
            let stash = &mut inp.stash;
            self.parse_data(s, &mut inp.meta, |meta, b| {
                let what = b.hdr.what();
                let len = b
                    .bytes(n)
                    .ok_or_else(|| err!(InvalidState, "{what}: size overflows"))?;
                let bytes = match stash {
                    Some(r) => r.take(len, what)?,
                    None => meta.take(len, what)?,
                };
                if self.check_finite {
                    let sp = self.storage.as_ref().map(|st| st.spec());
                    let ty = match (b.hdr, sp) {
                        (Header::K, Some(sp)) => sp.type_k,
                        (_, Some(sp)) => sp.type_v,
                        (_, None) => u32::MAX,
                    };
                    if let Some(i) = crate::finite::first_non_finite(ty, bytes) {
                        return Err(err!(
                            InvalidState,
                            "stream {s} layer {}: {what} element {i} is not finite (NaN or infinity; the non-finite check is on)",
                            b.il
                        ));
                    }
                }
                data.push(bytes);
                Ok(())
            })?;
            plans.push(StreamPlan { s, cells, data });
        }
        Ok(plans)
    }

    /// Restores a state written by [`KvMemory::state_write`] or llama.cpp into `seq` (-1: the
    /// whole cache, replacing everything). On error nothing was changed, or, in
    /// stock-compatible mode, llama.cpp's effect applies (described below).
    pub fn state_read(&mut self, seq: i32, inp: &mut StateIn<'_>) -> Result<()> {
        self.stage.set(ReadStage::Header);
        let r = self.read_blob(seq, inp);
        self.stock_failure(seq, &r);
        r
    }

    /// llama.cpp's effect of a failed `state_read` (`llama_kv_cache::state_read_sinfo`), in
    /// stock-compatible mode only: nothing when the stream count was missing or wrong; the
    /// whole cache cleared and zeroed for a whole restore that got further (llama.cpp clears
    /// it before reading the streams); for a sequence, nothing when a cell count could not be
    /// read, else the destination erased (`state_clear`: removed, its rows zeroed). Unlike
    /// llama.cpp, no stream is ever left half restored.
    fn stock_failure(&mut self, seq: i32, r: &Result<()>) {
        if r.is_ok() || !self.stock_failure {
            return;
        }
        match (seq, self.stage.get()) {
            (_, ReadStage::Header) => {}
            (-1, _) => Memory::clear(self, true),
            (_, ReadStage::Count) => {}
            // an invalid destination failed before the header (check_dest), so this succeeds
            (_, ReadStage::Meta | ReadStage::Data) => {
                let _ = self.state_clear(seq);
            }
        }
    }

    fn read_blob(&mut self, seq: i32, inp: &mut StateIn<'_>) -> Result<()> {
        self.check_dest(seq)?;
        let plans = self.parse(seq, inp)?;
        inp.check_stash_consumed()?;
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

    /// Restores a state read field by field from `io` (llama.cpp's `state_read` over a
    /// `llama_io_read_i`), validated exactly as [`KvMemory::state_read`] validates a blob.
    /// The cells of each stream are read and placed first (for a sequence: its old cells
    /// removed and a slot found, undone on any later error), then each block of tensor bytes
    /// goes to `io.read_tensor` at its final offset (the ranges llama.cpp's
    /// `state_read_data` reads). The cells change only once the whole input was read. On
    /// error the cells and the rows outside the destination are as they were; a reader that
    /// writes tensor bytes at once (not at the end, as llama.cpp's readers do) may have
    /// changed rows of the destination's slot by then, which llama.cpp's caller erases.
    /// A whole restore (`seq` -1) zeroes every row it does not restore, as llama.cpp's
    /// `clear(true)`. In stock-compatible mode a failure has llama.cpp's effect instead (see
    /// [`KvMemory::state_read`]).
    pub fn state_read_io(&mut self, seq: i32, io: &mut dyn IoRead) -> Result<()> {
        self.stage.set(ReadStage::Header);
        let r = self.read_io(seq, io, false, None, &mut Vec::new());
        self.stock_failure(seq, &r);
        r
    }

    /// [`KvMemory::state_read_io`] for a cache that mirrors another one cell for cell
    /// (llama.cpp's `state_read_sinfo`, hybrid-idx's indexer cache): with `slots_in` (one
    /// entry per stream, the cells each stream of the state goes to, empty for a stream
    /// without cells) a sequence's cells go to exactly those cells instead of a slot search,
    /// which must be free once the destination's old cells are removed; a whole restore only
    /// checks the counts (its cells go from 0 either way). Returns the cells each stream's
    /// cells went to (what the mirror is then given). A layout that does not fit fails with
    /// llama.cpp's error line, as a failed slot search does.
    pub fn state_read_io_slots(
        &mut self,
        seq: i32,
        io: &mut dyn IoRead,
        slots_in: Option<&[Vec<u32>]>,
    ) -> Result<Vec<Vec<u32>>> {
        self.stage.set(ReadStage::Header);
        let mut out = Vec::new();
        let r = self.read_io(seq, io, false, slots_in, &mut out);
        self.stock_failure(seq, &r);
        r.map(|()| out)
    }

    /// Reads and validates a state from `io` exactly as [`KvMemory::state_read_io`] does
    /// (the same fields, the same tensor ranges through `io.read_tensor`, the same slot
    /// search for a sequence) and changes nothing: the cells are put back, no tensor byte is
    /// written, and a failure has no effect even in stock-compatible mode. What a restore would
    /// log is logged (the caller may hold it back). `read_stage` then says how far it got.
    pub fn state_check_io(&mut self, seq: i32, io: &mut dyn IoRead) -> Result<()> {
        self.stage.set(ReadStage::Header);
        self.read_io(seq, io, true, None, &mut Vec::new())
    }

    /// llama.cpp's error when a mirrored layout does not match what a stream restores.
    fn mirror_mismatch(&self, given: usize, n: u32) -> crate::error::Error {
        self.log_error(&format!(
            "state_read_meta: mirrored slot layout holds {given} cells, this cache restores {n}"
        ));
        err!(
            NoSlot,
            "the mirrored slot layout holds {given} cells, the state {n}"
        )
    }

    fn read_io(
        &mut self,
        seq: i32,
        io: &mut dyn IoRead,
        check: bool,
        slots_in: Option<&[Vec<u32>]>,
        slots_out: &mut Vec<Vec<u32>>,
    ) -> Result<()> {
        self.check_dest(seq)?;
        let n_stream = self.cache.n_stream();
        if slots_in.is_some_and(|v| v.len() != n_stream as usize) {
            return Err(err!(
                InvalidArgument,
                "failed to restore kv cache: mirrored slot layout has the wrong stream count"
            ));
        }
        // the layout given for stream s, when there is one
        let given = |s: u32| slots_in.map(|v| &v[s as usize]);
        let no_cells_here = |s: u32| -> Result<()> {
            if given(s).is_some_and(|v| !v.is_empty()) {
                return Err(err!(
                    NoSlot,
                    "failed to restore kv cache: mirrored cache holds cells this one does not"
                ));
            }
            Ok(())
        };
        slots_out.clear();
        slots_out.resize(n_stream as usize, Vec::new());
        self.parse_n_stream(io)?;
        if seq == -1 {
            let mut plans = Vec::new();
            let mut counts = vec![0u32; n_stream as usize];
            for s in 0..n_stream {
                let n = self.parse_cell_count(s, seq, false, io)?;
                if n == 0 {
                    no_cells_here(s)?;
                    continue;
                }
                let cells = self.parse_meta(s, seq, n, io)?;
                // a whole restore's cells go from 0: a mirror takes the same ones if the
                // counts agree
                if let Some(g) = given(s) {
                    if g.len() != n as usize {
                        return Err(self.mirror_mismatch(g.len(), n));
                    }
                }
                let runs = [(0, n)];
                self.check_ranges(s, &runs)?;
                self.read_data_io(s, s, &runs, io)?;
                counts[s as usize] = n;
                plans.push((s, cells));
            }
            failpoint::hit("state_read_io: before the first change")?;
            if check {
                return Ok(());
            }
            self.zero_outside(&counts)?;
            self.set_whole_cells(plans.iter().map(|(s, c)| (*s, c)));
            for (s, &n) in counts.iter().enumerate() {
                slots_out[s] = (0..n).collect();
            }
            return Ok(());
        }
        for s in 0..n_stream {
            let n = self.parse_cell_count(s, seq, false, io)?;
            if n == 0 {
                no_cells_here(s)?;
                continue;
            }
            let cells = self.parse_meta(s, seq, n, io)?;
            let placed = self.begin_seq_at(seq, &cells, given(s).map(Vec::as_slice))?;
            self.log_meta(n, seq);
            let rest = self
                .check_ranges(placed.strm, &placed.runs)
                .and_then(|()| self.read_data_io(s, placed.strm, &placed.runs, io))
                .and_then(|()| {
                    // the streams after this one must be empty
                    for s2 in s + 1..n_stream {
                        self.parse_cell_count(s2, seq, true, io)?;
                        no_cells_here(s2)?;
                    }
                    failpoint::hit("state_read_io: before the first change")
                });
            if let Err(e) = rest {
                self.abort_seq(placed);
                return Err(e);
            }
            if check {
                self.abort_seq(placed);
                return Ok(());
            }
            self.commit_seq(&placed, &cells);
            slots_out[s as usize] = placed.slot.idxs[0].clone();
            return Ok(());
        }
        // llama.cpp leaves the destination alone when the state has no cells.
        Ok(())
    }

    /// Reads the data part of stream `s` of the input into stream `strm`, each block's
    /// tensor bytes through `io.read_tensor` into the cells of `runs`.
    fn read_data_io(
        &self,
        s: u32,
        strm: u32,
        runs: &[(u32, u32)],
        io: &mut dyn IoRead,
    ) -> Result<()> {
        let size = self.cache.params().size as usize;
        self.parse_data(s, io, |io, b| {
            let (base, _) = self.stream_base(b.t, strm)?;
            b.ranges(base, size, runs, |off, len| {
                io.read_tensor(b.t, off, len)
                    .map_err(|e| err!(InvalidState, "reading {}: {}", b.hdr.what(), e.message()))
            })
        })
    }

    /// Empties the cache and sets the cells of each `(stream, cells)` from cell 0 on, as a
    /// whole restore does.
    fn set_whole_cells<'c>(&mut self, plans: impl Iterator<Item = (u32, &'c CellPlan)>) {
        self.cache.clear();
        let has_ext = self.cache.has_cell_ext();
        for (s, plan) in plans {
            let cells = self.cache.cells_mut(s);
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
        }
    }

    /// Zeroes every tensor byte but the first `counts[s]` cells of each stream `s`.
    fn zero_outside(&mut self, counts: &[u32]) -> Result<()> {
        let size = self.cache.params().size as usize;
        let mut gaps = Vec::new();
        for b in self.blocks()? {
            gaps.clear();
            let mut at = 0;
            let (_, n_bytes) = self.stream_base(b.t, 0)?;
            for (s, &n) in counts.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let (base, _) = self.stream_base(b.t, s as u32)?;
                b.ranges(base, size, &[(0, n)], |off, len| {
                    if off > at {
                        gaps.push((at, off - at));
                    }
                    at = off + len;
                    Ok(())
                })?;
            }
            if n_bytes > at {
                gaps.push((at, n_bytes - at));
            }
            if let Some(st) = &mut self.storage {
                for &(off, len) in &gaps {
                    zero(st, b.t, off, len)?;
                }
            }
        }
        Ok(())
    }

    fn restore_whole(&mut self, plans: &[StreamPlan<'_>]) -> Result<()> {
        // Every check first: the clear below is the first change to the memory.
        for plan in plans {
            self.check_ranges(plan.s, &[(0, plan.cells.pos.len() as u32)])?;
        }
        failpoint::hit("restore_whole: before the clear")?;
        if let Some(st) = &mut self.storage {
            st.clear();
        }
        self.set_whole_cells(plans.iter().map(|p| (p.s, &p.cells)));
        for plan in plans {
            let n = plan.cells.pos.len() as u32;
            self.write_plan_data(plan.s, &plan.data, &[(0, n)])?;
        }
        Ok(())
    }

    /// One of llama.cpp's error lines of a restore (function name and message).
    fn log_error(&self, line: &str) {
        self.cache.log.emit(LogLevel::Error, || format!("{line}\n"));
    }

    /// llama.cpp's line once a sequence's cells are placed (`state_read_meta`).
    fn log_meta(&self, n: u32, dest: i32) {
        self.cache.log.emit(LogLevel::Debug, || {
            format!("state_read_meta: cell_count = {n}, dest_seq_id = {dest}\n")
        });
    }

    fn restore_seq(&mut self, dest: i32, plan: &StreamPlan<'_>) -> Result<()> {
        let placed = self.begin_seq(dest, &plan.cells)?;
        self.log_meta(plan.cells.pos.len() as u32, dest);
        // The last fallible step before the cells and tensors change: undo the removal.
        if let Err(e) = self
            .check_ranges(placed.strm, &placed.runs)
            .and_then(|()| failpoint::hit("restore_seq: after the slot search"))
        {
            self.abort_seq(placed);
            return Err(e);
        }
        self.commit_seq(&placed, &plan.cells);
        self.write_plan_data(placed.strm, &plan.data, &placed.runs)
    }

    /// Removes the cells of `dest` and finds the slot for `cells` (`state_read_meta`'s slot
    /// search). The removal is undone if no slot is found; otherwise the caller ends with
    /// [`Self::commit_seq`] or [`Self::abort_seq`].
    fn begin_seq(&mut self, dest: i32, cells: &CellPlan) -> Result<Placement> {
        self.begin_seq_at(dest, cells, None)
    }

    /// [`Self::begin_seq`], into the cells `at` when given (a mirrored layout, see
    /// [`KvMemory::state_read_io_slots`]) instead of a slot search.
    fn begin_seq_at(
        &mut self,
        dest: i32,
        cells: &CellPlan,
        at: Option<&[u32]>,
    ) -> Result<Placement> {
        if let Some(at) = at {
            if at.len() != cells.pos.len() {
                return Err(self.mirror_mismatch(at.len(), cells.pos.len() as u32));
            }
        }
        let strm = self.cache.stream_of(dest);
        let n = cells.pos.len();
        let has_ext = self.cache.has_cell_ext();
        let n_pos = self.cache.params().n_pos_per_embd as usize;

        // What seq_rm(dest) will take away, to put back if the restore fails.
        let head = self.cache.head(strm);
        let c = self.cache.cells(strm);
        let undo: Vec<(u32, i32, i32, CellExt)> = c
            .seq_pos_iter(dest)
            .map(|(pos, i)| (i, pos, c.get_shift(i), c.ext_get(i)))
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
            embd: None,
        };
        ub.pos[..n].copy_from_slice(&cells.pos);
        if has_ext {
            for (i, e) in cells.ext.iter().enumerate() {
                if n_pos > 1 {
                    ub.pos[i + n] = e.y;
                    ub.pos[i + 2 * n] = e.x;
                }
                if let Some(t) = ub.token.as_mut() {
                    t[i] = e.tok;
                }
            }
        }
        self.cache.seq_rm(dest, -1, -1)?;
        if let Some(at) = at {
            // the old cells are gone: anything else in the way is a cache that drifted
            let size = self.cache.params().size;
            let c = self.cache.cells(strm);
            let mut sorted = at.to_vec();
            sorted.sort_unstable();
            // a cell listed twice would take two tokens (llama.cpp aborts on it)
            let twice = sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
            if let Some(bad) =
                twice.or_else(|| at.iter().copied().find(|&i| i >= size || !c.is_empty(i)))
            {
                self.undo_rm(dest, strm, head, &undo);
                self.log_error(&format!(
                    "state_read_meta: cell {bad} of the mirrored slot layout is not free"
                ));
                return Err(err!(
                    NoSlot,
                    "cell {bad} of the mirrored slot layout is not free (the memory is unchanged)"
                ));
            }
        }
        let found = match at {
            Some(at) => Some(SlotInfo {
                s0: strm,
                s1: strm,
                strm: vec![strm],
                idxs: vec![at.to_vec()],
            }),
            None => self.cache.find_slot(&ub.view(), false),
        };
        let Some(slot) = found else {
            self.undo_rm(dest, strm, head, &undo);
            self.log_error(&format!(
                "state_read_meta: failed to find {n} available cells in kv cache"
            ));
            return Err(err!(
                NoSlot,
                "no room for {n} cells of sequence {dest} (the memory is unchanged)"
            ));
        };
        // llama.cpp places the cells now and logs the purges the placement makes
        if self.cache.log.is_on() {
            for (s, from, to) in self.cache.purges(&slot) {
                self.cache.log_purge(s, from, to);
            }
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &c in &slot.idxs[0] {
            match runs.last_mut() {
                Some((_, end)) if *end == c => *end = c + 1,
                _ => runs.push((c, c + 1)),
            }
        }
        Ok(Placement {
            dest,
            strm,
            head,
            undo,
            slot,
            ub,
            runs,
        })
    }

    /// Puts back what [`Self::begin_seq`] removed.
    fn abort_seq(&mut self, placed: Placement) {
        self.undo_rm(placed.dest, placed.strm, placed.head, &placed.undo);
    }

    fn undo_rm(&mut self, dest: i32, strm: u32, head: u32, undo: &[(u32, i32, i32, CellExt)]) {
        let cells = self.cache.cells_mut(strm);
        for &(c, pos, shift, ext) in undo {
            if cells.is_empty(c) {
                cells.copy_from_stream(c, pos, shift, ext, dest);
            } else {
                cells.seq_add(c, dest);
            }
        }
        self.cache.set_head(strm, head);
    }

    /// Places the cells found by [`Self::begin_seq`].
    fn commit_seq(&mut self, placed: &Placement, cells: &CellPlan) {
        // (its purges were logged when the cells were placed)
        self.cache
            .apply_ubatch_logged(&placed.slot, &placed.ub.view(), false);
        if self.cache.has_cell_ext() {
            let c = self.cache.cells_mut(placed.strm);
            for (i, &idx) in placed.slot.idxs[0].iter().enumerate() {
                c.ext_set(idx, cells.ext[i]);
            }
        }
    }

    /// Every check [`Self::write_plan_data`] and [`Self::read_data_io`] make, without
    /// writing: the tensors exist, and every range a block of stream `s` receives for the
    /// cells of `runs` lies inside its tensor. Run before the first change to the memory, so
    /// the writes cannot fail half-way.
    fn check_ranges(&self, s: u32, runs: &[(u32, u32)]) -> Result<()> {
        let size = self.cache.params().size as usize;
        for b in self.blocks()? {
            failpoint::hit("check_ranges: a tensor")?;
            let (base, n_bytes) = self.stream_base(b.t, s)?;
            b.ranges(base, size, runs, |off, len| {
                if off.checked_add(len).is_none_or(|e| e > n_bytes) {
                    return Err(err!(
                        InvalidState,
                        "the state writes bytes [{off}, +{len}) of a {n_bytes}-byte tensor"
                    ));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Copies a plan's tensor bytes (one slice per block) into stream `s`, blob cell k going
    /// to the k-th cell of `runs` (runs of consecutive destination cells).
    fn write_plan_data(&mut self, s: u32, data: &[&[u8]], runs: &[(u32, u32)]) -> Result<()> {
        let size = self.cache.params().size as usize;
        for (b, src) in self.blocks()?.iter().zip(data) {
            let (base, _) = self.stream_base(b.t, s)?;
            let Some(st) = &mut self.storage else {
                return Ok(());
            };
            let mut k = 0usize;
            let mut next = |len: usize| {
                let out = &src[k..k + len];
                k += len;
                out
            };
            if let Some(h) = st.host_bytes_mut(b.t)? {
                b.ranges(base, size, runs, |off, len| {
                    h.get_mut(off..off + len)
                        .ok_or_else(|| err!(InvalidArgument, "range outside the tensor"))?
                        .copy_from_slice(next(len));
                    Ok(())
                })?;
                continue;
            }
            b.ranges(base, size, runs, |off, len| st.set(b.t, off, next(len)))?;
        }
        Ok(())
    }

    /// llama.cpp's `llama_kv_cache::state_clear(seq_id)`, what its callers run after a failed
    /// restore: with `seq` -1 the whole cache is cleared and zeroed; otherwise the sequence
    /// is removed, and the rows of the cells it held alone are zeroed (attention may still
    /// read free cells). Cells it shared with other sequences keep their bytes.
    pub fn state_clear(&mut self, seq: i32) -> Result<()> {
        self.check_dest(seq)?;
        if seq == -1 {
            Memory::clear(self, true);
            return Ok(());
        }
        let strm = self.cache.stream_of(seq);
        let cells = self.cache.cells(strm);
        let mut own: Vec<u32> = cells
            .seq_pos_iter(seq)
            .map(|(_, c)| c)
            .filter(|&c| cells.seq_count(c) == 1)
            .collect();
        own.sort_unstable();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for c in own {
            match runs.last_mut() {
                Some((_, end)) if *end == c => *end = c + 1,
                _ => runs.push((c, c + 1)),
            }
        }
        // the ranges are checked before anything changes
        self.check_ranges(strm, &runs)?;
        self.cache.seq_rm(seq, -1, -1)?;
        let size = self.cache.params().size as usize;
        for b in self.blocks()? {
            let (base, _) = self.stream_base(b.t, strm)?;
            if let Some(st) = &mut self.storage {
                b.ranges(base, size, &runs, |off, len| zero(st, b.t, off, len))?;
            }
        }
        Ok(())
    }
}

/// Zeroes bytes `[off, off + len)` of `t`.
fn zero(st: &mut KvStorage, t: *mut ggml_sys::ggml_tensor, off: usize, len: usize) -> Result<()> {
    if let Some(h) = st.host_bytes_mut(t)? {
        h.get_mut(off..off + len)
            .ok_or_else(|| err!(InvalidArgument, "range outside the tensor"))?
            .fill(0);
        return Ok(());
    }
    const CHUNK: usize = 1 << 20;
    let z = vec![0u8; len.min(CHUNK)];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK);
        st.set(t, off + at, &z[..n])?;
        at += n;
    }
    Ok(())
}

/// What precedes a block of tensor bytes in the state.
#[derive(Clone, Copy, Debug)]
enum Header {
    /// `i32 type_k, u64 row size`.
    K,
    /// `i32 type_v, u64 row size`.
    V,
    /// `i32 type_v, u32 element size, u32 n_embd_v_gqa` (transposed V).
    VTrans,
}

impl Header {
    fn what(self) -> &'static str {
        match self {
            Header::K => "K rows",
            Header::V => "V rows",
            Header::VTrans => "V elements",
        }
    }
}

/// [`KvMemory::blocks`] of a storage whose V is transposed or not.
pub(super) fn blocks_of(st: &KvStorage, v_trans: bool) -> Result<Vec<Block>> {
    let sp = st.spec();
    let mut out = Vec::with_capacity(2 * st.layers().len());
    for l in st.layers() {
        out.push(Block {
            hdr: Header::K,
            il: l.il,
            t: l.k,
            row: row_size(sp.type_k, l.n_embd_k_gqa)?,
            chans: 1,
        });
    }
    for l in st.layers().iter().filter(|l| !l.v.is_null()) {
        out.push(if v_trans {
            Block {
                hdr: Header::VTrans,
                il: l.il,
                t: l.v,
                row: type_size(sp.type_v)?,
                chans: l.n_embd_v_gqa,
            }
        } else {
            Block {
                hdr: Header::V,
                il: l.il,
                t: l.v,
                row: row_size(sp.type_v, l.n_embd_v_gqa)?,
                chans: 1,
            }
        });
    }
    Ok(out)
}

/// One tensor's part of a stream's state: `chans` records of `row` bytes per cell, record j
/// of cell c at `(j * size + c) * row` from the stream's start (`chans` is 1 but for a
/// transposed V, whose channels are rows of `size` elements).
#[derive(Clone, Copy, Debug)]
pub(super) struct Block {
    hdr: Header,
    il: u32,
    pub(super) t: *mut ggml_sys::ggml_tensor,
    /// Bytes per cell in one record: the row size, or the element size of a transposed V.
    pub(super) row: usize,
    /// Records per cell: 1, or n_embd_v_gqa for a transposed V.
    pub(super) chans: u32,
}

impl Block {
    /// Bytes of the block for `n` cells, `None` on overflow.
    fn bytes(&self, n: u32) -> Option<usize> {
        (self.chans as usize)
            .checked_mul(n as usize)?
            .checked_mul(self.row)
    }

    /// Calls `f(offset, len)` for each tensor range the block covers for the cells of `runs`,
    /// in the order of the state's bytes (llama.cpp's `state_write_data`/`state_read_data`
    /// loops): per record, per run. `base` is the stream's offset in the tensor.
    fn ranges(
        &self,
        base: usize,
        size: usize,
        runs: &[(u32, u32)],
        mut f: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<()> {
        for j in 0..self.chans as usize {
            for &(a, e) in runs {
                f(
                    base + (j * size + a as usize) * self.row,
                    (e - a) as usize * self.row,
                )?;
            }
        }
        Ok(())
    }
}

/// The cells of one stream of a state.
#[derive(Clone, Debug)]
struct CellPlan {
    pos: Vec<i32>,
    ext: Vec<CellExt>,
    seq_off: Vec<u32>,
    seq_ids: Vec<i32>,
}

/// One stream of a parsed blob.
#[derive(Clone, Debug)]
struct StreamPlan<'a> {
    s: u32,
    cells: CellPlan,
    /// Per block (see [`KvMemory::blocks`]), its bytes for the stream's cells.
    data: Vec<&'a [u8]>,
}

/// A sequence restore between [`KvMemory::begin_seq`] and its commit or abort.
struct Placement {
    dest: i32,
    strm: u32,
    /// The stream's head before, and the cells `seq_rm(dest)` emptied or left.
    head: u32,
    undo: Vec<(u32, i32, i32, CellExt)>,
    slot: SlotInfo,
    ub: UbatchBuf,
    /// The slot's cells as runs of consecutive cells.
    runs: Vec<(u32, u32)>,
}

#[cfg(test)]
mod tests {
    //! Restores with a failure injected at each fallible step, on a memory with tensors: each
    //! failed restore must leave the cells, heads and every tensor byte as they were.

    use super::*;
    use crate::kv::{KvCache, KvParams};
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
                        c.seq_get_all(i).iter_ones().collect::<Vec<_>>()
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
            // The same through a caller's reader that applies its tensor ranges at the end.
            let n_seq = each_failure(&mut m, |m| read_io(m, &blob[8..], dest));
            let n_whole = each_failure(&mut m, |m| read_io(m, &whole, -1));
            assert_eq!(n_seq, 4 + 1, "v_trans {v_trans}");
            assert_eq!(n_whole, 4 * m.cache.n_stream() + 1, "v_trans {v_trans}");
        }
    }

    /// A reader over bytes that applies its tensor ranges once the read succeeded.
    struct Deferred<'a> {
        bytes: &'a [u8],
        pos: usize,
        pending: Vec<(*mut ggml_sys::ggml_tensor, usize, usize, usize)>,
    }

    impl crate::io::IoRead for Deferred<'_> {
        fn read(&mut self, dst: &mut [u8]) -> Result<()> {
            let src = self
                .bytes
                .get(self.pos..self.pos + dst.len())
                .ok_or_else(|| err!(InvalidState, "input ended"))?;
            dst.copy_from_slice(src);
            self.pos += dst.len();
            Ok(())
        }
        fn read_tensor(
            &mut self,
            t: *mut ggml_sys::ggml_tensor,
            off: usize,
            n: usize,
        ) -> Result<()> {
            if n > self.bytes.len() - self.pos {
                return Err(err!(InvalidState, "input ended"));
            }
            self.pending.push((t, off, self.pos, n));
            self.pos += n;
            Ok(())
        }
    }

    fn read_io(m: &mut KvMemory, bytes: &[u8], dest: i32) -> Result<usize> {
        let mut r = Deferred {
            bytes,
            pos: 0,
            pending: Vec::new(),
        };
        m.state_read_io(dest, &mut r)?;
        let st = m.storage.as_mut().unwrap();
        for &(t, off, at, n) in &r.pending {
            st.set(t, off, &bytes[at..at + n])?;
        }
        Ok(r.pos)
    }

    #[test]
    fn a_mirrored_layout_that_does_not_fit_changes_nothing() {
        // (kv_differential compares layouts that fit, and the refusals stock shares, with
        // stock; these are the ones stock aborts on or half-applies)
        let mut m = memory(true, true);
        let mut blob = vec![0u8; state::seq_get_size(&m, 0, 0).unwrap()];
        state::seq_get_data(&m, &mut blob, 0, 0, &mut state::Stash::new()).unwrap();
        let raw = &blob[8..];
        let before = snapshot(&m);
        let restore = |m: &mut KvMemory, given: Vec<Vec<u32>>| {
            let mut r = Deferred {
                bytes: raw,
                pos: 0,
                pending: Vec::new(),
            };
            m.state_read_io_slots(1, &mut r, Some(&given))
        };
        let n = m.cache.seq_pos_max(0).unwrap() as usize + 1;
        // a cell listed twice (stock places two tokens there and aborts)
        let mut twice: Vec<u32> = (40..40 + n as u32).collect();
        twice[1] = twice[0];
        let e = restore(&mut m, vec![twice]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NoSlot);
        assert!(snapshot(&m) == before);
        // a cell of another sequence (stock zeroes its rows)
        let taken: Vec<u32> = (0..n as u32).collect();
        assert!(restore(&mut m, vec![taken]).is_err());
        assert!(snapshot(&m) == before);
        // another count, another stream count, a cell past the end
        assert!(restore(&mut m, vec![(40..41).collect()]).is_err());
        assert!(restore(&mut m, vec![Vec::new(), Vec::new()]).is_err());
        let mut past: Vec<u32> = (40..40 + n as u32).collect();
        past[0] = m.cache.params().size;
        assert!(restore(&mut m, vec![past]).is_err());
        assert!(snapshot(&m) == before);
        // and one that fits: exactly those cells
        let free: Vec<u32> = (40..40 + n as u32).rev().collect();
        let placed = restore(&mut m, vec![free.clone()]).unwrap();
        assert_eq!(placed, vec![free.clone()]);
        let c = m.cache.cells(0);
        for (i, &cell) in free.iter().enumerate() {
            assert!(c.seq_has(cell, 1) && c.pos_get(cell) == i as i32);
        }
    }

    #[test]
    fn a_failing_reader_leaves_the_cells_unchanged() {
        // A reader whose input ends at every byte of the state: the cells, and with a deferred
        // reader every tensor byte, are as they were.
        for (v_trans, unified) in [(true, true), (false, false)] {
            let mut m = memory(v_trans, unified);
            let mut blob = vec![0u8; state::seq_get_size(&m, 0, 0).unwrap()];
            state::seq_get_data(&m, &mut blob, 0, 0, &mut state::Stash::new()).unwrap();
            let mut whole = vec![0u8; state::get_size(&m).unwrap()];
            state::get_data(&m, &mut whole).unwrap();
            let before = snapshot(&m);
            for len in (0..blob.len() - 8).step_by(3) {
                assert!(read_io(&mut m, &blob[8..8 + len], 1).is_err());
                assert!(snapshot(&m) == before, "seq state cut at {len}");
            }
            for len in (0..whole.len()).step_by(5) {
                assert!(read_io(&mut m, &whole[..len], -1).is_err());
                assert!(snapshot(&m) == before, "whole state cut at {len}");
            }
            let mut by_blob = memory(v_trans, unified);
            state::set_data(&mut by_blob, &whole).unwrap();
            assert_eq!(read_io(&mut m, &whole, -1).unwrap(), whole.len());
            assert!(
                snapshot(&m) == snapshot(&by_blob),
                "the whole state restored"
            );
        }
    }

    #[test]
    fn a_check_agrees_with_the_restore_and_changes_nothing() {
        // Every cut and every corrupted byte of a sequence state and a whole state: the dry run
        // fails exactly when the restore fails, consumes the same bytes when both succeed,
        // and leaves every cell and tensor byte as they were, even in stock-compatible mode
        // (where the restore's failure erases or clears).
        for (v_trans, unified) in [(true, true), (false, false)] {
            let mut m = memory(v_trans, unified);
            Memory::set_stock_compat(&mut m, true);
            let mut blob = vec![0u8; state::seq_get_size(&m, 0, 0).unwrap()];
            state::seq_get_data(&m, &mut blob, 0, 0, &mut state::Stash::new()).unwrap();
            let mut whole = vec![0u8; state::get_size(&m).unwrap()];
            state::get_data(&m, &mut whole).unwrap();
            let seq_part = blob[8..].to_vec();
            let mut inputs: Vec<(i32, Vec<u8>)> = Vec::new();
            for (dest, full) in [(1, &seq_part), (-1, &whole)] {
                for len in (0..full.len()).step_by(7) {
                    inputs.push((dest, full[..len].to_vec()));
                }
                // the metadata (before the first tensor rows) byte by byte
                for at in 0..full.len().min(160) {
                    let mut b = full.clone();
                    b[at] ^= 0x5a;
                    inputs.push((dest, b));
                }
                inputs.push((dest, full.clone()));
            }
            let (mut n_ok, mut n_err) = (0, 0);
            for (dest, bytes) in &inputs {
                let before = snapshot(&m);
                let mut r = Deferred {
                    bytes,
                    pos: 0,
                    pending: Vec::new(),
                };
                let checked = m.state_check_io(*dest, &mut r).map(|()| r.pos);
                assert!(snapshot(&m) == before, "the check changed the memory");
                let mut fresh = memory(v_trans, unified);
                Memory::set_stock_compat(&mut fresh, true);
                let restored = read_io(&mut fresh, bytes, *dest);
                assert_eq!(
                    checked.is_ok(),
                    restored.is_ok(),
                    "dest {dest}, {} bytes: check {checked:?}, restore {restored:?}",
                    bytes.len()
                );
                if let (Ok(a), Ok(b)) = (&checked, &restored) {
                    assert_eq!(a, b);
                    n_ok += 1;
                } else {
                    n_err += 1;
                }
            }
            assert!(n_ok >= 2 && n_err > 100, "{n_ok} restored, {n_err} refused");
        }
    }
}
