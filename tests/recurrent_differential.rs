//! Differential suite of the recurrent memory: random traces replayed on the pinned llama.cpp's
//! own `llama_memory_recurrent` (through the `llama-memory-reference` shim, over generated
//! `mamba` and `lfm2` models) and on this library, compared after every step: every cell
//! (pos, src, src0, tail, sequences), head, used, n, rs_z, the pending rollback of every
//! sequence, per-sequence min/max, op return values, `prepare` results, the `s_copy` input
//! (with its side effect), the context getters, and the bytes of sequence and whole states and
//! of every state tensor, saved and restored on both sides.
//!
//! Where llama.cpp aborts (a whole state of a cell shared by sequences with different pending
//! rollbacks), this library refuses and the step is not replayed on stock; those refusals are
//! counted. Coverage counters per op kind go into the summary and each must be non-zero.
//!
//! `SEED=<u64>` varies the traces; `RS_DIFF_OPS=<n>` sets the operations per configuration.

use std::collections::BTreeMap;

use llama_memory::recurrent::{RecurrentMemory, RsCache, RsContext, RsParams};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::{state, Memory, UbatchBuf};
use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[path = "common/diff.rs"]
mod diff;

#[derive(Clone, Copy, Debug)]
enum Model {
    Mamba,
    /// A narrower mamba (16-wide embeddings): the same cells, 4x smaller state rows, for the
    /// configurations with many sequences, whose tensors are compared after every restore.
    MambaSmall,
    Lfm2,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    model: Model,
    n_seq: u32,
    n_rs_seq: u32,
    /// No layer passes the filter (a memory without tensors).
    no_layers: bool,
    ops: u64,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "mamba-1seq",
        model: Model::Mamba,
        n_seq: 1,
        n_rs_seq: 0,
        no_layers: false,
        ops: 15_000,
    },
    Config {
        name: "mamba-4seq",
        model: Model::Mamba,
        n_seq: 4,
        n_rs_seq: 0,
        no_layers: false,
        ops: 25_000,
    },
    Config {
        name: "mamba-4seq-rollback3",
        model: Model::Mamba,
        n_seq: 4,
        n_rs_seq: 3,
        no_layers: false,
        ops: 25_000,
    },
    Config {
        name: "mamba-16seq-rollback1",
        model: Model::MambaSmall,
        n_seq: 16,
        n_rs_seq: 1,
        no_layers: false,
        ops: 10_000,
    },
    Config {
        name: "mamba-64seq",
        model: Model::MambaSmall,
        n_seq: 64,
        n_rs_seq: 0,
        no_layers: false,
        ops: 3_000,
    },
    Config {
        name: "lfm2-8seq-rollback2",
        model: Model::Lfm2,
        n_seq: 8,
        n_rs_seq: 2,
        no_layers: false,
        ops: 20_000,
    },
    Config {
        name: "mamba-4seq-nolayers",
        model: Model::Mamba,
        n_seq: 4,
        n_rs_seq: 2,
        no_layers: true,
        ops: 5_000,
    },
];

const COUNTERS: &[&str] = &[
    "place (1 ubatch)",
    "place (several ubatches)",
    "place with shared sequences",
    "place 16+ sequence sets",
    "place non-consecutive position",
    "seq_rm true",
    "seq_rm false",
    "seq_rm rollback taken",
    "seq_rm invalid seq",
    "seq_cp",
    "seq_keep",
    "seq_add",
    "seq_div",
    "s_copy",
    "s_copy with pending rollback",
    "save/restore same sequence",
    "save/restore other sequence",
    "save/restore empty sequence",
    "save/restore whole",
    "clear",
];

struct Pair {
    cfg: Config,
    rng: StdRng,
    ours: RecurrentMemory,
    theirs: stock::RefRs,
    step: u64,
    last_op: String,
    cov: BTreeMap<&'static str, u64>,
    refused: u64,
}

fn model_path(m: Model) -> std::path::PathBuf {
    match m {
        Model::Mamba => stock::mamba_model_path(),
        Model::MambaSmall => stock::mamba_model_path_ex(2, 16),
        Model::Lfm2 => stock::lfm2_model_path(),
    }
}

impl Pair {
    fn new(cfg: Config, seed: u64) -> Pair {
        let mut params = stock::RsParams::for_seqs(cfg.n_seq, cfg.n_rs_seq);
        let path = model_path(cfg.model);
        if cfg.no_layers {
            params.filter = Some(vec![false; 64]);
        }
        let theirs = stock::RefRs::new(&path, &params).expect("stock llama_memory_recurrent");
        let layers: Vec<RsLayerSpec> = (0..theirs.n_layer())
            .filter(|&il| theirs.has_r(il))
            .map(|il| RsLayerSpec {
                il,
                n_embd_r: theirs.n_embd_r(),
                n_embd_s: theirs.n_embd_s(),
                n_embd_p: 0,
                buft: llama_memory::storage::Buft::CPU,
            })
            .collect();
        let p = RsParams {
            size: theirs.size(),
            n_seq_max: cfg.n_seq,
            n_rs_seq: cfg.n_rs_seq,
        };
        let cache = RsCache::new(p, !layers.is_empty()).unwrap();
        let storage = (!layers.is_empty()).then(|| {
            RsStorage::new(RsStorageSpec {
                type_r: ggml_sys::GGML_TYPE_F32,
                type_s: ggml_sys::GGML_TYPE_F32,
                size: theirs.size(),
                n_rs_seq: cfg.n_rs_seq,
                layers,
            })
            .unwrap()
        });
        let ours = RecurrentMemory::new(cache, storage, theirs.n_layer()).unwrap();
        let mut pair = Pair {
            cfg,
            rng: StdRng::seed_from_u64(seed ^ cfg.ops ^ (cfg.n_seq as u64) << 32),
            ours,
            theirs,
            step: 0,
            last_op: "new".into(),
            cov: COUNTERS.iter().map(|&c| (c, 0)).collect(),
            refused: 0,
        };
        pair.randomize_tensors();
        pair.compare();
        pair
    }

    fn hit(&mut self, what: &'static str) {
        *self.cov.get_mut(what).expect(what) += 1;
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "config {} step {} after {}: {what}",
            self.cfg.name, self.step, self.last_op
        );
    }

    /// New random bytes in every state tensor, on both sides (what graph computations do to
    /// the rows between the steps of a trace).
    fn randomize_tensors(&mut self) {
        let Some(st) = self.ours.storage.as_mut() else {
            return;
        };
        let layers: Vec<_> = st.layers().to_vec();
        for l in layers {
            for (t, is_r) in [(l.r, true), (l.s, false)] {
                let n = if is_r {
                    self.theirs.r_bytes(l.il).len()
                } else {
                    self.theirs.s_bytes(l.il).len()
                };
                let bytes = noise(self.rng.gen(), n);
                st.set(t, 0, &bytes).unwrap();
                if is_r {
                    self.theirs.set_r_bytes(l.il, &bytes);
                } else {
                    self.theirs.set_s_bytes(l.il, &bytes);
                }
            }
        }
    }

    fn compare_tensors(&self) {
        let Some(st) = self.ours.storage.as_ref() else {
            return;
        };
        for l in st.layers() {
            for (t, theirs, what) in [
                (l.r, self.theirs.r_bytes(l.il), "R"),
                (l.s, self.theirs.s_bytes(l.il), "S"),
            ] {
                let mut ours = vec![0u8; theirs.len()];
                st.get(t, 0, &mut ours).unwrap();
                if ours != theirs {
                    let k = ours
                        .iter()
                        .zip(&theirs)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.fail(format!(
                        "{what} tensor of layer {} differs at byte {k}",
                        l.il
                    ));
                }
            }
        }
    }

    fn compare(&self) {
        let c = &self.ours.cache;
        let t = &self.theirs;
        let got = (c.head(), c.used(), c.n(), c.rs_z(), c.n_rs_seq());
        let want = (t.head(), t.used(), t.n(), t.rs_z(), t.n_rs_seq());
        if got != want {
            self.fail(format!(
                "(head, used, n, rs_z, n_rs_seq) {got:?} vs stock {want:?}"
            ));
        }
        if c.rs_idx() != t.rs_idx().as_slice() {
            self.fail(format!("rs_idx {:?} vs stock {:?}", c.rs_idx(), t.rs_idx()));
        }
        let theirs = t.cells();
        for (i, (a, b)) in c.cells().iter().zip(&theirs).enumerate() {
            let seqs: Vec<i32> = a.seq.iter_ones().map(|q| q as i32).collect();
            if (a.pos, a.src, a.src0, a.tail, &seqs) != (b.pos, b.src, b.src0, b.tail, &b.seqs) {
                self.fail(format!(
                    "cell {i}: ours {a:?} (seqs {seqs:?}) vs stock {b:?}"
                ));
            }
        }
        if theirs.len() != c.cells().len() {
            self.fail("cell count".into());
        }
        c.check_invariants()
            .unwrap_or_else(|e| self.fail(format!("invariant: {e}")));
    }

    fn compare_positions(&self) {
        for s in 0..self.cfg.n_seq as i32 {
            let a = (
                self.ours.seq_pos_min(s).unwrap(),
                self.ours.seq_pos_max(s).unwrap(),
            );
            let b = (self.theirs.seq_pos_min(s), self.theirs.seq_pos_max(s));
            if a != b {
                self.fail(format!("seq {s} (min, max) {a:?} vs stock {b:?}"));
            }
        }
    }

    /// A random equal-split ubatch: distinct primary sequences, sometimes with extra
    /// sequences sharing a set, positions continuing each primary's state (or not).
    fn gen_ubatch(&mut self, max_sets: u32) -> (stock::Ubatch, UbatchBuf) {
        let n = self.cfg.n_seq;
        let mut pool: Vec<i32> = (0..n as i32).collect();
        pool.shuffle(&mut self.rng);
        let k = self.rng.gen_range(1..=max_sets.min(n)) as usize;
        let n_seq_tokens = self.rng.gen_range(1..=4u32);
        let mut sets: Vec<(Vec<i32>, i32)> = Vec::new();
        let mut rest = pool.split_off(k);
        for &q in &pool {
            let mut ids = vec![q];
            if !rest.is_empty() && self.rng.gen_bool(0.15) {
                ids.push(rest.pop().unwrap());
                self.hit("place with shared sequences");
            }
            let max = self.theirs.seq_pos_max(q);
            let p0 = if self.rng.gen_bool(0.9) {
                max + 1
            } else {
                self.hit("place non-consecutive position");
                self.rng.gen_range(0..1000)
            };
            sets.push((ids, p0));
        }
        let (mut tokens, mut pos, mut seq_ids) = (Vec::new(), Vec::new(), Vec::new());
        for (ids, p0) in &sets {
            for j in 0..n_seq_tokens as i32 {
                tokens.push((p0 + j).rem_euclid(32));
                pos.push(p0 + j);
                seq_ids.push(ids.clone());
            }
        }
        let mut unq: Vec<i32> = seq_ids.iter().flatten().copied().collect();
        unq.sort_unstable();
        unq.dedup();
        let ub = stock::Ubatch {
            tokens: tokens.clone(),
            pos: pos.clone(),
            seq_ids: seq_ids.clone(),
            n_pos: 1,
            n_seq_tokens,
            n_seqs: k as u32,
            seq_id_unq: unq,
            equal_seqs: true,
        };
        let refs: Vec<&[i32]> = seq_ids.iter().map(|v| v.as_slice()).collect();
        let mut buf = UbatchBuf::new(&tokens, &pos, &refs);
        buf.n_seq_tokens = n_seq_tokens;
        buf.n_seqs = k as u32;
        buf.equal_seqs = true;
        if k >= 16 {
            self.hit("place 16+ sequence sets");
        }
        (ub, buf)
    }

    fn op_place(&mut self) {
        let max_sets = if self.cfg.n_seq >= 16 && self.rng.gen_bool(0.2) {
            self.cfg.n_seq
        } else {
            8
        };
        let n_ub = if self.rng.gen_bool(0.15) {
            self.rng.gen_range(2..=3)
        } else {
            1
        };
        let ubs: Vec<_> = (0..n_ub).map(|_| self.gen_ubatch(max_sets)).collect();
        self.hit(if n_ub == 1 {
            "place (1 ubatch)"
        } else {
            "place (several ubatches)"
        });
        self.last_op = format!("place {:?}", ubs.iter().map(|u| &u.0).collect::<Vec<_>>());
        let views: Vec<_> = ubs.iter().map(|u| u.1.view()).collect();
        let ok = self.ours.cache.plan(&views).unwrap() == llama_memory::Status::Success;
        let theirs_views: Vec<_> = ubs.iter().map(|u| u.0.view()).collect();
        let theirs_ok = self.theirs.prepare(&theirs_views);
        if ok != theirs_ok {
            self.fail(format!("prepare {ok} vs stock {theirs_ok}"));
        }
        self.compare();
        if !ok {
            return;
        }
        // apply each in turn, as the context does, with the graph's s_copy read after it
        let mut ctx = self.ours.init_batch(&views, None).unwrap();
        for (k, (tu, _)) in ubs.iter().enumerate() {
            if k > 0 {
                assert!(ctx.next());
            }
            ctx.apply(&mut self.ours).unwrap();
            assert!(self.theirs.find_slot(&tu.view()));
            self.step += 1;
            self.compare();
            let rc = ctx.as_any().downcast_ref::<RsContext>().unwrap();
            let got = (
                rc.n_rs(&self.ours),
                rc.head(&self.ours),
                rc.rs_z(&self.ours),
            );
            let want = self.theirs.ctx_info(false);
            if got != (want.n_rs, want.head, want.rs_z) {
                self.fail(format!(
                    "context (n_rs, head, rs_z) {got:?} vs stock {want:?}"
                ));
            }
            if self.rng.gen_bool(0.7) {
                if self.ours.cache.rs_idx().iter().any(|&x| x != 0) {
                    self.hit("s_copy with pending rollback");
                }
                self.hit("s_copy");
                let n = self.ours.cache.n() as usize;
                let mut ours = vec![0; n];
                self.ours.cache.s_copy_into(&mut ours).unwrap();
                let theirs = self.theirs.s_copy_all();
                if ours != theirs {
                    self.fail(format!("s_copy {ours:?} vs stock {theirs:?}"));
                }
                self.compare();
            }
        }
        assert!(!ctx.next());
        if self.rng.gen_bool(0.2) {
            self.randomize_tensors();
        }
    }

    fn range(&mut self) -> (i32, i32) {
        let max = self.theirs.seq_pos_max(0).max(8) + 4;
        let pick = |rng: &mut StdRng| match rng.gen_range(0..6) {
            0 => -1,
            1 => 0,
            2 => i32::MAX,
            _ => rng.gen_range(0..max),
        };
        let a = pick(&mut self.rng);
        let b = pick(&mut self.rng);
        (a, b)
    }

    fn seq_or_bad(&mut self) -> i32 {
        if self.rng.gen_bool(0.05) {
            *[-1, -2, self.cfg.n_seq as i32, 300]
                .choose(&mut self.rng)
                .unwrap()
        } else {
            self.rng.gen_range(0..self.cfg.n_seq as i32)
        }
    }

    fn op_seq_rm(&mut self) {
        let s = self.seq_or_bad();
        // ranges that end a sequence (rollbacks) are the interesting ones
        let (p0, p1) = if self.rng.gen_bool(0.5) && s >= 0 && (s as u32) < self.cfg.n_seq {
            let max = self.theirs.seq_pos_max(s);
            (
                max - self.rng.gen_range(-1..5),
                if self.rng.gen_bool(0.5) { -1 } else { max + 1 },
            )
        } else {
            self.range()
        };
        self.last_op = format!("seq_rm({s}, {p0}, {p1})");
        let before = self.ours.cache.rs_idx().to_vec();
        let ours = self.ours.seq_rm(s, p0, p1);
        let theirs = self.theirs.seq_rm(s, p0, p1);
        if ours.is_err() {
            self.hit("seq_rm invalid seq");
        }
        let ours = ours.unwrap_or(false);
        if ours != theirs {
            self.fail(format!("seq_rm returned {ours} vs stock {theirs}"));
        }
        self.hit(if ours { "seq_rm true" } else { "seq_rm false" });
        if before
            .iter()
            .zip(self.ours.cache.rs_idx())
            .any(|(a, b)| *a == 0 && *b != 0)
        {
            self.hit("seq_rm rollback taken");
        }
    }

    fn op_state(&mut self) {
        let whole = self.rng.gen_bool(0.15);
        let n = self.cfg.n_seq as i32;
        let (src, dst) = if whole {
            (-1, -1)
        } else {
            let src = self.rng.gen_range(0..n);
            let dst = if self.rng.gen_bool(0.5) {
                src
            } else {
                self.rng.gen_range(0..n)
            };
            (src, dst)
        };
        self.last_op = format!("save {src} / restore into {dst}");
        let ours = our_state_write(&self.ours, src);
        let Ok(ours) = ours else {
            // only a write llama.cpp aborts on may fail
            let e = ours.unwrap_err();
            assert!(e.to_string().contains("llama.cpp aborts"), "{e}");
            self.refused += 1;
            return;
        };
        let theirs = self.theirs.state_write(src, 0);
        if ours != theirs {
            self.fail(format!(
                "state of {src}: {} bytes vs stock {}",
                ours.len(),
                theirs.len()
            ));
        }
        if self.rng.gen_bool(0.3) {
            self.randomize_tensors();
        }
        let counter = if whole {
            "save/restore whole"
        } else if self.theirs.seq_pos_max(src) < 0 {
            "save/restore empty sequence"
        } else if src == dst {
            "save/restore same sequence"
        } else {
            "save/restore other sequence"
        };
        self.hit(counter);
        let a = our_state_read(&mut self.ours, dst, &ours);
        let (b, used) = self.theirs.state_read_n(dst, 0, &theirs);
        match a {
            Ok(n) if b && n == used => {}
            Err(e) if !b => {
                let _ = e;
            }
            a => self.fail(format!("restore {a:?} vs stock ({b}, {used} bytes)")),
        }
        self.compare();
        self.compare_tensors();
    }

    fn op(&mut self) {
        self.step += 1;
        match self.rng.gen_range(0..100) {
            0..=39 => self.op_place(),
            40..=56 => self.op_seq_rm(),
            57..=64 => {
                let (a, b) = (self.seq_or_bad(), self.seq_or_bad());
                let (p0, p1) = self.range();
                self.last_op = format!("seq_cp({a}, {b}, {p0}, {p1})");
                self.hit("seq_cp");
                let _ = self.ours.seq_cp(a, b, p0, p1);
                self.theirs.seq_cp(a, b, p0, p1);
            }
            65..=66 => {
                // out-of-range ids empty every cell in llama.cpp; this library refuses them
                let s = self.rng.gen_range(0..self.cfg.n_seq as i32);
                self.last_op = format!("seq_keep({s})");
                self.hit("seq_keep");
                self.ours.seq_keep(s).unwrap();
                self.theirs.seq_keep(s);
            }
            67..=73 => {
                let s = self.seq_or_bad();
                let (p0, p1) = self.range();
                let d = self.rng.gen_range(-40..40);
                self.last_op = format!("seq_add({s}, {p0}, {p1}, {d})");
                self.hit("seq_add");
                let _ = self.ours.seq_add(s, p0, p1, d);
                self.theirs.seq_add(s, p0, p1, d);
            }
            74..=77 => {
                let s = self.seq_or_bad();
                let (p0, p1) = self.range();
                let d = self.rng.gen_range(1..5);
                self.last_op = format!("seq_div({s}, {p0}, {p1}, {d})");
                self.hit("seq_div");
                let _ = self.ours.seq_div(s, p0, p1, d);
                self.theirs.seq_div(s, p0, p1, d);
            }
            78..=98 => self.op_state(),
            _ => {
                let data = self.rng.gen_bool(0.5);
                self.last_op = format!("clear({data})");
                self.hit("clear");
                self.ours.clear(data);
                self.theirs.clear(data);
                self.compare_tensors();
            }
        }
        self.compare();
        if self.step % 4 == 0 || self.cfg.n_seq <= 4 {
            self.compare_positions();
        }
    }
}

/// `n` pseudo-random bytes from `seed` (splitmix64: the tensors are large, and a
/// cryptographic generator would dominate the run time of the suite).
fn noise(mut seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_ne_bytes());
    }
    out.truncate(n);
    out
}

/// Our side of stock `state_write(io, seq, 0)`: the memory part of the state, as the same
/// bytes (a sequence blob without its 8-byte header).
fn our_state_write(mem: &RecurrentMemory, seq: i32) -> llama_memory::Result<Vec<u8>> {
    if seq == -1 {
        let mut buf = vec![0u8; state::get_size(mem)?];
        let n = state::get_data(mem, &mut buf)?;
        assert_eq!(n, buf.len());
        return Ok(buf);
    }
    let mut buf = vec![0u8; state::seq_get_size(mem, seq, 0)?];
    let n = state::seq_get_data(mem, &mut buf, seq, 0, &mut state::Stash::new())?;
    assert_eq!(n, buf.len());
    Ok(buf.split_off(8))
}

/// Our side of stock `state_read(io, dest, 0)`: bytes consumed.
fn our_state_read(mem: &mut RecurrentMemory, dest: i32, raw: &[u8]) -> llama_memory::Result<usize> {
    if dest == -1 {
        return state::set_data(mem, raw);
    }
    let mut blob = Vec::with_capacity(8 + raw.len());
    blob.extend_from_slice(&state::SEQ_BLOB_MAGIC.to_ne_bytes());
    blob.extend_from_slice(&dest.to_ne_bytes());
    blob.extend_from_slice(raw);
    state::seq_set_data(mem, &blob, dest, 0, &state::Stash::new()).map(|n| n - 8)
}

#[test]
fn recurrent_memory_matches_stock_llama_cpp() {
    std::env::set_var("KVREF_QUIET", "1");
    let seed = diff::seed(0x5eed_1234);
    let ops: Option<u64> = std::env::var("RS_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut report = String::new();
    let mut total = 0;
    let mut refused = 0;
    let mut cov: BTreeMap<&'static str, u64> = COUNTERS.iter().map(|&c| (c, 0)).collect();
    for cfg in CONFIGS {
        let t0 = std::time::Instant::now();
        let mut pair = Pair::new(*cfg, seed);
        let n = ops.unwrap_or(cfg.ops);
        while pair.step < n {
            pair.op();
        }
        pair.compare_positions();
        pair.compare_tensors();
        eprintln!("recurrent differential: {} done", cfg.name);
        report += &format!(
            "recurrent differential: config {:<24} {:>7} compared steps, 0 divergences ({:.1} s)\n",
            cfg.name,
            pair.step,
            t0.elapsed().as_secs_f64()
        );
        total += pair.step;
        refused += pair.refused;
        diff::add_coverage(&mut cov, &pair.cov);
    }
    diff::report_coverage(&mut report, "recurrent differential", &cov, 36, 8);
    report += &format!(
        "recurrent differential: seed {seed:#x}: {total} compared steps over {} configurations, 0 divergences; {refused} whole states refused where llama.cpp aborts\n",
        CONFIGS.len()
    );
    diff::write_summary("recurrent-differential-summary.txt", &report);
    let missing = diff::never_reached(&cov);
    assert!(missing.is_empty(), "the traces never produced: {missing:?}");
}
