//! The sliding-window pair (llama.cpp's `llama_kv_cache_iswa`): a full-attention KV cache for
//! the model's non-SWA layers (`base`) and a smaller KV cache with the model's window for its
//! SWA layers (`swa`), behind one [`Memory`].
//!
//! Everything llama.cpp's pair does is kept: the sizes ([`swa_size`]), every sequence operation
//! forwarded to `base` then `swa`, `seq_pos_min/max` from the SWA cache (the base cache holds a
//! superset), `can_shift` only with equal sizes, a batch prepared on `base` then on `swa`, the
//! state (`base` then `swa`; only `swa` under `PARTIAL_ONLY`).
//!
//! Beyond llama.cpp, an operation changes both halves or neither: ids are checked on both
//! before either changes, and a restore reads and validates the whole input (both halves)
//! before the first half changes ([`crate::composite`]). In stock-compatible mode
//! ([`Memory::set_stock_compat`]) the operations are llama.cpp's instead: each half in turn,
//! a restore's base half restored before the SWA half is read, each half's failure with its
//! own effect.

use std::any::Any;

use crate::composite::{self, CompositeContext};
use crate::error::Result;
use crate::io::{IoRead, StateIn, StateOut};
use crate::kv::{KvCache, KvMemory, KvParams, SwaType};
use crate::memory::{Memory, MemoryContext, ReadStage, Role};
use crate::storage::{KvStorage, LayerSpec, StorageOptions, StorageSpec};
use crate::ubatch::Ubatch;

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`.
const PARTIAL_ONLY: u32 = 1;

/// Cells of the SWA cache, as llama.cpp sizes it: the window for each stream's sequences plus
/// one ubatch, padded to 256 and at most `size`; `size` itself with `swa_full`.
pub fn swa_size(
    size: u32,
    n_swa: u32,
    unified: bool,
    n_seq_max: u32,
    n_ubatch: u32,
    swa_full: bool,
) -> u32 {
    if swa_full {
        return size;
    }
    let want = (n_swa as u64) * (if unified { n_seq_max as u64 } else { 1 }) + n_ubatch as u64;
    let n = want.min(size as u64);
    (n.div_ceil(256) * 256).min(u32::MAX as u64) as u32
}

/// How the pair is made: the base cache's parameters (its `n_swa`/`swa_type` are the model's
/// window, given to the SWA half only), the window choices, and optionally tensors.
#[derive(Clone, Debug)]
pub struct IswaParams {
    /// Parameters of the base cache; `size` is the context's cells per stream, `n_swa` and
    /// `swa_type` the model's window (the base cache itself has none).
    pub kv: KvParams,
    /// Give the SWA cache the full size (llama.cpp's `swa_full`).
    pub swa_full: bool,
    /// The largest ubatch (`n_ubatch`), part of the SWA cache's size.
    pub n_ubatch: u32,
}

/// Tensors of a pair: the storage of every layer, split by whether the layer is a SWA layer.
#[derive(Clone, Debug)]
pub struct IswaStorage {
    /// The storage description shared by both halves (`size`, `n_stream` and `layers` are
    /// replaced per half).
    pub spec: StorageSpec,
    /// The model's layers with tensors, each with whether it is a SWA layer.
    pub layers: Vec<(LayerSpec, bool)>,
    /// Creation options (names, `no_alloc`).
    pub options: StorageOptions,
}

/// llama.cpp's `llama_kv_cache_iswa`.
#[derive(Debug)]
pub struct IswaMemory {
    /// The full-attention half.
    pub base: KvMemory,
    /// The sliding-window half.
    pub swa: KvMemory,
    stock: bool,
    /// The half the last restore stopped in (0 base, 1 SWA), for `read_stage`.
    last_read: std::cell::Cell<usize>,
}

impl IswaMemory {
    /// Makes both halves from one description (llama.cpp's constructor).
    pub fn new(p: &IswaParams, storage: Option<&IswaStorage>) -> Result<Self> {
        if p.kv.swa_type == SwaType::None || p.kv.n_swa == 0 {
            return Err(crate::error::err!(
                InvalidArgument,
                "a sliding-window pair needs the model's window (swa_type and n_swa)"
            ));
        }
        let mut pb = p.kv;
        pb.n_swa = 0;
        pb.swa_type = SwaType::None;
        let mut ps = p.kv;
        ps.size = swa_size(
            p.kv.size,
            p.kv.n_swa,
            p.kv.unified,
            p.kv.n_seq_max,
            p.n_ubatch,
            p.swa_full,
        );
        if ps.size % ps.n_pad != 0 {
            // llama.cpp pads both to n_pad (1 in practice); keep the pad rule the leaf checks
            ps.size = ps.size.div_ceil(ps.n_pad) * ps.n_pad;
        }
        let mk = |kp: KvParams, swa: bool| -> Result<KvMemory> {
            let n_stream = if kp.unified { 1 } else { kp.n_seq_max };
            let st = match storage {
                None => None,
                Some(s) => {
                    let mut spec = s.spec.clone();
                    spec.size = kp.size;
                    spec.n_stream = n_stream;
                    spec.v_trans = kp.v_trans;
                    spec.layers = s
                        .layers
                        .iter()
                        .filter(|(_, is_swa)| *is_swa == swa)
                        .map(|(l, _)| *l)
                        .collect();
                    Some(KvStorage::with_options(spec, s.options.clone())?)
                }
            };
            KvMemory::new(KvCache::new(kp)?, st)
        };
        Ok(IswaMemory {
            base: mk(pb, false)?,
            swa: mk(ps, true)?,
            stock: false,
            last_read: Default::default(),
        })
    }

    /// A pair of two existing caches (the SWA half must have a window).
    pub fn from_parts(base: KvMemory, swa: KvMemory) -> Result<Self> {
        Self::check_parts(&base, &swa)?;
        Ok(IswaMemory {
            base,
            swa,
            stock: false,
            last_read: Default::default(),
        })
    }

    /// Whether two caches make a pair: the SWA half has a window, the base half none, and both
    /// hold the same sequences in the same streams.
    pub fn check_parts(base: &KvMemory, swa: &KvMemory) -> Result<()> {
        if base.cache.params().swa_type != SwaType::None {
            return Err(crate::error::err!(
                InvalidArgument,
                "the base half has a sliding window"
            ));
        }
        if swa.cache.params().swa_type == SwaType::None {
            return Err(crate::error::err!(
                InvalidArgument,
                "the SWA half has no sliding window"
            ));
        }
        if base.cache.n_seq_max() != swa.cache.n_seq_max()
            || base.cache.n_stream() != swa.cache.n_stream()
        {
            return Err(crate::error::err!(
                InvalidArgument,
                "the halves differ in sequences or streams"
            ));
        }
        composite::check_disjoint(base, swa)
    }

    /// Removes the destination's cells as llama.cpp's `state_clear` (a failed restore in
    /// stock-compatible mode, for hybrid memories that erase their attention part).
    pub fn state_clear(&mut self, seq: i32) -> Result<()> {
        self.base.state_clear(seq)?;
        self.swa.state_clear(seq)
    }

    /// Checks `ids` (and with `shift` the ability to shift) on both halves, so that an
    /// operation one half refuses is refused before the other changes (not in stock-compatible
    /// mode, where each half takes what llama.cpp's takes).
    fn check_both(&self, ids: &[i32], shift: Option<&str>) -> Result<()> {
        if self.stock {
            return Ok(());
        }
        for h in [&self.base.cache, &self.swa.cache] {
            for &s in ids {
                h.check_seq(s)?;
            }
            if let Some(op) = shift {
                h.check_can_shift(op)?;
            }
        }
        Ok(())
    }

    fn halves(&mut self) -> [&mut dyn Memory; 2] {
        [&mut self.base, &mut self.swa]
    }

    /// The halves a state with `flags` holds, in order.
    fn state_parts(&mut self, flags: u32) -> Vec<&mut dyn Memory> {
        let [b, s] = self.halves();
        if flags & PARTIAL_ONLY == 0 {
            vec![b, s]
        } else {
            vec![s]
        }
    }
}

impl Memory for IswaMemory {
    fn clear(&mut self, data: bool) {
        self.base.clear(data);
        self.swa.clear(data);
    }
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        // both refuse the same ids; ask first so that neither changes on an error
        if !self.stock {
            self.can_seq_rm(seq_id, p0, p1)?;
        }
        let a = self.base.seq_rm(seq_id, p0, p1)?;
        let b = self.swa.seq_rm(seq_id, p0, p1)?;
        Ok(a & b)
    }
    fn can_seq_rm(&self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        Ok(self.base.can_seq_rm(seq_id, p0, p1)? & self.swa.can_seq_rm(seq_id, p0, p1)?)
    }
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        // the halves have the same sequences and streams (a partial copy between streams is
        // refused by both); the ids are checked on both first
        self.check_both(&[src, dst], None)?;
        self.base.seq_cp(src, dst, p0, p1)?;
        self.swa.seq_cp(src, dst, p0, p1)
    }
    fn seq_keep(&mut self, seq_id: i32) -> Result<()> {
        self.check_both(&[seq_id], None)?;
        self.base.seq_keep(seq_id)?;
        self.swa.seq_keep(seq_id)
    }
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        self.check_both(&[seq_id], Some("seq_add"))?;
        self.base.seq_add(seq_id, p0, p1, delta)?;
        self.swa.seq_add(seq_id, p0, p1, delta)
    }
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        self.check_both(&[seq_id], Some("seq_div"))?;
        crate::memory::seq_div_changes(d)?;
        self.base.seq_div(seq_id, p0, p1, d)?;
        self.swa.seq_div(seq_id, p0, p1, d)
    }
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32> {
        // the base cache holds a superset of the SWA cache's positions
        self.swa.seq_pos_min(seq_id)
    }
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32> {
        self.swa.seq_pos_max(seq_id)
    }
    fn can_shift(&self) -> bool {
        self.base.can_shift()
            && self.swa.can_shift()
            && self.base.cache.size() == self.swa.cache.size()
    }
    fn n_seq_max(&self) -> u32 {
        self.base.n_seq_max()
    }
    fn split_rule(&self) -> crate::batch::SplitRule {
        crate::batch::SplitRule::Iswa {
            unified: self.base.cache.n_stream() == 1,
        }
    }
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>> {
        let mut spares = composite::spare_parts(spare, 2);
        let b = self.base.init_batch(ubatches, spares[0].take())?;
        if composite::failed(&*b) {
            return Ok(CompositeContext::boxed_failed(b.status()));
        }
        let s = self.swa.init_batch(ubatches, spares[1].take())?;
        Ok(CompositeContext::boxed(vec![
            (Role::Base, b),
            (Role::Swa, s),
        ]))
    }
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>> {
        let b = self.base.init_full()?;
        let s = self.swa.init_full()?;
        Ok(CompositeContext::boxed(vec![
            (Role::Base, b),
            (Role::Swa, s),
        ]))
    }
    fn init_update(&mut self, optimize: bool) -> Result<Box<dyn MemoryContext>> {
        let b = self.base.init_update(optimize)?;
        let s = self.swa.init_update(optimize)?;
        Ok(CompositeContext::boxed(vec![
            (Role::Base, b),
            (Role::Swa, s),
        ]))
    }
    fn state_write(&self, seq: i32, flags: u32, out: &mut StateOut<'_, '_>) -> Result<()> {
        if flags & PARTIAL_ONLY == 0 {
            Memory::state_write(&self.base, seq, flags, out)?;
        }
        Memory::state_write(&self.swa, seq, flags, out)
    }
    fn state_read(&mut self, seq: i32, flags: u32, inp: &mut StateIn<'_>) -> Result<()> {
        let (stock, mut last) = (self.stock, 0);
        let off = usize::from(flags & PARTIAL_ONLY != 0);
        let r = composite::read_parts(
            &mut self.state_parts(flags),
            seq,
            flags,
            inp,
            stock,
            &mut last,
        );
        self.last_read.set(last + off);
        r
    }
    fn state_read_io(&mut self, seq: i32, flags: u32, io: &mut dyn IoRead) -> Result<()> {
        let (stock, mut last) = (self.stock, 0);
        let off = usize::from(flags & PARTIAL_ONLY != 0);
        let r = composite::read_parts_io(
            &mut self.state_parts(flags),
            seq,
            flags,
            io,
            stock,
            &mut last,
        );
        self.last_read.set(last + off);
        r
    }
    fn state_check_io(&mut self, seq: i32, flags: u32, io: &mut dyn IoRead) -> Result<()> {
        if flags & PARTIAL_ONLY == 0 {
            self.last_read.set(0);
            Memory::state_check_io(&mut self.base, seq, flags, io)?;
        }
        self.last_read.set(1);
        Memory::state_check_io(&mut self.swa, seq, flags, io)
    }
    fn set_stock_compat(&mut self, on: bool) {
        self.stock = on;
        self.base.set_stock_compat(on);
        self.swa.set_stock_compat(on);
    }
    fn set_check_finite(&mut self, on: bool) {
        self.base.set_check_finite(on);
        self.swa.set_check_finite(on);
    }
    fn check_finite(&self) -> bool {
        // (a hybrid's dry run checks the pair's data as strictly as its stricter half)
        self.base.check_finite() || self.swa.check_finite()
    }
    fn read_stage(&self) -> ReadStage {
        if self.last_read.get() == 0 {
            self.base.read_stage()
        } else {
            self.swa.read_stage()
        }
    }
    fn has_layer(&self, il: u32) -> bool {
        self.base.has_layer(il) || self.swa.has_layer(il)
    }
    fn n_parts(&self) -> usize {
        2
    }
    fn part(&self, i: usize) -> Option<(Role, &dyn Memory)> {
        match i {
            0 => Some((Role::Base, &self.base)),
            1 => Some((Role::Swa, &self.swa)),
            _ => None,
        }
    }
    fn part_mut(&mut self, i: usize) -> Option<(Role, &mut dyn Memory)> {
        match i {
            0 => Some((Role::Base, &mut self.base)),
            1 => Some((Role::Swa, &mut self.swa)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swa_sizes_are_upstreams() {
        // PAD(min(size, n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256)
        assert_eq!(swa_size(4096, 512, true, 1, 512, false), 1024);
        assert_eq!(swa_size(4096, 512, true, 4, 512, false), 2560);
        assert_eq!(swa_size(4096, 512, false, 4, 512, false), 1024);
        assert_eq!(swa_size(768, 512, true, 4, 512, false), 768);
        assert_eq!(swa_size(300, 8, true, 1, 8, false), 256);
        assert_eq!(swa_size(4096, 512, true, 4, 512, true), 4096);
    }
}
