# tools/bench.d/procs.sh: finding the daemon's process, sourced by tools/bench and by
# its self-test (tests/integration/test_bench_selftest.sh). Needs pgrep (procps).
#
# daemon_child PID [NAME]: the pid of PID's child process named NAME, an extended
# regular expression for the whole name (default: the --daemon binary's name, as the
# kernel keeps it: at most 15 characters, or a name that starts with clickmartd,
# which a --daemon wrapper script becomes when it execs clickmartd or a copy kept as
# clickmartd-before). Without the second name, a wrapper was never found, and the
# lookup's 250 pgrep calls used about 2 s of CPU during the run it measures (every B
# of a wrapper's A/B was slowed); until the twenty-fourth session the second name was
# clickmartd exactly, which missed a wrapper of a renamed copy.
daemon_child() {
    local tpid=$1 name=${2:-$(basename "$DAEMON" | cut -c1-15)|clickmartd.*} i c
    for ((i = 0; i < 250; i++)); do
        c=$(pgrep -P "$tpid" -x "$name" 2>/dev/null | head -n1 || true)
        [ -n "$c" ] && { echo "$c"; return 0; }
        sleep 0.02
    done
    return 1
}
