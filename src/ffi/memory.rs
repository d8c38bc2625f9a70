//! The memory family: what every memory handle (`llama_memory_t`, see `llama_memory_i`) offers
//! whatever its kind: llama.h's nine memory functions, `llama_memory_free`, the sequence count,
//! the memory breakdown and the version. The constructors are the kinds' own (`kv/`,
//! `recurrent.rs`).

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;

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
/// A handle that became a view of a composite's part (`llama_memory_iswa_init`,
/// `llama_memory_hybrid_init`) is refused (last error set): it ends with the composite.
#[no_mangle]
pub extern "C" fn llama_memory_free(mem: llama_memory_t) {
    ffi_boundary!({
        // SAFETY: as in try_ref!; read only, before the handle is freed.
        if unsafe { super::handle::try_from(mem) }.is_some_and(|m| m.inner.is_part()) {
            bail!(crate::error::err!(
                InvalidArgument,
                "mem is a part of a composite memory: it ends with the composite"
            ));
        }
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

/// What `llama_memory_seq_rm(mem, seq_id, p0, p1)` would return now, without changing anything:
/// false only where the removal cannot be made (a recurrent memory asked to drop the end of a
/// sequence's state that no rollback plane can undo), so that a caller can choose between
/// trimming a sequence and processing it again before it changes anything. True for NULL (as
/// `llama_memory_seq_rm`); false with the last error set for an id `llama_memory_seq_rm`
/// refuses.
#[no_mangle]
pub extern "C" fn llama_memory_can_seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    ffi_boundary!({
        let m = try_ref!(true, mem, "mem");
        try_or!(m.inner.can_seq_rm(seq_id, p0, p1))
    })
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
///   `n_seq_max` before they get here); a recurrent memory accepts them in `seq_keep` (which
///   then keeps nothing) and in its sequence state (empty), as llama.cpp's;
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

/// Opt-in non-finite check (off by default): with `on`, a restore from a blob or a file
/// (`llama_memory_state_*set_data*`, `_load_file`) refuses F32, F16 and BF16 tensor data that
/// holds a NaN or an infinity, as invalid input (failure value, last error, nothing changed or,
/// in stock-compatible mode, llama.cpp's failure effect). Quantized data is not read. A
/// restore through `llama_memory_state_read_io` leaves the bytes to the caller's reader (which
/// can check them with [`llama_memory_data_is_finite`]). Off by default because a valid f16
/// cache can hold an infinity after an overflow; what a NaN does to other sequences: README,
/// "Non-finite values". A composite passes it to its parts. Returns OK, or an error for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_set_check_finite(
    mem: llama_memory_t,
    on: bool,
) -> super::error::llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        m.inner.set_check_finite(on);
        super::error::llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Whether `size` bytes at `data`, elements of the ggml type `type_id` (a `ggml_type`: F32,
/// F16 or BF16; other types are not read and count as finite), hold no NaN and no infinity: 1 when they do not, 0 when
/// they do (the first such element's index in `*index_out`, when it is not NULL), -1 with a
/// last error for NULL `data` with a non-zero size.
#[no_mangle]
pub extern "C" fn llama_memory_data_is_finite(
    type_id: i32,
    data: *const u8,
    size: usize,
    index_out: *mut usize,
) -> i32 {
    ffi_boundary!({
        let bytes = try_slice!(data, size, "data");
        let ty = u32::try_from(type_id).unwrap_or(u32::MAX);
        match crate::finite::first_non_finite(ty, bytes) {
            None => 1,
            Some(i) => {
                if !index_out.is_null() {
                    // SAFETY: the header requires `index_out` to be NULL or writable.
                    unsafe { index_out.write(i) };
                }
                0
            }
        }
    })
}

/// A log callback: `level` is ggml's `ggml_log_level` (1 debug, 2 info, 3 warn, 4 error),
/// `text` one NUL-terminated line ending in a newline, valid during the call.
#[allow(non_camel_case_types)]
pub type llama_memory_log_callback =
    Option<unsafe extern "C" fn(level: i32, text: *const c_char, user: *mut c_void)>;

/// The caller's callback and its `user` pointer; the caller vouches for both (header rule).
struct LogTarget {
    cb: unsafe extern "C" fn(i32, *const c_char, *mut c_void),
    user: *mut c_void,
}

// SAFETY: the header requires the callback to accept calls from whichever thread uses the
// memory, with `user`, for as long as it is set; the library calls it only from such calls.
unsafe impl Send for LogTarget {}
// SAFETY: as above; the target is never mutated after it is made.
unsafe impl Sync for LogTarget {}

impl LogTarget {
    /// Passes one line to the callback.
    fn call(&self, level: i32, line: &str) {
        // a line with a NUL in it is cut there rather than lost
        let line = CString::new(line.split('\0').next().unwrap_or_default()).unwrap_or_default();
        // SAFETY: the caller's callback and user pointer (see above), with a NUL-terminated
        // line that lives through the call.
        unsafe { (self.cb)(level, line.as_ptr(), self.user) }
    }
}

/// Sends the memory's log lines to `cb` (NULL: nowhere, the default). The lines are the ones
/// llama.cpp's own `llama_kv_cache` / `llama_memory_recurrent` log at the same moments, with
/// their text and level (the drop-in libllama forwards them to llama.cpp's logger, so its log
/// reads as stock's). `cb` is called from the thread of the call that logs, with `user`,
/// until it is replaced; it must not call back into the memory. Returns OK, or an error for
/// NULL `mem`.
#[no_mangle]
pub extern "C" fn llama_memory_set_log(
    mem: llama_memory_t,
    cb: llama_memory_log_callback,
    user: *mut c_void,
) -> super::error::llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let log = match cb {
            None => crate::memory::Log::default(),
            Some(cb) => {
                let target = LogTarget { cb, user };
                crate::memory::Log::to(Arc::new(move |level, line: &str| {
                    target.call(level as i32, line)
                }))
            }
        };
        m.inner.set_log(log);
        super::error::llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// The last restore stopped before its first count was read and checked (or succeeded
/// without reading one).
pub const LLAMA_MEMORY_READ_HEADER: i32 = 0;
/// The last restore stopped reading a KV stream's cell count.
pub const LLAMA_MEMORY_READ_COUNT: i32 = 1;
/// The last restore stopped in a stream's cells (llama.cpp's `state_read_meta`).
pub const LLAMA_MEMORY_READ_META: i32 = 2;
/// The last restore stopped in a stream's tensor data (llama.cpp's `state_read_data`), or
/// finished.
pub const LLAMA_MEMORY_READ_DATA: i32 = 3;

/// How far the memory's last restore (`llama_memory_state_*set_data*`, `_load_file`,
/// `_read_io`) got: one of `LLAMA_MEMORY_READ_*`. A caller reproducing llama.cpp's errors
/// uses it: llama.cpp lets a reader's error through when the input ends before the data
/// (`LLAMA_MEMORY_READ_DATA`) and reports every failure from there on as "failed to restore
/// kv cache". -1 for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_state_read_stage(mem: llama_memory_t) -> i32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        m.inner.read_stage() as i32
    })
}

/// Memory breakdown of any memory (`llama_memory_i::memory_breakdown`; named otherwise because
/// libllama's own C++ headers take `llama_memory_breakdown` for its result type): writes up to
/// `cap` (buffer type, bytes) pairs, each buffer type once (a composite adds up its parts), and
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
