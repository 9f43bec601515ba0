#!/usr/bin/env bash
# Self-test of the independent reference (reference.py): a small hand-made kcat dump
# whose expected tables were worked out by hand from shared/CONTRACT.md.  Needs only
# python3: no daemon, broker or Postgres.
#
# What it pins down:
#   - a late event (partition 0, offset 6) that merges two sessions into one;
#   - a gap of exactly session_gap stays in the session (e02 -> e03, e31 -> e32), one of
#     session_gap + 1 ms starts a new one (e32 -> e33);
#   - duplicates (first copy wins), and a re-sent event that is too_late (too_late first);
#   - too_late at watermark - allowed_lateness - 1 ms, accepted exactly at the bound (e08);
#   - future_timestamp at now + max_future + 1 ms, accepted exactly at the bound (e13);
#   - payload_too_large at max_event_bytes + 1, accepted exactly at max_event_bytes;
#   - every reject reason and the precedence missing_field < bad_type < bad_value, ties by
#     field order, validation before future_timestamp;
#   - device/country of the earliest event (by ts, then event_id) that has one, ""/null
#     meaning absent, and 'unknown';
#   - RFC 3339 strings with a space separator, an offset and a fraction cut to ms;
#   - cents by llround(amount * 100.0): 0.125 -> 13, 19.99 -> 1999, 1e12 -> 1e14;
#   - funnel stages (a purchase without product_view/checkout stays at stage 1) and the
#     funnel_daily roll-ups with distinct users.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/clickmart-selftest.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

NOW=1700092800000 # 2023-11-16T00:00:00Z; D = 2023-11-15T00:00:00Z = 1700006400000

python3 - "$TMP/topic.dump" <<'PY'
import json, sys

D = 1700006400000
M = 60000
NOW = 1700092800000

def ev(eid, uid, etype, ts, **kw):
    d = {"event_id": eid, "user_id": uid, "event_type": etype, "ts": ts}
    d.update(kw)
    return json.dumps(d).encode()

def padded(raw, size):
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))

def raw(s):
    return s.encode("utf-8") if isinstance(s, str) else s

P0 = [
    ev("e01", "u1", "page_view", D, country="DE"),
    ev("e02", "u1", "product_view", D + M, device="desktop", country="FR", product_id="p1"),
    ev("e03", "u1", "add_to_cart", D + M + 1800000, device="mobile"),     # gap exactly 30 min
    ev("e04", "u1", "checkout", D + 31 * M + 1800001),                    # gap 30 min + 1 ms
    ev("e05", "u1", "purchase", D + 62 * M, amount=19.99,
       items=[{"product_id": "p1", "quantity": 2, "price": 9.995}]),
    ev("e02", "u1", "page_view", D + M),                                  # duplicate
    ev("e06", "u1", "page_view", D + 46 * M),                             # late: merges
    ev("e07", "u1", "page_view", D + 62 * M - 172800000 - 1),             # too_late by 1 ms
    ev("e08", "u1", "page_view", D + 62 * M - 172800000, device=None, country=""),  # at the bound
    ev("e09", "u1", "page_view", "2023-11-15 02:00:00.999999+01:00"),     # D + 1 h + 999 ms
]

P1 = [
    ev("a01", "u2", "experiment_assignment", D + 10 * M, experiment="exp1", variant="control"),
    ev("e10", "u2", "product_view", D + 10 * M, device="tablet", country="US"),
    ev("e11", "u2", "add_to_cart", D + 12 * M),
    ev("e12", "u2", "purchase", D + 13 * M, amount=0.125, items=""),
    ev("e13", "u2", "page_view", NOW + 3600000),                          # exactly max_future
    ev("e14", "u2", "page_view", NOW + 3600001),                          # future_timestamp
    None,                                                                 # 6 null value
    b"",                                                                  # 7 empty value
    raw('{"event_id":"r8","user_id":"u","event_type":"page_view","ts":1700000000000,"x":"\\ud800"}'),
    raw('{"event_id":"r9","user_id":"u","event_type":"page_view","ts":1700000000000,"ts":1700000000000}'),
    raw('{"event_id":"r10","user_id":"u","event_type":"page_view","ts":1700000000000,"x":"a\\u0000"}'),
    b'{"event_id":"r11\xff","user_id":"u","event_type":"page_view","ts":1700000000000}',
    raw('{"event_id":"r12","user_id":"u","event_type":"page_view","ts":1700000000000,"x":NaN}'),
    raw('[1,2]'),                                                         # 13 not_an_object
    padded(ev("r14", "u2", "page_view", D + 11 * M), 65537),              # 14 too large
    padded(ev("big", "u2", "page_view", D + 11 * M), 65536),              # 15 accepted
    raw('{"event_id":5,"user_id":"u"}'),                                  # 16 missing event_type
    raw('{"event_id":"r17","user_id":"u","event_type":"page_view","ts":1.7e12,"device":"%s"}' % ("x" * 40)),
    raw('{"event_id":"","user_id":"u","event_type":"page_view","ts":1700000000000,"country":"%s"}' % ("x" * 40)),
    ev("r19", "u", "Page_view", 1700000000000),
    ev("r20", "u", "page_view", "2023-11-15T00:00:60Z"),
    ev("r21", "u", "purchase", 1700000000000, items=[{"quantity": 2}]),
    raw('{"event_id":"r22","user_id":"u","event_type":"purchase","ts":1700000000000,"amount":5,'
        '"items":[{"product_id":"p","quantity":2.0}],"device":7}'),
    ev("r23", "u", "purchase", 1700000000000, amount=5, items=[{"product_id": "p", "price": -1}],
       country="x" * 33),
    ev("r24", "u", "experiment_assignment", 1700000000000, experiment="exp1"),
    ev("", "u", "page_view", 1700000000000, device=123),                   # 25 bad_type device
    ev("r26", "u", "page_view", NOW + 86400000, product_id="p" * 129),   # 26 before future
    ev("r27", "u2", "page_view", D - 2 * 86400000),                       # 27 too_late
    ev("r28", "é" * 65, "page_view", 1700000000000),                      # 28 130 bytes
    raw('{"event_id":"r29","user_id":"u","event_type":"page_view","ts":1700000000000,"x":1e400}'),
    raw('"str"'),                                                         # 30 not_an_object
    ev("a02", "u2", "experiment_assignment", D + 700000, experiment="exp2", variant="b"),
]

P2 = [
    ev("e30", "u3", "page_view", 946684800000, device="tv"),
    ev("e31", "u3", "page_view", D + 5 * M, device="", country=None, amount="x", items=7,
       experiment=5),
    ev("e32", "u3", "product_view", D + 5 * M + 1800000, country="JP"),   # gap exactly 30 min
    ev("e33", "u3", "add_to_cart", "2023-11-15T01:05:00.0019999Z", device="tv",
       country="JP"),                                                     # D + 35 min + 30 min + 1 ms
    ev("e34", "u3", "page_view", 946684800001),                           # too_late
    ev("a00", "u4", "page_view", D + 20 * M, country="CL"),
    ev("e35", "u4", "purchase", D + 20 * M, amount=1000000000000, country="BR"),
    ev("e36", "u4", "checkout", D + 21 * M),
    ev("e37", "u4", "page_view", 4102444800000),                          # bad_value ts
    ev("e38", "u4", "page_view", "2023-11-15T00:20:00Z", device="mobile"),
    ev("e31", "u3", "page_view", D + 6 * M),                              # duplicate
    ev("e30", "u3", "page_view", 946684800000, device="tv"),              # dup, but too_late
]

# Interleave the partitions as kcat does, to check that the dump is regrouped.
out = bytearray()
rows = []
for p, msgs in enumerate((P0, P1, P2)):
    for o, v in enumerate(msgs):
        rows.append((o, p, v))
rows.sort(key=lambda r: (r[0], r[1]))
for o, p, v in rows:
    out += b"%d %d %d\n" % (p, o, -1 if v is None else len(v))
    out += (v or b"") + b"\n"
with open(sys.argv[1], "wb") as f:
    f.write(out)
PY

fail=0
check() {
    local table=$1 expected=$2 actual
    actual=$(python3 "$HERE/reference.py" --dump "$TMP/topic.dump" --topic clickmart.events \
        --now-ms "$NOW" --print "$table" | tr '\t' '|')
    if [ "$actual" = "$expected" ]; then
        echo "ok: $table"
    else
        echo "FAIL: $table"
        diff -u <(printf '%s\n' "$expected") <(printf '%s\n' "$actual") | sed 's/^/    /'
        fail=$((fail + 1))
    fi
}

check sessions "$(
    cat <<'EOF'
# session_id|user_id|started_at|ended_at|events|page_views|product_views|add_to_carts|checkouts|purchases|revenue|device|country|funnel_stage
a00|u4|1700007600000|1700007660000|4|2|0|0|1|1|100000000000000|mobile|CL|1
e01|u1|1700006400000|1700010120000|7|3|1|1|1|1|1999|desktop|DE|5
e08|u1|1699837320000|1699837320000|1|1|0|0|0|0|0|unknown|unknown|1
e10|u2|1700007000000|1700007180000|4|1|1|1|0|1|13|tablet|US|3
e13|u2|1700096400000|1700096400000|1|1|0|0|0|0|0|unknown|unknown|1
e30|u3|946684800000|946684800000|1|1|0|0|0|0|0|tv|unknown|1
e31|u3|1700006700000|1700008500000|2|1|1|0|0|0|0|unknown|JP|2
e33|u3|1700010300001|1700010300001|1|0|0|1|0|0|0|tv|JP|1
EOF
)"

check users "$(
    cat <<'EOF'
# user_id|first_seen|last_seen|device|country|events|sessions|orders|revenue|first_order_at|last_order_at
u1|1699837320000|1700010120000|desktop|DE|8|2|1|1999|1700010120000|1700010120000
u2|1700007000000|1700096400000|tablet|US|5|2|1|13|1700007180000|1700007180000
u3|946684800000|1700010300001|tv|JP|4|3|0|0|\N|\N
u4|1700007600000|1700007660000|mobile|CL|4|1|1|100000000000000|1700007600000|1700007600000
EOF
)"

check funnel_daily "$(
    cat <<'EOF'
# day|device|country|sessions|sessions_product_view|sessions_add_to_cart|sessions_checkout|sessions_purchase|users|users_product_view|users_add_to_cart|users_checkout|users_purchase|orders|revenue
10957|*|*|1|0|0|0|0|1|0|0|0|0|0|0
10957|*|unknown|1|0|0|0|0|1|0|0|0|0|0|0
10957|tv|*|1|0|0|0|0|1|0|0|0|0|0|0
10957|tv|unknown|1|0|0|0|0|1|0|0|0|0|0|0
19674|*|*|1|0|0|0|0|1|0|0|0|0|0|0
19674|*|unknown|1|0|0|0|0|1|0|0|0|0|0|0
19674|unknown|*|1|0|0|0|0|1|0|0|0|0|0|0
19674|unknown|unknown|1|0|0|0|0|1|0|0|0|0|0|0
19676|*|*|5|3|2|1|1|4|3|2|1|1|3|100000000002012
19676|*|CL|1|0|0|0|0|1|0|0|0|0|1|100000000000000
19676|*|DE|1|1|1|1|1|1|1|1|1|1|1|1999
19676|*|JP|2|1|0|0|0|1|1|0|0|0|0|0
19676|*|US|1|1|1|0|0|1|1|1|0|0|1|13
19676|desktop|*|1|1|1|1|1|1|1|1|1|1|1|1999
19676|desktop|DE|1|1|1|1|1|1|1|1|1|1|1|1999
19676|mobile|*|1|0|0|0|0|1|0|0|0|0|1|100000000000000
19676|mobile|CL|1|0|0|0|0|1|0|0|0|0|1|100000000000000
19676|tablet|*|1|1|1|0|0|1|1|1|0|0|1|13
19676|tablet|US|1|1|1|0|0|1|1|1|0|0|1|13
19676|tv|*|1|0|0|0|0|1|0|0|0|0|0|0
19676|tv|JP|1|0|0|0|0|1|0|0|0|0|0|0
19676|unknown|*|1|1|0|0|0|1|1|0|0|0|0|0
19676|unknown|JP|1|1|0|0|0|1|1|0|0|0|0|0
19677|*|*|1|0|0|0|0|1|0|0|0|0|0|0
19677|*|unknown|1|0|0|0|0|1|0|0|0|0|0|0
19677|unknown|*|1|0|0|0|0|1|0|0|0|0|0|0
19677|unknown|unknown|1|0|0|0|0|1|0|0|0|0|0|0
EOF
)"

check partitions "$(
    cat <<'EOF'
# partition|next_offset|watermark|accepted|duplicates|rejected
0|10|1700010120000|8|1|1
1|32|1700096400000|7|0|25
2|12|1700010300001|8|1|3
EOF
)"

check rejected_events "$(
    cat <<'EOF'
# topic|partition|kafka_offset|reason|detail
clickmart.events|0|7|too_late|
clickmart.events|1|5|future_timestamp|
clickmart.events|1|6|invalid_json|
clickmart.events|1|7|invalid_json|
clickmart.events|1|8|invalid_json|
clickmart.events|1|9|invalid_json|
clickmart.events|1|10|invalid_json|
clickmart.events|1|11|invalid_json|
clickmart.events|1|12|invalid_json|
clickmart.events|1|13|not_an_object|
clickmart.events|1|14|payload_too_large|
clickmart.events|1|16|missing_field|event_type
clickmart.events|1|17|bad_type|ts
clickmart.events|1|18|bad_value|event_id
clickmart.events|1|19|bad_value|event_type
clickmart.events|1|20|bad_value|ts
clickmart.events|1|21|missing_field|amount
clickmart.events|1|22|bad_type|items
clickmart.events|1|23|bad_value|items
clickmart.events|1|24|missing_field|variant
clickmart.events|1|25|bad_type|device
clickmart.events|1|26|bad_value|product_id
clickmart.events|1|27|too_late|
clickmart.events|1|28|bad_value|user_id
clickmart.events|1|29|invalid_json|
clickmart.events|1|30|not_an_object|
clickmart.events|2|4|too_late|
clickmart.events|2|8|bad_value|ts
clickmart.events|2|11|too_late|
EOF
)"

# Settings flags reach the reference: with a 40-minute session gap u3's e32 and e33
# (30 min + 1 ms apart) are one session: 3 events, product_view + add_to_cart = stage 3.
gap=$(python3 "$HERE/reference.py" --dump "$TMP/topic.dump" --now-ms "$NOW" \
    --session-gap-ms 2400000 --print sessions | awk -F'\t' '$1 == "e31" {print $5 "|" $14}')
if [ "$gap" = "3|3" ]; then echo "ok: --session-gap-ms"; else
    echo "FAIL: --session-gap-ms: e31 session events|stage = '$gap', want 3|3"
    fail=$((fail + 1))
fi

# A smaller max_event_bytes turns the 65536-byte event into payload_too_large.
big=$(python3 "$HERE/reference.py" --dump "$TMP/topic.dump" --now-ms "$NOW" \
    --max-event-bytes 65535 --print rejected_events | awk -F'\t' '$2 == 1 && $3 == 15 {print $4}')
if [ "$big" = "payload_too_large" ]; then echo "ok: --max-event-bytes"; else
    echo "FAIL: --max-event-bytes: offset 1/15 gives '$big'"
    fail=$((fail + 1))
fi

checks=7
echo "$((checks - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
