//! Shared setup of the fuzz targets: small memories in several configurations, already holding
//! fragmented sequences and nonzero K/V bytes, and the oracle every target checks: a failed
//! read leaves the memory exactly as it was; a successful one leaves it consistent.

pub mod composite;
pub mod recurrent;

use llama_memory::state::{self, Stash};
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, Memory, SwaType, UbatchBuf};

/// Number of configurations; the first input byte picks one.
pub const N_CONFIGS: u8 = 4;

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;

/// A memory of configuration `cfg % N_CONFIGS`, with sequences 0 and 1 placed.
pub fn memory(cfg: u8) -> KvMemory {
    let (unified, n_seq_max, v_trans, tk, tv, gqa, swa, n_pos) = match cfg % N_CONFIGS {
        0 => (true, 3, true, F16, F16, 32, SwaType::None, 1),
        1 => (false, 2, false, Q8_0, F16, 32, SwaType::None, 1),
        2 => (true, 2, false, F32, F32, 16, SwaType::Standard, 1),
        _ => (true, 2, true, F16, F16, 16, SwaType::None, 4),
    };
    let size = 64;
    let p = KvParams {
        size,
        n_seq_max,
        unified,
        v_trans,
        n_swa: if swa == SwaType::None { 0 } else { 8 },
        swa_type: swa,
        n_pos_per_embd: n_pos,
        n_embd_v_gqa_max: gqa,
        ..KvParams::default()
    };
    let layers = LayerSpec::uniform(2, gqa, gqa);
    let st = KvStorage::new(StorageSpec {
        type_k: tk,
        type_v: tv,
        v_trans,
        is_mla: false,
        size,
        n_stream: if unified { 1 } else { n_seq_max },
        n_rot_k: 0,
        n_rot_v: 0,
        layers,
    })
    .expect("storage");
    let mut m = KvMemory::new(KvCache::new(p).expect("cache"), Some(st)).expect("memory");
    place(&mut m, 0, 0, 12);
    place(&mut m, 1, 0, 7);
    m.cache.seq_rm(0, 3, 6).expect("seq_rm");
    place(&mut m, 1, 7, 4);
    let st = m.storage.as_mut().expect("storage");
    for l in st.layers().to_vec() {
        for t in [l.k, l.v] {
            let n = st.stream_stride(t).expect("stride") * st.spec().n_stream as usize;
            let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8 & 0x3f).collect();
            st.set(t, 0, &bytes).expect("fill");
        }
    }
    m
}

fn place(m: &mut KvMemory, seq: i32, p0: i32, n: usize) {
    let n_pos = m.cache.params().n_pos_per_embd as usize;
    let toks: Vec<i32> = (0..n as i32).collect();
    let mut pos: Vec<i32> = (p0..p0 + n as i32).collect();
    pos.resize(n * n_pos, 0);
    let s = [seq];
    let seqs: Vec<&[i32]> = vec![&s[..]; n];
    let mut b = UbatchBuf::new(&toks, &pos[..n], &seqs);
    b.n_pos = n_pos as u32;
    b.pos = pos;
    let slot = m.cache.find_slot(&b.view(), false).expect("slot");
    m.cache.apply_ubatch(&slot, &b.view());
}

/// The destination a byte selects: -1, each valid sequence, and invalid ids.
pub fn dest(b: u8, n_seq_max: u32) -> i32 {
    match b % 8 {
        0 => -1,
        6 => n_seq_max as i32,
        7 => -2,
        k => ((k - 1) as u32 % n_seq_max) as i32,
    }
}

/// Everything observable about the memory.
pub fn snapshot(m: &KvMemory) -> Vec<u8> {
    let n = state::get_size(m).expect("size");
    let mut out = vec![0u8; n];
    state::get_data(m, &mut out).expect("state");
    for s in 0..m.cache.n_seq_max() as i32 {
        out.extend(m.seq_pos_min(s).expect("min").to_ne_bytes());
        out.extend(m.seq_pos_max(s).expect("max").to_ne_bytes());
    }
    for s in 0..m.cache.n_stream() {
        out.extend(m.cache.head(s).to_ne_bytes());
    }
    out
}

/// Runs `f` on a fresh memory and checks the oracle.
pub fn check(cfg: u8, f: impl FnOnce(&mut KvMemory) -> llama_memory::Result<usize>) {
    let mut m = memory(cfg);
    let before = snapshot(&m);
    match f(&mut m) {
        Err(_) => assert!(snapshot(&m) == before, "a failed read changed the memory"),
        Ok(_) => {
            m.cache
                .check_invariants()
                .expect("invariants after a restore");
            // The restored memory serializes, and reads back to the same state.
            let after = snapshot(&m);
            let n = state::get_size(&m).expect("size");
            let mut again = memory(cfg);
            state::set_data(&mut again, &after[..n]).expect("a state we wrote reads back");
            let mut b = vec![0u8; n];
            state::get_data(&again, &mut b).expect("state");
            assert!(b == after[..n], "whole state did not round-trip");
        }
    }
}

/// Empty stash (the targets restore host blobs).
pub fn no_stash() -> Stash {
    Stash::new()
}

/// Runs the operations encoded in `ops` on `m` (5 bytes each: kind, sequence, two bounds, an
/// argument), as a caller would after restoring an untrusted state: every sequence operation,
/// placement with the graph inputs, updates, sequence round trips and clears. Each may fail;
/// none may panic, and the cells stay consistent after every one.
pub fn run_ops(m: &mut KvMemory, ops: &[u8]) {
    use llama_memory::{MaskOut, MemoryContext};
    let n_seq_max = m.cache.n_seq_max();
    let seq = |b: u8| dest(b, n_seq_max);
    let bound = |b: u8| match b % 6 {
        0 => -1,
        1 => i32::MAX,
        2 => i32::MAX - 3,
        _ => (b as i32) - 40,
    };
    let mut spare: Option<Box<dyn MemoryContext>> = None;
    for op in ops.chunks_exact(5) {
        let (s, p0, p1, arg) = (seq(op[1]), bound(op[2]), bound(op[3]), op[4]);
        match op[0] % 10 {
            0 => drop(m.seq_rm(s, p0, p1)),
            1 => drop(m.seq_cp(s, seq(arg), p0, p1)),
            2 => drop(m.seq_keep(s)),
            3 => drop(m.seq_add(s, p0, p1, arg as i8 as i32)),
            4 => drop(m.seq_div(s, p0, p1, (arg % 5) as i32)),
            5 | 6 => {
                // A ubatch of up to 8 tokens after the sequence's last position (which may sit
                // near i32::MAX after a restore), one or two sequences per token.
                let Ok(last) = m.seq_pos_max(s.max(0)) else {
                    continue;
                };
                let n = (arg % 8 + 1) as usize;
                let n_pos = m.cache.params().n_pos_per_embd as usize;
                let p0 = last.saturating_add(1);
                let mut pos: Vec<i32> = (0..n as i32).map(|k| p0.saturating_add(k)).collect();
                pos.resize(n * n_pos, 0);
                let two = [s.max(0), seq(op[2]).max(0)];
                let seqs: Vec<&[i32]> = (0..n)
                    .map(|k| {
                        if op[0] % 10 == 6 && k % 2 == 1 && two[0] != two[1] {
                            &two[..]
                        } else {
                            &two[..1]
                        }
                    })
                    .collect();
                let toks: Vec<i32> = (0..n as i32).collect();
                let mut b = UbatchBuf::new(&toks, &pos[..n], &seqs);
                b.n_pos = n_pos as u32;
                b.pos = pos;
                let ub = b.view();
                let Ok(mut ctx) = m.init_batch(&[ub], spare.take()) else {
                    continue;
                };
                if ctx.status() == llama_memory::Status::Success && ctx.apply(m).is_ok() {
                    let kv = &m.cache;
                    let n_kv = kv.size();
                    let n_stream = if kv.n_stream() == 1 {
                        1
                    } else {
                        ub.seq_id_unq.len() as u32
                    };
                    let mut mask = vec![0f32; n_kv as usize * n];
                    let causal = arg & 1 == 0;
                    let _ =
                        kv.set_input_kq_mask(&ub, causal, n_kv, n_stream, MaskOut::F32(&mut mask));
                    let mut shift = vec![0i32; (kv.size() * kv.n_stream()) as usize];
                    let _ = kv.set_input_k_shift(&mut shift);
                }
                spare = Some(ctx);
            }
            7 => {
                if let Ok(mut ctx) = m.init_update(false) {
                    let _ = ctx.apply(m);
                }
            }
            8 => {
                // A sequence state round trip into another sequence.
                let Ok(n) = state::seq_get_size(m, s, 0) else {
                    continue;
                };
                let mut blob = vec![0u8; n];
                if state::seq_get_data(m, &mut blob, s, 0, &mut Stash::new()).is_ok() {
                    let _ = state::seq_set_data(m, &blob, seq(arg), 0, &Stash::new());
                }
            }
            _ => m.clear(arg & 1 == 1),
        }
        m.cache
            .check_invariants()
            .unwrap_or_else(|e| panic!("invariants after op {op:?}: {e}"));
    }
}
