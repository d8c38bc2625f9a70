//! The KV cache's part of a memory context: `n_kv` and the graph inputs (row indices, KQ
//! mask, position buckets, K-shift) for the current ubatch, into buffers or host tensors.

use std::ffi::c_void;

use super::boundary::{check_slice, host_tensor};
use super::context::{llama_memory_ctx_t, ContextHandle};
use super::error::llama_memory_result;
use super::memory::{kv_of, llama_memory_t};
use crate::error::{err, Result};
use crate::kv::{KvCache, KvContext, MaskOut, SlotInfo};
use crate::memory::MemoryContext;
use crate::ubatch::Ubatch;

use llama_memory_result::*;

/// Number of cells the attention sees for the current ubatch (valid after apply), 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_n_kv(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        try_or!(c.find::<KvContext>()).n_kv()
    })
}

/// Writes the K row of each token of the current ubatch (`set_input_k_idxs`) into `dst`
/// (`n` elements, at least n_tokens).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_k_idxs(
    ctx: llama_memory_ctx_t,
    dst: *mut i64,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({ slot_idxs_into_buf(ctx, dst, n, KvCache::set_input_k_idxs) })
}

/// Writes the V destinations of the current ubatch (`set_input_v_idxs`) into `dst` (`n`
/// elements: n_tokens, or n_tokens * n_embd_v_gqa_max with a transposed V).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_v_idxs(
    ctx: llama_memory_ctx_t,
    dst: *mut i64,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({ slot_idxs_into_buf(ctx, dst, n, KvCache::set_input_v_idxs) })
}

/// Writes one of the slot's row-index inputs into a caller buffer of `n` elements.
fn slot_idxs_into_buf(
    ctx: llama_memory_ctx_t,
    dst: *mut i64,
    n: usize,
    write: SlotIdxs,
) -> llama_memory_result {
    let c = try_ref!(ctx, "ctx");
    let out = try_slice_mut!(dst, n, "dst");
    with_kv_slot(c, |kv, slot| write(kv, slot, out))
}

/// Writes one of the slot's row-index inputs into a host I64 tensor.
fn slot_idxs_into_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
    write: SlotIdxs,
) -> llama_memory_result {
    let c = try_ref!(ctx, "ctx");
    with_kv_slot(c, |kv, slot| idxs_tensor(kv, slot, dst, write))
}

/// One of a slot's row-index inputs into a host I64 tensor.
pub(crate) fn idxs_tensor(
    kv: &KvCache,
    slot: &SlotInfo,
    dst: *mut ggml_sys::ggml_tensor,
    write: SlotIdxs,
) -> Result<()> {
    // SAFETY: the header requires dst to be a valid tensor that nothing else accesses during
    // the call.
    let (_, out) = unsafe { host_tensor::<i64>(dst, &[ggml_sys::GGML_TYPE_I64]) }?;
    write(kv, slot, out)
}

/// `KvCache::set_input_k_idxs` or `KvCache::set_input_v_idxs`.
pub(crate) type SlotIdxs = fn(&KvCache, &SlotInfo, &mut [i64]) -> Result<()>;

/// Writes the KQ mask of the current ubatch over `n_kv` cells (`set_input_kq_mask`) into `dst`:
/// `n_kv * n_tokens` elements, f32, or IEEE half bit patterns when `f16`; `n_stream` mask
/// streams (1 for a unified cache, the ubatch's sequence count otherwise).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_kq_mask(
    ctx: llama_memory_ctx_t,
    causal_attn: bool,
    n_kv: u32,
    n_stream: u32,
    f16: bool,
    dst: *mut c_void,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let out = try_or!(mask_buf(dst, n, f16));
        with_kv_ubatch(c, |kv, ub| {
            kv.set_input_kq_mask(&ub, causal_attn, n_kv, n_stream, out)
        })
    })
}

/// A caller's mask buffer of `n` elements: f32, or IEEE half bit patterns when `f16`.
pub(crate) fn mask_buf<'a>(dst: *mut c_void, n: usize, f16: bool) -> Result<MaskOut<'a>> {
    if f16 {
        check_slice(dst.cast_const().cast::<u16>(), n, "dst")?;
    } else {
        check_slice(dst.cast_const().cast::<f32>(), n, "dst")?;
    }
    if n == 0 {
        return Ok(if f16 {
            MaskOut::F16(&mut [])
        } else {
            MaskOut::F32(&mut [])
        });
    }
    // SAFETY: the header requires dst to hold n writable elements of the chosen type that
    // nothing else accesses during the call; check_slice refused NULL, misaligned and
    // oversized buffers.
    Ok(unsafe {
        if f16 {
            MaskOut::F16(std::slice::from_raw_parts_mut(dst.cast::<u16>(), n))
        } else {
            MaskOut::F32(std::slice::from_raw_parts_mut(dst.cast::<f32>(), n))
        }
    })
}

/// Writes T5 relative position buckets of the current ubatch over `n_kv` cells
/// (`set_input_pos_bucket`) into `dst` (`n_kv * n_tokens` elements).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_pos_bucket(
    ctx: llama_memory_ctx_t,
    n_kv: u32,
    dst: *mut i32,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let out = try_slice_mut!(dst, n, "dst");
        with_kv_ubatch(c, |kv, ub| kv.set_input_pos_bucket(&ub, n_kv, out))
    })
}

/// Writes the pending shift of every cell (`set_input_k_shift`) into `dst`
/// (`size * n_stream` elements).
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_shift(
    mem: llama_memory_t,
    dst: *mut i32,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let out = try_slice_mut!(dst, n, "dst");
        try_or!(kv_of(m).and_then(|kv| kv.set_input_k_shift(out)));
        LLAMA_MEMORY_OK
    })
}

fn with_kv_slot(
    c: &ContextHandle,
    f: impl FnOnce(&KvCache, &SlotInfo) -> Result<()>,
) -> llama_memory_result {
    let r = c.memory().and_then(kv_of).and_then(|kv| {
        let slot = c
            .find::<KvContext>()?
            .slot()
            .ok_or_else(|| err!(InvalidArgument, "the context has no current ubatch"))?;
        f(kv, slot)
    });
    try_or!(r);
    LLAMA_MEMORY_OK
}

fn with_kv_ubatch(
    c: &ContextHandle,
    f: impl FnOnce(&KvCache, Ubatch<'_>) -> Result<()>,
) -> llama_memory_result {
    let r = c.memory().and_then(kv_of).and_then(|kv| {
        let ub = c
            .find::<KvContext>()?
            .ubatch()
            .ok_or_else(|| err!(InvalidArgument, "the context has no current ubatch"))?;
        f(kv, ub)
    });
    try_or!(r);
    LLAMA_MEMORY_OK
}

pub(crate) fn shape_err(what: &str, ne: [i64; 4], want: &str) -> crate::error::Error {
    err!(
        InvalidArgument,
        "{what} tensor has ne = {ne:?}, expected {want}"
    )
}

/// `llama_memory_ctx_set_input_kq_mask` into a host tensor, as llama.cpp's graph builds it:
/// F32 or F16, `ne = [n_kv, n_tokens / n_stream, 1, n_stream]`.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_kq_mask_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
    causal_attn: bool,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        with_kv_ubatch(c, |kv, ub| kq_mask_tensor(kv, &ub, dst, causal_attn))
    })
}

/// `KvCache::set_input_kq_mask` into a host F32/F16 tensor of llama.cpp's mask shape
/// `[n_kv, n_tokens / n_stream, 1, n_stream]` (`n_kv` and `n_stream` taken from it).
pub(crate) fn kq_mask_tensor(
    kv: &KvCache,
    ub: &Ubatch<'_>,
    dst: *mut ggml_sys::ggml_tensor,
    causal_attn: bool,
) -> Result<()> {
    let f16 = ggml_sys::GGML_TYPE_F16;
    // SAFETY: the header requires dst to be a valid tensor that nothing else accesses
    // during the call; each of the views here ends before the next is made.
    let (t, _) = unsafe { host_tensor::<u8>(dst, &[ggml_sys::GGML_TYPE_F32, f16]) }?;
    let ne = t.ne;
    if ne[2] != 1 || ne[3] <= 0 || ne[1] * ne[3] != ub.n_tokens as i64 || ne[0] > u32::MAX as i64 {
        return Err(shape_err(
            "kq mask",
            ne,
            "[n_kv, n_tokens / n_stream, 1, n_stream]",
        ));
    }
    let (n_kv, n_stream) = (ne[0] as u32, ne[3] as u32);
    let out = if t.type_ == f16 {
        // SAFETY: see above.
        MaskOut::F16(unsafe { host_tensor::<u16>(dst, &[f16]) }?.1)
    } else {
        // SAFETY: see above.
        MaskOut::F32(unsafe { host_tensor::<f32>(dst, &[ggml_sys::GGML_TYPE_F32]) }?.1)
    };
    kv.set_input_kq_mask(ub, causal_attn, n_kv, n_stream, out)
}

/// `llama_memory_ctx_set_input_k_idxs` into a host I64 tensor of `n_tokens` elements.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_k_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({ slot_idxs_into_tensor(ctx, dst, KvCache::set_input_k_idxs) })
}

/// `llama_memory_ctx_set_input_v_idxs` into a host I64 tensor.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_v_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({ slot_idxs_into_tensor(ctx, dst, KvCache::set_input_v_idxs) })
}

/// `llama_memory_ctx_set_input_pos_bucket` into a host I32 tensor, `ne = [n_kv, n_tokens]`.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_pos_bucket_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        with_kv_ubatch(c, |kv, ub| pos_bucket_tensor(kv, &ub, dst))
    })
}

/// `KvCache::set_input_pos_bucket` into a host I32 tensor `[n_kv, n_tokens]`.
pub(crate) fn pos_bucket_tensor(
    kv: &KvCache,
    ub: &Ubatch<'_>,
    dst: *mut ggml_sys::ggml_tensor,
) -> Result<()> {
    // SAFETY: the header requires dst to be a valid tensor nothing else accesses.
    let (t, out) = unsafe { host_tensor::<i32>(dst, &[ggml_sys::GGML_TYPE_I32]) }?;
    let ne = t.ne;
    if ne[1] != ub.n_tokens as i64 || ne[2] != 1 || ne[3] != 1 || ne[0] > u32::MAX as i64 {
        return Err(shape_err("pos bucket", ne, "[n_kv, n_tokens, 1, 1]"));
    }
    kv.set_input_pos_bucket(ub, ne[0] as u32, out)
}

/// `llama_memory_kv_set_input_k_shift` into a host I32 tensor of `size * n_stream` elements.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_shift_tensor(
    mem: llama_memory_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(kv_of(m).and_then(|kv| {
            // SAFETY: the header requires dst to be a valid tensor nothing else accesses.
            let (_, out) = unsafe { host_tensor::<i32>(dst, &[ggml_sys::GGML_TYPE_I32]) }?;
            kv.set_input_k_shift(out)
        }));
        LLAMA_MEMORY_OK
    })
}
