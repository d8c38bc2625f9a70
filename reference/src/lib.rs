//! The *stock* llama.cpp KV cache of the pinned upstream, for differential tests and
//! benchmarks of `llama-memory`.
//!
//! The build script compiles the pinned llama.cpp (static, CPU only) together with the C shim
//! `shim/kvref.cpp` into `libkvref.so`. This crate loads that library with
//! `dlopen(RTLD_NOW | RTLD_LOCAL)` once per process, so the stock ggml inside it never meets
//! the ggml that `llama-memory` links, and wraps the `kvref_*` functions of `shim/kvref.h`
//! in safe Rust.
//!
//! Linux only (the shim is an ELF shared library built with GNU linker options).
//!
//! Every method forwards to the stock code as it is. Stock assertions abort the process, so
//! callers must pass input the stock cache accepts (valid sequence ids, `n_kv <= size`, …).
//!
//! Four objects are wrapped: [`RefKv`], a standalone stock `llama_kv_cache` driven operation by
//! operation, [`RefRs`], a standalone stock `llama_memory_recurrent` (shim `shim/rsref.cpp`),
//! [`RefComposite`], a stock composite memory (`llama_kv_cache_iswa`, `llama_memory_hybrid`,
//! `llama_memory_hybrid_iswa`; shim `shim/cmpref.cpp`) whose parts are seen as [`RefKv`] /
//! [`RefRs`] views, and [`RefCtx`], a stock `llama_context` used only through the public
//! `llama.h` API (decode, logits, sequence and whole-state save/restore), for compatibility
//! tests and benchmarks of state blobs and files. Besides the tiny `llama` model of [`model_path`], tiny `mamba`
//! ([`mamba_model_path`]), `lfm2` ([`lfm2_model_path`], [`lfm2_swa_model_path`]), `jamba`
//! ([`jamba_model_path`]), `gemma3` ([`gemma3_model_path`]) and `qwen2vl`
//! ([`qwen2vl_model_path`]) models are written on demand.
//!
//! ```no_run
//! use llama_memory_reference::{model_path, Params, RefKv, Ubatch};
//!
//! let mut kv = RefKv::new(&model_path(), &Params::default()).unwrap();
//! let ub = Ubatch::for_seq(0, 0, 5);
//! let slot = kv.find_slot(&ub.view(), false).unwrap();
//! kv.apply_ubatch(&slot, &ub.view());
//! assert_eq!(kv.seq_pos_max(0), 4);
//! ```
//!
//! Modules: `kv` ([`RefKv`], its parameters and the tiny `llama` model writers), `ctx`
//! ([`RefCtx`]), `recurrent` ([`RefRs`], the recurrent, hybrid and iSWA model writers and the
//! multi-sequence [`RefCtx`] additions), `composite` ([`RefComposite`] and its part views). This file keeps what they share: the library loader,
//! the ubatch types and the forwarding macros; every public item is re-exported here.

use std::ffi::CString;
use std::marker::PhantomData;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::OnceLock;

/// `$Api { field, … }` with each field resolved as the symbol `$prefix` + its name in `$lib`
/// (a `libloading` library); `?` on a missing symbol. For the function tables of the modules.
macro_rules! resolve {
    ($lib:expr, $prefix:literal, $Api:ident { $($field:ident),* $(,)? }) => {
        $Api {
            $(
                // SAFETY: the symbol is the shim function of that name (kvref.h, rsref.h); the
                // field's Rust type is transcribed from its C prototype. The pointer stays
                // valid because `Api` keeps the library loaded, in a static, until the process
                // ends.
                $field: unsafe {
                    *$lib.get(concat!($prefix, stringify!($field), "\0").as_bytes())?
                },
            )*
        }
    };
}

/// Safe methods that pass `self.ptr` and their arguments unchanged to the shim function of the
/// same name in the function table `$api`, for the wrappers whose `ptr` is the shim object they
/// own ([`RefKv`], [`RefRs`], [`RefCtx`], [`RefComposite`]) or, for part views of a composite,
/// borrow for no longer than the composite lives. Each item reads `/// doc` `fn name(&self|&mut self,
/// arg: Type, …) -> Ret;`; the arguments must be plain values (integers, bools).
macro_rules! forward {
    ($api:expr;) => {};
    (
        $api:expr;
        $(#[$attr:meta])* fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?;
        $($rest:tt)*
    ) => {
        $(#[$attr])*
        pub fn $name(&mut self $(, $arg: $ty)*) $(-> $ret)? {
            // SAFETY: `self.ptr` is the live shim object this wrapper owns (freed only by its
            // Drop) or borrows from a composite that outlives it, and every other argument is a
            // plain value passed by copy.
            unsafe { ($api.$name)(self.ptr $(, $arg)*) }
        }
        forward!($api; $($rest)*);
    };
    (
        $api:expr;
        $(#[$attr:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?;
        $($rest:tt)*
    ) => {
        $(#[$attr])*
        pub fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
            // SAFETY: `self.ptr` is the live shim object this wrapper owns (freed only by its
            // Drop) or borrows from a composite that outlives it, and every other argument is a
            // plain value passed by copy.
            unsafe { ($api.$name)(self.ptr $(, $arg)*) }
        }
        forward!($api; $($rest)*);
    };
}

mod composite;
mod ctx;
mod defrag;
mod kv;
mod recurrent;

pub use composite::{
    CmpParams, CompositeKind, RefComposite, RefKvPart, RefKvPartMut, RefRsPart, RefRsPartMut,
    Split, TokenBatch,
};
pub use ctx::{CtxParams, RefCtx};
pub use defrag::{DfCell, RefDefrag, DFREF_LIB};
pub use kv::{
    model_path, model_path_ex, non_causal_type, sanity_decode, swa_type, write_model,
    write_model_ex, Cells, MemoryStatus, Params, RawSlot, RefKv, Slot, StreamInfo, View,
};
pub use recurrent::{
    gemma3_model_path, gemma3_model_path_ex, jamba_model_path, jamba_model_path_ex,
    lfm2_model_path, lfm2_model_path_ex, lfm2_swa_model_path, mamba_model_path,
    mamba_model_path_ex, qwen2vl_model_path, qwen2vl_model_path_ex, write_deepseek32_model,
    write_deepseek4_model, write_dots3note_model, write_gemma3_model, write_gemma4_assistant_model,
    write_gemma4_model, write_glm5_next_model, write_hy_v3_model, write_jamba_model,
    write_lfm2_model, write_lfm2_model_ex, write_mamba_model, write_minimax_m3_model,
    write_qwen2vl_model, write_qwen4exp_model, RefRs, RsCell, RsCtxInfo, RsParams, GEMMA3_SWA,
    JAMBA_HEAD_KV, LFM2_HEAD_KV, LFM2_SWA, QWEN2VL_SECTIONS,
};

/// Highest number of sequences (and so of streams) of the stock cache (`LLAMA_MAX_SEQ`).
pub const MAX_SEQ: usize = 256;

/// Path of the shim library, fixed by the build script.
pub const KVREF_LIB: &str = env!("KVREF_LIB");

/// Mirror of `kvref_ubatch`: a borrowed view of a ubatch, laid out like the pointer fields of
/// llama.cpp's `llama_ubatch`. Build one with [`Ubatch::view`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawUbatch {
    /// Total tokens (`n_seq_tokens * n_seqs`).
    pub n_tokens: u32,
    /// Tokens per sequence set.
    pub n_seq_tokens: u32,
    /// Sequence sets in the ubatch.
    pub n_seqs: u32,
    /// Unique sequence ids in the ubatch.
    pub n_seqs_unq: u32,
    /// Position sections per token (1, or 4 for M-RoPE).
    pub n_pos: u32,
    /// 0/1.
    pub equal_seqs: u32,
    /// `[n_tokens]` or null (embeddings).
    pub token: *const i32,
    /// `[n_tokens * n_pos]`, section-major.
    pub pos: *const i32,
    /// `[n_tokens]`.
    pub n_seq_id: *const i32,
    /// `[n_tokens]` → `[n_seq_id[i]]`.
    pub seq_id: *const *const i32,
    /// `[n_seqs_unq]`, ascending.
    pub seq_id_unq: *const i32,
}

/// `ggml_type` values used for K/V types.
pub mod ggml_type {
    /// `GGML_TYPE_F32`.
    pub const F32: i32 = 0;
    /// `GGML_TYPE_F16`.
    pub const F16: i32 = 1;
    /// `GGML_TYPE_Q4_0`.
    pub const Q4_0: i32 = 2;
    /// `GGML_TYPE_Q8_0`.
    pub const Q8_0: i32 = 8;
    /// `GGML_TYPE_BF16`.
    pub const BF16: i32 = 30;
}

/// An owned ubatch, in the layout of llama.cpp's `llama_ubatch`. Pass it to [`RefKv`] through
/// [`Ubatch::view`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ubatch {
    /// Token ids, one per token; empty for an embedding ubatch (the C view gets a null pointer).
    pub tokens: Vec<i32>,
    /// `n_tokens * n_pos` positions, section-major (`pos[j*n_tokens + i]`).
    pub pos: Vec<i32>,
    /// The sequence ids of each token; its length is `n_tokens`.
    pub seq_ids: Vec<Vec<i32>>,
    /// Position sections per token.
    pub n_pos: u32,
    /// Tokens per sequence set.
    pub n_seq_tokens: u32,
    /// Sequence sets.
    pub n_seqs: u32,
    /// Unique sequence ids, ascending.
    pub seq_id_unq: Vec<i32>,
    /// Whether the ubatch came from an equal split.
    pub equal_seqs: bool,
}

impl Ubatch {
    /// A ubatch as `split_simple` makes it: one token per sequence set, in the given order.
    /// `pos` holds `n_tokens * n_pos` positions; `tokens` may be empty (embeddings).
    pub fn simple(tokens: Vec<i32>, pos: Vec<i32>, seq_ids: Vec<Vec<i32>>) -> Ubatch {
        let n = seq_ids.len();
        assert!(
            n > 0 && pos.len() % n == 0,
            "pos must hold n_pos sections of n_tokens positions"
        );
        assert!(tokens.is_empty() || tokens.len() == n);
        let mut unq: Vec<i32> = seq_ids.iter().flatten().copied().collect();
        unq.sort_unstable();
        unq.dedup();
        Ubatch {
            tokens,
            n_pos: (pos.len() / n) as u32,
            pos,
            n_seq_tokens: 1,
            n_seqs: n as u32,
            seq_ids,
            seq_id_unq: unq,
            equal_seqs: false,
        }
    }

    /// `n` tokens of sequence `seq` at positions `p0..p0+n` (token ids `p % 32`).
    pub fn for_seq(seq: i32, p0: i32, n: u32) -> Ubatch {
        let pos: Vec<i32> = (p0..p0 + n as i32).collect();
        let tokens = pos.iter().map(|p| p.rem_euclid(32)).collect();
        Ubatch::simple(tokens, pos, vec![vec![seq]; n as usize])
    }

    /// A ubatch as `split_equal` makes it: `n_seq_tokens` tokens for each `(seq, first_pos)`
    /// set, seq-major. Sequences must be ascending (as the non-unified split requires).
    /// Positions stop at `i32::MAX` (the last ones repeat it).
    pub fn equal(sets: &[(i32, i32)], n_seq_tokens: u32) -> Ubatch {
        let mut pos = Vec::new();
        let mut seq_ids = Vec::new();
        for &(s, p0) in sets {
            for k in 0..n_seq_tokens {
                pos.push(p0.saturating_add(k as i32));
                seq_ids.push(vec![s]);
            }
        }
        let tokens = pos.iter().map(|p| p.rem_euclid(32)).collect();
        Ubatch {
            tokens,
            pos,
            seq_ids,
            n_pos: 1,
            n_seq_tokens,
            n_seqs: sets.len() as u32,
            seq_id_unq: sets.iter().map(|s| s.0).collect(),
            equal_seqs: true,
        }
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.seq_ids.len() as u32
    }

    /// The C view of this ubatch, valid while `self` is borrowed.
    pub fn view(&self) -> UbatchRef<'_> {
        let n = self.seq_ids.len();
        assert!(
            self.pos.len() == n * self.n_pos as usize,
            "pos must hold n_tokens * n_pos entries"
        );
        assert!(
            self.tokens.is_empty() || self.tokens.len() == n,
            "one token id per token"
        );
        let seq_ptrs: Vec<*const i32> = self.seq_ids.iter().map(|s| s.as_ptr()).collect();
        let n_seq_id: Vec<i32> = self.seq_ids.iter().map(|s| s.len() as i32).collect();
        let raw = RawUbatch {
            n_tokens: n as u32,
            n_seq_tokens: self.n_seq_tokens,
            n_seqs: self.n_seqs,
            n_seqs_unq: self.seq_id_unq.len() as u32,
            n_pos: self.n_pos,
            equal_seqs: u32::from(self.equal_seqs),
            token: if self.tokens.is_empty() {
                ptr::null()
            } else {
                self.tokens.as_ptr()
            },
            pos: self.pos.as_ptr(),
            n_seq_id: n_seq_id.as_ptr(),
            seq_id: seq_ptrs.as_ptr(),
            seq_id_unq: self.seq_id_unq.as_ptr(),
        };
        UbatchRef {
            raw,
            _seq_ptrs: seq_ptrs,
            _n_seq_id: n_seq_id,
            _owner: PhantomData,
        }
    }
}

/// A [`RawUbatch`] over a [`Ubatch`], with the pointer arrays it needs kept alive.
#[derive(Debug)]
pub struct UbatchRef<'a> {
    raw: RawUbatch,
    // heap arrays the raw pointers point into; moving the Vecs does not move their data
    _seq_ptrs: Vec<*const i32>,
    _n_seq_id: Vec<i32>,
    _owner: PhantomData<&'a Ubatch>,
}

impl UbatchRef<'_> {
    /// The C struct.
    pub fn raw(&self) -> &RawUbatch {
        &self.raw
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.raw.n_tokens
    }
}

/// The resolved shim functions, one table per module; the library stays loaded for the life of
/// the process.
struct Api {
    _lib: libloading::os::unix::Library,
    sizeof: unsafe extern "C" fn(i32) -> usize,
    kv: kv::KvApi,
    ctx: ctx::CtxApi,
    rs: recurrent::RsApi,
    cmp: composite::CmpApi,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| load(KVREF_LIB).unwrap_or_else(|e| panic!("cannot load {KVREF_LIB}: {e}")))
}

fn load(path: &str) -> Result<Api, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

    // SAFETY: libkvref.so has no initialisers beyond those of libstdc++ and the static
    // llama.cpp/ggml objects, which only set up their own (hidden) globals. RTLD_LOCAL keeps
    // its symbols out of the global namespace, so it cannot interpose on another ggml.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL)? };

    // SAFETY: as in `resolve!`: `size_t kvref_sizeof(int32_t)`, kept loaded with `lib`.
    let sizeof = unsafe { *lib.get(b"kvref_sizeof\0")? };
    let api = Api {
        sizeof,
        kv: kv::KvApi::load(&lib)?,
        ctx: ctx::CtxApi::load(&lib)?,
        rs: recurrent::RsApi::load(&lib)?,
        cmp: composite::CmpApi::load(&lib)?,
        _lib: lib,
    };

    // The structs are shared by layout alone: refuse a library built from another kvref.h.
    let sizes = [
        std::mem::size_of::<RawUbatch>(),
        std::mem::size_of::<RawSlot>(),
        std::mem::size_of::<Params>(),
        std::mem::size_of::<CtxParams>(),
    ];
    for (which, &rust) in sizes.iter().enumerate() {
        // SAFETY: kvref_sizeof only reads its integer argument.
        let c = unsafe { (api.sizeof)(which as i32) };
        assert_eq!(
            c, rust,
            "kvref.h struct #{which} has size {c} in C but {rust} in Rust"
        );
    }
    api.rs.check_sizes();
    api.cmp.check_sizes();
    Ok(api)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path contains a NUL byte")
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;

    use super::*;

    /// Only the kvref API may be visible to dlsym: an exported ggml or llama symbol could
    /// interpose on (or be interposed by) the ggml of the process that loads the shim.
    #[test]
    fn only_the_kvref_api_is_exported() {
        let lib = &api()._lib;
        for name in [
            "ggml_init",
            "ggml_backend_cpu_buffer_type",
            "gguf_init_empty",
            "llama_decode",
            "llama_backend_init",
        ] {
            let c = format!("{name}\0");
            // SAFETY: the symbol is only looked up, never called.
            let found = unsafe { lib.get::<*const c_void>(c.as_bytes()) }.is_ok();
            assert!(!found, "{name} is exported by {KVREF_LIB}");
        }
    }
}
