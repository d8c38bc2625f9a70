//! The memory interface: llama.cpp's `llama_memory_i` operations as a Rust trait, so every
//! memory kind (KV cache today; SWA pairs, recurrent and hybrid memories later) sits behind the
//! same C handle.

use crate::error::{err, Result};
use crate::kv::{KvCache, Status};
use crate::state::io::{StateIn, StateOut};
use crate::storage::KvStorage;
use crate::ubatch::Ubatch;

/// Operations every memory offers (`llama_memory_i`). Sequence ids are checked against
/// `[0, n_seq_max)`; a failed call changes nothing.
pub trait Memory: Send {
    /// Removes all cells; `data` also zeroes the tensor buffers.
    fn clear(&mut self, data: bool);
    /// `llama_memory_seq_rm`: `seq_id == -1` matches every sequence.
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool>;
    /// `llama_memory_seq_cp`.
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()>;
    /// `llama_memory_seq_keep`.
    fn seq_keep(&mut self, seq_id: i32) -> Result<()>;
    /// `llama_memory_seq_add`.
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()>;
    /// `llama_memory_seq_div`.
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()>;
    /// `llama_memory_seq_pos_min`.
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32>;
    /// `llama_memory_seq_pos_max`.
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32>;
    /// `llama_memory_can_shift`.
    fn can_shift(&self) -> bool;
    /// Number of sequences the memory holds.
    fn n_seq_max(&self) -> u32;
    /// The KV cache behind this memory, if it is one.
    fn as_kv(&self) -> Option<&KvCache> {
        None
    }
    /// The KV cache behind this memory, if it is one.
    fn as_kv_mut(&mut self) -> Option<&mut KvCache> {
        None
    }
    /// Copies the tensor data of whole streams (cross-stream `seq_cp`, applied by an update).
    fn copy_streams(&mut self, _copies: &[(u32, u32)]) -> Result<()> {
        Ok(())
    }
    /// The K/V tensors, if the memory has them.
    fn storage(&self) -> Option<&KvStorage> {
        None
    }
    /// Writes the state of `seq_id` (-1: all) in llama.cpp's layout.
    fn state_write(&self, _seq_id: i32, _out: &mut StateOut<'_, '_>) -> Result<()> {
        Err(err!(Unsupported, "this memory has no state format"))
    }
    /// Restores a state into `seq_id` (-1: replace everything). On error nothing changed.
    fn state_read(&mut self, _seq_id: i32, _inp: &mut StateIn<'_>) -> Result<()> {
        Err(err!(Unsupported, "this memory has no state format"))
    }
}

/// A planned piece of work on a memory (`llama_memory_context_i`): a batch of ubatches, a
/// full-cache reservation, or an update. It holds no reference to its memory; `apply` is given
/// the memory it was made from.
pub trait MemoryContext {
    /// Status of the plan.
    fn status(&self) -> Status;
    /// Moves to the next ubatch; false when there is none.
    fn next(&mut self) -> bool;
    /// Applies the current step to `mem` (the only mutation of memory while decoding).
    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()>;
    /// The current ubatch of a batch context.
    fn ubatch(&self) -> Option<Ubatch<'_>>;
}

impl Memory for KvCache {
    fn clear(&mut self, _data: bool) {
        // Tensor storage arrives with the storage layer; the cells are all there is today.
        KvCache::clear(self);
    }
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        KvCache::seq_rm(self, seq_id, p0, p1)
    }
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        KvCache::seq_cp(self, src, dst, p0, p1)
    }
    fn seq_keep(&mut self, seq_id: i32) -> Result<()> {
        KvCache::seq_keep(self, seq_id)
    }
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        KvCache::seq_add(self, seq_id, p0, p1, delta)
    }
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        KvCache::seq_div(self, seq_id, p0, p1, d)
    }
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32> {
        KvCache::seq_pos_min(self, seq_id)
    }
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32> {
        KvCache::seq_pos_max(self, seq_id)
    }
    fn can_shift(&self) -> bool {
        KvCache::can_shift(self)
    }
    fn n_seq_max(&self) -> u32 {
        KvCache::n_seq_max(self)
    }
    fn as_kv(&self) -> Option<&KvCache> {
        Some(self)
    }
    fn as_kv_mut(&mut self) -> Option<&mut KvCache> {
        Some(self)
    }
}
