#!/usr/bin/env python3
"""Run `clickmartctl watch` on a pseudo-terminal, as a person would (stdlib only).

    ctl_pty.py CLICKMARTCTL SOCKET q|sigint

Starts `CLICKMARTCTL --socket SOCKET watch --interval 0.3` with its stdin and
stdout on a pty (80x30), waits for two full frames (each begins with the ANSI
clear-screen sequence), then quits it by typing `q` or by sending SIGINT (what
Ctrl-C does). Checks that it exits 0 within 5 s, that it switched to the
alternate screen and back and showed the cursor again, and that the frames
hold the view's fields. Prints the last frame (escape sequences removed) and
exits 0 on success, 1 with a reason otherwise.
"""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

CLEAR = b"\x1b[H\x1b[2J"


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in ("q", "sigint"):
        print(__doc__, file=sys.stderr)
        return 2
    ctl, sock, how = sys.argv[1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(ctl, [ctl, "--socket", sock, "watch", "--interval", "0.3"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 80, 0, 0))
    out = b""
    deadline = time.time() + 15
    while out.count(CLEAR) < 2 and time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    if out.count(CLEAR) < 2:
        os.kill(pid, signal.SIGKILL)
        print("FAIL: fewer than 2 frames within 15 s; output: %r" % out[-2000:])
        return 1
    if how == "q":
        os.write(fd, b"q")
    else:
        os.kill(pid, signal.SIGINT)
    status = None
    deadline = time.time() + 5
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 65536)
            except OSError:
                pass
        wpid, st = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            status = st
            break
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("FAIL: still running 5 s after %s" % how)
        return 1
    # Drain what is left (the terminal restore sequence).
    while True:
        r, _, _ = select.select([fd], [], [], 0.1)
        if not r:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        print("FAIL: exit status %r after %s" % (status, how))
        return 1
    problems = []
    if b"\x1b[?1049h" not in out or b"\x1b[?1049l" not in out:
        problems.append("did not enter and leave the alternate screen")
    if not out.rstrip().endswith(b"\x1b[?25h\x1b[?1049l"):
        problems.append("the cursor and the screen were not restored last")
    last = out[out.rfind(CLEAR):]
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", last).decode("utf-8", "replace")
    for want in ("clickmartd", "messages", "accepted", "per second", "lag", "flushes",
                 "PARTITION", "healthy"):
        if want not in text:
            problems.append("no %r in the frame" % want)
    print(text)
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print("OK: %d frames, exited 0 after %s" % (out.count(CLEAR), how))
    return 0


if __name__ == "__main__":
    sys.exit(main())
