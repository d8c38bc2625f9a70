//! Errors of the safe Rust API; the C ABI turns them into result codes and a last-error message.

#![forbid(unsafe_code)]

use std::fmt;

/// What went wrong, independent of the message. Each kind maps to one stable C result code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A required pointer argument was NULL.
    NullArgument,
    /// A sequence id outside `[0, n_seq_max)` (or a negative id where "any" is not allowed).
    InvalidSeqId,
    /// A position range or value that the operation cannot take.
    InvalidRange,
    /// Any other argument out of its documented domain (sizes, enum values, divisors...).
    InvalidArgument,
    /// A ubatch description that is inconsistent or does not fit this memory.
    InvalidUbatch,
    /// No free cells for a ubatch.
    NoSlot,
    /// The operation is not supported by this memory or configuration.
    Unsupported,
    /// A caller buffer is too small for the result.
    BufferTooSmall,
    /// A panic was caught at the C boundary.
    Panic,
    /// A state blob or file that is truncated, malformed or does not fit this memory.
    InvalidState,
    /// A file could not be opened, read or written.
    Io,
}

/// An error with its kind and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Creates an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The kind of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message of the error.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an error of `kind` with a formatted message.
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}
pub(crate) use err;
