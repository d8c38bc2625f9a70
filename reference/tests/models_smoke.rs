//! The tiny `jamba`, `gemma3` (iSWA), `qwen2vl` (M-RoPE) and SWA `lfm2` model writers: the pinned
//! llama.cpp loads what they write and decodes it to finite logits. These tests check the shim's
//! writers, not llama-memory.

use std::path::PathBuf;

use llama_memory_reference::{
    gemma3_model_path, jamba_model_path, lfm2_model_path, lfm2_swa_model_path, qwen2vl_model_path,
    sanity_decode, write_gemma3_model, write_jamba_model, write_lfm2_model, write_lfm2_model_ex,
    write_qwen2vl_model, RefRs, RsParams, JAMBA_HEAD_KV, LFM2_HEAD_KV,
};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvref-models-smoke-{}-{name}", std::process::id()))
}

#[test]
fn models_load_and_decode() {
    // 40 tokens: longer than the 16-token windows of gemma3 and the SWA lfm2
    for model in [
        jamba_model_path(),
        gemma3_model_path(),
        qwen2vl_model_path(),
        lfm2_swa_model_path(),
    ] {
        assert_eq!(sanity_decode(&model, 40), 0, "{}", model.display());
    }
}

#[test]
fn lfm2_without_a_window_is_the_lfm2_file() {
    let (a, b) = (tmp("lfm2-a.gguf"), tmp("lfm2-b.gguf"));
    assert!(write_lfm2_model(&a, 64, &LFM2_HEAD_KV, 3));
    assert!(write_lfm2_model_ex(&b, 64, &LFM2_HEAD_KV, 3, 0));
    let same = std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap();
    let with_swa = std::fs::read(lfm2_swa_model_path()).unwrap();
    let plain = std::fs::read(lfm2_model_path()).unwrap();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    assert!(same);
    assert_ne!(with_swa, plain);
}

#[test]
fn jamba_recurrent_layers() {
    let rs = RefRs::new(&jamba_model_path(), &RsParams::for_seqs(2, 0)).expect("jamba memory");
    assert_eq!(rs.n_layer(), 4);
    // mamba: n_embd_r = (d_conv - 1) * d_inner, n_embd_s = d_state * d_inner, d_inner = 128
    assert_eq!((rs.n_embd_r(), rs.n_embd_s()), (3 * 128, 16 * 128));
    // the hybrid default filter: is_recr(il) = n_head_kv(il) == 0
    let with_r: Vec<bool> = (0..4).map(|il| rs.has_r(il)).collect();
    let expected: Vec<bool> = JAMBA_HEAD_KV.iter().map(|&h| h == 0).collect();
    assert_eq!(with_r, expected);
}

#[test]
fn invalid_shapes_are_refused() {
    let p = tmp("invalid.gguf");
    assert!(!write_jamba_model(&p, 64, &[0, 3]));
    assert!(!write_jamba_model(&p, 64, &[]));
    assert!(!write_gemma3_model(&p, 2, 60, 16, 2));
    assert!(!write_gemma3_model(&p, 0, 64, 16, 2));
    // sections must cover head_dim / 2 = 8 pairs
    assert!(!write_qwen2vl_model(&p, 2, 64, &[2, 3, 2, 0]));
    assert!(!write_qwen2vl_model(&p, 2, 64, &[-1, 3, 6, 0]));
    assert!(!write_lfm2_model_ex(&p, 64, &[0, 3], 3, 16));
    assert!(!p.exists());
}
