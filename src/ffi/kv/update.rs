//! The pieces of llama.cpp's `llama_kv_cache::update` a caller orchestrates itself: the
//! drop-in adapter keeps upstream's order (synchronize, copy streams, compute the K-shift
//! graph through llama_context's scheduler, then reset the shifts), which the one-call
//! `llama_memory_ctx_apply` of an update context cannot give.

use crate::error::{err, Result};
use crate::ffi::error::llama_memory_result;
use crate::ffi::handle::{llama_memory_t, MemoryHandle};
use crate::kv::{max_moves_for_nodes, KvMemory};
use crate::memory::{find, find_mut};

use llama_memory_result::*;

/// A defragmentation threshold must be a number (any sign: its meaning is per function).
fn check_thold(thold: f32) -> Result<()> {
    if thold.is_nan() {
        return Err(err!(
            InvalidArgument,
            "the defragmentation threshold is NaN"
        ));
    }
    Ok(())
}

fn kv_mut(m: &mut MemoryHandle) -> Result<&mut KvMemory> {
    find_mut::<KvMemory>(&mut *m.inner)
}

/// True when a position shift (`seq_add`/`seq_div`) is waiting for the K-shift
/// (`get_has_shift`); false for NULL or a memory that is not a KV cache (last error set).
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_has_shift(mem: llama_memory_t) -> bool {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        try_or!(find::<KvMemory>(&*m.inner)).cache.has_shift()
    })
}

/// Takes the stream copies a cross-stream `seq_cp` queued (`init_update` moves them into the
/// update context): writes up to `cap` `(src[i], dst[i])` pairs and returns how many there
/// are. With `cap` smaller than that, nothing is taken (call again with room); `cap = 0`
/// only counts.
#[no_mangle]
pub extern "C" fn llama_memory_kv_take_stream_copies(
    mem: llama_memory_t,
    src: *mut u32,
    dst: *mut u32,
    cap: usize,
) -> usize {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let kv = try_or!(kv_mut(m));
        let n = kv.cache.pending_copies().len();
        if n == 0 || cap < n {
            return n;
        }
        let s = try_slice_mut!(src, n, "src");
        let d = try_slice_mut!(dst, n, "dst");
        for (k, (a, b)) in kv.cache.take_pending_copies().into_iter().enumerate() {
            s[k] = a;
            d[k] = b;
        }
        n
    })
}

/// Copies every layer's K and V of stream `src` over stream `dst` (one queued stream copy).
/// The caller synchronizes the backend first, as llama.cpp does.
#[no_mangle]
pub extern "C" fn llama_memory_kv_copy_stream(
    mem: llama_memory_t,
    src: u32,
    dst: u32,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let kv = try_or!(kv_mut(m));
        let n = kv.cache.n_stream();
        if src >= n || dst >= n || src == dst {
            bail!(err!(
                InvalidArgument,
                "stream copy {src} -> {dst} in a cache of {n} streams"
            ));
        }
        if let Some(st) = kv.storage.as_mut() {
            try_or!(st.copy_stream(src, dst));
        }
        LLAMA_MEMORY_OK
    })
}

/// Clears every cell's pending shift, once the caller computed the K-shift graph (or has no
/// RoPE to shift), as the end of llama.cpp's `update`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_reset_shift(mem: llama_memory_t) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(kv_mut(m)).cache.reset_shifts();
        LLAMA_MEMORY_OK
    })
}

/// The fragmentation figure of the defragmenting llama.cpp, the largest over the streams: the
/// share of holes in the used extent (`1 - (used + n_pad) / used_max_p1`), 0 while the extent
/// is below 2048 cells. -1 (last error set) for NULL or a memory that is not a KV cache.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_fragmentation(mem: llama_memory_t) -> f32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(find::<KvMemory>(&*m.inner));
        (0..kv.cache.n_stream())
            .map(|s| kv.cache.fragmentation(s))
            .fold(0.0, f32::max)
    })
}

/// Sets when `llama_memory_init_update` defragments. With `optimize` false: the streams whose
/// fragmentation exceeds `thold` (`thold <= 0`: never, the default, as the pinned llama.cpp);
/// with `optimize` true: every stream (the seed's forced defragmentation). `max_moves` bounds
/// the runs of cells moved per stream (`llama_memory_kv_defrag_max_moves`; `UINT32_MAX`: no
/// bound). The update context's apply moves the cells and K/V rows after the K-shift.
#[no_mangle]
pub extern "C" fn llama_memory_kv_set_defrag(
    mem: llama_memory_t,
    thold: f32,
    max_moves: u32,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(check_thold(thold));
        try_or!(kv_mut(m)).set_defrag(thold, max_moves);
        LLAMA_MEMORY_OK
    })
}

/// The seed's move budget for a graph of `n_max_nodes` nodes over `n_layer` layers
/// (`(n_max_nodes - 2 n_layer) / (6 n_layer)` in unsigned arithmetic, as the seed computed it);
/// `UINT32_MAX` for `n_layer = 0`.
#[no_mangle]
pub extern "C" fn llama_memory_kv_defrag_max_moves(n_max_nodes: i32, n_layer: u32) -> u32 {
    max_moves_for_nodes(n_max_nodes, n_layer)
}

/// Plans a defragmentation, for callers that run an update's steps themselves: the streams
/// whose fragmentation exceeds `thold` (`thold < 0`: every stream), at most `max_moves` runs
/// each. The plan is kept until `llama_memory_kv_defrag_apply` (a new one replaces it); the
/// cache does not change. Returns the runs planned (0: nothing to move), -1 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_defrag_prepare(
    mem: llama_memory_t,
    thold: f32,
    max_moves: u32,
) -> i32 {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        try_or!(check_thold(thold));
        let kv = try_or!(kv_mut(m));
        let n = try_or!(kv.defrag_prepare((thold >= 0.0).then_some(thold), max_moves));
        i32::try_from(n).unwrap_or(i32::MAX)
    })
}

/// Applies the plan of `llama_memory_kv_defrag_prepare`: each planned cell, with its K and V
/// rows (in place for host buffers, through `ggml_backend_tensor_get/set` otherwise), moves
/// into its hole, and each planned stream's head goes back to 0. Every sequence keeps its
/// positions and keys. All or nothing: a plan the cells no longer allow (a planned hole was
/// filled since) is refused with nothing changed. The plan is used up either way. Returns the
/// runs moved (0 without a plan), -1 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_defrag_apply(mem: llama_memory_t) -> i32 {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let kv = try_or!(kv_mut(m));
        let n = try_or!(kv.defrag_apply());
        i32::try_from(n).unwrap_or(i32::MAX)
    })
}
