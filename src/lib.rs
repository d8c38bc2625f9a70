//! llama-memory: llama.cpp's memory subsystem (the KV cache and the recurrent memory; the
//! composites, sliding-window pairs and hybrids, are llama.cpp's own on top of them in the
//! drop-in libllama for now) reimplemented in Rust behind a C ABI.
//!
//! The reference for every behaviour is llama.cpp as shipped in the crates.io package
//! `llama-cpp-sys-2` at exactly `=0.1.161`. The C ABI (`include/llama-memory.h`) mirrors
//! llama.h's memory functions with their exact names and semantics, except that input llama.cpp
//! would abort on returns a failure value, sets a last-error message and changes nothing.
//!
//! Layers, bottom up (each uses only those before it): [`error`]; [`cells`] (per-stream cell
//! bookkeeping) and [`ubatch`]; [`io`] (bounds-checked byte readers and sinks of the state
//! format);
//! [`memory`] (the traits every memory kind implements, and how to find a kind among a
//! composite's parts); [`storage`] (K/V and recurrent R/S tensors in ggml buffers); [`kv`]
//! (the KV cache, its contexts and its state layout); [`recurrent`] (the recurrent memory, its
//! contexts and its state layout); [`state`] (llama.cpp's blob and file formats over any
//! memory); [`ffi`] (the C ABI). `unsafe` lives only in `storage` and `ffi`.
// `unsafe_op_in_unsafe_fn` and `clippy::undocumented_unsafe_blocks` (every unsafe block says why
// it is sound) come from the workspace's [workspace.lints] in Cargo.toml, shared by every crate;
// the safe layers (cells, ubatch, memory, kv, recurrent, state) forbid unsafe code outright, so
// it can only live in `ffi` and `storage`. The public-API documentation rule is this crate's.
#![warn(missing_docs)]

pub mod batch;
pub mod cells;
pub mod composite;
pub mod error;
mod failpoint;
pub mod finite;
pub mod hybrid;
pub mod io;
pub mod iswa;
pub mod kv;
pub mod memory;
pub mod recurrent;
pub mod state;
pub mod storage;
pub mod ubatch;

pub mod ffi;

pub use error::{Error, ErrorKind, Result};
pub use kv::{KvCache, KvContext, KvMemory, KvParams, MaskOut, NonCausalType, SlotInfo, SwaType};
pub use memory::{Memory, MemoryContext, Role, Status};
pub use recurrent::{RecurrentMemory, RsCache, RsContext, RsParams};
pub use ubatch::{Ubatch, UbatchBuf};

/// Version of this library, as in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
