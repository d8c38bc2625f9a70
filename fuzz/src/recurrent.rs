//! Recurrent memories for the `recurrent_state` target: small configurations with tensors
//! (F32 and F16 rows, a PLE row, a short-conv layer without S row, rollback planes) and one
//! without, already holding sequences placed through equal-split ubatches, a shared cell and
//! random tensor bytes; the oracle (a failed read changes nothing; after an accepted one the
//! cells stay consistent through every later operation) and the operations run afterwards.

use llama_memory::recurrent::RsCell;
use llama_memory::state::{self, Stash, FLAG_ON_DEVICE};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::{
    Memory, MemoryContext, RecurrentMemory, RsCache, RsContext, RsParams, Status, UbatchBuf,
};

/// Number of recurrent configurations; the low bits of the first input byte pick one.
pub const N_RS_CONFIGS: u8 = 4;

const F32: u32 = 0;
const F16: u32 = 1;

struct Cfg {
    size: u32,
    n_seq_max: u32,
    n_rs_seq: u32,
    n_layer: u32,
    type_r: u32,
    type_s: u32,
    /// (il, n_embd_r, n_embd_s, n_embd_p) of the layers with tensors.
    layers: &'static [(u32, u32, u32, u32)],
}

fn cfg_of(cfg: u8) -> Cfg {
    match cfg % N_RS_CONFIGS {
        // 3 model layers, tensors in 0 and 2, a PLE row in 2 (the malformed-corpus memory).
        0 | 1 => Cfg {
            size: 5,
            n_seq_max: 4,
            n_rs_seq: if cfg % N_RS_CONFIGS == 1 { 2 } else { 0 },
            n_layer: 3,
            type_r: F32,
            type_s: F32,
            layers: &[(0, 24, 32, 0), (2, 24, 32, 8)],
        },
        // F16 conv rows, short-conv layers (no S row), one rollback plane, spare cells.
        2 => Cfg {
            size: 8,
            n_seq_max: 3,
            n_rs_seq: 1,
            n_layer: 2,
            type_r: F16,
            type_s: F32,
            layers: &[(0, 16, 0, 0), (1, 16, 0, 4)],
        },
        // Cells only: no layer has tensors.
        _ => Cfg {
            size: 4,
            n_seq_max: 4,
            n_rs_seq: 0,
            n_layer: 2,
            type_r: F32,
            type_s: F32,
            layers: &[],
        },
    }
}

/// An equal-split ubatch: one set per `(sequence ids, first position)`, `n` tokens each.
pub fn equal_ubatch(sets: &[(&[i32], i32)], n: u32) -> UbatchBuf {
    let mut pos = Vec::new();
    let mut seqs: Vec<&[i32]> = Vec::new();
    for &(ids, p0) in sets {
        for k in 0..n as i32 {
            pos.push(p0.saturating_add(k));
            seqs.push(ids);
        }
    }
    let toks: Vec<i32> = (0..pos.len() as i32).collect();
    let mut u = UbatchBuf::new(&toks, &pos, &seqs);
    u.n_seq_tokens = n;
    u.n_seqs = sets.len() as u32;
    u.equal_seqs = true;
    u
}

fn place(m: &mut RecurrentMemory, sets: &[(&[i32], i32)], n: u32) {
    let u = equal_ubatch(sets, n);
    let mut ctx = m.init_batch(&[u.view()], None).expect("init_batch");
    assert_eq!(ctx.status(), Status::Success);
    ctx.apply(m).expect("apply");
}

/// Every tensor of the storage with its size in bytes.
fn tensors(st: &RsStorage) -> Vec<(*mut ggml_sys::ggml_tensor, usize)> {
    let sp = st.spec();
    let rows = (sp.size as usize) * (sp.n_rs_seq as usize + 1);
    let mut v = Vec::new();
    for l in st.layers() {
        v.push((l.r, l.row_r * rows));
        v.push((l.s, l.row_s * rows));
        if !l.p.is_null() {
            v.push((l.p, l.row_p * rows));
        }
    }
    v
}

/// A recurrent memory of configuration `cfg % N_RS_CONFIGS`, holding sequences (one cell
/// shared by two, one pending rollback where there are planes) and random tensor bytes.
pub fn rs_memory(cfg: u8) -> RecurrentMemory {
    let c = cfg_of(cfg);
    let cache = RsCache::new(
        RsParams {
            size: c.size,
            n_seq_max: c.n_seq_max,
            n_rs_seq: c.n_rs_seq,
        },
        !c.layers.is_empty(),
    )
    .expect("cache");
    let storage = (!c.layers.is_empty()).then(|| {
        RsStorage::new(RsStorageSpec {
            type_r: c.type_r,
            type_s: c.type_s,
            size: c.size,
            n_rs_seq: cache.n_rs_seq(),
            layers: c
                .layers
                .iter()
                .map(|&(il, r, s, p)| RsLayerSpec {
                    il,
                    n_embd_r: r,
                    n_embd_s: s,
                    n_embd_p: p,
                    buft: llama_memory::storage::Buft::CPU,
                })
                .collect(),
        })
        .expect("storage")
    });
    let mut m = RecurrentMemory::new(cache, storage, c.n_layer).expect("memory");
    match cfg % N_RS_CONFIGS {
        0 | 1 => {
            place(&mut m, &[(&[0], 0), (&[2], 0)], 3);
            place(&mut m, &[(&[1], 0)], 4);
            place(&mut m, &[(&[2], 3), (&[0], 3)], 2);
            m.seq_cp(1, 3, -1, -1).expect("seq_cp");
            if c.n_rs_seq > 0 {
                assert!(m.seq_rm(0, 4, -1).expect("seq_rm"), "rollback");
            }
        }
        2 => {
            place(&mut m, &[(&[0], 0), (&[1], 0), (&[2], 0)], 2);
            place(&mut m, &[(&[1], 2)], 3);
            assert!(m.seq_rm(1, 4, -1).expect("seq_rm"), "rollback");
        }
        _ => {
            place(&mut m, &[(&[0], 0)], 5);
            place(&mut m, &[(&[3], 0), (&[1], 0)], 1);
            m.seq_cp(0, 2, -1, -1).expect("seq_cp");
        }
    }
    if let Some(st) = &mut m.storage {
        let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ cfg as u64;
        for (t, n) in tensors(st) {
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect();
            st.set(t, 0, &bytes).expect("fill");
        }
    }
    m.cache
        .check_invariants()
        .expect("invariants of the fuzz memory");
    m
}

/// Everything observable about a recurrent memory: cells, head/used/n/rs_z, rs_idx and every
/// byte of every tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsSnapshot {
    cells: Vec<RsCell>,
    scalars: (u32, u32, u32, i32),
    rs_idx: Vec<u32>,
    tensors: Vec<Vec<u8>>,
}

/// Takes an [`RsSnapshot`].
pub fn rs_snapshot(m: &RecurrentMemory) -> RsSnapshot {
    let c = &m.cache;
    let tensors = m.storage.as_ref().map_or(Vec::new(), |st| {
        tensors(st)
            .into_iter()
            .map(|(t, n)| {
                let mut d = vec![0u8; n];
                st.get(t, 0, &mut d).expect("tensor read");
                d
            })
            .collect()
    });
    RsSnapshot {
        cells: c.cells().to_vec(),
        scalars: (c.head(), c.used(), c.n(), c.rs_z()),
        rs_idx: c.rs_idx().to_vec(),
        tensors,
    }
}

/// The whole state, or `None` when it cannot be written (llama.cpp aborts there: a shared
/// cell whose sequences have different pending rollbacks).
pub fn rs_whole(m: &RecurrentMemory) -> Option<Vec<u8>> {
    let n = state::get_size(m).ok()?;
    let mut v = vec![0u8; n];
    let w = state::get_data(m, &mut v).expect("get_data after get_size");
    assert_eq!(w, n, "get_data wrote another size than get_size");
    Some(v)
}

/// Checks an accepted state: the cells are consistent, and the whole state (when it can be
/// written) reads back into a fresh memory of the same configuration and re-serializes to
/// the same bytes.
pub fn rs_check_accepted(cfg: u8, m: &RecurrentMemory) {
    m.cache
        .check_invariants()
        .expect("invariants after a restore");
    if let Some(w) = rs_whole(m) {
        let mut again = rs_memory(cfg);
        state::set_data(&mut again, &w).expect("a state we wrote reads back");
        again.cache.check_invariants().expect("invariants");
        assert!(
            rs_whole(&again).as_deref() == Some(&w[..]),
            "whole state did not round-trip"
        );
    }
}

/// The destination a byte selects: -1, each valid sequence, and invalid ids.
pub fn rs_dest(b: u8, n_seq_max: u32) -> i32 {
    match b % 8 {
        0 => -1,
        6 => n_seq_max as i32,
        7 => [-2, i32::MIN, 256, i32::MAX][(b as usize / 8) % 4],
        k => ((k - 1) as u32 % n_seq_max) as i32,
    }
}

/// Checks a context's recurrent inputs: head/n inside the cells, rs_z a row of the slot or
/// -1, and every `s_copy` entry of a placed ubatch a row of the state tensors.
fn check_inputs(m: &mut RecurrentMemory, ctx: &dyn MemoryContext) {
    let Some(rc) = ctx.as_any().downcast_ref::<RsContext>() else {
        panic!("not a recurrent context");
    };
    let size = m.cache.size();
    let rows = size as i64 * (m.cache.n_rs_seq() as i64 + 1);
    let (n_rs, head, rs_z) = (rc.n_rs(m), rc.head(m), rc.rs_z(m));
    assert!(
        rc.is_full() || head as u64 + n_rs as u64 <= size as u64,
        "head {head} + n_rs {n_rs} > {size}"
    );
    assert!(rs_z >= -1 && rs_z < size as i32, "rs_z {rs_z}");
    let mut out = vec![0i32; n_rs as usize];
    if m.cache.s_copy_into(&mut out).is_ok() {
        // A full context covers empty cells too, whose src0 is -1 (as upstream, where
        // init_full only sizes the graph).
        let lo = if rc.is_full() { -1 } else { 0 };
        for &r in &out {
            assert!(
                r >= lo && (r as i64) < rows,
                "s_copy row {r} outside {rows} rows"
            );
        }
    }
}

/// Runs the operations encoded in `ops` (5 bytes each: kind, sequence, two bounds, an
/// argument) on an accepted memory: every sequence operation, placement of random equal-split
/// ubatches with their inputs (`s_copy` included), full contexts, sequence and whole state
/// round trips (host and ON_DEVICE) and clears. Each may fail; none may panic, a failed one
/// changes nothing, and the cells stay consistent after every one.
pub fn rs_run_ops(cfg: u8, m: &mut RecurrentMemory, ops: &[u8]) {
    let n_seq_max = m.cache.n_seq_max();
    let seq = |b: u8| rs_dest(b, n_seq_max);
    let bound = |b: u8| match b % 6 {
        0 => -1,
        1 => i32::MAX,
        2 => i32::MAX - 3,
        _ => (b as i32) - 40,
    };
    let mut spare: Option<Box<dyn MemoryContext>> = None;
    let mut stash = Stash::new();
    for op in ops.chunks_exact(5) {
        let (s, p0, p1, arg) = (seq(op[1]), bound(op[2]), bound(op[3]), op[4]);
        let before = rs_snapshot(m);
        let failed = match op[0] % 13 {
            0 => !matches!(m.seq_rm(s, p0, p1), Ok(true)),
            1 => m.seq_cp(s, seq(arg), p0, p1).is_err(),
            2 => m.seq_keep(s).is_err(),
            3 => m.seq_add(s, p0, p1, arg as i8 as i32).is_err(),
            4 => m.seq_div(s, p0, p1, (arg % 5) as i32 - 1).is_err(),
            5 | 6 => {
                // 1..=3 sets of 1..=4 tokens after each sequence's last position; with kind 6
                // a set may carry a second sequence (a token in two sequences), and the set
                // list may be invalid (a sequence in two sets, a non-equal split).
                let kind6 = op[0] % 13 == 6;
                let n_sets = (arg % 3 + 1) as usize;
                let n_tok = ((arg >> 2) % 4 + 1) as u32;
                let mut ids: Vec<Vec<i32>> = Vec::new();
                for k in 0..n_sets {
                    let q = ((op[1] as u32 + k as u32 * 7) % n_seq_max) as i32;
                    let mut v = vec![q];
                    if kind6 && (arg >> (4 + k)) & 1 == 1 {
                        let r = ((op[2] as u32 + k as u32) % n_seq_max) as i32;
                        if r != q {
                            v.push(r);
                        }
                    }
                    ids.push(v);
                }
                if !kind6 {
                    // distinct sets only: a valid split
                    let mut seen = Vec::new();
                    ids.retain(|v| {
                        let fresh = !seen.contains(&v[0]);
                        seen.push(v[0]);
                        fresh
                    });
                }
                let sets: Vec<(&[i32], i32)> = ids
                    .iter()
                    .map(|v| {
                        let last = m.seq_pos_max(v[0]).unwrap_or(-1);
                        (&v[..], last.saturating_add(1))
                    })
                    .collect();
                let mut u = equal_ubatch(&sets, n_tok);
                if kind6 && op[3] & 1 == 1 {
                    u.equal_seqs = false;
                }
                match m.init_batch(&[u.view()], spare.take()) {
                    Err(_) => true,
                    // FailedPrepare: the cells are put back, n and rs_z keep what the failed
                    // search computed (as upstream's prepare).
                    Ok(ctx) if ctx.status() != Status::Success => {
                        spare = Some(ctx);
                        false
                    }
                    Ok(mut ctx) => {
                        let failed = ctx.apply(m).is_err();
                        if !failed {
                            check_inputs(m, &*ctx);
                        }
                        spare = Some(ctx);
                        failed
                    }
                }
            }
            7 => {
                if let Ok(ctx) = m.init_full() {
                    check_inputs(m, &*ctx);
                }
                false
            }
            8 | 9 => {
                // A sequence state round trip into another sequence, host or ON_DEVICE.
                let flags = if op[0] % 13 == 9 { FLAG_ON_DEVICE } else { 0 };
                let Ok(n) = state::seq_get_size(m, s, flags) else {
                    continue;
                };
                let mut blob = vec![0u8; n];
                let w = state::seq_get_data(m, &mut blob, s, flags, &mut stash).expect("written");
                assert_eq!(w, n, "seq_get_data wrote another size than seq_get_size");
                let d = seq(arg);
                // A state at a negative position (seq_add can put it there) is out of
                // seq_rm's reach, as upstream: restoring an empty state does not remove it.
                let stuck = d >= 0 && (d as u32) < n_seq_max && {
                    let t = m.cache.cells()[d as usize].tail;
                    t >= 0 && m.cache.cells()[t as usize].pos < 0
                };
                let host = (s >= 0).then(|| {
                    let mut h = vec![0u8; state::seq_get_size(m, s, 0).expect("size")];
                    state::seq_get_data(m, &mut h, s, 0, &mut Stash::new()).expect("host blob");
                    h
                });
                match state::seq_set_data(m, &blob, d, flags, &stash) {
                    Ok(r) => {
                        assert_eq!(r, n, "a state we wrote was read partly");
                        // the destination now holds exactly what the source held
                        let empty = host.as_ref().is_some_and(|h| h[8..12] == [0; 4]);
                        if let (Some(h), true) = (host, d >= 0 && !(stuck && empty)) {
                            let mut again = vec![0u8; state::seq_get_size(m, d, 0).expect("size")];
                            state::seq_get_data(m, &mut again, d, 0, &mut Stash::new())
                                .expect("host blob");
                            assert!(
                                again[8..] == h[8..],
                                "sequence {s} -> {d} did not round-trip"
                            );
                        }
                        false
                    }
                    Err(_) => true,
                }
            }
            10 => {
                // The whole state into the memory itself: same bytes afterwards.
                if let Some(w) = rs_whole(m) {
                    state::set_data(m, &w).expect("own whole state");
                    assert!(
                        rs_whole(m).as_deref() == Some(&w[..]),
                        "whole state changed"
                    );
                }
                false
            }
            11 => {
                rs_check_accepted(cfg, m);
                false
            }
            _ => {
                m.clear(arg & 1 == 1);
                false
            }
        };
        if failed {
            assert!(
                rs_snapshot(m) == before,
                "a failed op {op:?} changed the memory"
            );
        }
        m.cache
            .check_invariants()
            .unwrap_or_else(|e| panic!("invariants after op {op:?}: {e}"));
    }
}
