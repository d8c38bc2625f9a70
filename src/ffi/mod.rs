//! The C ABI (also callable from Rust): the only module with `extern "C"`, raw pointers and handle casts.
//!
//! Every entry point runs inside [`ffi_boundary!`], so a panic becomes the function's failure
//! value and a last-error message instead of unwinding into C. Pointer arguments are checked
//! for NULL before use; a NULL or invalid argument sets the last error and changes nothing.

// Entry points take raw pointers from C, which cannot see an `unsafe` qualifier; the header
// states each pointer's contract and every dereference is checked for NULL first.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[macro_use]
mod boundary;
pub mod context;
#[cfg(feature = "dropin")]
pub mod dropin;
pub mod error;
pub mod graph;
mod handle;
pub mod io;
pub mod kv;
pub mod memory;
pub mod recurrent;
pub mod slot;
pub mod state;
pub mod update;
