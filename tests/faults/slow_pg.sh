#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# Fault: slow Postgres. While the generator produces, a psql session holds
#   BEGIN; LOCK TABLE clickmart.sessions IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(N)
# so the daemon's flush transaction blocks half-way for LOCK seconds. With a small
# --max-dirty-rows the daemon must
#   - keep the flush in flight (/status flush.in_flight) and write nothing meanwhile
#     (flush.last_at does not move), while unflushed rows pile up to the bound;
#   - pause intake at the bound (/status paused and paused_backpressure, /metrics
#     clickmart_paused 1 and clickmart_intake_pauses_total >= 1);
#   - keep its event loop responsive: every /status request (curl, a new connection
#     each time, ~20 per second) answers within 100 ms (300 ms for an ASAN/UBSAN
#     build), during the lock and while it catches up afterwards;
#   - converge once the lock is gone;
# and in the end every table must equal the contract and a fault-free run.
#
# short: one 8 s lock, 24 000 events at 2 000/s; long: 30 s on sessions, then 30 s on
# funnel_daily, 240 000 events at 3 000/s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

FS_SEED_DEFAULT=51
EVENTS=$(fs_scale 24000 240000)
RATE=$(fs_scale 2000 3000)
LOCK_SECS=$(fs_scale 8 30)
MAX_DIRTY=$(fs_scale 3000 5000)
# 100 ms for a normal build; a sanitizer build (ASAN/UBSAN, several times slower per
# message) gets 300 ms.
if grep -q -E '^(ASAN|UBSAN):BOOL=ON' "$CLICKMART_BIN/CMakeCache.txt" 2>/dev/null; then
    LIMIT=${FAULTS_STATUS_LIMIT_S:-0.3}
else
    LIMIT=${FAULTS_STATUS_LIMIT_S:-0.1}
fi
DARGS=(--max-dirty-rows "$MAX_DIRTY" --stats-interval-ms 1000)
TABLES=(sessions)
[ "$FAULTS_SCALE" = long ] && TABLES+=(funnel_daily)

fs_begin slow_pg 4
cm_daemon_start "${DARGS[@]}"
fs_daemon_ready 60
fs_gen_start "$EVENTS" "$RATE"
fs_wait_messages 3000 60 || fs_fail "the daemon did not consume 3000 messages in 60s"

# poll_status SECONDS LATENCY_FILE: /status with curl every ~50 ms; each request's
# time_total goes to LATENCY_FILE (a timeout or error as "inf"); counts what it saw.
poll_status() {
    local until=$((SECONDS + $1)) lat=$2 body=$CM_DIR/poll.json t b
    N_SAMPLES=0 N_INFLIGHT=0 SAW_PAUSED=0 LAST_AT_FIRST="" LAST_AT_LAST="" MAX_DIRTY_SEEN=0
    while ((SECONDS < until)); do
        if t=$(curl -s -f --max-time 2 -o "$body" -w '%{time_total}' --unix-socket "$CM_DIR/status.sock" \
            http://localhost/status); then
            echo "$t" >>"$lat"
        else
            echo inf >>"$lat"
            sleep 0.05
            continue
        fi
        b=$(<"$body")
        N_SAMPLES=$((N_SAMPLES + 1))
        if [[ "$b" == *'"in_flight":true'* ]]; then
            N_INFLIGHT=$((N_INFLIGHT + 1))
            [[ "$b" =~ \"last_at\":([0-9]+|null) ]] && {
                [ -n "$LAST_AT_FIRST" ] || LAST_AT_FIRST=${BASH_REMATCH[1]}
                LAST_AT_LAST=${BASH_REMATCH[1]}
            }
        fi
        if [[ "$b" == *'"paused":true'* && "$b" == *'"paused_backpressure":true'* ]]; then
            if [ "$SAW_PAUSED" = 0 ]; then
                SAW_PAUSED=1
                PAUSE_METRICS="$(fs_metric clickmart_paused) $(fs_metric clickmart_intake_pauses_total)"
            fi
        fi
        [[ "$b" =~ \"dirty_rows\":([0-9]+) ]] && ((BASH_REMATCH[1] > MAX_DIRTY_SEEN)) && MAX_DIRTY_SEEN=${BASH_REMATCH[1]}
        sleep 0.04
    done
}

recovered() { [ "$(fs_st paused flush.failures | tr '\n' ' ')" = "false 0 " ]; }

for table in "${TABLES[@]}"; do
    fs_lock_table "$table" $((LOCK_SECS + 120))
    fs_fault "ACCESS EXCLUSIVE lock on clickmart.$table held for ${LOCK_SECS}s"
    PAUSE_METRICS=""
    LAT=$CM_DIR/latency.$table.lock
    poll_status "$LOCK_SECS" "$LAT"
    fs_unlock
    cm_log "during the lock: $N_SAMPLES answers, flush in flight in $N_INFLIGHT, most dirty rows" \
        "$MAX_DIRTY_SEEN (bound $MAX_DIRTY), flush.last_at $LAST_AT_FIRST .. $LAST_AT_LAST, metrics when" \
        "paused (clickmart_paused, clickmart_intake_pauses_total): $PAUSE_METRICS"
    fs_expect "lock on $table: the flush stayed in flight (>= 80% of $N_SAMPLES samples: $N_INFLIGHT)" \
        [ "$N_SAMPLES" -gt 0 -a $((N_INFLIGHT * 100)) -ge $((N_SAMPLES * 80)) ]
    fs_expect "lock on $table: no flush completed while it was held (flush.last_at stayed $LAST_AT_FIRST)" \
        [ -n "$LAST_AT_FIRST" -a "$LAST_AT_FIRST" = "$LAST_AT_LAST" ]
    fs_expect "lock on $table: intake paused at the bound (/status paused, paused_backpressure)" [ "$SAW_PAUSED" = 1 ]
    fs_expect "lock on $table: unflushed rows reached the bound ($MAX_DIRTY_SEEN >= $MAX_DIRTY)" \
        [ "$MAX_DIRTY_SEEN" -ge "$MAX_DIRTY" ]
    read -r m_paused m_pauses <<<"${PAUSE_METRICS:-x x}"
    fs_expect "lock on $table: /metrics clickmart_paused 1, clickmart_intake_pauses_total >= 1 ($PAUSE_METRICS)" \
        [ "$m_paused" = 1 -a "${m_pauses//[^0-9]/}" != "" ] && [ "${m_pauses//[^0-9]/}" -ge 1 ]
    fs_expect "lock on $table: /status always answered within ${LIMIT}s while the flush was blocked: $("$CM_PY" "$FS_TOOL" latency "$LAT" "$LIMIT")" \
        "$CM_PY" "$FS_TOOL" latency "$LAT" "$LIMIT"
    # Right after the lock: the blocked flush commits, intake resumes and the backlog is
    # applied; the loop must stay responsive through that as well.
    LAT2=$CM_DIR/latency.$table.after
    poll_status 4 "$LAT2"
    fs_expect "after the lock on $table: /status within ${LIMIT}s while catching up: $("$CM_PY" "$FS_TOOL" latency "$LAT2" "$LIMIT")" \
        "$CM_PY" "$FS_TOOL" latency "$LAT2" "$LIMIT"
    fs_expect "after the lock on $table: intake resumed, no failed flush, within 30s" \
        cm_wait_for 30 "recovery" recovered
done

fs_gen_wait
fs_expect "converged while running: every partition consumed to its end, nothing left to flush" \
    cm_wait_for 120 "the daemon to catch up" fs_caught_up
fs_finish "${DARGS[@]}"
