//! Graph nodes over the cache tensors, computed on the CPU backend and compared with the
//! pinned llama.cpp: the K-shift (RoPE re-rotation after `seq_add`/`seq_div`) against the stock
//! cache's own shift graph, and row writes (`cpy_k`/`cpy_v` through `ggml_set_rows`) read back
//! through views and through the state, which stock llama.cpp reads identically.

// The graph builders take raw ggml pointers: every call here passes the live context of a
// `Graph` and tensors made in it or owned by the storage, which is their safety contract.
#![allow(clippy::undocumented_unsafe_blocks)]

use ggml_sys as g;
use half::f16;
use llama_memory::io::StateIn;
use llama_memory::storage::graph::RopeParams;
use llama_memory::{KvMemory, MemoryContext, UbatchBuf};
use llama_memory_reference::{Params, RefKv};

#[path = "common/tiny_kv.rs"]
mod tiny_kv;
use tiny_kv::{place, randomize, state_bytes, GQA, HEAD, SIZE};

fn ours(v_trans: bool) -> KvMemory {
    tiny_kv::ours(true, v_trans)
}

fn whole(m: &KvMemory) -> Vec<u8> {
    state_bytes(m, -1)
}

struct Graph {
    ctx: *mut g::ggml_context,
    backend: g::ggml_backend_t,
    buf: g::ggml_backend_buffer_t,
}

impl Graph {
    fn new() -> Graph {
        let params = g::ggml_init_params {
            mem_size: 1 << 20,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: plain ggml setup calls.
        unsafe {
            Graph {
                ctx: g::ggml_init(params),
                backend: g::ggml_backend_cpu_init(),
                buf: std::ptr::null_mut(),
            }
        }
    }

    /// Allocates the context's input tensors (call after creating them, before the views).
    fn alloc(&mut self) {
        // SAFETY: allocates the tensors created so far in a CPU buffer.
        self.buf = unsafe { g::ggml_backend_alloc_ctx_tensors(self.ctx, self.backend) };
        assert!(!self.buf.is_null());
    }

    fn compute(&self, nodes: &[*mut g::ggml_tensor]) {
        // SAFETY: nodes were built in self.ctx over allocated tensors.
        unsafe {
            let gf = g::ggml_new_graph(self.ctx);
            for &n in nodes {
                assert!(!n.is_null());
                g::ggml_build_forward_expand(gf, n);
            }
            assert_eq!(
                g::ggml_backend_graph_compute(self.backend, gf),
                g::GGML_STATUS_SUCCESS
            );
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: owned objects freed once.
        unsafe {
            if !self.buf.is_null() {
                g::ggml_backend_buffer_free(self.buf);
            }
            g::ggml_free(self.ctx);
            g::ggml_backend_free(self.backend);
        }
    }
}

#[test]
fn k_shift_matches_stock() {
    for (seed, v_trans) in [(1u64, false), (2, true)] {
        let mut m = ours(v_trans);
        let mut r = RefKv::tiny(&Params {
            kv_size: SIZE,
            n_seq_max: 2,
            v_trans,
            ..Params::default()
        });
        place(&mut m, &mut r, 0, 0, 40);
        place(&mut m, &mut r, 1, 0, 17);
        randomize(&mut m, seed, None);
        let state = whole(&m);
        r.state_read(-1, 0, &state).expect("stock reads our state");
        assert_eq!(r.state_write(-1, 0), state, "same data on both sides");
        // State restore compacts cells; place them again identically on both sides.
        let mut inp = StateIn::new(&state);
        m.state_read(-1, &mut inp).unwrap();

        // Shifts of both signs, a division, and a removal below zero.
        for (seq, p0, p1, d) in [(0, 10, -1, 5), (1, 0, 8, -3), (0, 0, 10, 2)] {
            r.seq_add(seq, p0, p1, d);
            m.cache.seq_add(seq, p0, p1, d).unwrap();
        }
        r.seq_div(1, 4, -1, 2);
        m.cache.seq_div(1, 4, -1, 2).unwrap();

        let mut shift = vec![0i32; SIZE as usize];
        m.cache.set_input_k_shift(&mut shift).unwrap();
        assert!(shift.iter().any(|&s| s != 0));

        let mut gr = Graph::new();
        // SAFETY: an input tensor in the graph context.
        let k_shift = unsafe { g::ggml_new_tensor_1d(gr.ctx, g::GGML_TYPE_I32, SIZE as i64) };
        gr.alloc();
        // SAFETY: k_shift is allocated with SIZE i32 elements.
        unsafe {
            g::ggml_backend_tensor_set(k_shift, shift.as_ptr().cast(), 0, shift.len() * 4);
        }
        // The tiny llama: rope NORM over the whole head, base 10000, no YaRN (llama.cpp's
        // context defaults resolve ext_factor to 0 and attn_factor to 1).
        let rope = RopeParams {
            n_rot: HEAD as i32,
            n_embd_nope: 0,
            mode: 0,
            n_ctx_orig: 4096,
            freq_base: 10000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        let st = m.storage.as_ref().unwrap();
        let nodes: Vec<_> = (0..2)
            .map(|il| {
                unsafe {
                    st.k_shift(
                        gr.ctx,
                        il,
                        HEAD,
                        k_shift,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        &rope,
                    )
                }
                .unwrap()
            })
            .collect();
        gr.compute(&nodes);
        let mut upd = m.cache.init_update().unwrap();
        upd.apply(&mut m).unwrap();

        assert_eq!(r.update(), llama_memory_reference::MemoryStatus::Success);
        let theirs = r.state_write(-1, 0);
        let mine = whole(&m);
        assert_eq!(mine.len(), theirs.len());
        assert!(mine != state, "the shift changed K");
        assert!(
            mine == theirs,
            "K after the shift differs from stock (v_trans {v_trans})"
        );
    }
}

#[test]
fn row_writes_land_where_the_indices_say() {
    for v_trans in [false, true] {
        let mut m = ours(v_trans);
        let mut r = RefKv::tiny(&Params {
            kv_size: SIZE,
            n_seq_max: 2,
            v_trans,
            ..Params::default()
        });
        place(&mut m, &mut r, 0, 0, 9);
        // The next 5 tokens of seq 1 take cells 9..13: write their K/V through set_rows.
        let pos: Vec<i32> = (0..5).collect();
        let toks = vec![3; 5];
        let one = [1];
        let seqs: Vec<&[i32]> = vec![&one[..]; 5];
        let b = UbatchBuf::new(&toks, &pos, &seqs);
        let slot = m.cache.find_slot(&b.view(), false).unwrap();
        m.cache.apply_ubatch(&slot, &b.view());
        let n = 5usize;
        let mut k_idx = vec![0i64; n];
        m.cache.set_input_k_idxs(&slot, &mut k_idx).unwrap();
        let mut v_idx = vec![0i64; m.cache.v_idxs_len(n)];
        m.cache.set_input_v_idxs(&slot, &mut v_idx).unwrap();

        let mut gr = Graph::new();
        // SAFETY: inputs in the graph context.
        let (kc, vc, ki, vi) = unsafe {
            (
                g::ggml_new_tensor_3d(gr.ctx, g::GGML_TYPE_F32, HEAD as i64, 2, n as i64),
                g::ggml_new_tensor_2d(gr.ctx, g::GGML_TYPE_F32, GQA as i64, n as i64),
                g::ggml_new_tensor_1d(gr.ctx, g::GGML_TYPE_I64, k_idx.len() as i64),
                g::ggml_new_tensor_1d(gr.ctx, g::GGML_TYPE_I64, v_idx.len() as i64),
            )
        };
        gr.alloc();
        let kvals: Vec<f32> = (0..n * GQA as usize).map(|i| i as f32 * 0.25).collect();
        let vvals: Vec<f32> = (0..n * GQA as usize).map(|i| -(i as f32) * 0.5).collect();
        // SAFETY: sizes match the tensors created above.
        unsafe {
            g::ggml_backend_tensor_set(kc, kvals.as_ptr().cast(), 0, kvals.len() * 4);
            g::ggml_backend_tensor_set(vc, vvals.as_ptr().cast(), 0, vvals.len() * 4);
            g::ggml_backend_tensor_set(ki, k_idx.as_ptr().cast(), 0, k_idx.len() * 8);
            g::ggml_backend_tensor_set(vi, v_idx.as_ptr().cast(), 0, v_idx.len() * 8);
        }
        let st = m.storage.as_ref().unwrap();
        let nodes = [
            unsafe { st.cpy_k(gr.ctx, 1, kc, ki) }.unwrap(),
            unsafe { st.cpy_v(gr.ctx, 1, vc, vi) }.unwrap(),
        ];
        gr.compute(&nodes);

        // Read back through the sequence state: its K/V sections of layer 1 hold exactly the
        // written values (as f16), in token order.
        let blob = state_bytes(&m, 1);
        let f = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        let meta = 4 + 4 + n * 12 + 16;
        let k_sec = 12 + n * GQA as usize * 2;
        let k1 = &blob[meta + k_sec + 12..meta + 2 * k_sec];
        assert_eq!(f(k1), kvals, "K rows of layer 1");
        let v_hdr = 12; // type + row size, or type + element size + width
        let v1 = &blob[meta + 2 * k_sec + k_sec + v_hdr..meta + 4 * k_sec];
        let want_v: Vec<f32> = if v_trans {
            (0..GQA as usize)
                .flat_map(|j| (0..n).map(move |t| (t, j)))
                .map(|(t, j)| vvals[t * GQA as usize + j])
                .collect()
        } else {
            vvals.clone()
        };
        assert_eq!(f(v1), want_v, "V of layer 1 (v_trans {v_trans})");
        // Stock reads the same bytes back from that state and writes them out unchanged.
        assert!(r.state_read(1, 0, &blob).is_some());
        assert_eq!(r.state_write(1, 0), blob);

        // The views see the written rows at the slot's cells.
        let st = m.storage.as_ref().unwrap();
        let vk = unsafe { st.view_k(gr.ctx, 1, 256, 0, 0, HEAD) }.unwrap();
        // SAFETY: a view of our tensor; shape read only.
        let ne = unsafe { (*vk).ne };
        assert_eq!(ne, [HEAD as i64, 2, 256, 1]);
        let vv = unsafe { st.view_v(gr.ctx, 1, 256, 0, 0, HEAD) }.unwrap();
        let ne = unsafe { (*vv).ne };
        if v_trans {
            assert_eq!(ne, [256, 2, HEAD as i64, 1]);
        } else {
            assert_eq!(ne, [HEAD as i64, 2, 256, 1]);
        }
        assert!(unsafe { st.view_k(gr.ctx, 1, 257, 0, 0, HEAD) }.is_err());
        assert!(unsafe { st.view_k(gr.ctx, 1, 256, 0, 1, HEAD) }.is_err());
        assert!(unsafe { st.view_k(gr.ctx, 1, 256, 0, 0, 5) }.is_err());
    }
}

/// Ours and stock's K/V graph views (`get_k`/`get_v`) over the same cells and tensor bytes:
/// the same shape, strides, offset into the layer tensor and the same bytes seen, for unified
/// and multi-stream caches, both V layouts, several `n_kv` (below and at the size) and stream
/// ranges.
#[test]
fn views_match_stock() {
    for (unified, v_trans) in [(true, false), (true, true), (false, false), (false, true)] {
        let mut m = tiny_kv::ours(unified, v_trans);
        let mut r = RefKv::tiny(&Params {
            kv_size: SIZE,
            n_seq_max: 2,
            unified,
            v_trans,
            ..Params::default()
        });
        place(&mut m, &mut r, 0, 0, 70);
        place(&mut m, &mut r, 1, 0, 130);
        randomize(&mut m, 7, None);
        // The same bytes on both sides: stock reads our state (zeroing every other cell);
        // ours is zeroed and reads it back too.
        let state = whole(&m);
        r.state_read(-1, 0, &state).expect("stock reads our state");
        assert_eq!(r.state_write(-1, 0), state, "same data on both sides");
        llama_memory::Memory::clear(&mut m, true);
        m.state_read(-1, &mut StateIn::new(&state)).unwrap();
        assert_eq!(whole(&m), state);

        let gr = Graph::new();
        let st = m.storage.as_ref().unwrap();
        let ranges: &[(u32, u32)] = if unified {
            &[(0, 0)]
        } else {
            &[(0, 0), (1, 1), (0, 1)]
        };
        let mut nonzero = false;
        for &(s0, s1) in ranges {
            for n_kv in [1, 100, SIZE] {
                for il in 0..2u32 {
                    for v in [false, true] {
                        let what = format!(
                            "{} of layer {il}, n_kv {n_kv}, streams {s0}..={s1} (unified {unified}, v_trans {v_trans})",
                            if v { "V" } else { "K" }
                        );
                        let want = r.view(v, il as i32, n_kv, s0, s1).expect("stock view");
                        let t = if v {
                            unsafe { st.view_v(gr.ctx, il, n_kv, s0, s1, HEAD) }
                        } else {
                            unsafe { st.view_k(gr.ctx, il, n_kv, s0, s1, HEAD) }
                        }
                        .unwrap();
                        // SAFETY: a view of our live host tensor, made in gr.ctx.
                        let (ne, nb, offs, data) = unsafe {
                            let t = &*t;
                            let row = g::ggml_row_size(t.type_, t.ne[0]);
                            let mut data = Vec::new();
                            let base = t.data as *const u8;
                            for i3 in 0..t.ne[3] as usize {
                                for i2 in 0..t.ne[2] as usize {
                                    for i1 in 0..t.ne[1] as usize {
                                        let p =
                                            base.add(i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3]);
                                        data.extend_from_slice(std::slice::from_raw_parts(p, row));
                                    }
                                }
                            }
                            (t.ne, t.nb, t.view_offs, data)
                        };
                        assert_eq!(ne, want.ne, "ne of {what}");
                        assert_eq!(nb, want.nb, "nb of {what}");
                        assert_eq!(offs, want.offs, "offset of {what}");
                        assert!(data == want.data, "bytes seen by {what}");
                        nonzero |= data.iter().any(|&b| b != 0);
                    }
                }
            }
        }
        assert!(nonzero, "the views saw only zeros: nothing was compared");
    }
}
