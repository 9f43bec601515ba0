#!/usr/bin/env bash
# SIGTERM ends clickmartd cleanly: with a small data set fully consumed (every
# partition's lag 0 in /status), SIGTERM must make it flush and exit 0 within 20 s, and
# Postgres must then match the reference exactly (so the final flush happened).
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_sigterm.sh
# Knobs: CM_EVENTS (default 5000), CM_SEED (11), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-5000}
SEED=${CM_SEED:-11}
TOPIC=clickmart.events

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 "$TOPIC"

cm_gen "$SEED" "$EVENTS"
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_log "generated and dumped: $("$CM_PY" "$HERE/cmtool.py" dump-summary "$DUMP")"

t=$SECONDS
# shellcheck disable=SC2119 # no extra flags
cm_daemon_start
caught_up() {
    cm_daemon_alive || cm_die "clickmartd exited before SIGTERM (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP"
}
cm_wait_for 180 "clickmartd to consume every partition to its end (lag 0)" caught_up ||
    cm_die "clickmartd did not catch up; last /status: $(cm_status 2>&1 | head -c 2000)"
cm_log "caught up after $((SECONDS - t))s (accepted $(cm_status_accepted)); sending SIGTERM"

t=$SECONDS
cm_daemon_signal TERM
cm_daemon_wait 20 || cm_die "clickmartd still running 20s after SIGTERM"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC after SIGTERM"
cm_log "exited 0 within $((SECONDS - t))s of SIGTERM"

cm_compare "$DUMP" || cm_die "Postgres differs from the reference after SIGTERM"
cm_log "whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
