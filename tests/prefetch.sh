#!/usr/bin/env bash
# The duplicate index's prefetch survives every optimisation level (ctest:
# build.prefetch).
#
# agg_prefetch_packed hashes an event id and prefetches its slot in the
# duplicate index, so that the check a few messages later finds the slot in
# cache (docs/aggregator.md). GCC 12 at -O1 and -O2 once compiled it to the hash
# alone: it found the static helper that issues the prefetch free of side
# effects before inlining it, and deleted the call. CMake's default build type
# (RelWithDebInfo) is -O2, so only -O3 builds fetched ahead. The test builds
# aggregator/agg.c at each level with the compiler CMake found (the first
# argument; default cc) and requires a prefetch instruction in the function.
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${1:-cc}
command -v objdump >/dev/null || {
    echo "prefetch: objdump is missing (Debian package binutils)" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for opt in -O1 -O2 -O3; do
    "$CC" "$opt" -std=c11 -D_GNU_SOURCE -DNDEBUG -I. -c aggregator/agg.c -o "$tmp/agg.o"
    # The function's instructions: the lines after its label, up to the next
    # blank line (the label itself names a prefetch).
    body=$(objdump -d --no-show-raw-insn "$tmp/agg.o" | sed -n '/<agg_prefetch_packed>:/,/^$/p' |
        tail -n +2)
    if [ -z "$body" ]; then
        echo "prefetch: $opt: agg_prefetch_packed not found in agg.o" >&2
        fail=1
    elif grep -Eq $'\t(prefetch[a-z0-9]*|prfm)[ \t]' <<<"$body"; then
        echo "prefetch: $opt: agg_prefetch_packed prefetches"
    else
        echo "prefetch: $opt: agg_prefetch_packed has no prefetch instruction:" >&2
        echo "$body" >&2
        fail=1
    fi
done
exit "$fail"
