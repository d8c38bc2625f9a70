//! K/V tensor storage and state save/restore: a KV cache with tensors, and llama.h's `state_*`
//! functions on a memory handle, with llama.cpp's byte layouts.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use super::handle::{llama_memory_t, llama_seq_id, llama_token};
use crate::error::{err, Result};
use crate::state;

/// `llama_state_seq_flags` of llama.h, the first type of the state family.
///
/// The family: `llama_memory_state_*` save and restore any memory in llama.cpp's byte layouts
/// (whole state, sequence blobs with and without flags, sequence files), into and from caller
/// buffers and paths; `llama_memory_state_write_io` / `_read_io` do the same through caller
/// callbacks. A failed restore leaves the memory unchanged (or, in stock-compatible mode,
/// as llama.cpp leaves it). The `ON_DEVICE` stash lives in the memory handle.
#[allow(non_camel_case_types)]
pub type llama_state_seq_flags = u32;

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`: only the partial (SWA, recurrent) parts of a memory;
/// a plain KV cache has none and writes its whole state, as llama.cpp.
pub const LLAMA_MEMORY_STATE_SEQ_FLAGS_PARTIAL_ONLY: u32 = 1;
/// `LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`: the tensor bytes stay with the memory handle (one stash
/// per source sequence, replaced by the next such save of that sequence); the blob holds only
/// the metadata. Restore it with the same flag on the same handle.
pub const LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE: u32 = 2;

/// Size of the memory's whole state (`llama_state_get_size` without the architecture name),
/// 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_get_size(mem: llama_memory_t) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(state::get_size(&*m.inner))
    })
}

/// Writes the whole state into `dst` (`size` bytes). Returns the bytes written, 0 on error
/// (too small a buffer included).
#[no_mangle]
pub extern "C" fn llama_memory_state_get_data(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let out = try_slice_mut!(dst, size, "dst");
        try_or!(state::get_data(&*m.inner, out))
    })
}

/// Replaces the whole memory with a state. Returns the bytes read; 0 on error, with the memory
/// unchanged (llama.cpp leaves it cleared or half-restored).
#[no_mangle]
pub extern "C" fn llama_memory_state_set_data(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let inp = try_slice!(src, size, "src");
        try_or!(state::set_data(&mut *m.inner, inp))
    })
}

/// `llama_state_seq_get_size`: bytes of `seq_id`'s blob, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_size(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_get_size_ext(mem, seq_id, 0)
}

/// `llama_state_seq_get_data`: writes `seq_id`'s blob (the bytes llama.cpp writes). Returns the
/// bytes written, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_data(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
    seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_get_data_ext(mem, dst, size, seq_id, 0)
}

/// `llama_state_seq_set_data`: restores a blob into `dest_seq_id` (-1: the whole memory).
/// Returns the bytes read, 0 on error. On error the memory is unchanged (llama.cpp instead
/// erases the destination sequence).
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_set_data(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
    dest_seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_set_data_ext(mem, src, size, dest_seq_id, 0)
}

/// `llama_state_seq_get_size_ext`; with `ON_DEVICE` the tensor bytes are not counted.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_size_ext(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(state::seq_get_size(&*m.inner, seq_id, flags))
    })
}

/// `llama_state_seq_get_data_ext`.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_data_ext(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let out = try_slice_mut!(dst, size, "dst");
        try_or!(state::seq_get_data(
            &*m.inner,
            out,
            seq_id,
            flags,
            &mut m.stash
        ))
    })
}

/// `llama_state_seq_set_data_ext`.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_set_data_ext(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
    dest_seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let inp = try_slice!(src, size, "src");
        try_or!(state::seq_set_data(
            &mut *m.inner,
            inp,
            dest_seq_id,
            flags,
            &m.stash
        ))
    })
}

fn path_of(p: *const c_char) -> Result<PathBuf> {
    if p.is_null() {
        return Err(err!(NullArgument, "filepath is NULL"));
    }
    // SAFETY: the header requires a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    Ok(PathBuf::from(s.to_str().map_err(|_| {
        err!(InvalidArgument, "filepath is not UTF-8")
    })?))
}

/// `llama_state_seq_save_file`: writes a sequence-state file (magic 'ggsq', version 4, the
/// tokens, then the sequence's state). Returns the file size, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_save_file(
    mem: llama_memory_t,
    filepath: *const c_char,
    seq_id: llama_seq_id,
    tokens: *const llama_token,
    n_token_count: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let path = try_or!(path_of(filepath));
        let toks = try_slice!(tokens, n_token_count, "tokens");
        try_or!(state::seq_save_file(&*m.inner, &path, seq_id, toks))
    })
}

/// `llama_state_seq_load_file`: reads a sequence-state file into `dest_seq_id`. With
/// `tokens_out == NULL` only the header is checked: the token count goes to
/// `*n_token_count_out` and 12 is returned, nothing is loaded (as llama.cpp). Otherwise the
/// tokens (at most `n_token_capacity`) are copied out and the state restored; returns the
/// file offset after the state, 0 on error with the memory unchanged.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_load_file(
    mem: llama_memory_t,
    filepath: *const c_char,
    dest_seq_id: llama_seq_id,
    tokens_out: *mut llama_token,
    n_token_capacity: usize,
    n_token_count_out: *mut usize,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let path = try_or!(path_of(filepath));
        let count = try_slice_mut!(n_token_count_out, 1, "n_token_count_out");
        let toks = if tokens_out.is_null() {
            None
        } else {
            Some(try_slice_mut!(tokens_out, n_token_capacity, "tokens_out"))
        };
        let r = try_or!(state::seq_load_file(
            &mut *m.inner,
            &path,
            dest_seq_id,
            toks
        ));
        count[0] = r.n_tokens;
        r.read
    })
}
