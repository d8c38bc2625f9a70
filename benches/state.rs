//! Sequence save and restore throughput: the memory part of a sequence state
//! (`llama_kv_cache::state_write/state_read` on stock llama.cpp, `KvMemory::state_write/
//! state_read` here) for one sequence of a unified cache, against a plain `memcpy` of the same
//! number of bytes (the physical limit) and against stock llama.cpp, in one run, with criterion
//! as the harness. At the end the table is printed in Markdown for BENCHMARKS.md.
//!
//! Cases: caches of 4096 and 65536 cells over a 4-layer model with 256-wide f16 K/V rows
//! (512 bytes per row, 4 KiB of K/V per cell), transposed V (the default without flash
//! attention) and row-major V, and two layouts:
//! - contiguous: sequence 0 fills every cell;
//! - fragmented: sequences 0 and 1 alternate cell by cell, so each of sequence 0's cells is its
//!   own range (one copy per cell, and per element of a transposed V).
//!
//! Save writes sequence 0 into a preallocated buffer; restore reads that blob back into
//! sequence 0 (removing it first and placing it again, into the same cells: stock and ours both
//! fill free cells from the lowest one). Before timing, both sides hold identical cells and
//! identical nonzero K/V bytes (ours filled with a pattern, stock restored from our blob) and
//! the bench asserts that both blobs are byte-identical, before and after timing.
//!
//! Run: `cargo bench --bench state` (add `-- <filter>` to select benchmarks).

use std::ffi::c_void;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use llama_memory::io::{Sink, StateIn, StateOut};
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, UbatchBuf};
use llama_memory_reference as stock;

mod common;
use common::{human, median_ns};

/// (n_layer, n_embd, n_head, n_head_kv): head size 32, 8 KV heads, K/V rows of 256 f16.
const SHAPE: (u32, u32, u32, u32) = (4, 256, 8, 8);
/// Tokens per ubatch when filling the caches.
const CHUNK: u32 = 4096;

/// `kvref_state_write` called directly into a caller buffer. `RefKv::state_write` returns a
/// fresh `Vec` sized by a first counting pass, so timing it would add a size query, an
/// allocation and the page faults of first touching it to the stock side only. The shim is
/// already loaded by `llama_memory_reference`; `RTLD_NOLOAD` returns that same instance.
struct StockWriter {
    kv: *const c_void,
    write: unsafe extern "C" fn(*const c_void, i32, u32, *mut u8, usize) -> usize,
}

impl StockWriter {
    fn new(kv: &stock::RefKv) -> StockWriter {
        let kv_ptr = common::debug_ptr(&format!("{kv:?}"), "RefKv");
        let sym = common::shim_symbol;
        // SAFETY: the symbols are the kvref.h functions whose C prototypes the types below
        // transcribe.
        unsafe {
            let size: unsafe extern "C" fn(*const c_void) -> u32 =
                std::mem::transmute(sym("kvref_size"));
            assert_eq!(size(kv_ptr), kv.size(), "not the stock cache's pointer");
            StockWriter {
                kv: kv_ptr,
                write: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*const c_void, i32, u32, *mut u8, usize) -> usize,
                >(sym("kvref_state_write")),
            }
        }
    }

    /// Stock `state_write(seq, 0)` into `buf`: bytes written, 0 on failure.
    fn write(&self, seq: i32, buf: &mut [u8]) -> usize {
        // SAFETY: `kv` is the live cache of a RefKv the caller keeps borrowed; `buf` is
        // writable for its length, which the shim respects.
        unsafe { (self.write)(self.kv, seq, 0, buf.as_mut_ptr(), buf.len()) }
    }
}

/// Both caches, with the same cells and the same K/V bytes.
struct Both {
    ours: KvMemory,
    theirs: stock::RefKv,
}

impl Both {
    fn new(size: u32, v_trans: bool) -> Both {
        let (n_layer, n_embd, n_head, n_head_kv) = SHAPE;
        let theirs = stock::RefKv::new(
            &stock::model_path_ex(n_layer, n_embd, n_head, n_head_kv),
            &stock::Params {
                kv_size: size,
                n_seq_max: 2,
                unified: true,
                v_trans,
                type_k: stock::ggml_type::F16,
                type_v: stock::ggml_type::F16,
                ..stock::Params::default()
            },
        )
        .expect("the stock cache could not be created");
        let gqa = n_embd / n_head * n_head_kv;
        let cache = KvCache::new(KvParams {
            size,
            n_seq_max: 2,
            unified: true,
            v_trans,
            n_embd_v_gqa_max: theirs.n_embd_v_gqa_max(),
            ..KvParams::default()
        })
        .unwrap();
        let storage = KvStorage::new(StorageSpec {
            type_k: stock::ggml_type::F16 as u32,
            type_v: stock::ggml_type::F16 as u32,
            v_trans,
            is_mla: false,
            size,
            n_stream: 1,
            n_rot_k: 0,
            n_rot_v: 0,
            layers: LayerSpec::uniform(n_layer, gqa, gqa),
        })
        .unwrap();
        Both {
            ours: KvMemory::new(cache, Some(storage)).unwrap(),
            theirs,
        }
    }

    /// Places a ubatch on both sides, checking that both choose the same cells.
    fn place(&mut self, ub: &stock::Ubatch) {
        let seqs: Vec<&[i32]> = ub.seq_ids.iter().map(Vec::as_slice).collect();
        let buf = UbatchBuf::new(&ub.tokens, &ub.pos, &seqs);
        let v = ub.view();
        let b = self.theirs.find_slot(&v, false).expect("stock: no slot");
        let a = self
            .ours
            .cache
            .find_slot(&buf.view(), false)
            .expect("ours: no slot");
        assert_eq!(a.idxs, b.idxs, "the two caches diverged");
        self.theirs.apply_ubatch(&b, &v);
        self.ours.cache.apply_ubatch(&a, &buf.view());
    }

    /// Fills every cell: sequence 0 alone, or sequences 0 and 1 alternating cell by cell.
    fn fill(&mut self, fragmented: bool) {
        let size = self.ours.cache.params().size;
        for c0 in (0..size).step_by(CHUNK as usize) {
            let n = CHUNK.min(size - c0);
            let ub = if fragmented {
                let cells = c0..c0 + n;
                let pos: Vec<i32> = cells.clone().map(|c| (c / 2) as i32).collect();
                let seq_ids = cells.map(|c| vec![(c % 2) as i32]).collect();
                stock::Ubatch::simple(pos.iter().map(|p| p % 32).collect(), pos, seq_ids)
            } else {
                stock::Ubatch::for_seq(0, c0 as i32, n)
            };
            self.place(&ub);
        }
    }

    /// Fills our K/V tensors with a nonzero pattern, then gives stock the same bytes by
    /// restoring our blob of sequence 0 into it (which lands in the same cells).
    fn fill_data(&mut self) {
        let st = self.ours.storage.as_mut().unwrap();
        let tensors: Vec<_> = st.layers().iter().flat_map(|l| [l.k, l.v]).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for t in tensors {
            let n = st.stream_stride(t).unwrap();
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8 | 1
                })
                .collect();
            st.set(t, 0, &data).unwrap();
        }
        let blob = self.save_ours_vec();
        assert_eq!(
            self.theirs.state_read(0, 0, &blob),
            Some(blob.len()),
            "stock restore of our blob failed"
        );
    }

    fn save_ours_vec(&self) -> Vec<u8> {
        let mut sink = Sink::Count(0);
        self.ours
            .state_write(
                0,
                &mut StateOut {
                    sink: &mut sink,
                    stash: None,
                },
            )
            .unwrap();
        let mut buf = vec![0u8; sink.len()];
        assert_eq!(save_ours(&self.ours, &mut buf), buf.len());
        buf
    }

    /// Asserts identical cell tables and byte-identical blobs of sequence 0 on both sides.
    fn check_same(&self, what: &str) -> Vec<u8> {
        let theirs = self.theirs.cells(0);
        let ours = self.ours.cache.cells(0);
        for i in 0..ours.size() {
            assert_eq!(theirs.pos[i as usize], ours.pos_get(i), "{what}: cell {i}");
            for s in 0..2 {
                assert_eq!(
                    theirs.has_seq(i as usize, s),
                    ours.seq_has(i, s),
                    "{what}: cell {i} seq {s}"
                );
            }
        }
        let blob = self.save_ours_vec();
        assert!(
            self.theirs.state_write(0, 0) == blob,
            "{what}: stock and ours write different blobs"
        );
        blob
    }
}

fn save_ours(ours: &KvMemory, buf: &mut [u8]) -> usize {
    let mut sink = Sink::new(buf);
    ours.state_write(
        0,
        &mut StateOut {
            sink: &mut sink,
            stash: None,
        },
    )
    .unwrap();
    sink.len()
}

fn restore_ours(ours: &mut KvMemory, blob: &[u8]) {
    let mut inp = StateIn::new(blob);
    ours.state_read(0, &mut inp).unwrap();
}

/// One case of the table.
struct Case {
    name: String,
    bytes: usize,
}

/// A case ready for timing: both caches in the same state, the blob, output buffers.
struct Setup {
    both: Both,
    blob: Vec<u8>,
    writer: StockWriter,
    out_ours: Vec<u8>,
    out_stock: Vec<u8>,
    out_copy: Vec<u8>,
}

impl Setup {
    fn new(name: &str, n: u32, fragmented: bool, v_trans: bool) -> Setup {
        let mut both = Both::new(n, v_trans);
        both.fill(fragmented);
        both.fill_data();
        let blob = both.check_same(name);
        let len = blob.len();
        let writer = StockWriter::new(&both.theirs);
        // Preallocated output buffers, already touched (no page faults while timing).
        let mut out_stock = vec![1u8; len];
        assert_eq!(writer.write(0, &mut out_stock), len);
        assert!(out_stock == blob, "{name}: the direct stock write differs");
        Setup {
            both,
            blob,
            writer,
            out_ours: vec![1u8; len],
            out_stock,
            out_copy: vec![1u8; len],
        }
    }

    /// After timing: both sides still hold the same state, and both writers still write it.
    fn check(&mut self, name: &str) {
        assert_eq!(
            self.both.check_same(name),
            self.blob,
            "{name}: restores changed the state"
        );
        assert_eq!(
            save_ours(&self.both.ours, &mut self.out_ours),
            self.blob.len()
        );
        assert_eq!(self.writer.write(0, &mut self.out_stock), self.blob.len());
        assert!(
            self.out_ours == self.blob && self.out_stock == self.blob,
            "{name}: saved blobs differ"
        );
    }
}

/// What a case is.
struct Spec {
    name: String,
    n: u32,
    fragmented: bool,
    v_trans: bool,
}

impl Spec {
    /// The case's setup, made on first use.
    fn ready<'a>(&self, setup: &'a mut Option<Setup>) -> &'a mut Setup {
        setup.get_or_insert_with(|| Setup::new(&self.name, self.n, self.fragmented, self.v_trans))
    }
}

/// Times one case; `None` when the filter selected none of its benchmarks (the setup, the
/// slow part for 65536 cells, is only made for a selected benchmark).
fn bench_case(c: &mut Criterion, n: u32, fragmented: bool, v_trans: bool) -> Option<Case> {
    let layout = if fragmented {
        "fragmented"
    } else {
        "contiguous"
    };
    let v = if v_trans { "vtrans" } else { "vrows" };
    let spec = Spec {
        name: format!("state_{n}_{layout}_{v}"),
        n,
        fragmented,
        v_trans,
    };
    let mut setup: Option<Setup> = None;
    let mut g = c.benchmark_group(&spec.name);
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("memcpy", |b| {
        let s = spec.ready(&mut setup);
        b.iter(|| s.out_copy.copy_from_slice(black_box(&s.blob)));
        black_box(&s.out_copy);
    });
    g.bench_function("save_ours", |b| {
        let s = spec.ready(&mut setup);
        b.iter(|| black_box(save_ours(&s.both.ours, &mut s.out_ours)))
    });
    g.bench_function("save_stock", |b| {
        let s = spec.ready(&mut setup);
        b.iter(|| black_box(s.writer.write(0, &mut s.out_stock)))
    });
    g.bench_function("restore_ours", |b| {
        let s = spec.ready(&mut setup);
        b.iter(|| restore_ours(&mut s.both.ours, black_box(&s.blob)))
    });
    g.bench_function("restore_stock", |b| {
        let s = spec.ready(&mut setup);
        b.iter(|| black_box(s.both.theirs.state_read(0, 0, black_box(&s.blob))))
    });
    g.finish();
    let mut s = setup?;
    s.check(&spec.name);
    Some(Case {
        name: spec.name,
        bytes: s.blob.len(),
    })
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn main() {
    let mut c = common::criterion(Duration::from_secs(1), 10);
    let mut cases = Vec::new();
    for n in [4096u32, 65_536] {
        for fragmented in [false, true] {
            for v_trans in [true, false] {
                cases.extend(bench_case(&mut c, n, fragmented, v_trans));
            }
        }
    }
    c.final_summary();

    let dir = common::criterion_dir();
    println!(
        "\n| case | op | bytes | memcpy (median) | llama-memory (median) | stock llama.cpp (median) | ours vs memcpy (memcpy / ours) | vs stock (stock / ours) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for case in &cases {
        let Some(m) = median_ns(&dir, &case.name, "memcpy") else {
            continue;
        };
        for op in ["save", "restore"] {
            let (Some(o), Some(s)) = (
                median_ns(&dir, &case.name, &format!("{op}_ours")),
                median_ns(&dir, &case.name, &format!("{op}_stock")),
            ) else {
                continue;
            };
            println!(
                "| {} | {op} | {} | {} | {} | {} | {:.2} | {:.2}x |",
                case.name,
                mib(case.bytes),
                human(m),
                human(o),
                human(s),
                m / o,
                s / o
            );
        }
    }
}
