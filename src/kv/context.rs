//! Memory contexts of the KV cache (`llama_kv_cache_context`): the plan for one batch, a full
//! reservation, or one update, applied step by step by the caller.

use super::{KvCache, SlotInfo, Status};
use crate::error::{err, Result};
use crate::memory::{Memory, MemoryContext};
use crate::ubatch::{Ubatch, UbatchBuf};

#[derive(Debug)]
enum Mode {
    Failed(Status),
    Full(SlotInfo),
    Update {
        do_shift: bool,
        copies: Vec<(u32, u32)>,
    },
    Batch {
        slots: Vec<SlotInfo>,
        ubatches: Vec<UbatchBuf>,
        cur: usize,
    },
}

/// One planned piece of work on a [`KvCache`].
#[derive(Debug)]
pub struct KvContext {
    mode: Mode,
    n_kv: u32,
}

impl KvContext {
    /// The slot of the current ubatch (the dummy full-cache slot for a full context).
    pub fn slot(&self) -> Option<&SlotInfo> {
        match &self.mode {
            Mode::Full(s) => Some(s),
            Mode::Batch { slots, cur, .. } => slots.get(*cur),
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
        match &self.mode {
            Mode::Batch { ubatches, .. } => ubatches.len(),
            _ => 0,
        }
    }

    /// Stream copies an update context applies (source, destination).
    pub fn stream_copies(&self) -> &[(u32, u32)] {
        match &self.mode {
            Mode::Update { copies, .. } => copies,
            _ => &[],
        }
    }
}

impl MemoryContext for KvContext {
    fn status(&self) -> Status {
        match &self.mode {
            Mode::Failed(s) => *s,
            Mode::Update { do_shift, copies } if !*do_shift && copies.is_empty() => {
                Status::NoUpdate
            }
            _ => Status::Success,
        }
    }

    fn next(&mut self) -> bool {
        match &mut self.mode {
            Mode::Batch { ubatches, cur, .. } if *cur < ubatches.len() => {
                *cur += 1;
                *cur < ubatches.len()
            }
            _ => false,
        }
    }

    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()> {
        if let Mode::Update { copies, .. } = &self.mode {
            mem.copy_streams(copies)?;
        }
        let kv = mem
            .as_kv_mut()
            .ok_or_else(|| err!(InvalidArgument, "this context belongs to a KV cache"))?;
        match &mut self.mode {
            Mode::Failed(s) => Err(err!(
                InvalidArgument,
                "cannot apply a failed context (status {s:?})"
            )),
            Mode::Full(_) => Ok(()),
            Mode::Update { do_shift, copies } => {
                kv.apply_update(*do_shift, copies)?;
                Ok(())
            }
            Mode::Batch {
                slots,
                ubatches,
                cur,
            } => {
                let (Some(slot), Some(ub)) = (slots.get(*cur), ubatches.get(*cur)) else {
                    return Err(err!(
                        InvalidArgument,
                        "the batch context has no ubatch left"
                    ));
                };
                let ub = ub.view();
                // The caller may have changed the cache since init_batch: never overwrite a
                // cell the plan did not expect to be free.
                kv.check_slot(slot, &ub)?;
                kv.apply_ubatch(slot, &ub);
                self.n_kv = kv.get_n_kv(slot);
                Ok(())
            }
        }
    }

    fn ubatch(&self) -> Option<Ubatch<'_>> {
        match &self.mode {
            Mode::Batch { ubatches, cur, .. } => ubatches.get(*cur).map(UbatchBuf::view),
            _ => None,
        }
    }
}

impl KvCache {
    /// Plans a batch already split into ubatches (`init_batch`): finds a slot for each, as if
    /// the previous ones were placed, and rolls the cells back. The context's status is
    /// `FailedPrepare` when they do not fit; invalid ubatches are an error.
    pub fn init_batch(&mut self, ubatches: Vec<UbatchBuf>) -> Result<KvContext> {
        if ubatches.is_empty() {
            return Err(err!(InvalidArgument, "a batch needs at least one ubatch"));
        }
        for ub in &ubatches {
            self.validate_ubatch(&ub.view())?;
        }
        let views: Vec<Ubatch<'_>> = ubatches.iter().map(UbatchBuf::view).collect();
        let slots = self.prepare(&views);
        drop(views);
        let mode = match slots {
            Some(slots) => Mode::Batch {
                slots,
                ubatches,
                cur: 0,
            },
            None => Mode::Failed(Status::FailedPrepare),
        };
        Ok(KvContext { mode, n_kv: 0 })
    }

    /// A context over the whole cache (`init_full`), for worst-case graph reservation.
    pub fn init_full(&self) -> KvContext {
        let n = self.n_stream();
        let slot = SlotInfo {
            s0: 0,
            s1: n - 1,
            strm: (0..n).collect(),
            idxs: vec![vec![0]; n as usize],
        };
        KvContext {
            mode: Mode::Full(slot),
            n_kv: self.size(),
        }
    }

    /// Takes the pending shift and stream copies into an update context (`init_update`).
    pub fn init_update(&mut self) -> Result<KvContext> {
        let do_shift = self.has_shift();
        if do_shift && !self.can_shift() {
            return Err(err!(
                Unsupported,
                "this cache configuration does not support K-shift"
            ));
        }
        let copies = std::mem::take(&mut self.pending_copies);
        Ok(KvContext {
            mode: Mode::Update { do_shift, copies },
            n_kv: 0,
        })
    }

    /// Applies an update: stream copies (the tensor data is the storage's job) and the K-shift.
    fn apply_update(&mut self, do_shift: bool, _copies: &[(u32, u32)]) -> Result<()> {
        if do_shift {
            for c in &mut self.cells {
                c.reset_shift();
            }
        }
        Ok(())
    }
}
