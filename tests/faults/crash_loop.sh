#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# Fault: crash loop. clickmartd is killed with SIGKILL again and again while the generator
# produces (duplicates, late events, bad messages), and restarted on the same state each
# time. The kills land
#   - during the partition assignment: within ~5-120 ms of the start, before the
#     status socket is up (metadata, committed offsets, rd_kafka_assign);
#   - during a flush: a poller on the status socket sends SIGKILL the moment /status
#     shows a flush in flight;
#   - during a flush held open by Postgres: an ACCESS EXCLUSIVE lock on
#     clickmart.sessions blocks the flush transaction half-way, then SIGKILL;
#   - at random moments (200-1500 ms after the start).
# Then the daemon must finish with --exit-at-end and every table must equal the contract
# and a fault-free run.
#
# short: 20 kills over ~20-30 s, 24 000 events; long: 60 kills, 150 000 events.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

FS_SEED_DEFAULT=21
EVENTS=$(fs_scale 24000 150000)
RATE=$(fs_scale 1600 2500)
KILLS=$(fs_scale 20 60)
# Flushing often gives more flushes to land in.
DARGS=(--flush-interval-ms 200)

fs_begin crash_loop 4

# The kinds of kill, in a shuffled order (deterministic per seed); the lock-held flush
# comes in the middle, while the generator is still producing.
RANDOM=${FAULTS_SEED:-$FS_SEED_DEFAULT}
n_assign=$((KILLS / 5)) n_flush=$((KILLS / 5)) n_lock=$(fs_scale 1 3)
KINDS=()
for ((i = 0; i < n_assign; i++)); do KINDS+=(assign); done
for ((i = 0; i < n_flush; i++)); do KINDS+=(flush); done
while [ ${#KINDS[@]} -lt $((KILLS - n_lock)) ]; do KINDS+=(random); done
for ((i = ${#KINDS[@]} - 1; i > 0; i--)); do
    j=$((RANDOM % (i + 1)))
    t=${KINDS[i]}
    KINDS[i]=${KINDS[j]}
    KINDS[j]=$t
done
for ((i = 0; i < n_lock; i++)); do
    pos=$(((i + 1) * ${#KINDS[@]} / (n_lock + 1)))
    KINDS=("${KINDS[@]:0:pos}" lockflush "${KINDS[@]:pos}")
done

declare -A KILLED=([assign]=0 [flush]=0 [flush_missed]=0 [lockflush]=0 [random]=0)

# The daemon must still be running when we come to kill it: an exit of its own is a bug.
kill_now() {
    if ! cm_daemon_alive; then
        cm_daemon_wait 1 || true
        fs_fail "clickmartd exited on its own with status $CM_DAEMON_RC before kill $1 (run $CM_DAEMON_RUNS, see $CM_DAEMON_LOG)"
        return 0
    fi
    cm_daemon_kill9
}

in_flight() { [ "$(fs_st flush.in_flight)" = true ]; }

t_loop=$SECONDS
for ((k = 1; k <= ${#KINDS[@]}; k++)); do
    kind=${KINDS[k - 1]}
    cm_daemon_start "${DARGS[@]}"
    [ "$k" = 1 ] && fs_gen_start "$EVENTS" "$RATE"
    case $kind in
    assign)
        fs_sleep_random 5 120
        fs_fault "kill -9 during start-up / partition assignment (kill $k)"
        kill_now "$k"
        ;;
    flush)
        fs_daemon_ready 60
        # The poller sends the SIGKILL itself, the moment it sees the flush.
        if "$CM_PY" "$FS_TOOL" kill-when-flushing "$CM_DIR/status.sock" "$CM_DAEMON_PID" 5 >&2; then
            fs_fault "kill -9 during a flush (kill $k)"
            cm_daemon_kill9 2>/dev/null
        else
            KILLED[flush_missed]=$((KILLED[flush_missed] + 1))
            fs_fault "kill -9 at a random moment: no flush caught in 5 s (kill $k)"
            kill_now "$k"
        fi
        ;;
    lockflush)
        fs_daemon_ready 60
        fs_lock_table sessions 60
        if cm_wait_for 20 "a flush blocked on the lock" in_flight; then
            sleep 0.5
            fs_fault "kill -9 during a flush blocked half-way by a lock on clickmart.sessions (kill $k)"
        else
            fs_fail "no flush started while clickmart.sessions was locked"
            fs_fault "kill -9 with clickmart.sessions locked (kill $k)"
        fi
        kill_now "$k"
        fs_unlock
        ;;
    random)
        fs_sleep_random 200 1500
        fs_fault "kill -9 at a random moment (kill $k)"
        kill_now "$k"
        ;;
    esac
    KILLED[$kind]=$((KILLED[$kind] + 1))
done
cm_log "crash loop: ${#KINDS[@]} kills in $((SECONDS - t_loop))s: ${KILLED[assign]} during assignment," \
    "$((KILLED[flush] - KILLED[flush_missed])) during a flush (+${KILLED[flush_missed]} missed, random instead)," \
    "${KILLED[lockflush]} during a lock-held flush, ${KILLED[random]} random;" \
    "generator $(fs_gen_running && echo 'still running' || echo finished)"
[ "$FS_FAULTS" -ge "$KILLS" ] || fs_fail "only $FS_FAULTS kills"
# Every start was counted as a run: at least one per kill.
[ "$CM_DAEMON_RUNS" -ge "$KILLS" ] || fs_fail "only $CM_DAEMON_RUNS daemon starts"

fs_finish "${DARGS[@]}"
