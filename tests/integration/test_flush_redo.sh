#!/usr/bin/env bash
# A flush that Postgres committed but the state never recorded is sent again after a
# restart, and its new session rows are then already in Postgres: the sink must redo
# that flush with upserts and the tables must still equal the reference.
#
# The crash between the two commits is made deterministic: with every event applied and
# no flush yet (a flush interval of an hour), the daemon is stopped with SIGSTOP and its
# LMDB file copied; after SIGTERM has flushed everything, the copy (rows still marked
# for a flush, new sessions marked new) is put back and the daemon started again. The
# first run checkpoints every transaction (--checkpoint-messages 1), so the copy holds
# every event applied: the state as it is, with checkpoints, between a flush's commit in
# Postgres and the checkpoint that records its cleared marks. Before that, a run whose
# final flush's checkpoint fails (injected) must leave Postgres empty and exit 1.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_flush_redo.sh
# Knobs: CM_EVENTS (default 4000), CM_SEED (17), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-4000}
SEED=${CM_SEED:-17}
TOPIC=clickmart.events

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 "$TOPIC"

cm_gen "$SEED" "$EVENTS"
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"

caught_up() {
    cm_daemon_alive || cm_die "clickmartd exited early (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP"
}

# A flush whose checkpoint fails must not commit. The final flush reads its rows from
# the open checkpoint transaction and Postgres writes them while the loop thread takes
# the checkpoint; the COMMIT waits for it (start_flush, ckpt_gate). Here the first
# checkpoint that holds batches fails (injected): the flush is rolled back, nothing is
# in Postgres, and the daemon exits 1; the next run starts from the state as it was.
CLICKMART_FAULT_CHECKPOINT_FAIL=1 cm_daemon_start --flush-interval-ms 3600000
cm_wait_for 120 "clickmartd to consume every partition" caught_up ||
    cm_die "clickmartd did not catch up; last /status: $(cm_status 2>&1 | head -c 2000)"
sleep 1
cm_daemon_signal TERM
cm_daemon_wait 30 || cm_die "clickmartd still running 30 s after SIGTERM"
[ "$CM_DAEMON_RC" = 1 ] || cm_die "a failed checkpoint: exit status $CM_DAEMON_RC (want 1)"
grep -q 'msg="state checkpoint failed' "$CM_DAEMON_LOG" ||
    cm_die "the injected checkpoint failure was not logged (see $CM_DAEMON_LOG)"
grep -q 'msg="flush rolled back: the checkpoint holding its rows failed"' "$CM_DAEMON_LOG" ||
    cm_die "no flush waited for the failed checkpoint (see $CM_DAEMON_LOG)"
for t in sessions users partitions; do
    n=$(cm_psql "SELECT count(*) FROM clickmart.$t")
    [ "$n" = 0 ] || cm_die "$n rows in $t after a flush whose checkpoint failed (want none)"
done
cm_log "a flush whose checkpoint failed committed nothing"

# The flush at startup finds nothing; the next would come after an hour.
cm_daemon_start --flush-interval-ms 3600000 --checkpoint-messages 1
cm_wait_for 120 "clickmartd to consume every partition" caught_up ||
    cm_die "clickmartd did not catch up; last /status: $(cm_status 2>&1 | head -c 2000)"
# Past the group-commit interval, so the last batch is committed (and checkpointed).
sleep 1
pending=$(cm_status | "$CM_PY" -c "import json,sys; print(json.load(sys.stdin)['state']['dirty_rows'])")
[ "$pending" -gt 0 ] || cm_die "no rows waiting for a flush ($pending)"
[ "$(cm_psql "SELECT count(*) FROM clickmart.sessions")" = 0 ] || cm_die "sessions flushed already"

cm_daemon_signal STOP
mkdir "$CM_DIR/state.copy"
for f in "$CM_DIR"/state/*; do
    [ "$(basename "$f")" = lock.mdb ] || cp -p "$f" "$CM_DIR/state.copy/"
done
cm_daemon_signal CONT
cm_log "state copied with $pending rows waiting; SIGTERM flushes them"

cm_daemon_signal TERM
cm_daemon_wait 30 || cm_die "clickmartd still running 30 s after SIGTERM"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC"
n=$(cm_psql "SELECT count(*) FROM clickmart.sessions")
[ "$n" -gt 0 ] || cm_die "the final flush wrote no sessions"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference after the first run"

rm -rf "$CM_DIR/state"
mv "$CM_DIR/state.copy" "$CM_DIR/state"
cm_daemon_start --exit-at-end
cm_daemon_wait 60 || cm_die "clickmartd --exit-at-end still running after 60 s"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
grep -q 'redone with upserts' "$CM_DAEMON_LOG" ||
    cm_die "the second run did not redo its flush (see $CM_DAEMON_LOG)"
grep -q 'redone with upserts.* ok=1' "$CM_DAEMON_LOG" || cm_die "the redone flush failed"
[ "$(cm_psql "SELECT count(*) FROM clickmart.sessions")" = "$n" ] || cm_die "session count changed"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference after the redone flush"
cm_log "whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
