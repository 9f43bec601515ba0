#!/usr/bin/env bash
# /metrics of a live daemon passes `promtool check metrics` (Prometheus' own linter) with
# no warning, both while healthy and while Postgres is down, holds every metric that
# docs/status.md promises, agrees with /status, and keeps its label cardinality bounded
# (by partitions, reject reasons and tables, never by events or users).
#
# Needs CLICKMART_BIN and promtool (Debian: prometheus; deploy/install-deps.sh installs it).
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_metrics_promtool.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

command -v promtool >/dev/null 2>&1 ||
    cm_die "promtool not found: install Debian's prometheus package (deploy/install-deps.sh)"

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker tools/clickmartctl
cm_pg_start
cm_broker_start 4 clickmart.events

cm_gen 5 4000
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"

cm_daemon_start
flushed() {
    cm_daemon_alive || cm_die "clickmartd exited (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP" || return 1
    cm_status | "$CM_PY" -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["flush"]["flushes"] >= 2 else 1)'
}
cm_wait_for 120 "clickmartd to catch up and flush" flushed || cm_die "no catch-up"

CTL="$CLICKMART_BIN/tools/clickmartctl --socket $CM_DIR/status.sock"
passed=0
check_promtool() { # FILE WHAT
    local out rc=0
    out=$(promtool check metrics <"$1" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out" >&2
        cm_die "promtool check metrics: exit $rc on $2 (output above; metrics in $1)"
    fi
    cm_log "promtool check metrics: clean on $2"
    passed=$((passed + 1))
}

# --- healthy daemon -------------------------------------------------------------------
M=$CM_DIR/metrics.healthy.txt
$CTL metrics >"$M"
cm_status >"$CM_DIR/status.json"
check_promtool "$M" "a healthy daemon"

"$CM_PY" - "$M" "$CM_DIR/status.json" <<'EOF' || cm_die "/metrics content check failed"
import json, re, sys
text = open(sys.argv[1]).read()
st = json.load(open(sys.argv[2]))
series = {}
for line in text.splitlines():
    if not line or line.startswith("#"):
        continue
    m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$', line)
    assert m, "unparsable line: %r" % line
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
    series.setdefault(m.group(1), []).append((labels, float(m.group(3))))

def one(name, **want):
    rows = [v for l, v in series.get(name, []) if all(l.get(k) == x for k, x in want.items())]
    assert len(rows) == 1, "%s%s: %d series" % (name, want, len(rows))
    return rows[0]

problems = []
def check(cond, msg):
    if not cond:
        problems.append(msg)

parts = [p["partition"] for p in st["partitions"]]
for name in ("clickmart_consumer_lag_messages", "clickmart_consumer_lag_seconds",
             "clickmart_watermark_seconds"):
    got = sorted(int(l["partition"]) for l, _ in series.get(name, []))
    check(got == sorted(parts), "%s: partitions %s, want %s" % (name, got, parts))
for p in st["partitions"]:
    pl = str(p["partition"])
    check(one("clickmart_consumer_lag_messages", partition=pl) == p["lag"], "lag of %s" % pl)
    check(abs(one("clickmart_watermark_seconds", partition=pl) - p["watermark"] / 1000) < 0.001,
          "watermark of %s" % pl)
    ls = one("clickmart_consumer_lag_seconds", partition=pl)
    check(abs(ls - p["lag_seconds"]) < 60, "lag_seconds of %s: %s vs %s" % (pl, ls, p["lag_seconds"]))
    for outcome in ("accepted", "duplicates", "rejected"):
        check(one("clickmart_events_total", partition=pl, outcome=outcome) == p[outcome],
              "events_total %s/%s" % (pl, outcome))
for reason, n in st["rejects_by_reason"].items():
    check(one("clickmart_rejects_total", reason=reason) == n, "rejects_total %s" % reason)
check(st["rejected"] > 0 and st["duplicates"] > 0, "the data set should have rejects and duplicates")

flushes = one("clickmart_flushes_total")
check(flushes >= 2, "flushes_total %s" % flushes)
# No crash in this run, so no flush found a new session row already written.
check(one("clickmart_flushes_redone_total") == st["flush"]["redone"] == 0,
      "flushes_redone_total %s, status %s" % (one("clickmart_flushes_redone_total"),
                                              st["flush"]["redone"]))
# The flush counters /status shows are the same counters (/metrics is read first: never more).
for name, key in (("clickmart_flush_late_starts_total", "late_starts"),
                  ("clickmart_flush_ticks_after_part_total", "ticks_after_part"),
                  ("clickmart_flush_parts_ahead_total", "parts_ahead")):
    check(one(name) <= st["flush"][key], "%s %s > status %s" % (name, one(name), st["flush"][key]))
buckets = sorted(((float(l["le"]), v) for l, v in series["clickmart_flush_duration_seconds_bucket"]))
check(len(buckets) >= 10, "only %d histogram buckets" % len(buckets))
check(all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets not cumulative")
check(buckets[-1][0] == float("inf"), "no +Inf bucket")
count = one("clickmart_flush_duration_seconds_count")
check(buckets[-1][1] == count, "+Inf bucket != _count")
check(count >= flushes - 1 and count <= flushes + 1, "histogram count %s vs flushes %s" % (count, flushes))
check(one("clickmart_flush_duration_seconds_sum") > 0, "histogram sum 0")
written = {l["table"]: v for l, v in series["clickmart_rows_written_total"]}
deleted = {l["table"]: v for l, v in series["clickmart_rows_deleted_total"]}
for t in ("sessions", "users", "funnel_daily", "partitions", "rejected_events", "product_daily",
          "experiments", "user_exposure"):
    check(written.get(t, 0) > 0, "rows_written_total{table=%s} is %s" % (t, written.get(t)))
check(set(written) == set(deleted) and len(written) == 14, "tables: %s" % sorted(written))
# Scraped at one instant; the total and the per-table counters come from the same flushes.
check(sum(written.values()) + sum(deleted.values()) == one("clickmart_flush_rows_total"),
      "rows per table do not add up to clickmart_flush_rows_total")
last = one("clickmart_last_flush_success_timestamp_seconds")
check(abs(last - st["flush"]["last_at"] / 1000) < 5, "last flush time")
check(one("clickmart_state_bytes") > 0 and one("clickmart_state_map_bytes") >= one("clickmart_state_bytes"),
      "state bytes")
check(0 < one("clickmart_state_map_used_ratio") <= 1, "map ratio")
for name, want in (("clickmart_postgres_up", 1), ("clickmart_broker_up", 1), ("clickmart_paused", 0),
                   ("clickmart_healthy", 1)):
    check(one(name) == want, "%s = %s, want %s" % (name, one(name), want))
check(one("clickmart_health_max_flush_age_seconds") == 5 * 0.5 + 30, "default max flush age")
check(one("clickmart_build_info", version=st["version"]) == 1, "build_info")
# Bounded cardinality: a fixed number of series plus a few per partition.
n = sum(len(v) for v in series.values())
bound = 80 + 5 * len(parts) * 2
check(n <= bound, "%d series (bound %d)" % (n, bound))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("metrics content: %d series, all checks passed" % n)
EOF
passed=$((passed + 1))

# --- Postgres down: the failure state must lint clean too ------------------------------
cm_pg_stop fast
pg_down() { $CTL metrics 2>/dev/null | grep -q '^clickmart_postgres_up 0$'; }
cm_wait_for 60 "clickmart_postgres_up 0" pg_down || cm_die "postgres_up did not drop"
M2=$CM_DIR/metrics.pgdown.txt
$CTL metrics >"$M2"
check_promtool "$M2" "a daemon with Postgres down"
grep -q '^clickmart_healthy 0$' "$M2" || cm_die "clickmart_healthy should be 0 with Postgres down"
grep -Eq '^clickmart_flush_failures_total [1-9]' "$M2" || cm_die "no flush failures counted"
passed=$((passed + 1))
cm_pg_start

cm_log "whole test $((SECONDS - CM_T0))s"
echo "$passed passed, 0 failed"
