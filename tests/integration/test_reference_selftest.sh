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
#     funnel_daily roll-ups with distinct users;
#   - on handmade.py's MARTS set: cohort_retention, product_daily, product_pairs,
#     basket_daily, user_exposure, user_outcomes exactly, and experiments,
#     experiment_results and experiment_regression against a readout worked out by hand
#     (see the comments further down), plus the distribution functions against known
#     values and the --window-days, --exposure-type, --confidence and
#     --sequential-tuning flags.
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

# ---------------------------------------------------------------------------------------
# §3 cohort_retention, §4 products, §5-§6 experiments: handmade.py's MARTS data set (its own
# dump, partitions 0-2; every event in the past, so --now-ms does not matter).
#
# Products (partition 0; day 19676 = Wed 2023-11-15, 19677 = Thu): o1 (b1, m08) holds pB
# twice (2 x llround(1.005*100) = 2 x 100 and 1 x llround(2.675*100) = 268: units 3, 468
# cents), pA with the defaults (quantity 1, price 0), pé 3 x llround(0.125*100) = 3 x 13 =
# 39, pZ with null quantity and price (1 x 0): units 8, 507 cents; its top-level
# product_id pX counts nowhere.  o2 (b2, m09): pé 1 x 500, pf 2 x 150, pA 1 x 50: units 4,
# 850 cents.  On day 19677 a purchase with items [] and one without items count in no
# product and no basket; m15 (4 x pA at 25) counts once although it was sent twice.
# Views: pA twice and an add_to_cart on day 19676; a product_view without product_id and
# a page_view with one count nowhere; pB viewed at 23:59:59.999 (19676) and pA, pB from
# 00:00:00.000 (19677); pQ only added to a cart.  Pairs: o1 gives the 6 pairs of {pA, pB,
# pZ, pé} once (pB repeated counts once), o2 those of {pA, pf, pé}: (pA, pé) twice.  Byte
# order: pA < pB < pZ < pf < pé ("é" is 0xC3 0xA9, after "f").
#
# Cohorts (weeks start on Mondays: 19674 = Nov 13, 19688 = Nov 27): c1 was first seen on
# Mon Nov 20 01:00 (cohort Nov 20), then a late page_view of Sun Nov 19 22:00 moves it to
# cohort Nov 13, where it is active in offsets 0 (Nov 19), 1 (Nov 20) and 2 (Nov 27): no
# row for cohort Nov 20 remains.  c2: Nov 14 and Nov 28 (offsets 0, 2); its assignment of
# Nov 21 is no clickstream event.  c3: Sun Dec 3 23:59:59.999 and Mon Dec 4 00:00:00.000:
# cohort Nov 27, offsets 0 and 1.  The 96 other users (partitions 0-2) are first seen
# between Nov 14 and Nov 16: cohort Nov 13, offset 0; 48 exp_ab treatment users, ue and
# ul are also active in the week of Nov 20 (offset 1).
PYTHONDONTWRITEBYTECODE=1 python3 "$HERE/handmade.py" dump "$TMP/marts.dump" --marts
mref() { python3 "$HERE/reference.py" --dump "$TMP/marts.dump" "$@"; }
check_m() {
    local what=$1 expected=$2 actual=$3
    if [ "$actual" = "$expected" ]; then
        echo "ok: $what"
    else
        echo "FAIL: $what"
        diff -u <(printf '%s\n' "$expected") <(printf '%s\n' "$actual") | sed 's/^/    /'
        fail=$((fail + 1))
    fi
}

check_m "marts: cohort_retention" "$(
    cat <<'EOF'
# cohort_week|week_offset|users
19674|0|100
19674|1|51
19674|2|2
19688|0|1
19688|1|1
EOF
)" "$(mref --print cohort_retention | tr '\t' '|')"

check_m "marts: product_daily" "$(
    cat <<'EOF'
# day|product_id|views|add_to_carts|orders|units|revenue
19676|pA|2|1|2|2|50
19676|pB|1|0|1|3|468
19676|pQ|0|1|0|0|0
19676|pZ|0|0|1|1|0
19676|pf|0|0|1|2|300
19676|pé|0|0|2|4|539
19677|pA|1|0|1|4|100
19677|pB|1|0|0|0|0
EOF
)" "$(mref --print product_daily | tr '\t' '|')"

check_m "marts: product_pairs" "$(
    cat <<'EOF'
# product_a|product_b|orders
pA|pB|1
pA|pZ|1
pA|pf|1
pA|pé|2
pB|pZ|1
pB|pé|1
pZ|pé|1
pf|pé|1
EOF
)" "$(mref --print product_pairs | tr '\t' '|')"

check_m "marts: basket_daily" "$(
    cat <<'EOF'
# day|orders_with_items|units|revenue
19676|2|12|1357
19677|1|4|100
EOF
)" "$(mref --print basket_daily | tr '\t' '|')"

# Exposure (partition 1, A = 2023-11-15T00:00Z = 1700006400000, window 7 days):
#   ue  assigned and exposed in the same ms A (its page_view an hour before counts
#       nowhere); purchases at A + 7d - 1 ms (in the window) and A + 7d (out).
#   ul  assigned A+1h, viewed A+3h, then a late view of A+2h moves exposure to A+2h: the
#       purchase at A+7d+2h30m, inside [A+3h, A+7d+3h), falls out of [A+2h, A+7d+2h).
#   un  viewed A+1h05 and assigned A+1h06 (variant holdout) after its only view: never
#       exposed, so holdout is no variant of exp_edge.
#   xe  assigned control (k-b) and treatment (k-a) in the same ms: excluded, variant from
#       k-a (ts, then event_id); exposed at A+1h15: counted in excluded_users.
#   xu  excluded, only viewed before its assignments: not exposed, not counted.
#   ud  treatment at A+2h01 and again at A+2h02; a late assignment of A+2h-30s moves
#       assigned_at earlier, so its view at A+2h exposes it; a checkout in the window.
#   s1, s2  exp_small with variants "a" and "B": control is the byte-wise smallest, "B".
#   c2, c4  experiment cx: assigned, never viewed a product: no outcome, no experiments row.
check_m "marts: user_exposure (but exp_ab)" "$(
    cat <<'EOF'
# experiment|user_id|variant|assigned_at|exposed_at|excluded
cx|c2|v1|1700560800000|\N|f
cx|c4|v2|1700564400000|\N|f
exp_edge|ud|treatment|1700013570000|1700013600000|f
exp_edge|ue|control|1700006400000|1700006400000|f
exp_edge|ul|treatment|1700010000000|1700013600000|f
exp_edge|un|holdout|1700010360000|\N|f
exp_edge|xe|treatment|1700010600000|1700010900000|t
exp_edge|xu|control|1700011500000|\N|t
exp_small|s1|a|1700020800000|1700020860000|f
exp_small|s2|B|1700021400000|1700021460000|f
EOF
)" "$(mref --print user_exposure | tr '\t' '|' | grep -v '^exp_ab|')"

check_m "marts: user_outcomes (but exp_ab)" "$(
    cat <<'EOF'
# experiment|user_id|variant|exposed_at|converted|orders|revenue|events|added_to_cart|reached_checkout
exp_edge|ud|treatment|1700013600000|f|0|0|3|f|t
exp_edge|ue|control|1700006400000|t|1|1000|2|f|f
exp_edge|ul|treatment|1700013600000|f|0|0|3|t|f
exp_small|s1|a|1700020860000|t|1|300|2|f|f
exp_small|s2|B|1700021460000|f|0|0|1|f|f
EOF
)" "$(mref --print user_outcomes | tr '\t' '|' | grep -v '^exp_ab|')"

# exp_ab (partition 2): each user is assigned at t and exposed at t + 1 s; pattern A
# users' page_view at t (before exposure) and pattern B users' page_view at exposure + 7
# days (the window's end) are outside the window.  Counted: users by (variant, converted,
# orders, revenue, events, added_to_cart, reached_checkout); assigned_at = exposed_at - 1 s.
check_m "marts: user_outcomes exp_ab" "$(
    cat <<'EOF'
5 control|t|1|1000|3|f|t
15 control|f|0|0|3|t|f
10 control|t|2|2000|15|t|t
10 control|f|0|0|15|t|f
24 treatment|t|1|1200|3|f|t
24 treatment|f|0|0|3|t|f
88 exposed 1 s after assignment, not excluded
EOF
)" "$(
    mref --print user_outcomes | awk -F'\t' '$1 == "exp_ab" {print $3 "|" $5 "|" $6 "|" $7 "|" $8 "|" $9 "|" $10}' | uniq -c | sed 's/^ *//'
    mref --print user_exposure | awk -F'\t' '$1 == "exp_ab" && $5 == $4 + 1000 && $6 == "f" {n++} END {print n " exposed 1 s after assignment, not excluded"}'
)"

# The statistics (§6), α = 0.05, z* = Φ⁻¹(0.975) = 1.959963984540054, N* = 5000.
#
# exp_ab, worked by hand (control c: n 40, x 15, p 0.375, v = p(1-p) = 0.234375; treatment
# t: n 48, x 24, p 0.5, v 0.25):
#   abs_lift = 0.125; rel_lift = 0.5/0.375 - 1 = 1/3
#   z = 0.125 / sqrt(39/88 * 49/88 * (1/48 + 1/40)) = 0.125 / sqrt(21021/1858560)
#     = 1.1753619302963462; p_value = 2(1 - Φ(z)) = 0.23984994741008768
#   se² = 0.25/48 + 0.234375/40 = 17/1536; se = 0.10520317...; diff_ci = 0.125 ± z*·se
#     = [-0.081194436884105137, 0.33119443688410514]
#   rel: 0.25/(48 * 0.375²) + 0.5² * 0.234375/(40 * 0.375⁴) = 1/27 + 2/27 = 1/9, so
#     rel_ci = 1/3 ± z*/3 = [-0.31998799484668475, 0.98665466151335141]
#   seq: N = 88, σ² = 88 * 17/1536 = 0.97395833..., ρ² = (-2 ln 0.05 + ln(1 - 2 ln 0.05))
#     / 5000 = 0.0015872309203475131, Nρ² + 1 = 1.139676321...;
#     half-width = sqrt(σ² * 2(Nρ²+1)/(N²ρ²) * ln(sqrt(Nρ²+1)/0.05)) = 0.74355361896866304
#     -> seq_ci = [-0.61855361896866304, 0.86855361896866304];
#     E = exp(ρ²N² 0.125² / (2σ²(Nρ²+1))) / sqrt(Nρ²+1), seq_p_value = 1/E
#     = 0.97908256632222877
#   chance_to_win = Φ(0.125/se) = 0.8826181685861654
#   rpu (currency units): treatment 24 x 12.00 and 24 x 0: mean 6, s² = 1728/47, sd
#     6.0634938316789365; control 5 x 10.00, 10 x 20.00, 25 x 0: mean 6.25, s² = 2937.5/39,
#     sd 8.678739126192976.  rpu_diff = -0.25; se² = 36/47 + 2937.5/1560 = 2.648970...,
#     Welch df = se⁴ / ((36/47)²/47 + (2937.5/1560)²/39) = 67.863664811120985,
#     t = -0.25/1.6275657490010446 = -0.15360362563137199, rpu_p_value = P(|T_df| ≥ |t|)
#     = 0.87837812616019668, t_{0.975, df} = 1.9955415212905238,
#     rpu_ci = -0.25 ± 1.99554152 * 1.62756575 = [-3.4978750307618953, 2.9978750307618953]
#   chi2 (Yates, df 1): expected 195/11, 245/11 | 234/11, 294/11, |O - E| = 30/11 - 0.5 =
#     49/22 in every cell: chi2 = (49/22)² * 11 * (1/195 + 1/245 + 1/234 + 1/294)
#     = 0.92136752136752137, chi2_p = erfc(sqrt(chi2/2)) = 0.33711616183226193
#   SRM: (40 - 44)²/44 + (48 - 44)²/44 = 8/11, srm_p = erfc(sqrt(4/11)) = 0.39376863464299276
#   regression, saturated by the three patterns: logit(5/20) = -ln 3 for A (ln(1+3) =
#     ln 4), logit(24/48) = 0 for B (ln 4), logit(10/20) = 0 for C (ln 16): treatment =
#     ln 3, log_engagement = ln 3 / (ln 16 - ln 4) = ln 3/ln 4, intercept = -ln 3 - ln 3 =
#     -2 ln 3.  Information per pattern w = n p(1-p): A 3.75, B 12, C 5, and Cov(β) =
#     M⁻¹ diag(1/w) M⁻ᵀ for the patterns' design rows M: var(treatment) = 1/3.75 + 1/12
#     = 0.35, var(log_engagement) = (1/3.75 + 1/5)/ln²4, var(intercept) = 4/3.75 + 1/5.
# exp_edge (control ue: 1 of 1 converts, 10.00; treatment ul, ud: 0 of 2): abs_lift -1,
#   rel_lift -1, pooled p̄ = 1/3: z = -1/sqrt(1/3 * 2/3 * 3/2) = -sqrt(3), p_value =
#   erfc(sqrt(3/2)); v_t = v_c = 0, so diff_ci, rel_ci, seq_*, chance_to_win are NULL;
#   rpu_diff = -10, the rest of rpu NULL (one control user); chi2 on [[1, 0], [0, 2]]:
#   expected [[1/3, 2/3], [2/3, 4/3]], |O - E| = 2/3 - 1/2 = 1/6: chi2 = 1/36 * (3 + 3/2 +
#   3/2 + 3/4) = 0.1875; SRM [1, 2]: 1/3; one converter: no regression.
# exp_small (control B: 0 of 1; a: 1 of 1, 3.00): rel_lift NULL (p_c = 0), z = 1/sqrt(1/2)
#   = sqrt 2, p_value = erfc(1); Yates brings every |O - E| = 1/2 to 0: chi2 0, p 1; SRM 0, p 1.
mref --print experiments >"$TMP/experiments.tsv"
mref --print experiment_results >"$TMP/results.tsv"
mref --print experiment_regression >"$TMP/regression.tsv"
mref --confidence 0.9 --sequential-tuning 1000 --print experiment_results >"$TMP/results90.tsv"
mref --window-days 8 --print user_outcomes >"$TMP/outcomes8.tsv"
mref --exposure-type add_to_cart --print user_exposure >"$TMP/exposure_atc.tsv"
stats_out=$(
    PYTHONDONTWRITEBYTECODE=1 python3 - "$HERE" "$TMP" <<'EOF'
import math, sys
sys.path.insert(0, sys.argv[1])
import reference as r
tmp = sys.argv[2]
bad = []

def close(got, want, tol=1e-9):
    if want is None or got is None:
        return got is want
    return abs(got - want) <= tol * max(abs(want), 1e-300) or abs(got - want) <= 1e-15

def expect(name, got, want, tol=1e-9):
    if not close(got, want, tol):
        bad.append("%s: got %r, want %r" % (name, got, want))

# Distribution functions against known values.
expect("Φ(1.96)", r.norm_cdf(1.96), 0.9750021048517795, 1e-15)
expect("Φ(-1.96)", r.norm_cdf(-1.96), 0.024997895148220435, 1e-13)
expect("Φ⁻¹(0.975)", r.norm_ppf(0.975), 1.959963984540054, 1e-15)
expect("Φ⁻¹(0.95)", r.norm_ppf(0.95), 1.6448536269514722, 1e-15)
expect("Φ⁻¹(1e-10)", r.norm_ppf(1e-10), -6.361340902404056, 1e-13)
expect("T_10(2.228138851986274)", r.t_cdf(2.228138851986274, 10), 0.975, 1e-14)
expect("T_1(1)", r.t_cdf(1.0, 1), 0.75, 1e-14)            # Cauchy: 1/2 + atan(1)/π
expect("T_2(-2)", r.t_cdf(-2.0, 2), 0.5 - 1 / math.sqrt(6) , 1e-13)  # 1/2 + t/(2 sqrt(t²+2))
expect("t_0.975,10", r.t_ppf(0.975, 10), 2.228138851986274, 1e-13)
expect("t_0.975,1", r.t_ppf(0.975, 1), math.tan(math.pi * 0.475), 1e-13)
expect("chi2_sf(3.841458820694124, 1)", r.chi2_sf(3.841458820694124, 1), 0.05, 1e-13)
expect("chi2_sf(5.991464547107979, 2)", r.chi2_sf(5.991464547107979, 2), 0.05, 1e-13)  # e^(-x/2)
expect("chi2_sf(10, 4)", r.chi2_sf(10.0, 4), math.exp(-5) * 6, 1e-13)  # e^(-x/2)(1 + x/2)
expect("chi2_sf(0.5, 1)", r.chi2_sf(0.5, 1), math.erfc(0.5), 1e-13)

def load(name):
    with open("%s/%s" % (tmp, name), encoding="utf-8") as f:
        lines = f.read().splitlines()
    cols = lines[0][2:].split("\t")
    rows = {}
    for line in lines[1:]:
        vals = [None if v == "\\N" else v for v in line.split("\t")]
        d = dict(zip(cols, vals))
        rows[tuple(vals[:2])] = d
    return rows

INT = {"users", "converters", "orders", "revenue", "variants", "excluded_users",
       "window_days", "n"}

def check_row(where, row, want):
    for col, w in want.items():
        g = row.get(col)
        if isinstance(w, bool) or col in ("control_variant", "srm_detected", "is_control"):
            ok = g == (("t" if w else "f") if isinstance(w, bool) else w)
        elif w is None:
            ok = g is None
        elif col in INT:
            ok = g is not None and int(g) == w
        else:
            ok = g is not None and close(float(g), w)
        if not ok:
            bad.append("%s %s: got %r, want %r" % (where, col, g, w))

NULL16 = dict.fromkeys(r.COMPARISON_COLUMNS)
exps = {k[0]: v for k, v in load("experiments.tsv").items()}
if sorted(exps) != ["exp_ab", "exp_edge", "exp_small"]:
    bad.append("experiments: %r" % sorted(exps))
check_row("exp_ab", exps.get("exp_ab", {}), dict(
    control_variant="control", variants=2, users=88, excluded_users=0,
    srm_chi2=8 / 11, srm_p=0.39376863464299276, srm_detected=False,
    chi2=0.92136752136752137, chi2_p=0.33711616183226193, window_days=7))
check_row("exp_edge", exps.get("exp_edge", {}), dict(
    control_variant="control", variants=2, users=3, excluded_users=1,
    srm_chi2=1 / 3, srm_p=math.erfc(math.sqrt(1 / 6)), srm_detected=False,
    chi2=0.1875, chi2_p=math.erfc(math.sqrt(0.09375)), window_days=7))
check_row("exp_small", exps.get("exp_small", {}), dict(
    control_variant="B", variants=2, users=2, excluded_users=0, srm_chi2=0.0, srm_p=1.0,
    srm_detected=False, chi2=0.0, chi2_p=1.0))

res = load("results.tsv")
if sorted(res) != [("exp_ab", "control"), ("exp_ab", "treatment"), ("exp_edge", "control"),
                   ("exp_edge", "treatment"), ("exp_small", "B"), ("exp_small", "a")]:
    bad.append("experiment_results keys: %r" % sorted(res))
check_row("exp_ab/control", res.get(("exp_ab", "control"), {}), dict(
    users=40, converters=15, conversion_rate=0.375, orders=25, revenue=25000,
    revenue_per_user=6.25, revenue_sd=math.sqrt(2937.5 / 39), events_per_user=9.0,
    cart_rate=0.875, checkout_rate=0.375, is_control=True, **NULL16))
check_row("exp_ab/treatment", res.get(("exp_ab", "treatment"), {}), dict(
    users=48, converters=24, conversion_rate=0.5, orders=24, revenue=28800,
    revenue_per_user=6.0, revenue_sd=math.sqrt(1728 / 47), events_per_user=3.0,
    cart_rate=0.5, checkout_rate=0.5, is_control=False,
    abs_lift=0.125, rel_lift=1 / 3,
    diff_ci_low=-0.081194436884105137, diff_ci_high=0.33119443688410514,
    rel_ci_low=-0.31998799484668475, rel_ci_high=0.98665466151335141,
    z=1.1753619302963462, p_value=0.23984994741008768,
    seq_ci_low=-0.61855361896866304, seq_ci_high=0.86855361896866304,
    seq_p_value=0.97908256632222877, chance_to_win=0.8826181685861654,
    rpu_diff=-0.25, rpu_ci_low=-3.4978750307618953, rpu_ci_high=2.9978750307618953,
    rpu_p_value=0.87837812616019668))
check_row("exp_edge/control", res.get(("exp_edge", "control"), {}), dict(
    users=1, converters=1, conversion_rate=1.0, orders=1, revenue=1000,
    revenue_per_user=10.0, revenue_sd=None, events_per_user=2.0, cart_rate=0.0,
    checkout_rate=0.0, is_control=True, **NULL16))
check_row("exp_edge/treatment", res.get(("exp_edge", "treatment"), {}), dict(
    NULL16, users=2, converters=0, conversion_rate=0.0, orders=0, revenue=0,
    revenue_per_user=0.0, revenue_sd=0.0, events_per_user=3.0, cart_rate=0.5,
    checkout_rate=0.5, is_control=False, abs_lift=-1.0, rel_lift=-1.0,
    z=-math.sqrt(3), p_value=math.erfc(math.sqrt(1.5)), rpu_diff=-10.0))
check_row("exp_small/B", res.get(("exp_small", "B"), {}), dict(
    users=1, converters=0, conversion_rate=0.0, revenue_sd=None, events_per_user=1.0,
    is_control=True, **NULL16))
check_row("exp_small/a", res.get(("exp_small", "a"), {}), dict(
    NULL16, users=1, converters=1, conversion_rate=1.0, orders=1, revenue=300,
    revenue_per_user=3.0, revenue_sd=None, events_per_user=2.0, is_control=False,
    abs_lift=1.0, z=math.sqrt(2), p_value=math.erfc(1.0), rpu_diff=3.0))

reg = load("regression.tsv")
if sorted(reg) != [("exp_ab", "intercept"), ("exp_ab", "log_engagement"),
                   ("exp_ab", "treatment")]:
    bad.append("experiment_regression keys: %r" % sorted(reg))
ln3, ln4 = math.log(3), math.log(4)
for term, coef, var in (("intercept", -2 * ln3, 4 / 3.75 + 1 / 5),
                        ("treatment", ln3, 1 / 3.75 + 1 / 12),
                        ("log_engagement", ln3 / ln4, (1 / 3.75 + 1 / 5) / ln4 ** 2)):
    se = math.sqrt(var)
    check_row("regression " + term, reg.get(("exp_ab", term), {}), dict(
        coef=coef, std_err=se, z=coef / se, p_value=math.erfc(abs(coef / se) / math.sqrt(2)),
        n=88))

# --confidence 0.9 --sequential-tuning 1000: z* = 1.6448536269514722, α = 0.1.
t90 = load("results90.tsv").get(("exp_ab", "treatment"), {})
se = math.sqrt(17 / 1536)
a = 0.1
rho2 = (-2 * math.log(a) + math.log(1 - 2 * math.log(a))) / 1000
half = math.sqrt(88 * se * se * 2 * (88 * rho2 + 1) / (88 ** 2 * rho2)
                 * math.log(math.sqrt(88 * rho2 + 1) / a))
check_row("confidence 0.9", t90, dict(
    diff_ci_high=0.125 + 1.6448536269514722 * se, rel_ci_low=1 / 3 - 1.6448536269514722 / 3,
    seq_ci_low=0.125 - half, p_value=0.23984994741008768))

# --window-days 8: ue's purchase at A + 7d and ul's at A + 7d + 2h30 are now in the window.
o8 = load("outcomes8.tsv")
check_row("window 8 ue", o8.get(("exp_edge", "ue"), {}), dict(orders=2, revenue=3000))
check_row("window 8 ul", o8.get(("exp_edge", "ul"), {}), dict(orders=1, revenue=500))
# --exposure-type add_to_cart: ul is exposed by its add_to_cart at A+3h01, ue never.
xa = load("exposure_atc.tsv")
if xa.get(("exp_edge", "ul"), {}).get("exposed_at") != str(1700006400000 + 3 * 3600000 + 60000):
    bad.append("exposure-type add_to_cart: ul %r" % xa.get(("exp_edge", "ul")))
if xa.get(("exp_edge", "ue"), {}).get("exposed_at", "x") is not None:
    bad.append("exposure-type add_to_cart: ue %r" % xa.get(("exp_edge", "ue")))
print("\n".join(bad) if bad else "OK")
EOF
)
if [ "$stats_out" = "OK" ]; then echo "ok: marts: distributions and experiment statistics"; else
    echo "FAIL: marts: distributions and experiment statistics"
    printf '%s\n' "$stats_out" | sed 's/^/    /'
    fail=$((fail + 1))
fi

checks=18
echo "$((checks - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
