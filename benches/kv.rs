//! The same KV-cache work on stock llama.cpp (the pinned tree, through the reference shim) and
//! on llama-memory, in one run, with criterion as the harness. Both sides are brought to the
//! same cell layout first (and the slots they choose are checked to agree); each benchmark
//! then times one operation on each side. At the end the ratio table (stock median / ours
//! median) is printed in Markdown for BENCHMARKS.md.
//!
//! Run: `cargo bench --bench kv` (add `-- <filter>` to select benchmarks).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use llama_memory::{KvCache, KvParams, MaskOut, SwaType, UbatchBuf};
use llama_memory_reference as stock;

mod common;
use common::{human, median_ns};

/// Both caches, kept in the same state.
struct Both {
    ours: KvCache,
    theirs: stock::RefKv,
}

impl Both {
    fn new(size: u32, n_seq_max: u32, swa: Option<u32>) -> Both {
        let (swa_type, n_swa) = swa.map_or((SwaType::None, 0), |n| (SwaType::Standard, n));
        let theirs = stock::RefKv::tiny(&stock::Params {
            kv_size: size,
            n_seq_max,
            unified: true,
            n_swa,
            swa_type: swa_type as i32,
            ..stock::Params::default()
        });
        let ours = KvCache::new(KvParams {
            size,
            n_seq_max,
            swa_type,
            n_swa,
            n_embd_v_gqa_max: theirs.n_embd_v_gqa_max(),
            ..KvParams::default()
        })
        .unwrap();
        Both { ours, theirs }
    }

    /// Places `n` tokens of `seq` (continuing its positions) on both sides.
    fn place(&mut self, seq: i32, n: u32) {
        let p0 = self.ours.seq_pos_max(seq).unwrap() + 1;
        let ub = stock::Ubatch::for_seq(seq, p0, n);
        self.place_ubatch(&ub);
    }

    fn place_ubatch(&mut self, ub: &stock::Ubatch) {
        let buf = to_ours(ub);
        let v = ub.view();
        let b = self.theirs.prepare(&[ub.view()]).expect("stock: no slot");
        let a = self.ours.prepare(&[buf.view()]).expect("ours: no slot");
        let strm: Vec<i32> = a[0].strm.iter().map(|&s| s as i32).collect();
        assert_eq!(
            (&a[0].idxs, strm),
            (&b[0].idxs, b[0].strm.clone()),
            "the two caches diverged"
        );
        self.theirs.apply_ubatch(&b[0], &v);
        self.ours.apply_ubatch(&a[0], &buf.view());
    }

    /// Fills the cache with `n_seq` sequences in interleaved chunks, leaving `spare` cells free.
    fn fill_interleaved(&mut self, n_seq: i32, chunk: u32, spare: u32) {
        let target = self.ours.size() - spare;
        let mut s = 0;
        while self.ours.cells(0).get_used() + chunk <= target {
            self.place(s, chunk);
            s = (s + 1) % n_seq;
        }
    }
}

fn to_ours(u: &stock::Ubatch) -> UbatchBuf {
    let seqs: Vec<&[i32]> = u.seq_ids.iter().map(Vec::as_slice).collect();
    let mut b = UbatchBuf::new(&u.tokens, &u.pos, &seqs);
    b.n_pos = u.n_pos;
    b.n_seq_tokens = u.n_seq_tokens;
    b.n_seqs = u.n_seqs;
    b
}

const BIG: u32 = 131_072;

/// Times `routine` on `state`, running the untimed `setup` before each iteration (criterion's
/// `iter_batched` cannot give both closures the same mutable state).
fn with_setup<S>(
    b: &mut criterion::Bencher<'_>,
    state: &mut S,
    mut setup: impl FnMut(&mut S),
    mut routine: impl FnMut(&mut S),
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            setup(state);
            let t = Instant::now();
            routine(state);
            total += t.elapsed();
        }
        total
    })
}

fn bench_placement(c: &mut Criterion, names: &mut Vec<String>) {
    // 64 sequences in 32-cell chunks over 131072 cells, then 4 of them finished: the free
    // cells are 32-cell holes every 512 cells, and the search head sits at the end.
    let mut both = Both::new(BIG, 65, None);
    both.fill_interleaved(64, 32, 0);
    for s in [3, 19, 35, 51] {
        both.ours.seq_rm(s, -1, -1).unwrap();
        both.theirs.seq_rm(s, -1, -1);
    }
    both.place(63, 1); // moves both heads past the first hole
    for n in [1u32, 32, 512] {
        let name = format!("placement_fragmented_131072_64seq_{n}tok");
        let p0 = both.ours.seq_pos_max(7).unwrap() + 1;
        let ub = stock::Ubatch::for_seq(7, p0, n);
        let buf = to_ours(&ub);
        let mut g = c.benchmark_group(&name);
        g.bench_function("stock", |b| {
            b.iter(|| black_box(both.theirs.prepare(&[ub.view()])))
        });
        g.bench_function("ours", |b| {
            b.iter(|| black_box(both.ours.prepare(&[buf.view()])))
        });
        g.finish();
        names.push(name);
    }
}

fn bench_seq_ops(c: &mut Criterion, names: &mut Vec<String>) {
    // Every cell used: 64 sequences of 2048 cells in 32-cell chunks; sequence 64 is spare.
    let mut both = Both::new(BIG, 65, None);
    both.fill_interleaved(64, 32, 0);
    let spare = 64;

    let name = "seq_rm_whole_seq_131072".to_string();
    let mut g = c.benchmark_group(&name);
    g.bench_function("stock", |b| {
        with_setup(
            b,
            &mut both.theirs,
            |t| t.seq_cp(5, spare, -1, -1),
            |t| {
                black_box(t.seq_rm(spare, -1, -1));
            },
        )
    });
    g.bench_function("ours", |b| {
        with_setup(
            b,
            &mut both.ours,
            |o| o.seq_cp(5, spare, -1, -1).unwrap(),
            |o| {
                black_box(o.seq_rm(spare, -1, -1).unwrap());
            },
        )
    });
    g.finish();
    names.push(name);

    let name = "seq_rm_range_131072".to_string();
    let mut g = c.benchmark_group(&name);
    g.bench_function("stock", |b| {
        with_setup(
            b,
            &mut both.theirs,
            |t| t.seq_cp(5, spare, -1, -1),
            |t| {
                black_box(t.seq_rm(spare, 1024, -1));
            },
        )
    });
    g.bench_function("ours", |b| {
        with_setup(
            b,
            &mut both.ours,
            |o| o.seq_cp(5, spare, -1, -1).unwrap(),
            |o| {
                black_box(o.seq_rm(spare, 1024, -1).unwrap());
            },
        )
    });
    g.finish();
    both.ours.seq_rm(spare, -1, -1).unwrap();
    both.theirs.seq_rm(spare, -1, -1);
    names.push(name);

    let name = "seq_cp_whole_seq_131072".to_string();
    let mut g = c.benchmark_group(&name);
    g.bench_function("stock", |b| {
        with_setup(
            b,
            &mut both.theirs,
            |t| {
                t.seq_rm(spare, -1, -1);
            },
            |t| t.seq_cp(9, spare, -1, -1),
        )
    });
    g.bench_function("ours", |b| {
        with_setup(
            b,
            &mut both.ours,
            |o| {
                o.seq_rm(spare, -1, -1).unwrap();
            },
            |o| o.seq_cp(9, spare, -1, -1).unwrap(),
        )
    });
    g.finish();
    names.push(name);

    let name = "seq_add_whole_seq_131072".to_string();
    let mut g = c.benchmark_group(&name);
    g.bench_function("stock", |b| b.iter(|| both.theirs.seq_add(11, -1, -1, 1)));
    g.bench_function("ours", |b| {
        b.iter(|| both.ours.seq_add(11, -1, -1, 1).unwrap())
    });
    g.finish();
    names.push(name);
}

fn bench_masks(c: &mut Criterion, names: &mut Vec<String>) {
    for n_kv in [32_768u32, BIG] {
        for n_seq in [1i32, 16] {
            for swa in [None, Some(4096)] {
                for n_tokens in [1u32, 32, 512] {
                    // Cells filled by the sequences in 256-cell chunks, then one ubatch of
                    // n_tokens spread over the sequences, each continuing its positions.
                    let mut both = Both::new(n_kv, n_seq as u32, swa);
                    both.fill_interleaved(n_seq, 256, 512);
                    let mut next: Vec<i32> = (0..n_seq)
                        .map(|s| both.ours.seq_pos_max(s).unwrap() + 1)
                        .collect();
                    let mut pos = Vec::new();
                    let mut seq_ids = Vec::new();
                    for i in 0..n_tokens as i32 {
                        let s = i % n_seq;
                        pos.push(next[s as usize]);
                        next[s as usize] += 1;
                        seq_ids.push(vec![s]);
                    }
                    let ub = stock::Ubatch::simple(vec![1; n_tokens as usize], pos, seq_ids);
                    both.place_ubatch(&ub);
                    let buf = to_ours(&ub);
                    let swa_name = swa.map_or("noswa".to_string(), |n| format!("swa{n}"));
                    let name = format!("kq_mask_nkv{n_kv}_{n_tokens}tok_{n_seq}seq_{swa_name}");
                    let len = (n_kv * n_tokens) as usize;
                    let mut out_ours = vec![0f32; len];
                    let mut out_stock = vec![0f32; len];
                    let view = ub.view();
                    let mut g = c.benchmark_group(&name);
                    g.bench_function("stock", |b| {
                        b.iter(|| {
                            both.theirs
                                .kq_mask_f32_into(&view, true, n_kv, 1, &mut out_stock)
                        })
                    });
                    g.bench_function("ours", |b| {
                        b.iter(|| {
                            both.ours
                                .set_input_kq_mask(
                                    &buf.view(),
                                    true,
                                    n_kv,
                                    1,
                                    MaskOut::F32(&mut out_ours),
                                )
                                .unwrap()
                        })
                    });
                    // The floor for both: a plain fill of the same bytes (memset) in the same
                    // run, to tell output-bound rows from slow ones.
                    let mut out_memset = vec![0f32; len];
                    g.bench_function("memset", |b| {
                        b.iter(|| {
                            let o = black_box(&mut out_memset[..]);
                            o.fill(0.0);
                            black_box(o.as_ptr());
                        })
                    });
                    g.finish();
                    assert!(
                        out_ours
                            .iter()
                            .zip(&out_stock)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{name}: masks differ"
                    );
                    names.push(name);
                }
            }
        }
    }
}

fn main() {
    common::start_run();
    let mut c = common::criterion(Duration::from_secs(1), 10);
    let mut names = Vec::new();
    bench_placement(&mut c, &mut names);
    bench_seq_ops(&mut c, &mut names);
    bench_masks(&mut c, &mut names);
    c.final_summary();

    let dir = common::criterion_dir();
    println!(
        "\n| benchmark | stock llama.cpp (median) | llama-memory (median) | ratio (stock / ours) |"
    );
    println!("|---|---:|---:|---:|");
    for n in names.iter().filter(|n| !n.starts_with("kq_mask")) {
        if let (Some(s), Some(o)) = (median_ns(&dir, n, "stock"), median_ns(&dir, n, "ours")) {
            println!("| {n} | {} | {} | {:.2}x |", human(s), human(o), s / o);
        }
    }
    // Masks: bandwidth is bytes of mask written / median time; a side near the memset figure
    // is bound by writing its output.
    println!(
        "\n| benchmark | mask bytes | stock llama.cpp (median) | llama-memory (median) \
         | ratio (stock / ours) | memset (median) | stock GB/s | ours GB/s | memset GB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in names.iter().filter(|n| n.starts_with("kq_mask")) {
        let (Some(s), Some(o), Some(m)) = (
            median_ns(&dir, n, "stock"),
            median_ns(&dir, n, "ours"),
            median_ns(&dir, n, "memset"),
        ) else {
            continue;
        };
        let bytes = mask_bytes(n);
        println!(
            "| {n} | {} | {} | {} | {:.2}x | {} | {:.1} | {:.1} | {:.1} |",
            human_bytes(bytes),
            human(s),
            human(o),
            s / o,
            human(m),
            bytes / s,
            bytes / o,
            bytes / m
        );
    }
}

/// Bytes of the f32 mask of a `kq_mask_nkv<N>_<T>tok_...` benchmark.
fn mask_bytes(name: &str) -> f64 {
    let num = |key: &str, end: char| -> f64 {
        let rest = &name[name.find(key).unwrap() + key.len()..];
        rest[..rest.find(end).unwrap()].parse().unwrap()
    };
    // The token count is the number right before "tok".
    let t = name[..name.find("tok").unwrap()]
        .rsplit('_')
        .next()
        .unwrap();
    num("nkv", '_') * t.parse::<f64>().unwrap() * 4.0
}

fn human_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}
