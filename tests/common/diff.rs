//! The run of a differential suite (`tests/kv_differential.rs`, `tests/kv_slot_differential.rs`,
//! `tests/recurrent_differential.rs`): the seed and operation count from the environment, the
//! summary CI prints, and the coverage counters no trace reached.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::SeedableRng;

/// `SEED=<u64>` from the environment (varies the traces), else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The RNG of one configuration's traces: `seed` mixed with a hash of its name.
#[allow(dead_code)] // the recurrent suite mixes in its shape instead
pub fn rng(seed: u64, name: &str) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64),
    )
}

/// `DIFF_OPS=<n>` (operations per configuration) as a factor on the configurations' own
/// counts, `base_ops` being the base configuration's; 1 when unset.
#[allow(dead_code)] // the recurrent suite reads RS_DIFF_OPS as a count
pub fn ops_scale(base_ops: u64) -> f64 {
    std::env::var("DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(1.0, |n: f64| n / base_ops as f64)
}

/// Prints `report` and writes it to `<CARGO_TARGET_TMPDIR>/<file>`: cargo captures a passing
/// test's output, so CI prints the file instead (`.ci/run`).
pub fn write_summary(file: &str, report: &str) {
    print!("{report}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    std::fs::write(path, report).unwrap();
}

/// Adds one configuration's coverage counters (the same names) into the run's.
pub fn add_coverage(cov: &mut BTreeMap<&'static str, u64>, pair: &BTreeMap<&'static str, u64>) {
    for (k, v) in pair {
        *cov.get_mut(k).unwrap() += v;
    }
}

/// A report line per counter: `<suite>: coverage <name> <count>`, the name left-aligned in
/// `name_width` columns and the count right-aligned in `count_width`.
pub fn report_coverage(
    report: &mut String,
    suite: &str,
    cov: &BTreeMap<&'static str, u64>,
    name_width: usize,
    count_width: usize,
) {
    for (k, v) in cov {
        *report += &format!("{suite}: coverage {k:<name_width$} {v:>count_width$}\n");
    }
}

/// The coverage counters that stayed at zero.
pub fn never_reached(cov: &BTreeMap<&'static str, u64>) -> Vec<&'static str> {
    cov.iter()
        .filter(|(_, &v)| v == 0)
        .map(|(k, _)| *k)
        .collect()
}
