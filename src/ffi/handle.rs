//! Typed handles, in the manner of rustls-ffi's `Castable`: each opaque C handle type names the
//! Rust type behind it and how the C side holds it, so a pointer is only ever turned into the
//! one type it was made from, and only a boxed handle can be freed.
//!
//! The generic handles every family uses live here too (the memory and its contexts, with
//! llama.h's typedefs), so that the modules of `src/ffi/` only import downwards: every family
//! imports this module, this module imports no family.

use crate::error::{err, Result};
use crate::memory::{find_ctx, Memory, MemoryContext};

/// `llama_pos` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_pos = i32;
/// `llama_seq_id` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_seq_id = i32;
/// `llama_token` of llama.h.
#[allow(non_camel_case_types)]
pub type llama_token = i32;

/// A memory (llama.h's `struct llama_memory_i`), whatever its kind: a KV cache, a recurrent
/// memory, or a composite of those.
///
/// Made by one constructor per kind (`llama_memory_kv_init`, `llama_memory_kv_init_with_storage`,
/// `llama_memory_rs_init`); the caller owns it and ends it with `llama_memory_free`. Every
/// context made from it (`llama_memory_init_batch`, `_init_full`, `_init_update`) must be freed
/// before it; the tensors it hands out (`llama_memory_kv_get_k_tensor`, ...) die with it.
///
/// Methods: llama.h's nine (`llama_memory_clear`, `_seq_rm`, `_seq_cp`, `_seq_keep`, `_seq_add`,
/// `_seq_div`, `_seq_pos_min`, `_seq_pos_max`, `_can_shift`), `llama_memory_n_seq_max`,
/// `llama_memory_get_breakdown`, the contexts, the `llama_memory_state_*` functions, and the
/// functions of its kind (`llama_memory_kv_*`, `llama_memory_rs_*`).
///
/// Threads: not safe for concurrent use. Calls on one memory (or on its contexts) must not
/// overlap; different memories are independent. Under the hood: a `Box` around a
/// `Box<dyn Memory>`, so the C pointer is thin.
#[allow(non_camel_case_types)]
pub struct llama_memory_i {
    _private: [u8; 0],
}

impl Castable for llama_memory_i {
    type Ownership = OwnershipBox;
    type RustType = MemoryHandle;
}

/// Handle to a memory, the same typedef as llama.h's.
#[allow(non_camel_case_types)]
pub type llama_memory_t = *mut llama_memory_i;

/// What a memory handle holds.
pub(crate) struct MemoryHandle {
    pub(crate) inner: MemRef,
    /// The handles of this memory's parts that became views of it when it took them over
    /// (`llama_memory_iswa_init`, `llama_memory_hybrid_init`): owned here, freed with it.
    pub(crate) part_views: Vec<*mut MemoryHandle>,
    /// Tensor bytes of `ON_DEVICE` sequence states, per source sequence.
    pub(crate) stash: crate::state::Stash,
    /// The last freed context, kept so the next `init_batch` reuses its allocations.
    pub(crate) spare_ctx: Option<Box<ContextHandle>>,
    /// Sequence ids of the ubatches being read from C.
    pub(crate) scratch: UbatchScratch,
}

impl MemoryHandle {
    /// A new handle owning `inner`.
    pub(crate) fn boxed(inner: Box<dyn Memory>) -> llama_memory_t {
        to_boxed_mut_ptr(MemoryHandle {
            inner: MemRef::Own(inner),
            part_views: Vec::new(),
            stash: Default::default(),
            spare_ctx: None,
            scratch: Default::default(),
        })
    }
}

impl Drop for MemoryHandle {
    fn drop(&mut self) {
        for &v in &self.part_views {
            // SAFETY: each entry is a handle made by `to_boxed_mut_ptr` whose ownership went to
            // this memory when it took its part over; nothing else frees it
            // (`llama_memory_free` refuses a view).
            drop(unsafe { Box::from_raw(v) });
        }
    }
}

/// The memory a handle stands for: its own, or (a view) part `index` of another handle's
/// memory, the composite that took it over.
pub(crate) enum MemRef {
    /// The handle owns its memory.
    Own(Box<dyn Memory>),
    /// Part `index` of `root`'s memory.
    Part {
        root: *mut MemoryHandle,
        index: usize,
    },
}

impl MemRef {
    /// Whether the handle is a view of a composite's part.
    pub(crate) fn is_part(&self) -> bool {
        matches!(self, MemRef::Part { .. })
    }
}

impl std::ops::Deref for MemRef {
    type Target = dyn Memory;
    fn deref(&self) -> &(dyn Memory + 'static) {
        match self {
            MemRef::Own(b) => &**b,
            MemRef::Part { root, index } => {
                // SAFETY: a view lives in its root's `part_views` and is freed with it, so the
                // root is alive while the view is used; calls on a memory and its views must
                // not overlap (header rule).
                let r = unsafe { &**root };
                match r.inner.part(*index) {
                    Some((_, m)) => m,
                    None => unreachable!("a composite's parts are fixed"),
                }
            }
        }
    }
}

impl std::ops::DerefMut for MemRef {
    fn deref_mut(&mut self) -> &mut (dyn Memory + 'static) {
        match self {
            MemRef::Own(b) => &mut **b,
            MemRef::Part { root, index } => {
                // SAFETY: as in `deref`, with exclusive access: no call on the root or another
                // of its views overlaps this one (header rule).
                let r = unsafe { &mut **root };
                match r.inner.part_mut(*index) {
                    Some((_, m)) => m,
                    None => unreachable!("a composite's parts are fixed"),
                }
            }
        }
    }
}

/// Flattened sequence ids of the ubatches of one call, kept in the memory handle so that
/// reading a ubatch from C does not allocate once the buffers have grown (filled by
/// `super::ubatch`).
#[derive(Debug, Default)]
pub(crate) struct UbatchScratch {
    pub(crate) seq_off: Vec<u32>,
    pub(crate) seq_ids: Vec<i32>,
    /// Per ubatch, its ranges in `seq_off` and `seq_ids`.
    pub(crate) spans: Vec<(usize, usize, usize, usize)>,
}

impl UbatchScratch {
    /// Forgets the ubatches read before.
    pub(crate) fn reset(&mut self) {
        self.seq_off.clear();
        self.seq_ids.clear();
        self.spans.clear();
    }
}

/// A memory context (llama.cpp's `llama_memory_context_i`): the plan for one batch
/// (`llama_memory_init_batch`), a reservation over the whole memory (`llama_memory_init_full`)
/// or the pending shifts and stream copies (`llama_memory_init_update`).
///
/// The caller owns it and ends it with `llama_memory_ctx_free`; its memory must outlive it
/// (freeing it hands its buffers back to the memory for the next batch).
///
/// Methods: `llama_memory_ctx_get_status`, `_next`, `_apply`, `_get_n_tokens`, and the inputs of
/// the current step of each kind (`llama_memory_ctx_get_n_kv`, `llama_memory_ctx_set_input_*`,
/// `llama_memory_ctx_get_n_rs`, ...).
///
/// Threads: a context and its memory form one unit; calls on them must not overlap.
#[allow(non_camel_case_types)]
pub struct llama_memory_ctx {
    _private: [u8; 0],
}

impl Castable for llama_memory_ctx {
    type Ownership = OwnershipBox;
    type RustType = ContextHandle;
}

/// Handle to a memory context.
#[allow(non_camel_case_types)]
pub type llama_memory_ctx_t = *mut llama_memory_ctx;

/// What a context handle holds: the plan of any memory kind, and the memory it belongs to.
pub(crate) struct ContextHandle {
    pub(crate) mem: llama_memory_t,
    /// Always `Some` in a live handle; taken out while the allocation waits for reuse. `None`
    /// in a part's view.
    pub(crate) inner: Option<Box<dyn MemoryContext>>,
    /// A part's view (`llama_memory_ctx_get_part`): the context it belongs to, and the part.
    pub(crate) view: Option<(*const ContextHandle, usize)>,
    /// The views of this context's parts, made on demand, ending with it.
    pub(crate) views: Vec<Option<Box<ContextHandle>>>,
    /// The ubatches of a split batch (`llama_memory_init_batch_split`): each one's batch
    /// indices; empty otherwise.
    pub(crate) splits: Vec<crate::batch::Split>,
    /// The current ubatch's entry in `splits`.
    pub(crate) split_cur: usize,
}

impl ContextHandle {
    /// A handle over `inner`.
    pub(crate) fn new(mem: llama_memory_t, inner: Box<dyn MemoryContext>) -> Self {
        ContextHandle {
            mem,
            inner: Some(inner),
            view: None,
            views: Vec::new(),
            splits: Vec::new(),
            split_cur: 0,
        }
    }

    /// The parent of a part's view.
    fn parent(&self) -> Option<(&ContextHandle, usize)> {
        // SAFETY: a view lives in its parent's `views` and ends with it, so the parent is
        // alive while the view is used; only shared access is made through it.
        self.view.map(|(p, i)| (unsafe { &*p }, i))
    }

    /// Whether this is a part's view (borrowed from its composite's context).
    pub(crate) fn is_view(&self) -> bool {
        self.view.is_some()
    }

    /// The view of part `i` of this context, made on first use (owned by this context).
    pub(crate) fn view_of(&mut self, i: usize) -> *mut llama_memory_ctx {
        let parent: *const ContextHandle = self;
        if self.views.len() <= i {
            self.views.resize_with(i + 1, || None);
        }
        let v = self.views[i].get_or_insert_with(|| {
            Box::new(ContextHandle {
                mem: self.mem,
                inner: None,
                view: Some((parent, i)),
                views: Vec::new(),
                splits: Vec::new(),
                split_cur: 0,
            })
        });
        let p: *mut ContextHandle = &mut **v;
        p.cast()
    }

    /// The context itself (a view: its part of the parent's context).
    pub(crate) fn ctx(&self) -> Result<&dyn MemoryContext> {
        if let Some((p, i)) = self.parent() {
            return p
                .ctx()?
                .part(i)
                .map(|(_, c)| c)
                .ok_or_else(|| err!(InvalidArgument, "the context no longer has part {i}"));
        }
        self.inner
            .as_deref()
            .ok_or_else(|| err!(InvalidArgument, "the context was freed"))
    }

    /// The memory the context works on: the whole memory, or a view's part of it.
    pub(crate) fn part_memory(&self) -> Result<&dyn Memory> {
        if let Some((p, i)) = self.parent() {
            return p
                .part_memory()?
                .part(i)
                .map(|(_, m)| m)
                .ok_or_else(|| err!(InvalidArgument, "the memory has no part {i}"));
        }
        Ok(&*self.memory()?.inner)
    }

    /// The context of kind `T`: this one, or its only sub-context of that kind.
    pub(crate) fn find<T: MemoryContext>(&self) -> Result<&T> {
        find_ctx::<T>(self.ctx()?)
    }

    /// The memory the context was made from, as the raw handle (for the inputs whose
    /// reading changes the memory: the recurrent `s_copy` consumes pending rollbacks).
    pub(crate) fn memory_ptr(&self) -> llama_memory_t {
        self.mem
    }

    /// The memory the context was made from.
    pub(crate) fn memory(&self) -> Result<&MemoryHandle> {
        // SAFETY: the context's memory outlives it (header rule) and is not mutated while the
        // caller is inside a function that only reads it.
        unsafe { try_from(self.mem) }.ok_or_else(|| err!(NullArgument, "context has no memory"))
    }
}

/// A C handle type: an opaque, never-constructed struct whose pointers stand for a
/// `RustType`.
pub(crate) trait Castable {
    /// How the C side holds the value.
    type Ownership;
    /// The value a handle pointer stands for.
    type RustType;
}

/// The handle owns its value: made by [`to_boxed_mut_ptr`], ended by [`free_box`].
pub(crate) struct OwnershipBox;

/// Moves `value` to the heap and returns it as a handle pointer.
pub(crate) fn to_boxed_mut_ptr<C>(value: C::RustType) -> *mut C
where
    C: Castable<Ownership = OwnershipBox>,
{
    Box::into_raw(Box::new(value)).cast()
}

/// The value behind a handle pointer, `None` for NULL.
///
/// # Safety
/// A non-NULL `ptr` must come from [`to_boxed_mut_ptr`] for the same `C` and not be freed, and
/// no `&mut` to the value may be live for `'a`.
pub(crate) unsafe fn try_from<'a, C: Castable>(ptr: *const C) -> Option<&'a C::RustType> {
    // SAFETY: the caller's contract: the pointer was made from a `C::RustType`.
    unsafe { ptr.cast::<C::RustType>().as_ref() }
}

/// Mutable [`try_from`].
///
/// # Safety
/// As [`try_from`], and no other reference to the value may be live for `'a`.
pub(crate) unsafe fn try_from_mut<'a, C: Castable>(ptr: *mut C) -> Option<&'a mut C::RustType> {
    // SAFETY: the caller's contract, as in try_from, with exclusive access.
    unsafe { ptr.cast::<C::RustType>().as_mut() }
}

/// Takes the value back from a boxed handle; NULL gives `None`.
///
/// # Safety
/// A non-NULL `ptr` must come from [`to_boxed_mut_ptr`] for the same `C` and must not be used
/// afterwards.
pub(crate) unsafe fn take_box<C>(ptr: *mut C) -> Option<Box<C::RustType>>
where
    C: Castable<Ownership = OwnershipBox>,
{
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the caller's contract: the pointer came from Box::into_raw of a C::RustType.
    Some(unsafe { Box::from_raw(ptr.cast::<C::RustType>()) })
}

/// Drops the value behind a boxed handle; NULL is a no-op.
///
/// # Safety
/// As [`take_box`].
pub(crate) unsafe fn free_box<C>(ptr: *mut C)
where
    C: Castable<Ownership = OwnershipBox>,
{
    // SAFETY: forwarded contract.
    drop(unsafe { take_box(ptr) });
}
