#!/usr/bin/env bash
# End-to-end check of the CMake integration, as CI runs it:
#
#   tests/cmake/run.sh [build-root] [shared|static|all]
#
# For each variant (BUILD_SHARED_LIBS=ON / OFF; default: shared), in <build-root>/<variant>/:
#   1. configure, build and ctest the project (tests/c/*.c and `cargo test`)
#   2. check the library: the llama.h memory functions are exported, nothing Rust-mangled is,
#      no ggml is inside it, its RUNPATH
#   3. cmake --install into a fresh prefix and check what was installed
#   4. with the build tree moved away (the install must not need it): build and run the
#      find_package consumer (tests/cmake/find_package) and the pkg-config one (pkg_config.sh)
#   5. (shared) the project against that installed ggml (LLAMA_MEMORY_SYSTEM_GGML), and a ggml
#      package of another version refused at configure time
#   6. build and run the add_subdirectory consumer (tests/cmake/add_subdirectory)
#
# Default build root: <repo>/build-cmake-tests (git-ignored). Reruns are incremental.
# Environment:
#   SKIP_CARGO_TEST=1   leave out the `cargo_test` ctest test (the crate's cargo suite; its
#                       first run builds the reference llama.cpp and takes several minutes).
#                       Its target dir is shared by the variants: <build-root>/cargo-test.
#   CARGO_TEST_TARGET_DIR=<dir>  that target dir instead (CI points it at the repo's target/,
#                       which its own `cargo test` already built, so nothing is built twice).
#   CMAKE_BUILD_PARALLEL_LEVEL (default: nproc), CMAKE_GENERATOR, CC/CXX: as usual.
# Needs: cmake >= 3.21, a C/C++ toolchain, cargo/rustc, pkg-config, binutils (nm, readelf).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
root=${1:-$repo/build-cmake-tests}
which=${2:-shared}
mkdir -p "$root"
root=$(cd "$root" && pwd)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

case $which in
    shared) variants=(shared) ;;
    static) variants=(static) ;;
    all | both) variants=(shared static) ;;
    *) echo "usage: $0 [build-root] [shared|static|all]" >&2; exit 2 ;;
esac

ctest_args=(--output-on-failure)
if [ "${SKIP_CARGO_TEST:-0}" = 1 ]; then
    ctest_args+=(-E '^cargo_test$')
fi

summary=()
step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo
    echo "==> $name"
    "$@"
    local dt=$((SECONDS - t0))
    echo "<== $name: ${dt}s"
    summary+=("$(printf '%-40s %5ss' "$name" "$dt")")
}
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# The nine memory functions of llama.h.
llama_h_functions=(llama_memory_clear llama_memory_seq_rm llama_memory_seq_cp llama_memory_seq_keep
                   llama_memory_seq_add llama_memory_seq_div llama_memory_seq_pos_min
                   llama_memory_seq_pos_max llama_memory_can_shift)

# check_shared <libllama_memory.so> <expected RUNPATH regex>
check_shared() {
    local so=$1 runpath_re=$2 exports f bad runpath
    exports=$(nm -D --defined-only "$so" | awk '{print $NF}')
    for f in "${llama_h_functions[@]}"; do
        grep -qx "$f" <<<"$exports" || fail "$so does not export $f"
    done
    bad=$(grep -E '^(_ZN|_R)' <<<"$exports" || true)
    [ -z "$bad" ] || fail "$so exports Rust-mangled symbols: $(head -n 5 <<<"$bad")"
    bad=$(grep -v '^llama_memory_' <<<"$exports" || true)
    [ -z "$bad" ] || echo "note: $so also exports: $(tr '\n' ' ' <<<"$bad")"
    echo "exports: $(wc -l <<<"$exports") symbols, all llama_memory_*; the ${#llama_h_functions[@]} llama.h ones present"
    # One ggml per process: the library uses the libggml*.so, it has no copy of its own.
    local symbols
    symbols=$(nm --defined-only "$so" 2>/dev/null || true)
    if grep -qE ' [TtWw] ggml_' <<<"$symbols"; then
        fail "$so contains ggml"
    fi
    runpath=$(readelf -d "$so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
    echo "RUNPATH: $runpath"
    [[ $runpath =~ $runpath_re ]] || fail "$so: RUNPATH '$runpath' does not match '$runpath_re'"
    if readelf -d "$so" | grep -q '(RPATH)'; then
        fail "$so has a DT_RPATH (expected DT_RUNPATH only)"
    fi
}

# check_static <libllama_memory.a>
check_static() {
    local a=$1 defined f
    defined=$(nm -g --defined-only "$a" 2>/dev/null | awk 'NF >= 3 {print $NF}')
    for f in "${llama_h_functions[@]}"; do
        grep -qx "$f" <<<"$defined" || fail "$a does not define $f"
    done
    if grep -qE '^ggml_' <<<"$defined"; then
        fail "$a contains ggml (ggml-sys should link it with -bundle)"
    fi
    echo "$a: defines the llama.h functions, no ggml inside"
}

# check_ggml_resolution <executable> <dir the libggml*.so must come from>
check_ggml_resolution() {
    local exe=$1 dir=$2 lines
    lines=$(ldd "$exe" | grep -E 'lib(ggml|llama_memory)' || true)
    echo "$lines"
    if grep -q 'not found' <<<"$lines"; then fail "$exe: unresolved libraries"; fi
    local ggml_lines
    ggml_lines=$(grep -E 'libggml' <<<"$lines" || true)
    if [ -n "$ggml_lines" ] && grep -vqF "$dir/" <<<"$ggml_lines"; then
        fail "$exe loads a ggml from outside $dir"
    fi
}

# check_soname <installed libdir>: the soname carries major.minor for 0.x (major otherwise), the
# file the whole version, with the two links, as the package's SameMinorVersion promises.
check_soname() {
    local libdir=$1 version soversion soname
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)
    if [ "${version%%.*}" = 0 ]; then soversion=$(cut -d. -f1,2 <<<"$version"); else soversion=${version%%.*}; fi
    soname=$(readelf -d "$libdir/libllama_memory.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [ "$soname" = "libllama_memory.so.$soversion" ] || fail "soname '$soname', expected libllama_memory.so.$soversion"
    [ -f "$libdir/libllama_memory.so.$version" ] && [ ! -L "$libdir/libllama_memory.so.$version" ] ||
        fail "libllama_memory.so.$version is not the installed file"
    [ "$(readlink "$libdir/libllama_memory.so.$soversion")" = "libllama_memory.so.$version" ] ||
        fail "libllama_memory.so.$soversion does not link to libllama_memory.so.$version"
    [ "$(readlink "$libdir/libllama_memory.so")" = "libllama_memory.so.$soversion" ] ||
        fail "libllama_memory.so does not link to libllama_memory.so.$soversion"
    echo "soname libllama_memory.so.$soversion; libllama_memory.so -> .so.$soversion -> .so.$version"
}

# check_system_ggml <variant dir> <prefix with an installed ggml>: the project built against
# that ggml (find_package(ggml)), no ggml of its own; its C tests pass and load the installed
# ggml. Then a ggml package of another version is refused at configure time.
check_system_ggml() {
    local v=$1 prefix=$2 b=$1/system-ggml
    rm -rf "$b" "$v/other-ggml"
    cmake -S "$repo" -B "$b" -DLLAMA_MEMORY_SYSTEM_GGML=ON "-DCMAKE_PREFIX_PATH=$prefix" \
        -DLLAMA_MEMORY_CARGO_TEST=OFF >"$b.log" 2>&1 || { cat "$b.log"; fail "configure with the installed ggml"; }
    grep -F "the installed ggml" "$b.log"
    cmake --build "$b" >>"$b.log" 2>&1 || { tail -n 40 "$b.log"; fail "build with the installed ggml"; }
    [ ! -e "$b/ggml-lib" ] || fail "a ggml was built although an installed one was asked for"
    ctest --test-dir "$b" --output-on-failure | tail -n 3
    check_ggml_resolution "$b/c_tests/test_memory_ops" "$prefix/lib"
    # the same package, claiming another version
    local other=$v/other-ggml
    mkdir -p "$other/lib/cmake"
    ln -s "$prefix/include" "$other/include"
    for f in "$prefix"/lib/libggml*; do ln -s "$f" "$other/lib/"; done
    cp -r "$prefix/lib/cmake/ggml" "$other/lib/cmake/"
    sed -i 's/^set(PACKAGE_VERSION "[^"]*")/set(PACKAGE_VERSION "0.25.0")/' "$other/lib/cmake/ggml/ggml-config-version.cmake"
    if cmake -S "$repo" -B "$b-other" -DLLAMA_MEMORY_SYSTEM_GGML=ON "-DCMAKE_PREFIX_PATH=$other" \
        -DLLAMA_MEMORY_CARGO_TEST=OFF >"$b-other.log" 2>&1; then
        fail "a ggml 0.25.0 package was accepted"
    fi
    tr -s ' \n' '  ' <"$b-other.log" | grep -qF "version 0.25.0, the pinned llama.cpp's is" ||
        { cat "$b-other.log"; fail "no clear message for another ggml version"; }
    echo "ok: ggml 0.25.0 refused at configure time"
    rm -rf "$b-other"
}

configure_build_test() {
    local b=$1 shared=$2
    cmake -S "$repo" -B "$b" -DBUILD_SHARED_LIBS="$shared" \
        -DLLAMA_MEMORY_CARGO_TEST_TARGET_DIR="${CARGO_TEST_TARGET_DIR:-$root/cargo-test}"
}

for variant in "${variants[@]}"; do
    v=$root/$variant
    build=$v/build
    prefix=$v/prefix
    if [ "$variant" = shared ]; then shared=ON; else shared=OFF; fi
    mkdir -p "$v"

    step "[$variant] configure" configure_build_test "$build" "$shared"
    step "[$variant] build" cmake --build "$build"

    if [ "$variant" = shared ]; then
        step "[$variant] check library" check_shared "$build/cargo/release/libllama_memory.so" \
            "^\\\$ORIGIN:$build/ggml-lib\$"
        step "[$variant] ggml resolution (build tree)" \
            check_ggml_resolution "$build/c_tests/test_memory_ops" "$build/ggml-lib"
    else
        step "[$variant] check library" check_static "$build/cargo/release/libllama_memory.a"
    fi

    step "[$variant] ctest" ctest --test-dir "$build" "${ctest_args[@]}"

    rm -rf "$prefix"
    step "[$variant] install" cmake --install "$build" --prefix "$prefix"
    pc=$(find "$prefix" -name llama-memory.pc)
    [ -n "$pc" ] || fail "no llama-memory.pc installed"
    libdir=$(dirname "$(dirname "$pc")")
    for f in "$prefix/include/llama-memory.h" "$prefix/include/ggml.h" \
             "$libdir/cmake/llama_memory/llama_memoryConfig.cmake" \
             "$libdir/cmake/llama_memory/llama_memoryConfigVersion.cmake" \
             "$libdir/cmake/ggml/ggml-config.cmake"; do
        [ -f "$f" ] || fail "not installed: $f"
    done
    if [ "$variant" = shared ]; then
        for f in libllama_memory.so libggml.so libggml-base.so libggml-cpu.so; do
            [ -e "$libdir/$f" ] || fail "not installed: $libdir/$f"
        done
        check_shared "$libdir/libllama_memory.so" '^\$ORIGIN$'
        check_soname "$libdir"
    else
        for f in libllama_memory.a libggml.a libggml-base.a libggml-cpu.a; do
            [ -e "$libdir/$f" ] || fail "not installed: $libdir/$f"
        done
        check_static "$libdir/libllama_memory.a"
    fi
    if grep -rlF "$build" "$prefix"; then
        fail "installed files mention the build tree $build"
    fi
    echo "installed:"
    (cd "$prefix" && find . -type f -o -type l | sort | sed 's/^/  /')

    # The installed package on its own: move the build tree out of the way meanwhile.
    mv "$build" "$build.away"
    trap 'mv "$build.away" "$build"' EXIT
    rm -rf "$v/find_package" "$v/pkg_config"
    step "[$variant] find_package consumer" bash -c '
        set -e
        cmake -S "$1/tests/cmake/find_package" -B "$2" -DCMAKE_PREFIX_PATH="$3"
        cmake --build "$2"
        ctest --test-dir "$2" --output-on-failure -V | grep -E "^[0-9]+: ok:|tests passed"
    ' _ "$repo" "$v/find_package" "$prefix"
    if [ "$variant" = shared ]; then
        check_ggml_resolution "$v/find_package/consumer" "$libdir"
        readelf -d "$v/find_package/consumer" | grep -qF "[libllama_memory.so.$(readelf -d "$libdir/libllama_memory.so" |
            sed -n 's/.*(SONAME).*\[libllama_memory\.so\.\(.*\)\]/\1/p')]" ||
            fail "the consumer does not record the versioned soname"
        echo "the consumer needs $(readelf -d "$v/find_package/consumer" | grep -o 'libllama_memory[^]]*')"
    fi
    if [ "$variant" = shared ]; then
        step "[$variant] pkg-config consumer" "$repo/tests/cmake/pkg_config.sh" "$prefix" "$v/pkg_config"
        check_ggml_resolution "$v/pkg_config/consumer_pkg_config" "$libdir"
    else
        step "[$variant] pkg-config consumer" "$repo/tests/cmake/pkg_config.sh" "$prefix" "$v/pkg_config" --static
    fi
    mv "$build.away" "$build"
    trap - EXIT

    if [ "$variant" = shared ]; then
        step "[$variant] an installed ggml (LLAMA_MEMORY_SYSTEM_GGML)" check_system_ggml "$v" "$prefix"
    fi

    step "[$variant] add_subdirectory consumer" bash -c '
        set -e
        cmake -S "$1/tests/cmake/add_subdirectory" -B "$2" -DBUILD_SHARED_LIBS="$3"
        cmake --build "$2"
        ctest --test-dir "$2" --output-on-failure -V | grep -E "^[0-9]+: ok:|tests passed"
    ' _ "$repo" "$v/add_subdirectory" "$shared"
    if [ "$variant" = shared ]; then
        check_ggml_resolution "$v/add_subdirectory/consumer" "$v/add_subdirectory/llama_memory/ggml-lib"
    fi
done

echo
echo "All CMake integration checks passed (${variants[*]}). Times:"
printf '  %s\n' "${summary[@]}"
