//! Batch placement and graph inputs of the KV cache: ubatch descriptions and memory contexts.

use std::ffi::c_void;

use super::error::{fail, llama_memory_result};
use super::memory::{kv_of, kv_of_mut, llama_memory_t, llama_pos, llama_seq_id, llama_token};
use crate::error::{err, Result};
use crate::kv::{KvCache, KvContext, MaskOut};
use crate::memory::MemoryContext;
use crate::ubatch::UbatchBuf;

use llama_memory_result::*;

/// A ubatch as llama.cpp's `llama_ubatch` describes it; the fields match its pointer fields, so
/// an adapter fills it from a `llama_ubatch` without copying token data. Only what the memory
/// reads is here (no embeddings or output flags).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_ubatch {
    /// Total tokens (`n_seq_tokens * n_seqs`).
    pub n_tokens: u32,
    /// Tokens per sequence set.
    pub n_seq_tokens: u32,
    /// Sequence sets.
    pub n_seqs: u32,
    /// Entries of `seq_id_unq`.
    pub n_seqs_unq: u32,
    /// Position sections per token: 1, or 4 for M-RoPE.
    pub n_pos: u32,
    /// Non-zero when the ubatch comes from an equal split.
    pub equal_seqs: u32,
    /// `[n_tokens]` token ids, or NULL for embeddings.
    pub token: *const llama_token,
    /// `[n_tokens * n_pos]` positions, section-major.
    pub pos: *const llama_pos,
    /// `[n_tokens]` number of sequence ids of each token (>= 1).
    pub n_seq_id: *const i32,
    /// `[n_tokens]` pointers to each token's sequence ids.
    pub seq_id: *const *const llama_seq_id,
    /// `[n_seqs_unq]` distinct sequence ids, ascending.
    pub seq_id_unq: *const llama_seq_id,
}

/// Reads a C ubatch description into an owned ubatch, checking every pointer and count.
fn ubatch_from_c(u: &llama_memory_ubatch) -> Result<UbatchBuf> {
    let n = u.n_tokens as usize;
    if n == 0 {
        return Err(err!(InvalidUbatch, "ubatch has no tokens"));
    }
    if u.n_pos == 0 || u.n_pos > 4 {
        return Err(err!(InvalidUbatch, "n_pos = {} (expected 1..=4)", u.n_pos));
    }
    if (u.n_seq_tokens as u64) * (u.n_seqs as u64) != n as u64 {
        return Err(err!(InvalidUbatch, "n_seq_tokens * n_seqs != n_tokens"));
    }
    if u.n_seqs_unq == 0 || u.n_seqs_unq as usize > crate::cells::MAX_SEQ {
        return Err(err!(InvalidUbatch, "n_seqs_unq = {}", u.n_seqs_unq));
    }
    let null = |what: &str| err!(NullArgument, "ubatch.{what} is NULL");
    if u.pos.is_null() {
        return Err(null("pos"));
    }
    if u.n_seq_id.is_null() {
        return Err(null("n_seq_id"));
    }
    if u.seq_id.is_null() {
        return Err(null("seq_id"));
    }
    if u.seq_id_unq.is_null() {
        return Err(null("seq_id_unq"));
    }
    // SAFETY: the header requires each non-NULL array to hold the documented number of
    // elements; the counts were bounded above.
    let (pos, n_seq_id, seq_ptrs, unq) = unsafe {
        (
            std::slice::from_raw_parts(u.pos, n * u.n_pos as usize),
            std::slice::from_raw_parts(u.n_seq_id, n),
            std::slice::from_raw_parts(u.seq_id, n),
            std::slice::from_raw_parts(u.seq_id_unq, u.n_seqs_unq as usize),
        )
    };
    let token = if u.token.is_null() {
        None
    } else {
        // SAFETY: as above, `token` holds n_tokens elements when not NULL.
        Some(unsafe { std::slice::from_raw_parts(u.token, n) }.to_vec())
    };
    let mut seq_off = Vec::with_capacity(n + 1);
    let mut seq_ids = Vec::with_capacity(n);
    seq_off.push(0u32);
    for (i, (&k, &p)) in n_seq_id.iter().zip(seq_ptrs).enumerate() {
        if k <= 0 || k as usize > crate::cells::MAX_SEQ {
            return Err(err!(InvalidUbatch, "token {i} has n_seq_id = {k}"));
        }
        if p.is_null() {
            return Err(err!(NullArgument, "ubatch.seq_id[{i}] is NULL"));
        }
        // SAFETY: seq_id[i] points to n_seq_id[i] ids, as the header requires.
        seq_ids.extend_from_slice(unsafe { std::slice::from_raw_parts(p, k as usize) });
        seq_off.push(seq_ids.len() as u32);
    }
    Ok(UbatchBuf {
        n_pos: u.n_pos,
        equal_seqs: u.equal_seqs != 0,
        token,
        pos: pos.to_vec(),
        seq_off,
        seq_ids,
        seq_id_unq: unq.to_vec(),
    })
}

/// A memory context: the plan for one batch, a full reservation, or an update.
#[allow(non_camel_case_types)]
pub struct llama_memory_ctx {
    mem: llama_memory_t,
    inner: KvContext,
}

/// Handle to a memory context.
#[allow(non_camel_case_types)]
pub type llama_memory_ctx_t = *mut llama_memory_ctx;

/// Context status: there is work to apply (`LLAMA_MEMORY_STATUS_SUCCESS`).
pub const LLAMA_MEMORY_CTX_SUCCESS: i32 = 0;
/// Context status: nothing to do (`LLAMA_MEMORY_STATUS_NO_UPDATE`).
pub const LLAMA_MEMORY_CTX_NO_UPDATE: i32 = 1;
/// Context status: the ubatches do not fit (`LLAMA_MEMORY_STATUS_FAILED_PREPARE`).
pub const LLAMA_MEMORY_CTX_FAILED_PREPARE: i32 = 2;
/// Context status: computing failed (`LLAMA_MEMORY_STATUS_FAILED_COMPUTE`).
pub const LLAMA_MEMORY_CTX_FAILED_COMPUTE: i32 = 3;

fn new_ctx(mem: llama_memory_t, inner: KvContext) -> llama_memory_ctx_t {
    Box::into_raw(Box::new(llama_memory_ctx { mem, inner }))
}

/// Plans a batch already split into `n_ubatches` ubatches (llama.cpp's `init_batch` after its
/// split): finds cells for each as if the previous ones were placed, then rolls the cells back.
/// Returns a context whose status is SUCCESS or FAILED_PREPARE (the batch does not fit: the
/// memory is as before, except SWA cells the simulation purged, as in llama.cpp), or NULL with
/// the last error set for invalid input. The memory must outlive the context.
#[no_mangle]
pub extern "C" fn llama_memory_init_batch(
    mem: llama_memory_t,
    ubatches: *const llama_memory_ubatch,
    n_ubatches: usize,
) -> llama_memory_ctx_t {
    let fail_ptr = std::ptr::null_mut();
    ffi_boundary!(fail_ptr, {
        let m = try_mut!(fail_ptr, mem, "mem");
        if n_ubatches == 0 {
            crate::ffi::error::set_error(&err!(InvalidArgument, "n_ubatches is 0"));
            return fail_ptr;
        }
        let descs = try_slice!(fail_ptr, ubatches, n_ubatches, "ubatches");
        let bufs = try_or!(
            fail_ptr,
            descs.iter().map(ubatch_from_c).collect::<Result<Vec<_>>>()
        );
        let kv = try_or!(fail_ptr, kv_of_mut(m));
        let ctx = try_or!(fail_ptr, kv.init_batch(bufs));
        new_ctx(mem, ctx)
    })
}

/// A context covering the whole memory (`init_full`), for worst-case graph reservation.
#[no_mangle]
pub extern "C" fn llama_memory_init_full(mem: llama_memory_t) -> llama_memory_ctx_t {
    let fail_ptr = std::ptr::null_mut();
    ffi_boundary!(fail_ptr, {
        let m = try_ref!(fail_ptr, mem, "mem");
        let kv = try_or!(fail_ptr, kv_of(m));
        new_ctx(mem, kv.init_full())
    })
}

/// Takes the pending K-shift and stream copies into an update context (`init_update`); its
/// status is NO_UPDATE when there is nothing to do. `optimize` is ignored, as in llama.cpp.
#[no_mangle]
pub extern "C" fn llama_memory_init_update(
    mem: llama_memory_t,
    optimize: bool,
) -> llama_memory_ctx_t {
    let _ = optimize;
    let fail_ptr = std::ptr::null_mut();
    ffi_boundary!(fail_ptr, {
        let m = try_mut!(fail_ptr, mem, "mem");
        let kv = try_or!(fail_ptr, kv_of_mut(m));
        let ctx = try_or!(fail_ptr, kv.init_update());
        new_ctx(mem, ctx)
    })
}

/// Frees a context. NULL is accepted.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_free(ctx: llama_memory_ctx_t) {
    ffi_boundary!((), {
        if !ctx.is_null() {
            // SAFETY: a non-NULL context comes from Box::into_raw in new_ctx and is not used
            // after this call, as the header requires.
            drop(unsafe { Box::from_raw(ctx) });
        }
    })
}

/// Status of a context (`LLAMA_MEMORY_CTX_*`); FAILED_PREPARE for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_status(ctx: llama_memory_ctx_t) -> i32 {
    ffi_boundary!(LLAMA_MEMORY_CTX_FAILED_PREPARE, {
        let c = try_ref!(LLAMA_MEMORY_CTX_FAILED_PREPARE, ctx, "ctx");
        c.inner.status() as i32
    })
}

/// Moves a batch context to its next ubatch; false when there is none.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_next(ctx: llama_memory_ctx_t) -> bool {
    ffi_boundary!(false, {
        let c = try_mut!(false, ctx, "ctx");
        c.inner.next()
    })
}

/// Applies the context's current step to its memory: places the current ubatch (batch
/// context), or applies the K-shift and stream copies (update context). Fails, changing
/// nothing, if the memory changed since the plan so that a planned cell is no longer free.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_apply(ctx: llama_memory_ctx_t) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let c = try_mut!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
        let m = try_mut!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, c.mem, "ctx memory");
        match c.inner.apply(m.inner.as_mut()) {
            Ok(()) => LLAMA_MEMORY_OK,
            Err(e) => fail(&e),
        }
    })
}

/// Number of cells the attention sees for the current ubatch (valid after apply), 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_n_kv(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!(0, {
        let c = try_ref!(0, ctx, "ctx");
        c.inner.n_kv()
    })
}

/// Number of tokens of the current ubatch, 0 if none.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_n_tokens(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!(0, {
        let c = try_ref!(0, ctx, "ctx");
        c.inner.ubatch().map_or(0, |u| u.n_tokens)
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
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        slot_idxs_into_buf(ctx, dst, n, KvCache::set_input_k_idxs)
    })
}

/// Writes the V destinations of the current ubatch (`set_input_v_idxs`) into `dst` (`n`
/// elements: n_tokens, or n_tokens * n_embd_v_gqa_max with a transposed V).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_v_idxs(
    ctx: llama_memory_ctx_t,
    dst: *mut i64,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        slot_idxs_into_buf(ctx, dst, n, KvCache::set_input_v_idxs)
    })
}

/// Writes one of the slot's row-index inputs into a caller buffer of `n` elements.
fn slot_idxs_into_buf(
    ctx: llama_memory_ctx_t,
    dst: *mut i64,
    n: usize,
    write: SlotIdxs,
) -> llama_memory_result {
    let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
    let out = try_slice_mut!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, dst, n, "dst");
    with_kv_slot(c, |kv, slot| write(kv, slot, out))
}

/// Writes one of the slot's row-index inputs into a host I64 tensor.
fn slot_idxs_into_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
    write: SlotIdxs,
) -> llama_memory_result {
    let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
    with_kv_slot(c, |kv, slot| {
        let (_, out) = host_tensor::<i64>(dst, &[ggml_sys::GGML_TYPE_I64])?;
        write(kv, slot, out)
    })
}

/// `KvCache::set_input_k_idxs` or `KvCache::set_input_v_idxs`.
type SlotIdxs = fn(&KvCache, &crate::kv::SlotInfo, &mut [i64]) -> Result<()>;

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
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
        let out = if f16 {
            MaskOut::F16(try_slice_mut!(
                LLAMA_MEMORY_ERR_NULL_ARGUMENT,
                dst.cast::<u16>(),
                n,
                "dst"
            ))
        } else {
            MaskOut::F32(try_slice_mut!(
                LLAMA_MEMORY_ERR_NULL_ARGUMENT,
                dst.cast::<f32>(),
                n,
                "dst"
            ))
        };
        with_kv_ubatch(c, |kv, ub| {
            kv.set_input_kq_mask(&ub, causal_attn, n_kv, n_stream, out)
        })
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
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
        let out = try_slice_mut!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, dst, n, "dst");
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
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let m = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, mem, "mem");
        let out = try_slice_mut!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, dst, n, "dst");
        let r = kv_of(m).and_then(|kv| kv.set_input_k_shift(out));
        r.map_or_else(|e| fail(&e), |()| LLAMA_MEMORY_OK)
    })
}

fn ctx_kv(c: &llama_memory_ctx) -> Result<&KvCache> {
    if c.mem.is_null() {
        return Err(err!(NullArgument, "context has no memory"));
    }
    // SAFETY: the context's memory outlives it (header rule) and is not mutated while the
    // caller is inside a function that only reads it.
    kv_of(unsafe { &*c.mem })
}

fn with_kv_slot(
    c: &llama_memory_ctx,
    f: impl FnOnce(&KvCache, &crate::kv::SlotInfo) -> Result<()>,
) -> llama_memory_result {
    let r = ctx_kv(c).and_then(|kv| {
        let slot = c
            .inner
            .slot()
            .ok_or_else(|| err!(InvalidArgument, "the context has no current ubatch"))?;
        f(kv, slot)
    });
    r.map_or_else(|e| fail(&e), |()| LLAMA_MEMORY_OK)
}

fn with_kv_ubatch(
    c: &llama_memory_ctx,
    f: impl FnOnce(&KvCache, crate::ubatch::Ubatch<'_>) -> Result<()>,
) -> llama_memory_result {
    let r = ctx_kv(c).and_then(|kv| {
        let ub = c
            .inner
            .ubatch()
            .ok_or_else(|| err!(InvalidArgument, "the context has no current ubatch"))?;
        f(kv, ub)
    });
    r.map_or_else(|e| fail(&e), |()| LLAMA_MEMORY_OK)
}

/// Checks that `t` is a contiguous tensor of one of `types` in host memory and returns it with
/// its elements viewed as `E`.
fn host_tensor<'a, E>(
    t: *mut ggml_sys::ggml_tensor,
    types: &[ggml_sys::ggml_type],
) -> Result<(&'a ggml_sys::ggml_tensor, &'a mut [E])> {
    if t.is_null() {
        return Err(err!(NullArgument, "dst tensor is NULL"));
    }
    // SAFETY: the header requires `dst` to be a valid ggml tensor for the duration of the call.
    let tr = unsafe { &*t };
    if !types.contains(&tr.type_) {
        return Err(err!(
            InvalidArgument,
            "dst tensor has type {}, expected one of {types:?}",
            tr.type_
        ));
    }
    // SAFETY: `tr.buffer` is checked for NULL first; ggml only reads the buffer's interface.
    if tr.buffer.is_null() || !unsafe { ggml_sys::ggml_backend_buffer_is_host(tr.buffer) } {
        return Err(err!(InvalidArgument, "dst tensor is not in a host buffer"));
    }
    // SAFETY: `t` is a valid tensor (see above); these functions only read its header.
    let (contiguous, n) = unsafe { (ggml_sys::ggml_is_contiguous(t), ggml_sys::ggml_nelements(t)) };
    if !contiguous || tr.data.is_null() || n < 0 {
        return Err(err!(
            InvalidArgument,
            "dst tensor is not contiguous host data"
        ));
    }
    // SAFETY: a contiguous host tensor of this element type holds `n` elements at `data`,
    // and the caller does not access it during the call.
    let data = unsafe { std::slice::from_raw_parts_mut(tr.data.cast::<E>(), n as usize) };
    Ok((tr, data))
}

fn shape_err(what: &str, ne: [i64; 4], want: &str) -> crate::error::Error {
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
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
        with_kv_ubatch(c, |kv, ub| {
            let f16 = ggml_sys::GGML_TYPE_F16;
            let (t, _) = host_tensor::<u8>(dst, &[ggml_sys::GGML_TYPE_F32, f16])?;
            let ne = t.ne;
            if ne[2] != 1
                || ne[3] <= 0
                || ne[1] * ne[3] != ub.n_tokens as i64
                || ne[0] > u32::MAX as i64
            {
                return Err(shape_err(
                    "kq mask",
                    ne,
                    "[n_kv, n_tokens / n_stream, 1, n_stream]",
                ));
            }
            let (n_kv, n_stream) = (ne[0] as u32, ne[3] as u32);
            let out = if t.type_ == f16 {
                MaskOut::F16(host_tensor::<u16>(dst, &[f16])?.1)
            } else {
                MaskOut::F32(host_tensor::<f32>(dst, &[ggml_sys::GGML_TYPE_F32])?.1)
            };
            kv.set_input_kq_mask(&ub, causal_attn, n_kv, n_stream, out)
        })
    })
}

/// `llama_memory_ctx_set_input_k_idxs` into a host I64 tensor of `n_tokens` elements.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_k_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        slot_idxs_into_tensor(ctx, dst, KvCache::set_input_k_idxs)
    })
}

/// `llama_memory_ctx_set_input_v_idxs` into a host I64 tensor.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_v_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        slot_idxs_into_tensor(ctx, dst, KvCache::set_input_v_idxs)
    })
}

/// `llama_memory_ctx_set_input_pos_bucket` into a host I32 tensor, `ne = [n_kv, n_tokens]`.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_pos_bucket_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let c = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, ctx, "ctx");
        with_kv_ubatch(c, |kv, ub| {
            let (t, out) = host_tensor::<i32>(dst, &[ggml_sys::GGML_TYPE_I32])?;
            let ne = t.ne;
            if ne[1] != ub.n_tokens as i64 || ne[2] != 1 || ne[3] != 1 || ne[0] > u32::MAX as i64 {
                return Err(shape_err("pos bucket", ne, "[n_kv, n_tokens, 1, 1]"));
            }
            kv.set_input_pos_bucket(&ub, ne[0] as u32, out)
        })
    })
}

/// `llama_memory_kv_set_input_k_shift` into a host I32 tensor of `size * n_stream` elements.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_shift_tensor(
    mem: llama_memory_t,
    dst: *mut ggml_sys::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!(LLAMA_MEMORY_ERR_INTERNAL, {
        let m = try_ref!(LLAMA_MEMORY_ERR_NULL_ARGUMENT, mem, "mem");
        let r = kv_of(m).and_then(|kv| {
            let (_, out) = host_tensor::<i32>(dst, &[ggml_sys::GGML_TYPE_I32])?;
            kv.set_input_k_shift(out)
        });
        r.map_or_else(|e| fail(&e), |()| LLAMA_MEMORY_OK)
    })
}
