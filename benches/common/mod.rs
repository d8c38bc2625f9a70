//! What every bench here sets up the same way: criterion's configuration, the run's start
//! time, and reading the medians of this run back from criterion's own estimates for the
//! stock-vs-ours tables printed at the end.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use criterion::Criterion;
use llama_memory_reference as stock;

static RUN_START: OnceLock<SystemTime> = OnceLock::new();

/// Criterion as the benches configure it (300 ms of warm-up, then the command line), with the
/// stock side's logs of expected failures turned off.
pub fn criterion(measurement_time: Duration, sample_size: usize) -> Criterion {
    std::env::set_var("KVREF_QUIET", "1");
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(measurement_time)
        .sample_size(sample_size)
        .configure_from_args()
}

/// Marks the start of this run: [`median_ns`] then reads only the estimates written since (a
/// filtered run leaves older ones on disk). Benches that do not call it read whatever is there.
#[allow(dead_code)] // not every bench calls it
pub fn start_run() {
    RUN_START.set(SystemTime::now()).unwrap();
}

/// Criterion's output folder: `target/<profile>/deps/<bench>-<hash>` -> `target/criterion`.
pub fn criterion_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().join("criterion")
}

/// Median of one benchmark from criterion's own estimates, in nanoseconds.
pub fn median_ns(dir: &Path, group: &str, id: &str) -> Option<f64> {
    let path = dir.join(group).join(id).join("new/estimates.json");
    if let Some(start) = RUN_START.get() {
        let written = std::fs::metadata(&path).ok()?.modified().ok()?;
        if written < *start {
            return None;
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// A duration in nanoseconds, in ns, µs or ms.
#[allow(dead_code)] // decode prints µs throughout
pub fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

// The stock side called directly: benches that time a shim function into a caller buffer look
// it up themselves, since the reference crate's wrappers add an allocation to the stock side.

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;

/// The stock object behind a reference-crate handle: its pointer is private, but the handle's
/// derived `Debug` output (`dbg`, from a `what`) prints it as `ptr: 0x…`.
#[allow(dead_code)] // kv, decode: no direct shim calls
pub fn debug_ptr(dbg: &str, what: &str) -> *const c_void {
    let hex = dbg
        .split("ptr: 0x")
        .nth(1)
        .unwrap_or_else(|| panic!("{what}'s Debug output shows its pointer"));
    let end = hex
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(hex.len());
    usize::from_str_radix(&hex[..end], 16).unwrap() as *const c_void
}

/// The function `name` of the stock shim that `llama_memory_reference` already loaded
/// (`RTLD_NOLOAD` returns that same instance); panics when it is not there. The caller
/// transmutes it to the C prototype of the shim's header.
#[allow(dead_code)] // kv, decode: no direct shim calls
pub fn shim_symbol(name: &str) -> *mut c_void {
    let lib = CString::new(stock::KVREF_LIB).unwrap();
    let c = CString::new(name).unwrap();
    // SAFETY: dlopen/dlsym only look up the already loaded shim (RTLD_NOLOAD), with
    // NUL-terminated names that outlive the calls.
    unsafe {
        let h = dlopen(lib.as_ptr(), RTLD_NOW | RTLD_NOLOAD);
        assert!(!h.is_null(), "the stock shim is not loaded");
        let p = dlsym(h, c.as_ptr());
        assert!(!p.is_null(), "{name} not found");
        p
    }
}
