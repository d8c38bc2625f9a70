//! Our recurrent memory shaped like stock's on a generated model. Included with
//! `#[path = "common/rs_like.rs"] mod rs_like;`.

use llama_memory::recurrent::{RecurrentMemory, RsCache, RsParams};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory_reference as stock;

/// A recurrent memory shaped like the stock one of `model` with `n_seq` sequences: the
/// layers, widths and row count read from a stock `llama_memory_recurrent` on the same file.
pub fn ours_like(model: &std::path::Path, n_seq: u32, n_rs_seq: u32) -> RecurrentMemory {
    let r = stock::RefRs::new(model, &stock::RsParams::for_seqs(n_seq, n_rs_seq)).unwrap();
    let layers: Vec<RsLayerSpec> = (0..r.n_layer())
        .filter(|&il| r.has_r(il))
        .map(|il| RsLayerSpec {
            il,
            n_embd_r: r.n_embd_r(),
            n_embd_s: r.n_embd_s(),
            n_embd_p: 0,
            buft: llama_memory::storage::Buft::CPU,
        })
        .collect();
    let p = RsParams {
        size: r.size(),
        n_seq_max: n_seq,
        n_rs_seq,
    };
    let st = RsStorage::new(RsStorageSpec {
        type_r: ggml_sys::GGML_TYPE_F32,
        type_s: ggml_sys::GGML_TYPE_F32,
        size: r.size(),
        n_rs_seq,
        layers,
    })
    .unwrap();
    RecurrentMemory::new(RsCache::new(p, true).unwrap(), Some(st), r.n_layer()).unwrap()
}
