#!/usr/bin/env bash
# Logs: with --log-format json every line clickmartd writes is one valid JSON object with
# "ts" (RFC 3339, UTC), "level" and "msg", through start-up, the periodic summary, a
# Postgres outage (error messages with quotes and newlines), recovery and shutdown; quoted
# key="value" fields arrive whole (the conninfo with its spaces and '='); nothing is
# logged per message (a few thousand events make a few dozen lines); --log-level warn
# leaves out info lines; the text format keeps one line per event too.
#
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_json_logs.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 2 clickmart.events
passed=0
EVENTS=3000

pg_failed_logged() { grep -q 'postgres flush failed' "$CM_DAEMON_LOG"; }
pg_ok_logged() { grep -q 'postgres flush succeeded' "$CM_DAEMON_LOG"; }

cm_gen 41 "$EVENTS"
cm_daemon_start --log-format json --stats-log-interval-ms 300
cm_wait_for 60 "the first flush" pg_ok_logged || cm_die "no flush logged"
cm_pg_stop fast
cm_gen 42 200
cm_wait_for 60 "a failed flush in the log" pg_failed_logged || cm_die "no failure logged"
: >"$CM_DIR/mark"
cm_pg_start
recovered() { [ "$(grep -c 'postgres flush succeeded' "$CM_DAEMON_LOG")" -ge 2 ]; }
cm_wait_for 60 "recovery in the log" recovered || cm_die "no recovery logged"
sleep 1
cm_daemon_signal TERM
cm_daemon_wait 60 || cm_die "clickmartd did not stop"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited $CM_DAEMON_RC"

"$CM_PY" - "$CM_DAEMON_LOG" "$CM_PG" "$EVENTS" <<'EOF' || cm_die "JSON log check failed (log: $CM_DAEMON_LOG)"
import json, re, sys
path, conninfo, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = open(path, "rb").read()
lines = raw.split(b"\n")
assert lines[-1] == b"", "the log does not end with a newline"
lines = lines[:-1]
recs = []
for i, b in enumerate(lines, 1):
    try:
        r = json.loads(b.decode("utf-8"))
    except Exception as e:
        sys.exit("line %d is not valid JSON (%s): %r" % (i, e, b[:300]))
    assert isinstance(r, dict), "line %d is not an object" % i
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", r.get("ts", "")), "line %d: ts" % i
    assert r.get("level") in ("error", "warn", "info", "debug"), "line %d: level" % i
    assert isinstance(r.get("msg"), str) and r["msg"], "line %d: msg" % i
    assert all(isinstance(v, str) for v in r.values()), "line %d: non-string field" % i
    recs.append(r)
msgs = [r["msg"] for r in recs]
for want in ("starting", "progress", "postgres flush failed; will retry", "postgres flush succeeded",
             "signal received: stopping intake and flushing", "final flush done", "stopped"):
    assert want in msgs, "no %r line" % want
start = recs[msgs.index("starting")]
assert start.get("pg") == conninfo, "quoted conninfo not kept whole: %r" % start.get("pg")
assert start.get("topic") == "clickmart.events", start
fail = recs[msgs.index("postgres flush failed; will retry")]
assert fail["level"] == "warn" and fail.get("error") and fail.get("retry_in_ms", "").isdigit(), fail
assert not fail["error"].startswith('"'), "the error keeps its quotes: %r" % fail["error"]
prog = [r for r in recs if r["msg"] == "progress"]
assert len(prog) >= 3, "only %d summary lines" % len(prog)
for k in ("messages", "rate", "accepted", "duplicates", "rejected", "lag", "pending_rows", "flushes"):
    assert k in prog[-1], "summary line without %s: %r" % (k, prog[-1])
assert int(prog[-1]["messages"]) >= events, prog[-1]
# No line per message: the non-summary lines do not grow with the number of events.
other = len(recs) - len(prog)
assert other < 60 and other < events / 20, "%d non-summary lines for %d events" % (other, events)
print("%d JSON lines valid (%d summary lines, %d others)" % (len(recs), len(prog), other))
EOF
passed=$((passed + 1))

# --- --log-level warn: no info lines; text format: one line per event ------------------
# A fresh state, tables and consumer group: the run consumes the whole topic again.
rm -rf "$CM_DIR/state"
cm_psql "drop schema clickmart cascade" >/dev/null 2>&1
cm_daemon_start --log-level warn --exit-at-end --stats-log-interval-ms 100 --group json-logs-2
cm_daemon_wait 120 || cm_die "--exit-at-end run did not finish"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "--exit-at-end run exited $CM_DAEMON_RC"
if grep -q 'level=info' "$CM_DAEMON_LOG"; then
    cm_die "--log-level warn still logged info lines: $(grep -m3 'level=info' "$CM_DAEMON_LOG")"
fi
passed=$((passed + 1))

cm_pg_stop fast
rm -rf "$CM_DIR/state"
cm_pg_start
cm_psql "drop schema if exists clickmart cascade" >/dev/null 2>&1
cm_daemon_start --stats-log-interval-ms 300 --group json-logs-3
cm_wait_for 60 "the first flush" pg_ok_logged || cm_die "no flush logged"
cm_pg_stop fast
cm_gen 43 100
cm_wait_for 60 "a failed flush in the log" pg_failed_logged || cm_die "no failure logged"
cm_pg_start
cm_daemon_signal TERM
cm_daemon_wait 60 || cm_die "clickmartd did not stop"
bad=$(grep -Evn '^ts=[0-9TZ:.-]+ level=(error|warn|info|debug) msg="[^"]*"( |$)' "$CM_DAEMON_LOG" || true)
[ -z "$bad" ] || cm_die "text log lines that are not one event each: $bad"
passed=$((passed + 1))

cm_log "whole test $((SECONDS - CM_T0))s"
echo "$passed passed, 0 failed"
