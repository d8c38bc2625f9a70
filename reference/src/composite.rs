//! The stock composite memories (`llama_kv_cache_iswa`, `llama_memory_hybrid`,
//! `llama_memory_hybrid_iswa`, and a plain `llama_kv_cache`) behind the `cmpref_*` functions of
//! `shim/cmpref.h`: [`RefComposite`], built by the model's own `create_memory`, driven operation
//! by operation or through the whole stock batch path ([`RefComposite::init_batch`]), with
//! borrowed views of its parts ([`RefComposite::part_kv`], [`RefComposite::part_rs`]) that
//! offer every [`RefKv`] / [`RefRs`] query.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Deref;
use std::os::raw::c_char;
use std::path::Path;
use std::ptr;

use crate::kv::{empty_raw_slot, KvPtr};
use crate::recurrent::RsPtr;
use crate::{
    api, c_path, MemoryStatus, Params, RawSlot, RawUbatch, RefKv, RefRs, Slot, Ubatch, UbatchRef,
};

type CmpPtr = *mut c_void;

/// Mirror of `cmpref_params`: how to build the composite, as a `llama_context` would.
/// [`CmpParams::default`] gives the shim's defaults: 256 cells, 1 sequence, unified, no
/// `swa_full`, `n_ubatch` 256, transposed V, f16/f16, no rollback snapshots.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmpParams {
    /// Cells per stream (`cparams.n_ctx_seq`, the `kv_size` the constructor gets; stock sizes
    /// the SWA cache of an iSWA from it, `n_swa` and `n_ubatch`, padded to 256).
    pub n_ctx: u32,
    /// Sequences.
    pub n_seq_max: u32,
    /// One stream for all sequences (`kv_unified`).
    pub unified: bool,
    /// Full-size SWA cache.
    pub swa_full: bool,
    /// `cparams.n_ubatch` (sizes the SWA cache).
    pub n_ubatch: u32,
    /// V stored transposed (flash attention off).
    pub v_trans: bool,
    /// `ggml_type` of K.
    pub type_k: i32,
    /// `ggml_type` of V.
    pub type_v: i32,
    /// Recurrent rollback snapshots per sequence (`cparams.n_rs_seq`); clamped to 0 for archs
    /// without rollback, as `llama_context` does ([`RefComposite::n_rs_seq`] tells the result).
    pub n_rs_seq: u32,
}

impl Default for CmpParams {
    fn default() -> Self {
        let mut p = CmpParams {
            n_ctx: 0,
            n_seq_max: 0,
            unified: false,
            swa_full: false,
            n_ubatch: 0,
            v_trans: false,
            type_k: 0,
            type_v: 0,
            n_rs_seq: 0,
        };
        // SAFETY: `p` is a valid, writable cmpref_params (same layout, checked at load).
        unsafe { (cmp().default_params)(&mut p) };
        p
    }
}

/// Mirror of `cmpref_split`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawSplit {
    n_tokens: u32,
    n_seq_tokens: u32,
    n_seqs: u32,
    n_seqs_unq: u32,
    equal_seqs: u32,
    n_outputs: u32,
    idx_off: u32,
}

/// The resolved `cmpref_*` functions (part of the crate's `Api`).
pub(crate) struct CmpApi {
    sizeof: unsafe extern "C" fn(i32) -> usize,
    default_params: unsafe extern "C" fn(*mut CmpParams),
    new: unsafe extern "C" fn(*const c_char, *const CmpParams) -> CmpPtr,
    free: unsafe extern "C" fn(CmpPtr),
    kind: unsafe extern "C" fn(CmpPtr) -> i32,
    n_rs_seq: unsafe extern "C" fn(CmpPtr) -> u32,
    clear: unsafe extern "C" fn(CmpPtr, bool),
    seq_rm: unsafe extern "C" fn(CmpPtr, i32, i32, i32) -> bool,
    seq_cp: unsafe extern "C" fn(CmpPtr, i32, i32, i32, i32),
    seq_keep: unsafe extern "C" fn(CmpPtr, i32),
    seq_add: unsafe extern "C" fn(CmpPtr, i32, i32, i32, i32),
    seq_div: unsafe extern "C" fn(CmpPtr, i32, i32, i32, i32),
    seq_pos_min: unsafe extern "C" fn(CmpPtr, i32) -> i32,
    seq_pos_max: unsafe extern "C" fn(CmpPtr, i32) -> i32,
    can_shift: unsafe extern "C" fn(CmpPtr) -> bool,
    kv_part: unsafe extern "C" fn(CmpPtr, i32) -> KvPtr,
    rs_part: unsafe extern "C" fn(CmpPtr) -> RsPtr,
    kv_part_params: unsafe extern "C" fn(CmpPtr, i32, *mut Params) -> bool,
    apply_ubatches: unsafe extern "C" fn(CmpPtr, *const RawUbatch, u32) -> i32,
    slot: unsafe extern "C" fn(CmpPtr, i32, u32, *mut RawSlot) -> bool,
    n_slots: unsafe extern "C" fn(CmpPtr) -> u32,
    #[allow(clippy::type_complexity)]
    init_batch: unsafe extern "C" fn(
        CmpPtr,
        *const i32,
        *const i32,
        *const i32,
        *const *const i32,
        *const i8,
        u32,
        u32,
        bool,
        bool,
        *mut RawSplit,
        u32,
        *mut i32,
        *mut u32,
    ) -> i32,
    update: unsafe extern "C" fn(CmpPtr) -> i32,
    state_write: unsafe extern "C" fn(CmpPtr, i32, u32, *mut u8, usize) -> usize,
    state_read: unsafe extern "C" fn(CmpPtr, i32, u32, *const u8, usize) -> usize,
}

impl CmpApi {
    pub(crate) fn load(lib: &libloading::os::unix::Library) -> Result<CmpApi, libloading::Error> {
        Ok(resolve!(
            lib,
            "cmpref_",
            CmpApi {
                sizeof,
                default_params,
                new,
                free,
                kind,
                n_rs_seq,
                clear,
                seq_rm,
                seq_cp,
                seq_keep,
                seq_add,
                seq_div,
                seq_pos_min,
                seq_pos_max,
                can_shift,
                kv_part,
                rs_part,
                kv_part_params,
                apply_ubatches,
                slot,
                n_slots,
                init_batch,
                update,
                state_write,
                state_read,
            }
        ))
    }

    /// Refuses a library built from another `cmpref.h`.
    pub(crate) fn check_sizes(&self) {
        let sizes = [
            std::mem::size_of::<CmpParams>(),
            std::mem::size_of::<RawSplit>(),
        ];
        for (which, &rust) in sizes.iter().enumerate() {
            // SAFETY: cmpref_sizeof only reads its integer argument.
            let c = unsafe { (self.sizeof)(which as i32) };
            assert_eq!(
                c, rust,
                "cmpref.h struct #{which} has size {c} in C but {rust} in Rust"
            );
        }
    }
}

fn cmp() -> &'static CmpApi {
    &api().cmp
}

/// Which stock memory a [`RefComposite`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompositeKind {
    /// A plain `llama_kv_cache` (part 0 only).
    Kv,
    /// `llama_kv_cache_iswa`: part 0 the base (full-attention) cache, part 1 the SWA cache.
    Iswa,
    /// `llama_memory_hybrid`: part 0 the attention cache, and the recurrent part.
    Hybrid,
    /// `llama_memory_hybrid_iswa`: parts 0 and 1 as [`CompositeKind::Iswa`]'s, and the
    /// recurrent part.
    HybridIswa,
}

/// A `llama_batch` of tokens for [`RefComposite::init_batch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenBatch {
    /// Token ids.
    pub tokens: Vec<i32>,
    /// One position per token; `None` lets stock continue each sequence from the memory
    /// (`llama_batch_compat` with a null `pos`).
    pub pos: Option<Vec<i32>>,
    /// The sequence ids of each token (one entry per token).
    pub seq_ids: Vec<Vec<i32>>,
    /// The output flag of each token; `None`: the last token only.
    pub logits: Option<Vec<bool>>,
}

impl TokenBatch {
    /// `n` tokens of sequence `seq` at positions `p0..p0+n` (token ids `p % 32`), the last one
    /// an output.
    pub fn for_seq(seq: i32, p0: i32, n: u32) -> TokenBatch {
        let mut b = TokenBatch::default();
        for p in p0..p0 + n as i32 {
            b.push(p.rem_euclid(32), p, &[seq]);
        }
        b
    }

    /// Appends a token at position `pos` of the sequences `seqs` (`pos` must stay explicit:
    /// panics if the batch infers positions).
    pub fn push(&mut self, token: i32, pos: i32, seqs: &[i32]) {
        assert!(
            self.pos.is_some() || self.tokens.is_empty(),
            "the batch infers its positions"
        );
        self.tokens.push(token);
        self.pos.get_or_insert_with(Vec::new).push(pos);
        self.seq_ids.push(seqs.to_vec());
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.tokens.len() as u32
    }
}

/// One ubatch of the stock split ([`RefComposite::init_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Tokens (`n_seq_tokens * n_seqs`).
    pub n_tokens: u32,
    /// Tokens per sequence set.
    pub n_seq_tokens: u32,
    /// Sequence sets.
    pub n_seqs: u32,
    /// Unique sequence ids.
    pub n_seqs_unq: u32,
    /// Whether it came from an equal split.
    pub equal_seqs: bool,
    /// Tokens with the output flag.
    pub n_outputs: u32,
    /// The index in the input batch of each of its tokens, in ubatch order.
    pub batch_idxs: Vec<i32>,
}

impl Split {
    /// The ubatch as the stock splitter built it, rebuilt from the input `batch` (which must
    /// carry explicit positions) for the part views' mask and index queries. `n_pos` is the
    /// model's position sections per token (1, or 4 for M-RoPE: text positions `[p, p, p, 0]`).
    /// The sequence ids of a token may come in another order than stock's (an unordered set).
    pub fn ubatch(&self, batch: &TokenBatch, n_pos: u32) -> Ubatch {
        let pos_in = batch
            .pos
            .as_ref()
            .expect("the batch must carry explicit positions");
        let n = self.batch_idxs.len();
        let mut pos = vec![0i32; n * n_pos as usize];
        for (i, &b) in self.batch_idxs.iter().enumerate() {
            for j in 0..n_pos as usize {
                pos[j * n + i] = if j < 3 { pos_in[b as usize] } else { 0 };
            }
        }
        let seq_ids: Vec<Vec<i32>> = self
            .batch_idxs
            .iter()
            .map(|&b| batch.seq_ids[b as usize].clone())
            .collect();
        let mut unq: Vec<i32> = seq_ids.iter().flatten().copied().collect();
        unq.sort_unstable();
        unq.dedup();
        Ubatch {
            tokens: self
                .batch_idxs
                .iter()
                .map(|&b| batch.tokens[b as usize])
                .collect(),
            pos,
            seq_ids,
            n_pos,
            n_seq_tokens: self.n_seq_tokens,
            n_seqs: self.n_seqs,
            seq_id_unq: unq,
            equal_seqs: self.equal_seqs,
        }
    }
}

/// A stock composite memory built by the model's own `create_memory`, as a `llama_context`
/// with [`CmpParams`] would build it. Freed on drop (with its part views).
///
/// Stock assertions abort the process: pass valid sequence ids (below `n_seq_max`) and
/// positions, as for [`RefKv`]; the recurrent part's stock aborts (see [`RefRs`]) apply to the
/// hybrids' batches and states too.
#[derive(Debug)]
pub struct RefComposite {
    ptr: CmpPtr,
    params: CmpParams,
    kind: CompositeKind,
}

// SAFETY: the memory is a plain heap object (CPU buffers) with no thread affinity; &mut self
// methods are the only mutators and &self methods only read it.
unsafe impl Send for RefComposite {}

impl Drop for RefComposite {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cmpref_new and is freed exactly once; no part view outlives
        // it (the guards borrow `self`).
        unsafe { (cmp().free)(self.ptr) }
    }
}

impl RefComposite {
    /// Builds the memory the model at `model` (loaded once per path per process) asks for.
    /// `None` if the model cannot be loaded, the constructor throws, or the memory is not one
    /// of the [`CompositeKind`]s (recurrent-only, DSA, MSA, hybrid-idx models;
    /// `gemma4-assistant`, which needs a target context).
    pub fn new(model: &Path, params: &CmpParams) -> Option<RefComposite> {
        let p = c_path(model);
        // SAFETY: both pointers are valid for the call; the shim copies what it keeps.
        let ptr = unsafe { (cmp().new)(p.as_ptr(), params) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is the live cmpref just created.
        let kind = match unsafe { (cmp().kind)(ptr) } {
            0 => CompositeKind::Kv,
            1 => CompositeKind::Iswa,
            2 => CompositeKind::Hybrid,
            _ => CompositeKind::HybridIswa,
        };
        Some(RefComposite {
            ptr,
            params: *params,
            kind,
        })
    }

    /// The parameters the memory was built with.
    pub fn params(&self) -> &CmpParams {
        &self.params
    }

    /// Which stock memory this is.
    pub fn kind(&self) -> CompositeKind {
        self.kind
    }

    forward! {
        cmp();

        /// The `n_rs_seq` the memory was built with (after the clamp for archs without
        /// rollback).
        fn n_rs_seq(&self) -> u32;

        /// `clear(data)`.
        fn clear(&mut self, data: bool);

        /// `seq_rm(seq, p0, p1)`.
        fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool;

        /// `seq_cp(src, dst, p0, p1)`.
        fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32);

        /// `seq_keep(seq)`.
        fn seq_keep(&mut self, seq: i32);

        /// `seq_add(seq, p0, p1, delta)`.
        fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32);

        /// `seq_div(seq, p0, p1, d)`.
        fn seq_div(&mut self, seq: i32, p0: i32, p1: i32, d: i32);

        /// `seq_pos_min(seq)`, -1 if the sequence is empty.
        fn seq_pos_min(&self, seq: i32) -> i32;

        /// `seq_pos_max(seq)`, -1 if the sequence is empty.
        fn seq_pos_max(&self, seq: i32) -> i32;

        /// `get_can_shift()`.
        fn can_shift(&self) -> bool;
    }

    fn kv_part_raw(&self, which: u32) -> Option<(KvPtr, Params)> {
        let which = i32::try_from(which).ok()?;
        // SAFETY: `self.ptr` is live; the shim only reads its integer argument.
        let view = unsafe { (cmp().kv_part)(self.ptr, which) };
        if view.is_null() {
            return None;
        }
        let mut params = Params::default();
        // SAFETY: `params` is a valid, writable kvref_params.
        let ok = unsafe { (cmp().kv_part_params)(self.ptr, which, &mut params) };
        ok.then_some((view, params))
    }

    fn rs_part_raw(&self) -> Option<RsPtr> {
        // SAFETY: `self.ptr` is the live cmpref this value owns.
        let view = unsafe { (cmp().rs_part)(self.ptr) };
        (!view.is_null()).then_some(view)
    }

    /// A read-only view of KV part `which` (0: the base / attention cache, 1: the SWA cache),
    /// offering every [`RefKv`] query; `None` if the memory has no such part. Its
    /// [`RefKv::params`] describe the part (size, streams, window, V layout, types).
    pub fn part_kv(&self, which: u32) -> Option<RefKvPart<'_>> {
        let (view, params) = self.kv_part_raw(which)?;
        Some(RefKvPart {
            // SAFETY: the view lives as long as `self`, which the guard borrows; the guard
            // only hands out `&RefKv`.
            kv: unsafe { RefKv::borrowed(view, params) },
            _owner: PhantomData,
        })
    }

    /// A view of KV part `which` that can also change it (see [`RefKvPartMut`]); the change
    /// applies to that part alone.
    pub fn part_kv_mut(&mut self, which: u32) -> Option<RefKvPartMut<'_>> {
        let (view, params) = self.kv_part_raw(which)?;
        Some(RefKvPartMut {
            // SAFETY: the view lives as long as `self`, which the guard borrows mutably; the
            // guard never hands out `&mut RefKv`.
            kv: unsafe { RefKv::borrowed(view, params) },
            _owner: PhantomData,
        })
    }

    /// A read-only view of the recurrent part of a hybrid, offering every [`RefRs`] query;
    /// `None` for a memory without one.
    pub fn part_rs(&self) -> Option<RefRsPart<'_>> {
        let view = self.rs_part_raw()?;
        Some(RefRsPart {
            // SAFETY: the view lives as long as `self`, which the guard borrows; the guard
            // only hands out `&RefRs`.
            rs: unsafe { RefRs::borrowed(view) },
            _owner: PhantomData,
        })
    }

    /// A view of the recurrent part that can also change it (see [`RefRsPartMut`]).
    pub fn part_rs_mut(&mut self) -> Option<RefRsPartMut<'_>> {
        let view = self.rs_part_raw()?;
        Some(RefRsPartMut {
            // SAFETY: the view lives as long as `self`, which the guard borrows mutably; the
            // guard never hands out `&mut RefRs`.
            rs: unsafe { RefRs::borrowed(view) },
            _owner: PhantomData,
        })
    }

    /// What the composite's `init_batch` does after its split, on the given ubatches: each
    /// part's `prepare` in stock order, the stock composite context over the slot infos, and
    /// `apply()`/`next()` over every ubatch. `Err` with the shim's code: 2 a prepare failed
    /// (nothing applied), 3 an apply failed, -1 invalid input (no ubatch, or a hybrid and a
    /// ubatch without `equal_seqs`), -2 an exception. The slots are kept for
    /// [`RefComposite::slot`].
    pub fn apply_ubatches(&mut self, ubs: &[UbatchRef<'_>]) -> Result<(), i32> {
        let raws: Vec<RawUbatch> = ubs.iter().map(|u| u.raw).collect();
        let n = u32::try_from(raws.len()).expect("too many ubatches");
        // SAFETY: `raws` copies views whose arrays are borrowed for the call.
        let ret = unsafe { (cmp().apply_ubatches)(self.ptr, raws.as_ptr(), n) };
        if ret == 0 {
            Ok(())
        } else {
            Err(ret)
        }
    }

    /// Number of ubatches of the last successful [`RefComposite::apply_ubatches`] or
    /// [`RefComposite::init_batch`].
    pub fn n_slots(&self) -> u32 {
        // SAFETY: `self.ptr` is the live cmpref this value owns.
        unsafe { (cmp().n_slots)(self.ptr) }
    }

    /// The slot of KV part `which` for ubatch `k` of the last successful
    /// [`RefComposite::apply_ubatches`] or [`RefComposite::init_batch`] (planned or applied).
    pub fn slot(&self, which: u32, k: u32) -> Option<Slot> {
        let part = self.part_kv(which)?;
        let cap = part.size() as usize * part.n_stream() as usize;
        drop(part);
        let mut flat = vec![0u32; cap];
        let mut raw = empty_raw_slot(&mut flat);
        // SAFETY: `raw.idxs` has `idxs_cap` writable elements, as many as the part has cells,
        // which bounds any slot.
        let ok = unsafe { (cmp().slot)(self.ptr, which as i32, k, &mut raw) };
        ok.then(|| Slot::from_raw(&raw, &flat))
    }

    /// [`RefComposite::slot`] of the last ubatch.
    pub fn last_slot(&self, which: u32) -> Option<Slot> {
        self.slot(which, self.n_slots().checked_sub(1)?)
    }

    /// The whole stock path of `llama_decode` up to the graph: `llama_batch_compat`, the batch
    /// allocator (`output_all = embd_all`), the composite's `init_batch(balloc, n_ubatch,
    /// embd_all)`; then, unless `plan_only`, every ubatch applied as decode does. Pending shifts
    /// are not applied first: call [`RefComposite::update`] before, as decode does. `Ok` with
    /// the split; `Err` with the shim's code: 2 failed prepare, 3 an apply failed, -1 the
    /// allocator rejected the batch (stock logs why) or the shim did (an empty batch,
    /// `n_ubatch` 0, or a hybrid with `n_rs_seq > 0` and `n_ubatch <= n_rs_seq + 1`, which
    /// stock asserts), -2 an exception.
    pub fn init_batch(
        &mut self,
        batch: &TokenBatch,
        n_ubatch: u32,
        embd_all: bool,
        plan_only: bool,
    ) -> Result<Vec<Split>, i32> {
        let n = batch.tokens.len();
        assert_eq!(batch.seq_ids.len(), n, "one sequence list per token");
        if let Some(p) = &batch.pos {
            assert_eq!(p.len(), n, "one position per token");
        }
        if let Some(l) = &batch.logits {
            assert_eq!(l.len(), n, "one output flag per token");
        }
        let n_seq_id: Vec<i32> = batch.seq_ids.iter().map(|s| s.len() as i32).collect();
        let seq_ptrs: Vec<*const i32> = batch.seq_ids.iter().map(|s| s.as_ptr()).collect();
        let logits: Option<Vec<i8>> = batch
            .logits
            .as_ref()
            .map(|l| l.iter().map(|&b| i8::from(b)).collect());
        let mut splits = vec![RawSplit::default(); n];
        let mut idxs = vec![0i32; n];
        let mut n_split = 0u32;
        let n_u32 = u32::try_from(n).expect("batch too large");
        // SAFETY: every input array holds n entries (checked above) and lives for the call;
        // `splits` has room for n ubatches (each holds at least one token) and `idxs` for the
        // n batch indices.
        let ret = unsafe {
            (cmp().init_batch)(
                self.ptr,
                batch.tokens.as_ptr(),
                batch.pos.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
                n_seq_id.as_ptr(),
                seq_ptrs.as_ptr(),
                logits.as_ref().map_or(ptr::null(), |l| l.as_ptr()),
                n_u32,
                n_ubatch,
                embd_all,
                plan_only,
                splits.as_mut_ptr(),
                n_u32,
                idxs.as_mut_ptr(),
                &mut n_split,
            )
        };
        if ret != 0 {
            return Err(ret);
        }
        Ok(splits[..n_split as usize]
            .iter()
            .map(|s| Split {
                n_tokens: s.n_tokens,
                n_seq_tokens: s.n_seq_tokens,
                n_seqs: s.n_seqs,
                n_seqs_unq: s.n_seqs_unq,
                equal_seqs: s.equal_seqs != 0,
                n_outputs: s.n_outputs,
                batch_idxs: idxs[s.idx_off as usize..(s.idx_off + s.n_tokens) as usize].to_vec(),
            })
            .collect())
    }

    /// `init_update(lctx, false)` then `apply()`: pending stream copies and K-shifts of the KV
    /// parts.
    pub fn update(&mut self) -> MemoryStatus {
        // SAFETY: `self.ptr` is the live cmpref this value owns.
        MemoryStatus::from_raw(unsafe { (cmp().update)(self.ptr) })
    }

    /// Size in bytes of `state_write(seq, flags)` (`seq = -1`: the whole memory); 0 when the
    /// stock code throws.
    pub fn state_size(&self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (cmp().state_write)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// `state_write(seq, flags)` of the composite (its parts in stock order).
    pub fn state_write(&self, seq: i32, flags: u32) -> Vec<u8> {
        let mut buf = vec![0u8; self.state_size(seq, flags)];
        // SAFETY: `buf` is writable for its length, which the shim respects.
        let n = unsafe { (cmp().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, buf.len(), "state size changed between the two calls");
        buf
    }

    /// `state_read(seq, flags)` from `buf`: bytes consumed, or `None` when the stock code threw
    /// (its own cleanup done).
    pub fn state_read(&mut self, seq: i32, flags: u32, buf: &[u8]) -> Option<usize> {
        // SAFETY: `buf` is readable for its length, which the shim respects.
        let n = unsafe { (cmp().state_read)(self.ptr, seq, flags, buf.as_ptr(), buf.len()) };
        (n != 0).then_some(n)
    }
}

/// A read-only view of a KV part of a [`RefComposite`] ([`RefComposite::part_kv`]): derefs
/// to [`RefKv`] for its queries (cells, stream info, masks, indices, tensors, state).
#[derive(Debug)]
pub struct RefKvPart<'a> {
    kv: RefKv,
    _owner: PhantomData<&'a RefComposite>,
}

impl Deref for RefKvPart<'_> {
    type Target = RefKv;

    fn deref(&self) -> &RefKv {
        &self.kv
    }
}

/// A view of a KV part of a [`RefComposite`] that can change it
/// ([`RefComposite::part_kv_mut`]): derefs to [`RefKv`] for its queries and forwards the
/// mutating [`RefKv`] methods listed here (on that part alone).
#[derive(Debug)]
pub struct RefKvPartMut<'a> {
    kv: RefKv,
    _owner: PhantomData<&'a mut RefComposite>,
}

impl Deref for RefKvPartMut<'_> {
    type Target = RefKv;

    fn deref(&self) -> &RefKv {
        &self.kv
    }
}

/// `pub fn name(&mut self, args…) -> Ret` forwarding to the same method of the wrapped value
/// `self.$field` (the part guards never hand out the `&mut` itself).
macro_rules! delegate_mut {
    ($field:ident; $( $(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?; )*) => {
        $(
            $(#[$attr])*
            pub fn $name(&mut self $(, $arg: $ty)*) $(-> $ret)? {
                self.$field.$name($($arg),*)
            }
        )*
    };
}

impl RefKvPartMut<'_> {
    delegate_mut! {
        kv;
        /// [`RefKv::clear`] on this part.
        fn clear(data: bool);
        /// [`RefKv::seq_rm`] on this part.
        fn seq_rm(seq: i32, p0: i32, p1: i32) -> bool;
        /// [`RefKv::seq_cp`] on this part.
        fn seq_cp(src: i32, dst: i32, p0: i32, p1: i32);
        /// [`RefKv::seq_keep`] on this part.
        fn seq_keep(seq: i32);
        /// [`RefKv::seq_add`] on this part.
        fn seq_add(seq: i32, p0: i32, p1: i32, delta: i32);
        /// [`RefKv::seq_div`] on this part.
        fn seq_div(seq: i32, p0: i32, p1: i32, d: i32);
        /// [`RefKv::apply_ubatch`] on this part.
        fn apply_ubatch(slot: &Slot, ub: &UbatchRef<'_>);
        /// [`RefKv::prepare`] on this part.
        fn prepare(ubs: &[UbatchRef<'_>]) -> Option<Vec<Slot>>;
        /// [`RefKv::update`] on this part (its own helper context).
        fn update() -> MemoryStatus;
        /// [`RefKv::set_tensor_bytes`] on this part.
        fn set_tensor_bytes(v: bool, il: i32, data: &[u8]) -> bool;
        /// [`RefKv::state_read`] on this part.
        fn state_read(seq: i32, flags: u32, buf: &[u8]) -> Option<usize>;
        /// [`RefKv::state_clear`] on this part.
        fn state_clear(seq: i32);
    }
}

/// A read-only view of the recurrent part of a hybrid [`RefComposite`]
/// ([`RefComposite::part_rs`]): derefs to [`RefRs`] for its queries. Its [`RefRs::params`]
/// are read from the memory (F32 states, no filter).
#[derive(Debug)]
pub struct RefRsPart<'a> {
    rs: RefRs,
    _owner: PhantomData<&'a RefComposite>,
}

impl Deref for RefRsPart<'_> {
    type Target = RefRs;

    fn deref(&self) -> &RefRs {
        &self.rs
    }
}

/// A view of the recurrent part that can change it ([`RefComposite::part_rs_mut`]): derefs to
/// [`RefRs`] for its queries and forwards the mutating [`RefRs`] methods listed here.
#[derive(Debug)]
pub struct RefRsPartMut<'a> {
    rs: RefRs,
    _owner: PhantomData<&'a mut RefComposite>,
}

impl Deref for RefRsPartMut<'_> {
    type Target = RefRs;

    fn deref(&self) -> &RefRs {
        &self.rs
    }
}

impl RefRsPartMut<'_> {
    delegate_mut! {
        rs;
        /// [`RefRs::clear`] on this part.
        fn clear(data: bool);
        /// [`RefRs::seq_rm`] on this part.
        fn seq_rm(seq: i32, p0: i32, p1: i32) -> bool;
        /// [`RefRs::seq_cp`] on this part.
        fn seq_cp(src: i32, dst: i32, p0: i32, p1: i32);
        /// [`RefRs::seq_keep`] on this part.
        fn seq_keep(seq: i32);
        /// [`RefRs::seq_add`] on this part.
        fn seq_add(seq: i32, p0: i32, p1: i32, delta: i32);
        /// [`RefRs::seq_div`] on this part.
        fn seq_div(seq: i32, p0: i32, p1: i32, d: i32);
        /// [`RefRs::find_slot`] on this part.
        fn find_slot(ub: &UbatchRef<'_>) -> bool;
        /// [`RefRs::prepare`] on this part.
        fn prepare(ubs: &[UbatchRef<'_>]) -> bool;
        /// [`RefRs::s_copy`] on this part.
        fn s_copy(i: u32) -> i32;
        /// [`RefRs::s_copy_all`] on this part.
        fn s_copy_all() -> Vec<i32>;
        /// [`RefRs::state_read`] on this part.
        fn state_read(seq: i32, flags: u32, buf: &[u8]) -> bool;
        /// [`RefRs::state_read_n`] on this part.
        fn state_read_n(seq: i32, flags: u32, buf: &[u8]) -> (bool, usize);
        /// [`RefRs::set_r_bytes`] on this part.
        fn set_r_bytes(il: u32, data: &[u8]);
        /// [`RefRs::set_s_bytes`] on this part.
        fn set_s_bytes(il: u32, data: &[u8]);
        /// [`RefRs::set_p_bytes`] on this part.
        fn set_p_bytes(il: u32, data: &[u8]);
    }
}
