//! The recurrent memory: llama.cpp's `llama_memory_recurrent` (Mamba, RWKV, short-conv and the
//! recurrent half of every hybrid model), with the same cells, slot search, sequence
//! operations, rollback planes and graph-input values.
//!
//! A recurrent layer keeps one state row per sequence instead of one K/V row per token, so a
//! cell holds a sequence's whole past: its last position (`pos`), the row its state must be
//! read from before the next ubatch (`src`, staged into `src0` for the graph's `s_copy`) and
//! the sequences sharing it. Cell `s` doubles as the metadata slot of sequence `s`: its `tail`
//! is the index of the cell holding that sequence's state (llama.cpp's dual use of `tail`).
//!
//! With `n_rs_seq > 0` every layer keeps `n_rs_seq` extra planes of rows, the states of the
//! last tokens of the previous ubatch, so that a `seq_rm` removing up to `n_rs_seq` trailing
//! positions can roll the sequence back instead of failing (`rs_idx` names the plane the next
//! ubatch reads; reading `s_copy` consumes it).
//!
//! Differences from llama.cpp, all on input it aborts on or mishandles: sequence ids outside
//! `[0, n_seq_max)` are refused by every operation (llama.cpp ignores them, or for `seq_keep`
//! empties every cell); `seq_div` by `d <= 0` is refused; a slot search that llama.cpp would
//! abort in (no free cell, no zero-state row, overlapping sequence sets) fails and changes
//! nothing.

#![forbid(unsafe_code)]

mod context;
pub mod memory;
mod state;

pub use context::RsContext;
pub use memory::RecurrentMemory;

use crate::cells::{SeqSet, MAX_SEQ};
use crate::error::{err, Result};
use crate::memory::LogLevel;
use crate::memory::Status;
use crate::ubatch::Ubatch;

/// One cell (`llama_memory_recurrent::mem_cell`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsCell {
    /// Last position of the state held here, -1 when free.
    pub pos: i32,
    /// Row the state must be read from before the next ubatch (-1: none, a zero state).
    pub src: i32,
    /// `src` as staged for the graph's `s_copy` by the last slot search.
    pub src0: i32,
    /// As the metadata slot of sequence `i`: the cell holding its state, -1 if none.
    pub tail: i32,
    /// Sequences sharing this state.
    pub seq: SeqSet,
}

impl Default for RsCell {
    fn default() -> Self {
        RsCell {
            pos: -1,
            src: -1,
            src0: -1,
            tail: -1,
            seq: SeqSet::ZERO,
        }
    }
}

impl RsCell {
    /// True when no sequence uses the cell (llama.cpp's `is_empty`, which ignores `pos`).
    #[inline]
    pub fn is_empty(&self) -> bool {
        // on the raw words: the slot search asks this of every cell, twice per placement
        self.seq.as_raw_slice().iter().all(|&w| w == 0)
    }

    /// True when exactly one sequence uses the cell (it "owns" its state).
    #[inline]
    fn has_one(&self) -> bool {
        self.seq
            .as_raw_slice()
            .iter()
            .map(|w| w.count_ones())
            .sum::<u32>()
            == 1
    }

    /// True when sequence `s` (in `[0, MAX_SEQ)`) uses the cell.
    pub fn has(&self, s: i32) -> bool {
        s >= 0 && (s as usize) < MAX_SEQ && self.seq[s as usize]
    }

    fn clear_seq(&mut self) {
        self.seq = SeqSet::ZERO;
    }
}

/// Construction parameters of a recurrent memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsParams {
    /// Cells (`mem_size`; llama.cpp uses `max(1, n_seq_max)`), at least `n_seq_max`, at most
    /// 256.
    pub size: u32,
    /// Number of sequences, 1..=256.
    pub n_seq_max: u32,
    /// Rollback planes per sequence (`n_rs_seq`).
    pub n_rs_seq: u32,
}

impl Default for RsParams {
    fn default() -> Self {
        RsParams {
            size: 1,
            n_seq_max: 1,
            n_rs_seq: 0,
        }
    }
}

/// The cells of a recurrent memory and every operation on them, without tensors.
#[derive(Clone, Debug)]
pub struct RsCache {
    p: RsParams,
    /// llama.cpp's `!is_empty()`: the memory has at least one layer with tensors. Without one
    /// a partial `seq_rm` only moves the position back and no rollback plane exists.
    has_layers: bool,
    cells: Vec<RsCell>,
    head: u32,
    used: u32,
    n: u32,
    rs_z: i32,
    rs_idx: Vec<u32>,
    /// The cells before the current slot search, to undo it (reused, never shrinks).
    saved: Vec<RsCell>,
    /// The cells before `prepare`, put back after it (reused).
    prepared: Vec<RsCell>,
    refcounts: Vec<u32>,
    /// Where llama.cpp's log lines of the memory go.
    pub(crate) log: crate::memory::Log,
    /// llama.cpp's sequence-id rule (stock-compatible mode): `seq_keep` takes any id below
    /// 256, as llama.cpp's, where an id at or above `n_seq_max` keeps nothing.
    pub(crate) stock_ids: bool,
}

/// One sequence set of a ubatch as the slot search reads it: the sequence ids of its first
/// token and the position of its last token.
type SetOf<'a> = dyn Fn(u32) -> (&'a [i32], i32) + 'a;

impl RsCache {
    /// An empty memory. `has_layers` tells whether it behaves as one with tensors (see
    /// [`RsCache::has_layers`]). Without layers no rollback plane is ever used, but `n_rs_seq`
    /// keeps its value: upstream's constructor means to zero it and zeroes only its own
    /// parameter, which shadows the member.
    pub fn new(p: RsParams, has_layers: bool) -> Result<Self> {
        if p.n_seq_max == 0 || p.n_seq_max as usize > MAX_SEQ {
            return Err(err!(
                InvalidArgument,
                "n_seq_max must be in 1..={MAX_SEQ}, got {}",
                p.n_seq_max
            ));
        }
        if p.size < p.n_seq_max || p.size as usize > MAX_SEQ {
            return Err(err!(
                InvalidArgument,
                "size must be in n_seq_max..={MAX_SEQ} (one cell per sequence), got {}",
                p.size
            ));
        }
        let planes = (p.n_rs_seq as u64 + 1) * p.size as u64;
        if planes > i32::MAX as u64 {
            return Err(err!(
                InvalidArgument,
                "n_rs_seq {} gives more rows than an i32 s_copy can index",
                p.n_rs_seq
            ));
        }
        Ok(RsCache {
            p,
            has_layers,
            cells: vec![RsCell::default(); p.size as usize],
            head: 0,
            used: 0,
            n: 0,
            rs_z: -1,
            rs_idx: vec![0; p.n_seq_max as usize],
            saved: Vec::with_capacity(p.size as usize),
            prepared: Vec::with_capacity(p.size as usize),
            refcounts: vec![0; p.size as usize],
            log: Default::default(),
            stock_ids: false,
        })
    }

    /// The parameters.
    pub fn params(&self) -> RsParams {
        self.p
    }
    /// Number of cells.
    pub fn size(&self) -> u32 {
        self.p.size
    }
    /// Number of sequences.
    pub fn n_seq_max(&self) -> u32 {
        self.p.n_seq_max
    }
    /// Rollback planes per sequence.
    pub fn n_rs_seq(&self) -> u32 {
        self.p.n_rs_seq
    }
    /// Whether the memory has layers with tensors (llama.cpp's `!is_empty()`).
    pub fn has_layers(&self) -> bool {
        self.has_layers
    }
    /// First cell of the last placed ubatch.
    pub fn head(&self) -> u32 {
        self.head
    }
    /// Cells in use, as llama.cpp counts them.
    pub fn used(&self) -> u32 {
        self.used
    }
    /// Cells spanned by the last placed ubatch.
    pub fn n(&self) -> u32 {
        self.n
    }
    /// The row zeroed for new sequences by the last slot search (-1: none).
    pub fn rs_z(&self) -> i32 {
        self.rs_z
    }
    /// Pending rollback plane per sequence (0: none).
    pub fn rs_idx(&self) -> &[u32] {
        &self.rs_idx
    }
    /// All cells.
    pub fn cells(&self) -> &[RsCell] {
        &self.cells
    }

    fn check_seq(&self, seq: i32) -> Result<()> {
        if seq < 0 || seq as u32 >= self.p.n_seq_max {
            return Err(err!(
                InvalidSeqId,
                "seq_id {seq} outside [0, {})",
                self.p.n_seq_max
            ));
        }
        Ok(())
    }

    /// Removes every cell (`clear`); tensor data is the caller's.
    pub fn clear(&mut self) {
        for c in &mut self.cells {
            c.pos = -1;
            c.clear_seq();
            c.src = -1;
            c.tail = -1;
        }
        self.head = 0;
        self.used = 0;
        self.rs_idx.fill(0);
    }

    /// What [`RsCache::seq_rm`] would return, changing nothing (the same error, unlogged, for an
    /// invalid id): false only for a removal of the tail of the sequence's state that no
    /// rollback plane can undo (none kept, one already pending, or further back than
    /// `n_rs_seq` tokens).
    pub fn can_seq_rm(&self, seq: i32, p0: i32, p1: i32) -> Result<bool> {
        self.check_seq(seq)?;
        let p0 = p0.max(0);
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        let s = seq as usize;
        let t = self.cells[s].tail;
        if t < 0 || !self.has_layers {
            return Ok(true);
        }
        let cell = self.cells[t as usize];
        if !(0 < p0 && p0 <= cell.pos && p1 > cell.pos) {
            return Ok(true);
        }
        let rollback = cell.pos - (p0 - 1);
        Ok(self.rs_idx[s] == 0 && rollback >= 1 && rollback <= self.p.n_rs_seq as i32)
    }

    /// `seq_rm`. A recurrent state cannot lose positions before its last one, so only a range
    /// holding the last position changes anything: a range from 0 (or a negative `p0`) frees
    /// the state; a suffix from `p0 > 0` rolls back through a rollback plane when one is
    /// available and returns false when not. Any other range returns true and changes nothing.
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> Result<bool> {
        if let Err(e) = self.check_seq(seq) {
            let n = self.p.n_seq_max;
            self.log.emit(LogLevel::Error, || {
                format!("seq_rm: invalid seq_id ({seq}) - larger than n_seq_max ({n})\n")
            });
            return Err(e);
        }
        let p0 = p0.max(0);
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        let s = seq as usize;
        if p0 == 0 && p1 == i32::MAX {
            self.rs_idx[s] = 0;
        }
        let t = self.cells[s].tail;
        if t >= 0 {
            let cell = self.cells[t as usize];
            if 0 < p0 && p0 <= cell.pos && p1 > cell.pos {
                if !self.has_layers {
                    self.cells[t as usize].pos = p0 - 1;
                    return Ok(true);
                }
                let rollback = cell.pos - (p0 - 1);
                if self.rs_idx[s] == 0 && rollback >= 1 && rollback <= self.p.n_rs_seq as i32 {
                    self.rs_idx[s] = rollback as u32;
                    self.cells[t as usize].pos = p0 - 1;
                    return Ok(true);
                }
                return Ok(false);
            }
            if p0 <= cell.pos && cell.pos < p1 {
                self.cells[s].tail = -1;
            }
        }
        let mut new_head = self.p.size;
        for (i, c) in self.cells.iter_mut().enumerate() {
            if c.pos >= p0 && c.pos < p1 && c.seq[s] {
                c.seq.set(s, false);
                if c.is_empty() {
                    if c.pos >= 0 {
                        self.used = self.used.wrapping_sub(1);
                    }
                    c.pos = -1;
                    c.src = -1;
                    if new_head == self.p.size {
                        new_head = i as u32;
                    }
                }
            }
        }
        if new_head != self.p.size && new_head < self.head {
            self.head = new_head;
        }
        Ok(true)
    }

    /// `seq_cp`: `dst` leaves its cell and shares `src`'s state (the range is ignored, as
    /// upstream: a state has no parts).
    pub fn seq_cp(&mut self, src: i32, dst: i32, _p0: i32, _p1: i32) -> Result<()> {
        self.check_seq(src)?;
        self.check_seq(dst)?;
        if src == dst {
            return Ok(());
        }
        self.detach(dst);
        let ts = self.cells[src as usize].tail;
        if ts >= 0 {
            self.cells[ts as usize].seq.set(dst as usize, true);
            self.cells[dst as usize].tail = ts;
        }
        Ok(())
    }

    /// Takes `seq` out of its tail cell, freeing the cell when it was the last user. `used`
    /// is decremented unconditionally there, as llama.cpp does in `seq_cp` and `find_slot`.
    fn detach(&mut self, seq: i32) {
        let s = seq as usize;
        let t = self.cells[s].tail;
        if t < 0 {
            return;
        }
        self.cells[s].tail = -1;
        let c = &mut self.cells[t as usize];
        c.seq.set(s, false);
        if c.is_empty() {
            c.pos = -1;
            c.src = -1;
            self.used = self.used.wrapping_sub(1);
        }
    }

    /// `seq_keep`: every other sequence is removed.
    pub fn seq_keep(&mut self, seq: i32) -> Result<()> {
        if !(self.stock_ids && (0..MAX_SEQ as i32).contains(&seq)) {
            self.check_seq(seq)?;
        }
        let s = seq as usize;
        let mut new_head = self.p.size;
        for (i, c) in self.cells.iter_mut().enumerate() {
            if i != s {
                c.tail = -1;
            }
            if !c.seq[s] {
                if c.pos >= 0 {
                    self.used = self.used.wrapping_sub(1);
                }
                c.clear_seq();
                c.pos = -1;
                c.src = -1;
                if new_head == self.p.size {
                    new_head = i as u32;
                }
            } else {
                c.clear_seq();
                c.seq.set(s, true);
            }
        }
        if new_head != self.p.size && new_head < self.head {
            self.head = new_head;
        }
        Ok(())
    }

    /// The tail cell of `seq` when its position lies in `[p0, p1)` (bounds normalized).
    fn tail_in_range(&self, seq: i32, p0: i32, p1: i32) -> Option<usize> {
        let p0 = p0.max(0);
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        if p0 == p1 {
            return None;
        }
        let t = self.cells[seq as usize].tail;
        if t < 0 {
            return None;
        }
        let c = &self.cells[t as usize];
        (c.seq[seq as usize] && p0 <= c.pos && c.pos < p1).then_some(t as usize)
    }

    /// `seq_add`: only the position moves (wrapping at `i32` like the stock build).
    pub fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        self.check_seq(seq)?;
        if delta == 0 {
            return Ok(());
        }
        if let Some(t) = self.tail_in_range(seq, p0, p1) {
            let c = &mut self.cells[t];
            c.pos = c.pos.wrapping_add(delta);
        }
        Ok(())
    }

    /// `seq_div`: only the position changes. `d <= 0` is refused.
    pub fn seq_div(&mut self, seq: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        self.check_seq(seq)?;
        if !crate::memory::seq_div_changes(d)? {
            return Ok(());
        }
        if let Some(t) = self.tail_in_range(seq, p0, p1) {
            self.cells[t].pos /= d;
        }
        Ok(())
    }

    /// The position of `seq`'s state: a sequence is in exactly one cell, its tail (upstream
    /// scans every cell for it; [`RsCache::check_invariants`] checks that they agree).
    fn tail_pos(&self, seq: i32) -> Option<i32> {
        let t = self.cells[seq as usize].tail;
        (t >= 0).then(|| self.cells[t as usize].pos)
    }

    /// `seq_pos_min`: the smallest position of a cell holding `seq`, -1 if none (and, as
    /// upstream computes it, -1 for a state at `i32::MAX`).
    pub fn seq_pos_min(&self, seq: i32) -> Result<i32> {
        self.check_seq(seq)?;
        Ok(self.tail_pos(seq).filter(|&p| p != i32::MAX).unwrap_or(-1))
    }

    /// `seq_pos_max`: the largest position of a cell holding `seq`, -1 if none (or below -1).
    pub fn seq_pos_max(&self, seq: i32) -> Result<i32> {
        self.check_seq(seq)?;
        Ok(self.tail_pos(seq).map_or(-1, |p| p.max(-1)))
    }

    /// Checks what the slot search needs beyond [`Ubatch::validate`]: an equal split (llama.cpp
    /// asserts it), and sequence sets that do not overlap and list no id twice (as
    /// `split_equal` makes them; overlapping sets make llama.cpp abort).
    pub fn check_ubatch(&self, ub: &Ubatch<'_>) -> Result<()> {
        ub.validate(self.p.n_seq_max)?;
        if !ub.equal_seqs {
            return Err(err!(
                InvalidUbatch,
                "a recurrent memory needs an equal split (equal_seqs)"
            ));
        }
        let mut seen = SeqSet::ZERO;
        for s in 0..ub.n_seqs {
            let i = s * ub.n_seq_tokens;
            let first = ub.seqs(i);
            for k in 1..ub.n_seq_tokens {
                if ub.seqs(i + k) != first {
                    return Err(err!(
                        InvalidUbatch,
                        "sequence set {s}: token {} has other sequence ids than its first token",
                        i + k
                    ));
                }
            }
            for &q in first {
                if seen[q as usize] {
                    return Err(err!(
                        InvalidUbatch,
                        "sequence {q} appears in two sequence sets (or twice in one)"
                    ));
                }
                seen.set(q as usize, true);
            }
        }
        Ok(())
    }

    /// Places a ubatch (`find_slot`, mutating, as `apply` does), after
    /// [`RsCache::check_ubatch`]. On failure nothing changed.
    pub fn find_slot(&mut self, ub: &Ubatch<'_>) -> Result<()> {
        self.check_ubatch(ub)?;
        self.find_slot_checked_ubatch(ub)
    }

    /// [`RsCache::find_slot`] of a ubatch that already passed [`RsCache::check_ubatch`] (the
    /// check depends only on the ubatch and `n_seq_max`: a planned ubatch stays valid).
    pub(crate) fn find_slot_checked_ubatch(&mut self, ub: &Ubatch<'_>) -> Result<()> {
        let n_st = ub.n_seq_tokens;
        let set = move |s: u32| {
            let i = s * n_st;
            (ub.seqs(i), ub.pos[(i + n_st - 1) as usize])
        };
        self.find_slot_checked(ub.n_seqs, n_st, &set)
    }

    /// The slot search with its undo: the cells are saved first (a copy of at most 256 cells
    /// into a reused buffer) and put back if a step llama.cpp would abort in is reached.
    fn find_slot_checked(&mut self, n_seqs: u32, n_seq_tokens: u32, set: &SetOf<'_>) -> Result<()> {
        self.saved.clone_from(&self.cells);
        let (head, used, n, rs_z) = (self.head, self.used, self.n, self.rs_z);
        let r = self.find_slot_sets(n_seqs, n_seq_tokens, set);
        if r.is_err() {
            std::mem::swap(&mut self.cells, &mut self.saved);
            (self.head, self.used, self.n, self.rs_z) = (head, used, n, rs_z);
        }
        r
    }

    fn find_slot_sets(&mut self, n_seqs: u32, n_seq_tokens: u32, set: &SetOf<'_>) -> Result<()> {
        let size = self.p.size;
        // 32-bit arithmetic, as upstream's unsigned expression
        if self.head > self.used.wrapping_add(n_seqs.wrapping_mul(2)) {
            self.head = 0;
        }
        let mut min = size as i32 - 1;
        let mut max = 0i32;
        for s in 0..n_seqs {
            for (j, &q) in set(s).0.iter().enumerate() {
                if q < 0 || q as u32 >= size {
                    return Err(err!(
                        InvalidSeqId,
                        "seq_id {q} >= {size} cells of the recurrent memory"
                    ));
                }
                if j > 0 {
                    // an extra id of a set becomes shared: it leaves its own state
                    self.detach(q);
                }
            }
        }
        let mut next_empty = self.head;
        for _ in 0..size {
            if next_empty >= size {
                next_empty -= size;
            }
            if self.cells[next_empty as usize].is_empty() {
                break;
            }
            next_empty += 1;
        }
        for s in 0..n_seqs {
            let q = set(s).0[0];
            let qs = q as usize;
            let tail = self.cells[qs].tail;
            let mut has_cell = false;
            if tail >= 0 {
                let c = &self.cells[tail as usize];
                if !c.seq[qs] {
                    return Err(err!(
                        InvalidState,
                        "sequence {q}'s tail cell {tail} does not hold it"
                    ));
                }
                has_cell = c.has_one();
            }
            if !has_cell {
                if next_empty >= size || !self.cells[next_empty as usize].is_empty() {
                    return Err(err!(
                        NoSlot,
                        "no free cell for sequence {q} (llama.cpp aborts here)"
                    ));
                }
                let e = next_empty as usize;
                if tail >= 0 {
                    let orig = self.cells[tail as usize];
                    self.cells[e].pos = orig.pos;
                    self.cells[e].src = orig.src;
                    self.cells[tail as usize].seq.set(qs, false);
                    self.cells[e].seq.set(qs, true);
                }
                self.cells[qs].tail = next_empty as i32;
                if s + 1 < n_seqs {
                    for _ in 0..size {
                        next_empty += 1;
                        if next_empty >= size {
                            next_empty -= size;
                        }
                        if self.cells[next_empty as usize].is_empty() {
                            break;
                        }
                    }
                }
            }
            let t = self.cells[qs].tail;
            min = min.min(t);
            max = max.max(t);
        }
        // gather: the ubatch's states go to [min, min + n_seqs) in ubatch order
        for s in 0..n_seqs {
            let dst = min + s as i32;
            let src = self.cells[set(s).0[0] as usize].tail;
            if dst != src {
                let (d, r) = (dst as usize, src as usize);
                let (a, b) = (self.cells[d], self.cells[r]);
                self.cells[d].pos = b.pos;
                self.cells[d].src = b.src;
                self.cells[d].seq = b.seq;
                self.cells[r].pos = a.pos;
                self.cells[r].src = a.src;
                self.cells[r].seq = a.seq;
                for c in &mut self.cells {
                    if c.tail == src {
                        c.tail = dst;
                    } else if c.tail == dst {
                        c.tail = src;
                    }
                }
            }
        }
        for s in 0..n_seqs {
            let (seqs, last_pos) = set(s);
            let id = (min + s as i32) as usize;
            let c = &mut self.cells[id];
            if c.pos >= 0 && last_pos != c.pos.wrapping_add(n_seq_tokens as i32) {
                let (was, seq) = (c.pos, seqs[0]);
                self.log.emit(LogLevel::Warn, || {
                    format!(
                        "find_slot: non-consecutive token position {last_pos} after {was} for \
                         sequence {seq} with {n_seq_tokens} new tokens\n"
                    )
                });
            }
            let c = &mut self.cells[id];
            c.pos = last_pos;
            c.clear_seq();
            for &q in seqs {
                c.seq.set(q as usize, true);
            }
            for &q in seqs {
                self.cells[q as usize].tail = id as i32;
            }
        }
        // the zero state: the first row of the slot no cell reads from
        self.refcounts.fill(0);
        for c in &self.cells {
            if c.src >= 0 {
                self.refcounts[c.src as usize] += 1;
            }
        }
        let rs_z = (min..=max).find(|&i| self.refcounts[i as usize] == 0);
        self.rs_z = rs_z.unwrap_or(-1);
        for i in min..=max {
            let c = &mut self.cells[i as usize];
            if c.src < 0 {
                let Some(z) = rs_z else {
                    return Err(err!(
                        NoSlot,
                        "no zero-state row in cells {min}..={max} (llama.cpp aborts here)"
                    ));
                };
                c.src0 = z;
            } else {
                c.src0 = c.src;
            }
            c.src = i;
        }
        self.head = min as u32;
        self.n = (max - min + 1) as u32;
        self.used = self.cells.iter().filter(|c| !c.is_empty()).count() as u32;
        Ok(())
    }

    /// Simulates the placement of every ubatch in turn and puts the cells, `used` and `head`
    /// back (`prepare`; like upstream, `n` and `rs_z` keep what the last search computed).
    /// The ubatches must have passed [`RsCache::check_ubatch`].
    pub fn prepare(&mut self, ubatches: &[Ubatch<'_>]) -> bool {
        let mut org = std::mem::take(&mut self.prepared);
        org.clone_from(&self.cells);
        let (used, head) = (self.used, self.head);
        let mut ok = true;
        for ub in ubatches {
            if self.find_slot_checked_ubatch(ub).is_err() {
                ok = false;
                break;
            }
        }
        std::mem::swap(&mut self.cells, &mut org);
        self.prepared = org;
        self.used = used;
        self.head = head;
        ok
    }

    /// Plans ubatches (`init_batch` after the split): their checks, then `prepare`. Ubatches
    /// that cannot be placed give the status `FailedPrepare`.
    pub fn plan(&mut self, ubatches: &[Ubatch<'_>]) -> Result<Status> {
        if ubatches.is_empty() {
            return Err(err!(InvalidArgument, "no ubatches"));
        }
        for ub in ubatches {
            self.check_ubatch(ub)?;
        }
        Ok(if self.prepare(ubatches) {
            Status::Success
        } else {
            Status::FailedPrepare
        })
    }

    /// Places a restored sequence state: `seq_rm(dest)` and a one-set slot search at `pos`
    /// (`state_read_meta` for one sequence with one cell). Returns the cell; on failure
    /// nothing changed.
    fn place_restored(&mut self, dest: i32, pos: i32) -> Result<u32> {
        let before = self.clone_small();
        self.seq_rm(dest, -1, -1)?;
        let ids = [dest];
        let set: &SetOf<'_> = &|_s| (&ids[..], pos);
        if let Err(e) = self.find_slot_checked(1, 1, set) {
            self.restore_small(before);
            return Err(e);
        }
        let h = self.head;
        self.cells[h as usize].src = h as i32;
        Ok(h)
    }

    fn clone_small(&self) -> (Vec<RsCell>, u32, u32, u32, i32, Vec<u32>) {
        (
            self.cells.clone(),
            self.head,
            self.used,
            self.n,
            self.rs_z,
            self.rs_idx.clone(),
        )
    }

    fn restore_small(&mut self, s: (Vec<RsCell>, u32, u32, u32, i32, Vec<u32>)) {
        (
            self.cells,
            self.head,
            self.used,
            self.n,
            self.rs_z,
            self.rs_idx,
        ) = s;
    }

    /// Replaces every cell with a restored whole state (`state_read_meta` for all sequences).
    /// `cells[k] = (pos, seqs)`; the caller validated ids and tails.
    fn set_restored(&mut self, restored: &[(i32, SeqSet)]) {
        self.clear();
        for (k, (pos, seq)) in restored.iter().enumerate() {
            let c = &mut self.cells[k];
            c.pos = *pos;
            c.seq = *seq;
            for q in seq.iter_ones() {
                self.cells[q].tail = k as i32;
            }
        }
        self.head = 0;
        self.used = restored.len() as u32;
        for k in 0..restored.len() {
            self.cells[k].src = k as i32;
        }
    }

    /// Drops the pending rollback of `seq` (-1: of every sequence), as a restore does.
    fn reset_rs_idx(&mut self, seq: i32) {
        if seq < 0 {
            self.rs_idx.fill(0);
        } else if let Some(x) = self.rs_idx.get_mut(seq as usize) {
            *x = 0;
        }
    }

    /// `s_copy` of cells `head .. head + out.len()` (`llama_memory_recurrent_context::s_copy`):
    /// the row each state is read from, in plane `rs_idx` of the cell's first sequence when
    /// rollback planes exist. Like upstream, reading it consumes those pending rollbacks.
    pub fn s_copy_into(&mut self, out: &mut [i32]) -> Result<()> {
        let end = self.head as usize + out.len();
        if end > self.cells.len() {
            return Err(err!(
                InvalidArgument,
                "s_copy of {} rows from cell {} runs past the {} cells",
                out.len(),
                self.head,
                self.cells.len()
            ));
        }
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.s_copy_at(self.head as usize + k);
        }
        Ok(())
    }

    /// `s_copy(i)` alone: the row of cell `head + i`, consuming its pending rollback.
    pub fn s_copy_one(&mut self, i: u32) -> Result<i32> {
        let k = self.head as usize + i as usize;
        if k >= self.cells.len() {
            return Err(err!(
                InvalidArgument,
                "s_copy({i}) from cell {} runs past the {} cells",
                self.head,
                self.cells.len()
            ));
        }
        Ok(self.s_copy_at(k))
    }

    fn s_copy_at(&mut self, k: usize) -> i32 {
        let c = &self.cells[k];
        if self.p.n_rs_seq == 0 {
            return c.src0;
        }
        let mut idx = 0;
        if let Some(q) = c.seq.first_one() {
            if q < self.rs_idx.len() {
                idx = self.rs_idx[q];
                self.rs_idx[q] = 0;
            }
        }
        (idx as i64 * self.p.size as i64 + c.src0 as i64) as i32
    }

    /// Checks the invariants that hold between operations: each sequence is in at most one
    /// cell, that cell is its tail, `used` counts the non-empty cells unless a whole restore
    /// or a free of a cell at a negative position left llama.cpp's counter elsewhere.
    pub fn check_invariants(&self) -> Result<()> {
        for s in 0..self.p.size as usize {
            let holders: Vec<usize> = (0..self.cells.len())
                .filter(|&i| self.cells[i].seq[s])
                .collect();
            let t = self.cells[s].tail;
            match holders.as_slice() {
                [] if t == -1 => {}
                [one] if t == *one as i32 => {}
                _ => {
                    return Err(err!(
                        InvalidState,
                        "sequence {s}: tail {t}, held by cells {holders:?}"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
