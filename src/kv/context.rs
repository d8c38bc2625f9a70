//! Memory contexts of the KV cache (`llama_kv_cache_context`): the plan for one batch, a full
//! reservation, or one update, applied step by step by the caller.

use std::any::Any;

use super::{DefragPlan, KvCache, KvMemory, SlotInfo};
use crate::error::{err, Result};
use crate::memory::{find_mut, Memory, MemoryContext, Status};
use crate::storage::KvStorage;
use crate::ubatch::{Ubatch, UbatchBuf};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Failed(Status),
    Full,
    Update { do_shift: bool },
    Batch,
}

/// One planned piece of work on a [`KvCache`]. Its buffers are reused when it is handed back
/// to the next `init_batch` as the spare context.
#[derive(Debug)]
pub struct KvContext {
    mode: Mode,
    /// A batch's slot per ubatch, or a full context's dummy whole-cache slot.
    slots: Vec<SlotInfo>,
    /// A batch's ubatches; entries past `n_ubatches` are spare buffers.
    ubatches: Vec<UbatchBuf>,
    n_ubatches: usize,
    cur: usize,
    /// An update's stream copies (source, destination).
    copies: Vec<(u32, u32)>,
    /// An update's defragmentation (empty: none).
    defrag: DefragPlan,
    n_kv: u32,
    /// The cache's [`KvCache::generation`] the next step expects: the plan's, then after each
    /// applied ubatch the cache's.
    generation: u64,
}

/// An empty context (nothing to apply), holding no buffers yet.
impl Default for KvContext {
    fn default() -> Self {
        KvContext {
            mode: Mode::Failed(Status::FailedPrepare),
            slots: Vec::new(),
            ubatches: Vec::new(),
            n_ubatches: 0,
            cur: 0,
            copies: Vec::new(),
            defrag: DefragPlan::default(),
            n_kv: 0,
            generation: u64::MAX,
        }
    }
}

impl KvContext {
    fn new(mode: Mode, spare: Option<KvContext>) -> Self {
        let mut c = spare.unwrap_or_default();
        // The slots keep their buffers: prepare_into resizes and refills them.
        c.mode = mode;
        c.n_ubatches = 0;
        c.cur = 0;
        c.copies.clear();
        c.defrag = DefragPlan::default();
        c.n_kv = 0;
        c.generation = u64::MAX;
        c
    }

    /// The slot of the current ubatch (the dummy full-cache slot for a full context).
    pub fn slot(&self) -> Option<&SlotInfo> {
        match self.mode {
            Mode::Full => self.slots.first(),
            Mode::Batch => self.slots.get(self.cur),
            _ => None,
        }
    }

    /// Cells the attention sees for the current ubatch (set by `apply`; the size for a full
    /// context).
    pub fn n_kv(&self) -> u32 {
        self.n_kv
    }

    /// Number of ubatches of a batch context.
    pub fn n_ubatches(&self) -> usize {
        self.n_ubatches
    }

    /// Stream copies an update context applies (source, destination).
    pub fn stream_copies(&self) -> &[(u32, u32)] {
        &self.copies
    }

    /// The defragmentation an update context applies (empty: none).
    pub fn defrag_plan(&self) -> &DefragPlan {
        &self.defrag
    }

    /// Applies the current step to a cache and, when it has them, its tensors: places the
    /// current ubatch, or (update) copies the queued streams, clears the pending shifts and
    /// defragments (the seed's order: the K-shift is computed before the cells move).
    pub fn apply_to(
        &mut self,
        kv: &mut KvCache,
        mut storage: Option<&mut KvStorage>,
    ) -> Result<()> {
        match self.mode {
            Mode::Failed(s) => Err(err!(
                InvalidArgument,
                "cannot apply a failed context (status {s:?})"
            )),
            Mode::Full => Ok(()),
            Mode::Update { do_shift } => {
                if !self.defrag.is_empty() {
                    // refused before the copies and the shift reset: all or nothing
                    kv.check_plan(&self.defrag)?;
                }
                if let Some(st) = storage.as_deref_mut() {
                    for &(a, b) in &self.copies {
                        st.copy_stream(a, b)?;
                    }
                }
                if do_shift {
                    kv.reset_shifts();
                }
                if !self.defrag.is_empty() {
                    let plan = std::mem::take(&mut self.defrag);
                    kv.defragment_checked(storage, &plan)?;
                }
                Ok(())
            }
            Mode::Batch => {
                let (Some(slot), Some(ub)) = (
                    self.slots.get(self.cur),
                    self.ubatches[..self.n_ubatches].get(self.cur),
                ) else {
                    return Err(err!(
                        InvalidArgument,
                        "the batch context has no ubatch left"
                    ));
                };
                let ub = ub.view();
                // The caller may have changed the cache since init_batch: then never overwrite
                // a cell the plan did not expect to be free. Unchanged, the plan is applied as
                // planned, as llama.cpp does (its simulation may have left a purged sequence's
                // older cell back in a planned cell, which the ubatch then overwrites).
                if kv.generation() != self.generation {
                    kv.check_slot(slot, &ub)?;
                }
                kv.apply_ubatch(slot, &ub);
                self.generation = kv.generation();
                self.n_kv = kv.get_n_kv(slot);
                Ok(())
            }
        }
    }
}

impl MemoryContext for KvContext {
    fn status(&self) -> Status {
        match self.mode {
            Mode::Failed(s) => s,
            Mode::Update { do_shift }
                if !do_shift && self.copies.is_empty() && self.defrag.is_empty() =>
            {
                Status::NoUpdate
            }
            _ => Status::Success,
        }
    }

    fn next(&mut self) -> bool {
        match self.mode {
            Mode::Batch if self.cur < self.n_ubatches => {
                self.cur += 1;
                self.cur < self.n_ubatches
            }
            _ => false,
        }
    }

    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()> {
        let m = find_mut::<KvMemory>(mem)?;
        self.apply_to(&mut m.cache, m.storage.as_mut())
    }

    fn ubatch(&self) -> Option<Ubatch<'_>> {
        match self.mode {
            Mode::Batch => self.ubatches[..self.n_ubatches]
                .get(self.cur)
                .map(UbatchBuf::view),
            _ => None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl KvCache {
    /// Plans a batch already split into ubatches (`init_batch`): finds a slot for each, as if
    /// the previous ones were placed, and rolls the cells back. The context's status is
    /// `FailedPrepare` when they do not fit; invalid ubatches are an error. `spare`, a context
    /// no longer used, lends its buffers.
    pub fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<KvContext>,
    ) -> Result<KvContext> {
        if ubatches.is_empty() {
            return Err(err!(InvalidArgument, "a batch needs at least one ubatch"));
        }
        for ub in ubatches {
            self.validate_ubatch(ub)?;
        }
        let mut ctx = KvContext::new(Mode::Batch, spare);
        if !self.prepare_into(ubatches, &mut ctx.slots) {
            ctx.mode = Mode::Failed(Status::FailedPrepare);
            return Ok(ctx);
        }
        if ctx.ubatches.len() < ubatches.len() {
            ctx.ubatches.resize_with(ubatches.len(), UbatchBuf::default);
        }
        for (buf, ub) in ctx.ubatches.iter_mut().zip(ubatches) {
            buf.assign(ub);
        }
        ctx.n_ubatches = ubatches.len();
        ctx.generation = self.generation();
        Ok(ctx)
    }

    /// A context over the whole cache (`init_full`), for worst-case graph reservation.
    pub fn init_full(&self) -> KvContext {
        let n = self.n_stream();
        let mut ctx = KvContext::new(Mode::Full, None);
        ctx.slots.clear();
        ctx.slots.push(SlotInfo {
            s0: 0,
            s1: n - 1,
            strm: (0..n).collect(),
            idxs: vec![vec![0]; n as usize],
        });
        ctx.n_kv = self.size();
        ctx
    }

    /// Takes the pending shift and stream copies into an update context (`init_update`).
    pub fn init_update(&mut self) -> Result<KvContext> {
        self.init_update_with(DefragPlan::default())
    }

    /// [`KvCache::init_update`] with a defragmentation ([`KvCache::plan_defrag`]) to apply
    /// after the K-shift.
    pub fn init_update_with(&mut self, defrag: DefragPlan) -> Result<KvContext> {
        let do_shift = self.has_shift();
        if do_shift && !self.can_shift() {
            return Err(err!(
                Unsupported,
                "this cache configuration does not support K-shift"
            ));
        }
        let mut ctx = KvContext::new(Mode::Update { do_shift }, None);
        ctx.copies = std::mem::take(&mut self.pending_copies);
        ctx.defrag = defrag;
        Ok(ctx)
    }

    /// Clears every cell's pending shift (after the caller computed the K-shift).
    pub fn reset_shifts(&mut self) {
        self.generation += 1;
        for c in &mut self.cells {
            c.reset_shift();
        }
    }
}
