//! The hybrid memories (llama.cpp's `llama_memory_hybrid` and `llama_memory_hybrid_iswa`): an
//! attention memory (a KV cache, or a sliding-window pair) for the model's attention layers and
//! a recurrent memory for its recurrent layers, behind one [`Memory`].
//!
//! llama.cpp's rules are kept: every sequence operation goes to the attention part then the
//! recurrent part, except `seq_rm`, which asks the recurrent part first (it is the one that
//! can refuse) and stops there when it refuses; `seq_pos_min` is the larger of the parts'
//! minimums and `seq_pos_max` the smaller of their maximums; `can_shift` is the attention
//! part's; a batch is prepared on the recurrent part, then on the attention part; the state is
//! the attention part's then the recurrent part's. With `PARTIAL_ONLY` the plain hybrid writes
//! and reads only its recurrent part, the hybrid with a sliding-window pair its SWA half and
//! its recurrent part (llama.cpp passes the flag to the pair).
//!
//! Beyond llama.cpp, an operation changes both parts or neither: `seq_rm` asks both parts
//! before it changes either, the ids of every other operation are checked on both parts
//! first, and a restore checks the whole input before it changes the attention part
//! ([`crate::composite`]). In stock-compatible mode a restore is llama.cpp's: the attention
//! part first, and when the recurrent part then fails, the plain hybrid erases the destination
//! from its attention part (its `state_clear`); the hybrid with a pair does not.

use std::any::Any;
use std::cell::Cell;

use crate::composite::{self, CompositeContext};
use crate::error::Result;
use crate::io::{IoRead, StateIn, StateOut};
use crate::iswa::IswaMemory;
use crate::kv::KvMemory;
use crate::memory::{Memory, MemoryContext, ReadStage, Role};
use crate::recurrent::RecurrentMemory;
use crate::ubatch::Ubatch;

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`.
const PARTIAL_ONLY: u32 = 1;

/// The attention part of a hybrid: a KV cache ([`KvMemory`], llama.cpp's `llama_memory_hybrid`)
/// or a sliding-window pair ([`IswaMemory`], `llama_memory_hybrid_iswa`).
pub trait Attention: Memory {
    /// True for the sliding-window pair: the state then always holds the attention part (the
    /// pair drops its base half under `PARTIAL_ONLY` itself) and a failed recurrent restore
    /// does not erase it.
    const PAIR: bool;
    /// Streams of the attention cache (1: unified).
    fn n_stream(&self) -> u32;
    /// llama.cpp's `state_clear(seq)` of the attention part.
    fn state_clear(&mut self, seq: i32) -> Result<()>;
}

impl Attention for KvMemory {
    const PAIR: bool = false;
    fn n_stream(&self) -> u32 {
        self.cache.n_stream()
    }
    fn state_clear(&mut self, seq: i32) -> Result<()> {
        KvMemory::state_clear(self, seq)
    }
}

impl Attention for IswaMemory {
    const PAIR: bool = true;
    fn n_stream(&self) -> u32 {
        self.base.cache.n_stream()
    }
    fn state_clear(&mut self, seq: i32) -> Result<()> {
        IswaMemory::state_clear(self, seq)
    }
}

/// A hybrid memory: attention part `A` and a recurrent part.
#[derive(Debug)]
pub struct HybridMemory<A: Attention> {
    /// The attention part.
    pub attn: A,
    /// The recurrent part.
    pub recr: RecurrentMemory,
    stock: bool,
    /// The part the last restore stopped in (0 attention, 1 recurrent).
    last_read: Cell<usize>,
}

/// llama.cpp's `llama_memory_hybrid`.
pub type Hybrid = HybridMemory<KvMemory>;
/// llama.cpp's `llama_memory_hybrid_iswa`.
pub type HybridIswa = HybridMemory<IswaMemory>;

impl<A: Attention> HybridMemory<A> {
    /// A hybrid of two parts, which must hold the same sequences and no common layer.
    pub fn new(attn: A, recr: RecurrentMemory) -> Result<Self> {
        if attn.n_seq_max() != recr.n_seq_max() {
            return Err(crate::error::err!(
                InvalidArgument,
                "the attention part has {} sequences, the recurrent part {}",
                attn.n_seq_max(),
                recr.n_seq_max()
            ));
        }
        crate::composite::check_disjoint(&attn, &recr)?;
        Ok(HybridMemory {
            attn,
            recr,
            stock: false,
            last_read: Cell::new(0),
        })
    }

    /// Whether the attention part is in a state with `flags`.
    fn reads_attn(flags: u32) -> bool {
        A::PAIR || flags & PARTIAL_ONLY == 0
    }

    /// Checks `ids` on both parts, so that an operation refused by the second part is refused
    /// before the first changes (not in stock-compatible mode, where each part takes the ids
    /// llama.cpp's takes).
    fn check_ids(&self, ids: &[i32]) -> Result<()> {
        if self.stock {
            // llama.cpp's order instead: an id one part ignores still changes the other
            return Ok(());
        }
        for &s in ids {
            if s >= 0 {
                self.attn.seq_pos_min(s)?;
                self.recr.seq_pos_min(s)?;
            }
        }
        Ok(())
    }

    fn read(
        &mut self,
        seq: i32,
        flags: u32,
        f: impl FnOnce(&mut [&mut dyn Memory], bool, &mut usize) -> Result<()>,
    ) -> Result<()> {
        let read_attn = Self::reads_attn(flags);
        let (stock, mut last) = (self.stock, 0);
        let r = if read_attn {
            f(&mut [&mut self.attn, &mut self.recr], stock, &mut last)
        } else {
            last = 1;
            f(&mut [&mut self.recr], stock, &mut 0)
        };
        let last = if read_attn { last } else { 1 };
        self.last_read.set(last);
        if r.is_err() && stock && last == 1 && read_attn && !A::PAIR {
            // llama.cpp's hybrid undoes its restored attention part
            let _ = self.attn.state_clear(seq);
        }
        r
    }
}

impl<A: Attention> Memory for HybridMemory<A> {
    fn clear(&mut self, data: bool) {
        self.attn.clear(data);
        self.recr.clear(data);
    }
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        self.check_ids(&[seq_id])?;
        if !self.recr.seq_rm(seq_id, p0, p1)? {
            // the recurrent part refused, and changed nothing
            return Ok(false);
        }
        self.attn.seq_rm(seq_id, p0, p1)
    }
    fn can_seq_rm(&self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        let r = self.recr.can_seq_rm(seq_id, p0, p1)?;
        Ok(r && self.attn.can_seq_rm(seq_id, p0, p1)?)
    }
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        self.check_ids(&[src, dst])?;
        self.attn.seq_cp(src, dst, p0, p1)?;
        self.recr.seq_cp(src, dst, p0, p1)
    }
    fn seq_keep(&mut self, seq_id: i32) -> Result<()> {
        self.check_ids(&[seq_id])?;
        self.attn.seq_keep(seq_id)?;
        self.recr.seq_keep(seq_id)
    }
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        self.check_ids(&[seq_id])?;
        self.attn.seq_add(seq_id, p0, p1, delta)?;
        self.recr.seq_add(seq_id, p0, p1, delta)
    }
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        self.check_ids(&[seq_id])?;
        self.attn.seq_div(seq_id, p0, p1, d)?;
        self.recr.seq_div(seq_id, p0, p1, d)
    }
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32> {
        Ok(self
            .attn
            .seq_pos_min(seq_id)?
            .max(self.recr.seq_pos_min(seq_id)?))
    }
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32> {
        Ok(self
            .attn
            .seq_pos_max(seq_id)?
            .min(self.recr.seq_pos_max(seq_id)?))
    }
    fn can_shift(&self) -> bool {
        self.attn.can_shift()
    }
    fn n_seq_max(&self) -> u32 {
        self.attn.n_seq_max()
    }
    fn split_rule(&self) -> crate::batch::SplitRule {
        crate::batch::SplitRule::Recurrent {
            sequential: self.attn.n_stream() != 1,
            n_rs_seq: self.recr.cache.n_rs_seq(),
        }
    }
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>> {
        let mut spares = composite::spare_parts(spare, 2);
        // the recurrent part first, as llama.cpp
        let r = self.recr.init_batch(ubatches, spares[1].take())?;
        if composite::failed(&*r) {
            return Ok(CompositeContext::boxed_failed(r.status()));
        }
        let a = self.attn.init_batch(ubatches, spares[0].take())?;
        if composite::failed(&*a) {
            return Ok(CompositeContext::boxed_failed(a.status()));
        }
        Ok(CompositeContext::boxed(vec![
            (Role::Attention, a),
            (Role::Recurrent, r),
        ]))
    }
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>> {
        let a = self.attn.init_full()?;
        let r = self.recr.init_full()?;
        Ok(CompositeContext::boxed(vec![
            (Role::Attention, a),
            (Role::Recurrent, r),
        ]))
    }
    fn init_update(&mut self, optimize: bool) -> Result<Box<dyn MemoryContext>> {
        let a = self.attn.init_update(optimize)?;
        let r = self.recr.init_update(optimize)?;
        Ok(CompositeContext::boxed(vec![
            (Role::Attention, a),
            (Role::Recurrent, r),
        ]))
    }
    fn state_write(&self, seq: i32, flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        if Self::reads_attn(flags) {
            Memory::state_write(&self.attn, seq, flags, out)?;
        }
        Memory::state_write(&self.recr, seq, flags, out)
    }
    fn state_read(&mut self, seq: i32, flags: u32, inp: &mut StateIn<'_>) -> Result<()> {
        self.read(seq, flags, |parts, stock, last| {
            composite::read_parts(parts, seq, flags, inp, stock, last)
        })
    }
    fn state_read_io(&mut self, seq: i32, flags: u32, io: &mut dyn IoRead) -> Result<()> {
        self.read(seq, flags, |parts, stock, last| {
            composite::read_parts_io(parts, seq, flags, io, stock, last)
        })
    }
    fn state_check_io(&mut self, seq: i32, flags: u32, io: &mut dyn IoRead) -> Result<()> {
        if Self::reads_attn(flags) {
            self.last_read.set(0);
            Memory::state_check_io(&mut self.attn, seq, flags, io)?;
        }
        self.last_read.set(1);
        Memory::state_check_io(&mut self.recr, seq, flags, io)
    }
    fn set_stock_compat(&mut self, on: bool) {
        self.stock = on;
        self.attn.set_stock_compat(on);
        self.recr.set_stock_compat(on);
    }
    fn set_check_finite(&mut self, on: bool) {
        self.attn.set_check_finite(on);
        self.recr.set_check_finite(on);
    }
    fn check_finite(&self) -> bool {
        self.attn.check_finite() || self.recr.check_finite()
    }
    fn read_stage(&self) -> ReadStage {
        if self.last_read.get() == 0 {
            self.attn.read_stage()
        } else {
            self.recr.read_stage()
        }
    }
    fn has_layer(&self, il: u32) -> bool {
        self.attn.has_layer(il) || self.recr.has_layer(il)
    }
    fn n_parts(&self) -> usize {
        2
    }
    fn part(&self, i: usize) -> Option<(Role, &dyn Memory)> {
        match i {
            0 => Some((Role::Attention, &self.attn)),
            1 => Some((Role::Recurrent, &self.recr)),
            _ => None,
        }
    }
    fn part_mut(&mut self, i: usize) -> Option<(Role, &mut dyn Memory)> {
        match i {
            0 => Some((Role::Attention, &mut self.attn)),
            1 => Some((Role::Recurrent, &mut self.recr)),
            _ => None,
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
