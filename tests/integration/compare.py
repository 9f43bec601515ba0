#!/usr/bin/env python3
"""Compare clickmart's Postgres tables with the independent reference (reference.py).

    compare.py --dump FILE --pg CONNINFO [--schema clickmart] [--topic clickmart.events]
               [--now-ms MS] [--allowed-lateness-ms N] [--session-gap-ms N]
               [--max-future-ms N] [--max-event-bytes N] [--max-json-depth N]
               [--window-days N] [--exposure-type T] [--confidence C]
               [--sequential-tuning N] [--tables a,b,...] [--require-all]

Recomputes the tables of CONTRACT §1-§7 (sessions, users, funnel_daily,
cohort_retention, product_daily, product_pairs, the daemon's helper basket_daily,
user_exposure, user_outcomes, experiments, experiment_results, experiment_regression,
partitions, rejected_events) from the kcat dump of the topic, reads the same tables with
psql in a canonical form (timestamps as ms, money as cents, dates as days since
1970-01-01, text as hex of its UTF-8, booleans as true/false, floats as float8 text), and
compares them row by row: exactly, except floats, which match within a relative 1e-6
(absolute 1e-12 near zero; NULL only matches NULL, NaN and infinities never match).  The
views product_affinity, daily_kpis and rfm_segments are sanity-checked against the
reference tables.  For each table or view it prints

    table: N rows expected, M rows actual, OK

or the first differences (missing, extra, differing columns).  Exit status: 0 when
every table matches, 1 on any difference, 2 when the comparison could not be made.

By default every table and view is checked.  A table or view of §3-§6 that the daemon's
schema does not have (yet) is reported as "skipped: table missing" and does not fail the
comparison, unless --require-all is given; the tables of §3 sessions/users/funnel_daily
and §7 must always exist.

Tolerated on the actual side, as the contract allows: funnel_daily rows whose counts
are all zero ("may be deleted"), partitions rows of partitions that have no message
in the dump with next_offset 0 and nothing counted, basket_daily rows (not a contract
table) whose counts are all zero, and daily_kpis rows of days without sessions.
"""

import argparse
import math
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

MAX_SHOWN = 10


def quote_ident(s):
    return '"' + s.replace('"', '""') + '"'


def quote_literal(s):
    # standard_conforming_strings is on by default since Postgres 9.1.
    return "'" + s.replace("'", "''") + "'"


def column_expr(name, kind):
    c = quote_ident(name)
    if kind == "float":
        return "coalesce((%s)::float8::text, 'NULL')" % c
    if kind == "text":
        # 'x' prefix: never empty, so '' and NULL cannot be confused.
        return "coalesce('x' || encode(convert_to(%s, 'UTF8'), 'hex'), 'NULL')" % c
    if kind == "ts":
        return "coalesce(((extract(epoch from %s) * 1000)::bigint)::text, 'NULL')" % c
    if kind == "money":
        return "coalesce(((%s * 100)::bigint)::text, 'NULL')" % c
    if kind == "date":
        return "coalesce((%s - date '1970-01-01')::text, 'NULL')" % c
    return "coalesce((%s)::text, 'NULL')" % c


def table_query(table, schema, topic):
    cols = ref.TABLES[table]["columns"]
    sql = "SELECT %s FROM %s.%s" % (
        ", ".join(column_expr(n, k) for n, k in cols), quote_ident(schema), quote_ident(table))
    if table in ("partitions", "rejected_events"):
        sql += " WHERE topic = %s" % quote_literal(topic)
    return sql


def decode_field(s, kind):
    if s == "NULL":
        return None
    if kind == "text":
        assert s.startswith("x"), s
        return bytes.fromhex(s[1:]).decode("utf-8", "backslashreplace")
    if kind == "bool":
        if s not in ("true", "false"):
            raise PsqlError("not a boolean: %r" % s)
        return s == "true"
    if kind == "float":
        return float(s)  # also 'NaN', 'Infinity', '-Infinity': never equal to the reference
    return int(s)


FLOAT_REL_TOL = 1e-6
FLOAT_ABS_TOL = 1e-12


def floats_close(e, a, rel=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL):
    """Both None, or both finite and within rel (relative) or abs_tol (absolute)."""
    if e is None or a is None:
        return e is None and a is None
    if not (math.isfinite(e) and math.isfinite(a)):
        return False
    return abs(e - a) <= max(rel * max(abs(e), abs(a)), abs_tol)


def values_equal(e, a, kind):
    if kind == "float":
        return floats_close(e, a)
    if kind == "bool":
        return e is a or (e is not None and a is not None and bool(e) == bool(a))
    return e == a


class PsqlError(Exception):
    pass


def run_psql(conninfo, sql):
    cmd = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F", ",",
           "-d", conninfo, "-c", sql]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise PsqlError(p.stderr.decode("utf-8", "replace").strip())
    return p.stdout.decode("ascii").splitlines()


def fetch_table(conninfo, table, schema, topic):
    cols = ref.TABLES[table]["columns"]
    nkey = ref.TABLES[table]["key"]
    rows = {}
    dup_keys = 0
    for line in run_psql(conninfo, table_query(table, schema, topic)):
        if line == "":
            continue
        fields = line.split(",")
        if len(fields) != len(cols):
            raise PsqlError("unexpected psql line for %s: %r" % (table, line[:200]))
        row = tuple(decode_field(f, k) for f, (_, k) in zip(fields, cols))
        if row[:nkey] in rows:
            dup_keys += 1
        rows[row[:nkey]] = row
    return rows, dup_keys


def sub_ms_query(table, schema, topic):
    """Counts timestamps that are not whole milliseconds (the schema says exact ms)."""
    cols = [n for n, k in ref.TABLES[table]["columns"] if k == "ts"]
    if not cols:
        return None
    cond = " OR ".join("(extract(epoch from %s) * 1000) <> trunc(extract(epoch from %s) * 1000)"
                       % (quote_ident(c), quote_ident(c)) for c in cols)
    sql = "SELECT count(*) FROM %s.%s WHERE (%s)" % (quote_ident(schema), quote_ident(table), cond)
    if table in ("partitions", "rejected_events"):
        sql += " AND topic = %s" % quote_literal(topic)
    return sql


def show_value(v, kind):
    if v is None:
        return "NULL"
    if kind == "float":
        return repr(v)
    if kind == "bool":
        return "true" if v else "false"
    if kind == "ts":
        return "%d (%s)" % (v, ref.civil_from_ms(v))
    if kind == "money":
        return "%d cents" % v
    if kind == "date":
        return "%d (%s)" % (v, ref.civil_from_ms(v * ref.MS_PER_DAY)[:10])
    if kind == "text":
        return repr(v)
    return str(v)


def show_key(table, key):
    cols = ref.TABLES[table]["columns"]
    return ", ".join("%s=%s" % (n, show_value(v, k)) for v, (n, k) in zip(key, cols))


def show_row(table, row):
    cols = ref.TABLES[table]["columns"]
    return ", ".join("%s=%s" % (n, show_value(v, k)) for v, (n, k) in zip(row, cols))


def tolerated_extra(table, row):
    if table == "funnel_daily":
        return all(v == 0 for v in row[3:])
    if table == "partitions":
        # (partition, next_offset, watermark, accepted, duplicates, rejected)
        return row[1] == 0 and row[2] is None and row[3:] == (0, 0, 0)
    if table == "basket_daily":
        return all(v == 0 for v in row[1:])
    return False


def compare_table(table, expected, actual, out):
    """Returns the number of differences; writes the report to out."""
    cols = ref.TABLES[table]["columns"]
    diffs = []
    tolerated = 0
    max_rel = None  # the largest relative float difference seen, for the report
    for key in sorted(expected, key=ref._sort_key):
        e = expected[key]
        a = actual.get(key)
        if a is None:
            diffs.append("  missing: %s" % show_row(table, e))
            continue
        for ev, av, (_, k) in zip(e, a, cols):
            if k == "float" and ev is not None and av is not None and math.isfinite(av):
                rel = abs(ev - av) / max(abs(ev), abs(av)) if ev != av else 0.0
                max_rel = rel if max_rel is None else max(max_rel, rel)
        bad = ["%s: expected %s, actual %s" % (n, show_value(ev, k), show_value(av, k))
               for ev, av, (n, k) in zip(e, a, cols) if not values_equal(ev, av, k)]
        if bad:
            diffs.append("  differs: %s\n      %s" % (show_key(table, key), "\n      ".join(bad)))
    for key in sorted(actual, key=ref._sort_key):
        if key not in expected:
            if tolerated_extra(table, actual[key]):
                tolerated += 1
            else:
                diffs.append("  extra:   %s" % show_row(table, actual[key]))
    return report(table, len(expected), len(actual), tolerated, diffs, out, max_rel)


def report(name, n_expected, n_actual, tolerated, diffs, out, max_rel=None):
    head = "%s: %d rows expected, %d rows actual" % (name, n_expected, n_actual)
    if tolerated:
        head += " (%d all-zero rows tolerated)" % tolerated
    if not diffs:
        out.write(head + ", OK%s\n" % (
            "" if max_rel is None else " (floats within %.1e relative)" % max_rel))
    else:
        out.write(head + ", %d differences%s:\n" % (
            len(diffs), "" if len(diffs) <= MAX_SHOWN else " (first %d shown)" % MAX_SHOWN))
        for d in diffs[:MAX_SHOWN]:
            out.write(d + "\n")
    return len(diffs)


# ---------------------------------------------------------------------------
# The analysts' views (CONTRACT §3, §4): not exact tables, so sanity checks against the
# reference tables.

VIEW_TOL = 1e-9


def fetch_view(conninfo, schema, view, cols):
    """cols: [(name, kind)] -> list of decoded tuples."""
    sql = "SELECT %s FROM %s.%s" % (", ".join(column_expr(n, k) for n, k in cols),
                                    quote_ident(schema), quote_ident(view))
    rows = []
    for line in run_psql(conninfo, sql):
        if line == "":
            continue
        fields = line.split(",")
        if len(fields) != len(cols):
            raise PsqlError("unexpected psql line for %s: %r" % (view, line[:200]))
        rows.append(tuple(decode_field(f, k) for f, (_, k) in zip(fields, cols)))
    # In key order (the first two columns), for a stable report.
    return sorted(rows, key=lambda r: ref._sort_key(tuple("" if v is None else v for v in r[:2])))


def _near(a, e):
    return floats_close(e, a, rel=VIEW_TOL, abs_tol=1e-15)


def check_product_affinity(res, conninfo, schema, out):
    """Every product_pairs row with orders_a, orders_b = purchases holding each product
    (the reference product_daily.orders summed over days), total_orders = purchases with
    items (the reference basket_daily), and support, confidence_ab, confidence_ba and lift
    by the formulas of §4 (relative 1e-9)."""
    cols = [("product_a", "text"), ("product_b", "text"), ("orders", "int"),
            ("orders_a", "int"), ("orders_b", "int"), ("total_orders", "int"),
            ("support", "float"), ("confidence_ab", "float"), ("confidence_ba", "float"),
            ("lift", "float")]
    rows = fetch_view(conninfo, schema, "product_affinity", cols)
    product_orders = {}
    for (_, pid), row in res.tables["product_daily"].items():
        product_orders[pid] = product_orders.get(pid, 0) + row[4]
    total = sum(row[1] for row in res.tables["basket_daily"].values())
    pairs = {k: row[2] for k, row in res.tables["product_pairs"].items()}
    diffs, seen = [], set()
    for r in rows:
        key = (r[0], r[1])
        where = "product_a=%r, product_b=%r" % key
        if key in seen:
            diffs.append("  duplicate: " + where)
            continue
        seen.add(key)
        if key not in pairs:
            diffs.append("  extra:   %s, orders=%s" % (where, r[2]))
            continue
        n, na, nb = pairs[key], product_orders.get(key[0], 0), product_orders.get(key[1], 0)
        want = {"orders": n, "orders_a": na, "orders_b": nb, "total_orders": total}
        bad = ["%s: expected %s, actual %s" % (c, want[c], v)
               for (c, _), v in zip(cols[2:6], r[2:6]) if v != want[c]]
        fwant = {"support": n / total if total else None,
                 "confidence_ab": n / na if na else None,
                 "confidence_ba": n / nb if nb else None,
                 "lift": n * total / (na * nb) if na and nb else None}
        bad += ["%s: expected %r, actual %r" % (c, fwant[c], v)
                for (c, _), v in zip(cols[6:], r[6:]) if not _near(v, fwant[c])]
        if bad:
            diffs.append("  differs: %s\n      %s" % (where, "\n      ".join(bad)))
    for key in sorted(pairs, key=ref._sort_key):
        if key not in seen:
            diffs.append("  missing: product_a=%r, product_b=%r, orders=%d" % (key[0], key[1],
                                                                             pairs[key]))
    return report("product_affinity (view)", len(pairs), len(rows), 0, diffs, out)


def check_daily_kpis(res, conninfo, schema, out):
    """One row per day with a session: active_users (distinct users with a session starting
    that day), new_users (users first seen that day), returning_users = active - new,
    sessions, orders and revenue of the sessions starting that day,
    abandoned_cart_sessions (sessions at stage 3 or 4) exactly; avg_order_value within
    half a cent of revenue / orders (NULL without orders); cart_abandonment_rate =
    abandoned / sessions at stage >= 3 (relative 1e-9, NULL without such sessions);
    user_conversion_rate in [0, 1]."""
    cols = [("day", "date"), ("active_users", "int"), ("new_users", "int"),
            ("returning_users", "int"), ("sessions", "int"), ("orders", "int"),
            ("revenue", "money"), ("avg_order_value", "float"),
            ("user_conversion_rate", "float"), ("abandoned_cart_sessions", "int"),
            ("cart_abandonment_rate", "float")]
    rows = fetch_view(conninfo, schema, "daily_kpis", cols)
    days = {}
    for s in res.sessions:
        d = days.setdefault(s["started_at"] // ref.MS_PER_DAY,
                            {"users": set(), "sessions": 0, "orders": 0, "revenue": 0,
                             "cart": 0, "abandoned": 0, "new": 0})
        d["users"].add(s["user_id"])
        d["sessions"] += 1
        d["orders"] += s["purchases"]
        d["revenue"] += s["revenue"]
        d["cart"] += s["funnel_stage"] >= 3
        d["abandoned"] += s["funnel_stage"] in (3, 4)
    for row in res.tables["users"].values():
        days[row[1] // ref.MS_PER_DAY]["new"] += 1  # a user's first event starts a session
    diffs, seen, tolerated = [], set(), 0
    for r in rows:
        day = r[0]
        where = "day=%s" % show_value(day, "date")
        if day in seen:
            diffs.append("  duplicate: " + where)
            continue
        seen.add(day)
        if day not in days:
            if r[4] == 0 and r[1] == 0:
                tolerated += 1
            else:
                diffs.append("  extra:   %s, sessions=%s" % (where, r[4]))
            continue
        d = days[day]
        active = len(d["users"])
        want = [("active_users", active, r[1]), ("new_users", d["new"], r[2]),
                ("returning_users", active - d["new"], r[3]), ("sessions", d["sessions"], r[4]),
                ("orders", d["orders"], r[5]), ("revenue", d["revenue"], r[6]),
                ("abandoned_cart_sessions", d["abandoned"], r[9])]
        bad = ["%s: expected %s, actual %s" % (c, show_value(e, "money" if c == "revenue" else "int"),
                                               show_value(a, "money" if c == "revenue" else "int"))
               for c, e, a in want if e != a]
        aov = r[7]
        if d["orders"] == 0:
            if aov is not None:
                bad.append("avg_order_value: expected NULL (no orders), actual %r" % aov)
        elif aov is None or not math.isfinite(aov) or \
                abs(aov - d["revenue"] / 100.0 / d["orders"]) > 0.005 + 1e-9:
            bad.append("avg_order_value: expected %r (within half a cent), actual %r"
                       % (d["revenue"] / 100.0 / d["orders"], aov))
        ucr = r[8]
        if ucr is None or not math.isfinite(ucr) or not 0.0 <= ucr <= 1.0:
            bad.append("user_conversion_rate: expected a value in [0, 1], actual %r" % ucr)
        car = d["abandoned"] / d["cart"] if d["cart"] else None
        if not _near(r[10], car):
            bad.append("cart_abandonment_rate: expected %r, actual %r" % (car, r[10]))
        if bad:
            diffs.append("  differs: %s\n      %s" % (where, "\n      ".join(bad)))
    for day in sorted(days):
        if day not in seen:
            diffs.append("  missing: day=%s, sessions=%d" % (show_value(day, "date"),
                                                            days[day]["sessions"]))
    return report("daily_kpis (view)", len(days), len(rows), tolerated, diffs, out)


def check_rfm_segments(res, conninfo, schema, out):
    """One row per user with orders > 0: frequency = orders, monetary = revenue, a
    recency_days >= 0, r/f/m scores in 1..5, an rfm code and a non-empty segment."""
    cols = [("user_id", "text"), ("recency_days", "int"), ("frequency", "int"),
            ("monetary", "money"), ("r_score", "int"), ("f_score", "int"),
            ("m_score", "int"), ("rfm", "text"), ("segment", "text")]
    rows = fetch_view(conninfo, schema, "rfm_segments", cols)
    buyers = {k[0]: row for k, row in res.tables["users"].items() if row[7] > 0}
    diffs, seen = [], set()
    for r in rows:
        uid = r[0]
        where = "user_id=%r" % uid
        if uid in seen:
            diffs.append("  duplicate: " + where)
            continue
        seen.add(uid)
        if uid not in buyers:
            diffs.append("  extra:   %s, frequency=%s" % (where, r[2]))
            continue
        u = buyers[uid]
        bad = []
        if r[2] != u[7]:
            bad.append("frequency: expected %d, actual %s" % (u[7], r[2]))
        if r[3] != u[8]:
            bad.append("monetary: expected %s, actual %s" % (show_value(u[8], "money"),
                                                             show_value(r[3], "money")))
        if r[1] is None or r[1] < 0:
            bad.append("recency_days: expected >= 0, actual %s" % show_value(r[1], "int"))
        for c, v in zip(("r_score", "f_score", "m_score"), r[4:7]):
            if v is None or not 1 <= v <= 5:
                bad.append("%s: expected 1..5, actual %s" % (c, show_value(v, "int")))
        if not r[7]:
            bad.append("rfm: expected a code, actual %s" % show_value(r[7], "text"))
        if not r[8]:
            bad.append("segment: expected a name, actual %s" % show_value(r[8], "text"))
        if bad:
            diffs.append("  differs: %s\n      %s" % (where, "\n      ".join(bad)))
    for uid in sorted(buyers):
        if uid not in seen:
            diffs.append("  missing: user_id=%r, orders=%d" % (uid, buyers[uid][7]))
    return report("rfm_segments (view)", len(buyers), len(rows), 0, diffs, out)


VIEW_CHECKS = {
    "product_affinity": check_product_affinity,
    "daily_kpis": check_daily_kpis,
    "rfm_segments": check_rfm_segments,
}


def existing_relations(conninfo, schema):
    """Names of the tables and views in schema."""
    sql = ("SELECT 'x' || encode(convert_to(c.relname::text, 'UTF8'), 'hex') FROM pg_class c"
           " JOIN pg_namespace n ON n.oid = c.relnamespace"
           " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
           % quote_literal(schema))
    return {decode_field(line, "text") for line in run_psql(conninfo, sql) if line}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", required=True)
    ap.add_argument("--pg", required=True, help="libpq conninfo")
    ap.add_argument("--schema", default="clickmart")
    ap.add_argument("--topic", default="clickmart.events")
    everything = ref.TABLE_ORDER + ref.VIEW_ORDER
    ap.add_argument("--tables", default=",".join(everything),
                    help="comma-separated subset of: " + ", ".join(everything))
    ap.add_argument("--require-all", action="store_true",
                    help="fail when a table or view is missing in Postgres, instead of "
                         "skipping it")
    ref.add_settings_args(ap)
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    for t in tables:
        if t not in ref.TABLES and t not in VIEW_CHECKS:
            ap.error("unknown table %r" % t)

    out = sys.stdout
    t0 = time.monotonic()
    try:
        res = ref.compute_from_dump(args.dump, ref.settings_from_args(args), args.now_ms,
                                    args.topic)
    except (OSError, ref.DumpError) as e:
        print("compare.py: cannot read the dump: %s" % e, file=sys.stderr)
        return 2
    t1 = time.monotonic()
    out.write("reference (%.1f s): %s\n" % (t1 - t0, "\n  ".join(ref.summary_lines(res))))

    try:
        present = existing_relations(args.pg, args.schema)
    except PsqlError as e:
        print("compare.py: listing the tables of schema %s failed: %s" % (args.schema, e),
              file=sys.stderr)
        return 2

    total = 0
    skipped = []
    for t in tables:
        if t not in present and t not in ref.BASE_TABLES:
            if args.require_all:
                out.write("%s: missing in Postgres (--require-all)\n" % t)
                total += 1
            else:
                out.write("%s: skipped: table missing\n" % t)
                skipped.append(t)
            continue
        try:
            if t in VIEW_CHECKS:
                total += VIEW_CHECKS[t](res, args.pg, args.schema, out)
                continue
            actual, dup_keys = fetch_table(args.pg, t, args.schema, args.topic)
        except PsqlError as e:
            print("compare.py: reading %s failed: %s" % (t, e), file=sys.stderr)
            return 2
        total += compare_table(t, res.tables[t], actual, out)
        q = sub_ms_query(t, args.schema, args.topic)
        if q is not None:
            n = int(run_psql(args.pg, q)[0])
            if n:
                out.write("  %s: %d rows hold a timestamp that is not a whole millisecond\n"
                          % (t, n))
                total += n
        if dup_keys:
            out.write("  %s: %d duplicate keys in Postgres\n" % (t, dup_keys))
            total += dup_keys
    out.write("compare: %s%s (%.1f s)\n" % (
        "OK" if total == 0 else "%d differences" % total,
        ", %d skipped (missing: %s)" % (len(skipped), ", ".join(skipped)) if skipped else "",
        time.monotonic() - t0))
    out.flush()
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
