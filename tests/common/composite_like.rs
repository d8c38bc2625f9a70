//! Our memories mirrored from a stock composite's parts (the reference shim's views): the
//! same parameters, layers and sizes, for `tests/composite_differential.rs` and
//! `benches/composite.rs`. Included with `#[path = ".../common/composite_like.rs"] mod composite_like;`.

#![allow(dead_code)]

use ggml_sys as g;
use llama_memory::recurrent::{RecurrentMemory, RsCache, RsParams};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::storage::{Buft, KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, SwaType};
use llama_memory_reference as stock;

/// Our copy of a stock KV part: the same parameters and layers.
pub fn kv_like(t: &stock::RefKv) -> KvMemory {
    let p = t.params();
    let n_stream = t.n_stream();
    let size = t.size();
    let swa_type = SwaType::from_raw(p.swa_type).unwrap();
    let cache = KvCache::new(KvParams {
        size,
        n_seq_max: p.n_seq_max,
        unified: p.unified,
        n_swa: if swa_type == SwaType::None {
            0
        } else {
            p.n_swa
        },
        swa_type,
        v_trans: p.v_trans,
        n_embd_v_gqa_max: t.n_embd_v_gqa_max(),
        ..KvParams::default()
    })
    .unwrap();
    let mut layers = Vec::new();
    for il in 0..64 {
        let Some(k) = t.tensor_bytes(false, il) else {
            continue;
        };
        let row = |n: usize| (n / (size as usize * n_stream as usize * 2)) as u32;
        let v = t.tensor_bytes(true, il).map_or(0, |v| row(v.len()));
        layers.push(LayerSpec {
            il: il as u32,
            n_embd_k_gqa: row(k.len()),
            n_embd_v_gqa: v,
            reuse: None,
            buft: Buft::CPU,
        });
    }
    if std::env::var_os("DIFF_TRACE").is_some() {
        eprintln!("kv part: {p:?} size {size} streams {n_stream} layers {layers:?}");
    }
    if layers.is_empty() {
        // a half without layers (lfm2's base cache) tracks cells only: its states have no
        // layer, as ours without storage
        return KvMemory::new(cache, None).unwrap();
    }
    let st = KvStorage::new(StorageSpec {
        type_k: p.type_k as u32,
        type_v: p.type_v as u32,
        v_trans: p.v_trans,
        is_mla: false,
        size,
        n_stream,
        n_rot_k: 0,
        n_rot_v: 0,
        layers,
    })
    .unwrap();
    KvMemory::new(cache, Some(st)).unwrap()
}

/// Our copy of the stock recurrent part.
pub fn rs_like(t: &stock::RefRs) -> RecurrentMemory {
    let layers: Vec<RsLayerSpec> = (0..t.n_layer())
        .filter(|&il| t.has_r(il))
        .map(|il| RsLayerSpec {
            il,
            n_embd_r: t.n_embd_r(),
            n_embd_s: t.n_embd_s(),
            n_embd_p: 0,
            buft: Buft::CPU,
        })
        .collect();
    let p = RsParams {
        size: t.size(),
        n_seq_max: t.n_seq_max(),
        n_rs_seq: t.n_rs_seq(),
    };
    let cache = RsCache::new(p, !layers.is_empty()).unwrap();
    let st = (!layers.is_empty()).then(|| {
        RsStorage::new(RsStorageSpec {
            type_r: g::GGML_TYPE_F32,
            type_s: g::GGML_TYPE_F32,
            size: t.size(),
            n_rs_seq: t.n_rs_seq(),
            layers,
        })
        .unwrap()
    });
    RecurrentMemory::new(cache, st, t.n_layer()).unwrap()
}
