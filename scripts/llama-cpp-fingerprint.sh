#!/usr/bin/env bash
# Writes cmake/llama-cpp-pin.txt: the SHA-256 of every upstream file the adapters in llama/ and
# the ggml bindings are written against, in the pinned llama.cpp tree. CMake compares a
# -DLLAMA_CPP_DIR tree with it at configure time (cmake/LlamaMemoryHelpers.cmake,
# llama_memory_check_llama_cpp), so another llama.cpp version fails there with a clear message
# instead of deep inside the compile. Rerun it when the pin moves:
#
#   scripts/llama-cpp-fingerprint.sh <pinned llama.cpp tree>   (or --check <tree>)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi
tree=${1:?usage: $0 [--check] <llama.cpp tree>}
cd "$tree"
out=$(mktemp)
{
    echo "# SHA-256 of the pinned llama.cpp's files the drop-in and the bindings are written against"
    echo "# (scripts/llama-cpp-fingerprint.sh; checked by CMake at configure time)."
    ls include/llama.h src/llama-*.h src/llama-context.cpp src/llama-kv-cache.cpp \
       src/llama-memory-recurrent.cpp src/CMakeLists.txt ggml/include/ggml.h ggml/include/ggml-backend.h \
       ggml/include/ggml-alloc.h ggml/include/ggml-cpu.h | LC_ALL=C sort | xargs sha256sum
} >"$out"
if [ $check = 1 ]; then
    diff "$repo/cmake/llama-cpp-pin.txt" "$out" && echo "cmake/llama-cpp-pin.txt matches $tree"
    rm -f "$out"
else
    mv "$out" "$repo/cmake/llama-cpp-pin.txt"
    echo "wrote cmake/llama-cpp-pin.txt ($(grep -vc '^#' "$repo/cmake/llama-cpp-pin.txt") files)"
fi
