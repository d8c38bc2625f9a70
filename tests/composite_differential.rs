//! Differential suite of the composite memories: random traces replayed on the pinned
//! llama.cpp's own `llama_kv_cache_iswa`, `llama_memory_hybrid` and `llama_memory_hybrid_iswa`
//! (built by the generated gemma3, jamba, lfm2 and lfm2-with-SWA models' own `create_memory`,
//! through the reference shim) and on this library's (`IswaMemory`, `Hybrid`, `HybridIswa`),
//! compared after every step.
//!
//! Each batch goes through the whole stock path (`llama_batch_allocr` and the composite's
//! `init_batch`: its split strategy, its retry, each part's `prepare`) and through ours
//! (`batch::init_batch_whole`): the splits (every ubatch's batch indices, sets, kind), the
//! status, then every cell of every part (positions, shifts, sequences, heads, used ranges;
//! the recurrent cells with their sources and tails), the composite's `seq_pos_min/max`,
//! `can_shift`, and the KQ masks and K indices of both attention halves for the last ubatch.
//! Sequence operations compare their return values; updates apply the K-shifts; states are
//! saved (with and without `PARTIAL_ONLY`) and compared byte for byte, then restored on both
//! sides. (The rotated keys of a K-shift are the caller's graph, compared with stock's in
//! `tests/kv_graph_compat.rs`: after an update our K tensors take stock's bytes.) Truncated states are refused by both; ours then changes nothing (stock's restore may
//! have changed a part, so the traces resynchronize from a valid restore of the same state).
//!
//! Coverage counters per op go into the summary and each must be non-zero. `SEED=<u64>` varies
//! the traces; `CMP_DIFF_OPS=<n>` sets the steps per configuration.

use std::collections::BTreeMap;

use llama_memory::batch::{init_batch_whole, Batch};
use llama_memory::hybrid::{Hybrid, HybridIswa};
use llama_memory::io::{Sink, StateIn, StateOut};
use llama_memory::iswa::IswaMemory;
use llama_memory::recurrent::RecurrentMemory;
use llama_memory::{KvContext, KvMemory, MaskOut, Memory, MemoryContext, Status};
use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::Rng;

#[path = "common/composite_like.rs"]
mod composite_like;
#[path = "common/diff.rs"]
mod diff;

use composite_like::{kv_like, rs_like};

const PARTIAL_ONLY: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Iswa,
    Hybrid,
    HybridIswa,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    kind: Kind,
    model: fn() -> std::path::PathBuf,
    n_ctx: u32,
    n_seq: u32,
    unified: bool,
    swa_full: bool,
    n_ubatch: u32,
    n_rs_seq: u32,
    v_trans: bool,
    ops: u64,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "iswa-unified",
        kind: Kind::Iswa,
        model: stock::gemma3_model_path,
        n_ctx: 512,
        n_seq: 4,
        unified: true,
        swa_full: false,
        n_ubatch: 16,
        n_rs_seq: 0,
        v_trans: true,
        ops: 45_000,
    },
    Config {
        name: "iswa-streams",
        kind: Kind::Iswa,
        model: stock::gemma3_model_path,
        n_ctx: 256,
        n_seq: 3,
        unified: false,
        swa_full: false,
        n_ubatch: 8,
        n_rs_seq: 0,
        v_trans: false,
        ops: 35_000,
    },
    Config {
        name: "iswa-swa-full",
        kind: Kind::Iswa,
        model: stock::gemma3_model_path,
        n_ctx: 256,
        n_seq: 2,
        unified: true,
        swa_full: true,
        n_ubatch: 32,
        n_rs_seq: 0,
        v_trans: true,
        ops: 20_000,
    },
    Config {
        name: "hybrid-jamba-unified",
        kind: Kind::Hybrid,
        model: stock::jamba_model_path,
        n_ctx: 256,
        n_seq: 3,
        unified: true,
        swa_full: false,
        n_ubatch: 16,
        n_rs_seq: 0,
        v_trans: true,
        ops: 40_000,
    },
    Config {
        name: "hybrid-lfm2-streams",
        kind: Kind::Hybrid,
        model: stock::lfm2_model_path,
        n_ctx: 256,
        n_seq: 3,
        unified: false,
        swa_full: false,
        n_ubatch: 8,
        n_rs_seq: 0,
        v_trans: false,
        ops: 30_000,
    },
    Config {
        name: "hybrid-lfm2-rollback",
        kind: Kind::Hybrid,
        model: stock::lfm2_model_path,
        n_ctx: 256,
        n_seq: 2,
        unified: true,
        swa_full: false,
        n_ubatch: 8,
        n_rs_seq: 2,
        v_trans: true,
        ops: 30_000,
    },
    Config {
        name: "hybrid-iswa-unified",
        kind: Kind::HybridIswa,
        model: stock::lfm2_swa_model_path,
        n_ctx: 512,
        n_seq: 3,
        unified: true,
        swa_full: false,
        n_ubatch: 16,
        n_rs_seq: 0,
        v_trans: true,
        ops: 55_000,
    },
    Config {
        name: "hybrid-iswa-streams",
        kind: Kind::HybridIswa,
        model: stock::lfm2_swa_model_path,
        n_ctx: 256,
        n_seq: 2,
        unified: false,
        swa_full: false,
        n_ubatch: 8,
        n_rs_seq: 0,
        v_trans: false,
        ops: 45_000,
    },
];

const COUNTERS: &[&str] = &[
    "batch: applied",
    "batch: failed prepare (both)",
    "batch: rejected by stock's allocator",
    "batch: several ubatches",
    "batch: equal split",
    "batch: shared tokens",
    "batch: embd_all (split by sequence)",
    "mask: compared",
    "seq_rm: true",
    "seq_rm: false",
    "seq_cp",
    "seq_keep",
    "seq_add",
    "seq_div",
    "update: applied",
    "state: seq saved and restored",
    "state: partial saved and restored",
    "state: whole saved and restored",
    "state: truncated refused, ours unchanged",
    "state: valid restore refused by both (no room)",
    "clear",
];

/// Our memory, of the configuration's kind.
#[allow(clippy::large_enum_variant)] // one per suite configuration, never moved
enum Ours {
    Iswa(IswaMemory),
    Hybrid(Hybrid),
    HybridIswa(HybridIswa),
}

impl Ours {
    fn mem(&self) -> &dyn Memory {
        match self {
            Ours::Iswa(m) => m,
            Ours::Hybrid(m) => m,
            Ours::HybridIswa(m) => m,
        }
    }
    fn mem_mut(&mut self) -> &mut dyn Memory {
        match self {
            Ours::Iswa(m) => m,
            Ours::Hybrid(m) => m,
            Ours::HybridIswa(m) => m,
        }
    }
    /// The KV parts in the shim's order (0: base / attention, 1: SWA).
    fn kvs(&self) -> Vec<&KvMemory> {
        match self {
            Ours::Iswa(m) => vec![&m.base, &m.swa],
            Ours::Hybrid(m) => vec![&m.attn],
            Ours::HybridIswa(m) => vec![&m.attn.base, &m.attn.swa],
        }
    }
    fn kvs_mut(&mut self) -> Vec<&mut KvMemory> {
        match self {
            Ours::Iswa(m) => vec![&mut m.base, &mut m.swa],
            Ours::Hybrid(m) => vec![&mut m.attn],
            Ours::HybridIswa(m) => vec![&mut m.attn.base, &mut m.attn.swa],
        }
    }
    fn rs(&self) -> Option<&RecurrentMemory> {
        match self {
            Ours::Iswa(_) => None,
            Ours::Hybrid(m) => Some(&m.recr),
            Ours::HybridIswa(m) => Some(&m.recr),
        }
    }
    fn rs_mut(&mut self) -> Option<&mut RecurrentMemory> {
        match self {
            Ours::Iswa(_) => None,
            Ours::Hybrid(m) => Some(&mut m.recr),
            Ours::HybridIswa(m) => Some(&mut m.recr),
        }
    }
}

fn noise(rng: &mut StdRng, n: usize, f16: bool) -> Vec<u8> {
    if f16 {
        (0..n / 2)
            .flat_map(|_| half::f16::from_f32(rng.gen_range(-2.0f32..2.0)).to_le_bytes())
            .collect()
    } else {
        (0..n / 4)
            .flat_map(|_| rng.gen_range(-2.0f32..2.0).to_le_bytes())
            .collect()
    }
}

fn our_state(m: &dyn Memory, seq: i32, flags: u32) -> Vec<u8> {
    let mut sink = Sink::Count(0);
    m.state_write(
        seq,
        flags,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; sink.len()];
    let mut sink = Sink::new(&mut buf);
    m.state_write(
        seq,
        flags,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    buf
}

struct Pair {
    cfg: Config,
    rng: StdRng,
    ours: Ours,
    theirs: stock::RefComposite,
    step: u64,
    last_op: String,
    cov: BTreeMap<&'static str, u64>,
    /// A restore both sides refused ran stock's recurrent slot search, which leaves its
    /// graph staging (`n`, `rs_z`) set; ours changes nothing. Not compared until the next batch
    /// sets it again on both sides.
    staging_stale: bool,
}

impl Pair {
    fn new(cfg: Config, seed: u64) -> Pair {
        let theirs = stock::RefComposite::new(
            &(cfg.model)(),
            &stock::CmpParams {
                n_ctx: cfg.n_ctx,
                n_seq_max: cfg.n_seq,
                unified: cfg.unified,
                swa_full: cfg.swa_full,
                n_ubatch: cfg.n_ubatch,
                v_trans: cfg.v_trans,
                n_rs_seq: cfg.n_rs_seq,
                ..stock::CmpParams::default()
            },
        )
        .expect("stock composite");
        let want = match cfg.kind {
            Kind::Iswa => stock::CompositeKind::Iswa,
            Kind::Hybrid => stock::CompositeKind::Hybrid,
            Kind::HybridIswa => stock::CompositeKind::HybridIswa,
        };
        assert_eq!(theirs.kind(), want, "{}", cfg.name);
        let kv0 = kv_like(&theirs.part_kv(0).unwrap());
        let pair_of = |kv0: KvMemory| {
            let kv1 = kv_like(&theirs.part_kv(1).unwrap());
            IswaMemory::from_parts(kv0, kv1).unwrap()
        };
        let ours = match cfg.kind {
            Kind::Iswa => {
                let m = pair_of(kv0);
                // the shim's sizes are llama.cpp's; ours come from the same rule
                let sz = llama_memory::iswa::swa_size(
                    cfg.n_ctx,
                    m.swa.cache.params().n_swa,
                    cfg.unified,
                    cfg.n_seq,
                    cfg.n_ubatch,
                    cfg.swa_full,
                );
                assert_eq!(m.swa.cache.size(), sz, "{}: SWA size", cfg.name);
                Ours::Iswa(m)
            }
            Kind::Hybrid => {
                let rs = rs_like(&theirs.part_rs().unwrap());
                Ours::Hybrid(Hybrid::new(kv0, rs).unwrap())
            }
            Kind::HybridIswa => {
                let rs = rs_like(&theirs.part_rs().unwrap());
                Ours::HybridIswa(HybridIswa::new(pair_of(kv0), rs).unwrap())
            }
        };
        let mut pair = Pair {
            cfg,
            rng: diff::rng(seed, cfg.name),
            ours,
            theirs,
            step: 0,
            last_op: "new".into(),
            cov: COUNTERS.iter().map(|&c| (c, 0)).collect(),
            staging_stale: false,
        };
        pair.randomize_tensors();
        pair.compare();
        pair
    }

    /// Names the operation running (printed as it starts with `DIFF_TRACE`: stock aborts
    /// leave no panic message).
    fn set_op(&mut self, op: impl Into<String>) {
        self.last_op = op.into();
        if std::env::var_os("DIFF_TRACE").is_some() {
            eprintln!("{} step {}: {}", self.cfg.name, self.step, self.last_op);
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.cov.get_mut(what).expect(what) += 1;
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "{}: step {} after {}: {what}",
            self.cfg.name, self.step, self.last_op
        );
    }

    /// The same random bytes in every tensor of both sides.
    fn randomize_tensors(&mut self) {
        let n_kv = self.ours.kvs().len();
        for k in 0..n_kv {
            let Some(st) = self.ours.kvs()[k].storage.as_ref() else {
                continue;
            };
            let layers: Vec<_> = st.layers().to_vec();
            for l in layers {
                for (v, t) in [(false, l.k), (true, l.v)] {
                    if t.is_null() {
                        continue;
                    }
                    let n = self.ours.kvs()[k]
                        .storage
                        .as_ref()
                        .unwrap()
                        .n_bytes(t)
                        .unwrap();
                    let bytes = noise(&mut self.rng, n, true);
                    self.ours.kvs_mut()[k]
                        .storage
                        .as_mut()
                        .unwrap()
                        .set(t, 0, &bytes)
                        .unwrap();
                    assert!(self.theirs.part_kv_mut(k as u32).unwrap().set_tensor_bytes(
                        v,
                        l.il as i32,
                        &bytes
                    ));
                }
            }
        }
        let Some(rs) = self.ours.rs() else { return };
        let Some(st) = rs.storage.as_ref() else {
            return;
        };
        let layers: Vec<_> = st.layers().to_vec();
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
                let bytes = noise(&mut self.rng, n, false);
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

    /// Every cell of every part, the heads and used ranges, and the composite's answers.
    fn compare(&self) {
        for (k, o) in self.ours.kvs().into_iter().enumerate() {
            let t = self.theirs.part_kv(k as u32).unwrap();
            let c = &o.cache;
            for s in 0..c.n_stream() {
                let tc = t.cells(s);
                let oc = c.cells(s);
                if oc.pos_all() != tc.pos.as_slice() {
                    let i = (0..tc.pos.len())
                        .find(|&i| oc.pos_all()[i] != tc.pos[i])
                        .unwrap();
                    self.fail(format!(
                        "part {k} stream {s} cell {i}: pos {} vs stock {}",
                        oc.pos_all()[i],
                        tc.pos[i]
                    ));
                }
                let same_seqs = oc
                    .seq_words()
                    .iter()
                    .zip(&tc.seq)
                    .all(|(a, b)| a.data == *b);
                let same_shifts = (0..c.size()).all(|i| oc.get_shift(i) == tc.shift[i as usize]);
                if !same_seqs || !same_shifts {
                    let i = (0..c.size())
                        .find(|&i| {
                            oc.seq_words()[i as usize].data != tc.seq[i as usize]
                                || oc.get_shift(i) != tc.shift[i as usize]
                        })
                        .unwrap();
                    let iu = i as usize;
                    self.fail(format!(
                        "part {k} stream {s} cell {i}: (shift, seqs) ({}, {:x?}) vs stock ({}, {:x?})",
                        oc.get_shift(i),
                        oc.seq_words()[iu].data,
                        tc.shift[iu],
                        tc.seq[iu]
                    ));
                }
                let ti = t.stream_info(s);
                let oi = (
                    c.head(s),
                    oc.get_used(),
                    oc.used_min(),
                    oc.used_max_p1(),
                    oc.get_has_shift(),
                );
                if oi != (ti.head, ti.used, ti.used_min, ti.used_max_p1, ti.has_shift) {
                    self.fail(format!(
                        "part {k} stream {s}: (head, used, min, max_p1, has_shift) {oi:?} vs stock {ti:?}"
                    ));
                }
            }
            let copies = t.pending_copy_list();
            if c.pending_copies() != copies.as_slice() {
                self.fail(format!(
                    "part {k}: pending copies {:?} vs stock {copies:?}",
                    c.pending_copies()
                ));
            }
        }
        if let Some(o) = self.ours.rs() {
            let t = self.theirs.part_rs().unwrap();
            let c = &o.cache;
            let z = !self.staging_stale;
            let got = (c.head(), c.used(), z.then(|| (c.n(), c.rs_z())));
            let want = (t.head(), t.used(), z.then(|| (t.n(), t.rs_z())));
            if got != want {
                self.fail(format!(
                    "recurrent (head, used, n, rs_z) {got:?} vs stock {want:?}"
                ));
            }
            for (i, (a, b)) in c.cells().iter().zip(t.cells()).enumerate() {
                let seqs: Vec<i32> = a.seq.iter_ones().map(|q| q as i32).collect();
                let src = |s: i32| (!self.staging_stale).then_some(s);
                if (a.pos, src(a.src), a.tail, &seqs) != (b.pos, src(b.src), b.tail, &b.seqs) {
                    self.fail(format!("recurrent cell {i}: ours {a:?} vs stock {b:?}"));
                }
            }
            if c.rs_idx() != t.rs_idx().as_slice() {
                self.fail(format!("rs_idx {:?} vs stock {:?}", c.rs_idx(), t.rs_idx()));
            }
        }
        let m = self.ours.mem();
        for s in 0..self.cfg.n_seq as i32 {
            let a = (m.seq_pos_min(s).unwrap(), m.seq_pos_max(s).unwrap());
            let b = (self.theirs.seq_pos_min(s), self.theirs.seq_pos_max(s));
            if a != b {
                self.fail(format!("seq {s} (min, max) {a:?} vs stock {b:?}"));
            }
        }
        if m.can_shift() != self.theirs.can_shift() {
            self.fail("can_shift differs".into());
        }
        if std::env::var_os("DIFF_TENSORS").is_some() {
            self.compare_tensors();
        }
    }

    /// Every tensor of every KV part, byte for byte (says where the first difference is).
    fn compare_tensors(&self) {
        for (k, o) in self.ours.kvs().into_iter().enumerate() {
            let t = self.theirs.part_kv(k as u32).unwrap();
            let Some(st) = o.storage.as_ref() else {
                continue;
            };
            for l in st.layers() {
                for (v, tt) in [(false, l.k), (true, l.v)] {
                    let want = t.tensor_bytes(v, l.il as i32).unwrap();
                    let mut got = vec![0u8; want.len()];
                    st.get(tt, 0, &mut got).unwrap();
                    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                        self.fail(format!(
                            "part {k} layer {} {}: byte {i} of {} differs",
                            l.il,
                            if v { "V" } else { "K" },
                            want.len()
                        ));
                    }
                }
            }
        }
    }

    fn seq(&mut self) -> i32 {
        self.rng.gen_range(0..self.cfg.n_seq as i32)
    }

    /// A batch continuing some sequences (positions from each one's end), sometimes with
    /// tokens shared by several sequences (pair only: llama.cpp's recurrent split refuses them
    /// when sequential, and its recurrent memory aborts on some).
    fn gen_batch(&mut self) -> stock::TokenBatch {
        let n_seq = self.cfg.n_seq as i32;
        let mut next: Vec<i32> = (0..n_seq)
            .map(|s| self.ours.mem().seq_pos_max(s).unwrap() + 1)
            .collect();
        let mut b = stock::TokenBatch::default();
        let n = match self.rng.gen_range(0..10) {
            0 => self.rng.gen_range(16..=48),
            1 | 2 => self.rng.gen_range(6..16),
            _ => self.rng.gen_range(1..6),
        };
        let seqs: Vec<i32> = {
            let k = self.rng.gen_range(1..=n_seq);
            let mut v: Vec<i32> = (0..n_seq).collect();
            for i in 0..v.len() {
                let j = self.rng.gen_range(i..v.len());
                v.swap(i, j);
            }
            v.truncate(k as usize);
            v
        };
        let shared = self.cfg.kind == Kind::Iswa && self.rng.gen_bool(0.15);
        let interleave = self.rng.gen_bool(0.5);
        for i in 0..n {
            let s = if interleave {
                seqs[i % seqs.len()]
            } else {
                seqs[i * seqs.len() / n]
            };
            let mut ids = vec![s];
            if shared && i < 3 {
                // a common prefix: every chosen sequence, all at the same next position
                let p = seqs.iter().map(|&q| next[q as usize]).max().unwrap();
                if seqs.iter().all(|&q| next[q as usize] == p) && seqs.len() > 1 {
                    ids = seqs.clone();
                    ids.sort_unstable();
                    b.push(p.rem_euclid(32), p, &ids);
                    for &q in &seqs {
                        next[q as usize] += 1;
                    }
                    continue;
                }
            }
            let p = next[s as usize];
            next[s as usize] += 1;
            b.push(p.rem_euclid(32), p, &ids);
        }
        b
    }

    fn op_batch(&mut self) {
        let mut tb = self.gen_batch();
        let embd_all = self.cfg.kind != Kind::Iswa && self.rng.gen_bool(0.15);
        if embd_all {
            tb.logits = Some(vec![true; tb.n_tokens() as usize]);
        }
        self.set_op(format!(
            "batch of {} tokens (embd_all {embd_all})",
            tb.n_tokens()
        ));
        let n_ubatch = self.cfg.n_ubatch;
        let theirs = self.theirs.init_batch(&tb, n_ubatch, embd_all, false);
        if theirs == Err(-1) {
            // stock's allocator refused the batch (it checks positions against the memory)
            self.count("batch: rejected by stock's allocator");
            return;
        }
        // ours
        let pos: Vec<i32> = tb.pos.clone().unwrap();
        let mut off = vec![0u32];
        let mut ids = Vec::new();
        for s in &tb.seq_ids {
            ids.extend_from_slice(s);
            off.push(ids.len() as u32);
        }
        let out: Vec<i8> = match &tb.logits {
            Some(l) => l.iter().map(|&b| b as i8).collect(),
            None => (0..tb.n_tokens())
                .map(|i| (i + 1 == tb.n_tokens()) as i8)
                .collect(),
        };
        let batch = Batch {
            token: Some(&tb.tokens),
            pos: &pos,
            n_pos: 1,
            seq_off: &off,
            seq_ids: &ids,
            output: Some(&out),
        };
        let (mut ctx, splits) =
            init_batch_whole(self.ours.mem_mut(), &batch, n_ubatch, embd_all).unwrap();
        let status = ctx.status();
        match (&theirs, status) {
            (Ok(t), Status::Success) => {
                let got: Vec<(Vec<i32>, u32, bool)> = splits
                    .iter()
                    .map(|s| {
                        (
                            s.idxs.iter().map(|&i| i as i32).collect(),
                            s.n_seqs,
                            s.equal,
                        )
                    })
                    .collect();
                let want: Vec<(Vec<i32>, u32, bool)> = t
                    .iter()
                    .map(|s| (s.batch_idxs.clone(), s.n_seqs, s.equal_seqs))
                    .collect();
                if got != want {
                    self.fail(format!("splits {got:?} vs stock {want:?}"));
                }
                let n_ub = splits.len();
                self.staging_stale = false;
                for k in 0..n_ub {
                    if let Err(e) = ctx.apply(self.ours.mem_mut()) {
                        let ubs: Vec<Vec<i32>> = splits
                            .iter()
                            .map(|s| s.idxs.iter().map(|&i| pos[i as usize]).collect())
                            .collect();
                        self.fail(format!("applying ubatch {k} of {ubs:?}: {e}"));
                    }
                    if k + 1 < n_ub {
                        ctx.next();
                    }
                }
                self.count("batch: applied");
                if n_ub > 1 {
                    self.count("batch: several ubatches");
                }
                if splits.iter().any(|s| s.equal) {
                    self.count("batch: equal split");
                }
                if tb.seq_ids.iter().any(|s| s.len() > 1) {
                    self.count("batch: shared tokens");
                }
                if embd_all {
                    self.count("batch: embd_all (split by sequence)");
                }
                self.compare();
                self.compare_masks(&*ctx, t.last().unwrap(), &tb);
            }
            (Err(2), Status::FailedPrepare) => {
                self.count("batch: failed prepare (both)");
                self.compare();
            }
            (t, o) => self.fail(format!("batch: stock {t:?}, ours {o:?}")),
        }
    }

    /// The KQ masks and K indices of every attention part for the last ubatch.
    fn compare_masks(
        &mut self,
        ctx: &dyn MemoryContext,
        split: &stock::Split,
        tb: &stock::TokenBatch,
    ) {
        let ub = split.ubatch(tb, 1);
        let mut kctx: Vec<&KvContext> = Vec::new();
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
        walk(ctx, &mut kctx);
        let our_ub = ctx.ubatch().unwrap();
        let causal = self.rng.gen_bool(0.8);
        let n_stream_m = if self.cfg.unified {
            1
        } else {
            ub.seq_id_unq.len() as u32
        };
        for (k, kc) in kctx.iter().enumerate() {
            let kv = &self.ours.kvs()[k].cache;
            let slot = kc.slot().unwrap();
            let t = self.theirs.part_kv(k as u32).unwrap();
            let tslot = self.theirs.last_slot(k as u32).unwrap();
            let n_kv = kv.get_n_kv(slot);
            if n_kv != t.get_n_kv(&tslot) {
                self.fail(format!(
                    "part {k}: n_kv {n_kv} vs stock {}",
                    t.get_n_kv(&tslot)
                ));
            }
            let want = t.kq_mask_f32(&ub.view(), causal, n_kv, n_stream_m);
            let mut got = vec![1.0f32; want.len()];
            kv.set_input_kq_mask(&our_ub, causal, n_kv, n_stream_m, MaskOut::F32(&mut got))
                .unwrap();
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                self.fail(format!(
                    "part {k}: kq mask entry {i}: {} vs stock {}",
                    got[i], want[i]
                ));
            }
            let mut ki = vec![0i64; slot.n_tokens()];
            kv.set_input_k_idxs(slot, &mut ki).unwrap();
            if ki != t.k_idxs(&ub.view(), &tslot) {
                self.fail(format!("part {k}: k_idxs differ"));
            }
        }
        self.count("mask: compared");
    }

    fn range(&mut self) -> (i32, i32) {
        let p0 = self.rng.gen_range(-1..40);
        let p1 = if self.rng.gen_bool(0.3) {
            -1
        } else {
            p0 + self.rng.gen_range(0..12)
        };
        (p0, p1)
    }

    fn op_seq(&mut self) {
        let seq = self.seq();
        let can_copy = self.cfg.kind == Kind::Iswa || self.cfg.n_rs_seq == 0;
        match self.rng.gen_range(0..10) {
            0..=4 => {
                let (p0, p1) = self.range();
                let seq = if self.rng.gen_bool(0.1) { -1 } else { seq };
                self.set_op(format!("seq_rm({seq}, {p0}, {p1})"));
                // an id a part refuses is an error here, false through the C ABI (a
                // recurrent part refuses -1, and stock's returns false)
                let q = self.ours.mem().can_seq_rm(seq, p0, p1).unwrap_or(false);
                let a = self.ours.mem_mut().seq_rm(seq, p0, p1).unwrap_or(false);
                let b = self.theirs.seq_rm(seq, p0, p1);
                if a != b || q != a {
                    self.fail(format!("seq_rm: ours {a} (query {q}) vs stock {b}"));
                }
                self.count(if a { "seq_rm: true" } else { "seq_rm: false" });
            }
            5 | 6 if can_copy => {
                let dst = self.seq();
                if dst == seq {
                    return;
                }
                // across streams llama.cpp copies whole sequences only
                let (p0, p1) = if self.cfg.unified && self.cfg.kind == Kind::Iswa {
                    self.range()
                } else {
                    (-1, -1)
                };
                self.set_op(format!("seq_cp({seq}, {dst}, {p0}, {p1})"));
                self.ours.mem_mut().seq_cp(seq, dst, p0, p1).unwrap();
                self.theirs.seq_cp(seq, dst, p0, p1);
                self.count("seq_cp");
            }
            7 => {
                self.set_op(format!("seq_keep({seq})"));
                self.ours.mem_mut().seq_keep(seq).unwrap();
                self.theirs.seq_keep(seq);
                self.count("seq_keep");
            }
            // the tiny lfm2 with SWA has a base cache without layers, on which stock's K-shift
            // update aborts (a NULL buffer): no shifts there (the pair configurations have them)
            8 | 9 if self.cfg.kind == Kind::HybridIswa => {}
            8 => {
                let (p0, p1) = self.range();
                let d = self.rng.gen_range(-8..8);
                self.set_op(format!("seq_add({seq}, {p0}, {p1}, {d})"));
                self.ours.mem_mut().seq_add(seq, p0, p1, d).unwrap();
                self.theirs.seq_add(seq, p0, p1, d);
                self.count("seq_add");
            }
            _ => {
                let (p0, p1) = self.range();
                let d = self.rng.gen_range(1..4);
                self.set_op(format!("seq_div({seq}, {p0}, {p1}, {d})"));
                self.ours.mem_mut().seq_div(seq, p0, p1, d).unwrap();
                self.theirs.seq_div(seq, p0, p1, d);
                self.count("seq_div");
            }
        }
        self.compare();
    }

    fn op_update(&mut self) {
        self.set_op("update");
        let mut ctx = self.ours.mem_mut().init_update(false).unwrap();
        let ours = ctx.status();
        if ours == Status::Success {
            ctx.apply(self.ours.mem_mut()).unwrap();
        }
        let theirs = self.theirs.update();
        let same = matches!(
            (ours, theirs),
            (Status::Success, stock::MemoryStatus::Success)
                | (Status::NoUpdate, stock::MemoryStatus::NoUpdate)
        );
        if !same {
            self.fail(format!("update: ours {ours:?}, stock {theirs:?}"));
        }
        if ours == Status::Success {
            self.count("update: applied");
            // the rotated keys are the K-shift graph's (the caller builds it from
            // `llama_memory_kv_build_k_shift`; tests/kv_graph_compat.rs compares it with
            // stock's): take stock's result, so that the states stay comparable
            self.sync_keys();
        }
        self.compare();
    }

    /// After a restore that both refused, which llama.cpp may have half applied: the whole
    /// state of ours restored on both sides (a whole restore packs the cells from 0).
    fn resync(&mut self) {
        self.staging_stale = true;
        let all = our_state(self.ours.mem(), -1, 0);
        if self.theirs.state_read(-1, 0, &all).is_none() {
            self.fail("stock refused our whole state".into());
        }
        self.ours
            .mem_mut()
            .state_read(-1, 0, &mut StateIn::new(&all))
            .unwrap();
        self.compare();
    }

    /// Our K tensors := stock's.
    fn sync_keys(&mut self) {
        for k in 0..self.ours.kvs().len() {
            let Some(st) = self.ours.kvs()[k].storage.as_ref() else {
                continue;
            };
            let layers: Vec<_> = st.layers().to_vec();
            for l in layers {
                let bytes = self
                    .theirs
                    .part_kv(k as u32)
                    .unwrap()
                    .tensor_bytes(false, l.il as i32)
                    .unwrap();
                self.ours.kvs_mut()[k]
                    .storage
                    .as_mut()
                    .unwrap()
                    .set(l.k, 0, &bytes)
                    .unwrap();
            }
        }
    }

    fn op_state(&mut self) {
        let whole = self.rng.gen_bool(0.15);
        let seq = if whole { -1 } else { self.seq() };
        let flags = if !whole && self.rng.gen_bool(0.4) {
            PARTIAL_ONLY
        } else {
            0
        };
        self.set_op(format!("state({seq}, flags {flags})"));
        let ours = our_state(self.ours.mem(), seq, flags);
        let theirs = self.theirs.state_write(seq, flags);
        if ours != theirs {
            let i = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            self.fail(format!(
                "state bytes differ ({} vs stock {} bytes, first at {i:?})",
                ours.len(),
                theirs.len()
            ));
        }
        let dst = if whole { -1 } else { self.seq() };
        // a truncated copy first: both refuse it, ours changes nothing
        if ours.len() > 1 && self.rng.gen_bool(0.3) {
            let cut = self.rng.gen_range(1..ours.len());
            let before = our_state(self.ours.mem(), -1, 0);
            let r = self
                .ours
                .mem_mut()
                .state_read(dst, flags, &mut StateIn::new(&ours[..cut]));
            if r.is_ok() {
                self.fail(format!(
                    "a state cut at {cut} of {} was accepted",
                    ours.len()
                ));
            }
            if our_state(self.ours.mem(), -1, 0) != before {
                self.fail(format!(
                    "a refused restore (cut at {cut}) changed our memory"
                ));
            }
            if self.theirs.state_read(dst, flags, &ours[..cut]).is_some() {
                self.fail(format!("stock accepted a state cut at {cut}"));
            }
            self.count("state: truncated refused, ours unchanged");
            self.resync();
        }
        let before = our_state(self.ours.mem(), -1, 0);
        let a = self
            .ours
            .mem_mut()
            .state_read(dst, flags, &mut StateIn::new(&ours));
        let b = self.theirs.state_read(dst, flags, &theirs);
        if std::env::var_os("DIFF_TRACE").is_some() {
            eprintln!(
                "{} restore into {dst}: ours {a:?} stock {b:?}",
                self.last_op
            );
        }
        if a.is_ok() != b.is_some() {
            self.fail(format!("restore into {dst}: ours {a:?}, stock {b:?}"));
        }
        if a.is_err() {
            // no room for the sequence in some part: ours changed nothing; stock may have
            // restored the first part, so both are brought back in step
            if our_state(self.ours.mem(), -1, 0) != before {
                self.fail(format!("a refused restore into {dst} changed our memory"));
            }
            self.count("state: valid restore refused by both (no room)");
            self.resync();
        }
        if a.is_ok() {
            self.count(if whole {
                "state: whole saved and restored"
            } else if flags == PARTIAL_ONLY {
                "state: partial saved and restored"
            } else {
                "state: seq saved and restored"
            });
        }
        self.compare();
        if self.rng.gen_bool(0.2) {
            let a = our_state(self.ours.mem(), -1, 0);
            let b = self.theirs.state_write(-1, 0);
            if a != b {
                self.compare_tensors();
                self.fail("whole state bytes differ after a restore".into());
            }
        }
    }

    fn run(&mut self, ops: u64) {
        for _ in 0..ops {
            self.step += 1;

            match self.rng.gen_range(0..100) {
                0..=44 => self.op_batch(),
                45..=74 => self.op_seq(),
                75..=79 => self.op_update(),
                80..=98 => self.op_state(),
                _ => {
                    self.set_op("clear");
                    // stock's clear(true) aborts on a cache without layers (the tiny lfm2
                    // with SWA's base cache: a NULL buffer cleared)
                    let data = self.cfg.kind != Kind::HybridIswa && self.rng.gen_bool(0.5);
                    self.ours.mem_mut().clear(data);
                    self.theirs.clear(data);
                    self.count("clear");
                    self.compare();
                }
            }
        }
    }
}

/// Runs the configurations of `kind` (in parallel with the other kinds' tests), writes the
/// kind's summary and requires 1e5 steps and every counter the kind reaches.
fn run_kind(kind: Kind, name: &str, unreachable: &[&'static str]) {
    let seed = diff::seed(0x5eed_c0de);
    let per_config: Option<u64> = std::env::var("CMP_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut cov: BTreeMap<&'static str, u64> = COUNTERS.iter().map(|&c| (c, 0)).collect();
    let mut steps = 0;
    let mut report = String::new();
    let only = std::env::var("CMP_DIFF_CONFIG").ok();
    for cfg in CONFIGS.iter().filter(|c| c.kind == kind) {
        if only.as_deref().is_some_and(|o| !cfg.name.contains(o)) {
            continue;
        }
        let ops = per_config.unwrap_or(cfg.ops);
        let mut p = Pair::new(*cfg, seed);
        p.run(ops);
        diff::add_coverage(&mut cov, &p.cov);
        steps += p.step;
        report += &format!(
            "composite_differential: {:<22} {:>7} steps, 0 divergences\n",
            cfg.name, p.step
        );
    }
    report += &format!("composite_differential: {name:<26} {steps:>7} steps\n");
    for k in unreachable {
        cov.remove(k);
    }
    diff::report_coverage(&mut report, "composite_differential", &cov, 40, 7);
    diff::write_summary(&format!("composite_differential_{name}.txt"), &report);
    if per_config.is_none() && only.is_none() {
        assert!(steps >= 100_000, "{name}: {steps} steps, fewer than 1e5");
        let missing = diff::never_reached(&cov);
        assert!(missing.is_empty(), "{name}: never reached: {missing:?}");
    }
}

#[test]
fn iswa_matches_stock_llama_kv_cache_iswa() {
    // every token is an output only where a recurrent part splits by sequence
    run_kind(
        Kind::Iswa,
        "llama_kv_cache_iswa",
        &["batch: embd_all (split by sequence)", "seq_rm: false"],
    );
}

#[test]
fn hybrid_matches_stock_llama_memory_hybrid() {
    // shared tokens (and the allocator's refusal of those whose sequences diverged): a
    // recurrent part refuses them (see gen_batch)
    run_kind(
        Kind::Hybrid,
        "llama_memory_hybrid",
        &[
            "batch: shared tokens",
            "batch: rejected by stock's allocator",
        ],
    );
}

#[test]
fn hybrid_iswa_matches_stock_llama_memory_hybrid_iswa() {
    // no shifts on the tiny lfm2 with SWA (see op_seq)
    run_kind(
        Kind::HybridIswa,
        "llama_memory_hybrid_iswa",
        &[
            "batch: shared tokens",
            "batch: rejected by stock's allocator",
            "seq_add",
            "seq_div",
            "update: applied",
        ],
    );
}
