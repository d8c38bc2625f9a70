//! The tiny generated llama's KV cache on both sides: ours shaped like stock's (2 layers, 2 KV
//! heads of 16, f16, 256 cells), the same tokens placed in both, random K/V bytes, and the
//! state bytes of ours. Included with `#[path = "common/tiny_kv.rs"] mod tiny_kv;`.

#![allow(dead_code)]

use ggml_sys as g;
use half::f16;
use llama_memory::io::{Sink, StateOut};
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, UbatchBuf};
use llama_memory_reference::{RefKv, Ubatch};
use rand::{Rng, SeedableRng};

/// Cells per stream.
pub const SIZE: u32 = 256;
/// K and V row width: 2 KV heads of 16.
pub const GQA: u32 = 32;
/// Head size.
pub const HEAD: u32 = 16;

/// Our cache with the stock tiny model's layers: 2 sequences, one stream (`unified`) or two.
pub fn ours(unified: bool, v_trans: bool) -> KvMemory {
    let p = KvParams {
        size: SIZE,
        n_seq_max: 2,
        unified,
        v_trans,
        n_embd_v_gqa_max: GQA,
        ..KvParams::default()
    };
    let st = KvStorage::new(StorageSpec {
        type_k: g::GGML_TYPE_F16,
        type_v: g::GGML_TYPE_F16,
        v_trans,
        is_mla: false,
        size: SIZE,
        n_stream: if unified { 1 } else { 2 },
        n_rot_k: 0,
        n_rot_v: 0,
        layers: LayerSpec::uniform(2, GQA, GQA),
    })
    .unwrap();
    KvMemory::new(KvCache::new(p).unwrap(), Some(st)).unwrap()
}

/// Our `state_write(seq)` (-1: the whole cache).
pub fn state_bytes(m: &KvMemory, seq: i32) -> Vec<u8> {
    let mut sink = Sink::Count(0);
    let mut out = StateOut {
        sink: &mut sink,
        stash: None,
    };
    m.state_write(seq, &mut out).unwrap();
    let mut buf = vec![0u8; sink.len()];
    let mut sink = Sink::new(&mut buf);
    let mut out = StateOut {
        sink: &mut sink,
        stash: None,
    };
    m.state_write(seq, &mut out).unwrap();
    buf
}

/// `n` tokens of `seq` from position `p0`, placed by each side's own slot search.
pub fn place(m: &mut KvMemory, r: &mut RefKv, seq: i32, p0: i32, n: u32) {
    let ub = Ubatch::for_seq(seq, p0, n);
    let slot = r.find_slot(&ub.view(), false).unwrap();
    r.apply_ubatch(&slot, &ub.view());
    let pos: Vec<i32> = (p0..p0 + n as i32).collect();
    let toks: Vec<i32> = pos.iter().map(|p| p.rem_euclid(32)).collect();
    let seqs: Vec<&[i32]> = vec![std::slice::from_ref(&seq); n as usize];
    let b = UbatchBuf::new(&toks, &pos, &seqs);
    let s = m.cache.find_slot(&b.view(), false).unwrap();
    m.cache.apply_ubatch(&s, &b.view());
}

/// Random f16 values in every K/V byte of our tensors; with `stock`, the same bytes there.
pub fn randomize(m: &mut KvMemory, seed: u64, mut stock: Option<&mut RefKv>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let st = m.storage.as_mut().unwrap();
    for (il, l) in st.layers().to_vec().into_iter().enumerate() {
        for (v, t) in [(false, l.k), (true, l.v)] {
            // SAFETY: our own live tensor.
            let n = unsafe { g::ggml_nbytes(t) } / 2;
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| f16::from_f32(rng.gen_range(-2.0f32..2.0)).to_le_bytes())
                .collect();
            st.set(t, 0, &bytes).unwrap();
            if let Some(r) = stock.as_deref_mut() {
                assert!(r.set_tensor_bytes(v, il as i32, &bytes));
            }
        }
    }
}
