//! Differential suite: random traces replayed on the pinned llama.cpp's own `llama_kv_cache`
//! (through the `llama-memory-reference` shim) and on this library, compared after every step:
//! chosen slots, every cell (position, pending shift, sequences, ext), heads, used ranges,
//! per-sequence min/max, `n_kv`, KQ masks (f32 and f16), K/V row indices, K-shift vectors and
//! position buckets, pending stream copies (as `(source, destination)` lists), and the bytes of
//! sequence and whole-cache states, saved and restored (into the same or another sequence,
//! with and without `PARTIAL_ONLY`) on both sides.
//!
//! Coverage counters (per op kind) go into the summary, and each must be non-zero: a generator
//! change that stops producing a case fails the suite.
//!
//! `SEED=<u64>` varies the traces (CI uses the fixed default); `DIFF_OPS=<n>` scales the
//! number of operations per configuration, `DIFF_CONFIG=<substring>` runs only the matching
//! configurations (the coverage check then does not apply), `DIFF_DUMP=1` prints the state
//! bytes or the cells involved when states or slots diverge.

use std::collections::BTreeMap;

use ggml_sys as g;
use half::f16;
use llama_memory::io::{IoRead, IoWrite, Sink, StateOut};
use llama_memory::storage::graph::RopeParams;
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{
    state, KvCache, KvMemory, KvParams, MaskOut, Memory, NonCausalType, SlotInfo, SwaType, Ubatch,
    UbatchBuf,
};
use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::Rng;

#[path = "common/diff.rs"]
mod diff;
#[path = "common/trace.rs"]
mod trace;

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`.
const PARTIAL_ONLY: u32 = 1;

/// Our side of stock `llama_kv_cache::state_write(io, seq, flags)` (`seq == -1`: everything),
/// through the crate's public state functions, as the same bytes (the sequence blob without
/// its 8-byte header). With [`our_state_read`], the only place this suite calls state code.
/// Every save is also written through a caller's writer (what the drop-in's adapters use),
/// which must give the same bytes.
fn our_state_write(mem: &KvMemory, seq: i32, flags: u32) -> Vec<u8> {
    let blob = if seq == -1 {
        let mut buf = vec![0u8; state::get_size(mem).unwrap()];
        let n = state::get_data(mem, &mut buf).unwrap();
        assert_eq!(n, buf.len(), "state size changed between the two calls");
        buf
    } else {
        let mut buf = vec![0u8; state::seq_get_size(mem, seq, flags).unwrap()];
        let n = state::seq_get_data(mem, &mut buf, seq, flags, &mut state::Stash::new()).unwrap();
        assert_eq!(n, buf.len(), "state size changed between the two calls");
        buf.split_off(8)
    };
    let mut w = CopyWriter(Vec::new());
    let mut sink = Sink::Io { io: &mut w, pos: 0 };
    Memory::state_write(
        mem,
        seq,
        flags,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    assert!(
        w.0 == blob,
        "the writer path wrote other bytes than the blob"
    );
    blob
}

/// A caller's writer that copies tensor ranges at once.
#[derive(Debug)]
struct CopyWriter(Vec<u8>);

impl IoWrite for CopyWriter {
    fn write(&mut self, b: &[u8]) -> llama_memory::Result<()> {
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn write_tensor(
        &mut self,
        t: *mut g::ggml_tensor,
        offset: usize,
        n: usize,
    ) -> llama_memory::Result<()> {
        let at = self.0.len();
        self.0.resize(at + n, 0);
        // SAFETY: a live tensor of the memory; the range was checked against it by the caller
        // and again here.
        assert!(offset + n <= unsafe { g::ggml_nbytes(t) });
        // SAFETY: as above; the destination is the n bytes just appended to `self.0`.
        unsafe { g::ggml_backend_tensor_get(t, self.0[at..].as_mut_ptr().cast(), offset, n) };
        Ok(())
    }
}

/// A caller's reader that applies its tensor ranges once the read succeeded, as llama.cpp's.
struct DeferredReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    pending: Vec<(*mut g::ggml_tensor, usize, usize, usize)>,
}

impl DeferredReader<'_> {
    fn take(&mut self, n: usize) -> llama_memory::Result<usize> {
        if n > self.bytes.len() - self.pos {
            return Err(llama_memory::Error::new(
                llama_memory::ErrorKind::InvalidState,
                "the reader's input ended",
            ));
        }
        self.pos += n;
        Ok(self.pos - n)
    }
}

impl IoRead for DeferredReader<'_> {
    fn read(&mut self, dst: &mut [u8]) -> llama_memory::Result<()> {
        let at = self.take(dst.len())?;
        dst.copy_from_slice(&self.bytes[at..at + dst.len()]);
        Ok(())
    }
    fn read_tensor(
        &mut self,
        t: *mut g::ggml_tensor,
        offset: usize,
        n: usize,
    ) -> llama_memory::Result<()> {
        // SAFETY: a live tensor of the memory.
        assert!(offset + n <= unsafe { g::ggml_nbytes(t) });
        let at = self.take(n)?;
        self.pending.push((t, offset, at, n));
        Ok(())
    }
}

/// Restores alternate between the blob path and a caller's reader.
static READ_THROUGH_IO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Our side of stock `llama_kv_cache::state_read(io, dest, flags)`: bytes consumed. Every
/// other restore goes through a caller's reader (what the drop-in's adapters use).
fn our_state_read(
    mem: &mut KvMemory,
    dest: i32,
    flags: u32,
    raw: &[u8],
) -> llama_memory::Result<usize> {
    if READ_THROUGH_IO.fetch_xor(true, std::sync::atomic::Ordering::Relaxed) {
        let mut r = DeferredReader {
            bytes: raw,
            pos: 0,
            pending: Vec::new(),
        };
        Memory::state_read_io(mem, dest, flags, &mut r)?;
        for &(t, off, at, n) in &r.pending {
            // SAFETY: a live tensor of the memory, range checked in read_tensor.
            unsafe { g::ggml_backend_tensor_set(t, raw[at..].as_ptr().cast(), off, n) };
        }
        return Ok(r.pos);
    }
    if dest == -1 {
        return state::set_data(mem, raw);
    }
    let mut blob = Vec::with_capacity(8 + raw.len());
    blob.extend_from_slice(&state::SEQ_BLOB_MAGIC.to_ne_bytes());
    blob.extend_from_slice(&dest.to_ne_bytes());
    blob.extend_from_slice(raw);
    state::seq_set_data(mem, &blob, dest, flags, &state::Stash::new()).map(|n| n - 8)
}

/// The tensor data sections of a KV state: `(offset, length, ggml type)` of each; `None` if
/// it does not parse as a KV state of this layout.
fn data_sections(state: &[u8], has_ext: bool) -> Option<Vec<(usize, usize, u32)>> {
    let rd = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            state.get(off..off + 4)?.try_into().ok()?,
        ))
    };
    let rd64 = |off: usize| -> Option<usize> {
        Some(u64::from_ne_bytes(state.get(off..off + 8)?.try_into().ok()?) as usize)
    };
    let mut out = Vec::new();
    let n_stream = rd(0)?;
    let mut off = 4;
    for _ in 0..n_stream {
        let cc = rd(off)? as usize;
        off += 4;
        if cc == 0 {
            continue;
        }
        for _ in 0..cc {
            let n_seq = rd(off + 4)? as usize;
            off += 8 + if has_ext { 12 } else { 0 } + 4 * n_seq;
        }
        let v_trans = rd(off)? != 0;
        let n_layer = rd(off + 4)?;
        off += 16; // v_trans, n_layer, n_rot_k, n_rot_v
        for _ in 0..n_layer {
            let (ty, len) = (rd(off)?, cc * rd64(off + 4)?);
            out.push((off + 12, len, ty));
            off += 12 + len;
        }
        for _ in 0..n_layer {
            let ty = rd(off)?;
            let len = if v_trans {
                rd(off + 4)? as usize * rd(off + 8)? as usize * cc
            } else {
                rd64(off + 4)? * cc
            };
            out.push((off + 12, len, ty));
            off += 12 + len;
        }
    }
    (off == state.len()).then_some(out)
}

/// Coverage counters; every one must end above 0.
const COUNTERS: &[&str] = &[
    "state: save seq",
    "state: save seq PARTIAL_ONLY",
    "state: save seq, SWA-hidden cells left out",
    "state: save with M-RoPE ext",
    "state: save all",
    "state: restore seq into same seq",
    "state: restore seq into other seq",
    "state: restore seq into other stream",
    "state: restore seq PARTIAL_ONLY",
    "state: restore all",
    "state: restore failed on both sides",
    "state: state_clear(seq)",
    "state: state_clear(seq) zeroing cells it held alone",
    "state: state_clear(-1)",
    "state: restore with random tensor data",
    "state: save with non-zero tensor data",
    "update: K-shift graph run on both sides",
    "ubatch: > 3 sequences",
    "ubatch: > 8 sequences",
    "token: shared by >= 2 sequences",
    "token: shared by >= 4 sequences",
    "mask: n_kv < size (unified)",
    "mask: n_kv < size (streams)",
    "copies: non-empty pending list compared",
    "copies: >= 2 pending copies compared",
    "pos: near i32::MAX placed, standard SWA",
    "pos: near i32::MAX placed, chunked SWA",
    "pos: near i32::MAX placed, symmetric SWA",
    "pos: i32::MAX placed",
    "pos: near i32::MAX masks compared",
    "state: restore reporting its cells",
    "state: restore into a given layout",
    "state: restore into a given layout refused",
    "state: given layout over another sequence's cell refused",
    "ngram: prev tokens compared",
    "ngram: embedding ubatch",
    "ngram: a predecessor found",
];

/// Positions at least this high count as "near i32::MAX".
const NEAR_MAX: i32 = i32::MAX - 4096;

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    size: u32,
    n_seq_max: u32,
    unified: bool,
    swa_type: SwaType,
    n_swa: u32,
    alibi: bool,
    mrope: bool,
    v_trans: bool,
    non_causal: NonCausalType,
    ops: u64,
    /// Most sequences in a unified ubatch.
    ub_seqs: u32,
    /// Most sequences of one token (unified caches only: stock's equal split for streams
    /// refuses coupled sequences).
    token_seqs: u32,
    /// Probability that a token of a unified ubatch belongs to more than one sequence.
    p_shared: f64,
    /// Sequences often start near `i32::MAX`, and range bounds go there.
    near_max: bool,
    /// Token counts are scaled down by this (sparse large caches).
    few_tokens: bool,
    /// Cells keep token ids for n-gram inputs (stock: `ple_n_heads > 0`, QWEN4EXP), with
    /// this image token id (0: the EOS id stands in for embedding rows); `get_prev_tokens`
    /// is compared after every placement, and some ubatches are embeddings.
    ngram: Option<u32>,
}

const BASE: Config = Config {
    name: "",
    size: 256,
    n_seq_max: 4,
    unified: true,
    swa_type: SwaType::None,
    n_swa: 0,
    alibi: false,
    mrope: false,
    v_trans: true,
    non_causal: NonCausalType::All,
    ops: 12_000,
    ub_seqs: 3,
    token_seqs: 2,
    p_shared: 0.05,
    near_max: false,
    few_tokens: false,
    ngram: None,
};

/// The EOS id of the n-gram configurations (stock's `ple_eos_token_id`).
const NGRAM_EOS: u32 = 7;

const CONFIGS: &[Config] = &[
    Config {
        name: "unified",
        ..BASE
    },
    Config {
        name: "unified-1024-fa",
        size: 1024,
        n_seq_max: 8,
        v_trans: false,
        ..BASE
    },
    Config {
        name: "unified-swa-standard",
        swa_type: SwaType::Standard,
        n_swa: 32,
        n_seq_max: 3,
        ..BASE
    },
    Config {
        name: "unified-swa-chunked-swafull",
        swa_type: SwaType::Chunked,
        n_swa: 16,
        non_causal: NonCausalType::SwaFull,
        ..BASE
    },
    Config {
        name: "unified-swa-symmetric-alibi",
        swa_type: SwaType::Symmetric,
        n_swa: 24,
        alibi: true,
        ..BASE
    },
    Config {
        name: "unified-mrope",
        mrope: true,
        ..BASE
    },
    Config {
        name: "unified-ngram",
        ngram: Some(0),
        ..BASE
    },
    Config {
        name: "streams-ngram-mrope",
        unified: false,
        mrope: true,
        ngram: Some(29),
        ..BASE
    },
    Config {
        name: "streams",
        unified: false,
        ..BASE
    },
    Config {
        name: "streams-swa",
        unified: false,
        swa_type: SwaType::Standard,
        n_swa: 20,
        n_seq_max: 3,
        ..BASE
    },
    Config {
        name: "streams-swa-chunked",
        unified: false,
        swa_type: SwaType::Chunked,
        n_swa: 64,
        non_causal: NonCausalType::SwaOnly,
        ..BASE
    },
    // Many sequences in one ubatch, tokens of up to 8 sequences.
    Config {
        name: "unified-64seq",
        size: 1024,
        n_seq_max: 64,
        ub_seqs: 64,
        token_seqs: 8,
        p_shared: 0.3,
        ops: 5_000,
        ..BASE
    },
    Config {
        name: "unified-64seq-swa-standard",
        size: 1024,
        n_seq_max: 64,
        ub_seqs: 64,
        token_seqs: 8,
        p_shared: 0.2,
        swa_type: SwaType::Standard,
        n_swa: 48,
        ops: 3_000,
        ..BASE
    },
    // Large caches with few cells used: n_kv well below the size.
    Config {
        name: "unified-4096-sparse",
        size: 4096,
        n_seq_max: 8,
        few_tokens: true,
        ops: 4_000,
        ..BASE
    },
    Config {
        name: "streams-2048-sparse-swa",
        size: 2048,
        unified: false,
        swa_type: SwaType::Standard,
        n_swa: 40,
        few_tokens: true,
        ops: 3_000,
        ..BASE
    },
    // Positions up to i32::MAX with each sliding-window type.
    Config {
        name: "unified-max-swa-standard",
        swa_type: SwaType::Standard,
        n_swa: 32,
        near_max: true,
        ops: 5_000,
        ..BASE
    },
    Config {
        name: "unified-max-swa-chunked",
        swa_type: SwaType::Chunked,
        n_swa: 16,
        near_max: true,
        ops: 4_000,
        ..BASE
    },
    Config {
        name: "unified-max-swa-symmetric",
        swa_type: SwaType::Symmetric,
        n_swa: 24,
        near_max: true,
        alibi: true,
        ops: 4_000,
        ..BASE
    },
    Config {
        name: "streams-max-swa-standard",
        unified: false,
        swa_type: SwaType::Standard,
        n_swa: 20,
        near_max: true,
        ops: 3_000,
        ..BASE
    },
];

const N_REL_ATTN_BKTS: u32 = 32;

struct Pair {
    cfg: Config,
    ours: KvMemory,
    theirs: stock::RefKv,
    rng: StdRng,
    step: u64,
    last_op: String,
    /// States saved on both sides (equal bytes): `(seq or -1, bytes)`, newest last.
    saved: Vec<(i32, Vec<u8>)>,
    cov: BTreeMap<&'static str, u64>,
}

impl Pair {
    fn new(cfg: Config, seed: u64) -> Pair {
        let theirs = stock::RefKv::tiny(&stock::Params {
            kv_size: cfg.size,
            n_seq_max: cfg.n_seq_max,
            unified: cfg.unified,
            n_swa: cfg.n_swa,
            swa_type: cfg.swa_type as i32,
            v_trans: cfg.v_trans,
            use_alibi: cfg.alibi,
            mrope: cfg.mrope,
            n_rel_attn_bkts: N_REL_ATTN_BKTS,
            non_causal_type: cfg.non_causal as i32,
            ple_n_heads: if cfg.ngram.is_some() { 2 } else { 0 },
            ple_eos_token_id: NGRAM_EOS,
            ple_image_token_id: cfg.ngram.unwrap_or(0),
            ..stock::Params::default()
        });
        let cache = KvCache::new(KvParams {
            size: cfg.size,
            n_seq_max: cfg.n_seq_max,
            unified: cfg.unified,
            n_swa: cfg.n_swa,
            swa_type: cfg.swa_type,
            n_pos_per_embd: if cfg.mrope { 4 } else { 1 },
            use_alibi: cfg.alibi,
            non_causal_type: cfg.non_causal,
            v_trans: cfg.v_trans,
            n_embd_v_gqa_max: theirs.n_embd_v_gqa_max(),
            n_rel_attn_bkts: N_REL_ATTN_BKTS,
            ngram_tokens: cfg.ngram.is_some(),
            embd_token: match cfg.ngram {
                Some(0) => NGRAM_EOS as i32,
                Some(image) => image as i32,
                None => 0,
            },
            ..KvParams::default()
        })
        .unwrap();
        // The stock cache holds the tiny model's tensors (2 layers, K/V rows of 32 f16), so
        // ours does too: the states then carry the same tensor bytes.
        let gqa = theirs.n_embd_v_gqa_max();
        let storage = KvStorage::new(StorageSpec {
            type_k: theirs.params().type_k as u32,
            type_v: theirs.params().type_v as u32,
            v_trans: cfg.v_trans,
            is_mla: false,
            size: cfg.size,
            n_stream: cache.n_stream(),
            n_rot_k: 0,
            n_rot_v: 0,
            layers: LayerSpec::uniform(2, gqa, gqa),
        })
        .unwrap();
        let ours = KvMemory::new(cache, Some(storage)).unwrap();
        assert_eq!(ours.cache.n_stream(), theirs.n_stream());
        assert_eq!(ours.cache.size(), theirs.size());
        let mut rng = diff::rng(seed, cfg.name);
        let _: u64 = rng.gen();
        Pair {
            cfg,
            ours,
            theirs,
            rng,
            step: 0,
            last_op: String::new(),
            saved: Vec::new(),
            cov: COUNTERS.iter().map(|&c| (c, 0)).collect(),
        }
    }

    /// Our cache (the cells side of our memory).
    fn kv(&self) -> &KvCache {
        &self.ours.cache
    }

    fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.ours.cache
    }

    fn count(&mut self, what: &'static str) {
        *self.cov.get_mut(what).expect("a listed counter") += 1;
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "divergence in config {} at step {} after `{}`: {what}",
            self.cfg.name, self.step, self.last_op
        );
    }

    fn seq(&mut self) -> i32 {
        self.rng.gen_range(0..self.cfg.n_seq_max as i32)
    }

    /// A range bound: often negative ("open"), else near the sequences' positions.
    fn bound(&mut self) -> i32 {
        if self.cfg.near_max && self.rng.gen_bool(0.5) {
            return i32::MAX - self.rng.gen_range(0..self.cfg.size as i32 + 40);
        }
        match self.rng.gen_range(0..6) {
            0 => -1,
            1 => -self.rng.gen_range(1..5),
            _ => self.rng.gen_range(0..self.cfg.size as i32 + 40),
        }
    }

    fn compare_state(&mut self) {
        let (o, t) = (&self.ours.cache, &self.theirs);
        for s in 0..o.n_stream() {
            let tc = t.cells(s);
            let oc = o.cells(s);
            if oc.pos_all() != tc.pos.as_slice() {
                let i = (0..tc.pos.len())
                    .find(|&i| oc.pos_all()[i] != tc.pos[i])
                    .unwrap();
                self.fail(format!(
                    "stream {s} cell {i}: pos {} vs stock {}",
                    oc.pos_all()[i],
                    tc.pos[i]
                ));
            }
            for i in 0..o.size() {
                let iu = i as usize;
                if oc.get_shift(i) != tc.shift[iu] {
                    self.fail(format!(
                        "stream {s} cell {i}: shift {} vs stock {}",
                        oc.get_shift(i),
                        tc.shift[iu]
                    ));
                }
                let bits = oc.seq_get_all(i).as_raw_slice();
                if bits != tc.seq[iu] {
                    self.fail(format!(
                        "stream {s} cell {i}: seqs {bits:x?} vs stock {:x?}",
                        tc.seq[iu]
                    ));
                }
                if !oc.is_empty(i) {
                    let e = oc.ext_get(i);
                    if [e.x, e.y, e.tok] != tc.ext[iu] {
                        self.fail(format!(
                            "stream {s} cell {i}: ext {e:?} vs stock {:?}",
                            tc.ext[iu]
                        ));
                    }
                }
            }
            let ti = t.stream_info(s);
            let oi = (
                o.head(s),
                oc.get_used(),
                oc.used_min(),
                oc.used_max_p1(),
                oc.get_has_shift(),
            );
            if oi != (ti.head, ti.used, ti.used_min, ti.used_max_p1, ti.has_shift) {
                self.fail(format!(
                    "stream {s}: (head, used, min, max_p1, has_shift) {oi:?} vs stock {ti:?}"
                ));
            }
        }
        for seq in 0..o.n_seq_max() as i32 {
            let a = (o.seq_pos_min(seq).unwrap(), o.seq_pos_max(seq).unwrap());
            let b = (t.seq_pos_min(seq), t.seq_pos_max(seq));
            if a != b {
                self.fail(format!(
                    "seq {seq}: (pos_min, pos_max) {a:?} vs stock {b:?}"
                ));
            }
        }
        let copies = t.pending_copy_list();
        if o.pending_copies() != copies.as_slice() {
            self.fail(format!(
                "pending copies (src, dst) {:?} vs stock {copies:?}",
                o.pending_copies()
            ));
        }
        if o.has_shift() != t.has_shift() || o.can_shift() != t.can_shift() {
            self.fail("has_shift/can_shift differ".into());
        }
        if !copies.is_empty() {
            self.count("copies: non-empty pending list compared");
        }
        if copies.len() >= 2 {
            self.count("copies: >= 2 pending copies compared");
        }
    }

    /// What this configuration's traces look like.
    fn trace_shape(&self) -> trace::Shape {
        trace::Shape {
            n_seq_max: self.cfg.n_seq_max,
            unified: self.cfg.unified,
            mrope: self.cfg.mrope,
            near_max: self.cfg.near_max,
            few_tokens: self.cfg.few_tokens,
            ub_seqs: self.cfg.ub_seqs,
            few_seqs: trace::FewSeqs::Drawn,
            shared: trace::Shared::UpTo {
                p: self.cfg.p_shared,
                seqs: self.cfg.token_seqs,
            },
            large: 64..=512,
            medium: 8..64,
        }
    }

    /// A ubatch shaped as llama.cpp's split for this cache would shape it.
    fn gen_ubatch(&mut self, cursor: &mut [i32]) -> stock::Ubatch {
        let shape = self.trace_shape();
        let kv = &self.ours.cache;
        trace::gen_ubatch(&mut self.rng, &shape, cursor, |s| {
            kv.seq_pos_max(s).unwrap()
        })
    }

    fn to_ours(u: &stock::Ubatch) -> UbatchBuf {
        let mut b = UbatchBuf {
            n_seq_tokens: u.n_seq_tokens,
            n_seqs: u.n_seqs,
            n_pos: u.n_pos,
            equal_seqs: u.equal_seqs,
            token: (!u.tokens.is_empty()).then(|| u.tokens.clone()),
            pos: u.pos.clone(),
            seq_off: vec![0],
            seq_ids: Vec::new(),
            seq_id_unq: u.seq_id_unq.clone(),
            output: None,
            embd: None,
        };
        for ids in &u.seq_ids {
            b.seq_ids.extend_from_slice(ids);
            b.seq_off.push(b.seq_ids.len() as u32);
        }
        b
    }

    fn same_slot(&self, ours: &SlotInfo, theirs: &stock::Slot) {
        let strm: Vec<i32> = ours.strm.iter().map(|&s| s as i32).collect();
        if (ours.s0, ours.s1, &strm, &ours.idxs)
            != (theirs.s0, theirs.s1, &theirs.strm, &theirs.idxs)
        {
            if std::env::var("DIFF_DUMP").is_ok() {
                let c = self.theirs.cells(theirs.strm[0] as u32);
                for (&a, &b) in ours.idxs[0].iter().zip(&theirs.idxs[0]) {
                    for i in [a as usize, b as usize] {
                        let seqs = c.seqs(i);
                        let maxes: Vec<i32> =
                            seqs.iter().map(|&s| self.theirs.seq_pos_max(s)).collect();
                        eprintln!(
                            "cell {i}: pos {} seqs {seqs:?} seq_pos_max {maxes:?}",
                            c.pos[i]
                        );
                    }
                }
            }
            self.fail(format!("slot {ours:?} vs stock {theirs:?}"));
        }
    }

    fn op_place(&mut self) {
        let mut cursor = vec![i32::MIN; self.cfg.n_seq_max as usize];
        let n_ub = if self.rng.gen_bool(0.2) {
            self.rng.gen_range(2..=3)
        } else {
            1
        };
        let mut ubs: Vec<stock::Ubatch> = (0..n_ub).map(|_| self.gen_ubatch(&mut cursor)).collect();
        if self.cfg.ngram.is_some() {
            // embedding rows (multimodal input): no token ids, the model's stand-in in the cells
            for ub in &mut ubs {
                if self.rng.gen_bool(0.2) {
                    ub.tokens.clear();
                }
            }
        }
        let bufs: Vec<UbatchBuf> = ubs.iter().map(Self::to_ours).collect();
        self.last_op = format!(
            "place {} ubatch(es) of {:?} tokens",
            n_ub,
            ubs.iter().map(|u| u.n_tokens()).collect::<Vec<_>>()
        );
        for b in &bufs {
            if let Err(e) = self.kv().validate_ubatch(&b.view()) {
                self.fail(format!("generated ubatch rejected: {e}"));
            }
        }
        if self.rng.gen_bool(0.1) {
            let cont = self.theirs.find_slot(&ubs[0].view(), true);
            match (self.kv().find_slot(&bufs[0].view(), true), cont) {
                (None, None) => {}
                (Some(a), Some(b)) => self.same_slot(&a, &b),
                (a, b) => self.fail(format!("contiguous find_slot {a:?} vs stock {b:?}")),
            }
        }
        let views: Vec<_> = ubs.iter().map(stock::Ubatch::view).collect();
        let theirs = self.theirs.prepare(&views);
        let ours_views: Vec<_> = bufs.iter().map(UbatchBuf::view).collect();
        let ours = self.kv_mut().prepare(&ours_views);
        self.step += 1;
        self.compare_state();
        let (ours, theirs) = match (ours, theirs) {
            (None, None) => return,
            (Some(a), Some(b)) => (a, b),
            (a, b) => self.fail(format!("prepare {a:?} vs stock {b:?}")),
        };
        for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            self.same_slot(a, b);
            self.theirs.apply_ubatch(b, &views[k]);
            self.kv_mut().apply_ubatch(a, &ours_views[k]);
            self.step += 1;
            self.last_op = format!("apply ubatch {k} of {} tokens", ubs[k].n_tokens());
            self.compare_state();
            self.compare_inputs(&ubs[k], &bufs[k], a, b);
            self.count_ubatch(&ubs[k]);
            if self.cfg.ngram.is_some() {
                self.compare_prev_tokens(&views[k], &ours_views[k]);
            }
        }
    }

    /// `get_prev_tokens` of the ubatch just applied, for a few window sizes.
    fn compare_prev_tokens(&mut self, theirs: &stock::UbatchRef<'_>, ours: &Ubatch<'_>) {
        let mut found = false;
        for n in [0, 1, self.rng.gen_range(2..=6)] {
            let want = self.theirs.get_prev_tokens(theirs, n);
            found |= want.iter().any(|&t| t >= 0);
            let mut got = Vec::new();
            if let Err(e) = self.kv().get_prev_tokens(ours, n, &mut got) {
                self.fail(format!("get_prev_tokens({n}) failed: {e}"));
            }
            if got != want {
                self.fail(format!("get_prev_tokens({n}) {got:?} vs stock {want:?}"));
            }
        }
        self.count("ngram: prev tokens compared");
        if ours.token.is_none() {
            self.count("ngram: embedding ubatch");
        }
        if found {
            self.count("ngram: a predecessor found");
        }
    }

    fn count_ubatch(&mut self, ub: &stock::Ubatch) {
        let n_unq = ub.seq_id_unq.len();
        if n_unq > 3 {
            self.count("ubatch: > 3 sequences");
        }
        if n_unq > 8 {
            self.count("ubatch: > 8 sequences");
        }
        let most = ub.seq_ids.iter().map(Vec::len).max().unwrap_or(0);
        if most >= 2 {
            self.count("token: shared by >= 2 sequences");
        }
        if most >= 4 {
            self.count("token: shared by >= 4 sequences");
        }
        let n = ub.n_tokens() as usize;
        let top = ub.pos[..n].iter().copied().max().unwrap_or(0);
        if top >= NEAR_MAX {
            self.count(match self.cfg.swa_type {
                SwaType::Standard => "pos: near i32::MAX placed, standard SWA",
                SwaType::Chunked => "pos: near i32::MAX placed, chunked SWA",
                SwaType::Symmetric => "pos: near i32::MAX placed, symmetric SWA",
                SwaType::None => "pos: i32::MAX placed",
            });
        }
        if top == i32::MAX {
            self.count("pos: i32::MAX placed");
        }
    }

    fn compare_inputs(
        &mut self,
        ub: &stock::Ubatch,
        buf: &UbatchBuf,
        ours: &SlotInfo,
        theirs: &stock::Slot,
    ) {
        let n_kv = self.kv().get_n_kv(ours);
        if n_kv != self.theirs.get_n_kv(theirs) {
            self.fail(format!(
                "n_kv {n_kv} vs stock {}",
                self.theirs.get_n_kv(theirs)
            ));
        }
        let v = ub.view();
        let view = buf.view();
        let n_stream_m = if self.cfg.unified {
            1
        } else {
            ub.seq_id_unq.len() as u32
        };
        let causal = self.rng.gen_bool(0.8);
        let len = (n_kv * ub.n_tokens()) as usize;
        if n_kv < self.cfg.size {
            self.count(if self.cfg.unified {
                "mask: n_kv < size (unified)"
            } else {
                "mask: n_kv < size (streams)"
            });
        }
        if ub.pos[..ub.n_tokens() as usize]
            .iter()
            .any(|&p| p >= NEAR_MAX)
        {
            self.count("pos: near i32::MAX masks compared");
        }
        if self.rng.gen_bool(0.5) {
            let want = self.theirs.kq_mask_f32(&v, causal, n_kv, n_stream_m);
            let mut got = vec![1.0f32; len];
            self.kv()
                .set_input_kq_mask(&view, causal, n_kv, n_stream_m, MaskOut::F32(&mut got))
                .unwrap();
            if let Some(i) = (0..len).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                self.fail(format!(
                    "kq mask f32 (causal {causal}) entry {i} (row {}, cell {}): {} vs stock {}",
                    i / n_kv as usize,
                    i % n_kv as usize,
                    got[i],
                    want[i]
                ));
            }
        } else {
            let want = self.theirs.kq_mask_f16(&v, causal, n_kv, n_stream_m);
            let mut got = vec![0x3C00u16; len];
            self.kv()
                .set_input_kq_mask(&view, causal, n_kv, n_stream_m, MaskOut::F16(&mut got))
                .unwrap();
            if let Some(i) = (0..len).find(|&i| got[i] != want[i]) {
                self.fail(format!(
                    "kq mask f16 entry {i}: {:#x} vs stock {:#x}",
                    got[i], want[i]
                ));
            }
        }
        let mut k = vec![0i64; ours.n_tokens()];
        self.kv().set_input_k_idxs(ours, &mut k).unwrap();
        if k != self.theirs.k_idxs(&v, theirs) {
            self.fail("k_idxs differ".into());
        }
        let mut vi = vec![0i64; self.kv().v_idxs_len(ours.n_tokens())];
        self.kv().set_input_v_idxs(ours, &mut vi).unwrap();
        if vi != self.theirs.v_idxs(&v, theirs) {
            self.fail("v_idxs differ".into());
        }
        if self.cfg.unified && !ub.equal_seqs && self.rng.gen_bool(0.2) {
            let mut pb = vec![0i32; len];
            self.kv()
                .set_input_pos_bucket(&view, n_kv, &mut pb)
                .unwrap();
            if pb != self.theirs.pos_bucket(&v, n_kv) {
                self.fail("pos buckets differ".into());
            }
        }
    }

    fn op_seq(&mut self) {
        let can_move = !self.cfg.mrope;
        let size = self.cfg.size as i32;
        match self.rng.gen_range(0..12) {
            0..=2 => {
                let s = if self.rng.gen_bool(0.15) {
                    -1
                } else {
                    self.seq()
                };
                let (p0, p1) = (self.bound(), self.bound());
                self.last_op = format!("seq_rm({s}, {p0}, {p1})");
                let a = self.kv_mut().seq_rm(s, p0, p1).unwrap();
                if a != self.theirs.seq_rm(s, p0, p1) {
                    self.fail("seq_rm result".into());
                }
            }
            3 | 4 => {
                let (src, dst) = (self.seq(), self.seq());
                let (p0, p1) = if self.cfg.unified || src == dst {
                    (self.bound(), self.bound())
                } else {
                    // Between streams llama.cpp takes whole sequences only.
                    let full = [-1, 0, size - 1, size + 3];
                    (
                        full[self.rng.gen_range(0..2)],
                        full[self.rng.gen_range(0..4)],
                    )
                };
                self.last_op = format!("seq_cp({src}, {dst}, {p0}, {p1})");
                self.kv_mut().seq_cp(src, dst, p0, p1).unwrap();
                self.theirs.seq_cp(src, dst, p0, p1);
            }
            5 => {
                let s = self.seq();
                self.last_op = format!("seq_keep({s})");
                self.kv_mut().seq_keep(s).unwrap();
                self.theirs.seq_keep(s);
            }
            6..=8 if can_move => {
                let s = self.seq();
                let (p0, p1) = (self.bound(), self.bound());
                let delta = self.rng.gen_range(-40..40);
                self.last_op = format!("seq_add({s}, {p0}, {p1}, {delta})");
                self.kv_mut().seq_add(s, p0, p1, delta).unwrap();
                self.theirs.seq_add(s, p0, p1, delta);
            }
            9 if can_move => {
                let s = self.seq();
                let (p0, p1) = (self.bound(), self.bound());
                let d = self.rng.gen_range(1..5);
                self.last_op = format!("seq_div({s}, {p0}, {p1}, {d})");
                self.kv_mut().seq_div(s, p0, p1, d).unwrap();
                self.theirs.seq_div(s, p0, p1, d);
            }
            10 => self.op_update(),
            _ => {
                if self.rng.gen_bool(0.1) {
                    self.last_op = "clear".into();
                    Memory::clear(&mut self.ours, false);
                    self.theirs.clear(false);
                } else {
                    return self.op_update();
                }
            }
        }
        self.step += 1;
        self.compare_state();
    }

    /// A state step: save a sequence (or everything) on both sides and compare the bytes, or
    /// restore an earlier save into the same sequence, another one, or the whole cache.
    fn op_state(&mut self) {
        if self.rng.gen_bool(0.08) {
            // What a hybrid memory runs on its KV part when another part failed to restore.
            let seq = if self.rng.gen_bool(0.1) {
                -1
            } else {
                self.seq()
            };
            self.last_op = format!("state_clear({seq})");
            if seq >= 0 {
                let cells = self.kv().cells(self.kv().stream_of(seq));
                if cells
                    .seq_pos_iter(seq)
                    .any(|(_, c)| cells.seq_count(c) == 1)
                {
                    self.count("state: state_clear(seq) zeroing cells it held alone");
                }
            }
            self.ours.state_clear(seq).unwrap();
            self.theirs.state_clear(seq);
            self.step += 1;
            self.count(if seq == -1 {
                "state: state_clear(-1)"
            } else {
                "state: state_clear(seq)"
            });
            self.compare_state();
            return;
        }
        let flags = if self.rng.gen_bool(0.5) {
            PARTIAL_ONLY
        } else {
            0
        };
        if self.saved.is_empty() || self.rng.gen_bool(0.45) {
            let seq = if self.rng.gen_bool(0.25) {
                -1
            } else {
                self.seq()
            };
            self.last_op = format!("state_write({seq}, flags {flags})");
            let want = self.theirs.state_write(seq, flags);
            let got = our_state_write(&self.ours, seq, flags);
            self.step += 1;
            self.same_bytes("state_write", &got, &want);
            if data_sections(&want, self.cfg.mrope || self.cfg.ngram.is_some()).is_some_and(|d| {
                d.iter()
                    .any(|&(o, l, _)| want[o..o + l].iter().any(|&b| b & 0x7f != 0))
            }) {
                self.count("state: save with non-zero tensor data");
            }
            if seq == -1 {
                self.count("state: save all");
            } else {
                self.count("state: save seq");
                if flags == PARTIAL_ONLY {
                    self.count("state: save seq PARTIAL_ONLY");
                }
                if self.cfg.unified && self.cfg.swa_type != SwaType::None {
                    // cells of seq in the cache vs cells in the state (unified: one stream,
                    // its cell count right after n_stream)
                    let held = self.theirs.cells(0);
                    let n_held = (0..held.pos.len())
                        .filter(|&i| held.has_seq(i, seq))
                        .count();
                    let n_saved = u32::from_ne_bytes(want[4..8].try_into().unwrap()) as usize;
                    if n_saved < n_held {
                        self.count("state: save seq, SWA-hidden cells left out");
                    }
                }
            }
            if self.cfg.mrope && want.len() > 4 + 4 * self.kv().n_stream() as usize {
                self.count("state: save with M-RoPE ext");
            }
            self.saved.push((seq, want));
            if self.saved.len() > 4 {
                self.saved.remove(0);
            }
            return;
        }
        let (src, mut blob) = self.saved[self.rng.gen_range(0..self.saved.len())].clone();
        if self.rng.gen_bool(0.7) {
            // Fresh K/V values for both sides (the caches only get tensor data from restores
            // here): what copies, shifts and later saves do with them is then compared too.
            let sections = data_sections(&blob, self.cfg.mrope || self.cfg.ngram.is_some())
                .unwrap_or_else(|| self.fail("a stock state that does not parse".into()));
            for (off, len, ty) in sections {
                assert_eq!(ty, 1, "f16 tensors");
                for w in blob[off..off + len].chunks_exact_mut(2) {
                    w.copy_from_slice(
                        &f16::from_f32(self.rng.gen_range(-2.0f32..2.0)).to_ne_bytes(),
                    );
                }
            }
            self.count("state: restore with random tensor data");
        }
        let dest = if src == -1 {
            -1
        } else if self.rng.gen_bool(0.5) {
            src
        } else {
            self.seq()
        };
        self.last_op = format!(
            "state_read({dest}, flags {flags}) of a {}-byte state of seq {src}",
            blob.len()
        );
        let want = self.theirs.state_read(dest, flags, &blob);
        let got = our_state_read(&mut self.ours, dest, flags, &blob);
        self.step += 1;
        match (&got, want) {
            (Ok(a), Some(b)) if *a == b => {}
            (Err(_), None) => {
                // Stock has already cleared what it restores into (the sequence, or the
                // whole cache); ours keeps the memory as it was. Do the same on ours.
                self.count("state: restore failed on both sides");
                if dest == -1 {
                    Memory::clear(&mut self.ours, true);
                } else {
                    self.kv_mut().seq_rm(dest, -1, -1).unwrap();
                }
            }
            (a, b) => self.fail(format!("state_read {a:?} vs stock {b:?} bytes")),
        }
        if dest == -1 {
            self.count("state: restore all");
        } else {
            self.count(if dest == src {
                "state: restore seq into same seq"
            } else {
                "state: restore seq into other seq"
            });
            if self.kv().stream_of(dest) != self.kv().stream_of(src) {
                self.count("state: restore seq into other stream");
            }
            if flags == PARTIAL_ONLY {
                self.count("state: restore seq PARTIAL_ONLY");
            }
        }
        self.compare_state();
        // The restored state reads back the same on both sides.
        let want = self.theirs.state_write(dest, flags);
        let got = our_state_write(&self.ours, dest, flags);
        self.same_bytes("state_write after state_read", &got, &want);
    }

    /// A restore that reports where its cells went, then the same state restored again into
    /// a given layout (llama.cpp's `state_read_sinfo`, what hybrid-idx's mirrored indexer
    /// cache does): that layout, one with a cell moved (free or taken), or one of another
    /// count. Results, layouts and cells compared with stock after each.
    fn op_state_slots(&mut self) {
        let Some((src, raw)) = self.saved.last().cloned() else {
            return;
        };
        let dest = if src == -1 { -1 } else { self.seq() };
        self.last_op = format!(
            "state_read_sinfo({dest}) of a {}-byte state of seq {src}",
            raw.len()
        );
        let Some(layout) = self.restore_slots(dest, &raw, None, false) else {
            return;
        };
        self.count("state: restore reporting its cells");
        let mut given = layout.clone();
        let n_cells: usize = given.iter().map(Vec::len).sum();
        if n_cells == 0 {
            return;
        }
        let s = given.iter().position(|v| !v.is_empty()).unwrap_or(0);
        // a cell held by another sequence: stock zeroes its K/V rows when it refuses the layout
        // (state_read_meta takes the given layout before checking it, and the failure's
        // state_clear zeroes the rows of that layout: a stock bug that corrupts the other
        // sequence); ours refuses without touching it, and the trace goes on from stock's bytes
        let mut taken = false;
        match self.rng.gen_range(0..4) {
            0 | 1 => {}
            2 => {
                let i = self.rng.gen_range(0..given[s].len());
                let c = self.rng.gen_range(0..self.cfg.size);
                if given[s].contains(&c) {
                    // a cell listed twice: stock aborts placing the second token there
                    // (GGML_ASSERT in state_read_meta); ours refuses it (kv_state_malformed)
                    return;
                }
                let strm = if dest == -1 {
                    s as u32
                } else {
                    self.kv().stream_of(dest)
                };
                let cells = self.kv().cells(strm);
                taken = dest != -1
                    && !cells.is_empty(c)
                    && !(cells.seq_count(c) == 1 && cells.seq_has(c, dest));
                given[s][i] = c;
            }
            _ => {
                given[s].pop();
            }
        }
        self.last_op = format!(
            "state_read_sinfo({dest}) of a {}-byte state of seq {src} into a given layout{}",
            raw.len(),
            if given == layout { "" } else { " (changed)" }
        );
        if let Some(placed) = self.restore_slots(dest, &raw, Some(&given), taken) {
            // a whole restore's cells go from 0 whatever the layout (only counts are checked)
            if placed != if dest == -1 { layout } else { given.clone() } {
                self.fail(format!(
                    "a mirrored restore placed {placed:?}, given {given:?}"
                ));
            }
            self.count("state: restore into a given layout");
        } else {
            self.count("state: restore into a given layout refused");
        }
    }

    /// `state_read_sinfo` on both sides; the reported layouts (equal) or `None` when both
    /// failed (ours then takes stock's effect: the destination erased).
    fn restore_slots(
        &mut self,
        dest: i32,
        raw: &[u8],
        given: Option<&[Vec<u32>]>,
        taken: bool,
    ) -> Option<Vec<Vec<u32>>> {
        let want = self.theirs.state_read_sinfo(dest, raw, given);
        let mut r = DeferredReader {
            bytes: raw,
            pos: 0,
            pending: Vec::new(),
        };
        let got = self.ours.state_read_io_slots(dest, &mut r, given);
        if got.is_ok() {
            for &(t, off, at, n) in &r.pending {
                // SAFETY: a live tensor of the memory, range checked in read_tensor.
                unsafe { g::ggml_backend_tensor_set(t, raw[at..].as_ptr().cast(), off, n) };
            }
        }
        self.step += 1;
        let out = match (got, want) {
            (Ok(a), Some(b)) if a == b => Some(a),
            (Err(_), None) => {
                if dest == -1 {
                    Memory::clear(&mut self.ours, true);
                } else {
                    self.kv_mut().seq_rm(dest, -1, -1).unwrap();
                }
                if given.is_some() {
                    // stock zeroed the rows of the given layout, cells of other sequences
                    // included (see op_state_slots)
                    if taken {
                        self.count("state: given layout over another sequence's cell refused");
                    }
                    self.take_stock_bytes();
                }
                None
            }
            (a, b) => self.fail(format!("state_read_sinfo {a:?} vs stock {b:?}")),
        };
        self.compare_state();
        out
    }

    /// Takes stock's K/V bytes (after stock zeroed rows ours rightly kept).
    fn take_stock_bytes(&mut self) {
        let st = self.ours.storage.as_mut().unwrap();
        for (il, l) in st.layers().to_vec().into_iter().enumerate() {
            for (v, t) in [(false, l.k), (true, l.v)] {
                let bytes = self.theirs.tensor_bytes(v, il as i32).unwrap();
                st.set(t, 0, &bytes).unwrap();
            }
        }
    }

    fn same_bytes(&self, what: &str, got: &[u8], want: &[u8]) {
        if got != want {
            let i = (0..got.len().min(want.len()))
                .find(|&i| got[i] != want[i])
                .unwrap_or(got.len().min(want.len()));
            if std::env::var("DIFF_DUMP").is_ok() {
                eprintln!("ours : {:?}\nstock: {:?}", got, want);
            }
            self.fail(format!(
                "{what}: {} bytes vs stock {}, first difference at byte {i}",
                got.len(),
                want.len()
            ));
        }
    }

    /// Our K-shift nodes (`build_graph_shift`) over both layers, computed on the CPU backend
    /// with the tiny llama's RoPE (NORM over the 16-wide head, base 10000, no YaRN, as the
    /// stock context resolves it).
    fn run_k_shift(&mut self, ks: &[i32]) {
        let st = self.ours.storage.as_ref().unwrap();
        let rope = RopeParams {
            n_rot: 16,
            n_embd_nope: 0,
            mode: 0,
            n_ctx_orig: 4096,
            freq_base: 10000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        // SAFETY: a private no-alloc context and CPU backend; the input tensor is allocated
        // before the nodes are built, the nodes only view our storage's tensors, and
        // everything is freed here.
        unsafe {
            let ctx = g::ggml_init(g::ggml_init_params {
                mem_size: 1 << 20,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            let backend = g::ggml_backend_cpu_init();
            // one thread: the graph is tiny, and starting worker threads would dominate
            g::ggml_backend_cpu_set_n_threads(backend, 1);
            let input = g::ggml_new_tensor_1d(ctx, g::GGML_TYPE_I32, ks.len() as i64);
            let buf = g::ggml_backend_alloc_ctx_tensors(ctx, backend);
            assert!(!buf.is_null());
            g::ggml_backend_tensor_set(input, ks.as_ptr().cast(), 0, ks.len() * 4);
            let gf = g::ggml_new_graph(ctx);
            for il in 0..2 {
                let node = st
                    .k_shift(
                        ctx,
                        il,
                        16,
                        input,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        &rope,
                    )
                    .unwrap();
                g::ggml_build_forward_expand(gf, node);
            }
            assert_eq!(
                g::ggml_backend_graph_compute(backend, gf),
                g::GGML_STATUS_SUCCESS
            );
            g::ggml_backend_buffer_free(buf);
            g::ggml_free(ctx);
            g::ggml_backend_free(backend);
        }
    }

    fn op_update(&mut self) {
        self.last_op = "update".into();
        let mut ks = vec![0i32; (self.cfg.size * self.kv().n_stream()) as usize];
        self.kv().set_input_k_shift(&mut ks).unwrap();
        if ks != self.theirs.k_shift() {
            self.fail("k_shift differs".into());
        }
        let do_shift = self.kv().has_shift();
        let mut ctx = self.kv_mut().init_update().unwrap();
        let ours = llama_memory::MemoryContext::status(&ctx);
        let theirs = self.theirs.update();
        let same = matches!(
            (ours, theirs),
            (llama_memory::Status::Success, stock::MemoryStatus::Success)
                | (
                    llama_memory::Status::NoUpdate,
                    stock::MemoryStatus::NoUpdate
                )
        );
        if !same {
            self.fail(format!("update status {ours:?} vs stock {theirs:?}"));
        }
        if ours == llama_memory::Status::Success {
            llama_memory::MemoryContext::apply(&mut ctx, &mut self.ours).unwrap();
            // Stock copies the streams' tensors, then runs its K-shift graph; ours leaves the
            // graph to the caller: run our K-shift nodes, with the shifts read before.
            if do_shift {
                self.run_k_shift(&ks);
                self.count("update: K-shift graph run on both sides");
            }
        }
    }

    fn run(&mut self, ops: u64) -> u64 {
        let start = self.step;
        for _ in 0..ops {
            let r: f64 = self.rng.gen();
            if r < 0.42 {
                self.op_place();
            } else if r < 0.47 {
                self.op_state();
            } else if r < 0.485 {
                self.op_state_slots();
            } else {
                self.op_seq();
            }
        }
        self.kv().check_invariants().unwrap();
        self.step - start
    }
}

#[test]
fn kv_cache_matches_stock_llama_cpp() {
    // The traces hit expected stock failures (oversized ubatches); keep their logs out of CI.
    std::env::set_var("KVREF_QUIET", "1");
    let seed = diff::seed(0x5eed_1234);
    let scale = diff::ops_scale(BASE.ops);
    let mut total = 0;
    let mut report = String::new();
    let mut cov: BTreeMap<&'static str, u64> = COUNTERS.iter().map(|&c| (c, 0)).collect();
    // DIFF_CONFIG=<substring> runs only the matching configurations (for reproducing one).
    let only = std::env::var("DIFF_CONFIG").ok();
    let configs: Vec<&Config> = CONFIGS
        .iter()
        .filter(|c| only.as_ref().is_none_or(|o| c.name.contains(o.as_str())))
        .collect();
    for cfg in configs.iter().copied() {
        let t0 = std::time::Instant::now();
        let mut pair = Pair::new(*cfg, seed);
        let n = pair.run(((cfg.ops as f64) * scale).max(1.0) as u64);
        report += &format!(
            "differential: config {:<28} {n:>7} compared steps, 0 divergences ({:.1} s)\n",
            cfg.name,
            t0.elapsed().as_secs_f64()
        );
        total += n;
        diff::add_coverage(&mut cov, &pair.cov);
    }
    diff::report_coverage(&mut report, "differential", &cov, 46, 8);
    report += &format!(
        "differential: seed {seed:#x}: {total} compared steps over {} configurations, 0 divergences\n",
        configs.len()
    );
    diff::write_summary("differential-summary.txt", &report);
    assert!(total > 0);
    let missing = diff::never_reached(&cov);
    assert!(
        missing.is_empty() || only.is_some(),
        "the traces never produced: {missing:?} (a generator no longer reaches these cases)"
    );
}

/// The slot search near i32::MAX: a cell of a sequence whose last position is i32::MAX is
/// reusable when the window hides it from the next position, `i32::MAX + 1`, which llama.cpp
/// computes in 32 bits. Compared with stock for each window type and key positions from 0 up.
#[test]
fn swa_slot_search_near_i32_max_matches_stock() {
    std::env::set_var("KVREF_QUIET", "1");
    let max = i32::MAX;
    for (swa_type, n_swa) in [
        (SwaType::Standard, 32),
        (SwaType::Standard, 1),
        (SwaType::Chunked, 16),
        (SwaType::Chunked, 3),
        (SwaType::Symmetric, 24),
    ] {
        for p0 in [
            0,
            1,
            2,
            19,
            n_swa as i32 - 1,
            n_swa as i32,
            1000,
            max - n_swa as i32 - 1,
            max - n_swa as i32,
            max - n_swa as i32 + 1,
            max - 1,
        ] {
            let cfg = Config {
                name: "probe",
                size: 2,
                n_seq_max: 2,
                swa_type,
                n_swa,
                ..BASE
            };
            let mut pair = Pair::new(cfg, 0);
            // cell 0: seq 0 at p0; cell 1: seq 0 at i32::MAX
            let ub = stock::Ubatch::simple(vec![1, 2], vec![p0, max], vec![vec![0], vec![0]]);
            let buf = Pair::to_ours(&ub);
            let a = pair.kv_mut().prepare(&[buf.view()]).unwrap();
            let b = pair.theirs.prepare(&[ub.view()]).unwrap();
            pair.same_slot(&a[0], &b[0]);
            pair.kv_mut().apply_ubatch(&a[0], &buf.view());
            pair.theirs.apply_ubatch(&b[0], &ub.view());
            pair.last_op = format!("{swa_type:?} n_swa {n_swa}: seq 0 at [{p0}, i32::MAX]");
            pair.compare_state();
            // one token of seq 1: which cell of seq 0 may it take?
            let ub = stock::Ubatch::simple(vec![3], vec![5], vec![vec![1]]);
            let buf = Pair::to_ours(&ub);
            let theirs = pair.theirs.find_slot(&ub.view(), false);
            let ours = pair.kv().find_slot(&buf.view(), false);
            match (ours, theirs) {
                (None, None) => {}
                (Some(a), Some(b)) => pair.same_slot(&a, &b),
                (a, b) => pair.fail(format!("find_slot {a:?} vs stock {b:?}")),
            }
        }
    }
}
