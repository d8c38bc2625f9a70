//! Graph nodes over a memory's K/V tensors, built in the caller's `ggml_context`: views,
//! row writes and the K-shift. NULL (and the last error) on bad arguments.

use ggml_sys as g;

use crate::error::{err, Result};
use crate::ffi::handle::llama_memory_t;
use crate::kv::KvMemory;
use crate::memory::find_for_layer;
use crate::storage::graph::RopeParams;
use crate::storage::KvStorage;

/// RoPE parameters of one layer for the K-shift (`build_rope_shift`): what llama.cpp takes
/// from the model and the context parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(non_camel_case_types)]
pub struct llama_memory_rope_params {
    /// Rotated dimensions (`n_rot(il)`).
    pub n_rot: i32,
    /// Values of each head before the rotated ones: `n_embd_head_k - n_rot` for MLA caches
    /// (llama.cpp: `n_lora_kv > 0`), else 0.
    pub n_embd_nope: u32,
    /// ggml rope mode (NEOX for M-RoPE models, as llama.cpp).
    pub mode: i32,
    /// `n_ctx_orig_yarn`.
    pub n_ctx_orig: i32,
    /// Per-layer frequency base.
    pub freq_base: f32,
    /// Per-layer frequency scale.
    pub freq_scale: f32,
    /// `yarn_ext_factor`.
    pub ext_factor: f32,
    /// `yarn_attn_factor`.
    pub attn_factor: f32,
    /// `yarn_beta_fast`.
    pub beta_fast: f32,
    /// `yarn_beta_slow`.
    pub beta_slow: f32,
}

impl From<llama_memory_rope_params> for RopeParams {
    fn from(p: llama_memory_rope_params) -> RopeParams {
        RopeParams {
            n_rot: p.n_rot,
            n_embd_nope: p.n_embd_nope,
            mode: p.mode,
            n_ctx_orig: p.n_ctx_orig,
            freq_base: p.freq_base,
            freq_scale: p.freq_scale,
            ext_factor: p.ext_factor,
            attn_factor: p.attn_factor,
            beta_fast: p.beta_fast,
            beta_slow: p.beta_slow,
        }
    }
}

/// Runs `f` on the tensors of the KV memory (or KV part) that owns layer `il`.
fn with_storage(
    mem: llama_memory_t,
    il: u32,
    f: impl FnOnce(&KvStorage) -> Result<*mut g::ggml_tensor>,
) -> *mut g::ggml_tensor {
    let m = try_ref!(mem, "mem");
    let kv = try_or!(find_for_layer::<KvMemory>(&*m.inner, il));
    let st = try_or!(kv
        .storage
        .as_ref()
        .ok_or_else(|| err!(Unsupported, "this memory has no tensors")));
    try_or!(f(st))
}

/// Which of a layer's tensors a node works on.
#[derive(Clone, Copy)]
enum Kv {
    K,
    V,
}

/// `get_k`/`get_v` of `KvStorage` behind both view doors.
#[allow(clippy::too_many_arguments)]
fn view(
    which: Kv,
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    n_kv: u32,
    s0: u32,
    s1: u32,
    head: u32,
) -> *mut g::ggml_tensor {
    with_storage(mem, il, |st| match which {
        // SAFETY: the header requires ctx to be NULL or a valid ggml context.
        Kv::K => unsafe { st.view_k(ctx, il, n_kv, s0, s1, head) },
        // SAFETY: as above.
        Kv::V => unsafe { st.view_v(ctx, il, n_kv, s0, s1, head) },
    })
}

/// `cpy_k`/`cpy_v` of `KvStorage` behind both row-write doors.
fn cpy(
    which: Kv,
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    cur: *mut g::ggml_tensor,
    idxs: *mut g::ggml_tensor,
) -> *mut g::ggml_tensor {
    with_storage(mem, il, |st| match which {
        // SAFETY: the header requires ctx and the tensors to be NULL or valid.
        Kv::K => unsafe { st.cpy_k(ctx, il, cur, idxs) },
        // SAFETY: as above.
        Kv::V => unsafe { st.cpy_v(ctx, il, cur, idxs) },
    })
}

/// `get_k`: view of layer `il`'s K over the first `n_kv` cells of streams `s0..=s1`,
/// `[n_embd_head_k, n_head_kv, n_kv, s1 - s0 + 1]`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_view_k(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    n_kv: u32,
    s0: u32,
    s1: u32,
    n_embd_head_k: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ view(Kv::K, mem, ctx, il, n_kv, s0, s1, n_embd_head_k) })
}

/// `get_v`: as `llama_memory_kv_view_k`; a transposed cache gives
/// `[n_kv, n_head_kv, n_embd_head_v, ns]`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_view_v(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    n_kv: u32,
    s0: u32,
    s1: u32,
    n_embd_head_v: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ view(Kv::V, mem, ctx, il, n_kv, s0, s1, n_embd_head_v) })
}

/// `cpy_k`: `ggml_set_rows` of `k_cur` into layer `il` at `k_idxs` (from
/// `llama_memory_ctx_set_input_k_idxs`).
#[no_mangle]
pub extern "C" fn llama_memory_kv_cpy_k(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    k_cur: *mut g::ggml_tensor,
    k_idxs: *mut g::ggml_tensor,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ cpy(Kv::K, mem, ctx, il, k_cur, k_idxs) })
}

/// `cpy_v`: as `llama_memory_kv_cpy_k`; a transposed cache takes per-scalar indices.
#[no_mangle]
pub extern "C" fn llama_memory_kv_cpy_v(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    v_cur: *mut g::ggml_tensor,
    v_idxs: *mut g::ggml_tensor,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ cpy(Kv::V, mem, ctx, il, v_cur, v_idxs) })
}

/// The K-shift node of layer `il` (`build_graph_shift`'s per-layer node): RoPE of the cached
/// K by `k_shift` (I32 `[size * n_stream]`, from `llama_memory_kv_set_input_k_shift`) with the
/// layer's rope parameters and optional F32 `rope_factors`. An F32/F16/BF16 K is rotated in
/// place; a quantized K goes through F32 with llama.cpp's Hadamard rotation `k_rot` (F32
/// `[n_rot_k, n_rot_k]`, the `attn_inp_k_rot` input) undone before the RoPE and redone after
/// it. NULL (last error set) on bad arguments or a context without room for the nodes.
#[no_mangle]
pub extern "C" fn llama_memory_kv_build_k_shift(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    n_embd_head_k: u32,
    k_shift: *mut g::ggml_tensor,
    k_rot: *mut g::ggml_tensor,
    rope_factors: *mut g::ggml_tensor,
    rope: *const llama_memory_rope_params,
) -> *mut g::ggml_tensor {
    ffi_boundary!({
        let r = RopeParams::from(*try_arg!(rope, "rope"));
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx and the tensors to be NULL or valid.
            unsafe { st.k_shift(ctx, il, n_embd_head_k, k_shift, k_rot, rope_factors, &r) }
        })
    })
}
