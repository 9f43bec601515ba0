#!/usr/bin/env bash
# End to end: generator -> dev broker -> clickmartd (killed with SIGKILL part-way, then
# restarted with --exit-at-end) -> Postgres, checked table by table against the
# independent reference (compare.py) recomputed from a kcat dump of the topic.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_pipeline.sh
# Knobs: CM_EVENTS (default 40000), CM_SEED (7), CM_KILL_AFTER (accepted events before
# the SIGKILL, default 5000), CM_KEEP=1 to keep the temp dir.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-40000}
SEED=${CM_SEED:-7}
KILL_AFTER=${CM_KILL_AFTER:-5000}
PARTITIONS=4
TOPIC=clickmart.events

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start "$PARTITIONS" "$TOPIC"

t=$SECONDS
"$CLICKMART_BIN/tools/clickmart-gen" --seed "$SEED" --events "$EVENTS" --brokers "$CM_BROKER" \
    --topic "$CM_TOPIC" --quiet >"$CM_DIR/gen.log" 2>&1 </dev/null ||
    cm_die "clickmart-gen failed (see $CM_DIR/gen.log)"
cm_log "generated $EVENTS events (seed $SEED) in $((SECONDS - t))s"

t=$SECONDS
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_log "dumped the topic in $((SECONDS - t))s: $("$CM_PY" "$HERE/cmtool.py" dump-summary "$DUMP"), $(stat -c %s "$DUMP") bytes"

# Run 1: consume part of the topic, then SIGKILL at an arbitrary moment.
t=$SECONDS
cm_daemon_start
ACCEPTED=-1
accepted_enough() {
    cm_daemon_alive || cm_die "clickmartd exited during run 1 (see $CM_DAEMON_LOG)"
    ACCEPTED=$(cm_status_accepted)
    [ "$ACCEPTED" -gt "$KILL_AFTER" ]
}
if cm_wait_for 120 "more than $KILL_AFTER accepted events" accepted_enough; then
    cm_log "run 1: $ACCEPTED accepted after $((SECONDS - t))s"
else
    cm_log "run 1: only $ACCEPTED accepted after $((SECONDS - t))s; killing it anyway"
fi
cm_daemon_alive || cm_die "clickmartd exited during run 1 (see $CM_DAEMON_LOG)"
cm_daemon_kill9

# Run 2: restart on the same state, consume to the end offsets seen at start, flush, exit.
t=$SECONDS
cm_daemon_start --exit-at-end
cm_daemon_wait 420 || cm_die "clickmartd --exit-at-end still running after 420s"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd --exit-at-end exited with status $CM_DAEMON_RC"
cm_log "run 2 (--exit-at-end) finished in $((SECONDS - t))s"

t=$SECONDS
cm_compare "$DUMP" || cm_die "Postgres differs from the reference"
cm_log "compare passed in $((SECONDS - t))s; whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
