//! [`RefDefrag`]: the KV-cache defragmentation of the last llama.cpp that had it (the tree of
//! `llama-cpp-sys-2` 0.1.121, built into `libdfref.so`, shim `shim/dfref.cpp`), for the
//! differential test of this library's plan. A separate library from `libkvref.so` (another
//! llama.cpp, another ggml), loaded the same way (`RTLD_LOCAL`, only `dfref_*` exported).

use std::path::Path;
use std::ptr;
use std::sync::OnceLock;

use crate::c_path;

/// Path of the defragmentation reference, fixed by the build script.
pub const DFREF_LIB: &str = env!("DFREF_LIB");

#[repr(C)]
struct RawDfref {
    _private: [u8; 0],
}

struct DfApi {
    _lib: libloading::os::unix::Library,
    f: DfFns,
}

struct DfFns {
    new: unsafe extern "C" fn(*const std::ffi::c_char, u32) -> *mut RawDfref,
    free: unsafe extern "C" fn(*mut RawDfref),
    n_layer: unsafe extern "C" fn(*const RawDfref) -> u32,
    set_cells: unsafe extern "C" fn(*mut RawDfref, *const i32, *const u64, u32) -> bool,
    plan: unsafe extern "C" fn(*mut RawDfref, i32, *mut u32, u32) -> u32,
    apply: unsafe extern "C" fn(*mut RawDfref, *const u32, u32) -> bool,
    get_cells:
        unsafe extern "C" fn(*const RawDfref, *mut i32, *mut i32, *mut u64, u32, *mut u32) -> bool,
}

fn api() -> &'static DfFns {
    &table().f
}

fn table() -> &'static DfApi {
    static API: OnceLock<DfApi> = OnceLock::new();
    API.get_or_init(|| {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        let load = || -> Result<DfApi, libloading::Error> {
            // SAFETY: as for libkvref.so (lib.rs `load`): only libstdc++ and the static
            // llama.cpp/ggml initialisers run, and RTLD_LOCAL keeps the symbols private.
            let lib = unsafe { Library::open(Some(DFREF_LIB), RTLD_NOW | RTLD_LOCAL)? };
            let f = resolve!(
                lib,
                "dfref_",
                DfFns {
                    new,
                    free,
                    n_layer,
                    set_cells,
                    plan,
                    apply,
                    get_cells
                }
            );
            Ok(DfApi { _lib: lib, f })
        };
        load().unwrap_or_else(|e| panic!("cannot load {DFREF_LIB}: {e}"))
    })
}

/// One cell as the reference reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DfCell {
    /// Position, -1 for an empty cell.
    pub pos: i32,
    /// Pending shift.
    pub shift: i32,
    /// Sequence ids 0..63 as bits.
    pub seq_mask: u64,
}

/// A single-stream `llama_kv_cache_unified` of the defragmenting llama.cpp over a model file
/// (a tiny `llama` model of [`crate::model_path_ex`] loads), with its cell table set directly.
pub struct RefDefrag {
    ptr: *mut RawDfref,
    size: u32,
}

impl RefDefrag {
    /// A cache of `size` cells over the model at `model_path`; `None` when loading fails.
    pub fn new(model_path: &Path, size: u32) -> Option<RefDefrag> {
        let path = c_path(model_path);
        // SAFETY: path is a NUL-terminated string that outlives the call.
        let ptr = unsafe { (api().new)(path.as_ptr(), size) };
        (!ptr.is_null()).then_some(RefDefrag { ptr, size })
    }

    /// The cache's layers.
    pub fn n_layer(&self) -> u32 {
        // SAFETY: ptr is the live object this wrapper owns.
        unsafe { (api().n_layer)(self.ptr) }
    }

    /// Empties the cache and gives cell `i` position `pos[i]` (-1: empty) and the sequences of
    /// `seq_mask[i]`. Panics on a length mismatch or a rejected table.
    pub fn set_cells(&mut self, pos: &[i32], seq_mask: &[u64]) {
        assert_eq!(pos.len(), seq_mask.len());
        // SAFETY: both slices hold pos.len() elements and outlive the call.
        let ok = unsafe {
            (api().set_cells)(self.ptr, pos.as_ptr(), seq_mask.as_ptr(), pos.len() as u32)
        };
        assert!(ok, "dfref_set_cells refused the table");
    }

    /// `defrag_prepare(n_max_nodes)`: the destination of each cell below the extent, `None`
    /// when nothing moves.
    pub fn plan(&mut self, n_max_nodes: i32) -> Option<Vec<u32>> {
        let mut ids = vec![0u32; self.size as usize];
        // SAFETY: ids has room for `size` entries, the most a plan has.
        let n = unsafe { (api().plan)(self.ptr, n_max_nodes, ids.as_mut_ptr(), self.size) };
        assert_ne!(n, u32::MAX, "dfref_plan failed");
        ids.truncate(n as usize);
        (n > 0).then_some(ids)
    }

    /// Applies a plan to the cells as the old `update` did.
    pub fn apply(&mut self, ids: &[u32]) {
        // SAFETY: ids holds ids.len() entries and outlives the call.
        let ok = unsafe { (api().apply)(self.ptr, ids.as_ptr(), ids.len() as u32) };
        assert!(ok, "dfref_apply failed");
    }

    /// The cell table and the head.
    pub fn cells(&self) -> (Vec<DfCell>, u32) {
        let n = self.size as usize;
        let (mut pos, mut shift, mut mask) = (vec![0; n], vec![0; n], vec![0u64; n]);
        let mut head = 0;
        // SAFETY: every buffer holds `size` entries; head is a valid u32.
        let ok = unsafe {
            (api().get_cells)(
                self.ptr,
                pos.as_mut_ptr(),
                shift.as_mut_ptr(),
                mask.as_mut_ptr(),
                self.size,
                &mut head,
            )
        };
        assert!(ok, "dfref_get_cells failed");
        let cells = (0..n)
            .map(|i| DfCell {
                pos: pos[i],
                shift: shift[i],
                seq_mask: mask[i],
            })
            .collect();
        (cells, head)
    }
}

impl Drop for RefDefrag {
    fn drop(&mut self) {
        // SAFETY: ptr is owned by this wrapper and freed once.
        unsafe { (api().free)(self.ptr) };
        self.ptr = ptr::null_mut();
    }
}
