//! The C ABI (also callable from Rust): the only module with `extern "C"`, raw pointers and handle casts.
//!
//! Every entry point runs inside `ffi_boundary!`, so a panic becomes the function's failure
//! value and a last-error message instead of unwinding into C. Pointer arguments are checked
//! for NULL before use; a NULL or invalid argument sets the last error and changes nothing.
//!
//! One module per handle family, declared in the order the generated header presents them
//! (cbindgen follows this order): the memory, errors, contexts and their ubatches, states and
//! their io callbacks, then one module per memory kind (`kv/`, `recurrent`), then the drop-in's
//! names. Arrows point down: every family uses `handle` (the handle structs and llama.h's
//! typedefs), `boundary` and [`error`]; the generic families never import a kind's module.

// Entry points take raw pointers from C, which cannot see an `unsafe` qualifier; the header
// states each pointer's contract and every dereference is checked for NULL first.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[macro_use]
mod boundary;
mod handle;

// The families, in header order (the comments keep rustfmt from sorting these lines).
// The memory handle and what every memory offers:
pub mod memory;
// Error codes and the thread's last error:
pub mod error;
// Memory contexts, and the ubatches they plan:
pub mod context;
pub mod ubatch;
// A whole batch, split as the memory's init_batch splits it:
pub mod batch;
// States (blobs, files) and the caller io callbacks:
pub mod state;
// (the io callbacks after the states they carry)
pub mod io;
// The KV cache:
pub mod kv;
// The recurrent memory:
pub mod recurrent;
// The composites (sliding-window pair, hybrids) and their parts:
pub mod composite;
// The drop-in build's names for llama.h's nine:
#[cfg(feature = "dropin")]
pub mod dropin;

// One flat path for Rust callers (`llama_memory::ffi::*`), as C sees one header.
pub use batch::*;
pub use composite::*;
pub use context::*;
pub use error::*;
pub use handle::{
    llama_memory_ctx, llama_memory_ctx_t, llama_memory_i, llama_memory_t, llama_pos, llama_seq_id,
    llama_token,
};
pub use io::*;
pub use kv::{graph::*, inputs::*, slot::*, update::*, *};
pub use memory::*;
pub use recurrent::*;
pub use state::*;
pub use ubatch::*;
