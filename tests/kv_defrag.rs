//! Defragmentation against the last llama.cpp that had it (`llama_kv_cache_unified::
//! defrag_prepare` of `llama-cpp-sys-2` 0.1.121, through the reference's `libdfref.so`).
//!
//! Random traces drive our cache with real operations (placements of multi-sequence ubatches
//! through the slot search, `seq_rm` of ranges and of whole sequences, `seq_cp`, `seq_keep`,
//! `clear`), so the cells scatter as they do in a server with parallel sequences. After every
//! step both sides get the same cell table and plan with the same move budget (from generous
//! down to a single move, and below the seed's reserve, where its unsigned arithmetic wraps);
//! the plans must be the same cell for cell. Some plans are then applied on both sides and the
//! whole cell tables (positions, pending shifts, sequences) and heads compared.
//!
//! A second test moves real K/V rows (host storage, one and two streams, V transposed or not)
//! and checks that every sequence keeps its cells: the same (position, sequences, K rows,
//! V elements) in other cells, `seq_pos_min/max` unchanged, the extent down to the used count.
//!
//! `SEED=<u64>` varies the traces; `DEFRAG_STEPS=<n>` sets the steps per configuration.

#[path = "common/tiny_kv.rs"]
mod tiny_kv;

use std::collections::BTreeMap;

use llama_memory::kv::{max_moves_for_nodes, DefragPlan, StreamPlan};
use llama_memory::{KvCache, KvMemory, KvParams, UbatchBuf};
use llama_memory_reference::{self as stock, DfCell, RefDefrag};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const COUNTERS: &[&str] = &[
    "plans compared",
    "plans: nothing to move",
    "plans: the budget stopped them",
    "plans: one move",
    "plans applied and compared",
    "steps with 4+ sequences",
];

fn seed() -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d3f4)
}

fn steps() -> usize {
    std::env::var("DEFRAG_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12_000)
}

/// Places `n` tokens (one ubatch) for the sequences `seqs`, each token in all of them, at the
/// positions after their current ends; false when no slot fits.
fn place(kv: &mut KvCache, rng: &mut StdRng, seqs: &[i32], n: u32) -> bool {
    let start = seqs
        .iter()
        .map(|&s| kv.seq_pos_max(s).unwrap() + 1)
        .max()
        .unwrap_or(0);
    let tokens: Vec<i32> = (0..n as i32).collect();
    let pos: Vec<i32> = (0..n as i32).map(|i| start + i).collect();
    let ids: Vec<&[i32]> = (0..n).map(|_| seqs).collect();
    let ub = UbatchBuf::new(&tokens, &pos, &ids);
    let cont = rng.gen_bool(0.2);
    match kv.find_slot(&ub.view(), cont) {
        Some(slot) => {
            kv.apply_ubatch(&slot, &ub.view());
            true
        }
        None => false,
    }
}

/// One random operation of a serving workload.
fn step(kv: &mut KvCache, rng: &mut StdRng, n_seq: i32) {
    let s = rng.gen_range(0..n_seq);
    match rng.gen_range(0..100) {
        0..=54 => {
            let n = *[1u32, 1, 1, 2, 5, 17, 64].choose(rng).unwrap();
            let seqs: Vec<i32> = if kv.n_stream() == 1 && rng.gen_bool(0.1) {
                let mut v = vec![s, rng.gen_range(0..n_seq)];
                v.sort_unstable();
                v.dedup();
                v
            } else {
                vec![s]
            };
            if !place(kv, rng, &seqs, n) {
                // full: a sequence ends, as in a server
                kv.seq_rm(s, -1, -1).unwrap();
            }
        }
        55..=74 => {
            // trim the end (rollback) or the start (context shift without the shift)
            let max = kv.seq_pos_max(s).unwrap();
            if max >= 0 {
                let p = rng.gen_range(0..=max);
                if rng.gen_bool(0.5) {
                    kv.seq_rm(s, p, -1).unwrap();
                } else {
                    kv.seq_rm(s, -1, p).unwrap();
                }
            }
        }
        75..=86 => {
            kv.seq_rm(s, -1, -1).unwrap();
        }
        87..=93 => {
            let d = rng.gen_range(0..n_seq);
            if d != s {
                kv.seq_rm(d, -1, -1).unwrap();
                kv.seq_cp(s, d, -1, -1).unwrap();
            }
        }
        94..=96 => {
            if rng.gen_bool(0.3) {
                kv.seq_keep(s).unwrap();
            }
        }
        _ => {
            if rng.gen_bool(0.1) {
                kv.clear();
            }
        }
    }
}

/// The cell table of stream 0 as the reference takes it.
fn table(kv: &KvCache) -> (Vec<i32>, Vec<u64>) {
    let c = kv.cells(0);
    let n = c.size();
    let pos: Vec<i32> = (0..n).map(|i| c.pos_get(i)).collect();
    let mask: Vec<u64> = (0..n)
        .map(|i| {
            c.seq_get_all(i)
                .iter_ones()
                .fold(0u64, |m, s| m | 1u64 << s)
        })
        .collect();
    (pos, mask)
}

fn our_cells(kv: &KvCache) -> (Vec<DfCell>, u32) {
    let c = kv.cells(0);
    let (pos, mask) = table(kv);
    let cells = (0..c.size() as usize)
        .map(|i| DfCell {
            pos: pos[i],
            shift: c.get_shift(i as u32),
            seq_mask: mask[i],
        })
        .collect();
    (cells, kv.head(0))
}

fn cache(size: u32, n_seq: u32) -> KvCache {
    KvCache::new(KvParams {
        size,
        n_seq_max: n_seq,
        ..KvParams::default()
    })
    .unwrap()
}

/// A budget in graph nodes: mostly small enough to bind, sometimes generous, sometimes below
/// the seed's reserve of two nodes per layer.
fn nodes(rng: &mut StdRng, n_layer: u32) -> i32 {
    match rng.gen_range(0..10) {
        0 => 65_536,
        1 => rng.gen_range(0..2 * n_layer as i32),
        _ => (2 * n_layer + 6 * n_layer * rng.gen_range(0..12)) as i32 + rng.gen_range(0..6),
    }
}

fn ids_of(plan: &DefragPlan) -> Option<Vec<u32>> {
    plan.streams().first().map(|p: &StreamPlan| p.ids.clone())
}

/// Runs one configuration; returns the number of divergences (printing the first few).
fn run(size: u32, n_seq: u32, n_steps: usize, seed: u64, count: &mut BTreeMap<&str, u64>) -> u64 {
    let model = stock::model_path();
    let mut reference = RefDefrag::new(&model, size).expect("the defrag reference loads the model");
    let n_layer = reference.n_layer();
    let mut kv = cache(size, n_seq);
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(size) << 8 ^ u64::from(n_seq));
    let mut bad = 0;
    for i in 0..n_steps {
        step(&mut kv, &mut rng, n_seq as i32);
        if (0..n_seq as i32)
            .filter(|&s| kv.seq_pos_max(s).unwrap() >= 0)
            .count()
            >= 4
        {
            *count.entry("steps with 4+ sequences").or_default() += 1;
        }
        let n_max_nodes = nodes(&mut rng, n_layer);
        let max_moves = max_moves_for_nodes(n_max_nodes, n_layer);
        let ours = kv.plan_defrag(None, max_moves).unwrap();
        let (pos, mask) = table(&kv);
        reference.set_cells(&pos, &mask);
        let theirs = reference.plan(n_max_nodes);
        *count.entry("plans compared").or_default() += 1;
        if ids_of(&ours) != theirs {
            bad += 1;
            if bad <= 3 {
                eprintln!(
                    "size {size}, {n_seq} seqs, step {i}, {n_max_nodes} nodes: ours {:?}\nstock {:?}",
                    ids_of(&ours),
                    theirs
                );
            }
            continue;
        }
        let Some(ids) = theirs else {
            *count.entry("plans: nothing to move").or_default() += 1;
            continue;
        };
        let p = &ours.streams()[0];
        if p.n_moves == 1 {
            *count.entry("plans: one move").or_default() += 1;
        }
        if p.n_moves == max_moves {
            *count.entry("plans: the budget stopped them").or_default() += 1;
        }
        if rng.gen_bool(0.3) {
            kv.defragment(None, &ours).unwrap();
            reference.apply(&ids);
            kv.check_invariants().unwrap();
            *count.entry("plans applied and compared").or_default() += 1;
            if our_cells(&kv) != reference.cells() {
                bad += 1;
                if bad <= 3 {
                    eprintln!(
                        "size {size}, {n_seq} seqs, step {i}: the cells differ after the move"
                    );
                }
            }
        }
    }
    bad
}

#[test]
fn plan_and_move_match_the_defragmenting_llama_cpp() {
    let mut count = BTreeMap::new();
    let n = steps();
    let mut bad = 0;
    let mut total = 0;
    for (size, n_seq, share) in [(64, 4, 2), (256, 8, 3), (1024, 16, 3), (4096, 24, 1)] {
        let k = n * share;
        bad += run(size, n_seq, k, seed(), &mut count);
        total += k;
    }
    eprintln!("{total} steps, {bad} divergences: {count:?}");
    for c in COUNTERS {
        assert!(count.get(c).copied().unwrap_or(0) > 0, "never covered: {c}");
    }
    assert_eq!(bad, 0, "{bad} divergences from the defragmenting llama.cpp");
}

/// One hole, by hand: sequence 0 in cells 0..20 and sequence 1 in 20..40, then sequence 0
/// loses positions 3..9. The seed fills the 6-cell hole with the last 6 used cells, in order;
/// ours plans the same. (An injected bug, no budget stop at the end of a hole, gave 247
/// divergences in 4,500 steps of the random test above.)
#[test]
fn one_hole_is_filled_from_the_end_as_the_seed_does() {
    let model = stock::model_path();
    let mut reference = RefDefrag::new(&model, 64).unwrap();
    let mut kv = cache(64, 2);
    let mut rng = StdRng::seed_from_u64(7);
    for s in 0..2 {
        assert!(place(&mut kv, &mut rng, &[s], 20));
    }
    kv.seq_rm(0, 3, 9).unwrap();
    let plan = kv.plan_defrag(None, u32::MAX).unwrap();
    let (pos, mask) = table(&kv);
    reference.set_cells(&pos, &mask);
    let theirs = reference.plan(65_536).unwrap();
    assert_eq!(theirs.len(), 40);
    assert_eq!(theirs[34..], [3, 4, 5, 6, 7, 8]);
    assert_eq!(ids_of(&plan).unwrap(), theirs);
    assert_eq!(plan.n_moves(), 1);
}

/// Everything a cell carries, with its K rows and V elements: a sequence's cells before and
/// after a move must be the same multiset.
type CellContent = (i32, Vec<i32>, Vec<u8>);

fn contents(m: &KvMemory, s: u32) -> Vec<CellContent> {
    let st = m.storage.as_ref().unwrap();
    let c = m.cache.cells(s);
    let size = m.cache.size() as usize;
    let v_trans = m.cache.params().v_trans;
    let mut out = Vec::new();
    for i in 0..c.size() {
        if c.is_empty(i) {
            continue;
        }
        let mut bytes = Vec::new();
        for l in st.layers() {
            let k = st.host_bytes(l.k).unwrap().unwrap();
            let kr = k.len() / (size * m.cache.n_stream() as usize);
            let base = s as usize * st.stream_stride(l.k).unwrap();
            bytes.extend_from_slice(&k[base + i as usize * kr..][..kr]);
            let v = st.host_bytes(l.v).unwrap().unwrap();
            let vbase = s as usize * st.stream_stride(l.v).unwrap();
            if v_trans {
                for j in 0..tiny_kv::GQA as usize {
                    bytes.extend_from_slice(&v[vbase + (j * size + i as usize) * 2..][..2]);
                }
            } else {
                let vr = tiny_kv::GQA as usize * 2;
                bytes.extend_from_slice(&v[vbase + i as usize * vr..][..vr]);
            }
        }
        out.push((
            c.pos_get(i),
            c.seq_get_all(i).iter_ones().map(|x| x as i32).collect(),
            bytes,
        ));
    }
    out.sort();
    out
}

#[test]
fn a_move_keeps_every_sequence_and_its_rows() {
    let mut moved = 0;
    for (unified, v_trans) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut m = tiny_kv::ours(unified, v_trans);
        tiny_kv::randomize(&mut m, 11, None);
        let mut rng = StdRng::seed_from_u64(u64::from(unified) << 1 | u64::from(v_trans));
        for round in 0..300 {
            step(&mut m.cache, &mut rng, 2);
            tiny_kv::randomize(&mut m, round, None);
            let before: Vec<_> = (0..m.cache.n_stream()).map(|s| contents(&m, s)).collect();
            let minmax: Vec<_> = (0..2)
                .map(|s| {
                    (
                        m.cache.seq_pos_min(s).unwrap(),
                        m.cache.seq_pos_max(s).unwrap(),
                    )
                })
                .collect();
            let plan = m.cache.plan_defrag(None, u32::MAX).unwrap();
            if plan.is_empty() {
                continue;
            }
            m.cache.defragment(m.storage.as_mut(), &plan).unwrap();
            moved += 1;
            m.cache.check_invariants().unwrap();
            for s in 0..m.cache.n_stream() {
                assert_eq!(
                    contents(&m, s),
                    before[s as usize],
                    "stream {s}, round {round}"
                );
                let c = m.cache.cells(s);
                // an unbounded plan packs the used cells at the start
                assert_eq!(c.used_max_p1(), c.get_used(), "round {round}");
            }
            let after: Vec<_> = (0..2)
                .map(|s| {
                    (
                        m.cache.seq_pos_min(s).unwrap(),
                        m.cache.seq_pos_max(s).unwrap(),
                    )
                })
                .collect();
            assert_eq!(after, minmax);
        }
    }
    assert!(moved > 50, "only {moved} moves");
}
