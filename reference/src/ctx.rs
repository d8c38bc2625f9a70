//! The stock `llama_context` behind the `kvref_ctx_*` functions of `shim/kvref.h`: [`RefCtx`],
//! driven only through the public `llama.h` API, and its [`CtxParams`]. The multi-sequence
//! batch and per-output logits additions live in `recurrent.rs`.

use std::ffi::c_void;
use std::os::raw::c_char;
use std::path::Path;
use std::ptr;

use crate::{api, c_path, model_path};

pub(crate) type CtxPtr = *mut c_void;

/// The resolved `kvref_ctx_*` functions (part of the crate's `Api`).
pub(crate) struct CtxApi {
    default_params: unsafe extern "C" fn(*mut CtxParams),
    new: unsafe extern "C" fn(*const c_char, *const CtxParams) -> CtxPtr,
    free: unsafe extern "C" fn(CtxPtr),
    decode: unsafe extern "C" fn(CtxPtr, *const i32, u32, i32, i32) -> i32,
    n_vocab: unsafe extern "C" fn(CtxPtr) -> u32,
    logits: unsafe extern "C" fn(CtxPtr, *mut f32) -> bool,
    seq_get: unsafe extern "C" fn(CtxPtr, i32, u32, *mut u8, usize) -> usize,
    seq_set: unsafe extern "C" fn(CtxPtr, i32, u32, *const u8, usize) -> usize,
    seq_save_file: unsafe extern "C" fn(CtxPtr, *const c_char, i32, *const i32, usize) -> usize,
    seq_load_file:
        unsafe extern "C" fn(CtxPtr, *const c_char, i32, *mut i32, usize, *mut usize) -> usize,
    state_get: unsafe extern "C" fn(CtxPtr, *mut u8, usize) -> usize,
    state_set: unsafe extern "C" fn(CtxPtr, *const u8, usize) -> usize,
    seq_rm: unsafe extern "C" fn(CtxPtr, i32, i32, i32) -> bool,
    seq_pos_min: unsafe extern "C" fn(CtxPtr, i32) -> i32,
    seq_pos_max: unsafe extern "C" fn(CtxPtr, i32) -> i32,
    memory_clear: unsafe extern "C" fn(CtxPtr, bool),
}

impl CtxApi {
    pub(crate) fn load(lib: &libloading::os::unix::Library) -> Result<CtxApi, libloading::Error> {
        Ok(resolve!(
            lib,
            "kvref_ctx_",
            CtxApi {
                default_params,
                new,
                free,
                decode,
                n_vocab,
                logits,
                seq_get,
                seq_set,
                seq_save_file,
                seq_load_file,
                state_get,
                state_set,
                seq_rm,
                seq_pos_min,
                seq_pos_max,
                memory_clear,
            }
        ))
    }
}

fn ctx() -> &'static CtxApi {
    &api().ctx
}

/// Mirror of `kvref_ctx_params`: how to configure a stock `llama_context` ([`RefCtx`]).
/// [`CtxParams::default`] gives the shim's defaults: `n_ctx` 256, `n_batch` 0 (= `n_ctx`),
/// 1 sequence, unified, no flash attention, f16/f16, no rollback snapshots.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtxParams {
    /// `llama_context_params.n_ctx`; llama.cpp pads it to 256 (when not unified, each sequence
    /// gets `n_ctx / n_seq_max` cells, padded to 256).
    pub n_ctx: u32,
    /// `n_batch` and `n_ubatch`; 0 means `n_ctx`.
    pub n_batch: u32,
    /// Sequences (and streams when not unified).
    pub n_seq_max: u32,
    /// One KV stream for all sequences.
    pub kv_unified: bool,
    /// `LLAMA_FLASH_ATTN_TYPE_ENABLED` when set, else `DISABLED` (V stored transposed).
    pub flash_attn: bool,
    /// `ggml_type` of K.
    pub type_k: i32,
    /// `ggml_type` of V.
    pub type_v: i32,
    /// `llama_context_params.n_rs_seq`: recurrent rollback snapshots per sequence (llama.cpp
    /// clamps it to 0 for architectures without rollback support, e.g. `mamba`; `lfm2` keeps it).
    pub n_rs_seq: u32,
}

impl Default for CtxParams {
    fn default() -> Self {
        let mut p = CtxParams {
            n_ctx: 0,
            n_batch: 0,
            n_seq_max: 0,
            kv_unified: false,
            flash_attn: false,
            type_k: 0,
            type_v: 0,
            n_rs_seq: 0,
        };
        // SAFETY: `p` is a valid, writable kvref_ctx_params (same layout, checked at load).
        unsafe { (ctx().default_params)(&mut p) };
        p
    }
}

/// A stock `llama_context` (CPU, one thread) over a model file, used only through the public
/// `llama.h` API: decode, logits, and sequence / whole-state save and restore. Freed on drop.
///
/// As with [`RefKv`], stock assertions abort the process: sequence ids must be below
/// `n_seq_max` and positions must continue each sequence.
#[derive(Debug)]
pub struct RefCtx {
    /// Also for the additions in `recurrent.rs`.
    pub(crate) ptr: CtxPtr,
    params: CtxParams,
    n_vocab: u32,
}

// SAFETY: a llama_context has no thread affinity (its CPU threads are per call); &mut self
// methods are the only mutators and &self methods only read its memory.
unsafe impl Send for RefCtx {}

impl Drop for RefCtx {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from kvref_ctx_new and is freed exactly once.
        unsafe { (ctx().free)(self.ptr) }
    }
}

impl RefCtx {
    /// Creates a context over the model at `model` (loaded once per path per process, shared
    /// with [`RefKv::new`]). `None` if the model cannot be loaded or llama.cpp refuses the
    /// parameters (e.g. a quantized V type without flash attention).
    pub fn new(model: &Path, params: &CtxParams) -> Option<RefCtx> {
        let p = c_path(model);
        // SAFETY: both pointers are valid for the call; the shim copies what it keeps.
        let ptr = unsafe { (ctx().new)(p.as_ptr(), params) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is a live kvref_ctx.
        let n_vocab = unsafe { (ctx().n_vocab)(ptr) };
        Some(RefCtx {
            ptr,
            params: *params,
            n_vocab,
        })
    }

    /// [`RefCtx::new`] over the tiny model of [`model_path`].
    pub fn tiny(params: &CtxParams) -> RefCtx {
        RefCtx::new(&model_path(), params).expect("the stock context could not be created")
    }

    /// The parameters the context was created with.
    pub fn params(&self) -> &CtxParams {
        &self.params
    }

    /// Vocabulary size of the model: the length of [`RefCtx::logits`].
    pub fn n_vocab(&self) -> u32 {
        self.n_vocab
    }

    /// `llama_decode` of `tokens` for sequence `seq` at positions `pos0, pos0 + 1, …`, with
    /// logits for the last token only. Returns `llama_decode`'s result (0 success, 1 no KV
    /// slot, negative on error).
    pub fn decode(&mut self, tokens: &[i32], pos0: i32, seq: i32) -> i32 {
        let n = u32::try_from(tokens.len()).expect("too many tokens");
        // SAFETY: live kvref_ctx (here and in every method below); `tokens` is readable for
        // `n` elements.
        unsafe { (ctx().decode)(self.ptr, tokens.as_ptr(), n, pos0, seq) }
    }

    /// The logits of the last decoded token (`llama_get_logits_ith(ctx, -1)`); `None` before
    /// the first successful decode or after a failed one.
    pub fn logits(&mut self) -> Option<Vec<f32>> {
        let mut out = vec![0f32; self.n_vocab as usize];
        // SAFETY: `out` holds n_vocab floats, what the shim copies.
        let ok = unsafe { (ctx().logits)(self.ptr, out.as_mut_ptr()) };
        ok.then_some(out)
    }

    /// `llama_state_seq_get_size_ext(seq, flags)`: bytes of the sequence's state (8-byte
    /// header + memory part), 0 on failure.
    pub fn seq_state_size(&mut self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (ctx().seq_get)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// `llama_state_seq_get_data_ext(buf, seq, flags)` into a caller buffer, without
    /// allocating (for benchmark loops): bytes written, 0 on failure (e.g. `buf` too small).
    pub fn seq_state_into(&mut self, seq: i32, flags: u32, buf: &mut [u8]) -> usize {
        // SAFETY: `buf` is writable for its length, which llama.cpp respects. A non-null
        // pointer even for an empty slice, so the shim does not take it for a size query.
        unsafe { (ctx().seq_get)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) }
    }

    /// The state blob of sequence `seq` (size query, then `llama_state_seq_get_data_ext`);
    /// `None` if either call returns 0.
    pub fn seq_state(&mut self, seq: i32, flags: u32) -> Option<Vec<u8>> {
        let size = self.seq_state_size(seq, flags);
        if size == 0 {
            return None;
        }
        let mut buf = vec![0u8; size];
        let n = self.seq_state_into(seq, flags, &mut buf);
        if n == 0 {
            return None;
        }
        assert_eq!(n, size, "state size changed between the two calls");
        Some(buf)
    }

    /// `llama_state_seq_set_data_ext(buf, dest, flags)`: bytes read, 0 on failure.
    pub fn seq_set(&mut self, dest: i32, flags: u32, buf: &[u8]) -> usize {
        // SAFETY: `buf` is readable for its length, which llama.cpp respects.
        unsafe { (ctx().seq_set)(self.ptr, dest, flags, buf.as_ptr(), buf.len()) }
    }

    /// `llama_state_seq_save_file(path, seq, tokens)`: bytes written, 0 on failure.
    pub fn seq_save_file(&mut self, path: &Path, seq: i32, tokens: &[i32]) -> usize {
        let p = c_path(path);
        // SAFETY: `p` is a NUL-terminated path and `tokens` is readable for its length.
        unsafe { (ctx().seq_save_file)(self.ptr, p.as_ptr(), seq, tokens.as_ptr(), tokens.len()) }
    }

    /// `llama_state_seq_load_file(path, dest)` with room for `cap` tokens: the bytes of the
    /// file consumed (0 on failure, e.g. more than `cap` tokens) and the saved tokens.
    pub fn seq_load_file(&mut self, path: &Path, dest: i32, cap: usize) -> (usize, Vec<i32>) {
        let p = c_path(path);
        // at least one element: a null tokens_out would only count the tokens, loading nothing
        let mut tokens = vec![0i32; cap.max(1)];
        let mut n = 0usize;
        // SAFETY: `p` is a NUL-terminated path, `tokens` is writable for `cap` elements and `n`
        // is a valid, writable usize.
        let read = unsafe {
            (ctx().seq_load_file)(self.ptr, p.as_ptr(), dest, tokens.as_mut_ptr(), cap, &mut n)
        };
        tokens.truncate(if read == 0 { 0 } else { n.min(cap) });
        (read, tokens)
    }

    /// `llama_state_get_size`: bytes of the whole state (model arch string + memory).
    pub fn state_size(&mut self) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (ctx().state_get)(self.ptr, ptr::null_mut(), 0) }
    }

    /// The whole context state (`llama_state_get_size`, then `llama_state_get_data`); `None`
    /// if either call returns 0.
    pub fn state(&mut self) -> Option<Vec<u8>> {
        let size = self.state_size();
        if size == 0 {
            return None;
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for its length, which llama.cpp respects.
        let n = unsafe { (ctx().state_get)(self.ptr, buf.as_mut_ptr(), buf.len()) };
        if n == 0 {
            return None;
        }
        assert_eq!(n, size, "state size changed between the two calls");
        Some(buf)
    }

    /// `llama_state_set_data(buf)`: bytes read, 0 on failure.
    pub fn state_set(&mut self, buf: &[u8]) -> usize {
        // SAFETY: `buf` is readable for its length, which llama.cpp respects.
        unsafe { (ctx().state_set)(self.ptr, buf.as_ptr(), buf.len()) }
    }

    forward! {
        ctx();

        /// `llama_memory_seq_rm(seq, p0, p1)`.
        fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool;

        /// `llama_memory_seq_pos_min(seq)`, -1 if the sequence is empty.
        fn seq_pos_min(&self, seq: i32) -> i32;

        /// `llama_memory_seq_pos_max(seq)`, -1 if the sequence is empty.
        fn seq_pos_max(&self, seq: i32) -> i32;

        /// `llama_memory_clear(data)`.
        fn memory_clear(&mut self, data: bool);
    }
}
