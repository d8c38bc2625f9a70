//! [`RecurrentMemory`]: the recurrent cells together with their state tensors, behind the
//! [`Memory`] interface. Its state layout and restore live in `super::state`.

use std::cell::Cell;

use super::{RsCache, RsContext};
use crate::error::{err, Result};
use crate::io::{IoRead, StateIn, StateOut};
use crate::memory::{Memory, MemoryContext, ReadStage};
use crate::storage::recurrent::RsStorage;
use crate::ubatch::Ubatch;

/// A recurrent memory: cells and, when it was created with them, the state tensors.
#[derive(Debug)]
pub struct RecurrentMemory {
    /// Cells, head, rollback indices.
    pub cache: RsCache,
    /// The tensors; `None` for a cells-only memory.
    pub storage: Option<RsStorage>,
    /// Layers of the model (`hparams.n_layer()`), written into and checked against states.
    pub(super) n_layer: u32,
    /// A failed restore has llama.cpp's effect ([`Memory::set_stock_compat`]).
    pub(super) stock_failure: bool,
    /// How far the current restore got (see [`ReadStage`]).
    pub(super) stage: Cell<ReadStage>,
    /// A restore refuses NaN and infinities in F32/F16/BF16 tensor data
    /// ([`Memory::set_check_finite`]).
    pub(super) check_finite: bool,
    /// The rows (first, count) the current restore placed its cells at, once placed: a failed
    /// restore zeroes them in stock-compatible mode, as llama.cpp's `state_clear`.
    pub(super) failed_rows: Cell<Option<(u32, u32)>>,
}

impl RecurrentMemory {
    /// Cells and storage of one memory; they must agree on size, rollback planes and layers.
    pub fn new(cache: RsCache, storage: Option<RsStorage>, n_layer: u32) -> Result<Self> {
        if let Some(st) = &storage {
            let sp = st.spec();
            if sp.size != cache.size()
                || sp.n_rs_seq != cache.n_rs_seq()
                || cache.has_layers() == st.layers().is_empty()
            {
                return Err(err!(
                    InvalidArgument,
                    "storage (size {}, n_rs_seq {}, {} layers) does not match the cells (size {}, n_rs_seq {})",
                    sp.size,
                    sp.n_rs_seq,
                    st.layers().len(),
                    cache.size(),
                    cache.n_rs_seq()
                ));
            }
            if let Some(l) = st.layers().iter().find(|l| l.il >= n_layer) {
                return Err(err!(
                    InvalidArgument,
                    "layer {} is not below the model's {n_layer} layers",
                    l.il
                ));
            }
        }
        Ok(RecurrentMemory {
            cache,
            storage,
            n_layer,
            stock_failure: false,
            stage: Cell::new(ReadStage::Header),
            check_finite: false,
            failed_rows: Cell::new(None),
        })
    }

    /// Layers of the model.
    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }
}

impl Memory for RecurrentMemory {
    crate::memory::leaf_memory_ops!();
    fn can_shift(&self) -> bool {
        // only positions move; llama.cpp reports true
        true
    }
    fn n_seq_max(&self) -> u32 {
        self.cache.n_seq_max()
    }
    fn split_rule(&self) -> crate::batch::SplitRule {
        crate::batch::SplitRule::Recurrent {
            sequential: true,
            n_rs_seq: self.cache.n_rs_seq(),
        }
    }
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>> {
        let mut b = crate::memory::spare_of::<RsContext>(spare);
        let old = std::mem::take(&mut *b);
        let status = self.cache.plan(ubatches)?;
        *b = if status == crate::memory::Status::Success {
            RsContext::batch(ubatches, Some(old))
        } else {
            RsContext::failed(status, Some(old))
        };
        Ok(b)
    }
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>> {
        Ok(Box::new(RsContext::full()))
    }
    fn init_update(&mut self, _optimize: bool) -> Result<Box<dyn MemoryContext>> {
        Ok(Box::new(RsContext::no_update()))
    }
    fn state_write(&self, seq: i32, flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        // PARTIAL_ONLY: the recurrent state is the partial part of a hybrid; alone it is all
        RecurrentMemory::state_write(self, seq, flags, out)
    }
    fn state_read(&mut self, seq: i32, _flags: u32, inp: &mut StateIn<'_>) -> Result<()> {
        RecurrentMemory::state_read(self, seq, inp)
    }
    fn state_read_io(&mut self, seq: i32, _flags: u32, io: &mut dyn IoRead) -> Result<()> {
        RecurrentMemory::state_read_io(self, seq, io)
    }
    fn state_check_io(&mut self, seq: i32, _flags: u32, io: &mut dyn IoRead) -> Result<()> {
        RecurrentMemory::state_check_io(self, seq, io)
    }
    fn set_stock_compat(&mut self, on: bool) {
        self.stock_failure = on;
        self.cache.stock_ids = on;
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
