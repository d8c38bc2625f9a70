//! Host-side helpers of the C-ABI graph-input suites (`tests/kv_ggml_inputs.rs`,
//! `tests/kv_slot_differential.rs`): ggml tensors in a CPU backend buffer, read and written
//! whole, and the C view of a stock ubatch.

use std::ffi::c_void;
use std::ptr;

use ggml_sys as g;
use llama_memory::ffi::llama_memory_ubatch;
use llama_memory_reference as stock;

/// A ggml context holding host tensors in a CPU backend buffer.
pub struct Host {
    ctx: *mut g::ggml_context,
    buf: g::ggml_backend_buffer_t,
}

impl Host {
    pub fn new(shapes: &[(g::ggml_type, [i64; 4])]) -> (Host, Vec<*mut g::ggml_tensor>) {
        // SAFETY: plain ggml calls; the context is sized for the tensor headers it will hold
        // and no_alloc leaves the data to the backend buffer allocated below.
        unsafe {
            let ctx = g::ggml_init(g::ggml_init_params {
                mem_size: g::ggml_tensor_overhead() * (shapes.len() + 1),
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            });
            assert!(!ctx.is_null());
            let ts = shapes
                .iter()
                .map(|&(ty, ne)| g::ggml_new_tensor_4d(ctx, ty, ne[0], ne[1], ne[2], ne[3]))
                .collect();
            let buf =
                g::ggml_backend_alloc_ctx_tensors_from_buft(ctx, g::ggml_backend_cpu_buffer_type());
            assert!(!buf.is_null());
            (Host { ctx, buf }, ts)
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: both were created in Host::new and are freed once.
        unsafe {
            g::ggml_backend_buffer_free(self.buf);
            g::ggml_free(self.ctx);
        }
    }
}

/// The whole of `t` (a live tensor) as `T`s.
pub fn tensor_read<T: Copy + Default>(t: *mut g::ggml_tensor) -> Vec<T> {
    // SAFETY: `t` is a live tensor whose byte size is ggml_nbytes.
    unsafe {
        let n = g::ggml_nbytes(t) / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        g::ggml_backend_tensor_get(t, v.as_mut_ptr().cast::<c_void>(), 0, g::ggml_nbytes(t));
        v
    }
}

/// Writes `data`, exactly the byte size of `t` (checked), into `t`.
#[allow(dead_code)] // kv_ggml_inputs only reads
pub fn tensor_write(t: *mut g::ggml_tensor, data: &[u8]) {
    // SAFETY: `t` is a live tensor of exactly data.len() bytes (checked).
    unsafe {
        assert_eq!(g::ggml_nbytes(t), data.len());
        g::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, data.len());
    }
}

/// The C ubatch over a stock ubatch's raw view (no `seq_idx`, no `output`).
pub fn c_ubatch(r: &stock::RawUbatch) -> llama_memory_ubatch {
    llama_memory_ubatch {
        n_tokens: r.n_tokens,
        n_seq_tokens: r.n_seq_tokens,
        n_seqs: r.n_seqs,
        n_seqs_unq: r.n_seqs_unq,
        n_pos: r.n_pos,
        equal_seqs: r.equal_seqs,
        token: r.token,
        pos: r.pos,
        n_seq_id: r.n_seq_id,
        seq_id: r.seq_id,
        seq_id_unq: r.seq_id_unq,
        seq_idx: ptr::null(),
        output: ptr::null(),
        type_: ptr::null(),
    }
}
