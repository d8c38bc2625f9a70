//! A caller's state reader and writer for the `llama_memory_state_read_io`/`_write_io` tests
//! (`tests/kv_state_malformed.rs`, `tests/recurrent_malformed.rs`), shaped as llama.cpp's host
//! reader (tensor writes deferred until the read succeeded) and a writer that copies tensor
//! ranges and records them.

use llama_memory::ffi::error::llama_memory_result;
use llama_memory::ffi::llama_memory_t;
use llama_memory::ffi::{
    llama_memory_io_read, llama_memory_io_write, llama_memory_state_read_io,
    llama_memory_state_write_io,
};

/// A reader over `bytes` that defers its tensor writes until it is done, as llama.cpp's host
/// reader: `finish` applies them (call it only after a successful read).
struct DeferredReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    pending: Vec<(*mut ggml_sys::ggml_tensor, usize, usize, usize)>,
}

unsafe extern "C" fn dr_read(
    user: *mut std::ffi::c_void,
    dst: *mut std::ffi::c_void,
    n: usize,
) -> i32 {
    // SAFETY: user is the DeferredReader passed by io_read, alive for the call.
    let r = unsafe { &mut *user.cast::<DeferredReader<'_>>() };
    if n > r.bytes.len() - r.pos {
        return -1;
    }
    // SAFETY: the library passes a destination of n bytes.
    unsafe { std::ptr::copy_nonoverlapping(r.bytes[r.pos..].as_ptr(), dst.cast::<u8>(), n) };
    r.pos += n;
    0
}

unsafe extern "C" fn dr_read_tensor(
    user: *mut std::ffi::c_void,
    t: *mut ggml_sys::ggml_tensor,
    off: usize,
    n: usize,
) -> i32 {
    // SAFETY: as in dr_read.
    let r = unsafe { &mut *user.cast::<DeferredReader<'_>>() };
    if n > r.bytes.len() - r.pos {
        return -1;
    }
    // SAFETY: a live tensor of the memory.
    let nbytes = unsafe { ggml_sys::ggml_nbytes(t) };
    assert!(off + n <= nbytes, "range outside the tensor");
    r.pending.push((t, off, r.pos, n));
    r.pos += n;
    0
}

impl DeferredReader<'_> {
    fn finish(&self) {
        for &(t, off, at, n) in &self.pending {
            // SAFETY: a tensor of the memory, range checked in dr_read_tensor.
            unsafe {
                ggml_sys::ggml_backend_tensor_set(t, self.bytes[at..].as_ptr().cast(), off, n)
            };
        }
    }
}

/// Restores `body` (a state without blob header) into `dest` through a caller's reader;
/// returns the result and the bytes it consumed. Applies the deferred tensor writes on success.
pub fn io_read(
    mem: llama_memory_t,
    body: &[u8],
    dest: i32,
    flags: u32,
) -> (llama_memory_result, usize) {
    let mut r = DeferredReader {
        bytes: body,
        pos: 0,
        pending: Vec::new(),
    };
    let io = llama_memory_io_read {
        user: (&mut r as *mut DeferredReader<'_>).cast(),
        read: Some(dr_read),
        read_tensor: Some(dr_read_tensor),
    };
    let rc = llama_memory_state_read_io(mem, dest, flags, &io);
    if rc == llama_memory_result::LLAMA_MEMORY_OK {
        r.finish();
    }
    (rc, r.pos)
}

unsafe extern "C" fn w_write(
    user: *mut std::ffi::c_void,
    src: *const std::ffi::c_void,
    n: usize,
) -> i32 {
    // SAFETY: user is the Writer passed by io_write; src holds n bytes.
    let w = unsafe { &mut *user.cast::<Writer>() };
    // SAFETY: the library passes a source of n readable bytes, alive for the call.
    w.bytes
        .extend_from_slice(unsafe { std::slice::from_raw_parts(src.cast::<u8>(), n) });
    0
}

unsafe extern "C" fn w_write_tensor(
    user: *mut std::ffi::c_void,
    t: *mut ggml_sys::ggml_tensor,
    off: usize,
    n: usize,
) -> i32 {
    // SAFETY: as in w_write.
    let w = unsafe { &mut *user.cast::<Writer>() };
    // SAFETY: a live tensor of the memory.
    let nbytes = unsafe { ggml_sys::ggml_nbytes(t) };
    assert!(off + n <= nbytes, "range outside the tensor");
    let at = w.bytes.len();
    w.bytes.resize(at + n, 0);
    // SAFETY: a live tensor of the memory with off + n within it (checked above); the
    // destination is the n bytes just appended to w.bytes.
    unsafe { ggml_sys::ggml_backend_tensor_get(t, w.bytes[at..].as_mut_ptr().cast(), off, n) };
    w.ranges.push((t, off, n));
    0
}

/// What a caller's writer received: the bytes (tensor ranges copied in), and the ranges.
#[derive(Default)]
pub struct Writer {
    /// The bytes, tensor ranges copied in.
    pub bytes: Vec<u8>,
    /// The tensor ranges, as `(tensor, offset, n)`.
    pub ranges: Vec<(*mut ggml_sys::ggml_tensor, usize, usize)>,
}

/// The state of `seq` written through a caller's writer; the result code and the writer.
pub fn io_write(mem: llama_memory_t, seq: i32, flags: u32) -> (llama_memory_result, Writer) {
    let mut w = Writer::default();
    let io = llama_memory_io_write {
        user: (&mut w as *mut Writer).cast(),
        write: Some(w_write),
        write_tensor: Some(w_write_tensor),
    };
    let rc = llama_memory_state_write_io(mem, seq, flags, &io);
    (rc, w)
}
