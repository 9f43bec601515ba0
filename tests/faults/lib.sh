# shellcheck shell=bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# lib.sh - helpers for clickmart's fault suite (tests/faults/*.sh). Builds on
# tests/integration/lib.sh (cm_setup, cm_pg_start/stop, cm_broker_start, cm_daemon_start,
# ...) and adds: the FAULTS_SCALE setting, a generator running at a rate, checks that are
# recorded rather than fatal, the final --exit-at-end run, the two table comparisons
# (compare.py against the contract, and every table against a fault-free run of the
# daemon over the same topic) and the summary line
#
#   fault-suite: <scenario>: faults=N messages=M tables_equal=yes|no checks=ok|failed(K) time=Ts
#
# A scenario script:
#
#   source "$(dirname "$0")/lib.sh"
#   fs_begin crash_loop 4           # temp dir, Postgres, dev broker with 4 partitions
#   cm_daemon_start ...; fs_gen_start EVENTS RATE
#   fs_fault "kill -9 during a flush"; ...
#   fs_expect "intake paused" some_command args
#   fs_finish                       # SIGTERM, dump, --exit-at-end, compare, summary, exit
#
# Environment (besides tests/integration/lib.sh's CLICKMART_BIN, CM_KEEP, ...):
#   FAULTS_SCALE      short (default; small data, short outages) or long
#   FAULTS_SEED       generator seed (default: per scenario)
#   FAULTS_BASELINE   1 (default): also diff every table against a fault-free run; 0: skip
#   FAULTS_COMPARE_TABLES  comma-separated tables (and views) for compare.py (default: all)
#   FAULTS_DISK_FULL  map_full.sh's disk-full case: auto (default: when root can mount a
#                     tmpfs), 1, 0

FS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../integration/lib.sh
source "$FS_LIB_DIR/../integration/lib.sh"

FAULTS_SCALE=${FAULTS_SCALE:-short}
case "$FAULTS_SCALE" in
short | long) ;;
*)
    echo "FAULTS_SCALE must be short or long, not '$FAULTS_SCALE'" >&2
    exit 2
    ;;
esac
FAULTS_BASELINE=${FAULTS_BASELINE:-1}
FS_TOOL=$FS_LIB_DIR/faultool.py

# fs_scale SHORT LONG: the value for the current FAULTS_SCALE.
fs_scale() { if [ "$FAULTS_SCALE" = long ]; then echo "$2"; else echo "$1"; fi; }

# --- scenario life cycle ------------------------------------------------------------

# fs_begin NAME PARTITIONS: temp dir and cleanup trap, Postgres, the dev broker.
fs_begin() {
    FS_NAME=$1
    FS_FAULTS=0
    FS_MESSAGES=0
    FS_TABLES_EQUAL=no
    FS_FAILED=()
    FS_SUMMARY_DONE=0
    FS_GEN_PID=""
    FS_LOCK_PID=""
    FS_T0=$SECONDS
    cm_setup
    trap fs__on_exit EXIT
    cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
    cm_log "fault suite: scenario $FS_NAME, scale $FAULTS_SCALE"
    cm_pg_start
    cm_broker_start "${2:-4}" clickmart.events
}

# On any exit (a cm_die, an interrupt, the end): print the summary line once, then run
# the integration lib's cleanup with the original status.
fs__on_exit() {
    local rc=$?
    set +e
    # A scenario's own clean-up first (e.g. unmounting a tmpfs inside the temp dir).
    if declare -F fs_pre_cleanup >/dev/null; then fs_pre_cleanup; fi
    if [ "${FS_SUMMARY_DONE:-0}" != 1 ]; then
        [ "$rc" = 0 ] && rc=1
        FS_FAILED+=("scenario aborted")
        fs__summary
    fi
    (exit "$rc")
    cm_cleanup
}

fs__summary() {
    FS_SUMMARY_DONE=1
    local checks=ok
    if [ ${#FS_FAILED[@]} -gt 0 ]; then checks="failed(${#FS_FAILED[@]})"; fi
    local f
    for f in "${FS_FAILED[@]+"${FS_FAILED[@]}"}"; do cm_log "failed check: $f"; done
    printf 'fault-suite: %s: faults=%d messages=%d tables_equal=%s checks=%s time=%ds\n' \
        "$FS_NAME" "$FS_FAULTS" "$FS_MESSAGES" "$FS_TABLES_EQUAL" "$checks" "$((SECONDS - FS_T0))"
}

# fs_fault DESCRIPTION: counts one injected fault.
fs_fault() {
    FS_FAULTS=$((FS_FAULTS + 1))
    cm_log "FAULT $FS_FAULTS: $*"
}

# fs_fail DESCRIPTION: records a failed check (the scenario goes on, and fails at the end).
fs_fail() {
    FS_FAILED+=("$*")
    cm_log "CHECK FAILED: $*"
}

# fs_expect DESCRIPTION COMMAND [ARGS...]: runs COMMAND; records a failed check when it fails.
fs_expect() {
    local desc=$1
    shift
    if "$@"; then
        cm_log "check ok: $desc"
    else
        fs_fail "$desc"
    fi
}

# --- generator ----------------------------------------------------------------------

# fs_gen_start EVENTS RATE [EXTRA GEN ARGS...]: clickmart-gen into the topic in the
# background, at most RATE messages/s (0: as fast as it can).
fs_gen_start() {
    local events=$1 rate=$2
    shift 2
    local r=()
    [ "$rate" = 0 ] || r=(--rate "$rate")
    "${CM_SETSID[@]}" "$CLICKMART_BIN/tools/clickmart-gen" --seed "${FAULTS_SEED:-$FS_SEED_DEFAULT}" \
        --events "$events" --brokers "$CM_BROKER" --topic "$CM_TOPIC" --quiet "${r[@]}" "$@" \
        >>"$CM_DIR/gen.log" 2>&1 </dev/null &
    FS_GEN_PID=$!
    cm_track_pid "$FS_GEN_PID"
    cm_log "clickmart-gen: $events events at ${rate}/s (0 = unlimited), pid $FS_GEN_PID"
}
FS_SEED_DEFAULT=11

fs_gen_running() { [ -n "$FS_GEN_PID" ] && kill -0 "$FS_GEN_PID" 2>/dev/null; }
fs__gen_done() { ! fs_gen_running; }

# fs_gen_wait [SECONDS]: waits for the generator; dies when it failed.
# shellcheck disable=SC2120 # the timeout is optional
fs_gen_wait() {
    [ -n "$FS_GEN_PID" ] || return 0
    local rc=0
    cm_wait_for "${1:-600}" "clickmart-gen to finish" fs__gen_done || cm_die "clickmart-gen still running"
    wait "$FS_GEN_PID" || rc=$?
    cm_untrack_pid "$FS_GEN_PID"
    FS_GEN_PID=""
    [ "$rc" = 0 ] || cm_die "clickmart-gen failed with status $rc"
    cm_log "clickmart-gen finished"
}

# --- status socket ------------------------------------------------------------------

fs_curl() { curl -s -f --max-time "${FS_CURL_MAX:-5}" --unix-socket "$CM_DIR/status.sock" "http://localhost$1"; }

# fs_st PATH...: fields of /status (dotted paths), one per line; "null" when absent or
# when the daemon does not answer.
fs_st() {
    local j
    j=$(fs_curl /status 2>/dev/null) || j=""
    printf '%s' "$j" | "$CM_PY" "$FS_TOOL" get "$@"
}

# fs_metric NAME: the value of an unlabelled metric from /metrics (empty if missing).
fs_metric() {
    local m
    m=$(fs_curl /metrics 2>/dev/null) || m=""
    awk -v n="$1" '$1 == n { print $2; exit }' <<<"$m"
}

# fs_healthz: "CODE BODY" of /healthz.
fs_healthz() {
    local out code
    out=$(curl -s --max-time 5 -w '\n%{http_code}' --unix-socket "$CM_DIR/status.sock" \
        http://localhost/healthz 2>/dev/null) || true
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    printf '%s %s\n' "$code" "${out%%$'\n'*}"
}

fs_status_up() { fs_curl /status >/dev/null 2>&1; }

# fs_daemon_ready [SECONDS]: waits until the started daemon answers on its socket.
fs_daemon_ready() {
    cm_wait_for "${1:-60}" "clickmartd's status socket" fs__ready_or_dead ||
        cm_die "clickmartd did not come up (see $CM_DAEMON_LOG)"
    cm_daemon_alive || cm_die "clickmartd exited during start-up (see $CM_DAEMON_LOG)"
}
fs__ready_or_dead() { ! cm_daemon_alive || fs_status_up; }

# fs_messages: messages the running daemon has applied so far (-1 if it does not answer).
fs_messages() {
    local v
    v=$(fs_st messages)
    [[ "$v" =~ ^[0-9]+$ ]] && echo "$v" || echo -1
}

# fs_wait_messages N SECONDS: waits until the daemon has applied more than N messages.
fs_wait_messages() {
    local n=$1
    fs__more_than() {
        cm_daemon_alive || return 0
        [ "$(fs_messages)" -gt "$n" ]
    }
    cm_wait_for "$2" "more than $n messages applied" fs__more_than
}

# fs_caught_up: the daemon's partitions are all at their end offsets with no lag, intake
# is not paused and nothing waits to be flushed.
fs_caught_up() {
    local v
    v=$(fs_st lag paused state.dirty_rows flush.in_flight | tr '\n' ' ')
    [ "$v" = "0 false 0 false " ]
}

# --- Postgres faults ----------------------------------------------------------------

# fs_lock_table TABLE SECONDS: a psql session that holds an ACCESS EXCLUSIVE lock on
# clickmart.TABLE for SECONDS (or until fs_unlock); returns once the lock is granted.
fs_lock_table() {
    local table=$1 secs=$2
    "${CM_SETSID[@]}" psql -X -q -d "$CM_PG application_name=cm_fault_lock" -v ON_ERROR_STOP=1 \
        -c "BEGIN" -c "LOCK TABLE clickmart.$table IN ACCESS EXCLUSIVE MODE" \
        -c "SELECT pg_sleep($secs)" -c "COMMIT" >>"$CM_DIR/lock.log" 2>&1 </dev/null &
    FS_LOCK_PID=$!
    cm_track_pid "$FS_LOCK_PID"
    fs__lock_granted() {
        [ "$(cm_psql "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE a.application_name = 'cm_fault_lock' AND l.relation = 'clickmart.$table'::regclass
            AND l.mode = 'AccessExclusiveLock' AND l.granted" 2>/dev/null)" = 1 ]
    }
    cm_wait_for 30 "the lock on clickmart.$table" fs__lock_granted || cm_die "could not lock clickmart.$table"
    cm_log "holding ACCESS EXCLUSIVE on clickmart.$table (for at most ${secs}s)"
}

# fs_unlock: ends the locking session (its backend is terminated, so the lock goes now).
fs_unlock() {
    [ -n "$FS_LOCK_PID" ] || return 0
    if [ "${CM_PG_RUNNING:-0}" = 1 ]; then
        cm_psql "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'cm_fault_lock'" >/dev/null 2>&1 || true
    fi
    cm_stop_pid "$FS_LOCK_PID" 2
    FS_LOCK_PID=""
    cm_log "lock released"
}

# --- the end of a scenario ----------------------------------------------------------

# fs_stop_daemon: SIGTERM the running daemon; it must flush and exit 0 within 90 s. A
# daemon that has already exited on its own is a failed check.
fs_stop_daemon() {
    [ -n "$CM_DAEMON_PID" ] || return 0
    if ! cm_daemon_alive; then
        cm_daemon_wait 1 || true
        fs_fail "clickmartd had exited on its own with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
        return 0
    fi
    cm_daemon_signal TERM
    local t0=$SECONDS
    FS_STOP_SECS=-1
    if ! cm_daemon_wait 90; then
        fs_fail "clickmartd did not exit within 90s of SIGTERM"
        cm_daemon_kill9
        return 0
    fi
    # shellcheck disable=SC2034 # read by the scenarios
    FS_STOP_SECS=$((SECONDS - t0))
    [ "$CM_DAEMON_RC" = 0 ] || fs_fail "clickmartd exited with status $CM_DAEMON_RC after SIGTERM"
}

# fs_dump: dumps the topic to $FS_DUMP and sets FS_MESSAGES.
fs_dump() {
    FS_DUMP=$CM_DIR/topic.dump
    cm_dump_topic "$CM_TOPIC" "$FS_DUMP"
    local summary
    summary=$("$CM_PY" "$CM_LIB_DIR/cmtool.py" dump-summary "$FS_DUMP")
    FS_MESSAGES=$((${summary%% *} + ${FS_MESSAGES_BASE:-0}))
    cm_log "topic: $summary"
}

# fs_compare_contract: compare.py (the independent recompute of the contract) against
# the clickmart schema; 0 when equal.
fs_compare_contract() {
    local args=()
    [ -z "${FAULTS_COMPARE_TABLES:-}" ] || args=(--tables "$FAULTS_COMPARE_TABLES")
    cm_log "compare.py${FAULTS_COMPARE_TABLES:+ (tables: $FAULTS_COMPARE_TABLES)}"
    if cm_compare "$FS_DUMP" "${args[@]+"${args[@]}"}" >"$CM_DIR/compare.out" 2>&1; then
        sed 's/^/    /' "$CM_DIR/compare.out" | grep -v '^    \(  \|reference\)' >&2 || true
        return 0
    fi
    sed 's/^/    /' "$CM_DIR/compare.out" >&2
    return 1
}

# fs_compare_baseline: runs a fault-free clickmartd over the same topic into the schema
# clickmart_ref (own state dir, socket and consumer group, --exit-at-end) and diffs every
# table of the two schemas; 0 when equal.
# shellcheck disable=SC2120 # extra daemon arguments are optional
fs_compare_baseline() {
    local log=$CM_DIR/daemon.baseline.log pid rc=0
    rm -rf "$CM_DIR/state_ref"
    mkdir -p "$CM_DIR/state_ref"
    "${CM_SETSID[@]}" "$CLICKMART_BIN/clickmartd" --brokers "$CM_BROKER" --topic "$CM_TOPIC" \
        --pg "$CM_PG" --schema clickmart_ref --group clickmartd-fault-free \
        --state-dir "$CM_DIR/state_ref" --status-socket "$CM_DIR/status_ref.sock" \
        --exit-at-end "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    cm_track_pid "$pid"
    local deadline=$((SECONDS + 600))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        cm_stop_pid "$pid" 5
        cm_log "the fault-free run did not finish in 600s"
        return 1
    fi
    wait "$pid" || rc=$?
    cm_untrack_pid "$pid"
    if [ "$rc" != 0 ]; then
        tail -n 20 "$log" >&2
        cm_log "the fault-free run exited with status $rc"
        return 1
    fi
    if "$CM_PY" "$FS_TOOL" tablediff --pg "$CM_PG" --a clickmart --b clickmart_ref \
        >"$CM_DIR/tablediff.out" 2>&1; then
        sed 's/^/    /' "$CM_DIR/tablediff.out" >&2
        return 0
    fi
    sed 's/^/    /' "$CM_DIR/tablediff.out" >&2
    return 1
}

# fs_final_run [ARGS...]: the last run, clickmartd --exit-at-end ARGS; must exit 0.
fs_final_run() {
    cm_daemon_start --exit-at-end "$@"
    if ! cm_daemon_wait 600; then
        fs_fail "clickmartd --exit-at-end still running after 600s"
        cm_daemon_kill9
        return 1
    fi
    if [ "$CM_DAEMON_RC" != 0 ]; then
        fs_fail "clickmartd --exit-at-end exited with status $CM_DAEMON_RC"
        return 1
    fi
}

# fs_tables_now DESCRIPTION: a comparison in the middle of a scenario (dump + compare.py);
# a difference is a failed check and makes the summary say tables_equal=no. Sets
# FS_TABLES_OK to 1 or 0.
fs_tables_now() {
    fs_dump
    if fs_compare_contract; then
        FS_TABLES_OK=1
        cm_log "check ok: $1"
    else
        # shellcheck disable=SC2034 # read by the scenarios
        FS_TABLES_OK=0
        FS_TABLES_BAD=1
        fs_fail "$1"
    fi
}

# fs_tables_check: both comparisons; sets FS_TABLES_EQUAL.
fs_tables_check() {
    local contract=no baseline=skipped
    fs_compare_contract && contract=yes
    if [ "$FAULTS_BASELINE" = 1 ]; then
        baseline=no
        fs_compare_baseline && baseline=yes
    fi
    cm_log "tables: equal to the contract's recompute: $contract; equal to a fault-free run: $baseline"
    if [ "$contract" = yes ] && [ "$baseline" != no ] && [ "${FS_TABLES_BAD:-0}" = 0 ]; then
        FS_TABLES_EQUAL=yes
    else
        FS_TABLES_EQUAL=no
    fi
}

# fs_finish [ARGS...]: waits for the generator, stops the daemon (SIGTERM), dumps the
# topic, runs clickmartd --exit-at-end ARGS, compares the tables, prints the summary
# and exits (0 when the tables are equal and every check passed).
fs_finish() {
    fs_unlock
    fs_gen_wait
    fs_stop_daemon
    fs_dump
    fs_final_run "$@" || true
    fs_tables_check
    fs__summary
    if [ "$FS_TABLES_EQUAL" = yes ] && [ ${#FS_FAILED[@]} -eq 0 ]; then
        exit 0
    fi
    exit 1
}

# fs_log_has REGEX [FILES...]: some daemon log (default: all of them) matches REGEX.
fs_log_has() {
    local rx=$1
    shift
    if [ $# -eq 0 ]; then set -- "$CM_DIR"/daemon.[0-9]*.log; fi
    grep -q -E -- "$rx" "$@" 2>/dev/null
}

# fs_sleep_random MIN_MS MAX_MS
fs_sleep_random() {
    local ms=$(($1 + RANDOM % ($2 - $1 + 1)))
    sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
}
