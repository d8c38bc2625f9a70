//! Memory contexts of the recurrent memory (`llama_memory_recurrent_context`): a batch of
//! ubatches placed one by one at `apply`, a full-memory reservation, or an update (a recurrent
//! memory never has one).

use std::any::Any;

use super::RecurrentMemory;
use crate::error::Result;
use crate::memory::{find_mut, Memory, MemoryContext, Status};
use crate::ubatch::{Ubatch, UbatchBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Failed(Status),
    Full,
    NoUpdate,
    Batch,
}

/// One planned piece of work on a [`RecurrentMemory`]. Its ubatch buffers are reused when it
/// is handed back to the next `init_batch` as the spare context.
#[derive(Debug)]
pub struct RsContext {
    mode: Mode,
    /// A batch's ubatches; entries past `n_ubatches` are spare buffers.
    ubatches: Vec<UbatchBuf>,
    n_ubatches: usize,
    cur: usize,
}

impl Default for RsContext {
    fn default() -> Self {
        RsContext {
            mode: Mode::Failed(Status::FailedPrepare),
            ubatches: Vec::new(),
            n_ubatches: 0,
            cur: 0,
        }
    }
}

impl RsContext {
    fn with_mode(mode: Mode, spare: Option<RsContext>) -> Self {
        let mut c = spare.unwrap_or_default();
        c.mode = mode;
        c.n_ubatches = 0;
        c.cur = 0;
        c
    }

    /// A context that failed with `status`.
    pub fn failed(status: Status, spare: Option<RsContext>) -> Self {
        Self::with_mode(Mode::Failed(status), spare)
    }

    /// A full-memory context (`init_full`): `n_rs` is the whole memory, `head` and `rs_z` 0.
    pub fn full() -> Self {
        Self::with_mode(Mode::Full, None)
    }

    /// An update context: a recurrent memory has nothing to update.
    pub fn no_update() -> Self {
        Self::with_mode(Mode::NoUpdate, None)
    }

    /// A batch context over copies of `ubatches` (already planned).
    pub fn batch(ubatches: &[Ubatch<'_>], spare: Option<RsContext>) -> Self {
        let mut c = Self::with_mode(Mode::Batch, spare);
        for (k, ub) in ubatches.iter().enumerate() {
            if k < c.ubatches.len() {
                c.ubatches[k].assign(ub);
            } else {
                c.ubatches.push(UbatchBuf::from_view(ub));
            }
        }
        c.n_ubatches = ubatches.len();
        c
    }

    /// True for a full-memory context.
    pub fn is_full(&self) -> bool {
        self.mode == Mode::Full
    }

    /// `get_n_rs`: rows the graph gathers (the whole memory for a full context).
    pub fn n_rs(&self, mem: &RecurrentMemory) -> u32 {
        if self.is_full() {
            mem.cache.size()
        } else {
            mem.cache.n()
        }
    }

    /// `get_head`: first row of the placed ubatch (0 for a full context).
    pub fn head(&self, mem: &RecurrentMemory) -> u32 {
        if self.is_full() {
            0
        } else {
            mem.cache.head()
        }
    }

    /// `get_rs_z`: the row to zero (0 for a full context).
    pub fn rs_z(&self, mem: &RecurrentMemory) -> i32 {
        if self.is_full() {
            0
        } else {
            mem.cache.rs_z()
        }
    }
}

impl MemoryContext for RsContext {
    fn status(&self) -> Status {
        match self.mode {
            Mode::Failed(s) => s,
            Mode::NoUpdate => Status::NoUpdate,
            Mode::Full | Mode::Batch => Status::Success,
        }
    }

    fn next(&mut self) -> bool {
        self.cur += 1;
        self.cur < self.n_ubatches
    }

    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()> {
        if self.mode != Mode::Batch {
            return Ok(());
        }
        let Some(ub) = self.ubatches[..self.n_ubatches].get(self.cur) else {
            return Ok(());
        };
        let m = find_mut::<RecurrentMemory>(mem)?;
        // planned ubatches were checked by `plan`
        m.cache.find_slot_checked_ubatch(&ub.view())
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
