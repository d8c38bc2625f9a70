//! The drop-in build's names for the nine llama.h-named functions (cargo feature `dropin`).
//!
//! The drop-in libllama (`-DLLAMA_MEMORY_DROPIN=ON`) exports llama.h's `llama_memory_seq_rm`
//! and friends itself, forwarding to `llama_memory_i` as stock does, and links this library
//! statically inside it. Built with `--features dropin`, this library leaves llama.h's nine
//! names out and exports these instead, so the two cannot clash or interpose; the adapters
//! (`llama/`) reach them through `llama/llama-memory-abi.h`. Same signatures, same behaviour.

use super::handle::{llama_memory_t, llama_pos, llama_seq_id};
use super::memory;
use std::ffi::c_int;

/// `llama_memory_clear`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_clear(mem: llama_memory_t, data: bool) {
    memory::clear(mem, data)
}

/// `llama_memory_seq_rm`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    memory::seq_rm(mem, seq_id, p0, p1)
}

/// `llama_memory_seq_cp`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_cp(
    mem: llama_memory_t,
    seq_id_src: llama_seq_id,
    seq_id_dst: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) {
    memory::seq_cp(mem, seq_id_src, seq_id_dst, p0, p1)
}

/// `llama_memory_seq_keep`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_keep(mem: llama_memory_t, seq_id: llama_seq_id) {
    memory::seq_keep(mem, seq_id)
}

/// `llama_memory_seq_add`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_add(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    delta: llama_pos,
) {
    memory::seq_add(mem, seq_id, p0, p1, delta)
}

/// `llama_memory_seq_div`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_div(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    d: c_int,
) {
    memory::seq_div(mem, seq_id, p0, p1, d)
}

/// `llama_memory_seq_pos_min`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_pos_min(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
) -> llama_pos {
    memory::seq_pos_min(mem, seq_id)
}

/// `llama_memory_seq_pos_max`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_seq_pos_max(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
) -> llama_pos {
    memory::seq_pos_max(mem, seq_id)
}

/// `llama_memory_can_shift`.
#[no_mangle]
pub extern "C" fn llama_memory_dropin_can_shift(mem: llama_memory_t) -> bool {
    memory::can_shift(mem)
}
