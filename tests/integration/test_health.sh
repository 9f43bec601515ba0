#!/usr/bin/env bash
# /healthz thresholds and `clickmartctl health` exit codes (docs/status.md):
#   healthy                           -> 200 "ok", exit 0
#   Postgres down                     -> 503 "postgres unavailable...", exit 1
#   rows pending and no successful flush for --health-max-flush-age-ms
#                                     -> 503 "no successful flush for N s...", exit 1
#   Postgres back                     -> 200 again
#   every broker down (devbroker SIGUSR1) -> 503 "kafka brokers unreachable"
#   daemon gone                       -> exit 2; usage error -> exit 64
# /status carries the same verdict in "healthy" and "health".
#
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_health.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker tools/clickmartctl
cm_pg_start
cm_broker_start 2 clickmart.events
CTL=("$CLICKMART_BIN/tools/clickmartctl" --socket "$CM_DIR/status.sock")
# health_is CODE PATTERN: /healthz answers HTTP CODE with a body matching PATTERN, and
# clickmartctl health exits accordingly (0 for 200, 1 for 503).
health_is() {
    local code body rc=0
    code=$(curl -s -o "$CM_DIR/healthz.body" -w '%{http_code}' --max-time 5 \
        --unix-socket "$CM_DIR/status.sock" http://localhost/healthz) || return 1
    body=$(cat "$CM_DIR/healthz.body")
    [ "$code" = "$1" ] || return 1
    printf '%s' "$body" | grep -Eq "$2" || return 1
    "${CTL[@]}" health >"$CM_DIR/ctl.out" 2>&1 || rc=$?
    [ "$rc" = "$([ "$1" = 200 ] && echo 0 || echo 1)" ] || return 1
    [ "$(cat "$CM_DIR/ctl.out")" = "$body" ] || return 1
}
status_field() { cm_status | "$CM_PY" -c "import json,sys; print(json.dumps(json.load(sys.stdin).get('$1')))"; }

cm_gen 21 2000
cm_daemon_start --health-max-flush-age-ms 3000 --pg-retry-max-ms 500
cm_wait_for 60 "a healthy daemon" health_is 200 '^ok$' || cm_die "not healthy: $(cat "$CM_DIR/healthz.body")"
[ "$(status_field healthy)" = true ] && [ "$(status_field health)" = null ] || cm_die "/status disagrees"
cm_ok "healthy: 200 ok, clickmartctl health exit 0, /status healthy"

# --- Postgres down, then rows pending for longer than the limit -------------------------
cm_pg_stop fast
cm_wait_for 60 "503 postgres unavailable" health_is 503 'postgres unavailable' ||
    cm_die "no 503 with Postgres down: $(cat "$CM_DIR/healthz.body")"
[ "$(status_field healthy)" = false ] || cm_die "/status should say unhealthy"
status_field health | grep -q 'postgres unavailable' || cm_die "/status health reason missing"
cm_ok "Postgres down: 503, exit 1, /status health reason"

cm_gen 22 300 # new rows that cannot be flushed
cm_wait_for 60 "503 no successful flush" health_is 503 'no successful flush for [0-9]+ s with rows pending \(limit 3 s\)' ||
    cm_die "flush-age threshold not reported: $(cat "$CM_DIR/healthz.body")"
grep -q 'postgres unavailable' "$CM_DIR/healthz.body" || cm_die "both reasons should be listed"
grep -q '^clickmart_healthy 0$' <("${CTL[@]}" metrics) || cm_die "clickmart_healthy should be 0"
cm_ok "no flush for longer than --health-max-flush-age-ms with rows pending: 503 with both reasons"

cm_pg_start
cm_wait_for 60 "healthy again after Postgres came back" health_is 200 '^ok$' ||
    cm_die "still unhealthy: $(cat "$CM_DIR/healthz.body")"
cm_ok "Postgres back: 200 again"

# --- a flush slower than the interval: the next one starts when it is done, not a tick later
# A transaction holds users locked for 3 s (six 500 ms ticks) while new rows arrive.
late0=$(cm_status | "$CM_PY" -c "import json,sys; print(json.load(sys.stdin)['flush']['late_starts'])")
cm_psql "BEGIN; LOCK TABLE clickmart.users IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT;" \
    >/dev/null &
LOCK_PID=$!
cm_track_pid "$LOCK_PID"
cm_gen 23 300
wait "$LOCK_PID" || cm_die "the locking transaction failed"
cm_untrack_pid "$LOCK_PID"
late_started() {
    local n
    n=$(cm_status | "$CM_PY" -c "import json,sys; print(json.load(sys.stdin)['flush']['late_starts'])") || return 1
    [ "$n" -gt "$late0" ]
}
cm_wait_for 30 "a flush started late after the slow one" late_started ||
    cm_die "no late flush start after a flush that outlasted six ticks: $(cm_status)"
cm_wait_for 60 "healthy after the slow flush" health_is 200 '^ok$' ||
    cm_die "unhealthy after the slow flush: $(cat "$CM_DIR/healthz.body")"
cm_ok "a flush that outlasts the interval: the next starts as soon as it is done (late_starts)"

# --- every broker down -------------------------------------------------------------------
kill -USR1 "$CM_BROKER_PID"
cm_wait_for 90 "503 kafka brokers unreachable" health_is 503 'kafka brokers unreachable' ||
    cm_die "broker outage not reported: $(cat "$CM_DIR/healthz.body")"
[ "$(status_field broker_up)" = false ] || cm_die "/status broker_up should be false"
cm_ok "brokers down: 503 kafka brokers unreachable"
kill -USR2 "$CM_BROKER_PID"

# --- exit codes without a daemon, and usage errors ---------------------------------------
cm_daemon_signal TERM
cm_daemon_wait 60 || cm_die "clickmartd did not stop"
rc=0
"${CTL[@]}" health >/dev/null 2>"$CM_DIR/ctl.err" || rc=$?
[ "$rc" = 2 ] || cm_die "health with no daemon: exit $rc, want 2"
grep -q 'cannot reach clickmartd' "$CM_DIR/ctl.err" || cm_die "no reason on stderr"
rc=0
"${CTL[@]}" bogus >/dev/null 2>&1 || rc=$?
[ "$rc" = 64 ] || cm_die "unknown command: exit $rc, want 64"
rc=0
"${CTL[@]}" status --interval 1 >/dev/null 2>&1 || rc=$?
[ "$rc" = 64 ] || cm_die "--interval outside watch: exit $rc, want 64"
cm_ok "no daemon: exit 2; usage errors: exit 64"

cm_log "whole test $((SECONDS - CM_T0))s"
cm_summary
