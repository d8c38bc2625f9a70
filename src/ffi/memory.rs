//! The memory handle (`llama_memory_t`), its constructors, and llama.h's nine memory functions.

use std::ffi::{c_char, c_int};

use super::error::llama_memory_result;
use super::handle::{Castable, OwnershipBox};
use crate::error::err;
use crate::kv::{KvCache, KvMemory, KvParams, NonCausalType, SwaType};
use crate::memory::{find, Memory};

/// `llama_pos` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_pos = i32;
/// `llama_seq_id` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_seq_id = i32;
/// `llama_token` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_token = i32;

/// The memory behind a `llama_memory_t`, an opaque struct (llama.h's `struct llama_memory_i`).
/// The C pointer is thin; the trait object (a fat pointer) stays inside.
#[allow(non_camel_case_types)]
pub struct llama_memory_i {
    _private: [u8; 0],
}

impl Castable for llama_memory_i {
    type Ownership = OwnershipBox;
    type RustType = MemoryHandle;
}

/// What a memory handle holds.
pub(crate) struct MemoryHandle {
    pub(crate) inner: Box<dyn Memory>,
    /// Tensor bytes of `ON_DEVICE` sequence states, per source sequence.
    pub(crate) stash: crate::state::Stash,
    /// The last freed context, kept so the next `init_batch` reuses its allocations.
    pub(crate) spare_ctx: Option<Box<super::context::ContextHandle>>,
    /// Sequence ids of the ubatches being read from C.
    pub(crate) scratch: super::context::UbatchScratch,
}

impl MemoryHandle {
    /// A new handle owning `inner`.
    pub(crate) fn boxed(inner: Box<dyn Memory>) -> llama_memory_t {
        super::handle::to_boxed_mut_ptr(MemoryHandle {
            inner,
            stash: Default::default(),
            spare_ctx: None,
            scratch: Default::default(),
        })
    }
}

/// Handle to a memory, the same typedef as llama.h's.
#[allow(non_camel_case_types)]
pub type llama_memory_t = *mut llama_memory_i;

/// Major version.
pub const LLAMA_MEMORY_VERSION_MAJOR: u32 = 0;
/// Minor version.
pub const LLAMA_MEMORY_VERSION_MINOR: u32 = 1;
/// Patch version.
pub const LLAMA_MEMORY_VERSION_PATCH: u32 = 0;

/// No sliding window (`LLAMA_SWA_TYPE_NONE`).
pub const LLAMA_MEMORY_SWA_TYPE_NONE: i32 = 0;
/// Standard sliding window (`LLAMA_SWA_TYPE_STANDARD`).
pub const LLAMA_MEMORY_SWA_TYPE_STANDARD: i32 = 1;
/// Chunked sliding window (`LLAMA_SWA_TYPE_CHUNKED`).
pub const LLAMA_MEMORY_SWA_TYPE_CHUNKED: i32 = 2;
/// Symmetric sliding window (`LLAMA_SWA_TYPE_SYMMETRIC`).
pub const LLAMA_MEMORY_SWA_TYPE_SYMMETRIC: i32 = 3;

/// Non-causal attention affects every layer (`LLAMA_NON_CAUSAL_TYPE_ALL`).
pub const LLAMA_MEMORY_NON_CAUSAL_ALL: i32 = 0;
/// Only SWA caches become non-causal (`LLAMA_NON_CAUSAL_TYPE_SWA_ONLY`).
pub const LLAMA_MEMORY_NON_CAUSAL_SWA_ONLY: i32 = 1;
/// Non-causal, and the ubatch's own span escapes the window (`LLAMA_NON_CAUSAL_TYPE_SWA_FULL`).
pub const LLAMA_MEMORY_NON_CAUSAL_SWA_FULL: i32 = 2;

/// Parameters of a KV cache; get the defaults from `llama_memory_kv_default_params()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_kv_params {
    /// Cells per stream (llama.cpp: `n_ctx_seq`, a multiple of 256 there).
    pub size: u32,
    /// Number of sequences, 1..=256.
    pub n_seq_max: u32,
    /// One stream for all sequences (`kv_unified`); else one stream per sequence.
    pub unified: bool,
    /// `size` must be a multiple of it; 1 in llama.cpp.
    pub n_pad: u32,
    /// Sliding window size, > 0 when `swa_type` is not NONE.
    pub n_swa: u32,
    /// One of `LLAMA_MEMORY_SWA_TYPE_*`.
    pub swa_type: i32,
    /// 1, or 4 for M-RoPE models (positions carry y/x sections; no seq_add/seq_div).
    pub n_pos_per_embd: u32,
    /// False for models whose K cannot be re-rotated (llama.cpp: STEP35).
    pub model_can_shift: bool,
    /// ALiBi models: visible mask entries are `-|p0 - p1|`.
    pub use_alibi: bool,
    /// One of `LLAMA_MEMORY_NON_CAUSAL_*` (the model's `non_causal_type`).
    pub non_causal_type: i32,
    /// V stored transposed (llama.cpp: flash attention disabled).
    pub v_trans: bool,
    /// Largest V row width over the layers, for transposed V indices.
    pub n_embd_v_gqa_max: u32,
    /// Relative attention buckets (T5), for position buckets; 0 if unused.
    pub n_rel_attn_bkts: u32,
}

impl From<KvParams> for llama_memory_kv_params {
    fn from(p: KvParams) -> Self {
        llama_memory_kv_params {
            size: p.size,
            n_seq_max: p.n_seq_max,
            unified: p.unified,
            n_pad: p.n_pad,
            n_swa: p.n_swa,
            swa_type: p.swa_type as i32,
            n_pos_per_embd: p.n_pos_per_embd,
            model_can_shift: p.model_can_shift,
            use_alibi: p.use_alibi,
            non_causal_type: p.non_causal_type as i32,
            v_trans: p.v_trans,
            n_embd_v_gqa_max: p.n_embd_v_gqa_max,
            n_rel_attn_bkts: p.n_rel_attn_bkts,
        }
    }
}

impl TryFrom<llama_memory_kv_params> for KvParams {
    type Error = crate::error::Error;
    fn try_from(p: llama_memory_kv_params) -> crate::error::Result<KvParams> {
        let swa_type = SwaType::from_raw(p.swa_type)
            .ok_or_else(|| err!(InvalidArgument, "unknown swa_type {}", p.swa_type))?;
        let non_causal_type = match p.non_causal_type {
            0 => NonCausalType::All,
            1 => NonCausalType::SwaOnly,
            2 => NonCausalType::SwaFull,
            v => return Err(err!(InvalidArgument, "unknown non_causal_type {v}")),
        };
        Ok(KvParams {
            size: p.size,
            n_seq_max: p.n_seq_max,
            unified: p.unified,
            n_pad: p.n_pad,
            n_swa: p.n_swa,
            swa_type,
            n_pos_per_embd: p.n_pos_per_embd,
            model_can_shift: p.model_can_shift,
            use_alibi: p.use_alibi,
            non_causal_type,
            v_trans: p.v_trans,
            n_embd_v_gqa_max: p.n_embd_v_gqa_max,
            n_rel_attn_bkts: p.n_rel_attn_bkts,
        })
    }
}

/// This library's version, "MAJOR.MINOR.PATCH" (static string).
#[no_mangle]
pub extern "C" fn llama_memory_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Default KV cache parameters: 256 cells, 1 sequence, unified, no sliding window, text
/// positions, transposed V.
#[no_mangle]
pub extern "C" fn llama_memory_kv_default_params() -> llama_memory_kv_params {
    KvParams::default().into()
}

/// Creates a KV cache. Returns NULL (and sets the last error) for invalid parameters.
/// Free it with `llama_memory_free`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_init(params: llama_memory_kv_params) -> llama_memory_t {
    ffi_boundary!({
        let p = try_or!(KvParams::try_from(params));
        let kv = try_or!(KvCache::new(p));
        let mem = try_or!(KvMemory::new(kv, None));
        MemoryHandle::boxed(Box::new(mem))
    })
}

/// Frees a memory. NULL is accepted. Contexts made from it must be freed first.
#[no_mangle]
pub extern "C" fn llama_memory_free(mem: llama_memory_t) {
    ffi_boundary!({
        // SAFETY: a non-NULL handle comes from a constructor and the header forbids using it
        // after this call.
        unsafe { super::handle::free_box(mem) }
    })
}

/// Clears the memory contents; `data` also clears the tensor buffers. NULL: no-op.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_clear(mem: llama_memory_t, data: bool) {
    clear(mem, data)
}

/// Removes the tokens of `seq_id` (any sequence when -1) with positions in `[p0, p1)`.
/// Returns true on success, as llama.h (also for NULL `mem`, as llama.h). Returns false with
/// the last error set for a `seq_id` outside `[-1, n_seq_max)` (llama.cpp aborts there).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    seq_rm(mem, seq_id, p0, p1)
}

/// Copies the tokens of `seq_id_src` in `[p0, p1)` to `seq_id_dst`. On invalid ids, or a
/// partial range between streams (llama.cpp aborts on both), sets the last error and changes
/// nothing.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_cp(
    mem: llama_memory_t,
    seq_id_src: llama_seq_id,
    seq_id_dst: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) {
    seq_cp(mem, seq_id_src, seq_id_dst, p0, p1)
}

/// Removes every token that does not belong to `seq_id` (in its stream).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_keep(mem: llama_memory_t, seq_id: llama_seq_id) {
    seq_keep(mem, seq_id)
}

/// Adds `delta` to the positions of `seq_id` in `[p0, p1)`.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_add(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    delta: llama_pos,
) {
    seq_add(mem, seq_id, p0, p1, delta)
}

/// Divides the positions of `seq_id` in `[p0, p1)` by `d`. `d <= 0` (undefined in llama.cpp)
/// sets the last error and changes nothing; `d == 1` is a no-op.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_div(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    d: c_int,
) {
    seq_div(mem, seq_id, p0, p1, d)
}

/// Smallest position of `seq_id`, -1 if empty, NULL `mem` or invalid `seq_id` (last error set).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_pos_min(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    seq_pos_min(mem, seq_id)
}

/// Largest position of `seq_id`, -1 if empty, NULL `mem` or invalid `seq_id` (last error set).
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_seq_pos_max(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    seq_pos_max(mem, seq_id)
}

/// Whether the memory supports position shifts; false for NULL.
#[cfg(not(feature = "dropin"))]
#[no_mangle]
pub extern "C" fn llama_memory_can_shift(mem: llama_memory_t) -> bool {
    can_shift(mem)
}

/// Number of sequences of the memory, 0 for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_n_seq_max(mem: llama_memory_t) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        m.inner.n_seq_max()
    })
}

/// The KV cache of a memory: the memory itself or its only KV part.
pub(crate) fn kv_of(m: &MemoryHandle) -> crate::error::Result<&KvCache> {
    find::<KvMemory>(&*m.inner).map(|k| &k.cache)
}

/// Cells per stream of a KV cache, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_size(mem: llama_memory_t) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(kv_of(m)).size()
    })
}

/// Number of streams of a KV cache, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_n_stream(mem: llama_memory_t) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(kv_of(m)).n_stream()
    })
}

/// Used cells of one stream, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_n_used(mem: llama_memory_t, stream: u32) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(kv_of(m));
        if stream >= kv.n_stream() {
            bail!(err!(
                InvalidArgument,
                "stream {stream} >= {}",
                kv.n_stream()
            ));
        }
        kv.cells(stream).get_used()
    })
}

/// Reads one cell: its position (-1 when empty) and, if `seq_bits` is not NULL, its sequence
/// set as 4 words (`seq_bits[s / 64] >> (s % 64) & 1`) and, if `shift` is not NULL, its pending
/// shift.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_cell(
    mem: llama_memory_t,
    stream: u32,
    cell: u32,
    pos: *mut llama_pos,
    shift: *mut llama_pos,
    seq_bits: *mut u64,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(kv_of(m));
        if stream >= kv.n_stream() || cell >= kv.size() {
            bail!(err!(
                InvalidArgument,
                "cell {cell} of stream {stream} is outside the cache"
            ));
        }
        let out_pos = try_slice_mut!(pos, 1, "pos");
        let c = kv.cells(stream);
        out_pos[0] = c.pos_get(cell);
        if !shift.is_null() {
            let s = try_slice_mut!(shift, 1, "shift");
            s[0] = c.get_shift(cell);
        }
        if !seq_bits.is_null() {
            let words = try_slice_mut!(seq_bits, 4, "seq_bits");
            for (w, v) in words.iter_mut().zip(c.seq_get_all(cell).as_raw_slice()) {
                *w = *v;
            }
        }
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

// The bodies of the nine llama.h-named functions, shared with the drop-in build's
// non-clashing names (`super::dropin`).
pub(super) fn clear(mem: llama_memory_t, data: bool) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        m.inner.clear(data);
    })
}

pub(super) fn seq_rm(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) -> bool {
    ffi_boundary!({
        // llama.h: a NULL memory has nothing to remove, which succeeds.
        let m = try_mut!(true, mem, "mem");
        try_or!(m.inner.seq_rm(seq_id, p0, p1))
    })
}

pub(super) fn seq_cp(
    mem: llama_memory_t,
    seq_id_src: llama_seq_id,
    seq_id_dst: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_cp(seq_id_src, seq_id_dst, p0, p1));
    })
}

pub(super) fn seq_keep(mem: llama_memory_t, seq_id: llama_seq_id) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_keep(seq_id));
    })
}

pub(super) fn seq_add(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    delta: llama_pos,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_add(seq_id, p0, p1, delta));
    })
}

pub(super) fn seq_div(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    p0: llama_pos,
    p1: llama_pos,
    d: c_int,
) {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(m.inner.seq_div(seq_id, p0, p1, d));
    })
}

pub(super) fn seq_pos_min(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(m.inner.seq_pos_min(seq_id))
    })
}

pub(super) fn seq_pos_max(mem: llama_memory_t, seq_id: llama_seq_id) -> llama_pos {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(m.inner.seq_pos_max(seq_id))
    })
}

pub(super) fn can_shift(mem: llama_memory_t) -> bool {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        m.inner.can_shift()
    })
}
