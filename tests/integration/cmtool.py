#!/usr/bin/env python3
"""Small helpers for lib.sh (Python 3 stdlib only).

    cmtool.py free-port                 print a free TCP port on 127.0.0.1
    cmtool.py accepted                  read /status JSON on stdin, print accepted total
                                        (-1 when it cannot be read)
    cmtool.py caught-up DUMP            read /status JSON on stdin; exit 0 when every
                                        partition of the dump is consumed to its end
                                        (next_offset >= last offset + 1) and no partition
                                        reports a lag, else 1
    cmtool.py dump-summary DUMP         one line: messages and partitions in a kcat dump
"""

import json
import os
import socket
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    print(port)
    return 0


def read_status():
    try:
        return json.loads(sys.stdin.read())
    except ValueError:
        return None


def status_partitions(d):
    parts = d.get("partitions") if isinstance(d, dict) else None
    if isinstance(parts, dict):  # {"0": {...}} is accepted as well
        parts = [dict(v, partition=int(k)) for k, v in parts.items()]
    return parts if isinstance(parts, list) else []


def accepted_total(d):
    if not isinstance(d, dict):
        return -1
    for holder in (d, d.get("totals"), d.get("counters"), d.get("stats")):
        if isinstance(holder, dict) and isinstance(holder.get("accepted"), int):
            return holder["accepted"]
    parts = status_partitions(d)
    if parts and all(isinstance(p.get("accepted"), int) for p in parts):
        return sum(p["accepted"] for p in parts)
    return -1


def dump_next_offsets(path):
    import reference
    nxt = {}
    n = 0
    for p, o, _ in reference.read_dump(path):
        n += 1
        nxt[p] = max(nxt.get(p, 0), o + 1)
    return nxt, n


def caught_up(path):
    d = read_status()
    if d is None:
        return 1
    nxt, _ = dump_next_offsets(path)
    seen = {}
    for p in status_partitions(d):
        if not isinstance(p, dict) or "partition" not in p:
            continue
        if p.get("lag") not in (None, 0):
            return 1
        seen[int(p["partition"])] = p.get("next_offset", -1)
    for part, want in nxt.items():
        if not isinstance(seen.get(part), int) or seen[part] < want:
            return 1
    return 0


def main(argv):
    if len(argv) >= 1 and argv[0] == "free-port":
        return free_port()
    if len(argv) >= 1 and argv[0] == "accepted":
        print(accepted_total(read_status()))
        return 0
    if len(argv) == 2 and argv[0] == "caught-up":
        return caught_up(argv[1])
    if len(argv) == 2 and argv[0] == "dump-summary":
        nxt, n = dump_next_offsets(argv[1])
        print("%d messages in %d partitions (%s)" % (
            n, len(nxt), ", ".join("p%d: next offset %d" % (p, o) for p, o in sorted(nxt.items()))))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
