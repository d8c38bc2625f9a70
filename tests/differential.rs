//! Differential suite: random traces replayed on the pinned llama.cpp's own `llama_kv_cache`
//! (through the `llama-memory-reference` shim) and on this library, compared after every step:
//! chosen slots, every cell (position, pending shift, sequences, ext), heads, used ranges,
//! per-sequence min/max, `n_kv`, KQ masks (f32 and f16), K/V row indices, K-shift vectors and
//! position buckets.
//!
//! `SEED=<u64>` varies the traces (CI uses the fixed default); `DIFF_OPS=<n>` scales the
//! number of operations per configuration.

use llama_memory::{KvCache, KvParams, MaskOut, NonCausalType, SlotInfo, SwaType, UbatchBuf};
use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
};

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
];

const N_REL_ATTN_BKTS: u32 = 32;

struct Pair {
    cfg: Config,
    ours: KvCache,
    theirs: stock::RefKv,
    rng: StdRng,
    step: u64,
    last_op: String,
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
            ..stock::Params::default()
        });
        let ours = KvCache::new(KvParams {
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
            ..KvParams::default()
        })
        .unwrap();
        assert_eq!(ours.n_stream(), theirs.n_stream());
        assert_eq!(ours.size(), theirs.size());
        let mut rng = StdRng::seed_from_u64(
            seed ^ cfg
                .name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64),
        );
        let _: u64 = rng.gen();
        Pair {
            cfg,
            ours,
            theirs,
            rng,
            step: 0,
            last_op: String::new(),
        }
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
        match self.rng.gen_range(0..6) {
            0 => -1,
            1 => -self.rng.gen_range(1..5),
            _ => self.rng.gen_range(0..self.cfg.size as i32 + 40),
        }
    }

    fn compare_state(&self) {
        let (o, t) = (&self.ours, &self.theirs);
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
        if o.pending_copies().len() as u32 != t.pending_copies() {
            self.fail(format!(
                "pending copies {} vs stock {}",
                o.pending_copies().len(),
                t.pending_copies()
            ));
        }
        if o.has_shift() != t.has_shift() || o.can_shift() != t.can_shift() {
            self.fail("has_shift/can_shift differ".into());
        }
    }

    /// Positions for `n` new tokens of `seq`: usually continuing the sequence, sometimes
    /// anywhere (gaps, repeats), as restored or multimodal inputs produce.
    fn next_positions(&mut self, seq: i32, n: usize, cursor: &mut [i32]) -> Vec<i32> {
        if cursor[seq as usize] == i32::MIN {
            let max = self.ours.seq_pos_max(seq).unwrap();
            cursor[seq as usize] = if max >= 0 && self.rng.gen_bool(0.9) {
                max + 1
            } else {
                self.rng.gen_range(0..300)
            };
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(cursor[seq as usize]);
            // Images in M-RoPE models repeat a position over several tokens.
            if !(self.cfg.mrope && self.rng.gen_bool(0.3)) {
                cursor[seq as usize] += 1;
            }
        }
        out
    }

    fn token_count(&mut self) -> usize {
        match self.rng.gen_range(0..10) {
            0 => self.rng.gen_range(64..=512),
            1 | 2 => self.rng.gen_range(8..64),
            _ => self.rng.gen_range(1..8),
        }
    }

    /// A ubatch shaped as llama.cpp's split for this cache would shape it.
    fn gen_ubatch(&mut self, cursor: &mut [i32]) -> stock::Ubatch {
        let n_seq = self.cfg.n_seq_max as i32;
        let mut ub = if self.cfg.unified {
            let n = self.token_count();
            let k = self.rng.gen_range(1..=n_seq.min(3));
            let seqs: Vec<i32> = (0..k).map(|_| self.seq()).collect();
            let mut seq_ids = Vec::with_capacity(n);
            let mut pos = Vec::with_capacity(n);
            for _ in 0..n {
                let s = seqs[self.rng.gen_range(0..seqs.len())];
                let mut ids = vec![s];
                // A token shared by two sequences (a common prefix decoded once).
                if n_seq > 1 && self.rng.gen_bool(0.05) {
                    let other = (s + 1 + self.rng.gen_range(0..n_seq - 1)) % n_seq;
                    ids.push(other);
                }
                pos.push(self.next_positions(s, 1, cursor)[0]);
                seq_ids.push(ids);
            }
            let tokens = (0..n).map(|_| self.rng.gen_range(0..32)).collect();
            stock::Ubatch::simple(tokens, pos, seq_ids)
        } else {
            let k = self.rng.gen_range(1..=n_seq);
            let first = self.rng.gen_range(0..=n_seq - k);
            let per = (self.token_count() / k as usize).max(1) as u32;
            let mut sets = Vec::new();
            let mut pos = Vec::new();
            for s in first..first + k {
                let p = self.next_positions(s, per as usize, cursor);
                sets.push((s, p[0]));
                pos.extend(p);
            }
            let mut ub = stock::Ubatch::equal(&sets, per);
            ub.pos = pos;
            ub.tokens = (0..ub.n_tokens())
                .map(|_| self.rng.gen_range(0..32))
                .collect();
            ub
        };
        if self.cfg.mrope {
            // Sections: y then x then an unused one (llama.cpp's M-RoPE layout).
            let n = ub.n_tokens() as usize;
            let mut pos = ub.pos.clone();
            pos.extend((0..n).map(|_| self.rng.gen_range(0..4)));
            pos.extend((0..n).map(|_| self.rng.gen_range(0..4)));
            pos.extend(std::iter::repeat_n(0, n));
            ub.pos = pos;
            ub.n_pos = 4;
        }
        if self.rng.gen_bool(0.1) {
            ub.tokens.clear(); // embeddings: no token ids, ext untouched unless 2-D
        }
        ub
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
        let ubs: Vec<stock::Ubatch> = (0..n_ub).map(|_| self.gen_ubatch(&mut cursor)).collect();
        let bufs: Vec<UbatchBuf> = ubs.iter().map(Self::to_ours).collect();
        self.last_op = format!(
            "place {} ubatch(es) of {:?} tokens",
            n_ub,
            ubs.iter().map(|u| u.n_tokens()).collect::<Vec<_>>()
        );
        for b in &bufs {
            if let Err(e) = self.ours.validate_ubatch(&b.view()) {
                self.fail(format!("generated ubatch rejected: {e}"));
            }
        }
        if self.rng.gen_bool(0.1) {
            let cont = self.theirs.find_slot(&ubs[0].view(), true);
            match (self.ours.find_slot(&bufs[0].view(), true), cont) {
                (None, None) => {}
                (Some(a), Some(b)) => self.same_slot(&a, &b),
                (a, b) => self.fail(format!("contiguous find_slot {a:?} vs stock {b:?}")),
            }
        }
        let views: Vec<_> = ubs.iter().map(stock::Ubatch::view).collect();
        let theirs = self.theirs.prepare(&views);
        let ours_views: Vec<_> = bufs.iter().map(UbatchBuf::view).collect();
        let ours = self.ours.prepare(&ours_views);
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
            self.ours.apply_ubatch(a, &ours_views[k]);
            self.step += 1;
            self.last_op = format!("apply ubatch {k} of {} tokens", ubs[k].n_tokens());
            self.compare_state();
            self.compare_inputs(&ubs[k], &bufs[k], a, b);
        }
    }

    fn compare_inputs(
        &mut self,
        ub: &stock::Ubatch,
        buf: &UbatchBuf,
        ours: &SlotInfo,
        theirs: &stock::Slot,
    ) {
        let n_kv = self.ours.get_n_kv(ours);
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
        if self.rng.gen_bool(0.5) {
            let want = self.theirs.kq_mask_f32(&v, causal, n_kv, n_stream_m);
            let mut got = vec![1.0f32; len];
            self.ours
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
            self.ours
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
        self.ours.set_input_k_idxs(ours, &mut k).unwrap();
        if k != self.theirs.k_idxs(&v, theirs) {
            self.fail("k_idxs differ".into());
        }
        let mut vi = vec![0i64; self.ours.v_idxs_len(ours.n_tokens())];
        self.ours.set_input_v_idxs(ours, &mut vi).unwrap();
        if vi != self.theirs.v_idxs(&v, theirs) {
            self.fail("v_idxs differ".into());
        }
        if self.cfg.unified && !ub.equal_seqs && self.rng.gen_bool(0.2) {
            let mut pb = vec![0i32; len];
            self.ours
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
                let a = self.ours.seq_rm(s, p0, p1).unwrap();
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
                self.ours.seq_cp(src, dst, p0, p1).unwrap();
                self.theirs.seq_cp(src, dst, p0, p1);
            }
            5 => {
                let s = self.seq();
                self.last_op = format!("seq_keep({s})");
                self.ours.seq_keep(s).unwrap();
                self.theirs.seq_keep(s);
            }
            6..=8 if can_move => {
                let s = self.seq();
                let (p0, p1) = (self.bound(), self.bound());
                let delta = self.rng.gen_range(-40..40);
                self.last_op = format!("seq_add({s}, {p0}, {p1}, {delta})");
                self.ours.seq_add(s, p0, p1, delta).unwrap();
                self.theirs.seq_add(s, p0, p1, delta);
            }
            9 if can_move => {
                let s = self.seq();
                let (p0, p1) = (self.bound(), self.bound());
                let d = self.rng.gen_range(1..5);
                self.last_op = format!("seq_div({s}, {p0}, {p1}, {d})");
                self.ours.seq_div(s, p0, p1, d).unwrap();
                self.theirs.seq_div(s, p0, p1, d);
            }
            10 => self.op_update(),
            _ => {
                if self.rng.gen_bool(0.1) {
                    self.last_op = "clear".into();
                    self.ours.clear();
                    self.theirs.clear(false);
                } else {
                    return self.op_update();
                }
            }
        }
        self.step += 1;
        self.compare_state();
    }

    fn op_update(&mut self) {
        self.last_op = "update".into();
        let mut ks = vec![0i32; (self.cfg.size * self.ours.n_stream()) as usize];
        self.ours.set_input_k_shift(&mut ks).unwrap();
        if ks != self.theirs.k_shift() {
            self.fail("k_shift differs".into());
        }
        let mut ctx = self.ours.init_update().unwrap();
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
            ctx.apply_to(&mut self.ours, None).unwrap();
        }
    }

    fn run(&mut self, ops: u64) -> u64 {
        let start = self.step;
        for _ in 0..ops {
            if self.rng.gen_bool(0.45) {
                self.op_place();
            } else {
                self.op_seq();
            }
        }
        self.ours.check_invariants().unwrap();
        self.step - start
    }
}

#[test]
fn kv_cache_matches_stock_llama_cpp() {
    // The traces hit expected stock failures (oversized ubatches); keep their logs out of CI.
    std::env::set_var("KVREF_QUIET", "1");
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234);
    let scale: f64 = std::env::var("DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(1.0, |n: f64| n / BASE.ops as f64);
    let mut total = 0;
    let mut report = String::new();
    for cfg in CONFIGS {
        let mut pair = Pair::new(*cfg, seed);
        let n = pair.run(((cfg.ops as f64) * scale).max(1.0) as u64);
        report += &format!(
            "differential: config {:<28} {n:>7} compared steps, 0 divergences\n",
            cfg.name
        );
        total += n;
    }
    report += &format!(
        "differential: seed {seed:#x}: {total} compared steps over {} configurations, 0 divergences\n",
        CONFIGS.len()
    );
    print!("{report}");
    // cargo captures a passing test's output; CI prints this file instead.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("differential-summary.txt");
    std::fs::write(path, &report).unwrap();
    assert!(total > 0);
}
