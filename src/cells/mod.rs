//! Cell bookkeeping of one KV stream: llama.cpp's `llama_kv_cells`, with the same operations and
//! invariants, plus the indexes that let the cache avoid full scans: a used-cell bitmap and,
//! per sequence, its `(pos, cell)` pairs in position order (`index.rs`: B+ trees over one pooled
//! node arena per stream, reserved for the whole table, so a steady decode step does not
//! allocate).
//!
//! Invariant (as upstream): for every non-empty cell `i` and every sequence `s` in `seq[i]`,
//! `(pos[i], i)` is in `seq_pos[s]`, and nothing else is. A used cell may carry no sequence at
//! all (a whole-cache restore with `n_seq_id = 0` produces one); such a cell is never reused by
//! the slot search and survives `seq_keep`.

#![forbid(unsafe_code)]

mod index;

use bitvec::prelude::*;

pub use index::Iter as SeqPosIter;
use index::PosIndex;

/// Largest number of sequences a memory can hold (`LLAMA_MAX_SEQ`).
///
/// cbindgen:ignore
pub const MAX_SEQ: usize = 256;

/// `LLAMA_TOKEN_NULL`.
///
/// cbindgen:ignore
pub const TOKEN_NULL: i32 = -1;

/// Set of sequence ids of one cell (`std::bitset<LLAMA_MAX_SEQ>` upstream).
pub type SeqSet = BitArr!(for MAX_SEQ, in u64, Lsb0);

/// Extra per-cell data kept for M-RoPE (2-D position) and per-layer-embedding models
/// (`llama_kv_cell_ext`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellExt {
    /// x of the 2-D position.
    pub x: i32,
    /// y of the 2-D position.
    pub y: i32,
    /// Token id stored in the cell, [`TOKEN_NULL`] if none.
    pub tok: i32,
}

impl Default for CellExt {
    fn default() -> Self {
        CellExt {
            x: 0,
            y: 0,
            tok: TOKEN_NULL,
        }
    }
}

impl CellExt {
    /// True when this cell's 2-D position comes after `(ox, oy)` in raster order (y first).
    pub fn is_2d_gt(&self, ox: i32, oy: i32) -> bool {
        self.y > oy || (self.y == oy && self.x > ox)
    }
}

/// Snapshot of some cells (`llama_kv_cells::cp`), written back by [`Cells::set`].
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pos: Vec<i32>,
    ext: Vec<CellExt>,
    seq: Vec<SeqSet>,
}

/// The cells of one stream.
#[derive(Clone, Debug)]
pub struct Cells {
    pos: Vec<i32>,
    ext: Vec<CellExt>,
    shift: Vec<i32>,
    seq: Vec<SeqSet>,
    /// Cells with `pos != -1`, as a bitmap so the slot search can skip whole words of used cells.
    used: BitVec<u64, Lsb0>,
    n_used: u32,
    /// Per sequence, the `(pos, cell)` pairs of its cells: min/max positions without a scan,
    /// and range operations that visit only the sequence's own cells. B+ trees over one pooled
    /// node arena, reserved for the whole table, so steady use does not allocate.
    seq_pos: PosIndex,
    has_shift: bool,
}

impl Cells {
    /// A table of `n` empty cells.
    ///
    /// # Panics
    /// If the allocation fails; [`Cells::try_new`] returns an error instead.
    pub fn new(n: u32) -> Self {
        Self::try_new(n).expect("allocating the cell table")
    }

    /// A table of `n` empty cells, or an error when its memory cannot be allocated.
    pub fn try_new(n: u32) -> Result<Self, std::collections::TryReserveError> {
        fn reserved<T>(n: usize) -> Result<Vec<T>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)?;
            Ok(v)
        }
        let n = n as usize;
        // Reserve every table before filling any, largest first: a request that cannot be met
        // fails before it touches (and so commits) any memory, usually at the first call.
        let mut seq = reserved(n)?;
        let seq_pos = PosIndex::try_new(MAX_SEQ, n)?;
        let mut ext = reserved(n)?;
        let (mut pos, mut shift, mut words) =
            (reserved(n)?, reserved(n)?, reserved(n.div_ceil(64))?);
        pos.resize(n, -1);
        ext.resize(n, CellExt::default());
        shift.resize(n, 0);
        seq.resize(n, SeqSet::ZERO);
        words.resize(n.div_ceil(64), 0u64);
        let mut used = BitVec::from_vec(words);
        used.truncate(n);
        Ok(Cells {
            pos,
            ext,
            shift,
            seq,
            used,
            n_used: 0,
            seq_pos,
            has_shift: false,
        })
    }

    /// Empties every cell and forgets pending shifts.
    pub fn reset(&mut self) {
        self.pos.fill(-1);
        self.ext.fill(CellExt::default());
        self.shift.fill(0);
        self.seq.fill(SeqSet::ZERO);
        self.used.fill(false);
        self.n_used = 0;
        self.seq_pos.clear();
        self.has_shift = false;
    }

    /// Forgets pending shifts (after the K-shift was applied).
    pub fn reset_shift(&mut self) {
        self.has_shift = false;
        self.shift.fill(0);
    }

    /// Number of cells.
    pub fn size(&self) -> u32 {
        self.pos.len() as u32
    }

    /// True when cell `i` holds nothing.
    #[inline]
    pub fn is_empty(&self, i: u32) -> bool {
        self.pos[i as usize] == -1
    }

    /// Number of used cells.
    pub fn get_used(&self) -> u32 {
        self.n_used
    }

    /// Smallest used index, 0 if none.
    pub fn used_min(&self) -> u32 {
        self.used.first_one().map_or(0, |i| i as u32)
    }

    /// Largest used index + 1, 0 if none.
    pub fn used_max_p1(&self) -> u32 {
        self.used.last_one().map_or(0, |i| i as u32 + 1)
    }

    /// First used cell at index `>= from`.
    #[inline]
    pub fn next_used(&self, from: u32) -> Option<u32> {
        let from = from as usize;
        if from >= self.used.len() {
            return None;
        }
        self.used[from..].first_one().map(|i| (from + i) as u32)
    }

    /// The used-cell bitmap.
    pub fn used_bits(&self) -> &BitSlice<u64, Lsb0> {
        &self.used
    }

    /// True when a position changed since the last [`Cells::reset_shift`].
    pub fn get_has_shift(&self) -> bool {
        self.has_shift
    }

    /// Snapshot of the cells `idxs` (their pos, ext and sequences; shifts are not part of it).
    pub fn cp(&self, idxs: &[u32]) -> Snapshot {
        let mut s = Snapshot::default();
        self.cp_into(idxs, &mut s);
        s
    }

    /// [`Cells::cp`] into a reused snapshot, so repeated rollbacks do not allocate.
    pub fn cp_into(&self, idxs: &[u32], out: &mut Snapshot) {
        out.pos.clear();
        out.ext.clear();
        out.seq.clear();
        for &i in idxs {
            let i = i as usize;
            out.pos.push(self.pos[i]);
            out.ext.push(self.ext[i]);
            out.seq.push(self.seq[i]);
        }
    }

    /// Writes a snapshot back into the cells `idxs`, keeping the indexes consistent.
    pub fn set(&mut self, idxs: &[u32], other: &Snapshot) {
        debug_assert_eq!(idxs.len(), other.pos.len());
        for (j, &idx) in idxs.iter().enumerate() {
            if self.pos[idx as usize] != -1 {
                self.seq_pos_rm(idx);
                self.mark_unused(idx);
            }
            let i = idx as usize;
            self.pos[i] = other.pos[j];
            self.ext[i] = other.ext[j];
            self.seq[i] = other.seq[j];
            if self.pos[i] != -1 {
                self.mark_used(idx);
                self.seq_pos_add(idx);
            }
        }
    }

    /// Moves used cell `src` into empty cell `dst` (`llama_kv_cells::mv` of the defragmenting
    /// llama.cpp): position, M-RoPE extension, pending shift and sequences go along, `src`
    /// becomes empty.
    pub fn mv(&mut self, src: u32, dst: u32) {
        debug_assert!(!self.is_empty(src) && self.is_empty(dst));
        let (s, d) = (src as usize, dst as usize);
        self.pos[d] = self.pos[s];
        self.ext[d] = self.ext[s];
        self.shift[d] = self.shift[s];
        self.seq[d] = self.seq[s];
        self.mark_used(dst);
        self.seq_pos_add(dst);
        self.seq_pos_rm(src);
        self.clear_cell(src);
    }

    /// Empties a used cell.
    pub fn rm(&mut self, i: u32) {
        self.seq_pos_rm(i);
        self.clear_cell(i);
    }

    /// Resets cell `i` to empty; its entries in `seq_pos` must already be gone.
    fn clear_cell(&mut self, i: u32) {
        let iu = i as usize;
        self.seq[iu] = SeqSet::ZERO;
        self.pos[iu] = -1;
        self.ext[iu] = CellExt::default();
        self.shift[iu] = 0;
        self.mark_unused(i);
    }

    /// Removes `seq_id` from cell `i` (which must carry it); true if the cell became empty.
    pub fn seq_rm(&mut self, i: u32, seq_id: i32) -> bool {
        let iu = i as usize;
        self.seq[iu].set(seq_id as usize, false);
        self.seq_pos.remove(seq_id as usize, self.pos[iu], i);
        if self.seq[iu].not_any() {
            self.clear_cell(i);
            return true;
        }
        false
    }

    /// Keeps only `seq_id` in cell `i`; true if the cell became empty (it had other sequences only).
    pub fn seq_keep(&mut self, i: u32, seq_id: i32) -> bool {
        let iu = i as usize;
        if self.seq[iu][seq_id as usize] {
            if self.seq[iu].count_ones() > 1 {
                self.seq_pos_rm(i);
                self.seq[iu] = SeqSet::ZERO;
                self.seq[iu].set(seq_id as usize, true);
                self.seq_pos.insert(seq_id as usize, self.pos[iu], i);
            }
            return false;
        }
        if self.seq[iu].any() {
            self.rm(i);
            return true;
        }
        false
    }

    /// Number of sequences in cell `i`.
    #[inline]
    pub fn seq_count(&self, i: u32) -> u32 {
        self.seq[i as usize].count_ones() as u32
    }

    /// The sequences of cell `i`.
    pub fn seq_get_all(&self, i: u32) -> &SeqSet {
        &self.seq[i as usize]
    }

    /// True when cell `i` carries `seq_id`.
    #[inline]
    pub fn seq_has(&self, i: u32, seq_id: i32) -> bool {
        self.seq[i as usize][seq_id as usize]
    }

    /// The raw sequence-set words of every cell: bit `s % 64` of word `s / 64` is sequence `s`.
    /// Hot loops test membership on these directly.
    pub fn seq_words(&self) -> &[SeqSet] {
        &self.seq
    }

    /// The lowest sequence of cell `i`, -1 if it has none.
    #[inline]
    pub fn seq_get(&self, i: u32) -> i32 {
        self.seq[i as usize].first_one().map_or(-1, |s| s as i32)
    }

    /// Adds `seq_id` to the used cell `i`.
    pub fn seq_add(&mut self, i: u32, seq_id: i32) {
        let iu = i as usize;
        self.seq[iu].set(seq_id as usize, true);
        self.seq_pos.insert(seq_id as usize, self.pos[iu], i);
    }

    /// Smallest position of `seq_id`, -1 if absent.
    pub fn seq_pos_min(&self, seq_id: i32) -> i32 {
        self.seq_pos.first(seq_id as usize).map_or(-1, |p| p.0)
    }

    /// Largest position of `seq_id`, -1 if absent.
    pub fn seq_pos_max(&self, seq_id: i32) -> i32 {
        self.seq_pos.last(seq_id as usize).map_or(-1, |p| p.0)
    }

    /// Token of the cell of `seq_id` at the largest position `<= p` (highest cell index among
    /// equal positions), [`TOKEN_NULL`] if none.
    pub fn seq_pos_tok_le(&self, seq_id: i32, p: i32) -> i32 {
        self.seq_pos
            .pred_le(seq_id as usize, p, u32::MAX)
            .map_or(TOKEN_NULL, |(_, i)| self.ext[i as usize].tok)
    }

    /// Number of cells of `seq_id`.
    pub fn seq_len(&self, seq_id: i32) -> usize {
        self.seq_pos.len(seq_id as usize)
    }

    /// Cells of `seq_id` with position in `[p0, p1)`, in position order, collected into `out`
    /// (a reused buffer: the caller mutates cells while walking the list).
    pub fn seq_cells_in(&self, seq_id: i32, p0: i32, p1: i32, out: &mut Vec<u32>) {
        out.clear();
        if p0 >= p1 {
            return;
        }
        out.extend(self.seq_pos.range(seq_id as usize, p0, p1).map(|(_, i)| i));
    }

    /// The `(pos, cell)` pairs of `seq_id`, ordered by position.
    pub fn seq_pos_iter(&self, seq_id: i32) -> SeqPosIter<'_> {
        self.seq_pos.iter(seq_id as usize)
    }

    /// Position of cell `i` (-1 when empty).
    #[inline]
    pub fn pos_get(&self, i: u32) -> i32 {
        self.pos[i as usize]
    }

    /// All positions, -1 for empty cells.
    pub fn pos_all(&self) -> &[i32] {
        &self.pos
    }

    /// Extra data of cell `i`.
    #[inline]
    pub fn ext_get(&self, i: u32) -> CellExt {
        self.ext[i as usize]
    }

    /// Pending shift of cell `i`.
    #[inline]
    pub fn get_shift(&self, i: u32) -> i32 {
        self.shift[i as usize]
    }

    /// True when `p0 <= pos[i] < p1`.
    #[inline]
    pub fn pos_in(&self, i: u32, p0: i32, p1: i32) -> bool {
        let p = self.pos[i as usize];
        p >= p0 && p < p1
    }

    /// Gives the empty cell `i` the position `p` (no sequence yet; ext untouched, as upstream).
    pub fn pos_set(&mut self, i: u32, p: i32) {
        self.pos[i as usize] = p;
        self.mark_used(i);
    }

    /// Sets the extra data of cell `i`.
    pub fn ext_set(&mut self, i: u32, e: CellExt) {
        self.ext[i as usize] = e;
    }

    /// `pos[i] += d`, recorded as a pending shift; true if the cell dropped below 0 and was freed
    /// (its ext is left as it was, like upstream).
    pub fn pos_add(&mut self, i: u32, d: i32) -> bool {
        self.seq_pos_rm(i);
        let iu = i as usize;
        self.pos[iu] = self.pos[iu].wrapping_add(d);
        self.shift[iu] = self.shift[iu].wrapping_add(d);
        self.has_shift = true;
        if self.pos[iu] < 0 {
            self.seq[iu] = SeqSet::ZERO;
            self.pos[iu] = -1;
            self.shift[iu] = 0;
            self.mark_unused(i);
            return true;
        }
        self.seq_pos_add(i);
        false
    }

    /// `pos[i] /= d` (truncating); the pending shift grows by `old - new`, the opposite sign of
    /// [`Cells::pos_add`]'s convention, exactly as upstream, so a later K-shift matches bit for bit.
    pub fn pos_div(&mut self, i: u32, d: i32) {
        self.seq_pos_rm(i);
        let iu = i as usize;
        let p_old = self.pos[iu];
        self.pos[iu] = p_old.wrapping_div(d);
        self.shift[iu] = self.shift[iu].wrapping_add(p_old.wrapping_sub(self.pos[iu]));
        self.seq_pos_add(i);
        self.has_shift = true;
    }

    /// Copies a cell of another stream into the empty cell `i` of this one with the single
    /// sequence `seq_id`, position `pos` and pending shift `shift` (cross-stream `seq_cp`).
    pub fn copy_from_stream(&mut self, i: u32, pos: i32, shift: i32, ext: CellExt, seq_id: i32) {
        let iu = i as usize;
        self.pos[iu] = pos;
        self.shift[iu] = shift;
        self.ext[iu] = ext;
        self.seq[iu] = SeqSet::ZERO;
        self.seq[iu].set(seq_id as usize, true);
        self.mark_used(i);
        self.seq_pos.insert(seq_id as usize, pos, i);
        if shift != 0 {
            self.has_shift = true;
        }
    }

    fn mark_used(&mut self, i: u32) {
        if !self.used.replace(i as usize, true) {
            self.n_used += 1;
        }
    }

    fn mark_unused(&mut self, i: u32) {
        if self.used.replace(i as usize, false) {
            self.n_used -= 1;
        }
    }

    fn seq_pos_rm(&mut self, i: u32) {
        let iu = i as usize;
        let p = self.pos[iu];
        for s in self.seq[iu].iter_ones() {
            self.seq_pos.remove(s, p, i);
        }
    }

    fn seq_pos_add(&mut self, i: u32) {
        let iu = i as usize;
        let p = self.pos[iu];
        for s in self.seq[iu].iter_ones() {
            self.seq_pos.insert(s, p, i);
        }
    }

    /// Checks the indexes against the cell arrays (tests and debugging).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut n = 0;
        for i in 0..self.size() {
            let p = self.pos[i as usize];
            if (p != -1) != self.used[i as usize] {
                return Err(format!("cell {i}: used bit disagrees with pos {p}"));
            }
            if p != -1 {
                n += 1;
                for s in self.seq[i as usize].iter_ones() {
                    if !self.seq_pos.contains(s, p, i) {
                        return Err(format!("cell {i}: ({p}, {i}) missing from seq {s}"));
                    }
                }
            } else if self.seq[i as usize].any() {
                return Err(format!("empty cell {i} has sequences"));
            }
        }
        if n != self.n_used {
            return Err(format!("used count {} != {n}", self.n_used));
        }
        self.seq_pos.check()?;
        for s in 0..MAX_SEQ {
            for (p, i) in self.seq_pos.iter(s) {
                if self.pos[i as usize] != p || !self.seq[i as usize][s] {
                    return Err(format!("seq {s}: stale entry ({p}, {i})"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u32, seqs: &[(u32, i32, i32)]) -> Cells {
        let mut c = Cells::new(n);
        for &(i, p, s) in seqs {
            if c.is_empty(i) {
                c.pos_set(i, p);
            }
            c.seq_add(i, s);
        }
        c
    }

    #[test]
    fn seq_rm_frees_only_when_last_sequence_leaves() {
        let mut c = filled(4, &[(0, 0, 0), (0, 0, 1), (1, 1, 0)]);
        assert!(!c.seq_rm(0, 0));
        assert_eq!(c.seq_get(0), 1);
        assert!(c.seq_rm(0, 1));
        assert!(c.is_empty(0));
        assert_eq!(c.get_used(), 1);
        assert_eq!(c.seq_pos_min(0), 1);
        c.check_invariants().unwrap();
    }

    #[test]
    fn seq_keep_leaves_cells_without_sequences_alone() {
        let mut c = filled(3, &[(0, 5, 0), (1, 6, 1)]);
        c.pos_set(2, 7); // used, no sequence (as after a restore with n_seq_id = 0)
        assert!(!c.seq_keep(0, 0));
        assert!(c.seq_keep(1, 0));
        assert!(!c.seq_keep(2, 0));
        assert!(!c.is_empty(2));
        assert_eq!(c.get_used(), 2);
        c.check_invariants().unwrap();
    }

    #[test]
    fn pos_div_shift_has_the_opposite_sign_of_pos_add() {
        let mut c = filled(2, &[(0, 10, 0), (1, 3, 0)]);
        c.pos_add(0, 4);
        assert_eq!((c.pos_get(0), c.get_shift(0)), (14, 4));
        c.pos_div(0, 3);
        assert_eq!((c.pos_get(0), c.get_shift(0)), (4, 14));
        assert!(c.pos_add(1, -4));
        assert!(c.is_empty(1));
        assert!(c.get_has_shift());
        c.check_invariants().unwrap();
    }

    #[test]
    fn snapshot_round_trip_restores_indexes() {
        let mut c = filled(4, &[(0, 0, 0), (1, 1, 0), (2, 2, 1)]);
        let idxs = [1, 3];
        let snap = c.cp(&idxs);
        c.rm(1);
        c.pos_set(3, 9);
        c.seq_add(3, 2);
        c.set(&idxs, &snap);
        assert_eq!(c.pos_get(1), 1);
        assert!(c.is_empty(3));
        assert_eq!(c.seq_pos_max(2), -1);
        c.check_invariants().unwrap();
    }

    #[test]
    fn tok_le_prefers_highest_cell_among_equal_positions() {
        let mut c = filled(3, &[(0, 4, 0), (2, 4, 0), (1, 2, 0)]);
        c.ext_set(
            0,
            CellExt {
                x: 0,
                y: 0,
                tok: 10,
            },
        );
        c.ext_set(
            2,
            CellExt {
                x: 0,
                y: 0,
                tok: 12,
            },
        );
        c.ext_set(
            1,
            CellExt {
                x: 0,
                y: 0,
                tok: 11,
            },
        );
        assert_eq!(c.seq_pos_tok_le(0, 5), 12);
        assert_eq!(c.seq_pos_tok_le(0, 3), 11);
        assert_eq!(c.seq_pos_tok_le(0, 1), TOKEN_NULL);
    }
}
