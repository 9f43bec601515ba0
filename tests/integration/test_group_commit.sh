#!/usr/bin/env bash
# Group commit: at a steady, low rate the consumer drains many small batches; with the
# default --commit-interval-ms (300) several of them share one LMDB transaction, so
# /metrics shows fewer commits than batches, and with --commit-interval-ms 0 every
# batch is its own commit. Either way the tables must equal the reference, across a
# restart between the two runs. The runs also check that clickmartd's librdkafka
# defaults apply and that -X overrides them. Then runs catch up with a backlog: with
# --txn-messages above --batch-size several batches share a transaction, with it below
# each batch is one (also when every batch comes short, in a run produced at a rate, and
# when --catchup-commit-interval-ms 0 caps the interval while catching up),
# and with --txn-messages-max above --txn-messages the transactions grow while commits
# write much per message (with checkpoints off: with them a commit writes nothing); with
# a small --checkpoint-messages the checkpoints come by that bound, not only at the
# flushes; while catching up, ticks start no flush before --catchup-flush-interval-ms
# has passed; a checkpoint transaction too large for LMDB (injected) is committed and its
# batches applied again; the tables must still equal the reference over all ten runs.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_group_commit.sh
# Knobs: CM_EVENTS (per run, default 6000), CM_RATE (events/s, 2000), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-6000}
RATE=${CM_RATE:-2000}
TOPIC=clickmart.events

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 "$TOPIC"

metric() {
    curl -s -f --max-time 5 --unix-socket "$CM_DIR/status.sock" http://localhost/metrics |
        awk -v m="$1" '$1 == m { print $2 }'
}

# run SEED ARGS...: start clickmartd with ARGS, produce EVENTS at RATE while it runs,
# wait until it has consumed everything, then read its counters into BATCHES/COMMITS
# and stop it with SIGTERM.
run() {
    local seed=$1
    shift
    cm_daemon_start "$@"
    cm_gen "$seed" "$EVENTS" --rate "$RATE"
    cm_dump_topic "$CM_TOPIC" "$DUMP"
    caught_up() {
        cm_daemon_alive || cm_die "clickmartd exited (see $CM_DAEMON_LOG)"
        cm_status_caught_up "$DUMP"
    }
    cm_wait_for 120 "clickmartd to consume every partition to its end" caught_up ||
        cm_die "clickmartd did not catch up; last /status: $(cm_status 2>&1 | head -c 2000)"
    # /status "loop": where the loop thread's time went, all numbers of seconds.
    cm_status | "$CM_PY" -c '
import json, sys
lp = json.load(sys.stdin)["loop"]
for k in ("idle_s", "commit_s", "input_wait_kafka_s", "input_wait_validation_s"):
    v = lp[k]
    assert isinstance(v, (int, float)) and v >= 0, (k, v)
assert lp["commit_s"] > 0, lp  # every batch was committed
assert lp["input_wait_kafka_s"] <= lp["idle_s"] + 1, lp  # waits for input are idle time
' || cm_die "/status loop is wrong: $(cm_status | head -c 2000)"
    BATCHES=$(metric clickmart_batches_applied_total)
    COMMITS=$(metric clickmart_state_commits_total)
    CKPTS=$(metric clickmart_state_checkpoints_total)
    cm_log "batches applied $BATCHES, LMDB commits $COMMITS, checkpoints $CKPTS${*:+ ($*)}"
    cm_daemon_signal TERM
    cm_daemon_wait 30 || cm_die "clickmartd still running 30s after SIGTERM"
    [ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC"
}

DUMP=$CM_DIR/topic.dump
run 31
[ -n "$BATCHES" ] && [ -n "$COMMITS" ] || cm_die "/metrics lacks the batch or commit counter"
[ "$COMMITS" -ge 1 ] || cm_die "no commit counted"
[ "$COMMITS" -lt "$BATCHES" ] ||
    cm_die "group commit gathered nothing: $COMMITS commits for $BATCHES batches"
# Checkpoints (the default): the commits nest in a checkpoint transaction made durable
# before each flush (every 2 s), so there are fewer checkpoints than commits, and at
# least the one before the flush that showed the last offsets.
[ -n "$CKPTS" ] && [ "$CKPTS" -ge 1 ] || cm_die "no checkpoint counted ($CKPTS)"
[ "$CKPTS" -lt "$COMMITS" ] || cm_die "$CKPTS checkpoints for $COMMITS commits (want fewer)"

# The first run used clickmartd's librdkafka defaults: queued.min.messages raised so that
# fetching does not stop for up to a second whenever intake holds (docs/operations.md,
# "Intake and librdkafka's prefetch"). The second overrides it with -X.
grep -q 'msg="kafka consumer settings".*queued.min.messages=1000000 ' "$CM_DAEMON_LOG" ||
    cm_die "run 1 did not use queued.min.messages=1000000: $(grep 'kafka consumer' "$CM_DAEMON_LOG")"

run 32 --commit-interval-ms 0 -X queued.min.messages=20000
[ "$COMMITS" -eq "$BATCHES" ] ||
    cm_die "--commit-interval-ms 0: $COMMITS commits for $BATCHES batches (want one each)"
grep -q 'msg="kafka consumer settings".*queued.min.messages=20000 ' "$CM_DAEMON_LOG" ||
    cm_die "-X queued.min.messages=20000 was not applied: $(grep 'kafka consumer' "$CM_DAEMON_LOG")"

# Catching up: a backlog waits in the topic, so validated batches are ready whenever the
# open transaction finishes one; they join it until it holds --txn-messages messages
# (the interval is set out of the way), so there are several batches per commit. With
# --txn-messages below --batch-size a transaction holds one batch. The stopped line
# counts both.
catch_up() { # SEED ARGS...: a backlog of EVENTS, consumed with --exit-at-end and ARGS
    local seed=$1 t0=$SECONDS
    shift
    cm_gen "$seed" "${CU_EVENTS:-$EVENTS}"
    cm_daemon_start --exit-at-end --batch-size 300 --commit-interval-ms 60000 \
        --catchup-commit-interval-ms 60000 "$@"
    cm_daemon_wait 120 || cm_die "clickmartd did not finish the backlog (see $CM_DAEMON_LOG)"
    CU_SECONDS=$((SECONDS - t0))
    [ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC"
    local line
    line=$(grep 'msg="stopped"' "$CM_DAEMON_LOG") || cm_die "no stopped line in $CM_DAEMON_LOG"
    BATCHES=$(sed -n 's/.* batches=\([0-9]*\).*/\1/p' <<<"$line")
    COMMITS=$(sed -n 's/.* commits=\([0-9]*\).*/\1/p' <<<"$line")
    CKPTS=$(sed -n 's/.* checkpoints=\([0-9]*\).*/\1/p' <<<"$line")
    [ -n "$BATCHES" ] && [ -n "$COMMITS" ] || cm_die "the stopped line lacks batches or commits: $line"
    cm_log "catching up: batches applied $BATCHES, LMDB commits $COMMITS, checkpoints $CKPTS ($*)"
}
# 150 messages more than whole transactions hold: the last transaction is not full, and
# it commits as soon as it reaches the end offsets, not after the 60 s interval.
CU_EVENTS=$((EVENTS + 150)) catch_up 33 --txn-messages 1200
[ "$CU_SECONDS" -lt 40 ] ||
    cm_die "--exit-at-end waited ${CU_SECONDS}s: the last, partial transaction waited for the interval"
[ "$BATCHES" -ge 8 ] || cm_die "catching up: only $BATCHES batches of at most 300 for $EVENTS events"
[ "$((COMMITS * 2))" -le "$BATCHES" ] ||
    cm_die "--txn-messages 1200: $COMMITS commits for $BATCHES batches (want several batches each)"
catch_up 34 --txn-messages 1 --txn-messages-max 1
[ "$COMMITS" -eq "$BATCHES" ] ||
    cm_die "--txn-messages 1: $COMMITS commits for $BATCHES batches (want one each)"
# While catching up, --catchup-commit-interval-ms caps --commit-interval-ms: at 0 every
# batch commits as soon as it is applied, whatever --txn-messages allows.
catch_up 39 --txn-messages 1200 --catchup-commit-interval-ms 0
[ "$BATCHES" -ge 8 ] || cm_die "catching up: only $BATCHES batches of at most 300 for $EVENTS events"
[ "$COMMITS" -eq "$BATCHES" ] ||
    cm_die "--catchup-commit-interval-ms 0: $COMMITS commits for $BATCHES batches (want one each)"
grep -q 'msg="transactions grow' "$CM_DAEMON_LOG" &&
    cm_die "--txn-messages-max 1: transactions grew"
# Produced at 2 000 events/s, every batch comes short of --batch-size 100000; with
# --txn-messages below --batch-size each is still a transaction of its own, however
# long the interval (the short ones joined the next batches before, and run 34 failed
# about one time in eight on such a batch).
run 36 --batch-size 100000 --txn-messages 1 --commit-interval-ms 1000
[ "$BATCHES" -ge 2 ] || cm_die "--batch-size 100000: only $BATCHES batches, nothing to tell"
[ "$COMMITS" -eq "$BATCHES" ] ||
    cm_die "short batches, --txn-messages 1: $COMMITS commits for $BATCHES batches (want one each)"

# Transactions that grow with the state (--txn-messages-max): batches of 50 messages, one
# per transaction at first. A commit rewrites at least the pages its users and
# sessions sit on plus LMDB's own, tens of kilobytes, far above 600 bytes for each of
# 50 messages, so while the backlog lasts the transactions double (logged) up to 800
# messages, and commits become fewer than batches. The interval is back at its default:
# the last transaction, not full, commits when no batch is left to join it. Only without
# checkpoints: with them a commit writes nothing, and the checkpoints gather the pages.
catch_up 35 --batch-size 50 --txn-messages 50 --txn-messages-max 800 --commit-interval-ms 100 \
    --checkpoint-messages 0
GROWS=$(grep -c 'msg="transactions grow' "$CM_DAEMON_LOG" || true)
[ "$GROWS" -ge 1 ] || cm_die "--txn-messages-max 800: the transactions never grew"
grep -q 'msg="transactions grow.* messages=800 ' "$CM_DAEMON_LOG" ||
    cm_die "--txn-messages-max 800: never reached 800: $(grep 'transactions' "$CM_DAEMON_LOG")"
BAD=$(grep 'msg="transactions grow' "$CM_DAEMON_LOG" | grep -v ' messages=\(100\|200\|400\|800\) ' || true)
[ -z "$BAD" ] || cm_die "growth is not by doubling up to the maximum: $BAD"
[ "$((COMMITS * 3))" -le "$BATCHES" ] ||
    cm_die "--txn-messages-max 800: $COMMITS commits for $BATCHES batches (want the transactions to grow)"
[ "$CKPTS" = 0 ] || cm_die "--checkpoint-messages 0: $CKPTS checkpoints"
catch_up 37 --batch-size 50 --txn-messages 50 --txn-messages-max 800 --commit-interval-ms 100
grep -q 'msg="transactions grow' "$CM_DAEMON_LOG" && cm_die "with checkpoints, transactions grew"

# Checkpoints by the bound: a flush interval of an hour leaves the flush at startup and
# the final one, so the checkpoints between come from --checkpoint-messages 1200 after
# every second transaction of 600 messages.
catch_up 38 --txn-messages 600 --checkpoint-messages 1200 --flush-interval-ms 3600000
[ "$COMMITS" -ge 6 ] || cm_die "--txn-messages 600: only $COMMITS commits, nothing to tell"
[ "$((CKPTS * 2))" -ge "$((COMMITS - 1))" ] && [ "$((CKPTS * 2))" -le "$((COMMITS + 6))" ] ||
    cm_die "--checkpoint-messages 1200: $CKPTS checkpoints for $COMMITS commits of 600 (want about half)"

# Flushes while catching up (--catchup-flush-interval-ms): ticks every 50 ms, batches of
# 20 messages. With --exit-at-end intake is behind until the end offsets, so the ticks
# start no flush until the catch-up interval (a minute) has passed: only the flush at
# startup, the first tick's and the final one. (By the pace alone, CI once saw a fourth:
# a tick 0.8-1 interval from the end, unit test test_tick_behind.) With it off, the
# ticks flush all along.
flushes_and_ticks() {
    FLUSHES=$(grep -c 'msg="flushed"' "$CM_DAEMON_LOG" || true)
    BEHIND=$(grep -c 'msg="tick left to a later flush: intake is behind"' "$CM_DAEMON_LOG" || true)
    cm_log "flushes $FLUSHES, ticks left while behind $BEHIND"
}
CU_EVENTS=$((EVENTS * 5)) catch_up 39 --batch-size 20 --txn-messages 20 --flush-interval-ms 50 \
    --catchup-flush-interval-ms 60000 --log-level debug
flushes_and_ticks
[ "$BEHIND" -ge 2 ] || cm_die "--catchup-flush-interval-ms 60000: $BEHIND ticks left while behind (want 2 or more)"
[ "$FLUSHES" -le 3 ] || cm_die "--catchup-flush-interval-ms 60000: $FLUSHES flushes (want at most 3)"
FLUSHES_LONG=$FLUSHES
CU_EVENTS=$((EVENTS * 5)) catch_up 40 --batch-size 20 --txn-messages 20 --flush-interval-ms 50 \
    --catchup-flush-interval-ms 0 --log-level debug
flushes_and_ticks
[ "$BEHIND" = 0 ] || cm_die "--catchup-flush-interval-ms 0: $BEHIND ticks left while behind"
[ "$FLUSHES" -gt "$FLUSHES_LONG" ] ||
    cm_die "--catchup-flush-interval-ms 0: $FLUSHES flushes, not more than $FLUSHES_LONG with it on"

# A checkpoint transaction too large for LMDB (MDB_TXN_FULL: about 131 000 dirty pages,
# far beyond this test's state): CLICKMART_FAULT_TXN_FULL_PUTS makes the store fail a
# put in a nested transaction once its checkpoint holds that many. The transaction is
# rolled back, intake pauses until the checkpoint is committed, the checkpoint limit
# halves, and the batches are applied again; the tables must still equal the reference.
# Checkpoints come only by the bound here (no tick for an hour, --checkpoint-messages at
# its default of 640 000), so without the fault there would be none but the final one.
CLICKMART_FAULT_TXN_FULL_PUTS=4000 catch_up 41 --txn-messages 300 --flush-interval-ms 3600000
grep -q 'msg="fault injection' "$CM_DAEMON_LOG" || cm_die "the fault was not injected"
FULL=$(grep -c 'msg="state checkpoint transaction full' "$CM_DAEMON_LOG" || true)
RESUMED=$(grep -c 'msg="intake resumed after a checkpoint"' "$CM_DAEMON_LOG" || true)
cm_log "transaction full $FULL times, resumed $RESUMED times, checkpoints $CKPTS"
[ "$FULL" -ge 1 ] || cm_die "the checkpoint transaction never became full"
[ "$RESUMED" -ge 1 ] || cm_die "intake never resumed after a full checkpoint transaction"
[ "$CKPTS" -ge 2 ] || cm_die "$CKPTS checkpoints after a full checkpoint transaction (want 2 or more)"

cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference"
cm_log "whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
