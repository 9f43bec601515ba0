#!/usr/bin/env bash
# End to end: generator -> dev broker -> clickmartd (killed with SIGKILL part-way, several
# times, then restarted with --exit-at-end) -> Postgres, checked table by table against the
# independent reference (compare.py) recomputed from a kcat dump of the topic.
#
# The daemon consumes far faster than a pre-filled topic lets a poller react, so by
# default the generator produces at a limited rate (CM_GEN_RATE events/s) while the daemon
# is already running: the SIGKILLs then land in the middle of the stream. CM_GEN_RATE=0
# generates everything first and starts the daemon afterwards.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_pipeline.sh
# Knobs: CM_EVENTS (default 40000), CM_SEED (7), CM_KILL_AFTER (accepted events before
# the first SIGKILL, default 5000), CM_KILLS (SIGKILLs, each after another CM_KILL_AFTER
# accepted events, default 3), CM_GEN_RATE (default 10000), CM_KEEP=1 keeps the temp dir.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-40000}
SEED=${CM_SEED:-7}
KILL_AFTER=${CM_KILL_AFTER:-5000}
KILLS=${CM_KILLS:-3}
GEN_RATE=${CM_GEN_RATE:-10000}
PARTITIONS=4
TOPIC=clickmart.events

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start "$PARTITIONS" "$TOPIC"

GEN_PID=""
gen_start() {
    local rate=()
    [ "$GEN_RATE" = 0 ] || rate=(--rate "$GEN_RATE")
    "${CM_SETSID[@]}" "$CLICKMART_BIN/tools/clickmart-gen" --seed "$SEED" --events "$EVENTS" \
        --brokers "$CM_BROKER" --topic "$CM_TOPIC" --quiet "${rate[@]}" \
        >"$CM_DIR/gen.log" 2>&1 </dev/null &
    GEN_PID=$!
    cm_track_pid "$GEN_PID"
    GEN_T=$SECONDS
}
gen_done() { ! kill -0 "$GEN_PID" 2>/dev/null; }
gen_wait() {
    [ -n "$GEN_PID" ] || return 0
    local rc=0
    cm_wait_for 300 "clickmart-gen to finish" gen_done ||
        cm_die "clickmart-gen still running after 300s"
    wait "$GEN_PID" || rc=$?
    cm_untrack_pid "$GEN_PID"
    GEN_PID=""
    [ "$rc" = 0 ] || cm_die "clickmart-gen failed with status $rc (see gen.log above)"
    cm_log "generated $EVENTS events (seed $SEED, rate limit $GEN_RATE/s, 0 = none) in $((SECONDS - GEN_T))s"
}

if [ "$GEN_RATE" = 0 ]; then
    gen_start
    gen_wait
fi

# Runs 1..KILLS: consume, SIGKILL once another KILL_AFTER events are accepted (or after
# 60 s), restart on the same state.
ACCEPTED=-1
accepted_over() {
    cm_daemon_alive || cm_die "clickmartd exited on its own (see $CM_DAEMON_LOG)"
    ACCEPTED=$(cm_status_accepted)
    [ "$ACCEPTED" -gt "$1" ]
}
t=$SECONDS
for ((k = 1; k <= KILLS; k++)); do
    # Run 1 puts every heap on huge pages (the re-exec), run 2 only the loop thread's; the
    # others run the default, auto, which measures a page fault and takes one of the two.
    case $k in
    1) cm_daemon_start --heap-huge-pages=all ;;
    2) cm_daemon_start --heap-huge-pages=loop ;;
    *) cm_daemon_start ;;
    esac
    if [ "$k" = 1 ] && [ "$GEN_RATE" != 0 ]; then gen_start; fi
    want=$((k * KILL_AFTER))
    if cm_wait_for 60 "more than $want accepted events" accepted_over "$want"; then
        cm_log "run $k: $ACCEPTED accepted; SIGKILL"
    else
        cm_log "run $k: only $ACCEPTED accepted after 60s; SIGKILL anyway"
    fi
    if [ "$k" = 3 ]; then
        # --heap-huge-pages=auto (the default): the log says what it measured and took,
        # and the process runs as it says: with glibc's hugetlb tunable after all, without
        # it after loop.
        line=$(grep 'msg="heap"' "$CM_DAEMON_LOG" | tail -n 1 || true)
        case $line in
        *'huge_pages="all (auto: a small-page fault takes '*) want_tunable=1 ;;
        # "loop (tables only: ...)" and a fallback, "loop (all: ...) (auto: ...)", too.
        *'huge_pages="loop'*'(auto: '*) want_tunable=0 ;;
        *) cm_die "the default run logged no automatic choice: $line" ;;
        esac
        has_tunable=0
        if tr '\0' '\n' <"/proc/$CM_DAEMON_PID/environ" | grep -q '^GLIBC_TUNABLES=.*glibc\.malloc\.hugetlb=1'; then
            has_tunable=1
        fi
        [ "$has_tunable" = "$want_tunable" ] ||
            cm_die "auto: logged '$line' but glibc's hugetlb tunable is $([ $has_tunable = 1 ] || echo not) set"
        cm_log "run $k: ${line#*msg=\"heap\" }"
    fi
    if [ "$k" = 2 ]; then
        # --heap-huge-pages=loop: no re-exec; the loop thread's heap is
        # advised for huge pages itself (the "hg" flag in smaps) where THP can be used.
        # (A sanitizer build logs "loop (tables only: ...)".)
        grep -q 'msg="heap" huge_pages="loop' "$CM_DAEMON_LOG" ||
            cm_die "clickmartd did not log huge_pages=\"loop\" (see $CM_DAEMON_LOG)"
        if tr '\0' '\n' <"/proc/$CM_DAEMON_PID/environ" | grep -q 'glibc\.malloc\.hugetlb'; then
            cm_die "clickmartd re-executed itself with glibc's hugetlb tunable in loop mode"
        fi
        # Under a sanitizer's allocator there is no main heap to advise (the log says
        # "tables only"), and this run's tables are too small to be.
        if grep -q 'msg="heap" huge_pages="loop"' "$CM_DAEMON_LOG" &&
            grep -Eq '\[(madvise|always)\]' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null; then
            grep -q '^VmFlags:.* hg' "/proc/$CM_DAEMON_PID/smaps" ||
                cm_die "loop mode: no mapping of clickmartd is advised for huge pages"
        fi
    fi
    if [ "$k" = 1 ]; then
        # --heap-huge-pages=all: the daemon runs again with glibc's hugetlb tunable
        # set, keeps its pid, and says so.
        tr '\0' '\n' <"/proc/$CM_DAEMON_PID/environ" | grep -q '^GLIBC_TUNABLES=.*glibc\.malloc\.hugetlb=1' ||
            cm_die "clickmartd runs without glibc.malloc.hugetlb=1 in its environment"
        # It keeps its name too (executing /proc/self/exe renamed it "exe").
        [ "$(cat "/proc/$CM_DAEMON_PID/comm")" = clickmartd ] ||
            cm_die "clickmartd runs as '$(cat "/proc/$CM_DAEMON_PID/comm")' after its re-exec"
        grep -q 'msg="heap" huge_pages="all"' "$CM_DAEMON_LOG" ||
            cm_die "clickmartd did not log huge_pages=\"all\" (see $CM_DAEMON_LOG)"
    fi
    cm_daemon_kill9
done
gen_wait

DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_log "dumped the topic: $("$CM_PY" "$HERE/cmtool.py" dump-summary "$DUMP"), $(stat -c %s "$DUMP") bytes"

# Last run: consume to the end offsets seen at start, flush, exit 0.
t2=$SECONDS
cm_daemon_start --exit-at-end --heap-huge-pages=false
cm_daemon_wait 420 || cm_die "clickmartd --exit-at-end still running after 420s"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd --exit-at-end exited with status $CM_DAEMON_RC"
grep -q 'msg="heap" huge_pages="off"' "$CM_DAEMON_LOG" ||
    cm_die "--heap-huge-pages=false: clickmartd did not log huge_pages=\"off\""
cm_log "last run (--exit-at-end) took $((SECONDS - t2))s; all runs $((SECONDS - t))s"

t=$SECONDS
cm_compare "$DUMP" || cm_die "Postgres differs from the reference"
cm_log "compare passed in $((SECONDS - t))s; whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
