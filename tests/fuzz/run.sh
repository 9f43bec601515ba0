#!/usr/bin/env bash
# Build the message-path fuzzer (clang, libFuzzer + ASan + UBSan) and run it.
#
#   tests/fuzz/run.sh [SECONDS] [libFuzzer flags...]     default 30 s
#   tests/fuzz/run.sh 600                                 a longer run
#   tests/fuzz/run.sh --merge [SECONDS]                   and merge new inputs into the corpus
#   tests/fuzz/run.sh --minimize                          rewrite the corpus to a minimal
#                                                         set with the same coverage
#
# The committed corpus (tests/fuzz/corpus) is only read: inputs the run finds go
# to $FUZZ_BUILD_DIR/run/new, crashes to $FUZZ_BUILD_DIR/run/artifacts, so a run
# leaves the source tree as it was. --merge (or FUZZ_MERGE=1) then adds those of
# the new inputs that bring new coverage to the corpus (libFuzzer's -merge=1).
#
# Environment: FUZZ_BUILD_DIR (default <repo>/build-fuzz), FUZZ_CC (default clang),
# FUZZ_MERGE=1 (as --merge). Exits non-zero on a crash, leak, timeout or
# invariant violation; the last line is a one-line summary.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
FUZZ_DIR=$SRC/tests/fuzz
CORPUS=$FUZZ_DIR/corpus
BUILD=${FUZZ_BUILD_DIR:-$SRC/build-fuzz}
MERGE=${FUZZ_MERGE:-0}
MINIMIZE=0

while [ $# -gt 0 ]; do
    case $1 in
    --merge) MERGE=1; shift ;;
    --minimize) MINIMIZE=1; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
    esac
done
SECS=30
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    SECS=$1
    shift
fi

summary() { echo "fuzz: $*"; }

command -v "${FUZZ_CC:-clang}" >/dev/null 2>&1 || {
    summary "FAIL: ${FUZZ_CC:-clang} not found (deploy/install-deps.sh installs clang)"
    exit 2
}

# Build (RelWithDebInfo: -O2 -g, plus the sanitizers set in CMakeLists.txt).
WORK=$BUILD/run
NEW=$WORK/new
ART=$WORK/artifacts
TMP=$WORK/tmp
LOG=$WORK/fuzz.log
mkdir -p "$WORK"
LOG_BUILD=$WORK/build.log
trap 'rm -rf "$TMP"' EXIT
if ! { cmake -S "$FUZZ_DIR" -B "$BUILD" -DCMAKE_C_COMPILER="${FUZZ_CC:-clang}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
    cmake --build "$BUILD" -j"$(nproc)"; } >"$LOG_BUILD" 2>&1; then
    cat "$LOG_BUILD" >&2
    summary "FAIL: build failed"
    exit 2
fi
FUZZER=$BUILD/fuzz_message

# The previous run's crashes, if any, are kept one run longer in artifacts.prev.
rm -rf "$TMP" "$ART.prev"
[ -d "$ART" ] && mv "$ART" "$ART.prev"
mkdir -p "$NEW" "$ART" "$TMP"

export TMPDIR=$TMP                           # the harness's LMDB state goes here
export CLICKMART_FUZZ_HISTORY_DIR=$ART       # inputs since the last state reset
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

COMMON=(-max_len=70000 -timeout=5 -rss_limit_mb=2048 -dict="$FUZZ_DIR/json.dict"
        -artifact_prefix="$ART/")

if [ "$MINIMIZE" = 1 ]; then
    # A fresh corpus holding only inputs that add coverage, then swapped in.
    MIN=$WORK/minimized
    rm -rf "$MIN"
    mkdir -p "$MIN"
    (cd "$WORK" && "$FUZZER" "${COMMON[@]}" -merge=1 "$MIN" "$CORPUS" "$NEW") >"$LOG" 2>&1 || {
        tail -n 30 "$LOG" >&2
        summary "FAIL: minimizing the corpus failed (log: $LOG)"
        exit 1
    }
    before=$(find "$CORPUS" -type f | wc -l)
    find "$CORPUS" -type f -delete
    cp "$MIN"/* "$CORPUS"/
    rm -rf "$MIN"
    summary "OK: corpus minimized from $before (+$(find "$NEW" -type f | wc -l) new) to $(find "$CORPUS" -type f | wc -l) inputs"
    exit 0
fi

# New inputs land in the first directory ($NEW); the committed corpus is read only.
set +e
(cd "$WORK" && "$FUZZER" "${COMMON[@]}" -max_total_time="$SECS" -print_final_stats=1 \
    "$@" "$NEW" "$CORPUS") >"$LOG" 2>&1
rc=$?
set -e

stat() { sed -n "s/^stat::$1: *//p" "$LOG" | tail -n 1; }
runs=$(stat number_of_executed_units)
eps=$(stat average_exec_per_sec)
added=$(stat new_units_added)
cov=$(grep -o 'cov: [0-9]*' "$LOG" | tail -n 1 | cut -d' ' -f2)
corp=$(find "$CORPUS" -type f | wc -l)

if grep -q 'disabled leak detection' "$LOG"; then
    echo "fuzz: warning: libFuzzer disabled leak detection (memory grows between inputs)" >&2
fi

if [ $rc -ne 0 ]; then
    # Show the report (the harness's or the sanitizer's, with the stack).
    first=$(grep -n -m1 -E 'invariant violated|^==[0-9]+==ERROR|runtime error|ERROR: libFuzzer' \
        "$LOG" | cut -d: -f1 || true)
    if [ -n "$first" ]; then
        sed -n "${first},\$p" "$LOG" | grep -v '^0x' | head -n 80 >&2
    else
        tail -n 60 "$LOG" >&2
    fi
    art=$(find "$ART" -maxdepth 1 -type f ! -name 'history-*' | head -n 1)
    hist=$(find "$ART" -maxdepth 1 -type f -name 'history-*' | head -n 1)
    summary "FAIL (exit $rc) after ${SECS}s: ${runs:-?} runs; input: ${art:-none}; history: ${hist:-none}; log: $LOG"
    exit 1
fi

merged=""
if [ "$MERGE" = 1 ]; then
    before=$corp
    (cd "$WORK" && "$FUZZER" "${COMMON[@]}" -merge=1 "$CORPUS" "$NEW") >"$WORK/merge.log" 2>&1 || {
        tail -n 30 "$WORK/merge.log" >&2
        summary "FAIL: merge into the corpus failed (log: $WORK/merge.log)"
        exit 1
    }
    corp=$(find "$CORPUS" -type f | wc -l)
    rm -rf "$NEW"
    mkdir -p "$NEW"
    merged="; merged $((corp - before)) into the corpus"
fi
summary "OK ${SECS}s: ${runs:-?} runs, ${eps:-?} exec/s, cov ${cov:-?}, corpus $corp + ${added:-0} new (in $NEW)$merged, no crash, leak or timeout"
