//! The recurrent graph pieces through the C ABI, computed on the CPU: `s_copy` into an input
//! tensor and `llama_memory_ctx_build_rs` over a layer's S rows must gather, zero and copy back
//! the rows as llama.cpp's `build_rs` defines it (zero row `rs_z` first, output row `k` =
//! row `s_copy[k]`, the gathered rows past `n_seqs` written back at `head + n_seqs ..`).

use ggml_sys as g;
use llama_memory::ffi::*;

const W: usize = 8; // S row width

/// One equal-split ubatch, one token per set.
struct Ub {
    pos: Vec<i32>,
    ids: Vec<i32>,
    ptrs: Vec<*const i32>,
    n_seq_id: Vec<i32>,
    unq: Vec<i32>,
}

impl Ub {
    fn new(sets: &[(i32, i32)]) -> Ub {
        let ids: Vec<i32> = sets.iter().map(|s| s.0).collect();
        let mut unq = ids.clone();
        unq.sort_unstable();
        let mut u = Ub {
            pos: sets.iter().map(|s| s.1).collect(),
            ptrs: Vec::new(),
            n_seq_id: vec![1; sets.len()],
            ids,
            unq,
        };
        u.ptrs = u.ids.iter().map(|p| p as *const i32).collect();
        u
    }

    fn desc(&self) -> llama_memory_ubatch {
        llama_memory_ubatch {
            n_tokens: self.ids.len() as u32,
            n_seq_tokens: 1,
            n_seqs: self.ids.len() as u32,
            n_seqs_unq: self.unq.len() as u32,
            n_pos: 1,
            equal_seqs: 1,
            token: std::ptr::null(),
            pos: self.pos.as_ptr(),
            n_seq_id: self.n_seq_id.as_ptr(),
            seq_id: self.ptrs.as_ptr(),
            seq_id_unq: self.unq.as_ptr(),
            seq_idx: std::ptr::null(),
            output: std::ptr::null(),
            type_: std::ptr::null(),
        }
    }
}

fn place(mem: llama_memory_t, sets: &[(i32, i32)]) -> llama_memory_ctx_t {
    let ub = Ub::new(sets);
    let d = ub.desc();
    let ctx = llama_memory_init_batch(mem, &d, 1);
    assert!(!ctx.is_null());
    assert_eq!(llama_memory_ctx_get_status(ctx), LLAMA_MEMORY_CTX_SUCCESS);
    assert_eq!(llama_memory_ctx_apply(ctx), llama_memory_ffi_ok());
    ctx
}

fn llama_memory_ffi_ok() -> llama_memory::ffi::error::llama_memory_result {
    llama_memory::ffi::error::llama_memory_result::LLAMA_MEMORY_OK
}

#[test]
fn build_rs_gathers_zeroes_and_copies_back_as_upstream() {
    let layers = [llama_memory_rs_layer {
        il: 0,
        n_embd_r: 4,
        n_embd_s: W as u32,
        n_embd_p: 0,
        buft: std::ptr::null_mut(),
    }];
    let mut p = llama_memory_rs_default_params();
    p.n_seq_max = 4;
    p.n_layer = 1;
    p.layers = layers.as_ptr();
    p.n_layers = 1;
    let mem = llama_memory_rs_init(p);
    assert!(!mem.is_null());
    // seqs 0 and 1 hold states; then a ubatch of seq 1 (existing) and seq 3 (new)
    llama_memory_ctx_free(place(mem, &[(0, 0), (1, 0)]));
    llama_memory_seq_rm(mem, 0, -1, -1);
    let ctx = place(mem, &[(3, 0), (1, 1)]);
    let n_rs = llama_memory_ctx_get_n_rs(ctx) as usize;
    let head = llama_memory_ctx_get_rs_head(ctx) as usize;
    let rs_z = llama_memory_ctx_get_rs_z(ctx);
    assert!(n_rs >= 2 && rs_z >= 0, "a new sequence reads the zero row");

    // row i of S holds 100 * i + k
    let s = llama_memory_rs_get_s_tensor(mem, 0);
    // SAFETY: the memory's own live tensor, in a CPU buffer.
    let rows = unsafe { (*s).ne[1] } as usize;
    let before: Vec<f32> = (0..rows * W)
        .map(|x| (100 * (x / W) + x % W) as f32)
        .collect();
    let bytes: Vec<u8> = before.iter().flat_map(|v| v.to_ne_bytes()).collect();
    // SAFETY: writes the whole tensor with as many bytes as it has.
    unsafe { g::ggml_backend_tensor_set(s, bytes.as_ptr().cast(), 0, bytes.len()) };

    // SAFETY: a plain CPU context; every tensor below is built in it.
    unsafe {
        let gctx = g::ggml_init(g::ggml_init_params {
            mem_size: 1 << 20,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        });
        let s_copy = g::ggml_new_tensor_1d(gctx, g::GGML_TYPE_I32, n_rs as i64);
        let sc = std::slice::from_raw_parts_mut((*s_copy).data.cast::<i32>(), n_rs);
        assert_eq!(
            llama_memory_ctx_set_input_s_copy(ctx, sc.as_mut_ptr(), n_rs),
            llama_memory_ffi_ok()
        );
        let sc = sc.to_vec();
        let gf = g::ggml_new_graph(gctx);
        let n_seqs = 2;
        let out = llama_memory_ctx_build_rs(ctx, gctx, gf, 0, 1, s_copy, W as u32, n_seqs);
        assert!(!out.is_null());
        // a wrong state size, a missing layer and a too-short s_copy are refused
        assert!(llama_memory_ctx_build_rs(ctx, gctx, gf, 0, 1, s_copy, 7, n_seqs).is_null());
        assert!(llama_memory_ctx_build_rs(ctx, gctx, gf, 5, 1, s_copy, W as u32, n_seqs).is_null());
        let short = g::ggml_new_tensor_1d(gctx, g::GGML_TYPE_I32, n_rs as i64 + 1);
        assert!(llama_memory_ctx_build_rs(ctx, gctx, gf, 0, 1, short, W as u32, n_seqs).is_null());
        assert_eq!(
            g::ggml_graph_compute_with_ctx(gctx, gf, 1),
            g::GGML_STATUS_SUCCESS
        );

        let mut expect_rows = before.clone();
        expect_rows[rs_z as usize * W..(rs_z as usize + 1) * W].fill(0.0);
        let got = std::slice::from_raw_parts((*out).data.cast::<f32>(), n_seqs as usize * W);
        for k in 0..n_seqs as usize {
            let src = sc[k] as usize;
            assert_eq!(
                &got[k * W..(k + 1) * W],
                &expect_rows[src * W..(src + 1) * W],
                "output row {k}"
            );
        }
        let mut after = vec![0f32; rows * W];
        g::ggml_backend_tensor_get(s, after.as_mut_ptr().cast(), 0, after.len() * 4);
        let mut expect_after = expect_rows.clone();
        for (k, &src) in sc.iter().enumerate().skip(n_seqs as usize) {
            let (src, dst) = (src as usize, head + k);
            expect_after[dst * W..(dst + 1) * W]
                .copy_from_slice(&expect_rows[src * W..(src + 1) * W]);
        }
        assert_eq!(after, expect_after);
        g::ggml_free(gctx);
    }
    llama_memory_ctx_free(ctx);
    llama_memory_free(mem);
}
