//! The KV cache's graph inputs: row indices, KQ mask, position buckets and K-shift, into caller
//! buffers or host tensors.
//!
//! Each input is written by one function here. It reaches C through two doors that differ only
//! in where the cells and tokens come from (`Source`):
//! - `llama_memory_ctx_set_input_*`: the current ubatch of a batch context and the slot it was
//!   placed in;
//! - `llama_memory_kv_set_input_*`: a caller's ubatch and slot info (the slot-level API of
//!   [`super::slot`], for callers that keep their own slot infos, as llama.cpp's composites do).

use std::ffi::c_void;

use ggml_sys as g;

use super::kv_of;
use super::slot::{llama_memory_slot_info, read_slot, ubatch_desc, with_scratch};
use crate::error::{err, Error, Result};
use crate::ffi::boundary::{buf_mut, host_tensor, null_arg};
use crate::ffi::error::llama_memory_result;
use crate::ffi::handle::{self, llama_memory_ctx_t, llama_memory_t};
use crate::ffi::ubatch::{llama_memory_ubatch, read_one_ubatch};
use crate::kv::{KvCache, KvContext, MaskOut, SlotInfo};
use crate::memory::MemoryContext;
use crate::ubatch::Ubatch;

/// Where an input's cells and tokens come from.
#[derive(Clone, Copy)]
enum Source {
    /// The current ubatch of a memory context, and the slot it was placed in.
    Ctx(llama_memory_ctx_t),
    /// A caller's ubatch and slot info, on the memory's KV cache.
    Caller {
        mem: llama_memory_t,
        ubatch: *const llama_memory_ubatch,
        sinfo: *const llama_memory_slot_info,
    },
}

impl Source {
    /// Runs `f` on the KV cache and the slot that places the source's tokens. A caller's slot
    /// must hold as many tokens as its ubatch (only the ubatch's `n_tokens` is read, as
    /// upstream's `set_input_{k,v}_idxs` assert).
    fn with_slot(self, f: impl FnOnce(&KvCache, &SlotInfo) -> Result<()>) -> Result<()> {
        match self {
            Source::Ctx(ctx) => {
                // SAFETY: as in try_ref!: a non-NULL handle from this library, not used from
                // another thread during the call (header rules).
                let c = unsafe { handle::try_from(ctx) }.ok_or_else(|| null_arg("ctx"))?;
                let kv = c.part_memory().and_then(super::kv_in)?;
                let slot = c.find::<KvContext>()?.slot().ok_or_else(no_ubatch)?;
                f(kv, slot)
            }
            Source::Caller { mem, ubatch, sinfo } => {
                let kv = kv_of(mem_ref(mem)?)?;
                let n_tokens = ubatch_desc(ubatch)?.n_tokens;
                with_scratch(|sc| {
                    read_slot(sinfo, kv, &mut sc.slot)?;
                    if sc.slot.n_tokens() != n_tokens as usize {
                        return Err(err!(
                            InvalidArgument,
                            "slot holds {} tokens, the ubatch {n_tokens}",
                            sc.slot.n_tokens()
                        ));
                    }
                    f(kv, &sc.slot)
                })
            }
        }
    }

    /// Runs `f` on the KV cache and the source's ubatch (a caller's slot info is not read).
    fn with_ubatch(self, f: impl FnOnce(&KvCache, &Ubatch<'_>) -> Result<()>) -> Result<()> {
        match self {
            Source::Ctx(ctx) => {
                // SAFETY: as in with_slot.
                let c = unsafe { handle::try_from(ctx) }.ok_or_else(|| null_arg("ctx"))?;
                let kv = c.part_memory().and_then(super::kv_in)?;
                let ub = c.find::<KvContext>()?.ubatch().ok_or_else(no_ubatch)?;
                f(kv, &ub)
            }
            Source::Caller { mem, ubatch, .. } => {
                let kv = kv_of(mem_ref(mem)?)?;
                let d = ubatch_desc(ubatch)?;
                with_scratch(|sc| {
                    let ub = read_one_ubatch(d, &mut sc.ub)?;
                    f(kv, &ub)
                })
            }
        }
    }
}

fn mem_ref<'a>(mem: llama_memory_t) -> Result<&'a crate::ffi::handle::MemoryHandle> {
    // SAFETY: as in try_ref!: a non-NULL handle from this library's constructors, not used
    // from another thread during the call (header rules).
    unsafe { handle::try_from(mem) }.ok_or_else(|| null_arg("mem"))
}

fn no_ubatch() -> Error {
    err!(InvalidArgument, "the context has no current ubatch")
}

/// The result code of an input write, recording a failure as the last error.
fn done(r: Result<()>) -> llama_memory_result {
    try_or!(r);
    llama_memory_result::LLAMA_MEMORY_OK
}

/// Where an input is written.
#[derive(Clone, Copy)]
enum Dst<T, S = ()> {
    /// A caller buffer of `n` elements, with the shape `S` the caller gives for it (a tensor
    /// carries its own).
    Buf(*mut T, usize, S),
    /// A host tensor of the input's type.
    Tensor(*mut g::ggml_tensor),
}

/// `KvCache::set_input_k_idxs` or `KvCache::set_input_v_idxs`.
type SlotIdxs = fn(&KvCache, &SlotInfo, &mut [i64]) -> Result<()>;

/// One of the row-index inputs of the source's slot (`set_input_{k,v}_idxs`).
fn row_idxs(src: Source, dst: Dst<i64>, write: SlotIdxs) -> llama_memory_result {
    done(match dst {
        Dst::Buf(p, n, ()) => {
            // SAFETY: the header requires dst to hold n writable elements nothing else
            // accesses during the call.
            let out = try_or!(unsafe { buf_mut(p, n, "dst") });
            src.with_slot(|kv, slot| write(kv, slot, out))
        }
        Dst::Tensor(t) => src.with_slot(|kv, slot| {
            // SAFETY: the header requires dst to be a valid tensor that nothing else accesses
            // during the call.
            let (_, out) = unsafe { host_tensor::<i64>(t, &[g::GGML_TYPE_I64]) }?;
            write(kv, slot, out)
        }),
    })
}

/// The shape of a KQ mask written into a caller buffer (a tensor carries its own).
#[derive(Clone, Copy)]
struct MaskShape {
    n_kv: u32,
    n_stream: u32,
    f16: bool,
}

/// The KQ mask of the source's ubatch over the cells as they are now (`set_input_kq_mask`):
/// into a caller buffer of the given shape, or a host F32/F16 tensor of llama.cpp's mask
/// shape `[n_kv, n_tokens / n_stream, 1, n_stream]` (`n_kv` and `n_stream` taken from it).
fn kq_mask(src: Source, causal_attn: bool, dst: Dst<c_void, MaskShape>) -> llama_memory_result {
    done(match dst {
        Dst::Buf(p, n, shape) => {
            let out = try_or!(mask_buf(p, n, shape.f16));
            src.with_ubatch(|kv, ub| {
                kv.set_input_kq_mask(ub, causal_attn, shape.n_kv, shape.n_stream, out)
            })
        }
        Dst::Tensor(t) => src.with_ubatch(|kv, ub| kq_mask_tensor(kv, ub, t, causal_attn)),
    })
}

/// A caller's mask buffer of `n` elements: f32, or IEEE half bit patterns when `f16`.
fn mask_buf<'a>(dst: *mut c_void, n: usize, f16: bool) -> Result<MaskOut<'a>> {
    Ok(if f16 {
        // SAFETY: the header requires dst to hold n writable elements of the chosen type that
        // nothing else accesses during the call.
        MaskOut::F16(unsafe { buf_mut(dst.cast::<u16>(), n, "dst") }?)
    } else {
        // SAFETY: as above.
        MaskOut::F32(unsafe { buf_mut(dst.cast::<f32>(), n, "dst") }?)
    })
}

fn kq_mask_tensor(
    kv: &KvCache,
    ub: &Ubatch<'_>,
    dst: *mut g::ggml_tensor,
    causal_attn: bool,
) -> Result<()> {
    let f16 = g::GGML_TYPE_F16;
    // SAFETY: the header requires dst to be a valid tensor that nothing else accesses
    // during the call; each of the views here ends before the next is made.
    let (t, _) = unsafe { host_tensor::<u8>(dst, &[g::GGML_TYPE_F32, f16]) }?;
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
        MaskOut::F32(unsafe { host_tensor::<f32>(dst, &[g::GGML_TYPE_F32]) }?.1)
    };
    kv.set_input_kq_mask(ub, causal_attn, n_kv, n_stream, out)
}

/// T5 relative position buckets of the source's ubatch (`set_input_pos_bucket`): over `n_kv`
/// cells into a caller buffer, or into a host I32 tensor `[n_kv, n_tokens]`.
fn pos_bucket(src: Source, dst: Dst<i32, u32>) -> llama_memory_result {
    done(match dst {
        Dst::Buf(p, n, n_kv) => {
            // SAFETY: the header requires dst to hold n writable elements nothing else
            // accesses during the call.
            let out = try_or!(unsafe { buf_mut(p, n, "dst") });
            src.with_ubatch(|kv, ub| kv.set_input_pos_bucket(ub, n_kv, out))
        }
        Dst::Tensor(t) => src.with_ubatch(|kv, ub| {
            // SAFETY: the header requires dst to be a valid tensor nothing else accesses.
            let (tr, out) = unsafe { host_tensor::<i32>(t, &[g::GGML_TYPE_I32]) }?;
            let ne = tr.ne;
            if ne[1] != ub.n_tokens as i64 || ne[2] != 1 || ne[3] != 1 || ne[0] > u32::MAX as i64 {
                return Err(shape_err("pos bucket", ne, "[n_kv, n_tokens, 1, 1]"));
            }
            kv.set_input_pos_bucket(ub, ne[0] as u32, out)
        }),
    })
}

/// The pending shift of every cell (`set_input_k_shift`), `size * n_stream` elements.
fn k_shift(mem: llama_memory_t, dst: Dst<i32>) -> llama_memory_result {
    let m = try_or!(mem_ref(mem));
    done(kv_of(m).and_then(|kv| {
        let out = match dst {
            // SAFETY: the header requires dst to hold n writable elements nothing else
            // accesses during the call.
            Dst::Buf(p, n, ()) => unsafe { buf_mut(p, n, "dst") }?,
            // SAFETY: the header requires dst to be a valid tensor nothing else accesses.
            Dst::Tensor(t) => unsafe { host_tensor::<i32>(t, &[g::GGML_TYPE_I32]) }?.1,
        };
        kv.set_input_k_shift(out)
    }))
}

fn shape_err(what: &str, ne: [i64; 4], want: &str) -> Error {
    err!(
        InvalidArgument,
        "{what} tensor has ne = {ne:?}, expected {want}"
    )
}

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
    ffi_boundary!({
        row_idxs(
            Source::Ctx(ctx),
            Dst::Buf(dst, n, ()),
            KvCache::set_input_k_idxs,
        )
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
    ffi_boundary!({
        row_idxs(
            Source::Ctx(ctx),
            Dst::Buf(dst, n, ()),
            KvCache::set_input_v_idxs,
        )
    })
}

/// `llama_memory_ctx_set_input_k_idxs` into a host I64 tensor of `n_tokens` elements.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_k_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut g::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({
        row_idxs(
            Source::Ctx(ctx),
            Dst::Tensor(dst),
            KvCache::set_input_k_idxs,
        )
    })
}

/// `llama_memory_ctx_set_input_v_idxs` into a host I64 tensor.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_v_idxs_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut g::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({
        row_idxs(
            Source::Ctx(ctx),
            Dst::Tensor(dst),
            KvCache::set_input_v_idxs,
        )
    })
}

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
    let shape = MaskShape {
        n_kv,
        n_stream,
        f16,
    };
    ffi_boundary!({ kq_mask(Source::Ctx(ctx), causal_attn, Dst::Buf(dst, n, shape)) })
}

/// `llama_memory_ctx_set_input_kq_mask` into a host tensor, as llama.cpp's graph builds it:
/// F32 or F16, `ne = [n_kv, n_tokens / n_stream, 1, n_stream]`.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_kq_mask_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut g::ggml_tensor,
    causal_attn: bool,
) -> llama_memory_result {
    ffi_boundary!({ kq_mask(Source::Ctx(ctx), causal_attn, Dst::Tensor(dst)) })
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
    ffi_boundary!({ pos_bucket(Source::Ctx(ctx), Dst::Buf(dst, n, n_kv)) })
}

/// `llama_memory_ctx_set_input_pos_bucket` into a host I32 tensor, `ne = [n_kv, n_tokens]`.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_pos_bucket_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut g::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({ pos_bucket(Source::Ctx(ctx), Dst::Tensor(dst)) })
}

/// Writes the pending shift of every cell (`set_input_k_shift`) into `dst`
/// (`size * n_stream` elements).
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_shift(
    mem: llama_memory_t,
    dst: *mut i32,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({ k_shift(mem, Dst::Buf(dst, n, ())) })
}

/// `llama_memory_kv_set_input_k_shift` into a host I32 tensor of `size * n_stream` elements.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_shift_tensor(
    mem: llama_memory_t,
    dst: *mut g::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({ k_shift(mem, Dst::Tensor(dst)) })
}

/// Writes the K row of each token of `ubatch` placed by `sinfo`
/// (`llama_kv_cache::set_input_k_idxs`): `strm[k] * size + idxs[k][i]`, into `dst` (`n`
/// elements, at least `n_tokens`).
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_idxs(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    sinfo: *const llama_memory_slot_info,
    dst: *mut i64,
    n: usize,
) -> llama_memory_result {
    let src = Source::Caller { mem, ubatch, sinfo };
    ffi_boundary!({ row_idxs(src, Dst::Buf(dst, n, ()), KvCache::set_input_k_idxs) })
}

/// Writes the V destinations of each token of `ubatch` placed by `sinfo`
/// (`llama_kv_cache::set_input_v_idxs`) into `dst` (`n` elements: `n_tokens`, or
/// `n_tokens * n_embd_v_gqa_max` with a transposed V, whose index of token `t`, channel `j` is
/// `strm * size * n_embd_v_gqa_max + j * size + cell`).
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_v_idxs(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    sinfo: *const llama_memory_slot_info,
    dst: *mut i64,
    n: usize,
) -> llama_memory_result {
    let src = Source::Caller { mem, ubatch, sinfo };
    ffi_boundary!({ row_idxs(src, Dst::Buf(dst, n, ()), KvCache::set_input_v_idxs) })
}

/// `llama_memory_kv_set_input_k_idxs` into a host I64 tensor (llama.cpp's
/// `attn_inp_k_idxs`, `n_tokens` elements), as `llama_kv_cache::set_input_k_idxs(dst, ubatch,
/// sinfo)`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_k_idxs_tensor(
    mem: llama_memory_t,
    dst: *mut g::ggml_tensor,
    ubatch: *const llama_memory_ubatch,
    sinfo: *const llama_memory_slot_info,
) -> llama_memory_result {
    let src = Source::Caller { mem, ubatch, sinfo };
    ffi_boundary!({ row_idxs(src, Dst::Tensor(dst), KvCache::set_input_k_idxs) })
}

/// `llama_memory_kv_set_input_v_idxs` into a host I64 tensor (llama.cpp's
/// `attn_inp_v_idxs`), as `llama_kv_cache::set_input_v_idxs(dst, ubatch, sinfo)`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_v_idxs_tensor(
    mem: llama_memory_t,
    dst: *mut g::ggml_tensor,
    ubatch: *const llama_memory_ubatch,
    sinfo: *const llama_memory_slot_info,
) -> llama_memory_result {
    let src = Source::Caller { mem, ubatch, sinfo };
    ffi_boundary!({ row_idxs(src, Dst::Tensor(dst), KvCache::set_input_v_idxs) })
}

/// Writes the KQ mask of a caller's `ubatch` over the first `n_kv` cells into `dst`
/// (`llama_kv_cache::set_input_kq_mask(dst, ubatch, causal_attn)` with `dst->ne[0] = n_kv`,
/// `dst->ne[3] = n_stream`): `n_kv * n_tokens` elements, f32, or IEEE half bit patterns when
/// `f16`. The mask reads the cells as they are now (after the ubatch's apply), with the
/// cache's sliding window, ALiBi and non-causal type.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_kq_mask(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    causal_attn: bool,
    n_kv: u32,
    n_stream: u32,
    f16: bool,
    dst: *mut c_void,
    n: usize,
) -> llama_memory_result {
    let src = Source::Caller {
        mem,
        ubatch,
        sinfo: std::ptr::null(),
    };
    let shape = MaskShape {
        n_kv,
        n_stream,
        f16,
    };
    ffi_boundary!({ kq_mask(src, causal_attn, Dst::Buf(dst, n, shape)) })
}

/// `llama_memory_kv_set_input_kq_mask` into a host F32 or F16 tensor of llama.cpp's shape
/// `[n_kv, n_tokens / n_stream, 1, n_stream]`, as `llama_kv_cache::set_input_kq_mask(dst,
/// ubatch, causal_attn)`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_kq_mask_tensor(
    mem: llama_memory_t,
    dst: *mut g::ggml_tensor,
    ubatch: *const llama_memory_ubatch,
    causal_attn: bool,
) -> llama_memory_result {
    let src = Source::Caller {
        mem,
        ubatch,
        sinfo: std::ptr::null(),
    };
    ffi_boundary!({ kq_mask(src, causal_attn, Dst::Tensor(dst)) })
}

/// Writes T5 relative position buckets of a caller's `ubatch` over the first `n_kv` cells
/// (`llama_kv_cache::set_input_pos_bucket`) into `dst` (`n_kv * n_tokens` elements). Needs a
/// unified cache and a ubatch from a simple split, as upstream.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_pos_bucket(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    n_kv: u32,
    dst: *mut i32,
    n: usize,
) -> llama_memory_result {
    let src = Source::Caller {
        mem,
        ubatch,
        sinfo: std::ptr::null(),
    };
    ffi_boundary!({ pos_bucket(src, Dst::Buf(dst, n, n_kv)) })
}

/// `llama_memory_kv_set_input_pos_bucket` into a host I32 tensor `[n_kv, n_tokens]`, as
/// `llama_kv_cache::set_input_pos_bucket(dst, ubatch)`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_input_pos_bucket_tensor(
    mem: llama_memory_t,
    dst: *mut g::ggml_tensor,
    ubatch: *const llama_memory_ubatch,
) -> llama_memory_result {
    let src = Source::Caller {
        mem,
        ubatch,
        sinfo: std::ptr::null(),
    };
    ffi_boundary!({ pos_bucket(src, Dst::Tensor(dst)) })
}

/// For every token of `ubatch`, already applied to the cache, the ids of the `n` tokens before
/// it in its sequence, oldest first, into `dst` (`n_tokens * n` elements): `dst[i * n + j]` is
/// the token at distance `n - j`, -1 (`LLAMA_TOKEN_NULL`) where there is none
/// (`llama_kv_cache::get_prev_tokens`, the n-gram inputs of QWEN4EXP). A predecessor is the
/// cell of the token's first sequence at the largest position at or before the wanted one;
/// in an embedding or mixed ubatch, predecessors inside the ubatch go by row order. The cells
/// hold token ids for every row only with `llama_memory_kv_params.ngram_tokens`; without it
/// an embedding row's cell reads -1. Fails (nothing written) when `dst` does not hold exactly
/// `n_tokens * n` elements.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_prev_tokens(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    n: u32,
    dst: *mut crate::ffi::handle::llama_token,
    n_dst: usize,
) -> llama_memory_result {
    let src = Source::Caller {
        mem,
        ubatch,
        sinfo: std::ptr::null(),
    };
    ffi_boundary!({
        done(src.with_ubatch(|kv, ub| {
            let mut prev = Vec::new();
            kv.get_prev_tokens(ub, n, &mut prev)?;
            if n_dst != prev.len() {
                return Err(err!(
                    InvalidArgument,
                    "dst holds {n_dst} tokens, n_tokens * n = {}",
                    prev.len()
                ));
            }
            // SAFETY: the header requires dst to hold n_dst writable elements that nothing
            // else accesses during the call.
            let out = unsafe { buf_mut(dst, n_dst, "dst") }?;
            out.copy_from_slice(&prev);
            Ok(())
        }))
    })
}
