#!/usr/bin/env bash
# End-to-end benchmark of the drop-in libllama against stock llama.cpp, same ggml, one run.
#
#   scripts/bench-dropin.sh            # ROUNDS=5 THREADS=1 by default
#   ROUNDS=7 THREADS=2 scripts/bench-dropin.sh
#   ROUNDS=0 PROFILE=1 scripts/bench-dropin.sh   # only the perf breakdown (see the end)
#
# Needs the two libraries of `cargo test --test dropin` (or the CMake build with
# -DLLAMA_MEMORY_DROPIN=ON): <build>/dropin/libllama.so (drop-in), <build>/stock/libllama.so
# (stock, same llama.cpp tree, ggml and flags) and <build>/ggml-lib; <build> is
# $DROPIN_BUILD, default <target>/dropin-build. It does not build them.
#
# 1. copies both libraries and ggml into <target>/bench-dropin/lib (a rebuild during the run
#    cannot mix versions) and prints their sha256;
# 2. writes the models (`cargo test --test dropin -- --ignored --exact write_bench_models`);
# 3. builds tests/dropin/bench.c once (llama.h only) against the stock copy: both libraries
#    have the soname libllama.so.0, so LD_LIBRARY_PATH picks one at run time, and the bench
#    prints the path it mapped (checked here for every run);
# 4. runs every benchmark on stock then drop-in, ROUNDS times (S D S D ...), one process per
#    run, and prints the medians over rounds and the ratio drop-in vs stock (above 1: the
#    drop-in is faster; for times the ratio is stock time / drop-in time).
#
# Gemma 3 270M (decode, one sequence) is added when a .gguf is found under
# $GEMMA3_270M (default <build>/gemma3-270m).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
build=${DROPIN_BUILD:-$target/dropin-build}
out=${BENCH_OUT:-$target/bench-dropin}
rounds=${ROUNDS:-5}
threads=${THREADS:-1}
gemma_dir=${GEMMA3_270M:-$build/gemma3-270m}

for f in "$build/dropin/libllama.so.0" "$build/stock/libllama.so.0" "$build/ggml-lib/libggml.so.0"; do
    [[ -e $f ]] || { echo "missing $f: build the drop-in first (cargo test --test dropin)" >&2; exit 1; }
done

mkdir -p "$out/lib/dropin" "$out/lib/stock" "$out/lib/ggml" "$out/models"
cp -aL "$build/dropin/libllama.so.0" "$out/lib/dropin/"
cp -aL "$build/stock/libllama.so.0" "$out/lib/stock/"
for f in "$build"/ggml-lib/lib*.so.0; do cp -aL "$f" "$out/lib/ggml/"; done
echo "== libraries (copied to $out/lib)"
sha256sum "$out"/lib/*/lib*.so.0 | sed "s|$out/||"

echo "== models"
LLAMA_MEMORY_BENCH_MODELS="$out/models" cargo test -q --manifest-path "$repo/Cargo.toml" \
    --test dropin -- --ignored --exact write_bench_models --nocapture | grep '^wrote' || true
[[ -s $out/models/llama.gguf && -s $out/models/tiny1.gguf ]] || { echo "models not written" >&2; exit 1; }

echo "== bench.c"
llama_inc=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp 2>/dev/null | head -n1)
llama_inc=${LLAMA_CPP_DIR:-$llama_inc}
[[ -f $llama_inc/include/llama.h ]] || { echo "llama.h not found (set LLAMA_CPP_DIR)" >&2; exit 1; }
cc=${CC:-cc}
"$cc" -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -I"$llama_inc/include" \
    -I"$llama_inc/ggml/include" "$repo/tests/dropin/bench.c" -o "$out/bench" \
    -L"$out/lib/stock" -l:libllama.so.0
for lib in stock dropin; do
    echo "$lib: $(LD_LIBRARY_PATH=$out/lib/$lib:$out/lib/ggml ldd "$out/bench" | grep libllama)"
done

# name model test arguments...
specs=(
    "tiny1 $out/models/tiny1.gguf decode1 --reps 7 --steps 512"
    "llama $out/models/llama.gguf decode1 --reps 7 --steps 512"
    "tiny1 $out/models/tiny1.gguf decode16 --reps 3 --steps 64"
    "llama $out/models/llama.gguf decode16 --reps 3 --steps 64"
    "llama $out/models/llama.gguf prompt --reps 5"
    "llama $out/models/llama.gguf state --reps 5"
)
gemma=$(find "$gemma_dir" -name '*.gguf' 2>/dev/null | head -n1 || true)
if [[ -n $gemma ]]; then
    specs+=("gemma3-270m $gemma decode1 --reps 3 --steps 64")
    echo "Gemma 3 270M: $gemma"
else
    echo "Gemma 3 270M: no .gguf under $gemma_dir, skipped"
fi

results=$out/results.tsv
: >"$results"
echo "== $rounds rounds, $threads thread(s); load: $(uptime | sed 's/.*load average: //')"
t_start=$(date +%s)
for ((round = 1; round <= rounds; round++)); do
    for spec in "${specs[@]}"; do
        read -r name model test args <<<"$spec"
        for lib in stock dropin; do
            log=$(LD_LIBRARY_PATH=$out/lib/$lib:$out/lib/ggml "$out/bench" "$model" "$test" \
                --threads "$threads" $args)
            mapped=$(sed -n 's/^LIBRARY //p' <<<"$log")
            [[ $mapped == "$out/lib/$lib/"* ]] || { echo "$lib run mapped '$mapped'" >&2; exit 1; }
            sed -n "s|^RESULT |$round $lib $name/|p" <<<"$log" | tr ' ' '\t' >>"$results"
        done
    done
    echo "round $round done ($(($(date +%s) - t_start)) s; load: $(uptime | sed 's/.*load average: //'))"
done

if ((rounds > 0)); then
python3 - "$results" "$rounds" "$threads" <<'EOF'
import sys, statistics
from collections import defaultdict
path, rounds, threads = sys.argv[1], sys.argv[2], sys.argv[3]
vals, units, order = defaultdict(list), {}, []
for line in open(path):
    rnd, lib, metric, value, unit = line.split('\t')
    unit = unit.strip()
    if metric not in units:
        order.append(metric)
    units[metric] = unit
    vals[(metric, lib)].append(float(value))
print(f"\n| metric | unit | stock (median) | drop-in (median) | drop-in vs stock | stock min–max | drop-in min–max |")
print("|---|---|---:|---:|---:|---:|---:|")
for m in order:
    s, d = vals[(m, 'stock')], vals[(m, 'dropin')]
    ms, md = statistics.median(s), statistics.median(d)
    u = units[m]
    if u == 'B':
        ratio = '—'
    elif u == 'tok/s':
        ratio = f"{md / ms:.3f}x"
    else:  # a time: lower is better
        ratio = f"{ms / md:.3f}x"
    fmt = (lambda v: f"{v:.0f}") if u in ('B',) else (lambda v: f"{v:.1f}")
    print(f"| {m} | {u} | {fmt(ms)} | {fmt(md)} | {ratio} | {fmt(min(s))}–{fmt(max(s))} | {fmt(min(d))}–{fmt(max(d))} |")
print(f"\n{rounds} rounds, {threads} thread(s); ratio above 1: the drop-in is faster "
      "(tok/s: drop-in / stock; times: stock / drop-in).")
EOF
echo "raw results: $results"
fi

# PROFILE=1: where the time goes. perf record of the timed part only (bench.c enables the
# profile through perf's control fifo after setup and warm-up), then the share of the samples
# in the memory's own functions, by symbol: stock's llama_kv_cache/llama_kv_cells members and
# its mask writer; the drop-in's adapters (llama_kv_cache::, C++) and this library (Rust,
# llama_memory::..., the C ABI llama_memory_kv_*). Bulk memset/memcpy the mask writers call
# land in libc and are not counted.
if [[ ${PROFILE:-0} == 1 ]] && command -v perf >/dev/null; then
    echo "== profile (perf record, timed part only)"
    ctl=$out/perf.ctl ack=$out/perf.ack
    rm -f "$ctl" "$ack"; mkfifo "$ctl" "$ack"
    for spec in "${specs[@]:0:4}"; do
        read -r name model test args <<<"$spec"
        for lib in stock dropin; do
            data=$out/perf-$name-$test-$lib.data
            BENCH_PERF_CTL=$ctl LD_LIBRARY_PATH=$out/lib/$lib:$out/lib/ggml perf record -q -F 4999 \
                -D -1 --control="fifo:$ctl,$ack" -o "$data" "$out/bench" "$model" "$test" \
                --threads "$threads" $args >/dev/null 2>&1
            perf report -i "$data" --no-children --sort dso,sym 2>/dev/null | awk -v lib=$lib \
                -v what="$name/$test" '
                /^#/ || !/%/ { next }
                { p = $1; sub(/%/, "", p); total += p
                  line = $0
                  if (line ~ /libllama/) ll += p
                  if (line ~ /libggml/) gg += p
                  if (line ~ /llama_kv_cache|llama_kv_cells|set_input_kq_mask|llama_memory::|llama_memory_kv_|llama_memory_dropin/) mem += p
                  if (line ~ /kq_mask|build_segs|row_from_segs/) mask += p }
                END { printf "%-18s %-6s memory %5.1f%% (mask %5.1f%%)  libllama %5.1f%%  ggml %5.1f%%\n", what, lib, mem, mask, ll, gg }'
        done
    done
    rm -f "$ctl" "$ack"
fi
