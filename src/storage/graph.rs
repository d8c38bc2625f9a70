//! Graph nodes over the cache tensors, built in a caller's `ggml_context` (llama.cpp's
//! `get_k/get_v/cpy_k/cpy_v` and the K-shift of `build_graph_shift`). The caller computes
//! the graph on whatever backend holds the buffers.

use ggml_sys as g;

use super::{GgmlType, KvStorage};
use crate::error::{err, Result};

/// RoPE parameters of one layer for the K-shift (`build_rope_shift`): what llama.cpp takes
/// from the model and the context parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    /// Rotated dimensions (`n_rot(il)`).
    pub n_rot: i32,
    /// Values of each head before the rotated ones (MLA: `n_embd_head_k - n_rot`; else 0).
    pub n_embd_nope: u32,
    /// ggml rope mode (NEOX for M-RoPE models, as llama.cpp).
    pub mode: i32,
    /// `n_ctx_orig_yarn`.
    pub n_ctx_orig: i32,
    /// Per-layer frequency base.
    pub freq_base: f32,
    /// Per-layer frequency scale.
    pub freq_scale: f32,
    /// `yarn_ext_factor`.
    pub ext_factor: f32,
    /// `yarn_attn_factor`.
    pub attn_factor: f32,
    /// `yarn_beta_fast`.
    pub beta_fast: f32,
    /// `yarn_beta_slow`.
    pub beta_slow: f32,
}

/// Checks that `ctx` can hold `n_nodes` more tensor headers (views: no data), so ggml does not
/// abort on a full context.
///
/// # Safety
/// `ctx` must be NULL or a valid ggml context.
pub(super) unsafe fn check_ctx(ctx: *mut g::ggml_context, n_nodes: usize) -> Result<()> {
    if ctx.is_null() {
        return Err(err!(NullArgument, "ctx is NULL"));
    }
    // SAFETY: a valid context (the caller's contract); these only read its bookkeeping.
    let (size, used) = unsafe { (g::ggml_get_mem_size(ctx), g::ggml_used_mem(ctx)) };
    // ggml pads each object to its memory alignment (16 bytes): allow for it per node.
    // SAFETY: a pure function of the build's struct sizes.
    let need = n_nodes * (unsafe { g::ggml_tensor_overhead() } + 16);
    if size.saturating_sub(used) < need {
        return Err(err!(
            InvalidArgument,
            "the ggml context has {} bytes free, {need} needed for {n_nodes} nodes",
            size.saturating_sub(used)
        ));
    }
    Ok(())
}

/// Checks a caller tensor's type against `types`.
///
/// # Safety
/// `t` must be NULL or a valid tensor.
pub(super) unsafe fn check_type(
    t: *mut g::ggml_tensor,
    types: &[g::ggml_type],
    what: &str,
) -> Result<()> {
    if t.is_null() {
        return Err(err!(NullArgument, "{what} is NULL"));
    }
    // SAFETY: a valid tensor (the caller's contract).
    let ty = unsafe { (*t).type_ };
    if !types.contains(&ty) {
        return Err(err!(
            InvalidArgument,
            "{what} has ggml type {ty}, expected one of {types:?}"
        ));
    }
    Ok(())
}

/// A vector of `n` elements: `ne = [n, 1, 1, 1]`.
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn is_vector_of(t: *mut g::ggml_tensor, n: i64) -> bool {
    // SAFETY: a valid tensor (the caller's contract).
    let ne = unsafe { (*t).ne };
    ne == [n, 1, 1, 1]
}

/// How the current rows of a row write are laid out.
enum Rows {
    /// `[width, n_tokens]`, contiguous: written as they are.
    Flat,
    /// `[head, n_head, n_tokens]` with `head * n_head == width` and heads packed in a token
    /// (upstream's `k_cur`/`v_cur`): viewed as rows, the token stride taken from `nb[2]`.
    Heads,
}

/// The layout of `cur` for rows of `width` values, and its token count.
///
/// # Safety
/// `cur` must be a valid tensor.
unsafe fn rows_of(cur: *mut g::ggml_tensor, width: i64, what: &str) -> Result<(Rows, i64)> {
    // SAFETY: a valid tensor (the caller's contract); these read its header.
    let (t, contiguous) = unsafe { (&*cur, g::ggml_is_contiguous(cur)) };
    let ne = t.ne;
    if width > 0 && ne[3] == 1 && ne[0] * ne[1] == width {
        // SAFETY: as above.
        let head_row = unsafe { g::ggml_row_size(t.type_, ne[0]) };
        if t.nb[1] == head_row && t.nb[2] >= head_row * ne[1] as usize {
            return Ok((Rows::Heads, ne[2]));
        }
    } else if width > 0 && ne[0] == width && ne[2] == 1 && ne[3] == 1 && contiguous {
        return Ok((Rows::Flat, ne[1]));
    }
    Err(err!(
        InvalidArgument,
        "{what}_cur has ne = {ne:?}: expected [head, n_head, n_tokens] with head * n_head = \
         {width} and packed heads, or contiguous [{width}, n_tokens]"
    ))
}

/// Types `ggml_set_rows` takes for the rows written.
const ROW_TYPES: [g::ggml_type; 2] = [g::GGML_TYPE_F32, g::GGML_TYPE_F16];
/// Types `ggml_set_rows` takes for the row indices.
const IDX_TYPES: [g::ggml_type; 2] = [g::GGML_TYPE_I64, g::GGML_TYPE_I32];

/// `ggml_rope_ext` modes a K-shift takes: normal and NEOX (llama.cpp turns M-RoPE into NEOX).
const SHIFT_ROPE_MODES: [i32; 2] = [0, g::GGML_ROPE_TYPE_NEOX as i32];

pub(super) fn non_null(t: *mut g::ggml_tensor, what: &str) -> Result<*mut g::ggml_tensor> {
    if t.is_null() {
        return Err(err!(InvalidArgument, "ggml could not build {what}"));
    }
    Ok(t)
}

impl KvStorage {
    fn layer_or_err(&self, il: u32) -> Result<super::StorageLayer> {
        self.layer(il)
            .copied()
            .ok_or_else(|| err!(InvalidArgument, "layer {il} is not in the cache"))
    }

    fn check_streams(&self, n_kv: u32, s0: u32, s1: u32) -> Result<()> {
        if s0 > s1 || s1 >= self.spec.n_stream || n_kv == 0 || n_kv > self.spec.size {
            return Err(err!(
                InvalidArgument,
                "streams {s0}..={s1} or n_kv {n_kv} outside the cache ({} streams, {} cells)",
                self.spec.n_stream,
                self.spec.size
            ));
        }
        Ok(())
    }

    /// Heads of `head` values in a row of `width` values of type `t`; a head must be whole
    /// quantization blocks, or its byte stride would not exist.
    fn heads(t: g::ggml_type, width: u32, head: u32) -> Result<i64> {
        if head == 0 || width % head != 0 {
            return Err(err!(
                InvalidArgument,
                "head size {head} does not divide the row width {width}"
            ));
        }
        // SAFETY: t is one of the storage's validated types.
        let blck = unsafe { g::ggml_blck_size(t) }.max(1) as u32;
        if head % blck != 0 {
            return Err(err!(
                InvalidArgument,
                "head size {head} is not a whole number of {blck}-value blocks of the cache type"
            ));
        }
        Ok((width / head) as i64)
    }

    /// The checks both views start with, and the layer's K (`v == false`) or V tensor with its
    /// type and head count for heads of `head` values.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context.
    unsafe fn view_of(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        n_kv: u32,
        (s0, s1): (u32, u32),
        head: u32,
        v: bool,
    ) -> Result<(*mut g::ggml_tensor, GgmlType, i64)> {
        // SAFETY: forwarded contract.
        unsafe { check_ctx(ctx, 1) }?;
        self.check_streams(n_kv, s0, s1)?;
        let l = self.layer_or_err(il)?;
        let (t, ty, width) = if v {
            (l.v, self.spec.type_v, l.n_embd_v_gqa)
        } else {
            (l.k, self.spec.type_k, l.n_embd_k_gqa)
        };
        if t.is_null() {
            return Err(err!(InvalidArgument, "layer {il} has no V (MLA)"));
        }
        Ok((t, ty, Self::heads(ty, width, head)?))
    }

    /// `[head, n_head, n_kv, s1 - s0 + 1]` over rows of `row` values of `t` (one of our
    /// tensors of type `ty`, `size` rows per stream), from stream `s0` on.
    ///
    /// # Safety
    /// `ctx` must be a valid ggml context with room for the view, `t` one of our live tensors
    /// holding `row * size` values per stream for at least `s1 + 1` streams, `n_kv <= size`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_view(
        &self,
        ctx: *mut g::ggml_context,
        (t, ty, n_head): (*mut g::ggml_tensor, GgmlType, i64),
        head: u32,
        row: i64,
        n_kv: u32,
        (s0, s1): (u32, u32),
        what: &str,
    ) -> Result<*mut g::ggml_tensor> {
        // SAFETY: the caller's contract: every view lies inside t.
        unsafe {
            let nb1 = g::ggml_row_size(ty, head as i64);
            let nb2 = g::ggml_row_size(ty, row);
            let nb3 = g::ggml_row_size(ty, row * self.spec.size as i64);
            non_null(
                g::ggml_view_4d(
                    ctx,
                    t,
                    head as i64,
                    n_head,
                    n_kv as i64,
                    (s1 - s0 + 1) as i64,
                    nb1,
                    nb2,
                    nb3,
                    nb3 * s0 as usize,
                ),
                what,
            )
        }
    }

    /// View of layer `il`'s K for the first `n_kv` cells of streams `s0..=s1`:
    /// `[head, n_head_kv, n_kv, ns]` (`get_k`).
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context.
    pub unsafe fn view_k(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        n_kv: u32,
        s0: u32,
        s1: u32,
        n_embd_head_k: u32,
    ) -> Result<*mut g::ggml_tensor> {
        // SAFETY: forwarded contract.
        let k = unsafe { self.view_of(ctx, il, n_kv, (s0, s1), n_embd_head_k, false) }?;
        let width = self.layer_or_err(il)?.n_embd_k_gqa as i64;
        // SAFETY: ctx is a caller context (non-NULL, checked); k is our live tensor of `width`
        // values per row; n_kv <= size and s1 < n_stream were checked.
        unsafe { self.rows_view(ctx, k, n_embd_head_k, width, n_kv, (s0, s1), "the K view") }
    }

    /// View of layer `il`'s V (`get_v`): `[head, n_head_kv, n_kv, ns]`, or for a transposed
    /// cache `[n_kv, n_head_kv, head, ns]`.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context.
    pub unsafe fn view_v(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        n_kv: u32,
        s0: u32,
        s1: u32,
        n_embd_head_v: u32,
    ) -> Result<*mut g::ggml_tensor> {
        // SAFETY: forwarded contract.
        let v = unsafe { self.view_of(ctx, il, n_kv, (s0, s1), n_embd_head_v, true) }?;
        let (l, t, n_head) = (v.0, v.1, v.2);
        // SAFETY: l is our live V tensor (checked non-NULL).
        let e_v = unsafe { (*l).ne[0] };
        if !self.spec.v_trans {
            // SAFETY: as in view_k, over rows of e_v values.
            return unsafe {
                self.rows_view(ctx, v, n_embd_head_v, e_v, n_kv, (s0, s1), "the V view")
            };
        }
        let size = self.spec.size as i64;
        let ns = (s1 - s0 + 1) as i64;
        // SAFETY: as in view_k; the transposed strides stay inside [E_v * size] per stream.
        unsafe {
            let nb1 = g::ggml_row_size(t, size * n_embd_head_v as i64);
            let nb2 = g::ggml_row_size(t, size);
            let nb3 = g::ggml_row_size(t, size * e_v);
            non_null(
                g::ggml_view_4d(
                    ctx,
                    l,
                    n_kv as i64,
                    n_head,
                    n_embd_head_v as i64,
                    ns,
                    nb1,
                    nb2,
                    nb3,
                    nb3 * s0 as usize,
                ),
                "the transposed V view",
            )
        }
    }

    /// Writes the current K rows (`k_cur`, `[head, n_head_kv, n_tokens]`, contiguous heads)
    /// into layer `il` at the rows of `k_idxs` (I64, global row = stream * size + cell), as
    /// `cpy_k`: returns the `ggml_set_rows` node. `k_cur` is F32 or F16, `k_idxs` I64 or I32.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context, and each tensor NULL or a valid tensor.
    pub unsafe fn cpy_k(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        k_cur: *mut g::ggml_tensor,
        k_idxs: *mut g::ggml_tensor,
    ) -> Result<*mut g::ggml_tensor> {
        let l = self.layer_or_err(il)?;
        // SAFETY: forwarded contract.
        unsafe { self.set_rows(ctx, l.k, l.n_embd_k_gqa, k_cur, k_idxs, "K") }
    }

    /// Writes the current V rows into layer `il` (`cpy_v`). Non-transposed: as [`Self::cpy_k`].
    /// Transposed: `v_idxs` holds one index per scalar (`[n_tokens * E_v]`, from
    /// `set_input_v_idxs`), and `v_cur` must be `[n_embd_v_gqa, n_tokens]` with the layer's
    /// full width.
    ///
    /// # Safety
    /// As [`Self::cpy_k`].
    pub unsafe fn cpy_v(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        v_cur: *mut g::ggml_tensor,
        v_idxs: *mut g::ggml_tensor,
    ) -> Result<*mut g::ggml_tensor> {
        let l = self.layer_or_err(il)?;
        if l.v.is_null() {
            return Err(err!(InvalidArgument, "layer {il} has no V (MLA)"));
        }
        if !self.spec.v_trans {
            // SAFETY: forwarded contract.
            return unsafe { self.set_rows(ctx, l.v, l.n_embd_v_gqa, v_cur, v_idxs, "V") };
        }
        // SAFETY: forwarded contract.
        unsafe {
            check_ctx(ctx, 5)?;
            check_type(v_cur, &ROW_TYPES, "v_cur")?;
            check_type(v_idxs, &IDX_TYPES, "v_idxs")?;
        }
        let width = l.n_embd_v_gqa as i64;
        // SAFETY: caller tensors (valid, checked non-NULL) are read for their shape; every
        // view and reshape keeps inside them (checked first), as upstream's `cpy_v` builds them.
        unsafe {
            let (rows, n_tokens) = rows_of(v_cur, width, "v_cur")?;
            let e_v = (*l.v).ne[0];
            if width > e_v || !is_vector_of(v_idxs, n_tokens * e_v) {
                return Err(err!(
                    InvalidArgument,
                    "v_cur must hold rows of {width} <= E_v = {e_v} values and v_idxs \
                     n_tokens * E_v indices"
                ));
            }
            // rows of the layer's width, contiguous (upstream: reshape, or a copy when the
            // token stride is not the row size)
            let mut cur = match rows {
                Rows::Flat => v_cur,
                Rows::Heads
                    if (*v_cur).nb[2] == g::ggml_row_size((*v_cur).type_, width)
                        && g::ggml_is_contiguous(v_cur) =>
                {
                    non_null(
                        g::ggml_reshape_2d(ctx, v_cur, width, n_tokens),
                        "the V rows",
                    )?
                }
                Rows::Heads => {
                    non_null(g::ggml_cont_2d(ctx, v_cur, width, n_tokens), "the V rows")?
                }
            };
            if !g::ggml_is_contiguous(cur) {
                return Err(err!(InvalidArgument, "v_cur must be contiguous"));
            }
            // a layer narrower than the widest one (upstream's TAG_V_CACHE_VARIABLE)
            if width < e_v {
                cur = non_null(
                    g::ggml_pad(ctx, cur, (e_v - width) as i32, 0, 0, 0),
                    "the V padding",
                )?;
            }
            let total = g::ggml_nelements(l.v);
            let dst = non_null(g::ggml_reshape_2d(ctx, l.v, 1, total), "the V scalar rows")?;
            let src = non_null(
                g::ggml_reshape_2d(ctx, cur, 1, g::ggml_nelements(cur)),
                "the V_cur scalar rows",
            )?;
            non_null(g::ggml_set_rows(ctx, dst, src, v_idxs), "the V row write")
        }
    }

    /// `ggml_set_rows` of `cur` into the rows of `cache` (`width` values each) at `idxs`, built
    /// node for node as upstream's `cpy_k` and non-transposed `cpy_v`: a 2-D view of the
    /// current rows, the cache merged over its streams only when it has several.
    ///
    /// # Safety
    /// As [`Self::cpy_k`].
    unsafe fn set_rows(
        &self,
        ctx: *mut g::ggml_context,
        cache: *mut g::ggml_tensor,
        width: u32,
        cur: *mut g::ggml_tensor,
        idxs: *mut g::ggml_tensor,
        what: &str,
    ) -> Result<*mut g::ggml_tensor> {
        // SAFETY: forwarded contract.
        unsafe {
            check_ctx(ctx, 3)?;
            check_type(cur, &ROW_TYPES, "the current rows")?;
            check_type(idxs, &IDX_TYPES, "the row indices")?;
        }
        let width = width as i64;
        // SAFETY: valid caller tensors, read for their shape; the view keeps inside `cur`
        // (checked by rows_of) and the reshape keeps the cache's element count.
        unsafe {
            let (rows, n_tokens) = rows_of(cur, width, what)?;
            if !is_vector_of(idxs, n_tokens) {
                return Err(err!(
                    InvalidArgument,
                    "{what}: {n_tokens} rows of {width} values, but the indices do not match"
                ));
            }
            let src = match rows {
                Rows::Flat => cur,
                Rows::Heads => non_null(
                    g::ggml_view_2d(ctx, cur, width, n_tokens, (*cur).nb[2], 0),
                    what,
                )?,
            };
            let dst = if self.spec.n_stream > 1 {
                let rows = self.spec.size as i64 * self.spec.n_stream as i64;
                non_null(g::ggml_reshape_2d(ctx, cache, width, rows), what)?
            } else {
                cache
            };
            non_null(g::ggml_set_rows(ctx, dst, src, idxs), what)
        }
    }

    /// The K-shift of layer `il` (`build_graph_shift`): RoPE by `k_shift` (I32,
    /// `[size * n_stream]`, from `set_input_k_shift`) over `rope.n_rot` dimensions of every
    /// head of every cell, starting `rope.n_embd_nope` values into the head. F32/F16/BF16 K is
    /// rotated in place; a quantized K goes through F32 with llama.cpp's Hadamard rotation
    /// `k_rot` (F32 `[n_rot_k, n_rot_k]`, its own inverse) undone before the RoPE and redone
    /// after it, then is copied back. `k_shift` must be an I32 vector, `rope_factors` NULL or
    /// F32 with at least `n_rot / 2` values, `rope.mode` normal or NEOX.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid ggml context, and each tensor NULL or a valid tensor.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn k_shift(
        &self,
        ctx: *mut g::ggml_context,
        il: u32,
        n_embd_head_k: u32,
        k_shift: *mut g::ggml_tensor,
        k_rot: *mut g::ggml_tensor,
        rope_factors: *mut g::ggml_tensor,
        rope: &RopeParams,
    ) -> Result<*mut g::ggml_tensor> {
        let l = self.layer_or_err(il)?;
        let t = self.spec.type_k;
        // SAFETY: a checked ggml type (the storage's own).
        let quantized = unsafe { g::ggml_is_quantized(t) };
        // A plain K: a view and the in-place RoPE. A quantized K: view, cast, 2 x (reshape,
        // mul_mat, reshape), RoPE, cpy.
        // SAFETY: forwarded contract.
        unsafe { check_ctx(ctx, if quantized { 10 } else { 2 }) }?;
        let n_head = Self::heads(t, l.n_embd_k_gqa, n_embd_head_k)?;
        if !SHIFT_ROPE_MODES.contains(&rope.mode) {
            return Err(err!(
                InvalidArgument,
                "rope mode {} is not a K-shift mode (normal 0 or NEOX 2)",
                rope.mode
            ));
        }
        // SAFETY: forwarded contract (NULL tensors are refused by check_type).
        unsafe {
            check_type(k_shift, &[g::GGML_TYPE_I32], "k_shift")?;
            if !rope_factors.is_null() {
                check_type(rope_factors, &[g::GGML_TYPE_F32], "rope_factors")?;
                if (*rope_factors).ne[0] < (rope.n_rot / 2) as i64 {
                    return Err(err!(
                        InvalidArgument,
                        "rope_factors has {} values, n_rot / 2 = {} needed",
                        (*rope_factors).ne[0],
                        rope.n_rot / 2
                    ));
                }
            }
        }
        if rope.n_rot <= 0 || (rope.n_rot as u64) + (rope.n_embd_nope as u64) > n_embd_head_k as u64
        {
            return Err(err!(
                InvalidArgument,
                "n_rot {} after {} values outside a head of {n_embd_head_k}",
                rope.n_rot,
                rope.n_embd_nope
            ));
        }
        let cells = self.spec.size as i64 * self.spec.n_stream as i64;
        let n_rot = rope.n_rot as i64;
        if quantized {
            // SAFETY: forwarded contract (NULL is refused by check_type).
            unsafe { check_type(k_rot, &[g::GGML_TYPE_F32], "k_rot") }?;
            // SAFETY: k_rot is a valid tensor (checked above).
            let rot_ne = unsafe { (*k_rot).ne };
            // The rotation works on blocks of rot_ne[0] values of the n_rot * n_head * cells
            // rotated ones.
            if rot_ne[0] <= 0
                || rot_ne[1] != rot_ne[0]
                || rot_ne[2] != 1
                || rot_ne[3] != 1
                || (n_rot * n_head) % rot_ne[0] != 0
            {
                return Err(err!(
                    InvalidArgument,
                    "k_rot has ne = {rot_ne:?}, expected a square matrix whose size divides \
                     n_rot * n_head_kv = {}",
                    n_rot * n_head
                ));
            }
        }
        // SAFETY: the view covers n_rot values, from n_embd_nope on, of each head of each
        // cell, inside l.k (checked above: n_embd_nope + n_rot <= n_embd_head_k and the heads
        // fill a row); k_shift is a caller tensor whose length is checked against the cells.
        unsafe {
            if !is_vector_of(k_shift, cells) {
                return Err(err!(
                    InvalidArgument,
                    "k_shift has ne = {:?}, expected [{cells}, 1, 1, 1]",
                    (*k_shift).ne
                ));
            }
            let view = non_null(
                g::ggml_view_3d(
                    ctx,
                    l.k,
                    n_rot,
                    n_head,
                    cells,
                    g::ggml_row_size(t, n_embd_head_k as i64),
                    g::ggml_row_size(t, l.n_embd_k_gqa as i64),
                    g::ggml_row_size(t, rope.n_embd_nope as i64),
                ),
                "the K-shift view",
            )?;
            let rope_of = |x: *mut g::ggml_tensor, inplace: bool| {
                let f = if inplace {
                    g::ggml_rope_ext_inplace
                } else {
                    g::ggml_rope_ext
                };
                non_null(
                    f(
                        ctx,
                        x,
                        k_shift,
                        rope_factors,
                        rope.n_rot,
                        rope.mode,
                        rope.n_ctx_orig,
                        rope.freq_base,
                        rope.freq_scale,
                        rope.ext_factor,
                        rope.attn_factor,
                        rope.beta_fast,
                        rope.beta_slow,
                    ),
                    "the K-shift rope",
                )
            };
            if !quantized {
                return rope_of(view, true);
            }
            let mut cur = non_null(
                g::ggml_cast(ctx, view, g::GGML_TYPE_F32),
                "the K-shift cast",
            )?;
            cur = hadamard(ctx, cur, k_rot)?;
            cur = rope_of(cur, false)?;
            cur = hadamard(ctx, cur, k_rot)?;
            non_null(g::ggml_cpy(ctx, cur, view), "the K-shift copy")
        }
    }
}

/// `rot * x` over blocks of `rot->ne[0]` values of `x`, shaped back as `x` (llama.cpp's
/// `llama_mul_mat_hadamard`, with ggml's Hadamard hint).
///
/// # Safety
/// `ctx` must be a valid context with room for 3 nodes (checked by the caller), `x` a valid
/// F32 tensor whose element count `rot->ne[0]` divides, `rot` a valid square F32 matrix.
unsafe fn hadamard(
    ctx: *mut g::ggml_context,
    x: *mut g::ggml_tensor,
    rot: *mut g::ggml_tensor,
) -> Result<*mut g::ggml_tensor> {
    // SAFETY: the caller's contract: valid tensors and context, divisible sizes.
    unsafe {
        let n = (*rot).ne[0];
        let ne = (*x).ne;
        let rows = g::ggml_nelements(x) / n;
        let flat = if g::ggml_is_contiguous(x) {
            g::ggml_reshape_2d(ctx, x, n, rows)
        } else {
            g::ggml_cont_2d(ctx, x, n, rows)
        };
        let flat = non_null(flat, "the rotation's reshape")?;
        let res = non_null(g::ggml_mul_mat(ctx, rot, flat), "the rotation")?;
        g::ggml_mul_mat_set_hint(res, g::GGML_HINT_SRC0_IS_HADAMARD);
        non_null(
            g::ggml_reshape_4d(ctx, res, ne[0], ne[1], ne[2], ne[3]),
            "the rotation's reshape",
        )
    }
}
