//! Splitting a whole batch into ubatches, as llama.cpp's `llama_batch_allocr` does for the
//! memories' `init_batch`: `split_simple` (consecutive tokens), `split_equal` (the same number
//! of tokens from each of several non-overlapping sequence sets, optionally with increasing
//! sequence ids and keeping each sequence's last tokens together) and `split_seq` (one
//! sequence set and its subsets). [`Splitter`] gives the batch indices of each ubatch, in
//! llama.cpp's order; [`Batch::ubatch`] builds the ubatch itself.
//!
//! [`split_for`] runs the strategy a memory kind's `init_batch` uses, with llama.cpp's retry,
//! and plans the ubatches on the memory ([`crate::memory::Memory::init_batch`]).

use std::collections::HashMap;

use crate::error::{err, Result};
use crate::ubatch::UbatchBuf;

/// A sequence set: bit `s` for sequence `s` (256 sequences at most).
type SeqSet = [u64; 4];

/// A whole batch (llama.cpp's `llama_batch` after `llama_batch_allocr::init`), borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Token ids, `None` for embedding input.
    pub token: Option<&'a [i32]>,
    /// Positions, section-major (`pos[j * n_tokens + i]`), `n_pos` sections.
    pub pos: &'a [i32],
    /// Position sections per token (1, or 4 for M-RoPE).
    pub n_pos: u32,
    /// `n_tokens + 1` offsets into `seq_ids`.
    pub seq_off: &'a [u32],
    /// Sequence ids of all tokens, concatenated.
    pub seq_ids: &'a [i32],
    /// Output flags, if the caller has them.
    pub output: Option<&'a [i8]>,
}

impl Batch<'_> {
    /// Number of tokens.
    pub fn n_tokens(&self) -> u32 {
        self.seq_off.len().saturating_sub(1) as u32
    }

    fn seqs(&self, i: u32) -> &[i32] {
        &self.seq_ids[self.seq_off[i as usize] as usize..self.seq_off[i as usize + 1] as usize]
    }

    /// Checks the arrays' lengths and the sequence ids (each in `[0, n_seq_max)`, at least one
    /// per token).
    pub fn validate(&self, n_seq_max: u32) -> Result<()> {
        let n = self.n_tokens() as usize;
        if self.seq_off.is_empty() || self.seq_off[0] != 0 {
            return Err(err!(
                InvalidArgument,
                "the batch's sequence offsets must start at 0"
            ));
        }
        if self.n_pos != 1 && self.n_pos != 4 {
            return Err(err!(
                InvalidArgument,
                "n_pos is {} (expected 1 or 4)",
                self.n_pos
            ));
        }
        if self.pos.len() != n * self.n_pos as usize
            || self.token.is_some_and(|t| t.len() != n)
            || self.output.is_some_and(|o| o.len() != n)
        {
            return Err(err!(InvalidArgument, "the batch's arrays differ in length"));
        }
        for i in 0..n {
            let (a, b) = (self.seq_off[i], self.seq_off[i + 1]);
            if b <= a || b as usize > self.seq_ids.len() {
                return Err(err!(
                    InvalidArgument,
                    "token {i} has no sequence id or its offsets are out of order"
                ));
            }
        }
        if let Some(&s) = self
            .seq_ids
            .iter()
            .find(|&&s| s < 0 || s as u32 >= n_seq_max)
        {
            return Err(err!(InvalidSeqId, "seq_id {s} outside [0, {n_seq_max})"));
        }
        Ok(())
    }

    /// The ubatch of tokens `idxs` (llama.cpp's `ubatch_add`): `n_seqs` sequence sets of
    /// equal length, `equal` for an equal or sequence split.
    pub fn ubatch(&self, idxs: &[u32], n_seqs: u32, equal: bool, out: &mut UbatchBuf) {
        let n = idxs.len();
        let nt = self.n_tokens() as usize;
        out.n_seq_tokens = (n as u32).checked_div(n_seqs).unwrap_or(0);
        out.n_seqs = n_seqs;
        out.n_pos = self.n_pos;
        out.equal_seqs = equal;
        out.token = self
            .token
            .map(|t| idxs.iter().map(|&i| t[i as usize]).collect());
        out.pos.clear();
        for j in 0..self.n_pos as usize {
            out.pos
                .extend(idxs.iter().map(|&i| self.pos[j * nt + i as usize]));
        }
        out.seq_off.clear();
        out.seq_ids.clear();
        out.seq_off.push(0);
        let mut set: SeqSet = [0; 4];
        for &i in idxs {
            for &s in self.seqs(i) {
                out.seq_ids.push(s);
                set[s as usize / 64] |= 1 << (s % 64);
            }
            out.seq_off.push(out.seq_ids.len() as u32);
        }
        out.seq_id_unq.clear();
        out.seq_id_unq.extend(
            (0..256)
                .filter(|&s| set[s / 64] >> (s % 64) & 1 == 1)
                .map(|s| s as i32),
        );
        out.output = self
            .output
            .map(|o| idxs.iter().map(|&i| o[i as usize]).collect());
        out.embd = None;
    }
}

/// One ubatch of a split: the batch indices of its tokens, sequence set after sequence set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Batch indices.
    pub idxs: Vec<u32>,
    /// Sequence sets (`n_seqs`).
    pub n_seqs: u32,
    /// From an equal or sequence split (`equal_seqs`).
    pub equal: bool,
}

/// llama.cpp's split state over one batch: which tokens are used, and each token's sequence
/// set.
#[derive(Debug)]
pub struct Splitter {
    seq_set: Vec<SeqSet>,
    first_seq: Vec<i32>,
    /// The tokens of each sequence set, ascending.
    seq_set_map: HashMap<SeqSet, Vec<u32>>,
    used: Vec<bool>,
    n_used: u32,
    /// Some token belongs to several sequences (llama.cpp's `has_cpl`).
    has_cpl: bool,
}

fn overlaps(a: &SeqSet, b: &SeqSet) -> bool {
    a.iter().zip(b).any(|(x, y)| x & y != 0)
}

fn is_subset(sub: &SeqSet, of: &SeqSet) -> bool {
    sub.iter().zip(of).all(|(x, y)| x & y == *x)
}

impl Splitter {
    /// The split state of a validated batch ([`Batch::validate`]).
    pub fn new(b: &Batch<'_>) -> Self {
        let n = b.n_tokens();
        let mut seq_set = Vec::with_capacity(n as usize);
        let mut first_seq = Vec::with_capacity(n as usize);
        let mut seq_set_map: HashMap<SeqSet, Vec<u32>> = HashMap::new();
        let mut has_cpl = false;
        for i in 0..n {
            let mut cur: SeqSet = [0; 4];
            let seqs = b.seqs(i);
            for &s in seqs {
                cur[s as usize / 64] |= 1 << (s % 64);
            }
            has_cpl |= seqs.len() > 1;
            first_seq.push(seqs[0]);
            seq_set.push(cur);
            seq_set_map.entry(cur).or_default().push(i);
        }
        Splitter {
            seq_set,
            first_seq,
            seq_set_map,
            used: vec![false; n as usize],
            n_used: 0,
            has_cpl,
        }
    }

    /// Tokens in the batch.
    pub fn n_tokens(&self) -> u32 {
        self.used.len() as u32
    }

    /// Tokens already in a ubatch.
    pub fn n_used(&self) -> u32 {
        self.n_used
    }

    /// Starts over (`split_reset`).
    pub fn reset(&mut self) {
        self.used.iter_mut().for_each(|u| *u = false);
        self.n_used = 0;
    }

    fn take(&mut self, i: u32) {
        self.used[i as usize] = true;
        self.n_used += 1;
    }

    fn give_back(&mut self, i: u32) {
        self.used[i as usize] = false;
        self.n_used -= 1;
    }

    /// `split_simple(n_ubatch)`: the next (up to) `n_ubatch` unused tokens in batch order;
    /// `None` when every token is used.
    pub fn split_simple(&mut self, n_ubatch: u32) -> Option<Split> {
        let mut cur = self.used.iter().position(|u| !u)? as u32;
        let mut idxs = Vec::new();
        loop {
            idxs.push(cur);
            self.take(cur);
            cur += 1;
            if cur >= self.n_tokens() || idxs.len() as u32 >= n_ubatch {
                break;
            }
        }
        let n_seqs = idxs.len() as u32;
        Some(Split {
            idxs,
            n_seqs,
            equal: false,
        })
    }

    /// `split_equal(n_ubatch, sequential, n_keep_tail)`. `None` when nothing is left, or
    /// (as llama.cpp, which logs it) for a sequential split of a batch with tokens in several
    /// sequences. An error where llama.cpp asserts (`n_keep_tail >= n_ubatch`).
    pub fn split_equal(
        &mut self,
        n_ubatch: u32,
        sequential: bool,
        n_keep_tail: u32,
    ) -> Result<Option<Split>> {
        if sequential && self.has_cpl {
            return Ok(None);
        }
        let mut cur_sets: Vec<SeqSet> = Vec::new();
        let mut last_seq = -1;
        for i in 0..self.n_tokens() as usize {
            if self.used[i] {
                continue;
            }
            let mut add = !cur_sets.iter().any(|s| overlaps(s, &self.seq_set[i]));
            if sequential {
                add = add && (cur_sets.is_empty() || self.first_seq[i] == last_seq + 1);
            }
            if add {
                cur_sets.push(self.seq_set[i]);
                last_seq = self.first_seq[i];
                if cur_sets.len() as u32 > n_ubatch {
                    break;
                }
            }
        }
        let mut n_seqs = cur_sets.len() as u32;
        if n_seqs == 0 {
            return Ok(None);
        }
        let lists: Vec<&Vec<u32>> = cur_sets.iter().map(|s| &self.seq_set_map[s]).collect();
        let lists: Vec<Vec<u32>> = lists.into_iter().cloned().collect();
        let mut cur_idx = vec![0usize; n_seqs as usize];
        for (s, l) in lists.iter().enumerate() {
            while self.used[l[cur_idx[s]] as usize] {
                cur_idx[s] += 1;
            }
        }
        let mut per_seq: Vec<Vec<u32>> = vec![Vec::new(); n_seqs as usize];
        loop {
            if (0..n_seqs as usize).any(|s| cur_idx[s] >= lists[s].len()) {
                break;
            }
            for s in 0..n_seqs as usize {
                let idx = lists[s][cur_idx[s]];
                per_seq[s].push(idx);
                self.take(idx);
                cur_idx[s] += 1;
            }
            if (per_seq[0].len() as u64 + 1) * n_seqs as u64 > n_ubatch as u64 {
                break;
            }
        }
        if n_keep_tail > 0 {
            if n_ubatch <= n_keep_tail {
                return Err(err!(
                    InvalidArgument,
                    "n_ubatch {n_ubatch} must exceed n_keep_tail {n_keep_tail} (llama.cpp asserts)"
                ));
            }
            let remaining = |cur_idx: &[usize], s: usize| (lists[s].len() - cur_idx[s]) as u32;
            let mut n_keep = 0;
            while n_keep < n_seqs {
                let r = remaining(&cur_idx, n_keep as usize);
                if r != 0 && r < n_keep_tail {
                    break;
                }
                n_keep += 1;
            }
            if n_keep == 0 {
                if per_seq[0].len() as u32 + remaining(&cur_idx, 0) <= n_ubatch {
                    while remaining(&cur_idx, 0) > 0 {
                        let idx = lists[0][cur_idx[0]];
                        per_seq[0].push(idx);
                        self.take(idx);
                        cur_idx[0] += 1;
                    }
                } else {
                    while remaining(&cur_idx, 0) < n_keep_tail {
                        // llama.cpp pops without looking: an empty list there is its bug too
                        let Some(idx) = per_seq[0].pop() else { break };
                        self.give_back(idx);
                        cur_idx[0] -= 1;
                    }
                }
                n_keep = 1;
            }
            for list in &per_seq[n_keep as usize..] {
                for &idx in list {
                    self.used[idx as usize] = false;
                    self.n_used -= 1;
                }
            }
            n_seqs = n_keep;
        }
        let idxs: Vec<u32> = per_seq[..n_seqs as usize].concat();
        Ok(Some(Split {
            idxs,
            n_seqs,
            equal: true,
        }))
    }

    /// `split_seq(n_ubatch)`: the first unused token's sequence set and, in batch order, the
    /// unused tokens whose set is a subset of the previous token's, up to `n_ubatch`.
    pub fn split_seq(&mut self, n_ubatch: u32) -> Option<Split> {
        let n = self.n_tokens();
        let mut cur = self.used.iter().position(|u| !u)? as u32;
        let mut cur_set = self.seq_set[cur as usize];
        let mut idxs = Vec::new();
        loop {
            idxs.push(cur);
            self.take(cur);
            if idxs.len() as u32 >= n_ubatch {
                break;
            }
            loop {
                cur += 1;
                // the next unused token whose set is within the current one
                if cur >= n
                    || (!self.used[cur as usize]
                        && is_subset(&self.seq_set[cur as usize], &cur_set))
                {
                    break;
                }
            }
            if cur == n {
                break;
            }
            cur_set = self.seq_set[cur as usize];
        }
        Some(Split {
            idxs,
            n_seqs: 1,
            equal: true,
        })
    }
}

/// How llama.cpp splits a batch for one kind of memory (`init_batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitRule {
    /// `llama_kv_cache`: simple with one stream, else sequential equal.
    Kv {
        /// One stream for every sequence.
        unified: bool,
    },
    /// `llama_kv_cache_iswa`: simple first when unified, then (or on failure) equal
    /// (sequential unless unified).
    Iswa {
        /// One stream for every sequence.
        unified: bool,
    },
    /// The recurrent memory and the hybrids: by sequence when every token is an output,
    /// else equal (sequential for the recurrent memory, unless a unified attention cache for
    /// a hybrid), keeping the last `n_rs_seq + 1` tokens of each sequence together.
    Recurrent {
        /// Sequential equal split (false: a hybrid whose attention cache is unified).
        sequential: bool,
        /// Rollback planes per sequence.
        n_rs_seq: u32,
    },
}

/// Which splits a rule tries, in order: `Simple`, `Equal(sequential, keep_tail)`, `Seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKind {
    /// `split_simple`.
    Simple,
    /// `split_equal(n_ubatch, sequential, n_keep_tail)`.
    Equal(bool, u32),
    /// `split_seq`.
    Seq,
}

impl SplitRule {
    /// The splits tried, in order (`embd_all`: every token is an output).
    pub fn attempts(self, embd_all: bool) -> Vec<SplitKind> {
        match self {
            SplitRule::Kv { unified: true } => vec![SplitKind::Simple],
            SplitRule::Kv { unified: false } => vec![SplitKind::Equal(true, 0)],
            SplitRule::Iswa { unified: true } => {
                vec![SplitKind::Simple, SplitKind::Equal(false, 0)]
            }
            SplitRule::Iswa { unified: false } => vec![SplitKind::Equal(true, 0)],
            SplitRule::Recurrent { .. } if embd_all => vec![SplitKind::Seq],
            SplitRule::Recurrent {
                sequential,
                n_rs_seq,
            } => vec![SplitKind::Equal(
                sequential,
                if n_rs_seq > 0 { n_rs_seq + 1 } else { 0 },
            )],
        }
    }
}

/// Splits the whole batch with `kind` (from the start). `None` when the split leaves tokens
/// out (llama.cpp's "failed to find a suitable split").
pub fn split_all(sp: &mut Splitter, kind: SplitKind, n_ubatch: u32) -> Result<Option<Vec<Split>>> {
    if n_ubatch == 0 {
        return Err(err!(InvalidArgument, "n_ubatch must be > 0"));
    }
    sp.reset();
    let mut out = Vec::new();
    loop {
        let s = match kind {
            SplitKind::Simple => sp.split_simple(n_ubatch),
            SplitKind::Equal(seq, tail) => sp.split_equal(n_ubatch, seq, tail)?,
            SplitKind::Seq => sp.split_seq(n_ubatch),
        };
        match s {
            Some(s) if !s.idxs.is_empty() => out.push(s),
            _ => break,
        }
    }
    Ok((sp.n_used() == sp.n_tokens()).then_some(out))
}

/// A memory's `init_batch` over a whole batch, as llama.cpp's: the splits of the memory's
/// [`SplitRule`] in order, each planned on the memory until one fits. Returns the context and
/// the splits it holds (each ubatch's batch indices); a context with status `FailedPrepare`
/// when no split leaves no token out and fits.
pub fn init_batch_whole(
    mem: &mut dyn crate::memory::Memory,
    b: &Batch<'_>,
    n_ubatch: u32,
    embd_all: bool,
) -> Result<(Box<dyn crate::memory::MemoryContext>, Vec<Split>)> {
    b.validate(mem.n_seq_max())?;
    if b.n_tokens() == 0 {
        return Err(err!(InvalidArgument, "the batch has no tokens"));
    }
    let mut sp = Splitter::new(b);
    let mut last = None;
    for kind in mem.split_rule().attempts(embd_all) {
        let Some(splits) = split_all(&mut sp, kind, n_ubatch)? else {
            continue;
        };
        let bufs: Vec<UbatchBuf> = splits
            .iter()
            .map(|s| {
                let mut u = UbatchBuf::default();
                b.ubatch(&s.idxs, s.n_seqs, s.equal, &mut u);
                u
            })
            .collect();
        let views: Vec<_> = bufs.iter().map(UbatchBuf::view).collect();
        let ctx = mem.init_batch(&views, None)?;
        if ctx.status() == crate::memory::Status::Success {
            return Ok((ctx, splits));
        }
        last = Some(ctx);
    }
    let ctx = last.unwrap_or_else(|| {
        crate::composite::CompositeContext::boxed_failed(crate::memory::Status::FailedPrepare)
    });
    Ok((ctx, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch<'a>(pos: &'a [i32], off: &'a [u32], ids: &'a [i32]) -> Batch<'a> {
        Batch {
            token: None,
            pos,
            n_pos: 1,
            seq_off: off,
            seq_ids: ids,
            output: None,
        }
    }

    #[test]
    fn equal_split_takes_the_same_count_from_each_sequence() {
        // seq 0: tokens 0, 2, 4; seq 1: tokens 1, 3
        let pos = [0, 0, 1, 1, 2];
        let off = [0, 1, 2, 3, 4, 5];
        let ids = [0, 1, 0, 1, 0];
        let b = batch(&pos, &off, &ids);
        b.validate(2).unwrap();
        let mut sp = Splitter::new(&b);
        let all = split_all(&mut sp, SplitKind::Equal(false, 0), 4)
            .unwrap()
            .unwrap();
        assert_eq!(all[0].idxs, vec![0, 2, 1, 3]);
        assert_eq!(all[0].n_seqs, 2);
        assert_eq!(all[1].idxs, vec![4]);
    }
}
