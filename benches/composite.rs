//! The composite memories on stock llama.cpp (the pinned tree's own `llama_kv_cache_iswa` and
//! `llama_memory_hybrid`, built by a generated model's `create_memory` through the reference
//! shim's `cmpref_*`) and on llama-memory (`IswaMemory`, `Hybrid`, mirrored part by part from
//! the stock ones), in one run, with criterion as the harness. At the end the table (stock
//! median / ours median) is printed in Markdown for BENCHMARKS.md.
//!
//! - iSWA graph inputs (`iswa_masks_*`): a Gemma-3-like pair (6 layers, a 1024-token window on
//!   layers 0-4, layer 5 global; n_ubatch 512, the SWA half sized by upstream's rule) filled
//!   by 1 or 16 sequences to `n_ctx - 1024` of its 32768 / 131072 base cells, then one ubatch
//!   (`dec`: one token per sequence; `p512`: 512 prompt tokens of sequence 0) placed on both;
//!   timed: the f32 causal KQ masks of both halves for that ubatch (stock: each part's
//!   `set_input_kq_mask` into the caller's array; ours: `KvCache::set_input_kq_mask` of each
//!   half); `memset` fills the same bytes with one memset per half (the floor for both).
//! - hybrid placement (`hybrid_place_*`): a jamba hybrid (two attention and two mamba layers)
//!   with 64 sequences of 256 tokens each in a 32768-cell attention cache; timed: one batch of
//!   one token per sequence (all outputs) split, planned and applied (stock: the shim's
//!   `init_batch`, i.e. `llama_batch_compat`, `llama_batch_allocr::init`, the hybrid's
//!   `init_batch` and `apply()` per ubatch, as `llama_decode`; ours: `batch::init_batch_whole`
//!   and `apply`). 128 such batches continue the sequences; then, untimed, both memories are
//!   restored from the same whole state.
//! - composite state (`state_*`): the memory part of sequence 5's state of a populated pair
//!   (the 32768-cell, 16-sequence one above) and hybrid (a wider jamba, 16 sequences of 1920
//!   tokens), written into a preallocated buffer and read back into the same sequence (stock:
//!   `cmpref_state_write` / `cmpref_state_read`; ours: `Memory::state_write` / `state_read`);
//!   `memcpy` copies the same number of bytes.
//!
//! Before timing the bench asserts that both sides hold the same cells in every part (and the
//! same splits), that both masks are bit-identical and that both state blobs are
//! byte-identical; after timing it checks the cells and outputs again.
//!
//! Run: `cargo bench --bench composite` (add `-- <filter>` to select benchmarks).

use std::ffi::c_void;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use llama_memory::batch::{init_batch_whole, Batch};
use llama_memory::hybrid::Hybrid;
use llama_memory::io::{Sink, StateIn, StateOut};
use llama_memory::iswa::IswaMemory;
use llama_memory::recurrent::RecurrentMemory;
use llama_memory::{KvContext, KvMemory, MaskOut, Memory, MemoryContext, Status};
use llama_memory_reference as stock;

mod common;
#[path = "../tests/common/composite_like.rs"]
mod composite_like;
use common::{human, median_ns};
use composite_like::{kv_like, rs_like};

/// The Gemma-3-like model: (n_layer, n_embd, n_swa, swa_pattern).
const GEMMA: (u32, u32, u32, u32) = (6, 256, 1024, 6);
/// `cparams.n_ubatch` of every memory here.
const N_UBATCH: u32 = 512;
/// Tokens per fill batch.
const FILL_BATCH: u32 = 4096;
/// Batches of the hybrid placement cycle between two resets.
const CYCLE: usize = 128;

/// What the bench needs of our composite: its parts in the shim's order.
trait Parts: Memory {
    /// The KV parts (0: base / attention, 1: SWA).
    fn kvs(&self) -> Vec<&KvMemory>;
    fn kvs_mut(&mut self) -> Vec<&mut KvMemory>;
    fn rs(&self) -> Option<&RecurrentMemory>;
    fn rs_mut(&mut self) -> Option<&mut RecurrentMemory>;
}

impl Parts for IswaMemory {
    fn kvs(&self) -> Vec<&KvMemory> {
        vec![&self.base, &self.swa]
    }
    fn kvs_mut(&mut self) -> Vec<&mut KvMemory> {
        vec![&mut self.base, &mut self.swa]
    }
    fn rs(&self) -> Option<&RecurrentMemory> {
        None
    }
    fn rs_mut(&mut self) -> Option<&mut RecurrentMemory> {
        None
    }
}

impl Parts for Hybrid {
    fn kvs(&self) -> Vec<&KvMemory> {
        vec![&self.attn]
    }
    fn kvs_mut(&mut self) -> Vec<&mut KvMemory> {
        vec![&mut self.attn]
    }
    fn rs(&self) -> Option<&RecurrentMemory> {
        Some(&self.recr)
    }
    fn rs_mut(&mut self) -> Option<&mut RecurrentMemory> {
        Some(&mut self.recr)
    }
}

// ---------------------------------------------------------------------------------------------
// batches

/// A batch continuing some sequences: `counts[s]` tokens of sequence `s` each, in chunks of
/// `chunk` tokens round-robin; every token an output when `all_out`.
fn continue_batch(
    next: &mut [i32],
    counts: &[u32],
    chunk: u32,
    all_out: bool,
) -> stock::TokenBatch {
    let mut b = stock::TokenBatch::default();
    let mut left = counts.to_vec();
    while left.iter().any(|&n| n > 0) {
        for (s, n) in left.iter_mut().enumerate() {
            let k = (*n).min(chunk);
            for _ in 0..k {
                let p = next[s];
                b.push(p.rem_euclid(32), p, &[s as i32]);
                next[s] += 1;
            }
            *n -= k;
        }
    }
    if all_out {
        b.logits = Some(vec![true; b.tokens.len()]);
    }
    b
}

/// Our side of a batch: the arrays of a [`Batch`], owned.
struct OurBatch {
    tokens: Vec<i32>,
    pos: Vec<i32>,
    off: Vec<u32>,
    ids: Vec<i32>,
    out: Vec<i8>,
}

impl OurBatch {
    fn new(tb: &stock::TokenBatch) -> OurBatch {
        let mut off = vec![0u32];
        let mut ids = Vec::new();
        for s in &tb.seq_ids {
            ids.extend_from_slice(s);
            off.push(ids.len() as u32);
        }
        let n = tb.n_tokens();
        let out = match &tb.logits {
            Some(l) => l.iter().map(|&b| b as i8).collect(),
            None => (0..n).map(|i| (i + 1 == n) as i8).collect(),
        };
        OurBatch {
            tokens: tb.tokens.clone(),
            pos: tb.pos.clone().unwrap(),
            off,
            ids,
            out,
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            token: Some(&self.tokens),
            pos: &self.pos,
            n_pos: 1,
            seq_off: &self.off,
            seq_ids: &self.ids,
            output: Some(&self.out),
        }
    }
}

/// Ours: split, plan and apply every ubatch of `b`; the context (at its last ubatch) and the
/// batch indices of each ubatch.
fn place_ours(mem: &mut dyn Memory, b: &Batch<'_>) -> (Box<dyn MemoryContext>, Vec<Vec<u32>>) {
    let (mut ctx, splits) = init_batch_whole(mem, b, N_UBATCH, false).unwrap();
    assert_eq!(ctx.status(), Status::Success, "ours: no slot");
    let n = splits.len();
    for k in 0..n {
        ctx.apply(mem).unwrap();
        if k + 1 < n {
            ctx.next();
        }
    }
    (ctx, splits.into_iter().map(|s| s.idxs).collect())
}

// ---------------------------------------------------------------------------------------------
// the stock shim called directly

/// Mirror of `cmpref_split`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawSplit([u32; 7]);

type InitBatchFn = unsafe extern "C" fn(
    *mut c_void,
    *const i32,
    *const i32,
    *const i32,
    *const *const i32,
    *const i8,
    u32,
    u32,
    bool,
    bool,
    *mut RawSplit,
    u32,
    *mut i32,
    *mut u32,
) -> i32;
type StateWriteFn = unsafe extern "C" fn(*const c_void, i32, u32, *mut u8, usize) -> usize;

/// `cmpref_init_batch` and `cmpref_state_write` called directly with caller buffers:
/// `RefComposite::init_batch` copies the batch into fresh arrays and returns fresh `Vec`s, and
/// `RefComposite::state_write` sizes and allocates its output, which timing would add to the
/// stock side only. The shim is already loaded by `llama_memory_reference`; `RTLD_NOLOAD`
/// returns that same instance.
struct StockCmp {
    ptr: *mut c_void,
    init_batch: InitBatchFn,
    state_write: StateWriteFn,
}

/// A stock batch with its arrays and output buffers, built once.
struct StockBatch {
    tokens: Vec<i32>,
    pos: Vec<i32>,
    n_seq_id: Vec<i32>,
    _seq_ids: Vec<Vec<i32>>,
    seq_ptrs: Vec<*const i32>,
    logits: Vec<i8>,
    splits: Vec<RawSplit>,
    idxs: Vec<i32>,
}

impl StockBatch {
    fn new(tb: &stock::TokenBatch) -> StockBatch {
        let n = tb.tokens.len();
        let seq_ids = tb.seq_ids.clone();
        let seq_ptrs = seq_ids.iter().map(|s| s.as_ptr()).collect();
        StockBatch {
            tokens: tb.tokens.clone(),
            pos: tb.pos.clone().unwrap(),
            n_seq_id: tb.seq_ids.iter().map(|s| s.len() as i32).collect(),
            _seq_ids: seq_ids,
            seq_ptrs,
            logits: match &tb.logits {
                Some(l) => l.iter().map(|&b| b as i8).collect(),
                None => (0..n).map(|i| (i + 1 == n) as i8).collect(),
            },
            splits: vec![RawSplit::default(); n],
            idxs: vec![0; n],
        }
    }
}

impl StockCmp {
    fn new(r: &stock::RefComposite) -> StockCmp {
        let ptr = common::debug_ptr(&format!("{r:?}"), "RefComposite") as *mut c_void;
        let sym = common::shim_symbol;
        // SAFETY: the symbols are the cmpref.h functions whose C prototypes the types below
        // transcribe.
        let s = unsafe {
            let kind: unsafe extern "C" fn(*const c_void) -> i32 =
                std::mem::transmute(sym("cmpref_kind"));
            let want = match r.kind() {
                stock::CompositeKind::Kv => 0,
                stock::CompositeKind::Iswa => 1,
                stock::CompositeKind::Hybrid => 2,
                stock::CompositeKind::HybridIswa => 3,
            };
            assert_eq!(kind(ptr), want, "not the stock memory's pointer");
            StockCmp {
                ptr,
                init_batch: std::mem::transmute::<*mut c_void, InitBatchFn>(sym(
                    "cmpref_init_batch",
                )),
                state_write: std::mem::transmute::<*mut c_void, StateWriteFn>(sym(
                    "cmpref_state_write",
                )),
            }
        };
        assert_eq!(
            s.write_raw(r, -1, std::ptr::null_mut(), 0),
            r.state_size(-1, 0),
            "not the stock memory's pointer"
        );
        s
    }

    /// The whole stock batch path, every ubatch applied: the number of ubatches.
    /// `_owner` is the memory whose pointer this holds, borrowed mutably for the call.
    fn init_batch(&self, _owner: &mut stock::RefComposite, b: &mut StockBatch) -> u32 {
        let n = b.tokens.len() as u32;
        let mut n_split = 0u32;
        // SAFETY: `ptr` is the live memory of `_owner`, borrowed mutably for the call; every
        // input array holds n entries and `splits` / `idxs` have room for n ubatches and n
        // indices (what the shim writes at most).
        let ret = unsafe {
            (self.init_batch)(
                self.ptr,
                b.tokens.as_ptr(),
                b.pos.as_ptr(),
                b.n_seq_id.as_ptr(),
                b.seq_ptrs.as_ptr(),
                b.logits.as_ptr(),
                n,
                N_UBATCH,
                false,
                false,
                b.splits.as_mut_ptr(),
                n,
                b.idxs.as_mut_ptr(),
                &mut n_split,
            )
        };
        assert_eq!(ret, 0, "stock init_batch failed");
        n_split
    }

    fn write_raw(&self, _owner: &stock::RefComposite, seq: i32, buf: *mut u8, len: usize) -> usize {
        // SAFETY: `ptr` is the live memory of `_owner`, borrowed for the call; `buf` is null
        // (size query) or writable for `len` bytes, which the shim respects.
        unsafe { (self.state_write)(self.ptr, seq, 0, buf, len) }
    }

    /// Stock `state_write(seq, 0)` into `buf`: bytes written, 0 on failure.
    fn state_write(&self, owner: &stock::RefComposite, seq: i32, buf: &mut [u8]) -> usize {
        self.write_raw(owner, seq, buf.as_mut_ptr(), buf.len())
    }
}

// ---------------------------------------------------------------------------------------------
// both sides

struct Pair<M: Parts> {
    name: String,
    ours: M,
    theirs: stock::RefComposite,
    n_seq: u32,
}

fn cmp_params(n_ctx: u32, n_seq: u32) -> stock::CmpParams {
    stock::CmpParams {
        n_ctx,
        n_seq_max: n_seq,
        unified: true,
        swa_full: false,
        n_ubatch: N_UBATCH,
        v_trans: true,
        n_rs_seq: 0,
        ..stock::CmpParams::default()
    }
}

impl Pair<IswaMemory> {
    fn iswa(n_ctx: u32, n_seq: u32) -> Self {
        let (n_layer, n_embd, n_swa, pattern) = GEMMA;
        let model = stock::gemma3_model_path_ex(n_layer, n_embd, n_swa, pattern);
        let theirs =
            stock::RefComposite::new(&model, &cmp_params(n_ctx, n_seq)).expect("stock iSWA");
        assert_eq!(theirs.kind(), stock::CompositeKind::Iswa);
        let base = kv_like(&theirs.part_kv(0).unwrap());
        let swa = kv_like(&theirs.part_kv(1).unwrap());
        let ours = IswaMemory::from_parts(base, swa).unwrap();
        let sz = llama_memory::iswa::swa_size(n_ctx, n_swa, true, n_seq, N_UBATCH, false);
        assert_eq!(ours.swa.cache.size(), sz, "SWA size");
        Pair {
            name: format!("gemma3_nctx{n_ctx}_{n_seq}seq"),
            ours,
            theirs,
            n_seq,
        }
    }
}

impl Pair<Hybrid> {
    fn hybrid(model: &std::path::Path, n_ctx: u32, n_seq: u32) -> Self {
        let theirs =
            stock::RefComposite::new(model, &cmp_params(n_ctx, n_seq)).expect("stock hybrid");
        assert_eq!(theirs.kind(), stock::CompositeKind::Hybrid);
        let kv = kv_like(&theirs.part_kv(0).unwrap());
        let rs = rs_like(&theirs.part_rs().unwrap());
        Pair {
            name: String::new(),
            ours: Hybrid::new(kv, rs).unwrap(),
            theirs,
            n_seq,
        }
    }
}

impl<M: Parts> Pair<M> {
    fn next_pos(&self) -> Vec<i32> {
        (0..self.n_seq as i32)
            .map(|s| self.ours.seq_pos_max(s).unwrap() + 1)
            .collect()
    }

    /// Places `tb` on both (stock through the reference crate: untimed); checks the splits.
    /// Our context (at the last ubatch) and stock's last split.
    fn place(&mut self, tb: &stock::TokenBatch) -> (Box<dyn MemoryContext>, stock::Split) {
        let theirs = self
            .theirs
            .init_batch(tb, N_UBATCH, false, false)
            .expect("stock init_batch");
        let ob = OurBatch::new(tb);
        let (ctx, splits) = place_ours(&mut self.ours, &ob.batch());
        let want: Vec<Vec<u32>> = theirs
            .iter()
            .map(|s| s.batch_idxs.iter().map(|&i| i as u32).collect())
            .collect();
        assert!(splits == want, "{}: the splits differ", self.name);
        (ctx, theirs.last().unwrap().clone())
    }

    /// Each sequence filled to `per_seq` more tokens, in batches of [`FILL_BATCH`] tokens.
    fn fill(&mut self, per_seq: u32) {
        let mut next = self.next_pos();
        let chunk = FILL_BATCH / self.n_seq;
        let mut left = per_seq;
        while left > 0 {
            let n = left.min(chunk);
            let tb = continue_batch(&mut next, &vec![n; self.n_seq as usize], n, false);
            self.place(&tb);
            left -= n;
        }
        self.assert_same("fill");
    }

    /// Every cell of every part, heads and used counts, each sequence's positions.
    fn assert_same(&self, what: &str) {
        let name = &self.name;
        for (k, o) in self.ours.kvs().into_iter().enumerate() {
            let t = self.theirs.part_kv(k as u32).unwrap();
            let c = &o.cache;
            for s in 0..c.n_stream() {
                let tc = t.cells(s);
                let oc = c.cells(s);
                assert!(
                    oc.pos_all() == tc.pos.as_slice(),
                    "{name} {what}: part {k} positions differ"
                );
                assert!(
                    oc.seq_words()
                        .iter()
                        .zip(&tc.seq)
                        .all(|(a, b)| a.data == *b),
                    "{name} {what}: part {k} sequences differ"
                );
                let ti = t.stream_info(s);
                assert_eq!(
                    (c.head(s), oc.get_used()),
                    (ti.head, ti.used),
                    "{name} {what}: part {k} (head, used)"
                );
            }
        }
        if let Some(o) = self.ours.rs() {
            let t = self.theirs.part_rs().unwrap();
            let c = &o.cache;
            assert_eq!((c.head(), c.used()), (t.head(), t.used()), "{name} {what}");
            for (i, (a, b)) in c.cells().iter().zip(t.cells()).enumerate() {
                let seqs: Vec<i32> = a.seq.iter_ones().map(|q| q as i32).collect();
                assert!(
                    (a.pos, a.tail, &seqs) == (b.pos, b.tail, &b.seqs),
                    "{name} {what}: recurrent cell {i}"
                );
            }
        }
        for s in 0..self.n_seq as i32 {
            assert_eq!(
                (
                    self.ours.seq_pos_min(s).unwrap(),
                    self.ours.seq_pos_max(s).unwrap()
                ),
                (self.theirs.seq_pos_min(s), self.theirs.seq_pos_max(s)),
                "{name} {what}: seq {s}"
            );
        }
    }

    /// The same pseudo-random bytes in every tensor of both sides.
    fn randomize(&mut self) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8 | 1
                })
                .collect()
        };
        for k in 0..self.ours.kvs().len() {
            let layers = self.ours.kvs()[k]
                .storage
                .as_ref()
                .unwrap()
                .layers()
                .to_vec();
            for l in layers {
                for (v, t) in [(false, l.k), (true, l.v)] {
                    if t.is_null() {
                        continue;
                    }
                    let mut kvs = self.ours.kvs_mut();
                    let st = kvs[k].storage.as_mut().unwrap();
                    let bytes = noise(st.n_bytes(t).unwrap());
                    st.set(t, 0, &bytes).unwrap();
                    drop(kvs);
                    let mut part = self.theirs.part_kv_mut(k as u32).unwrap();
                    assert!(part.set_tensor_bytes(v, l.il as i32, &bytes));
                }
            }
        }
        let Some(rs) = self.ours.rs() else { return };
        let layers = rs.storage.as_ref().unwrap().layers().to_vec();
        for l in layers {
            for (t, is_r) in [(l.r, true), (l.s, false)] {
                let n = {
                    let p = self.theirs.part_rs().unwrap();
                    if is_r {
                        p.r_bytes(l.il).len()
                    } else {
                        p.s_bytes(l.il).len()
                    }
                };
                if n == 0 {
                    continue;
                }
                let bytes = noise(n);
                let st = self.ours.rs_mut().unwrap().storage.as_mut().unwrap();
                st.set(t, 0, &bytes).unwrap();
                let mut p = self.theirs.part_rs_mut().unwrap();
                if is_r {
                    p.set_r_bytes(l.il, &bytes);
                } else {
                    p.set_s_bytes(l.il, &bytes);
                }
            }
        }
    }
}

fn save_ours(mem: &dyn Memory, seq: i32, buf: &mut [u8]) -> usize {
    let mut sink = Sink::new(buf);
    mem.state_write(
        seq,
        0,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    sink.len()
}

fn our_state(mem: &dyn Memory, seq: i32) -> Vec<u8> {
    let mut sink = Sink::Count(0);
    mem.state_write(
        seq,
        0,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; sink.len()];
    assert_eq!(save_ours(mem, seq, &mut buf), buf.len());
    buf
}

// ---------------------------------------------------------------------------------------------
// the table

/// One row: the group, its stock and ours benchmark ids, the bytes each call writes (masks,
/// state) and the group's floor benchmark (memset of the masks' bytes, memcpy of the state's),
/// if any.
struct Row {
    label: String,
    group: String,
    stock: &'static str,
    ours: &'static str,
    bytes: Option<usize>,
    floor: Option<&'static str>,
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

// ---------------------------------------------------------------------------------------------
// benchmarks

/// The masks of both halves for the ubatch just placed: timed, asserted equal before and
/// after timing.
fn bench_masks_for(
    c: &mut Criterion,
    rows: &mut Vec<Row>,
    p: &Pair<IswaMemory>,
    ctx: &dyn MemoryContext,
    split: &stock::Split,
    tb: &stock::TokenBatch,
    label: &str,
) {
    let ub = split.ubatch(tb, 1);
    let view = ub.view();
    let our_ub = ctx.ubatch().unwrap();
    fn walk<'a>(c: &'a dyn MemoryContext, out: &mut Vec<&'a KvContext>) {
        if let Some(k) = c.as_any().downcast_ref::<KvContext>() {
            out.push(k);
        }
        let mut i = 0;
        while let Some((_, p)) = c.part(i) {
            walk(p, out);
            i += 1;
        }
    }
    let mut kctx: Vec<&KvContext> = Vec::new();
    walk(ctx, &mut kctx);
    assert_eq!(kctx.len(), 2, "one context per half");
    let halves = [&p.ours.base.cache, &p.ours.swa.cache];
    let parts = [p.theirs.part_kv(0).unwrap(), p.theirs.part_kv(1).unwrap()];
    let mut n_kv = [0u32; 2];
    for k in 0..2 {
        n_kv[k] = halves[k].get_n_kv(kctx[k].slot().unwrap());
        let tslot = p.theirs.last_slot(k as u32).unwrap();
        assert_eq!(
            n_kv[k],
            parts[k].get_n_kv(&tslot),
            "{label}: n_kv of part {k}"
        );
    }
    let n_tokens = view.n_tokens() as usize;
    let mut out_stock: Vec<Vec<f32>> = n_kv
        .iter()
        .map(|&n| vec![1.0f32; n as usize * n_tokens])
        .collect();
    let mut out_ours = out_stock.clone();
    let run_stock = |out: &mut [Vec<f32>]| {
        for k in 0..2 {
            parts[k].kq_mask_f32_into(&view, true, n_kv[k], 1, &mut out[k]);
        }
    };
    let run_ours = |out: &mut [Vec<f32>]| {
        for k in 0..2 {
            halves[k]
                .set_input_kq_mask(&our_ub, true, n_kv[k], 1, MaskOut::F32(&mut out[k]))
                .unwrap();
        }
    };
    let check = |a: &[Vec<f32>], b: &[Vec<f32>], when: &str| {
        for k in 0..2 {
            assert!(
                a[k].iter()
                    .zip(&b[k])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{label}: masks of part {k} differ {when}"
            );
        }
    };
    run_stock(&mut out_stock);
    run_ours(&mut out_ours);
    check(&out_stock, &out_ours, "before timing");
    let bytes = (n_kv[0] + n_kv[1]) as usize * n_tokens * 4;
    let mut g = c.benchmark_group(label);
    if bytes > 16 << 20 {
        g.sampling_mode(SamplingMode::Flat);
    }
    g.bench_function("stock", |b| b.iter(|| run_stock(black_box(&mut out_stock))));
    g.bench_function("ours", |b| b.iter(|| run_ours(black_box(&mut out_ours))));
    // the floor for both: a plain fill of the same bytes (one memset per half)
    let mut out_memset = out_stock.clone();
    g.bench_function("memset", |b| {
        b.iter(|| {
            for o in black_box(&mut out_memset[..]) {
                o.fill(0.0);
            }
        })
    });
    g.finish();
    check(&out_stock, &out_ours, "after timing");
    rows.push(Row {
        label: format!("{label} (n_kv {} + {}, {n_tokens} tok)", n_kv[0], n_kv[1]),
        group: label.to_string(),
        stock: "stock",
        ours: "ours",
        bytes: Some(bytes),
        floor: Some("memset"),
    });
}

fn bench_iswa(c: &mut Criterion, rows: &mut Vec<Row>) -> Pair<IswaMemory> {
    let mut keep = None;
    for n_ctx in [32_768u32, 131_072] {
        for n_seq in [1u32, 16] {
            let t0 = Instant::now();
            let mut p = Pair::iswa(n_ctx, n_seq);
            p.fill((n_ctx - 1024) / n_seq);
            eprintln!(
                "{}: built and filled both in {:.1} s",
                p.name,
                t0.elapsed().as_secs_f64()
            );
            // one token per sequence, then a 512-token prompt ubatch of sequence 0
            for (tag, counts) in [
                ("dec", vec![1u32; n_seq as usize]),
                ("p512", {
                    let mut v = vec![0u32; n_seq as usize];
                    v[0] = 512;
                    v
                }),
            ] {
                let before = p.next_pos();
                let mut next = before.clone();
                let tb = continue_batch(&mut next, &counts, 512, true);
                let (ctx, split) = p.place(&tb);
                p.assert_same(tag);
                let label = format!("iswa_masks_nctx{n_ctx}_{n_seq}seq_{tag}");
                bench_masks_for(c, rows, &p, &*ctx, &split, &tb, &label);
                drop(ctx);
                for (s, &n) in counts.iter().enumerate() {
                    if n > 0 {
                        let s = s as i32;
                        assert!(p.ours.seq_rm(s, before[s as usize], -1).unwrap());
                        assert!(p.theirs.seq_rm(s, before[s as usize], -1));
                    }
                }
                p.assert_same("seq_rm");
            }
            if n_ctx == 32_768 && n_seq == 16 {
                keep = Some(p);
            }
        }
    }
    keep.unwrap()
}

fn bench_state<M: Parts>(c: &mut Criterion, rows: &mut Vec<Row>, p: &mut Pair<M>, seq: i32) {
    p.randomize();
    let name = format!("state_{}_seq{seq}", p.name);
    let blob = our_state(&p.ours, seq);
    let len = blob.len();
    assert!(
        p.theirs.state_write(seq, 0) == blob,
        "{name}: state blobs differ"
    );
    let sc = StockCmp::new(&p.theirs);
    let mut out_stock = vec![1u8; len];
    let mut out_ours = vec![1u8; len];
    let mut out_copy = vec![1u8; len];
    assert_eq!(sc.state_write(&p.theirs, seq, &mut out_stock), len);
    assert_eq!(save_ours(&p.ours, seq, &mut out_ours), len);
    assert!(out_stock == blob && out_ours == blob);
    let mut g = c.benchmark_group(&name);
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("memcpy", |b| {
        b.iter(|| out_copy.copy_from_slice(black_box(&blob)));
        black_box(&out_copy);
    });
    g.bench_function("save_stock", |b| {
        b.iter(|| black_box(sc.state_write(&p.theirs, seq, &mut out_stock)))
    });
    g.bench_function("save_ours", |b| {
        b.iter(|| black_box(save_ours(&p.ours, seq, &mut out_ours)))
    });
    g.bench_function("restore_stock", |b| {
        b.iter(|| assert!(p.theirs.state_read(seq, 0, black_box(&blob)).is_some()))
    });
    g.bench_function("restore_ours", |b| {
        b.iter(|| {
            p.ours
                .state_read(seq, 0, &mut StateIn::new(black_box(&blob)))
                .unwrap()
        })
    });
    g.finish();
    p.assert_same("after the state benchmarks");
    assert!(out_stock == blob && out_ours == blob, "{name}: saved blobs");
    assert!(our_state(&p.ours, seq) == blob && p.theirs.state_write(seq, 0) == blob);
    for (op, stock_id, ours_id) in [
        ("save", "save_stock", "save_ours"),
        ("restore", "restore_stock", "restore_ours"),
    ] {
        rows.push(Row {
            label: format!("{name} {op}"),
            group: name.clone(),
            stock: stock_id,
            ours: ours_id,
            bytes: Some(len),
            floor: Some("memcpy"),
        });
    }
}

fn bench_hybrid_place(c: &mut Criterion, rows: &mut Vec<Row>) {
    const N_SEQ: u32 = 64;
    const N_CTX: u32 = 32_768;
    let mut p = Pair::hybrid(&stock::jamba_model_path(), N_CTX, N_SEQ);
    p.name = format!("jamba_nctx{N_CTX}_{N_SEQ}seq");
    // 64 sequences of 256 tokens (the equal split interleaves them in 8-token chunks)
    p.fill(256);
    let reset = our_state(&p.ours, -1);
    assert!(p.theirs.state_write(-1, 0) == reset, "whole states differ");
    // the cycle: CYCLE batches of one token per sequence, each continuing the last
    let mut next = p.next_pos();
    let tbs: Vec<stock::TokenBatch> = (0..CYCLE)
        .map(|_| continue_batch(&mut next, &vec![1; N_SEQ as usize], 1, true))
        .collect();
    let ours_b: Vec<OurBatch> = tbs.iter().map(OurBatch::new).collect();
    let mut stock_b: Vec<StockBatch> = tbs.iter().map(StockBatch::new).collect();
    let sc = StockCmp::new(&p.theirs);
    let reset_both = |p: &mut Pair<Hybrid>| {
        assert!(p.theirs.state_read(-1, 0, &reset).is_some());
        p.ours.state_read(-1, 0, &mut StateIn::new(&reset)).unwrap();
    };
    // one batch on both through the timed paths, then the same cells and splits
    reset_both(&mut p);
    p.assert_same("reset");
    let n_ub = sc.init_batch(&mut p.theirs, &mut stock_b[0]);
    let (_, splits) = place_ours(&mut p.ours, &ours_b[0].batch());
    assert_eq!(n_ub as usize, splits.len());
    assert_eq!(splits.len(), 1, "one ubatch of 64 sequence sets");
    let sb = &stock_b[0];
    let want: Vec<u32> = sb.idxs.iter().map(|&i| i as u32).collect();
    assert!(splits[0] == want, "the splits differ");
    p.assert_same("first batch");

    let name = format!("hybrid_place_{}_1tok_each", p.name);
    let mut g = c.benchmark_group(&name);
    let mut k = CYCLE;
    g.bench_function("stock", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if k == CYCLE {
                    assert!(p.theirs.state_read(-1, 0, &reset).is_some());
                    k = 0;
                }
                let t = Instant::now();
                black_box(sc.init_batch(&mut p.theirs, &mut stock_b[k]));
                total += t.elapsed();
                k += 1;
            }
            total
        })
    });
    let mut k = CYCLE;
    g.bench_function("ours", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if k == CYCLE {
                    p.ours.state_read(-1, 0, &mut StateIn::new(&reset)).unwrap();
                    k = 0;
                }
                let t = Instant::now();
                black_box(place_ours(&mut p.ours, &ours_b[k].batch()));
                total += t.elapsed();
                k += 1;
            }
            total
        })
    });
    g.finish();
    // both again from the reset state through a whole cycle: the same cells
    reset_both(&mut p);
    for k in 0..CYCLE {
        sc.init_batch(&mut p.theirs, &mut stock_b[k]);
        place_ours(&mut p.ours, &ours_b[k].batch());
    }
    p.assert_same("a whole cycle");
    rows.push(Row {
        label: name.clone(),
        group: name,
        stock: "stock",
        ours: "ours",
        bytes: None,
        floor: None,
    });
}

fn main() {
    common::start_run();
    let mut c = common::criterion(Duration::from_secs(1), 10);
    let mut rows = Vec::new();
    bench_hybrid_place(&mut c, &mut rows);
    let mut pair = bench_iswa(&mut c, &mut rows);
    bench_state(&mut c, &mut rows, &mut pair, 5);
    drop(pair);
    // a wider jamba (K/V rows of 128 f16, recurrent rows of 1536 + 8192 floats), 16 sequences
    // of 1920 tokens
    let mut h = Pair::hybrid(
        &stock::jamba_model_path_ex(256, &stock::JAMBA_HEAD_KV),
        32_768,
        16,
    );
    h.name = "jamba_e256_nctx32768_16seq".into();
    h.fill(1920);
    bench_state(&mut c, &mut rows, &mut h, 5);
    c.final_summary();

    let dir = common::criterion_dir();
    println!(
        "\n| benchmark | bytes | stock llama.cpp (median) | llama-memory (median) \
         | ratio (stock / ours) | floor (median) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (Some(s), Some(o)) = (
            median_ns(&dir, &r.group, r.stock),
            median_ns(&dir, &r.group, r.ours),
        ) else {
            continue;
        };
        let m = r
            .floor
            .and_then(|f| median_ns(&dir, &r.group, f))
            .map_or("–".into(), |m| {
                format!("{} ({})", human(m), r.floor.unwrap())
            });
        println!(
            "| {} | {} | {} | {} | {:.2}x | {m} |",
            r.label,
            r.bytes.map_or("–".into(), human_bytes),
            human(s),
            human(o),
            s / o
        );
    }
}
