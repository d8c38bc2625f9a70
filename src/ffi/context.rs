//! Memory contexts of any memory kind: the ubatch description read from C, the context
//! handle, and the batch, full and update contexts with their status, steps and application.

use super::boundary::check_slice;
use super::error::llama_memory_result;
use super::handle::{self, Castable, OwnershipBox};
use super::memory::{llama_memory_t, llama_pos, llama_seq_id, llama_token, MemoryHandle};
use crate::error::{err, Result};
use crate::memory::{find_ctx, MemoryContext};
use crate::ubatch::Ubatch;

use llama_memory_result::*;

/// A ubatch as llama.cpp's `llama_ubatch` describes it; the fields match its fields, so an
/// adapter fills it from a `llama_ubatch` without copying token data. Everything but the
/// embeddings is here.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_ubatch {
    /// Total tokens (`n_seq_tokens * n_seqs`).
    pub n_tokens: u32,
    /// Tokens per sequence set (1 for a simple split).
    pub n_seq_tokens: u32,
    /// Sequence sets (`n_tokens` for a simple split).
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
    /// `[n_seqs_unq]` distinct sequence ids, ascending: exactly the ids the tokens use.
    pub seq_id_unq: *const llama_seq_id,
    /// `[256]` index of each sequence id in `seq_id_unq`, -1 if absent; may be NULL (it is
    /// derived from `seq_id_unq`, and checked against it when given).
    pub seq_idx: *const i32,
    /// `[n_tokens]` output flags, or NULL.
    pub output: *const i8,
}

/// Flattened sequence ids of the ubatches of one call, kept in the memory handle so that
/// reading a ubatch from C does not allocate once the buffers have grown.
#[derive(Debug, Default)]
pub(crate) struct UbatchScratch {
    seq_off: Vec<u32>,
    seq_ids: Vec<i32>,
    /// Per ubatch, its ranges in `seq_off` and `seq_ids`.
    spans: Vec<(usize, usize, usize, usize)>,
}

/// Checks a C ubatch description's counts and pointers and appends its sequence ids to
/// `scratch`. The arrays are borrowed later by [`ubatch_view`].
pub(crate) fn read_ubatch(u: &llama_memory_ubatch, scratch: &mut UbatchScratch) -> Result<()> {
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
    for (p, what) in [
        (u.pos.is_null(), "pos"),
        (u.n_seq_id.is_null(), "n_seq_id"),
        (u.seq_id.is_null(), "seq_id"),
        (u.seq_id_unq.is_null(), "seq_id_unq"),
    ] {
        if p {
            return Err(err!(NullArgument, "ubatch.{what} is NULL"));
        }
    }
    check_slice(u.pos, n * u.n_pos as usize, "ubatch.pos")?;
    check_slice(u.n_seq_id, n, "ubatch.n_seq_id")?;
    check_slice(u.seq_id, n, "ubatch.seq_id")?;
    check_slice(u.seq_id_unq, u.n_seqs_unq as usize, "ubatch.seq_id_unq")?;
    check_slice(
        u.token,
        if u.token.is_null() { 0 } else { n },
        "ubatch.token",
    )?;
    check_slice(
        u.output,
        if u.output.is_null() { 0 } else { n },
        "ubatch.output",
    )?;
    let n_idx = if u.seq_idx.is_null() {
        0
    } else {
        crate::cells::MAX_SEQ
    };
    check_slice(u.seq_idx, n_idx, "ubatch.seq_idx")?;
    // SAFETY: the header requires n_seq_id and seq_id to hold n_tokens elements; check_slice
    // refused NULL, misaligned and oversized arrays.
    let (n_seq_id, seq_ptrs) = unsafe {
        (
            std::slice::from_raw_parts(u.n_seq_id, n),
            std::slice::from_raw_parts(u.seq_id, n),
        )
    };
    let off0 = scratch.seq_off.len();
    let ids0 = scratch.seq_ids.len();
    scratch.seq_off.push(0);
    for (i, (&k, &p)) in n_seq_id.iter().zip(seq_ptrs).enumerate() {
        if k <= 0 || k as usize > crate::cells::MAX_SEQ {
            return Err(err!(InvalidUbatch, "token {i} has n_seq_id = {k}"));
        }
        check_slice(p, k as usize, "ubatch.seq_id[i]")?;
        // SAFETY: seq_id[i] points to n_seq_id[i] ids (at most 256), as the header requires;
        // check_slice refused NULL and misaligned pointers.
        scratch
            .seq_ids
            .extend_from_slice(unsafe { std::slice::from_raw_parts(p, k as usize) });
        scratch.seq_off.push((scratch.seq_ids.len() - ids0) as u32);
    }
    scratch
        .spans
        .push((off0, scratch.seq_off.len(), ids0, scratch.seq_ids.len()));
    Ok(())
}

/// Reads C ubatch descriptions into `scratch` and returns the borrowed ubatches over them.
pub(crate) fn ubatch_views<'a>(
    descs: &'a [llama_memory_ubatch],
    scratch: &'a mut UbatchScratch,
) -> Result<Vec<Ubatch<'a>>> {
    scratch.seq_off.clear();
    scratch.seq_ids.clear();
    scratch.spans.clear();
    for d in descs {
        read_ubatch(d, scratch)?;
    }
    let scratch = &*scratch;
    descs
        .iter()
        .enumerate()
        .map(|(k, d)| ubatch_view(d, scratch, k))
        .collect()
}

/// The borrowed ubatch over a C description read by [`read_ubatch`] into span `k`.
pub(crate) fn ubatch_view<'a>(
    u: &'a llama_memory_ubatch,
    scratch: &'a UbatchScratch,
    k: usize,
) -> Result<Ubatch<'a>> {
    let n = u.n_tokens as usize;
    let (o0, o1, i0, i1) = scratch.spans[k];
    // SAFETY: read_ubatch checked these pointers (NULL, alignment, size against isize::MAX);
    // the header requires them to hold the documented number of elements for the call.
    let (pos, unq, token, output) = unsafe {
        (
            std::slice::from_raw_parts(u.pos, n * u.n_pos as usize),
            std::slice::from_raw_parts(u.seq_id_unq, u.n_seqs_unq as usize),
            (!u.token.is_null()).then(|| std::slice::from_raw_parts(u.token, n)),
            (!u.output.is_null()).then(|| std::slice::from_raw_parts(u.output, n)),
        )
    };
    let ub = Ubatch {
        n_tokens: u.n_tokens,
        n_seq_tokens: u.n_seq_tokens,
        n_seqs: u.n_seqs,
        n_pos: u.n_pos,
        equal_seqs: u.equal_seqs != 0,
        token,
        pos,
        seq_off: &scratch.seq_off[o0..o1],
        seq_ids: &scratch.seq_ids[i0..i1],
        seq_id_unq: unq,
        output,
    };
    if !u.seq_idx.is_null() {
        // SAFETY: the header requires seq_idx, when not NULL, to hold 256 entries; read_ubatch
        // checked its alignment.
        let idx = unsafe { std::slice::from_raw_parts(u.seq_idx, crate::cells::MAX_SEQ) };
        for (s, &v) in idx.iter().enumerate() {
            let want = ub.seq_idx(s as i32).map_or(-1, |k| k as i32);
            if v != want {
                return Err(err!(
                    InvalidUbatch,
                    "seq_idx[{s}] is {v}, but seq_id_unq gives {want}"
                ));
            }
        }
    }
    Ok(ub)
}

impl UbatchScratch {
    /// Forgets the ubatches read before.
    pub(crate) fn reset(&mut self) {
        self.seq_off.clear();
        self.seq_ids.clear();
        self.spans.clear();
    }
}

/// Reads one C ubatch description (after [`UbatchScratch::reset`]) and returns its view.
pub(crate) fn read_one_ubatch<'a>(
    u: &'a llama_memory_ubatch,
    scratch: &'a mut UbatchScratch,
) -> Result<Ubatch<'a>> {
    scratch.reset();
    read_ubatch(u, scratch)?;
    ubatch_view(u, scratch, 0)
}

/// A memory context handle: the plan for one batch, a full reservation, or an update.
#[allow(non_camel_case_types)]
pub struct llama_memory_ctx {
    _private: [u8; 0],
}

impl Castable for llama_memory_ctx {
    type Ownership = OwnershipBox;
    type RustType = ContextHandle;
}

/// What a context handle holds: the plan of any memory kind, and the memory it belongs to.
pub(crate) struct ContextHandle {
    mem: llama_memory_t,
    /// Always `Some` in a live handle; taken out while the allocation waits for reuse.
    inner: Option<Box<dyn MemoryContext>>,
}

impl ContextHandle {
    fn ctx(&self) -> Result<&dyn MemoryContext> {
        self.inner
            .as_deref()
            .ok_or_else(|| err!(InvalidArgument, "the context was freed"))
    }

    /// The context of kind `T`: this one, or its only sub-context of that kind.
    pub(crate) fn find<T: MemoryContext>(&self) -> Result<&T> {
        find_ctx::<T>(self.ctx()?)
    }

    /// The memory the context was made from.
    /// The memory the context was made from, as the raw handle (for the inputs whose
    /// reading changes the memory: the recurrent `s_copy` consumes pending rollbacks).
    pub(crate) fn memory_ptr(&self) -> llama_memory_t {
        self.mem
    }

    pub(crate) fn memory(&self) -> Result<&MemoryHandle> {
        // SAFETY: the context's memory outlives it (header rule) and is not mutated while the
        // caller is inside a function that only reads it.
        unsafe { handle::try_from(self.mem) }
            .ok_or_else(|| err!(NullArgument, "context has no memory"))
    }
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
            Box::into_raw(h).cast()
        }
        None => handle::to_boxed_mut_ptr(ContextHandle {
            mem,
            inner: Some(inner),
        }),
    }
}

/// Plans a batch already split into `n_ubatches` ubatches (llama.cpp's `init_batch` after its
/// split): finds cells for each as if the previous ones were placed, then rolls the cells back.
/// Returns a context whose status is SUCCESS or FAILED_PREPARE (the batch does not fit: the
/// memory is as before, except SWA cells the simulation purged, as in llama.cpp), or NULL with
/// the last error set for invalid input. The memory must outlive the context. A steady decode
/// loop (init, apply, free, init...) reuses the freed context's allocations.
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

/// A context covering the whole memory (`init_full`), for worst-case graph reservation.
#[no_mangle]
pub extern "C" fn llama_memory_init_full(mem: llama_memory_t) -> llama_memory_ctx_t {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let ctx = try_or!(m.inner.init_full());
        new_ctx(mem, None, ctx)
    })
}

/// Takes the pending K-shift and stream copies into an update context (`init_update`); its
/// status is NO_UPDATE when there is nothing to do. `optimize` is ignored, as in llama.cpp.
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
        // SAFETY: a non-NULL context comes from new_ctx and is not used after this call, as
        // the header requires.
        let Some(h) = (unsafe { handle::take_box(ctx) }) else {
            return;
        };
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
        match c.inner.as_mut() {
            Some(i) => i.next(),
            None => false,
        }
    })
}

/// Applies the context's current step to its memory: places the current ubatch (batch
/// context), or applies the K-shift and stream copies (update context). Fails, changing
/// nothing, if the memory changed since the plan so that a planned cell is no longer free.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_apply(ctx: llama_memory_ctx_t) -> llama_memory_result {
    ffi_boundary!({
        let c = try_mut!(ctx, "ctx");
        // SAFETY: the context's memory outlives it (header rule); the context handle and the
        // memory handle are distinct allocations, so the two borrows do not alias.
        let m = try_or!(unsafe { handle::try_from_mut(c.mem) }
            .ok_or_else(|| err!(NullArgument, "context has no memory")));
        let inner = try_or!(c
            .inner
            .as_mut()
            .ok_or_else(|| err!(InvalidArgument, "the context was freed")));
        try_or!(inner.apply(m.inner.as_mut()));
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
