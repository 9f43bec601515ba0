#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# Fault: restarts that change what the daemon finds.
#
# (a) Wiped state dir in front of populated tables. Documented behaviour: clickmartd
#     refuses to start (non-zero exit, "the state directory is empty but the tables
#     already hold this topic ... refusing to start", tables untouched), also when a
#     consumer group without offsets lets the check run beside intake; with
#     --allow-state-rebuild it empties the tables and rebuilds from the earliest
#     offsets, and the tables must equal the contract again.
# (a2) The same rebuild, killed with SIGKILL the moment it has emptied the tables (before
#     anything is re-applied), then started again the same way: the tables must still
#     end up equal to the contract.
# (b) The topic recreated with fewer partitions (a new dev broker with 2 instead of 4,
#     the same topic name, new data) in front of the old state. Documented behaviour:
#     refuse to start ("the state knows a partition the topic no longer has"), tables
#     untouched. The documented way out - wipe the state dir and rebuild with
#     --allow-state-rebuild - must then give tables equal to the contract for the new topic.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

FS_SEED_DEFAULT=71
EVENTS=$(fs_scale 12000 100000)
EVENTS_NEW=$(fs_scale 6000 40000)

fs_begin restart_changes 4

wipe_state() {
    rm -rf "$CM_DIR/state"
    mkdir -p "$CM_DIR/state"
}
rows() { cm_psql "SELECT (SELECT count(*) FROM clickmart.sessions) || '/' || (SELECT count(*) FROM clickmart.users) || '/' || (SELECT coalesce(sum(next_offset), 0) FROM clickmart.partitions)"; }
# run_exit_at_end DESC ARGS...: clickmartd --exit-at-end ARGS must exit 0 within
# RUN_TIMEOUT seconds (default 300).
run_exit_at_end() {
    local desc=$1
    shift
    cm_daemon_start --exit-at-end "$@"
    if ! cm_daemon_wait "${RUN_TIMEOUT:-300}"; then
        fs_fail "$desc: still running after ${RUN_TIMEOUT:-300}s ($(fs_st lag messages | tr '\n' ' ' | sed 's/^\([^ ]*\) \([^ ]*\) $/lag \1, messages \2/'))"
        cm_daemon_kill9
        return 1
    fi
    [ "$CM_DAEMON_RC" = 0 ] || { fs_fail "$desc: exit status $CM_DAEMON_RC"; return 1; }
}
# expect_refusal DESC LOG_REGEX ARGS...: clickmartd ARGS must exit non-zero within 60 s,
# log LOG_REGEX, and leave the tables as they were.
expect_refusal() {
    local desc=$1 rx=$2 before after
    shift 2
    before=$(rows)
    cm_daemon_start "$@"
    if ! cm_daemon_wait 60; then
        fs_fail "$desc: still running after 60s instead of refusing to start"
        cm_daemon_kill9
        return 0
    fi
    after=$(rows)
    cm_log "$desc: exit status $CM_DAEMON_RC; $(grep -m1 'level=error' "$CM_DAEMON_LOG" | cut -c1-400)"
    fs_expect "$desc: refused to start (non-zero exit: $CM_DAEMON_RC)" [ "$CM_DAEMON_RC" != 0 ]
    fs_expect "$desc: logged the reason" fs_log_has "$rx" "$CM_DAEMON_LOG"
    fs_expect "$desc: tables untouched (sessions/users/sum of next offsets $before -> $after)" [ "$before" = "$after" ]
}

# run_follow DESC ARGS...: a long-running clickmartd (it commits the consumer group's
# offsets after its flushes, as a production daemon does) until it has consumed
# everything and flushed, then SIGTERM.
run_follow() {
    local desc=$1
    shift
    cm_daemon_start "$@"
    fs_daemon_ready 60
    fs_expect "$desc: caught up" cm_wait_for 120 "the daemon to catch up" fs_caught_up
    fs_stop_daemon
}

fs_gen_start "$EVENTS" 0
fs_gen_wait
run_follow "first run" --stats-interval-ms 1000
cm_log "tables after the first run (sessions/users/sum of next offsets): $(rows)"

# --- (a) wiped state dir --------------------------------------------------------------------
wipe_state
fs_fault "state dir wiped (tables populated)"
expect_refusal "wiped state" 'the state directory is empty but the tables already hold this topic.*refusing to start'
# A consumer group without committed offsets starts from the earliest offsets whatever the
# tables hold, so the check of the tables runs beside intake; the refusal must still apply
# and flush nothing (the rebuild below starts from this state dir).
expect_refusal "wiped state, a consumer group without offsets" 'the state directory is empty but the tables already hold this topic.*refusing to start' --group clickmartd-no-offsets --log-level debug
fs_expect "the check of the tables ran beside intake" fs_log_has 'pg_check="beside intake"' "$CM_DAEMON_LOG"
run_exit_at_end "rebuild with --allow-state-rebuild" --allow-state-rebuild
fs_expect "rebuild logged" fs_log_has 'state rebuild: tables emptied' "$CM_DAEMON_LOG"
fs_tables_now "(a) after the rebuild the tables equal the contract"
run_follow "(a) a normal restart after the rebuild" --stats-interval-ms 1000

# --- (a2) rebuild killed right after emptying the tables ---------------------------------------
wipe_state
# The watcher is up before the daemon starts, so that the SIGKILL follows the log line
# within milliseconds, before the rebuild has applied anything.
NEXT_LOG=$CM_DIR/daemon.$((CM_DAEMON_RUNS + 1)).log
rm -f "$CM_DIR/rebuild.pid"
"$CM_PY" "$FS_TOOL" watch-log "$NEXT_LOG" 'state rebuild: tables emptied' 60 --kill "$CM_DIR/rebuild.pid" >&2 &
WATCH_PID=$!
sleep 0.3
cm_daemon_start --exit-at-end --allow-state-rebuild
echo "$CM_DAEMON_PID" >"$CM_DIR/rebuild.pid.tmp"
mv "$CM_DIR/rebuild.pid.tmp" "$CM_DIR/rebuild.pid"
if wait "$WATCH_PID"; then
    fs_fault "state dir wiped, then the rebuild killed with SIGKILL right after emptying the tables"
else
    fs_fail "(a2) the rebuild did not log 'state rebuild: tables emptied'"
fi
cm_daemon_kill9
cm_log "(a2) after the kill: tables (sessions/users/sum of next offsets) $(rows), state dir $(du -sk "$CM_DIR/state" | cut -f1) KiB"
A2_OK=1
RUN_TIMEOUT=$(fs_scale 20 120) run_exit_at_end "(a2) rebuild started again" --allow-state-rebuild || A2_OK=0
cm_log "(a2) $(grep -m4 'assign partition' "$CM_DAEMON_LOG" | sed 's/.*partition=/partition=/' | tr '\n' ' ')"
fs_tables_now "(a2) after the interrupted rebuild and a restart the tables equal the contract"
if [ "$A2_OK" = 0 ] || [ "$FS_TABLES_OK" = 0 ]; then
    # Get a usable state back for (b): a consumer group without committed offsets makes
    # the empty state start from the earliest offsets again.
    wipe_state
    run_exit_at_end "(a2) recovery with a fresh consumer group" --allow-state-rebuild --group clickmartd-recovered || true
fi

# --- (b) fewer partitions -----------------------------------------------------------------------
FS_MESSAGES_BASE=$FS_MESSAGES
cm_broker_stop
cm_broker_start 2 clickmart.events
FAULTS_SEED=$((${FAULTS_SEED:-$FS_SEED_DEFAULT} + 1000)) fs_gen_start "$EVENTS_NEW" 0
fs_gen_wait
fs_fault "topic recreated with 2 partitions instead of 4 (new broker, new data), old state kept"
expect_refusal "fewer partitions" 'the state knows a partition the topic no longer has' --exit-at-end
# The documented way out: a new state dir, rebuilt from the earliest offsets.
wipe_state
run_exit_at_end "(b) rebuild for the recreated topic" --allow-state-rebuild --log-level debug
fs_expect "(b) the check of the tables ran beside intake (a new broker: no group offsets)" fs_log_has 'pg_check="beside intake"' "$CM_DAEMON_LOG"
fs_tables_now "(b) after the rebuild the tables equal the contract for the recreated topic"

fs_finish
