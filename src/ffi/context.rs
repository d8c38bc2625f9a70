//! Memory contexts of any memory kind: the batch, full and update contexts with their
//! status, steps and application.

use super::error::llama_memory_result;
use super::handle::{self, llama_memory_ctx_t, llama_memory_t, ContextHandle};
use super::ubatch::{llama_memory_ubatch, read_ubatch, ubatch_view};
use crate::error::{err, Result};
use crate::memory::MemoryContext;

use llama_memory_result::*;

/// Context status: there is work to apply (`LLAMA_MEMORY_STATUS_SUCCESS`).
pub const LLAMA_MEMORY_CTX_SUCCESS: i32 = 0;
/// Context status: nothing to do (`LLAMA_MEMORY_STATUS_NO_UPDATE`).
pub const LLAMA_MEMORY_CTX_NO_UPDATE: i32 = 1;
/// Context status: the ubatches do not fit (`LLAMA_MEMORY_STATUS_FAILED_PREPARE`).
pub const LLAMA_MEMORY_CTX_FAILED_PREPARE: i32 = 2;
/// Context status: computing failed (`LLAMA_MEMORY_STATUS_FAILED_COMPUTE`).
pub const LLAMA_MEMORY_CTX_FAILED_COMPUTE: i32 = 3;

/// Wraps a new context into a handle, reusing the memory's spare handle allocation.
fn new_ctx(
    mem: llama_memory_t,
    spare: Option<Box<ContextHandle>>,
    inner: Box<dyn MemoryContext>,
) -> llama_memory_ctx_t {
    match spare {
        Some(mut h) => {
            h.mem = mem;
            h.inner = Some(inner);
            h.views.clear();
            h.splits.clear();
            h.split_cur = 0;
            Box::into_raw(h).cast()
        }
        None => handle::to_boxed_mut_ptr(ContextHandle::new(mem, inner)),
    }
}

/// A new context over a split batch's plan, with each ubatch's batch indices.
pub(crate) fn new_ctx_with_splits(
    mem: llama_memory_t,
    inner: Box<dyn MemoryContext>,
    splits: Vec<crate::batch::Split>,
) -> llama_memory_ctx_t {
    let mut h = ContextHandle::new(mem, inner);
    h.splits = splits;
    handle::to_boxed_mut_ptr(h)
}

/// Plans a batch already split into `n_ubatches` ubatches (llama.cpp's `init_batch` after its
/// split): finds cells for each as if the previous ones were placed, then rolls the cells back.
/// Returns a context whose status is SUCCESS or FAILED_PREPARE (the batch does not fit: the
/// memory is as before, except SWA cells the simulation purged, as in llama.cpp), or NULL with
/// the last error set for invalid input. The caller owns the context and frees it with
/// `llama_memory_ctx_free`; the memory must outlive it. A steady decode loop (init, apply,
/// free, init...) reuses the freed context's allocations.
#[no_mangle]
pub extern "C" fn llama_memory_init_batch(
    mem: llama_memory_t,
    ubatches: *const llama_memory_ubatch,
    n_ubatches: usize,
) -> llama_memory_ctx_t {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        if n_ubatches == 0 {
            bail!(err!(InvalidArgument, "n_ubatches is 0"));
        }
        let descs = try_slice!(ubatches, n_ubatches, "ubatches");
        let scratch = &mut m.scratch;
        scratch.reset();
        for d in descs {
            try_or!(read_ubatch(d, scratch));
        }
        let scratch = &m.scratch;
        let mut spare = m.spare_ctx.take();
        let spare_ctx = spare.as_mut().and_then(|h| h.inner.take());
        let ctx = if let [one] = descs {
            let view = [try_or!(ubatch_view(one, scratch, 0))];
            m.inner.init_batch(&view, spare_ctx)
        } else {
            let views = try_or!(descs
                .iter()
                .enumerate()
                .map(|(k, d)| ubatch_view(d, scratch, k))
                .collect::<Result<Vec<_>>>());
            m.inner.init_batch(&views, spare_ctx)
        };
        let ctx = try_or!(ctx);
        new_ctx(mem, spare, ctx)
    })
}

/// A context covering the whole memory (`init_full`), for worst-case graph reservation; NULL
/// (last error set) on error. The caller owns it and frees it with `llama_memory_ctx_free`;
/// the memory must outlive it.
#[no_mangle]
pub extern "C" fn llama_memory_init_full(mem: llama_memory_t) -> llama_memory_ctx_t {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let ctx = try_or!(m.inner.init_full());
        new_ctx(mem, None, ctx)
    })
}

/// Takes the pending K-shift and stream copies into an update context (`init_update`); its
/// status is NO_UPDATE when there is nothing to do. A KV cache also plans a defragmentation
/// there, as the llama.cpp that still had one: with `optimize` true always, with `optimize`
/// false when its fragmentation exceeds the threshold of `llama_memory_kv_set_defrag` (none by
/// default, so `optimize` false changes nothing, as the pinned llama.cpp); the context's
/// apply moves the cells after clearing the shifts. Other memories ignore `optimize`.
/// NULL (last error set) on error. The caller owns it and frees it with
/// `llama_memory_ctx_free`; the memory must outlive it.
#[no_mangle]
pub extern "C" fn llama_memory_init_update(
    mem: llama_memory_t,
    optimize: bool,
) -> llama_memory_ctx_t {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let ctx = try_or!(m.inner.init_update(optimize));
        new_ctx(mem, None, ctx)
    })
}

/// Frees a context. NULL is accepted. Its memory must still be alive (the context hands its
/// buffers back to it for the next `llama_memory_init_batch`).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_free(ctx: llama_memory_ctx_t) {
    ffi_boundary!({
        // SAFETY: as in try_ref!; read only, before the handle is taken.
        if unsafe { handle::try_from(ctx) }.is_some_and(ContextHandle::is_view) {
            bail!(err!(
                InvalidArgument,
                "ctx is a part's view (llama_memory_ctx_get_part): it ends with its context"
            ));
        }
        // SAFETY: a non-NULL context comes from new_ctx and is not used after this call, as
        // the header requires.
        let Some(mut h) = (unsafe { handle::take_box(ctx) }) else {
            return;
        };
        h.views.clear();
        // SAFETY: the header requires the memory to outlive its contexts; no other reference
        // to it is live during this call.
        if let Some(m) = unsafe { handle::try_from_mut(h.mem) } {
            m.spare_ctx = Some(h);
        }
    })
}

/// Status of a context (`LLAMA_MEMORY_CTX_*`); FAILED_PREPARE for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_status(ctx: llama_memory_ctx_t) -> i32 {
    let failed = LLAMA_MEMORY_CTX_FAILED_PREPARE;
    ffi_boundary!(failed, {
        let c = try_ref!(failed, ctx, "ctx");
        try_or!(failed, c.ctx()).status() as i32
    })
}

/// Moves a batch context to its next ubatch; false when there is none.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_next(ctx: llama_memory_ctx_t) -> bool {
    ffi_boundary!({
        let c = try_mut!(ctx, "ctx");
        if c.is_view() {
            bail!(err!(
                InvalidArgument,
                "ctx is a part's view: move its composite's context instead"
            ));
        }
        let more = match c.inner.as_mut() {
            Some(i) => i.next(),
            None => false,
        };
        if more {
            c.split_cur += 1;
        }
        more
    })
}

/// Applies the context's current step to its memory: places the current ubatch (batch
/// context), or applies the K-shift and stream copies (update context). Fails, changing
/// nothing, if the memory changed since the plan so that a planned cell is no longer free.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_apply(ctx: llama_memory_ctx_t) -> llama_memory_result {
    ffi_boundary!({
        let c = try_mut!(ctx, "ctx");
        if c.is_view() {
            bail!(err!(
                InvalidArgument,
                "ctx is a part's view: apply its composite's context instead"
            ));
        }
        // SAFETY: the context's memory outlives it (header rule); the context handle and the
        // memory handle are distinct allocations, so the two borrows do not alias.
        let m = try_or!(unsafe { handle::try_from_mut(c.mem) }
            .ok_or_else(|| err!(NullArgument, "context has no memory")));
        let inner = try_or!(c
            .inner
            .as_mut()
            .ok_or_else(|| err!(InvalidArgument, "the context was freed")));
        try_or!(inner.apply(&mut *m.inner));
        LLAMA_MEMORY_OK
    })
}

/// Number of tokens of the current ubatch, 0 if none.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_n_tokens(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        try_or!(c.ctx()).ubatch().map_or(0, |u| u.n_tokens)
    })
}
