//! End-to-end checks of the bindings against the compiled (or linked) ggml:
//! CPU buffers, tensor upload/download, F16 conversion, a computed graph, and
//! type sizes.

use std::ffi::CStr;
use std::ptr;

use ggml_sys::*;

/// A no_alloc ggml context: tensors get metadata only, their data lives in a
/// backend buffer, as in llama.cpp's KV cache.
struct Context(*mut ggml_context);

impl Context {
    fn new(max_tensors: usize, with_graph: bool) -> Self {
        // SAFETY: plain getters without preconditions.
        let mut mem_size = unsafe { ggml_tensor_overhead() } * max_tensors;
        if with_graph {
            // SAFETY: a size getter, like ggml_tensor_overhead: no arguments, no preconditions.
            mem_size += unsafe { ggml_graph_overhead() };
        }
        let params = ggml_init_params {
            mem_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: valid params; ggml allocates mem_size bytes itself.
        let ctx = unsafe { ggml_init(params) };
        assert!(!ctx.is_null(), "ggml_init failed");
        Self(ctx)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init and freed once.
        unsafe { ggml_free(self.0) };
    }
}

/// Owns a backend buffer.
struct Buffer(ggml_backend_buffer_t);

impl Buffer {
    /// Allocates every tensor of `ctx` in one CPU buffer.
    fn alloc_cpu(ctx: &Context) -> Self {
        // SAFETY: ctx is live and no_alloc; the CPU buffer type is a static.
        let buf = unsafe {
            ggml_backend_alloc_ctx_tensors_from_buft(ctx.0, ggml_backend_cpu_buffer_type())
        };
        assert!(!buf.is_null(), "allocating the tensors failed");
        Self(buf)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated by ggml and freed once.
        unsafe { ggml_backend_buffer_free(self.0) };
    }
}

/// Owns a CPU backend.
struct Backend(ggml_backend_t);

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: created by ggml_backend_cpu_init and freed once.
        unsafe { ggml_backend_free(self.0) };
    }
}

/// Uploads `data` into `tensor`, which must hold exactly that many bytes.
fn set<T: Copy>(tensor: *mut ggml_tensor, data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    // SAFETY: tensor is allocated in a live buffer, sizes checked.
    unsafe {
        assert_eq!(ggml_nbytes(tensor), bytes);
        ggml_backend_tensor_set(tensor, data.as_ptr().cast(), 0, bytes);
    }
}

/// Downloads all of `tensor` as `n` values of `T`.
fn get<T: Copy + Default>(tensor: *const ggml_tensor, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    let bytes = std::mem::size_of_val(out.as_slice());
    // SAFETY: tensor is allocated in a live buffer, sizes checked.
    unsafe {
        assert_eq!(ggml_nbytes(tensor), bytes);
        ggml_backend_tensor_get(tensor, out.as_mut_ptr().cast(), 0, bytes);
    }
    out
}

fn c_str(s: *const std::ffi::c_char) -> String {
    assert!(!s.is_null());
    // SAFETY: ggml returns NUL-terminated static strings.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

#[test]
fn cpu_buffer_type_is_host_memory() {
    // SAFETY: the CPU buffer type is a static object.
    unsafe {
        let buft = ggml_backend_cpu_buffer_type();
        assert!(!buft.is_null());
        assert!(ggml_backend_buft_is_host(buft));
        assert_eq!(c_str(ggml_backend_buft_name(buft)), "CPU");
    }
}

#[test]
fn version_strings_come_from_the_pinned_upstream() {
    // SAFETY: static strings.
    let (version, commit) = unsafe { (c_str(ggml_version()), c_str(ggml_commit())) };
    // ggml/CMakeLists.txt of llama-cpp-sys-2 0.1.161 says 0.26.0.
    assert_eq!(version, "0.26.0");
    assert!(!commit.is_empty());
}

#[test]
fn f32_and_f16_tensors_round_trip_through_a_cpu_buffer() {
    let ctx = Context::new(2, false);
    // SAFETY: ctx is live; shapes are small and valid.
    let (t32, t16) = unsafe {
        (
            ggml_new_tensor_2d(ctx.0, GGML_TYPE_F32, 4, 3),
            ggml_new_tensor_2d(ctx.0, GGML_TYPE_F16, 4, 3),
        )
    };
    assert!(!t32.is_null() && !t16.is_null());
    // no_alloc: nothing has memory until the buffer is allocated.
    // SAFETY: t32 points into ctx.
    assert!(unsafe { (*t32).data }.is_null());
    let buffer = Buffer::alloc_cpu(&ctx);
    // SAFETY: as above; the buffer now backs both tensors.
    unsafe {
        assert!(!(*t32).data.is_null() && !(*t16).data.is_null());
        assert_eq!((*t32).buffer, buffer.0);
        assert_eq!((*t32).ne, [4, 3, 1, 1]);
        assert_eq!((*t32).nb, [4, 16, 48, 48]);
        assert_eq!((*t16).nb, [2, 8, 24, 24]);
    }

    let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.75 - 3.0).collect();
    set(t32, &values);
    assert_eq!(get::<f32>(t32, 12), values);

    // Multiples of 0.25 in this range are exact in F16; 0.1 is not, and must
    // come back as the nearest F16 value (relative error <= 2^-11).
    let mut halves = values.clone();
    halves[11] = 0.1;
    // SAFETY: pure conversion functions.
    let encoded: Vec<ggml_fp16_t> = halves
        .iter()
        .map(|&x| unsafe { ggml_fp32_to_fp16(x) })
        .collect();
    // IEEE binary16 bit patterns: -3.0 = sign | exponent 16 | mantissa 0.5.
    assert_eq!(encoded[0], 0xc200);
    // SAFETY: pure conversion function.
    assert_eq!(unsafe { ggml_fp32_to_fp16(1.0) }, 0x3c00);
    set(t16, &encoded);
    let read: Vec<ggml_fp16_t> = get(t16, 12);
    assert_eq!(read, encoded);
    // SAFETY: pure conversion function.
    let decoded: Vec<f32> = read
        .iter()
        .map(|&h| unsafe { ggml_fp16_to_fp32(h) })
        .collect();
    assert_eq!(decoded[..11], values[..11]);
    assert!((decoded[11] - 0.1).abs() <= 0.1 / 2048.0, "{}", decoded[11]);
}

#[test]
fn cpu_backend_computes_add_and_mul_mat() {
    const K: usize = 32;
    let ctx = Context::new(8, true);
    // SAFETY: ctx is live; the ops get tensors of compatible shapes.
    let (a, b, sum, w, x, product, graph) = unsafe {
        let a = ggml_new_tensor_2d(ctx.0, GGML_TYPE_F32, 4, 3);
        let b = ggml_new_tensor_2d(ctx.0, GGML_TYPE_F32, 4, 3);
        let sum = ggml_add(ctx.0, a, b);
        // w: 4 rows of length K; x: 3 columns of length K; product[j][i] =
        // w_i . x_j. K = 32 is large enough for the SIMD (llamafile) kernels.
        let w = ggml_new_tensor_2d(ctx.0, GGML_TYPE_F32, K as i64, 4);
        let x = ggml_new_tensor_2d(ctx.0, GGML_TYPE_F32, K as i64, 3);
        let product = ggml_mul_mat(ctx.0, w, x);
        let graph = ggml_new_graph(ctx.0);
        ggml_build_forward_expand(graph, sum);
        ggml_build_forward_expand(graph, product);
        (a, b, sum, w, x, product, graph)
    };
    // Results are allocated too: every tensor of the context gets memory.
    let _buffer = Buffer::alloc_cpu(&ctx);

    let av: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let bv: Vec<f32> = (0..12).map(|i| 100.0 - 2.0 * i as f32).collect();
    let wv: Vec<f32> = (0..4 * K).map(|i| (i % 5) as f32 - 1.0).collect();
    let xv: Vec<f32> = (0..3 * K).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
    set(a, &av);
    set(b, &bv);
    set(w, &wv);
    set(x, &xv);

    // SAFETY: no arguments.
    let backend = Backend(unsafe { ggml_backend_cpu_init() });
    assert!(!backend.0.is_null());
    // SAFETY: live backend; graph and its tensors are allocated.
    unsafe {
        ggml_backend_cpu_set_n_threads(backend.0, 2);
        assert_eq!(
            ggml_backend_graph_compute(backend.0, graph),
            GGML_STATUS_SUCCESS
        );
    }

    let expected_sum: Vec<f32> = av.iter().zip(&bv).map(|(p, q)| p + q).collect();
    assert_eq!(get::<f32>(sum, 12), expected_sum);

    // SAFETY: product points into ctx.
    assert_eq!(unsafe { (*product).ne }, [4, 3, 1, 1]);
    let mut expected_product = Vec::new();
    for xj in xv.chunks(K) {
        for wi in wv.chunks(K) {
            expected_product.push(wi.iter().zip(xj).map(|(p, q)| p * q).sum::<f32>());
        }
    }
    // Small integers and halves: exact in any summation order.
    assert_eq!(get::<f32>(product, 12), expected_product);
}

#[test]
fn type_sizes_match_ggml_block_definitions() {
    // ggml-common.h: block_q8_0 is QK8_0 = 32 int8 quants plus one F16 scale,
    // i.e. 32 elements in 2 + 32 = 34 bytes; F16 is 1 element in 2 bytes.
    // SAFETY: pure functions on valid type ids.
    unsafe {
        assert_eq!(ggml_blck_size(GGML_TYPE_Q8_0), 32);
        assert_eq!(ggml_type_size(GGML_TYPE_Q8_0), 34);
        assert_eq!(ggml_row_size(GGML_TYPE_Q8_0, 32), 34);
        assert_eq!(ggml_row_size(GGML_TYPE_Q8_0, 4096), 4096 / 32 * 34);
        assert!(ggml_is_quantized(GGML_TYPE_Q8_0));

        assert_eq!(ggml_blck_size(GGML_TYPE_F16), 1);
        assert_eq!(ggml_type_size(GGML_TYPE_F16), 2);
        assert_eq!(ggml_row_size(GGML_TYPE_F16, 128), 256);
        assert_eq!(ggml_type_size(GGML_TYPE_F32), 4);
        assert_eq!(c_str(ggml_type_name(GGML_TYPE_Q8_0)), "q8_0");
    }
}
