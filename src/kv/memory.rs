//! [`KvMemory`]: the KV cache together with its K/V tensors, behind the [`Memory`] interface.
//! Its state layout and restore live in `super::state`.

use std::cell::Cell;

use super::{DefragPlan, KvCache, KvContext};
use crate::error::{err, Result};
use crate::io::{IoRead, StateIn, StateOut};
use crate::memory::{Memory, MemoryContext, ReadStage};
use crate::storage::KvStorage;
use crate::ubatch::Ubatch;

/// A KV cache and, when it was created with one, its K/V tensor storage.
#[derive(Debug)]
pub struct KvMemory {
    /// Cells, heads, pending work.
    pub cache: KvCache,
    /// The tensors; `None` for a cells-only cache (its states have zero layers).
    pub storage: Option<KvStorage>,
    /// A failed restore has llama.cpp's effect ([`Memory::set_stock_compat`]).
    pub(super) stock_failure: bool,
    /// How far the current restore got (see [`ReadStage`]).
    pub(super) stage: Cell<ReadStage>,
    /// A restore refuses NaN and infinities in F32/F16/BF16 tensor data
    /// ([`Memory::set_check_finite`]).
    pub(super) check_finite: bool,
    /// `init_update(false)` defragments the streams whose fragmentation exceeds this (`<= 0`:
    /// never, the default, as the pinned llama.cpp).
    defrag_thold: f32,
    /// Move budget of a defragmentation ([`super::max_moves_for_nodes`]).
    defrag_max_moves: u32,
    /// The plan of [`KvMemory::defrag_prepare`], until [`KvMemory::defrag_apply`].
    pending_defrag: DefragPlan,
}

impl KvMemory {
    /// A cache with optional storage; the two must agree on size, streams and V layout.
    pub fn new(cache: KvCache, storage: Option<KvStorage>) -> Result<Self> {
        if let Some(st) = &storage {
            let sp = st.spec();
            let p = cache.params();
            if sp.size != p.size || sp.n_stream != cache.n_stream() || sp.v_trans != p.v_trans {
                return Err(err!(
                    InvalidArgument,
                    "storage (size {}, {} streams, v_trans {}) does not match the cache (size {}, {} streams, v_trans {})",
                    sp.size,
                    sp.n_stream,
                    sp.v_trans,
                    p.size,
                    cache.n_stream(),
                    p.v_trans
                ));
            }
            if p.v_trans && !sp.is_mla && st.n_embd_v_gqa_max() != p.n_embd_v_gqa_max {
                return Err(err!(
                    InvalidArgument,
                    "n_embd_v_gqa_max is {} but the widest V layer has {}",
                    p.n_embd_v_gqa_max,
                    st.n_embd_v_gqa_max()
                ));
            }
        }
        Ok(KvMemory {
            cache,
            storage,
            stock_failure: false,
            stage: Cell::new(ReadStage::Header),
            check_finite: false,
            defrag_thold: -1.0,
            defrag_max_moves: u32::MAX,
            pending_defrag: DefragPlan::default(),
        })
    }

    /// Sets the rule of `init_update`: with `optimize` false, defragment the streams whose
    /// fragmentation exceeds `thold` (`<= 0` or NaN: never); with `optimize` true, every
    /// stream (the seed's forced defragmentation). At most `max_moves` runs per stream.
    pub fn set_defrag(&mut self, thold: f32, max_moves: u32) {
        self.defrag_thold = thold;
        self.defrag_max_moves = max_moves;
    }

    /// The plan `init_update(optimize)` makes under the rule of [`KvMemory::set_defrag`].
    pub fn plan_update_defrag(&self, optimize: bool) -> Result<DefragPlan> {
        if optimize {
            self.cache.plan_defrag(None, self.defrag_max_moves)
        } else if self.defrag_thold > 0.0 {
            self.cache
                .plan_defrag(Some(self.defrag_thold), self.defrag_max_moves)
        } else {
            Ok(DefragPlan::default())
        }
    }

    /// Plans a defragmentation of the streams whose fragmentation exceeds `thold` (`None`:
    /// every stream) and keeps it for [`KvMemory::defrag_apply`], for callers that run the
    /// steps of an update themselves (the drop-in). Returns the runs planned.
    pub fn defrag_prepare(&mut self, thold: Option<f32>, max_moves: u32) -> Result<u32> {
        let plan = self.cache.plan_defrag(thold, max_moves)?;
        let n = plan.n_moves();
        self.pending_defrag = plan;
        Ok(n)
    }

    /// Applies the plan of [`KvMemory::defrag_prepare`] (cells and K/V rows) and forgets it;
    /// nothing changes when it fails (a plan the cells no longer allow). Returns the runs moved.
    pub fn defrag_apply(&mut self) -> Result<u32> {
        let plan = std::mem::take(&mut self.pending_defrag);
        self.cache.defragment(self.storage.as_mut(), &plan)?;
        Ok(plan.n_moves())
    }
}

impl Memory for KvMemory {
    crate::memory::leaf_memory_ops!();
    fn can_shift(&self) -> bool {
        self.cache.can_shift()
    }
    fn n_seq_max(&self) -> u32 {
        self.cache.n_seq_max()
    }
    fn split_rule(&self) -> crate::batch::SplitRule {
        crate::batch::SplitRule::Kv {
            unified: self.cache.n_stream() == 1,
        }
    }
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>> {
        // Keep the spare's box as well as its buffers: the next context lives in it.
        let mut b = crate::memory::spare_of::<KvContext>(spare);
        let old = std::mem::take(&mut *b);
        *b = self.cache.init_batch(ubatches, Some(old))?;
        Ok(b)
    }
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>> {
        Ok(Box::new(self.cache.init_full()))
    }
    fn init_update(&mut self, optimize: bool) -> Result<Box<dyn MemoryContext>> {
        let plan = self.plan_update_defrag(optimize)?;
        Ok(Box::new(self.cache.init_update_with(plan)?))
    }
    fn state_write(&self, seq: i32, _flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        // A plain KV cache has no partial part: PARTIAL_ONLY writes everything, as llama.cpp.
        KvMemory::state_write(self, seq, out)
    }
    fn state_read(&mut self, seq: i32, _flags: u32, inp: &mut StateIn<'_>) -> Result<()> {
        KvMemory::state_read(self, seq, inp)
    }
    fn state_read_io(&mut self, seq: i32, _flags: u32, io: &mut dyn IoRead) -> Result<()> {
        KvMemory::state_read_io(self, seq, io)
    }
    fn state_check_io(&mut self, seq: i32, _flags: u32, io: &mut dyn IoRead) -> Result<()> {
        KvMemory::state_check_io(self, seq, io)
    }
    fn set_stock_compat(&mut self, on: bool) {
        self.cache.set_stock_seq_ids(on);
        self.stock_failure = on;
    }
    fn set_log(&mut self, log: crate::memory::Log) {
        self.cache.log = log;
    }
    fn set_check_finite(&mut self, on: bool) {
        self.check_finite = on;
    }
    fn check_finite(&self) -> bool {
        self.check_finite
    }
    fn read_stage(&self) -> ReadStage {
        self.stage.get()
    }
}
