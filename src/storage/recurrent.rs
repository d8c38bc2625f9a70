//! Recurrent state tensors in ggml backend buffers: llama.cpp's per-layer `cache_r_l<il>`,
//! `cache_s_l<il>` and, for layers with a per-layer-embedding conv history, `cache_ple_r_l<il>`,
//! each `[n_embd, size * (1 + n_rs_seq)]` (row `plane * size + cell`), allocated in
//! caller-chosen buffer types and cleared to zero, as `llama_memory_recurrent`'s constructor
//! does.

use std::collections::BTreeMap;

use ggml_sys as g;

use super::{group_by_buft, row_size, set_name, type_name, Buffers, Buft, GgmlType, KV_TYPES};
use crate::error::{err, Result};

/// One model layer of a recurrent memory.
#[derive(Clone, Copy, Debug)]
pub struct RsLayerSpec {
    /// Model layer index.
    pub il: u32,
    /// Width of the R row (`n_embd_r()`: the conv or token-shift state).
    pub n_embd_r: u32,
    /// Width of the S row (`n_embd_s()`: the SSM or WKV state; 0 for short-conv layers).
    pub n_embd_s: u32,
    /// Width of the PLE conv-history row (`ple_conv_state()`), 0 for a layer without one.
    pub n_embd_p: u32,
    /// Buffer type of this layer's tensors.
    pub buft: Buft,
}

/// What a recurrent memory's storage holds.
#[derive(Clone, Debug)]
pub struct RsStorageSpec {
    /// Type of the R (and PLE) rows.
    pub type_r: GgmlType,
    /// Type of the S rows.
    pub type_s: GgmlType,
    /// Cells.
    pub size: u32,
    /// Rollback planes beyond the live one.
    pub n_rs_seq: u32,
    /// The layers with tensors, ascending `il` (already filtered, as llama.cpp's constructor
    /// visits them).
    pub layers: Vec<RsLayerSpec>,
}

/// One layer's tensors.
#[derive(Clone, Copy, Debug)]
pub struct RsStorageLayer {
    /// Model layer index.
    pub il: u32,
    /// `[n_embd_r, rows]`.
    pub r: *mut g::ggml_tensor,
    /// `[n_embd_s, rows]`.
    pub s: *mut g::ggml_tensor,
    /// `[n_embd_p, rows]` of the R type, NULL when the layer has none.
    pub p: *mut g::ggml_tensor,
    /// Bytes of one R row.
    pub row_r: usize,
    /// Bytes of one S row.
    pub row_s: usize,
    /// Bytes of one PLE row (0 without one).
    pub row_p: usize,
}

/// Per-layer R/S (and PLE) tensors of a recurrent memory, in buffers it owns.
#[derive(Debug)]
pub struct RsStorage {
    spec: RsStorageSpec,
    layers: Vec<RsStorageLayer>,
    bufs: Buffers,
}

// SAFETY: the tensors (and the buffer types named in the spec) belong to the contexts and
// buffers this value owns alone; ggml keeps no thread-local state about them.
unsafe impl Send for RsStorage {}

impl RsStorage {
    /// Allocates and zeroes the tensors described by `spec`.
    pub fn new(spec: RsStorageSpec) -> Result<Self> {
        for t in [spec.type_r, spec.type_s] {
            if !KV_TYPES.contains(&t) {
                return Err(err!(
                    InvalidArgument,
                    "{} is not a supported recurrent state type",
                    type_name(t)
                ));
            }
        }
        if spec.size == 0 {
            return Err(err!(InvalidArgument, "size must be > 0"));
        }
        let rows = (spec.size as u64) * (spec.n_rs_seq as u64 + 1);
        if rows > i32::MAX as u64 {
            return Err(err!(InvalidArgument, "too many state rows ({rows})"));
        }
        let mut planned = Vec::with_capacity(spec.layers.len());
        for (k, l) in spec.layers.iter().enumerate() {
            if k > 0 && l.il <= spec.layers[k - 1].il {
                return Err(err!(InvalidArgument, "layers must have ascending il"));
            }
            let (row_r, row_s) = (
                row_size(spec.type_r, l.n_embd_r)?,
                row_size(spec.type_s, l.n_embd_s)?,
            );
            let row_p = row_size(spec.type_r, l.n_embd_p)?;
            for row in [row_r, row_s, row_p] {
                (row as u64)
                    .checked_mul(rows)
                    .filter(|&v| v <= isize::MAX as u64 / 2)
                    .ok_or_else(|| err!(InvalidArgument, "layer {} tensors are too large", l.il))?;
            }
            planned.push((l, row_r, row_s, row_p));
        }
        let mut st = RsStorage {
            spec: spec.clone(),
            layers: Vec::with_capacity(planned.len()),
            bufs: Buffers::default(),
        };
        let mut by_il = BTreeMap::new();
        for (buft, ls) in group_by_buft(planned, |pl| pl.0.buft) {
            let ctx = st.bufs.new_ctx(3 * ls.len())?;
            for (l, row_r, row_s, row_p) in ls {
                let new = |t: GgmlType, w: u32, name: String| {
                    // SAFETY: ctx has room for three tensor headers per layer; shapes were
                    // checked above.
                    let x = unsafe { g::ggml_new_tensor_2d(ctx, t, w as i64, rows as i64) };
                    set_name(x, &name);
                    x
                };
                let r = new(spec.type_r, l.n_embd_r, format!("cache_r_l{}", l.il));
                let s = new(spec.type_s, l.n_embd_s, format!("cache_s_l{}", l.il));
                let p = if l.n_embd_p > 0 {
                    new(spec.type_r, l.n_embd_p, format!("cache_ple_r_l{}", l.il))
                } else {
                    std::ptr::null_mut()
                };
                by_il.insert(
                    l.il,
                    RsStorageLayer {
                        il: l.il,
                        r,
                        s,
                        p,
                        row_r,
                        row_s,
                        row_p,
                    },
                );
            }
            st.bufs.alloc(ctx, buft, "recurrent state")?;
        }
        st.layers = by_il.into_values().collect();
        Ok(st)
    }

    /// The description the storage was built from.
    pub fn spec(&self) -> &RsStorageSpec {
        &self.spec
    }

    /// The layers, ascending `il`.
    pub fn layers(&self) -> &[RsStorageLayer] {
        &self.layers
    }

    /// The tensors of model layer `il`.
    pub fn layer(&self, il: u32) -> Option<&RsStorageLayer> {
        self.layers.iter().find(|l| l.il == il)
    }

    /// True when every buffer is in host memory.
    pub fn is_host(&self) -> bool {
        self.bufs.host
    }

    /// Zeroes every buffer (`clear(data = true)`).
    pub fn clear(&mut self) {
        self.bufs.clear();
    }

    /// Bytes allocated per buffer type (`memory_breakdown`).
    pub fn memory_breakdown(&self) -> Vec<(g::ggml_backend_buffer_type_t, usize)> {
        self.bufs.memory_breakdown()
    }

    /// Fails unless `[offset, offset + len)` lies inside `t`, one of this storage's tensors.
    pub fn check(&self, t: *mut g::ggml_tensor, offset: usize, len: usize) -> Result<()> {
        if t.is_null() || !self.layers.iter().any(|l| l.r == t || l.s == t || l.p == t) {
            return Err(err!(InvalidArgument, "not a tensor of this storage"));
        }
        // SAFETY: t is one of our live tensors.
        let n = unsafe { g::ggml_nbytes(t) };
        match offset.checked_add(len) {
            Some(end) if end <= n => Ok(()),
            _ => Err(err!(
                InvalidArgument,
                "byte range {offset}+{len} is outside a {n}-byte tensor"
            )),
        }
    }

    /// Copies `dst.len()` bytes at `offset` of tensor `t` into `dst`.
    pub fn get(&self, t: *mut g::ggml_tensor, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(t, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: `check` proved the byte range lies inside t's data; dst is a distinct Rust
        // slice. ggml copies from host or device memory alike.
        unsafe { g::ggml_backend_tensor_get(t, dst.as_mut_ptr().cast(), offset, dst.len()) };
        Ok(())
    }

    /// Zeroes every tensor from row `first` on (a whole restore's rows come before it).
    pub fn clear_from_row(&mut self, first: usize) {
        for l in &self.layers {
            for (t, row) in [(l.r, l.row_r), (l.s, l.row_s), (l.p, l.row_p)] {
                if t.is_null() {
                    continue;
                }
                // SAFETY: t is one of our live tensors.
                let n = unsafe { g::ggml_nbytes(t) };
                let off = first.saturating_mul(row).min(n);
                if off < n {
                    // SAFETY: [off, n) lies inside t's data; &mut self gives exclusive access.
                    unsafe { g::ggml_backend_tensor_memset(t, 0, off, n - off) };
                }
            }
        }
    }

    /// Zeroes rows `first..first + n` of every tensor (what llama.cpp's `state_clear` zeroes
    /// after a failed restore placed its cells there).
    pub fn zero_rows(&mut self, first: usize, n: usize) {
        for l in &self.layers {
            for (t, row) in [(l.r, l.row_r), (l.s, l.row_s), (l.p, l.row_p)] {
                if t.is_null() {
                    continue;
                }
                // SAFETY: t is one of our live tensors.
                let size = unsafe { g::ggml_nbytes(t) };
                let off = first.saturating_mul(row).min(size);
                let end = first.saturating_add(n).saturating_mul(row).min(size);
                if off < end {
                    // SAFETY: [off, end) lies inside t's data; &mut self gives exclusive access.
                    unsafe { g::ggml_backend_tensor_memset(t, 0, off, end - off) };
                }
            }
        }
    }

    /// Copies `src` to `offset` of tensor `t`.
    pub fn set(&mut self, t: *mut g::ggml_tensor, offset: usize, src: &[u8]) -> Result<()> {
        self.check(t, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: bounds checked above; &mut self gives exclusive access to the buffer.
        unsafe { g::ggml_backend_tensor_set(t, src.as_ptr().cast(), offset, src.len()) };
        Ok(())
    }
}

/// Graph nodes that add to a caller graph: ggml aborts when the graph is full, so the room is
/// checked first.
///
/// # Safety
/// `gf` must be NULL or a valid graph.
unsafe fn check_graph(gf: *mut g::ggml_cgraph, n_nodes: i32) -> Result<()> {
    if gf.is_null() {
        return Err(err!(NullArgument, "gf is NULL"));
    }
    // SAFETY: a valid graph (the caller's contract); these only read its counters.
    let (size, used) = unsafe { (g::ggml_graph_size(gf), g::ggml_graph_n_nodes(gf)) };
    if size - used < n_nodes {
        return Err(err!(
            InvalidArgument,
            "the graph has room for {} more nodes, {n_nodes} needed",
            size - used
        ));
    }
    Ok(())
}

impl RsStorage {
    /// `build_rs` (llama-graph.cpp) over `t`, the R, S or PLE tensor of a layer: zeroes row
    /// `rs_z` (none when negative), gathers the rows `s_copy` names (I32, `[n_rs]`, from
    /// `s_copy_into`), returns the first `n_seqs` of them (`[state_size, n_seqs]`, the states
    /// the ubatch reads) and copies the other `n_rs - n_seqs` back to rows `head + n_seqs ..`.
    /// The zeroing and the copy-back are added to `gf`, as upstream. `state_size * rows` must
    /// be the tensor's element count.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context, `gf` NULL or a valid graph of it, and
    /// `s_copy` NULL or a valid tensor.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn build_rs(
        &self,
        ctx: *mut g::ggml_context,
        gf: *mut g::ggml_cgraph,
        t: *mut g::ggml_tensor,
        s_copy: *mut g::ggml_tensor,
        state_size: u32,
        n_seqs: u32,
        head: u32,
        rs_z: i32,
    ) -> Result<*mut g::ggml_tensor> {
        use super::graph::{check_ctx, check_type, is_vector_of, non_null};
        self.check(t, 0, 0)?;
        // SAFETY: the caller's contract for ctx, gf and s_copy; t is one of our tensors.
        unsafe {
            check_type(s_copy, &[g::GGML_TYPE_I32], "s_copy")?;
            let n_rs = (*s_copy).ne[0];
            if !is_vector_of(s_copy, n_rs) || n_rs < 1 {
                return Err(err!(
                    InvalidArgument,
                    "s_copy must be a non-empty I32 vector"
                ));
            }
            let n_el = g::ggml_nelements(t);
            if state_size == 0 || n_el % state_size as i64 != 0 {
                return Err(err!(
                    InvalidArgument,
                    "state_size {state_size} does not divide the tensor's {n_el} elements"
                ));
            }
            let rows = n_el / state_size as i64;
            let (n_seqs, head) = (n_seqs as i64, head as i64);
            if n_seqs > n_rs || head + n_rs > rows || rs_z as i64 >= rows {
                return Err(err!(
                    InvalidArgument,
                    "n_seqs {n_seqs}, head {head}, n_rs {n_rs} or rs_z {rs_z} outside the {rows} rows"
                ));
            }
            check_graph(gf, 3)?;
            check_ctx(ctx, 8)?;
            if !g::ggml_get_no_alloc(ctx) {
                // the gathered rows get their data in ctx too
                let data = (state_size as usize) * (n_rs as usize) * g::ggml_type_size((*t).type_);
                check_ctx(ctx, 8 + data.div_ceil(g::ggml_tensor_overhead()))?;
            }
            let ss = state_size as i64;
            let states = non_null(g::ggml_reshape_2d(ctx, t, ss, rows), "the states")?;
            let nb1 = (*states).nb[1];
            let z = rs_z >= 0;
            let zero = g::ggml_view_1d(
                ctx,
                states,
                ss * z as i64,
                if z { rs_z as usize * nb1 } else { 0 },
            );
            g::ggml_build_forward_expand(
                gf,
                g::ggml_scale_inplace(ctx, non_null(zero, "rs_z")?, 0.0),
            );
            let all = non_null(g::ggml_get_rows(ctx, states, s_copy), "the gather")?;
            let anb1 = (*all).nb[1];
            let out = non_null(g::ggml_view_2d(ctx, all, ss, n_seqs, anb1, 0), "the states")?;
            g::ggml_build_forward_expand(gf, out);
            let extra = g::ggml_view_2d(ctx, all, ss, n_rs - n_seqs, anb1, n_seqs as usize * anb1);
            let back = g::ggml_view_2d(
                ctx,
                t,
                ss,
                n_rs - n_seqs,
                (*t).nb[1],
                (head + n_seqs) as usize * (*t).nb[1],
            );
            let cpy = g::ggml_cpy(
                ctx,
                non_null(extra, "extra")?,
                non_null(back, "extra rows")?,
            );
            g::ggml_build_forward_expand(gf, non_null(cpy, "copy-back")?);
            Ok(out)
        }
    }
}
