//! The recurrent memory at the C ABI: its constructor and parameters, its tensors, a view of
//! its cells, and its part of a memory context (`n_rs`, `head`, `rs_z`, `s_copy`). The llama.h
//! functions, the context steps and the state functions are the generic ones.

use ggml_sys as g;

use super::error::llama_memory_result;
use super::handle::{llama_memory_ctx_t, llama_memory_t, llama_pos, ContextHandle, MemoryHandle};
use super::ubatch::{llama_memory_ubatch, ubatch_views};
use crate::error::{err, Result};
use crate::memory::{find, find_for_layer, find_mut};
use crate::recurrent::{RecurrentMemory, RsCache, RsContext, RsParams};
use crate::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};

use llama_memory_result::*;

/// One model layer of a recurrent memory with tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_rs_layer {
    /// Model layer index (ascending over the listed layers).
    pub il: u32,
    /// R row width, `hparams.n_embd_r()` (conv or token-shift state).
    pub n_embd_r: u32,
    /// S row width, `hparams.n_embd_s()` (SSM or WKV state; 0 for short-conv layers).
    pub n_embd_s: u32,
    /// PLE conv-history row width (`hparams.ple_conv_state()` on PLE layers), 0 for none.
    pub n_embd_p: u32,
    /// Buffer type of the layer's tensors; NULL for the CPU buffer type. It must stay valid
    /// while the memory is alive.
    pub buft: *mut g::ggml_backend_buffer_type,
}

/// Parameters of a recurrent memory (llama.cpp's `llama_memory_recurrent`), the first type of
/// the recurrent family; get the defaults from `llama_memory_rs_default_params()`.
///
/// The family: `llama_memory_rs_init` makes a `llama_memory_t` ended by `llama_memory_free`;
/// `llama_memory_rs_*` read its tensors (owned by the memory), cells and slots; a context gives
/// the recurrent inputs (`llama_memory_ctx_get_n_rs`, `_set_input_s_copy`, ...). llama.h's
/// functions, contexts and states are the generic ones.
/// Layers llama.cpp's `filter` callback rejects are simply not listed; with no layer the
/// memory holds cells only and behaves as llama.cpp's does when its filter keeps no layer (a
/// partial `seq_rm` only moves the position back; no rollback plane is used).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct llama_memory_rs_params {
    /// Cells, at least `n_seq_max` and at most 256; 0 means `max(1, n_seq_max)` as llama.cpp.
    pub size: u32,
    /// Number of sequences, 1..=256.
    pub n_seq_max: u32,
    /// Rollback planes per sequence (`n_rs_seq`, llama.cpp's context parameter).
    pub n_rs_seq: u32,
    /// Layers of the model (`hparams.n_layer()`), written into states; every listed `il` is
    /// below it.
    pub n_layer: u32,
    /// R (and PLE) type, a `ggml_type` (llama.cpp uses F32).
    pub type_r: i32,
    /// S type, a `ggml_type` (llama.cpp uses F32).
    pub type_s: i32,
    /// The layers with tensors, `n_layers` of them.
    pub layers: *const llama_memory_rs_layer,
    /// Number of entries in `layers`.
    pub n_layers: usize,
}

/// Default recurrent parameters: one sequence, `size` from `n_seq_max`, no rollback, F32 R
/// and S, no layers.
#[no_mangle]
pub extern "C" fn llama_memory_rs_default_params() -> llama_memory_rs_params {
    llama_memory_rs_params {
        size: 0,
        n_seq_max: 1,
        n_rs_seq: 0,
        n_layer: 0,
        type_r: g::GGML_TYPE_F32 as i32,
        type_s: g::GGML_TYPE_F32 as i32,
        layers: std::ptr::null(),
        n_layers: 0,
    }
}

/// Creates a recurrent memory (`llama_memory_recurrent`), its tensors zeroed. Returns NULL
/// (and sets the last error) for invalid parameters or a failed allocation. The caller owns
/// the memory and frees it with `llama_memory_free`; every `buft` of the layers must outlive
/// it.
#[no_mangle]
pub extern "C" fn llama_memory_rs_init(params: llama_memory_rs_params) -> llama_memory_t {
    ffi_boundary!({
        let layers = try_slice!(params.layers, params.n_layers, "params.layers");
        let mem = try_or!(new_memory(&params, layers));
        MemoryHandle::boxed(Box::new(mem))
    })
}

fn new_memory(
    p: &llama_memory_rs_params,
    layers: &[llama_memory_rs_layer],
) -> Result<RecurrentMemory> {
    let type_of =
        |v: i32| u32::try_from(v).map_err(|_| err!(InvalidArgument, "ggml_type {v} is invalid"));
    let size = if p.size == 0 {
        p.n_seq_max.max(1)
    } else {
        p.size
    };
    let cache = RsCache::new(
        RsParams {
            size,
            n_seq_max: p.n_seq_max,
            n_rs_seq: p.n_rs_seq,
        },
        !layers.is_empty(),
    )?;
    let storage = if layers.is_empty() {
        None
    } else {
        Some(RsStorage::new(RsStorageSpec {
            type_r: type_of(p.type_r)?,
            type_s: type_of(p.type_s)?,
            size,
            n_rs_seq: cache.n_rs_seq(),
            layers: layers
                .iter()
                .map(|l| RsLayerSpec {
                    il: l.il,
                    n_embd_r: l.n_embd_r,
                    n_embd_s: l.n_embd_s,
                    n_embd_p: l.n_embd_p,
                    // SAFETY: the header requires each layer's buft to be NULL or a live ggml buffer
                    // type that outlives the memory.
                    buft: unsafe { crate::storage::Buft::from_raw(l.buft) },
                })
                .collect(),
        })?)
    };
    RecurrentMemory::new(cache, storage, p.n_layer)
}

/// Which of a layer's recurrent tensors.
#[derive(Clone, Copy)]
enum Which {
    R,
    S,
    P,
}

fn layer_tensor(mem: llama_memory_t, il: u32, which: Which) -> *mut g::ggml_tensor {
    let m = try_ref!(mem, "mem");
    let rs = try_or!(find_for_layer::<RecurrentMemory>(&*m.inner, il));
    let l = try_or!(rs
        .storage
        .as_ref()
        .and_then(|s| s.layer(il))
        .ok_or_else(|| err!(InvalidArgument, "layer {il} has no tensors")));
    let t = match which {
        Which::R => l.r,
        Which::S => l.s,
        Which::P => l.p,
    };
    if t.is_null() {
        bail!(err!(InvalidArgument, "layer {il} has no PLE tensor"));
    }
    t
}

/// The R tensor of model layer `il` (`[n_embd_r, size * (1 + n_rs_seq)]`, `cache_r_l<il>`),
/// owned by the memory; NULL (last error set) if there is none.
#[no_mangle]
pub extern "C" fn llama_memory_rs_get_r_tensor(
    mem: llama_memory_t,
    il: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ layer_tensor(mem, il, Which::R) })
}

/// The S tensor of model layer `il` (`[n_embd_s, size * (1 + n_rs_seq)]`, `cache_s_l<il>`);
/// NULL (last error set) if there is none.
#[no_mangle]
pub extern "C" fn llama_memory_rs_get_s_tensor(
    mem: llama_memory_t,
    il: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ layer_tensor(mem, il, Which::S) })
}

/// The PLE conv-history tensor of model layer `il` (`cache_ple_r_l<il>`); NULL (last error
/// set) for a layer without one.
#[no_mangle]
pub extern "C" fn llama_memory_rs_get_p_tensor(
    mem: llama_memory_t,
    il: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({ layer_tensor(mem, il, Which::P) })
}

/// What `llama_memory_rs_get_info` reports of a recurrent memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct llama_memory_rs_info {
    /// Cells.
    pub size: u32,
    /// First cell of the last placed ubatch.
    pub head: u32,
    /// Cells in use, as llama.cpp counts them.
    pub used: u32,
    /// Cells spanned by the last placed ubatch.
    pub n: u32,
    /// The zero-state row chosen by the last placement (-1: none).
    pub rs_z: i32,
    /// Rollback planes per sequence.
    pub n_rs_seq: u32,
}

/// Reads the bookkeeping of a recurrent memory into `out`.
#[no_mangle]
pub extern "C" fn llama_memory_rs_get_info(
    mem: llama_memory_t,
    out: *mut llama_memory_rs_info,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let o = &mut try_slice_mut!(out, 1, "out")[0];
        let c = &try_or!(find::<RecurrentMemory>(&*m.inner)).cache;
        *o = llama_memory_rs_info {
            size: c.size(),
            head: c.head(),
            used: c.used(),
            n: c.n(),
            rs_z: c.rs_z(),
            n_rs_seq: c.n_rs_seq(),
        };
        LLAMA_MEMORY_OK
    })
}

/// One cell of a recurrent memory, as `llama_memory_rs_get_cell` reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct llama_memory_rs_cell {
    /// Last position of the state held here, -1 when free.
    pub pos: llama_pos,
    /// Row the next ubatch reads the state from (-1: a zero state).
    pub src: i32,
    /// `src` as staged for `s_copy` by the last placement.
    pub src0: i32,
    /// As the metadata slot of sequence `i`: the cell holding its state, -1 if none.
    pub tail: i32,
    /// Pending rollback plane of sequence `i` (0: none; only for `i < n_seq_max`).
    pub rs_idx: u32,
    /// Number of sequences sharing the cell.
    pub n_seq: u32,
}

/// Reads cell `i` into `out` and its sequence ids (ascending) into `seqs` (up to `cap`; the
/// count is `out->n_seq`).
#[no_mangle]
pub extern "C" fn llama_memory_rs_get_cell(
    mem: llama_memory_t,
    i: u32,
    out: *mut llama_memory_rs_cell,
    seqs: *mut i32,
    cap: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let m = try_ref!(mem, "mem");
        let o = &mut try_slice_mut!(out, 1, "out")[0];
        let c = &try_or!(find::<RecurrentMemory>(&*m.inner)).cache;
        let Some(cell) = c.cells().get(i as usize) else {
            bail!(err!(
                InvalidArgument,
                "cell {i} outside the {} cells",
                c.size()
            ));
        };
        let n_seq = cell.seq.count_ones();
        let dst = try_slice_mut!(seqs, n_seq.min(cap), "seqs");
        for (d, q) in dst.iter_mut().zip(cell.seq.iter_ones()) {
            *d = q as i32;
        }
        *o = llama_memory_rs_cell {
            pos: cell.pos,
            src: cell.src,
            src0: cell.src0,
            tail: cell.tail,
            rs_idx: c.rs_idx().get(i as usize).copied().unwrap_or(0),
            n_seq: n_seq as u32,
        };
        LLAMA_MEMORY_OK
    })
}

/// Simulates placing `ubatches` in turn (`llama_memory_recurrent::prepare`, which the hybrid
/// memories call for their recurrent part) and leaves the cells as they were. True when all
/// of them fit; false when one does not, or (last error set) on invalid input.
#[no_mangle]
pub extern "C" fn llama_memory_rs_prepare(
    mem: llama_memory_t,
    ubatches: *const llama_memory_ubatch,
    n_ubatches: usize,
) -> bool {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let descs = try_slice!(ubatches, n_ubatches, "ubatches");
        let views = try_or!(ubatch_views(descs, &mut m.scratch));
        let rs = try_or!(find_mut::<RecurrentMemory>(&mut *m.inner));
        for ub in &views {
            try_or!(rs.cache.check_ubatch(ub));
        }
        rs.cache.prepare(&views)
    })
}

/// Places `ubatch` (`llama_memory_recurrent::find_slot`, what a context's `apply` does): the
/// cells, `head`, `n` and `rs_z` the graph inputs read afterwards. False (last error set)
/// when it does not fit or is invalid; the cells are then unchanged.
#[no_mangle]
pub extern "C" fn llama_memory_rs_find_slot(
    mem: llama_memory_t,
    ubatch: *const llama_memory_ubatch,
) -> bool {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let descs = try_slice!(ubatch, 1, "ubatch");
        let views = try_or!(ubatch_views(descs, &mut m.scratch));
        let rs = try_or!(find_mut::<RecurrentMemory>(&mut *m.inner));
        try_or!(rs.cache.find_slot(&views[0]));
        true
    })
}

/// `s_copy(i)` of the last placement (`llama_memory_recurrent_context::s_copy`): the row the
/// state of cell `head + i` is read from, in its first sequence's pending rollback plane,
/// which this consumes, as upstream does. -1 (last error set) outside the cells.
#[no_mangle]
pub extern "C" fn llama_memory_rs_s_copy(mem: llama_memory_t, i: u32) -> i32 {
    ffi_boundary!({
        let m = try_mut!(mem, "mem");
        let rs = try_or!(find_mut::<RecurrentMemory>(&mut *m.inner));
        try_or!(rs.cache.s_copy_one(i))
    })
}

fn rs_of(c: &ContextHandle) -> Result<(&RsContext, &RecurrentMemory)> {
    let ctx = c.find::<RsContext>()?;
    let mem = find::<RecurrentMemory>(c.part_memory()?)?;
    Ok((ctx, mem))
}

/// Rows the graph gathers for the current ubatch (`get_n_rs`; the whole memory for a full
/// context), 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_n_rs(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let (rc, m) = try_or!(rs_of(c));
        rc.n_rs(m)
    })
}

/// First state row of the current ubatch (`get_head`; 0 for a full context), 0 on error.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_rs_head(ctx: llama_memory_ctx_t) -> u32 {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let (rc, m) = try_or!(rs_of(c));
        rc.head(m)
    })
}

/// The row the graph zeroes for new sequences (`get_rs_z`; -1 for none, 0 for a full
/// context); -1 on error.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_get_rs_z(ctx: llama_memory_ctx_t) -> i32 {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let (rc, m) = try_or!(rs_of(c));
        rc.rs_z(m)
    })
}

fn s_copy_into(c: &ContextHandle, out: &mut [i32]) -> Result<()> {
    let rc = c.find::<RsContext>()?;
    // SAFETY: the context's memory outlives it (header rule), and the header forbids using a
    // memory from two threads at once: no other reference to it is live during this call.
    let mh = unsafe { super::handle::try_from_mut(c.memory_ptr()) }
        .ok_or_else(|| err!(NullArgument, "context has no memory"))?;
    let m = find_mut::<RecurrentMemory>(&mut *mh.inner)?;
    let n_rs = rc.n_rs(m) as usize;
    if out.len() < n_rs {
        return Err(err!(
            BufferTooSmall,
            "s_copy needs {n_rs} elements, got {}",
            out.len()
        ));
    }
    m.cache.s_copy_into(&mut out[..n_rs])
}

/// Writes `s_copy` for the current ubatch (`llm_graph_input_rs::set_input`): `n_rs` source
/// rows into `dst` (`n` elements, at least `n_rs`). With rollback planes, reading it consumes
/// the pending rollbacks of the sequences it covers, as in llama.cpp.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_s_copy(
    ctx: llama_memory_ctx_t,
    dst: *mut i32,
    n: usize,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let out = try_slice_mut!(dst, n, "dst");
        try_or!(s_copy_into(c, out));
        LLAMA_MEMORY_OK
    })
}

/// `llama_memory_ctx_set_input_s_copy` into a contiguous host I32 tensor of at least `n_rs`
/// elements.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_set_input_s_copy_tensor(
    ctx: llama_memory_ctx_t,
    dst: *mut g::ggml_tensor,
) -> llama_memory_result {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        // SAFETY: the header requires dst to be a valid tensor that nothing else accesses
        // during the call.
        let (_, out) =
            try_or!(unsafe { super::boundary::host_tensor::<i32>(dst, &[g::GGML_TYPE_I32]) });
        try_or!(s_copy_into(c, out));
        LLAMA_MEMORY_OK
    })
}

/// `build_rs` of the current ubatch over layer `il`'s R (`which` 0), S (1) or PLE (2) tensor,
/// in the caller's `gctx`/`gf`: zeroes the context's `rs_z` row, gathers the rows `s_copy`
/// names (an I32 input tensor of `n_rs` elements, filled by
/// `llama_memory_ctx_set_input_s_copy_tensor`), returns the `[state_size, n_seqs]` states the
/// ubatch reads, and adds the copy of the other gathered rows back to rows `head + n_seqs ..`
/// to `gf`. NULL (last error set) on bad arguments, a full context or a full graph.
#[no_mangle]
pub extern "C" fn llama_memory_ctx_build_rs(
    ctx: llama_memory_ctx_t,
    gctx: *mut g::ggml_context,
    gf: *mut g::ggml_cgraph,
    il: u32,
    which: u32,
    s_copy: *mut g::ggml_tensor,
    state_size: u32,
    n_seqs: u32,
) -> *mut g::ggml_tensor {
    ffi_boundary!({
        let c = try_ref!(ctx, "ctx");
        let (rc, m) = try_or!(rs_of(c));
        let st = try_or!(m
            .storage
            .as_ref()
            .ok_or_else(|| err!(Unsupported, "this memory has no tensors")));
        let l = try_or!(st
            .layer(il)
            .ok_or_else(|| err!(InvalidArgument, "layer {il} has no tensors")));
        let t = match which {
            0 => l.r,
            1 => l.s,
            2 => l.p,
            w => bail!(err!(InvalidArgument, "which = {w} (0 R, 1 S, 2 PLE)")),
        };
        if s_copy.is_null() || t.is_null() {
            bail!(err!(
                NullArgument,
                "s_copy is NULL, or the layer has no such tensor"
            ));
        }
        // SAFETY: s_copy is a valid tensor (the header's contract); only its shape is read.
        let n_rs = unsafe { (*s_copy).ne[0] };
        if n_rs != rc.n_rs(m) as i64 {
            bail!(err!(
                InvalidArgument,
                "s_copy has {n_rs} elements, the context gathers {}",
                rc.n_rs(m)
            ));
        }
        // SAFETY: the header requires gctx, gf and s_copy to be valid (or NULL, refused).
        try_or!(unsafe {
            st.build_rs(
                gctx,
                gf,
                t,
                s_copy,
                state_size,
                n_seqs,
                rc.head(m),
                rc.rs_z(m),
            )
        })
    })
}
