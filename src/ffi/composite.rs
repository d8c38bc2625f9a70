//! The composite memories: the sliding-window pair (llama.cpp's `llama_kv_cache_iswa`) and the
//! hybrids (`llama_memory_hybrid`, `llama_memory_hybrid_iswa`), made from memories of the
//! leaf constructors, and the parts of their contexts.
//!
//! A composite is built from its parts: make each part with its own constructor
//! (`llama_memory_kv_init_with_storage`, `llama_memory_rs_init`), then hand them to
//! `llama_memory_iswa_init` or `llama_memory_hybrid_init`, which take them over. The result is
//! a `llama_memory_t` like any other: llama.h's nine functions, the contexts, the state
//! functions, the breakdown and `llama_memory_free` work on it as a whole; the KV functions
//! that take a layer (`llama_memory_kv_get_k_tensor`, the views, ...) find the part that owns
//! it; the inputs of each part of a batch come from the part's context
//! (`llama_memory_ctx_get_part`).

use super::handle::{self, llama_memory_ctx_t, llama_memory_t, MemRef, MemoryHandle};
use crate::error::{err, Result};
use crate::hybrid::{Hybrid, HybridIswa};
use crate::iswa::{swa_size, IswaMemory};
use crate::kv::KvMemory;
use crate::memory::{Memory, Role};
use crate::recurrent::RecurrentMemory;

/// The full-attention half of a sliding-window pair (`get_base`).
pub const LLAMA_MEMORY_PART_BASE: i32 = 0;
/// The sliding-window half of a pair (`get_swa`).
pub const LLAMA_MEMORY_PART_SWA: i32 = 1;
/// The attention part of a hybrid (`get_attn`).
pub const LLAMA_MEMORY_PART_ATTN: i32 = 2;
/// The recurrent part of a hybrid (`get_recr`).
pub const LLAMA_MEMORY_PART_RECR: i32 = 3;

fn role_of(v: i32) -> Result<Role> {
    Ok(match v {
        LLAMA_MEMORY_PART_BASE => Role::Base,
        LLAMA_MEMORY_PART_SWA => Role::Swa,
        LLAMA_MEMORY_PART_ATTN => Role::Attention,
        LLAMA_MEMORY_PART_RECR => Role::Recurrent,
        _ => return Err(err!(InvalidArgument, "unknown part {v}")),
    })
}

/// Cells llama.cpp gives the sliding-window half of a pair: `size` with `swa_full`, else
/// `n_swa * (unified ? n_seq_max : 1) + n_ubatch`, at most `size`, padded up to 256.
#[no_mangle]
pub extern "C" fn llama_memory_iswa_swa_size(
    size: u32,
    n_swa: u32,
    unified: bool,
    n_seq_max: u32,
    n_ubatch: u32,
    swa_full: bool,
) -> u32 {
    swa_size(size, n_swa, unified, n_seq_max, n_ubatch, swa_full)
}

/// Whether `mem` is a live handle of its own memory (not a part's view) of kind `T` (NULL: an
/// error naming `what`).
fn is_kind<T: Memory>(mem: llama_memory_t, what: &str) -> Result<()> {
    // SAFETY: as in try_ref!: a non-NULL handle from this library, not used from another
    // thread during the call (header rules).
    let m = unsafe { handle::try_from(mem) }.ok_or_else(|| super::boundary::null_arg(what))?;
    if m.inner.is_part() {
        return Err(err!(
            InvalidArgument,
            "{what} is already a part of a composite memory"
        ));
    }
    if m.inner.as_any().is::<T>() {
        Ok(())
    } else {
        Err(err!(
            InvalidArgument,
            "{what} is not the memory kind this part needs"
        ))
    }
}

/// Takes the memory of kind `T` out of a handle, which stays allocated (it becomes a view of
/// the composite, [`adopt`]).
///
/// # Safety
/// `mem` must be a live handle owning a `T` (checked by [`is_kind`]), with no other reference
/// to it live.
unsafe fn take_kind<T: Memory>(mem: llama_memory_t) -> Result<T> {
    // SAFETY: the caller's contract.
    let h =
        unsafe { handle::try_from_mut(mem) }.ok_or_else(|| err!(NullArgument, "part is NULL"))?;
    let placeholder = MemRef::Part {
        root: std::ptr::null_mut(),
        index: 0,
    };
    let MemRef::Own(b) = std::mem::replace(&mut h.inner, placeholder) else {
        return Err(err!(InvalidArgument, "the part is a view"));
    };
    let any: Box<dyn std::any::Any> = b;
    any.downcast::<T>()
        .map(|b| *b)
        .map_err(|_| err!(InvalidArgument, "the part changed kind"))
}

/// A handle owning the composite `m`, whose parts' old handles `parts` (in part order)
/// become views of its parts, owned by it.
fn adopt(m: Box<dyn Memory>, parts: &[llama_memory_t]) -> llama_memory_t {
    let root = MemoryHandle::boxed(m);
    // SAFETY: `root` was just made; the part handles are live, distinct and no longer own a
    // memory (take_kind); no other reference to any of them is live.
    unsafe {
        let r: *mut MemoryHandle = root.cast();
        for (index, &p) in parts.iter().enumerate() {
            let ph: *mut MemoryHandle = p.cast();
            (*ph).inner = MemRef::Part { root: r, index };
            (*r).part_views.push(ph);
        }
    }
    root
}

/// Makes a sliding-window pair (llama.cpp's `llama_kv_cache_iswa`) of two KV caches: `base`
/// for the model's full-attention layers (no window) and `swa` for its sliding-window layers
/// (the model's `n_swa`/`swa_type`, `llama_memory_iswa_swa_size` cells). Both must hold the
/// same sequences in the same streams. On success the pair owns both (free the pair with
/// `llama_memory_free`), and their handles become views of its halves: borrowed, valid until
/// the pair is freed (`llama_memory_free` refuses them), for the KV functions of one half
/// (`llama_memory_kv_get_cell`, `llama_memory_kv_size`, ...); an operation through a view
/// changes that half alone, as llama.cpp's `get_base()`/`get_swa()`. On failure (NULL, last
/// error set) both handles stay the caller's, unchanged.
///
/// Differences from llama.cpp: a sequence operation changes both halves or neither, and a
/// restore checks the whole state before it changes the first half.
#[no_mangle]
pub extern "C" fn llama_memory_iswa_init(
    base: llama_memory_t,
    swa: llama_memory_t,
) -> llama_memory_t {
    ffi_boundary!({
        try_or!(is_kind::<KvMemory>(base, "base"));
        try_or!(is_kind::<KvMemory>(swa, "swa"));
        if base == swa {
            bail!(err!(InvalidArgument, "base and swa are the same memory"));
        }
        {
            // SAFETY: both are live KV handles (checked above); read only.
            let (b, s) = unsafe { (handle::try_from(base), handle::try_from(swa)) };
            let (Some(b), Some(s)) = (kv_ref(b), kv_ref(s)) else {
                bail!(err!(InvalidArgument, "base and swa must be KV caches"));
            };
            try_or!(IswaMemory::check_parts(b, s));
        }
        // SAFETY: both handles hold a KV cache (checked), are distinct, and the header hands
        // them over on success.
        let b = try_or!(unsafe { take_kind::<KvMemory>(base) });
        // SAFETY: as above.
        let s = try_or!(unsafe { take_kind::<KvMemory>(swa) });
        let m = try_or!(IswaMemory::from_parts(b, s));
        adopt(Box::new(m), &[base, swa])
    })
}

fn kv_ref(m: Option<&MemoryHandle>) -> Option<&KvMemory> {
    m.and_then(|m| m.inner.as_any().downcast_ref::<KvMemory>())
}

/// Makes a hybrid memory of an attention memory and a recurrent memory (`llama_memory_rs_init`)
/// holding the same sequences: with a KV cache as `attn`, llama.cpp's `llama_memory_hybrid`;
/// with a sliding-window pair (`llama_memory_iswa_init`), `llama_memory_hybrid_iswa`. On
/// success the hybrid owns both parts (free it with `llama_memory_free`) and their handles
/// become views of its parts, as in `llama_memory_iswa_init` (`get_attn()`/`get_recr()`); on
/// failure (NULL, last error set) both stay the caller's, unchanged (parts that share a layer
/// are refused).
///
/// Differences from llama.cpp: `llama_memory_seq_rm` checks both parts before it changes
/// either (llama.cpp asks the recurrent part first too, so the results agree), every other
/// sequence operation checks its ids on both parts first, and a restore checks the whole
/// state (both parts) before it changes the attention part: a state whose recurrent part is
/// damaged leaves the memory as it was, where llama.cpp restores the attention part and then
/// erases the destination from it.
#[no_mangle]
pub extern "C" fn llama_memory_hybrid_init(
    attn: llama_memory_t,
    recr: llama_memory_t,
) -> llama_memory_t {
    ffi_boundary!({
        try_or!(is_kind::<RecurrentMemory>(recr, "recr"));
        let pair = is_kind::<IswaMemory>(attn, "attn").is_ok();
        if !pair {
            try_or!(is_kind::<KvMemory>(attn, "attn"));
        }
        {
            // SAFETY: both are live handles (checked above); read only.
            let (a, r) = unsafe { (handle::try_from(attn), handle::try_from(recr)) };
            if let (Some(a), Some(r)) = (a, r) {
                // everything the hybrid's constructor checks, before either part is taken
                if a.inner.n_seq_max() != r.inner.n_seq_max() {
                    bail!(err!(
                        InvalidArgument,
                        "attn holds {} sequences, recr {}",
                        a.inner.n_seq_max(),
                        r.inner.n_seq_max()
                    ));
                }
                try_or!(crate::composite::check_disjoint(&*a.inner, &*r.inner));
            }
        }
        // SAFETY: recr holds a recurrent memory and attn a KV cache or a pair (checked); they
        // are distinct handles (different kinds), handed over on success.
        let r = try_or!(unsafe { take_kind::<RecurrentMemory>(recr) });
        let m: Box<dyn Memory> = if pair {
            // SAFETY: as above.
            let a = try_or!(unsafe { take_kind::<IswaMemory>(attn) });
            Box::new(try_or!(HybridIswa::new(a, r)))
        } else {
            // SAFETY: as above.
            let a = try_or!(unsafe { take_kind::<KvMemory>(attn) });
            Box::new(try_or!(Hybrid::new(a, r)))
        };
        adopt(m, &[attn, recr])
    })
}

/// The sub-context of a composite's context for one part (`LLAMA_MEMORY_PART_*`): llama.cpp's
/// `get_base()`/`get_swa()` of a pair's context and `get_attn()`/`get_recr()` of a hybrid's
/// (for a hybrid with a pair, ask the attention part's context for its base or SWA half). The
/// inputs of that part come from it (`llama_memory_ctx_get_n_kv`,
/// `llama_memory_ctx_set_input_kq_mask`, `llama_memory_ctx_get_n_rs`, ...), for the current
/// ubatch of `ctx`.
///
/// Borrowed: it belongs to `ctx` and ends with it; `llama_memory_ctx_free`,
/// `llama_memory_ctx_next` and `llama_memory_ctx_apply` refuse it (the composite's context
/// moves and applies its parts together). NULL with the last error set when the context has
/// no such part.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_part(
    ctx: llama_memory_ctx_t,
    part: i32,
) -> llama_memory_ctx_t {
    ffi_boundary!({
        let role = try_or!(role_of(part));
        let c = try_mut!(ctx, "ctx");
        let i = {
            let inner = try_or!(c.ctx());
            let mut k = 0;
            loop {
                match inner.part(k) {
                    Some((r, _)) if r == role => break k,
                    Some(_) => k += 1,
                    None => bail!(err!(InvalidArgument, "this context has no {role:?} part")),
                }
            }
        };
        c.view_of(i)
    })
}
