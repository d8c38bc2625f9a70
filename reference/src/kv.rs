//! The stock `llama_kv_cache` behind the cache functions of `shim/kvref.h`: [`RefKv`], driven
//! operation by operation, its [`Params`], slots, cell tables and views, and the tiny `llama`
//! model ([`model_path`], [`model_path_ex`]).

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::raw::c_char;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use crate::{api, c_path, RawUbatch, UbatchRef, MAX_SEQ};
#[cfg(doc)]
use crate::{RefCtx, Ubatch};

pub(crate) type KvPtr = *mut c_void;

/// The resolved `kvref_*` functions of the standalone cache and the tiny `llama` model (part of
/// the crate's `Api`).
pub(crate) struct KvApi {
    default_params: unsafe extern "C" fn(*mut Params),
    write_model: unsafe extern "C" fn(*const c_char) -> bool,
    sanity_decode: unsafe extern "C" fn(*const c_char, u32) -> i32,
    new: unsafe extern "C" fn(*const c_char, *const Params) -> KvPtr,
    free: unsafe extern "C" fn(KvPtr),
    size: unsafe extern "C" fn(KvPtr) -> u32,
    n_stream: unsafe extern "C" fn(KvPtr) -> u32,
    n_embd_v_gqa_max: unsafe extern "C" fn(KvPtr) -> u32,
    clear: unsafe extern "C" fn(KvPtr, bool),
    seq_rm: unsafe extern "C" fn(KvPtr, i32, i32, i32) -> bool,
    seq_cp: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_keep: unsafe extern "C" fn(KvPtr, i32),
    seq_add: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_div: unsafe extern "C" fn(KvPtr, i32, i32, i32, i32),
    seq_pos_min: unsafe extern "C" fn(KvPtr, i32) -> i32,
    seq_pos_max: unsafe extern "C" fn(KvPtr, i32) -> i32,
    can_shift: unsafe extern "C" fn(KvPtr) -> bool,
    has_shift: unsafe extern "C" fn(KvPtr) -> bool,
    find_slot: unsafe extern "C" fn(KvPtr, *const RawUbatch, bool, *mut RawSlot) -> bool,
    apply_ubatch: unsafe extern "C" fn(KvPtr, *const RawSlot, *const RawUbatch),
    prepare: unsafe extern "C" fn(KvPtr, *const RawUbatch, u32, *mut RawSlot) -> bool,
    get_n_kv: unsafe extern "C" fn(KvPtr, *const RawSlot) -> u32,
    update: unsafe extern "C" fn(KvPtr) -> i32,
    cells: unsafe extern "C" fn(KvPtr, u32, *mut i32, *mut i32, *mut u64, *mut i32),
    stream_info:
        unsafe extern "C" fn(KvPtr, u32, *mut u32, *mut u32, *mut u32, *mut u32, *mut bool),
    pending_copies: unsafe extern "C" fn(KvPtr) -> u32,
    pending_copy_list: unsafe extern "C" fn(KvPtr, *mut u32, *mut u32, u32) -> u32,
    view: unsafe extern "C" fn(
        KvPtr,
        bool,
        i32,
        u32,
        u32,
        u32,
        *mut i64,
        *mut usize,
        *mut usize,
        *mut u8,
        usize,
    ) -> usize,
    kq_mask: unsafe extern "C" fn(KvPtr, *const RawUbatch, bool, bool, u32, u32, *mut c_void),
    k_idxs: unsafe extern "C" fn(KvPtr, *const RawUbatch, *const RawSlot, *mut i64),
    v_idxs: unsafe extern "C" fn(KvPtr, *const RawUbatch, *const RawSlot, *mut i64),
    k_shift: unsafe extern "C" fn(KvPtr, *mut i32),
    pos_bucket: unsafe extern "C" fn(KvPtr, *const RawUbatch, u32, *mut i32),
    get_prev_tokens: unsafe extern "C" fn(KvPtr, *const RawUbatch, u32, *mut i32),
    tensor_nbytes: unsafe extern "C" fn(KvPtr, bool, i32) -> usize,
    tensor_get: unsafe extern "C" fn(KvPtr, bool, i32, usize, *mut c_void, usize) -> bool,
    tensor_set: unsafe extern "C" fn(KvPtr, bool, i32, usize, *const c_void, usize) -> bool,
    state_write: unsafe extern "C" fn(KvPtr, i32, u32, *mut u8, usize) -> usize,
    state_read: unsafe extern "C" fn(KvPtr, i32, u32, *const u8, usize) -> usize,
    state_read_sinfo: unsafe extern "C" fn(
        KvPtr,
        i32,
        *const u8,
        usize,
        *const u32,
        *const u32,
        *mut u32,
        *mut u32,
    ) -> usize,
    state_clear: unsafe extern "C" fn(KvPtr, i32),
    write_model_ex: unsafe extern "C" fn(*const c_char, u32, u32, u32, u32) -> bool,
}

impl KvApi {
    pub(crate) fn load(lib: &libloading::os::unix::Library) -> Result<KvApi, libloading::Error> {
        Ok(resolve!(
            lib,
            "kvref_",
            KvApi {
                default_params,
                write_model,
                sanity_decode,
                new,
                free,
                size,
                n_stream,
                n_embd_v_gqa_max,
                clear,
                seq_rm,
                seq_cp,
                seq_keep,
                seq_add,
                seq_div,
                seq_pos_min,
                seq_pos_max,
                can_shift,
                has_shift,
                find_slot,
                apply_ubatch,
                prepare,
                get_n_kv,
                update,
                cells,
                stream_info,
                pending_copies,
                pending_copy_list,
                view,
                kq_mask,
                k_idxs,
                v_idxs,
                k_shift,
                pos_bucket,
                get_prev_tokens,
                tensor_nbytes,
                tensor_get,
                tensor_set,
                state_write,
                state_read,
                state_read_sinfo,
                state_clear,
                write_model_ex,
            }
        ))
    }
}

fn kv() -> &'static KvApi {
    &api().kv
}

/// Mirror of `kvref_slot`.
#[repr(C)]
#[derive(Debug, Clone)]
pub struct RawSlot {
    /// First stream of the slot.
    pub s0: u32,
    /// Last stream of the slot.
    pub s1: u32,
    /// Streams in the slot; 0 means "no slot".
    pub n_stream: u32,
    /// Tokens per stream.
    pub n_per_stream: u32,
    /// Stream of each slot stream.
    pub strm: [i32; MAX_SEQ],
    /// Caller-owned, `idxs_cap` elements: token `k*n_per_stream + i` → cell `idxs[k*n_per_stream + i]`.
    pub idxs: *mut u32,
    /// Capacity of `idxs` in elements.
    pub idxs_cap: u32,
}

/// Mirror of `kvref_params`: how to configure the stock cache. [`Params::default`] gives the
/// shim's defaults: 256 cells, 1 sequence, unified, no SWA, transposed V, f16/f16, no ALiBi.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Cells per stream.
    pub kv_size: u32,
    /// Sequences (and streams when not unified).
    pub n_seq_max: u32,
    /// One stream for all sequences.
    pub unified: bool,
    /// Sliding-window size.
    pub n_swa: u32,
    /// `llama_swa_type`: 0 none, 1 standard, 2 chunked, 3 symmetric.
    pub swa_type: i32,
    /// V stored transposed (flash attention off).
    pub v_trans: bool,
    /// `ggml_type` of K.
    pub type_k: i32,
    /// `ggml_type` of V.
    pub type_v: i32,
    /// Overrides `hparams.use_alibi` (mask values become `-|p0 - p1|`).
    pub use_alibi: bool,
    /// Pretend the model uses M-RoPE: 4 position sections, cell ext serialized, no K-shift.
    pub mrope: bool,
    /// `n_rel_attn_bkts` for position buckets; 0 keeps the model's.
    pub n_rel_attn_bkts: u32,
    /// `llama_non_causal_type` override; -1 keeps the model's.
    pub non_causal_type: i32,
    /// `hparams.ple_n_heads` override: > 0 makes the cells keep token ids (cell ext
    /// serialized) for n-gram inputs; 0 keeps the model's.
    pub ple_n_heads: u32,
    /// `hparams.ple_eos_token_id` (with `ple_n_heads`).
    pub ple_eos_token_id: u32,
    /// `hparams.ple_image_token_id` (with `ple_n_heads`).
    pub ple_image_token_id: u32,
}

impl Default for Params {
    fn default() -> Self {
        let mut p = Params {
            kv_size: 0,
            n_seq_max: 0,
            unified: false,
            n_swa: 0,
            swa_type: 0,
            v_trans: false,
            type_k: 0,
            type_v: 0,
            use_alibi: false,
            mrope: false,
            n_rel_attn_bkts: 0,
            non_causal_type: 0,
            ple_n_heads: 0,
            ple_eos_token_id: 0,
            ple_image_token_id: 0,
        };
        // SAFETY: `p` is a valid, writable kvref_params (same layout, checked at load).
        unsafe { (kv().default_params)(&mut p) };
        p
    }
}

/// `llama_swa_type` values.
pub mod swa_type {
    /// No sliding window.
    pub const NONE: i32 = 0;
    /// `p1 - p0 >= n_swa` is masked.
    pub const STANDARD: i32 = 1;
    /// Chunks of `n_swa` positions.
    pub const CHUNKED: i32 = 2;
    /// `|p1 - p0| > n_swa / 2` is masked.
    pub const SYMMETRIC: i32 = 3;
}

/// `llama_non_causal_type` values (how `causal = false` masks are built).
pub mod non_causal_type {
    /// All layers non-causal, SWA still applied.
    pub const ALL: i32 = 0;
    /// Only SWA caches become non-causal; dense caches stay causal.
    pub const SWA_ONLY: i32 = 1;
    /// Non-causal, and SWA not applied between tokens of the current ubatch.
    pub const SWA_FULL: i32 = 2;
}

/// `llama_memory_status`, as returned by [`RefKv::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryStatus {
    /// Something was applied.
    Success,
    /// Nothing to do.
    NoUpdate,
    /// `LLAMA_MEMORY_STATUS_FAILED_PREPARE`.
    FailedPrepare,
    /// `LLAMA_MEMORY_STATUS_FAILED_COMPUTE` (also: the helper context could not be created).
    FailedCompute,
}

impl MemoryStatus {
    pub(crate) fn from_raw(v: i32) -> MemoryStatus {
        match v {
            0 => MemoryStatus::Success,
            1 => MemoryStatus::NoUpdate,
            2 => MemoryStatus::FailedPrepare,
            _ => MemoryStatus::FailedCompute,
        }
    }
}

/// Where a ubatch goes: token `k*n_per_stream + i` → cell `idxs[k][i]` of stream `strm[k]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// First stream.
    pub s0: u32,
    /// Last stream.
    pub s1: u32,
    /// Stream of each slot stream.
    pub strm: Vec<i32>,
    /// Cell indices, one vector per slot stream.
    pub idxs: Vec<Vec<u32>>,
}

impl Slot {
    pub(crate) fn from_raw(raw: &RawSlot, flat: &[u32]) -> Slot {
        let ns = raw.n_stream as usize;
        let n = raw.n_per_stream as usize;
        Slot {
            s0: raw.s0,
            s1: raw.s1,
            strm: raw.strm[..ns].to_vec(),
            idxs: (0..ns).map(|k| flat[k * n..(k + 1) * n].to_vec()).collect(),
        }
    }

    /// The C view; `flat` must outlive its use.
    fn to_raw(&self, flat: &mut Vec<u32>) -> RawSlot {
        assert!(self.strm.len() <= MAX_SEQ && self.strm.len() == self.idxs.len());
        let n = self.idxs.first().map_or(0, Vec::len);
        assert!(
            self.idxs.iter().all(|v| v.len() == n),
            "every slot stream holds the same number of cells"
        );
        flat.clear();
        for v in &self.idxs {
            flat.extend_from_slice(v);
        }
        let mut strm = [0i32; MAX_SEQ];
        strm[..self.strm.len()].copy_from_slice(&self.strm);
        RawSlot {
            s0: self.s0,
            s1: self.s1,
            n_stream: self.strm.len() as u32,
            n_per_stream: n as u32,
            strm,
            idxs: flat.as_mut_ptr(),
            idxs_cap: flat.len() as u32,
        }
    }
}

pub(crate) fn empty_raw_slot(idxs: &mut [u32]) -> RawSlot {
    RawSlot {
        s0: 0,
        s1: 0,
        n_stream: 0,
        n_per_stream: 0,
        strm: [0; MAX_SEQ],
        idxs: idxs.as_mut_ptr(),
        idxs_cap: u32::try_from(idxs.len()).expect("slot too large"),
    }
}

/// The cell table of one stream (`kv_size` entries each), read from the stock cells' arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cells {
    /// Position, -1 for an empty cell.
    pub pos: Vec<i32>,
    /// Pending K-shift delta.
    pub shift: Vec<i32>,
    /// Sequence bitset: bit `s` of word `s / 64`.
    pub seq: Vec<[u64; 4]>,
    /// `[x, y, tok]` (M-RoPE 2-D position and token id); may be stale for empty cells.
    pub ext: Vec<[i32; 3]>,
}

impl Cells {
    /// Whether cell `i` holds sequence `s`.
    pub fn has_seq(&self, i: usize, s: i32) -> bool {
        let s = s as usize;
        self.seq[i][s / 64] >> (s % 64) & 1 == 1
    }

    /// The sequences of cell `i`, ascending.
    pub fn seqs(&self, i: usize) -> Vec<i32> {
        (0..MAX_SEQ as i32)
            .filter(|&s| self.has_seq(i, s))
            .collect()
    }
}

/// A stock graph view of a layer's K or V ([`RefKv::view`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// `ne` of the view.
    pub ne: [i64; 4],
    /// `nb` (byte strides) of the view.
    pub nb: [usize; 4],
    /// Byte offset of the view into the layer tensor (`view_offs`).
    pub offs: usize,
    /// The bytes the view sees, row by row (`ne[0]` elements per row, rows in `ne` order).
    pub data: Vec<u8>,
}

/// Search head and usage of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// Where the next slot search starts.
    pub head: u32,
    /// Used (non-empty) cells.
    pub used: u32,
    /// Smallest used index, 0 if none.
    pub used_min: u32,
    /// Largest used index + 1, 0 if none.
    pub used_max_p1: u32,
    /// Some cell has a pending K-shift.
    pub has_shift: bool,
}

/// Writes the tiny random-weight `llama` GGUF (2 layers, n_embd 64, 4 heads, 2 KV heads,
/// head size 16, vocabulary 32, F32 weights from a fixed seed) to `path`.
pub fn write_model(path: &Path) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (kv().write_model)(p.as_ptr()) }
}

/// Path of the tiny model, written once per process into the temp directory.
///
/// Every process writes the (deterministic) file under a private name and renames it over
/// the shared one, so concurrent test processes never see a partial file.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir();
        let path = dir.join("kvref-llama-tiny-v1.gguf");
        let tmp = dir.join(format!("kvref-llama-tiny-v1.gguf.{}", std::process::id()));
        assert!(
            write_model(&tmp),
            "cannot write the tiny model to {}",
            tmp.display()
        );
        std::fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), path.display()));
        path
    })
    .clone()
}

/// Writes a tiny random-weight `llama` GGUF of the given shape to `path`: `n_layer` layers,
/// width `n_embd`, `n_head` query heads of size `n_embd / n_head` (must divide exactly and be
/// even), `n_head_kv` KV heads (must divide `n_head`), feed-forward width `2 * n_embd`,
/// vocabulary 32, F32 weights from the fixed seed of [`write_model`], whose file is
/// `write_model_ex(path, 2, 64, 4, 2)` byte for byte. `false` for an invalid shape or a failed
/// write.
pub fn write_model_ex(path: &Path, n_layer: u32, n_embd: u32, n_head: u32, n_head_kv: u32) -> bool {
    let p = c_path(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (kv().write_model_ex)(p.as_ptr(), n_layer, n_embd, n_head, n_head_kv) }
}

/// Path of a tiny model of the given shape (see [`write_model_ex`]), written once per process
/// and shape into the temp directory the way [`model_path`] writes its file; the default shape
/// `(2, 64, 4, 2)` returns [`model_path`] itself. Panics on an invalid shape.
pub fn model_path_ex(n_layer: u32, n_embd: u32, n_head: u32, n_head_kv: u32) -> PathBuf {
    if (n_layer, n_embd, n_head, n_head_kv) == (2, 64, 4, 2) {
        return model_path();
    }
    static PATHS: OnceLock<Mutex<HashMap<[u32; 4], PathBuf>>> = OnceLock::new();
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    paths
        .entry([n_layer, n_embd, n_head, n_head_kv])
        .or_insert_with(|| {
            let dir = std::env::temp_dir();
            let name = format!("kvref-llama-l{n_layer}-e{n_embd}-h{n_head}-kv{n_head_kv}-v1.gguf");
            let path = dir.join(&name);
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            assert!(
                write_model_ex(&tmp, n_layer, n_embd, n_head, n_head_kv),
                "cannot write the model ({n_layer}, {n_embd}, {n_head}, {n_head_kv}) to {}",
                tmp.display()
            );
            std::fs::rename(&tmp, &path).unwrap_or_else(|e| {
                panic!("cannot move {} to {}: {e}", tmp.display(), path.display())
            });
            path
        })
        .clone()
}

/// Loads `model` (cached per path) and runs `llama_decode` of `n_tokens` tokens on a fresh
/// context: 0 on success, else `llama_decode`'s code or the shim's negative failure codes
/// (-100 load, -101 context, -102 non-finite logits, -103 no logits, -104 wrong seq_pos_max).
pub fn sanity_decode(model: &Path, n_tokens: u32) -> i32 {
    let p = c_path(model);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    unsafe { (kv().sanity_decode)(p.as_ptr(), n_tokens) }
}

/// A stock `llama_kv_cache` (with its own copy of the model's hparams, overridden by
/// [`Params`]). Freed on drop.
///
/// A `RefKv` can also be a borrowed view of a part of a stock composite memory (see
/// [`crate::RefComposite::part_kv`]): then it never frees the shim object, which its composite
/// owns, and it is only handed out behind a guard that borrows the composite.
#[derive(Debug)]
pub struct RefKv {
    ptr: KvPtr,
    params: Params,
    /// Whether `ptr` came from `kvref_new` (freed on drop) rather than a composite's view.
    owned: bool,
}

// SAFETY: the cache is a plain heap object with no thread affinity; &mut self methods are the
// only mutators and &self methods only read it.
unsafe impl Send for RefKv {}

impl Drop for RefKv {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: `ptr` came from kvref_new and is freed exactly once.
            unsafe { (kv().free)(self.ptr) }
        }
    }
}

impl RefKv {
    /// Creates a stock cache over the model at `model` (loaded once per path per process).
    /// `None` if the model cannot be loaded or the cache constructor throws.
    pub fn new(model: &Path, params: &Params) -> Option<RefKv> {
        let p = c_path(model);
        // SAFETY: both pointers are valid for the call; the shim copies what it keeps.
        let ptr = unsafe { (kv().new)(p.as_ptr(), params) };
        (!ptr.is_null()).then_some(RefKv {
            ptr,
            params: *params,
            owned: true,
        })
    }

    /// A non-owning `RefKv` over a view that a composite owns (`cmpref_kv_part`).
    ///
    /// # Safety
    ///
    /// `ptr` must be a live kvref view that outlives the returned value, and the value must not
    /// be handed out in a way that lets it escape that lifetime (the composite wrappers keep it
    /// behind guards that borrow the composite and never give out `&mut RefKv`).
    pub(crate) unsafe fn borrowed(ptr: KvPtr, params: Params) -> RefKv {
        RefKv {
            ptr,
            params,
            owned: false,
        }
    }

    /// The parameters the cache was created with.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// [`RefKv::new`] over the tiny model of [`model_path`].
    pub fn tiny(params: &Params) -> RefKv {
        RefKv::new(&model_path(), params).expect("the stock cache could not be created")
    }

    forward! {
        kv();

        /// Cells per stream (`get_size`).
        fn size(&self) -> u32;

        /// Number of streams.
        fn n_stream(&self) -> u32;

        /// `hparams.n_embd_v_gqa_max()`: the V row width, and the V-index stride when transposed.
        fn n_embd_v_gqa_max(&self) -> u32;

        /// `clear(data)`.
        fn clear(&mut self, data: bool);

        /// `seq_rm(seq, p0, p1)`.
        fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool;

        /// `seq_cp(src, dst, p0, p1)`.
        fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32);

        /// `seq_keep(seq)`.
        fn seq_keep(&mut self, seq: i32);

        /// `seq_add(seq, p0, p1, delta)`.
        fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32);

        /// `seq_div(seq, p0, p1, d)`.
        fn seq_div(&mut self, seq: i32, p0: i32, p1: i32, d: i32);

        /// `seq_pos_min(seq)`, -1 if the sequence is empty.
        fn seq_pos_min(&self, seq: i32) -> i32;

        /// `seq_pos_max(seq)`, -1 if the sequence is empty.
        fn seq_pos_max(&self, seq: i32) -> i32;

        /// `get_can_shift()`.
        fn can_shift(&self) -> bool;

        /// `get_has_shift()`.
        fn has_shift(&self) -> bool;
    }

    /// `find_slot(ubatch, cont)`; `None` when the stock search finds no slot.
    pub fn find_slot(&self, ub: &UbatchRef<'_>, cont: bool) -> Option<Slot> {
        let mut flat = vec![0u32; ub.n_tokens() as usize];
        let mut raw = empty_raw_slot(&mut flat);
        // SAFETY: `ub.raw` points into live arrays of the borrowed Ubatch; `raw.idxs` has
        // `idxs_cap` writable elements (a slot places every token, so n_tokens suffice).
        let ok = unsafe { (kv().find_slot)(self.ptr, &ub.raw, cont, &mut raw) };
        ok.then(|| Slot::from_raw(&raw, &flat))
    }

    /// `apply_ubatch(slot, ubatch)`.
    pub fn apply_ubatch(&mut self, slot: &Slot, ub: &UbatchRef<'_>) {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        // SAFETY: both views point into arrays alive for the call.
        unsafe { (kv().apply_ubatch)(self.ptr, &raw, &ub.raw) }
    }

    /// `prepare(ubatches)`: the slots each ubatch would get (the cells are rolled back as the
    /// stock code does); `None` if one does not fit.
    pub fn prepare(&mut self, ubs: &[UbatchRef<'_>]) -> Option<Vec<Slot>> {
        assert!(
            !ubs.is_empty(),
            "the stock prepare aborts on an empty ubatch list"
        );
        let raws: Vec<RawUbatch> = ubs.iter().map(|u| u.raw).collect();
        let mut flats: Vec<Vec<u32>> = ubs
            .iter()
            .map(|u| vec![0u32; u.n_tokens() as usize])
            .collect();
        let mut slots: Vec<RawSlot> = flats.iter_mut().map(|f| empty_raw_slot(f)).collect();
        // SAFETY: `raws` copies views whose arrays are borrowed for the call; each slot's
        // `idxs` points into its own `flats` entry, sized to its ubatch.
        let ok = unsafe {
            (kv().prepare)(
                self.ptr,
                raws.as_ptr(),
                raws.len() as u32,
                slots.as_mut_ptr(),
            )
        };
        ok.then(|| {
            slots
                .iter()
                .zip(&flats)
                .map(|(s, f)| Slot::from_raw(s, f))
                .collect()
        })
    }

    /// `get_n_kv(slot)`: the attended cell count for a graph over this slot.
    pub fn get_n_kv(&self, slot: &Slot) -> u32 {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        // SAFETY: `raw` points into `flat`, alive for the call.
        unsafe { (kv().get_n_kv)(self.ptr, &raw) }
    }

    /// `init_update(lctx, false)` then `apply()`: pending stream copies and K-shift.
    pub fn update(&mut self) -> MemoryStatus {
        // SAFETY: `self.ptr` is the live kvref this value owns.
        MemoryStatus::from_raw(unsafe { (kv().update)(self.ptr) })
    }

    /// The cell table of `stream`.
    pub fn cells(&self, stream: u32) -> Cells {
        assert!(stream < self.n_stream(), "no stream {stream}");
        let n = self.size() as usize;
        let mut pos = vec![0i32; n];
        let mut shift = vec![0i32; n];
        let mut seq = vec![[0u64; 4]; n];
        let mut ext = vec![[0i32; 3]; n];
        // SAFETY: every array holds `size` cells of the layout the shim writes.
        unsafe {
            (kv().cells)(
                self.ptr,
                stream,
                pos.as_mut_ptr(),
                shift.as_mut_ptr(),
                seq.as_mut_ptr().cast(),
                ext.as_mut_ptr().cast(),
            )
        };
        Cells {
            pos,
            shift,
            seq,
            ext,
        }
    }

    /// Head, usage and shift flag of `stream`.
    pub fn stream_info(&self, stream: u32) -> StreamInfo {
        assert!(stream < self.n_stream(), "no stream {stream}");
        let mut i = StreamInfo {
            head: 0,
            used: 0,
            used_min: 0,
            used_max_p1: 0,
            has_shift: false,
        };
        // SAFETY: every pointer is a valid, writable field of `i`.
        unsafe {
            (kv().stream_info)(
                self.ptr,
                stream,
                &mut i.head,
                &mut i.used,
                &mut i.used_min,
                &mut i.used_max_p1,
                &mut i.has_shift,
            )
        };
        i
    }

    /// Number of stream copies waiting for the next [`RefKv::update`].
    pub fn pending_copies(&self) -> u32 {
        // SAFETY: `ptr` is the live kvref this value owns.
        unsafe { (kv().pending_copies)(self.ptr) }
    }

    /// The pending stream copies as `(source, destination)` streams, in the order
    /// [`RefKv::update`] applies them.
    pub fn pending_copy_list(&self) -> Vec<(u32, u32)> {
        let n = self.pending_copies();
        let (mut src, mut dst) = (vec![0u32; n as usize], vec![0u32; n as usize]);
        // SAFETY: both arrays hold `n` writable elements, the capacity passed.
        let got =
            unsafe { (kv().pending_copy_list)(self.ptr, src.as_mut_ptr(), dst.as_mut_ptr(), n) };
        assert_eq!(got, n, "pending copies changed between the two calls");
        src.into_iter().zip(dst).collect()
    }

    fn check_mask(&self, ub: &UbatchRef<'_>, n_kv: u32, n_stream_m: u32, len: usize) {
        assert!(n_kv <= self.size(), "n_kv {n_kv} exceeds the cache size");
        assert!(
            n_stream_m > 0 && ub.n_tokens() % n_stream_m == 0,
            "n_tokens must split into n_stream_m streams"
        );
        assert_eq!(
            len,
            n_kv as usize * ub.n_tokens() as usize,
            "mask buffer must hold n_kv * n_tokens entries"
        );
    }

    /// The F32 KQ mask `[n_kv, n_tokens / n_stream_m, 1, n_stream_m]` into `out`, without
    /// allocating (for benchmark loops).
    pub fn kq_mask_f32_into(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        out: &mut [f32],
    ) {
        self.check_mask(ub, n_kv, n_stream_m, out.len());
        // SAFETY: `out` holds n_kv * n_tokens floats, exactly what the stock code writes.
        unsafe {
            (kv().kq_mask)(
                self.ptr,
                &ub.raw,
                causal,
                false,
                n_kv,
                n_stream_m,
                out.as_mut_ptr().cast(),
            )
        }
    }

    /// The F32 KQ mask as `set_input_kq_mask` writes it (0.0, -inf, or -|Δpos| with ALiBi).
    pub fn kq_mask_f32(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n_kv as usize * ub.n_tokens() as usize];
        self.kq_mask_f32_into(ub, causal, n_kv, n_stream_m, &mut out);
        out
    }

    /// The F16 KQ mask (raw IEEE half bits) into `out`, without allocating.
    pub fn kq_mask_f16_into(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
        out: &mut [u16],
    ) {
        self.check_mask(ub, n_kv, n_stream_m, out.len());
        // SAFETY: `out` holds n_kv * n_tokens halves, exactly what the stock code writes.
        unsafe {
            (kv().kq_mask)(
                self.ptr,
                &ub.raw,
                causal,
                true,
                n_kv,
                n_stream_m,
                out.as_mut_ptr().cast(),
            )
        }
    }

    /// The F16 KQ mask as raw IEEE half bits (flash-attention layout).
    pub fn kq_mask_f16(
        &self,
        ub: &UbatchRef<'_>,
        causal: bool,
        n_kv: u32,
        n_stream_m: u32,
    ) -> Vec<u16> {
        let mut out = vec![0u16; n_kv as usize * ub.n_tokens() as usize];
        self.kq_mask_f16_into(ub, causal, n_kv, n_stream_m, &mut out);
        out
    }

    /// `set_input_k_idxs`: global K row of each token.
    pub fn k_idxs(&self, ub: &UbatchRef<'_>, slot: &Slot) -> Vec<i64> {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        assert_eq!(
            flat.len(),
            ub.n_tokens() as usize,
            "the slot must place every token of the ubatch"
        );
        let mut out = vec![0i64; ub.n_tokens() as usize];
        // SAFETY: `out` holds n_tokens entries; the views are alive for the call.
        unsafe { (kv().k_idxs)(self.ptr, &ub.raw, &raw, out.as_mut_ptr()) };
        out
    }

    /// `set_input_v_idxs`: one index per token, or per scalar (`n_tokens * n_embd_v_gqa_max`)
    /// when V is transposed.
    pub fn v_idxs(&self, ub: &UbatchRef<'_>, slot: &Slot) -> Vec<i64> {
        let mut flat = Vec::new();
        let raw = slot.to_raw(&mut flat);
        assert_eq!(
            flat.len(),
            ub.n_tokens() as usize,
            "the slot must place every token of the ubatch"
        );
        let per_token = if self.params.v_trans {
            self.n_embd_v_gqa_max() as usize
        } else {
            1
        };
        let mut out = vec![0i64; ub.n_tokens() as usize * per_token];
        // SAFETY: `out` is sized for the cache's V layout, which the creation params fix.
        unsafe { (kv().v_idxs)(self.ptr, &ub.raw, &raw, out.as_mut_ptr()) };
        out
    }

    /// `set_input_k_shift`: `size * n_stream` deltas (0 for empty cells).
    pub fn k_shift(&self) -> Vec<i32> {
        let mut out = vec![0i32; self.size() as usize * self.n_stream() as usize];
        // SAFETY: `out` holds size * n_stream entries.
        unsafe { (kv().k_shift)(self.ptr, out.as_mut_ptr()) };
        out
    }

    /// `set_input_pos_bucket`: `[n_kv, n_tokens]` relative-position buckets (single stream,
    /// ubatch not from an equal split).
    pub fn pos_bucket(&self, ub: &UbatchRef<'_>, n_kv: u32) -> Vec<i32> {
        assert!(n_kv <= self.size(), "n_kv {n_kv} exceeds the cache size");
        let mut out = vec![0i32; n_kv as usize * ub.n_tokens() as usize];
        // SAFETY: `out` holds n_kv * n_tokens entries.
        unsafe { (kv().pos_bucket)(self.ptr, &ub.raw, n_kv, out.as_mut_ptr()) };
        out
    }

    /// `get_prev_tokens(ub, n)`: for each token, the `n` tokens before it in its sequence,
    /// oldest first (`LLAMA_TOKEN_NULL` where there is none).
    pub fn get_prev_tokens(&self, ub: &UbatchRef<'_>, n: u32) -> Vec<i32> {
        let mut out = vec![0i32; n as usize * ub.n_tokens() as usize];
        // SAFETY: `out` holds n_tokens * n entries, what the shim writes.
        unsafe { (kv().get_prev_tokens)(self.ptr, &ub.raw, n, out.as_mut_ptr()) };
        out
    }

    /// `state_read_sinfo(seq)`: restores `buf`, into the cells of `slots_in` per stream when
    /// given (a mirrored cache), and returns where each stream's cells went, or `None` when
    /// the restore failed (stock's exception caught; its effect stays).
    pub fn state_read_sinfo(
        &mut self,
        seq: i32,
        buf: &[u8],
        slots_in: Option<&[Vec<u32>]>,
    ) -> Option<Vec<Vec<u32>>> {
        let n_stream = self.n_stream() as usize;
        let counts: Vec<u32> = slots_in
            .map(|v| v.iter().map(|c| c.len() as u32).collect())
            .unwrap_or_default();
        let cells: Vec<u32> = slots_in.map(|v| v.concat()).unwrap_or_default();
        if slots_in.is_some_and(|v| v.len() != n_stream) {
            return None;
        }
        let mut counts_out = vec![0u32; n_stream];
        let mut cells_out = vec![0u32; self.size() as usize * n_stream];
        // SAFETY: buf is valid for its length; counts/cells hold what counts says (n_stream
        // counts); the outputs hold n_stream counts and size * n_stream cells.
        let n = unsafe {
            (kv().state_read_sinfo)(
                self.ptr,
                seq,
                buf.as_ptr(),
                buf.len(),
                if slots_in.is_some() {
                    counts.as_ptr()
                } else {
                    std::ptr::null()
                },
                cells.as_ptr(),
                counts_out.as_mut_ptr(),
                cells_out.as_mut_ptr(),
            )
        };
        if n == 0 {
            return None;
        }
        let mut at = 0;
        Some(
            counts_out
                .iter()
                .map(|&c| {
                    let v = cells_out[at..at + c as usize].to_vec();
                    at += c as usize;
                    v
                })
                .collect(),
        )
    }

    /// Size in bytes of `state_write(seq, flags)` (`seq = -1`: whole cache).
    pub fn state_size(&self, seq: i32, flags: u32) -> usize {
        // SAFETY: a null buffer asks for the size only.
        unsafe { (kv().state_write)(self.ptr, seq, flags, ptr::null_mut(), 0) }
    }

    /// The stock graph view `get_k` (`v == false`) or `get_v` of layer `il` over `n_kv` cells
    /// of streams `s0..=s1`: `None` for invalid arguments.
    pub fn view(&self, v: bool, il: i32, n_kv: u32, s0: u32, s1: u32) -> Option<View> {
        let mut out = View::default();
        let call = |out: &mut View, data: &mut [u8]| {
            // SAFETY: every pointer is valid for the call; `data` is writable for its length,
            // which the shim respects.
            unsafe {
                (kv().view)(
                    self.ptr,
                    v,
                    il,
                    n_kv,
                    s0,
                    s1,
                    out.ne.as_mut_ptr(),
                    out.nb.as_mut_ptr(),
                    &mut out.offs,
                    data.as_mut_ptr(),
                    data.len(),
                )
            }
        };
        let n = call(&mut out, &mut []);
        if n == 0 {
            return None;
        }
        let mut data = vec![0u8; n];
        assert_eq!(call(&mut out, &mut data), n);
        out.data = data;
        Some(out)
    }

    /// All bytes of the K (`v == false`) or V tensor of layer `il` (every stream); `None` when
    /// the cache holds no such tensor.
    pub fn tensor_bytes(&self, v: bool, il: i32) -> Option<Vec<u8>> {
        // SAFETY: `self.ptr` is the live kvref this value owns.
        let n = unsafe { (kv().tensor_nbytes)(self.ptr, v, il) };
        if n == 0 {
            return None;
        }
        let mut out = vec![0u8; n];
        // SAFETY: `out` is writable for n bytes, the tensor's size.
        let ok = unsafe { (kv().tensor_get)(self.ptr, v, il, 0, out.as_mut_ptr().cast(), n) };
        ok.then_some(out)
    }

    /// Overwrites all bytes of the K (`v == false`) or V tensor of layer `il`; false when the
    /// cache holds no such tensor or `data` is not its size.
    pub fn set_tensor_bytes(&mut self, v: bool, il: i32, data: &[u8]) -> bool {
        // SAFETY: `self.ptr` is the live kvref this value owns.
        let n = unsafe { (kv().tensor_nbytes)(self.ptr, v, il) };
        if n == 0 || n != data.len() {
            return false;
        }
        // SAFETY: `data` is readable for n bytes, the tensor's size.
        unsafe { (kv().tensor_set)(self.ptr, v, il, 0, data.as_ptr().cast(), n) }
    }

    /// `state_write(seq, flags)` (`seq = -1`: whole cache).
    pub fn state_write(&self, seq: i32, flags: u32) -> Vec<u8> {
        let mut buf = vec![0u8; self.state_size(seq, flags)];
        // SAFETY: `buf` is writable for its length, which the shim respects.
        let n = unsafe { (kv().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, buf.len(), "state size changed between the two calls");
        buf
    }

    /// `state_write(seq, flags)` into a caller buffer (no allocation): bytes written, 0 if it
    /// does not fit.
    pub fn state_write_into(&self, seq: i32, flags: u32, buf: &mut [u8]) -> usize {
        // SAFETY: `buf` is writable for its length, which the shim respects.
        unsafe { (kv().state_write)(self.ptr, seq, flags, buf.as_mut_ptr(), buf.len()) }
    }

    /// `state_read(seq, flags)` from `buf`: bytes consumed, or `None` when the stock code threw.
    pub fn state_read(&mut self, seq: i32, flags: u32, buf: &[u8]) -> Option<usize> {
        // SAFETY: `buf` is readable for its length, which the shim respects.
        let n = unsafe { (kv().state_read)(self.ptr, seq, flags, buf.as_ptr(), buf.len()) };
        (n != 0).then_some(n)
    }

    /// `state_clear(seq)`: `clear(true)` for -1, else `seq_rm(seq)` and the K/V rows of the
    /// cells `seq` held alone zeroed. `seq` must be -1 or below `n_seq_max` (stock asserts).
    pub fn state_clear(&mut self, seq: i32) {
        // SAFETY: `ptr` is the live kvref this value owns; the shim forwards to the stock method.
        unsafe { (kv().state_clear)(self.ptr, seq) }
    }
}
