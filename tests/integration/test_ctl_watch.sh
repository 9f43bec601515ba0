#!/usr/bin/env bash
# `clickmartctl watch`:
#   - stdout not a terminal: one key=value line per sample, --count N stops after N, rates
#     computed from successive /status samples (the first sample has none: "-"), and the
#     rate while events stream in is positive;
#   - on a terminal (a pty, ctl_pty.py): full-screen frames starting with the ANSI clear
#     screen, q quits with exit 0, SIGINT (Ctrl-C) quits with exit 0, and the terminal is
#     restored (alternate screen left, cursor shown);
#   - no daemon: exit 2 at once.
#
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_ctl_watch.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker tools/clickmartctl
cm_pg_start
cm_broker_start 2 clickmart.events
CTL=("$CLICKMART_BIN/tools/clickmartctl" --socket "$CM_DIR/status.sock")
passed=0

cm_daemon_start
cm_wait_for 30 "the status socket" cm_status >/dev/null || cm_die "no /status"

# Events arrive while watch samples: the generator produces at a fixed rate.
"$CLICKMART_BIN/tools/clickmart-gen" --seed 31 --events 6000 --rate 2000 --brokers "$CM_BROKER" \
    --topic "$CM_TOPIC" --quiet >"$CM_DIR/gen.log" 2>&1 </dev/null &
GEN_PID=$!
cm_track_pid "$GEN_PID"
sleep 0.5
"${CTL[@]}" watch --interval 0.5 --count 5 >"$CM_DIR/watch.txt" 2>"$CM_DIR/watch.err" ||
    cm_die "watch exited $? ($(cat "$CM_DIR/watch.err"))"
cat "$CM_DIR/watch.txt" >&2
"$CM_PY" - "$CM_DIR/watch.txt" <<'EOF' || cm_die "watch lines are wrong"
import re, sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 5, "%d lines, want 5 (--count 5)" % len(lines)
rows = []
for line in lines:
    assert "\x1b" not in line, "escape sequence in non-terminal output"
    kv = dict(re.findall(r'(\w+)=(\S+)', line))
    for k in ("ts", "messages", "rate", "accepted", "accepted_rate", "lag", "flushes",
              "rows_written", "pending_rows", "healthy"):
        assert k in kv, "no %s= in %r" % (k, line)
    rows.append(kv)
assert rows[0]["rate"] == "-", "the first sample has no rate yet"
assert all(r["rate"] != "-" for r in rows[1:]), "later samples must have rates"
assert max(float(r["rate"]) for r in rows[1:]) > 0, "no positive rate while events stream in"
msgs = [int(r["messages"]) for r in rows]
assert msgs == sorted(msgs) and msgs[-1] > msgs[0], "messages must grow: %s" % msgs
print("watch lines OK:", len(lines))
EOF
passed=$((passed + 1))
wait "$GEN_PID" || cm_die "clickmart-gen failed"
cm_untrack_pid "$GEN_PID"

for how in q sigint; do
    "$CM_PY" "$HERE/ctl_pty.py" "$CLICKMART_BIN/tools/clickmartctl" "$CM_DIR/status.sock" "$how" \
        >"$CM_DIR/pty.$how.txt" 2>&1 || {
        cat "$CM_DIR/pty.$how.txt" >&2
        cm_die "watch on a terminal failed ($how)"
    }
    tail -n 1 "$CM_DIR/pty.$how.txt" >&2
    passed=$((passed + 1))
done

rc=0
"$CLICKMART_BIN/tools/clickmartctl" --socket "$CM_DIR/missing.sock" watch >/dev/null 2>&1 || rc=$?
[ "$rc" = 2 ] || cm_die "watch without a daemon: exit $rc, want 2"
passed=$((passed + 1))

cm_log "whole test $((SECONDS - CM_T0))s"
echo "$passed passed, 0 failed"
