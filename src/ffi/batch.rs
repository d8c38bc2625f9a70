//! A whole batch handed to the memory, which splits it into ubatches as llama.cpp's
//! `llama_batch_allocr` does for that memory's `init_batch` (`split_simple`, `split_equal`,
//! `split_seq`, with the memory kind's strategy and retry), for C callers that have a batch
//! and no splitter of their own.

use super::context::new_ctx_with_splits;
use super::handle::{llama_memory_ctx_t, llama_memory_t, llama_pos, llama_seq_id, llama_token};
use crate::batch::{init_batch_whole, Batch};
use crate::error::err;

/// A batch as llama.h's `llama_batch` describes its tokens (no embeddings): token `i` has id
/// `token[i]`, positions `pos[j * n_tokens + i]` for each of the `n_pos` sections, and the
/// `n_seq_id[i]` sequences `seq_id[i][0..n_seq_id[i]]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_batch {
    /// Tokens in the batch.
    pub n_tokens: u32,
    /// Position sections per token: 1, or 4 for M-RoPE.
    pub n_pos: u32,
    /// `[n_tokens]` token ids, or NULL.
    pub token: *const llama_token,
    /// `[n_tokens * n_pos]` positions, section-major.
    pub pos: *const llama_pos,
    /// `[n_tokens]` number of sequence ids of each token (>= 1).
    pub n_seq_id: *const i32,
    /// `[n_tokens]` pointers to each token's sequence ids.
    pub seq_id: *const *const llama_seq_id,
    /// `[n_tokens]` output flags, or NULL.
    pub logits: *const i8,
}

/// Splits a whole batch into ubatches of at most `n_ubatch` tokens as llama.cpp's
/// `init_batch` of this memory does, and plans them: a KV cache splits simply with one stream
/// and by equal sequential sets with several; a sliding-window pair tries the simple split
/// first when unified and falls back to an equal split when that split does not fit; a
/// recurrent memory and the hybrids split by sequence when `embd_all` (every token is an
/// output), else into equal sets that keep each sequence's last `n_rs_seq + 1` tokens
/// together. Returns a context as `llama_memory_init_batch` does (SUCCESS, or FAILED_PREPARE
/// when no split fits; NULL with the last error set for an invalid batch: NULL arrays, a
/// token without sequences, an id outside `[0, n_seq_max)`, `n_ubatch` 0). Its current
/// ubatch's tokens are `llama_memory_ctx_get_batch_idxs`. The caller owns the context and
/// frees it with `llama_memory_ctx_free`; `batch` is not kept.
///
/// Unlike llama.cpp's allocator, positions are not checked against the memory (continuity is
/// the caller's).
#[no_mangle]
pub extern "C" fn llama_memory_init_batch_split(
    mem: llama_memory_t,
    batch: *const llama_memory_batch,
    n_ubatch: u32,
    embd_all: bool,
) -> llama_memory_ctx_t {
    ffi_boundary!({
        let b = try_arg!(batch, "batch");
        let n = b.n_tokens as usize;
        if n == 0 {
            bail!(err!(InvalidArgument, "the batch has no tokens"));
        }
        if b.n_pos != 1 && b.n_pos != 4 {
            bail!(err!(
                InvalidArgument,
                "n_pos = {} (expected 1 or 4)",
                b.n_pos
            ));
        }
        let pos = try_slice!(b.pos, n * b.n_pos as usize, "batch.pos");
        let n_seq_id = try_slice!(b.n_seq_id, n, "batch.n_seq_id");
        let seq_id = try_slice!(b.seq_id, n, "batch.seq_id");
        let token = if b.token.is_null() {
            None
        } else {
            Some(try_slice!(b.token, n, "batch.token"))
        };
        let logits = if b.logits.is_null() {
            None
        } else {
            Some(try_slice!(b.logits, n, "batch.logits"))
        };
        let mut off = Vec::with_capacity(n + 1);
        let mut ids = Vec::new();
        off.push(0u32);
        for (i, (&k, &p)) in n_seq_id.iter().zip(seq_id).enumerate() {
            if k < 1 || k as usize > crate::cells::MAX_SEQ {
                bail!(err!(InvalidArgument, "token {i} has {k} sequence ids"));
            }
            ids.extend_from_slice(try_slice!(p, k as usize, "batch.seq_id[i]"));
            off.push(ids.len() as u32);
        }
        let view = Batch {
            token,
            pos,
            n_pos: b.n_pos,
            seq_off: &off,
            seq_ids: &ids,
            output: logits,
        };
        let m = try_mut!(mem, "mem");
        let (ctx, splits) = try_or!(init_batch_whole(&mut *m.inner, &view, n_ubatch, embd_all));
        new_ctx_with_splits(mem, ctx, splits)
    })
}

/// The batch indices of the current ubatch of a context made by
/// `llama_memory_init_batch_split`, in ubatch order: copies `min(count, cap)` of them into
/// `out` (NULL with `cap` 0 to ask the count) and returns the count; 0 for a context without
/// a split (or NULL, last error set).
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_batch_idxs(
    ctx: llama_memory_ctx_t,
    out: *mut i32,
    cap: usize,
) -> usize {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let Some(s) = c.splits.get(c.split_cur) else {
            bail!(err!(
                InvalidArgument,
                "the context has no split ubatch (not made by llama_memory_init_batch_split)"
            ));
        };
        let k = s.idxs.len().min(cap);
        if k > 0 {
            let dst = try_slice_mut!(out, k, "out");
            for (d, &i) in dst.iter_mut().zip(&s.idxs) {
                *d = i as i32;
            }
        }
        s.idxs.len()
    })
}
