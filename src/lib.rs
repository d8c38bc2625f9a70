//! llama-memory: llama.cpp's memory subsystem (the KV cache today; sliding-window, recurrent
//! and hybrid memories to follow) reimplemented in Rust behind a C ABI.
//!
//! The reference for every behaviour is llama.cpp as shipped in the crates.io package
//! `llama-cpp-sys-2` at exactly `=0.1.161`. The C ABI (`include/llama-memory.h`) mirrors
//! llama.h's memory functions with their exact names and semantics, except that input llama.cpp
//! would abort on returns a failure value, sets a last-error message and changes nothing.
//!
//! Layers, bottom up: [`cells`] (per-stream cell bookkeeping), [`kv`] (the KV cache),
//! [`memory`] (the trait behind the C handle), [`storage`] (K/V tensors in ggml
//! buffers), [`state`] (llama.cpp's state formats), `ffi` (the C ABI, the only place with `unsafe`).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod cells;
pub mod error;
pub mod kv;
pub mod memory;
pub mod state;
pub mod storage;
pub mod ubatch;

pub mod ffi;

pub use error::{Error, ErrorKind, Result};
pub use kv::{KvCache, KvContext, KvParams, MaskOut, NonCausalType, SlotInfo, Status, SwaType};
pub use memory::{Memory, MemoryContext};
pub use state::kv::KvMemory;
pub use ubatch::{Ubatch, UbatchBuf};

/// Version of this library, as in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
