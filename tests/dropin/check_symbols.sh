#!/usr/bin/env bash
# The drop-in libllama exports the same C symbols as stock libllama:
#
#   tests/dropin/check_symbols.sh <drop-in libllama> <stock libllama>
#
# Shared libraries: the dynamic symbol table (`nm -D --defined-only`); static archives: the
# global defined symbols (`nm -g --defined-only`). C names only: C++-mangled names (_Z...,
# internal members of the memory classes, which the adapters change) are left out. Prints the
# count and, on a difference, the symbols only one of them has. Exit 1 on a difference.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <drop-in libllama> <stock libllama>" >&2; exit 2; }
NM=${NM:-nm}

c_symbols() {
    local lib=$1
    case $lib in
        *.a) "$NM" -g --defined-only "$lib" 2>/dev/null | awk 'NF >= 3 {print $NF}' ;;
        *) "$NM" -D --defined-only "$lib" | awk '{print $NF}' ;;
    esac | grep -v '^_Z' | grep -vE '^(_init|_fini|_edata|_end|__bss_start)$' | sort -u
}

dropin=$(c_symbols "$1")
stock=$(c_symbols "$2")
n_dropin=$(grep -c . <<<"$dropin" || true)
n_stock=$(grep -c . <<<"$stock" || true)
echo "drop-in $1: $n_dropin C symbols"
echo "stock   $2: $n_stock C symbols"
[ "$n_stock" -gt 0 ] || { echo "FAIL: no C symbols in $2" >&2; exit 1; }
if [ "$dropin" != "$stock" ]; then
    echo "FAIL: the exported C symbol sets differ" >&2
    echo "only in the drop-in:" >&2
    comm -23 <(echo "$dropin") <(echo "$stock") | sed 's/^/  /' >&2
    echo "only in stock:" >&2
    comm -13 <(echo "$dropin") <(echo "$stock") | sed 's/^/  /' >&2
    exit 1
fi
echo "ok: identical C symbol sets ($n_stock: $(grep -c '^llama_' <<<"$stock") llama_*, $(grep -vc '^llama_' <<<"$stock") other)"
