//! Defragmentation's own cost: the plan (ours against the seed's `defrag_prepare`, the
//! llama.cpp of `llama-cpp-sys-2` 0.1.121 through the reference's `libdfref.so`, on the same
//! cells, in one run) and the move of cells and K/V rows (ours; the seed moved rows with a
//! ggml graph of views that this harness cannot run), at 32768 and 131072 cells.
//!
//! Layout: 16 sequences own alternating blocks of 64 cells; the even sequences are removed, so
//! half the cells are holes spread over the whole extent, the worst case of a server whose
//! sequences ended at different times. K/V: 2 layers of 64-wide f16 rows, V transposed.
//!
//! Run: `cargo bench --bench defrag`.

use std::hint::black_box;
use std::time::Duration;

use criterion::BatchSize;
use llama_memory::kv::max_moves_for_nodes;
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, UbatchBuf};
use llama_memory_reference::{self as stock, RefDefrag};

mod common;
use common::{human, median_ns};

const WIDTH: u32 = 64;

fn fragmented(size: u32) -> KvMemory {
    let kv = KvCache::new(KvParams {
        size,
        n_seq_max: 16,
        n_embd_v_gqa_max: WIDTH,
        ..KvParams::default()
    })
    .unwrap();
    let st = KvStorage::new(StorageSpec {
        type_k: ggml_sys::GGML_TYPE_F16,
        type_v: ggml_sys::GGML_TYPE_F16,
        v_trans: true,
        is_mla: false,
        size,
        n_stream: 1,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: LayerSpec::uniform(2, WIDTH, WIDTH),
    })
    .unwrap();
    let mut m = KvMemory::new(kv, Some(st)).unwrap();
    for block in 0..size / 64 {
        let s = (block % 16) as i32;
        let p0 = (block / 16) as i32 * 64;
        let pos: Vec<i32> = (p0..p0 + 64).collect();
        let seqs: Vec<&[i32]> = vec![std::slice::from_ref(&s); 64];
        let ub = UbatchBuf::new(&pos, &pos, &seqs);
        let slot = m.cache.find_slot(&ub.view(), true).unwrap();
        m.cache.apply_ubatch(&slot, &ub.view());
    }
    for s in (0..16).step_by(2) {
        m.cache.seq_rm(s, -1, -1).unwrap();
    }
    m
}

fn main() {
    common::start_run();
    let mut c = common::criterion(Duration::from_secs(3), 10);
    let model = stock::model_path();
    let sizes = [32_768u32, 131_072];
    for &n in &sizes {
        let m = fragmented(n);
        let c0 = m.cache.cells(0);
        let pos: Vec<i32> = (0..n).map(|i| c0.pos_get(i)).collect();
        let mask: Vec<u64> = (0..n)
            .map(|i| c0.seq_get_all(i).iter_ones().fold(0u64, |a, s| a | 1 << s))
            .collect();
        let mut seed = RefDefrag::new(&model, n).unwrap();
        seed.set_cells(&pos, &mask);
        let nodes = i32::MAX;
        let max_moves = max_moves_for_nodes(nodes, seed.n_layer());
        // the same plan on both sides before timing
        let ours = m.cache.plan_defrag(None, max_moves).unwrap();
        assert_eq!(Some(ours.streams()[0].ids.clone()), seed.plan(nodes));
        let mut g = c.benchmark_group("defrag_plan");
        g.bench_function(format!("stock_{n}"), |b| {
            b.iter(|| black_box(seed.plan(nodes)))
        });
        g.bench_function(format!("ours_{n}"), |b| {
            b.iter(|| black_box(m.cache.plan_defrag(None, max_moves).unwrap()))
        });
        g.finish();
        let mut g = c.benchmark_group("defrag_move");
        g.bench_function(format!("ours_{n}"), |b| {
            b.iter_batched(
                || (fragmented(n), ours.clone()),
                |(mut m, plan)| {
                    m.cache.defragment(m.storage.as_mut(), &plan).unwrap();
                    m
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
    c.final_summary();
    let dir = common::criterion_dir();
    println!(
        "\n| cells | plan: stock (0.1.121) | plan: ours | ratio | move (cells + K/V rows): ours |"
    );
    println!("|---|---|---|---|---|");
    for &n in &sizes {
        let get = |g: &str, id: String| median_ns(&dir, g, &id);
        if let (Some(s), Some(o), Some(mv)) = (
            get("defrag_plan", format!("stock_{n}")),
            get("defrag_plan", format!("ours_{n}")),
            get("defrag_move", format!("ours_{n}")),
        ) {
            println!(
                "| {n} | {} | {} | {:.2}x | {} |",
                human(s),
                human(o),
                s / o,
                human(mv)
            );
        }
    }
}
