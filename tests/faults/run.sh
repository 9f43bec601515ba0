#!/usr/bin/env bash
# The fault suite: runs every scenario (each a script of its own, with its own Postgres,
# dev broker and temp dir), one after the other, and prints one summary line per
# scenario and a total:
#
#   fault-suite: crash_loop: faults=20 messages=24000 tables_equal=yes checks=ok time=21s
#   ...
#   6 passed, 0 failed
#
# Usage: tests/faults/run.sh [SCENARIO...]     (default: all, in the order below)
# Environment: FAULTS_SCALE=short|long (default short), CLICKMART_BIN (the build dir),
# CLICKMART_SRC, FAULTS_SEED, FAULTS_BASELINE, FAULTS_DISK_FULL, CM_KEEP=1 (see lib.sh).
# Exit status: 0 when every scenario passed, 1 otherwise.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export FAULTS_SCALE=${FAULTS_SCALE:-short}
ALL=(crash_loop pg_outage broker_outage slow_pg map_full restart_changes)
if [ $# -gt 0 ]; then SCENARIOS=("$@"); else SCENARIOS=("${ALL[@]}"); fi

passed=0 failed=0 t0=$SECONDS
SUMMARY=()
for s in "${SCENARIOS[@]}"; do
    script=$HERE/$s.sh
    if [ ! -f "$script" ]; then
        echo "run.sh: no scenario '$s' (have: ${ALL[*]})" >&2
        exit 2
    fi
    echo "=== fault-suite: $s (FAULTS_SCALE=$FAULTS_SCALE) ===" >&2
    out=$(mktemp)
    # The scenario's log goes to stderr as it runs; its summary line is on stdout.
    bash "$script" >"$out"
    rc=$?
    line=$(grep -m1 '^fault-suite: ' "$out" || true)
    [ -n "$line" ] || line="fault-suite: $s: faults=? messages=? tables_equal=no checks=failed(no summary, exit $rc)"
    rm -f "$out"
    echo "$line"
    SUMMARY+=("$line")
    if [ "$rc" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "=== fault-suite summary (FAULTS_SCALE=$FAULTS_SCALE, $((SECONDS - t0))s) ===" >&2
for l in "${SUMMARY[@]}"; do echo "$l" >&2; done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
