#!/usr/bin/env bash
# Every SQL block of docs/analyst-guide.md runs: populate a database (20 000 generated
# events, clickmartd --exit-at-end), extract every ```sql block of the guide, run each with
# psql -v ON_ERROR_STOP=1 and require at least one row. Then check that the analyst views
# agree with the tables they summarise (daily_kpis against sessions and users,
# product_affinity against product_daily, product_pairs and basket_daily, ...), and that
# the guide has a section for every table and view the daemon creates.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_analyst_sql.sh
# Knobs: CM_EVENTS (default 20000), CM_SEED (11), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-20000}
SEED=${CM_SEED:-11}
GUIDE=$CLICKMART_SRC/docs/analyst-guide.md
[ -f "$GUIDE" ] || {
    echo "no $GUIDE" >&2
    exit 1
}

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 clickmart.events

cm_gen "$SEED" "$EVENTS"
cm_log "generated $EVENTS events"

# shellcheck disable=SC2119 # no extra flags beyond --exit-at-end
cm_daemon_start --exit-at-end
cm_daemon_wait 300 || cm_die "clickmartd --exit-at-end still running after 300s"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
[ "$(cm_psql "SELECT count(*) > 0 FROM clickmart.sessions")" = t ] || cm_die "no sessions written"

# --- 1. every ```sql block of the guide -------------------------------------------------

BLOCKS=$CM_DIR/guide-sql
mkdir -p "$BLOCKS"
# A block starts at a line that is exactly ```sql and ends at the next line that is
# exactly ```; the file name carries the block's number and its first line in the guide.
awk -v dir="$BLOCKS" '
    !inb && /^```sql[ \t]*$/ { n++; f = sprintf("%s/block%02d_line%d.sql", dir, n, NR + 1); inb = 1; next }
    inb && /^```[ \t]*$/     { inb = 0; close(f); next }
    inb                      { print > f }
    END { if (inb) { print "unterminated sql block " n > "/dev/stderr"; exit 1 } }
' "$GUIDE" || cm_die "cannot extract the sql blocks of $GUIDE"
nblocks=$(find "$BLOCKS" -name 'block*.sql' | wc -l)
[ "$nblocks" -ge 10 ] || cm_die "only $nblocks sql blocks found in $GUIDE (extraction broken?)"
cm_log "$nblocks sql blocks in $GUIDE"

for f in "$BLOCKS"/block*.sql; do
    name=$(basename "$f" .sql)
    if ! out=$(psql -X -q -A -t -v ON_ERROR_STOP=1 -P null='(null)' -d "$CM_PG" -f "$f" 2>&1); then
        cm_bad "$name: error: $out"
        continue
    fi
    rows=$(printf '%s\n' "$out" | grep -c . || true)
    if [ "$rows" -ge 1 ]; then
        cm_ok "$name: $rows rows"
    else
        cm_bad "$name: returned no row"
    fi
done

# --- 2. the views agree with their tables -------------------------------------------------

# check NAME SQL: SQL returns the number of violations, which must be 0.
check() {
    local name=$1 sql=$2 n
    if ! n=$(cm_psql "$sql" 2>&1); then
        cm_bad "$name: error: $n"
    elif [ "$n" = 0 ]; then
        cm_ok "$name"
    else
        cm_bad "$name: $n violations"
    fi
}

check "daily_kpis.revenue, sessions, orders, active_users = sessions by UTC day of started_at" "
    WITH s AS (SELECT (started_at AT TIME ZONE 'UTC')::date AS day, count(*) AS sessions,
                      sum(revenue) AS revenue, sum(purchases) AS orders,
                      count(DISTINCT user_id) AS users
               FROM clickmart.sessions GROUP BY 1)
    SELECT count(*) FROM s FULL JOIN clickmart.daily_kpis k USING (day)
    WHERE s.sessions IS DISTINCT FROM k.sessions OR s.revenue IS DISTINCT FROM k.revenue
       OR s.orders IS DISTINCT FROM k.orders OR s.users IS DISTINCT FROM k.active_users"

check "daily_kpis.new_users = users by UTC day of first_seen; returning = active - new" "
    WITH n AS (SELECT (first_seen AT TIME ZONE 'UTC')::date AS day, count(*) AS new_users
               FROM clickmart.users GROUP BY 1)
    SELECT count(*) FROM n FULL JOIN clickmart.daily_kpis k USING (day)
    WHERE coalesce(n.new_users, 0) IS DISTINCT FROM k.new_users
       OR k.returning_users IS DISTINCT FROM k.active_users - k.new_users
       OR k.returning_users < 0"

check "daily_kpis cart abandonment = sessions at stage 3..4 by day" "
    WITH s AS (SELECT (started_at AT TIME ZONE 'UTC')::date AS day,
                      count(*) FILTER (WHERE funnel_stage IN (3, 4)) AS abandoned
               FROM clickmart.sessions GROUP BY 1)
    SELECT count(*) FROM s FULL JOIN clickmart.daily_kpis k USING (day)
    WHERE s.abandoned IS DISTINCT FROM k.abandoned_cart_sessions"

check "funnel_daily roll-ups: ('*','*') = sum of (device,'*') = sum of ('*',country) = sum of cells" "
    WITH t AS (
      SELECT day,
             sum(sessions) FILTER (WHERE device = '*' AND country = '*') AS s_all,
             sum(sessions) FILTER (WHERE device <> '*' AND country = '*') AS s_dev,
             sum(sessions) FILTER (WHERE device = '*' AND country <> '*') AS s_ctry,
             sum(sessions) FILTER (WHERE device <> '*' AND country <> '*') AS s_cell,
             sum(revenue) FILTER (WHERE device = '*' AND country = '*') AS r_all,
             sum(revenue) FILTER (WHERE device <> '*' AND country <> '*') AS r_cell
      FROM clickmart.funnel_daily GROUP BY day)
    SELECT count(*) FROM t
    WHERE s_all IS DISTINCT FROM s_dev OR s_all IS DISTINCT FROM s_ctry
       OR s_all IS DISTINCT FROM s_cell OR r_all IS DISTINCT FROM r_cell"

check "product_affinity.orders_a = sum(product_daily.orders) of product_a" "
    WITH po AS (SELECT product_id, sum(orders) AS orders FROM clickmart.product_daily GROUP BY 1)
    SELECT count(*) FROM clickmart.product_affinity a
    LEFT JOIN po ON po.product_id = a.product_a
    WHERE po.orders IS DISTINCT FROM a.orders_a"

check "product_affinity.orders_b = sum(product_daily.orders) of product_b" "
    WITH po AS (SELECT product_id, sum(orders) AS orders FROM clickmart.product_daily GROUP BY 1)
    SELECT count(*) FROM clickmart.product_affinity a
    LEFT JOIN po ON po.product_id = a.product_b
    WHERE po.orders IS DISTINCT FROM a.orders_b"

check "product_affinity: one row per product_pairs row, product_a < product_b byte-wise" "
    SELECT (SELECT count(*) FROM clickmart.product_pairs)
         - (SELECT count(*) FROM clickmart.product_affinity)
         + (SELECT count(*) FROM clickmart.product_affinity
            WHERE NOT (product_a COLLATE \"C\" < product_b))"

check "product_affinity: total_orders = sum(basket_daily.orders_with_items); support, confidence, lift formulas" "
    SELECT count(*) FROM clickmart.product_affinity a
    WHERE a.total_orders IS DISTINCT FROM
            (SELECT sum(orders_with_items) FROM clickmart.basket_daily)
       OR a.orders > least(a.orders_a, a.orders_b)
       OR abs(a.support - a.orders::float8 / a.total_orders::float8) > 1e-12
       OR abs(a.confidence_ab - a.orders::float8 / a.orders_a::float8) > 1e-12
       OR abs(a.confidence_ba - a.orders::float8 / a.orders_b::float8) > 1e-12
       OR abs(a.lift - a.orders::float8 * a.total_orders::float8
                       / (a.orders_a * a.orders_b)::float8) > 1e-9 * a.lift"

check "rfm_segments: one row per user with orders, frequency and monetary from users" "
    SELECT count(*) FROM clickmart.rfm_segments r
    FULL JOIN (SELECT * FROM clickmart.users WHERE orders > 0) u USING (user_id)
    WHERE r.frequency IS DISTINCT FROM u.orders OR r.monetary IS DISTINCT FROM u.revenue"

check "rfm_segments: recency_days against the newest last_seen; scores are quintiles" "
    WITH ref AS (SELECT max(last_seen) AS at FROM clickmart.users),
    sizes AS (SELECT 'r' AS s, r_score AS q, count(*) AS n FROM clickmart.rfm_segments GROUP BY 2
              UNION ALL SELECT 'f', f_score, count(*) FROM clickmart.rfm_segments GROUP BY 2
              UNION ALL SELECT 'm', m_score, count(*) FROM clickmart.rfm_segments GROUP BY 2)
    SELECT (SELECT count(*) FROM clickmart.rfm_segments r JOIN clickmart.users u USING (user_id)
            CROSS JOIN ref
            WHERE r.recency_days <> floor(extract(epoch FROM ref.at - u.last_order_at) / 86400)
               OR r.segment IS NULL OR r.rfm <> r.r_score::text || r.f_score::text || r.m_score::text)
         + (SELECT count(*) FROM (SELECT s, max(n) - min(n) AS spread, count(*) AS k
                                  FROM sizes GROUP BY s) x
            WHERE x.spread > 1 OR x.k <> least(5, (SELECT count(*) FROM clickmart.rfm_segments)))"

check "cohort_retention: week 0 holds every user once, in the week of first_seen" "
    WITH u AS (SELECT date_trunc('week', first_seen AT TIME ZONE 'UTC')::date AS cohort_week,
                      count(*) AS users
               FROM clickmart.users GROUP BY 1)
    SELECT count(*) FROM u
    FULL JOIN (SELECT * FROM clickmart.cohort_retention WHERE week_offset = 0) c USING (cohort_week)
    WHERE u.users IS DISTINCT FROM c.users"

check "experiments: users = sum(experiment_results.users) = user_outcomes rows; converters per variant" "
    WITH o AS (SELECT experiment, variant, count(*) AS users,
                      count(*) FILTER (WHERE converted) AS converters
               FROM clickmart.user_outcomes GROUP BY 1, 2)
    SELECT (SELECT count(*) FROM o FULL JOIN clickmart.experiment_results r USING (experiment, variant)
            WHERE o.users IS DISTINCT FROM r.users OR o.converters IS DISTINCT FROM r.converters)
         + (SELECT count(*) FROM clickmart.experiments e
            WHERE e.users IS DISTINCT FROM (SELECT sum(users) FROM clickmart.experiment_results r
                                            WHERE r.experiment = e.experiment))"

# --- 3. the guide covers every table and view ----------------------------------------------

while IFS= read -r rel; do
    [ -n "$rel" ] || continue
    if grep -q "^### \`$rel\`" "$GUIDE"; then
        cm_ok "guide has a section for $rel"
    else
        cm_bad "guide has no '### \`$rel\`' section"
    fi
done < <(cm_psql "SELECT table_name FROM information_schema.tables
                  WHERE table_schema = 'clickmart' AND table_name <> 'schema_version'
                  ORDER BY table_name COLLATE \"C\"")

cm_log "whole test $((SECONDS - CM_T0))s"
cm_summary
