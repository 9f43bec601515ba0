#!/usr/bin/env bash
# Self-test of compare.py itself: a throwaway Postgres is loaded with the reference's own
# expected tables (refsql.py, from handmade.py's MARTS data set and its SELFTEST+EDGE set)
# plus views written from CONTRACT §3-§4, so compare.py must report no difference; then
# each case below breaks one thing and compare.py must notice it (exit 1), tolerate it
# (exit 0), or give up (exit 2), as the case says.  Needs python3, psql and the Postgres
# server binaries; no daemon and no broker.
#
#   bash tests/integration/test_compare_selftest.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
export PYTHONDONTWRITEBYTECODE=1

cm_setup
cm_pg_start

"$CM_PY" "$HERE/handmade.py" dump "$CM_DIR/marts.dump" --marts
"$CM_PY" "$HERE/refsql.py" --dump "$CM_DIR/marts.dump" >"$CM_DIR/marts.sql"
EDGE_NOW=1700265600000
"$CM_PY" "$HERE/handmade.py" dump "$CM_DIR/edge.dump" --edge
"$CM_PY" "$HERE/refsql.py" --dump "$CM_DIR/edge.dump" --now-ms "$EDGE_NOW" >"$CM_DIR/edge.sql"

load() { # load SQLFILE: a fresh schema clickmart from SQLFILE
    cm_psql "DROP SCHEMA IF EXISTS clickmart CASCADE" >/dev/null 2>&1
    psql -X -q -v ON_ERROR_STOP=1 -d "$CM_PG" -f "$1" >/dev/null
}

fail=0
n=0
# case DESCRIPTION WANT_RC GREP_PATTERN SQL [COMPARE ARGS...]: loads the MARTS tables,
# runs SQL, runs compare.py; its exit status must be WANT_RC and its output must match
# GREP_PATTERN (extended regex; '' = anything).
case_() {
    local desc=$1 want=$2 pattern=$3 sql=$4 rc=0
    shift 4
    n=$((n + 1))
    load "$CM_DIR/marts.sql"
    [ -z "$sql" ] || cm_psql "SET search_path = clickmart; $sql" >/dev/null
    CM_COMPARE_LENIENT=1 cm_compare "$CM_DIR/marts.dump" "$@" >"$CM_DIR/out.txt" 2>&1 || rc=$?
    if [ "$rc" = "$want" ] && { [ -z "$pattern" ] || grep -Eq -- "$pattern" "$CM_DIR/out.txt"; }; then
        echo "ok: $desc"
    else
        echo "FAIL: $desc (exit $rc, want $want${pattern:+, output matching /$pattern/})"
        sed 's/^/    /' "$CM_DIR/out.txt" | tail -n 25
        fail=$((fail + 1))
    fi
}

case_ "MARTS: reference = Postgres, every table and view" 0 \
    'product_affinity \(view\): 8 rows expected, 8 rows actual, OK' "" --require-all
case_ "float noise within 1e-6 relative" 0 'compare: OK' \
    "UPDATE experiment_results SET z = z * (1 + 1e-8), seq_p_value = seq_p_value * (1 - 5e-7)
       WHERE z IS NOT NULL" --require-all
case_ "float within 1e-12 absolute of an expected 0" 0 'compare: OK' \
    "UPDATE experiments SET srm_chi2 = 1e-13 WHERE experiment = 'exp_small'" --require-all
case_ "float off by 1e-5 relative" 1 'rpu_p_value: expected 0.878' \
    "UPDATE experiment_results SET rpu_p_value = rpu_p_value * (1 + 1e-5)
       WHERE experiment = 'exp_ab' AND variant = 'treatment'"
case_ "float 1e-11 where 0 is expected" 1 'srm_chi2: expected 0.0, actual 1e-11' \
    "UPDATE experiments SET srm_chi2 = 1e-11 WHERE experiment = 'exp_small'"
case_ "a value where NULL is expected (rel_lift with p_c = 0)" 1 'rel_lift: expected NULL, actual 0.0' \
    "UPDATE experiment_results SET rel_lift = 0 WHERE experiment = 'exp_small' AND variant = 'a'"
case_ "NULL where a value is expected" 1 'revenue_sd: expected 0.0, actual NULL' \
    "UPDATE experiment_results SET revenue_sd = NULL WHERE experiment = 'exp_edge' AND variant = 'treatment'"
case_ "NaN" 1 'chi2: expected 0.92.*, actual nan' \
    "UPDATE experiments SET chi2 = 'NaN' WHERE experiment = 'exp_ab'"
case_ "boolean flipped" 1 'reached_checkout: expected true, actual false' \
    "UPDATE user_outcomes SET reached_checkout = NOT reached_checkout WHERE user_id = 'ud'"
case_ "timestamp 1 ms off" 1 'exposed_at: expected 1700013600000' \
    "UPDATE user_exposure SET exposed_at = exposed_at + interval '1 millisecond' WHERE user_id = 'ul'"
case_ "timestamp off by a fraction of a millisecond" 1 'not a whole millisecond' \
    "UPDATE user_outcomes SET exposed_at = exposed_at + interval '1 microsecond' WHERE user_id = 'ul'"
case_ "money 1 cent off" 1 'revenue: expected 468 cents, actual 469 cents' \
    "UPDATE product_daily SET revenue = revenue + 0.01 WHERE product_id = 'pB' AND day = '2023-11-15'"
case_ "integer off" 1 'excluded_users: expected 1, actual 2' \
    "UPDATE experiments SET excluded_users = 2 WHERE experiment = 'exp_edge'"
case_ "a cohort_retention row with users 0 is not tolerated" 1 'extra: +cohort_week=19681' \
    "INSERT INTO cohort_retention VALUES ('2023-11-20', 0, 0)"
case_ "an all-zero basket_daily row is tolerated" 0 'basket_daily: 2 rows expected, 3 rows actual \(1 all-zero rows tolerated\), OK' \
    "INSERT INTO basket_daily VALUES ('2023-11-17', 0, 0, 0)"
case_ "a missing regression row" 1 'missing: experiment=.exp_ab., term=.log_engagement.' \
    "DELETE FROM experiment_regression WHERE term = 'log_engagement'"
case_ "an extra user_outcomes row (excluded user)" 1 "extra: +experiment='exp_edge', user_id='xe'" \
    "INSERT INTO user_outcomes VALUES ('exp_edge', 'xe', 'treatment', '2023-11-15 01:15:00Z', false, 0, 0, 1, false, false)"
case_ "a product pair in collation order instead of byte order" 1 "missing: product_a='pf', product_b='pé'" \
    "UPDATE product_pairs SET product_a = 'pé', product_b = 'pf' WHERE product_a = 'pf'"
case_ "missing table skipped by default" 0 'experiment_regression: skipped: table missing' \
    "DROP TABLE experiment_regression"
case_ "missing table fails with --require-all" 1 'experiment_regression: missing in Postgres' \
    "DROP TABLE experiment_regression" --require-all
case_ "missing view skipped by default" 0 'daily_kpis: skipped: table missing' \
    "DROP VIEW daily_kpis"
case_ "a missing base table cannot be skipped" 2 'reading sessions failed' \
    "DROP TABLE sessions"
case_ "--tables selects" 0 '^experiments: 3 rows expected, 3 rows actual, OK' \
    "DROP TABLE sessions" --tables experiments,product_pairs
case_ "product_affinity: a wrong lift" 1 'lift: expected 1.5, actual 1.515' \
    "ALTER VIEW product_affinity RENAME TO pa0;
     CREATE VIEW product_affinity AS SELECT product_a, product_b, orders, orders_a, orders_b,
       total_orders, support, confidence_ab, confidence_ba, lift * 1.01 AS lift FROM pa0"
case_ "product_affinity: total_orders counting purchases without items" 1 'total_orders: expected 3, actual 5' \
    "ALTER VIEW product_affinity RENAME TO pa0;
     CREATE VIEW product_affinity AS SELECT product_a, product_b, orders, orders_a, orders_b,
       total_orders + 2 AS total_orders, support, confidence_ab, confidence_ba, lift FROM pa0"
case_ "daily_kpis: new users counted by last_seen" 1 'new_users: expected' \
    "CREATE OR REPLACE VIEW daily_kpis AS SELECT f.day, f.users AS active_users,
       coalesce(n.n, 0) AS new_users, f.users - coalesce(n.n, 0) AS returning_users, f.sessions,
       f.orders, f.revenue, f.revenue / nullif(f.orders, 0) AS avg_order_value,
       0.5::float8 AS user_conversion_rate,
       f.sessions_add_to_cart - f.sessions_purchase AS abandoned_cart_sessions,
       (f.sessions_add_to_cart - f.sessions_purchase)::float8 / nullif(f.sessions_add_to_cart, 0)
         AS cart_abandonment_rate
       FROM funnel_daily f LEFT JOIN (SELECT (last_seen AT TIME ZONE 'UTC')::date AS day,
       count(*) AS n FROM users GROUP BY 1) n ON n.day = f.day
       WHERE f.device = '*' AND f.country = '*'"
case_ "rfm_segments: a buyer missing, a score out of range" 1 "missing: user_id='b1'" \
    "ALTER VIEW rfm_segments RENAME TO rfm0;
     CREATE VIEW rfm_segments AS SELECT user_id, recency_days, frequency, monetary, r_score,
       f_score, CASE WHEN user_id = 'b2' THEN 6 ELSE m_score END AS m_score, rfm, segment
       FROM rfm0 WHERE user_id <> 'b1'"
if grep -Pzq "user_id='b2'\n *m_score: expected 1..5, actual 6" "$CM_DIR/out.txt"; then
    echo "ok: rfm_segments: m_score 6 reported"
else
    echo "FAIL: rfm_segments: m_score 6 not reported"
    fail=$((fail + 1))
fi
n=$((n + 1))

# The SELFTEST + EDGE set (odd strings, rejects, an exposed assignment) through the same path.
n=$((n + 1))
load "$CM_DIR/edge.sql"
if cm_compare "$CM_DIR/edge.dump" --now-ms "$EDGE_NOW" --require-all >"$CM_DIR/out.txt" 2>&1; then
    echo "ok: EDGE: reference = Postgres"
else
    echo "FAIL: EDGE: reference = Postgres"
    sed 's/^/    /' "$CM_DIR/out.txt" | tail -n 25
    fail=$((fail + 1))
fi

echo "$((n - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
