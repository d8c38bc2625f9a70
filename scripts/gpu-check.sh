#!/usr/bin/env bash
# The drop-in libllama on a GPU (CUDA), against stock llama.cpp on the same GPU, in one run:
# a subset of the equivalence suite (the whole memory in device buffers, byte for byte) and the
# end-to-end benchmark (decode at short context, 16 sequences in 32k cells, prompt processing,
# state save/restore), stock and drop-in alternately.
#
#   scripts/gpu-check.sh prepare [bundle]   on a machine with the Rust toolchain (any CPU)
#   scripts/gpu-check.sh run [bundle]       on the GPU machine: nvcc, cmake >= 3.21, a C/C++
#                                           toolchain, nvidia-smi; no Rust, no network
#
# bundle (default <repo>/target/gpu-bundle, git-ignored) holds what `run` needs besides this
# repository: the drop-in's Rust archive (built here with the `dropin` feature, ggml left out:
# it links the GPU machine's CUDA ggml), the pinned llama.cpp tree's sources (CMake builds ggml
# and both libllamas from it there) and the generated models (equivalence and benchmark). The
# run builds ggml with CUDA for the device's architecture only (nvidia-smi's compute
# capability, or CUDA_ARCH=90 for example) and without the extra flash-attention quant
# kernels, so it fits in about ten minutes on 16 cores.
#
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.txt. Exit status: 0 when every
# equivalence configuration matched; 1 on a difference or a failure; 2 when the machine lacks
# what the run needs (no nvcc, no GPU): the message says what.
#
# GPU_CHECK_BACKEND=cpu runs the same pipeline without CUDA (the models on the CPU): it checks
# the script, the bundle and the prebuilt archive on a machine without a GPU.
# ROUNDS (default 3) benchmark rounds; THREADS (default: nproc) CPU threads; JOBS build jobs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-}
bundle=${2:-$repo/target/gpu-bundle}
backend=${GPU_CHECK_BACKEND:-cuda}
say() { printf '== %s\n' "$*"; }
fail() { echo "gpu-check: $*" >&2; exit 1; }
missing() { echo "gpu-check: $*" >&2; exit 2; }

prepare() {
    command -v cargo >/dev/null || missing "prepare needs cargo (the Rust toolchain)"
    local tree
    tree=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp 2>/dev/null | head -n 1 || true)
    tree=${LLAMA_CPP_DIR:-$tree}
    if [ ! -f "$tree/include/llama.h" ]; then
        # ggml-sys fetches the pinned crate on its first build
        cargo fetch --manifest-path "$repo/Cargo.toml" >/dev/null
        tree=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp | head -n 1)
    fi
    "$repo/scripts/llama-cpp-fingerprint.sh" --check "$tree" >/dev/null ||
        fail "$tree is not the pinned llama.cpp"
    rm -rf "$bundle"
    mkdir -p "$bundle/rust" "$bundle/models" "$bundle/empty-ggml"

    say "the drop-in's Rust archive (feature dropin, no ggml inside)"
    # GGML_SYS_LINK_DIR (empty here): ggml-sys links an existing ggml instead of compiling its
    # own, so the archive has none (the GPU machine's CUDA ggml resolves it at the final link)
    GGML_SYS_LINK_DIR="$bundle/empty-ggml" GGML_SYS_LINK_KIND=dylib \
        CARGO_TARGET_DIR="$repo/target/gpu-bundle-cargo" \
        cargo rustc -q --release -p llama-memory --lib --features dropin --crate-type staticlib \
        --manifest-path "$repo/Cargo.toml"
    cp "$repo/target/gpu-bundle-cargo/release/libllama_memory.a" "$bundle/rust/"
    if nm -g --defined-only "$bundle/rust/libllama_memory.a" 2>/dev/null | grep -qE ' T ggml_'; then
        fail "the Rust archive contains ggml"
    fi

    say "the pinned llama.cpp sources"
    mkdir -p "$bundle/llama.cpp"
    (cd "$tree" && tar cf - CMakeLists.txt cmake include src ggml common/build-info.cpp.in 2>/dev/null ||
        tar cf - CMakeLists.txt cmake include src ggml) | (cd "$bundle/llama.cpp" && tar xf -)

    say "models"
    LLAMA_MEMORY_DROPIN_WRITE_MODELS="$bundle/models" \
        cargo test -q --manifest-path "$repo/Cargo.toml" --test dropin -- --exact write_models --nocapture |
        grep -E '^wrote' || true
    LLAMA_MEMORY_BENCH_MODELS="$bundle/models" \
        cargo test -q --manifest-path "$repo/Cargo.toml" --test dropin -- --ignored --exact write_bench_models \
        --nocapture | grep -E '^wrote' || true
    for m in llama llama_h64 gemma3 mamba jamba tiny1; do
        [ -s "$bundle/models/$m.gguf" ] || fail "model $m.gguf was not written"
    done
    rmdir "$bundle/empty-ggml"
    du -sh "$bundle"
    echo "prepared $bundle: ship it with this repository and run \`scripts/gpu-check.sh run $bundle\` on the GPU machine"
}

run() {
    [ -f "$bundle/rust/libllama_memory.a" ] && [ -d "$bundle/llama.cpp/ggml" ] ||
        missing "no bundle at $bundle: run \`scripts/gpu-check.sh prepare\` on a machine with Rust first"
    command -v cmake >/dev/null || missing "no cmake"
    local cc=${CC:-cc} jobs=${JOBS:-$(nproc)} threads=${THREADS:-$(nproc)} rounds=${ROUNDS:-3}
    local build=$bundle/build-$backend cmake_args=() dev_flag=()
    if [ "$backend" = cuda ]; then
        local nvcc
        nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
        [ -n "$nvcc" ] || missing "no CUDA compiler: nvcc is neither on PATH nor in /usr/local/cuda/bin (install the CUDA toolkit)"
        local arch=${CUDA_ARCH:-}
        if [ -z "$arch" ]; then
            command -v nvidia-smi >/dev/null || missing "no nvidia-smi (no NVIDIA driver?); set CUDA_ARCH to build anyway"
            arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
            [ -n "$arch" ] || missing "nvidia-smi reports no GPU"
        fi
        say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1); CUDA arch $arch; $("$nvcc" --version | tail -n 1)"
        cmake_args=(-DLLAMA_MEMORY_GGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" "-DCMAKE_CUDA_COMPILER=$nvcc")
        dev_flag=(--gpu 1)
    elif [ "$backend" != cpu ]; then
        fail "GPU_CHECK_BACKEND must be cuda or cpu"
    fi

    say "build: ggml ($backend), the drop-in and stock libllama (prebuilt Rust archive, no cargo)"
    local t0=$SECONDS
    cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_MEMORY_DROPIN=ON \
        -DLLAMA_MEMORY_BUILD_TESTS=OFF "-DLLAMA_MEMORY_RUST_LIBRARY_DIR=$bundle/rust" \
        "-DLLAMA_CPP_DIR=$bundle/llama.cpp" "${cmake_args[@]}" >"$build.configure.log" 2>&1 ||
        { tail -n 40 "$build.configure.log"; fail "configure failed"; }
    cmake --build "$build" --parallel "$jobs" --target llama llama_stock >"$build.build.log" 2>&1 ||
        { tail -n 40 "$build.build.log"; fail "build failed"; }
    echo "built in $((SECONDS - t0)) s"

    local inc=("-I$bundle/llama.cpp/include" "-I$bundle/llama.cpp/ggml/include") bin=$build/gpu-check
    mkdir -p "$bin"
    for lib in stock dropin; do
        "$cc" -O2 -std=c11 "${inc[@]}" "$repo/tests/dropin/equivalence.c" -o "$bin/equivalence-$lib" \
            -L"$build/$lib" -l:libllama.so.0 -L"$build/ggml-lib" -lggml -lggml-base -lm \
            -Wl,-rpath,"$build/$lib:$build/ggml-lib"
    done
    "$cc" -O2 -std=c11 -D_POSIX_C_SOURCE=200809L "${inc[@]}" "$repo/tests/dropin/bench.c" -o "$bin/bench" \
        -L"$build/stock" -l:libllama.so.0 -Wl,-rpath,"$build/ggml-lib"

    say "equivalence: the workload on each library, the memory on the $backend device, byte for byte"
    local m=$bundle/models failures=0 n=0
    local configs=(
        "llama_fa_off|llama|--flash-attn 0"
        "llama_fa_on|llama|--flash-attn 1"
        "llama_h64_q8_0_k|llama_h64|--flash-attn 0 --type-k q8_0 --on-device 0"
        "llama_streams|llama|--flash-attn 0 --kv-unified 0"
        "gemma3_swa_full|gemma3|--flash-attn 1 --swa-full 1 --n-ctx 512"
        "gemma3|gemma3|--flash-attn 0 --n-ctx 512"
        "mamba|mamba|"
        "jamba_streams|jamba|--flash-attn 1 --kv-unified 0")
    for c in "${configs[@]}"; do
        IFS='|' read -r name model args <<<"$c"
        n=$((n + 1))
        # shellcheck disable=SC2086
        for lib in stock dropin; do
            "$bin/equivalence-$lib" "$m/$model.gguf" "$bin/$name.$lib.txt" $args "${dev_flag[@]}" \
                --threads "$threads" >"$bin/$name.$lib.stdout" 2>&1 ||
                { echo "  $name: $lib failed: $(tail -n 2 "$bin/$name.$lib.stdout" | tr '\n' ' ')"; failures=$((failures + 1)); continue 2; }
        done
        if cmp -s "$bin/$name.stock.txt" "$bin/$name.dropin.txt"; then
            echo "  $name: identical ($(grep -c '^logits' "$bin/$name.stock.txt") logit vectors, $(grep -c '^blob' "$bin/$name.stock.txt") states; $(grep '^cache buffers' "$bin/$name.stock.txt"))"
        else
            echo "  $name: DIFFERENT ($bin/$name.stock.txt vs $bin/$name.dropin.txt)"
            diff "$bin/$name.stock.txt" "$bin/$name.dropin.txt" | head -n 6 || true
            failures=$((failures + 1))
        fi
    done
    echo "equivalence: $((n - failures)) of $n configurations identical"

    say "benchmark: stock and drop-in alternately, $rounds rounds, medians (ratio > 1: the drop-in is faster)"
    local tests=("tiny1 decode1" "llama decode16" "tiny1 prompt" "tiny1 state")
    local resdir=$bin/bench-results
    rm -rf "$resdir"
    mkdir -p "$resdir"
    for ((r = 0; r < rounds; r++)); do
        for t in "${tests[@]}"; do
            read -r model test <<<"$t"
            for lib in stock dropin; do
                LD_LIBRARY_PATH="$build/$lib:$build/ggml-lib" "$bin/bench" "$m/$model.gguf" "$test" \
                    --threads "$threads" --reps 3 2>>"$resdir/stderr" | grep '^RESULT' |
                    sed "s/^/$lib $test /" >>"$resdir/results"
            done
        done
    done
    python3 - "$resdir/results" <<'PY' || awk '{print}' "$resdir/results"
import collections, statistics, sys
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    lib, test, _, metric, value, unit = line.split()[:6]
    vals[(test, metric, unit, lib)].append(float(value))
keys = sorted({k[:3] for k in vals})
for test, metric, unit in keys:
    s = statistics.median(vals[(test, metric, unit, "stock")])
    d = statistics.median(vals[(test, metric, unit, "dropin")])
    # rates: higher is better; times (us, s): lower is better
    ratio = d / s if unit.endswith("/s") else s / d
    print(f"  {test:9} {metric:24} stock {s:12.2f}  drop-in {d:12.2f} {unit:10} ratio {ratio:5.3f}")
PY
    if [ "$failures" -ne 0 ]; then
        fail "$failures equivalence configuration(s) differ or failed"
    fi
}

case $mode in
    prepare) prepare ;;
    run)
        if [ -n "${OUT:-}" ]; then
            mkdir -p "$OUT"
            run 2>&1 | tee "$OUT/gpu-check.txt"
            exit "${PIPESTATUS[0]}"
        fi
        run
        ;;
    *) echo "usage: $0 prepare|run [bundle dir]" >&2; exit 2 ;;
esac
