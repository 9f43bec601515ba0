#!/usr/bin/env bash
# Self-test of the bench's analyses (tools/bench.d/benchlib.py). The scale analysis
# (`scale`): synthetic samples of a daemon whose loop thread spends known shares of its
# time in CPU, run-queue waits, commits and its poll must come back as those shares per
# window, with the events/s and CPU per event the samples imply. The A/B summary
# (`ab-summary`, behind `--compare`): medians, B/A and pairs won of synthetic runs.
# The steady mode's freshness per flush (`freshness`) and CPU split (`cpu-split`):
# known samples and counters give back known figures.
# The process lookup (`daemon_child`, tools/bench.d/procs.sh) must find a daemon behind
# a --daemon wrapper script. Needs python3 and pgrep only.
#
#   bash tests/integration/test_bench_selftest.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
export PYTHONDONTWRITEBYTECODE=1
cm_setup

LIB="$HERE/../../tools/bench.d/benchlib.py"
# 2 M messages over 20 s (100 000/s); the process burns 0.8 s of CPU per second, the loop
# thread 0.5 (run queue 0.1, commits 0.25, poll 0.05) in the first 10 s and 0.6 (0.2, 0.3,
# 0) in the last 10 s.
"$CM_PY" - "$CM_DIR/samples.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    acc = {"loop_cpu_s": 0.0, "loop_runq_s": 0.0, "loop_commit_s": 0.0, "loop_idle_s": 0.0}
    for i in range(0, 201):
        t = i / 10.0
        rec = {"t": 1000.0 + t, "messages": int(100000 * t), "lag": 0, "cpu": 0.8 * t,
               "rss_kb": 1024, "hwm_kb": 1024, "anon_kb": 512, "wchar": 0, "wbytes": 0,
               "loop_input_wait_kafka_s": 0.0, "loop_input_wait_validation_s": 0.0}
        rec.update(acc)
        f.write(json.dumps(rec) + "\n")
        first = t < 10.0
        for k, v in (("loop_cpu_s", 0.5 if first else 0.6), ("loop_runq_s", 0.1 if first else 0.2),
                     ("loop_commit_s", 0.25 if first else 0.3), ("loop_idle_s", 0.05 if first else 0.0)):
            acc[k] += v / 10.0
PY
"$CM_PY" "$LIB" scale "$CM_DIR/samples.jsonl" 2000000 1000000 0 >"$CM_DIR/scale.json"
"$CM_PY" - "$CM_DIR/scale.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ws = r["windows"]
assert len(ws) == 2, ws
want = [{"loop_cpu_share": 0.5, "loop_runq_share": 0.1, "loop_commit_share": 0.25, "loop_idle_share": 0.05},
        {"loop_cpu_share": 0.6, "loop_runq_share": 0.2, "loop_commit_share": 0.3, "loop_idle_share": 0.0}]
for w, exp in zip(ws, want):
    assert abs(w["events_per_s"] - 100000) < 1000, w
    assert abs(w["cpu_us_per_event"] - 8.0) < 0.1, w
    for k, v in exp.items():
        assert abs(w[k] - v) < 0.01, (k, w[k], v)
    assert w["loop_input_wait_kafka_share"] == 0.0, w
print("bench scale analysis: the loop thread's shares per window come back as sampled")
PY

# A sampler that starts late (with --preload the daemon consumes at once): the first
# sample already shows 150 000 messages. The first window and the overall rate start
# there, so they still come out at the sampled 100 000/s and 8 µs per event.
"$CM_PY" - "$CM_DIR/late.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(0, 186):
        t = 1.5 + i / 10.0
        f.write(json.dumps({"t": 1000.0 + t, "messages": int(100000 * t), "lag": 0, "cpu": 0.8 * t,
                            "rss_kb": 1024, "hwm_kb": 1024}) + "\n")
PY
"$CM_PY" "$LIB" scale "$CM_DIR/late.jsonl" 2000000 1000000 0 >"$CM_DIR/late.json"
"$CM_PY" - "$CM_DIR/late.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ws = r["windows"]
assert r["first_sampled_messages"] == 150000 and ws[0]["from"] == 150000, r
for w in ws:
    assert abs(w["events_per_s"] - 100000) < 1000 and abs(w["cpu_us_per_event"] - 8.0) < 0.1, w
assert abs(r["events_per_s"] - 100000) < 1000, r
print("bench scale analysis: a late first sample does not inflate the first window")
PY

# The A/B summary (`ab-summary`, behind --compare): three pairs of synthetic throughput
# runs with known figures must give back each side's median, B/A and the pairs B won,
# with "better" in the right direction (events/s higher, CPU lower); a figure missing
# from a run is left out of that pair only.
"$CM_PY" - "$CM_DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
a_eps, b_eps = [200000, 210000, 190000], [220000, 205000, 230000]
a_cpu, b_cpu = [5.0, 5.2, 4.8], [4.9, 5.3, 4.0]
for i in range(3):
    for side, eps, cpu in (("a", a_eps[i], a_cpu[i]), ("b", b_eps[i], b_cpu[i])):
        daemon = {"end_to_end_events_per_s": eps, "cpu_s": cpu}
        if not (side == "b" and i == 2):
            daemon["peak_rss_mb"] = 1000.0 + i
        json.dump({"params": {"seed": "1"}, "daemon": daemon},
                  open(os.path.join(d, "pair%d-%s.json" % (i + 1, side)), "w"))
PY
files=()
for i in 1 2 3; do files+=("$CM_DIR/pair$i-a.json" "$CM_DIR/pair$i-b.json"); done
"$CM_PY" "$LIB" ab-summary "$CM_DIR/ab.json" throughput /x/A /x/B "${files[@]}" >"$CM_DIR/ab.txt"
grep -q 'end to end, events/s' "$CM_DIR/ab.txt" || cm_die "no events/s line: $(cat "$CM_DIR/ab.txt")"
"$CM_PY" - "$CM_DIR/ab.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["pairs"] == 3 and r["a"] == "/x/A" and r["b"] == "/x/B", r
m = {x["figure"]: x for x in r["metrics"]}
e = m["end to end, events/s"]
assert (e["a_median"], e["b_median"], e["b_better_pairs"]) == (200000, 220000, 2), e
assert abs(e["b_over_a"] - 1.1) < 1e-9, e
# The pairs' own ratios are 1.1, 205/210 and 230/190; 2 wins of 3 is no evidence at all.
assert abs(e["pair_b_over_a_median"] - 1.1) < 1e-9 and e["sign_p"] == 1.0, e
c = m["clickmartd CPU, s"]
assert (c["a_median"], c["b_median"], c["b_better_pairs"]) == (5.0, 4.9, 2), c
assert abs(c["pair_b_over_a_median"] - 0.98) < 1e-9 and c["tied_pairs"] == 0, c
rss = m["peak RSS, MB"]
assert rss["pairs"] == 2 and rss["b_better_pairs"] == 0, rss
assert "consume, events/s" not in m, m  # in no run: left out
print("bench A/B summary: medians, B/A and pairs won come back as built")
PY

# The sign test of the A/B summary: six pairs that B wins all give p = 2/64; five wins and
# one tie give 2/32 (the tie is left out); three of six give 1.
"$CM_PY" - "$CM_DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
for i in range(6):
    a = {"end_to_end_events_per_s": 200000 + i, "cpu_s": 5.0, "peak_rss_mb": 700.0}
    b = {"end_to_end_events_per_s": 210000 + i, "cpu_s": 5.0 if i == 0 else 4.0,
         "peak_rss_mb": 690.0 if i % 2 else 710.0}
    for side, dmn in (("a", a), ("b", b)):
        json.dump({"params": {}, "daemon": dmn},
                  open(os.path.join(d, "sign-pair%d-%s.json" % (i + 1, side)), "w"))
PY
files=()
for i in 1 2 3 4 5 6; do files+=("$CM_DIR/sign-pair$i-a.json" "$CM_DIR/sign-pair$i-b.json"); done
"$CM_PY" "$LIB" ab-summary "$CM_DIR/ab-sign.json" throughput /x/A /x/B "${files[@]}" >"$CM_DIR/ab-sign.txt"
grep -q 'sign p' "$CM_DIR/ab-sign.txt" || cm_die "no sign p column: $(cat "$CM_DIR/ab-sign.txt")"
"$CM_PY" - "$CM_DIR/ab-sign.json" <<'PY'
import json, sys
m = {x["figure"]: x for x in json.load(open(sys.argv[1]))["metrics"]}
e, c, rss = m["end to end, events/s"], m["clickmartd CPU, s"], m["peak RSS, MB"]
assert e["b_better_pairs"] == 6 and abs(e["sign_p"] - 0.0312) < 1e-4, e
assert c["b_better_pairs"] == 5 and c["tied_pairs"] == 1 and abs(c["sign_p"] - 0.0625) < 1e-4, c
assert rss["b_better_pairs"] == 3 and rss["sign_p"] == 1.0, rss
print("bench A/B summary: the sign test's p for 6 of 6, 5 of 5 with a tie, and 3 of 6")
PY

# The A/B summary of the scale mode: its figures come from the scale JSON's own places
# (overall events/s, the first and last windows, the daemon's totals), and the growth
# of the CPU per event counts as better when it is lower.
"$CM_PY" - "$CM_DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
a = [(196000, 4.3, 5.6), (227000, 4.9, 5.3)]
b = [(232000, 4.6, 4.4), (220000, 4.9, 5.0)]
for i in range(2):
    for side, (eps, first, last) in (("a", a[i]), ("b", b[i])):
        json.dump({"params": {"preload": "1"},
                   "scale": {"events_per_s": eps, "cpu_per_event_last_vs_first": round(last / first, 3),
                             "first_window": {"cpu_us_per_event": first},
                             "last_window": {"cpu_us_per_event": last, "loop_commit_share": 0.4}},
                   "daemon": {"cpu_s": last * 10, "peak_rss_mb": 1500.0}},
                  open(os.path.join(d, "scale-pair%d-%s.json" % (i + 1, side)), "w"))
PY
files=()
for i in 1 2; do files+=("$CM_DIR/scale-pair$i-a.json" "$CM_DIR/scale-pair$i-b.json"); done
"$CM_PY" "$LIB" ab-summary "$CM_DIR/ab-scale.json" scale /x/A /x/B "${files[@]}" >"$CM_DIR/ab-scale.txt"
"$CM_PY" - "$CM_DIR/ab-scale.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["mode"] == "ab-scale" and r["pairs"] == 2 and r["params"] == {"preload": "1"}, r
m = {x["figure"]: x for x in r["metrics"]}
e = m["events/s overall"]
assert (e["a_median"], e["b_median"], e["b_better_pairs"]) == (211500, 226000, 1), e
g = m["CPU/event last / first"]
assert g["b_better_pairs"] == 2 and g["b_median"] < g["a_median"], g
assert m["CPU us/event, last window"]["b_better_pairs"] == 2, m
assert m["peak RSS, MB"]["b_better_pairs"] == 0, m  # ties count for neither side
assert "state on disk, MB" not in m, m  # in no run: left out
print("bench A/B summary, scale mode: the figures come from the scale JSON")
PY
# The steady mode's freshness (`freshness`): twelve messages of one partition, produced
# every 0.1 s from t = 100 s, become visible in three flushes (samples at 100.5, 101.5
# and 102.5 s showing next_offset 3, 10 and 12). The flushes' newest messages waited
# 0.3, 0.6 and 1.4 s, their oldest 0.5, 1.2 and 1.5 s: spans 0.2, 0.6 and 0.1 s.
"$CM_PY" - "$CM_DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
with open(os.path.join(d, "fresh.jsonl"), "w") as f:
    for t, n in ((100.0, 0), (100.5, 3), (101.0, 3), (101.5, 10), (102.0, 10), (102.5, 12)):
        f.write(json.dumps({"t": t, "next": {"0": n}}) + "\n")
with open(os.path.join(d, "fresh.txt"), "w") as f:
    for o in range(12):
        f.write("0 %d %d\n" % (o, 100000 + 100 * o))
PY
"$CM_PY" "$LIB" freshness "$CM_DIR/fresh.jsonl" "$CM_DIR/fresh.txt" 10 1.2 2000 0.1 >"$CM_DIR/fresh.json"
"$CM_PY" - "$CM_DIR/fresh.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
want = {"messages": 12, "visible_steps": 3, "step_newest_p50_s": 0.6, "step_newest_max_s": 1.4,
        "step_oldest_max_s": 1.5, "step_span_p50_s": 0.2, "step_span_max_s": 0.6, "max_s": 1.5}
for k, v in want.items():
    assert abs(r[k] - v) < 1e-6, (k, r.get(k), v)
print("bench steady freshness: each flush's newest, oldest and span come back")
PY

# The steady mode's CPU split (`cpu-split`): over 10 s, with CLK_TCK ticks per second,
# the daemon used 6 s of CPU, Postgres 4 s, the dev broker 1.5 s, the generator 4 s
# (its rusage) and the machine 17 s of busy time (1 s of it steal, left out) in all;
# the daemon passed 1 GB to write calls for 1 M messages.
"$CM_PY" - "$CM_DIR" "$(getconf CLK_TCK)" <<'PY'
import json, os, sys
d, tck = sys.argv[1], int(sys.argv[2])
def stat(busy, steal):
    # user nice system idle iowait irq softirq steal
    return [busy - steal, 0, 0, 5000, 7, 0, 0, steal]
json.dump({"t": 100.0, "stat": stat(1000, 10), "daemon": 50, "broker": 7, "pg": 30,
           "daemon_wchar": 10**9}, open(os.path.join(d, "snap0.json"), "w"))
json.dump({"t": 110.0, "stat": stat(1000 + 17 * tck, 10 + 1 * tck), "daemon": 50 + 6 * tck,
           "broker": 7 + int(1.5 * tck), "pg": 30 + 4 * tck, "daemon_wchar": 2 * 10**9},
          open(os.path.join(d, "snap1.json"), "w"))
json.dump({"cpu_s": 4.0}, open(os.path.join(d, "gen.json"), "w"))
json.dump({"target_rate": 100000, "p99_s": 2.9}, open(os.path.join(d, "step.json"), "w"))
PY
"$CM_PY" "$LIB" cpu-split "$CM_DIR/step.json" "$CM_DIR/snap0.json" "$CM_DIR/snap1.json" \
    "$CM_DIR/gen.json" 1000000
"$CM_PY" - "$CM_DIR/step.json" "$(nproc)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["cpu_while_producing"]
assert r["p99_s"] == 2.9, r  # the step's own figures stay
want = {"daemon": 0.6, "postgres": 0.4, "broker": 0.15, "generator": 0.4, "machine": 1.6, "rest": 0.05,
        "machine_busy_share": 1.6 / int(sys.argv[2]), "daemon_write_kb_per_message": 1.0}
for k, v in want.items():
    assert abs(c[k] - v) < 0.002, (k, c[k], v)
print("bench steady CPU split: the cores of the daemon, Postgres, generator and broker come back")
PY
# daemon_child (tools/bench.d/procs.sh) finds the daemon behind a --daemon wrapper
# script that execs it: the process then has the binary's name, not the script's. A
# copy of sleep stands in for the daemon, run by a wrapper under a parent shell, as
# the bench runs it under its rusage tool. Named clickmartd, and named like a copy
# kept for an A/B (clickmartd-before, which the kernel shortens to 15 characters).
# shellcheck source=../../tools/bench.d/procs.sh
source "$HERE/../../tools/bench.d/procs.sh"
mkdir -p "$CM_DIR/wrap"
for bin in clickmartd clickmartd-before; do
    cp "$(command -v sleep)" "$CM_DIR/wrap/$bin"
    printf '#!/bin/bash\nexec "%s" "$@"\n' "$CM_DIR/wrap/$bin" >"$CM_DIR/wrap/wrap.sh"
    chmod +x "$CM_DIR/wrap/wrap.sh"
    bash -c '"$1" 30; true' _ "$CM_DIR/wrap/wrap.sh" &
    parent=$!
    cm_track_pid "$parent"
    DAEMON=$CM_DIR/wrap/wrap.sh
    t0=$(date +%s%N)
    child=$(daemon_child "$parent") || cm_die "daemon_child did not find the wrapped $bin"
    ms=$((($(date +%s%N) - t0) / 1000000))
    comm=$(ps -o comm= -p "$child")
    [ "$comm" = "${bin:0:15}" ] || cm_die "daemon_child gave pid $child ($comm), not $bin"
    [ "$ms" -lt 2000 ] || cm_die "daemon_child took $ms ms to find $bin"
    kill "$child" 2>/dev/null || true
    wait "$parent" 2>/dev/null || true
    echo "bench daemon_child: found $bin behind a wrapper script in $ms ms"
done
echo "PASS test_bench_selftest"
