//! The micro-batch a memory places: what llama.cpp calls `llama_ubatch`, reduced to what the
//! memory reads (token ids, positions, sequence ids).
//!
//! Batch splitting is not part of the memory: callers hand over ubatches already split the way
//! llama.cpp splits them (`split_simple` for unified caches, `split_equal` for one stream per
//! sequence).

use crate::error::{err, Result};

/// A borrowed ubatch. Sequence ids are stored flat: token `i` has `seq_ids[seq_off[i]..seq_off[i+1]]`.
#[derive(Clone, Copy, Debug)]
pub struct Ubatch<'a> {
    /// Number of tokens.
    pub n_tokens: u32,
    /// Position sections per token: 1, or 4 for M-RoPE (section 1 = y, 2 = x).
    pub n_pos: u32,
    /// Whether the ubatch came from an equal split (`llama_ubatch::equal_seqs`).
    pub equal_seqs: bool,
    /// Token ids, `None` for embedding input.
    pub token: Option<&'a [i32]>,
    /// Positions, section-major: `pos[j * n_tokens + i]`.
    pub pos: &'a [i32],
    /// `n_tokens + 1` offsets into `seq_ids`.
    pub seq_off: &'a [u32],
    /// Sequence ids of all tokens, concatenated.
    pub seq_ids: &'a [i32],
    /// The distinct sequence ids of the ubatch, ascending.
    pub seq_id_unq: &'a [i32],
}

impl<'a> Ubatch<'a> {
    /// Sequence ids of token `i`.
    #[inline]
    pub fn seqs(&self, i: u32) -> &'a [i32] {
        let i = i as usize;
        &self.seq_ids[self.seq_off[i] as usize..self.seq_off[i + 1] as usize]
    }

    /// First sequence id of token `i` (`seq_id[i][0]`, the one the KQ mask looks at).
    #[inline]
    pub fn seq0(&self, i: u32) -> i32 {
        self.seq_ids[self.seq_off[i as usize] as usize]
    }

    /// True when positions carry a 2-D section (`llama_ubatch::is_pos_2d`).
    #[inline]
    pub fn is_pos_2d(&self) -> bool {
        self.n_pos >= 3
    }

    /// Checks the internal consistency of the description and that every sequence id is in
    /// `[0, n_seq_max)`.
    pub fn validate(&self, n_seq_max: u32) -> Result<()> {
        let n = self.n_tokens as usize;
        if n == 0 {
            return Err(err!(InvalidUbatch, "ubatch has no tokens"));
        }
        if self.n_pos == 0 || self.n_pos > 4 {
            return Err(err!(
                InvalidUbatch,
                "n_pos = {} (expected 1..=4)",
                self.n_pos
            ));
        }
        let n_pos_total = n
            .checked_mul(self.n_pos as usize)
            .ok_or_else(|| err!(InvalidUbatch, "n_tokens * n_pos overflows"))?;
        if self.pos.len() != n_pos_total {
            return Err(err!(
                InvalidUbatch,
                "pos has {} entries, expected {n_pos_total}",
                self.pos.len()
            ));
        }
        if let Some(t) = self.token {
            if t.len() != n {
                return Err(err!(
                    InvalidUbatch,
                    "token has {} entries, expected {n}",
                    t.len()
                ));
            }
        }
        if self.pos[..n].iter().any(|&p| p < 0) {
            return Err(err!(InvalidUbatch, "negative token position"));
        }
        if self.seq_off.len() != n + 1 || self.seq_off[0] != 0 {
            return Err(err!(
                InvalidUbatch,
                "seq_off must have n_tokens + 1 entries starting at 0"
            ));
        }
        for i in 0..n {
            let (a, b) = (self.seq_off[i], self.seq_off[i + 1]);
            if b <= a || b as usize > self.seq_ids.len() {
                return Err(err!(InvalidUbatch, "token {i} has no sequence id"));
            }
        }
        if self.seq_off[n] as usize != self.seq_ids.len() {
            return Err(err!(InvalidUbatch, "seq_ids has trailing entries"));
        }
        for &s in self.seq_ids {
            if s < 0 || s as u32 >= n_seq_max {
                return Err(err!(InvalidSeqId, "seq_id {s} outside [0, {n_seq_max})"));
            }
        }
        if self.seq_id_unq.is_empty() || self.seq_id_unq.windows(2).any(|w| w[0] >= w[1]) {
            return Err(err!(
                InvalidUbatch,
                "seq_id_unq must be non-empty and strictly ascending"
            ));
        }
        for i in 0..n as u32 {
            for s in self.seqs(i) {
                if self.seq_id_unq.binary_search(s).is_err() {
                    return Err(err!(
                        InvalidUbatch,
                        "seq_id {s} of token {i} missing from seq_id_unq"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An owned ubatch, convenient for Rust callers, tests and the C ABI's memory contexts (which
/// keep their ubatches between `apply` calls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UbatchBuf {
    /// See [`Ubatch::n_pos`].
    pub n_pos: u32,
    /// See [`Ubatch::equal_seqs`].
    pub equal_seqs: bool,
    /// See [`Ubatch::token`].
    pub token: Option<Vec<i32>>,
    /// See [`Ubatch::pos`].
    pub pos: Vec<i32>,
    /// See [`Ubatch::seq_off`].
    pub seq_off: Vec<u32>,
    /// See [`Ubatch::seq_ids`].
    pub seq_ids: Vec<i32>,
    /// See [`Ubatch::seq_id_unq`].
    pub seq_id_unq: Vec<i32>,
}

impl UbatchBuf {
    /// A text ubatch: token `i` has id `tokens[i]`, position `pos[i]`, sequences `seqs[i]`.
    pub fn new(tokens: &[i32], pos: &[i32], seqs: &[&[i32]]) -> Self {
        let mut b = UbatchBuf {
            n_pos: 1,
            token: Some(tokens.to_vec()),
            pos: pos.to_vec(),
            ..Default::default()
        };
        b.seq_off.push(0);
        for s in seqs {
            b.seq_ids.extend_from_slice(s);
            b.seq_off.push(b.seq_ids.len() as u32);
        }
        b.seq_id_unq = b.seq_ids.clone();
        b.seq_id_unq.sort_unstable();
        b.seq_id_unq.dedup();
        b
    }

    /// Copies a borrowed ubatch.
    pub fn from_view(u: &Ubatch<'_>) -> Self {
        UbatchBuf {
            n_pos: u.n_pos,
            equal_seqs: u.equal_seqs,
            token: u.token.map(<[i32]>::to_vec),
            pos: u.pos.to_vec(),
            seq_off: u.seq_off.to_vec(),
            seq_ids: u.seq_ids.to_vec(),
            seq_id_unq: u.seq_id_unq.to_vec(),
        }
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.seq_off.len().saturating_sub(1) as u32
    }

    /// The borrowed view.
    pub fn view(&self) -> Ubatch<'_> {
        Ubatch {
            n_tokens: self.n_tokens(),
            n_pos: self.n_pos,
            equal_seqs: self.equal_seqs,
            token: self.token.as_deref(),
            pos: &self.pos,
            seq_off: &self.seq_off,
            seq_ids: &self.seq_ids,
            seq_id_unq: &self.seq_id_unq,
        }
    }
}
