//! The ubatch as C hands it over (`llama_memory_ubatch`, llama.cpp's `llama_ubatch` without the
//! embeddings): its checks, and the borrowed [`Ubatch`] views the memories read.

use super::boundary::check_slice;
use super::handle::{llama_pos, llama_seq_id, llama_token, UbatchScratch};
use crate::error::{err, Result};
use crate::ubatch::Ubatch;

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
    /// `[n_tokens]` row kinds of a mixed ubatch (llama.cpp's `type`: 0 a token, 1 an
    /// embedding), or NULL for a ubatch of one kind (then `token` NULL means embeddings).
    pub type_: *const i8,
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
    check_slice(
        u.type_,
        if u.type_.is_null() { 0 } else { n },
        "ubatch.type_",
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
    scratch.reset();
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
    let (pos, unq, token, output, embd) = unsafe {
        (
            std::slice::from_raw_parts(u.pos, n * u.n_pos as usize),
            std::slice::from_raw_parts(u.seq_id_unq, u.n_seqs_unq as usize),
            (!u.token.is_null()).then(|| std::slice::from_raw_parts(u.token, n)),
            (!u.output.is_null()).then(|| std::slice::from_raw_parts(u.output, n)),
            (!u.type_.is_null()).then(|| std::slice::from_raw_parts(u.type_, n)),
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
        embd,
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

/// Reads one C ubatch description (after [`UbatchScratch::reset`]) and returns its view.
pub(crate) fn read_one_ubatch<'a>(
    u: &'a llama_memory_ubatch,
    scratch: &'a mut UbatchScratch,
) -> Result<Ubatch<'a>> {
    scratch.reset();
    read_ubatch(u, scratch)?;
    ubatch_view(u, scratch, 0)
}
