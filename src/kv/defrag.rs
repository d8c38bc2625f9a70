//! Defragmentation: which used cells move into which holes, and the move of their cells and
//! K/V rows, so that the used cells of a stream are packed at its start again.
//!
//! llama.cpp had this until PR #15473 (`defrag_prepare`, `update`, `build_graph_defrag`); the
//! pinned tree ignores `optimize` and `defrag_thold`. The plan here is the one of the last
//! release that had it (the tree of `llama-cpp-sys-2` 0.1.121), cell for cell, including its
//! move budget and the way a budget stops it half-way through a hole; `tests/kv_defrag.rs`
//! compares both on random caches. Beyond the seed: every stream of a multi-stream cache is
//! planned on its own (the seed only defragmented single-stream caches), and the move is one
//! operation that changes everything or nothing (a stale or malformed plan is refused before
//! the first cell moves).
//!
//! Why it pays: the attention of every ubatch runs over `n_kv` cells, the extent of the used
//! cells, not their count. Parallel sequences that end at different times leave holes under the
//! high-water mark; packing the cells shrinks `n_kv` back to about the used count, and every
//! sequence's keys, positions and masks stay what they were (in other cells).

#![forbid(unsafe_code)]

use super::state::blocks_of;
use super::KvCache;
use crate::cells::Cells;
use crate::error::{err, Result};
use crate::failpoint;
use crate::storage::KvStorage;

/// Below this extent (`used_max_p1`) a stream is never fragmented enough to plan for: the seed's
/// "do not defrag small contexts".
///
/// cbindgen:ignore
pub const DEFRAG_MIN_N_KV: u32 = 2048;

/// The plan of one stream: cell `i` moves to `ids[i]`; `ids[i] == i` or `ids[i] == ids.len()`
/// means it stays (the seed's `defrag_info::ids`). `ids.len()` is the stream's extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    /// The stream.
    pub stream: u32,
    /// Destination of each cell below the extent.
    pub ids: Vec<u32>,
    /// Runs of consecutive cells that move together (the seed's "moves").
    pub n_moves: u32,
}

impl StreamPlan {
    /// Each run of cells that moves together, in index order: `(src, dst, n)`.
    pub fn runs(&self) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let n = self.ids.len() as u32;
        let mut i = 0u32;
        std::iter::from_fn(move || {
            while i < n {
                let id = self.ids[i as usize];
                if id == i || id == n {
                    i += 1;
                    continue;
                }
                let mut nm = 1;
                while i + nm < n && self.ids[(i + nm) as usize] == id + nm {
                    nm += 1;
                }
                let run = (i, id, nm);
                i += nm;
                return Some(run);
            }
            None
        })
    }
}

/// A defragmentation plan: one [`StreamPlan`] per stream that has something to move.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefragPlan {
    streams: Vec<StreamPlan>,
}

impl DefragPlan {
    /// True when nothing moves.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The streams' plans.
    pub fn streams(&self) -> &[StreamPlan] {
        &self.streams
    }

    /// Runs moved over all streams.
    pub fn n_moves(&self) -> u32 {
        self.streams.iter().map(|p| p.n_moves).sum()
    }
}

/// The seed's move budget for a graph of `n_max_nodes` nodes over `n_layer` layers: each move
/// costs six nodes per layer (two views and a copy, for K and for V), after a reserve of two per
/// layer. Unsigned arithmetic as the seed's (a budget below the reserve wraps to a huge one).
/// A cache without layers has no rows to copy: no bound.
pub fn max_moves_for_nodes(n_max_nodes: i32, n_layer: u32) -> u32 {
    if n_layer == 0 {
        return u32::MAX;
    }
    (n_max_nodes as u32).wrapping_sub(n_layer.wrapping_mul(2)) / n_layer.saturating_mul(6)
}

/// The seed's fragmentation figure of one stream: the share of holes in the used extent,
/// counting `n_pad` padding cells as used, 0 for an extent below [`DEFRAG_MIN_N_KV`].
pub fn fragmentation(cells: &Cells, n_pad: u32) -> f32 {
    let n_kv = cells.used_max_p1();
    if n_kv < DEFRAG_MIN_N_KV {
        return 0.0;
    }
    let used = cells.get_used().wrapping_add(n_pad) as f32;
    (1.0 - used / n_kv as f32).max(0.0)
}

/// The seed's `defrag_prepare` on one stream's cells: walk the holes below the used count from
/// the start, fill each from the last used cells not yet moved, count a move per run of
/// consecutive sources, and stop once `max_moves` runs are planned (possibly inside a hole).
/// `None` when nothing moves.
pub fn plan_stream(cells: &Cells, stream: u32, max_moves: u32) -> Result<Option<StreamPlan>> {
    let n_kv = cells.used_max_p1();
    let n_used = cells.get_used();
    let unmoved = |ids: &[u32], i: u32| !cells.is_empty(i) && ids[i as usize] == n_kv;
    let mut ids = vec![n_kv; n_kv as usize];
    let mut n_moves = 0u32;
    let mut i0 = 0u32;
    // Every used cell at or above `hi` is already planned: the seed scans down from the end
    // for each hole, and starting at `hi` finds the same cells in linear time overall.
    let mut hi = n_kv;
    while i0 < n_used {
        if !cells.is_empty(i0) {
            ids[i0 as usize] = i0;
            i0 += 1;
            continue;
        }
        let mut nh = 1;
        while i0 + nh < n_used && cells.is_empty(i0 + nh) {
            nh += 1;
        }
        // The nh-th unmoved used cell from the end is where the sources start.
        let mut nf = 0;
        let mut is = hi.saturating_sub(1);
        while is > i0 {
            if unmoved(&ids, is) {
                nf += 1;
                if nf == nh {
                    break;
                }
            }
            is -= 1;
        }
        if nf != nh {
            return Err(err!(
                InvalidState,
                "stream {stream}: {n_used} used cells, but a hole at {i0} cannot be filled"
            ));
        }
        nf = 0;
        let mut cont = false;
        let mut stop = false;
        let mut i1 = is;
        while i1 < n_kv {
            if !unmoved(&ids, i1) {
                if n_moves == max_moves {
                    stop = true;
                    break;
                }
                cont = false;
                i1 += 1;
                continue;
            }
            ids[i1 as usize] = i0 + nf;
            if !cont {
                n_moves += 1;
                cont = true;
            }
            nf += 1;
            if nf == nh {
                break;
            }
            i1 += 1;
        }
        if stop || n_moves == max_moves {
            break;
        }
        // (not stopped: the nh cells from `is` up are exactly the unplanned ones below `hi`)
        hi = is;
        i0 += nh;
    }
    Ok((n_moves > 0).then_some(StreamPlan {
        stream,
        ids,
        n_moves,
    }))
}

impl KvCache {
    /// The fragmentation figure of stream `s` (see [`fragmentation`]).
    pub fn fragmentation(&self, s: u32) -> f32 {
        fragmentation(self.cells(s), self.params().n_pad)
    }

    /// Plans a defragmentation. `thold`: plan only the streams whose [`fragmentation`] exceeds
    /// it (the seed's `defrag_thold` rule); `None` plans every stream (the seed's `optimize`).
    /// `max_moves` bounds each stream's runs ([`max_moves_for_nodes`]). Changes nothing.
    pub fn plan_defrag(&self, thold: Option<f32>, max_moves: u32) -> Result<DefragPlan> {
        let mut streams = Vec::new();
        for s in 0..self.n_stream() {
            if thold.is_some_and(|t| self.fragmentation(s) <= t) {
                continue;
            }
            if let Some(p) = plan_stream(self.cells(s), s, max_moves)? {
                streams.push(p);
            }
        }
        Ok(DefragPlan { streams })
    }

    /// Checks that `plan` still applies: each move takes a used cell into an empty one, in the
    /// order it is applied. Any such move keeps every sequence's positions and keys (they
    /// travel together), so a plan made before other changes is still safe if it passes.
    pub fn check_plan(&self, plan: &DefragPlan) -> Result<()> {
        let mut last = None;
        for p in &plan.streams {
            if p.stream >= self.n_stream() || last.is_some_and(|l| p.stream <= l) {
                return Err(err!(
                    InvalidArgument,
                    "a defragmentation plan for stream {} of a cache of {} streams",
                    p.stream,
                    self.n_stream()
                ));
            }
            last = Some(p.stream);
            let cells = self.cells(p.stream);
            let n = p.ids.len() as u32;
            if n > cells.size() {
                return Err(err!(
                    InvalidArgument,
                    "a defragmentation plan of {n} cells for a stream of {}",
                    cells.size()
                ));
            }
            let mut used = cells.used_bits().to_bitvec();
            for (i, &id) in p.ids.iter().enumerate() {
                if id == i as u32 || id == n {
                    continue;
                }
                if id > n || !used[i] || used[id as usize] {
                    return Err(err!(
                        InvalidState,
                        "stream {}: the defragmentation plan moves cell {i} to {id}, which the \
                         cache no longer allows (the cells changed since it was planned)",
                        p.stream
                    ));
                }
                used.set(i, false);
                used.set(id as usize, true);
            }
        }
        Ok(())
    }

    /// Moves the cells of a checked plan and resets each planned stream's head, as the seed.
    fn move_cells(&mut self, plan: &DefragPlan) {
        for p in &plan.streams {
            let cells = self.cells_mut(p.stream);
            for (src, dst, n) in p.runs() {
                for k in 0..n {
                    cells.mv(src + k, dst + k);
                }
            }
            self.set_head(p.stream, 0);
        }
    }

    /// Applies `plan` to the cells and, when there is one, the storage's K/V rows: all of it,
    /// or (on error) nothing.
    pub fn defragment(&mut self, storage: Option<&mut KvStorage>, plan: &DefragPlan) -> Result<()> {
        self.check_plan(plan)?;
        self.defragment_checked(storage, plan)
    }

    /// [`KvCache::defragment`] of a plan [`KvCache::check_plan`] already accepted, for a caller
    /// that checks before other changes of its own (an update context).
    pub(super) fn defragment_checked(
        &mut self,
        storage: Option<&mut KvStorage>,
        plan: &DefragPlan,
    ) -> Result<()> {
        let size = self.size() as usize;
        let v_trans = self.params().v_trans;
        let mut rows = Vec::new();
        let mut tmp = Vec::new();
        if let Some(st) = storage.as_deref() {
            let blocks = blocks_of(st, v_trans)?;
            let mut widest = 0usize;
            for p in &plan.streams {
                for b in &blocks {
                    let base = p.stream as usize * st.stream_stride(b.t)?;
                    let n_bytes = st.n_bytes(b.t)?;
                    for (src, dst, n) in p.runs() {
                        for j in 0..b.chans as usize {
                            let len = n as usize * b.row;
                            let src = base + (j * size + src as usize) * b.row;
                            let dst = base + (j * size + dst as usize) * b.row;
                            // checked here so that no copy fails half-way through the move
                            if src.max(dst) + len > n_bytes {
                                return Err(err!(
                                    InvalidArgument,
                                    "a move of {len} bytes at {src} -> {dst} leaves a \
                                     {n_bytes}-byte tensor"
                                ));
                            }
                            rows.push((b.t, src, dst, len));
                            widest = widest.max(len);
                        }
                    }
                }
            }
            if !st.is_host() {
                tmp.try_reserve_exact(widest).map_err(|_| {
                    err!(
                        InvalidArgument,
                        "cannot allocate {widest} bytes to move K/V rows"
                    )
                })?;
            }
        }
        failpoint::hit("defragment: before the first change")?;
        if let Some(st) = storage {
            for &(t, src, dst, len) in &rows {
                st.copy_within(t, src, dst, len, &mut tmp)?;
            }
        }
        self.move_cells(plan);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvParams;
    use crate::storage::{LayerSpec, StorageSpec};
    use crate::ubatch::UbatchBuf;

    fn cache(size: u32, n_stream: u32) -> (KvCache, KvStorage) {
        let kv = KvCache::new(KvParams {
            size,
            n_seq_max: n_stream.max(2),
            unified: n_stream == 1,
            n_embd_v_gqa_max: 8,
            ..KvParams::default()
        })
        .unwrap();
        let st = KvStorage::new(StorageSpec {
            type_k: ggml_sys::GGML_TYPE_F16,
            type_v: ggml_sys::GGML_TYPE_F16,
            v_trans: true,
            is_mla: false,
            size,
            n_stream: kv.n_stream(),
            n_rot_k: 0,
            n_rot_v: 0,
            layers: LayerSpec::uniform(2, 8, 8),
        })
        .unwrap();
        (kv, st)
    }

    fn place(kv: &mut KvCache, seq: i32, p0: i32, n: u32) {
        let pos: Vec<i32> = (p0..p0 + n as i32).collect();
        let seqs: Vec<&[i32]> = vec![std::slice::from_ref(&seq); n as usize];
        let ub = UbatchBuf::new(&pos, &pos, &seqs);
        let slot = kv.find_slot(&ub.view(), false).unwrap();
        kv.apply_ubatch(&slot, &ub.view());
    }

    fn fill(st: &mut KvStorage) {
        for l in st.layers().to_vec() {
            for t in [l.k, l.v] {
                let n = st.n_bytes(t).unwrap();
                let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
                st.set(t, 0, &bytes).unwrap();
            }
        }
    }

    fn snapshot(kv: &KvCache, st: &KvStorage) -> (String, Vec<Vec<u8>>) {
        let bytes = st
            .layers()
            .iter()
            .flat_map(|l| [l.k, l.v])
            .map(|t| st.host_bytes(t).unwrap().unwrap().to_vec())
            .collect();
        (format!("{:?}", kv.cells(0).pos_all()), bytes)
    }

    #[test]
    fn the_threshold_rule_is_the_seeds() {
        let (mut kv, _) = cache(4096, 1);
        place(&mut kv, 0, 0, 2047);
        kv.seq_rm(0, 0, 1000).unwrap();
        // below 2048 cells of extent: never fragmented
        assert_eq!(kv.fragmentation(0), 0.0);
        place(&mut kv, 1, 0, 1001);
        // the new cells fill the holes first: still packed
        assert_eq!(kv.cells(0).used_max_p1(), 2048);
        kv.seq_rm(0, 1000, 1512).unwrap();
        // 1 - (used + n_pad) / n_kv, n_pad 1
        let used = kv.cells(0).get_used();
        let want = 1.0 - (used + 1) as f32 / 2048.0;
        assert_eq!(kv.fragmentation(0), want);
        assert!(kv.plan_defrag(Some(want), u32::MAX).unwrap().is_empty());
        assert!(!kv
            .plan_defrag(Some(want - 0.01), u32::MAX)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_injected_failure_or_a_stale_plan_changes_nothing() {
        for n_stream in [1, 2] {
            let (mut kv, mut st) = cache(64, n_stream);
            for s in 0..2 {
                place(&mut kv, s, 0, 20);
            }
            kv.seq_rm(0, 2, 9).unwrap();
            kv.seq_rm(1, 0, 5).unwrap();
            fill(&mut st);
            let plan = kv.plan_defrag(None, u32::MAX).unwrap();
            assert!(!plan.is_empty());
            let before = snapshot(&kv, &st);
            crate::failpoint::arm(Some(0));
            assert!(kv.defragment(Some(&mut st), &plan).is_err());
            assert!(crate::failpoint::arm(None) > 0);
            assert_eq!(snapshot(&kv, &st), before);
            // the cells change under the plan: a move into a used cell is refused
            let s = plan.streams()[0].stream as i32;
            place(&mut kv, s, 100, 7);
            let before = snapshot(&kv, &st);
            let e = kv.defragment(Some(&mut st), &plan).unwrap_err();
            assert!(e.message().contains("no longer allows"), "{e}");
            assert_eq!(snapshot(&kv, &st), before);
            // a fresh plan applies
            let plan = kv.plan_defrag(None, u32::MAX).unwrap();
            kv.defragment(Some(&mut st), &plan).unwrap();
            kv.check_invariants().unwrap();
        }
    }

    #[test]
    fn a_malformed_plan_is_refused() {
        let (mut kv, _) = cache(64, 1);
        place(&mut kv, 0, 0, 10);
        kv.seq_rm(0, 0, 3).unwrap();
        let mut plan = kv.plan_defrag(None, u32::MAX).unwrap();
        plan.streams[0].stream = 5;
        assert!(kv.defragment(None, &plan).is_err());
        let mut plan = kv.plan_defrag(None, u32::MAX).unwrap();
        plan.streams[0].ids[9] = 40;
        assert!(kv.defragment(None, &plan).is_err());
        kv.check_invariants().unwrap();
        assert_eq!(kv.cells(0).used_min(), 3);
    }

    #[test]
    fn the_budget_is_the_seeds() {
        assert_eq!(max_moves_for_nodes(65_536, 2), (65_536 - 4) / 12);
        // below the reserve the seed's unsigned arithmetic wraps to a huge budget
        assert_eq!(max_moves_for_nodes(1, 2), (1u32.wrapping_sub(4)) / 12);
        assert_eq!(max_moves_for_nodes(100, 0), u32::MAX);
    }
}
