#!/usr/bin/env bash
# What a packager configures, checked at configure time and in the generated build commands
# (no build: each case is a configure, then the generated Makefile's cargo rule is read):
#   1. CMAKE_BUILD_TYPE picks the cargo profile: Debug builds with `dev` (target/debug), the
#      release types with `--release`;
#   2. LLAMA_MEMORY_CARGO_TARGET passes `--target <triple>` (and the artifacts come from
#      target/<triple>/...); a cross-compiling toolchain file derives the triple;
#   3. a LLAMA_CPP_DIR that is not the pinned llama.cpp fails at configure time, naming the
#      expected and the found versions and the file that differs; with
#      LLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON it only warns.
#
#   tests/cmake/packaging.sh [work dir]     (default: <repo>/build-cmake-tests/packaging)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$repo/build-cmake-tests/packaging}
rm -rf "$work"
mkdir -p "$work"
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
configure() { # <dir> <args...>
    local b=$1
    shift
    cmake -S "$repo" -B "$b" -G "Unix Makefiles" -DLLAMA_MEMORY_BUILD_TESTS=OFF "$@" >"$b.log" 2>&1
}
# The cargo command line the build runs for the library (the generated Makefile's rule).
cargo_command() { # <build dir>
    grep -E '/cargo build ' "$1/CMakeFiles/llama_memory_cargo.dir/build.make" | head -n 1 | sed 's/^[[:space:]]*//'
}

echo "== 1. build type -> cargo profile"
configure "$work/debug" -DCMAKE_BUILD_TYPE=Debug || { cat "$work/debug.log"; fail "configure"; }
cmd=$(cargo_command "$work/debug")
echo "Debug: $cmd"
[ -n "$cmd" ] || fail "no cargo command in the Debug build"
if grep -q -- '--release' <<<"$cmd"; then fail "Debug builds with --release"; fi
grep -q "cargo/debug/libllama_memory" "$work/debug/CMakeFiles/llama_memory_cargo.dir/build.make" ||
    fail "Debug: the library is not taken from cargo/debug"
for t in Release RelWithDebInfo MinSizeRel; do
    configure "$work/$t" -DCMAKE_BUILD_TYPE=$t || { cat "$work/$t.log"; fail "configure"; }
    cmd=$(cargo_command "$work/$t")
    grep -q -- '--release' <<<"$cmd" || fail "$t does not build with --release: $cmd"
    echo "$t: --release"
done

echo "== 2. --target"
host=$(rustc -vV | sed -n 's/^host: //p')
configure "$work/target" -DCMAKE_BUILD_TYPE=Release "-DLLAMA_MEMORY_CARGO_TARGET=$host" ||
    { cat "$work/target.log"; fail "configure"; }
cmd=$(cargo_command "$work/target")
echo "LLAMA_MEMORY_CARGO_TARGET=$host: $cmd"
grep -q -- "--target $host" <<<"$cmd" || fail "no --target $host"
grep -q "cargo/$host/release/libllama_memory" "$work/target/CMakeFiles/llama_memory_cargo.dir/build.make" ||
    fail "the library is not taken from cargo/$host/release"
var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$host")_LINKER="
grep -q -- "$var" <<<"$cmd" || fail "no $var for cargo"
# A toolchain file for another Linux machine, with the host compiler (configure only): the
# triple is derived from CMAKE_SYSTEM_PROCESSOR.
cat >"$work/cross.cmake" <<'TOOLCHAIN'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR riscv64)
TOOLCHAIN
if configure "$work/cross" "-DCMAKE_TOOLCHAIN_FILE=$work/cross.cmake"; then
    grep -q "cargo --target riscv64-unknown-linux-gnu" "$work/cross.log" ||
        fail "cross-compiling: the triple was not derived"
    echo "cross (riscv64 Linux): $(grep 'cargo --target' "$work/cross.log")"
elif grep -q "cargo --target riscv64-unknown-linux-gnu" "$work/cross.log"; then
    # ggml's own configure may reject the host compiler for riscv64 after the triple was set
    echo "cross (riscv64 Linux): triple derived; ggml's configure stopped later (host compiler)"
else
    cat "$work/cross.log"
    fail "cross-compiling: no triple derived"
fi
cat >"$work/cross-unknown.cmake" <<'TOOLCHAIN'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR m68k)
TOOLCHAIN
if configure "$work/cross-unknown" "-DCMAKE_TOOLCHAIN_FILE=$work/cross-unknown.cmake"; then
    fail "an unknown cross target configured without LLAMA_MEMORY_CARGO_TARGET"
fi
grep -q "LLAMA_MEMORY_CARGO_TARGET" "$work/cross-unknown.log" || fail "no hint at LLAMA_MEMORY_CARGO_TARGET"
echo "cross (m68k): refused, asks for LLAMA_MEMORY_CARGO_TARGET"

echo "== 3. another llama.cpp version"
# the pinned tree, as the configure above located it
pinned=$(sed -n 's/^LLAMA_MEMORY_PINNED_LLAMA_CPP_DIR:INTERNAL=//p' "$work/debug/CMakeCache.txt")
[ -f "$pinned/src/llama-memory.h" ] || fail "no pinned tree at $pinned"
other=$work/other-llama.cpp
cp -rs "$pinned" "$other"
rm "$other/src/llama-memory.h" "$other/CMakeLists.txt"
{ cat "$pinned/src/llama-memory.h"; echo "// another version"; } >"$other/src/llama-memory.h"
sed 's/^set(LLAMA_VERSION_MINOR [0-9]*)/set(LLAMA_VERSION_MINOR 99)/' "$pinned/CMakeLists.txt" >"$other/CMakeLists.txt"
if configure "$work/other" "-DLLAMA_CPP_DIR=$other"; then
    fail "a different llama.cpp configured"
fi
# (CMake wraps its messages at spaces: compare with the whitespace folded)
folded() { tr -s ' \n' '  ' <"$1"; }
for want in "expected: llama.cpp of llama-cpp-sys-2" "found: llama 0.99.0" "src/llama-memory.h"; do
    folded "$work/other.log" | grep -qF "$want" || { cat "$work/other.log"; fail "the message lacks '$want'"; }
done
sed -n '/^CMake Error/,/^Call Stack/p' "$work/other.log"
configure "$work/other-allowed" "-DLLAMA_CPP_DIR=$other" -DLLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON ||
    { cat "$work/other-allowed.log"; fail "LLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON still refuses"; }
folded "$work/other-allowed.log" | grep -qF "is not the llama.cpp" || fail "no warning with LLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON"
echo "with LLAMA_MEMORY_ALLOW_OTHER_LLAMA_CPP=ON: a warning, configured"
configure "$work/pinned" "-DLLAMA_CPP_DIR=$pinned" || { cat "$work/pinned.log"; fail "the pinned tree is refused"; }
if folded "$work/pinned.log" | grep -qF "is not the llama.cpp"; then fail "the pinned tree itself is refused"; fi
echo "ok: packaging checks"
