//! Heap allocations of the steady decode step through the C ABI (one token for each of 16
//! sequences: init_batch, apply, n_kv, KQ mask, K/V row indices, free), counted by a global
//! allocator wrapper: after a warm-up there are none.
//!
//! The ubatch read from C, the context and its handle, the slots, the rollback snapshots and
//! the graph inputs all reuse buffers from the previous step. The per-sequence position index
//! (B+ trees over a pooled node arena, `src/cells/index.rs`) reuses freed nodes and is
//! reserved for the whole cache at construction, and the mask builder's segment lists are
//! reserved for the most segments the cache's size allows, so neither grows as the cache
//! fills. The measured steps take the 16 sequences from 256 to 512 tokens each (4096 to 8192
//! used cells), across the point where a structure doubling its capacity would reallocate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use llama_memory::ffi::*;

#[path = "common/step.rs"]
mod step;
use step::decode_ubatch;

struct Counting;

thread_local! {
    // Per thread: the tests of this file run in parallel and must not see each other's
    // allocations. A const-initialized Cell needs no allocation or destructor of its own.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
}

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const N_SEQ: usize = 16;

struct Step {
    tok: [i32; N_SEQ],
    pos: [i32; N_SEQ],
    n_seq_id: [i32; N_SEQ],
    seq: [i32; N_SEQ],
    unq: [i32; N_SEQ],
    mask: Vec<f32>,
    k_idx: Vec<i64>,
    v_idx: Vec<i64>,
}

impl Step {
    /// One decode step at position `p` of every sequence; panics on any failure.
    fn run(&mut self, mem: llama_memory_t, p: i32) {
        self.pos = [p; N_SEQ];
        let ptrs: [*const i32; N_SEQ] = std::array::from_fn(|i| &self.seq[i] as *const i32);
        let ub = decode_ubatch(&self.tok, &self.pos, &self.n_seq_id, &ptrs, &self.unq);
        let ctx = llama_memory_init_batch(mem, &ub, 1);
        assert!(!ctx.is_null(), "{:?}", last_error());
        assert_eq!(llama_memory_ctx_get_status(ctx), LLAMA_MEMORY_CTX_SUCCESS);
        assert_eq!(llama_memory_ctx_apply(ctx) as u32, 0);
        let n_kv = llama_memory_ctx_get_n_kv(ctx);
        let n = n_kv as usize * N_SEQ;
        assert!(n <= self.mask.len());
        let r = llama_memory_ctx_set_input_kq_mask(
            ctx,
            true,
            n_kv,
            1,
            false,
            self.mask.as_mut_ptr().cast(),
            n,
        );
        assert_eq!(r as u32, 0);
        let r = llama_memory_ctx_set_input_k_idxs(ctx, self.k_idx.as_mut_ptr(), N_SEQ);
        assert_eq!(r as u32, 0);
        let n_v = self.v_idx.len();
        let r = llama_memory_ctx_set_input_v_idxs(ctx, self.v_idx.as_mut_ptr(), n_v);
        assert_eq!(r as u32, 0);
        llama_memory_ctx_free(ctx);
    }
}

fn last_error() -> String {
    let e = llama_memory::ffi::error::llama_memory_last_error();
    if e.is_null() {
        return String::new();
    }
    // SAFETY: a NUL-terminated message owned by the library until the next failing call.
    unsafe { std::ffi::CStr::from_ptr(e) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn steady_decode_step_allocations() {
    let mut p = llama_memory_kv_default_params();
    p.size = 16384;
    p.n_seq_max = N_SEQ as u32;
    p.v_trans = false;
    let mem = llama_memory_kv_init(p);
    assert!(!mem.is_null());
    let mut step = Step {
        tok: [7; N_SEQ],
        pos: [0; N_SEQ],
        n_seq_id: [1; N_SEQ],
        seq: std::array::from_fn(|i| i as i32),
        unq: std::array::from_fn(|i| i as i32),
        mask: vec![0.0; 16384 * N_SEQ],
        k_idx: vec![0; N_SEQ],
        v_idx: vec![0; N_SEQ],
    };
    let (warm, measured) = (256, 256);
    for t in 0..warm {
        step.run(mem, t);
    }
    let before = allocs();
    for t in warm..warm + measured {
        step.run(mem, t);
    }
    let n = allocs() - before;
    llama_memory_free(mem);
    println!(
        "allocations: {n} in {measured} steady decode steps ({:.2} per step)",
        n as f64 / measured as f64
    );
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).ok();
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("alloc-summary.txt"),
        format!("{n} allocations in {measured} steady decode steps\n"),
    )
    .ok();
    assert_eq!(n, 0, "{n} allocations in {measured} steady decode steps");
}

/// The same decode step through the slot-level API, as llama.cpp's composites drive a KV
/// leaf: prepare into a reused slots list, read the slot info, apply it, n_kv and the inputs
/// for it. The slot info and ubatch read from C reuse per-thread buffers.
#[test]
fn steady_slot_level_decode_step_allocations() {
    let mut p = llama_memory_kv_default_params();
    p.size = 16384;
    p.n_seq_max = N_SEQ as u32;
    p.v_trans = true;
    p.n_embd_v_gqa_max = 8;
    let mem = llama_memory_kv_init(p);
    assert!(!mem.is_null());
    let slots = llama_memory_slots_init();
    let tok = [7i32; N_SEQ];
    let n_seq_id = [1i32; N_SEQ];
    let seq: [i32; N_SEQ] = std::array::from_fn(|i| i as i32);
    let mut mask = vec![0f32; 16384 * N_SEQ];
    let mut k_idx = [0i64; N_SEQ];
    let mut v_idx = [0i64; N_SEQ * 8];
    let mut run = |t: i32| {
        let pos = [t; N_SEQ];
        let ptrs: [*const i32; N_SEQ] = std::array::from_fn(|i| &seq[i] as *const i32);
        let ub = llama_memory_ubatch {
            n_tokens: N_SEQ as u32,
            n_seq_tokens: 1,
            n_seqs: N_SEQ as u32,
            n_seqs_unq: N_SEQ as u32,
            n_pos: 1,
            equal_seqs: 0,
            token: tok.as_ptr(),
            pos: pos.as_ptr(),
            n_seq_id: n_seq_id.as_ptr(),
            seq_id: ptrs.as_ptr(),
            seq_id_unq: seq.as_ptr(),
            seq_idx: std::ptr::null(),
            output: std::ptr::null(),
            type_: std::ptr::null(),
        };
        assert_eq!(
            llama_memory_kv_prepare(mem, &ub, 1, slots) as u32,
            0,
            "{}",
            last_error()
        );
        let mut si = llama_memory_slot_info {
            s0: 0,
            s1: 0,
            n_stream: 0,
            size: 0,
            strm: std::ptr::null(),
            idxs: std::ptr::null(),
        };
        assert_eq!(llama_memory_slots_get(slots, 0, &mut si) as u32, 0);
        assert_eq!(llama_memory_kv_apply_ubatch(mem, &si, &ub) as u32, 0);
        let n_kv = llama_memory_kv_get_n_kv(mem, &si);
        let n = n_kv as usize * N_SEQ;
        let r = llama_memory_kv_set_input_kq_mask(
            mem,
            &ub,
            true,
            n_kv,
            1,
            false,
            mask.as_mut_ptr().cast(),
            n,
        );
        assert_eq!(r as u32, 0);
        let r = llama_memory_kv_set_input_k_idxs(mem, &ub, &si, k_idx.as_mut_ptr(), N_SEQ);
        assert_eq!(r as u32, 0);
        let r = llama_memory_kv_set_input_v_idxs(mem, &ub, &si, v_idx.as_mut_ptr(), v_idx.len());
        assert_eq!(r as u32, 0);
    };
    for t in 0..256 {
        run(t);
    }
    let before = allocs();
    for t in 256..512 {
        run(t);
    }
    let n = allocs() - before;
    llama_memory_slots_free(slots);
    llama_memory_free(mem);
    assert_eq!(
        n, 0,
        "{n} allocations in 256 steady slot-level decode steps"
    );
}

/// The same cycle on a recurrent memory (16 sequences, one token each, an equal split):
/// init_batch, apply, n_rs, s_copy, free. The slot search saves and restores the cells through
/// buffers kept in the memory, and the context keeps its ubatch copies.
#[test]
fn steady_recurrent_decode_step_allocations() {
    let layers: Vec<llama_memory_rs_layer> = (0..2)
        .map(|il| llama_memory_rs_layer {
            il,
            n_embd_r: 384,
            n_embd_s: 2048,
            n_embd_p: 0,
            buft: std::ptr::null_mut(),
        })
        .collect();
    let mut p = llama_memory_rs_default_params();
    p.n_seq_max = N_SEQ as u32;
    p.n_rs_seq = 1;
    p.n_layer = 2;
    p.layers = layers.as_ptr();
    p.n_layers = layers.len();
    let mem = llama_memory_rs_init(p);
    assert!(!mem.is_null());
    let tok = [7i32; N_SEQ];
    let n_seq_id = [1i32; N_SEQ];
    let seq: [i32; N_SEQ] = std::array::from_fn(|i| i as i32);
    let mut s_copy = [0i32; N_SEQ];
    let mut run = |t: i32| {
        let pos = [t; N_SEQ];
        let ptrs: [*const i32; N_SEQ] = std::array::from_fn(|i| &seq[i] as *const i32);
        let ub = llama_memory_ubatch {
            n_tokens: N_SEQ as u32,
            n_seq_tokens: 1,
            n_seqs: N_SEQ as u32,
            n_seqs_unq: N_SEQ as u32,
            n_pos: 1,
            equal_seqs: 1,
            token: tok.as_ptr(),
            pos: pos.as_ptr(),
            n_seq_id: n_seq_id.as_ptr(),
            seq_id: ptrs.as_ptr(),
            seq_id_unq: seq.as_ptr(),
            seq_idx: std::ptr::null(),
            output: std::ptr::null(),
            type_: std::ptr::null(),
        };
        let ctx = llama_memory_init_batch(mem, &ub, 1);
        assert!(!ctx.is_null(), "{:?}", last_error());
        assert_eq!(llama_memory_ctx_apply(ctx) as u32, 0);
        assert_eq!(llama_memory_ctx_get_n_rs(ctx), N_SEQ as u32);
        let r = llama_memory_ctx_set_input_s_copy(ctx, s_copy.as_mut_ptr(), N_SEQ);
        assert_eq!(r as u32, 0);
        llama_memory_ctx_free(ctx);
        // a rollback now and then, consumed by the next s_copy
        if t % 7 == 0 {
            assert!(llama_memory_seq_rm(mem, 3, t, -1));
            llama_memory_seq_add(mem, 3, t - 1, -1, 1);
        }
    };
    for t in 0..64 {
        run(t);
    }
    let before = allocs();
    for t in 64..320 {
        run(t);
    }
    let n = allocs() - before;
    llama_memory_free(mem);
    assert_eq!(n, 0, "{n} allocations in 256 steady recurrent decode steps");
}
