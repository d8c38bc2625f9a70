//! Result codes of the functions this library adds, and the thread-local last error.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use crate::error::{Error, ErrorKind};

/// Result of the functions this library adds to llama.h's API. Values are stable and never
/// reused.
///
/// The error family: a failing call also sets the calling thread's last error, read with
/// `llama_memory_last_error` (a message owned by the library, valid until the thread's next
/// failing call) and `llama_memory_last_error_code`, reset with
/// `llama_memory_clear_last_error`. Functions that mirror llama.h return llama.h's values
/// and set the last error too.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum llama_memory_result {
    /// Success.
    LLAMA_MEMORY_OK = 0,
    /// A required pointer argument was NULL.
    LLAMA_MEMORY_ERR_NULL_ARGUMENT = 1,
    /// A sequence id outside `[0, n_seq_max)`.
    LLAMA_MEMORY_ERR_INVALID_SEQ_ID = 2,
    /// A position range the operation cannot take.
    LLAMA_MEMORY_ERR_INVALID_RANGE = 3,
    /// Another argument outside its documented domain.
    LLAMA_MEMORY_ERR_INVALID_ARGUMENT = 4,
    /// An inconsistent ubatch description.
    LLAMA_MEMORY_ERR_INVALID_UBATCH = 5,
    /// No free cells for the ubatch.
    LLAMA_MEMORY_ERR_NO_SLOT = 6,
    /// Not supported by this memory or configuration.
    LLAMA_MEMORY_ERR_UNSUPPORTED = 7,
    /// A caller buffer is too small.
    LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL = 8,
    /// An internal error (a caught panic); the memory is unchanged or was already unusable.
    LLAMA_MEMORY_ERR_INTERNAL = 9,
    /// A state blob or file that is truncated, malformed or incompatible with this memory; the
    /// memory is unchanged.
    LLAMA_MEMORY_ERR_INVALID_STATE = 10,
    /// A file could not be opened, read or written.
    LLAMA_MEMORY_ERR_IO = 11,
}

impl From<ErrorKind> for llama_memory_result {
    fn from(k: ErrorKind) -> Self {
        use llama_memory_result::*;
        match k {
            ErrorKind::NullArgument => LLAMA_MEMORY_ERR_NULL_ARGUMENT,
            ErrorKind::InvalidSeqId => LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
            ErrorKind::InvalidRange => LLAMA_MEMORY_ERR_INVALID_RANGE,
            ErrorKind::InvalidArgument => LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
            ErrorKind::InvalidUbatch => LLAMA_MEMORY_ERR_INVALID_UBATCH,
            ErrorKind::NoSlot => LLAMA_MEMORY_ERR_NO_SLOT,
            ErrorKind::Unsupported => LLAMA_MEMORY_ERR_UNSUPPORTED,
            ErrorKind::BufferTooSmall => LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL,
            ErrorKind::Panic => LLAMA_MEMORY_ERR_INTERNAL,
            ErrorKind::InvalidState => LLAMA_MEMORY_ERR_INVALID_STATE,
            ErrorKind::Io => LLAMA_MEMORY_ERR_IO,
        }
    }
}

struct LastError {
    code: llama_memory_result,
    message: CString,
}

thread_local! {
    static LAST: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Records `e` as this thread's last error. When the thread's storage is already torn down
/// (a call from an `atexit` handler or a TLS destructor) the message is dropped: the failure
/// value still tells the caller, and nothing here can panic inside the panic boundary.
pub(crate) fn set_error(e: &Error) {
    let message = CString::new(e.message().replace('\0', " ")).unwrap_or_default();
    let _ = LAST.try_with(|l| {
        if let Ok(mut slot) = l.try_borrow_mut() {
            *slot = Some(LastError {
                code: e.kind().into(),
                message,
            });
        }
    });
}

/// Records a caught panic as this thread's last error.
pub(crate) fn set_panic(payload: Box<dyn std::any::Any + Send>) {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    set_error(&Error::new(
        ErrorKind::Panic,
        format!("internal error: {what}"),
    ));
}

/// The message of this thread's last failure, or NULL if there was none since the last
/// `llama_memory_clear_last_error`. Successful calls do not clear it. The string stays valid
/// until the next failing call or clear on this thread.
#[no_mangle]
pub extern "C" fn llama_memory_last_error() -> *const c_char {
    ffi_boundary!({
        LAST.try_with(|l| {
            l.try_borrow()
                .ok()
                .and_then(|e| e.as_ref().map(|e| e.message.as_ptr()))
        })
        .ok()
        .flatten()
        .unwrap_or(std::ptr::null())
    })
}

/// The result code of this thread's last failure, `LLAMA_MEMORY_OK` if none.
#[no_mangle]
pub extern "C" fn llama_memory_last_error_code() -> llama_memory_result {
    ffi_boundary!({
        LAST.try_with(|l| l.try_borrow().ok().and_then(|e| e.as_ref().map(|e| e.code)))
            .ok()
            .flatten()
            .unwrap_or(llama_memory_result::LLAMA_MEMORY_OK)
    })
}

/// Forgets this thread's last error.
#[no_mangle]
pub extern "C" fn llama_memory_clear_last_error() {
    ffi_boundary!({
        let _ = LAST.try_with(|l| {
            if let Ok(mut slot) = l.try_borrow_mut() {
                *slot = None;
            }
        });
    })
}
