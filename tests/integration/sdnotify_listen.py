#!/usr/bin/env python3
"""A stand-in for systemd's notification socket (stdlib only).

    sdnotify_listen.py SOCKET OUTFILE [SECONDS]

Binds an AF_UNIX datagram socket at SOCKET (what systemd passes to a Type=notify
service as NOTIFY_SOCKET) and appends every datagram it receives to OUTFILE as
one line: "<seconds since start> <message with newlines as |>". Runs until
SIGTERM or SECONDS (default 300), then removes SOCKET.
"""

import os
import signal
import socket
import sys
import time


def main():
    path, out = sys.argv[1], sys.argv[2]
    limit = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    t0 = time.monotonic()
    with open(out, "a") as f:
        print("listening", flush=True)
        while not stop and time.monotonic() - t0 < limit:
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            f.write("%.3f %s\n" % (time.monotonic() - t0,
                                   data.decode("utf-8", "replace").strip().replace("\n", "|")))
            f.flush()
    s.close()
    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
