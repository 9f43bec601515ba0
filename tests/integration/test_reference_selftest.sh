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

# The data set lives in handmade.py (SELFTEST, partitions 0-2).
PYTHONDONTWRITEBYTECODE=1 python3 "$HERE/handmade.py" dump "$TMP/topic.dump"

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

# handmade.py's EDGE set (partition 3): corner cases of CONTRACT §1.1, one per message,
# as annotated there. now = 2023-11-18, so that none of them is in the future.
PYTHONDONTWRITEBYTECODE=1 python3 "$HERE/handmade.py" dump "$TMP/edge.dump" --edge
EDGE_NOW=1700265600000
edge_rejects=$(python3 "$HERE/reference.py" --dump "$TMP/edge.dump" --now-ms "$EDGE_NOW" \
    --print rejected_events | awk -F'\t' '$2 == 3 {printf "%s|%s|%s ", $3, $4, $5}')
want_rejects="2|bad_value|ts 3|bad_type|ts 4|bad_type|ts 5|bad_value|ts 9|bad_value|ts \
10|bad_value|ts 11|bad_value|ts 12|bad_value|ts 13|bad_value|ts 14|bad_value|ts \
15|bad_value|ts 16|bad_value|ts 17|bad_value|ts 18|bad_value|ts 19|bad_type|ts \
20|missing_field|ts 21|bad_type|items 22|bad_type|items 25|bad_value|items 26|bad_type|items 27|bad_type|items \
29|bad_value|items 30|bad_value|items 32|bad_type|items 33|bad_type|items \
34|bad_value|items 35|bad_value|items 36|bad_type|items 37|missing_field|items \
38|bad_type|amount 46|bad_value|amount 47|bad_value|amount 49|invalid_json| \
50|invalid_json| 51|invalid_json| 52|invalid_json| 55|invalid_json| 56|invalid_json| \
57|invalid_json| 58|invalid_json| 59|invalid_json| 60|invalid_json| 61|invalid_json| \
63|invalid_json| 64|invalid_json| 65|invalid_json| 66|invalid_json| 67|invalid_json| \
68|not_an_object| 69|not_an_object| 72|bad_value|device 74|bad_type|device \
75|bad_type|country 76|bad_type|product_id 77|bad_type|product_id \
80|bad_value|event_type 81|bad_value|event_type 82|bad_value|event_type \
83|bad_value|event_type 84|bad_type|event_type 86|bad_value|event_id \
88|bad_value|user_id 89|missing_field|user_id 90|bad_type|user_id \
92|bad_value|experiment 93|bad_value|variant 94|missing_field|variant 96|bad_type|device \
98|bad_type|amount 99|bad_value|event_id 100|missing_field|amount 101|bad_type|ts \
102|bad_type|country "
if [ "$edge_rejects" = "$want_rejects" ]; then echo "ok: edge rejects"; else
    echo "FAIL: edge rejects"
    diff <(tr ' ' '\n' <<<"$want_rejects") <(tr ' ' '\n' <<<"$edge_rejects") | sed 's/^/    /'
    fail=$((fail + 1))
fi
# User x holds the accepted edge purchases: cents 2x100 (items with null defaults and
# 100 items) + 100 + 100 + 0 (-0.0) + 0 (1e-400) + 1e14 (1e12 + 1e-7) + 1 (0.005)
# + 100 (1.005) + 268 (2.675) + 9999999999900 + 100 = 110000000000769 in 12 orders;
# device is the emoji of the earliest event with a device, country 32 bytes.
edge_user=$(python3 "$HERE/reference.py" --dump "$TMP/edge.dump" --now-ms "$EDGE_NOW" \
    --print users | awk -F'\t' '$1 == "x" {print $2 "|" $3 "|" $4 "|" $5 "|" $6 "|" $7 "|" $8 "|" $9}')
want_user="951782400000|1700179286000|😀|xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx|27|2|12|110000000000769"
if [ "$edge_user" = "$want_user" ]; then echo "ok: edge user"; else
    echo "FAIL: edge user: '$edge_user', want '$want_user'"
    fail=$((fail + 1))
fi

checks=9
echo "$((checks - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
