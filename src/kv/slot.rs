//! Where a ubatch goes in the cache (`llama_kv_cache::slot_info`).

use crate::cells::MAX_SEQ;

/// Cells chosen for a ubatch: token `k * size() + i` goes to cell `idxs[k][i]` of stream
/// `strm[k]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Lowest stream of the slot.
    pub s0: u32,
    /// Highest stream of the slot.
    pub s1: u32,
    /// Stream of each group of tokens.
    pub strm: Vec<u32>,
    /// Cell indices of each group of tokens.
    pub idxs: Vec<Vec<u32>>,
}

impl SlotInfo {
    /// An empty slot over `n` streams with room for `cap` cells each.
    pub fn with_streams(n: usize, cap: usize) -> Self {
        SlotInfo {
            s0: MAX_SEQ as u32,
            s1: 0,
            strm: vec![0; n],
            idxs: (0..n).map(|_| Vec::with_capacity(cap)).collect(),
        }
    }

    /// Empties the slot for `n` streams of up to `cap` cells each, keeping its buffers.
    pub fn reset(&mut self, n: usize, cap: usize) {
        self.s0 = MAX_SEQ as u32;
        self.s1 = 0;
        self.strm.clear();
        self.strm.resize(n, 0);
        self.idxs.truncate(n);
        for v in &mut self.idxs {
            v.clear();
        }
        self.idxs.resize_with(n, || Vec::with_capacity(cap));
    }

    /// Tokens per stream.
    pub fn size(&self) -> usize {
        self.idxs.first().map_or(0, Vec::len)
    }

    /// Number of streams.
    pub fn n_stream(&self) -> usize {
        self.strm.len()
    }

    /// Total number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.size() * self.n_stream()
    }

    /// True when the slot is one stream of consecutive cells.
    pub fn is_contiguous(&self) -> bool {
        match self.idxs.as_slice() {
            [] => true,
            [one] => one.windows(2).all(|w| w[1] == w[0] + 1),
            _ => false,
        }
    }
}
