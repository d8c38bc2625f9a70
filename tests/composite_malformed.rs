//! Malformed states of the composite memories through the C ABI: the sliding-window pair
//! (`llama_memory_iswa_init`), the hybrid (`llama_memory_hybrid_init` over a KV cache) and the
//! hybrid with a pair, the hybrids with 0 and with 1 rollback plane. A composite's state is its
//! parts' states one after the other (pair: base, SWA; hybrid: attention, recurrent; with
//! `PARTIAL_ONLY` the pair keeps only its SWA half and the plain hybrid only its recurrent
//! part), and llama.cpp restores the first part before it reads the second: a damaged second
//! part leaves it half-restored. Here every rejected input must get the failure value, a
//! last-error code and message, and leave the memory byte-identical: the whole state, each
//! sequence's range, every byte of every tensor of every part (cells the state does not cover
//! included), the recurrent cells (src, src0, tail, rs_idx) and, for the plain hybrid, the KV
//! cells.
//!
//! Each memory is populated by random equal-split ubatches over three sequences, a fourth
//! sequence sharing the second's cells (`seq_cp`), random tensor bytes and, with a rollback
//! plane, one token of sequence 0 rolled back. The corpora, for sequence blobs (flags 0 and
//! `PARTIAL_ONLY`) and whole states:
//! - every truncation (each length into one of the destinations, in turn), refused with
//!   `LLAMA_MEMORY_ERR_INVALID_STATE`;
//! - a valid first part followed by a corrupt later part: every 4-byte word of the later part's
//!   metadata (u64 row sizes as two words) set to 0, 1, 0x7fffffff, 0xffffffff, its value + 1
//!   and - 1; each is refused with the memory unchanged, or accepted, and then the memory must
//!   be consistent (the whole state round-trips, the pair's sequence ranges are sane, a
//!   placement works) before it is rebuilt for the next case. Most must be refused, every
//!   layout word (counts, flags, types, sizes) and every cell count always (but 0 in the last
//!   part: an empty part followed by trailing bytes); positions and sequence ids may make
//!   another valid state;
//! - a corrupt first part followed by a valid second part, the same way;
//! - the states of one configuration fed to every other (of another kind: all refused);
//! - trailing bytes after a valid state (ignored and not counted, as the leaf memories do).
//!
//! Every input refused through a blob is also fed through a caller's reader
//! (`llama_memory_state_read_io`), which must refuse it and change nothing too. Each test
//! writes its counts to `<CARGO_TARGET_TMPDIR>/composite-malformed-<test>.txt`.

use std::ffi::CStr;

use llama_memory::ffi::error::{
    llama_memory_clear_last_error, llama_memory_last_error, llama_memory_last_error_code,
    llama_memory_result,
};
use llama_memory::ffi::*;

use llama_memory_result::*;

#[path = "common/diff.rs"]
#[allow(dead_code)]
mod diff;
#[path = "common/io.rs"]
#[allow(dead_code)]
mod io_common;

const F32: i32 = 0;
const F16: i32 = 1;
/// Sequences of every memory: 0..3 placed, 3 a copy of 1.
const N_SEQ: u32 = 4;
/// Cells of every KV cache (both halves of a pair).
const KV_SIZE: u32 = 48;
/// The window of the SWA halves.
const N_SWA: u32 = 4;
/// Cells of the recurrent parts.
const RS_SIZE: u32 = 5;
const PARTIAL: u32 = LLAMA_MEMORY_STATE_SEQ_FLAGS_PARTIAL_ONLY;
const MAGIC: u32 = 0xaf14_3cd8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pair,
    Hybrid,
    HybridPair,
}

/// One memory configuration of the corpora.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    name: &'static str,
    kind: Kind,
    /// Rollback planes of the recurrent part.
    n_rs_seq: u32,
}

const CONFIGS: [Cfg; 5] = [
    Cfg {
        name: "pair",
        kind: Kind::Pair,
        n_rs_seq: 0,
    },
    Cfg {
        name: "hybrid",
        kind: Kind::Hybrid,
        n_rs_seq: 0,
    },
    Cfg {
        name: "hybrid rollback 1",
        kind: Kind::Hybrid,
        n_rs_seq: 1,
    },
    Cfg {
        name: "hybrid-pair",
        kind: Kind::HybridPair,
        n_rs_seq: 0,
    },
    Cfg {
        name: "hybrid-pair rollback 1",
        kind: Kind::HybridPair,
        n_rs_seq: 1,
    },
];

/// A KV half: model layers, row width, types, `v_trans`, window.
struct KvShape {
    ils: &'static [u32],
    gqa: u32,
    type_k: i32,
    type_v: i32,
    v_trans: bool,
    swa: bool,
}

/// A recurrent part: model layer count, layers with tensors, R and S widths.
struct RsShape {
    n_layer: u32,
    ils: &'static [u32],
    embd_r: u32,
    embd_s: u32,
}

/// The parts of a kind, in state order (KV halves, then the recurrent part). Every kind has
/// its own widths, so that a state of one kind never fits another.
fn shape(kind: Kind) -> (Vec<KvShape>, Option<RsShape>) {
    match kind {
        Kind::Pair => (
            vec![
                KvShape {
                    ils: &[0, 2],
                    gqa: 4,
                    type_k: F32,
                    type_v: F16,
                    v_trans: true,
                    swa: false,
                },
                KvShape {
                    ils: &[1, 3],
                    gqa: 4,
                    type_k: F32,
                    type_v: F16,
                    v_trans: true,
                    swa: true,
                },
            ],
            None,
        ),
        Kind::Hybrid => (
            vec![KvShape {
                ils: &[1, 3],
                gqa: 8,
                type_k: F16,
                type_v: F32,
                v_trans: false,
                swa: false,
            }],
            Some(RsShape {
                n_layer: 4,
                ils: &[0, 2],
                embd_r: 8,
                embd_s: 16,
            }),
        ),
        Kind::HybridPair => (
            vec![
                KvShape {
                    ils: &[0, 3],
                    gqa: 12,
                    type_k: F16,
                    type_v: F16,
                    v_trans: false,
                    swa: false,
                },
                KvShape {
                    ils: &[1, 4],
                    gqa: 12,
                    type_k: F16,
                    type_v: F16,
                    v_trans: false,
                    swa: true,
                },
            ],
            Some(RsShape {
                n_layer: 6,
                ils: &[2, 5],
                embd_r: 12,
                embd_s: 20,
            }),
        ),
    }
}

/// A leaf part of a state, for the layout walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    Kv,
    Rs,
}

/// The leaf parts a state of `kind` with `flags` holds, in order.
fn leaves(kind: Kind, flags: u32) -> Vec<Leaf> {
    let partial = flags & PARTIAL != 0;
    match (kind, partial) {
        (Kind::Pair, false) => vec![Leaf::Kv, Leaf::Kv],
        (Kind::Pair, true) => vec![Leaf::Kv],
        (Kind::Hybrid, false) => vec![Leaf::Kv, Leaf::Rs],
        (Kind::Hybrid, true) => vec![Leaf::Rs],
        (Kind::HybridPair, false) => vec![Leaf::Kv, Leaf::Kv, Leaf::Rs],
        (Kind::HybridPair, true) => vec![Leaf::Kv, Leaf::Rs],
    }
}

struct Mem(llama_memory_t);

impl Drop for Mem {
    fn drop(&mut self) {
        llama_memory_free(self.0);
    }
}

/// The last error message, "" when there is none.
fn last_error() -> String {
    let p = llama_memory_last_error();
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn make_kv(s: &KvShape) -> llama_memory_t {
    let layers: Vec<llama_memory_kv_layer> = s
        .ils
        .iter()
        .map(|&il| llama_memory_kv_layer {
            il,
            n_embd_k_gqa: s.gqa,
            n_embd_v_gqa: s.gqa,
            reuse: -1,
            buft: std::ptr::null_mut(),
        })
        .collect();
    let mut p = llama_memory_kv_default_params();
    p.size = KV_SIZE;
    p.n_seq_max = N_SEQ;
    p.unified = true;
    p.v_trans = s.v_trans;
    if s.swa {
        p.n_swa = N_SWA;
        p.swa_type = LLAMA_MEMORY_SWA_TYPE_STANDARD;
    }
    let mut sp = llama_memory_kv_storage_default_params();
    sp.type_k = s.type_k;
    sp.type_v = s.type_v;
    sp.layers = layers.as_ptr();
    sp.n_layers = layers.len();
    let m = llama_memory_kv_init_with_storage(p, &sp);
    assert!(!m.is_null(), "{}", last_error());
    m
}

fn make_rs(s: &RsShape, n_rs_seq: u32) -> llama_memory_t {
    let layers: Vec<llama_memory_rs_layer> = s
        .ils
        .iter()
        .map(|&il| llama_memory_rs_layer {
            il,
            n_embd_r: s.embd_r,
            n_embd_s: s.embd_s,
            n_embd_p: 0,
            buft: std::ptr::null_mut(),
        })
        .collect();
    let mut p = llama_memory_rs_default_params();
    p.size = RS_SIZE;
    p.n_seq_max = N_SEQ;
    p.n_rs_seq = n_rs_seq;
    p.n_layer = s.n_layer;
    p.type_r = F32;
    p.type_s = F32;
    p.layers = layers.as_ptr();
    p.n_layers = layers.len();
    let m = llama_memory_rs_init(p);
    assert!(!m.is_null(), "{}", last_error());
    m
}

/// An empty memory of configuration `cfg`, built from its leaf memories as
/// tests/c/test_composite.c builds it.
fn new_mem(cfg: &Cfg) -> Mem {
    let (kv, rs) = shape(cfg.kind);
    let attn = if kv.len() == 2 {
        let p = llama_memory_iswa_init(make_kv(&kv[0]), make_kv(&kv[1]));
        assert!(!p.is_null(), "{}", last_error());
        p
    } else {
        make_kv(&kv[0])
    };
    let m = match rs {
        None => attn,
        Some(rs) => {
            let h = llama_memory_hybrid_init(attn, make_rs(&rs, cfg.n_rs_seq));
            assert!(!h.is_null(), "{}", last_error());
            h
        }
    };
    Mem(m)
}

/// A ubatch of equal-split sets: one per `(seq, p0)`, `n` tokens each.
struct Ub {
    pos: Vec<i32>,
    ids: Vec<i32>,
    tok: Vec<i32>,
    n_seq_id: Vec<i32>,
    unq: Vec<i32>,
    n: usize,
    n_sets: usize,
}

impl Ub {
    fn new(sets: &[(i32, i32)], n: usize) -> Ub {
        let mut pos = Vec::new();
        let mut ids = Vec::new();
        for &(s, p0) in sets {
            for k in 0..n as i32 {
                pos.push(p0.saturating_add(k));
                ids.push(s);
            }
        }
        let mut unq: Vec<i32> = sets.iter().map(|s| s.0).collect();
        unq.sort_unstable();
        Ub {
            tok: vec![1; pos.len()],
            n_seq_id: vec![1; pos.len()],
            pos,
            ids,
            unq,
            n,
            n_sets: sets.len(),
        }
    }

    /// Plans and applies the ubatch; the result code of the first step that failed.
    fn apply(&self, m: &Mem) -> Result<(), String> {
        let ptrs: Vec<*const i32> = self.ids.iter().map(|s| s as *const i32).collect();
        let ub = llama_memory_ubatch {
            n_tokens: self.pos.len() as u32,
            n_seq_tokens: self.n as u32,
            n_seqs: self.n_sets as u32,
            n_seqs_unq: self.unq.len() as u32,
            n_pos: 1,
            equal_seqs: 1,
            token: self.tok.as_ptr(),
            pos: self.pos.as_ptr(),
            n_seq_id: self.n_seq_id.as_ptr(),
            seq_id: ptrs.as_ptr(),
            seq_id_unq: self.unq.as_ptr(),
            seq_idx: std::ptr::null(),
            output: std::ptr::null(),
            type_: std::ptr::null(),
        };
        let ctx = llama_memory_init_batch(m.0, &ub, 1);
        if ctx.is_null() {
            return Err(last_error());
        }
        let st = llama_memory_ctx_get_status(ctx);
        let r = if st != LLAMA_MEMORY_CTX_SUCCESS {
            Err(format!("status {st:?}"))
        } else if llama_memory_ctx_apply(ctx) != LLAMA_MEMORY_OK {
            Err(last_error())
        } else {
            Ok(())
        };
        llama_memory_ctx_free(ctx);
        r
    }
}

/// xorshift64, the corpora's random source.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n
    }
}

/// `SEED=<u64>` varies the placements and tensor bytes.
fn seed(cfg: &Cfg) -> u64 {
    let s = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de_u64);
    (s ^ cfg
        .name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(131) ^ b as u64))
        | 1
}

/// Every tensor of every part: K and V of each attention layer, R and S of each recurrent
/// layer (found through the composite: each layer's owning part).
fn tensors(m: &Mem, cfg: &Cfg) -> Vec<*mut ggml_sys::ggml_tensor> {
    let (kv, rs) = shape(cfg.kind);
    let mut v = Vec::new();
    for s in &kv {
        for &il in s.ils {
            v.push(llama_memory_kv_get_k_tensor(m.0, il));
            v.push(llama_memory_kv_get_v_tensor(m.0, il));
        }
    }
    if let Some(rs) = rs {
        for &il in rs.ils {
            v.push(llama_memory_rs_get_r_tensor(m.0, il));
            v.push(llama_memory_rs_get_s_tensor(m.0, il));
        }
    }
    assert!(v.iter().all(|t| !t.is_null()), "{}", last_error());
    v
}

fn tensor_bytes(t: *mut ggml_sys::ggml_tensor) -> Vec<u8> {
    // SAFETY: a live tensor of the memory, in a host buffer, read in full.
    let n = unsafe { ggml_sys::ggml_nbytes(t) };
    let mut d = vec![0u8; n];
    // SAFETY: as above; `d` holds the n bytes read.
    unsafe { ggml_sys::ggml_backend_tensor_get(t, d.as_mut_ptr().cast(), 0, n) };
    d
}

/// Random bytes into every tensor of every part.
fn randomize(m: &Mem, cfg: &Cfg, rng: &mut Rng) {
    for t in tensors(m, cfg) {
        // SAFETY: as in tensor_bytes.
        let n = unsafe { ggml_sys::ggml_nbytes(t) };
        let data: Vec<u8> = (0..n).map(|_| (rng.next() >> 24) as u8).collect();
        // SAFETY: same tensor, exactly its size.
        unsafe { ggml_sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, n) };
    }
}

/// A populated memory of `cfg` (the same one for the same seed): 4 rounds of random
/// equal-split ubatches over sequences 0..3 (1 to 3 tokens each, after each one's last
/// position), sequence 3 a copy of sequence 1 (shared cells in every part), random tensor
/// bytes, and with a rollback plane sequence 0's last token rolled back.
fn populated(cfg: &Cfg) -> Mem {
    let m = new_mem(cfg);
    let mut rng = Rng(seed(cfg));
    for _ in 0..4 {
        let mut seqs: Vec<i32> = (0..3).filter(|_| rng.below(3) != 0).collect();
        if seqs.is_empty() {
            seqs.push(rng.below(3) as i32);
        }
        if rng.below(2) == 1 {
            seqs.reverse();
        }
        let n = 1 + rng.below(3) as usize;
        let sets: Vec<(i32, i32)> = seqs
            .iter()
            .map(|&s| (s, llama_memory_seq_pos_max(m.0, s) + 1))
            .collect();
        Ub::new(&sets, n).apply(&m).expect("placement");
    }
    for s in 0..3 {
        let p = llama_memory_seq_pos_max(m.0, s);
        if p < 2 {
            Ub::new(&[(s, p + 1)], 3).apply(&m).expect("placement");
        }
    }
    llama_memory_seq_cp(m.0, 1, 3, -1, -1);
    randomize(&m, cfg, &mut rng);
    if cfg.n_rs_seq > 0 {
        let p = llama_memory_seq_pos_max(m.0, 0);
        assert!(llama_memory_seq_rm(m.0, 0, p, -1), "{}", last_error());
    }
    for s in 0..N_SEQ as i32 {
        assert!(llama_memory_seq_pos_max(m.0, s) >= 1, "seq {s}");
    }
    m
}

/// Everything observable about a composite memory.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot {
    /// The whole state (every used cell of every part, with its tensor rows).
    whole: Vec<u8>,
    /// Per sequence: pos_min, pos_max.
    ranges: Vec<(i32, i32)>,
    /// Every byte of every tensor of every part.
    tensors: Vec<Vec<u8>>,
    /// Recurrent part: size, head, used, n, rs_z, then per cell pos, src, src0, tail, rs_idx
    /// and sequences.
    rs: Vec<i64>,
    /// Plain hybrid: the KV cells (pos and sequence words per cell).
    kv: Vec<i64>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum = |b: &[u8]| -> u64 {
            b.iter()
                .enumerate()
                .map(|(i, &x)| (i as u64 + 1) * x as u64)
                .sum()
        };
        f.debug_struct("Snapshot")
            .field(
                "whole (len, checksum)",
                &(self.whole.len(), sum(&self.whole)),
            )
            .field("ranges", &self.ranges)
            .field(
                "tensor checksums",
                &self.tensors.iter().map(|t| sum(t)).collect::<Vec<_>>(),
            )
            .field("rs", &self.rs)
            .field("kv cells (len)", &self.kv.len())
            .finish()
    }
}

fn snapshot(m: &Mem, cfg: &Cfg) -> Snapshot {
    let mut rs = Vec::new();
    if cfg.kind != Kind::Pair {
        let mut info = llama_memory_rs_info::default();
        assert_eq!(llama_memory_rs_get_info(m.0, &mut info), LLAMA_MEMORY_OK);
        rs.extend([
            info.size as i64,
            info.head as i64,
            info.used as i64,
            info.n as i64,
            info.rs_z as i64,
        ]);
        for i in 0..info.size {
            let mut c = llama_memory_rs_cell::default();
            let mut seqs = [0i32; 256];
            assert_eq!(
                llama_memory_rs_get_cell(m.0, i, &mut c, seqs.as_mut_ptr(), seqs.len()),
                LLAMA_MEMORY_OK
            );
            rs.extend([
                c.pos as i64,
                c.src as i64,
                c.src0 as i64,
                c.tail as i64,
                c.rs_idx as i64,
                c.n_seq as i64,
            ]);
            rs.extend(seqs[..c.n_seq as usize].iter().map(|&q| q as i64));
        }
    }
    let mut kv = Vec::new();
    if cfg.kind == Kind::Hybrid {
        let n = KV_SIZE as usize;
        let mut pos = vec![0i32; n];
        let mut bits = vec![0u64; 4 * n];
        assert_eq!(
            llama_memory_kv_get_cells(m.0, 0, pos.as_mut_ptr(), bits.as_mut_ptr(), n),
            LLAMA_MEMORY_OK,
            "{}",
            last_error()
        );
        kv.extend(pos.iter().map(|&p| p as i64));
        kv.extend(bits.iter().map(|&b| b as i64));
        kv.push(llama_memory_kv_n_used(m.0, 0) as i64);
    }
    Snapshot {
        whole: whole(m),
        ranges: ranges(m),
        tensors: tensors(m, cfg).into_iter().map(tensor_bytes).collect(),
        rs,
        kv,
    }
}

fn ranges(m: &Mem) -> Vec<(i32, i32)> {
    (0..N_SEQ as i32)
        .map(|s| {
            (
                llama_memory_seq_pos_min(m.0, s),
                llama_memory_seq_pos_max(m.0, s),
            )
        })
        .collect()
}

fn whole(m: &Mem) -> Vec<u8> {
    let n = llama_memory_state_get_size(m.0);
    assert!(n > 0, "{}", last_error());
    let mut b = vec![0u8; n];
    assert_eq!(llama_memory_state_get_data(m.0, b.as_mut_ptr(), n), n);
    b
}

fn seq_blob(m: &Mem, seq: i32, flags: u32) -> Vec<u8> {
    let n = llama_memory_state_seq_get_size_ext(m.0, seq, flags);
    assert!(n > 0, "{}", last_error());
    let mut b = vec![0u8; n];
    assert_eq!(
        llama_memory_state_seq_get_data_ext(m.0, b.as_mut_ptr(), n, seq, flags),
        n,
        "{}",
        last_error()
    );
    b
}

fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// One leaf part of a state: where it starts and ends, and the offset of every 4-byte word of
/// its metadata (every field but the tensor rows; a u64 row size is two words).
#[derive(Clone, Debug)]
struct Part {
    start: usize,
    end: usize,
    fields: Vec<(usize, Field)>,
}

/// What a metadata word of a state is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// A cell's position.
    Pos,
    /// A cell count (0 makes the part empty: valid for the last part, whose remaining bytes
    /// are then trailing bytes, ignored and not counted).
    Count,
    /// A cell's sequence count.
    NSeq,
    /// One of a cell's sequence ids.
    SeqId,
    /// Everything else: counts, flags, layer counts, types, row and element sizes.
    Layout,
}

/// Every [`Field`], in the order of the corpora's per-class counts.
const FIELDS: [Field; 5] = [
    Field::Pos,
    Field::Count,
    Field::NSeq,
    Field::SeqId,
    Field::Layout,
];

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Pos => "cell pos",
            Field::Count => "cell count",
            Field::NSeq => "cell sequence count",
            Field::SeqId => "cell sequence id",
            Field::Layout => "layout",
        }
    }
}

/// Walks a KV cache's state at `at` (llama.cpp's layout: stream count; per stream a cell
/// count, per cell pos, n_seq_id, ids, then v_trans, n_layer, n_rot_k, n_rot_v, K blocks
/// `type, u64 row, rows` and V blocks `type, u64 row, rows` or transposed
/// `type, u32 el, u32 chans, chans * cells * el`).
fn walk_kv(b: &[u8], at: usize) -> Part {
    let mut f = Vec::new();
    let mut off = at;
    let word = |f: &mut Vec<(usize, Field)>, off: &mut usize, k: Field| -> u32 {
        f.push((*off, k));
        *off += 4;
        get32(b, *off - 4)
    };
    let n_stream = word(&mut f, &mut off, Field::Layout);
    for _ in 0..n_stream {
        let cc = word(&mut f, &mut off, Field::Count) as usize;
        if cc == 0 {
            continue;
        }
        for _ in 0..cc {
            word(&mut f, &mut off, Field::Pos);
            let k = word(&mut f, &mut off, Field::NSeq);
            for _ in 0..k {
                word(&mut f, &mut off, Field::SeqId);
            }
        }
        let v_trans = word(&mut f, &mut off, Field::Layout);
        let n_layer = word(&mut f, &mut off, Field::Layout);
        word(&mut f, &mut off, Field::Layout);
        word(&mut f, &mut off, Field::Layout);
        for _ in 0..n_layer {
            word(&mut f, &mut off, Field::Layout);
            let row = get64(b, off) as usize;
            word(&mut f, &mut off, Field::Layout);
            word(&mut f, &mut off, Field::Layout);
            off += cc * row;
        }
        for _ in 0..n_layer {
            word(&mut f, &mut off, Field::Layout);
            if v_trans == 0 {
                let row = get64(b, off) as usize;
                word(&mut f, &mut off, Field::Layout);
                word(&mut f, &mut off, Field::Layout);
                off += cc * row;
            } else {
                let el = word(&mut f, &mut off, Field::Layout) as usize;
                let chans = word(&mut f, &mut off, Field::Layout) as usize;
                off += chans * cc * el;
            }
        }
    }
    Part {
        start: at,
        end: off,
        fields: f,
    }
}

/// Walks a recurrent state at `at` (cell count; per cell pos, n_seq_id, ids; s_trans,
/// n_layer; per layer with tensors `r_type, u64 r_row, rows`; then the same for S).
fn walk_rs(b: &[u8], at: usize, n_layers: usize) -> Part {
    let mut f = Vec::new();
    let mut off = at;
    let word = |f: &mut Vec<(usize, Field)>, off: &mut usize, k: Field| -> u32 {
        f.push((*off, k));
        *off += 4;
        get32(b, *off - 4)
    };
    let cc = word(&mut f, &mut off, Field::Count) as usize;
    for _ in 0..cc {
        word(&mut f, &mut off, Field::Pos);
        let k = word(&mut f, &mut off, Field::NSeq);
        for _ in 0..k {
            word(&mut f, &mut off, Field::SeqId);
        }
    }
    word(&mut f, &mut off, Field::Layout);
    word(&mut f, &mut off, Field::Layout);
    for _ in 0..2 * n_layers {
        word(&mut f, &mut off, Field::Layout);
        let row = get64(b, off) as usize;
        word(&mut f, &mut off, Field::Layout);
        word(&mut f, &mut off, Field::Layout);
        off += cc * row;
    }
    Part {
        start: at,
        end: off,
        fields: f,
    }
}

/// The leaf parts of a state of `cfg` written with `flags`, from `at` (8 for a sequence blob).
fn parts(cfg: &Cfg, flags: u32, b: &[u8], at: usize) -> Vec<Part> {
    let n_rs = shape(cfg.kind).1.map_or(0, |r| r.ils.len());
    let mut off = at;
    let mut v = Vec::new();
    for leaf in leaves(cfg.kind, flags) {
        let p = match leaf {
            Leaf::Kv => walk_kv(b, off),
            Leaf::Rs => walk_rs(b, off, n_rs),
        };
        off = p.end;
        v.push(p);
    }
    assert_eq!(off, b.len(), "{}: the layout walk is wrong", cfg.name);
    v
}

/// A restore input: a sequence blob (into `dest`, with `flags`) or a whole state.
#[derive(Clone, Copy, Debug)]
enum Target {
    Seq { dest: i32, flags: u32 },
    Whole,
}

/// Restores `input` through the blob functions; the bytes read (0: refused).
fn restore(m: &Mem, input: &[u8], t: Target) -> usize {
    match t {
        Target::Seq { dest, flags } => {
            llama_memory_state_seq_set_data_ext(m.0, input.as_ptr(), input.len(), dest, flags)
        }
        Target::Whole => llama_memory_state_set_data(m.0, input.as_ptr(), input.len()),
    }
}

/// The same input through a caller's reader (`llama_memory_state_read_io`), when it has a
/// reader form: a whole state, or a sequence blob with a well-formed header (read without it).
fn restore_io(m: &Mem, input: &[u8], t: Target) -> Option<llama_memory_result> {
    match t {
        Target::Whole => Some(io_common::io_read(m.0, input, -1, 0).0),
        Target::Seq { dest, flags } if input.len() >= 8 && get32(input, 0) == MAGIC => {
            Some(io_common::io_read(m.0, &input[8..], dest, flags).0)
        }
        Target::Seq { .. } => None,
    }
}

/// What became of one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Failure value, last error set, memory byte-identical (both paths).
    Refused,
    /// Accepted; the memory was checked consistent and must be rebuilt.
    Accepted,
}

/// Feeds `input` to `m` and checks the oracle: refused with the failure value, a last-error
/// code and message and no change at all (through the blob and the reader path), or accepted
/// and then consistent (see [`check_consistent`]). Returns the outcome and the error code.
#[track_caller]
fn feed(m: &Mem, cfg: &Cfg, input: &[u8], t: Target, what: &str) -> (Outcome, llama_memory_result) {
    let before = snapshot(m, cfg);
    llama_memory_clear_last_error();
    let r = restore(m, input, t);
    if r != 0 {
        assert!(
            r <= input.len(),
            "{what}: read {r} of {} bytes",
            input.len()
        );
        check_consistent(m, cfg, what);
        return (Outcome::Accepted, LLAMA_MEMORY_OK);
    }
    let code = llama_memory_last_error_code();
    let msg = last_error();
    assert_ne!(
        code, LLAMA_MEMORY_OK,
        "{what}: refused without an error code"
    );
    assert!(!msg.is_empty(), "{what}: refused without a message");
    let after = snapshot(m, cfg);
    assert!(
        after == before,
        "{}: {what} ({t:?}) refused ({msg}) but the memory changed\nbefore {before:?}\nafter  {after:?}",
        cfg.name
    );
    if let Some(rc) = restore_io(m, input, t) {
        assert_ne!(
            rc, LLAMA_MEMORY_OK,
            "{}: {what} ({t:?}): the reader path accepted what the blob path refused ({msg})",
            cfg.name
        );
        assert!(!last_error().is_empty());
        let after = snapshot(m, cfg);
        assert!(
            after == before,
            "{}: {what} ({t:?}): the reader path changed the memory: {}\nbefore {before:?}\nafter  {after:?}",
            cfg.name,
            last_error()
        );
    }
    (Outcome::Refused, code)
}

/// Whether each sequence's range is sane: empty (-1, -1) or `0 <= min <= max`.
fn ranges_sane(r: &[(i32, i32)]) -> bool {
    r.iter()
        .all(|&(lo, hi)| (lo == -1 && hi == -1) || (0 <= lo && lo <= hi))
}

thread_local! {
    /// Accepted inputs after which a hybrid's parts disagree on a sequence's range (its
    /// `seq_pos_min` > `seq_pos_max`), which neither llama.cpp nor this library cross-checks:
    /// a state whose parts hold different positions, or a sequence blob restored into -1 (the
    /// whole memory), where the attention part reads the cells' ids but the recurrent part's
    /// sequence state has none (its cell is restored used, without sequences, as llama.cpp's).
    static DISAGREE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// An accepted state left the memory consistent: the whole state can be written, reads back
/// into a fresh memory of the configuration and into the memory itself to the same bytes; the
/// sequence ranges are sane (the pair's always; a hybrid's parts may disagree, counted); and a
/// placement after every sequence's last position neither panics nor breaks the round trip.
#[track_caller]
fn check_consistent(m: &Mem, cfg: &Cfg, what: &str) {
    let round_trip = |m: &Mem| {
        let w = whole(m);
        let fresh = new_mem(cfg);
        assert_eq!(
            llama_memory_state_set_data(fresh.0, w.as_ptr(), w.len()),
            w.len(),
            "{}: {what}: the accepted state's whole state does not read back: {}",
            cfg.name,
            last_error()
        );
        assert!(
            whole(&fresh) == w,
            "{}: {what}: whole state did not round-trip",
            cfg.name
        );
        assert_eq!(
            llama_memory_state_set_data(m.0, w.as_ptr(), w.len()),
            w.len(),
            "{}: {what}: own whole state refused: {}",
            cfg.name,
            last_error()
        );
        assert!(
            whole(m) == w,
            "{}: {what}: own whole state changed",
            cfg.name
        );
    };
    round_trip(m);
    let r = ranges(m);
    if !ranges_sane(&r) {
        assert!(
            cfg.kind != Kind::Pair && r.iter().all(|&(lo, hi)| lo >= -1 && hi >= -1),
            "{}: {what}: ranges {r:?}",
            cfg.name
        );
        DISAGREE.set(DISAGREE.get() + 1);
    }
    for s in 0..N_SEQ as i32 {
        let p = llama_memory_seq_pos_max(m.0, s);
        if (0..1 << 20).contains(&p) {
            let _ = Ub::new(&[(s, p + 1)], 1).apply(m);
        }
    }
    round_trip(m);
}

/// Counts of one corpus on one configuration.
#[derive(Default)]
struct Count {
    cases: usize,
    refused: usize,
    accepted: usize,
}

impl Count {
    fn add(&mut self, o: Outcome) {
        self.cases += 1;
        match o {
            Outcome::Refused => self.refused += 1,
            Outcome::Accepted => self.accepted += 1,
        }
    }
    fn line(&self, test: &str, what: &str) -> String {
        format!(
            "composite_malformed: {test:<22} {what:<34} {:>7} cases {:>7} refused unchanged {:>5} accepted (consistent)\n",
            self.cases, self.refused, self.accepted
        )
    }
}

/// Sequences whose blobs the corpora use: one alone and one sharing its cells.
const SRC_SEQS: [i32; 2] = [0, 3];
/// Destinations of a sequence blob: its own, another, a shared one, the whole memory.
const DESTS: [i32; 4] = [0, 1, 3, -1];
/// Blob flags: none and `PARTIAL_ONLY`.
const FLAGS: [u32; 2] = [0, PARTIAL];

#[test]
fn layouts_match_the_written_states() {
    for cfg in &CONFIGS {
        let m = populated(cfg);
        for flags in FLAGS {
            for s in 0..N_SEQ as i32 {
                let b = seq_blob(&m, s, flags);
                assert_eq!(get32(&b, 0), MAGIC);
                let p = parts(cfg, flags, &b, 8);
                for q in &p {
                    assert!(q.end > q.start && !q.fields.is_empty());
                }
                // the partial blob is the full blob without its leading parts
                let full = seq_blob(&m, s, 0);
                let pf = parts(cfg, 0, &full, 8);
                let skip = pf.len() - p.len();
                assert_eq!(
                    b[8..],
                    full[pf[skip].start..],
                    "{} seq {s}: the partial blob is not a tail of the full one",
                    cfg.name
                );
            }
        }
        let w = whole(&m);
        let p = parts(cfg, 0, &w, 0);
        // sequence 3 shares sequence 1's cells: a cell of every part lists two sequences
        for (q, leaf) in p.iter().zip(leaves(cfg.kind, 0)) {
            let ids = cell_ids(&w, q, leaf);
            assert!(
                ids.iter().any(|c| c.len() == 2),
                "{}: no shared cell in {leaf:?} part: {ids:?}",
                cfg.name
            );
        }
        assert!(ranges_sane(&ranges(&m)), "{}", cfg.name);
    }
}

/// The sequence ids of every cell of a part of a whole state.
fn cell_ids(b: &[u8], p: &Part, leaf: Leaf) -> Vec<Vec<u32>> {
    let mut off = p.start + if leaf == Leaf::Kv { 4 } else { 0 };
    let n = get32(b, off);
    off += 4;
    (0..n)
        .map(|_| {
            let k = get32(b, off + 4) as usize;
            let ids = (0..k).map(|j| get32(b, off + 8 + 4 * j)).collect();
            off += 8 + 4 * k;
            ids
        })
        .collect()
}

/// One restore input of a memory: a sequence blob (with its flags, into every destination) or
/// the whole state.
struct Input {
    what: String,
    bytes: Vec<u8>,
    flags: u32,
    /// Where the state starts: 8 after a blob header, 0 for a whole state.
    at: usize,
    targets: Vec<Target>,
}

/// The inputs of the corpora: the blobs of [`SRC_SEQS`] with each of [`FLAGS`] into every
/// destination, and the whole state.
fn inputs(m: &Mem) -> Vec<Input> {
    let mut v = Vec::new();
    for flags in FLAGS {
        for src in SRC_SEQS {
            v.push(Input {
                what: format!("seq {src} blob, flags {flags}"),
                bytes: seq_blob(m, src, flags),
                flags,
                at: 8,
                targets: DESTS
                    .iter()
                    .map(|&dest| Target::Seq { dest, flags })
                    .collect(),
            });
        }
    }
    v.push(Input {
        what: "whole state".into(),
        bytes: whole(m),
        flags: 0,
        at: 0,
        targets: vec![Target::Whole],
    });
    v
}

/// The label of an input's counts in a summary.
fn label(i: &Input) -> &'static str {
    match (i.at, i.flags) {
        (0, _) => "whole state",
        (_, 0) => "sequence blob",
        _ => "sequence blob PARTIAL_ONLY",
    }
}

/// Prints the summary of a test and writes it to `<CARGO_TARGET_TMPDIR>/composite-malformed-
/// <test>.txt`.
fn summary(test: &str, lines: &[(String, Count)]) {
    let mut r = String::new();
    let mut all = Count::default();
    for (what, c) in lines {
        r += &c.line(test, what);
        all.cases += c.cases;
        all.refused += c.refused;
        all.accepted += c.accepted;
    }
    r += &all.line(test, "total");
    if DISAGREE.get() > 0 {
        r += &format!(
            "composite_malformed: {test:<22} {:>7} accepted states left a hybrid's parts disagreeing on a sequence's range\n",
            DISAGREE.get()
        );
    }
    diff::write_summary(&format!("composite-malformed-{test}.txt"), &r);
}

/// Adds `c` to the line named `what` of a summary.
fn tally(lines: &mut Vec<(String, Count)>, what: String, c: Count) {
    match lines.iter_mut().find(|(w, _)| *w == what) {
        Some((_, l)) => {
            l.cases += c.cases;
            l.refused += c.refused;
            l.accepted += c.accepted;
        }
        None => lines.push((what, c)),
    }
}

#[test]
fn truncated_at_every_byte() {
    let mut lines = Vec::new();
    for cfg in &CONFIGS {
        let m = populated(cfg);
        for i in inputs(&m) {
            let mut c = Count::default();
            for len in 0..i.bytes.len() {
                // each length into one destination, in turn
                let t = i.targets[len % i.targets.len()];
                let (o, code) = feed(&m, cfg, &i.bytes[..len], t, &i.what);
                assert_eq!(
                    o,
                    Outcome::Refused,
                    "{}: {} cut at {len} accepted",
                    cfg.name,
                    i.what
                );
                assert_eq!(code, LLAMA_MEMORY_ERR_INVALID_STATE, "{}", last_error());
                c.add(o);
            }
            tally(&mut lines, format!("{}, {}", cfg.name, label(&i)), c);
        }
    }
    summary("truncated", &lines);
}

/// Hostile values for a 4-byte word holding `v`.
fn hostile(v: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for x in [
        0,
        1,
        0x7fff_ffff,
        0xffff_ffff,
        v.wrapping_add(1),
        v.wrapping_sub(1),
    ] {
        if x != v && !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// Every hostile value in every metadata word of the parts `sel` picks (by index, of how
/// many) of every input, fed to every target of the input. An accepted input rebuilds the
/// memory for the next case.
fn corrupt_parts(test: &str, sel: impl Fn(usize, usize) -> bool) -> Vec<(String, Count)> {
    let mut lines = Vec::new();
    for cfg in &CONFIGS {
        let mut m = populated(cfg);
        for i in inputs(&m) {
            let ps = parts(cfg, i.flags, &i.bytes, i.at);
            let mut c: [Count; 5] = Default::default();
            for (k, p) in ps.iter().enumerate() {
                if !sel(k, ps.len()) {
                    continue;
                }
                for &(f, class) in &p.fields {
                    for v in hostile(get32(&i.bytes, f)) {
                        let mut b = i.bytes.clone();
                        put32(&mut b, f, v);
                        for &t in &i.targets {
                            let what = format!(
                                "{test}: {}, part {k} of {}, word at {} set to {v:#x}",
                                i.what,
                                ps.len(),
                                f - p.start
                            );
                            let (o, _) = feed(&m, cfg, &b, t, &what);
                            c[FIELDS.iter().position(|&x| x == class).unwrap()].add(o);
                            // a layout word never fits; a cell count only as 0 in the last
                            // part (an empty part and trailing bytes)
                            let empty_last = class == Field::Count && v == 0 && k + 1 == ps.len();
                            if class == Field::Layout || (class == Field::Count && !empty_last) {
                                assert_eq!(o, Outcome::Refused, "{}: {what} accepted", cfg.name);
                            }
                            if o == Outcome::Accepted {
                                m = populated(cfg);
                            }
                        }
                    }
                }
            }
            for (c, class) in c.into_iter().zip(FIELDS) {
                if c.cases > 0 {
                    let what = format!("{}, {}, {}", cfg.name, label(&i), class.name());
                    tally(&mut lines, what, c);
                }
            }
        }
    }
    lines
}

/// Asserts that most inputs of each configuration and input kind (the lines' names up to the
/// field class) are refused.
fn most_refused(lines: &[(String, Count)]) {
    let mut by: Vec<(String, Count)> = Vec::new();
    for (what, c) in lines {
        let key = what.rsplit_once(", ").map_or(what.as_str(), |k| k.0);
        tally(
            &mut by,
            key.to_string(),
            Count {
                cases: c.cases,
                refused: c.refused,
                accepted: c.accepted,
            },
        );
    }
    for (what, c) in &by {
        assert!(
            c.refused * 2 > c.cases,
            "{what}: only {} of {} refused",
            c.refused,
            c.cases
        );
    }
}

/// A valid first part followed by a corrupt later part: the case llama.cpp restores half of.
/// Every input of more than one part, every later part.
#[test]
fn valid_first_part_then_a_corrupt_one() {
    let lines = corrupt_parts("second part corrupt", |k, n| n > 1 && k > 0);
    most_refused(&lines);
    summary("second_part_corrupt", &lines);
}

/// A corrupt first part followed by a valid one (and the only part of a one-part state).
#[test]
fn corrupt_first_part_then_a_valid_one() {
    let lines = corrupt_parts("first part corrupt", |k, _| k == 0);
    most_refused(&lines);
    summary("first_part_corrupt", &lines);
}

/// The states of each configuration fed to every other (all refused unchanged where the
/// kinds differ; the hybrids with and without a rollback plane write the same layout, so
/// their states may be accepted), and each configuration's blobs restored with the other
/// flags (a `PARTIAL_ONLY` blob as a full one and the other way round).
#[test]
fn a_state_of_another_kind() {
    let mut lines = Vec::new();
    for a in &CONFIGS {
        let src = populated(a);
        let ins: Vec<(String, Vec<u8>, Target)> = [
            ("seq 0 blob", seq_blob(&src, 0, 0), 0),
            ("seq 3 blob", seq_blob(&src, 3, 0), 0),
            (
                "seq 0 blob PARTIAL_ONLY",
                seq_blob(&src, 0, PARTIAL),
                PARTIAL,
            ),
        ]
        .into_iter()
        .flat_map(|(w, b, flags)| {
            [1, -1].map(|dest| {
                (
                    format!("{w} into {dest}"),
                    b.clone(),
                    Target::Seq { dest, flags },
                )
            })
        })
        .chain([("whole state".to_string(), whole(&src), Target::Whole)])
        .collect();
        for b in &CONFIGS {
            let mut m = populated(b);
            let mut c = Count::default();
            for (what, bytes, t) in &ins {
                let what = format!("{}'s {what}", a.name);
                if a.name == b.name {
                    // the same configuration, the other flags
                    let Target::Seq { dest, flags } = *t else {
                        continue;
                    };
                    let t = Target::Seq {
                        dest,
                        flags: flags ^ PARTIAL,
                    };
                    let (o, _) = feed(
                        &m,
                        b,
                        bytes,
                        t,
                        &format!("{what} with flags {}", flags ^ PARTIAL),
                    );
                    c.add(o);
                    if o == Outcome::Accepted {
                        m = populated(b);
                    }
                    continue;
                }
                let (o, _) = feed(&m, b, bytes, *t, &what);
                if a.kind != b.kind {
                    assert_eq!(o, Outcome::Refused, "{what} accepted by {}", b.name);
                }
                c.add(o);
                if o == Outcome::Accepted {
                    m = populated(b);
                }
            }
            let what = if a.name == b.name {
                format!("{}, flags swapped", a.name)
            } else {
                format!("{} into {}", a.name, b.name)
            };
            lines.push((what, c));
        }
    }
    summary("another_kind", &lines);
}

/// Trailing bytes after a valid state: ignored and not counted (the bytes read are the
/// state's), the memory as after the same state without them.
#[test]
fn trailing_bytes_are_ignored_and_not_counted() {
    let mut lines = Vec::new();
    for cfg in &CONFIGS {
        let mut c = Count::default();
        for i in inputs(&populated(cfg)) {
            for &t in &i.targets {
                for junk in [&[0u8][..], &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], &[0xff; 64]] {
                    let (clean, dirty) = (populated(cfg), populated(cfg));
                    let mut g = i.bytes.clone();
                    g.extend_from_slice(junk);
                    let n = i.bytes.len();
                    assert_eq!(restore(&clean, &i.bytes, t), n, "{}", last_error());
                    assert_eq!(
                        restore(&dirty, &g, t),
                        n,
                        "{}: {} ({t:?}) with {} trailing bytes: {}",
                        cfg.name,
                        i.what,
                        junk.len(),
                        last_error()
                    );
                    assert_eq!(snapshot(&clean, cfg), snapshot(&dirty, cfg));
                    c.add(Outcome::Accepted);
                }
            }
        }
        lines.push((cfg.name.to_string(), c));
    }
    summary("trailing_bytes", &lines);
}

/// The corpora's valid inputs are restored: each sequence blob into every sequence then
/// writes the same state (but for its header's stored id), the whole state reads into a fresh
/// memory and writes the same bytes, and the reader path restores what the blob path does.
#[test]
fn good_states_round_trip() {
    for cfg in &CONFIGS {
        for flags in FLAGS {
            for src in 0..N_SEQ as i32 {
                for dest in 0..N_SEQ as i32 {
                    let m = populated(cfg);
                    let b = seq_blob(&m, src, flags);
                    let t = Target::Seq { dest, flags };
                    assert_eq!(restore(&m, &b, t), b.len(), "{}", last_error());
                    // the same state, its cells' ids now dest
                    let mut want = b.clone();
                    for p in parts(cfg, flags, &b, 8) {
                        for (off, class) in p.fields {
                            if class == Field::SeqId {
                                put32(&mut want, off, dest as u32);
                            }
                        }
                    }
                    assert!(
                        seq_blob(&m, dest, flags)[8..] == want[8..],
                        "{}: seq {src} -> {dest}, flags {flags}",
                        cfg.name
                    );
                    check_consistent(&m, cfg, "a valid blob");
                    let by_io = populated(cfg);
                    assert_eq!(restore_io(&by_io, &b, t), Some(LLAMA_MEMORY_OK));
                    let by_blob = populated(cfg);
                    assert_eq!(restore(&by_blob, &b, t), b.len());
                    assert_eq!(snapshot(&by_io, cfg), snapshot(&by_blob, cfg));
                }
            }
        }
        let m = populated(cfg);
        let w = whole(&m);
        let fresh = new_mem(cfg);
        assert_eq!(
            restore(&fresh, &w, Target::Whole),
            w.len(),
            "{}",
            last_error()
        );
        assert!(whole(&fresh) == w, "{}", cfg.name);
        assert_eq!(ranges(&fresh), ranges(&m));
    }
}
