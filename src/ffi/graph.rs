//! Graph nodes over a memory's K/V tensors, built in the caller's `ggml_context`: views,
//! row writes and the K-shift. NULL (and the last error) on bad arguments.

use ggml_sys as g;

use super::memory::llama_memory_t;
use crate::error::{err, Result};
use crate::kv::KvMemory;
use crate::memory::find_for_layer;
use crate::storage::graph::llama_memory_rope_params;
use crate::storage::KvStorage;

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
    ffi_boundary!({
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx to be NULL or a valid ggml context.
            unsafe { st.view_k(ctx, il, n_kv, s0, s1, n_embd_head_k) }
        })
    })
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
    ffi_boundary!({
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx to be NULL or a valid ggml context.
            unsafe { st.view_v(ctx, il, n_kv, s0, s1, n_embd_head_v) }
        })
    })
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
    ffi_boundary!({
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx and the tensors to be NULL or valid.
            unsafe { st.cpy_k(ctx, il, k_cur, k_idxs) }
        })
    })
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
    ffi_boundary!({
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx and the tensors to be NULL or valid.
            unsafe { st.cpy_v(ctx, il, v_cur, v_idxs) }
        })
    })
}

/// The K-shift node of layer `il` (RoPE of the cached K by `k_shift`, in place), with the
/// layer's rope parameters and optional `rope_factors`. F32/F16/BF16 K only.
#[no_mangle]
pub extern "C" fn llama_memory_kv_build_k_shift(
    mem: llama_memory_t,
    ctx: *mut g::ggml_context,
    il: u32,
    n_embd_head_k: u32,
    k_shift: *mut g::ggml_tensor,
    rope_factors: *mut g::ggml_tensor,
    rope: *const llama_memory_rope_params,
) -> *mut g::ggml_tensor {
    ffi_boundary!({
        let r = *try_arg!(rope, "rope");
        with_storage(mem, il, |st| {
            // SAFETY: the header requires ctx and the tensors to be NULL or valid.
            unsafe { st.k_shift(ctx, il, n_embd_head_k, k_shift, rope_factors, &r) }
        })
    })
}
