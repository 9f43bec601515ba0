#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# Fault: Postgres outage. While the generator produces, the Postgres server is stopped
# (pg_ctl stop -m fast) for OUTAGE seconds mid-run, and once more while a flush is in
# flight (the flush is held half-way by a lock on clickmart.sessions, then the server
# goes down under it). With a small --max-dirty-rows the daemon must
#   - keep consuming while the unflushed rows stay under the bound, then pause intake
#     ("paused" and "paused_backpressure" in /status, clickmart_paused 1 and
#     clickmart_intake_pauses_total in /metrics) and really stop applying messages;
#   - retry with a doubling back-off capped at --pg-retry-max-ms (checked in its log);
#   - report the outage: /healthz 503 naming Postgres, /status "pg_connected": false,
#     flush.failures > 0 and flush.last_error set, clickmart_postgres_up 0;
#   - converge when Postgres is back: resume intake, catch up, healthy again;
# and in the end every table must equal the contract and a fault-free run.
#
# short: 10 s outage + 5 s outage during a flush, 44 000 events at 2 000/s;
# long: 30 s + 15 s, 200 000 events at 3 000/s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

FS_SEED_DEFAULT=31
EVENTS=$(fs_scale 44000 200000)
RATE=$(fs_scale 2000 3000)
OUTAGE=$(fs_scale 10 30)
FLUSH_OUTAGE=$(fs_scale 5 15)
MAX_DIRTY=$(fs_scale 3000 5000)
RETRY_MAX=$(fs_scale 2000 8000)
DARGS=(--max-dirty-rows "$MAX_DIRTY" --pg-retry-max-ms "$RETRY_MAX" --stats-log-interval-ms 1000 --stats-interval-ms 1000)

fs_begin pg_outage 4
cm_daemon_start "${DARGS[@]}"
fs_daemon_ready 60
fs_gen_start "$EVENTS" "$RATE"
fs_wait_messages 3000 60 || fs_fail "the daemon did not consume 3000 messages in 60s"

# observe_outage SECONDS: polls /status, /healthz and /metrics every 0.5 s while
# Postgres is down and records what they said.
observe_outage() {
    local until=$((SECONDS + $1)) st
    SAW_PG_DOWN=0 SAW_PAUSED=0 SAW_503=0 SAW_LAST_ERROR=0 SAW_METRICS=0
    MAX_FAILURES=0 MAX_DIRTY_SEEN=0 MSGS_FIRST_PAUSE=-1 MSGS_LAST_PAUSE=-1 FIRST_PAUSE_T=-1
    MSGS_STILL=-1
    while ((SECONDS < until)); do
        cm_daemon_alive || { fs_fail "clickmartd exited during the outage (see $CM_DAEMON_LOG)"; return; }
        mapfile -t st < <(fs_st pg_connected paused paused_backpressure flush.failures \
            flush.last_error messages state.dirty_rows)
        if [ "${st[0]}" = false ]; then SAW_PG_DOWN=1; fi
        if [[ "${st[3]}" =~ ^[0-9]+$ ]] && ((st[3] > MAX_FAILURES)); then MAX_FAILURES=${st[3]}; fi
        if [ "${st[4]}" != null ] && [ -n "${st[4]}" ]; then
            [ "$SAW_LAST_ERROR" = 1 ] || cm_log "/status flush.last_error: ${st[4]}"
            SAW_LAST_ERROR=1
        fi
        if [[ "${st[6]}" =~ ^[0-9]+$ ]] && ((st[6] > MAX_DIRTY_SEEN)); then MAX_DIRTY_SEEN=${st[6]}; fi
        if [ "${st[1]}" = true ] && [ "${st[2]}" = true ]; then
            if [ "$SAW_PAUSED" = 0 ]; then
                SAW_PAUSED=1
                FIRST_PAUSE_T=$SECONDS
                MSGS_FIRST_PAUSE=${st[5]}
                cm_log "intake paused after $((SECONDS - OUTAGE_T0))s of outage: ${st[5]} messages, ${st[6]} dirty rows"
            fi
            MSGS_LAST_PAUSE=${st[5]}
            # 2 s into the pause, intake must have stopped for good.
            if ((SECONDS - FIRST_PAUSE_T >= 2)) && [ "$MSGS_STILL" = -1 ]; then MSGS_STILL=${st[5]}; fi
            if [ "$SAW_METRICS" = 0 ]; then
                local m_paused m_pauses m_up
                m_paused=$(fs_metric clickmart_paused)
                m_pauses=$(fs_metric clickmart_intake_pauses_total)
                m_up=$(fs_metric clickmart_postgres_up)
                cm_log "/metrics: clickmart_paused $m_paused, clickmart_intake_pauses_total $m_pauses, clickmart_postgres_up $m_up"
                if [ "$m_paused" = 1 ] && [[ "$m_pauses" =~ ^[0-9]+$ ]] && ((m_pauses >= 1)) && [ "$m_up" = 0 ]; then
                    SAW_METRICS=1
                fi
            fi
        fi
        if [ "$SAW_503" = 0 ]; then
            local h
            h=$(fs_healthz)
            if [[ "$h" == 503* ]] && [[ "${h,,}" == *postgres* ]]; then
                SAW_503=1
                cm_log "/healthz: $h"
            fi
        fi
        sleep 0.5
    done
}

# converged: Postgres reachable again, intake running, healthy.
recovered() {
    [ "$(fs_st pg_connected paused | tr '\n' ' ')" = "true false " ] && [[ "$(fs_healthz)" == 200* ]]
}

# --- outage 1: mid-run ------------------------------------------------------------
MSGS_BEFORE=$(fs_messages)
fs_fault "Postgres stopped for ${OUTAGE}s mid-run (after $MSGS_BEFORE messages)"
OUTAGE_T0=$SECONDS
cm_pg_stop fast
observe_outage "$OUTAGE"
cm_pg_start
T_BACK=$SECONDS
cm_log "outage 1: failures=$MAX_FAILURES, most dirty rows $MAX_DIRTY_SEEN (bound $MAX_DIRTY)," \
    "messages before $MSGS_BEFORE / at the pause $MSGS_FIRST_PAUSE / 2 s later $MSGS_STILL / at the end $MSGS_LAST_PAUSE"
fs_expect "outage 1: /status pg_connected false" [ "$SAW_PG_DOWN" = 1 ]
fs_expect "outage 1: /status flush.failures > 0 and flush.last_error set" \
    [ "$MAX_FAILURES" -gt 0 -a "$SAW_LAST_ERROR" = 1 ]
fs_expect "outage 1: /healthz 503 naming postgres" [ "$SAW_503" = 1 ]
fs_expect "outage 1: intake paused at the bound (/status paused and paused_backpressure)" [ "$SAW_PAUSED" = 1 ]
fs_expect "outage 1: /metrics clickmart_paused 1, clickmart_intake_pauses_total >= 1, clickmart_postgres_up 0" \
    [ "$SAW_METRICS" = 1 ]
fs_expect "outage 1: kept consuming after Postgres went down (messages $MSGS_BEFORE -> $MSGS_FIRST_PAUSE)" \
    [ "$MSGS_FIRST_PAUSE" -gt "$MSGS_BEFORE" ]
fs_expect "outage 1: paused only once the bound was reached (most dirty rows $MAX_DIRTY_SEEN >= $MAX_DIRTY)" \
    [ "$MAX_DIRTY_SEEN" -ge "$MAX_DIRTY" ]
fs_expect "outage 1: no message applied while paused ($MSGS_STILL -> $MSGS_LAST_PAUSE)" \
    [ "$MSGS_STILL" != -1 -a "$MSGS_STILL" = "$MSGS_LAST_PAUSE" ]
fs_expect "outage 1: recovered (pg_connected, intake resumed, /healthz 200) within 30s of Postgres' return" \
    cm_wait_for 30 "recovery" recovered
cm_log "recovered $((SECONDS - T_BACK))s after Postgres came back"

# --- outage 2: during a flush --------------------------------------------------------
in_flight() { [ "$(fs_st flush.in_flight)" = true ]; }
fs_wait_messages "$(($(fs_messages) + 2000))" 30 || true
fs_lock_table sessions 300
if cm_wait_for 20 "a flush blocked on the lock" in_flight; then
    sleep 0.5
    fs_fault "Postgres stopped for ${FLUSH_OUTAGE}s during a flush (held half-way by a lock on clickmart.sessions)"
else
    fs_fail "no flush started while clickmart.sessions was locked"
    fs_fault "Postgres stopped for ${FLUSH_OUTAGE}s (no flush in flight)"
fi
FAIL_BEFORE=$(fs_st flush.failures)
OUTAGE_T0=$SECONDS
cm_pg_stop fast
fs_unlock
observe_outage "$FLUSH_OUTAGE"
cm_pg_start
T_BACK=$SECONDS
fs_expect "outage 2: the flush in flight failed and was counted (failures $FAIL_BEFORE -> $MAX_FAILURES)" \
    [ "$MAX_FAILURES" -gt "$FAIL_BEFORE" ]
fs_expect "outage 2: /status pg_connected false and /healthz 503" [ "$SAW_PG_DOWN" = 1 -a "$SAW_503" = 1 ]
fs_expect "outage 2: recovered within 30s of Postgres' return" cm_wait_for 30 "recovery" recovered
cm_log "recovered $((SECONDS - T_BACK))s after Postgres came back"

# --- back-off, convergence ---------------------------------------------------------------
fs_expect "retries back off: 250 ms doubling up to --pg-retry-max-ms $RETRY_MAX (daemon log)" \
    "$CM_PY" "$FS_TOOL" backoff "$CM_DAEMON_LOG" "$RETRY_MAX"
fs_gen_wait
fs_expect "converged while running: every partition consumed to its end, nothing left to flush" \
    cm_wait_for 120 "the daemon to catch up" fs_caught_up
fs_finish "${DARGS[@]}"
