//! Composite memories for the `composite_state` target: the sliding-window pair
//! (`IswaMemory`), the hybrid (`Hybrid`, a KV cache and a recurrent memory) and the hybrid with
//! a pair (`HybridIswa`), the hybrids with 0 and with 1 rollback plane. Each already holds
//! sequences placed through equal-split ubatches, a fourth sequence sharing the second's cells
//! and random tensor bytes (and, with a rollback plane, a pending rollback). Every kind has its
//! own row widths, so that a state of one kind never fits another.
//!
//! The oracle: a failed read leaves every part exactly as it was (each KV part's cells, heads
//! and tensor bytes, each recurrent part's cells, rollback indices and tensor bytes, the
//! composite's whole state and sequence ranges); after an accepted one every part's cells stay
//! consistent through later operations, and the whole state round-trips.

use llama_memory::hybrid::{Hybrid, HybridIswa};
use llama_memory::iswa::IswaMemory;
use llama_memory::state::{self, Stash, FLAG_PARTIAL_ONLY};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::storage::{Buft, KvStorage, LayerSpec, StorageSpec};
use llama_memory::{
    KvCache, KvMemory, KvParams, Memory, MemoryContext, RecurrentMemory, RsCache, RsParams, Status,
    SwaType,
};

use crate::recurrent::{equal_ubatch, rs_dest, rs_snapshot, RsSnapshot};

/// Number of composite configurations; the first input byte picks one.
pub const N_CMP_CONFIGS: u8 = 5;

/// Sequences of every configuration (0..3 placed, 3 sharing 1's cells).
const N_SEQ: u32 = 4;
const KV_SIZE: u32 = 32;
const RS_SIZE: u32 = 5;
const F32: u32 = 0;
const F16: u32 = 1;

/// `(name, kind, rollback planes)` of configuration `cfg % N_CMP_CONFIGS`; kind 0 is the pair,
/// 1 the hybrid, 2 the hybrid with a pair.
pub fn cmp_config(cfg: u8) -> (&'static str, u8, u32) {
    match cfg % N_CMP_CONFIGS {
        0 => ("pair", 0, 0),
        1 => ("hybrid", 1, 0),
        2 => ("hybrid rollback 1", 1, 1),
        3 => ("hybrid-pair", 2, 0),
        _ => ("hybrid-pair rollback 1", 2, 1),
    }
}

fn kv(ils: &[u32], gqa: u32, types: (u32, u32), v_trans: bool, swa: bool) -> KvMemory {
    let p = KvParams {
        size: KV_SIZE,
        n_seq_max: N_SEQ,
        unified: true,
        v_trans,
        n_swa: if swa { 4 } else { 0 },
        swa_type: if swa {
            SwaType::Standard
        } else {
            SwaType::None
        },
        n_embd_v_gqa_max: gqa,
        ..KvParams::default()
    };
    let st = KvStorage::new(StorageSpec {
        type_k: types.0,
        type_v: types.1,
        v_trans,
        is_mla: false,
        size: KV_SIZE,
        n_stream: 1,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: ils
            .iter()
            .map(|&il| LayerSpec {
                il,
                n_embd_k_gqa: gqa,
                n_embd_v_gqa: gqa,
                reuse: None,
                buft: Buft::CPU,
            })
            .collect(),
    })
    .expect("storage");
    KvMemory::new(KvCache::new(p).expect("cache"), Some(st)).expect("kv memory")
}

fn rs(n_layer: u32, ils: &[u32], embd: (u32, u32), n_rs_seq: u32) -> RecurrentMemory {
    let cache = RsCache::new(
        RsParams {
            size: RS_SIZE,
            n_seq_max: N_SEQ,
            n_rs_seq,
        },
        true,
    )
    .expect("cache");
    let st = RsStorage::new(RsStorageSpec {
        type_r: F32,
        type_s: F32,
        size: RS_SIZE,
        n_rs_seq: cache.n_rs_seq(),
        layers: ils
            .iter()
            .map(|&il| RsLayerSpec {
                il,
                n_embd_r: embd.0,
                n_embd_s: embd.1,
                n_embd_p: 0,
                buft: Buft::CPU,
            })
            .collect(),
    })
    .expect("storage");
    RecurrentMemory::new(cache, Some(st), n_layer).expect("recurrent memory")
}

/// An empty memory of configuration `cfg`.
pub fn cmp_empty(cfg: u8) -> Box<dyn Memory> {
    let (_, kind, n_rs_seq) = cmp_config(cfg);
    match kind {
        0 => Box::new(
            IswaMemory::from_parts(
                kv(&[0, 2], 4, (F32, F16), true, false),
                kv(&[1, 3], 4, (F32, F16), true, true),
            )
            .expect("pair"),
        ),
        1 => Box::new(
            Hybrid::new(
                kv(&[1, 3], 8, (F16, F32), false, false),
                rs(4, &[0, 2], (8, 16), n_rs_seq),
            )
            .expect("hybrid"),
        ),
        _ => Box::new(
            HybridIswa::new(
                IswaMemory::from_parts(
                    kv(&[0, 3], 12, (F16, F16), false, false),
                    kv(&[1, 4], 12, (F16, F16), false, true),
                )
                .expect("pair"),
                rs(6, &[2, 5], (12, 20), n_rs_seq),
            )
            .expect("hybrid-pair"),
        ),
    }
}

/// Places one equal-split ubatch of `n` tokens per `(sequence, first position)` set.
fn place(m: &mut dyn Memory, sets: &[(i32, i32)], n: u32) {
    let ids: Vec<[i32; 1]> = sets.iter().map(|s| [s.0]).collect();
    let sets: Vec<(&[i32], i32)> = ids.iter().zip(sets).map(|(i, s)| (&i[..], s.1)).collect();
    let u = equal_ubatch(&sets, n);
    let mut ctx = m.init_batch(&[u.view()], None).expect("init_batch");
    assert_eq!(ctx.status(), Status::Success);
    ctx.apply(m).expect("apply");
}

/// The leaf memories of `m`, in state order.
pub fn leaves(m: &dyn Memory) -> Vec<&dyn Memory> {
    if m.n_parts() == 0 {
        return vec![m];
    }
    (0..m.n_parts())
        .filter_map(|i| m.part(i))
        .flat_map(|(_, p)| leaves(p))
        .collect()
}

fn for_each_leaf_mut(m: &mut dyn Memory, f: &mut dyn FnMut(&mut dyn Memory)) {
    if m.n_parts() == 0 {
        return f(m);
    }
    for i in 0..m.n_parts() {
        if let Some((_, p)) = m.part_mut(i) {
            for_each_leaf_mut(p, f);
        }
    }
}

/// Every tensor of a KV part, with its size.
fn kv_tensors(st: &KvStorage) -> Vec<(*mut ggml_sys::ggml_tensor, usize)> {
    st.layers()
        .iter()
        .flat_map(|l| [l.k, l.v])
        .filter(|t| !t.is_null())
        .map(|t| (t, st.n_bytes(t).expect("size")))
        .collect()
}

/// Every tensor of a recurrent part, with its size.
fn rs_tensors(st: &RsStorage) -> Vec<(*mut ggml_sys::ggml_tensor, usize)> {
    let rows = st.spec().size as usize * (st.spec().n_rs_seq as usize + 1);
    st.layers()
        .iter()
        .flat_map(|l| [(l.r, l.row_r * rows), (l.s, l.row_s * rows)])
        .collect()
}

/// A populated memory of configuration `cfg`: three rounds of equal-split ubatches over
/// sequences 0..3, sequence 3 a copy of sequence 1, random tensor bytes in every part, and
/// with a rollback plane sequence 0's last token rolled back.
pub fn cmp_memory(cfg: u8) -> Box<dyn Memory> {
    let (_, _, n_rs_seq) = cmp_config(cfg);
    let mut m = cmp_empty(cfg);
    place(&mut *m, &[(0, 0), (2, 0)], 3);
    place(&mut *m, &[(1, 0)], 4);
    place(&mut *m, &[(2, 3), (0, 3)], 2);
    m.seq_cp(1, 3, -1, -1).expect("seq_cp");
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ cfg as u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    };
    for_each_leaf_mut(&mut *m, &mut |p| {
        let any = p.as_any_mut();
        if let Some(k) = any.downcast_mut::<KvMemory>() {
            let st = k.storage.as_mut().expect("storage");
            for (t, n) in kv_tensors(st) {
                st.set(t, 0, &bytes(n)).expect("fill");
            }
        } else if let Some(r) = any.downcast_mut::<RecurrentMemory>() {
            let st = r.storage.as_mut().expect("storage");
            for (t, n) in rs_tensors(st) {
                st.set(t, 0, &bytes(n)).expect("fill");
            }
        }
    });
    if n_rs_seq > 0 {
        assert!(m.seq_rm(0, 4, -1).expect("seq_rm"), "rollback");
    }
    check_leaves(&*m).expect("invariants of the fuzz memory");
    m
}

/// Checks the cells of every part.
pub fn check_leaves(m: &dyn Memory) -> Result<(), String> {
    for p in leaves(m) {
        if let Some(k) = p.as_any().downcast_ref::<KvMemory>() {
            k.cache.check_invariants()?;
        } else if let Some(r) = p.as_any().downcast_ref::<RecurrentMemory>() {
            r.cache.check_invariants().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The whole state, or `None` when it cannot be written (a recurrent cell shared by sequences
/// with different pending rollbacks, where llama.cpp aborts).
pub fn cmp_whole(m: &dyn Memory) -> Option<Vec<u8>> {
    let n = state::get_size(m).ok()?;
    let mut v = vec![0u8; n];
    let w = state::get_data(m, &mut v).expect("get_data after get_size");
    assert_eq!(w, n, "get_data wrote another size than get_size");
    Some(v)
}

/// One part's observable state.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LeafSnapshot {
    /// A KV part: its whole state, ranges and heads (`crate::snapshot`), every tensor byte.
    Kv(Vec<u8>, Vec<Vec<u8>>),
    /// A recurrent part.
    Rs(RsSnapshot),
}

/// Everything observable about a composite memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmpSnapshot {
    whole: Option<Vec<u8>>,
    ranges: Vec<(i32, i32)>,
    leaves: Vec<LeafSnapshot>,
}

/// Takes a [`CmpSnapshot`].
pub fn cmp_snapshot(m: &dyn Memory) -> CmpSnapshot {
    let leaves = leaves(m)
        .into_iter()
        .map(|p| {
            if let Some(k) = p.as_any().downcast_ref::<KvMemory>() {
                let st = k.storage.as_ref().expect("storage");
                let t = kv_tensors(st)
                    .into_iter()
                    .map(|(t, n)| {
                        let mut d = vec![0u8; n];
                        st.get(t, 0, &mut d).expect("tensor read");
                        d
                    })
                    .collect();
                LeafSnapshot::Kv(crate::snapshot(k), t)
            } else {
                let r = p
                    .as_any()
                    .downcast_ref::<RecurrentMemory>()
                    .expect("a KV or recurrent part");
                LeafSnapshot::Rs(rs_snapshot(r))
            }
        })
        .collect();
    CmpSnapshot {
        whole: cmp_whole(m),
        ranges: (0..N_SEQ as i32)
            .map(|s| {
                (
                    m.seq_pos_min(s).expect("pos_min"),
                    m.seq_pos_max(s).expect("pos_max"),
                )
            })
            .collect(),
        leaves,
    }
}

/// Checks an accepted state: every part's cells are consistent, the whole state (when it can
/// be written) reads back into another memory of the configuration and into this one to the
/// same bytes, and the pair's sequence ranges are sane (a hybrid's parts may disagree on a
/// restored sequence's positions, which neither llama.cpp nor this library cross-checks).
pub fn cmp_check_accepted(cfg: u8, m: &mut dyn Memory) {
    check_leaves(m).expect("invariants after a restore");
    if let Some(w) = cmp_whole(m) {
        let mut again = cmp_memory(cfg);
        state::set_data(&mut *again, &w).expect("a state we wrote reads back");
        check_leaves(&*again).expect("invariants");
        assert!(
            cmp_whole(&*again).as_deref() == Some(&w[..]),
            "whole state did not round-trip"
        );
        state::set_data(m, &w).expect("own whole state");
        assert!(
            cmp_whole(m).as_deref() == Some(&w[..]),
            "own whole state changed"
        );
    }
    if cmp_config(cfg).1 == 0 {
        for s in 0..N_SEQ as i32 {
            let (lo, hi) = (
                m.seq_pos_min(s).expect("min"),
                m.seq_pos_max(s).expect("max"),
            );
            assert!(
                (lo == -1 && hi == -1) || (0 <= lo && lo <= hi),
                "sequence {s}: range [{lo}, {hi}]"
            );
        }
    }
}

/// Runs the operations encoded in `ops` (5 bytes each: kind, sequence, two bounds, an
/// argument) on an accepted memory: every sequence operation, placements of equal-split
/// ubatches, full contexts, sequence state round trips (flags 0 and `PARTIAL_ONLY`), whole
/// state round trips and clears. Each may fail; none may panic, a failed one changes nothing,
/// and every part's cells stay consistent after each.
pub fn cmp_run_ops(cfg: u8, m: &mut dyn Memory, ops: &[u8]) {
    let n_seq_max = m.n_seq_max();
    let seq = |b: u8| rs_dest(b, n_seq_max);
    let bound = |b: u8| match b % 6 {
        0 => -1,
        1 => i32::MAX,
        2 => i32::MAX - 3,
        _ => (b as i32) - 40,
    };
    let mut spare: Option<Box<dyn MemoryContext>> = None;
    for op in ops.chunks_exact(5) {
        let (s, p0, p1, arg) = (seq(op[1]), bound(op[2]), bound(op[3]), op[4]);
        let before = cmp_snapshot(m);
        let failed = match op[0] % 12 {
            0 => !matches!(m.seq_rm(s, p0, p1), Ok(true)),
            1 => m.seq_cp(s, seq(arg), p0, p1).is_err(),
            2 => m.seq_keep(s).is_err(),
            3 => m.seq_add(s, p0, p1, arg as i8 as i32).is_err(),
            4 => m.seq_div(s, p0, p1, (arg % 5) as i32 - 1).is_err(),
            5 | 6 => {
                // 1..=3 sets (distinct sequences) of 1..=4 tokens after each one's last
                // position
                let n_sets = (arg % 3 + 1) as u32;
                let n_tok = ((arg >> 2) % 4 + 1) as u32;
                let mut ids: Vec<i32> = Vec::new();
                for k in 0..n_sets {
                    let q = ((op[1] as u32 + k * (1 + op[0] as u32 % 3)) % n_seq_max) as i32;
                    if !ids.contains(&q) {
                        ids.push(q);
                    }
                }
                let one: Vec<[i32; 1]> = ids.iter().map(|&q| [q]).collect();
                let sets: Vec<(&[i32], i32)> = one
                    .iter()
                    .map(|v| {
                        let last = m.seq_pos_max(v[0]).unwrap_or(-1);
                        (&v[..], last.saturating_add(1))
                    })
                    .collect();
                let u = equal_ubatch(&sets, n_tok);
                match m.init_batch(&[u.view()], spare.take()) {
                    Err(_) => true,
                    // a failed prepare: checked for consistency only
                    Ok(ctx) if ctx.status() != Status::Success => {
                        spare = Some(ctx);
                        false
                    }
                    Ok(mut ctx) => {
                        let failed = ctx.apply(m).is_err();
                        spare = Some(ctx);
                        failed
                    }
                }
            }
            7 => {
                let _ = m.init_full();
                false
            }
            8 | 9 => {
                // a sequence state round trip into another sequence
                let flags = if op[0] % 12 == 9 {
                    FLAG_PARTIAL_ONLY
                } else {
                    0
                };
                let Ok(n) = state::seq_get_size(m, s, flags) else {
                    continue;
                };
                let mut blob = vec![0u8; n];
                let w = state::seq_get_data(m, &mut blob, s, flags, &mut Stash::new())
                    .expect("written");
                assert_eq!(w, n, "seq_get_data wrote another size than seq_get_size");
                match state::seq_set_data(m, &blob, seq(arg), flags, &Stash::new()) {
                    Ok(r) => {
                        assert_eq!(r, n, "a state we wrote was read partly");
                        false
                    }
                    Err(_) => true,
                }
            }
            10 => {
                cmp_check_accepted(cfg, m);
                false
            }
            _ => {
                m.clear(arg & 1 == 1);
                false
            }
        };
        if failed {
            assert!(
                cmp_snapshot(m) == before,
                "a failed op {op:?} changed the memory"
            );
        }
        check_leaves(m).unwrap_or_else(|e| panic!("invariants after op {op:?}: {e}"));
    }
}
