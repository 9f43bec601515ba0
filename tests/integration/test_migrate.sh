#!/usr/bin/env bash
# A migration that Postgres refuses: with an empty state clickmartd stops at once with
# Postgres' message, and the next start after the cause is gone migrates and consumes;
# with a state, the flushes fail with the message and are retried until the cause is
# gone, while intake goes on.
#
# The refusal is the one docs/operations.md describes for migration 6: an analyst's view
# on a column whose collation the migration changes. The schema is made to look as an
# older daemon left it: a first run creates it (version 6), then version 6 is taken out
# of schema_version and the view is created. Before the fix, a daemon with an empty state
# took such a failure for an unreachable Postgres: it retried for 30 s and then logged
# "Postgres unreachable" without the reason. Last, a malformed --pg: exit 2 at once.
#
# Needs CLICKMART_BIN (the build dir); run alone with
#   CLICKMART_BIN=build bash tests/integration/test_migrate.sh
# Knobs: CM_EVENTS (default 2000), CM_SEED (5), CM_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

EVENTS=${CM_EVENTS:-2000}
SEED=${CM_SEED:-5}

cm_setup
cm_require clickmartd tools/clickmart-gen tools/clickmart-devbroker
cm_pg_start
cm_broker_start 2 clickmart.events

# An empty topic: the first run only creates the schema.
cm_daemon_start --exit-at-end
cm_daemon_wait 60 || cm_die "clickmartd did not exit on an empty topic"
[ "$CM_DAEMON_RC" = 0 ] || cm_die "first run exited with $CM_DAEMON_RC (see $CM_DAEMON_LOG)"
[ "$(cm_psql "SELECT max(version) FROM clickmart.schema_version")" = 6 ] ||
    cm_die "the first run did not reach schema version 6"

cm_psql "DELETE FROM clickmart.schema_version WHERE version = 6"
cm_psql "CREATE VIEW clickmart.my_users AS SELECT user_id, revenue FROM clickmart.users"
rm -rf "$CM_DIR/state"
cm_gen "$SEED" "$EVENTS"
DUMP=$CM_DIR/topic.dump
cm_dump_topic "$CM_TOPIC" "$DUMP"

t0=$SECONDS
cm_daemon_start --exit-at-end
if cm_daemon_wait 20; then
    cm_ok "clickmartd stopped after $((SECONDS - t0)) s"
else
    cm_bad "clickmartd still running 20 s after a refused migration"
    cm_daemon_signal KILL || true
    cm_daemon_wait 10 || true
fi
[ "$CM_DAEMON_RC" = 1 ] && cm_ok "exit status 1" || cm_bad "exit status $CM_DAEMON_RC, not 1"
if grep -q 'cannot migrate the schema' "$CM_DAEMON_LOG" &&
    grep 'cannot migrate the schema' "$CM_DAEMON_LOG" | grep -q 'migration 6.*my_users'; then
    cm_ok "the log names the migration and the view"
else
    cm_bad "no 'cannot migrate the schema' line naming migration 6 and my_users:"
    tail -n 5 "$CM_DAEMON_LOG" >&2
fi
if grep -q 'Postgres unreachable' "$CM_DAEMON_LOG"; then
    cm_bad "a refused migration was reported as an unreachable Postgres"
else
    cm_ok "not reported as an unreachable Postgres"
fi
[ "$(cm_psql "SELECT max(version) FROM clickmart.schema_version")" = 5 ] &&
    cm_ok "the schema stayed at version 5" || cm_bad "the schema version moved"
[ "$(cm_psql "SELECT count(*) FROM clickmart.users")" = 0 ] &&
    cm_ok "nothing was flushed" || cm_bad "rows were flushed without the migration"

# With the view gone the same start migrates and consumes, even behind a query that
# holds a lock on a table for 13 s: the migration gives up its lock wait after 10 s
# (lock_timeout) instead of queueing every query behind it, and is tried again.
cm_psql "DROP VIEW clickmart.my_users"
psql -X -q -d "$CM_PG" -c "BEGIN; LOCK TABLE clickmart.users IN ACCESS SHARE MODE;
    SELECT pg_sleep(13); COMMIT;" >"$CM_DIR/locker.log" 2>&1 &
LOCKER=$!
cm_wait_for 10 "the lock to be held" \
    bash -c "[ \"\$(psql -X -A -t -d '$CM_PG' -c \"SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'users' AND l.mode = 'AccessShareLock' AND l.granted AND l.pid <> pg_backend_pid()\")\" = 1 ]" ||
    cm_die "the locking session did not take its lock"
cm_daemon_start --exit-at-end
cm_daemon_wait 120 || cm_die "clickmartd did not finish"
wait "$LOCKER" || cm_die "the locking session failed (see $CM_DIR/locker.log)"
[ "$CM_DAEMON_RC" = 0 ] && cm_ok "second start exited 0" || cm_bad "second start exited $CM_DAEMON_RC"
grep -q 'waiting for Postgres.*lock timeout' "$CM_DAEMON_LOG" &&
    cm_ok "the migration's lock wait timed out and was tried again" ||
    cm_bad "no lock timeout logged while the table was locked"
[ "$(cm_psql "SELECT string_agg(version::text, ',' ORDER BY version) FROM clickmart.schema_version")" = 1,2,3,4,5,6 ] &&
    cm_ok "schema version 6 applied" || cm_bad "schema versions: $(cm_psql "SELECT string_agg(version::text, ',') FROM clickmart.schema_version")"
if cm_compare "$DUMP"; then
    cm_ok "tables equal the reference"
else
    cm_bad "tables differ from the reference"
fi

# With a state the daemon migrates at its first flush instead. A refusal there is a
# failed flush: it is logged with the reason and retried while intake goes on, as when
# Postgres is down, and the flush succeeds once the view is gone, without a restart.
cm_psql "DELETE FROM clickmart.schema_version WHERE version = 6"
cm_psql "CREATE VIEW clickmart.my_users AS SELECT user_id, revenue FROM clickmart.users"
cm_gen "$((SEED + 1))" "$EVENTS"
cm_dump_topic "$CM_TOPIC" "$DUMP"
cm_daemon_start --pg-retry-max-ms 500
refused() {
    cm_daemon_alive || cm_die "clickmartd exited (see $CM_DAEMON_LOG)"
    grep 'postgres flush failed' "$CM_DAEMON_LOG" | grep -q 'migrate: migration 6.*my_users'
}
if cm_wait_for 30 "a flush refused by migration 6" refused; then
    cm_ok "the failed flush names the migration and the view"
else
    cm_bad "no 'postgres flush failed' line naming migration 6 and my_users"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --unix-socket "$CM_DIR/status.sock" \
    http://localhost/healthz || true)
[ "$code" = 503 ] && cm_ok "/healthz 503 while the flushes fail" || cm_bad "/healthz answered $code"
caught_up() {
    cm_daemon_alive || cm_die "clickmartd exited (see $CM_DAEMON_LOG)"
    cm_status_caught_up "$DUMP"
}
cm_wait_for 60 "clickmartd to consume every partition" caught_up &&
    cm_ok "intake went on while the flushes failed" || cm_bad "intake stopped"
[ "$(cm_psql "SELECT max(version) FROM clickmart.schema_version")" = 5 ] &&
    cm_ok "still at version 5 while the view exists" || cm_bad "the schema version moved"
cm_psql "DROP VIEW clickmart.my_users"
migrated() { [ "$(cm_psql "SELECT max(version) FROM clickmart.schema_version")" = 6 ]; }
cm_wait_for 30 "the next flush to migrate" migrated &&
    cm_ok "the next flush migrated" || cm_bad "not migrated 30 s after the view was dropped"
cm_daemon_signal TERM
cm_daemon_wait 30 || cm_die "clickmartd still running 30 s after SIGTERM"
[ "$CM_DAEMON_RC" = 0 ] && cm_ok "exit 0 after SIGTERM" || cm_bad "exit $CM_DAEMON_RC after SIGTERM"
if cm_compare "$DUMP"; then
    cm_ok "tables equal the reference after both runs' events"
else
    cm_bad "tables differ from the reference after the recovery"
fi

# A connection string that does not parse is a mistake in the configuration, not a
# Postgres that is down: with an empty state the daemon used to retry it for 30 s. It
# now exits 2 at once with libpq's reason, which does not quote the string's values.
rm -rf "$CM_DIR/state"
# expect_exit WHAT STATUS PATTERN: clickmartd must stop within 10 s of WHAT, with exit
# status STATUS and PATTERN in its log.
expect_exit() {
    local what=$1 status=$2 pattern=$3 t0=$SECONDS
    if cm_daemon_wait 10; then
        cm_ok "$what stopped clickmartd after $((SECONDS - t0)) s"
    else
        cm_bad "clickmartd still running 10 s after $what"
        cm_daemon_signal KILL
        cm_daemon_wait 10 || true
    fi
    [ "$CM_DAEMON_RC" = "$status" ] && cm_ok "exit status $status" ||
        cm_bad "exit status $CM_DAEMON_RC, not $status"
    grep -q "$pattern" "$CM_DAEMON_LOG" && cm_ok "logged: $pattern" ||
        cm_bad "no '$pattern' in $CM_DAEMON_LOG"
}
cm_daemon_start --exit-at-end --pg "host=$CM_DIR password='hunter2secret"
expect_exit "a malformed --pg" 2 'invalid connection string'
grep -q hunter2secret "$CM_DAEMON_LOG" &&
    cm_bad "the log quotes the password" || cm_ok "the password is not in the log"

# Postgres not reachable with an empty state and a consumer group without offsets: the
# check of the tables retries for 30 s on a thread of its own while the consumer starts.
# A SIGTERM meanwhile stops the retries (before, the daemon sat in them and the signal
# killed it without a word): exit 1 at once, nothing applied. The next start, with
# Postgres back, must still find the state empty, so it refuses (the tables hold the
# topic).
rm -rf "$CM_DIR/state"
cm_daemon_start --group clickmartd-no-pg \
    --pg "host=$CM_DIR/nowhere port=5 user=postgres dbname=postgres connect_timeout=2"
waiting() { grep -q 'empty state: waiting for Postgres to check the tables' "$CM_DAEMON_LOG"; }
cm_wait_for 20 "the check of the tables to wait for Postgres" waiting ||
    cm_bad "no 'waiting for Postgres' in $CM_DAEMON_LOG"
cm_daemon_signal TERM
expect_exit "SIGTERM while waiting for Postgres" 1 'stopped before the tables were checked'
cm_daemon_start --group clickmartd-no-pg --exit-at-end
cm_daemon_wait 60 || cm_die "clickmartd still running 60 s after the interrupted check"
grep -q 'the state directory is empty but the tables already hold this topic' "$CM_DAEMON_LOG" &&
    [ "$CM_DAEMON_RC" = 1 ] && cm_ok "the state stayed empty: the next start refused (exit 1)" ||
    cm_bad "the next start did not refuse (exit $CM_DAEMON_RC): the interrupted run left state behind"

cm_log "whole test $((SECONDS - CM_T0))s"
cm_summary
