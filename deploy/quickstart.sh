#!/usr/bin/env bash
# clickmart quick start: install dependencies, build, start a throwaway
# Postgres and the dev broker, generate about a million events, run clickmartd
# until it has caught up, and print a readout from the Postgres tables.
#
#   ./deploy/quickstart.sh          run it (EVENTS=200000 for a smaller run)
#   ./deploy/quickstart.sh stop     stop Postgres and the dev broker, keep the data
#   ./deploy/quickstart.sh clean    stop everything and delete the quick start's directory
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QS=${QS_DIR:-$ROOT/qs}
EVENTS=${EVENTS:-1000000}
PARTITIONS=${PARTITIONS:-32}
PGPORT=${PGPORT:-54329}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)

as_pg() {
  # initdb refuses to run as root: run the server as the postgres user then.
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop_all() {
  if [ -f "$QS/broker.pid" ]; then
    kill "$(cat "$QS/broker.pid")" 2>/dev/null || true
    rm -f "$QS/broker.pid"
  fi
  if [ -d "$QS/pgdata" ] && [ -n "$PGBIN" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$QS/pgdata" -m fast stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  stop) stop_all; echo "quickstart: stopped (data kept in $QS)"; exit 0 ;;
  clean) stop_all; rm -rf "$QS"; echo "quickstart: stopped and removed $QS"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [stop|clean]" >&2; exit 2 ;;
esac

echo "== 1/6 dependencies"
"$ROOT/deploy/install-deps.sh"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

echo "== 2/6 build"
cmake -S "$ROOT" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$ROOT/build" -j"$(nproc)" >/dev/null
BIN=$ROOT/build

stop_all
rm -rf "$QS"
mkdir -p "$QS"
chmod 755 "$QS"

echo "== 3/6 Postgres (throwaway, socket in $QS, port $PGPORT)"
if [ "$(id -u)" -eq 0 ]; then chown postgres "$QS"; fi
as_pg "$PGBIN/initdb" -D "$QS/pgdata" -E UTF8 --auth=trust -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$QS/pgdata" -l "$QS/postgres.log" -w \
  -o "-k $QS -p $PGPORT -c listen_addresses= -c fsync=off -c synchronous_commit=off" start >/dev/null
PG="host=$QS port=$PGPORT user=postgres dbname=postgres"

echo "== 4/6 dev broker ($PARTITIONS partitions) and $EVENTS generated events"
"$BIN/tools/clickmart-devbroker" --partitions "$PARTITIONS" --topic clickmart.events \
  >"$QS/broker.out" 2>"$QS/broker.log" &
echo $! >"$QS/broker.pid"
for _ in $(seq 1 50); do [ -s "$QS/broker.out" ] && break; sleep 0.1; done
BROKER=$(head -1 "$QS/broker.out")
[ -n "$BROKER" ] || { echo "quickstart: the dev broker did not start (see $QS/broker.log)" >&2; exit 1; }
"$BIN/tools/clickmart-gen" --seed 42 --events "$EVENTS" --days 14 \
  --brokers "$BROKER" --topic clickmart.events

echo "== 5/6 clickmartd (consumes to the end, flushes, exits)"
T0=$(date +%s.%N)
"$BIN/clickmartd" --brokers "$BROKER" --topic clickmart.events --pg "$PG" \
  --state-dir "$QS/state" --status-socket "$QS/clickmartd.sock" --exit-at-end \
  --stats-log-interval-ms 0 2>"$QS/clickmartd.log" &
DPID=$!
while kill -0 "$DPID" 2>/dev/null; do
  sleep 1
  if [ -S "$QS/clickmartd.sock" ]; then
    curl -s --max-time 1 --unix-socket "$QS/clickmartd.sock" http://localhost/status 2>/dev/null |
      python3 -c 'import json,sys
try:
    s=json.load(sys.stdin)
except Exception:
    sys.exit(0)
done=sum(p["next_offset"] for p in s["partitions"]); end=sum((p["end_offset"] or 0) for p in s["partitions"])
print("\r  consumed %d/%d messages (%.0f%%), accepted %d, duplicates %d, rejected %d, lag %d   " % (done, end, 100.0*done/max(end,1), s["accepted"], s["duplicates"], s["rejected"], s["lag"]), end="", flush=True)' || true
  fi
done
wait "$DPID" || { echo; echo "quickstart: clickmartd failed, see $QS/clickmartd.log" >&2; exit 1; }
T1=$(date +%s.%N)
echo
python3 -c "print('  done in %.1f s (%.0f events/s)' % ($T1-$T0, $EVENTS/($T1-$T0)))"

echo "== 6/6 readout"
Q() { psql "$PG" -X -q -P pager=off "$@"; }
title() { printf '\n-- %s\n' "$*"; }
title "daily funnel (sessions), step conversions and drop-off"
Q -c "SELECT day, sessions,
        round(100.0*sessions_product_view/NULLIF(sessions,0),1) AS \"viewed %\",
        round(100.0*sessions_add_to_cart/NULLIF(sessions_product_view,0),1) AS \"view->cart %\",
        round(100.0*sessions_checkout/NULLIF(sessions_add_to_cart,0),1) AS \"cart->checkout %\",
        round(100.0*sessions_purchase/NULLIF(sessions_checkout,0),1) AS \"checkout->buy %\",
        round(100.0*sessions_purchase/NULLIF(sessions,0),2) AS \"conversion %\",
        orders, revenue
      FROM clickmart.funnel_daily WHERE device='*' AND country='*' ORDER BY day;"
title "conversion by device"
Q -c "SELECT device, sum(sessions) AS sessions, sum(sessions_purchase) AS converted,
        round(100.0*sum(sessions_purchase)/NULLIF(sum(sessions),0),2) AS \"conversion %\",
        sum(revenue) AS revenue
      FROM clickmart.funnel_daily WHERE device<>'*' AND country='*' GROUP BY device ORDER BY 2 DESC;"
title "rejected messages by reason"
Q -c "SELECT reason, count(*) FROM clickmart.rejected_events GROUP BY reason ORDER BY 2 DESC;"
title "accepted, duplicate and rejected messages"
Q -c "SELECT sum(accepted) AS accepted, sum(duplicates) AS duplicates, sum(rejected) AS rejected
      FROM clickmart.partitions;"
title "weekly retention: % of each cohort (week of the first visit) active N weeks later"
Q -c "WITH asof AS (SELECT (max(last_seen) AT TIME ZONE 'UTC')::date AS day FROM clickmart.users),
      c AS (SELECT cohort_week,
                   max(users) FILTER (WHERE week_offset = 0) AS w0,
                   coalesce(max(users) FILTER (WHERE week_offset = 1), 0) AS w1,
                   coalesce(max(users) FILTER (WHERE week_offset = 2), 0) AS w2,
                   coalesce(max(users) FILTER (WHERE week_offset = 3), 0) AS w3
            FROM clickmart.cohort_retention GROUP BY cohort_week)
      SELECT c.cohort_week, c.w0 AS users, 100.0 AS \"week 0 %\",
        CASE WHEN c.cohort_week + 7 <= a.day THEN round(100.0*c.w1/c.w0,1) END AS \"week 1 %\",
        CASE WHEN c.cohort_week + 14 <= a.day THEN round(100.0*c.w2/c.w0,1) END AS \"week 2 %\",
        CASE WHEN c.cohort_week + 21 <= a.day THEN round(100.0*c.w3/c.w0,1) END AS \"week 3 %\"
      FROM c CROSS JOIN asof a ORDER BY c.cohort_week;"
title "bought together: top 10 product pairs by lift (at least 5 orders)"
Q -c "SELECT product_a, product_b, orders, orders_a, orders_b,
        round(100*support::numeric,2) AS \"support %\",
        round(100*confidence_ab::numeric,1) AS \"P(b|a) %\",
        round(100*confidence_ba::numeric,1) AS \"P(a|b) %\",
        round(lift::numeric,2) AS lift
      FROM clickmart.product_affinity WHERE orders >= 5
      ORDER BY lift DESC, orders DESC, product_a COLLATE \"C\", product_b COLLATE \"C\" LIMIT 10;"
title "experiments: 7-day conversion per variant against control"
Q -c "SELECT r.experiment, r.variant, CASE WHEN r.is_control THEN 'control' ELSE 'treatment' END AS role,
        r.users, round(100*r.conversion_rate::numeric,2) AS \"conversion %\",
        round(100*r.abs_lift::numeric,2) AS \"lift pp\",
        '[' || round(100*r.diff_ci_low::numeric,2) || ', ' || round(100*r.diff_ci_high::numeric,2) || ']' AS \"95% CI pp\",
        round(r.p_value::numeric,4) AS p_value,
        '[' || round(100*r.seq_ci_low::numeric,2) || ', ' || round(100*r.seq_ci_high::numeric,2) || ']' AS \"sequential CI pp\",
        CASE WHEN e.srm_detected THEN 'SRM detected (p=' || round(e.srm_p::numeric,6) || ')'
             WHEN e.srm_detected IS NULL THEN 'not tested'
             ELSE 'ok (p=' || round(e.srm_p::numeric,3) || ')' END AS \"sample ratio\"
      FROM clickmart.experiment_results r JOIN clickmart.experiments e USING (experiment)
      ORDER BY r.experiment COLLATE \"C\", r.is_control DESC, r.variant COLLATE \"C\";"
Q -At -c "SELECT r.experiment || ': ' || r.variant || ' vs ' || e.control_variant || ': '
        || CASE WHEN e.srm_detected THEN 'SRM detected: do not trust'
                WHEN r.seq_ci_low > 0 THEN 'treatment wins'
                WHEN r.seq_ci_high < 0 THEN 'treatment loses'
                ELSE 'keep running' END
        || ' (lift ' || coalesce(to_char(100*r.abs_lift, 'FMSG990.00') || ' pp', 'n/a') || ', sequential CI '
        || coalesce('[' || to_char(100*r.seq_ci_low, 'FMSG990.00') || ', '
                        || to_char(100*r.seq_ci_high, 'FMSG990.00') || ']', 'n/a') || ')'
      FROM clickmart.experiment_results r JOIN clickmart.experiments e USING (experiment)
      WHERE NOT r.is_control
      ORDER BY r.experiment COLLATE \"C\", r.variant COLLATE \"C\";"

cat <<EOT

Postgres and the dev broker are still running.
  psql:     psql "$PG"
  tables:   clickmart.sessions, users, funnel_daily, cohort_retention, product_daily,
            product_pairs, basket_daily, user_exposure, user_outcomes, experiments,
            experiment_results, experiment_regression, partitions, rejected_events;
            views daily_kpis, rfm_segments, product_affinity
  queries:  $ROOT/docs/analyst-guide.md
  status:   start clickmartd again (without --exit-at-end) and run
            $BIN/tools/clickmartctl --socket $QS/clickmartd.sock status
  stop:     $0 stop      (or '$0 clean' to also delete $QS)
EOT
