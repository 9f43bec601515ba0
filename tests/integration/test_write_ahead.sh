#!/usr/bin/env bash
# Parts of a flush written ahead (--flush-ahead-ms) stay invisible until the flush at the
# tick commits them, are lost without harm when the daemon dies, and once committed leave
# the tables equal to the reference.
#
# With a flush interval of an hour, the only commits are the flush at startup (nothing yet)
# and the final one at SIGTERM, while parts are written every 100 ms as events arrive:
#   1. every event applied and parts written, Postgres still shows no session and no
#      partition row; kill -9 then rolls the parts back (still nothing);
#   2. a second start: with checkpoints (the default) the killed run never checkpointed
#      (no flush came), so its batches are applied again from the last checkpoint and,
#      like the events produced after the flush at startup, written ahead (the tables do
#      not change); with --checkpoint-messages 0 every commit was durable and the flush at
#      startup commits the first run's rows. SIGTERM's final flush commits the rest:
#      compare.py must pass. Step 2 runs twice: checkpoints, then none.
#   3. at a steady rate with a flush interval of 1 s, parts may run across the tick: with
#      every statement that inserts sessions slowed by 0.1 s by a trigger, parts run
#      back to back, so ticks find one running (a part and the flush after it, each up to
#      two such statements, stay well under the interval: otherwise the next tick would
#      find that flush still running, a real late start); those flushes start when the
#      part is done (flush.ticks_after_part) and are not late starts (flush.late_starts
#      stays 0, which it did not when parts kept clear of the tick and a slow one ran
#      into it anyway); compare.py must pass after SIGTERM.
#   4. SIGTERM while a part is held in Postgres: the final flush collected during the
#      part is used when the part succeeds and dropped when it fails (details below).
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_write_ahead.sh
# Knobs: CM_EVENTS (default 4000), CM_SEED (23), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-4000}
SEED=${CM_SEED:-23}
TOPIC=clickmart.events
ARGS=(--flush-interval-ms 3600000 --flush-ahead-ms 100)

cm_setup
DUMP=$CM_DIR/topic.dump
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 4 "$TOPIC"

# status_num PATH: a number from /status (e.g. flush.parts_ahead).
status_num() {
    cm_status | "$CM_PY" -c "import json,sys
v=json.load(sys.stdin)
for k in '$1'.split('.'): v=v[k]
print(v)"
}
# Alive and caught up with the dump.
caught_up() {
    cm_daemon_alive || cm_die "clickmartd exited early (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP"
}
# Caught up with the dump, and at least $1 parts written ahead by this run.
parts_written() {
    caught_up || return 1
    [ "$(status_num flush.parts_ahead)" -ge "$1" ]
}
visible() { cm_psql "SELECT (SELECT count(*) FROM clickmart.sessions) || '/' || (SELECT count(*) FROM clickmart.partitions)"; }

# two_runs SEED MODE ARGS...: steps 1 and 2 on a fresh schema and state; MODE is
# "checkpoints" or "durable" (every commit durable).
two_runs() {
    local seed=$1 mode=$2
    shift 2
    cm_gen "$seed" "$EVENTS"
    cm_dump_topic "$CM_TOPIC" "$DUMP"
    cm_daemon_start "${ARGS[@]}" "$@"
    cm_wait_for 120 "clickmartd to consume everything and write parts ahead" parts_written 1 ||
        cm_die "no part written ahead; last /status: $(cm_status 2>&1 | head -c 2000)"
    parts=$(status_num flush.parts_ahead)
    [ "$(status_num flush.flushes)" -le 1 ] || cm_die "a flush committed although the interval is an hour"
    [ "$(visible)" = "$VISIBLE0" ] || cm_die "rows of uncommitted parts are visible: $(visible)"
    cm_log "$mode: $parts parts written ahead, nothing visible; kill -9"
    cm_daemon_kill9
    [ "$(visible)" = "$VISIBLE0" ] || cm_die "rows of a killed daemon's parts are visible: $(visible)"

    cm_daemon_start "${ARGS[@]}" "$@"
    started() {
        cm_daemon_alive || cm_die "clickmartd exited early (see $CM_DAEMON_LOG)"
        [ "$(status_num flush.flushes)" -ge 1 ] 2>/dev/null
    }
    cm_wait_for 60 "the flush at startup" started || cm_die "no flush at startup"
    before=$(visible)
    if [ "$mode" = durable ]; then
        [ "${before%/*}" -gt "${VISIBLE0%/*}" ] ||
            cm_die "durable commits: the flush at startup wrote no sessions: $before"
    else
        # The killed run's batches come back from the checkpoint's offsets: applied
        # again and written ahead, nothing committed.
        [ "$before" = "$VISIBLE0" ] ||
            cm_die "checkpoints: the flush at startup wrote rows the killed run never checkpointed: $before"
    fi
    cm_gen "$((seed + 1))" "$EVENTS"
    cm_dump_topic "$CM_TOPIC" "$DUMP"
    cm_wait_for 120 "clickmartd to consume the new events and write parts ahead" parts_written 1 ||
        cm_die "no part written ahead after the restart; last /status: $(cm_status 2>&1 | head -c 2000)"
    [ "$(visible)" = "$before" ] || cm_die "rows of uncommitted parts are visible: $(visible), was $before"
    [ "$(status_num flush.parts_ahead_failed)" = 0 ] || cm_die "a part failed (see $CM_DAEMON_LOG)"
    cm_daemon_signal TERM
    cm_daemon_wait 30 || cm_die "clickmartd still running 30 s after SIGTERM"
    [ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
    grep -q '"final flush done"' "$CM_DAEMON_LOG" || cm_die "no final flush (see $CM_DAEMON_LOG)"
    [ "$(visible | cut -d/ -f1)" -gt "${VISIBLE0%/*}" ] || cm_die "the final flush wrote no sessions"
    cm_compare "$DUMP" || cm_die "Postgres differs from the reference ($mode)"
    VISIBLE0=$(visible)
}
VISIBLE0=0/0
two_runs "$SEED" checkpoints
two_runs "$((SEED + 50))" durable --checkpoint-messages 0

# 3. Parts across the tick at a steady rate.
cm_psql "CREATE FUNCTION public.cm_test_slow() RETURNS trigger LANGUAGE plpgsql AS
           \$\$BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END\$\$;
         CREATE TRIGGER cm_test_slow AFTER INSERT ON clickmart.sessions
           FOR EACH STATEMENT EXECUTE FUNCTION public.cm_test_slow();"
cm_daemon_start --flush-interval-ms 1000 --flush-ahead-ms 100
cm_wait_for 60 "the flush at startup" started || cm_die "no flush at startup"
# A tick finds a part running about every other time: produce a second's worth at a time
# until one has (2 or 3 of the first 4 did in trials), at most 30 times.
for ((round = 1; round <= 30; round++)); do
    cm_gen "$((SEED + 1 + round))" 1500 --rate 1500
    [ "$(status_num flush.ticks_after_part)" -ge 1 ] && break
done
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_wait_for 60 "clickmartd to consume the steady rounds" caught_up ||
    cm_die "not caught up; last /status: $(cm_status 2>&1 | head -c 2000)"
[ "$(status_num flush.ticks_after_part)" -ge 1 ] ||
    cm_die "in $((round - 1)) rounds no tick found a part running; last /status: $(cm_status 2>&1 | head -c 2000)"
ticks=$(status_num flush.ticks_after_part)
parts=$(status_num flush.parts_ahead)
late=$(status_num flush.late_starts)
[ "$late" = 0 ] || cm_die "$late flushes counted as late starts; $ticks waited for a part"
cm_log "steady: $round round(s), $parts parts, $ticks flushes started when the part their tick found was done, no late start"
cm_psql "DROP TRIGGER cm_test_slow ON clickmart.sessions; DROP FUNCTION public.cm_test_slow();"
cm_daemon_signal TERM
cm_daemon_wait 30 || cm_die "clickmartd still running 30 s after SIGTERM"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference after parts across the tick"

# 4. The stop while a part runs: the final flush is collected during the part. A trigger
#    holds every statement that inserts sessions for 1.5 s; once the daemon has consumed
#    everything and a part sleeps in it, SIGTERM. (a) The part succeeds: the final flush
#    must be the one collected while it ran (its debug line says so) and the tables equal
#    the reference. (b) The first such statement fails after its sleep (a sequence counts
#    the statements outside any transaction): the part is rolled back, so the final flush
#    collected after it must be dropped and the flush written whole; the tables again
#    equal the reference.
cm_psql "CREATE SEQUENCE public.cm_test_calls;
         CREATE TABLE public.cm_test_mode (fail_first boolean NOT NULL);
         INSERT INTO public.cm_test_mode VALUES (false);
         CREATE FUNCTION public.cm_test_hold() RETURNS trigger LANGUAGE plpgsql AS
           \$\$BEGIN
             PERFORM pg_sleep(1.5);
             IF nextval('public.cm_test_calls') = 1 AND (SELECT fail_first FROM public.cm_test_mode) THEN
               RAISE EXCEPTION 'cm_test: the part is refused';
             END IF;
             RETURN NULL;
           END\$\$;"
part_sleeping() {
    caught_up || return 1
    [ "$(cm_psql "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")" -ge 1 ]
}
# stop_during_part SEED FAIL_FIRST: produce, wait for a part held in the trigger, SIGTERM.
stop_during_part() {
    local seed=$1 fail=$2
    cm_psql "ALTER SEQUENCE public.cm_test_calls RESTART; UPDATE public.cm_test_mode SET fail_first = $fail;"
    cm_daemon_start --flush-interval-ms 3600000 --flush-ahead-ms 100 --log-level debug
    cm_wait_for 60 "the flush at startup" started || cm_die "no flush at startup"
    cm_psql "CREATE TRIGGER cm_test_hold AFTER INSERT ON clickmart.sessions
               FOR EACH STATEMENT EXECUTE FUNCTION public.cm_test_hold();"
    cm_gen "$seed" 3000
    cm_dump_topic "$CM_TOPIC" "$DUMP"
    cm_wait_for 60 "a part held in the trigger after consuming everything" part_sleeping ||
        cm_die "no part in Postgres; last /status: $(cm_status 2>&1 | head -c 2000)"
    cm_daemon_signal TERM
    cm_daemon_wait 60 || cm_die "clickmartd still running 60 s after SIGTERM"
    cm_psql "DROP TRIGGER cm_test_hold ON clickmart.sessions;"
    [ "$CM_DAEMON_RC" = 0 ] || cm_die "clickmartd exited with status $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
    grep -q '"final flush done"' "$CM_DAEMON_LOG" || cm_die "no final flush (see $CM_DAEMON_LOG)"
}
stop_during_part "$((SEED + 90))" false
grep 'msg="flushed"' "$CM_DAEMON_LOG" | tail -1 | grep -q 'collected_during_part=1' ||
    cm_die "the final flush was not the one collected while the last part ran (see $CM_DAEMON_LOG)"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference after a final flush collected during a part"
cm_log "stop during a part: the final flush was collected while it ran"
stop_during_part "$((SEED + 91))" true
grep -q 'writing ahead failed' "$CM_DAEMON_LOG" || cm_die "the part did not fail (see $CM_DAEMON_LOG)"
grep 'msg="flushed"' "$CM_DAEMON_LOG" | tail -1 | grep -q 'collected_during_part=0' ||
    cm_die "the final flush collected after a part that failed was used (see $CM_DAEMON_LOG)"
cm_compare "$DUMP" || cm_die "Postgres differs from the reference after the last part failed"
cm_log "stop during a part that fails: the final flush was collected again and written whole"
cm_log "whole test $((SECONDS - CM_T0))s"
echo "1 passed, 0 failed"
