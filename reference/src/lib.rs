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
//! Three objects are wrapped: [`RefKv`], a standalone stock `llama_kv_cache` driven operation by
//! operation, [`RefRs`], a standalone stock `llama_memory_recurrent` (shim `shim/rsref.cpp`),
//! and [`RefCtx`], a stock `llama_context` used only through the public `llama.h` API (decode,
//! logits, sequence and whole-state save/restore), for compatibility tests and benchmarks of
//! state blobs and files. Besides the tiny `llama` model of [`model_path`], tiny `mamba`
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

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Mutex, OnceLock};

mod recurrent;
pub use recurrent::{
    gemma3_model_path, gemma3_model_path_ex, jamba_model_path, jamba_model_path_ex,
    lfm2_model_path, lfm2_model_path_ex, lfm2_swa_model_path, mamba_model_path,
    mamba_model_path_ex, qwen2vl_model_path, qwen2vl_model_path_ex, write_gemma3_model,
    write_jamba_model, write_lfm2_model, write_lfm2_model_ex, write_mamba_model,
    write_qwen2vl_model, RefRs, RsCell, RsCtxInfo, RsParams, GEMMA3_SWA, JAMBA_HEAD_KV,
    LFM2_HEAD_KV, LFM2_SWA, QWEN2VL_SECTIONS,
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

/// Mirror of `kvref_slot`.
#[repr(C)]
#[derive(Debug, Clone)]
pub struct RawSlot {
    /// First stream of the slot.
    pub s0: u32,
    /// Last stream of the slot.
    pub s1: u32,
    /// Streams in the slot; 0 means "no slot".
    pub n_stream: u32,
    /// Tokens per stream.
    pub n_per_stream: u32,
    /// Stream of each slot stream.
    pub strm: [i32; MAX_SEQ],
    /// Caller-owned, `idxs_cap` elements: token `k*n_per_stream + i` → cell `idxs[k*n_per_stream + i]`.
    pub idxs: *mut u32,
    /// Capacity of `idxs` in elements.
    pub idxs_cap: u32,
}

/// Mirror of `kvref_params`: how to configure the stock cache. [`Params::default`] gives the
/// shim's defaults: 256 cells, 1 sequence, unified, no SWA, transposed V, f16/f16, no ALiBi.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Cells per stream.
    pub kv_size: u32,
    /// Sequences (and streams when not unified).
    pub n_seq_max: u32,
    /// One stream for all sequences.
    pub unified: bool,
    /// Sliding-window size.
    pub n_swa: u32,
    /// `llama_swa_type`: 0 none, 1 standard, 2 chunked, 3 symmetric.
    pub swa_type: i32,
    /// V stored transposed (flash attention off).
    pub v_trans: bool,
    /// `ggml_type` of K.
    pub type_k: i32,
    /// `ggml_type` of V.
    pub type_v: i32,
    /// Overrides `hparams.use_alibi` (mask values become `-|p0 - p1|`).
    pub use_alibi: bool,
    /// Pretend the model uses M-RoPE: 4 position sections, cell ext serialized, no K-shift.
    pub mrope: bool,
    /// `n_rel_attn_bkts` for position buckets; 0 keeps the model's.
    pub n_rel_attn_bkts: u32,
    /// `llama_non_causal_type` override; -1 keeps the model's.
    pub non_causal_type: i32,
}

impl Default for Params {
    fn default() -> Self {
        let mut p = Params {
            kv_size: 0,
            n_seq_max: 0,
            unified: false,
            n_swa: 0,
            swa_type: 0,
            v_trans: false,
            type_k: 0,
            type_v: 0,
            use_alibi: false,
            mrope: false,
            n_rel_attn_bkts: 0,
            non_causal_type: 0,
        };
        // SAFETY: `p` is a valid, writable kvref_params (same layout, checked at load).
        unsafe { (api().default_params)(&mut p) };
        p
    }
}

/// Mirror of `kvref_ctx_params`: how to configure a stock `llama_context` ([`RefCtx`]).
/// [`CtxParams::default`] gives the shim's defaults: `n_ctx` 256, `n_batch` 0 (= `n_ctx`),
/// 1 sequence, unified, no flash attention, f16/f16, no rollback snapshots.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtxParams {
    /// `llama_context_params.n_ctx`; llama.cpp pads it to 256 (when not unified, each sequence
    /// gets `n_ctx / n_seq_max` cells, padded to 256).
    pub n_ctx: u32,
    /// `n_batch` and `n_ubatch`; 0 means `n_ctx`.
    pub n_batch: u32,
    /// Sequences (and streams when not unified).
    pub n_seq_max: u32,
    /// One KV stream for all sequences.
    pub kv_unified: bool,
    /// `LLAMA_FLASH_ATTN_TYPE_ENABLED` when set, else `DISABLED` (V stored transposed).
    pub flash_attn: bool,
    /// `ggml_type` of K.
    pub type_k: i32,
    /// `ggml_type` of V.
    pub type_v: i32,
    /// `llama_context_params.n_rs_seq`: recurrent rollback snapshots per sequence (llama.cpp
    /// clamps it to 0 for architectures without rollback support, e.g. `mamba`; `lfm2` keeps it).
    pub n_rs_seq: u32,
}

impl Default for CtxParams {
    fn default() -> Self {
        let mut p = CtxParams {
            n_ctx: 0,
            n_batch: 0,
            n_seq_max: 0,
            kv_unified: false,
            flash_attn: false,
            type_k: 0,
            type_v: 0,
            n_rs_seq: 0,
        };
        // SAFETY: `p` is a valid, writable kvref_ctx_params (same layout, checked at load).
        unsafe { (api().ctx_default_params)(&mut p) };
        p
    }
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

/// `llama_swa_type` values.
pub mod swa_type {
    /// No sliding window.
    pub const NONE: i32 = 0;
    /// `p1 - p0 >= n_swa` is masked.
    pub const STANDARD: i32 = 1;
    /// Chunks of `n_swa` positions.
    pub const CHUNKED: i32 = 2;
    /// `|p1 - p0| > n_swa / 2` is masked.
    pub const SYMMETRIC: i32 = 3;
}

/// `llama_non_causal_type` values (how `causal = false` masks are built).
pub mod non_causal_type {
    /// All layers non-causal, SWA still applied.
    pub const ALL: i32 = 0;
    /// Only SWA caches become non-causal; dense caches stay causal.
    pub const SWA_ONLY: i32 = 1;
    /// Non-causal, and SWA not applied between tokens of the current ubatch.
    pub const SWA_FULL: i32 = 2;
}

/// `llama_memory_status`, as returned by [`RefKv::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryStatus {
    /// Something was applied.
    Success,
    /// Nothing to do.
    NoUpdate,
    /// `LLAMA_MEMORY_STATUS_FAILED_PREPARE`.
    FailedPrepare,
    /// `LLAMA_MEMORY_STATUS_FAILED_COMPUTE` (also: the helper context could not be created).
    FailedCompute,
}

impl MemoryStatus {
    fn from_raw(v: i32) -> MemoryStatus {
        match v {
            0 => MemoryStatus::Success,
            1 => MemoryStatus::NoUpdate,
            2 => MemoryStatus::FailedPrepare,
            _ => MemoryStatus::FailedCompute,
        }
    }
}

/// Where a ubatch goes: token `k*n_per_stream + i` → cell `idxs[k][i]` of stream `strm[k]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// First stream.
    pub s0: u32,
    /// Last stream.
    pub s1: u32,
    /// Stream of each slot stream.
    pub strm: Vec<i32>,
    /// Cell indices, one vector per slot stream.
    pub idxs: Vec<Vec<u32>>,
}

impl Slot {
    fn from_raw(raw: &RawSlot, flat: &[u32]) -> Slot {
        let ns = raw.n_stream as usize;
        let n = raw.n_per_stream as usize;
        Slot {
            s0: raw.s0,
            s1: raw.s1,
            strm: raw.strm[..ns].to_vec(),
            idxs: (0..ns).map(|k| flat[k * n..(k + 1) * n].to_vec()).collect(),
        }
    }

    /// The C view; `flat` must outlive its use.
    fn to_raw(&self, flat: &mut Vec<u32>) -> RawSlot {
        assert!(self.strm.len() <= MAX_SEQ && self.strm.len() == self.idxs.len());
        let n = self.idxs.first().map_or(0, Vec::len);
        assert!(
            self.idxs.iter().all(|v| v.len() == n),
            "every slot stream holds the same number of cells"
        );
        flat.clear();
        for v in &self.idxs {
            flat.extend_from_slice(v);
        }
        let mut strm = [0i32; MAX_SEQ];
        strm[..self.strm.len()].copy_from_slice(&self.strm);
        RawSlot {
            s0: self.s0,
            s1: self.s1,
            n_stream: self.strm.len() as u32,
            n_per_stream: n as u32,
            strm,
            idxs: flat.as_mut_ptr(),
            idxs_cap: flat.len() as u32,
        }
    }
}

fn empty_raw_slot(idxs: &mut [u32]) -> RawSlot {
    RawSlot {
        s0: 0,
        s1: 0,
        n_stream: 0,
        n_per_stream: 0,
        strm: [0; MAX_SEQ],
        idxs: idxs.as_mut_ptr(),
        idxs_cap: u32::try_from(idxs.len()).expect("slot too large"),
    }
}

/// The cell table of one stream (`kv_size` entries each), read from the stock cells' arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cells {
    /// Position, -1 for an empty cell.
    pub pos: Vec<i32>,
    /// Pending K-shift delta.
    pub shift: Vec<i32>,
    /// Sequence bitset: bit `s` of word `s / 64`.
    pub seq: Vec<[u64; 4]>,
    /// `[x, y, tok]` (M-RoPE 2-D position and token id); may be stale for empty cells.
    pub ext: Vec<[i32; 3]>,
}

impl Cells {
    /// Whether cell `i` holds sequence `s`.
    pub fn has_seq(&self, i: usize, s: i32) -> bool {
        let s = s as usize;
        self.seq[i][s / 64] >> (s % 64) & 1 == 1
    }

    /// The sequences of cell `i`, ascending.
    pub fn seqs(&self, i: usize) -> Vec<i32> {
        (0..MAX_SEQ as i32)
            .filter(|&s| self.has_seq(i, s))
            .collect()
    }
}

/// A stock graph view of a layer's K or V ([`RefKv::view`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// `ne` of the view.
    pub ne: [i64; 4],
    /// `nb` (byte strides) of the view.
    pub nb: [usize; 4],
    /// Byte offset of the view into the layer tensor (`view_offs`).
    pub offs: usize,
    /// The bytes the view sees, row by row (`ne[0]` elements per row, rows in `ne` order).
    pub data: Vec<u8>,
}

/// Search head and usage of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// Where the next slot search starts.
    pub head: u32,
    /// Used (non-empty) cells.
    pub used: u32,
    /// Smallest used index, 0 if none.
    pub used_min: u32,
    /// Largest used index + 1, 0 if none.
    pub used_max_p1: u32,
    /// Some cell has a pending K-shift.
    pub has_shift: bool,
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

type KvPtr = *mut c_void;
type CtxPtr = *mut c_void;

/// The resolved `kvref_*` functions; the library stays loaded for the life of the process.
struct Api {
    _lib: libloading::os::unix::Library,
    sizeof: unsafe extern "C" fn(i32) -> usize,
    default_params: unsafe extern "C" fn(*mut Params),
    write_model: unsafe extern "C" fn(*const c_char) -> bool,
    sanity_decode: unsafe extern "C" fn(*const c_char, u32) -> i32,
    new: unsafe extern "C" fn(*const c_char, *const Params) -> KvPtr,
    free: unsafe extern "C" fn(KvPtr),
    size: unsafe extern "C" fn(KvPtr) -> u32,
    n_stream: unsafe extern "C" fn(KvPtr) -> u32,
    n_embd_v_gqa_max: unsafe extern "C" fn(KvPtr) -> u32,
    clear: unsafe extern "C" fn(KvPtr, bool),
    seq_rm: unsafe extern "C" fn(KvPtr, i32, i32, i32) -> bool,
    seq_cp: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_keep: unsafe extern "C" fn(KvPtr, i32),
    seq_add: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_div: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_pos_min: unsafe extern "C" fn(KvPtr, i32) -> i32,
    seq_pos_max: unsafe extern "C" fn(KvPtr, i32) -> i32,
    can_shift: unsafe extern "C" fn(KvPtr) -> bool,
    has_shift: unsafe extern "C" fn(KvPtr) -> bool,
    find_slot: unsafe extern "C" fn(KvPtr, *const RawUbatch, bool, *mut RawSlot) -> bool,
    apply_ubatch: unsafe extern "C" fn(KvPtr, *const RawSlot, *const RawUbatch),
    prepare: unsafe extern "C" fn(KvPtr, *const RawUbatch, u32, *mut RawSlot) -> bool,
    get_n_kv: unsafe extern "C" fn(KvPtr, *const RawSlot) -> u32,
    update: unsafe extern "C" fn(KvPtr) -> i32,
    cells: unsafe extern "C" fn(KvPtr, u32, *mut i32, *mut i32, *mut u64, *mut i32),
    stream_info:
        unsafe extern "C" fn(KvPtr, u32, *mut u32, *mut u32, *mut u32, *mut u32, *mut bool),
    pending_copies: unsafe extern "C" fn(KvPtr) -> u32,
    pending_copy_list: unsafe extern "C" fn(KvPtr, *mut u32, *mut u32, u32) -> u32,
    view: unsafe extern "C" fn(
        KvPtr,
        bool,
        i32,
        u32,
        u32,
        u32,
        *mut i64,
        *mut usize,
        *mut usize,
        *mut u8,
        usize,
    ) -> usize,
    kq_mask: unsafe extern "C" fn(KvPtr, *const RawUbatch, bool, bool, u32, u32, *mut c_void),
    k_idxs: unsafe extern "C" fn(KvPtr, *const RawUbatch, *const RawSlot, *mut i64),
    v_idxs: unsafe extern "C" fn(KvPtr, *const RawUbatch, *const RawSlot, *mut i64),
    k_shift: unsafe extern "C" fn(KvPtr, *mut i32),
    pos_bucket: unsafe extern "C" fn(KvPtr, *const RawUbatch, u32, *mut i32),
    tensor_nbytes: unsafe extern "C" fn(KvPtr, bool, i32) -> usize,
    tensor_get: unsafe extern "C" fn(KvPtr, bool, i32, usize, *mut c_void, usize) -> bool,
    tensor_set: unsafe extern "C" fn(KvPtr, bool, i32, usize, *const c_void, usize) -> bool,
    state_write: unsafe extern "C" fn(KvPtr, i32, u32, *mut u8, usize) -> usize,
    state_read: unsafe extern "C" fn(KvPtr, i32, u32, *const u8, usize) -> usize,
    state_clear: unsafe extern "C" fn(KvPtr, i32),
    write_model_ex: unsafe extern "C" fn(*const c_char, u32, u32, u32, u32) -> bool,
    ctx_default_params: unsafe extern "C" fn(*mut CtxParams),
    ctx_new: unsafe extern "C" fn(*const c_char, *const CtxParams) -> CtxPtr,
    ctx_free: unsafe extern "C" fn(CtxPtr),
    ctx_decode: unsafe extern "C" fn(CtxPtr, *const i32, u32, i32, i32) -> i32,
    ctx_n_vocab: unsafe extern "C" fn(CtxPtr) -> u32,
    ctx_logits: unsafe extern "C" fn(CtxPtr, *mut f32) -> bool,
    ctx_seq_get: unsafe extern "C" fn(CtxPtr, i32, u32, *mut u8, usize) -> usize,
    ctx_seq_set: unsafe extern "C" fn(CtxPtr, i32, u32, *const u8, usize) -> usize,
    ctx_seq_save_file: unsafe extern "C" fn(CtxPtr, *const c_char, i32, *const i32, usize) -> usize,
    ctx_seq_load_file:
        unsafe extern "C" fn(CtxPtr, *const c_char, i32, *mut i32, usize, *mut usize) -> usize,
    ctx_state_get: unsafe extern "C" fn(CtxPtr, *mut u8, usize) -> usize,
    ctx_state_set: unsafe extern "C" fn(CtxPtr, *const u8, usize) -> usize,
    ctx_seq_rm: unsafe extern "C" fn(CtxPtr, i32, i32, i32) -> bool,
    ctx_seq_pos_min: unsafe extern "C" fn(CtxPtr, i32) -> i32,
    ctx_seq_pos_max: unsafe extern "C" fn(CtxPtr, i32) -> i32,
    ctx_memory_clear: unsafe extern "C" fn(CtxPtr, bool),
    rs: recurrent::RsApi,
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

    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is the kvref.h function of that name; its Rust type above is
            // transcribed from the C prototype. The pointer stays valid because `lib` is kept
            // in the same `Api`, which lives (in a static) until the process ends.
            unsafe { *lib.get(concat!("kvref_", $name, "\0").as_bytes())? }
        };
    }

    let api = Api {
        sizeof: sym!("sizeof"),
        default_params: sym!("default_params"),
        write_model: sym!("write_model"),
        sanity_decode: sym!("sanity_decode"),
        new: sym!("new"),
        free: sym!("free"),
        size: sym!("size"),
        n_stream: sym!("n_stream"),
        n_embd_v_gqa_max: sym!("n_embd_v_gqa_max"),
        clear: sym!("clear"),
        seq_rm: sym!("seq_rm"),
        seq_cp: sym!("seq_cp"),
        seq_keep: sym!("seq_keep"),
        seq_add: sym!("seq_add"),
        seq_div: sym!("seq_div"),
        seq_pos_min: sym!("seq_pos_min"),
        seq_pos_max: sym!("seq_pos_max"),
        can_shift: sym!("can_shift"),
        has_shift: sym!("has_shift"),
        find_slot: sym!("find_slot"),
        apply_ubatch: sym!("apply_ubatch"),
        prepare: sym!("prepare"),
        get_n_kv: sym!("get_n_kv"),
        update: sym!("update"),
        cells: sym!("cells"),
        stream_info: sym!("stream_info"),
        pending_copies: sym!("pending_copies"),
        pending_copy_list: sym!("pending_copy_list"),
        view: sym!("view"),
        kq_mask: sym!("kq_mask"),
        k_idxs: sym!("k_idxs"),
        v_idxs: sym!("v_idxs"),
        k_shift: sym!("k_shift"),
        pos_bucket: sym!("pos_bucket"),
        tensor_nbytes: sym!("tensor_nbytes"),
        tensor_get: sym!("tensor_get"),
        tensor_set: sym!("tensor_set"),
        state_write: sym!("state_write"),
        state_read: sym!("state_read"),
        state_clear: sym!("state_clear"),
        write_model_ex: sym!("write_model_ex"),
        ctx_default_params: sym!("ctx_default_params"),
        ctx_new: sym!("ctx_new"),
        ctx_free: sym!("ctx_free"),
        ctx_decode: sym!("ctx_decode"),
        ctx_n_vocab: sym!("ctx_n_vocab"),
        ctx_logits: sym!("ctx_logits"),
        ctx_seq_get: sym!("ctx_seq_get"),
        ctx_seq_set: sym!("ctx_seq_set"),
        ctx_seq_save_file: sym!("ctx_seq_save_file"),
        ctx_seq_load_file: sym!("ctx_seq_load_file"),
        ctx_state_get: sym!("ctx_state_get"),
        ctx_state_set: sym!("ctx_state_set"),
        ctx_seq_rm: sym!("ctx_seq_rm"),
        ctx_seq_pos_min: sym!("ctx_seq_pos_min"),
        ctx_seq_pos_max: sym!("ctx_seq_pos_max"),
        ctx_memory_clear: sym!("ctx_memory_clear"),
        rs: recurrent::RsApi::load(&lib)?,
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
    Ok(api)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path contains a NUL byte")
}

/// Writes the tiny random-weight `llama` GGUF (2 layers, n_embd 64, 4 heads, 2 KV heads,
/// head size 16, vocabulary 32, F32 weights from a fixed seed) to `path`.
pub fn write_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (api().write_model)(p.as_ptr()) }
}

/// Path of the tiny model, written once per process into the temp directory.
///
/// Every process writes the (deterministic) file under a private name and renames it over
/// the shared one, so concurrent test processes never see a partial file.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir();
        let path = dir.join("kvref-llama-tiny-v1.gguf");
        let tmp = dir.join(format!("kvref-llama-tiny-v1.gguf.{}", std::process::id()));
        assert!(
            write_model(&tmp),
            "cannot write the tiny model to {}",
            tmp.display()
        );
        std::fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), path.display()));
        path
    })
    .clone()
}

/// Writes a tiny random-weight `llama` GGUF of the given shape to `path`: `n_layer` layers,
/// width `n_embd`, `n_head` query heads of size `n_embd / n_head` (must divide exactly and be
/// even), `n_head_kv` KV heads (must divide `n_head`), feed-forward width `2 * n_embd`,
/// vocabulary 32, F32 weights from the fixed seed of [`write_model`], whose file is
/// `write_model_ex(path, 2, 64, 4, 2)` byte for byte. `false` for an invalid shape or a failed
/// write.
pub fn write_model_ex(path: &Path, n_layer: u32, n_embd: u32, n_head: u32, n_head_kv: u32) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (api().write_model_ex)(p.as_ptr(), n_layer, n_embd, n_head, n_head_kv) }
}

/// Path of a tiny model of the given shape (see [`write_model_ex`]), written once per process
/// and shape into the temp directory the way [`model_path`] writes its file; the default shape
/// `(2, 64, 4, 2)` returns [`model_path`] itself. Panics on an invalid shape.
pub fn model_path_ex(n_layer: u32, n_embd: u32, n_head: u32, n_head_kv: u32) -> PathBuf {
    if (n_layer, n_embd, n_head, n_head_kv) == (2, 64, 4, 2) {
        return model_path();
    }
    static PATHS: OnceLock<Mutex<HashMap<[u32; 4], PathBuf>>> = OnceLock::new();
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    paths
        .entry([n_layer, n_embd, n_head, n_head_kv])
        .or_insert_with(|| {
            let dir = std::env::temp_dir();
            let name = format!("kvref-llama-l{n_layer}-e{n_embd}-h{n_head}-kv{n_head_kv}-v1.gguf");
            let path = dir.join(&name);
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            assert!(
                write_model_ex(&tmp, n_layer, n_embd, n_head, n_head_kv),
                "cannot write the model ({n_layer}, {n_embd}, {n_head}, {n_head_kv}) to {}",
                tmp.display()
            );
            std::fs::rename(&tmp, &path).unwrap_or_else(|e| {
                panic!("cannot move {} to {}: {e}", tmp.display(), path.display())
            });
            path
        })
        .clone()
}

/// Loads `model` (cached per path) and runs `llama_decode` of `n_tokens` tokens on a fresh
/// context: 0 on success, else `llama_decode`'s code or the shim's negative failure codes
/// (-100 load, -101 context, -102 non-finite logits, -103 no logits, -104 wrong seq_pos_max).
pub fn sanity_decode(model: &Path, n_tokens: u32) -> i32 {
    let p = c_path(model);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (api().sanity_decode)(p.as_ptr(), n_tokens) }
}

/// A stock `llama_kv_cache` (with its own copy of the model's hparams, overridden by
/// [`Params`]). Freed on drop.
#[derive(Debug)]
pub struct RefKv {
    ptr: KvPtr,
    params: Params,
}

// SAFETY: the cache is a plain heap object with no thread affinity; &mut self methods are the
// only mutators and &self methods only read it.
unsafe impl Send for RefKv {}

impl Drop for RefKv {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from kvref_new and is freed exactly once.
        unsafe { (api().free)(self.ptr) }
    }
}

impl RefKv {
    /// Creates a stock cache over the model at `model` (loaded once per path per process).
    /// `None` if the model cannot be loaded or the cache constructor throws.
    pub fn new(model: &Path, params: &Params) -> Option<RefKv> {
        let p = c_path(model);
        // SAFETY: both pointers are valid for the call; the shim copies what it keeps.
        let ptr = unsafe { (api().new)(p.as_ptr(), params) };
        (!ptr.is_null()).then_some(RefKv {
            ptr,
            params: *params,
        })
    }

    /// The parameters the cache was created with.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// [`RefKv::new`] over the tiny model of [`model_path`].
    pub fn tiny(params: &Params) -> RefKv {
        RefKv::new(&model_path(), params).expect("the stock cache could not be created")
    }

    /// Cells per stream (`get_size`).
    pub fn size(&self) -> u32 {
        // SAFETY: `ptr` is a live kvref (here and in every method below).
        unsafe { (api().size)(self.ptr) }
    }

    /// Number of streams.
    pub fn n_stream(&self) -> u32 {
        // SAFETY: live kvref.
        unsafe { (api().n_stream)(self.ptr) }
    }

    /// `hparams.n_embd_v_gqa_max()`: the V row width, and the V-index stride when transposed.
    pub fn n_embd_v_gqa_max(&self) -> u32 {
        // SAFETY: live kvref.
        unsafe { (api().n_embd_v_gqa_max)(self.ptr) }
    }

    /// `clear(data)`.
    pub fn clear(&mut self, data: bool) {
        // SAFETY: live kvref.
        unsafe { (api().clear)(self.ptr, data) }
    }

    /// `seq_rm(seq, p0, p1)`.
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: live kvref.
        unsafe { (api().seq_rm)(self.ptr, seq, p0, p1) }
    }

    /// `seq_cp(src, dst, p0, p1)`.
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        // SAFETY: live kvref.
        unsafe { (api().seq_cp)(self.ptr, src, dst, p0, p1) }
    }

    /// `seq_keep(seq)`.
    pub fn seq_keep(&mut self, seq: i32) {
        // SAFETY: live kvref.
        unsafe { (api().seq_keep)(self.ptr, seq) }
    }

    /// `seq_add(seq, p0, p1, delta)`.
    pub fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) {
        // SAFETY: live kvref.
        unsafe { (api().seq_add)(self.ptr, seq, p0, p1, delta) }
    }

    /// `seq_div(seq, p0, p1, d)`.
    pub fn seq_div(&mut self, seq: i32, p0: i32, p1: i32, d: i32) {
        // SAFETY: live kvref.
        unsafe { (api().seq_div)(self.ptr, seq, p0, p1, d) }
    }

    /// `seq_pos_min(seq)`, -1 if the sequence is empty.
    pub fn seq_pos_min(&self, seq: i32) -> i32 {
        // SAFETY: live kvref.
        unsafe { (api().seq_pos_min)(self.ptr, seq) }
    }

    /// `seq_pos_max(seq)`, -1 if the sequence is empty.
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        // SAFETY: live kvref.
        unsafe { (api().seq_pos_max)(self.ptr, seq) }
    }

    /// `get_can_shift()`.
    pub fn can_shift(&self) -> bool {
        // SAFETY: live kvref.
        unsafe { (api().can_shift)(self.ptr) }
    }

    /// `get_has_shift()`.
    pub fn has_shift(&self) -> bool {
        // SAFETY: live kvref.
        unsafe { (api().has_shift)(self.ptr) }
    }

    /// `find_slot(ubatch, cont)`; `None` when the stock search finds no slot.
    pub fn find_slot(&self, ub: &UbatchRef<'_>, cont: bool) -> Option<Slot> {
        let mut flat = vec![0u32; ub.n_tokens() as usize];
        let mut raw = empty_raw_slot(&mut flat);
        // SAFETY: `ub.raw` points into live arrays of the borrowed Ubatch; `raw.idxs` has
        // `idxs_cap` writable elements (a slot places every token, so n_tokens suffice).
        let ok = unsafe { (api().find_slot)(self.ptr, &ub.raw, cont, &mut raw) };
        ok.then(|| Slot::from_raw(&raw, &flat))
    }

    /// `apply_ubatch(slot, ubatch)`.
    pub fn apply_ubatch(&mut self, slot: &Slot, ub: &UbatchRef<'_>) {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        // SAFETY: both views point into arrays alive for the call.
        unsafe { (api().apply_ubatch)(self.ptr, &raw, &ub.raw) }
    }

    /// `prepare(ubatches)`: the slots each ubatch would get (the cells are rolled back as the
    /// stock code does); `None` if one does not fit.
    pub fn prepare(&mut self, ubs: &[UbatchRef<'_>]) -> Option<Vec<Slot>> {
        assert!(
            !ubs.is_empty(),
            "the stock prepare aborts on an empty ubatch list"
        );
        let raws: Vec<RawUbatch> = ubs.iter().map(|u| u.raw).collect();
        let mut flats: Vec<Vec<u32>> = ubs
            .iter()
            .map(|u| vec![0u32; u.n_tokens() as usize])
            .collect();
        let mut slots: Vec<RawSlot> = flats.iter_mut().map(|f| empty_raw_slot(f)).collect();
        // SAFETY: `raws` copies views whose arrays are borrowed for the call; each slot's
        // `idxs` points into its own `flats` entry, sized to its ubatch.
        let ok = unsafe {
            (api().prepare)(
                self.ptr,
                raws.as_ptr(),
                raws.len() as u32,
                slots.as_mut_ptr(),
            )
        };
        ok.then(|| {
            slots
                .iter()
                .zip(&flats)
                .map(|(s, f)| Slot::from_raw(s, f))
                .collect()
        })
    }

    /// `get_n_kv(slot)`: the attended cell count for a graph over this slot.
    pub fn get_n_kv(&self, slot: &Slot) -> u32 {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        // SAFETY: `raw` points into `flat`, alive for the call.
        unsafe { (api().get_n_kv)(self.ptr, &raw) }
    }

    /// `init_update(lctx, false)` then `apply()`: pending stream copies and K-shift.
    pub fn update(&mut self) -> MemoryStatus {
        // SAFETY: live kvref.
        MemoryStatus::from_raw(unsafe { (api().update)(self.ptr) })
    }

    /// The cell table of `stream`.
    pub fn cells(&self, stream: u32) -> Cells {
        assert!(stream < self.n_stream(), "no stream {stream}");
        let n = self.size() as usize;
        let mut pos = vec![0i32; n];
        let mut shift = vec![0i32; n];
        let mut seq = vec![[0u64; 4]; n];
        let mut ext = vec![[0i32; 3]; n];
        // SAFETY: every array holds `size` cells of the layout the shim writes.
        unsafe {
            (api().cells)(
                self.ptr,
                stream,
                pos.as_mut_ptr(),
                shift.as_mut_ptr(),
                seq.as_mut_ptr().cast(),
                ext.as_mut_ptr().cast(),
            )
        };
        Cells {
            pos,
            shift,
            seq,
            ext,
        }
    }

    /// Head, usage and shift flag of `stream`.
    pub fn stream_info(&self, stream: u32) -> StreamInfo {
        assert!(stream < self.n_stream(), "no stream {stream}");
        let mut i = StreamInfo {
            head: 0,
            used: 0,
            used_min: 0,
            used_max_p1: 0,
            has_shift: false,
        };
        // SAFETY: every pointer is a valid, writable field of `i`.
        unsafe {
            (api().stream_info)(
                self.ptr,
                stream,
                &mut i.head,
                &mut i.used,
                &mut i.used_min,
                &mut i.used_max_p1,
                &mut i.has_shift,
            )
        };
        i
    }

    /// Number of stream copies waiting for the next [`RefKv::update`].
    pub fn pending_copies(&self) -> u32 {
        // SAFETY: live kvref.
        unsafe { (api().pending_copies)(self.ptr) }
    }

    /// The pending stream copies as `(source, destination)` streams, in the order
    /// [`RefKv::update`] applies them.
    pub fn pending_copy_list(&self) -> Vec<(u32, u32)> {
        let n = self.pending_copies();
        let (mut src, mut dst) = (vec![0u32; n as usize], vec![0u32; n as usize]);
        // SAFETY: both arrays hold `n` writable elements, the capacity passed.
        let got =
            unsafe { (api().pending_copy_list)(self.ptr, src.as_mut_ptr(), dst.as_mut_ptr(), n) };
        assert_eq!(got, n, "pending copies changed between the two calls");
        src.into_iter().zip(dst).collect()
    }

    fn check_mask(&self, ub: &UbatchRef<'_>, n_kv: u32, n_stream_m: u32, len: usize) {
        assert!(n_kv <= self.size(), "n_kv {n_kv} exceeds the cache size");
        assert!(
            n_stream_m > 0 && ub.n_tokens() % n_stream_m == 0,
            "n_tokens must split into n_stream_m streams"
        );
        assert_eq!(
            len,
            n_kv as usize * ub.n_tokens() as usize,
            "mask buffer must hold n_kv * n_tokens entries"
        );
    }

    /// The F32 KQ mask `[n_kv, n_tokens / n_stream_m, 1, n_stream_m]` into `out`, without
    /// allocating (for benchmark loops).
    pub fn kq_mask_f32_into(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        out: &mut [f32],
    ) {
        self.check_mask(ub, n_kv, n_stream_m, out.len());
        // SAFETY: `out` holds n_kv * n_tokens floats, exactly what the stock code writes.
        unsafe {
            (api().kq_mask)(
                self.ptr,
                &ub.raw,
                causal,
                false,
                n_kv,
                n_stream_m,
                out.as_mut_ptr().cast(),
            )
        }
    }

    /// The F32 KQ mask as `set_input_kq_mask` writes it (0.0, -inf, or -|Δpos| with ALiBi).
    pub fn kq_mask_f32(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n_kv as usize * ub.n_tokens() as usize];
        self.kq_mask_f32_into(ub, causal, n_kv, n_stream_m, &mut out);
        out
    }

    /// The F16 KQ mask (raw IEEE half bits) into `out`, without allocating.
    pub fn kq_mask_f16_into(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        out: &mut [u16],
    ) {
        self.check_mask(ub, n_kv, n_stream_m, out.len());
        // SAFETY: `out` holds n_kv * n_tokens halves, exactly what the stock code writes.
        unsafe {
            (api().kq_mask)(
                self.ptr,
                &ub.raw,
                causal,
                true,
                n_kv,
                n_stream_m,
                out.as_mut_ptr().cast(),
            )
        }
    }

    /// The F16 KQ mask as raw IEEE half bits (flash-attention layout).
    pub fn kq_mask_f16(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
    ) -> Vec<u16> {
        let mut out = vec![0u16; n_kv as usize * ub.n_tokens() as usize];
        self.kq_mask_f16_into(ub, causal, n_kv, n_stream_m, &mut out);
        out
    }

    /// `set_input_k_idxs`: global K row of each token.
    pub fn k_idxs(&self, ub: &UbatchRef<'_>, slot: &Slot) -> Vec<i64> {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        assert_eq!(
            flat.len(),
            ub.n_tokens() as usize,
            "the slot must place every token of the ubatch"
        );
        let mut out = vec![0i64; ub.n_tokens() as usize];
        // SAFETY: `out` holds n_tokens entries; the views are alive for the call.
        unsafe { (api().k_idxs)(self.ptr, &ub.raw, &raw, out.as_mut_ptr()) };
        out
    }

    /// `set_input_v_idxs`: one index per token, or per scalar (`n_tokens * n_embd_v_gqa_max`)
    /// when V is transposed.
    pub fn v_idxs(&self, ub: &UbatchRef<'_>, slot: &Slot) -> Vec<i64> {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        assert_eq!(
            flat.len(),
            ub.n_tokens() as usize,
            "the slot must place every token of the ubatch"
        );
        let per_token = if self.params.v_trans {
            self.n_embd_v_gqa_max() as usize
        } else {
            1
        };
        let mut out = vec![0i64; ub.n_tokens() as usize * per_token];
        // SAFETY: `out` is sized for the cache's V layout, which the creation params fix.
        unsafe { (api().v_idxs)(self.ptr, &ub.raw, &raw, out.as_mut_ptr()) };
        out
    }

    /// `set_input_k_shift`: `size * n_stream` deltas (0 for empty cells).
    pub fn k_shift(&self) -> Vec<i32> {
        let mut out = vec![0i32; self.size() as usize * self.n_stream() as usize];
        // SAFETY: `out` holds size * n_stream entries.
        unsafe { (api().k_shift)(self.ptr, out.as_mut_ptr()) };
        out
    }

    /// `set_input_pos_bucket`: `[n_kv, n_tokens]` relative-position buckets (single stream,
    /// ubatch not from an equal split).
    pub fn pos_bucket(&self, ub: &UbatchRef<'_>, n_kv: u32) -> Vec<i32> {
        assert!(n_kv <= self.size(), "n_kv {n_kv} exceeds the cache size");
        let mut out = vec![0i32; n_kv as usize * ub.n_tokens() as usize];
        // SAFETY: `out` holds n_kv * n_tokens entries.
        unsafe { (api().pos_bucket)(self.ptr, &ub.raw, n_kv, out.as_mut_ptr()) };
        out
    }

    /// Size in bytes of `state_write(seq, flags)` (`seq = -1`: whole cache).
    pub fn state_size(&self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (api().state_write)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// The stock graph view `get_k` (`v == false`) or `get_v` of layer `il` over `n_kv` cells
    /// of streams `s0..=s1`: `None` for invalid arguments.
    pub fn view(&self, v: bool, il: i32, n_kv: u32, s0: u32, s1: u32) -> Option<View> {
        let mut out = View::default();
        let call = |out: &mut View, data: &mut [u8]| {
            // SAFETY: every pointer is valid for the call; `data` is writable for its length,
            // which the shim respects.
            unsafe {
                (api().view)(
                    self.ptr,
                    v,
                    il,
                    n_kv,
                    s0,
                    s1,
                    out.ne.as_mut_ptr(),
                    out.nb.as_mut_ptr(),
                    &mut out.offs,
                    data.as_mut_ptr(),
                    data.len(),
                )
            }
        };
        let n = call(&mut out, &mut []);
        if n == 0 {
            return None;
        }
        let mut data = vec![0u8; n];
        assert_eq!(call(&mut out, &mut data), n);
        out.data = data;
        Some(out)
    }

    /// All bytes of the K (`v == false`) or V tensor of layer `il` (every stream); `None` when
    /// the cache holds no such tensor.
    pub fn tensor_bytes(&self, v: bool, il: i32) -> Option<Vec<u8>> {
        // SAFETY: live kvref.
        let n = unsafe { (api().tensor_nbytes)(self.ptr, v, il) };
        if n == 0 {
            return None;
        }
        let mut out = vec![0u8; n];
        // SAFETY: `out` is writable for n bytes, the tensor's size.
        let ok = unsafe { (api().tensor_get)(self.ptr, v, il, 0, out.as_mut_ptr().cast(), n) };
        ok.then_some(out)
    }

    /// Overwrites all bytes of the K (`v == false`) or V tensor of layer `il`; false when the
    /// cache holds no such tensor or `data` is not its size.
    pub fn set_tensor_bytes(&mut self, v: bool, il: i32, data: &[u8]) -> bool {
        // SAFETY: live kvref.
        let n = unsafe { (api().tensor_nbytes)(self.ptr, v, il) };
        if n == 0 || n != data.len() {
            return false;
        }
        // SAFETY: `data` is readable for n bytes, the tensor's size.
        unsafe { (api().tensor_set)(self.ptr, v, il, 0, data.as_ptr().cast(), n) }
    }

    /// `state_write(seq, flags)` (`seq = -1`: whole cache).
    pub fn state_write(&self, seq: i32, flags: u32) -> Vec<u8> {
        let mut buf = vec![0u8; self.state_size(seq, flags)];
        // SAFETY: `buf` is writable for its length, which the shim respects.
        let n = unsafe { (api().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, buf.len(), "state size changed between the two calls");
        buf
    }

    /// `state_write(seq, flags)` into a caller buffer (no allocation): bytes written, 0 if it
    /// does not fit.
    pub fn state_write_into(&self, seq: i32, flags: u32, buf: &mut [u8]) -> usize {
        // SAFETY: `buf` is writable for its length, which the shim respects.
        unsafe { (api().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) }
    }

    /// `state_read(seq, flags)` from `buf`: bytes consumed, or `None` when the stock code threw.
    pub fn state_read(&mut self, seq: i32, flags: u32, buf: &[u8]) -> Option<usize> {
        // SAFETY: `buf` is readable for its length, which the shim respects.
        let n = unsafe { (api().state_read)(self.ptr, seq, flags, buf.as_ptr(), buf.len()) };
        (n != 0).then_some(n)
    }

    /// `state_clear(seq)`: `clear(true)` for -1, else `seq_rm(seq)` and the K/V rows of the
    /// cells `seq` held alone zeroed. `seq` must be -1 or below `n_seq_max` (stock asserts).
    pub fn state_clear(&mut self, seq: i32) {
        // SAFETY: a live cache; the shim forwards to the stock method.
        unsafe { (api().state_clear)(self.ptr, seq) }
    }
}

/// A stock `llama_context` (CPU, one thread) over a model file, used only through the public
/// `llama.h` API: decode, logits, and sequence / whole-state save and restore. Freed on drop.
///
/// As with [`RefKv`], stock assertions abort the process: sequence ids must be below
/// `n_seq_max` and positions must continue each sequence.
#[derive(Debug)]
pub struct RefCtx {
    ptr: CtxPtr,
    params: CtxParams,
    n_vocab: u32,
}

// SAFETY: a llama_context has no thread affinity (its CPU threads are per call); &mut self
// methods are the only mutators and &self methods only read its memory.
unsafe impl Send for RefCtx {}

impl Drop for RefCtx {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from kvref_ctx_new and is freed exactly once.
        unsafe { (api().ctx_free)(self.ptr) }
    }
}

impl RefCtx {
    /// Creates a context over the model at `model` (loaded once per path per process, shared
    /// with [`RefKv::new`]). `None` if the model cannot be loaded or llama.cpp refuses the
    /// parameters (e.g. a quantized V type without flash attention).
    pub fn new(model: &Path, params: &CtxParams) -> Option<RefCtx> {
        let p = c_path(model);
        // SAFETY: both pointers are valid for the call; the shim copies what it keeps.
        let ptr = unsafe { (api().ctx_new)(p.as_ptr(), params) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is a live kvref_ctx.
        let n_vocab = unsafe { (api().ctx_n_vocab)(ptr) };
        Some(RefCtx {
            ptr,
            params: *params,
            n_vocab,
        })
    }

    /// [`RefCtx::new`] over the tiny model of [`model_path`].
    pub fn tiny(params: &CtxParams) -> RefCtx {
        RefCtx::new(&model_path(), params).expect("the stock context could not be created")
    }

    /// The parameters the context was created with.
    pub fn params(&self) -> &CtxParams {
        &self.params
    }

    /// Vocabulary size of the model: the length of [`RefCtx::logits`].
    pub fn n_vocab(&self) -> u32 {
        self.n_vocab
    }

    /// `llama_decode` of `tokens` for sequence `seq` at positions `pos0, pos0 + 1, …`, with
    /// logits for the last token only. Returns `llama_decode`'s result (0 success, 1 no KV
    /// slot, negative on error).
    pub fn decode(&mut self, tokens: &[i32], pos0: i32, seq: i32) -> i32 {
        let n = u32::try_from(tokens.len()).expect("too many tokens");
        // SAFETY: live kvref_ctx (here and in every method below); `tokens` is readable for
        // `n` elements.
        unsafe { (api().ctx_decode)(self.ptr, tokens.as_ptr(), n, pos0, seq) }
    }

    /// The logits of the last decoded token (`llama_get_logits_ith(ctx, -1)`); `None` before
    /// the first successful decode or after a failed one.
    pub fn logits(&mut self) -> Option<Vec<f32>> {
        let mut out = vec![0f32; self.n_vocab as usize];
        // SAFETY: `out` holds n_vocab floats, what the shim copies.
        let ok = unsafe { (api().ctx_logits)(self.ptr, out.as_mut_ptr()) };
        ok.then_some(out)
    }

    /// `llama_state_seq_get_size_ext(seq, flags)`: bytes of the sequence's state (8-byte
    /// header + memory part), 0 on failure.
    pub fn seq_state_size(&mut self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (api().ctx_seq_get)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// `llama_state_seq_get_data_ext(buf, seq, flags)` into a caller buffer, without
    /// allocating (for benchmark loops): bytes written, 0 on failure (e.g. `buf` too small).
    pub fn seq_state_into(&mut self, seq: i32, flags: u32, buf: &mut [u8]) -> usize {
        // SAFETY: `buf` is writable for its length, which llama.cpp respects. A non-null
        // pointer even for an empty slice, so the shim does not take it for a size query.
        unsafe { (api().ctx_seq_get)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) }
    }

    /// The state blob of sequence `seq` (size query, then `llama_state_seq_get_data_ext`);
    /// `None` if either call returns 0.
    pub fn seq_state(&mut self, seq: i32, flags: u32) -> Option<Vec<u8>> {
        let size = self.seq_state_size(seq, flags);
        if size == 0 {
            return None;
        }
        let mut buf = vec![0u8; size];
        let n = self.seq_state_into(seq, flags, &mut buf);
        if n == 0 {
            return None;
        }
        assert_eq!(n, size, "state size changed between the two calls");
        Some(buf)
    }

    /// `llama_state_seq_set_data_ext(buf, dest, flags)`: bytes read, 0 on failure.
    pub fn seq_set(&mut self, dest: i32, flags: u32, buf: &[u8]) -> usize {
        // SAFETY: `buf` is readable for its length, which llama.cpp respects.
        unsafe { (api().ctx_seq_set)(self.ptr, dest, flags, buf.as_ptr(), buf.len()) }
    }

    /// `llama_state_seq_save_file(path, seq, tokens)`: bytes written, 0 on failure.
    pub fn seq_save_file(&mut self, path: &Path, seq: i32, tokens: &[i32]) -> usize {
        let p = c_path(path);
        // SAFETY: `p` is a NUL-terminated path and `tokens` is readable for its length.
        unsafe {
            (api().ctx_seq_save_file)(self.ptr, p.as_ptr(), seq, tokens.as_ptr(), tokens.len())
        }
    }

    /// `llama_state_seq_load_file(path, dest)` with room for `cap` tokens: the bytes of the
    /// file consumed (0 on failure, e.g. more than `cap` tokens) and the saved tokens.
    pub fn seq_load_file(&mut self, path: &Path, dest: i32, cap: usize) -> (usize, Vec<i32>) {
        let p = c_path(path);
        // at least one element: a null tokens_out would only count the tokens, loading nothing
        let mut tokens = vec![0i32; cap.max(1)];
        let mut n = 0usize;
        // SAFETY: `p` is a NUL-terminated path, `tokens` is writable for `cap` elements and `n`
        // is a valid, writable usize.
        let read = unsafe {
            (api().ctx_seq_load_file)(self.ptr, p.as_ptr(), dest, tokens.as_mut_ptr(), cap, &mut n)
        };
        tokens.truncate(if read == 0 { 0 } else { n.min(cap) });
        (read, tokens)
    }

    /// `llama_state_get_size`: bytes of the whole state (model arch string + memory).
    pub fn state_size(&mut self) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (api().ctx_state_get)(self.ptr, ptr::null_mut(), 0) }
    }

    /// The whole context state (`llama_state_get_size`, then `llama_state_get_data`); `None`
    /// if either call returns 0.
    pub fn state(&mut self) -> Option<Vec<u8>> {
        let size = self.state_size();
        if size == 0 {
            return None;
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for its length, which llama.cpp respects.
        let n = unsafe { (api().ctx_state_get)(self.ptr, buf.as_mut_ptr(), buf.len()) };
        if n == 0 {
            return None;
        }
        assert_eq!(n, size, "state size changed between the two calls");
        Some(buf)
    }

    /// `llama_state_set_data(buf)`: bytes read, 0 on failure.
    pub fn state_set(&mut self, buf: &[u8]) -> usize {
        // SAFETY: `buf` is readable for its length, which llama.cpp respects.
        unsafe { (api().ctx_state_set)(self.ptr, buf.as_ptr(), buf.len()) }
    }

    /// `llama_memory_seq_rm(seq, p0, p1)`.
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: live kvref_ctx.
        unsafe { (api().ctx_seq_rm)(self.ptr, seq, p0, p1) }
    }

    /// `llama_memory_seq_pos_min(seq)`, -1 if the sequence is empty.
    pub fn seq_pos_min(&self, seq: i32) -> i32 {
        // SAFETY: live kvref_ctx.
        unsafe { (api().ctx_seq_pos_min)(self.ptr, seq) }
    }

    /// `llama_memory_seq_pos_max(seq)`, -1 if the sequence is empty.
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        // SAFETY: live kvref_ctx.
        unsafe { (api().ctx_seq_pos_max)(self.ptr, seq) }
    }

    /// `llama_memory_clear(data)`.
    pub fn memory_clear(&mut self, data: bool) {
        // SAFETY: live kvref_ctx.
        unsafe { (api().ctx_memory_clear)(self.ptr, data) }
    }
}

#[cfg(test)]
mod tests {
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
