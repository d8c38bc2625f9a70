//! Graph inputs of the KV cache, written into caller buffers: the KQ mask, K/V row indices,
//! the K-shift vector and T5 relative position buckets.

use super::{is_masked_swa, KvCache, NonCausalType, SlotInfo, SwaType};
use crate::cells::{Cells, MAX_SEQ};
use crate::error::{err, Result};
use crate::ubatch::Ubatch;

/// Destination of a KQ mask: `n_kv * n_tokens` elements, row `i` for ubatch token `i`.
#[derive(Debug)]
pub enum MaskOut<'a> {
    /// F32 mask.
    F32(&'a mut [f32]),
    /// F16 mask, as IEEE half bit patterns.
    F16(&'a mut [u16]),
}

trait MaskElem: Copy + 'static {
    const KEEP: Self;
    const DROP: Self;
    fn from_f32(v: f32) -> Self;
    /// `DROP_TMPL` copies of `DROP`, for [`fill_drop`].
    fn drop_template() -> &'static [Self];
}

static DROP_F32: [f32; DROP_TMPL] = [f32::NEG_INFINITY; DROP_TMPL];
static DROP_F16: [u16; DROP_TMPL] = [0xFC00; DROP_TMPL];

/// Buffers the mask builder needs for one call, kept per thread so that a decode loop
/// building a mask for every token does not allocate: the segment lists and the near-cell
/// lists of the sequences, each an allocation that would otherwise be made anew per call.
#[derive(Default)]
struct MaskScratch {
    seg_lists: Vec<Vec<Seg>>,
    near: Vec<Vec<u32>>,
    /// Emptied lists of earlier calls, handed out again.
    spare: Vec<Vec<u32>>,
    spare_segs: Vec<Vec<Seg>>,
}

impl MaskScratch {
    /// Takes the pool out of this thread's slot, its lists emptied but keeping capacity.
    fn take() -> MaskScratch {
        let mut s = SCRATCH.with(|c| c.take());
        for mut l in s.near.drain(..) {
            l.clear();
            s.spare.push(l);
        }
        for mut l in s.seg_lists.drain(..) {
            l.clear();
            s.spare_segs.push(l);
        }
        s
    }

    /// Puts the pool back for the next call on this thread.
    fn give_back(self) {
        SCRATCH.with(|c| c.replace(self));
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<MaskScratch> = std::cell::Cell::new(MaskScratch::default());
}

impl MaskElem for f32 {
    const KEEP: f32 = 0.0;
    const DROP: f32 = f32::NEG_INFINITY;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn drop_template() -> &'static [f32] {
        &DROP_F32
    }
}

impl MaskElem for u16 {
    const KEEP: u16 = 0x0000;
    const DROP: u16 = 0xFC00;
    fn from_f32(v: f32) -> u16 {
        half::f16::from_f32(v).to_bits()
    }
    fn drop_template() -> &'static [u16] {
        &DROP_F16
    }
}

/// What decides one mask entry, fixed for a call.
struct MaskRule {
    n_swa: u32,
    swa_type: SwaType,
    swa_full_span: bool,
}

impl MaskRule {
    /// Value of the entry for a key cell of the query's sequence at position `p0`. The flags
    /// are compile-time copies of `causal`, "has a sliding window", `is_2d` and `alibi`, so each
    /// combination gets its own branch-free loop, as upstream's templates do.
    #[inline(always)]
    fn value<
        T: MaskElem,
        const CAUSAL: bool,
        const SWA: bool,
        const D2: bool,
        const ALIBI: bool,
    >(
        &self,
        cells: &Cells,
        j: u32,
        p0: i32,
        q: &Query,
    ) -> T {
        if CAUSAL {
            if p0 > q.p1 {
                return T::DROP;
            }
            if D2 && p0 == q.p1 && cells.ext_get(j).is_2d_gt(q.x, q.y) {
                return T::DROP;
            }
        }
        if SWA {
            let in_span = !CAUSAL && self.swa_full_span && p0 >= q.seq_min;
            if !in_span && is_masked_swa(self.n_swa, self.swa_type, p0, q.p1) {
                return T::DROP;
            }
        }
        if ALIBI {
            // Negate the integer before converting, as upstream: equal positions give +0.0.
            T::from_f32((-(p0 as i64 - q.p1 as i64).abs()) as f32)
        } else {
            T::KEEP
        }
    }
}

struct Query {
    p1: i32,
    x: i32,
    y: i32,
    seq_min: i32,
}

impl MaskRule {
    /// Without 2-D positions and ALiBi an entry is visible exactly when its cell holds the
    /// query's sequence and its position lies in one closed interval; this is that interval
    /// (`None`: nothing is visible), the same predicate as [`MaskRule::value`].
    fn visible_range<const CAUSAL: bool, const SWA: bool>(&self, q: &Query) -> Option<(i32, i32)> {
        let p1 = q.p1 as i64;
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        if SWA {
            // Complement of `is_masked_swa`, bound for bound.
            let (wlo, whi) = match self.swa_type {
                SwaType::None => (i64::MIN, i64::MAX),
                SwaType::Standard => (p1 - self.n_swa as i32 as i64 + 1, i64::MAX),
                SwaType::Chunked => {
                    let start = (q.p1 as u32 / self.n_swa).wrapping_mul(self.n_swa) as i32;
                    (start as i64, i64::MAX)
                }
                SwaType::Symmetric => {
                    let half = (self.n_swa as i32 / 2) as i64;
                    (p1 - half, p1 + half)
                }
            };
            if !CAUSAL && self.swa_full_span {
                // Visible: in the window, or at/after the sequence's first ubatch position.
                // One interval, since a nonempty window reaches p1 >= seq_min.
                let m = q.seq_min as i64;
                debug_assert!(wlo > whi || whi >= m - 1);
                lo = if wlo > whi { m } else { wlo.min(m) };
            } else {
                (lo, hi) = (wlo, whi);
            }
        }
        if CAUSAL {
            hi = hi.min(p1);
        }
        let (lo, hi) = (lo.max(i32::MIN as i64), hi.min(i32::MAX as i64));
        (lo <= hi).then_some((lo as i32, hi as i32))
    }
}

/// Cells `cell..cell + len` of one sequence, holding positions `pos..pos + len` in order.
#[derive(Clone, Copy)]
struct Seg {
    cell: u32,
    pos: i32,
    len: u32,
}

/// The sequence's cells below `n_kv` as [`Seg`]s sorted by cell, or `false` (with `out` in an
/// unspecified state) once more than `max` are needed: a mask row is then a handful of bulk
/// fills whatever the query position, since each segment's visible part is contiguous.
fn build_segs(cells: &Cells, s: i32, n_kv: u32, max: usize, out: &mut Vec<Seg>) -> bool {
    out.clear();
    for (p, j) in cells.seq_pos_iter(s) {
        if j >= n_kv {
            continue;
        }
        if let Some(g) = out.last_mut() {
            if g.cell + g.len == j && g.pos as i64 + g.len as i64 == p as i64 {
                g.len += 1;
                continue;
            }
        }
        if out.len() == max {
            return false;
        }
        out.push(Seg {
            cell: j,
            pos: p,
            len: 1,
        });
    }
    // The index walks positions; cells usually follow them, but need not.
    if out.windows(2).any(|w| w[0].cell > w[1].cell) {
        out.sort_unstable_by_key(|g| g.cell);
    }
    true
}

/// The most segments a sequence's rows are written from over `n_kv` cells: with more,
/// per-segment fills cost more than the per-cell rules.
fn seg_limit(n_kv: usize) -> usize {
    (n_kv / 32).max(16)
}

/// [`build_segs`] for a sequence owning every used cell, from the positions alone (a linear
/// scan is far cheaper than walking the position index): empty cells end segments.
fn segs_from_positions(pos: &[i32], max: usize, out: &mut Vec<Seg>) -> bool {
    const CHUNK: usize = 64;
    out.clear();
    let mut j = 0usize;
    while j < pos.len() {
        // Usual layout: the open segment goes on for a whole chunk, checked branch-free.
        if let Some(g) = out.last_mut() {
            let next = g.pos as i64 + g.len as i64;
            if g.cell as usize + g.len as usize == j
                && j + CHUNK <= pos.len()
                && next + CHUNK as i64 <= i32::MAX as i64
            {
                let first = next as i32;
                let ok = pos[j..j + CHUNK]
                    .iter()
                    .zip(first..)
                    .fold(true, |a, (&p, want)| a & (p == want) & (p != -1));
                if ok {
                    g.len += CHUNK as u32;
                    j += CHUNK;
                    continue;
                }
            }
        }
        let p = pos[j];
        if p != -1 {
            match out.last_mut() {
                Some(g)
                    if g.cell as usize + g.len as usize == j
                        && g.pos as i64 + g.len as i64 == p as i64 =>
                {
                    g.len += 1
                }
                _ => {
                    if out.len() == max {
                        return false;
                    }
                    out.push(Seg {
                        cell: j as u32,
                        pos: p,
                        len: 1,
                    });
                }
            }
        }
        j += 1;
    }
    true
}

/// Elements in a [`fill_drop`] template.
const DROP_TMPL: usize = 4096;

/// Writes `-inf` over `dst`. Long runs copy from `tmpl` (`DROP_TMPL` `-inf`s) instead of a
/// store loop: `0` runs become `memset` and `-inf` runs `memcpy`, whose bulk string
/// instructions write a large output faster than the vector loop a non-byte pattern gets.
#[inline]
fn fill_drop<T: MaskElem>(dst: &mut [T], tmpl: &[T]) {
    if dst.len() < 256 {
        dst.fill(T::DROP);
        return;
    }
    for c in dst.chunks_mut(DROP_TMPL) {
        c.copy_from_slice(&tmpl[..c.len()]);
    }
}

/// One mask row from the segments of the query's sequence: `-inf` runs and visible runs,
/// each written once with a bulk fill.
fn row_from_segs<T: MaskElem>(row: &mut [T], segs: &[Seg], range: Option<(i32, i32)>, tmpl: &[T]) {
    let mut cur = 0usize;
    if let Some((lo, hi)) = range {
        for g in segs {
            let a = (lo as i64 - g.pos as i64).max(0);
            let b = (hi as i64 - g.pos as i64 + 1).min(g.len as i64);
            if a < b {
                let (a, b) = (g.cell as usize + a as usize, g.cell as usize + b as usize);
                fill_drop(&mut row[cur..a], tmpl);
                row[a..b].fill(T::KEEP);
                cur = b;
            }
        }
    }
    fill_drop(&mut row[cur..], tmpl);
}

/// One mask row when the query's sequence holds every used cell: membership is just "not
/// empty", so the row is a branch-free (vectorised) map of the positions.
fn row_from_positions<T: MaskElem>(row: &mut [T], pos: &[i32], range: Option<(i32, i32)>) {
    let Some((lo, hi)) = range else {
        row.fill(T::DROP);
        return;
    };
    for (o, &p) in row.iter_mut().zip(pos) {
        *o = if (p != -1) & (p >= lo) & (p <= hi) {
            T::KEEP
        } else {
            T::DROP
        };
    }
}

/// How the rows of one sequence are written in this call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Not decided yet (the sequence's first row decides).
    Unset,
    /// Per-cell rules with previous-row reuse (2-D positions, ALiBi, scattered cells).
    General,
    /// [`row_from_positions`].
    Positions,
    /// [`row_from_segs`] with the segment list at this index.
    Segs(u32),
}

/// Fails unless a caller buffer of `len` elements holds `need`.
fn check_len(what: &str, len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(err!(
            BufferTooSmall,
            "{what} needs {need} elements, got {len}"
        ));
    }
    Ok(())
}

impl KvCache {
    /// Checks that `slot` describes cells of this cache: 1 to 256 streams of the same
    /// nonzero number of cells, `s0 <= strm[k] <= s1 < n_stream`, every cell below the size.
    /// A slot from [`KvCache::find_slot`] or [`KvCache::prepare`] always passes; this is the
    /// check for slots a caller builds (llama.cpp's composites do).
    pub fn check_slot_info(&self, slot: &SlotInfo) -> Result<()> {
        let ns = slot.n_stream();
        if ns == 0 || ns > MAX_SEQ || slot.idxs.len() != ns {
            return Err(err!(
                InvalidArgument,
                "slot has {ns} streams and {} index lists (expected 1..={MAX_SEQ} of each)",
                slot.idxs.len()
            ));
        }
        if slot.size() == 0 || slot.idxs.iter().any(|v| v.len() != slot.size()) {
            return Err(err!(
                InvalidArgument,
                "slot streams must hold the same nonzero number of cells"
            ));
        }
        if slot.s0 > slot.s1 || slot.s1 >= self.n_stream {
            return Err(err!(
                InvalidArgument,
                "slot streams [{}, {}] outside the cache's {} streams",
                slot.s0,
                slot.s1,
                self.n_stream
            ));
        }
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let s = slot.strm[k];
            if s < slot.s0 || s > slot.s1 {
                return Err(err!(
                    InvalidArgument,
                    "slot stream {s} outside its range [{}, {}]",
                    slot.s0,
                    slot.s1
                ));
            }
            if let Some(&i) = idxs.iter().find(|&&i| i >= self.size()) {
                return Err(err!(
                    InvalidArgument,
                    "slot cell {i} of stream {s} is outside the cache (size {})",
                    self.size()
                ));
            }
        }
        Ok(())
    }

    /// [`KvCache::check_slot_info`], and the slot places exactly `n_tokens` tokens.
    fn check_slot_layout(&self, slot: &SlotInfo, n_tokens: usize) -> Result<()> {
        self.check_slot_info(slot)?;
        if slot.n_tokens() != n_tokens {
            return Err(err!(
                InvalidArgument,
                "slot holds {} tokens, expected {n_tokens}",
                slot.n_tokens()
            ));
        }
        Ok(())
    }

    /// Checks that `slot` fits this cache and that its cells can take `ub`'s tokens now.
    pub fn check_slot(&self, slot: &SlotInfo, ub: &Ubatch<'_>) -> Result<()> {
        self.check_slot_layout(slot, ub.n_tokens as usize)?;
        if self.n_stream > 1 {
            let per = slot.size();
            for (k, &strm) in slot.strm.iter().enumerate() {
                if self.stream_of(ub.seq0((k * per) as u32)) != strm {
                    return Err(err!(
                        InvalidArgument,
                        "slot stream {strm} does not hold token group {k}'s sequence"
                    ));
                }
            }
        }
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let cells = &self.cells[slot.strm[k] as usize];
            for &i in idxs {
                if !self.can_use(cells, i) {
                    return Err(err!(
                        InvalidArgument,
                        "slot cell {i} of stream {} is in use",
                        slot.strm[k]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Row of the K cache for each token of `slot` (`set_input_k_idxs`): `strm * size + cell`.
    pub fn set_input_k_idxs(&self, slot: &SlotInfo, out: &mut [i64]) -> Result<()> {
        self.check_slot_layout(slot, slot.n_tokens())?;
        let n = slot.n_tokens();
        check_len("k_idxs", out.len(), n)?;
        let size = self.size() as i64;
        let per = slot.size();
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let offs = slot.strm[k] as i64 * size;
            for (o, &i) in out[k * per..(k + 1) * per].iter_mut().zip(idxs) {
                *o = offs + i as i64;
            }
        }
        Ok(())
    }

    /// Number of elements [`KvCache::set_input_v_idxs`] writes for `n_tokens` tokens.
    pub fn v_idxs_len(&self, n_tokens: usize) -> usize {
        if self.p.v_trans {
            n_tokens * self.p.n_embd_v_gqa_max as usize
        } else {
            n_tokens
        }
    }

    /// V destinations for each token of `slot` (`set_input_v_idxs`): rows as for K, or with a
    /// transposed V one element index per channel, `strm*size*E + j*size + cell`.
    pub fn set_input_v_idxs(&self, slot: &SlotInfo, out: &mut [i64]) -> Result<()> {
        if !self.p.v_trans {
            return self.set_input_k_idxs(slot, out);
        }
        self.check_slot_layout(slot, slot.n_tokens())?;
        let e = self.p.n_embd_v_gqa_max as usize;
        if e == 0 {
            return Err(err!(
                InvalidArgument,
                "n_embd_v_gqa_max is 0: transposed V indices need the V width"
            ));
        }
        let need = self.v_idxs_len(slot.n_tokens());
        check_len("v_idxs", out.len(), need)?;
        let size = self.size() as i64;
        let per = slot.size();
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let offs = slot.strm[k] as i64 * size * e as i64;
            for (ii, &cell) in idxs.iter().enumerate() {
                let row = &mut out[(k * per + ii) * e..(k * per + ii + 1) * e];
                for (j, o) in row.iter_mut().enumerate() {
                    *o = offs + j as i64 * size + cell as i64;
                }
            }
        }
        Ok(())
    }

    /// Pending shift of every cell of every stream, 0 for empty cells (`set_input_k_shift`).
    pub fn set_input_k_shift(&self, out: &mut [i32]) -> Result<()> {
        let size = self.size() as usize;
        let need = size * self.n_stream as usize;
        check_len("k_shift", out.len(), need)?;
        for (cells, dst) in self.cells.iter().zip(out.chunks_mut(size)) {
            for (i, o) in dst.iter_mut().enumerate() {
                *o = if cells.is_empty(i as u32) {
                    0
                } else {
                    cells.get_shift(i as u32)
                };
            }
        }
        Ok(())
    }

    /// The KQ mask of `ub` over the first `n_kv` cells (`set_input_kq_mask`): `n_stream_m`
    /// groups of `n_tokens / n_stream_m` rows (1 group for unified caches, one per sequence
    /// otherwise). Entry `(i, j)` is `-inf` unless cell `j` holds token `i`'s first sequence
    /// and is visible to it (causality, 2-D causality, sliding window); visible entries are 0,
    /// or `-|p0 - p1|` with ALiBi.
    pub fn set_input_kq_mask(
        &self,
        ub: &Ubatch<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        out: MaskOut<'_>,
    ) -> Result<()> {
        self.validate_ubatch(ub)?;
        if n_kv == 0 || n_kv > self.size() {
            return Err(err!(
                InvalidArgument,
                "n_kv = {n_kv} outside [1, {}]",
                self.size()
            ));
        }
        if n_stream_m == 0 || ub.n_tokens % n_stream_m != 0 {
            return Err(err!(
                InvalidArgument,
                "{} tokens cannot form {n_stream_m} mask streams",
                ub.n_tokens
            ));
        }
        let need = n_kv as usize * ub.n_tokens as usize;
        match out {
            MaskOut::F32(o) => self.kq_mask_dispatch(ub, causal, n_kv, n_stream_m, need, o),
            MaskOut::F16(o) => self.kq_mask_dispatch(ub, causal, n_kv, n_stream_m, need, o),
        }
    }

    /// Picks the specialised builder for this call's (causal, SWA, 2-D, ALiBi) combination.
    fn kq_mask_dispatch<T: MaskElem>(
        &self,
        ub: &Ubatch<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        need: usize,
        out: &mut [T],
    ) -> Result<()> {
        // Same rule as upstream: without causal attention only the SWA cache of a SWA_ONLY
        // model becomes non-causal.
        let causal = if !causal && self.p.non_causal_type == NonCausalType::SwaOnly {
            self.p.swa_type == SwaType::None
        } else {
            causal
        };
        let swa = self.p.swa_type != SwaType::None;
        macro_rules! go {
            ($($c:literal $s:literal $d:literal $a:literal),*) => {
                match (causal, swa, ub.is_pos_2d(), self.p.use_alibi) {
                    $(($c, $s, $d, $a) => {
                        self.kq_mask_impl::<T, $c, $s, $d, $a>(ub, causal, n_kv, n_stream_m, need, out)
                    })*
                }
            };
        }
        go!(
            false false false false, false false false true, false false true false, false false true true,
            false true false false, false true false true, false true true false, false true true true,
            true false false false, true false false true, true false true false, true false true true,
            true true false false, true true false true, true true true false, true true true true
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn kq_mask_impl<
        T: MaskElem,
        const CAUSAL: bool,
        const SWA: bool,
        const D2: bool,
        const ALIBI: bool,
    >(
        &self,
        ub: &Ubatch<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        need: usize,
        out: &mut [T],
    ) -> Result<()> {
        check_len("kq mask", out.len(), need)?;
        let rule = MaskRule {
            n_swa: self.p.n_swa,
            swa_type: self.p.swa_type,
            swa_full_span: !causal && self.p.non_causal_type == NonCausalType::SwaFull,
        };
        let nt = ub.n_tokens as usize;
        let mut seq_min = [i32::MAX; MAX_SEQ];
        for i in 0..ub.n_tokens {
            let s = ub.seq0(i) as usize;
            seq_min[s] = seq_min[s].min(ub.pos[i as usize]);
        }
        let n_kv_u = n_kv as usize;
        let n_tps = ub.n_tokens / n_stream_m;
        let mut n_rows = [0u32; MAX_SEQ];
        for i in 0..ub.n_tokens {
            n_rows[ub.seq0(i) as usize] += 1;
        }
        let mut plan = [Plan::Unset; MAX_SEQ];
        let mut scratch = MaskScratch::take();
        let drop_tmpl = T::drop_template();
        let max_segs = seg_limit(n_kv_u);
        // Rows of one sequence differ only in cells whose position is close to the ubatch's
        // positions: later rows copy an earlier row of the sequence and recompute those cells.
        let mut last_row = [u32::MAX; MAX_SEQ];
        let mut rows_left = [0u32; MAX_SEQ];
        let mut near_of = [u32::MAX; MAX_SEQ];
        for k in 0..n_stream_m {
            for &s in ub.seq_id_unq {
                last_row[s as usize] = u32::MAX;
            }
            for i in k * n_tps..(k + 1) * n_tps {
                rows_left[ub.seq0(i) as usize] += 1;
            }
            for ii in 0..n_tps {
                let i = k * n_tps + ii;
                let s = ub.seq0(i);
                let su = s as usize;
                rows_left[su] -= 1;
                let cells = &self.cells[self.stream_of(s) as usize];
                let q = Query {
                    p1: ub.pos[i as usize],
                    x: if D2 { ub.pos[i as usize + nt * 2] } else { 0 },
                    y: if D2 { ub.pos[i as usize + nt] } else { 0 },
                    seq_min: seq_min[su],
                };
                let row_start = i as usize * n_kv_u;
                if !ALIBI && !D2 {
                    if plan[su] == Plan::Unset {
                        plan[su] =
                            self.plan_rows(cells, s, n_kv, n_rows[su], max_segs, &mut scratch);
                    }
                    let row = &mut out[row_start..row_start + n_kv_u];
                    match plan[su] {
                        Plan::Positions => {
                            let range = rule.visible_range::<CAUSAL, SWA>(&q);
                            row_from_positions(row, &cells.pos_all()[..n_kv_u], range);
                            continue;
                        }
                        Plan::Segs(x) => {
                            let range = rule.visible_range::<CAUSAL, SWA>(&q);
                            row_from_segs(row, &scratch.seg_lists[x as usize], range, drop_tmpl);
                            continue;
                        }
                        Plan::General | Plan::Unset => {}
                    }
                }
                let src = last_row[su];
                if !ALIBI && src != u32::MAX {
                    // Copy the sequence's previous row, not its first (as upstream does): the
                    // entries outside the near cells are the same in every row of the
                    // sequence, and the previous row is still in cache.
                    last_row[su] = i;
                    let from = src as usize * n_kv_u;
                    out.copy_within(from..from + n_kv_u, row_start);
                    let row = &mut out[row_start..row_start + n_kv_u];
                    for &j in &scratch.near[near_of[su] as usize] {
                        row[j as usize] =
                            rule.value::<T, CAUSAL, SWA, D2, ALIBI>(cells, j, cells.pos_get(j), &q);
                    }
                    continue;
                }
                let row = &mut out[row_start..row_start + n_kv_u];
                // Only a sequence with more rows to come needs its near cells remembered.
                let track = !ALIBI && rows_left[su] > 0;
                let mut near_list = if track {
                    if near_of[su] == u32::MAX {
                        near_of[su] = scratch.near.len() as u32;
                        let l = scratch.spare.pop().unwrap_or_default();
                        scratch.near.push(l);
                    }
                    last_row[su] = i;
                    let mut l = std::mem::take(&mut scratch.near[near_of[su] as usize]);
                    l.clear();
                    Some(l)
                } else {
                    None
                };
                // Upstream records `p0 + (int32_t) (n_swa + 32) >= seq_pos_min` in 32 bits: near
                // i32::MAX the sum wraps negative and the cell is not recorded (its entry then
                // keeps the sequence's first row), so the same wrapping test here.
                let near_add = self.p.n_swa.wrapping_add(32) as i32;
                // `& 3`: a sequence set has 4 words; lets the compiler drop the bounds check.
                let (w, bit) = ((su / 64) & 3, su % 64);
                if cells.seq_len(s) * 4 >= n_kv_u {
                    // Dense sequence: one pass writing every entry once, testing the sequence
                    // on the raw set words.
                    let pos = &cells.pos_all()[..n_kv_u];
                    let seqs = &cells.seq_words()[..n_kv_u];
                    for (j, ((o, &p0), set)) in row.iter_mut().zip(pos).zip(seqs).enumerate() {
                        *o = if p0 != -1 && (set.data[w] >> bit) & 1 != 0 {
                            if let Some(l) = near_list.as_mut() {
                                if p0.wrapping_add(near_add) >= q.seq_min {
                                    l.push(j as u32);
                                }
                            }
                            rule.value::<T, CAUSAL, SWA, D2, ALIBI>(cells, j as u32, p0, &q)
                        } else {
                            T::DROP
                        };
                    }
                } else {
                    row.fill(T::DROP);
                    for (p0, j) in cells.seq_pos_iter(s) {
                        if j < n_kv {
                            row[j as usize] =
                                rule.value::<T, CAUSAL, SWA, D2, ALIBI>(cells, j, p0, &q);
                            if let Some(l) = near_list.as_mut() {
                                if p0.wrapping_add(near_add) >= q.seq_min {
                                    l.push(j);
                                }
                            }
                        }
                    }
                }
                if let Some(l) = near_list {
                    scratch.near[near_of[su] as usize] = l;
                }
            }
        }
        scratch.give_back();
        Ok(())
    }

    /// Picks how the rows of sequence `s` (`n_rows` of them in this ubatch) are written.
    fn plan_rows(
        &self,
        cells: &Cells,
        s: i32,
        n_kv: u32,
        n_rows: u32,
        max_segs: usize,
        scratch: &mut MaskScratch,
    ) -> Plan {
        // Stock writes a sequence's later rows as copies of its first, recomputing only the
        // cells it finds near the ubatch with a 32-bit sum that wraps for positions within
        // n_swa + 32 of i32::MAX: such cells keep the first row's value there. Only the
        // per-cell path reproduces that, so it takes sequences reaching that far.
        let wraps = cells.seq_pos_max(s) as i64 + self.p.n_swa.wrapping_add(32) as i32 as i64
            > i32::MAX as i64;
        if n_rows > 1 && wraps {
            return Plan::General;
        }
        let mut segs = scratch.spare_segs.pop().unwrap_or_default();
        // Room for as many segments as any n_kv of this cache allows, reserved once: a list
        // growing with n_kv as the cache fills would allocate now and then on the decode path.
        let cap = seg_limit(cells.size() as usize);
        if segs.capacity() < cap {
            segs.reserve_exact(cap - segs.len());
        }
        let seg_lists = &mut scratch.seg_lists;
        // A sequence owning every used cell (the single-sequence case): membership is "not
        // empty". One row: a vectorised pass over the positions. More rows: segments from
        // the positions (one scan), then each row is a few bulk fills, a little faster than
        // the per-row pass when the output is large.
        if cells.seq_len(s) == cells.get_used() as usize {
            let pos = &cells.pos_all()[..n_kv as usize];
            if n_rows > 1 && segs_from_positions(pos, max_segs, &mut segs) {
                seg_lists.push(segs);
                return Plan::Segs(seg_lists.len() as u32 - 1);
            }
            segs.clear();
            scratch.spare_segs.push(segs);
            return Plan::Positions;
        }
        if build_segs(cells, s, n_kv, max_segs, &mut segs) {
            seg_lists.push(segs);
            return Plan::Segs(seg_lists.len() as u32 - 1);
        }
        segs.clear();
        scratch.spare_segs.push(segs);
        Plan::General
    }

    /// T5 relative position buckets between every token of `ub` and the first `n_kv` cells
    /// (`set_input_pos_bucket`); empty cells count as position -1.
    pub fn set_input_pos_bucket(&self, ub: &Ubatch<'_>, n_kv: u32, out: &mut [i32]) -> Result<()> {
        self.validate_ubatch(ub)?;
        if self.n_stream != 1 {
            return Err(err!(Unsupported, "position buckets need a unified cache"));
        }
        if ub.equal_seqs {
            return Err(err!(
                Unsupported,
                "position buckets need a ubatch from a simple split"
            ));
        }
        if n_kv == 0 || n_kv > self.size() {
            return Err(err!(
                InvalidArgument,
                "n_kv = {n_kv} outside [1, {}]",
                self.size()
            ));
        }
        let nb = self.p.n_rel_attn_bkts;
        if nb < 2 {
            return Err(err!(
                InvalidArgument,
                "n_rel_attn_bkts = {nb}: position buckets need at least 2"
            ));
        }
        let need = n_kv as usize * ub.n_tokens as usize;
        check_len("pos bucket", out.len(), need)?;
        let cells = &self.cells[0];
        let pos = &cells.pos_all()[..n_kv as usize];
        for (row, &p1) in out
            .chunks_mut(n_kv as usize)
            .zip(&ub.pos[..ub.n_tokens as usize])
        {
            for (o, &p0) in row.iter_mut().zip(pos) {
                *o = relative_position_bucket(p0, p1, nb as u64, false);
            }
        }
        Ok(())
    }
}

/// `llama_relative_position_bucket` of the pinned llama.cpp, with its float/double mix kept
/// operation for operation so the buckets agree at their boundaries.
pub fn relative_position_bucket(x: i32, y: i32, n_buckets: u64, bidirectional: bool) -> i32 {
    const MAX_DISTANCE: i64 = 128;
    let mut n_buckets = n_buckets;
    if bidirectional {
        n_buckets >>= 1;
    }
    let max_exact = (n_buckets >> 1) as i64;
    let mut rel = x.wrapping_sub(y);
    let mut bucket: i32 = 0;
    if bidirectional {
        bucket += (rel > 0) as i32 * n_buckets as i32;
        rel = rel.wrapping_abs();
    } else {
        rel = rel.min(0).wrapping_neg();
    }
    // logf takes a float, log a double; the sum is a double that floorf narrows to float.
    let ratio = (rel as f64 / max_exact as f64) as f32;
    let scaled = ratio.ln() * n_buckets.wrapping_sub(max_exact as u64) as f32;
    let large =
        (max_exact as f64 + scaled as f64 / (MAX_DISTANCE as f64 / max_exact as f64).ln()) as f32;
    let large = (large.floor() as i32).min(n_buckets as i32 - 1);
    bucket + if (rel as i64) < max_exact { rel } else { large }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments from positions, written as rows, equal the per-cell predicate: runs longer
    /// than a chunk, holes, a `-1` followed by position 0, and positions wrapping at i32::MAX.
    #[test]
    fn segs_from_positions_rows_match_cells() {
        let mut pos: Vec<i32> = (0..300).collect();
        pos.extend([-1, 0, 1, 2, -1, -1]);
        pos.extend((1000..1200).rev());
        pos.extend(i32::MAX - 70..=i32::MAX);
        pos.extend([i32::MIN, i32::MIN + 1, 5, 5, 6]);
        pos.extend(500..700);
        let mut segs = Vec::new();
        assert!(segs_from_positions(&pos, usize::MAX, &mut segs));
        assert!(!segs_from_positions(&pos, 3, &mut Vec::new()));
        let tmpl = vec![f32::DROP; DROP_TMPL];
        let ranges = [
            None,
            Some((i32::MIN, i32::MAX)),
            Some((0, 150)),
            Some((100, 1100)),
            Some((i32::MAX - 5, i32::MAX)),
            Some((i32::MIN, 5)),
            Some((550, 560)),
        ];
        for range in ranges {
            let mut row = vec![1.0f32; pos.len()];
            row_from_segs(&mut row, &segs, range, &tmpl);
            let mut want = vec![1.0f32; pos.len()];
            row_from_positions(&mut want, &pos, range);
            let bits = |r: &[f32]| r.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&row), bits(&want), "range {range:?}");
        }
    }
}
