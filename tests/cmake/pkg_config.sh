#!/usr/bin/env bash
# Builds and runs the consumer (find_package/main.c) with the compiler and nothing but
# `pkg-config llama-memory` from an install prefix.
#
#   tests/cmake/pkg_config.sh <install-prefix> <out-dir> [--static]
#
# --static (for a BUILD_SHARED_LIBS=OFF install) adds the Libs.private (ggml, the C++ runtime,
# Rust's system libraries). Needs pkg-config (Debian: apt-get install -y pkg-config) and $CC
# (default cc).
set -euo pipefail

prefix=$(cd "$1" && pwd)
out=$2
static=${3:-}
here=$(cd "$(dirname "$0")" && pwd)

pc=$(find "$prefix" -name llama-memory.pc -path '*/pkgconfig/*' | head -n 1)
[ -n "$pc" ] || { echo "no llama-memory.pc under $prefix" >&2; exit 1; }
export PKG_CONFIG_PATH="$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

mkdir -p "$out"
cflags=$(pkg-config --cflags llama-memory)
libs=$(pkg-config --libs $static llama-memory)
libdir=$(pkg-config --variable=libdir llama-memory)
echo "pkg-config: cflags: $cflags"
echo "pkg-config: libs:   $libs"
# shellcheck disable=SC2086 # word splitting of the flags is intended
"${CC:-cc}" -std=c11 -Wall -Wextra -Wpedantic -Werror $cflags "$here/find_package/main.c" \
    -o "$out/consumer_pkg_config" $libs "-Wl,-rpath,$libdir"
"$out/consumer_pkg_config"
