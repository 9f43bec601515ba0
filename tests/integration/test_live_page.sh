#!/usr/bin/env bash
# The live page (GET / on the status HTTP listener, daemon/page.html) in headless Chromium:
#   - GET / is HTML, GET /api/snapshot is JSON with status, history, funnel, experiments;
#   - the page loads, fetches api/snapshot and draws its charts: inline SVG elements with ids
#     (chart-rate, chart-lag with their lines, chart-funnel with a bar per stage, a lift
#     chart per experiment with the fixed and sequential intervals);
#   - its numbers match /status (accepted, duplicates, rejected, lag) and, after SIGTERM's
#     final flush, Postgres: the experiments' users, SRM flags and per-variant users
#     (clickmart.experiments, clickmart.experiment_results), the latest day's funnel
#     (clickmart.funnel_daily) and the accepted total (clickmart.partitions);
#   - a screenshot (1280x1600) is written to $CM_DIR/live-page.png (path printed; with
#     CM_LIVE_PAGE_PNG=FILE it is copied there, e.g. docs/live-page.png).
#
# Needs chromium (Debian: chromium; deploy/install-deps.sh installs it) and CLICKMART_BIN.
# Run alone with: CLICKMART_BIN=build bash tests/integration/test_live_page.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

CHROMIUM=${CM_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || cm_die "chromium not found: install Debian's chromium package (deploy/install-deps.sh)"

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 clickmart.events
cm_gen 71 20000
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"
passed=0

PORT=$(cm_free_port)
URL=http://127.0.0.1:$PORT
cm_daemon_start --http-listen "127.0.0.1:$PORT"
settled() {
    cm_daemon_alive || cm_die "clickmartd exited (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP" || return 1
    cm_status | "$CM_PY" -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["flush"]["flushes"] >= 2 and not s["flush"]["in_flight"] else 1)'
}
cm_wait_for 120 "clickmartd to consume everything" settled || cm_die "no catch-up"
sleep 2.5 # a few history samples for the charts

# --- the two HTTP resources ---------------------------------------------------------------
ctype=$(curl -s -o "$CM_DIR/index.html" -w '%{http_code} %{content_type}' "$URL/")
[ "$ctype" = "200 text/html; charset=utf-8" ] || cm_die "GET / answered $ctype"
cmp -s "$CM_DIR/index.html" "$CLICKMART_SRC/daemon/page.html" || cm_die "GET / is not daemon/page.html"
curl -s -f "$URL/api/snapshot" >"$CM_DIR/snapshot.json" || cm_die "GET /api/snapshot failed"
"$CM_PY" - "$CM_DIR/snapshot.json" <<'EOF' || cm_die "bad /api/snapshot"
import json, sys
s = json.load(open(sys.argv[1]))
for k in ("now", "status", "history", "funnel", "experiments", "confidence"):
    assert k in s, "no %s" % k
h = s["history"]
assert h["interval_ms"] == 2000 and len(h["t"]) >= 2, h
assert len(h["t"]) == len(h["rate"]) == len(h["lag"]) == len(h["lag_s"])
assert s["funnel"] and s["experiments"], "no funnel or experiments"
assert s["status"]["accepted"] > 0
print("api/snapshot: %d history samples, %d funnel days, %d experiments"
      % (len(h["t"]), len(s["funnel"]), len(s["experiments"])))
EOF
# Also on the Unix socket, like every endpoint.
curl -s -f --unix-socket "$CM_DIR/status.sock" http://localhost/api/snapshot >/dev/null ||
    cm_die "/api/snapshot not served on the status socket"
passed=$((passed + 1))

# --- headless Chromium ----------------------------------------------------------------------
chrome() { # ARGS...: a fresh profile each time, no network besides the page
    local prof
    prof=$(mktemp -d "$CM_DIR/chrome.XXXXXX")
    timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --disable-dev-shm-usage --user-data-dir="$prof" --virtual-time-budget=5000 "$@" \
        2>>"$CM_DIR/chromium.log"
}
chrome --dump-dom "$URL/" >"$CM_DIR/dom.html" || cm_die "chromium --dump-dom failed (see $CM_DIR/chromium.log)"
cm_status >"$CM_DIR/status.json"
"$CM_PY" - "$CM_DIR/dom.html" "$CM_DIR/status.json" "$CM_DIR/page.json" <<'EOF' || cm_die "the page is wrong (DOM in $CM_DIR/dom.html)"
import json, sys
from html.parser import HTMLParser

class P(HTMLParser):
    def __init__(self):
        super().__init__()
        self.els, self.stack = [], []
    def handle_starttag(self, tag, attrs):
        e = {"tag": tag, "attrs": dict(attrs), "parents": list(self.stack), "text": ""}
        self.els.append(e)
        if tag not in ("br", "img", "meta", "link", "input", "circle", "line", "rect", "path"):
            self.stack.append(e)
    def handle_startendtag(self, tag, attrs):
        self.els.append({"tag": tag, "attrs": dict(attrs), "parents": list(self.stack), "text": ""})
    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break
    def handle_data(self, d):
        for e in self.stack:
            e["text"] += d

p = P()
p.feed(open(sys.argv[1]).read())
st = json.load(open(sys.argv[2]))
byid = {e["attrs"]["id"]: e for e in p.els if "id" in e["attrs"]}
def inside(e, anc):
    return any(x is anc for x in e["parents"])
def cls(e):
    return e["attrs"].get("class", "").split()
problems = []
def check(c, m):
    if not c:
        problems.append(m)

body = next(e for e in p.els if e["tag"] == "body")
check(int(body["attrs"].get("data-snapshots", "0")) >= 1, "the page never loaded a snapshot")
check(byid.get("load-state", {}).get("attrs", {}).get("data-state") == "ok", "load-state is not ok")
for k in ("accepted", "duplicates", "rejected", "lag"):
    v = byid[k]["attrs"].get("data-value")
    check(v == str(st[k]), "#%s shows %r, /status says %r" % (k, v, st[k]))
check(byid["accepted"]["text"].replace(",", "") == str(st["accepted"]), "#accepted text %r" % byid["accepted"]["text"])
# Charts: inline SVG with their drawn elements.
for cid in ("chart-rate", "chart-lag", "chart-funnel"):
    check(cid in byid and byid[cid]["tag"] == "svg", "no svg#%s" % cid)
for lid in ("chart-rate-line", "chart-lag-line"):
    check(lid in byid and byid[lid]["tag"] == "path" and len(byid[lid]["attrs"].get("d", "")) > 10,
          "no drawn %s" % lid)
    check(lid in byid and inside(byid[lid], byid[lid.replace("-line", "")]), "%s outside its svg" % lid)
stages = ["sessions", "product_view", "add_to_cart", "checkout", "purchase"]
funnel = {s: int(byid["funnel-bar-" + s]["attrs"]["data-value"]) for s in stages if "funnel-bar-" + s in byid}
check(len(funnel) == 5, "funnel bars: %s" % sorted(funnel))
check(all(funnel[a] >= funnel[b] for a, b in zip(stages, stages[1:])) and funnel.get("sessions", 0) > 0,
      "funnel not monotone: %s" % funnel)
day = byid["funnel-day"]["text"].split("latest day ")[-1][:10]
rows = [e for e in p.els if e["tag"] == "tr" and "data-day" in e["attrs"]]
check(len(rows) >= 2, "funnel table has %d days" % len(rows))
# Experiments.
exps = {}
for e in p.els:
    if e["tag"] == "div" and "exp" in cls(e) and "data-experiment" in e["attrs"]:
        name = e["attrs"]["data-experiment"]
        users = [x for x in p.els if inside(x, e) and "exp-users" in cls(x)]
        srm = [x for x in p.els if inside(x, e) and "srm" in cls(x)]
        lift = [x for x in p.els if inside(x, e) and x["tag"] == "svg" and "lift-chart" in cls(x)]
        check(len(users) == 1 and len(srm) == 1 and len(lift) == 1, "experiment %s incomplete" % name)
        if lift:
            fixed = [x for x in p.els if inside(x, lift[0]) and "fixed-ci" in cls(x)]
            seq = [x for x in p.els if inside(x, lift[0]) and "seq-ci" in cls(x)]
            check(fixed and seq, "experiment %s: lift chart without intervals" % name)
        variants = {}
        for tr in p.els:
            if tr["tag"] == "tr" and inside(tr, e) and "data-variant" in tr["attrs"]:
                cell = [x for x in p.els if inside(x, tr) and "v-users" in cls(x)]
                variants[tr["attrs"]["data-variant"]] = int(cell[0]["attrs"]["data-value"])
        exps[name] = {"users": int(users[0]["attrs"]["data-value"]) if users else None,
                      "srm": srm[0]["attrs"].get("data-srm") if srm else None,
                      "variants": variants}
check(len(exps) >= 1, "no experiment on the page")
json.dump({"accepted": st["accepted"], "day": day, "funnel": funnel, "experiments": exps},
          open(sys.argv[3], "w"))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("page: loaded, charts drawn, numbers match /status; experiments %s; latest day %s %s"
      % (exps, day, funnel))
EOF
passed=$((passed + 1))

chrome --hide-scrollbars --window-size=1280,1600 --screenshot="$CM_DIR/live-page.png" "$URL/" >/dev/null ||
    cm_die "chromium --screenshot failed (see $CM_DIR/chromium.log)"
size=$(stat -c %s "$CM_DIR/live-page.png" 2>/dev/null || echo 0)
[ "$size" -gt 20000 ] || cm_die "screenshot too small ($size bytes)"
[ "$(head -c 8 "$CM_DIR/live-page.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || cm_die "not a PNG"
if [ -n "${CM_LIVE_PAGE_PNG:-}" ]; then
    cp "$CM_DIR/live-page.png" "$CM_LIVE_PAGE_PNG"
    cm_log "screenshot copied to $CM_LIVE_PAGE_PNG"
fi
cm_log "screenshot: $CM_DIR/live-page.png ($size bytes; CM_KEEP=1 keeps it)"
passed=$((passed + 1))

# --- the same numbers in Postgres after the final flush --------------------------------------
cm_daemon_signal TERM
cm_daemon_wait 60 || cm_die "clickmartd did not stop"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited $CM_DAEMON_RC"
cm_psql "select experiment, users, srm_detected from clickmart.experiments order by 1" >"$CM_DIR/pg.experiments"
cm_psql "select experiment, variant, users from clickmart.experiment_results order by 1, 2" >"$CM_DIR/pg.results"
cm_psql "select sum(accepted) from clickmart.partitions where topic = '$CM_TOPIC'" >"$CM_DIR/pg.accepted"
"$CM_PY" - "$CM_DIR/page.json" "$CM_DIR/pg.experiments" "$CM_DIR/pg.results" "$CM_DIR/pg.accepted" <<'EOF' || cm_die "the page differs from Postgres"
import json, sys
page = json.load(open(sys.argv[1]))
pg_exp = {}
for line in open(sys.argv[2]).read().splitlines():
    name, users, srm = line.split("|")
    pg_exp[name] = (int(users), {"t": "true", "f": "false"}.get(srm, srm))
pg_var = {}
for line in open(sys.argv[3]).read().splitlines():
    name, variant, users = line.split("|")
    pg_var.setdefault(name, {})[variant] = int(users)
problems = []
shown = {n: (e["users"], e["srm"]) for n, e in page["experiments"].items()}
if shown != pg_exp:
    problems.append("experiments: page %s, Postgres %s" % (shown, pg_exp))
for n, e in page["experiments"].items():
    if e["variants"] != pg_var.get(n):
        problems.append("%s variants: page %s, Postgres %s" % (n, e["variants"], pg_var.get(n)))
acc = int(open(sys.argv[4]).read().strip())
if acc != page["accepted"]:
    problems.append("accepted: page %s, Postgres %s" % (page["accepted"], acc))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("Postgres agrees: experiments %s, accepted %d" % (pg_exp, acc))
EOF
DAY=$("$CM_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["day"])' "$CM_DIR/page.json")
got=$(cm_psql "select sessions, sessions_product_view, sessions_add_to_cart, sessions_checkout, sessions_purchase
               from clickmart.funnel_daily where day = '$DAY' and device = '*' and country = '*'")
want=$("$CM_PY" -c 'import json,sys; f=json.load(open(sys.argv[1]))["funnel"]; print("|".join(str(f[s]) for s in ("sessions","product_view","add_to_cart","checkout","purchase")))' "$CM_DIR/page.json")
[ "$got" = "$want" ] || cm_die "funnel of $DAY: page $want, Postgres $got"
cm_log "funnel of $DAY matches Postgres: $got"
passed=$((passed + 1))

cm_log "whole test $((SECONDS - CM_T0))s"
echo "$passed passed, 0 failed"
