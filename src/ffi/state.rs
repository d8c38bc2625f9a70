//! K/V tensor storage and state save/restore: a KV cache with tensors, and llama.h's `state_*`
//! functions on a memory handle, with llama.cpp's byte layouts.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use ggml_sys as g;

use super::error::llama_memory_result;
use super::memory::{
    llama_memory_kv_params, llama_memory_t, llama_seq_id, llama_token, MemoryHandle,
};
use crate::error::{err, Result};
use crate::kv::KvMemory;
use crate::kv::{KvCache, KvParams};
use crate::memory::{find, find_for_layer, find_mut};
use crate::state;
use crate::storage::{KvStorage, LayerSpec, StorageSpec};

/// `llama_state_seq_flags` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_state_seq_flags = u32;

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`: only the partial (SWA, recurrent) parts of a memory;
/// a plain KV cache has none and writes its whole state, as llama.cpp.
pub const LLAMA_MEMORY_STATE_SEQ_FLAGS_PARTIAL_ONLY: u32 = 1;
/// `LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`: the tensor bytes stay with the memory handle (one stash
/// per source sequence, replaced by the next such save of that sequence); the blob holds only
/// the metadata. Restore it with the same flag on the same handle.
pub const LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE: u32 = 2;

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
    /// Buffer type of the layer's tensors; NULL for the CPU buffer type.
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
    }
}

fn ggml_type_of(v: i32) -> Result<g::ggml_type> {
    u32::try_from(v).map_err(|_| err!(InvalidArgument, "ggml_type {v} is invalid"))
}

/// Creates a KV cache whose K/V tensors live in ggml backend buffers (zeroed, as llama.cpp).
/// `params.n_embd_v_gqa_max` may be 0: it is then taken from the widest layer. Returns NULL
/// (and sets the last error) for invalid parameters or a failed allocation.
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
                buft: l.buft,
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
        let kv = try_or!(KvCache::new(p));
        let st = try_or!(KvStorage::new(StorageSpec {
            type_k,
            type_v,
            v_trans: p.v_trans,
            is_mla: sp.is_mla,
            size: p.size,
            n_stream,
            n_rot_k: sp.n_rot_k,
            n_rot_v: sp.n_rot_v,
            layers: specs,
        }));
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

/// Memory breakdown (`memory_breakdown`): writes up to `cap` (buffer type, bytes) pairs and
/// returns how many there are (call with `cap = 0` to size the arrays). 0 for a memory without
/// tensors or on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_memory_breakdown(
    mem: llama_memory_t,
    bufts: *mut *mut g::ggml_backend_buffer_type,
    sizes: *mut usize,
    cap: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(find::<KvMemory>(&*m.inner));
        let Some(st) = &kv.storage else {
            return 0;
        };
        try_or!(super::boundary::write_breakdown(
            &st.memory_breakdown(),
            bufts,
            sizes,
            cap
        ))
    })
}

/// Size of the memory's whole state (`llama_state_get_size` without the architecture name),
/// 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_get_size(mem: llama_memory_t) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(state::get_size(&*m.inner))
    })
}

/// Writes the whole state into `dst` (`size` bytes). Returns the bytes written, 0 on error
/// (too small a buffer included).
#[no_mangle]
pub extern "C" fn llama_memory_state_get_data(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let out = try_slice_mut!(dst, size, "dst");
        try_or!(state::get_data(&*m.inner, out))
    })
}

/// Replaces the whole memory with a state. Returns the bytes read; 0 on error, with the memory
/// unchanged (llama.cpp leaves it cleared or half-restored).
#[no_mangle]
pub extern "C" fn llama_memory_state_set_data(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let inp = try_slice!(src, size, "src");
        try_or!(state::set_data(&mut *m.inner, inp))
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

/// `llama_state_seq_get_size`: bytes of `seq_id`'s blob, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_size(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_get_size_ext(mem, seq_id, 0)
}

/// `llama_state_seq_get_data`: writes `seq_id`'s blob (the bytes llama.cpp writes). Returns the
/// bytes written, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_data(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
    seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_get_data_ext(mem, dst, size, seq_id, 0)
}

/// `llama_state_seq_set_data`: restores a blob into `dest_seq_id` (-1: the whole memory).
/// Returns the bytes read, 0 on error. On error the memory is unchanged (llama.cpp instead
/// erases the destination sequence).
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_set_data(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
    dest_seq_id: llama_seq_id,
) -> usize {
    llama_memory_state_seq_set_data_ext(mem, src, size, dest_seq_id, 0)
}

/// `llama_state_seq_get_size_ext`; with `ON_DEVICE` the tensor bytes are not counted.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_size_ext(
    mem: llama_memory_t,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(state::seq_get_size(&*m.inner, seq_id, flags))
    })
}

/// `llama_state_seq_get_data_ext`.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_get_data_ext(
    mem: llama_memory_t,
    dst: *mut u8,
    size: usize,
    seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let out = try_slice_mut!(dst, size, "dst");
        try_or!(state::seq_get_data(
            &*m.inner,
            out,
            seq_id,
            flags,
            &mut m.stash
        ))
    })
}

/// `llama_state_seq_set_data_ext`.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_set_data_ext(
    mem: llama_memory_t,
    src: *const u8,
    size: usize,
    dest_seq_id: llama_seq_id,
    flags: llama_state_seq_flags,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let inp = try_slice!(src, size, "src");
        try_or!(state::seq_set_data(
            &mut *m.inner,
            inp,
            dest_seq_id,
            flags,
            &m.stash
        ))
    })
}

fn path_of(p: *const c_char) -> Result<PathBuf> {
    if p.is_null() {
        return Err(err!(NullArgument, "filepath is NULL"));
    }
    // SAFETY: the header requires a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    Ok(PathBuf::from(s.to_str().map_err(|_| {
        err!(InvalidArgument, "filepath is not UTF-8")
    })?))
}

/// `llama_state_seq_save_file`: writes a sequence-state file (magic 'ggsq', version 4, the
/// tokens, then the sequence's state). Returns the file size, 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_save_file(
    mem: llama_memory_t,
    filepath: *const c_char,
    seq_id: llama_seq_id,
    tokens: *const llama_token,
    n_token_count: usize,
) -> usize {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let path = try_or!(path_of(filepath));
        let toks = try_slice!(tokens, n_token_count, "tokens");
        try_or!(state::seq_save_file(&*m.inner, &path, seq_id, toks))
    })
}

/// `llama_state_seq_load_file`: reads a sequence-state file into `dest_seq_id`. With
/// `tokens_out == NULL` only the header is checked: the token count goes to
/// `*n_token_count_out` and 12 is returned, nothing is loaded (as llama.cpp). Otherwise the
/// tokens (at most `n_token_capacity`) are copied out and the state restored; returns the
/// file offset after the state, 0 on error with the memory unchanged.
#[no_mangle]
pub extern "C" fn llama_memory_state_seq_load_file(
    mem: llama_memory_t,
    filepath: *const c_char,
    dest_seq_id: llama_seq_id,
    tokens_out: *mut llama_token,
    n_token_capacity: usize,
    n_token_count_out: *mut usize,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let path = try_or!(path_of(filepath));
        let count = try_slice_mut!(n_token_count_out, 1, "n_token_count_out");
        let toks = if tokens_out.is_null() {
            None
        } else {
            Some(try_slice_mut!(tokens_out, n_token_capacity, "tokens_out"))
        };
        let r = try_or!(state::seq_load_file(
            &mut *m.inner,
            &path,
            dest_seq_id,
            toks
        ));
        count[0] = r.n_tokens;
        r.read
    })
}
