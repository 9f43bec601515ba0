#!/usr/bin/env bash
# The hand-made messages of handmade.py (the reference self-test's data set plus ~100
# corner cases of CONTRACT §1.1: RFC 3339 variants, int64/double limits, money rounding,
# items, lengths in bytes, JSON strictness, precedence) go through the real daemon, which
# must then agree with the reference table by table. Each message is produced to its own
# partition in order, null values as null messages.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_edge_cases.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

cm_setup
cm_require clickmartd tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 clickmart.events

PYTHONDONTWRITEBYTECODE=1 "$CM_PY" "$HERE/handmade.py" produce "$CM_BROKER" "$CM_TOPIC" --edge
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_log "produced: $("$CM_PY" "$HERE/cmtool.py" dump-summary "$DUMP")"

cm_daemon_start --exit-at-end
cm_daemon_wait 120 || cm_die "clickmartd --exit-at-end still running after 120s"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd --exit-at-end exited with status $CM_DAEMON_RC"

cm_compare "$DUMP" || cm_die "Postgres differs from the reference on the hand-made messages"
echo "1 passed, 0 failed"
