//! The decode-step cycle a drop-in libllama runs for every token, on stock llama.cpp (the
//! pinned tree, through the reference shim) and on llama-memory (through its C ABI), in one
//! run: plan the ubatch (stock `prepare`, ours `llama_memory_init_batch`), apply it, take
//! `n_kv`, build the KQ mask and the K/V row indices, free the plan. One token for each of 16
//! sequences, in a unified cache whose sequences already hold `ctx` tokens each; after every
//! timed step the untimed part removes the placed tokens again, so each step sees the same
//! cache. Both sides are checked to choose the same cells and write the same mask.
//!
//! The stock side is measured without its `llama_kv_cache_context` object (the shim calls the
//! slot-level functions directly), and its index helpers return a fresh `Vec` (one allocation
//! each), so the comparison is slightly in stock's favour on allocation and slightly against it
//! on the index copies.
//!
//! Run: `cargo bench --bench decode`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use llama_memory::ffi::*;
use llama_memory_reference as stock;

mod common;
use common::median_ns;
#[path = "../tests/common/step.rs"]
mod step;
use step::decode_ubatch;

const N_SEQ: usize = 16;

struct Ours {
    mem: llama_memory_t,
    tok: [i32; N_SEQ],
    pos: [i32; N_SEQ],
    n_seq_id: [i32; N_SEQ],
    seq: [i32; N_SEQ],
    mask: Vec<f32>,
    k_idx: Vec<i64>,
    v_idx: Vec<i64>,
}

impl Ours {
    /// One step at position `p` of every sequence; returns n_kv.
    fn step(&mut self, p: i32) -> u32 {
        self.pos = [p; N_SEQ];
        let ptrs: [*const i32; N_SEQ] = std::array::from_fn(|i| &self.seq[i] as *const i32);
        let ub = decode_ubatch(&self.tok, &self.pos, &self.n_seq_id, &ptrs, &self.seq);
        let ctx = llama_memory_init_batch(self.mem, &ub, 1);
        assert_eq!(llama_memory_ctx_get_status(ctx), LLAMA_MEMORY_CTX_SUCCESS);
        assert_eq!(llama_memory_ctx_apply(ctx) as u32, 0);
        let n_kv = llama_memory_ctx_get_n_kv(ctx);
        let n = n_kv as usize * N_SEQ;
        let m = self.mask.as_mut_ptr().cast();
        assert_eq!(
            llama_memory_ctx_set_input_kq_mask(ctx, true, n_kv, 1, false, m, n) as u32,
            0
        );
        let (k, v) = (self.k_idx.as_mut_ptr(), self.v_idx.as_mut_ptr());
        assert_eq!(llama_memory_ctx_set_input_k_idxs(ctx, k, N_SEQ) as u32, 0);
        assert_eq!(
            llama_memory_ctx_set_input_v_idxs(ctx, v, self.v_idx.len()) as u32,
            0
        );
        llama_memory_ctx_free(ctx);
        n_kv
    }

    fn undo(&mut self, p: i32) {
        for s in 0..N_SEQ as i32 {
            assert!(llama_memory_seq_rm(self.mem, s, p, p + 1));
        }
    }
}

struct Stock {
    kv: stock::RefKv,
    mask: Vec<f32>,
}

impl Stock {
    fn step(&mut self, p: i32) -> u32 {
        let ub = stock::Ubatch::simple(
            vec![7; N_SEQ],
            vec![p; N_SEQ],
            (0..N_SEQ as i32).map(|s| vec![s]).collect(),
        );
        let v = ub.view();
        let slots = self.kv.prepare(&[ub.view()]).expect("stock: no slot");
        self.kv.apply_ubatch(&slots[0], &v);
        let n_kv = self.kv.get_n_kv(&slots[0]);
        let n = n_kv as usize * N_SEQ;
        self.kv
            .kq_mask_f32_into(&v, true, n_kv, 1, &mut self.mask[..n]);
        black_box(self.kv.k_idxs(&v, &slots[0]));
        black_box(self.kv.v_idxs(&v, &slots[0]));
        n_kv
    }

    fn undo(&mut self, p: i32) {
        for s in 0..N_SEQ as i32 {
            self.kv.seq_rm(s, p, p + 1);
        }
    }
}

/// Two caches of `size` cells with `ctx` tokens in each of the 16 sequences, placed one
/// decode step at a time on both.
fn setup(size: u32, ctx: i32) -> (Ours, Stock) {
    let mut kp = stock::Params {
        kv_size: size,
        n_seq_max: N_SEQ as u32,
        unified: true,
        ..stock::Params::default()
    };
    kp.v_trans = false;
    let kv = stock::RefKv::tiny(&kp);
    let mut p = llama_memory_kv_default_params();
    p.size = size;
    p.n_seq_max = N_SEQ as u32;
    p.v_trans = false;
    let mem = llama_memory_kv_init(p);
    assert!(!mem.is_null());
    let mut ours = Ours {
        mem,
        tok: [7; N_SEQ],
        pos: [0; N_SEQ],
        n_seq_id: [1; N_SEQ],
        seq: std::array::from_fn(|i| i as i32),
        mask: vec![0.0; size as usize * N_SEQ],
        k_idx: vec![0; N_SEQ],
        v_idx: vec![0; N_SEQ],
    };
    let mut theirs = Stock {
        kv,
        mask: vec![0.0; size as usize * N_SEQ],
    };
    for t in 0..ctx {
        assert_eq!(ours.step(t), theirs.step(t));
    }
    assert!(ours.mask == theirs.mask, "the two masks differ");
    (ours, theirs)
}

fn timed(
    b: &mut criterion::Bencher<'_>,
    p: i32,
    mut step: impl FnMut(i32),
    mut undo: impl FnMut(i32),
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let t = Instant::now();
            step(p);
            total += t.elapsed();
            undo(p);
        }
        total
    })
}

fn main() {
    let mut c = common::criterion(Duration::from_secs(1), 10);
    let mut names = Vec::new();
    for (size, ctx) in [(4096u32, 64i32), (32768, 1024)] {
        let name = format!("decode_step_16seq_{size}cells_ctx{ctx}");
        let (mut ours, mut theirs) = setup(size, ctx);
        let mut g = c.benchmark_group(&name);
        g.bench_function("stock", |b| {
            let t = std::cell::RefCell::new(&mut theirs);
            timed(
                b,
                ctx,
                |p| {
                    black_box(t.borrow_mut().step(p));
                },
                |p| t.borrow_mut().undo(p),
            )
        });
        g.bench_function("ours", |b| {
            let o = std::cell::RefCell::new(&mut ours);
            timed(
                b,
                ctx,
                |p| {
                    black_box(o.borrow_mut().step(p));
                },
                |p| o.borrow_mut().undo(p),
            )
        });
        g.finish();
        llama_memory_free(ours.mem);
        names.push(name);
    }
    c.final_summary();
    let dir = common::criterion_dir();
    println!(
        "\n| benchmark | stock llama.cpp (median) | llama-memory (median) | ratio (stock / ours) |"
    );
    println!("|---|---:|---:|---:|");
    for n in &names {
        if let (Some(s), Some(o)) = (median_ns(&dir, n, "stock"), median_ns(&dir, n, "ours")) {
            println!(
                "| {n} | {:.1} µs | {:.1} µs | {:.2}x |",
                s / 1e3,
                o / 1e3,
                s / o
            );
        }
    }
}
