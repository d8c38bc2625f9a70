#!/usr/bin/env bash
# Regenerates ggml/src/bindings.rs, the committed Rust bindings of ggml.
#
#   scripts/regen-ggml-bindings.sh           rewrite ggml/src/bindings.rs
#   scripts/regen-ggml-bindings.sh --check   regenerate into a temp file, show
#                                            the diff and exit 1 if it differs
#
# Uses a pinned bindgen-cli (installed into <repo>/.tools on first use) with the
# flags in ggml/bindgen.flags, which the `bindgen` feature of ggml-sys also
# reads, and the headers of the pinned upstream that ggml/build.rs uses:
# $LLAMA_CPP_DIR if set, else the llama.cpp folder of the crates.io package
# pinned in ggml/build.rs. The output is byte-identical on every run with the
# same bindgen-cli and libclang (Debian 12: libclang 14).
set -euo pipefail

BINDGEN_VERSION=0.72.1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRATE="$ROOT/ggml"
TOOLS="$ROOT/.tools"
BINDGEN="$TOOLS/bin/bindgen"
COMMITTED="$CRATE/src/bindings.rs"

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac

log() { echo "regen-ggml-bindings: $*" >&2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- the pinned bindgen-cli -------------------------------------------------
if ! "$BINDGEN" --version 2>/dev/null | grep -qx "bindgen $BINDGEN_VERSION"; then
    log "installing bindgen-cli $BINDGEN_VERSION into $TOOLS"
    # --locked: bindgen-cli's own Cargo.lock, so its formatter (prettyplease)
    # is the version ggml/Cargo.toml pins for the build-time generator.
    cargo install bindgen-cli --version "=$BINDGEN_VERSION" --locked --root "$TOOLS"
fi

# --- libclang, which bindgen loads at run time --------------------------------
have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] || ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'
}
if ! have_libclang; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing libclang-dev"
        apt-get update -qq && apt-get install -y -qq libclang-dev >/dev/null
    else
        log "bindgen needs libclang: install libclang-dev (or set LIBCLANG_PATH)"
        exit 1
    fi
fi

# --- the pinned upstream headers --------------------------------------------
if [ -n "${LLAMA_CPP_DIR:-}" ]; then
    llama_cpp="$LLAMA_CPP_DIR"
else
    # Same resolution as ggml/build.rs; the crate and version are read from it
    # so that there is one place to bump them.
    pin_crate="$(sed -n 's/^const PINNED_CRATE: &str = "\(.*\)";$/\1/p' "$CRATE/build.rs")"
    pin_version="$(sed -n 's/^const PINNED_VERSION: &str = "\(.*\)";$/\1/p' "$CRATE/build.rs")"
    if [ -z "$pin_crate" ] || [ -z "$pin_version" ]; then
        log "cannot read PINNED_CRATE/PINNED_VERSION from ggml/build.rs"
        exit 1
    fi
    mkdir -p "$tmp/pin/src"
    : >"$tmp/pin/src/lib.rs"
    cat >"$tmp/pin/Cargo.toml" <<EOF
[package]
name = "pin"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[target.'cfg(any())'.dependencies]
$pin_crate = "=$pin_version"
EOF
    metadata() { (cd "$tmp/pin" && cargo metadata --format-version 1 --manifest-path "$tmp/pin/Cargo.toml" "$@"); }
    # Offline first: no network once the package is in the local registry.
    metadata --offline >"$tmp/metadata.json" 2>/dev/null || metadata >"$tmp/metadata.json"
    llama_cpp="$(python3 - "$tmp/metadata.json" "$pin_crate" "$pin_version" <<'EOF'
import json, os, sys
path, name, version = sys.argv[1:]
with open(path) as f:
    packages = json.load(f)["packages"]
for p in packages:
    if p["name"] == name and p["version"] == version:
        print(os.path.join(os.path.dirname(p["manifest_path"]), "llama.cpp"))
        break
else:
    sys.exit(f"cargo metadata does not list {name} {version}")
EOF
)"
fi
if [ ! -f "$llama_cpp/ggml/include/ggml.h" ]; then
    log "no ggml/include/ggml.h under $llama_cpp"
    exit 1
fi

# --- generate ---------------------------------------------------------------
# One argument per line; blank lines and `#` comments skipped (as build.rs does).
mapfile -t flags < <(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$CRATE/bindgen.flags" | grep -v -e '^#' -e '^$')
out="$tmp/bindings.rs"
# BINDGEN_EXTRA_CLANG_ARGS would silently change the output.
(cd "$CRATE" && env -u BINDGEN_EXTRA_CLANG_ARGS "$BINDGEN" "${flags[@]}" wrapper.h -o "$out" -- "-I$llama_cpp/ggml/include")

if [ "$check" = 1 ]; then
    if ! diff -u "$COMMITTED" "$out"; then
        log "ggml/src/bindings.rs is stale: run scripts/regen-ggml-bindings.sh"
        exit 1
    fi
    log "ggml/src/bindings.rs is up to date"
elif cmp -s "$out" "$COMMITTED"; then
    log "ggml/src/bindings.rs unchanged"
else
    cp "$out" "$COMMITTED"
    log "wrote ggml/src/bindings.rs"
fi
