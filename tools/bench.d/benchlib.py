#!/usr/bin/env python3
"""Helpers of tools/bench (Python 3 stdlib only).  Not meant to be run by hand.

    benchlib.py free-port
    benchlib.py proc-cpu PID                                     -> CPU ticks of PID and its children
    benchlib.py copyprep OUT.copy < kcat '%p %o %S\\n%s\\n' dump   -> JSON counts on stdout
    benchlib.py rusage OUT -- CMD...                             runs CMD, its rusage to OUT
    benchlib.py cpu-snap OUT DAEMON BROKER PG                    steady mode: CPU counters now
    benchlib.py cpu-split STEP SNAP0 SNAP1 GEN MESSAGES          steady mode: where the cores went
    benchlib.py daemonlog FILE                                   -> JSON of clickmartd's log
    benchlib.py steps FILE                                       -> JSON of batch.sql's timings
    benchlib.py poll-pg ...                                      steady mode sampler
    benchlib.py freshness ...                                    steady mode analysis
    benchlib.py poll-status ...                                  scale mode sampler
    benchlib.py perf-windows ...                                 scale mode --perf recorder
    benchlib.py scale ...                                        scale mode analysis
    benchlib.py report MODE KV-FILE JSON-OUT [BASELINE]          summary table + JSON
    benchlib.py ab-summary OUT MODE A B JSON...                  --compare: pairs -> table + JSON
"""

import bisect
import datetime
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True

# --------------------------------------------------------------------------- small tools


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def percentile(sorted_vals, q):
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(math.ceil(q / 100.0 * len(sorted_vals))) - 1))
    return sorted_vals[k]


def parse_log_ts(s):
    """clickmartd's log timestamp (RFC 3339 UTC, ms) -> seconds since the epoch."""
    s = s.strip().rstrip("Z").replace("T", " ")
    if "+" in s[10:]:
        s = s[: 10 + s[10:].index("+")]
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in s else "%Y-%m-%d %H:%M:%S"
    d = datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc)
    return d.timestamp()


# --------------------------------------------------------------------------- batch input


def copy_escape(b):
    return (b.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")
            .replace(b"\r", b"\\r"))


def copyprep(out_path):
    """Reads kcat's '%p %o %S\\n%s\\n' dump and writes a COPY text file of
    (partition, offset, payload).  Payloads that are not valid UTF-8 or hold a NUL
    byte cannot be text in Postgres: they are left out (they are rejects anyway)."""
    inp = sys.stdin.buffer
    n = dropped_utf8 = dropped_nul = 0
    parts = {}
    with open(out_path, "wb", buffering=1 << 20) as out:
        while True:
            hdr = inp.readline()
            if not hdr:
                break
            p, o, size = hdr.split()
            size = int(size)
            val = inp.read(size) if size > 0 else b""
            inp.read(1)  # the newline after the value
            n += 1
            p = int(p)
            o = int(o)
            lo_hi = parts.get(p)
            if lo_hi is None:
                parts[p] = [o, o, 1]
            else:
                lo_hi[0] = min(lo_hi[0], o)
                lo_hi[1] = max(lo_hi[1], o)
                lo_hi[2] += 1
            if b"\x00" in val:
                dropped_nul += 1
                continue
            try:
                val.decode("utf-8")
            except UnicodeDecodeError:
                dropped_utf8 += 1
                continue
            out.write(b"%d\t%d\t%s\n" % (p, o, copy_escape(val)))
    gaps = sum(1 for lo, hi, c in parts.values() if lo != 0 or hi - lo + 1 != c)
    json.dump({"messages": n, "dropped_invalid_utf8": dropped_utf8, "dropped_nul": dropped_nul,
               "partitions_seen": len(parts), "partitions_not_from_offset_0": gaps,
               "copied": n - dropped_utf8 - dropped_nul}, sys.stdout)
    print()


# --------------------------------------------------------------------------- parsers


def rusage(args):
    """rusage OUT -- CMD...: runs CMD, forwards SIGTERM/SIGINT/SIGHUP to it, and writes its
    wall time, CPU time, peak RSS and file-system writes (from wait4) to OUT as JSON.
    Exits with CMD's status (128 + signal when it was killed)."""
    out = args[0]
    cmd = args[2:] if len(args) > 1 and args[1] == "--" else args[1:]
    t0 = time.time()
    p = subprocess.Popen(cmd)

    def fwd(sig, _frame):
        try:
            os.kill(p.pid, sig)
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, fwd)
    # Wait without reaping first: the zombie's /proc/PID/io holds its final I/O counters.
    while True:
        try:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            break
        except InterruptedError:
            continue
    t1 = time.time()
    wchar, wbytes = proc_io(p.pid)
    while True:
        try:
            _pid, status, ru = os.wait4(p.pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
    else:
        code = 128 + os.WTERMSIG(status)
    r = {"start_ts": t0, "end_ts": t1, "wall_s": round(t1 - t0, 4),
         "user_s": round(ru.ru_utime, 3), "sys_s": round(ru.ru_stime, 3),
         "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "max_rss_kb": ru.ru_maxrss,
         "minor_faults": ru.ru_minflt,
         "fs_output_bytes": ru.ru_oublock * 512, "write_call_bytes": wchar,
         "storage_write_bytes": wbytes, "exit_status": code}
    with open(out, "w") as f:
        json.dump(r, f)
    p.returncode = code  # so that Popen's destructor does not wait again
    sys.exit(code)


LOG_RE = re.compile(r'^ts=(\S+) level=(\S+) msg="([^"]*)"\s?(.*)$')
# logfmt: a quoted value escapes its own quotes and backslashes (\" and \\).
KV_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def kv_value(v):
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return re.sub(r'\\(.)', r'\1', v[1:-1])
    return v


def read_daemon_log(path):
    lines = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LOG_RE.match(line.rstrip("\n"))
            if not m:
                continue
            kv = {k: kv_value(v) for k, v in KV_RE.findall(m.group(4))}
            lines.append((parse_log_ts(m.group(1)), m.group(2), m.group(3), kv))
    return lines


def daemonlog(path):
    lines = read_daemon_log(path)
    r = {"first_ts": lines[0][0] if lines else None, "last_ts": lines[-1][0] if lines else None,
         "progress": [], "warnings": []}
    for ts, level, msg, kv in lines:
        if msg.startswith("reached the end offsets"):
            r["end_reached_ts"] = ts
            r["end_messages"] = int(kv.get("messages", "0"))
        elif msg == "stopped" and "loop_cpu_s" in kv:
            r["loop_cpu_s"] = float(kv["loop_cpu_s"])
            if float(kv.get("loop_runqueue_wait_s", "-1")) >= 0:
                r["loop_wait_s"] = float(kv["loop_runqueue_wait_s"])
            for k in ("loop_idle_s", "commit_s", "input_wait_kafka_s", "input_wait_validation_s"):
                if k in kv:
                    r[k] = float(kv[k])
        elif msg == "heap":
            # What --heap-huge-pages took (auto measures the host's page faults).
            r["huge_pages"] = kv.get("huge_pages")
        elif msg == "progress":
            r["progress"].append({"ts": ts, "messages": int(kv.get("messages", 0)),
                                  "rate": float(kv.get("rate", "0").rstrip("/s")),
                                  "lag": int(kv.get("lag", 0)),
                                  "pending_rows": int(kv.get("pending_rows", 0))})
        if level in ("warn", "error"):
            r["warnings"].append("%s %s %s" % (level, msg, " ".join("%s=%s" % x for x in kv.items())))
    r["warnings"] = r["warnings"][:20]
    print(json.dumps(r))


def steps(path):
    """psql output of batch.sql (\\timing on, '@step NAME' echoed before each mart
    statement) -> {NAME: ms}; the statements before the first step go to 'setup'."""
    r = {}
    cur = "setup"
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("@step "):
                cur = line[6:].strip()
            else:
                m = re.match(r"^Time: ([0-9.]+) ms", line)
                if m:
                    r[cur] = round(r.get(cur, 0.0) + float(m.group(1)), 1)
    print(json.dumps(r))


# --------------------------------------------------------------------------- samplers


class Psql:
    """One long-lived psql process: a query costs a round trip, not a fork."""

    def __init__(self, conninfo):
        self.p = subprocess.Popen(["psql", "-X", "-A", "-t", "-q", "-d", conninfo],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def query(self, sql):
        self.p.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo __END__\n")
        self.p.stdin.flush()
        rows = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("psql exited")
            line = line.rstrip("\n")
            if line == "__END__":
                return rows
            if line:
                rows.append(line.split("|"))

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(5)
        except Exception:
            self.p.kill()


def proc_sample(pid):
    """CPU seconds (user+sys) and VmRSS/VmHWM (kB) of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        tck = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / tck
        rss = hwm = anon = None
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
        return cpu, rss, hwm, anon
    except (OSError, ValueError, IndexError):
        return None


def proc_io(pid):
    """(wchar, write_bytes) of /proc/PID/io: bytes passed to write()/pwrite() so far, and
    bytes sent to the storage layer (what rusage's oublock counts), or (None, None)."""
    w = b = None
    try:
        with open("/proc/%d/io" % pid) as f:
            for line in f:
                if line.startswith("wchar:"):
                    w = int(line.split()[1])
                elif line.startswith("write_bytes:"):
                    b = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return w, b


def thread_sample(pid):
    """(CPU seconds, seconds waited on a run queue) of a process's main thread (for
    clickmartd: the loop thread), from /proc/PID/task/PID/{stat,schedstat}, or (None, None)."""
    try:
        with open("/proc/%d/task/%d/stat" % (pid, pid)) as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open("/proc/%d/task/%d/schedstat" % (pid, pid)) as f:
            wait = int(f.read().split()[1]) / 1e9
        return cpu, wait
    except (OSError, ValueError, IndexError):
        return None, None


def dir_size(path):
    """Apparent bytes (du -sb) and allocated bytes (du -sB1) of a directory tree."""
    app = alloc = 0
    for root, _dirs, files in os.walk(path):
        for fn in files:
            try:
                st = os.lstat(os.path.join(root, fn))
            except OSError:
                continue
            app += st.st_size
            alloc += st.st_blocks * 512
    return app, alloc


class Stopper:
    def __init__(self, stop_file):
        self.stop_file = stop_file
        self.stop = False
        signal.signal(signal.SIGTERM, self._sig)
        signal.signal(signal.SIGINT, self._sig)

    def _sig(self, *_):
        self.stop = True

    def done(self):
        return self.stop or (self.stop_file and os.path.exists(self.stop_file))


def poll_pg(args):
    """Steady mode: every INTERVAL s, the flushed next_offset of every partition (one
    line of JSON per sample: t, {partition: next_offset}), and the daemon's CPU/RSS."""
    conninfo, schema, topic, out_path, interval, pid, stop_file = args
    interval = float(interval)
    pid = int(pid)
    stopper = Stopper(stop_file)
    pg = Psql(conninfo)
    q = ("SELECT partition, next_offset FROM %s.partitions WHERE topic = '%s'"
         % (schema, topic.replace("'", "''")))
    have_table = False
    with open(out_path, "w") as out:
        nxt = time.time()
        while not stopper.done():
            t0 = time.time()
            rows = None
            if not have_table:
                r = pg.query("SELECT to_regclass('%s.partitions') IS NOT NULL" % schema)
                have_table = bool(r) and r[0][0] == "t"
            if have_table:
                try:
                    rows = pg.query(q)
                except RuntimeError:
                    break
            t1 = time.time()
            rec = {"t": (t0 + t1) / 2, "q_ms": round((t1 - t0) * 1000, 2)}
            if rows is not None:
                rec["next"] = {r[0]: int(r[1]) for r in rows}
            ps = proc_sample(pid)
            if ps:
                rec["cpu"], rec["rss_kb"], rec["hwm_kb"], rec["anon_kb"] = ps
            out.write(json.dumps(rec) + "\n")
            out.flush()
            nxt += interval
            delay = nxt - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.time()
    pg.close()


def http_get_unix(path, url="/status", timeout=2.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % url).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return json.loads(body.decode("utf-8", "replace"))


def status_messages(st):
    """Messages the daemon has seen, from its /status: accepted + duplicates + rejected."""
    return int(st.get("accepted") or 0) + int(st.get("duplicates") or 0) + int(st.get("rejected") or 0)


def read_lines(path):
    """The non-blank lines of a file, right-stripped; None when it cannot be read."""
    try:
        with open(path) as f:
            return [l.rstrip() for l in f if l.strip()]
    except OSError:
        return None


def perf_windows(args):
    """Scale mode with --perf: records the daemon with perf over the first and the last
    window of messages (from its /status), to OUTDIR/perf.first.data and perf.last.data,
    so that where the cost per event grows can be read off the two profiles."""
    sock, pid, window, events, out_dir, stop_file = args
    window, events = int(window), int(events)
    stopper = Stopper(stop_file)
    plan = [("first", 0, min(window, events)), ("last", max(events - window, 0), events)]
    if plan[1][1] < plan[0][2]:
        plan = plan[:1]  # the windows overlap: one profile covers the run
    rec = None
    done = 0
    while not stopper.done() and done < len(plan):
        name, start, end = plan[done]
        try:
            st = http_get_unix(sock)
            got = status_messages(st)
        except (OSError, ValueError):
            got = None
        if got is not None and rec is None and start <= got < end:
            rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-p", str(pid), "-o",
                                    os.path.join(out_dir, "perf.%s.data" % name)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print("perf: recording the %s window from message %d" % (name, got), file=sys.stderr)
        elif got is not None and got >= end:
            if rec is not None:
                rec.send_signal(signal.SIGINT)
                rec.wait()
                rec = None
                print("perf: %s window recorded up to message %d" % (name, got), file=sys.stderr)
            done += 1
            continue
        time.sleep(0.25)
    if rec is not None:
        rec.send_signal(signal.SIGINT)
        rec.wait()


# The loop thread's breakdown in /status (docs/status.md), sampled in scale mode.
LOOP_KEYS = ("idle_s", "commit_s", "input_wait_kafka_s", "input_wait_validation_s")


def poll_status(args):
    """Scale mode: every INTERVAL s, the daemon's /status totals, its CPU and RSS, and
    (every DU_EVERY samples) the state dir size.  One JSON line per sample."""
    sock, pid, state_dir, out_path, interval, du_every, stop_file = args
    interval = float(interval)
    pid = int(pid)
    du_every = int(du_every)
    stopper = Stopper(stop_file)
    i = 0
    with open(out_path, "w") as out:
        nxt = time.time()
        while not stopper.done():
            rec = {"t": time.time()}
            try:
                st = http_get_unix(sock)
                rec["messages"] = status_messages(st)
                rec["accepted"] = int(st.get("accepted") or 0)
                parts = st.get("partitions") or []
                rec["next_sum"] = sum(int(p.get("next_offset") or 0) for p in parts)
                rec["end_sum"] = sum(int(p.get("end_offset") or 0) for p in parts)
                rec["lag"] = sum(int(p.get("lag") or 0) for p in parts)
                state = st.get("state") or {}
                rec["state_bytes_used"] = state.get("bytes")
                rec["dirty_rows"] = state.get("dirty_rows")
                fl = st.get("flush") or {}
                rec["flush_ms"] = fl.get("last_duration_ms")
                rec["flush_rows"] = fl.get("last_rows")
                lp = st.get("loop") or {}
                for k in LOOP_KEYS:
                    if lp.get(k) is not None:
                        rec["loop_" + k] = float(lp[k])
            except (OSError, ValueError):
                pass
            ps = proc_sample(pid)
            if ps:
                rec["cpu"], rec["rss_kb"], rec["hwm_kb"], rec["anon_kb"] = ps
                rec["wchar"], rec["wbytes"] = proc_io(pid)
                rec["loop_cpu_s"], rec["loop_runq_s"] = thread_sample(pid)
            if du_every > 0 and i % du_every == 0:
                rec["state_app"], rec["state_alloc"] = dir_size(state_dir)
            i += 1
            out.write(json.dumps(rec) + "\n")
            out.flush()
            nxt += interval
            delay = nxt - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.time()


def memsum(path):
    """Peaks of a poll-status sample file (throughput mode)."""
    ss = read_jsonl(path) if os.path.exists(path) else []
    r = {"samples": len(ss)}
    for key, out in (("rss_kb", "rss_peak_mb"), ("anon_kb", "anon_peak_mb"), ("hwm_kb", "hwm_mb")):
        v = [s[key] for s in ss if s.get(key) is not None]
        if v:
            r[out] = round(max(v) / 1024.0, 1)
    v = [s["state_app"] for s in ss if s.get("state_app") is not None]
    if v:
        r["state_peak_mb"] = round(max(v) / 1048576.0, 1)
    v = [s["state_bytes_used"] for s in ss if s.get("state_bytes_used") is not None]
    if v:
        r["state_used_peak_mb"] = round(max(v) / 1048576.0, 1)
    print(json.dumps(r))


def read_jsonl(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


# --------------------------------------------------------------------------- steady analysis


def linreg(xs, ys):
    n = len(xs)
    if n < 2:
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def freshness(args):
    """For every produced message (partition, offset, producer timestamp in ms, from kcat
    '%p %o %T'), the first sample at which Postgres' partitions.next_offset had passed
    its offset: freshness = that time - the producer timestamp (an upper bound, within one
    sampling interval)."""
    samples_path, offsets_path, rate, duration, flush_ms, interval = args
    rate = float(rate)
    duration = float(duration)
    flush_s = float(flush_ms) / 1000.0
    interval = float(interval)
    samples = [s for s in read_jsonl(samples_path) if "next" in s]
    per_part_t = {}
    per_part_n = {}
    for s in samples:
        for p, n in s["next"].items():
            per_part_t.setdefault(p, []).append(s["t"])
            per_part_n.setdefault(p, []).append(n)
    msgs = []  # (produce_s, fresh_s or None)
    newest = {}  # sample time at which messages became visible -> the least freshness then
    oldest = {}  # ... and the greatest
    n_total = 0
    with open(offsets_path, "rb") as f:
        for line in f:
            fs = line.split()
            if len(fs) != 3:
                continue
            p, o, ts = fs[0].decode(), int(fs[1]), int(fs[2])
            n_total += 1
            tl = per_part_t.get(p)
            vis = None
            if tl:
                # next_offset is non-decreasing: the first sample with next > o
                k = bisect.bisect_right(per_part_n[p], o)
                if k < len(tl):
                    vis = tl[k]
            f = None if vis is None else vis - ts / 1000.0
            msgs.append((ts / 1000.0, f))
            if f is not None:
                newest[vis] = min(newest.get(vis, f), f)
                oldest[vis] = max(oldest.get(vis, f), f)
    msgs.sort()
    r = {"messages": n_total, "sample_interval_s": interval, "samples": len(samples)}
    if not msgs:
        print(json.dumps(r))
        return
    t_first, t_last = msgs[0][0], msgs[-1][0]
    span = max(t_last - t_first, 1e-9)
    r["produce_span_s"] = round(span, 3)
    r["produced_rate"] = round(n_total / span, 1)
    r["target_rate"] = rate
    unseen = sum(1 for _, f in msgs if f is None)
    r["never_visible"] = unseen
    fr = sorted(f for _, f in msgs if f is not None)
    if fr:
        r["p50_s"] = round(percentile(fr, 50), 3)
        r["p90_s"] = round(percentile(fr, 90), 3)
        r["p99_s"] = round(percentile(fr, 99), 3)
        r["max_s"] = round(fr[-1], 3)
        r["mean_s"] = round(sum(fr) / len(fr), 3)
    # A flush commits all its partitions at once, so the messages that became visible at
    # one sample came with one flush (or a few, when they follow closely). The newest of
    # them waited for no flush to start: its freshness is the pipeline alone (intake,
    # the batch's commit, the flush's own run, the sampling). What the median message
    # has beyond that is the wait for the next flush to start.
    nv = sorted(newest.values())
    if nv:
        r["visible_steps"] = len(nv)
        r["step_newest_p50_s"] = round(percentile(nv, 50), 3)
        r["step_newest_max_s"] = round(nv[-1], 3)
        # The oldest message of a flush waited for the span between the previous flush's
        # cut-off and this one's on top of what the newest waited: oldest - newest is
        # that span (about the flush interval; longer when a flush started late, e.g.
        # after a part written ahead, and the next one's shorter). The p99 of freshness
        # is about the largest spans plus the largest newest waits.
        spans = sorted(oldest[v] - newest[v] for v in newest)
        r["step_oldest_max_s"] = round(max(oldest.values()), 3)
        r["step_span_p50_s"] = round(percentile(spans, 50), 3)
        r["step_span_max_s"] = round(spans[-1], 3)
    # Freshness over time: buckets of 1/20 of the run, at least two flush intervals (so
    # that the saw-tooth of the flushes does not alias into the trend).
    bucket = max(1.0, 2.0 * flush_s, span / 20.0)
    buckets = {}
    for t, f in msgs:
        b = int((t - t_first) / bucket)
        buckets.setdefault(b, []).append(f if f is not None else float("inf"))
    prof = []
    for b in sorted(buckets):
        v = sorted(buckets[b])
        prof.append({"t_s": round(b * bucket, 1), "messages": len(v),
                     "p50_s": round(percentile(v, 50), 3) if math.isfinite(percentile(v, 50)) else None,
                     "p99_s": round(percentile(v, 99), 3) if math.isfinite(percentile(v, 99)) else None})
    r["profile"] = prof
    # Lag trend: slope of the per-bucket median freshness after the first 20 % of the run.
    xs = [p["t_s"] for p in prof if p["t_s"] >= 0.2 * span and p["p50_s"] is not None]
    ys = [p["p50_s"] for p in prof if p["t_s"] >= 0.2 * span and p["p50_s"] is not None]
    slope = linreg(xs, ys)
    r["freshness_slope_s_per_s"] = round(slope, 4)
    rise = slope * (span * 0.8)
    r["freshness_rise_s"] = round(rise, 3)
    growing = unseen > 0 or (slope > 0.02 and rise > 0.5)
    r["lag_trend"] = "growing" if growing else "flat"
    r["rate_reached"] = r["produced_rate"] >= 0.95 * rate
    r["held"] = (not growing) and r["rate_reached"]
    # Drain: time from the last produced message until all of it was visible.
    last_vis = max((t + f) for t, f in msgs if f is not None) if fr else None
    if last_vis is not None:
        r["drain_after_last_produce_s"] = round(last_vis - t_last, 3)
    r["target_p99_s"] = flush_s + 1.0
    cpu = [s for s in read_jsonl(samples_path) if "cpu" in s]
    if len(cpu) >= 2:
        # CPU of the daemon while the producer ran
        inwin = [s for s in cpu if t_first <= s["t"] <= t_last]
        if len(inwin) >= 2:
            r["daemon_cpu_cores"] = round((inwin[-1]["cpu"] - inwin[0]["cpu"]) /
                                          max(inwin[-1]["t"] - inwin[0]["t"], 1e-9), 3)
        r["daemon_peak_rss_mb"] = round(max(s.get("hwm_kb") or 0 for s in cpu) / 1024.0, 1)
    print(json.dumps(r))


# --------------------------------------------------------------------------- scale analysis


def interp_time(samples, key, target):
    """Time at which samples[key] (non-decreasing) reached target, linearly interpolated."""
    prev = None
    for s in samples:
        v = s.get(key)
        if v is None:
            continue
        if v >= target:
            if prev is None or v == prev[1]:
                return s["t"]
            t0, v0 = prev
            return t0 + (s["t"] - t0) * (target - v0) / (v - v0)
        prev = (s["t"], v)
    return None


def interp_val(samples, key, t):
    prev = None
    for s in samples:
        v = s.get(key)
        if v is None:
            continue
        if s["t"] >= t:
            if prev is None:
                return v
            t0, v0 = prev
            if s["t"] == t0:
                return v
            return v0 + (v - v0) * (t - t0) / (s["t"] - t0)
        prev = (s["t"], v)
    return prev[1] if prev else None


def scale(args):
    samples_path, events, window, gen_end_ts = args
    events = int(events)
    window = int(window)
    gen_end_ts = float(gen_end_ts) if gen_end_ts not in ("", "0") else None
    ss = [s for s in read_jsonl(samples_path) if "messages" in s]
    allss = read_jsonl(samples_path)
    r = {"events": events, "window_events": window, "windows": []}
    if not ss:
        print(json.dumps(r))
        return
    # The sampler may start after the daemon (with --preload it consumes at once):
    # the windows and the overall rate start at the first sampled count, so that
    # the messages before it are not charged to a shorter time and less CPU.
    m0 = min(int(ss[0].get("messages") or 0), events)
    t_start = interp_time(ss, "messages", max(m0, 1))
    r["first_sampled_messages"] = m0
    k = 0
    bounds = list(range(0, events + 1, window))
    if bounds[-1] != events:
        bounds.append(events)
    cpu_ss = [s for s in allss if "cpu" in s]
    for a, b in zip(bounds, bounds[1:]):
        a = max(a, m0)
        if b <= a:
            continue
        ta = interp_time(ss, "messages", max(a, 1))
        tb = interp_time(ss, "messages", b)
        if ta is None or tb is None or tb <= ta:
            continue
        w = {"from": a, "to": b, "seconds": round(tb - ta, 3),
             "events_per_s": round((b - a) / (tb - ta), 1)}
        ca = interp_val(cpu_ss, "cpu", ta)
        cb = interp_val(cpu_ss, "cpu", tb)
        if ca is not None and cb is not None:
            w["cpu_s"] = round(cb - ca, 3)
            w["cpu_us_per_event"] = round((cb - ca) / (b - a) * 1e6, 3)
        for key, out in (("wchar", "write_calls_kb_per_event"), ("wbytes", "written_kb_per_event")):
            wss = [s for s in cpu_ss if s.get(key) is not None]
            wa = interp_val(wss, key, ta)
            wb = interp_val(wss, key, tb)
            if wa is not None and wb is not None:
                w[out] = round((wb - wa) / 1e3 / (b - a), 2)
        # Where the loop thread's wall time went in the window, in s per second.
        for key in ("loop_cpu_s", "loop_runq_s") + tuple("loop_" + k for k in LOOP_KEYS):
            lss = [s for s in allss if s.get(key) is not None]
            la = interp_val(lss, key, ta)
            lb = interp_val(lss, key, tb)
            if la is not None and lb is not None:
                w[key[:-2] + "_share"] = round((lb - la) / (tb - ta), 3)
        lag = [s.get("lag") for s in ss if ta <= s["t"] <= tb and s.get("lag") is not None]
        w["lag_min"] = min(lag) if lag else None
        w["lag_max"] = max(lag) if lag else None
        rs = [s for s in cpu_ss if s["t"] <= tb]
        if rs:
            w["rss_mb"] = round(rs[-1]["rss_kb"] / 1024.0, 1)
            w["hwm_mb"] = round(rs[-1]["hwm_kb"] / 1024.0, 1)
            if rs[-1].get("anon_kb") is not None:
                w["anon_peak_mb"] = round(max(x.get("anon_kb") or 0 for x in rs) / 1024.0, 1)
        du = [s for s in allss if "state_app" in s and s["t"] <= tb]
        if du:
            w["state_mb"] = round(du[-1]["state_app"] / 1048576.0, 1)
            w["state_alloc_mb"] = round(du[-1]["state_alloc"] / 1048576.0, 1)
        used = [s for s in ss if s["t"] <= tb and s.get("state_bytes_used") is not None]
        if used:
            w["state_used_mb"] = round(used[-1]["state_bytes_used"] / 1048576.0, 1)
        w["producer_running"] = gen_end_ts is None or ta < gen_end_ts
        r["windows"].append(w)
        k += 1
    t_end = interp_time(ss, "messages", events)
    if t_start is not None and t_end is not None and t_end > t_start:
        r["consume_seconds"] = round(t_end - t_start, 3)
        r["events_per_s"] = round((events - m0) / (t_end - t_start), 1)
    ws = r["windows"]
    if len(ws) >= 2:
        first, last = ws[0], ws[-1]
        r["first_window"] = first
        r["last_window"] = last
        r["rate_last_vs_first"] = round(last["events_per_s"] / first["events_per_s"], 3)
        if first.get("cpu_us_per_event") and last.get("cpu_us_per_event"):
            r["cpu_per_event_last_vs_first"] = round(last["cpu_us_per_event"] / first["cpu_us_per_event"], 3)
    print(json.dumps(r))


# --------------------------------------------------------------------------- report


def load_kv(path):
    kv = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                kv[k] = v
    return kv


def jload(kv, key):
    """The JSON file whose path kv[key] holds, or {} (no such key, unreadable file)."""
    v = kv.get(key)
    r = jload_file(v) if v else None
    return {} if r is None else r


def jload_file(path):
    """The JSON in the file at path, or None when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stat_busy_ticks(before, after):
    """Clock ticks the machine was busy between two /proc/stat cpu lines (lists of their
    counters): everything but idle and iowait, less the time the host stole."""
    busy = (sum(after[:8]) - after[3] - after[4]) - (sum(before[:8]) - before[3] - before[4])
    steal = (after[7] - before[7]) if len(after) > 7 else 0
    return busy - steal


def fnum(kv, key, default=None):
    try:
        return float(kv[key])
    except (KeyError, ValueError):
        return default


def yn(b):
    if b is None:
        return None
    return "yes" if b else "no"


def rnd(x, d=1):
    return None if x is None else round(x, d)


def pg_locale_line(kv):
    """A line naming the throwaway Postgres' default collation when it is not C."""
    loc = kv.get("p_pg_locale", "C")
    return [] if loc == "C" else ["Postgres' default collation: %s (--pg-locale)" % loc]


def fmt(x, unit="", d=0):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if d == 0:
        return "{:,.0f}{}".format(x, unit)
    return "{:,.{d}f}{}".format(x, unit, d=d)


def machine_info():
    info = {"cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 1048576.0, 1)
        with open("/proc/loadavg") as f:
            info["loadavg_at_end"] = f.read().split()[:3]
    except OSError:
        pass
    info["host"] = socket.gethostname()
    return info


def report(args):
    mode, kv_path, out_path = args[:3]
    baseline_path = args[3] if len(args) > 3 else ""
    kv = load_kv(kv_path)
    res = {"tool": "clickmart tools/bench", "mode": mode,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine_info(), "git": kv.get("git", ""), "bin": kv.get("bin", ""),
           "bin_mtime": kv.get("bin_mtime", ""),
           "params": {k[2:]: v for k, v in kv.items() if k.startswith("p_")}}
    lines = []
    if mode == "throughput":
        report_throughput(kv, res, lines)
    elif mode == "steady":
        report_steady(kv, res, lines)
    elif mode == "scale":
        report_scale(kv, res, lines, baseline_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2, sort_keys=False)
        f.write("\n")
    print("\n".join(lines))
    print("\nJSON: %s" % out_path)


def report_throughput(kv, res, lines):
    n = int(kv["events"])
    gen = jload(kv, "gen_json")
    kc = jload(kv, "kcat_json")
    dm = jload(kv, "daemon_time_json")
    dl = jload(kv, "daemon_log_json")
    dump = jload(kv, "dump_json")
    t_launch = fnum(kv, "daemon_launch_ts")
    t_exit = fnum(kv, "daemon_exit_ts")
    e2e_s = (t_exit - t_launch) if (t_launch and t_exit) else dm.get("wall_s")
    consume_s = (dl["end_reached_ts"] - t_launch) if ("end_reached_ts" in dl and t_launch) else None
    kcat_s = fnum(kv, "kcat_s")
    batch_copy_s = fnum(kv, "batch_copy_s")
    batch_sql_s = fnum(kv, "batch_sql_s")
    batch_s = (batch_copy_s + batch_sql_s) if (batch_copy_s is not None and batch_sql_s is not None) else None
    msgs_daemon = int(kv.get("daemon_messages", "0") or 0)
    users = int(kv.get("users", "0") or 0)
    sessions = int(kv.get("sessions", "0") or 0)
    rss_mb = dm.get("max_rss_kb", 0) / 1024.0 if dm.get("max_rss_kb") else None
    state_mb = fnum(kv, "state_bytes", 0) / 1048576.0 if kv.get("state_bytes") else None
    state_alloc_mb = fnum(kv, "state_alloc_bytes", 0) / 1048576.0 if kv.get("state_alloc_bytes") else None
    state_used_mb = fnum(kv, "state_used_bytes", 0) / 1048576.0 if kv.get("state_used_bytes") else None

    def eps(s):
        return n / s if s else None

    kcat_eps, cons_eps, e2e_eps, batch_eps = eps(kcat_s), eps(consume_s), eps(e2e_s), eps(batch_s)
    r_dk = e2e_eps / kcat_eps if (e2e_eps and kcat_eps) else None
    r_dk_c = cons_eps / kcat_eps if (cons_eps and kcat_eps) else None
    r_bd = batch_s / e2e_s if (batch_s and e2e_s) else None
    per_m = n / 1e6
    # Contention: CPU time the rest of the machine used while the daemon ran.
    other_cores = None
    try:
        b = [int(x) for x in kv["cpustat_before"].split()[1:]]
        a = [int(x) for x in kv["cpustat_after"].split()[1:]]
        tck = os.sysconf("SC_CLK_TCK")
        if e2e_s and dm.get("cpu_s") is not None:
            other_cores = max(0.0, stat_busy_ticks(b, a) / tck - dm["cpu_s"]) / e2e_s
    except (KeyError, ValueError, IndexError):
        pass
    # The same, split by who: the dev broker and Postgres (all its processes).
    def cores_of(name):
        try:
            d = int(kv[name + "_cpu_after"]) - int(kv[name + "_cpu_before"])
        except (KeyError, ValueError):
            return None
        return d / os.sysconf("SC_CLK_TCK") / e2e_s if e2e_s else None
    broker_cores, pg_cores = cores_of("broker"), cores_of("pg")
    res["events"] = n
    res["messages_seen"] = {"daemon": msgs_daemon, "dump": dump.get("messages")}
    res["complete"] = msgs_daemon == n and (not dump or dump.get("messages") == n)
    res["generator"] = {"seconds": rnd(fnum(kv, "gen_s"), 3),
                        "events_per_s": rnd(eps(fnum(kv, "gen_s")), 0),
                        "end_ms": int(kv.get("p_end_ms", "0") or 0)}
    res["kcat"] = {"seconds": rnd(kcat_s, 3), "events_per_s": rnd(kcat_eps, 0),
                   "runs_s": [float(x) for x in kv.get("kcat_runs", "").split() if x],
                   "cpu_s": rnd(kc.get("cpu_s"), 2), "peak_rss_mb": rnd((kc.get("max_rss_kb") or 0) / 1024.0, 1)}
    res["daemon"] = {
        "consume_seconds": rnd(consume_s, 3), "consume_events_per_s": rnd(cons_eps, 0),
        "end_to_end_seconds": rnd(e2e_s, 3), "end_to_end_events_per_s": rnd(e2e_eps, 0),
        "final_flush_and_exit_seconds": rnd((e2e_s - consume_s) if (e2e_s and consume_s) else None, 3),
        "cpu_s": rnd(dm.get("cpu_s"), 2), "user_s": dm.get("user_s"), "sys_s": dm.get("sys_s"),
        "cpu_us_per_event": rnd(dm["cpu_s"] / n * 1e6, 2) if dm.get("cpu_s") else None,
        # Minor page faults: fresh memory the kernel had to back (and zero), a cost
        # that varies with the host's memory more than with the code.
        "minor_faults": dm.get("minor_faults"),
        "minor_faults_per_event": rnd(dm["minor_faults"] / n, 3) if dm.get("minor_faults") else None,
        "huge_pages": dl.get("huge_pages"),
        "loop_thread_cpu_s": rnd(dl.get("loop_cpu_s"), 2),
        "loop_thread_cpu_us_per_event": rnd(dl["loop_cpu_s"] / n * 1e6, 2) if dl.get("loop_cpu_s") else None,
        "loop_thread_runqueue_wait_s": rnd(dl.get("loop_wait_s"), 2),
        "loop_thread_idle_s": rnd(dl.get("loop_idle_s"), 2),
        "loop_thread_commit_s": rnd(dl.get("commit_s"), 2),
        "loop_thread_input_wait_kafka_s": rnd(dl.get("input_wait_kafka_s"), 2),
        "loop_thread_input_wait_validation_s": rnd(dl.get("input_wait_validation_s"), 2),
        "cpu_cores_used": rnd(dm["cpu_s"] / e2e_s, 2) if (dm.get("cpu_s") and e2e_s) else None,
        "events_per_cpu_s": rnd(n / dm["cpu_s"], 0) if dm.get("cpu_s") else None,
        "other_processes_cores_busy": rnd(other_cores, 2),
        "broker_cores_busy": rnd(broker_cores, 2),
        "postgres_cores_busy": rnd(pg_cores, 2),
        # The CPU the whole machine spent on (b): clickmartd's and everything else's (Postgres
        # applying the flushes, the broker, the kernel's writeback). n events per that many
        # CPU seconds, times the cores, is the most (b) could reach on this machine with the
        # same work per event: the ceiling of the end-to-end target.
        "machine_cpu_s": rnd(dm["cpu_s"] + other_cores * e2e_s, 2)
        if (dm.get("cpu_s") and other_cores is not None and e2e_s) else None,
        "machine_busy_share": rnd((dm["cpu_s"] + other_cores * e2e_s) / (os.cpu_count() * e2e_s), 2)
        if (dm.get("cpu_s") and other_cores is not None and e2e_s) else None,
        "ceiling_events_per_s": rnd(n * os.cpu_count() / (dm["cpu_s"] + other_cores * e2e_s), 0)
        if (dm.get("cpu_s") and other_cores is not None and e2e_s) else None,
        "loadavg_before": kv.get("loadavg_before"),
        # The guest's free page reporting (page_reporting_order; None: not reported here).
        "page_reporting_order": int(kv["page_reporting_order"]) if kv.get("page_reporting_order") else None,
        "write_calls_gb": rnd(dm["write_call_bytes"] / 1e9, 2) if dm.get("write_call_bytes") else None,
        "write_calls_kb_per_event": rnd(dm["write_call_bytes"] / 1e3 / n, 1) if dm.get("write_call_bytes") else None,
        "written_gb": rnd(dm["fs_output_bytes"] / 1e9, 2) if dm.get("fs_output_bytes") else None,
        "written_kb_per_event": rnd(dm["fs_output_bytes"] / 1e3 / n, 1) if dm.get("fs_output_bytes") else None,
        "lmdb_write_txns": int(kv["state_txns"]) if kv.get("state_txns") else None,
        "peak_rss_mb": rnd(rss_mb, 1),
        "peak_anon_rss_mb": jload(kv, "mem_json").get("anon_peak_mb"),
        "state_mb": rnd(state_mb, 1), "state_alloc_mb": rnd(state_alloc_mb, 1),
        "state_lmdb_used_mb": rnd(state_used_mb, 1),
        "accepted": int(kv.get("accepted", "0") or 0), "duplicates": int(kv.get("duplicates", "0") or 0),
        "rejected": int(kv.get("rejected", "0") or 0),
        "users": users, "sessions": sessions,
        "peak_rss_mb_per_million_events": rnd(rss_mb / per_m, 1) if rss_mb else None,
        "peak_rss_mb_per_100k_users": rnd(rss_mb / (users / 1e5), 1) if (rss_mb and users) else None,
        "state_mb_per_million_events": rnd(state_mb / per_m, 1) if state_mb else None,
        "state_mb_per_100k_users": rnd(state_mb / (users / 1e5), 1) if (state_mb and users) else None,
        "exit_status": dm.get("exit_status"), "log_warnings": dl.get("warnings", []),
        "progress": [{"t_s": round(p["ts"] - t_launch, 2), "messages": p["messages"], "rate": p["rate"]}
                     for p in dl.get("progress", [])] if t_launch else [],
        "flush_interval_ms": int(kv.get("p_flush_interval_ms", "2000")),
    }
    if kv.get("perf_top"):
        top = read_lines(kv["perf_top"])
        if top is not None:
            res["daemon"]["perf_top"] = top
    res["batch"] = None
    if batch_s is not None:
        res["batch"] = {
            "copy_seconds": rnd(batch_copy_s, 3), "rebuild_seconds": rnd(batch_sql_s, 3),
            "seconds": rnd(batch_s, 3), "events_per_s": rnd(batch_eps, 0),
            "dump_seconds_not_counted": rnd(fnum(kv, "dump_s"), 3),
            "rows_copied": dump.get("copied"), "dropped_invalid_utf8": dump.get("dropped_invalid_utf8"),
            "dropped_nul": dump.get("dropped_nul"),
            "steps_ms": jload(kv, "batch_steps_json") or None,
            "agreement_with_daemon": jload(kv, "batch_cmp_json") or None,
            "note": "cost baseline: jsonb parse, approximate §1.1 validation, watermark, dedup, "
                    "sessionization and the users, sessions and funnel_daily marts in SQL; "
                    "not an exact reproduction of every contract rule",
        }
    res["ratios"] = {"daemon_over_kcat": rnd(r_dk, 3), "daemon_consume_over_kcat": rnd(r_dk_c, 3),
                     "batch_over_daemon": rnd(r_bd, 2)}
    one_m = n == 1000000
    res["targets"] = {
        "end_to_end_events_per_s_ge_250k": {"target": 250000, "measured": rnd(e2e_eps, 0),
                                            "met": yn(e2e_eps >= 250000 if e2e_eps else None),
                                            "applies": one_m},
        "daemon_over_kcat_ge_0.25": {"target": 0.25, "measured": rnd(r_dk, 3),
                                     "met": yn(r_dk >= 0.25 if r_dk else None)},
        "batch_over_daemon_ge_10": {"target": 10, "measured": rnd(r_bd, 2),
                                    "met": yn(r_bd >= 10 if r_bd else None)},
    }
    # ---- table
    L = lines.append
    L("")
    L("clickmart bench: throughput, %s events (%d partitions, seed %s), %s" % (
        fmt(n), int(kv.get("p_partitions", "0")), kv.get("p_seed", "?"), res["date"]))
    lines.extend(pg_locale_line(kv))
    if not res["complete"]:
        L("WARNING: not every message was seen (daemon %s, dump %s of %d): the mock's retention "
          "may have dropped some; use more --partitions" % (msgs_daemon, dump.get("messages"), n))
    L("")
    L("%-44s %12s %12s %10s" % ("", "seconds", "events/s", "CPU s"))
    L("%-44s %12s %12s %10s" % ("clickmart-gen (produce, for reference)", fmt(fnum(kv, "gen_s"), d=2),
                                fmt(eps(fnum(kv, "gen_s"))), ""))
    L("%-44s %12s %12s %10s" % ("(a) kcat raw consume (median of %d)" % len(res["kcat"]["runs_s"]),
                                fmt(kcat_s, d=2), fmt(kcat_eps), fmt(kc.get("cpu_s"), d=2)))
    L("%-44s %12s %12s %10s" % ("(b) clickmartd consume (to end offsets)", fmt(consume_s, d=2),
                                fmt(cons_eps), ""))
    L("%-44s %12s %12s %10s" % ("(b) clickmartd end to end (incl. final flush)", fmt(e2e_s, d=2),
                                fmt(e2e_eps), fmt(dm.get("cpu_s"), d=2)))
    if batch_s is not None:
        L("%-44s %12s %12s %10s" % ("(c) batch: COPY", fmt(batch_copy_s, d=2), "", ""))
        L("%-44s %12s %12s %10s" % ("(c) batch: SQL rebuild of 3 marts", fmt(batch_sql_s, d=2), "", ""))
        L("%-44s %12s %12s %10s" % ("(c) batch: COPY + rebuild", fmt(batch_s, d=2), fmt(batch_eps), ""))
    L("")
    d = res["daemon"]
    L("daemon: peak RSS %s MB (anonymous %s MB, the rest is LMDB's file-backed map), state %s MB "
      "on disk (du -sb; %s MB allocated, %s MB used by LMDB), %s users, %s sessions" % (
          fmt(d["peak_rss_mb"], d=1), fmt(d["peak_anon_rss_mb"], d=1), fmt(d["state_mb"], d=1),
                                 fmt(d["state_alloc_mb"], d=1), fmt(d["state_lmdb_used_mb"], d=1),
                                 fmt(users), fmt(sessions)))
    L("        per million events: %s MB RSS, %s MB state; per 100k users: %s MB RSS, %s MB state" % (
        fmt(d["peak_rss_mb_per_million_events"], d=1), fmt(d["state_mb_per_million_events"], d=1),
        fmt(d["peak_rss_mb_per_100k_users"], d=1), fmt(d["state_mb_per_100k_users"], d=1)))
    L("        %s µs CPU per event (%s events per CPU second), %s cores busy on average" % (
        fmt(d["cpu_us_per_event"], d=2), fmt(d["events_per_cpu_s"]), fmt(d["cpu_cores_used"], d=2)))
    if d.get("minor_faults") is not None:
        L("        %s minor page faults (%s per event): fresh memory the kernel backed" % (
            fmt(d["minor_faults"]), fmt(d["minor_faults_per_event"], d=3)))
    if d.get("huge_pages"):
        L("        huge pages: %s" % d["huge_pages"])
    if d.get("loop_thread_cpu_us_per_event") is not None:
        L("        of which the loop thread (acceptance, mart updates, commits) %s µs per event, %s s; "
          "it waited %s s for a core" % (
            fmt(d["loop_thread_cpu_us_per_event"], d=2), fmt(d["loop_thread_cpu_s"], d=2),
            fmt(d.get("loop_thread_runqueue_wait_s"), d=2)))
    if d.get("loop_thread_commit_s") is not None:
        L("        the loop thread spent %s s in LMDB commits (fsync included) and had nothing to apply "
          "for %s s while librdkafka delivered and %s s while the pool validated" % (
            fmt(d["loop_thread_commit_s"], d=2), fmt(d.get("loop_thread_input_wait_kafka_s"), d=2),
            fmt(d.get("loop_thread_input_wait_validation_s"), d=2)))
    L("        %s LMDB write transactions; write calls %s GB (%s kB per event), storage writes "
      "accounted %s GB (%s kB per event)" % (
          fmt(d["lmdb_write_txns"]), fmt(d["write_calls_gb"], d=2), fmt(d["write_calls_kb_per_event"], d=1),
          fmt(d["written_gb"], d=2), fmt(d["written_kb_per_event"], d=1)))
    L("        accepted %s, duplicates %s, rejected %s" % (
        fmt(d["accepted"]), fmt(d["duplicates"]), fmt(d["rejected"])))
    if other_cores is not None:
        L("machine: other processes kept %s of %s cores busy during (b)%s" % (
            fmt(other_cores, d=2), os.cpu_count(),
            "  -- CONTENDED: wall-clock figures are pessimistic" if other_cores > 0.3 else ""))
        if d.get("broker_cores_busy") is not None and d.get("postgres_cores_busy") is not None:
            L("         of which the dev broker %s and Postgres (the flushes) %s" % (
                fmt(d["broker_cores_busy"], d=2), fmt(d["postgres_cores_busy"], d=2)))
        if d.get("machine_cpu_s") is not None:
            L("         CPU of the whole machine for (b): %s s (clickmartd %s s), %s of its cores "
              "busy; the same work with every core busy all the time: %s events/s (the ceiling)" % (
                  fmt(d["machine_cpu_s"], d=2), fmt(d["cpu_s"], d=2),
                  "%d %%" % round(100 * d["machine_busy_share"]), fmt(d["ceiling_events_per_s"])))
    if d.get("page_reporting_order") is not None:
        L("         freed memory goes back to the host (free page reporting, blocks of %s KiB): "
          "a first touch of it waits for the host, so runs after idle minutes are slower "
          "(docs/benchmarks.md)" % fmt(4 << d["page_reporting_order"]))
    if res["batch"] and res["batch"].get("agreement_with_daemon"):
        ag = res["batch"]["agreement_with_daemon"]
        L("batch vs daemon rows (the baseline approximates the contract): " + ", ".join(
            "%s %s/%s rows identical" % (t, fmt(v.get("identical")), fmt(v.get("daemon_rows")))
            for t, v in ag.items()))
    L("")
    L("ratios: daemon/kcat %s (consume only %s), batch/daemon %s" % (
        fmt(r_dk, d=3), fmt(r_dk_c, d=3), fmt(r_bd, d=1)))
    L("")
    L("%-52s %12s %12s %6s" % ("target", "target", "measured", "met"))
    for name, t in res["targets"].items():
        extra = "" if t.get("applies", True) else "  (defined for 1 M events)"
        L("%-52s %12s %12s %6s%s" % (name, fmt(t["target"], d=2 if t["target"] < 1 else 0),
                                     fmt(t["measured"], d=3 if (t["measured"] or 0) < 100 else 0),
                                     t["met"] or "n/a", extra))


def report_steady(kv, res, lines):
    steps = []
    for path in kv.get("steps", "").split():
        try:
            with open(path) as f:
                steps.append(json.load(f))
        except (OSError, ValueError):
            pass
    flush_ms = int(kv.get("p_flush_interval_ms", "2000"))
    res["flush_interval_ms"] = flush_ms
    res["steps"] = steps
    held = [s for s in steps if s.get("held")]
    res["highest_rate_held"] = max((s["target_rate"] for s in held), default=None)
    at100 = [s for s in steps if s.get("target_rate", 0) >= 100000 and s.get("held")]
    p99_target = flush_ms / 1000.0 + 1.0
    met = None
    if at100:
        met = all(s.get("p99_s", 1e9) <= p99_target for s in at100)
    elif any(s.get("target_rate", 0) >= 100000 for s in steps):
        met = False  # 100 k/s was tried but not sustained
    res["targets"] = {"freshness_p99_le_flush_plus_1s_at_100k": {
        "target_s": p99_target, "measured_p99_s": [s.get("p99_s") for s in at100] or None,
        "met": yn(met), "note": None if met is not None else "not tested: no step at >= 100000 events/s"}}
    L = lines.append
    L("")
    L("clickmart bench: steady state (flush interval %d ms; freshness = producer timestamp -> "
      "partitions.next_offset in Postgres past the message, sampled every %s s), %s" % (
          flush_ms, kv.get("p_sample_interval", "0.1"), res["date"]))
    lines.extend(pg_locale_line(kv))
    L("")
    L("%10s %10s %9s %8s %8s %8s %8s %9s %8s %7s" % ("rate", "produced/s", "messages", "p50 s",
                                                     "p90 s", "p99 s", "max s", "lag", "cores", "held"))
    for s in steps:
        L("%10s %10s %9s %8s %8s %8s %8s %9s %8s %7s" % (
            fmt(s.get("target_rate")), fmt(s.get("produced_rate")), fmt(s.get("messages")),
            fmt(s.get("p50_s"), d=3), fmt(s.get("p90_s"), d=3), fmt(s.get("p99_s"), d=3),
            fmt(s.get("max_s"), d=3), s.get("lag_trend", "?"), fmt(s.get("daemon_cpu_cores"), d=2),
            "yes" if s.get("held") else "no"))
    L("")
    L("the newest message of each flush (its freshness is the pipeline: intake, the batch's commit, the")
    L("flush itself; the rest of a message's freshness is the wait for the next flush to start):")
    for s in steps:
        L("%10s  p50 %s s, max %s s over %s flushes" % (
            fmt(s.get("target_rate")), fmt(s.get("step_newest_p50_s"), d=3),
            fmt(s.get("step_newest_max_s"), d=3), fmt(s.get("visible_steps"))))
    if any(s.get("step_span_p50_s") is not None for s in steps):
        L("the span between two flushes' cut-offs (the oldest message of a flush minus its newest; the")
        L("oldest waited that long for the flush to start):")
        for s in steps:
            L("%10s  p50 %s s, max %s s (flush interval %s s); the oldest message of a flush: max %s s" % (
                fmt(s.get("target_rate")), fmt(s.get("step_span_p50_s"), d=3),
                fmt(s.get("step_span_max_s"), d=3), fmt(flush_ms / 1000.0, d=1),
                fmt(s.get("step_oldest_max_s"), d=3)))
    if any(s.get("cpu_while_producing") for s in steps):
        L("")
        L("cores busy while the generator produced (of %s; the generator and the dev broker are the" %
          (os.cpu_count() or 1))
        L("bench's own load on the same cores), and what clickmartd passed to write calls per message")
        L("(its LMDB commits: each rewrites every page its transaction touched):")
        L("%10s %11s %9s %10s %7s %6s %8s %11s" % ("rate", "clickmartd", "Postgres", "generator",
                                                   "broker", "rest", "machine", "kB/message"))
        for s in steps:
            c = s.get("cpu_while_producing") or {}
            L("%10s %11s %9s %10s %7s %6s %8s %11s" % (
                fmt(s.get("target_rate")), fmt(c.get("daemon"), d=2), fmt(c.get("postgres"), d=2),
                fmt(c.get("generator"), d=2), fmt(c.get("broker"), d=2), fmt(c.get("rest"), d=2),
                "%s %%" % fmt(100 * c["machine_busy_share"]) if c.get("machine_busy_share") is not None
                else "?", fmt(c.get("daemon_write_kb_per_message"), d=2)))
    L("")
    L("highest rate held without growing lag: %s events/s" % fmt(res["highest_rate_held"]))
    t = res["targets"]["freshness_p99_le_flush_plus_1s_at_100k"]
    L("target: freshness p99 <= %.1f s at 100 k events/s: %s" % (p99_target, t["met"] or "n/a (" + t["note"] + ")"))


def report_scale(kv, res, lines, baseline_path):
    sc = jload(kv, "scale_json")
    dm = jload(kv, "daemon_time_json")
    n = int(kv["events"])
    res["events"] = n
    res["scale"] = sc
    users = int(kv.get("users", "0") or 0)
    res["daemon"] = {"cpu_s": rnd(dm.get("cpu_s"), 2), "peak_rss_mb": rnd((dm.get("max_rss_kb") or 0) / 1024.0, 1),
                     "state_mb": rnd(fnum(kv, "state_bytes", 0) / 1048576.0, 1),
                     "state_lmdb_used_mb": rnd(fnum(kv, "state_used_bytes", 0) / 1048576.0, 1),
                     "write_calls_gb": rnd((dm.get("write_call_bytes") or 0) / 1e9, 2),
                     "written_gb": rnd((dm.get("fs_output_bytes") or 0) / 1e9, 2),
                     "lmdb_write_txns": int(kv["state_txns"]) if kv.get("state_txns") else None,
                     "users": users, "messages": int(kv.get("daemon_messages", "0") or 0),
                     "stop_seconds": rnd(fnum(kv, "stop_s"), 3)}
    d = res["daemon"]
    for w in ("first", "last"):
        top = read_lines(kv["perf_%s_top" % w]) if kv.get("perf_%s_top" % w) else None
        if top is not None:
            d["perf_%s_window_top" % w] = top
    if d["peak_rss_mb"] and n:
        d["peak_rss_mb_per_million_events"] = round(d["peak_rss_mb"] / (n / 1e6), 1)
        d["state_mb_per_million_events"] = round(d["state_mb"] / (n / 1e6), 1)
        if users:
            d["peak_rss_mb_per_100k_users"] = round(d["peak_rss_mb"] / (users / 1e5), 1)
            d["state_mb_per_100k_users"] = round(d["state_mb"] / (users / 1e5), 1)
    res["complete"] = d["messages"] == n
    # Baseline: the given 1 M throughput JSON, else none.
    base = None
    if baseline_path:
        try:
            with open(baseline_path) as f:
                base = json.load(f)
        except (OSError, ValueError):
            base = None
    base_eps = None
    if base and base.get("mode") == "throughput":
        base_eps = (base.get("daemon") or {}).get("consume_events_per_s")
    res["baseline"] = {"file": baseline_path or None, "consume_events_per_s": base_eps}
    cpe = sc.get("cpu_per_event_last_vs_first")
    rate_ratio = sc.get("rate_last_vs_first")
    fw, lw = sc.get("first_window") or {}, sc.get("last_window") or {}
    # events/s of two windows compare only when the generator ran in both or in neither
    rate_note = None
    if fw and lw and fw.get("producer_running") != lw.get("producer_running"):
        rate_note = ("the generator competed for the CPU in one window only: compare CPU per "
                     "event instead")
    vs_base = (sc["events_per_s"] / base_eps) if (base_eps and sc.get("events_per_s")) else None
    res["targets"] = {
        "last_window_cpu_per_event_within_20pct_of_first": {
            "measured_ratio": cpe, "met": yn(cpe <= 1.2 if cpe else None)},
        "last_window_events_per_s_within_20pct_of_first": {
            "measured_ratio": rate_ratio,
            "met": None if rate_note else yn(rate_ratio >= 0.8 if rate_ratio else None),
            "note": rate_note},
        "events_per_s_within_20pct_of_1M_baseline": {
            "measured_ratio": rnd(vs_base, 3), "met": yn(vs_base >= 0.8 if vs_base else None),
            "note": None if base_eps else "no --baseline throughput JSON given"},
    }
    L = lines.append
    L("")
    L("clickmart bench: scale, %s events %s (%s partitions), %s" % (
        fmt(n), "produced before clickmartd started" if kv.get("p_preload") == "1"
        else "produced while consuming", kv.get("p_partitions", "?"), res["date"]))
    lines.extend(pg_locale_line(kv))
    if not res["complete"]:
        L("WARNING: the daemon saw %s of %s messages (retention of the mock? use more --partitions)"
          % (fmt(d["messages"]), fmt(n)))
    L("")
    L("%12s %10s %10s %9s %9s %10s %10s %9s %9s %9s %9s %9s" % (
        "events to", "events/s", "CPU µs/ev", "wcall kB", "store kB", "lag min", "lag max", "RSS MB",
        "HWM MB", "anon MB", "state MB", "producer"))
    for w in sc.get("windows", []):
        L("%12s %10s %10s %9s %9s %10s %10s %9s %9s %9s %9s %9s" % (
            fmt(w["to"]), fmt(w["events_per_s"]), fmt(w.get("cpu_us_per_event"), d=2),
            fmt(w.get("write_calls_kb_per_event"), d=1), fmt(w.get("written_kb_per_event"), d=1),
            fmt(w.get("lag_min")), fmt(w.get("lag_max")), fmt(w.get("rss_mb"), d=1),
            fmt(w.get("hwm_mb"), d=1), fmt(w.get("anon_peak_mb"), d=1), fmt(w.get("state_mb"), d=1),
            "running" if w.get("producer_running") else "done"))
    L("")
    L("(wcall kB, store kB: kB per event passed to write calls, and accounted to the storage layer;")
    L(" the second counts whole page-cache folios, so with large folios it overstates the device)")
    L("")
    L("the loop thread's wall time per window (share of the window; commit includes the fsync):")
    L("%12s %7s %7s %7s %7s %7s %7s" % ("events to", "CPU", "runq", "commit", "idle", "w.kafka",
                                          "w.valid"))
    for w in sc.get("windows", []):
        L("%12s %7s %7s %7s %7s %7s %7s" % (
            fmt(w["to"]), fmt(w.get("loop_cpu_share"), d=2), fmt(w.get("loop_runq_share"), d=2),
            fmt(w.get("loop_commit_share"), d=2), fmt(w.get("loop_idle_share"), d=2),
            fmt(w.get("loop_input_wait_kafka_share"), d=2),
            fmt(w.get("loop_input_wait_validation_share"), d=2)))
    L("overall: %s events/s from the first message to the last consumed (%s s); %s users; "
      "peak RSS %s MB; state %s MB (LMDB in use %s MB)" % (
          fmt(sc.get("events_per_s")), fmt(sc.get("consume_seconds"), d=1), fmt(users),
          fmt(d["peak_rss_mb"], d=1), fmt(d["state_mb"], d=1), fmt(d["state_lmdb_used_mb"], d=1)))
    L("last window / first window: events/s %s, CPU per event %s" % (fmt(rate_ratio, d=3), fmt(cpe, d=3)))
    if base_eps:
        L("vs the 1 M baseline (%s, %s events/s consume): %s" % (baseline_path, fmt(base_eps), fmt(vs_base, d=3)))
    L("")
    for name, t in res["targets"].items():
        L("%-52s %10s %6s%s" % (name, fmt(t["measured_ratio"], d=3), t["met"] or "n/a",
                                "  (%s)" % t["note"] if t.get("note") else ""))


def proc_cpu(pid):
    """CPU clock ticks used so far by process pid and its children: its own time,
    the time of children it has already reaped (cutime, cstime) and that of its
    live children. For the postmaster that is every backend, whether it has exited
    or not, so a difference of two readings is Postgres's CPU in between."""
    def ticks(p, with_reaped):
        try:
            with open("/proc/%s/stat" % p) as f:
                st = f.read()
        except OSError:
            return 0, None
        rest = st[st.rindex(")") + 2:].split()
        ppid = rest[1]
        t = int(rest[11]) + int(rest[12])  # utime, stime
        if with_reaped:
            t += int(rest[13]) + int(rest[14])  # cutime, cstime
        return t, ppid
    total, _ = ticks(pid, True)
    for d in os.listdir("/proc"):
        if d.isdigit() and d != str(pid):
            t, ppid = ticks(d, False)
            if ppid == str(pid):
                total += t
    return total


def cpu_snap(args):
    """cpu-snap OUT DAEMON_PID BROKER_PID PG_PID: the machine's CPU counters (/proc/stat),
    the CPU ticks of the daemon, the dev broker and Postgres (all its processes), and the
    daemon's write-call bytes, now, as JSON for cpu-split."""
    out, dpid, bpid, pgpid = args[0], args[1], args[2], args[3]
    with open("/proc/stat") as f:
        stat = [int(x) for x in f.readline().split()[1:]]
    wchar, _wb = proc_io(int(dpid)) if dpid.isdigit() else (None, None)
    r = {"t": time.time(), "stat": stat,
         "daemon": proc_cpu(dpid) if dpid.isdigit() else None,
         "broker": proc_cpu(bpid) if bpid.isdigit() else None,
         "pg": proc_cpu(pgpid) if pgpid.isdigit() else None,
         "daemon_wchar": wchar}
    with open(out, "w") as f:
        json.dump(r, f)


def cpu_split(args):
    """cpu-split STEP_JSON SNAP0 SNAP1 GEN_JSON MESSAGES: adds to a steady step's JSON where
    the two cores went while the generator produced: the cores the daemon, Postgres, the
    generator (its rusage) and the dev broker kept busy, the rest (the kernel's writeback,
    the samplers), the machine's busy share, and the bytes the daemon passed to write
    calls per message (its LMDB commits, which rewrite every page they touched)."""
    step, s0, s1, gen = (jload_file(a) for a in args[:4])
    msgs = int(args[4])
    if not (step and s0 and s1):
        return
    wall = s1["t"] - s0["t"]
    tck = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1

    def cores(name):
        a, b = s1.get(name), s0.get(name)
        return None if a is None or b is None or wall <= 0 else (a - b) / tck / wall

    machine = stat_busy_ticks(s0["stat"], s1["stat"]) / tck / wall if wall > 0 else None
    c = {"wall_s": rnd(wall, 2), "cores": ncpu, "daemon": cores("daemon"), "postgres": cores("pg"),
         "broker": cores("broker"),
         "generator": (gen["cpu_s"] / wall) if (gen and gen.get("cpu_s") is not None and wall > 0) else None,
         "machine": machine}
    known = [c[k] for k in ("daemon", "postgres", "broker", "generator")]
    c["rest"] = max(0.0, machine - sum(known)) if (machine is not None and None not in known) else None
    c["machine_busy_share"] = machine / ncpu if machine is not None else None
    for k in ("daemon", "postgres", "broker", "generator", "machine", "rest", "machine_busy_share"):
        c[k] = rnd(c[k], 3)
    w0, w1 = s0.get("daemon_wchar"), s1.get("daemon_wchar")
    if w0 is not None and w1 is not None and msgs > 0:
        c["daemon_write_kb_per_message"] = rnd((w1 - w0) / 1000.0 / msgs, 2)
    step["cpu_while_producing"] = c
    with open(args[0], "w") as f:
        json.dump(step, f)


# --------------------------------------------------------------------------- A/B (--compare)

# The figures an A/B compares: (label, path in a run's JSON, which way is better).
AB_METRICS = {
    "throughput": [
        ("end to end, events/s", ("daemon", "end_to_end_events_per_s"), "higher"),
        ("consume, events/s", ("daemon", "consume_events_per_s"), "higher"),
        ("after the end offsets, s", ("daemon", "final_flush_and_exit_seconds"), "lower"),
        ("clickmartd CPU, s", ("daemon", "cpu_s"), "lower"),
        ("loop thread CPU, us/event", ("daemon", "loop_thread_cpu_us_per_event"), "lower"),
        ("loop thread in commits, s", ("daemon", "loop_thread_commit_s"), "lower"),
        ("loop waited for librdkafka, s", ("daemon", "loop_thread_input_wait_kafka_s"), "lower"),
        ("loop waited for validation, s", ("daemon", "loop_thread_input_wait_validation_s"), "lower"),
        ("whole machine CPU, s", ("daemon", "machine_cpu_s"), "lower"),
        ("minor page faults", ("daemon", "minor_faults"), "lower"),
        ("peak RSS, MB", ("daemon", "peak_rss_mb"), "lower"),
    ],
    "steady": [
        ("freshness p99, s", ("steps", 0, "p99_s"), "lower"),
        ("freshness p50, s", ("steps", 0, "p50_s"), "lower"),
        ("newest of a flush p50, s", ("steps", 0, "step_newest_p50_s"), "lower"),
        ("clickmartd cores", ("steps", 0, "daemon_cpu_cores"), "lower"),
        ("Postgres cores", ("steps", 0, "cpu_while_producing", "postgres"), "lower"),
        ("machine busy share", ("steps", 0, "cpu_while_producing", "machine_busy_share"), "lower"),
        ("clickmartd write calls, kB/message", ("steps", 0, "cpu_while_producing",
                                               "daemon_write_kb_per_message"), "lower"),
    ],
    "scale": [
        ("events/s overall", ("scale", "events_per_s"), "higher"),
        ("clickmartd CPU, s", ("daemon", "cpu_s"), "lower"),
        ("CPU us/event, first window", ("scale", "first_window", "cpu_us_per_event"), "lower"),
        ("CPU us/event, last window", ("scale", "last_window", "cpu_us_per_event"), "lower"),
        ("CPU/event last / first", ("scale", "cpu_per_event_last_vs_first"), "lower"),
        ("loop in commits, last window", ("scale", "last_window", "loop_commit_share"), "lower"),
        ("write calls, GB", ("daemon", "write_calls_gb"), "lower"),
        ("peak RSS, MB", ("daemon", "peak_rss_mb"), "lower"),
        ("state on disk, MB", ("daemon", "state_mb"), "lower"),
    ],
}


def ab_get(doc, path):
    for k in path:
        try:
            doc = doc[k]
        except (KeyError, IndexError, TypeError):
            return None
    return doc if isinstance(doc, (int, float)) and not isinstance(doc, bool) else None


def sign_p(wins, n):
    """Two-sided exact sign test: the chance, with B and A equally likely to win each of n
    untied pairs, of a split at least as uneven as wins of n. None without pairs."""
    if n <= 0:
        return None
    k = max(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def ab_summary(args):
    """ab-summary OUT MODE A B FILE...: FILE names end in pairI-a.json or pairI-b.json.
    Per figure: the median of each side, B/A of the medians, the median of the pairs' own
    B/A, each side's range, in how many pairs B did better than A (ties count for neither),
    and the two-sided sign test's p of that count (sign_p)."""
    out, mode, name_a, name_b, files = args[0], args[1], args[2], args[3], args[4:]
    runs = {}
    for f in files:
        m = re.search(r"pair(\d+)-([ab])\.json$", f)
        if not m:
            raise SystemExit("ab-summary: cannot tell the pair and side of %s" % f)
        runs[(int(m.group(1)), m.group(2))] = json.load(open(f))
    pairs = sorted({p for p, _ in runs})
    for p in pairs:
        if (p, "a") not in runs or (p, "b") not in runs:
            raise SystemExit("ab-summary: pair %d lacks a side" % p)
    res = {"tool": "clickmart tools/bench", "mode": "ab-" + mode,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine_info(), "a": name_a, "b": name_b, "pairs": len(pairs),
           "params": runs[(pairs[0], "a")].get("params", {}), "metrics": []}
    lines = ["clickmart bench: A/B, %s mode, %d pairs (order A B, B A, ...), %s"
             % (mode, len(pairs), res["date"]),
             "A: %s" % name_a, "B: %s" % name_b, "",
             "%-28s %7s %12s %12s %7s %8s %23s %23s %10s %6s" % (
                 "figure", "better", "A median", "B median", "B/A", "pair B/A", "A range", "B range",
                 "B better", "sign p")]

    def f(x):
        if x is None:
            return "n/a"
        return "{:,.0f}".format(x) if abs(x) >= 1000 else "{:.3g}".format(x)

    for label, path, better in AB_METRICS[mode]:
        va = [ab_get(runs[(p, "a")], path) for p in pairs]
        vb = [ab_get(runs[(p, "b")], path) for p in pairs]
        both = [(a, b) for a, b in zip(va, vb) if a is not None and b is not None]
        if not both:
            continue
        wins = sum(1 for a, b in both if (b > a if better == "higher" else b < a))
        ma, mb = statistics.median([a for a, _ in both]), statistics.median([b for _, b in both])
        ratio = mb / ma if ma else None
        own = [b / a for a, b in both if a]
        pair_ratio = statistics.median(own) if own else None
        ties = sum(1 for a, b in both if a == b)
        p = sign_p(wins, len(both) - ties)
        res["metrics"].append({"figure": label, "better": better, "a": va, "b": vb,
                               "a_median": ma, "b_median": mb,
                               "b_over_a": None if ratio is None else round(ratio, 4),
                               "pair_b_over_a_median": None if pair_ratio is None
                               else round(pair_ratio, 4),
                               "b_better_pairs": wins, "pairs": len(both), "tied_pairs": ties,
                               "sign_p": None if p is None else round(p, 4)})
        lines.append("%-28s %7s %12s %12s %7s %8s %23s %23s %10s %6s" % (
            label, better, f(ma), f(mb), "n/a" if ratio is None else "%.3f" % ratio,
            "n/a" if pair_ratio is None else "%.3f" % pair_ratio,
            "%s - %s" % (f(min(a for a, _ in both)), f(max(a for a, _ in both))),
            "%s - %s" % (f(min(b for _, b in both)), f(max(b for _, b in both))),
            "%d of %d" % (wins, len(both)), "n/a" if p is None else "%.3f" % p))
    lines += ["", "pair B/A: the median of each pair's own B/A, steadier than B/A of the medians when",
              "the machine's speed drifts during the runs. sign p: the chance of a count of pairs",
              "at least this lopsided if the change did nothing (two-sided sign test, ties left",
              "out); with 6 pairs the smallest is 0.031 (6 of 6), with 4 pairs 0.125. A",
              "difference inside both sides' ranges, or B better in about half of the pairs, is",
              "the machine's noise, not the change."]
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n".join(lines))
    print("\nJSON: %s" % out)


# --------------------------------------------------------------------------- main


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "proc-cpu":
        print(proc_cpu(args[0]))
    elif cmd == "copyprep":
        copyprep(args[0])
    elif cmd == "rusage":
        rusage(args)
    elif cmd == "cpu-snap":
        cpu_snap(args)
    elif cmd == "cpu-split":
        cpu_split(args)
    elif cmd == "steps":
        steps(args[0])
    elif cmd == "daemonlog":
        daemonlog(args[0])
    elif cmd == "poll-pg":
        poll_pg(args)
    elif cmd == "memsum":
        memsum(args[0])
    elif cmd == "poll-status":
        poll_status(args)
    elif cmd == "perf-windows":
        perf_windows(args)
    elif cmd == "freshness":
        freshness(args)
    elif cmd == "scale":
        scale(args)
    elif cmd == "report":
        report(args)
    elif cmd == "ab-summary":
        ab_summary(args)
    else:
        print("benchlib.py: unknown command %s" % cmd, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
