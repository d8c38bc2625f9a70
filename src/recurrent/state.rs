//! [`RecurrentMemory`], the recurrent cells together with their state tensors, and its state
//! in llama.cpp's byte layout (`llama_memory_recurrent::state_write/state_read`).
//!
//! Layout (`RSState`): `u32 cell_count`, per cell `i32 pos, u32 n_seq_id, i32 seq_id[n]`
//! (`n_seq_id` is always 0 in a one-sequence state), then `u32 s_trans (0), u32 n_layer` (all
//! model layers), per layer with tensors `i32 r_type, u64 r_row, rows` (and `u64 p_row, rows`
//! for a PLE layer), then per layer `i32 s_type, u64 s_row, rows`. The rows written are the
//! ones the next ubatch would read: the pending rollback plane of the sequence, and the
//! cell's `src` row. Unlike the KV cache, the data header is written even with no cell.
//!
//! Reading parses and validates the whole input before any change; a failed restore leaves
//! the memory as it was, where llama.cpp erases the destination sequence (or, for a whole
//! restore, everything) and zeroes its rows.

use super::memory::RecurrentMemory;
use super::RsCache;
use crate::cells::SeqSet;
use crate::error::{err, Result};
use crate::io::{FieldSource, IoRead, StateIn, StateOut, FLAG_ON_DEVICE};
use crate::memory::{LogLevel, Memory, ReadStage};

/// A parsed state, not yet applied.
struct Plan<'a> {
    /// `(pos, sequences)` per cell.
    cells: Vec<(i32, SeqSet)>,
    /// `(tensor, row bytes, rows)` in the order they are written.
    rows: Vec<(*mut ggml_sys::ggml_tensor, usize, &'a [u8])>,
}

impl RecurrentMemory {
    fn check_dest(&self, seq: i32) -> Result<()> {
        crate::memory::check_dest(seq, self.cache.n_seq_max())
    }

    /// Writes the state of `seq` (-1: every non-empty cell) in llama.cpp's layout.
    pub fn state_write(&self, seq: i32, flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        // in stock-compatible mode any id below 256, as llama.cpp (one no cell holds writes an
        // empty state)
        if !(self.stock_failure && (0..crate::cells::MAX_SEQ as i32).contains(&seq)) {
            self.check_dest(seq)?;
        }
        let c = &self.cache;
        let size = c.size();
        let mut sel = Vec::new();
        let mut rows: Vec<(u32, u32)> = Vec::new();
        let mut n_meta_ranges = 0;
        let mut prev: Option<usize> = None;
        for (i, cell) in c.cells().iter().enumerate() {
            let hit = if seq == -1 {
                !cell.is_empty()
            } else {
                cell.has(seq)
            };
            if !hit {
                continue;
            }
            let mut plane = 0;
            if c.n_rs_seq() != 0 {
                if seq != -1 {
                    plane = c.rs_idx()[seq as usize];
                } else {
                    let mut it = cell.seq.iter_ones().map(|q| c.rs_idx()[q]);
                    plane = it.next().unwrap_or(0);
                    if it.any(|x| x != plane) {
                        return Err(err!(
                            Unsupported,
                            "cell {i} is shared by sequences with different pending rollbacks (llama.cpp aborts here)"
                        ));
                    }
                }
            }
            let row = plane * size
                + if cell.src >= 0 {
                    cell.src as u32
                } else {
                    i as u32
                };
            match rows.last_mut() {
                Some(r) if r.1 == row => r.1 += 1,
                _ => rows.push((row, row + 1)),
            }
            if prev.is_none_or(|p| p + 1 != i) {
                n_meta_ranges += 1;
            }
            prev = Some(i);
            sel.push(i);
        }
        if flags & FLAG_ON_DEVICE != 0 && n_meta_ranges > 1 {
            return Err(err!(
                Unsupported,
                "an ON_DEVICE state must be one range of cells (llama.cpp aborts here)"
            ));
        }
        out.sink.u32(sel.len() as u32)?;
        for &i in &sel {
            let cell = &c.cells()[i];
            out.sink.i32(cell.pos)?;
            if seq == -1 {
                out.sink.u32(cell.seq.count_ones() as u32)?;
                for q in cell.seq.iter_ones() {
                    out.sink.i32(q as i32)?;
                }
            } else {
                out.sink.u32(0)?;
            }
        }
        out.sink.u32(0)?; // s_trans
        out.sink.u32(self.n_layer)?;
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let sp = st.spec();
        let copy_rows = |out: &mut StateOut<'_, '_>, t, row: usize| -> Result<()> {
            for &(a, b) in &rows {
                let off = a as usize * row;
                out.tensor(t, off, (b - a) as usize * row, |dst| st.get(t, off, dst))?;
            }
            Ok(())
        };
        for l in st.layers() {
            out.sink.i32(sp.type_r as i32)?;
            out.sink.u64(l.row_r as u64)?;
            copy_rows(out, l.r, l.row_r)?;
            if !l.p.is_null() {
                out.sink.u64(l.row_p as u64)?;
                copy_rows(out, l.p, l.row_p)?;
            }
        }
        for l in st.layers() {
            out.sink.i32(sp.type_s as i32)?;
            out.sink.u64(l.row_s as u64)?;
            copy_rows(out, l.s, l.row_s)?;
        }
        Ok(())
    }

    /// Reads and validates the cell part of a state (`state_read_meta`'s input).
    fn parse_meta(
        &self,
        seq: i32,
        inp: &mut (impl FieldSource + ?Sized),
    ) -> Result<Vec<(i32, SeqSet)>> {
        let c = &self.cache;
        let count = inp.u32("cell_count")?;
        self.stage.set(ReadStage::Meta);
        if count > c.size() {
            self.log_error("state_read_meta: not enough cells in kv cache".into());
            return Err(err!(
                InvalidState,
                "{count} cells do not fit in {} cells",
                c.size()
            ));
        }
        if seq != -1 && count > 1 {
            // llama.cpp places one cell and then asserts the others are there: it aborts
            return Err(err!(
                InvalidState,
                "a sequence state holds one recurrent cell, this one {count}"
            ));
        }
        let mut cells = Vec::with_capacity(count as usize);
        // the cell holding each sequence so far, -1 for none
        let mut tails = [-1i32; crate::cells::MAX_SEQ];
        for k in 0..count {
            let pos = inp.i32("cell pos")?;
            let n = inp.u32("cell n_seq_id")?;
            let mut set = SeqSet::ZERO;
            if seq != -1 {
                if n != 0 {
                    self.log_error("state_read_meta: invalid seq_id-agnostic kv cell".into());
                    return Err(err!(
                        InvalidState,
                        "cell {k} of a sequence state lists {n} sequence ids (expected 0)"
                    ));
                }
            } else {
                for _ in 0..n {
                    let q = inp.i32("cell seq_ids")?;
                    if q < 0 || q as u32 >= c.n_seq_max() {
                        self.log_error(format!(
                            "state_read_meta: invalid seq_id, {q} is out of range [0, {})",
                            c.n_seq_max()
                        ));
                        return Err(err!(
                            InvalidState,
                            "cell {k}: seq_id {q} outside [0, {})",
                            c.n_seq_max()
                        ));
                    }
                    let tail = tails[q as usize];
                    if tail != -1 {
                        self.log_error(format!(
                            "state_read_meta: duplicate tail for seq_id {q} in cell {k} and {tail}"
                        ));
                        return Err(err!(
                            InvalidState,
                            "cell {k}: sequence {q} already has a cell"
                        ));
                    }
                    tails[q as usize] = k as i32;
                    set.set(q as usize, true);
                }
            }
            cells.push((pos, set));
        }
        // llama.cpp places the cells here, before it reads their rows (this reader places them
        // once the whole input is read): where they would go is what a failure zeroes, which
        // only stock-compatible mode does, so only it pays for the placement here
        if self.stock_failure && seq != -1 {
            if let Ok((_, head)) = self.restored_cache_quiet(seq, &cells) {
                self.placed(seq, head, cells.len());
            }
        }
        self.stage.set(ReadStage::Data);
        let s_trans = inp.u32("s_trans")?;
        let n_layer = inp.u32("n_layer")?;
        // llama.cpp's order and lines
        if n_layer != self.n_layer {
            self.log_error(format!(
                "state_read_data: mismatched layer count ({n_layer} instead of {})",
                self.n_layer
            ));
            return Err(err!(
                InvalidState,
                "the state has {n_layer} layers, the model {}",
                self.n_layer
            ));
        }
        if s_trans != 0 {
            self.log_error("state_read_data: incompatible s transposition".into());
            return Err(err!(
                InvalidState,
                "transposed S states are not supported (s_trans = {s_trans})"
            ));
        }
        Ok(cells)
    }

    /// Reads the data part of a state of `n` cells, layer header by layer header, in the
    /// order llama.cpp writes it; `rows(source, tensor, row bytes, what)` takes each block of rows.
    fn parse_data<S: FieldSource + ?Sized>(
        &self,
        inp: &mut S,
        mut rows: impl FnMut(&mut S, *mut ggml_sys::ggml_tensor, usize, &str) -> Result<()>,
    ) -> Result<()> {
        let Some(st) = &self.storage else {
            return Ok(());
        };
        let sp = st.spec();
        for l in st.layers() {
            self.check_field(inp.i32("state type")?, sp.type_r as i32, "r type", l.il)?;
            self.check_field(inp.u64("row size")?, l.row_r as u64, "r row size", l.il)?;
            rows(inp, l.r, l.row_r, "r rows")?;
            if !l.p.is_null() {
                self.check_field(inp.u64("row size")?, l.row_p as u64, "ple row size", l.il)?;
                rows(inp, l.p, l.row_p, "ple rows")?;
            }
        }
        for l in st.layers() {
            self.check_field(inp.i32("state type")?, sp.type_s as i32, "s type", l.il)?;
            self.check_field(inp.u64("row size")?, l.row_s as u64, "s row size", l.il)?;
            rows(inp, l.s, l.row_s, "s rows")?;
        }
        Ok(())
    }

    /// Parses and validates a whole state without touching the memory.
    fn parse<'a>(&self, seq: i32, inp: &mut StateIn<'a>) -> Result<Plan<'a>> {
        let cells = self.parse_meta(seq, &mut inp.meta)?;
        let n = cells.len();
        let mut rows = Vec::new();
        let stash = &mut inp.stash;
        self.parse_data(&mut inp.meta, |meta, t, row, what| {
            let b = match stash {
                Some(r) => r.take_n(n, row, what)?,
                None => meta.take_n(n, row, what)?,
            };
            if self.check_finite {
                let sp = self.storage.as_ref().map(|st| st.spec());
                let ty = match sp {
                    Some(sp) if what.starts_with('s') => sp.type_s,
                    Some(sp) => sp.type_r,
                    None => u32::MAX,
                };
                if let Some(i) = crate::finite::first_non_finite(ty, b) {
                    return Err(err!(
                        InvalidState,
                        "{what}: element {i} is not finite (NaN or infinity; the non-finite check is on)"
                    ));
                }
            }
            rows.push((t, row, b));
            Ok(())
        })?;
        if let Some(st) = &self.storage {
            // every write below starts at or before row size - count of plane 0
            let first = self.cache.size() as usize - n;
            for &(t, row, b) in &rows {
                st.check(t, first * row, b.len())?;
            }
        }
        Ok(Plan { cells, rows })
    }

    /// The cells after restoring `cells` into `seq` (-1: everything), and the first cell of
    /// the restored rows, without changing the memory.
    fn restored_cache(&self, seq: i32, cells: &[(i32, SeqSet)]) -> Result<(RsCache, u32)> {
        let (next, head) = self.restored_cache_quiet(seq, cells).inspect_err(|_| {
            self.log_error("state_read_meta: failed to find available cells in kv cache".into())
        })?;
        self.placed(seq, head, cells.len());
        Ok((next, head))
    }

    fn restored_cache_quiet(&self, seq: i32, cells: &[(i32, SeqSet)]) -> Result<(RsCache, u32)> {
        let mut next = self.cache.clone();
        let head = if seq != -1 {
            match cells.first() {
                None => {
                    next.seq_rm(seq, -1, -1)?;
                    0
                }
                Some(&(pos, _)) => next.place_restored(seq, pos)?,
            }
        } else {
            next.set_restored(cells);
            0
        };
        next.reset_rs_idx(seq);
        Ok((next, head))
    }

    /// Notes where a sequence restore's cells go: llama.cpp places them before it reads their
    /// rows, and zeroes those rows when the rest fails.
    fn placed(&self, seq: i32, head: u32, n: usize) {
        if seq != -1 && n > 0 {
            self.failed_rows.set(Some((head, n as u32)));
        }
    }

    /// Restores a state read field by field from `io` (llama.cpp's `state_read` over a
    /// `llama_io_read_i`). The cells are validated and placed first, then each layer's rows
    /// go to `io.read_tensor` at their final offset. On error the cells and the other rows
    /// are as they were; a reader that writes tensor bytes at once (a file) may have changed
    /// the destination's rows by then, which llama.cpp's caller erases.
    pub fn state_read_io(&mut self, seq: i32, io: &mut dyn IoRead) -> Result<()> {
        self.stage.set(ReadStage::Header);
        self.failed_rows.set(None);
        let r = self.read_io(seq, io, false);
        self.stock_failure(seq, &r);
        r
    }

    /// Reads and validates a state from `io` exactly as [`RecurrentMemory::state_read_io`]
    /// does (the same fields, the same row ranges through `io.read_tensor`) and changes
    /// nothing, even in stock-compatible mode. `read_stage` then says how far it got.
    pub fn state_check_io(&mut self, seq: i32, io: &mut dyn IoRead) -> Result<()> {
        self.stage.set(ReadStage::Header);
        self.read_io(seq, io, true)
    }

    /// llama.cpp's effect of a failed `state_read` (`llama_memory_recurrent::state_read`), in
    /// stock-compatible mode only: nothing when the cell count could not be read; else the
    /// destination erased (`seq_rm`) and, once its cells were placed, the rows they were
    /// placed at zeroed (`state_clear`), or everything cleared for a whole restore.
    fn stock_failure(&mut self, seq: i32, r: &Result<()>) {
        if r.is_err() && self.stock_failure && self.stage.get() != ReadStage::Header {
            if seq == -1 {
                Memory::clear(self, true);
            } else {
                // the destination was checked before the count was read
                let _ = Memory::seq_rm(self, seq, -1, -1);
                // and the rows its cells were placed at are zeroed, as llama.cpp's state_clear
                if let (Some((head, n)), Some(st)) = (self.failed_rows.take(), &mut self.storage) {
                    st.zero_rows(head as usize, n as usize);
                }
            }
        }
    }

    /// One of llama.cpp's error lines of a restore (function name and message).
    fn log_error(&self, line: String) {
        self.cache.log.emit(LogLevel::Error, || format!("{line}\n"));
    }

    /// A field of a layer's data header against the memory's value, with llama.cpp's line
    /// (`mismatched <what> (<ours> != <state's>, layer <il>)`) when they differ.
    fn check_field<T: PartialEq + std::fmt::Display>(
        &self,
        got: T,
        want: T,
        what: &str,
        il: u32,
    ) -> Result<()> {
        if got != want {
            self.log_error(format!(
                "state_read_data: mismatched {what} ({want} != {got}, layer {il})"
            ));
            return Err(err!(
                InvalidState,
                "layer {il}: {what} {got} in the state, {want} in the memory"
            ));
        }
        Ok(())
    }

    fn read_io(&mut self, seq: i32, io: &mut dyn IoRead, check: bool) -> Result<()> {
        self.check_dest(seq)?;
        let cells = self.parse_meta(seq, io)?;
        let (next, head) = self.restored_cache(seq, &cells)?;
        let n = cells.len();
        if let Some(st) = &self.storage {
            self.parse_data(io, |io, t, row, what| {
                let len = n
                    .checked_mul(row)
                    .ok_or_else(|| err!(InvalidState, "{what}: size overflows"))?;
                st.check(t, head as usize * row, len)?;
                io.read_tensor(t, head as usize * row, len)
                    .map_err(|e| err!(InvalidState, "reading {what}: {}", e.message()))
            })?;
        }
        if check {
            return Ok(());
        }
        if seq == -1 {
            // a whole restore zeroes the rest, as llama.cpp's clear(true); the restored rows
            // (plane 0, cells 0..n) are the reader's, written now or when it is done
            if let Some(st) = &mut self.storage {
                st.clear_from_row(n);
            }
        }
        self.cache = next;
        Ok(())
    }

    /// Restores a state into `seq` (-1: replace everything). On error nothing changed.
    pub fn state_read(&mut self, seq: i32, inp: &mut StateIn<'_>) -> Result<()> {
        self.stage.set(ReadStage::Header);
        self.failed_rows.set(None);
        let r = self.read_blob(seq, inp);
        self.stock_failure(seq, &r);
        r
    }

    fn read_blob(&mut self, seq: i32, inp: &mut StateIn<'_>) -> Result<()> {
        self.check_dest(seq)?;
        let plan = self.parse(seq, inp)?;
        inp.check_stash_consumed()?;
        let (next, head) = self.restored_cache(seq, &plan.cells)?;
        self.cache = next;
        if seq == -1 {
            if let Some(st) = &mut self.storage {
                st.clear();
            }
        }
        if let Some(st) = &mut self.storage {
            for (t, row, b) in plan.rows {
                // cannot fail: parse checked the furthest range these writes can reach
                st.set(t, head as usize * row, b)?;
            }
        }
        Ok(())
    }
}
