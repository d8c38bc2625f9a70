//! Where a ubatch goes in the cache: the slot info (`llama_kv_cache::slot_info`), the slot
//! search (`find_slot`), placement (`apply_ubatch`), the simulated placement of a whole batch
//! with rollback (`prepare`) and the attention extent (`get_n_kv`).

use super::{is_masked_swa, KvCache, SwaType};
use crate::cells::{CellExt, Cells, Snapshot, MAX_SEQ, TOKEN_NULL};
use crate::error::{err, Result};
use crate::memory::LogLevel;
use crate::ubatch::Ubatch;

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

impl KvCache {
    /// Checks that a ubatch can be placed in this cache (ids, stream layout, size).
    pub fn validate_ubatch(&self, ub: &Ubatch<'_>) -> Result<()> {
        ub.validate(self.p.n_seq_max)?;
        // M-RoPE ubatches (4 sections) go into any cache, as llama.cpp's: a cache whose own
        // positions have one section (hybrid-idx's indexer cache of an M-RoPE model) keeps
        // their 2-D positions in its cells and masks with them, and its state has no cell ext
        // unless its own settings keep one
        if ub.n_pos != 1 && ub.n_pos != 4 {
            return Err(err!(
                InvalidUbatch,
                "ubatch has {} position sections (expected 1 or 4)",
                ub.n_pos
            ));
        }
        if self.n_stream > 1 {
            let n_seqs = ub.seq_id_unq.len() as u32;
            if ub.n_tokens % n_seqs != 0 {
                return Err(err!(
                    InvalidUbatch,
                    "{} tokens cannot be split evenly over {n_seqs} streams",
                    ub.n_tokens
                ));
            }
            let per = ub.n_tokens / n_seqs;
            for (k, &seq) in ub.seq_id_unq.iter().enumerate() {
                for i in k as u32 * per..(k as u32 + 1) * per {
                    if ub.seqs(i) != [seq] {
                        return Err(err!(
                            InvalidUbatch,
                            "token {i} must belong to sequence {seq} only: one stream per sequence \
                             takes tokens grouped by sequence, each in exactly one sequence"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds cells for a validated ubatch without changing anything (`find_slot`); `cont`
    /// requires each stream's cells to be contiguous. `None` when it does not fit.
    pub fn find_slot(&self, ub: &Ubatch<'_>, cont: bool) -> Option<SlotInfo> {
        let mut res = SlotInfo::with_streams(0, 0);
        self.find_slot_into(ub, cont, &mut res).then_some(res)
    }

    /// [`KvCache::find_slot`] into `res`, reusing its buffers; false when it does not fit.
    pub fn find_slot_into(&self, ub: &Ubatch<'_>, cont: bool, res: &mut SlotInfo) -> bool {
        if self.debug > 0 && self.log.is_on() {
            self.log_find_slot(ub);
        }
        let (n_seqs, n_tokens) = if self.n_stream > 1 {
            let n = ub.seq_id_unq.len() as u32;
            (n, ub.n_tokens / n)
        } else {
            (1, ub.n_tokens)
        };
        res.reset(n_seqs as usize, n_tokens as usize);
        for s in 0..n_seqs as usize {
            let strm = self.stream_of(ub.seq_id_unq[s]);
            res.s0 = res.s0.min(strm);
            res.s1 = res.s1.max(strm);
            res.strm[s] = strm;
            let cells = &self.cells[strm as usize];
            if n_tokens > cells.size() {
                return false;
            }
            let mut head = self.heads[strm as usize];
            // Plenty of free cells before the head: start over to fill the cache from the front.
            if head > cells.get_used() + 2 * n_tokens {
                head = 0;
            }
            let out = &mut res.idxs[s];
            let found = if cont {
                self.search_contiguous(cells, head, n_tokens, out)
            } else {
                self.search_scattered(cells, head, n_tokens, out)
            };
            if !found {
                return false;
            }
        }
        true
    }

    /// llama.cpp's debug lines at the start of a slot search (`LLAMA_KV_CACHE_DEBUG`): per
    /// sequence of the ubatch, its stream's extent, use, head and window; with level 2 and a
    /// window, or level 3, maps of the cells' sequences and positions; each sequence's range.
    fn log_find_slot(&self, ub: &Ubatch<'_>) {
        let log = |line: String| self.log.emit(LogLevel::Debug, || line);
        for &seq in ub.seq_id_unq {
            let strm = self.stream_of(seq);
            let cells = &self.cells[strm as usize];
            log(format!(
                "find_slot: stream[{strm}], n = {:5}, used = {:5}, head = {:5}, size = {:5}, n_swa = {:5}\n",
                cells.used_max_p1(),
                cells.get_used(),
                self.heads[strm as usize],
                self.size(),
                self.p.n_swa
            ));
            if (self.debug == 2 && self.p.n_swa > 0) || self.debug > 2 {
                let mut ss = String::new();
                for i in 0..cells.size() {
                    if cells.is_empty(i) {
                        ss.push('.');
                    } else if cells.seq_count(i) == 1 {
                        ss.push_str(&cells.seq_get(i).to_string());
                    } else {
                        ss.push('M');
                    }
                    if i % 256 == 255 {
                        ss.push_str(" *\n");
                    }
                }
                log(format!("\n{ss}\n"));
                let mut ss = String::new();
                for i in 0..cells.size() {
                    let cur = if cells.is_empty(i) {
                        ".".to_string()
                    } else {
                        cells.pos_get(i).to_string()
                    };
                    ss.push_str(&format!("{cur:<5}"));
                    if i % 256 == 255 {
                        ss.push_str(" *");
                    }
                    if i % 64 == 63 {
                        ss.push('\n');
                    }
                }
                log(format!("\n{ss}\n"));
            }
            for s in 0..MAX_SEQ as i32 {
                let (lo, hi) = (cells.seq_pos_min(s), cells.seq_pos_max(s));
                if lo >= 0 {
                    log(format!(
                        "find_slot: stream[{strm}] min[{s}] = {lo:5}, max[{s}] = {hi:5}\n"
                    ));
                }
            }
        }
    }

    /// Can the slot search take cell `i`? Empty cells, and cells of a single sequence that the
    /// sliding window already hides from that sequence's next token.
    #[inline]
    pub(super) fn can_use(&self, cells: &Cells, i: u32) -> bool {
        if cells.is_empty(i) {
            return true;
        }
        if self.p.swa_type == SwaType::None || cells.seq_count(i) != 1 {
            return false;
        }
        let sc = cells.seq_get(i);
        is_masked_swa(
            self.p.n_swa,
            self.p.swa_type,
            cells.pos_get(i),
            cells.seq_pos_max(sc).wrapping_add(1),
        )
    }

    /// First `n` usable cells in circular order from `head`, testing each cell once.
    fn search_scattered(&self, cells: &Cells, head: u32, n: u32, out: &mut Vec<u32>) -> bool {
        let size = cells.size() as usize;
        let n = n as usize;
        if self.p.swa_type == SwaType::None {
            // Only empty cells qualify: walk the zero bits of the used bitmap a word at a time.
            let used = cells.used_bits();
            let head = head as usize;
            for (base, part) in [(head, &used[head..]), (0, &used[..head])] {
                for i in part.iter_zeros() {
                    out.push((base + i) as u32);
                    if out.len() == n {
                        return true;
                    }
                }
            }
            return false;
        }
        let mut idx = head as usize;
        for _ in 0..size {
            if idx == size {
                idx = 0;
            }
            if self.can_use(cells, idx as u32) {
                out.push(idx as u32);
                if out.len() == n {
                    return true;
                }
            }
            idx += 1;
        }
        false
    }

    /// The contiguous search, step for step as upstream (its wrap and give-up rules included).
    fn search_contiguous(&self, cells: &Cells, mut head: u32, n: u32, out: &mut Vec<u32>) -> bool {
        let size = cells.size();
        let mut n_tested: u64 = 0;
        loop {
            if head + n > size {
                n_tested += (size - head) as u64;
                head = 0;
                continue;
            }
            for _ in 0..n {
                let idx = head;
                head += 1;
                n_tested += 1;
                if self.can_use(cells, idx) {
                    out.push(idx);
                } else {
                    break;
                }
            }
            if out.len() == n as usize {
                return true;
            }
            out.clear();
            if n_tested >= size as u64 {
                return false;
            }
        }
    }

    /// Writes a validated ubatch into the cells of `slot` (`apply_ubatch`). Cells reused under
    /// the sliding window are purged together with every older position of their sequence, so
    /// that each sequence's positions stay contiguous.
    pub fn apply_ubatch(&mut self, slot: &SlotInfo, ub: &Ubatch<'_>) {
        self.apply_ubatch_logged(slot, ub, true);
    }

    /// The purges [`KvCache::apply_ubatch`] of `slot` would make now, as `(seq, from, to)`
    /// (positions `from..=to` of `seq`), without changing anything: each sequence that loses a
    /// cell of the slot loses its positions up to the lost one.
    pub(crate) fn purges(&self, slot: &SlotInfo) -> Vec<(i32, i32, i32)> {
        let mut max_rm = [-1i32; MAX_SEQ];
        let mut out = Vec::new();
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let cells = &self.cells[slot.strm[k] as usize];
            for &idx in idxs {
                if !cells.is_empty(idx) && cells.seq_get(idx) >= 0 {
                    let sc = cells.seq_get(idx) as usize;
                    max_rm[sc] = max_rm[sc].max(cells.pos_get(idx));
                }
            }
        }
        for (s, &rm) in max_rm.iter().enumerate() {
            if rm == -1 {
                continue;
            }
            // the sequence's smallest position once the slot's cells are overwritten
            let strm = self.stream_of(s as i32);
            let in_slot = |c: u32| {
                slot.idxs
                    .iter()
                    .zip(&slot.strm)
                    .any(|(idxs, &st)| st == strm && idxs.contains(&c))
            };
            let cells = &self.cells[strm as usize];
            let pmin = cells
                .seq_pos_iter(s as i32)
                .filter(|&(_, c)| !in_slot(c))
                .map(|(p, _)| p)
                .min()
                .unwrap_or(-1);
            if pmin <= rm {
                out.push((s as i32, pmin, rm));
            }
        }
        out
    }

    /// llama.cpp's line for a purge of positions `from..=to` of `seq` (`apply_ubatch`).
    pub(crate) fn log_purge(&self, seq: i32, from: i32, to: i32) {
        self.log.emit(LogLevel::Debug, || {
            format!(
                "apply_ubatch: purging positions [{from}, {to}] of sequence {seq} from KV cache\n"
            )
        });
    }

    /// [`KvCache::apply_ubatch`], logging its purges or not (a restore logs them when it
    /// places its cells, as llama.cpp, and applies them later).
    pub(crate) fn apply_ubatch_logged(&mut self, slot: &SlotInfo, ub: &Ubatch<'_>, log: bool) {
        self.generation += 1;
        let mut max_rm = [-1i32; MAX_SEQ];
        let per = slot.size();
        let write_ext = ub.is_pos_2d() || ub.token.is_some() || self.p.ngram_tokens;
        let nt = ub.n_tokens as usize;
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let cells = &mut self.cells[slot.strm[k] as usize];
            for (ii, &idx) in idxs.iter().enumerate() {
                let i = k * per + ii;
                if !cells.is_empty(idx) {
                    let sc = cells.seq_get(idx);
                    if sc >= 0 {
                        max_rm[sc as usize] = max_rm[sc as usize].max(cells.pos_get(idx));
                    }
                    cells.rm(idx);
                }
                cells.pos_set(idx, ub.pos[i]);
                if write_ext {
                    let mut ext = CellExt::default();
                    if ub.is_pos_2d() {
                        ext.x = ub.pos[i + nt * 2];
                        ext.y = ub.pos[i + nt];
                    }
                    if !ub.is_embd(i as u32) {
                        ext.tok = ub.token.map_or(TOKEN_NULL, |t| t[i]);
                    } else if self.p.ngram_tokens {
                        // an embedding row (multimodal input) has no id: n-gram inputs read
                        // the model's stand-in
                        ext.tok = self.p.embd_token;
                    }
                    cells.ext_set(idx, ext);
                }
                for &s in ub.seqs(i as u32) {
                    if !cells.seq_has(idx, s) {
                        cells.seq_add(idx, s);
                    }
                }
            }
        }
        for (s, &rm) in max_rm.iter().enumerate() {
            if rm == -1 {
                continue;
            }
            let cells = &self.cells[self.stream_of(s as i32) as usize];
            let pmin = cells.seq_pos_min(s as i32);
            if pmin <= rm {
                if log {
                    self.log_purge(s as i32, pmin, rm);
                }
                self.seq_rm(s as i32, pmin, rm.wrapping_add(1))
                    .expect("sequence ids of placed cells are valid");
            }
        }
        for (k, idxs) in slot.idxs.iter().enumerate() {
            self.heads[slot.strm[k] as usize] = idxs[idxs.len() - 1] + 1;
        }
    }

    /// Places `ub` into the cells of a caller-given `slot` (`apply_ubatch(sinfo, ubatch)` for a
    /// slot info the caller found or built itself), after checking both; on error nothing
    /// changes.
    ///
    /// As upstream, the cells need not be free: a cell held by one sequence is overwritten and
    /// that sequence loses every position up to the overwritten one. Refused: a slot outside
    /// the cache or not matching the ubatch's token count ([`KvCache::check_slot_info`]), a
    /// token group placed in a stream that does not hold its sequences, a cell listed twice,
    /// and a cell shared by several sequences (upstream asserts on the last two).
    pub fn apply_slot(&mut self, slot: &SlotInfo, ub: &Ubatch<'_>) -> Result<()> {
        self.validate_ubatch(ub)?;
        self.check_apply(slot, ub)?;
        self.apply_ubatch(slot, ub);
        Ok(())
    }

    fn check_apply(&mut self, slot: &SlotInfo, ub: &Ubatch<'_>) -> Result<()> {
        self.check_slot_info(slot)?;
        let per = slot.size();
        if slot.n_tokens() != ub.n_tokens as usize {
            return Err(err!(
                InvalidArgument,
                "slot holds {} tokens, the ubatch {}",
                slot.n_tokens(),
                ub.n_tokens
            ));
        }
        for i in 0..ub.n_tokens {
            let strm = slot.strm[i as usize / per];
            if let Some(&s) = ub.seqs(i).iter().find(|&&s| self.stream_of(s) != strm) {
                return Err(err!(
                    InvalidArgument,
                    "token {i} of sequence {s} placed in stream {strm}, which does not hold it"
                ));
            }
        }
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        for (k, idxs) in slot.idxs.iter().enumerate() {
            let strm = slot.strm[k];
            let cells = &self.cells[strm as usize];
            for &i in idxs {
                if cells.seq_count(i) > 1 {
                    self.keys = keys;
                    return Err(err!(
                        InvalidArgument,
                        "slot cell {i} of stream {strm} is shared by {} sequences",
                        cells.seq_count(i)
                    ));
                }
                keys.push((strm as u64) << 32 | i as u64);
            }
        }
        keys.sort_unstable();
        let dup = keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
        self.keys = keys;
        if let Some(key) = dup {
            return Err(err!(
                InvalidArgument,
                "slot lists cell {} of stream {} twice",
                key as u32,
                key >> 32
            ));
        }
        Ok(())
    }

    /// Finds slots for a sequence of validated ubatches, each placed as if the previous ones
    /// were, then rolls the cells back (`prepare`). `None` if one does not fit.
    ///
    /// As upstream, only the slot cells and heads are rolled back: cells purged by the sliding
    /// window while simulating stay purged.
    pub fn prepare(&mut self, ubatches: &[Ubatch<'_>]) -> Option<Vec<SlotInfo>> {
        let mut slots = Vec::with_capacity(ubatches.len());
        self.prepare_into(ubatches, &mut slots).then_some(slots)
    }

    /// [`KvCache::prepare`] into `slots` (one per ubatch; the buffers of the slots already
    /// there are reused, as are the cache's own rollback buffers); false if a ubatch does not
    /// fit, with `slots` empty.
    pub fn prepare_into(&mut self, ubatches: &[Ubatch<'_>], slots: &mut Vec<SlotInfo>) -> bool {
        slots.truncate(ubatches.len());
        slots.resize_with(ubatches.len(), || SlotInfo::with_streams(0, 0));
        let ns = self.n_stream as usize;
        let generation = self.generation;
        let mut prep = std::mem::take(&mut self.prep);
        prep.heads.clear();
        let mut n_snap = 0;
        let mut n_ok = 0;
        for (ub, slot) in ubatches.iter().zip(slots.iter_mut()) {
            if !self.find_slot_into(ub, false, slot) {
                break;
            }
            prep.heads.extend_from_slice(&self.heads);
            for (idxs, &s) in slot.idxs.iter().zip(&slot.strm) {
                if n_snap == prep.snaps.len() {
                    prep.snaps.push(Snapshot::default());
                }
                self.cells[s as usize].cp_into(idxs, &mut prep.snaps[n_snap]);
                n_snap += 1;
            }
            self.apply_ubatch(slot, ub);
            n_ok += 1;
        }
        for (u, slot) in slots[..n_ok].iter().enumerate().rev() {
            n_snap -= slot.idxs.len();
            let heads = &prep.heads[u * ns..(u + 1) * ns];
            for (k, idxs) in slot.idxs.iter().enumerate() {
                let s = slot.strm[k] as usize;
                self.cells[s].set(idxs, &prep.snaps[n_snap + k]);
                // Upstream indexes the saved heads by the slot's k-th stream, not by stream id
                // (`head = v_heads_old[s]` in `prepare`); the search hint must match it to pick
                // the same cells afterwards.
                self.heads[s] = heads[k];
            }
        }
        self.prep = prep;
        self.generation = generation;
        let ok = n_ok == ubatches.len();
        if !ok {
            slots.clear();
        }
        ok
    }

    /// Number of cells the attention looks at for `slot` (`get_n_kv`): the used range of the
    /// slot's streams, padded to `max(n_pad, 256)` and capped at the size.
    pub fn get_n_kv(&self, slot: &SlotInfo) -> u32 {
        let pad = self.p.n_pad.max(256);
        slot.strm
            .iter()
            .map(|&s| {
                let c = &self.cells[s as usize];
                let padded = (c.used_max_p1() as u64).div_ceil(pad as u64) * pad as u64;
                (c.size() as u64).min((pad as u64).max(padded)) as u32
            })
            .max()
            .unwrap_or(0)
    }
}
