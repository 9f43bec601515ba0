#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions here are called indirectly (cm_wait_for, fs_expect)
# Fault: broker outage. clickmart-devbroker takes its brokers down (SIGUSR1: connections
# dropped, new ones refused) and up again (SIGUSR2):
#   1. mid-run, while the generator produces (its idempotent producer queues and
#      re-sends; the topic ends up with every message once);
#   2. during start-up / partition assignment: the daemon is started while the brokers
#      are down, and they come back a few seconds later;
#   3. on an idle topic (everything consumed), to check that the daemon reports the
#      brokers as back without needing new traffic.
# The daemon must report the outage (/healthz 503 naming Kafka, "broker_up": false),
# reconnect on its own, consume what was produced meanwhile, report healthy again,
# and in the end every table must equal the contract and a fault-free run.
#
# short: 4 s outages, 40 000 events at 2 000/s (still producing during the second); long: 20 s outages, 150 000 at 3 000/s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

FS_SEED_DEFAULT=41
EVENTS=$(fs_scale 40000 150000)
RATE=$(fs_scale 2000 3000)
OUTAGE=$(fs_scale 8 20) # long enough for a sanitizer build to notice on an idle topic
DARGS=(--stats-interval-ms 1000)

fs_begin broker_outage 4

brokers_down() { kill -USR1 "$CM_BROKER_PID"; }
brokers_up() { kill -USR2 "$CM_BROKER_PID"; }

# observe SECONDS: what /status and /healthz say while the brokers are down.
observe() {
    local until=$((SECONDS + $1)) h
    SAW_DOWN=0 SAW_503=0
    while ((SECONDS < until)); do
        cm_daemon_alive || { fs_fail "clickmartd exited during the broker outage (see $CM_DAEMON_LOG)"; return; }
        [ "$(fs_st broker_up)" = false ] && SAW_DOWN=1
        if [ "$SAW_503" = 0 ]; then
            h=$(fs_healthz)
            if [[ "$h" == 503* ]] && [[ "${h,,}" == *kafka* || "${h,,}" == *broker* ]]; then
                SAW_503=1
                cm_log "/healthz: $h"
            fi
        fi
        sleep 0.5
    done
}
healthy() { [[ "$(fs_healthz)" == 200* ]] && [ "$(fs_st broker_up)" = true ]; }

cm_daemon_start "${DARGS[@]}"
fs_daemon_ready 60
fs_gen_start "$EVENTS" "$RATE"
fs_wait_messages 3000 60 || fs_fail "the daemon did not consume 3000 messages in 60s"

# --- 1: mid-run -----------------------------------------------------------------------
M0=$(fs_messages)
fs_fault "brokers down for ${OUTAGE}s mid-run (after $M0 messages)"
brokers_down
observe "$OUTAGE"
M1=$(fs_messages)
brokers_up
cm_log "brokers up again; messages $M0 before, $M1 at the end of the outage"
fs_expect "outage 1: /status broker_up false" [ "$SAW_DOWN" = 1 ]
fs_expect "outage 1: /healthz 503 naming Kafka" [ "$SAW_503" = 1 ]
fs_expect "outage 1: consuming again within 30s of the brokers' return" fs_wait_messages $((M1 + 1000)) 30
fs_expect "outage 1: healthy again (/healthz 200, broker_up) within 30s" cm_wait_for 30 "health" healthy

# --- 2: during start-up / partition assignment ------------------------------------------
# After an outage librdkafka's group-coordinator connection can hang for 30 s and more;
# its teardown would wait for it, the daemon must not (--kafka-close-timeout-ms, 5 s).
fs_stop_daemon
fs_expect "outage 1: stopped within 20s of SIGTERM after the outage (took ${FS_STOP_SECS}s)" \
    [ "$FS_STOP_SECS" -ge 0 -a "$FS_STOP_SECS" -le 20 ]
brokers_down
fs_fault "brokers down during start-up and partition assignment (up again after 3s)"
cm_daemon_start "${DARGS[@]}"
sleep 3
cm_daemon_alive || fs_fail "clickmartd exited while the brokers were down at start-up (see $CM_DAEMON_LOG)"
brokers_up
fs_daemon_ready 60
fs_expect "outage 2: consumed everything after a start-up without brokers" \
    cm_wait_for 60 "the daemon to catch up" fs_caught_up
cm_log "outage 2: $(fs_messages) messages consumed by this run"
fs_expect "outage 2: healthy within 15s" cm_wait_for 15 "health" healthy

# --- 3: idle topic ------------------------------------------------------------------------
fs_gen_wait
fs_expect "caught up before the idle outage" cm_wait_for 120 "the daemon to catch up" fs_caught_up
fs_fault "brokers down for ${OUTAGE}s on an idle topic"
brokers_down
observe "$OUTAGE"
brokers_up
fs_expect "outage 3 (idle): /healthz 503 naming Kafka during the outage" [ "$SAW_503" = 1 ]
fs_expect "outage 3 (idle): healthy again (/healthz 200, broker_up) within 10s, without new messages" \
    cm_wait_for 10 "health after the idle outage" healthy
# New traffic after the idle outage must be consumed (and bring the health back).
M3=$(fs_messages)
FAULTS_SEED=$((${FAULTS_SEED:-$FS_SEED_DEFAULT} + 1000)) fs_gen_start 500 0 --days 1
fs_gen_wait
fs_expect "outage 3 (idle): new messages consumed after the outage" fs_wait_messages $((M3 + 400)) 30
fs_expect "outage 3 (idle): healthy once new messages flow" cm_wait_for 15 "health" healthy

fs_stop_daemon
fs_expect "outage 3: stopped within 20s of SIGTERM after the outages (took ${FS_STOP_SECS}s)" \
    [ "$FS_STOP_SECS" -ge 0 -a "$FS_STOP_SECS" -le 20 ]
fs_finish "${DARGS[@]}"
