//! K/V tensor storage in ggml backend buffers: llama.cpp's per-layer `cache_k_l<il>` and
//! `cache_v_l<il>` tensors of shape `[row, cell, stream]`, allocated in caller-chosen buffer
//! types (the CPU buffer type by default) and cleared to zero, as `llama_kv_cache`'s
//! constructor does.
//!
//! Byte access is by (tensor, offset, length) with the bounds checked here, so the state
//! reader above can never write outside a tensor whatever a blob claims. Host buffers are
//! copied directly; other buffers go through `ggml_backend_tensor_get/set`.

// Tensor pointers given to the accessors are dereferenced only after `check` found them among
// this storage's own tensors, so the accessors are safe to call with any pointer.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod graph;
pub mod recurrent;

use std::collections::BTreeMap;
use std::ffi::CStr;

use ggml_sys as g;

use crate::error::{err, Result};

/// A `ggml_type` value (`enum ggml_type` in C).
///
/// cbindgen:ignore
pub type GgmlType = g::ggml_type;

/// The K/V types llama.cpp accepts for its cache (`kv_cache_types` of common/arg.cpp).
///
/// cbindgen:ignore
pub const KV_TYPES: [GgmlType; 9] = [
    g::GGML_TYPE_F32,
    g::GGML_TYPE_F16,
    g::GGML_TYPE_BF16,
    g::GGML_TYPE_Q8_0,
    g::GGML_TYPE_Q4_0,
    g::GGML_TYPE_Q4_1,
    g::GGML_TYPE_IQ4_NL,
    g::GGML_TYPE_Q5_0,
    g::GGML_TYPE_Q5_1,
];

/// A ggml buffer type the storage allocates its tensors from. Safe code can only name the CPU
/// buffer type ([`Buft::CPU`]); any other comes from [`Buft::from_raw`], whose caller vouches
/// that ggml may allocate from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buft(g::ggml_backend_buffer_type_t);

impl Buft {
    /// The CPU buffer type (ggml's `ggml_backend_cpu_buffer_type()`).
    pub const CPU: Buft = Buft(std::ptr::null_mut());

    /// A buffer type from ggml; NULL stands for the CPU one.
    ///
    /// # Safety
    /// A non-NULL `p` must be a ggml buffer type (`ggml_backend_buffer_type_t`) that stays
    /// valid while any storage made with it is alive.
    pub unsafe fn from_raw(p: g::ggml_backend_buffer_type_t) -> Buft {
        Buft(p)
    }

    /// The ggml buffer type, the CPU one for [`Buft::CPU`].
    pub fn as_raw(self) -> g::ggml_backend_buffer_type_t {
        if self.0.is_null() {
            cpu_buffer_type()
        } else {
            self.0
        }
    }
}

impl Default for Buft {
    fn default() -> Buft {
        Buft::CPU
    }
}

/// One model layer as the cache sees it.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    /// Model layer index.
    pub il: u32,
    /// K row width (`n_embd_k_gqa(il)`).
    pub n_embd_k_gqa: u32,
    /// V row width (`n_embd_v_gqa(il)`); ignored for MLA caches.
    pub n_embd_v_gqa: u32,
    /// `Some(src)`: this layer uses the tensors of layer `src` (llama.cpp's `reuse` callback).
    pub reuse: Option<u32>,
    /// Buffer type of this layer's tensors.
    pub buft: Buft,
}

impl LayerSpec {
    /// `n` layers `0..n` with their own CPU tensors, all of the same K and V widths (the
    /// common case of a model without per-layer head counts).
    pub fn uniform(n: u32, n_embd_k_gqa: u32, n_embd_v_gqa: u32) -> Vec<LayerSpec> {
        (0..n)
            .map(|il| LayerSpec {
                il,
                n_embd_k_gqa,
                n_embd_v_gqa,
                reuse: None,
                buft: Buft::CPU,
            })
            .collect()
    }
}

/// What the storage holds: types, layout and layers (already filtered by the caller, ascending
/// `il`, as llama.cpp's constructor visits them).
#[derive(Clone, Debug)]
pub struct StorageSpec {
    /// K type, one of [`KV_TYPES`].
    pub type_k: GgmlType,
    /// V type, one of [`KV_TYPES`]; a quantized V needs `v_trans == false`.
    pub type_v: GgmlType,
    /// V stored transposed.
    pub v_trans: bool,
    /// MLA cache: K only, no V tensors.
    pub is_mla: bool,
    /// Cells per stream.
    pub size: u32,
    /// Number of streams.
    pub n_stream: u32,
    /// Attention-rotation sizes written into and checked against states (llama.cpp derives them
    /// from the model; 0 when off).
    pub n_rot_k: u32,
    /// See `n_rot_k`.
    pub n_rot_v: u32,
    /// The layers.
    pub layers: Vec<LayerSpec>,
}

/// How a storage is created beyond its layout ([`KvStorage::with_options`]); the default is
/// what [`KvStorage::new`] does.
#[derive(Clone, Debug, Default)]
pub struct StorageOptions {
    /// Inserted into the tensor names after `cache_` (llama.cpp's `name_tag`: `cache_<tag>k_l<il>`).
    pub name_tag: String,
    /// Create the tensors without memory (llama.cpp's `no_alloc` models, which only measure):
    /// each buffer type gets a zero-size buffer that the tensors point at, so a scheduler does
    /// not allocate them, and [`KvStorage::memory_breakdown`] reports the bytes an allocation
    /// would take. Every access to the tensors' bytes then fails.
    pub no_alloc: bool,
    /// Width of a transposed V tensor's rows; 0: the widest V row among the layers this
    /// storage holds. llama.cpp pads to the model's widest layer, which a filtered-out layer
    /// may be. Ignored without `v_trans`.
    pub n_embd_v_gqa_max: u32,
}

/// One cache layer with its own tensors.
#[derive(Clone, Copy, Debug)]
pub struct StorageLayer {
    /// Model layer index.
    pub il: u32,
    /// `[n_embd_k_gqa, size, n_stream]`.
    pub k: *mut g::ggml_tensor,
    /// `[E_v, size, n_stream]`, NULL for MLA.
    pub v: *mut g::ggml_tensor,
    /// K row width.
    pub n_embd_k_gqa: u32,
    /// V row width of this layer (the transposed tensor may be wider).
    pub n_embd_v_gqa: u32,
}

/// Per-layer K and V tensors of a KV cache, in ggml backend buffers it owns.
#[derive(Debug)]
pub struct KvStorage {
    spec: StorageSpec,
    layers: Vec<StorageLayer>,
    /// Model layer -> index into `layers` (own or reused tensors).
    map_layer_ids: BTreeMap<u32, usize>,
    n_embd_v_gqa_max: u32,
    bufs: Buffers,
}

// SAFETY: the ggml contexts and buffers are owned by this value alone and ggml keeps no
// thread-local state about them; moving them to another thread is fine. Access is still
// exclusive (&mut) or shared-read (&), as for any Rust value.
unsafe impl Send for KvStorage {}

fn is_kv_type(t: GgmlType) -> bool {
    KV_TYPES.contains(&t)
}

/// The type of a tensor of this library (a composite's dry run checks the bytes meant for it).
pub(crate) fn tensor_type(t: *mut g::ggml_tensor) -> Option<GgmlType> {
    // SAFETY: callers pass NULL or a tensor of a live storage of this library; only its type
    // field is read.
    unsafe { t.as_ref() }.map(|t| t.type_)
}

pub(crate) fn type_name(t: GgmlType) -> String {
    if (t as usize) < g::GGML_TYPE_COUNT as usize {
        // SAFETY: ggml_type_name returns a static NUL-terminated string for every valid type.
        unsafe { CStr::from_ptr(g::ggml_type_name(t)) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("type {t}")
    }
}

/// `ggml_row_size(t, n)`, or an error when `n` is not a whole number of blocks or overflows.
pub fn row_size(t: GgmlType, n: u32) -> Result<usize> {
    if !is_kv_type(t) {
        return Err(err!(
            InvalidArgument,
            "{} is not a KV cache type",
            type_name(t)
        ));
    }
    // SAFETY: `t` is one of the valid ggml types checked above.
    let (blck, ts) = unsafe { (g::ggml_blck_size(t) as u64, g::ggml_type_size(t) as u64) };
    if n as u64 % blck != 0 {
        return Err(err!(
            InvalidArgument,
            "row width {n} is not a multiple of the {} block size {blck}",
            type_name(t)
        ));
    }
    usize::try_from(n as u64 / blck * ts).map_err(|_| err!(InvalidArgument, "row size overflows"))
}

/// `ggml_type_size(t)` (bytes per block) of a KV type; an error for any other type.
pub fn type_size(t: GgmlType) -> Result<usize> {
    if !is_kv_type(t) {
        return Err(err!(
            InvalidArgument,
            "{} is not a KV cache type",
            type_name(t)
        ));
    }
    // SAFETY: `t` is one of the valid ggml types checked above.
    Ok(unsafe { g::ggml_type_size(t) })
}

/// The CPU buffer type.
pub fn cpu_buffer_type() -> g::ggml_backend_buffer_type_t {
    // SAFETY: returns a static buffer type object.
    unsafe { g::ggml_backend_cpu_buffer_type() }
}

impl KvStorage {
    /// Allocates and zeroes the tensors described by `spec`.
    pub fn new(spec: StorageSpec) -> Result<Self> {
        Self::with_options(spec, StorageOptions::default())
    }

    /// [`KvStorage::new`] with a name tag, without memory, or with V padded wider.
    pub fn with_options(spec: StorageSpec, opts: StorageOptions) -> Result<Self> {
        if !is_kv_type(spec.type_k) || !is_kv_type(spec.type_v) {
            return Err(err!(
                InvalidArgument,
                "K/V types {}/{} are not KV cache types",
                type_name(spec.type_k),
                type_name(spec.type_v)
            ));
        }
        // SAFETY: valid ggml type.
        if spec.v_trans && !spec.is_mla && unsafe { g::ggml_is_quantized(spec.type_v) } {
            return Err(err!(
                InvalidArgument,
                "a quantized V ({}) cannot be stored transposed (llama.cpp requires flash attention)",
                type_name(spec.type_v)
            ));
        }
        if spec.size == 0 || spec.n_stream == 0 {
            return Err(err!(InvalidArgument, "size and n_stream must be > 0"));
        }
        let mut own: Vec<&LayerSpec> = Vec::new();
        let mut map_layer_ids = BTreeMap::new();
        for l in &spec.layers {
            if let Some(prev) = own.last() {
                if l.reuse.is_none() && l.il <= prev.il {
                    return Err(err!(InvalidArgument, "layers must have ascending il"));
                }
            }
            if map_layer_ids.contains_key(&l.il) {
                return Err(err!(InvalidArgument, "layer {} listed twice", l.il));
            }
            if l.reuse.is_none() {
                if l.n_embd_k_gqa == 0 || (!spec.is_mla && l.n_embd_v_gqa == 0) {
                    return Err(err!(
                        InvalidArgument,
                        "layer {} has an empty K or V row",
                        l.il
                    ));
                }
                row_size(spec.type_k, l.n_embd_k_gqa)?;
                if !spec.is_mla {
                    row_size(spec.type_v, l.n_embd_v_gqa)?;
                }
                map_layer_ids.insert(l.il, own.len());
                own.push(l);
            }
        }
        for l in spec.layers.iter().filter(|l| l.reuse.is_some()) {
            let src = l.reuse.unwrap_or_default();
            let idx = *map_layer_ids.get(&src).ok_or_else(|| {
                err!(
                    InvalidArgument,
                    "layer {} reuses layer {src}, which has no tensors",
                    l.il
                )
            })?;
            map_layer_ids.insert(l.il, idx);
        }
        let widest = own.iter().map(|l| l.n_embd_v_gqa).max().unwrap_or(0);
        let n_embd_v_gqa_max = if spec.v_trans && !spec.is_mla && opts.n_embd_v_gqa_max != 0 {
            if opts.n_embd_v_gqa_max < widest {
                return Err(err!(
                    InvalidArgument,
                    "n_embd_v_gqa_max {} is narrower than a layer's V row ({widest})",
                    opts.n_embd_v_gqa_max
                ));
            }
            opts.n_embd_v_gqa_max
        } else {
            widest
        };
        let e_v = |l: &LayerSpec| {
            if spec.v_trans {
                n_embd_v_gqa_max
            } else {
                l.n_embd_v_gqa
            }
        };
        // Reject sizes ggml could not represent before asking it for anything.
        for l in &own {
            for (t, w) in [(spec.type_k, l.n_embd_k_gqa), (spec.type_v, e_v(l))] {
                row_size(t, w)?
                    .checked_mul(spec.size as usize)
                    .and_then(|v| v.checked_mul(spec.n_stream as usize))
                    .filter(|&v| v <= isize::MAX as usize / 2)
                    .ok_or_else(|| err!(InvalidArgument, "layer {} tensors are too large", l.il))?;
            }
        }

        let mut st = KvStorage {
            layers: Vec::with_capacity(own.len()),
            map_layer_ids,
            n_embd_v_gqa_max,
            bufs: Buffers::new(opts.no_alloc),
            spec: spec.clone(),
        };
        // One context and one buffer per buffer type, as llama.cpp.
        let groups = group_by_buft(own.iter().copied(), |l| l.buft);
        let mut by_il: BTreeMap<u32, StorageLayer> = BTreeMap::new();
        for (buft, ls) in groups {
            let ctx = st.bufs.new_ctx(2 * ls.len())?;
            for l in ls {
                // SAFETY: ctx has room for two tensor headers per layer; the shapes were checked.
                let k = unsafe {
                    g::ggml_new_tensor_3d(
                        ctx,
                        spec.type_k,
                        l.n_embd_k_gqa as i64,
                        spec.size as i64,
                        spec.n_stream as i64,
                    )
                };
                set_name(k, &format!("cache_{}k_l{}", opts.name_tag, l.il));
                let v = if spec.is_mla {
                    std::ptr::null_mut()
                } else {
                    // SAFETY: as above.
                    let v = unsafe {
                        g::ggml_new_tensor_3d(
                            ctx,
                            spec.type_v,
                            e_v(l) as i64,
                            spec.size as i64,
                            spec.n_stream as i64,
                        )
                    };
                    set_name(v, &format!("cache_{}v_l{}", opts.name_tag, l.il));
                    v
                };
                by_il.insert(
                    l.il,
                    StorageLayer {
                        il: l.il,
                        k,
                        v,
                        n_embd_k_gqa: l.n_embd_k_gqa,
                        n_embd_v_gqa: if spec.is_mla { 0 } else { l.n_embd_v_gqa },
                    },
                );
            }
            st.bufs.alloc(ctx, buft, "KV")?;
        }
        st.layers = by_il.into_values().collect();
        Ok(st)
    }

    /// The description the storage was built from.
    pub fn spec(&self) -> &StorageSpec {
        &self.spec
    }

    /// The layers with their own tensors, ascending `il`.
    pub fn layers(&self) -> &[StorageLayer] {
        &self.layers
    }

    /// The layer (own or reused) holding model layer `il`'s tensors.
    pub fn layer(&self, il: u32) -> Option<&StorageLayer> {
        self.map_layer_ids.get(&il).map(|&i| &self.layers[i])
    }

    /// Largest V row width (`n_embd_v_gqa_max`).
    pub fn n_embd_v_gqa_max(&self) -> u32 {
        self.n_embd_v_gqa_max
    }

    /// True when every buffer is in host memory.
    pub fn is_host(&self) -> bool {
        self.bufs.host
    }

    /// Zeroes every buffer (`clear(data = true)`).
    pub fn clear(&mut self) {
        self.bufs.clear();
    }

    /// Bytes allocated per buffer type name (`memory_breakdown`).
    pub fn memory_breakdown(&self) -> Vec<(g::ggml_backend_buffer_type_t, usize)> {
        self.bufs.memory_breakdown()
    }

    /// Byte stride between the streams of `t`, one of this storage's tensors.
    pub fn stream_stride(&self, t: *mut g::ggml_tensor) -> Result<usize> {
        self.check(t, 0, 0)?;
        // SAFETY: `check` proved t is one of this storage's live tensors.
        Ok(unsafe { (*t).nb[2] })
    }

    /// Size in bytes of `t`, one of this storage's tensors.
    pub fn n_bytes(&self, t: *mut g::ggml_tensor) -> Result<usize> {
        self.check(t, 0, 0)?;
        // SAFETY: `check` proved t is one of this storage's live tensors.
        Ok(unsafe { g::ggml_nbytes(t) })
    }

    /// All bytes of tensor `t` when its buffer is in host memory (`None` otherwise, and for a
    /// `no_alloc` storage, whose [`KvStorage::get`] and [`KvStorage::set`] then fail), so bulk
    /// readers index one slice instead of checking every small copy.
    pub fn host_bytes(&self, t: *mut g::ggml_tensor) -> Result<Option<&[u8]>> {
        self.check(t, 0, 0)?;
        if !self.bufs.host {
            return Ok(None);
        }
        // SAFETY: `check` proved t is one of our live tensors; its data is host memory of
        // ggml_nbytes(t) bytes that lives as long as self, and &self excludes writers.
        Ok(Some(unsafe {
            std::slice::from_raw_parts((*t).data.cast::<u8>(), g::ggml_nbytes(t))
        }))
    }

    /// Mutable [`KvStorage::host_bytes`].
    pub fn host_bytes_mut(&mut self, t: *mut g::ggml_tensor) -> Result<Option<&mut [u8]>> {
        self.check(t, 0, 0)?;
        if !self.bufs.host {
            return Ok(None);
        }
        // SAFETY: as in host_bytes; &mut self gives exclusive access to the buffer, and the
        // tensors of a storage never overlap.
        Ok(Some(unsafe {
            std::slice::from_raw_parts_mut((*t).data.cast::<u8>(), g::ggml_nbytes(t))
        }))
    }

    /// Copies `dst.len()` bytes at `offset` of tensor `t` into `dst`.
    pub fn get(&self, t: *mut g::ggml_tensor, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(t, offset, dst.len())?;
        self.bufs.has_data()?;
        if dst.is_empty() {
            return Ok(());
        }
        if self.bufs.host {
            // SAFETY: `check` proved [offset, offset+len) lies inside t's data, which is host
            // memory; dst is a distinct Rust slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (*t).data.cast::<u8>().add(offset),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
        } else {
            // SAFETY: bounds checked above; ggml copies from the backend buffer.
            unsafe { g::ggml_backend_tensor_get(t, dst.as_mut_ptr().cast(), offset, dst.len()) };
        }
        Ok(())
    }

    /// Copies `src` to `offset` of tensor `t`.
    pub fn set(&mut self, t: *mut g::ggml_tensor, offset: usize, src: &[u8]) -> Result<()> {
        self.check(t, offset, src.len())?;
        self.bufs.has_data()?;
        if src.is_empty() {
            return Ok(());
        }
        if self.bufs.host {
            // SAFETY: as in `get`, with &mut self giving exclusive access to the buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    (*t).data.cast::<u8>().add(offset),
                    src.len(),
                )
            };
        } else {
            // SAFETY: bounds checked above.
            unsafe { g::ggml_backend_tensor_set(t, src.as_ptr().cast(), offset, src.len()) };
        }
        Ok(())
    }

    /// Copies `len` bytes at offset `src` of tensor `t` to offset `dst` of the same tensor (the
    /// ranges may overlap): in place for host memory, else through `tmp` and the backend
    /// (`ggml_backend_tensor_get`/`_set`).
    pub fn copy_within(
        &mut self,
        t: *mut g::ggml_tensor,
        src: usize,
        dst: usize,
        len: usize,
        tmp: &mut Vec<u8>,
    ) -> Result<()> {
        self.check(t, src, len)?;
        self.check(t, dst, len)?;
        if let Some(bytes) = self.host_bytes_mut(t)? {
            bytes.copy_within(src..src + len, dst);
            return Ok(());
        }
        // The caller reserves `tmp` before its first change: this resize does not allocate.
        tmp.resize(len, 0);
        self.get(t, src, tmp)?;
        self.set(t, dst, tmp)
    }

    /// Copies stream `src` of every layer onto stream `dst` (cross-stream `seq_cp` at update).
    pub fn copy_stream(&mut self, src: u32, dst: u32) -> Result<()> {
        if src >= self.spec.n_stream || dst >= self.spec.n_stream {
            return Err(err!(
                InvalidArgument,
                "stream copy {src} -> {dst} out of range"
            ));
        }
        if src == dst {
            return Ok(());
        }
        let tensors: Vec<_> = self
            .layers
            .iter()
            .flat_map(|l| [l.k, l.v])
            .filter(|t| !t.is_null())
            .collect();
        let mut tmp = Vec::new();
        for t in tensors {
            let stride = self.stream_stride(t)?;
            tmp.resize(stride, 0);
            self.get(t, src as usize * stride, &mut tmp)?;
            self.set(t, dst as usize * stride, &tmp)?;
        }
        Ok(())
    }

    fn check(&self, t: *mut g::ggml_tensor, offset: usize, len: usize) -> Result<()> {
        if !self
            .layers
            .iter()
            .any(|l| l.k == t || (l.v == t && !t.is_null()))
        {
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
}

pub(crate) fn set_name(t: *mut g::ggml_tensor, name: &str) {
    let c = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: t is a tensor just created in a live context; ggml copies the name (truncating).
    unsafe { g::ggml_set_name(t, c.as_ptr()) };
}

/// The ggml contexts (tensor headers) and backend buffers (tensor data) of a storage: one of
/// each per buffer type, as llama.cpp's memories allocate them, freed together.
#[derive(Debug)]
pub(crate) struct Buffers {
    ctxs: Vec<*mut g::ggml_context>,
    bufs: Vec<g::ggml_backend_buffer_t>,
    /// Every buffer is in host memory.
    pub(crate) host: bool,
    /// The buffers are zero-size placeholders ([`StorageOptions::no_alloc`]).
    pub(crate) no_alloc: bool,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers::new(false)
    }
}

// SAFETY: the contexts and buffers are owned by this value alone and ggml keeps no
// thread-local state about them; access stays exclusive (&mut) or shared-read (&).
unsafe impl Send for Buffers {}

impl Buffers {
    /// No contexts or buffers yet; `no_alloc`: see [`StorageOptions::no_alloc`].
    pub(crate) fn new(no_alloc: bool) -> Self {
        Buffers {
            ctxs: Vec::new(),
            bufs: Vec::new(),
            host: true,
            no_alloc,
        }
    }

    /// A metadata-only context with room for `n_tensors` headers, owned from now on.
    pub(crate) fn new_ctx(&mut self, n_tensors: usize) -> Result<*mut g::ggml_context> {
        // SAFETY: plain size query.
        let overhead = unsafe { g::ggml_tensor_overhead() };
        let params = g::ggml_init_params {
            mem_size: overhead * n_tensors,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: a metadata-only context of the size computed above.
        let ctx = unsafe { g::ggml_init(params) };
        if ctx.is_null() {
            return Err(err!(Unsupported, "ggml_init failed"));
        }
        self.ctxs.push(ctx);
        Ok(ctx)
    }

    /// Allocates the tensors of `ctx` (one of ours) in one buffer of `buft`, zeroed as
    /// llama.cpp does (no NaNs in the padding).
    pub(crate) fn alloc(
        &mut self,
        ctx: *mut g::ggml_context,
        buft: g::ggml_backend_buffer_type_t,
        what: &str,
    ) -> Result<()> {
        if self.no_alloc {
            // llama.cpp's no_alloc cache: a zero-size buffer of the right type that the tensors
            // point at (so a scheduler leaves them alone), their data left NULL.
            // SAFETY: buft is a valid buffer type; size 0 gives ggml's dummy buffer.
            let buf = unsafe { g::ggml_backend_buft_alloc_buffer(buft, 0) };
            if buf.is_null() {
                return Err(err!(Unsupported, "failed to create the {what} buffer"));
            }
            self.bufs.push(buf);
            // SAFETY: ctx is one of our live contexts; each tensor in it is ours, without data
            // or buffer yet, and buf outlives them (freed in Drop before the contexts).
            unsafe {
                let mut t = g::ggml_get_first_tensor(ctx);
                while !t.is_null() {
                    (*t).buffer = buf;
                    t = g::ggml_get_next_tensor(ctx, t);
                }
            }
            self.host = false;
            return Ok(());
        }
        // SAFETY: ctx is one of our contexts, holding only tensors without data; buft is a
        // valid buffer type.
        let buf = unsafe { g::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft) };
        if buf.is_null() {
            return Err(err!(Unsupported, "failed to allocate the {what} buffer"));
        }
        self.bufs.push(buf);
        // SAFETY: buf was just allocated and is owned by self.
        unsafe {
            g::ggml_backend_buffer_clear(buf, 0);
            self.host &= g::ggml_backend_buffer_is_host(buf);
        }
        Ok(())
    }

    /// Ok when the tensors have memory; the error a `no_alloc` storage gives any access to
    /// their bytes.
    pub(crate) fn has_data(&self) -> Result<()> {
        if self.no_alloc {
            return Err(err!(
                Unsupported,
                "this memory was created without allocating its tensors (no_alloc)"
            ));
        }
        Ok(())
    }

    /// Zeroes every buffer.
    pub(crate) fn clear(&self) {
        for &b in &self.bufs {
            // SAFETY: b is a live buffer owned by self.
            unsafe { g::ggml_backend_buffer_clear(b, 0) };
        }
    }

    /// Bytes allocated per buffer type (`memory_breakdown`).
    pub(crate) fn memory_breakdown(&self) -> Vec<(g::ggml_backend_buffer_type_t, usize)> {
        let mut out: Vec<(g::ggml_backend_buffer_type_t, usize)> = Vec::new();
        // One buffer per context, in the same order (new_ctx then alloc).
        for (&b, &ctx) in self.bufs.iter().zip(&self.ctxs) {
            // SAFETY: b is a live buffer owned by self, ctx the live context its tensors are
            // in; the size query allocates nothing.
            let (t, n) = unsafe {
                let t = g::ggml_backend_buffer_get_type(b);
                let n = if self.no_alloc {
                    // what an allocation would take, as llama.cpp's no_alloc breakdown
                    g::ggml_backend_alloc_ctx_tensors_from_buft_size(ctx, t)
                } else {
                    g::ggml_backend_buffer_get_size(b)
                };
                (t, n)
            };
            match out.iter_mut().find(|(bt, _)| *bt == t) {
                Some((_, v)) => *v += n,
                None => out.push((t, n)),
            }
        }
        out
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        for &b in &self.bufs {
            // SAFETY: each buffer is owned by self and freed once.
            unsafe { g::ggml_backend_buffer_free(b) };
        }
        for &c in &self.ctxs {
            // SAFETY: each context is owned by self and freed once, after its buffer.
            unsafe { g::ggml_free(c) };
        }
    }
}

/// Groups items by buffer type (NULL: the CPU one), in first-seen order: one ggml context and
/// one buffer per group, as llama.cpp's constructors make them.
pub(crate) fn group_by_buft<T>(
    items: impl IntoIterator<Item = T>,
    buft_of: impl Fn(&T) -> Buft,
) -> Vec<(g::ggml_backend_buffer_type_t, Vec<T>)> {
    let mut groups: Vec<(g::ggml_backend_buffer_type_t, Vec<T>)> = Vec::new();
    for it in items {
        let buft = buft_of(&it).as_raw();
        match groups.iter_mut().find(|(x, _)| *x == buft) {
            Some((_, v)) => v.push(it),
            None => groups.push((buft, vec![it])),
        }
    }
    groups
}
