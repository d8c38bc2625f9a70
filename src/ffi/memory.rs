//! The memory family: what every memory handle (`llama_memory_t`, see `llama_memory_i`) offers
//! whatever its kind: llama.h's nine memory functions, `llama_memory_free`, the sequence count,
//! the memory breakdown and the version. The constructors are the kinds' own (`kv/`,
//! `recurrent.rs`).

use std::ffi::{c_char, c_int};

use super::handle::{free_box, llama_memory_t, llama_pos, llama_seq_id};

/// Major version.
pub const LLAMA_MEMORY_VERSION_MAJOR: u32 = 0;
/// Minor version.
pub const LLAMA_MEMORY_VERSION_MINOR: u32 = 1;
/// Patch version.
pub const LLAMA_MEMORY_VERSION_PATCH: u32 = 0;

/// This library's version, "MAJOR.MINOR.PATCH" (static string).
#[no_mangle]
pub extern "C" fn llama_memory_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Frees a memory made by any constructor (`llama_memory_kv_init`,
/// `llama_memory_kv_init_with_storage`, `llama_memory_rs_init`). NULL is accepted. Contexts
/// made from it must be freed first; its tensors end with it.
#[no_mangle]
pub extern "C" fn llama_memory_free(mem: llama_memory_t) {
    ffi_boundary!({
        // SAFETY: a non-NULL handle comes from a constructor and the header forbids using it
        // after this call.
        unsafe { free_box(mem) }
    })
}

/// Clears the memory contents; `data` also clears the tensor buffers. NULL: no-op.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_clear(mem: llama_memory_t, data: bool) {
    clear(mem, data)
}

/// Removes the tokens of `seq_id` (any sequence when -1) with positions in `[p0, p1)`.
/// Returns true on success, as llama.h (also for NULL `mem`, as llama.h). Returns false with
/// the last error set for a `seq_id` outside `[-1, n_seq_max)` (llama.cpp aborts there).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    seq_rm(mem, seq_id, p0, p1)
}

/// Copies the tokens of `seq_id_src` in `[p0, p1)` to `seq_id_dst`. On invalid ids, or a
/// partial range between streams (llama.cpp aborts on both), sets the last error and changes
/// nothing.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_cp(
    mem: llama_memory_t,
    seq_id_src: llama_seq_id,
    seq_id_dst: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) {
    seq_cp(mem, seq_id_src, seq_id_dst, p0, p1)
}

/// Removes every token that does not belong to `seq_id` (in its stream).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_keep(mem: llama_memory_t, seq_id: llama_seq_id) {
    seq_keep(mem, seq_id)
}

/// Adds `delta` to the positions of `seq_id` in `[p0, p1)`.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_add(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    delta: llama_pos,
) {
    seq_add(mem, seq_id, p0, p1, delta)
}

/// Divides the positions of `seq_id` in `[p0, p1)` by `d`. `d <= 0` (undefined in llama.cpp)
/// sets the last error and changes nothing; `d == 1` is a no-op.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_div(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    d: c_int,
) {
    seq_div(mem, seq_id, p0, p1, d)
}

/// Smallest position of `seq_id`, -1 if empty, NULL `mem` or invalid `seq_id` (last error set).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_pos_min(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    seq_pos_min(mem, seq_id)
}

/// Largest position of `seq_id`, -1 if empty, NULL `mem` or invalid `seq_id` (last error set).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_pos_max(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    seq_pos_max(mem, seq_id)
}

/// Whether the memory supports position shifts; false for NULL.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_can_shift(mem: llama_memory_t) -> bool {
    can_shift(mem)
}

/// Number of sequences of the memory, 0 for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_n_seq_max(mem: llama_memory_t) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        m.inner.n_seq_max()
    })
}

/// Stock-compatible mode, for a caller that must behave exactly as llama.cpp (the drop-in
/// libllama turns it on for every memory it creates). With `on`:
/// - a unified KV cache accepts sequence ids in `[n_seq_max, 256)` in its sequence operations
///   and sequence states, as llama.cpp does (its batch allocator checks ubatch ids against
///   `n_seq_max` before they get here);
/// - a failed restore (`llama_memory_state_*set_data*`, `_load_file`, `_read_io`) has
///   llama.cpp's effect instead of none: a KV cache erases the destination sequence (removed,
///   the rows it held alone zeroed) once the failure is past the stream count and inside a
///   stream, and clears the whole cache for a whole restore that got past the stream count; a
///   recurrent memory erases the destination (or clears everything) once the cell count was
///   read. No stream is ever left half restored, where llama.cpp may leave one.
///
/// Off by default. Returns OK, or an error for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_set_stock_compat(
    mem: llama_memory_t,
    on: bool,
) -> super::error::llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        m.inner.set_stock_compat(on);
        super::error::llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Memory breakdown (`llama_memory_i::memory_breakdown`; the name differs because libllama's
/// own C++ headers take `llama_memory_breakdown` for its result type) of any memory: writes up to `cap`
/// (buffer type, bytes) pairs, each buffer type once (a composite adds up its parts), and
/// returns how many there are (call with `cap = 0` to size the arrays). 0 for a memory without
/// tensors, and on error (last error set).
#[no_mangle]
pub extern "C" fn llama_memory_get_breakdown(
    mem: llama_memory_t,
    bufts: *mut *mut ggml_sys::ggml_backend_buffer_type,
    sizes: *mut usize,
    cap: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(super::boundary::write_breakdown(
            &m.inner.memory_breakdown(),
            bufts,
            sizes,
            cap
        ))
    })
}

// The bodies of the nine llama.h-named functions, shared with the drop-in build's
// non-clashing names (`super::dropin`).
pub(super) fn clear(mem: llama_memory_t, data: bool) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        m.inner.clear(data);
    })
}

pub(super) fn seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    ffi_boundary!({
        // llama.h: a NULL memory has nothing to remove, which succeeds.
        let m = try_mut!(true, mem, "mem");
        try_or!(m.inner.seq_rm(seq_id, p0, p1))
    })
}

pub(super) fn seq_cp(
    mem: llama_memory_t,
    seq_id_src: llama_seq_id,
    seq_id_dst: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_cp(seq_id_src, seq_id_dst, p0, p1));
    })
}

pub(super) fn seq_keep(mem: llama_memory_t, seq_id: llama_seq_id) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_keep(seq_id));
    })
}

pub(super) fn seq_add(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    delta: llama_pos,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_add(seq_id, p0, p1, delta));
    })
}

pub(super) fn seq_div(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    d: c_int,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_div(seq_id, p0, p1, d));
    })
}

pub(super) fn seq_pos_min(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(m.inner.seq_pos_min(seq_id))
    })
}

pub(super) fn seq_pos_max(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(m.inner.seq_pos_max(seq_id))
    })
}

pub(super) fn can_shift(mem: llama_memory_t) -> bool {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        m.inner.can_shift()
    })
}
