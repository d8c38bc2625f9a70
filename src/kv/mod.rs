//! The KV cache: llama.cpp's `llama_kv_cache` without its tensors (slot search, ubatch
//! placement, sequence operations, pending shifts and stream copies, graph inputs).
//!
//! Every rule here mirrors the pinned llama.cpp so that the same calls choose the same cells and
//! produce the same masks; the differential suite (`tests/kv_differential.rs`) holds us to it.
//! Where llama.cpp would assert or abort on bad input, these methods return an [`Error`](crate::error::Error) and
//! change nothing.

#![forbid(unsafe_code)]

mod context;
mod defrag;
mod inputs;
mod memory;
mod slot;
mod state;

pub use context::KvContext;
pub use defrag::{
    fragmentation, max_moves_for_nodes, plan_stream, DefragPlan, StreamPlan, DEFRAG_MIN_N_KV,
};
pub use inputs::{relative_position_bucket, MaskOut};
pub use memory::KvMemory;
pub use slot::SlotInfo;

use crate::cells::{Cells, Snapshot, MAX_SEQ};
use crate::error::{err, Result};

/// Sliding-window attention type (`llama_swa_type`); the values are llama.h's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum SwaType {
    /// No sliding window.
    None = 0,
    /// A key is masked when `query_pos - key_pos >= n_swa`.
    Standard = 1,
    /// A key is masked when it lies before the chunk of `n_swa` positions holding the query.
    Chunked = 2,
    /// A key is masked when `|query_pos - key_pos| > n_swa / 2`.
    Symmetric = 3,
}

impl SwaType {
    /// The enum value for a raw `llama_swa_type`, `None` if unknown.
    pub fn from_raw(v: i32) -> Option<SwaType> {
        match v {
            0 => Some(SwaType::None),
            1 => Some(SwaType::Standard),
            2 => Some(SwaType::Chunked),
            3 => Some(SwaType::Symmetric),
            _ => None,
        }
    }
}

/// Non-causal attention variant (`llama_non_causal_type` in the pinned hparams).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum NonCausalType {
    /// Non-causal attention applies to every layer.
    All = 0,
    /// Only the SWA cache becomes non-causal; the full-attention cache stays causal.
    SwaOnly = 1,
    /// Non-causal, and keys from the current ubatch's span escape the sliding window.
    SwaFull = 2,
}

/// `llama_hparams::is_masked_swa`: is key position `p0` outside the window of query position `p1`?
#[inline]
pub fn is_masked_swa(n_swa: u32, swa_type: SwaType, p0: i32, p1: i32) -> bool {
    match swa_type {
        SwaType::None => false,
        // `p1 - p0` on int32 as the stock binary computes it: the slot search passes
        // `seq_pos_max + 1`, which is i32::MIN for a sequence ending at i32::MAX, and the
        // difference wraps (cells from position 1 on are then hidden, position 0 is not).
        SwaType::Standard => p1.wrapping_sub(p0) >= n_swa as i32,
        SwaType::Chunked => {
            // Upstream divides with p1 converted to unsigned; positions are >= 0 here.
            let start = (p1 as u32 / n_swa).wrapping_mul(n_swa) as i32;
            p0 < start
        }
        SwaType::Symmetric => {
            let half = n_swa as i32 / 2;
            let diff = p1.wrapping_sub(p0);
            diff < -half || diff > half
        }
    }
}

/// Construction parameters of a [`KvCache`]; see [`KvParams::default`] for the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvParams {
    /// Cells per stream.
    pub size: u32,
    /// Number of sequences, `1..=256`.
    pub n_seq_max: u32,
    /// One stream shared by all sequences (`kv_unified`), else one stream per sequence.
    pub unified: bool,
    /// `size` must be a multiple of this; `n_kv` is padded to `max(n_pad, 256)`.
    pub n_pad: u32,
    /// Sliding window size (ignored when `swa_type` is `None`).
    pub n_swa: u32,
    /// Sliding window type.
    pub swa_type: SwaType,
    /// Position sections per token: 1, or 4 for M-RoPE models (cell ext kept, no shifts).
    pub n_pos_per_embd: u32,
    /// The model supports K-shift (llama.cpp: all but STEP35).
    pub model_can_shift: bool,
    /// ALiBi masks (`-|p0 - p1|` instead of 0 for visible keys).
    pub use_alibi: bool,
    /// Which layers become non-causal when the caller asks for non-causal attention.
    pub non_causal_type: NonCausalType,
    /// V is stored transposed (no flash attention).
    pub v_trans: bool,
    /// Largest V row width over the layers (`n_embd_v_gqa_max`), for transposed V indices.
    pub n_embd_v_gqa_max: u32,
    /// Relative attention buckets (`n_rel_attn_bkts`, T5), for position buckets.
    pub n_rel_attn_bkts: u32,
    /// Cells keep the token ids of every ubatch, embedding rows included, and states carry
    /// them, for n-gram inputs ([`KvCache::get_prev_tokens`]; llama.cpp's `ple_n_heads > 0`,
    /// QWEN4EXP).
    pub ngram_tokens: bool,
    /// With `ngram_tokens`: the token id an embedding row's cell takes (llama.cpp's
    /// `ple_image_token_id`, or `ple_eos_token_id` when that is 0).
    pub embd_token: i32,
}

impl Default for KvParams {
    fn default() -> Self {
        KvParams {
            size: 256,
            n_seq_max: 1,
            unified: true,
            n_pad: 1,
            n_swa: 0,
            swa_type: SwaType::None,
            n_pos_per_embd: 1,
            model_can_shift: true,
            use_alibi: false,
            non_causal_type: NonCausalType::All,
            v_trans: true,
            n_embd_v_gqa_max: 0,
            n_rel_attn_bkts: 0,
            ngram_tokens: false,
            embd_token: 0,
        }
    }
}

/// The KV cache's cell tables, heads and pending work.
#[derive(Clone, Debug)]
pub struct KvCache {
    p: KvParams,
    n_stream: u32,
    cells: Vec<Cells>,
    /// Per stream, where the next slot search starts (not part of the state: a search hint).
    heads: Vec<u32>,
    /// Stream copies `(src, dst)` queued by cross-stream `seq_cp`, applied by the next update.
    pending_copies: Vec<(u32, u32)>,
    scratch: Vec<u32>,
    /// (stream, cell) keys of a caller-given slot, sorted to find cells listed twice.
    keys: Vec<u64>,
    /// Rollback buffers of `prepare`, kept between calls.
    prep: PrepScratch,
    /// Sequence ids the operations accept: `n_seq_max`, or all 256 on a unified cache in
    /// llama.cpp's compatible mode ([`KvCache::set_stock_seq_ids`]).
    seq_limit: u32,
    /// Where llama.cpp's log lines of the cache go.
    pub(crate) log: crate::memory::Log,
    /// llama.cpp's `LLAMA_KV_CACHE_DEBUG` level of the slot search's debug lines.
    pub(crate) debug: i32,
    /// Counts the changes to the cells and heads (not `prepare`'s simulation, which leaves
    /// llama.cpp's side effects), so that a context applies its plan as planned when nothing
    /// else changed the cache since ([`KvCache::generation`]).
    generation: u64,
}

/// What `prepare` saves before placing each ubatch: every stream's head, and the slot cells.
#[derive(Clone, Debug, Default)]
struct PrepScratch {
    /// `n_stream` heads per placed ubatch.
    heads: Vec<u32>,
    /// One snapshot per (ubatch, slot stream), in order.
    snaps: Vec<Snapshot>,
}

impl KvCache {
    /// Creates an empty cache.
    pub fn new(p: KvParams) -> Result<Self> {
        if p.n_seq_max == 0 || p.n_seq_max as usize > MAX_SEQ {
            return Err(err!(
                InvalidArgument,
                "n_seq_max = {} (expected 1..={MAX_SEQ})",
                p.n_seq_max
            ));
        }
        if p.size == 0 {
            return Err(err!(InvalidArgument, "size must be > 0"));
        }
        if p.n_pad == 0 || p.size % p.n_pad != 0 {
            return Err(err!(
                InvalidArgument,
                "size {} is not a multiple of n_pad {}",
                p.size,
                p.n_pad
            ));
        }
        if p.swa_type != SwaType::None && p.n_swa == 0 {
            return Err(err!(
                InvalidArgument,
                "n_swa must be > 0 with a sliding window"
            ));
        }
        if p.n_pos_per_embd != 1 && p.n_pos_per_embd != 4 {
            return Err(err!(
                InvalidArgument,
                "n_pos_per_embd = {} (expected 1 or 4)",
                p.n_pos_per_embd
            ));
        }
        let n_stream = if p.unified { 1 } else { p.n_seq_max };
        // llama.cpp splits a u32 n_ctx over the streams (n_ctx_seq = n_ctx / n_seq_max): more
        // cells than that is no configuration it can have.
        if p.size as u64 * n_stream as u64 > u32::MAX as u64 {
            return Err(err!(
                InvalidArgument,
                "{} cells x {n_stream} streams exceed llama.cpp's 32-bit context size",
                p.size
            ));
        }
        let no_memory = |e| {
            err!(
                InvalidArgument,
                "cannot allocate {} cells x {n_stream} streams: {e}",
                p.size
            )
        };
        let mut cells = Vec::new();
        cells
            .try_reserve_exact(n_stream as usize)
            .map_err(no_memory)?;
        for _ in 0..n_stream {
            cells.push(Cells::try_new(p.size).map_err(no_memory)?);
        }
        Ok(KvCache {
            n_stream,
            cells,
            heads: vec![0; n_stream as usize],
            pending_copies: Vec::new(),
            scratch: Vec::new(),
            keys: Vec::new(),
            prep: PrepScratch::default(),
            seq_limit: p.n_seq_max,
            log: Default::default(),
            debug: 0,
            generation: 0,
            p,
        })
    }

    /// llama.cpp's sequence-id rule for a unified cache: every id below 256 maps to its one
    /// stream, so the sequence operations and state functions accept ids in
    /// `[n_seq_max, 256)` there, as llama.h does (the drop-in libllama turns this on). Off by
    /// default: such an id is almost always a caller's mistake. No effect with several streams.
    pub fn set_stock_seq_ids(&mut self, on: bool) {
        self.seq_limit = if on && self.n_stream == 1 {
            MAX_SEQ as u32
        } else {
            self.p.n_seq_max
        };
    }

    /// Sequence ids below this are accepted (see [`KvCache::set_stock_seq_ids`]).
    pub fn seq_limit(&self) -> u32 {
        self.seq_limit
    }

    /// The parameters the cache was built with.
    pub fn params(&self) -> &KvParams {
        &self.p
    }

    /// Cells per stream.
    pub fn size(&self) -> u32 {
        self.p.size
    }

    /// Number of streams (1 when unified, else `n_seq_max`).
    pub fn n_stream(&self) -> u32 {
        self.n_stream
    }

    /// Number of sequences.
    pub fn n_seq_max(&self) -> u32 {
        self.p.n_seq_max
    }

    /// The stream holding `seq_id`'s cells (no bounds check).
    #[inline]
    pub fn stream_of(&self, seq_id: i32) -> u32 {
        if self.n_stream == 1 {
            0
        } else {
            seq_id as u32
        }
    }

    /// The cells of stream `s`.
    pub fn cells(&self, s: u32) -> &Cells {
        &self.cells[s as usize]
    }

    /// The cells of stream `s`, for restoring a state (the caller keeps the cache consistent).
    pub(crate) fn cells_mut(&mut self, s: u32) -> &mut Cells {
        self.generation += 1;
        &mut self.cells[s as usize]
    }

    /// A number that changes whenever the cells or the heads change, except through
    /// `prepare`'s simulation: a batch context applies its slots as planned (as llama.cpp,
    /// which overwrites the cells it planned even where the simulation's purges left a
    /// sequence's older cell back in them) while the cache is as the plan left it, and checks
    /// each slot first once anything else changed it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sets the slot-search head of stream `s` (undoing a failed restore).
    pub(crate) fn set_head(&mut self, s: u32, h: u32) {
        self.generation += 1;
        self.heads[s as usize] = h;
    }

    /// The slot-search head of stream `s`.
    pub fn head(&self, s: u32) -> u32 {
        self.heads[s as usize]
    }

    /// Stream copies waiting for the next update.
    pub fn pending_copies(&self) -> &[(u32, u32)] {
        &self.pending_copies
    }

    /// True when cell ext data must survive a save/restore (M-RoPE).
    pub fn has_cell_ext(&self) -> bool {
        self.p.n_pos_per_embd > 1 || self.p.ngram_tokens
    }

    /// For every token of `ub` (already applied), the ids of the `n` tokens before it in its
    /// sequence, oldest first, [`TOKEN_NULL`](crate::cells::TOKEN_NULL) where there is none:
    /// `out[i * n + j]` is the token at distance `n - j` (llama.cpp's `get_prev_tokens`, the
    /// n-gram inputs of QWEN4EXP). Each token's first sequence decides; a predecessor is the
    /// cell of that sequence at the largest position at or before the wanted one (M-RoPE
    /// gaps). In an embedding or mixed ubatch, whose positions need not follow the rows,
    /// predecessors inside the ubatch go by row order. Needs a ubatch that passes
    /// [`KvCache::validate_ubatch`]; `out` is resized to `n_tokens * n`.
    pub fn get_prev_tokens(
        &self,
        ub: &crate::ubatch::Ubatch<'_>,
        n: u32,
        out: &mut Vec<i32>,
    ) -> Result<()> {
        self.validate_ubatch(ub)?;
        let nt = ub.n_tokens as usize;
        let len = nt
            .checked_mul(n as usize)
            .filter(|&l| l <= isize::MAX as usize / 4)
            .ok_or_else(|| err!(InvalidArgument, "n_tokens * n ({nt} * {n}) is too large"))?;
        out.clear();
        out.resize(len, crate::cells::TOKEN_NULL);
        if n == 0 {
            return Ok(());
        }
        let by_order = ub.token.is_none() || ub.is_mixed();
        // per row: its index among the ubatch rows of its sequence; per sequence: its rows
        let mut ord: Vec<usize> = Vec::new();
        let mut rows: std::collections::HashMap<i32, Vec<usize>> = std::collections::HashMap::new();
        if by_order {
            ord.reserve(nt);
            for i in 0..nt {
                let v = rows.entry(ub.seq0(i as u32)).or_default();
                ord.push(v.len());
                v.push(i);
            }
        }
        for i in 0..nt {
            let seq = ub.seq0(i as u32);
            let cells = &self.cells[self.stream_of(seq) as usize];
            for j in 0..n as usize {
                let d = (n as usize - j) as i64;
                let p = if by_order {
                    let v = &rows[&seq];
                    let k = ord[i] as i64 - d;
                    if k >= 0 {
                        ub.pos[v[k as usize]] as i64
                    } else {
                        ub.pos[v[0]] as i64 + k
                    }
                } else {
                    ub.pos[i] as i64 - d
                };
                if p < 0 {
                    continue;
                }
                out[i * n as usize + j] = cells.seq_pos_tok_le(seq, p as i32);
            }
        }
        Ok(())
    }

    /// Whether positions can be shifted (`get_can_shift`).
    pub fn can_shift(&self) -> bool {
        self.p.model_can_shift && self.p.n_pos_per_embd == 1
    }

    /// True when any stream has a pending shift.
    pub fn has_shift(&self) -> bool {
        self.cells.iter().any(Cells::get_has_shift)
    }

    pub(crate) fn check_seq(&self, seq_id: i32) -> Result<()> {
        if seq_id < 0 || seq_id as u32 >= self.seq_limit {
            return Err(err!(
                InvalidSeqId,
                "seq_id {seq_id} outside [0, {})",
                self.seq_limit
            ));
        }
        Ok(())
    }

    /// Takes the stream copies queued for the next update (the caller performs them).
    pub fn take_pending_copies(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.pending_copies)
    }

    /// Empties every stream and resets the heads. Pending stream copies are kept, as upstream.
    pub fn clear(&mut self) {
        self.generation += 1;
        for (c, h) in self.cells.iter_mut().zip(&mut self.heads) {
            c.reset();
            *h = 0;
        }
    }

    /// Empties every cell and keeps the heads (llama.cpp's `clear` through a cache that shares
    /// these cells: it resets its own heads, not this cache's).
    pub fn reset_cells(&mut self) {
        self.generation += 1;
        for c in &mut self.cells {
            c.reset();
        }
    }

    /// What [`KvCache::seq_rm`] would return, changing nothing: true for every valid id (a KV
    /// cache can drop any range), the same error otherwise.
    pub fn can_seq_rm(&self, seq_id: i32, _p0: i32, _p1: i32) -> Result<bool> {
        if seq_id != -1 {
            self.check_seq(seq_id)?;
        }
        Ok(true)
    }

    /// Removes the cells of `seq_id` (or of every sequence when `seq_id == -1`) with position in
    /// `[p0, p1)`; negative bounds mean "from 0" and "to infinity". Never fails for valid ids.
    pub fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool> {
        self.generation += 1;
        if seq_id != -1 {
            self.check_seq(seq_id)?;
        }
        let (p0, p1) = normalize(p0, p1);
        if seq_id >= 0 {
            let (s, freed) = self.for_seq_cells(seq_id, p0, p1, |c, i| c.seq_rm(i, seq_id));
            if freed < self.heads[s] {
                self.heads[s] = freed;
            }
        } else {
            for s in 0..self.n_stream as usize {
                let cells = &mut self.cells[s];
                let mut new_head = u32::MAX;
                let mut next = cells.next_used(0);
                while let Some(i) = next {
                    if cells.pos_in(i, p0, p1) {
                        cells.rm(i);
                        new_head = new_head.min(i);
                    }
                    next = cells.next_used(i + 1);
                }
                if new_head < self.heads[s] {
                    self.heads[s] = new_head;
                }
            }
        }
        Ok(true)
    }

    /// Makes the cells of `src` in `[p0, p1)` visible to `dst` as well. Between streams
    /// (non-unified caches) only whole sequences can be copied: the destination stream is reset
    /// and the data copy is queued for the next update.
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        self.generation += 1;
        self.check_seq(src)?;
        self.check_seq(dst)?;
        let s0 = self.stream_of(src);
        let s1 = self.stream_of(dst);
        if s0 == s1 {
            if src == dst {
                return Ok(());
            }
            self.for_seq_cells(src, p0, p1, |c, i| {
                if !c.seq_has(i, dst) {
                    c.seq_add(i, dst);
                }
                false
            });
            return Ok(());
        }
        let size = self.p.size as i64;
        let partial = |p: i32| p > 0 && (p as i64) + 1 < size;
        if partial(p0) || partial(p1) {
            return Err(err!(
                InvalidRange,
                "seq_cp between streams copies whole sequences only; got [{p0}, {p1})"
            ));
        }
        self.pending_copies.push((s0, s1));
        let (a, b) = pair_mut(&mut self.cells, s0 as usize, s1 as usize);
        b.reset();
        for (_, i) in a.seq_pos_iter(src) {
            // Upstream re-derives the pre-shift position and re-applies the shift; the end state
            // is the source's position and pending shift.
            b.copy_from_stream(i, a.pos_get(i), a.get_shift(i), a.ext_get(i), dst);
        }
        self.heads[s1 as usize] = self.heads[s0 as usize];
        Ok(())
    }

    /// Removes every sequence but `seq_id` from its stream (other streams are untouched).
    pub fn seq_keep(&mut self, seq_id: i32) -> Result<()> {
        self.generation += 1;
        self.check_seq(seq_id)?;
        let s = self.stream_of(seq_id) as usize;
        let cells = &mut self.cells[s];
        let mut new_head = u32::MAX;
        let mut next = cells.next_used(0);
        while let Some(i) = next {
            if cells.seq_keep(i, seq_id) {
                new_head = new_head.min(i);
            }
            next = cells.next_used(i + 1);
        }
        if new_head < self.heads[s] {
            self.heads[s] = new_head;
        }
        Ok(())
    }

    /// Refuses a position shift on a cache that cannot apply one (llama.cpp accepts it, and
    /// then aborts in the next update: the pending shift could never be cleared).
    pub(crate) fn check_can_shift(&self, op: &str) -> Result<()> {
        if self.p.n_pos_per_embd != 1 {
            return Err(err!(
                Unsupported,
                "{op} is not supported with M-RoPE positions"
            ));
        }
        if !self.p.model_can_shift {
            return Err(err!(
                Unsupported,
                "{op} needs a K-shift, which this model cannot do (can_shift is false)"
            ));
        }
        Ok(())
    }

    /// Adds `delta` to the positions of `seq_id` in `[p0, p1)`; cells pushed below 0 are freed.
    /// Refused (nothing changes) when [`KvCache::can_shift`] is false.
    pub fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()> {
        self.generation += 1;
        self.check_seq(seq_id)?;
        self.check_can_shift("seq_add")?;
        if delta == 0 {
            return Ok(());
        }
        // Upstream returns before touching the head on an empty range.
        let (q0, q1) = normalize(p0, p1);
        if q0 == q1 {
            return Ok(());
        }
        let (s, freed) = self.for_seq_cells(seq_id, p0, p1, |c, i| c.pos_add(i, delta));
        // Upstream restarts the search from the start when nothing was freed.
        self.heads[s] = if freed != u32::MAX { freed } else { 0 };
        Ok(())
    }

    /// Divides the positions of `seq_id` in `[p0, p1)` by `d` (truncating). `d` must be > 0.
    /// Refused (nothing changes) when [`KvCache::can_shift`] is false.
    pub fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()> {
        self.generation += 1;
        self.check_seq(seq_id)?;
        self.check_can_shift("seq_div")?;
        if !crate::memory::seq_div_changes(d)? {
            return Ok(());
        }
        self.for_seq_cells(seq_id, p0, p1, |c, i| {
            c.pos_div(i, d);
            false
        });
        Ok(())
    }

    /// Calls `f` on each cell of `seq_id` with position in `[p0, p1)` (bounds normalized as
    /// upstream). Visits only the sequence's own cells, through its position index, where
    /// upstream scans the whole stream. Returns the sequence's stream and the lowest cell for
    /// which `f` returned true (`u32::MAX` if none).
    fn for_seq_cells(
        &mut self,
        seq_id: i32,
        p0: i32,
        p1: i32,
        mut f: impl FnMut(&mut Cells, u32) -> bool,
    ) -> (usize, u32) {
        let (p0, p1) = normalize(p0, p1);
        let s = self.stream_of(seq_id) as usize;
        let mut list = std::mem::take(&mut self.scratch);
        self.cells[s].seq_cells_in(seq_id, p0, p1, &mut list);
        let mut lowest = u32::MAX;
        for &i in &list {
            if f(&mut self.cells[s], i) {
                lowest = lowest.min(i);
            }
        }
        self.scratch = list;
        (s, lowest)
    }

    /// Smallest position of `seq_id`, -1 if absent.
    pub fn seq_pos_min(&self, seq_id: i32) -> Result<i32> {
        self.check_seq(seq_id)?;
        Ok(self.cells[self.stream_of(seq_id) as usize].seq_pos_min(seq_id))
    }

    /// Largest position of `seq_id`, -1 if absent.
    pub fn seq_pos_max(&self, seq_id: i32) -> Result<i32> {
        self.check_seq(seq_id)?;
        Ok(self.cells[self.stream_of(seq_id) as usize].seq_pos_max(seq_id))
    }

    /// Checks every stream's indexes (tests).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for (s, c) in self.cells.iter().enumerate() {
            c.check_invariants()
                .map_err(|e| format!("stream {s}: {e}"))?;
        }
        Ok(())
    }
}

/// Negative bounds mean "from 0" and "to infinity".
#[inline]
fn normalize(p0: i32, p1: i32) -> (i32, i32) {
    (p0.max(0), if p1 < 0 { i32::MAX } else { p1 })
}

fn pair_mut<T>(v: &mut [T], a: usize, b: usize) -> (&T, &mut T) {
    debug_assert_ne!(a, b);
    if a < b {
        let (l, r) = v.split_at_mut(b);
        (&l[a], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(a);
        (&r[0], &mut l[b])
    }
}

#[cfg(test)]
mod tests;
