//! The stock recurrent memory (`llama_memory_recurrent`) behind the `rsref_*` functions of
//! `shim/rsref.h`, the tiny `mamba`, `lfm2` (also with a sliding window), `jamba`, `gemma3`
//! (iSWA) and `qwen2vl` (M-RoPE) model writers, and the multi-sequence additions to [`RefCtx`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::raw::c_char;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use crate::ctx::CtxPtr;
use crate::{api, c_path, ggml_type, RawUbatch, RefCtx, UbatchRef};

pub(crate) type RsPtr = *mut c_void;

/// Mirror of `rsref_params`.
#[repr(C)]
struct RawRsParams {
    mem_size: u32,
    n_seq_max: u32,
    n_rs_seq: u32,
    type_r: i32,
    type_s: i32,
    filter: *const u8,
    n_filter: u32,
}

/// The resolved `rsref_*` functions (part of the crate's `Api`).
pub(crate) struct RsApi {
    sizeof: unsafe extern "C" fn(i32) -> usize,
    write_mamba: unsafe extern "C" fn(*const c_char, u32, u32) -> bool,
    write_lfm2: unsafe extern "C" fn(*const c_char, u32, u32, *const u32, u32) -> bool,
    write_lfm2_ex: unsafe extern "C" fn(*const c_char, u32, u32, *const u32, u32, u32) -> bool,
    write_jamba: unsafe extern "C" fn(*const c_char, u32, u32, *const u32) -> bool,
    write_gemma3: unsafe extern "C" fn(*const c_char, u32, u32, u32, u32) -> bool,
    write_gemma4: unsafe extern "C" fn(*const c_char, u32) -> bool,
    write_gemma4_assistant: unsafe extern "C" fn(*const c_char) -> bool,
    write_hy_v3: unsafe extern "C" fn(*const c_char) -> bool,
    write_deepseek32: unsafe extern "C" fn(*const c_char) -> bool,
    write_dots3note: unsafe extern "C" fn(*const c_char) -> bool,
    write_minimax_m3: unsafe extern "C" fn(*const c_char) -> bool,
    write_glm5_next: unsafe extern "C" fn(*const c_char) -> bool,
    write_deepseek4: unsafe extern "C" fn(*const c_char) -> bool,
    write_qwen4exp: unsafe extern "C" fn(*const c_char, bool) -> bool,
    write_qwen2vl: unsafe extern "C" fn(*const c_char, u32, u32, *const i32) -> bool,
    new: unsafe extern "C" fn(*const c_char, *const RawRsParams) -> RsPtr,
    free: unsafe extern "C" fn(RsPtr),
    clear: unsafe extern "C" fn(RsPtr, bool),
    seq_rm: unsafe extern "C" fn(RsPtr, i32, i32, i32) -> bool,
    seq_cp: unsafe extern "C" fn(RsPtr, i32, i32, i32, i32),
    seq_keep: unsafe extern "C" fn(RsPtr, i32),
    seq_add: unsafe extern "C" fn(RsPtr, i32, i32, i32, i32),
    seq_div: unsafe extern "C" fn(RsPtr, i32, i32, i32, i32),
    seq_pos_min: unsafe extern "C" fn(RsPtr, i32) -> i32,
    seq_pos_max: unsafe extern "C" fn(RsPtr, i32) -> i32,
    can_shift: unsafe extern "C" fn(RsPtr) -> bool,
    find_slot: unsafe extern "C" fn(RsPtr, *const RawUbatch) -> bool,
    prepare: unsafe extern "C" fn(RsPtr, *const RawUbatch, u32) -> bool,
    cells: unsafe extern "C" fn(RsPtr, *mut i32, *mut i32, *mut i32, *mut i32, *mut u64),
    info: unsafe extern "C" fn(
        RsPtr,
        *mut u32,
        *mut u32,
        *mut u32,
        *mut u32,
        *mut i32,
        *mut u32,
        *mut u32,
    ),
    rs_idx: unsafe extern "C" fn(RsPtr, *mut u32, u32) -> u32,
    ctx_info: unsafe extern "C" fn(RsPtr, bool, *mut u32, *mut u32, *mut i32),
    s_copy: unsafe extern "C" fn(RsPtr, u32) -> i32,
    state_write: unsafe extern "C" fn(RsPtr, i32, u32, *mut u8, usize) -> usize,
    state_read: unsafe extern "C" fn(RsPtr, i32, u32, *const u8, usize, *mut usize) -> bool,
    n_layer: unsafe extern "C" fn(RsPtr) -> u32,
    n_embd_r: unsafe extern "C" fn(RsPtr) -> u32,
    n_embd_s: unsafe extern "C" fn(RsPtr) -> u32,
    has_tensor: unsafe extern "C" fn(RsPtr, i32, i32) -> bool,
    tensor_get: unsafe extern "C" fn(RsPtr, i32, i32, *mut u8, usize) -> usize,
    tensor_set: unsafe extern "C" fn(RsPtr, i32, i32, *const u8, usize) -> bool,
    ctx_decode_batch: unsafe extern "C" fn(
        CtxPtr,
        *const i32,
        *const i32,
        *const i32,
        *const *const i32,
        *const i8,
        u32,
    ) -> i32,
    ctx_logits_ith: unsafe extern "C" fn(CtxPtr, i32, *mut f32) -> bool,
}

impl RsApi {
    pub(crate) fn load(lib: &libloading::os::unix::Library) -> Result<RsApi, libloading::Error> {
        Ok(resolve!(
            lib,
            "rsref_",
            RsApi {
                sizeof,
                write_mamba,
                write_lfm2,
                write_lfm2_ex,
                write_jamba,
                write_gemma3,
                write_gemma4,
                write_gemma4_assistant,
                write_hy_v3,
                write_deepseek32,
                write_dots3note,
                write_minimax_m3,
                write_glm5_next,
                write_deepseek4,
                write_qwen4exp,
                write_qwen2vl,
                new,
                free,
                clear,
                seq_rm,
                seq_cp,
                seq_keep,
                seq_add,
                seq_div,
                seq_pos_min,
                seq_pos_max,
                can_shift,
                find_slot,
                prepare,
                cells,
                info,
                rs_idx,
                ctx_info,
                s_copy,
                state_write,
                state_read,
                n_layer,
                n_embd_r,
                n_embd_s,
                has_tensor,
                tensor_get,
                tensor_set,
                ctx_decode_batch,
                ctx_logits_ith,
            }
        ))
    }

    /// The structs are shared by layout alone: refuse a library built from another rsref.h.
    pub(crate) fn check_sizes(&self) {
        // SAFETY: rsref_sizeof only reads its integer argument.
        let c = unsafe { (self.sizeof)(0) };
        let rust = std::mem::size_of::<RawRsParams>();
        assert_eq!(c, rust, "rsref_params has size {c} in C but {rust} in Rust");
    }
}

fn rs() -> &'static RsApi {
    &api().rs
}

// ---------------------------------------------------------------------------------------------
// model files

/// Writes `name` into the temp directory once per process (under a private name, then renamed
/// over the shared one, as [`crate::model_path`] does) and returns its path.
fn cached_model(name: String, write: impl FnOnce(&Path) -> bool) -> PathBuf {
    static PATHS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    paths
        .entry(name.clone())
        .or_insert_with(|| {
            let dir = std::env::temp_dir();
            let path = dir.join(&name);
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            assert!(
                write(&tmp),
                "cannot write the model {name} to {}",
                tmp.display()
            );
            std::fs::rename(&tmp, &path).unwrap_or_else(|e| {
                panic!("cannot move {} to {}: {e}", tmp.display(), path.display())
            });
            path
        })
        .clone()
}

/// Writes a tiny random-weight `mamba` GGUF to `path`: `n_layer` layers of width `n_embd`,
/// `d_inner = 2 * n_embd` (the only expansion llama.cpp supports), `d_state` 16, `d_conv` 4,
/// `dt_rank` 4, vocabulary 32, F32 weights from a fixed seed (negative `ssm_a`, unit `ssm_d`
/// and norms, so decoding stays finite). Every layer is recurrent: `n_embd_r = 3 * d_inner`,
/// `n_embd_s = 16 * d_inner`. `false` for a zero shape or a failed write.
pub fn write_mamba_model(path: &Path, n_layer: u32, n_embd: u32) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_mamba)(p.as_ptr(), n_layer, n_embd) }
}

/// Path of the tiny `mamba` model of [`write_mamba_model`] with 2 layers and `n_embd` 64
/// (`d_inner` 128, `n_embd_r` 384, `n_embd_s` 2048), written once per process.
pub fn mamba_model_path() -> PathBuf {
    mamba_model_path_ex(2, 64)
}

/// Path of a tiny `mamba` model of the given shape (see [`write_mamba_model`]), written once
/// per process and shape. Panics on an invalid shape.
pub fn mamba_model_path_ex(n_layer: u32, n_embd: u32) -> PathBuf {
    cached_model(format!("kvref-mamba-l{n_layer}-e{n_embd}-v1.gguf"), |p| {
        write_mamba_model(p, n_layer, n_embd)
    })
}

/// KV heads per layer of the default `lfm2` model of [`lfm2_model_path`]: layers 0 and 2 are
/// short-conv (recurrent), layers 1 and 3 attention.
pub const LFM2_HEAD_KV: [u32; 4] = [0, 2, 0, 2];

/// Writes a tiny random-weight `lfm2` GGUF to `path`: one layer per `n_head_kv` entry, width
/// `n_embd` (a multiple of 8), 4 query heads of size `n_embd / 4`, `n_head_kv[il]` KV heads
/// (0 makes the layer a short-conv, i.e. recurrent, layer; otherwise it must divide 4),
/// feed-forward width `2 * n_embd`, `shortconv.l_cache = l_cache` (at least 2), vocabulary 32,
/// F32 weights from a fixed seed. `n_embd_r = n_embd * (l_cache - 1)`, `n_embd_s = 0`.
/// `false` for an invalid shape or a failed write.
pub fn write_lfm2_model(path: &Path, n_embd: u32, n_head_kv: &[u32], l_cache: u32) -> bool {
    let p = c_path(path);
    let n_layer = u32::try_from(n_head_kv.len()).expect("too many layers");
    // SAFETY: `p` is a NUL-terminated path and `n_head_kv` holds `n_layer` entries.
    unsafe { (rs().write_lfm2)(p.as_ptr(), n_layer, n_embd, n_head_kv.as_ptr(), l_cache) }
}

/// Path of the tiny `lfm2` model: `n_embd` 64, layers [`LFM2_HEAD_KV`] (0 and 2 recurrent),
/// `l_cache` 3 (`n_embd_r` 128, `n_embd_s` 0), written once per process.
pub fn lfm2_model_path() -> PathBuf {
    lfm2_model_path_ex(64, &LFM2_HEAD_KV, 3)
}

/// Path of a tiny `lfm2` model of the given shape (see [`write_lfm2_model`]), written once per
/// process and shape. Panics on an invalid shape.
pub fn lfm2_model_path_ex(n_embd: u32, n_head_kv: &[u32], l_cache: u32) -> PathBuf {
    let layers: Vec<String> = n_head_kv.iter().map(u32::to_string).collect();
    cached_model(
        format!(
            "kvref-lfm2-e{n_embd}-kv{}-c{l_cache}-v1.gguf",
            layers.join("_")
        ),
        |p| write_lfm2_model(p, n_embd, n_head_kv, l_cache),
    )
}

/// [`write_lfm2_model`] with a sliding window: `n_swa > 0` writes
/// `lfm2.attention.sliding_window`, which makes every attention layer a (standard) SWA layer and
/// the context memory a `llama_memory_hybrid_iswa` (whose full-attention cache has no layer);
/// `n_swa == 0` writes the file of [`write_lfm2_model`] byte for byte.
pub fn write_lfm2_model_ex(
    path: &Path,
    n_embd: u32,
    n_head_kv: &[u32],
    l_cache: u32,
    n_swa: u32,
) -> bool {
    let p = c_path(path);
    let n_layer = u32::try_from(n_head_kv.len()).expect("too many layers");
    // SAFETY: `p` is a NUL-terminated path and `n_head_kv` holds `n_layer` entries.
    unsafe {
        (rs().write_lfm2_ex)(
            p.as_ptr(),
            n_layer,
            n_embd,
            n_head_kv.as_ptr(),
            l_cache,
            n_swa,
        )
    }
}

/// Sliding window of the default SWA `lfm2` model of [`lfm2_swa_model_path`].
pub const LFM2_SWA: u32 = 16;

/// Path of the tiny `lfm2` model of [`lfm2_model_path`] with a sliding window of [`LFM2_SWA`]
/// tokens on its attention layers (see [`write_lfm2_model_ex`]), written once per process.
pub fn lfm2_swa_model_path() -> PathBuf {
    let layers: Vec<String> = LFM2_HEAD_KV.iter().map(u32::to_string).collect();
    cached_model(
        format!(
            "kvref-lfm2-e64-kv{}-c3-swa{LFM2_SWA}-v1.gguf",
            layers.join("_")
        ),
        |p| write_lfm2_model_ex(p, 64, &LFM2_HEAD_KV, 3, LFM2_SWA),
    )
}

/// KV heads per layer of the default `jamba` model of [`jamba_model_path`]: layers 0 and 2 are
/// mamba (recurrent), layers 1 and 3 attention.
pub const JAMBA_HEAD_KV: [u32; 4] = [0, 2, 0, 2];

/// Writes a tiny random-weight `jamba` GGUF (a hybrid: the context memory is a
/// `llama_memory_hybrid`) to `path`: one layer per `n_head_kv` entry, width `n_embd` (a multiple
/// of 4), 4 query heads, `n_head_kv[il]` KV heads (0 makes the layer a mamba layer; otherwise it
/// must divide 4; attention layers use no RoPE), dense feed-forward of width `2 * n_embd`,
/// vocabulary 32, F32 weights from a fixed seed. Mamba layers as [`write_mamba_model`]'s plus unit
/// dt/B/C norms: `n_embd_r = 6 * n_embd`, `n_embd_s = 32 * n_embd`. `false` for an invalid shape
/// or a failed write.
pub fn write_jamba_model(path: &Path, n_embd: u32, n_head_kv: &[u32]) -> bool {
    let p = c_path(path);
    let n_layer = u32::try_from(n_head_kv.len()).expect("too many layers");
    // SAFETY: `p` is a NUL-terminated path and `n_head_kv` holds `n_layer` entries.
    unsafe { (rs().write_jamba)(p.as_ptr(), n_layer, n_embd, n_head_kv.as_ptr()) }
}

/// Path of the tiny `jamba` model: `n_embd` 64, layers [`JAMBA_HEAD_KV`], written once per
/// process.
pub fn jamba_model_path() -> PathBuf {
    jamba_model_path_ex(64, &JAMBA_HEAD_KV)
}

/// Path of a tiny `jamba` model of the given shape (see [`write_jamba_model`]), written once per
/// process and shape. Panics on an invalid shape.
pub fn jamba_model_path_ex(n_embd: u32, n_head_kv: &[u32]) -> PathBuf {
    let layers: Vec<String> = n_head_kv.iter().map(u32::to_string).collect();
    cached_model(
        format!("kvref-jamba-e{n_embd}-kv{}-v1.gguf", layers.join("_")),
        |p| write_jamba_model(p, n_embd, n_head_kv),
    )
}

/// `(n_layer, n_swa, swa_pattern)` of the default `gemma3` model of [`gemma3_model_path`]:
/// layers 0 and 1 slide over 16 tokens, layer 2 attends to everything.
pub const GEMMA3_SWA: (u32, u32, u32) = (3, 16, 3);

/// Writes a tiny random-weight `gemma3` GGUF to `path`: `n_layer` layers of width `n_embd` (a
/// multiple of 8), 4 query heads, 2 KV heads, feed-forward width `2 * n_embd`, unit Q/K and
/// post-attention/post-FFN norms, vocabulary 32, F32 weights from a fixed seed. `n_swa > 0`: a
/// standard sliding window of `n_swa` tokens on every layer but those with
/// `il % swa_pattern == swa_pattern - 1` (`swa_pattern` 0: on every layer), so the context
/// memory is a `llama_kv_cache_iswa`; `n_swa == 0`: no sliding window (a `llama_kv_cache`).
/// `false` for an invalid shape or a failed write.
pub fn write_gemma3_model(
    path: &Path,
    n_layer: u32,
    n_embd: u32,
    n_swa: u32,
    swa_pattern: u32,
) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_gemma3)(p.as_ptr(), n_layer, n_embd, n_swa, swa_pattern) }
}

/// Writes a tiny random-weight `gemma4` GGUF to `path`: 4 layers of width 64, 4 query heads, 2
/// KV heads, a 16-token sliding window on layers 0 and 2, F32 weights from a fixed seed; its
/// last `n_shared_kv` layers (at most 2) reuse the KV of earlier ones (llama.cpp's
/// `shared_kv_layers`: layer 2 takes layer 0's, layer 3 layer 1's), so the memory is a
/// `llama_kv_cache_iswa` whose caches list reused layers. `false` for more than 2 or a failed
/// write.
pub fn write_gemma4_model(path: &Path, n_shared_kv: u32) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_gemma4)(p.as_ptr(), n_shared_kv) }
}

/// Writes a tiny random-weight `gemma4-assistant` GGUF to `path`: the draft model of
/// [`write_gemma4_model`]'s, 2 query-only layers (a sliding-window one, then a full one) of
/// width 32 that attend over the target context's cells. A context of it takes the target's
/// (`llama_context_params::ctx_other`), and its memory is a `llama_kv_cache_iswa` over the
/// target's (upstream's shared cells). `false` for a failed write.
pub fn write_gemma4_assistant_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_gemma4_assistant)(p.as_ptr()) }
}

/// Writes a tiny random-weight `hy_v3` GGUF with one NextN (MTP) block to `path`: 2 dense
/// decoder blocks of width 64 (4 query heads, 2 KV heads) and the NextN block 2, F32 weights
/// from a fixed seed. An `LLAMA_CONTEXT_TYPE_MTP` context of it (model loaded with `load_mtp`)
/// has a KV cache over layer 2 alone. `false` for a failed write.
pub fn write_hy_v3_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_hy_v3)(p.as_ptr()) }
}

/// Writes a tiny random-weight `deepseek32` GGUF to `path`: 2 dense layers of width 64, MLA
/// attention (4 heads over one 48-wide K head) and a lightning indexer (2 heads of 64, top-k 4),
/// so the memory is a `llama_kv_cache_dsa`. `false` for a failed write.
pub fn write_deepseek32_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_deepseek32)(p.as_ptr()) }
}

/// Writes a tiny random-weight `dots3note` GGUF to `path`: 2 dense MLA layers of width 64,
/// layer 0 full attention with a lightning indexer, layer 1 a 16-token sliding window, so the
/// memory is a `llama_kv_cache_dsa_iswa`. `false` for a failed write.
pub fn write_dots3note_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_dots3note)(p.as_ptr()) }
}

/// Writes a tiny random-weight `minimax-m3` GGUF to `path`: 2 layers of width 64, layer 0
/// dense, layer 1 MoE with the sparse attention's indexer, so the memory is a
/// `llama_kv_cache_msa`. `false` for a failed write.
pub fn write_minimax_m3_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_minimax_m3)(p.as_ptr()) }
}

/// Writes a tiny random-weight `glm5-next` GGUF to `path`: 2 dense layers of width 64 with mHC
/// residuals, a Kimi-delta-attention (recurrent) layer and a nope-MLA layer with a k-pool
/// lightning indexer, so the memory is a `llama_memory_hybrid_idx`. `false` for a failed write.
pub fn write_glm5_next_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_glm5_next)(p.as_ptr()) }
}

/// Writes a tiny random-weight `deepseek4` GGUF to `path`: 3 MoE layers of width 64 with mHC
/// residuals, each with an 8-token raw attention window; layer 0 window only (compress ratio
/// 0), layer 1 CSA (ratio 4, compressed keys picked by a lightning indexer of 2 heads of 64),
/// layer 2 HCA (ratio 128). The memory is a `llama_kv_cache_dsv4`: the raw window cache, the
/// CSA, HCA and indexer key caches and the three compressor states. `false` for a failed
/// write.
pub fn write_deepseek4_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_deepseek4)(p.as_ptr()) }
}

/// Writes a tiny random-weight `qwen4exp` GGUF to `path`: 2 MoE layers of width 64 with
/// low-rank hyper-connections and IMRoPE; layer 0 a gated delta net (recurrent) carrying the
/// PLE n-gram (bigram) per-layer embedding, layer 1 gated full attention with a QSA k-pool
/// indexer (compress ratio 2). The memory is a `llama_memory_hybrid_idx`; its attention cache
/// keeps each cell's token id, which every decode reads back through
/// `llama_kv_cache::get_prev_tokens` for the n-gram hash. Without `ple`, no n-gram embedding
/// (the cells keep no token ids; the indexer cache still keeps the 2-D positions its pooled
/// keys rotate to, and its state has no cell ext). `false` for a failed write.
pub fn write_qwen4exp_model(path: &Path, ple: bool) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (rs().write_qwen4exp)(p.as_ptr(), ple) }
}

/// Path of the tiny `gemma3` model: [`GEMMA3_SWA`], `n_embd` 64, written once per process.
pub fn gemma3_model_path() -> PathBuf {
    let (n_layer, n_swa, swa_pattern) = GEMMA3_SWA;
    gemma3_model_path_ex(n_layer, 64, n_swa, swa_pattern)
}

/// Path of a tiny `gemma3` model of the given shape (see [`write_gemma3_model`]), written once
/// per process and shape. Panics on an invalid shape.
pub fn gemma3_model_path_ex(n_layer: u32, n_embd: u32, n_swa: u32, swa_pattern: u32) -> PathBuf {
    cached_model(
        format!("kvref-gemma3-l{n_layer}-e{n_embd}-swa{n_swa}-p{swa_pattern}-v1.gguf"),
        |p| write_gemma3_model(p, n_layer, n_embd, n_swa, swa_pattern),
    )
}

/// M-RoPE sections of the default `qwen2vl` model of [`qwen2vl_model_path`] (head size 16: the
/// sections cover its 8 rotated pairs).
pub const QWEN2VL_SECTIONS: [i32; 4] = [2, 3, 3, 0];

/// Writes a tiny random-weight `qwen2vl` GGUF (M-RoPE: 4 positions per token; llama.cpp gives
/// a token at position `p` the positions `[p, p, p, 0]`, and its KV cache cannot shift) to
/// `path`: `n_layer` layers of width `n_embd` (a multiple of 8), 4 query heads, 2 KV heads, Q/K/V
/// biases, feed-forward width `2 * n_embd`, `rope.dimension_sections = sections` (non-negative,
/// summing to `n_embd / 8`), vocabulary 32, F32 weights from a fixed seed. `false` for an invalid
/// shape or a failed write.
pub fn write_qwen2vl_model(path: &Path, n_layer: u32, n_embd: u32, sections: &[i32; 4]) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path and `sections` holds 4 entries.
    unsafe { (rs().write_qwen2vl)(p.as_ptr(), n_layer, n_embd, sections.as_ptr()) }
}

/// Path of the tiny `qwen2vl` model: 2 layers, `n_embd` 64, [`QWEN2VL_SECTIONS`], written once
/// per process.
pub fn qwen2vl_model_path() -> PathBuf {
    qwen2vl_model_path_ex(2, 64, &QWEN2VL_SECTIONS)
}

/// Path of a tiny `qwen2vl` model of the given shape (see [`write_qwen2vl_model`]), written
/// once per process and shape. Panics on an invalid shape.
pub fn qwen2vl_model_path_ex(n_layer: u32, n_embd: u32, sections: &[i32; 4]) -> PathBuf {
    let s: Vec<String> = sections.iter().map(i32::to_string).collect();
    cached_model(
        format!(
            "kvref-qwen2vl-l{n_layer}-e{n_embd}-s{}-v1.gguf",
            s.join("_")
        ),
        |p| write_qwen2vl_model(p, n_layer, n_embd, sections),
    )
}

// ---------------------------------------------------------------------------------------------
// RefRs

/// How to configure a stock `llama_memory_recurrent` ([`RefRs::new`]). [`RsParams::default`]:
/// 1 cell, 1 sequence, no rollback snapshots, F32/F32 (the types every stock context uses), no
/// explicit filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsParams {
    /// Cells (stock contexts use `max(1, n_seq_max)`).
    pub mem_size: u32,
    /// Sequences (`rs_idx` length, `seq_rm` limit).
    pub n_seq_max: u32,
    /// Rollback snapshots per sequence: the tensors get `1 + n_rs_seq` planes of `mem_size`
    /// rows. (When no layer passes the filter the stock constructor logs that it disables
    /// snapshots, but it only zeroes its shadowing parameter: the member keeps this value.)
    pub n_rs_seq: u32,
    /// `ggml_type` of the R (conv) states.
    pub type_r: i32,
    /// `ggml_type` of the S (ssm) states.
    pub type_s: i32,
    /// Which layers get state tensors. `None`: every layer for recurrent architectures
    /// (`mamba`: `create_memory` passes no filter), `hparams.is_recr(il)` otherwise (the
    /// `llama_memory_hybrid` default, e.g. `lfm2`). Layers past the end of the vector are skipped.
    pub filter: Option<Vec<bool>>,
}

impl Default for RsParams {
    fn default() -> Self {
        RsParams {
            mem_size: 1,
            n_seq_max: 1,
            n_rs_seq: 0,
            type_r: ggml_type::F32,
            type_s: ggml_type::F32,
            filter: None,
        }
    }
}

impl RsParams {
    /// The parameters of a stock context with `n_seq_max` sequences and `n_rs_seq` snapshots:
    /// `mem_size = max(1, n_seq_max)`, F32/F32, default filter.
    pub fn for_seqs(n_seq_max: u32, n_rs_seq: u32) -> RsParams {
        RsParams {
            mem_size: n_seq_max.max(1),
            n_seq_max,
            n_rs_seq,
            ..RsParams::default()
        }
    }
}

/// One cell of the stock recurrent memory (`mem_cell`). Note the dual use of `tail`:
/// `cells[s].tail` is the cell holding sequence `s`'s state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsCell {
    /// Position of the last token of the state, -1 when empty.
    pub pos: i32,
    /// Row the state is copied from at the next graph (-1: none / zero state).
    pub src: i32,
    /// Like `src`, staged by `find_slot` for the graph inputs.
    pub src0: i32,
    /// Cell holding the state of the sequence whose id is this cell's index, -1 if none.
    pub tail: i32,
    /// Sequences of the cell, ascending (only ids in `0..256` are representable).
    pub seqs: Vec<i32>,
}

/// `get_n_rs` / `get_head` / `get_rs_z` of a stock `llama_memory_recurrent_context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsCtxInfo {
    /// `get_n_rs()`: `n` in batch mode, `size` for a full context.
    pub n_rs: u32,
    /// `get_head()`: `head` in batch mode, 0 for a full context.
    pub head: u32,
    /// `get_rs_z()`: `rs_z` in batch mode, 0 for a full context.
    pub rs_z: i32,
}

/// A standalone stock `llama_memory_recurrent` over a model file (loaded once per path per
/// process, shared with [`crate::RefKv`] and [`RefCtx`]). Freed on drop.
///
/// Stock assertions still abort the process except where the shim guards them (see
/// `shim/rsref.h`): in particular [`RefRs::find_slot`] needs an empty cell for every sequence
/// set whose sequence owns no cell, which holds when `mem_size >= n_seq_max`.
///
/// A `RefRs` can also be a borrowed view of the recurrent part of a stock hybrid memory (see
/// [`crate::RefComposite::part_rs`]): then it never frees the shim object, which its composite
/// owns, and it is only handed out behind a guard that borrows the composite.
#[derive(Debug)]
pub struct RefRs {
    ptr: RsPtr,
    params: RsParams,
    /// Whether `ptr` came from `rsref_new` (freed on drop) rather than a composite's view.
    owned: bool,
}

// SAFETY: the memory is a plain heap object (CPU buffers) with no thread affinity; &mut self
// methods are the only mutators and &self methods only read it.
unsafe impl Send for RefRs {}

impl Drop for RefRs {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: `ptr` came from rsref_new and is freed exactly once.
            unsafe { (rs().free)(self.ptr) }
        }
    }
}

/// Which state tensor of a layer (`r_l`, `s_l`, `p_l`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    R = 0,
    S = 1,
    P = 2,
}

impl RefRs {
    /// Creates a stock recurrent memory over the model at `model`. `None` if the model cannot
    /// be loaded or the constructor throws.
    pub fn new(model: &Path, params: &RsParams) -> Option<RefRs> {
        let p = c_path(model);
        let filter: Option<Vec<u8>> = params
            .filter
            .as_ref()
            .map(|f| f.iter().map(|&b| u8::from(b)).collect());
        let raw = RawRsParams {
            mem_size: params.mem_size,
            n_seq_max: params.n_seq_max,
            n_rs_seq: params.n_rs_seq,
            type_r: params.type_r,
            type_s: params.type_s,
            filter: filter.as_ref().map_or(ptr::null(), |f| f.as_ptr()),
            n_filter: filter
                .as_ref()
                .map_or(0, |f| u32::try_from(f.len()).expect("filter too long")),
        };
        // SAFETY: both pointers (and the filter array) are valid for the call; the shim
        // copies what it keeps.
        let ptr = unsafe { (rs().new)(p.as_ptr(), &raw) };
        (!ptr.is_null()).then(|| RefRs {
            ptr,
            params: params.clone(),
            owned: true,
        })
    }

    /// A non-owning `RefRs` over a view that a composite owns (`cmpref_rs_part`); its
    /// [`RefRs::params`] are read from the memory (`size`, `n_seq_max`, `n_rs_seq`; F32 states,
    /// no filter: the hybrid default).
    ///
    /// # Safety
    ///
    /// `ptr` must be a live rsref view that outlives the returned value, and the value must not
    /// be handed out in a way that lets it escape that lifetime (the composite wrappers keep it
    /// behind guards that borrow the composite and never give out `&mut RefRs`).
    pub(crate) unsafe fn borrowed(ptr: RsPtr) -> RefRs {
        let mut r = RefRs {
            ptr,
            params: RsParams::default(),
            owned: false,
        };
        r.params = RsParams {
            mem_size: r.size(),
            n_seq_max: r.n_seq_max(),
            n_rs_seq: r.n_rs_seq(),
            ..RsParams::default()
        };
        r
    }

    /// The parameters the memory was created with.
    pub fn params(&self) -> &RsParams {
        &self.params
    }

    forward! {
        rs();

        /// `clear(data)`.
        fn clear(&mut self, data: bool);

        /// `seq_rm(seq, p0, p1)`.
        fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool;

        /// `seq_cp(src, dst, p0, p1)` (the range is ignored by the stock code).
        fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32);

        /// `seq_keep(seq)`.
        fn seq_keep(&mut self, seq: i32);

        /// `seq_add(seq, p0, p1, delta)`.
        fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32);

        /// `seq_div(seq, p0, p1, d)`.
        fn seq_div(&mut self, seq: i32, p0: i32, p1: i32, d: i32);

        /// `seq_pos_min(seq)`, -1 if the sequence is in no cell.
        fn seq_pos_min(&self, seq: i32) -> i32;

        /// `seq_pos_max(seq)`, -1 if the sequence is in no cell.
        fn seq_pos_max(&self, seq: i32) -> i32;

        /// `get_can_shift()` (always true for the recurrent memory).
        fn can_shift(&self) -> bool;
    }

    /// The mutating stock `find_slot(ubatch)`. The ubatch's `equal_seqs` flag is passed as
    /// `b_equal_seqs`; without it this returns `false` without calling the stock code (which
    /// asserts it). Build ubatches with [`crate::Ubatch::equal`] or set `equal_seqs`.
    pub fn find_slot(&mut self, ub: &UbatchRef<'_>) -> bool {
        // SAFETY: `ub.raw` points into live arrays of the borrowed Ubatch.
        unsafe { (rs().find_slot)(self.ptr, ub.raw()) }
    }

    /// `prepare(ubatches)`: whether every ubatch fits in turn; cells, `used` and `head` are
    /// restored afterwards, `rs_z` and `n` keep the last `find_slot`'s values (as in stock).
    /// Same `equal_seqs` guard as [`RefRs::find_slot`].
    pub fn prepare(&mut self, ubs: &[UbatchRef<'_>]) -> bool {
        let raws: Vec<RawUbatch> = ubs.iter().map(|u| *u.raw()).collect();
        let n = u32::try_from(raws.len()).expect("too many ubatches");
        // SAFETY: `raws` copies views whose arrays are borrowed for the call.
        unsafe { (rs().prepare)(self.ptr, raws.as_ptr(), n) }
    }

    /// The cell table (`size()` cells).
    pub fn cells(&self) -> Vec<RsCell> {
        let n = self.size() as usize;
        let (mut pos, mut src, mut src0, mut tail) =
            (vec![0i32; n], vec![0i32; n], vec![0i32; n], vec![0i32; n]);
        let mut seq = vec![[0u64; 4]; n];
        // SAFETY: every array holds `size` cells of the layout the shim writes.
        unsafe {
            (rs().cells)(
                self.ptr,
                pos.as_mut_ptr(),
                src.as_mut_ptr(),
                src0.as_mut_ptr(),
                tail.as_mut_ptr(),
                seq.as_mut_ptr().cast(),
            )
        };
        (0..n)
            .map(|i| RsCell {
                pos: pos[i],
                src: src[i],
                src0: src0[i],
                tail: tail[i],
                seqs: (0..256i32)
                    .filter(|&s| seq[i][s as usize / 64] >> (s % 64) & 1 == 1)
                    .collect(),
            })
            .collect()
    }

    fn info(&self) -> (u32, u32, u32, u32, i32, u32, u32) {
        let (mut head, mut used, mut size, mut n, mut rs_z, mut n_rs_seq, mut n_seq_max) =
            (0, 0, 0, 0, 0, 0, 0);
        // SAFETY: every pointer is a valid, writable local.
        unsafe {
            (rs().info)(
                self.ptr,
                &mut head,
                &mut used,
                &mut size,
                &mut n,
                &mut rs_z,
                &mut n_rs_seq,
                &mut n_seq_max,
            )
        };
        (head, used, size, n, rs_z, n_rs_seq, n_seq_max)
    }

    /// `head`: where the last slot starts (and the next search begins).
    pub fn head(&self) -> u32 {
        self.info().0
    }

    /// `used`: non-empty cells.
    pub fn used(&self) -> u32 {
        self.info().1
    }

    /// `size`: cells.
    pub fn size(&self) -> u32 {
        self.info().2
    }

    /// `n`: cells of the last slot (`max - min + 1` of `find_slot`).
    pub fn n(&self) -> u32 {
        self.info().3
    }

    /// `rs_z`: the row zeroed for new states in the last slot, -1 for none.
    pub fn rs_z(&self) -> i32 {
        self.info().4
    }

    /// `n_rs_seq`, as given (even for a memory without layers, see [`RsParams::n_rs_seq`]).
    pub fn n_rs_seq(&self) -> u32 {
        self.info().5
    }

    /// `n_seq_max`.
    pub fn n_seq_max(&self) -> u32 {
        self.info().6
    }

    /// `rs_idx`: the pending rollback plane of each sequence (0 = none).
    pub fn rs_idx(&self) -> Vec<u32> {
        let n = self.n_seq_max();
        let mut out = vec![0u32; n as usize];
        // SAFETY: `out` holds `n` writable elements, the capacity passed.
        let got = unsafe { (rs().rs_idx)(self.ptr, out.as_mut_ptr(), n) };
        assert_eq!(got, n);
        out
    }

    /// `get_n_rs` / `get_head` / `get_rs_z` of a stock context over the current state: a full
    /// context (`init_full`) when `full`, else a batch-mode one.
    pub fn ctx_info(&self, full: bool) -> RsCtxInfo {
        let mut i = RsCtxInfo {
            n_rs: 0,
            head: 0,
            rs_z: 0,
        };
        // SAFETY: every pointer is a valid, writable field of `i`.
        unsafe { (rs().ctx_info)(self.ptr, full, &mut i.n_rs, &mut i.head, &mut i.rs_z) };
        i
    }

    /// `get_n_rs()` of a full (`full`) or batch-mode context.
    pub fn get_n_rs(&self, full: bool) -> u32 {
        self.ctx_info(full).n_rs
    }

    /// `get_head()` of a full (`full`) or batch-mode context.
    pub fn get_head(&self, full: bool) -> u32 {
        self.ctx_info(full).head
    }

    /// `get_rs_z()` of a full (`full`) or batch-mode context.
    pub fn get_rs_z(&self, full: bool) -> i32 {
        self.ctx_info(full).rs_z
    }

    /// `s_copy(i)` of a batch-mode context: the row the graph gathers the state of cell
    /// `head + i` from (`rs_idx[q] * size + src0`, with `q` the cell's smallest sequence, when
    /// `n_rs_seq > 0`). Side effect as in stock: it resets `rs_idx[q]` to 0. Panics if
    /// `head + i >= size` (the stock code would read out of bounds).
    pub fn s_copy(&mut self, i: u32) -> i32 {
        // SAFETY: `self.ptr` is the live rsref this value owns; the shim bounds-checks `i`.
        let v = unsafe { (rs().s_copy)(self.ptr, i) };
        assert!(v != i32::MIN, "s_copy({i}) reads past the last cell");
        v
    }

    /// The whole `s_copy` input as `set_input` writes it: `s_copy(i)` for `i` in `0..n()`, in
    /// order (with the same side effects).
    pub fn s_copy_all(&mut self) -> Vec<i32> {
        (0..self.get_n_rs(false)).map(|i| self.s_copy(i)).collect()
    }

    /// Size of `state_write(seq, flags)`, 0 where the stock code would abort (see
    /// [`RefRs::state_write`]).
    pub fn state_size(&self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (rs().state_write)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// `state_write(seq, flags)` (`seq = -1`: every non-empty cell). Empty where the stock code
    /// would abort (`ON_DEVICE` with several cell ranges; with rollback, a selected cell holding a
    /// sequence `>= n_seq_max`, or a whole write of a shared cell whose sequences have
    /// different `rs_idx`). A stock write is never empty (at least `cell_count` and the data
    /// header).
    pub fn state_write(&self, seq: i32, flags: u32) -> Vec<u8> {
        let size = self.state_size(seq, flags);
        if size == 0 {
            return Vec::new();
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for its length, which the shim respects.
        let n = unsafe { (rs().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, size, "state size changed between the two calls");
        buf
    }

    /// `state_read(seq, flags)` from `buf`: whether it succeeded (false when the stock code
    /// threw, after its own cleanup, or where it would abort).
    pub fn state_read(&mut self, seq: i32, flags: u32, buf: &[u8]) -> bool {
        self.state_read_n(seq, flags, buf).0
    }

    /// [`RefRs::state_read`] and the bytes the stock code consumed (also on failure; 0 when
    /// the shim refused the input because the stock code would abort: a single-sequence state
    /// of 2 or more cells with parsable metadata, or `seq` in `n_seq_max..size` with rollback).
    pub fn state_read_n(&mut self, seq: i32, flags: u32, buf: &[u8]) -> (bool, usize) {
        let mut consumed = 0usize;
        // SAFETY: `buf` is readable for its length, which the shim respects; `consumed` is a
        // valid, writable usize.
        let ok = unsafe {
            (rs().state_read)(self.ptr, seq, flags, buf.as_ptr(), buf.len(), &mut consumed)
        };
        (ok, consumed)
    }

    forward! {
        rs();

        /// `hparams.n_layer()`: all model layers, recurrent or not.
        fn n_layer(&self) -> u32;

        /// `hparams.n_embd_r()`: elements of an R (conv state) row.
        fn n_embd_r(&self) -> u32;

        /// `hparams.n_embd_s()`: elements of an S (ssm state) row (0 for `lfm2`).
        fn n_embd_s(&self) -> u32;
    }

    fn has(&self, w: Which, il: u32) -> bool {
        let il = i32::try_from(il).expect("layer index");
        // SAFETY: `self.ptr` is the live rsref this value owns; the shim bounds-checks `il`.
        unsafe { (rs().has_tensor)(self.ptr, w as i32, il) }
    }

    fn get(&self, w: Which, il: u32) -> Vec<u8> {
        let il = i32::try_from(il).expect("layer index");
        // SAFETY: a null buffer asks for the size only.
        let n = unsafe { (rs().tensor_get)(self.ptr, w as i32, il, ptr::null_mut(), 0) };
        let mut out = vec![0u8; n];
        // SAFETY: `out` is writable for its length, which the shim respects.
        let got = unsafe { (rs().tensor_get)(self.ptr, w as i32, il, out.as_mut_ptr(), n) };
        assert_eq!(got, n);
        out
    }

    fn set(&mut self, w: Which, il: u32, data: &[u8]) {
        let il = i32::try_from(il).expect("layer index");
        // SAFETY: `data` is readable for its length, which the shim checks against the tensor.
        let ok = unsafe { (rs().tensor_set)(self.ptr, w as i32, il, data.as_ptr(), data.len()) };
        assert!(ok, "layer {il} has no {w:?} tensor of {} bytes", data.len());
    }

    /// Whether layer `il` has an R tensor (`r_l[il]`; same layers as S).
    pub fn has_r(&self, il: u32) -> bool {
        self.has(Which::R, il)
    }

    /// Whether layer `il` has an S tensor (`s_l[il]`, possibly of 0 bytes for `lfm2`).
    pub fn has_s(&self, il: u32) -> bool {
        self.has(Which::S, il)
    }

    /// Whether layer `il` has a PLE conv tensor (`p_l[il]`; none for `mamba` / `lfm2`).
    pub fn has_p(&self, il: u32) -> bool {
        self.has(Which::P, il)
    }

    /// All bytes of `r_l[il]`: `size * (1 + n_rs_seq)` rows of `n_embd_r` elements, row
    /// `plane * size + cell`. Empty if the layer has none.
    pub fn r_bytes(&self, il: u32) -> Vec<u8> {
        self.get(Which::R, il)
    }

    /// All bytes of `s_l[il]` (layout as [`RefRs::r_bytes`], rows of `n_embd_s`).
    pub fn s_bytes(&self, il: u32) -> Vec<u8> {
        self.get(Which::S, il)
    }

    /// All bytes of `p_l[il]`.
    pub fn p_bytes(&self, il: u32) -> Vec<u8> {
        self.get(Which::P, il)
    }

    /// Overwrites `r_l[il]`; panics unless the layer has one of exactly `data.len()` bytes.
    pub fn set_r_bytes(&mut self, il: u32, data: &[u8]) {
        self.set(Which::R, il, data)
    }

    /// Overwrites `s_l[il]`; panics unless the layer has one of exactly `data.len()` bytes.
    pub fn set_s_bytes(&mut self, il: u32, data: &[u8]) {
        self.set(Which::S, il, data)
    }

    /// Overwrites `p_l[il]`; panics unless the layer has one of exactly `data.len()` bytes.
    pub fn set_p_bytes(&mut self, il: u32, data: &[u8]) {
        self.set(Which::P, il, data)
    }
}

// ---------------------------------------------------------------------------------------------
// RefCtx: multi-sequence batches

impl RefCtx {
    /// `llama_decode` of a general batch: token `i` is `tokens[i]` at `pos[i]` for the
    /// sequences `seq_ids[i]`, with logits for the tokens whose `output` entry is set (`None`:
    /// the last token only). Returns `llama_decode`'s result (0 success, 1 no memory slot,
    /// negative on error, -1 also for a caught exception).
    pub fn decode_batch(
        &mut self,
        tokens: &[i32],
        pos: &[i32],
        seq_ids: &[Vec<i32>],
        output: Option<&[bool]>,
    ) -> i32 {
        let n = tokens.len();
        assert!(
            pos.len() == n && seq_ids.len() == n && output.is_none_or(|o| o.len() == n),
            "one position, sequence set and output flag per token"
        );
        let n_seq_id: Vec<i32> = seq_ids.iter().map(|s| s.len() as i32).collect();
        let seq_ptrs: Vec<*const i32> = seq_ids.iter().map(|s| s.as_ptr()).collect();
        let logits: Option<Vec<i8>> = output.map(|o| o.iter().map(|&b| i8::from(b)).collect());
        let n = u32::try_from(n).expect("too many tokens");
        // SAFETY: `self.ptr` is the live kvref_ctx this value owns; every array holds `n` entries
        // and each `seq_ptrs[i]` points to `n_seq_id[i]` ids, all alive for the call.
        unsafe {
            (rs().ctx_decode_batch)(
                self.ptr,
                tokens.as_ptr(),
                pos.as_ptr(),
                n_seq_id.as_ptr(),
                seq_ptrs.as_ptr(),
                logits.as_ref().map_or(ptr::null(), |l| l.as_ptr()),
                n,
            )
        }
    }

    /// `llama_get_logits_ith(ctx, i)` after a successful decode (`i = -1`: the last output);
    /// `None` if there are none or `i` is not an output of the last batch.
    pub fn logits_ith(&mut self, i: i32) -> Option<Vec<f32>> {
        let mut out = vec![0f32; self.n_vocab() as usize];
        // SAFETY: `self.ptr` is the live kvref_ctx this value owns; `out` holds n_vocab floats,
        // what the shim copies.
        let ok = unsafe { (rs().ctx_logits_ith)(self.ptr, i, out.as_mut_ptr()) };
        ok.then_some(out)
    }

    /// [`RefCtx::new`] over the tiny `mamba` model of [`mamba_model_path`].
    pub fn mamba(params: &crate::CtxParams) -> RefCtx {
        RefCtx::new(&mamba_model_path(), params)
            .expect("the stock mamba context could not be created")
    }

    /// [`RefCtx::new`] over the tiny `lfm2` model of [`lfm2_model_path`].
    pub fn lfm2(params: &crate::CtxParams) -> RefCtx {
        RefCtx::new(&lfm2_model_path(), params)
            .expect("the stock lfm2 context could not be created")
    }
}
