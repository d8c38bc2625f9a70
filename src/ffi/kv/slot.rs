//! The slot-level KV API: llama.cpp `llama_kv_cache`'s `prepare(ubatches)`,
//! `find_slot(ubatch, cont)`, `apply_ubatch(sinfo, ubatch)`, `get_n_kv(sinfo)` and
//! `set_input_*(dst, ubatch, sinfo)`, for callers that keep their own slot infos and ubatches:
//! llama.cpp's composite memories (iSWA, hybrid, DSA, DSV4...) over the drop-in adapter that
//! stands in for `llama_kv_cache`. (`state_clear(seq_id)` is `llama_memory_kv_state_clear`,
//! with the state functions.)
//!
//! Slot infos cross the ABI in two ways:
//! - **in**: a borrowed [`llama_memory_slot_info`] whose arrays the caller owns. An adapter
//!   points `strm` at `slot_info::strm.data()` and `idxs` at a small array of
//!   `slot_info::idxs[k].data()`, so nothing is copied.
//! - **out** (`prepare`): a [`llama_memory_slots_t`] the caller creates once, reuses for every
//!   call (no allocation once its buffers have grown) and frees. `llama_memory_slots_get`
//!   reads one slot info as a [`llama_memory_slot_info`] whose arrays belong to the handle.

use std::cell::Cell;

use super::kv_of;
use crate::cells::MAX_SEQ;
use crate::error::{err, Result};
use crate::ffi::boundary::{check_slice, null_arg};
use crate::ffi::error::llama_memory_result;
use crate::ffi::handle::{
    self, llama_memory_t, llama_seq_id, Castable, OwnershipBox, UbatchScratch,
};
use crate::ffi::ubatch::{llama_memory_ubatch, read_one_ubatch, read_ubatch, ubatch_view};
use crate::kv::{KvCache, KvMemory, SlotInfo};
use crate::memory::find_mut;
use crate::ubatch::Ubatch;

use llama_memory_result::*;

/// A slot info (`llama_kv_cache::slot_info`): where the tokens of a ubatch go. Token
/// `k * size + i` goes to cell `idxs[k][i]` of stream `strm[k]`. The arrays are borrowed: the
/// caller's for an input, the handle's for an output of `llama_memory_slots_get`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_slot_info {
    /// Lowest stream of the slot (`s0`).
    pub s0: u32,
    /// Highest stream of the slot (`s1`); `s0 <= strm[k] <= s1 < n_stream of the cache`.
    pub s1: u32,
    /// Entries of `strm` and `idxs` (`slot_info::n_stream()`), 1..=256.
    pub n_stream: u32,
    /// Cells per entry (`slot_info::size()`), at least 1 and at most the cache size.
    pub size: u32,
    /// `[n_stream]` the stream of each entry (`slot_info::strm`).
    pub strm: *const llama_seq_id,
    /// `[n_stream]` pointers to `size` cell indices each (`slot_info::idxs[k].data()`).
    pub idxs: *const *const u32,
}

/// A list of slot infos (llama.cpp's `slot_info_vec_t`), filled by `llama_memory_kv_prepare`
/// and `llama_memory_kv_find_slot`.
///
/// Made by `llama_memory_slots_init`; the caller owns it and ends it with
/// `llama_memory_slots_free`. It belongs to no memory: one list can serve every call on any
/// KV cache, and keeps its buffers between calls (no allocation once they have grown).
///
/// Methods: `llama_memory_slots_count`, `llama_memory_slots_get` (a view whose arrays stay
/// valid until the list is next filled or freed).
///
/// Threads: not safe for concurrent use; calls on one list must not overlap.
#[allow(non_camel_case_types)]
pub struct llama_memory_slots {
    _private: [u8; 0],
}

impl Castable for llama_memory_slots {
    type Ownership = OwnershipBox;
    type RustType = SlotsHandle;
}

/// Handle to a list of slot infos, owned by the caller: `llama_memory_slots_init` makes it,
/// `llama_memory_slots_free` ends it.
#[allow(non_camel_case_types)]
pub type llama_memory_slots_t = *mut llama_memory_slots;

/// What a slots handle holds.
pub(crate) struct SlotsHandle {
    /// The slot infos; only the first `n` are valid (the rest keep their buffers for the next
    /// prepare).
    slots: Vec<SlotInfo>,
    n: usize,
    /// Per slot, where its index pointers start in `ptrs`.
    ptr_off: Vec<usize>,
    /// The `idxs[k].as_ptr()` of every slot, in order (the `idxs` arrays handed out).
    ptrs: Vec<*const u32>,
}

impl SlotsHandle {
    /// The valid slot infos.
    fn valid(&self) -> &[SlotInfo] {
        &self.slots[..self.n]
    }

    /// Makes the first `n` slot infos the valid ones and re-derives the pointer tables.
    fn set_valid(&mut self, n: usize) {
        self.n = n.min(self.slots.len());
        self.ptr_off.clear();
        self.ptrs.clear();
        for s in &self.slots[..self.n] {
            self.ptr_off.push(self.ptrs.len());
            self.ptrs.extend(s.idxs.iter().map(|v| v.as_ptr()));
        }
    }
}

/// Per-thread buffers for reading one slot info and one ubatch from C without allocating once
/// they have grown (the slot-level inputs are called for every ubatch).
pub(super) struct Scratch {
    pub(super) slot: SlotInfo,
    pub(super) ub: UbatchScratch,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            slot: SlotInfo::with_streams(0, 0),
            ub: UbatchScratch::default(),
        }
    }
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one when thread-local storage is gone).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut s = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let r = f(&mut s);
    let _ = SCRATCH.try_with(|c| c.set(s));
    r
}

/// The caller's ubatch description behind `p`.
pub(super) fn ubatch_desc<'a>(p: *const llama_memory_ubatch) -> Result<&'a llama_memory_ubatch> {
    check_slice(p, 1, "ubatch")?;
    // SAFETY: non-NULL and aligned (checked above); the header requires a valid description
    // that stays unchanged during the call.
    Ok(unsafe { &*p })
}

/// Reads the caller's slot info into `out` and checks it against `kv`
/// ([`KvCache::check_slot_info`]).
pub(super) fn read_slot(
    p: *const llama_memory_slot_info,
    kv: &KvCache,
    out: &mut SlotInfo,
) -> Result<()> {
    check_slice(p, 1, "sinfo")?;
    // SAFETY: non-NULL and aligned (checked above); the header requires a valid struct.
    let d = unsafe { &*p };
    let (ns, size) = (d.n_stream as usize, d.size as usize);
    if ns == 0 || ns > MAX_SEQ {
        return Err(err!(
            InvalidArgument,
            "sinfo.n_stream = {ns} (expected 1..={MAX_SEQ})"
        ));
    }
    if size == 0 || d.size > kv.size() {
        return Err(err!(
            InvalidArgument,
            "sinfo.size = {size} (expected 1..={})",
            kv.size()
        ));
    }
    check_slice(d.strm, ns, "sinfo.strm")?;
    check_slice(d.idxs, ns, "sinfo.idxs")?;
    // SAFETY: both arrays hold n_stream elements (header rule); check_slice refused NULL,
    // misaligned and oversized arrays.
    let (strm, ptrs) = unsafe {
        (
            std::slice::from_raw_parts(d.strm, ns),
            std::slice::from_raw_parts(d.idxs, ns),
        )
    };
    out.reset(ns, size);
    out.s0 = d.s0;
    out.s1 = d.s1;
    for (k, (&s, &p)) in strm.iter().zip(ptrs).enumerate() {
        if s < 0 {
            return Err(err!(InvalidArgument, "sinfo.strm[{k}] = {s}"));
        }
        out.strm[k] = s as u32;
        check_slice(p, size, "sinfo.idxs[k]")?;
        // SAFETY: idxs[k] points to `size` cell indices (header rule); check_slice refused
        // NULL, misaligned and oversized arrays.
        out.idxs[k].extend_from_slice(unsafe { std::slice::from_raw_parts(p, size) });
    }
    kv.check_slot_info(out)
}

/// A new, empty list of slot infos for `llama_memory_kv_prepare`. Free it with
/// `llama_memory_slots_free`; one handle can serve every `prepare` call.
#[no_mangle]
pub extern "C" fn llama_memory_slots_init() -> llama_memory_slots_t {
    ffi_boundary!({
        handle::to_boxed_mut_ptr(SlotsHandle {
            slots: Vec::new(),
            n: 0,
            ptr_off: Vec::new(),
            ptrs: Vec::new(),
        })
    })
}

/// Frees a list of slot infos (NULL is accepted). Views read from it become invalid.
#[no_mangle]
pub extern "C" fn llama_memory_slots_free(slots: llama_memory_slots_t) {
    ffi_boundary!({
        // SAFETY: a non-NULL handle comes from llama_memory_slots_init and is not used after
        // this call, as the header requires.
        unsafe { handle::free_box(slots) }
    })
}

/// Number of slot infos in the list (one per ubatch after a successful prepare, 0 after a
/// failed one); 0 for NULL.
#[no_mangle]
pub extern "C" fn llama_memory_slots_count(slots: llama_memory_slots_t) -> usize {
    ffi_boundary!({ try_ref!(slots, "slots").n })
}

/// Reads slot info `i` of the list into `*out`. Its `strm` and `idxs` arrays belong to the
/// list and stay valid until the list is next passed to `llama_memory_kv_prepare` or freed;
/// copy them (into a `slot_info`) before that.
#[no_mangle]
pub extern "C" fn llama_memory_slots_get(
    slots: llama_memory_slots_t,
    i: usize,
    out: *mut llama_memory_slot_info,
) -> llama_memory_result {
    ffi_boundary!({
        let h = try_ref!(slots, "slots");
        try_or!(check_slice(out.cast_const(), 1, "out"));
        let Some(s) = h.valid().get(i) else {
            bail!(err!(InvalidArgument, "slot info {i} of a list of {}", h.n));
        };
        let info = llama_memory_slot_info {
            s0: s.s0,
            s1: s.s1,
            n_stream: s.n_stream() as u32,
            size: s.size() as u32,
            // Stream numbers are below 256: the same bits as llama_seq_id.
            strm: s.strm.as_ptr().cast::<llama_seq_id>(),
            idxs: h.ptrs[h.ptr_off[i]..].as_ptr(),
        };
        // SAFETY: out is non-NULL and aligned (checked above) and points to a writable struct
        // (header rule).
        unsafe { out.write(info) };
        LLAMA_MEMORY_OK
    })
}

/// Finds slots for `n_ubatches` ubatches (`llama_kv_cache::prepare`): each is placed in the
/// cells as if the ones before it were, then every cell and search head is rolled back (cells
/// the sliding window purged while simulating stay purged, as upstream). `out`, a list from
/// `llama_memory_slots_init`, receives one slot info per ubatch.
///
/// Returns OK; `LLAMA_MEMORY_ERR_NO_SLOT` when the ubatches do not fit (upstream's empty
/// result: `out` is empty); another error for invalid input (`out` empty, memory unchanged).
/// Ubatches are split as llama.cpp splits them for this cache (simple split for a unified
/// cache, equal split with one sequence per token group otherwise).
#[no_mangle]
pub extern "C" fn llama_memory_kv_prepare(
    mem: llama_memory_t,
    ubatches: *const llama_memory_ubatch,
    n_ubatches: usize,
    out: llama_memory_slots_t,
) -> llama_memory_result {
    ffi_boundary!({
        let o = try_mut!(out, "out");
        o.set_valid(0);
        let m = try_mut!(mem, "mem");
        if n_ubatches == 0 {
            bail!(err!(InvalidArgument, "n_ubatches is 0"));
        }
        let descs = try_slice!(ubatches, n_ubatches, "ubatches");
        m.scratch.reset();
        for d in descs {
            try_or!(read_ubatch(d, &mut m.scratch));
        }
        let scratch = &m.scratch;
        let kv = &mut try_or!(find_mut::<KvMemory>(&mut *m.inner)).cache;
        let prepare = |kv: &mut KvCache, views: &[Ubatch<'_>], slots: &mut Vec<SlotInfo>| {
            for v in views {
                kv.validate_ubatch(v)?;
            }
            if kv.prepare_into(views, slots) {
                Ok(())
            } else {
                Err(err!(NoSlot, "the ubatches do not fit in the cache"))
            }
        };
        let r = if let [one] = descs {
            let view = [try_or!(ubatch_view(one, scratch, 0))];
            prepare(kv, &view, &mut o.slots)
        } else {
            let views = try_or!(descs
                .iter()
                .enumerate()
                .map(|(k, d)| ubatch_view(d, scratch, k))
                .collect::<Result<Vec<_>>>());
            prepare(kv, &views, &mut o.slots)
        };
        try_or!(r);
        o.set_valid(n_ubatches);
        LLAMA_MEMORY_OK
    })
}

/// Finds cells for one ubatch without changing anything (`llama_kv_cache::find_slot(ubatch,
/// cont)`; `cont` asks for the cells of each stream to be consecutive). On success `out` holds
/// that one slot info; `LLAMA_MEMORY_ERR_NO_SLOT` (out empty) when the ubatch does not fit;
/// another error for invalid input (out empty).
#[no_mangle]
pub extern "C" fn llama_memory_kv_find_slot(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    cont: bool,
    out: llama_memory_slots_t,
) -> llama_memory_result {
    ffi_boundary!({
        let o = try_mut!(out, "out");
        o.set_valid(0);
        if o.slots.is_empty() {
            o.slots.push(SlotInfo::with_streams(0, 0));
        }
        let slot = &mut o.slots[0];
        try_or!(with_ubatch(mem, ubatch, |kv, ub| {
            kv.validate_ubatch(ub)?;
            if kv.find_slot_into(ub, cont, slot) {
                Ok(())
            } else {
                Err(err!(NoSlot, "the ubatch does not fit in the cache"))
            }
        }));
        o.set_valid(1);
        LLAMA_MEMORY_OK
    })
}

/// Places `ubatch` into the cells of `sinfo` (`llama_kv_cache::apply_ubatch`): a slot info
/// from `llama_memory_kv_prepare`, or one the caller built. Cells held by one sequence are
/// overwritten, and that sequence loses its positions up to the overwritten one, as upstream;
/// positions, sequences, M-RoPE ext and token ids, used range and search head are updated.
///
/// Fails, changing nothing, for an invalid ubatch, a slot outside the cache, a slot whose
/// token count differs from the ubatch's, a token group in a stream that does not hold its
/// sequences, a cell listed twice or a cell shared by several sequences.
#[no_mangle]
pub extern "C" fn llama_memory_kv_apply_ubatch(
    mem: llama_memory_t,
    sinfo: *const llama_memory_slot_info,
    ubatch: *const llama_memory_ubatch,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let d = try_or!(ubatch_desc(ubatch));
        let kv = &mut try_or!(find_mut::<KvMemory>(&mut *m.inner)).cache;
        try_or!(with_scratch(|sc| {
            read_slot(sinfo, kv, &mut sc.slot)?;
            let ub = read_one_ubatch(d, &mut sc.ub)?;
            kv.apply_slot(&sc.slot, &ub)
        }));
        LLAMA_MEMORY_OK
    })
}

/// Cells the attention looks at for `sinfo` (`llama_kv_cache::get_n_kv`): per stream of the
/// slot the used range, padded to `max(n_pad, 256)` and capped at the size; the largest of
/// them. 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_kv_get_n_kv(
    mem: llama_memory_t,
    sinfo: *const llama_memory_slot_info,
) -> u32 {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let kv = try_or!(kv_of(m));
        try_or!(with_scratch(|sc| {
            read_slot(sinfo, kv, &mut sc.slot)?;
            Ok(kv.get_n_kv(&sc.slot))
        }))
    })
}

/// Runs `f` on the memory's KV cache and the caller's ubatch.
fn with_ubatch(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
    f: impl FnOnce(&KvCache, &Ubatch<'_>) -> Result<()>,
) -> Result<()> {
    // SAFETY: as in try_ref!: a non-NULL handle from this library's constructors, not used
    // from another thread during the call (header rules).
    let m = unsafe { handle::try_from(mem) }.ok_or_else(|| null_arg("mem"))?;
    let kv = kv_of(m)?;
    let d = ubatch_desc(ubatch)?;
    with_scratch(|sc| {
        let ub = read_one_ubatch(d, &mut sc.ub)?;
        f(kv, &ub)
    })
}
