#!/usr/bin/env bash
# Coverage-guided fuzzing of every state reader, of accepted states operated on afterwards, and
# of the C ABI (cargo-fuzz / libFuzzer, AddressSanitizer).
#
#   scripts/fuzz.sh [seconds_per_target]     (default 60)
#
# Installs cargo-fuzz into .tools/ if missing, writes real states of every fuzz configuration
# as seeds (fuzz/corpus/, not committed), runs each target for the given time and writes
# target/fuzz-summary.txt (target, executions, result). Exits non-zero on any crash.
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags to the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
root="$PWD"
tools="$root/.tools"
export PATH="$tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --version 0.13.2 --locked --root "$tools"
fi
export RUSTC_BOOTSTRAP=1
# Seeds: a normal (uninstrumented) build of the fuzz crate's seed writer.
(cd fuzz && CARGO_TARGET_DIR="$root/target/fuzz-seeds" cargo run --quiet --release --bin seeds -- corpus)
mkdir -p target
summary="$root/target/fuzz-summary.txt"
: > "$summary"
status=0
for t in seq_set_data set_data load_file on_device ops_after_restore c_abi recurrent_state composite_state; do
    log="$root/target/fuzz-$t.log"
    (cd fuzz && cargo fuzz build --sanitizer address "$t" >/dev/null 2>"$log.build") || {
        cat "$log.build"; exit 1; }
    set +e
    (cd fuzz && cargo fuzz run --sanitizer address "$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1)
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    if [ "$rc" -eq 0 ]; then res="ok, 0 crashes"; else res="FAILED (exit $rc, see $log)"; status=1; fi
    printf '%-18s %12s executions in %ss  %s\n' "$t" "${execs:-?}" "$secs" "$res" | tee -a "$summary"
    if [ "$rc" -ne 0 ]; then tail -40 "$log"; fi
done
exit $status
