#!/usr/bin/env bash
# Self-test of the bench's scale analysis (tools/bench.d/benchlib.py `scale`): synthetic
# samples of a daemon whose loop thread spends known shares of its time in CPU, run-queue
# waits, commits and its poll must come back as those shares per window, with the events/s
# and CPU per event the samples imply. Needs python3 only.
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
echo "PASS test_bench_selftest"
