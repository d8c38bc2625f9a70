//! The KV cache family (llama.cpp's `llama_kv_cache`): a memory whose cells hold the keys and
//! values of every sequence, one stream for all sequences or one per sequence.
//!
//! - Here: the parameters and the two constructors (`llama_memory_kv_init` for the cells only,
//!   `llama_memory_kv_init_with_storage` with K/V tensors in ggml buffers), the cells as they
//!   are (`llama_memory_kv_size`, `_get_cell`, `_get_cells`), the tensors, `state_clear`.
//! - [`slot`]: the slot-level API (`prepare`, `find_slot`, `apply_ubatch`, `get_n_kv`) over a
//!   caller-owned `llama_memory_slots_t`.
//! - [`inputs`]: the graph inputs (row indices, KQ mask, position buckets, K-shift), each
//!   written by one implementation with two doors: the current ubatch of a context
//!   (`llama_memory_ctx_set_input_*`) or a caller's ubatch and slot info
//!   (`llama_memory_kv_set_input_*`).
//! - [`graph`]: graph nodes over the tensors (views, row writes, the K-shift).
//! - [`update`]: the steps of llama.cpp's `update` a caller orchestrates itself, and the
//!   stock-compatibility switch.
//!
//! Every function takes the memory handle (or a context of it) and works on its KV cache: the
//! memory itself, or its only KV part; the tensor functions on the KV part that owns the
//! layer. The generic functions (llama.h's nine, contexts, states, `llama_memory_free`) apply
//! to a KV memory as to any other.

use ggml_sys as g;

use super::error::llama_memory_result;
use super::handle::{llama_memory_t, llama_pos, llama_seq_id, MemoryHandle};
use crate::error::{err, Result};
use crate::kv::{KvCache, KvMemory, KvParams, NonCausalType, SwaType};
use crate::memory::{find, find_for_layer, find_mut};
use crate::storage::{KvStorage, LayerSpec, StorageOptions, StorageSpec};
use std::os::raw::c_char;

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

/// Parameters of a KV cache (llama.cpp's `llama_kv_cache`), the first type of the KV family;
/// get the defaults from `llama_memory_kv_default_params()`.
///
/// The family: `llama_memory_kv_init` (cells only) and `llama_memory_kv_init_with_storage` (with
/// K/V tensors) make a `llama_memory_t` ended by `llama_memory_free`; `llama_memory_kv_*` read
/// its cells and tensors; `llama_memory_slots_t` carries the slot-level API; the graph inputs
/// come through a context (`llama_memory_ctx_set_input_*`) or a caller's ubatch and slot
/// (`llama_memory_kv_set_input_*`); graph nodes and the update steps follow. Tensors the
/// family returns belong to the memory. Functions on a memory that is not a KV cache (nor has
/// exactly one KV part) fail with the last error set.
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
    /// Cells keep every ubatch's token ids (embedding rows: `embd_token`) and states carry
    /// them, for n-gram inputs (`llama_memory_kv_get_prev_tokens`; llama.cpp's
    /// `ple_n_heads > 0`).
    pub ngram_tokens: bool,
    /// With `ngram_tokens`: the id an embedding row's cell takes (llama.cpp's
    /// `ple_image_token_id`, or `ple_eos_token_id` when that is 0).
    pub embd_token: i32,
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
            ngram_tokens: p.ngram_tokens,
            embd_token: p.embd_token,
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
            ngram_tokens: p.ngram_tokens,
            embd_token: p.embd_token,
        })
    }
}

/// Default KV cache parameters: 256 cells, 1 sequence, unified, no sliding window, text
/// positions, transposed V.
#[no_mangle]
pub extern "C" fn llama_memory_kv_default_params() -> llama_memory_kv_params {
    KvParams::default().into()
}

/// Creates a KV cache of cells only (no tensors; its states have zero layers). Returns NULL
/// (and sets the last error) for invalid parameters. The caller owns the memory and frees it
/// with `llama_memory_free`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_init(params: llama_memory_kv_params) -> llama_memory_t {
    ffi_boundary!({
        let p = try_or!(KvParams::try_from(params));
        let kv = try_or!(KvCache::new(p));
        let mem = try_or!(KvMemory::new(kv, None));
        MemoryHandle::boxed(Box::new(mem))
    })
}

/// One model layer of a KV cache with tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_kv_layer {
    /// Model layer index (ascending over the layers that have their own tensors).
    pub il: u32,
    /// K row width, `n_embd_k_gqa(il)`.
    pub n_embd_k_gqa: u32,
    /// V row width, `n_embd_v_gqa(il)` (ignored for MLA caches).
    pub n_embd_v_gqa: u32,
    /// -1: the layer has its own tensors; else the `il` of a layer whose tensors it uses
    /// (llama.cpp's `reuse` callback).
    pub reuse: i32,
    /// Buffer type of the layer's tensors; NULL for the CPU buffer type. It must stay valid
    /// while the memory is alive.
    pub buft: *mut g::ggml_backend_buffer_type,
}

/// K/V tensors of a KV cache; get the defaults from `llama_memory_kv_storage_default_params()`.
/// Layers llama.cpp's `filter` callback rejects are simply not listed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_kv_storage_params {
    /// K type, a `ggml_type`: F32, F16, BF16, Q8_0, Q4_0, Q4_1, IQ4_NL, Q5_0 or Q5_1.
    pub type_k: i32,
    /// V type, as `type_k`; quantized types need `v_trans == false` in the cache parameters.
    pub type_v: i32,
    /// MLA cache: no V tensors.
    pub is_mla: bool,
    /// Attention-rotation size of K written into states (llama.cpp's `n_rot_k`; 0 when off).
    pub n_rot_k: u32,
    /// Same for V.
    pub n_rot_v: u32,
    /// The layers, `n_layers` of them.
    pub layers: *const llama_memory_kv_layer,
    /// Number of entries in `layers`.
    pub n_layers: usize,
    /// NULL, or a NUL-terminated tag inserted into the tensor names after `cache_`
    /// (llama.cpp's `name_tag`: `cache_<tag>k_l<il>`, `cache_<tag>v_l<il>`); at most 32 bytes.
    pub name_tag: *const c_char,
    /// Create the tensors without memory, as llama.cpp does for a `no_alloc` model (one that
    /// only measures): each buffer type gets a zero-size buffer the tensors point at (so a
    /// backend scheduler does not allocate them), `llama_memory_breakdown` reports the bytes an
    /// allocation would take, and every call that reads or writes the tensors' bytes (state
    /// save and restore, stream copies, `llama_memory_clear` keeps working) fails with a last
    /// error.
    pub no_alloc: bool,
}

/// Default storage parameters: F16 K and V, no layers.
#[no_mangle]
pub extern "C" fn llama_memory_kv_storage_default_params() -> llama_memory_kv_storage_params {
    llama_memory_kv_storage_params {
        type_k: g::GGML_TYPE_F16 as i32,
        type_v: g::GGML_TYPE_F16 as i32,
        is_mla: false,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: std::ptr::null(),
        n_layers: 0,
        name_tag: std::ptr::null(),
        no_alloc: false,
    }
}

fn ggml_type_of(v: i32) -> Result<g::ggml_type> {
    u32::try_from(v).map_err(|_| err!(InvalidArgument, "ggml_type {v} is invalid"))
}

/// Creates a KV cache whose K/V tensors live in ggml backend buffers (zeroed, as llama.cpp).
/// `params.n_embd_v_gqa_max` may be 0: it is then taken from the widest layer; with `v_trans`
/// a larger value pads every V tensor's rows to it (llama.cpp pads to the model's widest V
/// row, which a layer left out of this cache may have), a smaller one is refused. Returns NULL
/// (and sets the last error) for invalid parameters or a failed allocation. The caller owns the
/// memory and frees it with `llama_memory_free`; every `buft` of the layers must outlive it.
#[no_mangle]
pub extern "C" fn llama_memory_kv_init_with_storage(
    params: llama_memory_kv_params,
    storage: *const llama_memory_kv_storage_params,
) -> llama_memory_t {
    ffi_boundary!({
        let sp = try_arg!(storage, "storage");
        let layers = try_slice!(sp.layers, sp.n_layers, "storage.layers");
        let mut p = try_or!(KvParams::try_from(params));
        let mut specs = Vec::with_capacity(layers.len());
        for l in layers {
            let reuse = match l.reuse {
                -1 => None,
                r if r >= 0 => Some(r as u32),
                r => bail!(err!(InvalidArgument, "layer {}: reuse {r}", l.il)),
            };
            specs.push(LayerSpec {
                il: l.il,
                n_embd_k_gqa: l.n_embd_k_gqa,
                n_embd_v_gqa: l.n_embd_v_gqa,
                reuse,
                // SAFETY: the header requires each layer's buft to be NULL or a live ggml buffer
                // type that outlives the memory.
                buft: unsafe { crate::storage::Buft::from_raw(l.buft) },
            });
        }
        let type_k = try_or!(ggml_type_of(sp.type_k));
        let type_v = try_or!(ggml_type_of(sp.type_v));
        let n_stream = if p.unified { 1 } else { p.n_seq_max };
        if p.v_trans && p.n_embd_v_gqa_max == 0 && !sp.is_mla {
            p.n_embd_v_gqa_max = specs
                .iter()
                .filter(|l| l.reuse.is_none())
                .map(|l| l.n_embd_v_gqa)
                .max()
                .unwrap_or(0);
        }
        let name_tag = if sp.name_tag.is_null() {
            String::new()
        } else {
            // SAFETY: the header requires a NUL-terminated string when not NULL.
            let tag = unsafe { std::ffi::CStr::from_ptr(sp.name_tag) };
            if tag.to_bytes().len() > 32 {
                bail!(err!(InvalidArgument, "name_tag is longer than 32 bytes"));
            }
            tag.to_string_lossy().into_owned()
        };
        let opts = StorageOptions {
            name_tag,
            no_alloc: sp.no_alloc,
            n_embd_v_gqa_max: p.n_embd_v_gqa_max,
        };
        let kv = try_or!(KvCache::new(p));
        let st = try_or!(KvStorage::with_options(
            StorageSpec {
                type_k,
                type_v,
                v_trans: p.v_trans,
                is_mla: sp.is_mla,
                size: p.size,
                n_stream,
                n_rot_k: sp.n_rot_k,
                n_rot_v: sp.n_rot_v,
                layers: specs,
            },
            opts
        ));
        let mem = try_or!(KvMemory::new(kv, Some(st)));
        MemoryHandle::boxed(Box::new(mem))
    })
}

fn layer_tensor(mem: llama_memory_t, il: u32, v: bool) -> *mut g::ggml_tensor {
    let m = try_ref!(mem, "mem");
    let kv = try_or!(find_for_layer::<KvMemory>(&*m.inner, il));
    let st = try_or!(kv
        .storage
        .as_ref()
        .ok_or_else(|| err!(Unsupported, "this memory has no tensors")));
    match st.layer(il) {
        Some(l) if !v => l.k,
        Some(l) if !l.v.is_null() => l.v,
        _ => bail!(err!(InvalidArgument, "layer {il} has no such tensor")),
    }
}

/// The K tensor of model layer `il` (`[n_embd_k_gqa, size, n_stream]`, named `cache_k_l<il>`),
/// owned by the memory; NULL (last error set) if there is none.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_k_tensor(
    mem: llama_memory_t,
    il: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ layer_tensor(mem, il, false) })
}

/// The V tensor of model layer `il` (`[E_v, size, n_stream]`, transposed per stream when the
/// cache has `v_trans`); NULL (last error set) if there is none (MLA, or no such layer).
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_v_tensor(
    mem: llama_memory_t,
    il: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ layer_tensor(mem, il, true) })
}

/// The KV cache of a memory: the memory itself or its only KV part.
pub(crate) fn kv_of(m: &MemoryHandle) -> crate::error::Result<&KvCache> {
    kv_in(&*m.inner)
}

/// The KV cache of a memory or of a part of one: itself or its only KV part.
pub(crate) fn kv_in(m: &dyn crate::memory::Memory) -> crate::error::Result<&KvCache> {
    find::<KvMemory>(m).map(|k| &k.cache)
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

/// `kv` when it has stream `stream`.
/// The KV cache of `m`, when it has stream `stream` and a caller's arrays of `n` cells hold
/// every cell of it, with its size.
fn stream_with_room(m: &MemoryHandle, stream: u32, n: usize) -> Result<(&KvCache, usize)> {
    let kv = kv_of(m).and_then(|kv| stream_of(kv, stream))?;
    let size = kv.size() as usize;
    if n < size {
        return Err(err!(
            InvalidArgument,
            "room for {n} cells, the cache has {size}"
        ));
    }
    Ok((kv, size))
}

fn stream_of(kv: &KvCache, stream: u32) -> Result<&KvCache> {
    if stream >= kv.n_stream() {
        return Err(err!(
            InvalidArgument,
            "stream {stream} >= {}",
            kv.n_stream()
        ));
    }
    Ok(kv)
}

/// Used cells of one stream, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_n_used(mem: llama_memory_t, stream: u32) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(kv_of(m).and_then(|kv| stream_of(kv, stream)));
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

/// Reads every cell of stream `stream` in one call (the cells llama.cpp's `get_cells`
/// returns): `pos[i]` gets cell `i`'s position (-1 when empty) and, if `seq_bits` is not NULL,
/// `seq_bits[4 * i .. 4 * i + 4]` its sequence set as in `llama_memory_kv_get_cell`. `n` is the
/// number of cells the arrays have room for: at least `llama_memory_kv_size`. Nothing is
/// written on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_cells(
    mem: llama_memory_t,
    stream: u32,
    pos: *mut llama_pos,
    seq_bits: *mut u64,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let (kv, size) = try_or!(stream_with_room(m, stream, n));
        let out_pos = try_slice_mut!(pos, size, "pos");
        let c = kv.cells(stream);
        if !seq_bits.is_null() {
            let words = try_slice_mut!(seq_bits, 4 * size, "seq_bits");
            for (i, w) in words.chunks_exact_mut(4).enumerate() {
                w.copy_from_slice(c.seq_get_all(i as u32).as_raw_slice());
            }
        }
        for (i, p) in out_pos.iter_mut().enumerate() {
            *p = c.pos_get(i as u32);
        }
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Reads the extra data of every cell of stream `stream` in one call (llama.cpp's
/// `llama_kv_cell_ext`, what `get_cells` callers read with `ext_get`): `ext[3 * i .. 3 * i + 3]`
/// gets cell `i`'s 2-D position x, y and its token id (-1 when none), all 0/0/-1 for an
/// empty cell or a cache that keeps none. `n` is the number of cells `ext` has room for (3
/// entries each): at least `llama_memory_kv_size`. Nothing is written on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_cells_ext(
    mem: llama_memory_t,
    stream: u32,
    ext: *mut i32,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let (kv, size) = try_or!(stream_with_room(m, stream, n));
        let out = try_slice_mut!(ext, 3 * size, "ext");
        let c = kv.cells(stream);
        for (i, o) in out.chunks_exact_mut(3).enumerate() {
            let e = c.ext_get(i as u32);
            o.copy_from_slice(&[e.x, e.y, e.tok]);
        }
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// The detail of the slot search's debug log lines, llama.cpp's `LLAMA_KV_CACHE_DEBUG`: 0
/// none (the default), 1 each searched stream's extent and each sequence's range, 2 also maps
/// of the cells when the cache has a sliding window, 3 always. The lines go where
/// `llama_memory_set_log` sends them. Returns OK, or an error for a memory without a KV cache.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_debug(
    mem: llama_memory_t,
    level: i32,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(find_mut::<KvMemory>(&mut *m.inner)).cache.debug = level;
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// `llama_kv_cache::state_clear(seq_id)`, what llama.cpp runs on a KV cache when another part
/// of a memory failed to restore: with `seq_id` -1 the cache is cleared and its tensors zeroed;
/// otherwise the sequence is removed and the K/V rows of the cells it held alone are zeroed
/// (cells shared with another sequence keep their bytes). KV caches only.
#[no_mangle]
pub extern "C" fn llama_memory_kv_state_clear(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let kv = try_or!(find_mut::<KvMemory>(&mut *m.inner));
        try_or!(kv.state_clear(seq_id));
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

/// Empties every cell of every stream and keeps the slot-search heads: llama.cpp's `clear` of
/// a cache over another cache's cells (gemma4-assistant's), which resets those shared cells
/// but not the other cache's heads, nor its tensors. KV caches only.
#[no_mangle]
pub extern "C" fn llama_memory_kv_reset_cells(mem: llama_memory_t) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(find_mut::<KvMemory>(&mut *m.inner))
            .cache
            .reset_cells();
        llama_memory_result::LLAMA_MEMORY_OK
    })
}

// In header order (the comments keep rustfmt from sorting these lines): the slot-level API,
pub mod slot;
// the graph inputs,
pub mod inputs;
// the graph nodes,
pub mod graph;
// and the update steps.
pub mod update;

/// `llama_memory_state_read_io` for a KV cache that mirrors another one cell for cell
/// (llama.cpp's `llama_kv_cache::state_read_sinfo`, which hybrid-idx's restore uses: the
/// attention cache reports where each stream's cells went, the indexer cache is given that
/// layout). `counts_in` (NULL: search a slot as usual) holds one count per stream and
/// `cells_in` their cells, stream after stream: a sequence's cells of stream `s` then go to
/// exactly those cells, which must be free once the destination's old cells are removed (a
/// whole restore's go from cell 0 and only the counts are checked); a layout that does not fit
/// fails with llama.cpp's error line, the failure having a failed slot search's effect.
/// `counts_out` (NULL: not wanted; else one entry per stream) and `cells_out` (`cap_out`
/// entries, at least `size * n_stream`) receive where the cells went, stream after stream.
/// Fails before reading anything when `cells_out` is smaller than that.
#[no_mangle]
pub extern "C" fn llama_memory_kv_state_read_io_slots(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    io: *const crate::ffi::io::llama_memory_io_read,
    counts_in: *const u32,
    cells_in: *const u32,
    counts_out: *mut u32,
    cells_out: *mut u32,
    cap_out: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let mut r = try_slice!(io, 1, "io")[0];
        let kv = try_or!(find_mut::<KvMemory>(&mut *m.inner));
        let n_stream = kv.cache.n_stream() as usize;
        let slots_in: Option<Vec<Vec<u32>>> = if counts_in.is_null() {
            None
        } else {
            let counts = try_slice!(counts_in, n_stream, "counts_in");
            let total = counts
                .iter()
                .try_fold(0usize, |a, &c| a.checked_add(c as usize));
            let total = try_or!(total.ok_or_else(|| err!(InvalidArgument, "counts_in overflow")));
            let cells = try_slice!(cells_in, total, "cells_in");
            let mut at = 0;
            Some(
                counts
                    .iter()
                    .map(|&c| {
                        let v = cells[at..at + c as usize].to_vec();
                        at += c as usize;
                        v
                    })
                    .collect(),
            )
        };
        // every cell of every stream: what a whole restore may report
        let all = kv.cache.size() as usize * n_stream;
        let out = if counts_out.is_null() {
            None
        } else {
            if cap_out < all {
                bail!(err!(
                    InvalidArgument,
                    "cells_out holds {cap_out} entries, a restore may report {all}"
                ));
            }
            // SAFETY: the header requires counts_out to hold n_stream and cells_out cap_out
            // writable entries that nothing else accesses during the call.
            Some(unsafe {
                (
                    try_or!(crate::ffi::boundary::buf_mut(
                        counts_out,
                        n_stream,
                        "counts_out"
                    )),
                    try_or!(crate::ffi::boundary::buf_mut(
                        cells_out,
                        cap_out,
                        "cells_out"
                    )),
                )
            })
        };
        let placed = try_or!(kv.state_read_io_slots(seq_id, &mut r, slots_in.as_deref()));
        if let Some((counts, cells)) = out {
            let mut at = 0;
            for (s, v) in placed.iter().enumerate() {
                // (at most size cells per stream: the capacity was checked first)
                counts[s] = v.len() as u32;
                cells[at..at + v.len()].copy_from_slice(v);
                at += v.len();
            }
        }
        llama_memory_result::LLAMA_MEMORY_OK
    })
}
