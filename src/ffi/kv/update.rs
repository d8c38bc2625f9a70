//! The pieces of llama.cpp's `llama_kv_cache::update` a caller orchestrates itself: the
//! drop-in adapter keeps upstream's order (synchronize, copy streams, compute the K-shift
//! graph through llama_context's scheduler, then reset the shifts), which the one-call
//! `llama_memory_ctx_apply` of an update context cannot give.

use crate::error::{err, Result};
use crate::ffi::error::llama_memory_result;
use crate::ffi::handle::{llama_memory_t, MemoryHandle};
use crate::kv::KvMemory;
use crate::memory::{find, find_mut};

use llama_memory_result::*;

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
