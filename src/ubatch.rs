//! The micro-batch a memory places: what llama.cpp calls `llama_ubatch`, with its whole shape
//! except the embeddings (token ids, positions, sequence ids and sets, output flags).
//!
//! Batch splitting is not part of the memory: callers hand over ubatches already split the way
//! llama.cpp splits them (`split_simple` for unified caches, `split_equal` for one stream per
//! sequence).

#![forbid(unsafe_code)]

use crate::error::{err, Result};

/// A borrowed ubatch. Sequence ids are stored flat: token `i` has `seq_ids[seq_off[i]..seq_off[i+1]]`.
#[derive(Clone, Copy, Debug)]
pub struct Ubatch<'a> {
    /// Number of tokens (`n_seq_tokens * n_seqs`).
    pub n_tokens: u32,
    /// Tokens per sequence set (1 for a simple split).
    pub n_seq_tokens: u32,
    /// Sequence sets (`n_tokens` for a simple split; the recurrent slot search walks them).
    pub n_seqs: u32,
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
    /// The distinct sequence ids of the ubatch, ascending (`n_seqs_unq` of them).
    pub seq_id_unq: &'a [i32],
    /// Output flags of the tokens (`llama_ubatch::output`), if the caller has them.
    pub output: Option<&'a [i8]>,
    /// A mixed ubatch's row kinds (`llama_ubatch::type`: 0 a token, 1 an embedding), `None`
    /// for a ubatch of one kind.
    pub embd: Option<&'a [i8]>,
}

impl<'a> Ubatch<'a> {
    /// Index of `seq_id` in `seq_id_unq` (`llama_ubatch::seq_idx[seq_id]`), `None` if the
    /// ubatch does not hold it.
    #[inline]
    pub fn seq_idx(&self, seq_id: i32) -> Option<usize> {
        self.seq_id_unq.binary_search(&seq_id).ok()
    }

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

    /// True when row `i` is an embedding (no token id): every row without `token`, and the
    /// embedding rows of a mixed ubatch.
    #[inline]
    pub fn is_embd(&self, i: u32) -> bool {
        self.token.is_none() || self.embd.is_some_and(|e| e[i as usize] != 0)
    }

    /// True when the rows are not all of one kind (`llama_ubatch::is_mixed`).
    #[inline]
    pub fn is_mixed(&self) -> bool {
        self.embd.is_some()
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
        if (self.n_seq_tokens as u64) * (self.n_seqs as u64) != n as u64 {
            return Err(err!(
                InvalidUbatch,
                "n_seq_tokens {} * n_seqs {} != n_tokens {n}",
                self.n_seq_tokens,
                self.n_seqs
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
        if self.output.is_some_and(|o| o.len() != n) {
            return Err(err!(InvalidUbatch, "output must have n_tokens entries"));
        }
        if self.embd.is_some_and(|e| e.len() != n) {
            return Err(err!(
                InvalidUbatch,
                "embd (row kinds) must have n_tokens entries"
            ));
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
        // llama.cpp derives seq_id_unq from the tokens: exactly the ids they use. An id listed
        // but unused (or out of range) would reach per-sequence tables the inputs index.
        let mut used = [0u64; crate::cells::MAX_SEQ / 64];
        for i in 0..n as u32 {
            for &s in self.seqs(i) {
                if self.seq_id_unq.binary_search(&s).is_err() {
                    return Err(err!(
                        InvalidUbatch,
                        "seq_id {s} of token {i} missing from seq_id_unq"
                    ));
                }
                used[s as usize / 64] |= 1 << (s % 64);
            }
        }
        let n_used: u32 = used.iter().map(|w| w.count_ones()).sum();
        if n_used as usize != self.seq_id_unq.len() {
            return Err(err!(
                InvalidUbatch,
                "seq_id_unq lists {} ids but the tokens use {n_used}",
                self.seq_id_unq.len()
            ));
        }
        Ok(())
    }
}

/// An owned ubatch, convenient for Rust callers, tests and the C ABI's memory contexts (which
/// keep their ubatches between `apply` calls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UbatchBuf {
    /// See [`Ubatch::n_seq_tokens`].
    pub n_seq_tokens: u32,
    /// See [`Ubatch::n_seqs`].
    pub n_seqs: u32,
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
    /// See [`Ubatch::output`].
    pub output: Option<Vec<i8>>,
    /// See [`Ubatch::embd`].
    pub embd: Option<Vec<i8>>,
}

impl UbatchBuf {
    /// A text ubatch of a simple split (one token per sequence set): token `i` has id
    /// `tokens[i]`, position `pos[i]`, sequences `seqs[i]`.
    pub fn new(tokens: &[i32], pos: &[i32], seqs: &[&[i32]]) -> Self {
        let mut b = UbatchBuf {
            n_seq_tokens: 1,
            n_seqs: seqs.len() as u32,
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
        let mut b = UbatchBuf::default();
        b.assign(u);
        b
    }

    /// Replaces the contents with a copy of `u`, reusing the buffers (no allocation once
    /// they are large enough).
    pub fn assign(&mut self, u: &Ubatch<'_>) {
        fn copy<T: Copy>(dst: &mut Vec<T>, src: &[T]) {
            dst.clear();
            dst.extend_from_slice(src);
        }
        fn copy_opt<T: Copy>(dst: &mut Option<Vec<T>>, src: Option<&[T]>) {
            match (dst.as_mut(), src) {
                (Some(d), Some(s)) => copy(d, s),
                (None, Some(s)) => *dst = Some(s.to_vec()),
                (_, None) => *dst = None,
            }
        }
        self.n_seq_tokens = u.n_seq_tokens;
        self.n_seqs = u.n_seqs;
        self.n_pos = u.n_pos;
        self.equal_seqs = u.equal_seqs;
        copy_opt(&mut self.token, u.token);
        copy(&mut self.pos, u.pos);
        copy(&mut self.seq_off, u.seq_off);
        copy(&mut self.seq_ids, u.seq_ids);
        copy(&mut self.seq_id_unq, u.seq_id_unq);
        copy_opt(&mut self.output, u.output);
        copy_opt(&mut self.embd, u.embd);
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.seq_off.len().saturating_sub(1) as u32
    }

    /// The borrowed view.
    pub fn view(&self) -> Ubatch<'_> {
        Ubatch {
            n_tokens: self.n_tokens(),
            n_seq_tokens: self.n_seq_tokens,
            n_seqs: self.n_seqs,
            n_pos: self.n_pos,
            equal_seqs: self.equal_seqs,
            token: self.token.as_deref(),
            pos: &self.pos,
            seq_off: &self.seq_off,
            seq_ids: &self.seq_ids,
            seq_id_unq: &self.seq_id_unq,
            output: self.output.as_deref(),
            embd: self.embd.as_deref(),
        }
    }
}
