//! State save/restore through a caller's reader and writer: llama.cpp's `llama_io_write_i` /
//! `llama_io_read_i` as C callbacks, so that a memory inside libllama (the drop-in adapters)
//! writes and reads its part of a state, tensor ranges included, through llama.cpp's own io
//! objects. No blob header: this is the memory's part only (`state_write(io, seq, flags)`).

use std::ffi::{c_int, c_void};

use ggml_sys as g;

use super::error::llama_memory_result;
use super::handle::{llama_memory_t, llama_seq_id};
use super::state::llama_state_seq_flags;
use crate::error::{err, Result};
use crate::io::{IoRead, IoWrite, Sink, StateOut};

/// A caller's state writer. Each callback returns 0 on success; anything else stops the
/// write with an error. The callbacks must not unwind (a C++ caller catches its exceptions
/// and returns non-zero).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_io_write {
    /// Passed to every callback.
    pub user: *mut c_void,
    /// Appends `n` bytes from `src` (`llama_io_write_i::write`).
    pub write:
        Option<unsafe extern "C" fn(user: *mut c_void, src: *const c_void, n: usize) -> c_int>,
    /// Appends bytes `[offset, offset + n)` of `tensor` (`llama_io_write_i::write_tensor`).
    pub write_tensor: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            tensor: *mut g::ggml_tensor,
            offset: usize,
            n: usize,
        ) -> c_int,
    >,
}

/// A caller's state reader. Each callback returns 0 on success; anything else (input ended,
/// a read error) stops the read with an error. The callbacks must not unwind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_io_read {
    /// Passed to every callback.
    pub user: *mut c_void,
    /// Fills `dst` with the next `n` bytes (`llama_io_read_i::read`).
    pub read: Option<unsafe extern "C" fn(user: *mut c_void, dst: *mut c_void, n: usize) -> c_int>,
    /// Reads the next `n` bytes into bytes `[offset, offset + n)` of `tensor`, now or when the
    /// reader is done (`llama_io_read_i::read_tensor`).
    pub read_tensor: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            tensor: *mut g::ggml_tensor,
            offset: usize,
            n: usize,
        ) -> c_int,
    >,
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(err!(
            InvalidState,
            "the caller's {what} callback failed ({rc})"
        ))
    }
}

impl IoWrite for llama_memory_io_write {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        let f = self
            .write
            .ok_or_else(|| err!(NullArgument, "io->write is NULL"))?;
        // SAFETY: the caller's contract (header): `write` reads `n` bytes from `src`, which
        // stays valid for the call.
        check(unsafe { f(self.user, b.as_ptr().cast(), b.len()) }, "write")
    }

    fn write_tensor(&mut self, t: *mut g::ggml_tensor, offset: usize, n: usize) -> Result<()> {
        let f = self
            .write_tensor
            .ok_or_else(|| err!(NullArgument, "io->write_tensor is NULL"))?;
        // SAFETY: the caller's contract; `t` is one of this memory's tensors and the range
        // was checked against it by the writer.
        check(unsafe { f(self.user, t, offset, n) }, "write_tensor")
    }
}

impl IoRead for llama_memory_io_read {
    fn read(&mut self, dst: &mut [u8]) -> Result<()> {
        let f = self
            .read
            .ok_or_else(|| err!(NullArgument, "io->read is NULL"))?;
        // SAFETY: the caller's contract: `read` writes exactly `n` bytes into `dst`, which is
        // valid and exclusively borrowed for the call.
        check(
            unsafe { f(self.user, dst.as_mut_ptr().cast(), dst.len()) },
            "read",
        )
    }

    fn read_tensor(&mut self, t: *mut g::ggml_tensor, offset: usize, n: usize) -> Result<()> {
        let f = self
            .read_tensor
            .ok_or_else(|| err!(NullArgument, "io->read_tensor is NULL"))?;
        // SAFETY: the caller's contract; `t` is one of this memory's tensors and the range
        // was checked against it by the reader.
        check(unsafe { f(self.user, t, offset, n) }, "read_tensor")
    }
}

/// Writes the memory's state of `seq_id` (-1: all) through `io`, as llama.cpp's
/// `llama_memory_i::state_write(io, seq_id, flags)`: no blob header, tensor ranges through
/// `write_tensor` (an `ON_DEVICE` writer keeps them), `flags` as the memory kind uses them.
/// What was written before an error stays written. Supported by the KV cache and the
/// recurrent memory.
#[no_mangle]
pub extern "C" fn llama_memory_state_write_io(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
    io: *const llama_memory_io_write,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let mut w = try_slice!(io, 1, "io")[0];
        let mut sink = Sink::Io { io: &mut w, pos: 0 };
        try_or!(m.inner.state_write(
            seq_id,
            flags,
            &mut StateOut {
                sink: &mut sink,
                stash: None
            }
        ));
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Restores the memory's state into `seq_id` (-1: replace everything) from `io`, as
/// llama.cpp's `llama_memory_i::state_read(io, seq_id, flags)`. The input is validated as it
/// is read; on an error the cells are unchanged, but a reader whose `read_tensor` writes at
/// once may have changed the destination's rows (llama.cpp's caller erases the destination
/// then). Supported by the KV cache and the recurrent memory.
#[no_mangle]
pub extern "C" fn llama_memory_state_read_io(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
    io: *const llama_memory_io_read,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let mut r = try_slice!(io, 1, "io")[0];
        try_or!(m.inner.state_read_io(seq_id, flags, &mut r));
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Reads and validates a state from `io` exactly as [`llama_memory_state_read_io`] would
/// restore it into `seq_id` (-1: everything), and changes nothing: no cell, no tensor byte
/// (the tensor ranges still go to `io->read_tensor`, for the reader to count), no failure
/// effect even in stock-compatible mode. A restore's log lines are logged (a caller that
/// wants silence sets a log function that holds them). Afterwards
/// `llama_memory_state_read_stage` says how far the input got. `LLAMA_MEMORY_OK` when the
/// same input would restore. Supported by the KV cache and the recurrent memory.
#[no_mangle]
pub extern "C" fn llama_memory_state_check_io(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
    io: *const llama_memory_io_read,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let mut r = try_slice!(io, 1, "io")[0];
        try_or!(m.inner.state_check_io(seq_id, flags, &mut r));
        llama_memory_result::LLAMA_MEMORY_OK
    })
}
