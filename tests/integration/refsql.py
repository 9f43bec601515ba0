#!/usr/bin/env python3
"""Write the reference's expected tables as SQL, for compare.py's self-test
(test_compare_selftest.sh).  Python 3 stdlib only.

    refsql.py --dump FILE [reference settings flags] [--schema clickmart] > load.sql

The SQL creates the schema with every table of reference.TABLES (types as the daemon's
schema: timestamptz, numeric(20,2) money, date, boolean, float8, bigint), fills them with
the expected rows (timestamps built exactly from ms, money from cents, floats from their
shortest repr), and creates the three analysts' views written from CONTRACT §3 and §4 on
top of them.  compare.py run against such a database must then report no difference; the
self-test breaks it in known ways and expects compare.py to notice.
"""

import argparse
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

SQL_TYPE = {"text": "text", "int": "bigint", "ts": "timestamptz", "money": "numeric(20,2)",
            "date": "date", "bool": "boolean", "float": "float8"}


def ident(s):
    return '"' + s.replace('"', '""') + '"'


def literal(v, kind):
    if v is None:
        return "NULL"
    if kind == "text":
        return "convert_from('\\x%s'::bytea, 'UTF8')" % v.encode("utf-8").hex()
    if kind == "ts":
        return "(timestamptz 'epoch' + %d * interval '1 millisecond')" % v
    if kind == "money":
        return "(%d::numeric / 100)" % v
    if kind == "date":
        return "(date '1970-01-01' + %d)" % v
    if kind == "bool":
        return "true" if v else "false"
    if kind == "float":
        return "'%r'::float8" % float(v)
    return str(int(v))


VIEWS = """
CREATE VIEW {S}.product_affinity AS
  WITH po AS (SELECT product_id, sum(orders) AS orders FROM {S}.product_daily GROUP BY 1),
       t AS (SELECT sum(orders_with_items) AS total FROM {S}.basket_daily)
  SELECT p.product_a, p.product_b, p.orders, a.orders AS orders_a, b.orders AS orders_b,
         t.total AS total_orders, p.orders::float8 / t.total AS support,
         p.orders::float8 / a.orders AS confidence_ab,
         p.orders::float8 / b.orders AS confidence_ba,
         p.orders::float8 * t.total / (a.orders * b.orders) AS lift
  FROM {S}.product_pairs p JOIN po a ON a.product_id = p.product_a
  JOIN po b ON b.product_id = p.product_b CROSS JOIN t;
CREATE VIEW {S}.daily_kpis AS
  SELECT f.day, f.users AS active_users, coalesce(n.n, 0) AS new_users,
         f.users - coalesce(n.n, 0) AS returning_users, f.sessions, f.orders, f.revenue,
         f.revenue / nullif(f.orders, 0) AS avg_order_value,
         f.users_purchase::float8 / f.users AS user_conversion_rate,
         f.sessions_add_to_cart - f.sessions_purchase AS abandoned_cart_sessions,
         (f.sessions_add_to_cart - f.sessions_purchase)::float8
           / nullif(f.sessions_add_to_cart, 0) AS cart_abandonment_rate
  FROM {S}.funnel_daily f
  LEFT JOIN (SELECT (first_seen AT TIME ZONE 'UTC')::date AS day, count(*) AS n
             FROM {S}.users GROUP BY 1) n ON n.day = f.day
  WHERE f.device = '*' AND f.country = '*';
CREATE VIEW {S}.rfm_segments AS
  WITH b AS (SELECT user_id,
                    floor(extract(epoch FROM (SELECT max(last_seen) FROM {S}.users)
                                             - last_order_at) / 86400)::int AS recency_days,
                    orders AS frequency, revenue AS monetary
             FROM {S}.users WHERE orders > 0),
       s AS (SELECT b.*, ntile(5) OVER (ORDER BY recency_days DESC) AS r_score,
                    ntile(5) OVER (ORDER BY frequency) AS f_score,
                    ntile(5) OVER (ORDER BY monetary) AS m_score FROM b)
  SELECT s.*, r_score::text || f_score::text || m_score::text AS rfm,
         CASE WHEN r_score >= 4 AND f_score >= 4 THEN 'Champions'
              WHEN r_score <= 2 THEN 'At Risk' ELSE 'Other' END AS segment
  FROM s;
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", required=True)
    ap.add_argument("--topic", default="clickmart.events")
    ap.add_argument("--schema", default="clickmart")
    ref.add_settings_args(ap)
    args = ap.parse_args(argv)
    res = ref.compute_from_dump(args.dump, ref.settings_from_args(args), args.now_ms,
                                args.topic)
    s = ident(args.schema)
    out = sys.stdout
    out.write("BEGIN;\nCREATE SCHEMA %s;\n" % s)
    for t in ref.TABLE_ORDER:
        cols = list(ref.TABLES[t]["columns"])
        nkey = ref.TABLES[t]["key"]
        if t in ("partitions", "rejected_events"):
            cols = [("topic", "text")] + cols
            nkey += 1
        out.write("CREATE TABLE %s.%s (%s, PRIMARY KEY (%s));\n" % (
            s, ident(t), ", ".join("%s %s" % (ident(n), SQL_TYPE[k]) for n, k in cols),
            ", ".join(ident(n) for n, _ in cols[:nkey])))
        for key in sorted(res.tables[t], key=ref._sort_key):
            row = res.tables[t][key]
            if t in ("partitions", "rejected_events"):
                row = (args.topic,) + row
            out.write("INSERT INTO %s.%s VALUES (%s);\n" % (
                s, ident(t), ", ".join(literal(v, k) for v, (_, k) in zip(row, cols))))
    out.write(VIEWS.replace("{S}", s))
    out.write("COMMIT;\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
