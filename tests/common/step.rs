//! The C ubatch of one decode step, one token for each of `tok.len()` sequences (the shape of
//! llama.cpp's simple split for it), over the caller's arrays: `tests/alloc_steady.rs` counts
//! its allocations and `benches/decode.rs` times it. Builds no buffer of its own.

use llama_memory::ffi::llama_memory_ubatch;

/// `seq_id[i]` points at the id of token `i`'s one sequence (`n_seq_id[i]` is 1);
/// `seq_id_unq` lists the sequences once each. The arrays must outlive the ubatch's use.
pub fn decode_ubatch(
    tok: &[i32],
    pos: &[i32],
    n_seq_id: &[i32],
    seq_id: &[*const i32],
    seq_id_unq: &[i32],
) -> llama_memory_ubatch {
    let n = tok.len() as u32;
    llama_memory_ubatch {
        n_tokens: n,
        n_seq_tokens: 1,
        n_seqs: n,
        n_seqs_unq: n,
        n_pos: 1,
        equal_seqs: 0,
        token: tok.as_ptr(),
        pos: pos.as_ptr(),
        n_seq_id: n_seq_id.as_ptr(),
        seq_id: seq_id.as_ptr(),
        seq_id_unq: seq_id_unq.as_ptr(),
        seq_idx: std::ptr::null(),
        output: std::ptr::null(),
        type_: std::ptr::null(),
    }
}
