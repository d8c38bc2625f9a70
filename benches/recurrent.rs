//! The same recurrent-memory work on stock llama.cpp (the pinned tree's own
//! `llama_memory_recurrent`, through the reference shim) and on llama-memory
//! (`RecurrentMemory`), in one run, with criterion as the harness. Both memories are built over
//! the same generated `mamba` model (one cell per sequence), brought to the same cells by the
//! same ubatches and checked to agree (every cell, head, used, n, rs_z, the `s_copy` input,
//! per-sequence positions and the state bytes) before and after each group. At the end the
//! table (stock median / ours median) is printed in Markdown for BENCHMARKS.md.
//!
//! Groups:
//! - placement (`rs_decode_*`, `rs_prompt_*`): one equal-split ubatch planned (stock
//!   `prepare`, ours `RsCache::plan`), applied (`find_slot` on both) and its `s_copy` input
//!   read (stock: `s_copy(i)` for each of the `n` cells, as `set_input` does; ours:
//!   `s_copy_into`). Steady state: every sequence holds a state and continues its positions
//!   (the ubatches of a cycle of 256 steps are made before timing; positions are moved back
//!   by `seq_add` between cycles, untimed). `rs_prompt_*_new` places 4 sequences that hold no
//!   state (removed again before each step, untimed).
//! - sequence ops (`rs_seq_*`): 64 sequences, each in its own cell. Operations that destroy
//!   states run in chunks of 16 (16 sequences removed or copied per timed chunk, refilled
//!   untimed), so the clock is read once per 16 operations; `seq_keep` runs one per timed
//!   call (its restore places the 63 other sequences again).
//! - state (`rs_state_*`): the memory part of one sequence's state (`state::seq_get_data` /
//!   `seq_set_data`, stock `state_write/state_read(seq, 0)`) and of the whole memory
//!   (`state::get_data` / `set_data`, stock `state_write/state_read(-1, 0)`), against a plain
//!   `memcpy` of the same number of bytes. Stock writes straight into a preallocated buffer
//!   (the shim's `rsref_state_write`, looked up in the loaded shim).
//! - sub-steps (`*__check`, `*__prepare`, `*__apply`, `*__s_copy`) of the 64-sequence decode and
//!   the continuing prompt, and diagnostics (`rs_diag_*`: the per-cell tests of our slot search
//!   through bitvec against the same tests on the raw words), to show where the time goes.
//!
//! Run: `cargo bench --bench recurrent` (add `-- <filter>` to select benchmarks).

use std::ffi::c_void;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Bencher, Criterion};
use llama_memory::recurrent::{RecurrentMemory, RsCache, RsParams};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::{state, Status, Ubatch, UbatchBuf};
use llama_memory_reference as stock;

mod common;
use common::{human, median_ns};

/// Steps of one placement cycle (ubatches made before timing).
const CYCLE: usize = 256;
/// Sequences per timed chunk of the destructive sequence operations.
const CHUNK: i32 = 16;

/// One equal-split ubatch for both sides.
struct Ub {
    theirs: stock::Ubatch,
    ours: UbatchBuf,
}

impl Ub {
    /// `n_seq_tokens` tokens for each `(seq, first_pos)` set, in the given (ascending) order.
    fn equal(sets: &[(i32, i32)], n_seq_tokens: u32) -> Ub {
        let theirs = stock::Ubatch::equal(sets, n_seq_tokens);
        let seqs: Vec<&[i32]> = theirs.seq_ids.iter().map(Vec::as_slice).collect();
        let mut ours = UbatchBuf::new(&theirs.tokens, &theirs.pos, &seqs);
        ours.n_seq_tokens = n_seq_tokens;
        ours.n_seqs = sets.len() as u32;
        ours.equal_seqs = true;
        Ub { theirs, ours }
    }

    /// One token per sequence at the given positions.
    fn at(seqs: &[i32], pos: impl Fn(i32) -> i32) -> Ub {
        let sets: Vec<(i32, i32)> = seqs.iter().map(|&s| (s, pos(s))).collect();
        Ub::equal(&sets, 1)
    }
}

/// Both memories, over the same model, kept in the same state.
struct Both {
    ours: RecurrentMemory,
    theirs: stock::RefRs,
    n_seq: u32,
}

impl Both {
    /// A memory of `n_seq` sequences (one cell each, no rollback planes) over `model`, the
    /// same layers on both sides.
    fn new(model: &Path, n_seq: u32) -> Both {
        let theirs = stock::RefRs::new(model, &stock::RsParams::for_seqs(n_seq, 0))
            .expect("stock llama_memory_recurrent");
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
        let cache = RsCache::new(
            RsParams {
                size: theirs.size(),
                n_seq_max: n_seq,
                n_rs_seq: 0,
            },
            true,
        )
        .unwrap();
        let storage = RsStorage::new(RsStorageSpec {
            type_r: ggml_sys::GGML_TYPE_F32,
            type_s: ggml_sys::GGML_TYPE_F32,
            size: theirs.size(),
            n_rs_seq: 0,
            layers,
        })
        .unwrap();
        let ours = RecurrentMemory::new(cache, Some(storage), theirs.n_layer()).unwrap();
        Both {
            ours,
            theirs,
            n_seq,
        }
    }

    /// Places `ub` on both sides (plan, apply, s_copy) and checks that they agree.
    fn place(&mut self, ub: &Ub, what: &str) {
        let mut out = vec![0i32; self.ours.cache.size() as usize];
        let a = step_ours(&mut self.ours.cache, &ub.ours.view(), &mut out);
        let mut theirs = vec![0i32; self.ours.cache.size() as usize];
        let b = step_stock(&mut self.theirs, &ub.theirs.view(), &mut theirs);
        assert_eq!((a, &out[..a]), (b, &theirs[..b]), "{what}: s_copy differs");
        self.compare(what);
    }

    /// Every cell, head, used, n, rs_z and per-sequence positions agree.
    fn compare(&self, what: &str) {
        let c = &self.ours.cache;
        let t = &self.theirs;
        assert_eq!(
            (c.head(), c.used(), c.n(), c.rs_z()),
            (t.head(), t.used(), t.n(), t.rs_z()),
            "{what}: (head, used, n, rs_z)"
        );
        for (i, (a, b)) in c.cells().iter().zip(t.cells()).enumerate() {
            let seqs: Vec<i32> = a.seq.iter_ones().map(|q| q as i32).collect();
            assert_eq!(
                (a.pos, a.src, a.src0, a.tail, &seqs),
                (b.pos, b.src, b.src0, b.tail, &b.seqs),
                "{what}: cell {i}"
            );
        }
        for s in 0..self.n_seq as i32 {
            assert_eq!(
                (
                    self.ours.cache.seq_pos_min(s).unwrap(),
                    self.ours.cache.seq_pos_max(s).unwrap()
                ),
                (t.seq_pos_min(s), t.seq_pos_max(s)),
                "{what}: positions of sequence {s}"
            );
        }
    }

    /// Moves each listed sequence's position to `want` on both sides (their timed runs
    /// stopped at different points of a cycle).
    fn align(&mut self, want: &[(i32, i32)]) {
        for &(s, p) in want {
            let d = p - self.ours.cache.seq_pos_max(s).unwrap();
            self.ours.cache.seq_add(s, -1, -1, d).unwrap();
            let d = p - self.theirs.seq_pos_max(s);
            self.theirs.seq_add(s, -1, -1, d);
        }
    }

    /// New random bytes in every state tensor, the same on both sides.
    fn fill_tensors(&mut self) {
        let st = self.ours.storage.as_mut().unwrap();
        let layers: Vec<_> = st.layers().to_vec();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for l in layers {
            for (t, is_r) in [(l.r, true), (l.s, false)] {
                let n = if is_r {
                    self.theirs.r_bytes(l.il).len()
                } else {
                    self.theirs.s_bytes(l.il).len()
                };
                let bytes: Vec<u8> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 24) as u8
                    })
                    .collect();
                st.set(t, 0, &bytes).unwrap();
                if is_r {
                    self.theirs.set_r_bytes(l.il, &bytes);
                } else {
                    self.theirs.set_s_bytes(l.il, &bytes);
                }
            }
        }
    }
}

/// Ours: plan + apply + s_copy of one ubatch; returns `n` (the s_copy rows written).
fn step_ours(c: &mut RsCache, ub: &Ubatch<'_>, out: &mut [i32]) -> usize {
    let st = c.plan(std::slice::from_ref(ub)).unwrap();
    assert!(st == Status::Success, "ours: prepare failed");
    c.find_slot(ub).unwrap();
    let n = c.n() as usize;
    c.s_copy_into(&mut out[..n]).unwrap();
    n
}

/// Stock: `prepare` + `find_slot` + `s_copy(i)` for every cell of the slot.
fn step_stock(t: &mut stock::RefRs, ub: &stock::UbatchRef<'_>, out: &mut [i32]) -> usize {
    assert!(t.prepare(std::slice::from_ref(ub)), "stock: prepare failed");
    assert!(t.find_slot(ub), "stock: find_slot failed");
    let n = t.n() as usize;
    for (i, o) in out[..n].iter_mut().enumerate() {
        *o = t.s_copy(i as u32);
    }
    n
}

/// Times steps `0..k` in turn (criterion's iterations), running the untimed `rewind` each
/// time the cycle wraps; `next` keeps the place in the cycle between calls.
fn time_cycle<S>(
    b: &mut Bencher<'_>,
    s: &mut S,
    k: usize,
    next: &mut usize,
    mut step: impl FnMut(&mut S, usize),
    mut rewind: impl FnMut(&mut S),
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            if *next == k {
                rewind(s);
                *next = 0;
            }
            let run = left.min((k - *next) as u64);
            let t = Instant::now();
            for _ in 0..run {
                step(s, *next);
                *next += 1;
            }
            total += t.elapsed();
            left -= run;
        }
        total
    })
}

/// Times `routine` on `state` in chunks of `per` iterations, running the untimed `setup`
/// before each chunk (the last chunk may be shorter: `routine` gets how many to run).
fn with_setup<S>(
    b: &mut Bencher<'_>,
    state: &mut S,
    per: u64,
    mut setup: impl FnMut(&mut S),
    mut routine: impl FnMut(&mut S, u64),
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let run = left.min(per);
            setup(state);
            let t = Instant::now();
            routine(state, run);
            total += t.elapsed();
            left -= run;
        }
        total
    })
}

/// A benchmark of the table: a criterion group holding `stock` and `ours` (and `memcpy`, with
/// the byte count, for state rows: then the ids are `<op>_stock`, `<op>_ours`).
struct Row {
    group: String,
    op: Option<&'static str>,
    bytes: Option<usize>,
}

impl Row {
    fn plain(group: &str) -> Row {
        Row {
            group: group.to_string(),
            op: None,
            bytes: None,
        }
    }
}

/// Placement: a steady-state cycle of `n_seq_tokens`-token ubatches over `seqs` (ascending),
/// in a memory where all of `both`'s sequences hold a state.
fn bench_cycle(
    c: &mut Criterion,
    rows: &mut Vec<Row>,
    both: &mut Both,
    name: &str,
    seqs: &[i32],
    n_seq_tokens: u32,
    detail: bool,
) {
    let start: Vec<(i32, i32)> = seqs
        .iter()
        .map(|&s| (s, both.ours.cache.seq_pos_max(s).unwrap()))
        .collect();
    let ubs: Vec<Ub> = (0..CYCLE as i32)
        .map(|k| {
            let sets: Vec<(i32, i32)> = start
                .iter()
                .map(|&(s, p)| (s, p + 1 + k * n_seq_tokens as i32))
                .collect();
            Ub::equal(&sets, n_seq_tokens)
        })
        .collect();
    // one checked step on both sides, then back
    both.place(&ubs[0], name);
    both.align(&start);
    let shift = -((CYCLE as i32) * n_seq_tokens as i32);
    let rewind_seqs = seqs.to_vec();
    let size = both.ours.cache.size() as usize;

    let mut g = c.benchmark_group(name);
    {
        let views: Vec<stock::UbatchRef<'_>> = ubs.iter().map(|u| u.theirs.view()).collect();
        let mut out = vec![0i32; size];
        let mut next = 0;
        g.bench_function("stock", |b| {
            time_cycle(
                b,
                &mut both.theirs,
                CYCLE,
                &mut next,
                |t, k| {
                    black_box(step_stock(t, &views[k], &mut out));
                },
                |t| {
                    for &s in &rewind_seqs {
                        t.seq_add(s, -1, -1, shift);
                    }
                },
            )
        });
    }
    {
        let views: Vec<Ubatch<'_>> = ubs.iter().map(|u| u.ours.view()).collect();
        let mut out = vec![0i32; size];
        let mut next = 0;
        g.bench_function("ours", |b| {
            time_cycle(
                b,
                &mut both.ours.cache,
                CYCLE,
                &mut next,
                |o, k| {
                    black_box(step_ours(o, &views[k], &mut out));
                },
                |o| {
                    for &s in &rewind_seqs {
                        o.seq_add(s, -1, -1, shift).unwrap();
                    }
                },
            )
        });
    }
    g.finish();
    both.align(&start);
    both.place(&ubs[0], name);
    both.align(&start);
    rows.push(Row::plain(name));
    if detail {
        bench_substeps(c, rows, both, name, &ubs, &rewind_seqs, shift, &start);
    }
}

/// Where the time of a placement step goes: each sub-step of [`bench_cycle`] alone (the
/// ubatch checks are ours only: stock trusts its batch splitter).
#[allow(clippy::too_many_arguments)]
fn bench_substeps(
    c: &mut Criterion,
    rows: &mut Vec<Row>,
    both: &mut Both,
    name: &str,
    ubs: &[Ub],
    seqs: &[i32],
    shift: i32,
    start: &[(i32, i32)],
) {
    let size = both.ours.cache.size() as usize;
    // checks of the ubatch (plan = checks + prepare)
    let sub = format!("{name}__check");
    let mut g = c.benchmark_group(&sub);
    {
        let view = ubs[0].ours.view();
        let o = &both.ours.cache;
        g.bench_function("ours", |b| {
            b.iter(|| o.check_ubatch(black_box(&view)).unwrap())
        });
    }
    g.finish();
    rows.push(Row::plain(&sub));
    // prepare alone (the simulated placement of the next ubatch; changes nothing)
    let sub = format!("{name}__prepare");
    let mut g = c.benchmark_group(&sub);
    {
        let view = ubs[0].theirs.view();
        let t = &mut both.theirs;
        g.bench_function("stock", |b| {
            b.iter(|| assert!(t.prepare(std::slice::from_ref(&view))))
        });
    }
    {
        let view = ubs[0].ours.view();
        let o = &mut both.ours.cache;
        g.bench_function("ours", |b| {
            b.iter(|| assert!(o.prepare(std::slice::from_ref(&view))))
        });
    }
    g.finish();
    both.compare(&sub);
    rows.push(Row::plain(&sub));
    // find_slot alone (apply), over the same cycle
    let sub = format!("{name}__apply");
    let mut g = c.benchmark_group(&sub);
    {
        let views: Vec<stock::UbatchRef<'_>> = ubs.iter().map(|u| u.theirs.view()).collect();
        let mut next = 0;
        g.bench_function("stock", |b| {
            time_cycle(
                b,
                &mut both.theirs,
                CYCLE,
                &mut next,
                |t, k| assert!(t.find_slot(&views[k])),
                |t| {
                    for &s in seqs {
                        t.seq_add(s, -1, -1, shift);
                    }
                },
            )
        });
    }
    {
        let views: Vec<Ubatch<'_>> = ubs.iter().map(|u| u.ours.view()).collect();
        let mut next = 0;
        g.bench_function("ours", |b| {
            time_cycle(
                b,
                &mut both.ours.cache,
                CYCLE,
                &mut next,
                |o, k| o.find_slot(&views[k]).unwrap(),
                |o| {
                    for &s in seqs {
                        o.seq_add(s, -1, -1, shift).unwrap();
                    }
                },
            )
        });
    }
    g.finish();
    both.align(start);
    both.place(&ubs[0], &sub);
    both.align(start);
    rows.push(Row::plain(&sub));
    // the s_copy input alone (no rollback planes: it changes nothing)
    let sub = format!("{name}__s_copy");
    let mut g = c.benchmark_group(&sub);
    {
        let mut out = vec![0i32; size];
        let t = &mut both.theirs;
        g.bench_function("stock", |b| {
            b.iter(|| {
                let n = t.n();
                for (i, o) in out[..n as usize].iter_mut().enumerate() {
                    *o = t.s_copy(i as u32);
                }
                black_box(&out);
            })
        });
    }
    {
        let mut out = vec![0i32; size];
        let o = &mut both.ours.cache;
        g.bench_function("ours", |b| {
            b.iter(|| {
                let n = o.n() as usize;
                o.s_copy_into(&mut out[..n]).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
    both.compare(&sub);
    rows.push(Row::plain(&sub));
}

/// Placement of a prompt of 4 x 32 tokens for 4 sequences that hold no state (removed again,
/// untimed, before each step).
fn bench_prompt_new(c: &mut Criterion, rows: &mut Vec<Row>, both: &mut Both, seqs: &[i32]) {
    let name = "rs_prompt_64seq_4x32tok_new";
    let sets: Vec<(i32, i32)> = seqs.iter().map(|&s| (s, 0)).collect();
    let ub = Ub::equal(&sets, 32);
    let size = both.ours.cache.size() as usize;
    let mut g = c.benchmark_group(name);
    {
        let view = ub.theirs.view();
        let mut out = vec![0i32; size];
        g.bench_function("stock", |b| {
            with_setup(
                b,
                &mut both.theirs,
                1,
                |t| {
                    for &s in seqs {
                        t.seq_rm(s, -1, -1);
                    }
                },
                |t, _| {
                    black_box(step_stock(t, &view, &mut out));
                },
            )
        });
    }
    {
        let view = ub.ours.view();
        let mut out = vec![0i32; size];
        g.bench_function("ours", |b| {
            with_setup(
                b,
                &mut both.ours.cache,
                1,
                |o| {
                    for &s in seqs {
                        o.seq_rm(s, -1, -1).unwrap();
                    }
                },
                |o, _| {
                    black_box(step_ours(o, &view, &mut out));
                },
            )
        });
    }
    g.finish();
    for &s in seqs {
        both.ours.cache.seq_rm(s, -1, -1).unwrap();
        both.theirs.seq_rm(s, -1, -1);
    }
    both.place(&ub, name);
    rows.push(Row::plain(name));
}

fn bench_placement(c: &mut Criterion, rows: &mut Vec<Row>) {
    let model = stock::mamba_model_path();
    for n_seq in [64u32, 16] {
        let mut both = Both::new(&model, n_seq);
        let all: Vec<i32> = (0..n_seq as i32).collect();
        // every sequence holds a state, at different positions
        both.place(&Ub::at(&all, |s| 10 * s), "fill");
        let name = format!("rs_decode_{n_seq}seq_1tok");
        bench_cycle(c, rows, &mut both, &name, &all, 1, n_seq == 64);
        if n_seq == 64 {
            let prompt = [8, 24, 40, 56];
            bench_cycle(
                c,
                rows,
                &mut both,
                "rs_prompt_64seq_4x32tok_continue",
                &prompt,
                32,
                true,
            );
            bench_prompt_new(c, rows, &mut both, &prompt);
        }
    }
}

/// Refills the chunk `16..32`: removes the sequences and places them again, new, at position 0.
struct Refill {
    chunk: Vec<i32>,
    ub: Ub,
}

impl Refill {
    fn new() -> Refill {
        let chunk: Vec<i32> = (CHUNK..2 * CHUNK).collect();
        let ub = Ub::at(&chunk, |_| 0);
        Refill { chunk, ub }
    }

    fn stock(&self, t: &mut stock::RefRs, view: &stock::UbatchRef<'_>, out: &mut [i32]) {
        for &s in &self.chunk {
            t.seq_rm(s, -1, -1);
        }
        step_stock(t, view, out);
    }

    fn ours(&self, o: &mut RsCache, view: &Ubatch<'_>, out: &mut [i32]) {
        for &s in &self.chunk {
            o.seq_rm(s, -1, -1).unwrap();
        }
        step_ours(o, view, out);
    }

    fn both(&self, both: &mut Both, what: &str) {
        for &s in &self.chunk {
            both.ours.cache.seq_rm(s, -1, -1).unwrap();
            both.theirs.seq_rm(s, -1, -1);
        }
        both.place(&self.ub, what);
    }

    /// The group `name`: `stock` and `ours` each time their op on the sequences of the chunk,
    /// up to all of them a timed run, after putting the chunk back untimed; afterwards the
    /// chunk is placed again on both sides.
    fn bench(
        &self,
        c: &mut Criterion,
        both: &mut Both,
        name: &str,
        mut stock_op: impl FnMut(&mut stock::RefRs, i32),
        mut ours_op: impl FnMut(&mut RsCache, i32),
    ) {
        let per = CHUNK as u64;
        let size = 64;
        let mut g = c.benchmark_group(name);
        {
            let view = self.ub.theirs.view();
            let mut out = vec![0i32; size];
            g.bench_function("stock", |b| {
                with_setup(
                    b,
                    &mut both.theirs,
                    per,
                    |t| self.stock(t, &view, &mut out),
                    |t, n| {
                        for &s in &self.chunk[..n as usize] {
                            stock_op(t, s);
                        }
                    },
                )
            });
        }
        {
            let view = self.ub.ours.view();
            let mut out = vec![0i32; size];
            g.bench_function("ours", |b| {
                with_setup(
                    b,
                    &mut both.ours.cache,
                    per,
                    |o| self.ours(o, &view, &mut out),
                    |o, n| {
                        for &s in &self.chunk[..n as usize] {
                            ours_op(o, s);
                        }
                    },
                )
            });
        }
        g.finish();
        self.both(both, name);
    }
}

fn bench_seq_ops(c: &mut Criterion, rows: &mut Vec<Row>) {
    let model = stock::mamba_model_path();
    let mut both = Both::new(&model, 64);
    let all: Vec<i32> = (0..64).collect();
    both.place(&Ub::at(&all, |s| 10 * s), "fill");
    let refill = Refill::new();
    refill.both(&mut both, "refill");
    let size = 64;

    // seq_rm of a whole sequence (16 different ones per timed chunk)
    let name = "rs_seq_rm_whole_64seq";
    refill.bench(
        c,
        &mut both,
        name,
        |t, s| {
            black_box(t.seq_rm(s, -1, -1));
        },
        |o, s| {
            black_box(o.seq_rm(s, -1, -1).unwrap());
        },
    );
    rows.push(Row::plain(name));

    // seq_rm of a whole sequence and its placement again (a finished request replaced by a
    // new one in the same slot): plan + apply of one new 1-token sequence set
    let name = "rs_seq_rm_replace_64seq";
    let s = 17;
    let ub = Ub::at(&[s], |_| 0);
    let mut g = c.benchmark_group(name);
    {
        let view = ub.theirs.view();
        g.bench_function("stock", |b| {
            b.iter(|| {
                let t = &mut both.theirs;
                black_box(t.seq_rm(s, -1, -1));
                assert!(t.prepare(std::slice::from_ref(&view)));
                assert!(t.find_slot(&view));
            })
        });
    }
    {
        let view = ub.ours.view();
        g.bench_function("ours", |b| {
            b.iter(|| {
                let o = &mut both.ours.cache;
                black_box(o.seq_rm(s, -1, -1).unwrap());
                assert!(o.plan(std::slice::from_ref(&view)).unwrap() == Status::Success);
                o.find_slot(&view).unwrap();
            })
        });
    }
    g.finish();
    both.compare(name);
    rows.push(Row::plain(name));

    // seq_cp of a state to 16 sequences that hold their own (which they leave)
    let name = "rs_seq_cp_64seq";
    let src = 3;
    refill.bench(
        c,
        &mut both,
        name,
        |t, d| t.seq_cp(src, d, -1, -1),
        |o, d| o.seq_cp(src, d, -1, -1).unwrap(),
    );
    rows.push(Row::plain(name));

    // seq_keep of one sequence; the 63 others placed again (new, position 0) untimed
    let name = "rs_seq_keep_64seq";
    let keep = 40;
    let others: Vec<i32> = (0..64).filter(|&s| s != keep).collect();
    let restore = Ub::at(&others, |_| 0);
    // start from the state the restore gives
    for &s in &others {
        both.ours.cache.seq_rm(s, -1, -1).unwrap();
        both.theirs.seq_rm(s, -1, -1);
    }
    both.place(&restore, "keep restore");
    let mut g = c.benchmark_group(name);
    {
        let view = restore.theirs.view();
        let mut out = vec![0i32; size];
        let mut dirty = false;
        g.bench_function("stock", |b| {
            with_setup(
                b,
                &mut both.theirs,
                1,
                |t| {
                    if dirty {
                        step_stock(t, &view, &mut out);
                    }
                    dirty = true;
                },
                |t, _| t.seq_keep(keep),
            )
        });
        if dirty {
            step_stock(&mut both.theirs, &view, &mut out);
        }
    }
    {
        let view = restore.ours.view();
        let mut out = vec![0i32; size];
        let mut dirty = false;
        g.bench_function("ours", |b| {
            with_setup(
                b,
                &mut both.ours.cache,
                1,
                |o| {
                    if dirty {
                        step_ours(o, &view, &mut out);
                    }
                    dirty = true;
                },
                |o, _| o.seq_keep(keep).unwrap(),
            )
        });
        if dirty {
            step_ours(&mut both.ours.cache, &view, &mut out);
        }
    }
    g.finish();
    both.compare(name);
    rows.push(Row::plain(name));

    // seq_add of one sequence's state position
    let name = "rs_seq_add_64seq";
    let s = 11;
    let p = both.ours.cache.seq_pos_max(s).unwrap();
    let mut g = c.benchmark_group(name);
    g.bench_function("stock", |b| b.iter(|| both.theirs.seq_add(s, -1, -1, 1)));
    g.bench_function("ours", |b| {
        b.iter(|| both.ours.cache.seq_add(s, -1, -1, 1).unwrap())
    });
    g.finish();
    both.align(&[(s, p)]);
    both.compare(name);
    rows.push(Row::plain(name));

    // seq_pos_min and seq_pos_max of every sequence
    let name = "rs_seq_pos_minmax_all_64seq";
    let mut g = c.benchmark_group(name);
    g.bench_function("stock", |b| {
        b.iter(|| {
            let t = &both.theirs;
            let mut acc = 0i64;
            for s in 0..64 {
                acc += (t.seq_pos_min(s) + t.seq_pos_max(s)) as i64;
            }
            black_box(acc)
        })
    });
    g.bench_function("ours", |b| {
        b.iter(|| {
            let o = &both.ours.cache;
            let mut acc = 0i64;
            for s in 0..64 {
                acc += (o.seq_pos_min(s).unwrap() + o.seq_pos_max(s).unwrap()) as i64;
            }
            black_box(acc)
        })
    });
    g.finish();
    rows.push(Row::plain(name));
}

// ---------------------------------------------------------------------------------------------
// state

type RsStateWrite = unsafe extern "C" fn(*const c_void, i32, u32, *mut u8, usize) -> usize;

/// `rsref_state_write` called directly into a caller buffer. `RefRs::state_write` returns a
/// fresh `Vec` sized by a first counting pass, so timing it would add a size query, an
/// allocation and page faults to the stock side only. The shim is already loaded by
/// `llama_memory_reference`; `RTLD_NOLOAD` returns that same instance.
struct StockWriter {
    rs: *const c_void,
    write: RsStateWrite,
}

impl StockWriter {
    fn new(rs: &stock::RefRs) -> StockWriter {
        let ptr = common::debug_ptr(&format!("{rs:?}"), "RefRs");
        let sym = common::shim_symbol;
        // SAFETY: the symbols are the rsref.h functions whose C prototypes the types below
        // transcribe.
        let w = unsafe {
            let n_layer: unsafe extern "C" fn(*const c_void) -> u32 =
                std::mem::transmute(sym("rsref_n_layer"));
            assert_eq!(n_layer(ptr), rs.n_layer(), "not the stock memory's pointer");
            StockWriter {
                rs: ptr,
                write: std::mem::transmute::<*mut c_void, RsStateWrite>(sym("rsref_state_write")),
            }
        };
        assert_eq!(
            w.write_raw(-1, std::ptr::null_mut(), 0),
            rs.state_size(-1, 0),
            "not the stock memory's pointer"
        );
        w
    }

    fn write_raw(&self, seq: i32, buf: *mut u8, len: usize) -> usize {
        // SAFETY: `rs` is the live memory of a RefRs the caller keeps borrowed; `buf` is
        // null (size query) or writable for `len` bytes, which the shim respects.
        unsafe { (self.write)(self.rs, seq, 0, buf, len) }
    }

    /// Stock `state_write(seq, 0)` into `buf`: bytes written, 0 on failure.
    fn write(&self, seq: i32, buf: &mut [u8]) -> usize {
        self.write_raw(seq, buf.as_mut_ptr(), buf.len())
    }
}

/// Ours: the blob of `seq` (8-byte header + memory part), or the whole memory part (-1).
fn save_ours(mem: &RecurrentMemory, seq: i32, buf: &mut [u8], stash: &mut state::Stash) -> usize {
    if seq == -1 {
        state::get_data(mem, buf).unwrap()
    } else {
        state::seq_get_data(mem, buf, seq, 0, stash).unwrap()
    }
}

fn restore_ours(mem: &mut RecurrentMemory, seq: i32, blob: &[u8], stash: &state::Stash) -> usize {
    if seq == -1 {
        state::set_data(mem, blob).unwrap()
    } else {
        state::seq_set_data(mem, blob, seq, 0, stash).unwrap()
    }
}

/// Our blob of `seq` and stock's (the memory part: ours without its 8-byte header), checked
/// to be byte-identical.
fn blobs(both: &Both, seq: i32, what: &str) -> (Vec<u8>, Vec<u8>) {
    let len = if seq == -1 {
        state::get_size(&both.ours).unwrap()
    } else {
        state::seq_get_size(&both.ours, seq, 0).unwrap()
    };
    let mut ours = vec![0u8; len];
    assert_eq!(
        save_ours(&both.ours, seq, &mut ours, &mut state::Stash::new()),
        len
    );
    let theirs = both.theirs.state_write(seq, 0);
    let hdr = if seq == -1 { 0 } else { 8 };
    assert!(ours[hdr..] == theirs[..], "{what}: state blobs differ");
    (ours, theirs)
}

fn bench_state(c: &mut Criterion, rows: &mut Vec<Row>) {
    for (n_layer, n_embd) in [(2u32, 64u32), (8, 256)] {
        let model = stock::mamba_model_path_ex(n_layer, n_embd);
        let mut both = Both::new(&model, 64);
        let all: Vec<i32> = (0..64).collect();
        both.place(&Ub::at(&all, |s| 10 * s), "fill");
        both.fill_tensors();
        for (seq, kind) in [(5, "seq"), (-1, "whole")] {
            let name = format!("rs_state_mamba_l{n_layer}_e{n_embd}_64seq_{kind}");
            let (ours_blob, stock_blob) = blobs(&both, seq, &name);
            let bytes = stock_blob.len();
            let writer = StockWriter::new(&both.theirs);
            // preallocated, already touched output buffers
            let mut out_ours = vec![1u8; ours_blob.len()];
            let mut out_stock = vec![1u8; bytes];
            let mut out_copy = vec![1u8; bytes];
            assert_eq!(writer.write(seq, &mut out_stock), bytes);
            assert!(out_stock == stock_blob);
            let stash = state::Stash::new();
            let mut g = c.benchmark_group(&name);
            g.bench_function("memcpy", |b| {
                b.iter(|| out_copy.copy_from_slice(black_box(&stock_blob)));
                black_box(&out_copy);
            });
            g.bench_function("save_stock", |b| {
                b.iter(|| black_box(writer.write(seq, &mut out_stock)))
            });
            g.bench_function("save_ours", |b| {
                let mut st = state::Stash::new();
                b.iter(|| black_box(save_ours(&both.ours, seq, &mut out_ours, &mut st)))
            });
            g.bench_function("restore_stock", |b| {
                b.iter(|| assert!(both.theirs.state_read(seq, 0, black_box(&stock_blob))))
            });
            g.bench_function("restore_ours", |b| {
                b.iter(|| black_box(restore_ours(&mut both.ours, seq, &ours_blob, &stash)))
            });
            g.finish();
            // both still hold the state they started with, and both writers still write it
            let after = blobs(&both, seq, &name);
            assert!(
                after.0 == ours_blob && after.1 == stock_blob,
                "{name}: state changed"
            );
            assert_eq!(writer.write(seq, &mut out_stock), bytes);
            assert!(out_stock == stock_blob, "{name}: stock writer");
            both.compare(&name);
            for op in ["save", "restore"] {
                rows.push(Row {
                    group: name.clone(),
                    op: Some(op),
                    bytes: Some(bytes),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// diagnostics

/// Where our slot search spends its time: the per-cell tests it runs over every cell on each
/// call (`RsCell::is_empty`, bitvec's `not_any`, twice per call: the search for the next empty
/// cell and the `used` recount; `SeqSet::count_ones` once per sequence set), timed over the
/// 64 cells of a full memory against the same tests on the raw 64-bit words of the sets.
fn bench_diag(c: &mut Criterion, diag: &mut Vec<String>) {
    let model = stock::mamba_model_path();
    let mut both = Both::new(&model, 64);
    let all: Vec<i32> = (0..64).collect();
    both.place(&Ub::at(&all, |s| 10 * s), "fill");
    let cells = both.ours.cache.cells();
    let name = "rs_diag_count_nonempty_64cells";
    let mut g = c.benchmark_group(name);
    g.bench_function("bitvec", |b| {
        b.iter(|| black_box(cells).iter().filter(|c| !c.is_empty()).count())
    });
    g.bench_function("raw_words", |b| {
        b.iter(|| {
            black_box(cells)
                .iter()
                .filter(|c| c.seq.as_raw_slice().iter().any(|&w| w != 0))
                .count()
        })
    });
    g.finish();
    diag.push(name.to_string());
    let name = "rs_diag_count_ones_64cells";
    let mut g = c.benchmark_group(name);
    g.bench_function("bitvec", |b| {
        b.iter(|| {
            black_box(cells)
                .iter()
                .map(|c| c.seq.count_ones())
                .sum::<usize>()
        })
    });
    g.bench_function("raw_words", |b| {
        b.iter(|| {
            black_box(cells)
                .iter()
                .map(|c| {
                    c.seq
                        .as_raw_slice()
                        .iter()
                        .map(|w| w.count_ones() as usize)
                        .sum::<usize>()
                })
                .sum::<usize>()
        })
    });
    g.finish();
    diag.push(name.to_string());
}

// ---------------------------------------------------------------------------------------------
// table

fn human_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn main() {
    common::start_run();
    let mut c = common::criterion(Duration::from_secs(2), 20);
    let mut rows = Vec::new();
    bench_placement(&mut c, &mut rows);
    bench_seq_ops(&mut c, &mut rows);
    bench_state(&mut c, &mut rows);
    let mut diag = Vec::new();
    bench_diag(&mut c, &mut diag);
    c.final_summary();

    let dir = common::criterion_dir();
    println!(
        "\n| benchmark | bytes | stock llama.cpp (median) | llama-memory (median) \
         | ratio (stock / ours) | memcpy (median) | ours vs memcpy (memcpy / ours) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (sid, oid) = match r.op {
            Some(op) => (format!("{op}_stock"), format!("{op}_ours")),
            None => ("stock".to_string(), "ours".to_string()),
        };
        let Some(o) = median_ns(&dir, &r.group, &oid) else {
            continue;
        };
        let s = median_ns(&dir, &r.group, &sid);
        let label = match r.op {
            Some(op) => format!("{} {op}", r.group),
            None => r.group.clone(),
        };
        let (bytes, m, vs) = match (r.bytes, median_ns(&dir, &r.group, "memcpy")) {
            (Some(b), Some(m)) => (human_bytes(b), human(m), format!("{:.2}", m / o)),
            (Some(b), None) => (human_bytes(b), "–".into(), "–".into()),
            _ => ("–".into(), "–".into(), "–".into()),
        };
        let (s, ratio) = match s {
            Some(s) => (human(s), format!("{:.2}x", s / o)),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {label} | {bytes} | {s} | {} | {ratio} | {m} | {vs} |",
            human(o)
        );
    }
    println!("\n| diagnostic (64 cells) | bitvec (as in src/recurrent) | raw words | ratio |");
    println!("|---|---:|---:|---:|");
    for n in &diag {
        if let (Some(b), Some(r)) = (
            median_ns(&dir, n, "bitvec"),
            median_ns(&dir, n, "raw_words"),
        ) {
            println!("| {n} | {} | {} | {:.1}x |", human(b), human(r), b / r);
        }
    }
}
