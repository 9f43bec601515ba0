#!/usr/bin/env python3
"""Helpers for the fault suite (tests/faults/lib.sh); Python 3 standard library only.

    faultool.py get PATH...                 read JSON on stdin, print the value at each
                                            dotted PATH (flush.in_flight), one per line;
                                            JSON literals (true, null, 12) as JSON
    faultool.py kill-when-flushing SOCK PID TIMEOUT_S
                                            poll /status over one keep-alive connection
                                            and SIGKILL PID as soon as it shows a flush
                                            in flight ("in_flight": true); exit 0 when it
                                            did, 1 on timeout (PID is then left alone)
    faultool.py watch-log FILE REGEX TIMEOUT_S [--kill PID|PIDFILE]
                                            wait until a line of FILE matches REGEX (the
                                            file may not exist yet); with --kill, SIGKILL
                                            PID (or the pid written in PIDFILE by then) the
                                            moment it does; exit 0 / 1 on timeout
    faultool.py backoff LOG MAX_MS          check the retry delays the daemon logged with
                                            "postgres flush failed; will retry": each is
                                            250 ms (a new streak) or min(2 x previous,
                                            MAX_MS), the next failure is not logged before
                                            the delay has passed, and MAX_MS is reached
                                            by a streak of enough failures
    faultool.py latency FILE LIMIT_S        summarise curl time_total samples (one a line):
                                            count, max, p50, p99, over LIMIT_S; exit 1
                                            when any is over
    faultool.py tablediff --pg CONNINFO --a SCHEMA --b SCHEMA
                                            compare every table of two clickmart schemas
                                            (a faulted run and a fault-free run): same
                                            tables, same rows; volatile columns (when a
                                            row was written) are skipped, float8 columns
                                            compared with a relative tolerance of 1e-9,
                                            rows whose counters are all zero tolerated on
                                            either side (the contract lets them go)
"""

import datetime
import decimal
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import http.client

sys.dont_write_bytecode = True

# Columns that say when a row was written, not what it holds.
VOLATILE = {"flushed_at", "rejected_at", "applied_at", "updated_at", "computed_at",
            "fitted_at", "refreshed_at", "written_at"}
FLOAT_TYPES = {"double precision", "real"}
COUNTER_TYPES = {"bigint", "integer", "smallint", "numeric"}
REL_TOL = 1e-9
ABS_TOL = 1e-12


def jget(doc, path):
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def cmd_get(paths):
    try:
        doc = json.loads(sys.stdin.read())
    except ValueError:
        doc = None
    for p in paths:
        v = jget(doc, p)
        print(v if isinstance(v, str) else json.dumps(v))
    return 0


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=2.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def cmd_kill_when_flushing(sock, pid, timeout):
    deadline = time.monotonic() + float(timeout)
    pid = int(pid)
    conn = None
    polls = 0
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = UnixHTTP(sock)
            conn.request("GET", "/status")
            body = conn.getresponse().read()
            polls += 1
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.01)
            continue
        if b'"in_flight":true' in body:
            os.kill(pid, signal.SIGKILL)
            print("caught a flush in flight after %d polls" % polls)
            return 0
        time.sleep(0.001)
    print("no flush in flight seen in %ss (%d polls)" % (timeout, polls))
    return 1


def cmd_watch_log(path, regex, timeout, kill_pid=None):
    rx = re.compile(regex)
    deadline = time.monotonic() + float(timeout)
    pos = 0
    buf = b""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for ln in lines:
                if rx.search(ln.decode("utf-8", "replace")):
                    if kill_pid is not None:
                        if not kill_pid.isdigit():  # a file that holds the pid
                            with open(kill_pid) as pf:
                                kill_pid = pf.read().strip()
                        try:
                            os.kill(int(kill_pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    print(ln.decode("utf-8", "replace"))
                    return 0
        else:
            time.sleep(0.002)
    return 1


LOG_TS = re.compile(r"ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def log_time(line):
    m = LOG_TS.search(line)
    if not m:
        return None
    return datetime.datetime.fromisoformat(m.group(1)).replace(
        tzinfo=datetime.timezone.utc).timestamp()


def cmd_backoff(path, max_ms):
    max_ms = int(max_ms)
    seq = []  # (time, retry_in_ms)
    succeeded_after = set()  # indexes i after which a flush succeeded before i+1
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "postgres flush failed" in line:
                m = re.search(r"retry_in_ms=(\d+)", line)
                if m:
                    seq.append((log_time(line), int(m.group(1))))
            elif "postgres flush succeeded" in line and seq:
                succeeded_after.add(len(seq) - 1)
    problems = []
    streak_len = 0
    longest = 0
    reached = False
    for i, (t, ms) in enumerate(seq):
        if i == 0 or (i - 1) in succeeded_after:
            streak_len = 1
            if ms != min(250, max_ms):
                problems.append("failure %d: first delay of a streak is %d ms, not 250" % (i, ms))
        else:
            streak_len += 1
            want = min(2 * seq[i - 1][1], max_ms)
            if ms != want:
                problems.append("failure %d: delay %d ms, expected %d" % (i, ms, want))
            pt = seq[i - 1][0]
            if t is not None and pt is not None and (t - pt) * 1000 < seq[i - 1][1] - 20:
                problems.append("failure %d came %.0f ms after the previous one, before its "
                                "%d ms back-off" % (i, (t - pt) * 1000, seq[i - 1][1]))
        longest = max(longest, streak_len)
        reached = reached or ms == max_ms
    need = 1
    d = 250
    while d < max_ms:
        d *= 2
        need += 1
    if longest >= need + 1 and not reached:
        problems.append("back-off never reached the %d ms maximum" % max_ms)
    print("%d failed flushes logged, longest streak %d, delays %s%s" % (
        len(seq), longest, ",".join(str(ms) for _, ms in seq[:16]),
        "..." if len(seq) > 16 else ""))
    for p in problems[:10]:
        print("  " + p)
    if not seq:
        print("  no failed flush logged")
        return 1
    return 1 if problems else 0


def cmd_latency(path, limit):
    limit = float(limit)
    xs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    xs.append(float(line))
                except ValueError:
                    xs.append(float("inf"))  # no answer at all
    if not xs:
        print("no samples")
        return 1
    s = sorted(xs)
    over = [x for x in xs if x > limit]
    print("%d samples, max %.1f ms, p50 %.1f ms, p99 %.1f ms, %d over %.0f ms" % (
        len(xs), s[-1] * 1000, s[len(s) // 2] * 1000, s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
        len(over), limit * 1000))
    return 1 if over else 0


# --- tablediff ---------------------------------------------------------------------

def psql(conninfo, sql):
    p = subprocess.run(["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo,
                        "-c", sql], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode("utf-8", "replace").strip())
    return p.stdout.decode("utf-8")


def lit(s):
    return "'" + s.replace("'", "''") + "'"


def ident(s):
    return '"' + s.replace('"', '""') + '"'


def psql_multi(conninfo, sqls):
    """Runs several statements in one psql session; returns the combined output."""
    cmd = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo]
    for q in sqls:
        cmd += ["-c", q]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode("utf-8", "replace").strip())
    return p.stdout.decode("utf-8")


def schema_meta(conninfo, schemas):
    """{schema: {table: ([(column, type)...], [key columns])}} for the base tables."""
    out = psql(conninfo, """
        SELECT c.table_schema || '|' || c.table_name || '|' || c.column_name || '|' ||
               c.data_type || '|' ||
               CASE WHEN EXISTS (
                   SELECT 1 FROM pg_index i JOIN pg_attribute a
                     ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                   WHERE i.indrelid = (quote_ident(c.table_schema) || '.' ||
                                       quote_ident(c.table_name))::regclass
                     AND i.indisprimary AND a.attname = c.column_name)
               THEN 'k' ELSE '' END
        FROM information_schema.columns c JOIN information_schema.tables t
          ON t.table_schema = c.table_schema AND t.table_name = c.table_name
        WHERE c.table_schema IN (%s) AND t.table_type = 'BASE TABLE'
          AND c.table_name <> 'schema_version'
        ORDER BY c.table_schema, c.table_name, c.ordinal_position""" %
               ", ".join(lit(x) for x in schemas))
    meta = {x: {} for x in schemas}
    for line in out.splitlines():
        if not line:
            continue
        sch, tab, col, typ, k = line.split("|")
        cols, key = meta[sch].setdefault(tab, ([], []))
        if col in VOLATILE:
            continue
        cols.append((col, typ))
        if k:
            key.append(col)
    return meta


def fetch_all(conninfo, schema, tables):
    """{table: [row, ...]} in one psql session; rows as lists (numbers as Decimal)."""
    sqls = ["SET TIME ZONE 'UTC'"]
    for t, (cols, _) in sorted(tables.items()):
        sqls.append("SELECT %s || chr(9) || json_build_array(%s)::text FROM %s.%s" % (
            lit(t), ", ".join(ident(c) for c, _ in cols), ident(schema), ident(t)))
    rows = {t: [] for t in tables}
    for line in psql_multi(conninfo, sqls).splitlines():
        if not line:
            continue
        t, js = line.split("\t", 1)
        rows[t].append(json.loads(js, parse_float=decimal.Decimal))
    return rows


def same_value(a, b, typ):
    if a == b:
        return True
    if typ in FLOAT_TYPES and a is not None and b is not None:
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return abs(fa - fb) <= max(ABS_TOL, REL_TOL * max(abs(fa), abs(fb)))
    return False


def all_zero(row, cols, keyset):
    vals = [v for v, (c, t) in zip(row, cols) if c not in keyset and t in COUNTER_TYPES]
    return bool(vals) and all(v in (0, None) for v in vals)


def cmd_tablediff(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="faultool.py tablediff")
    ap.add_argument("--pg", required=True)
    ap.add_argument("--a", required=True, help="schema of the faulted run")
    ap.add_argument("--b", required=True, help="schema of the fault-free run")
    args = ap.parse_args(argv)
    meta = schema_meta(args.pg, [args.a, args.b])
    ma, mb = meta[args.a], meta[args.b]
    total = 0
    if sorted(ma) != sorted(mb) or not ma:
        print("tables differ: only in %s: %s; only in %s: %s" % (
            args.a, sorted(set(ma) - set(mb)), args.b, sorted(set(mb) - set(ma))))
        total += 1
    common = {t: ma[t] for t in ma if t in mb}
    for t in sorted(common):
        if ma[t][0] != mb[t][0]:
            print("%s: columns differ: %s vs %s" % (t, ma[t][0], mb[t][0]))
            total += 1
    common = {t: v for t, v in common.items() if ma[t][0] == mb[t][0]}
    da, db = fetch_all(args.pg, args.a, common), fetch_all(args.pg, args.b, common)
    for t in sorted(common):
        ca, key = common[t]
        key = key or [c for c, _ in ca]
        keyset = set(key)
        kidx = [i for i, (c, _) in enumerate(ca) if c in keyset]
        ra = {tuple(json.dumps(r[i], default=str) for i in kidx): r for r in da[t]}
        rb = {tuple(json.dumps(r[i], default=str) for i in kidx): r for r in db[t]}
        diffs = []
        tolerated = 0
        dup = (len(da[t]) - len(ra)) + (len(db[t]) - len(rb))
        if dup:
            diffs.append("  %d rows with a repeated key" % dup)
        for k in sorted(set(ra) | set(rb)):
            x, y = ra.get(k), rb.get(k)
            if x is None or y is None:
                row = x if x is not None else y
                if all_zero(row, ca, keyset):
                    tolerated += 1
                    continue
                diffs.append("  %s: %s" % ("extra (only in the faulted run)" if y is None
                                            else "missing (only in the fault-free run)",
                                            dict(zip([c for c, _ in ca], row))))
                continue
            bad = ["%s: %s vs %s" % (c, x[i], y[i]) for i, (c, typ) in enumerate(ca)
                   if not same_value(x[i], y[i], typ)]
            if bad:
                diffs.append("  differs at %s: %s" % (
                    ", ".join("%s=%s" % (c, x[i]) for i, (c, _) in enumerate(ca) if c in keyset),
                    "; ".join(bad)))
        head = "%s: %d rows (faulted), %d rows (fault-free)" % (t, len(ra), len(rb))
        if tolerated:
            head += ", %d all-zero rows tolerated" % tolerated
        if diffs:
            print(head + ", %d differences:" % len(diffs))
            for d in diffs[:10]:
                print(d)
        else:
            print(head + ", equal")
        total += len(diffs)
    print("tablediff: %s" % ("equal" if total == 0 else "%d differences" % total))
    return 0 if total == 0 else 1


def main(argv):
    if not argv:
        sys.stderr.write(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "get":
        return cmd_get(rest)
    if cmd == "kill-when-flushing" and len(rest) == 3:
        return cmd_kill_when_flushing(*rest)
    if cmd == "watch-log" and len(rest) in (3, 5):
        kill = rest[4] if len(rest) == 5 and rest[3] == "--kill" else None
        return cmd_watch_log(rest[0], rest[1], rest[2], kill)
    if cmd == "backoff" and len(rest) == 2:
        return cmd_backoff(*rest)
    if cmd == "latency" and len(rest) == 2:
        return cmd_latency(*rest)
    if cmd == "tablediff":
        return cmd_tablediff(rest)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
