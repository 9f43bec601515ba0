#!/usr/bin/env python3
"""Compare clickmart's Postgres tables with the independent reference (reference.py).

    compare.py --dump FILE --pg CONNINFO [--schema clickmart] [--topic clickmart.events]
               [--now-ms MS] [--allowed-lateness-ms N] [--session-gap-ms N]
               [--max-future-ms N] [--max-event-bytes N] [--max-json-depth N]
               [--tables a,b,...]

Recomputes sessions, users, funnel_daily, partitions and rejected_events from the kcat
dump of the topic, reads the same tables with psql in a canonical form (timestamps as
ms, money as cents, dates as days since 1970-01-01, text as hex of its UTF-8), and
compares them row by row.  For each table it prints

    table: N rows expected, M rows actual, OK

or the first differences (missing, extra, differing columns).  Exit status: 0 when
every table matches, 1 on any difference, 2 when the comparison could not be made.

Tolerated on the actual side, as the contract allows: funnel_daily rows whose counts
are all zero ("may be deleted"), and partitions rows of partitions that have no message
in the dump with next_offset 0 and nothing counted.
"""

import argparse
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
    return int(s)


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
    return False


def compare_table(table, expected, actual, out):
    """Returns the number of differences; writes the report to out."""
    cols = ref.TABLES[table]["columns"]
    diffs = []
    tolerated = 0
    for key in sorted(expected, key=ref._sort_key):
        e = expected[key]
        a = actual.get(key)
        if a is None:
            diffs.append("  missing: %s" % show_row(table, e))
            continue
        bad = ["%s: expected %s, actual %s" % (n, show_value(ev, k), show_value(av, k))
               for ev, av, (n, k) in zip(e, a, cols) if ev != av]
        if bad:
            diffs.append("  differs: %s\n      %s" % (show_key(table, key), "\n      ".join(bad)))
    for key in sorted(actual, key=ref._sort_key):
        if key not in expected:
            if tolerated_extra(table, actual[key]):
                tolerated += 1
            else:
                diffs.append("  extra:   %s" % show_row(table, actual[key]))
    head = "%s: %d rows expected, %d rows actual" % (table, len(expected), len(actual))
    if tolerated:
        head += " (%d all-zero rows tolerated)" % tolerated
    if not diffs:
        out.write(head + ", OK\n")
    else:
        out.write(head + ", %d differences%s:\n" % (
            len(diffs), "" if len(diffs) <= MAX_SHOWN else " (first %d shown)" % MAX_SHOWN))
        for d in diffs[:MAX_SHOWN]:
            out.write(d + "\n")
    return len(diffs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", required=True)
    ap.add_argument("--pg", required=True, help="libpq conninfo")
    ap.add_argument("--schema", default="clickmart")
    ap.add_argument("--topic", default="clickmart.events")
    ap.add_argument("--tables", default=",".join(ref.TABLE_ORDER),
                    help="comma-separated subset of: " + ", ".join(ref.TABLE_ORDER))
    ref.add_settings_args(ap)
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    for t in tables:
        if t not in ref.TABLES:
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

    total = 0
    for t in tables:
        try:
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
    out.write("compare: %s (%.1f s)\n" % ("OK" if total == 0 else "%d differences" % total,
                                          time.monotonic() - t0))
    out.flush()
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
