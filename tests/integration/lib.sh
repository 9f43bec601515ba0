# shellcheck shell=bash
# lib.sh - helpers for clickmart's integration tests; source it from a test script
# that runs under `set -euo pipefail`:
#
#   source "$(dirname "$0")/lib.sh"
#   cm_setup                      # temp dir + a trap that cleans everything up on exit
#   cm_pg_start                   # throwaway Postgres 15; exports CM_PG (conninfo)
#   cm_broker_start 4 clickmart.events   # dev broker; sets CM_BROKER, CM_TOPIC
#   cm_daemon_start --exit-at-end # clickmartd in the background; CM_DAEMON_PID
#   cm_daemon_wait 300            # wait for it to exit; CM_DAEMON_RC
#
# Environment:
#   CLICKMART_BIN  the CMake build dir (clickmartd, tools/clickmart-gen,
#                  tools/clickmart-devbroker, tools/clickmartctl); default ../../build
#   CLICKMART_SRC  the source dir; default ../..
#   CM_PG_BIN      Postgres binaries (default /usr/lib/postgresql/15/bin)
#   CM_TMPDIR      where the temp dir goes (default /tmp; must be traversable by the
#                  postgres user when running as root)
#   CM_KEEP=1      keep the temp dir (logs, dump, state) after the test
#
# Nothing is left running: the EXIT trap kills every process started here, stops
# Postgres and removes the temp dir, whether the test passed, failed or was interrupted.

CM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${CLICKMART_SRC:=$(cd "$CM_LIB_DIR/../.." && pwd)}"
: "${CLICKMART_BIN:=$CLICKMART_SRC/build}"
: "${CM_PG_BIN:=/usr/lib/postgresql/15/bin}"
: "${CM_TMPDIR:=/tmp}"
CM_TOPIC=${CM_TOPIC:-clickmart.events}
CM_PY=${CM_PY:-python3}
# Background processes run in a session of their own (setsid does not fork here, so $!
# is the process itself), so that cleanup can also end whatever they started.
if command -v setsid >/dev/null 2>&1; then CM_SETSID=(setsid); else CM_SETSID=(); fi

cm_log() { printf '[%s +%ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - ${CM_T0:-0}))" "$*" >&2; }
cm_die() {
    cm_log "FAIL: $*"
    exit 1
}

# --- setup and cleanup --------------------------------------------------------------

cm_setup() {
    CM_T0=$SECONDS
    CM_DIR=$(mktemp -d "$CM_TMPDIR/clickmart-it.XXXXXX")
    chmod 755 "$CM_DIR" # postgres (when we are root) must traverse it
    CM_PIDS=()
    CM_PG_RUNNING=0
    CM_DAEMON_PID=""
    CM_DAEMON_RC=""
    CM_DAEMON_RUNS=0
    CM_BROKER_PID=""
    trap cm_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    cm_log "temp dir $CM_DIR"
}

cm_track_pid() { CM_PIDS+=("$1"); }

cm_untrack_pid() {
    local p keep=()
    for p in "${CM_PIDS[@]+"${CM_PIDS[@]}"}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    CM_PIDS=("${keep[@]+"${keep[@]}"}")
}

# Stops one of our child processes: SIGTERM, then SIGKILL after $2 seconds (default 5);
# then SIGKILL whatever is left in its process group.
cm_stop_pid() {
    local pid=$1 grace=${2:-5} i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            cm_log "pid $pid ignored SIGTERM for ${grace}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    cm__kill_group "$pid"
    cm_untrack_pid "$pid"
}

cm__kill_group() {
    if [ ${#CM_SETSID[@]} -gt 0 ]; then kill -KILL -- "-$1" 2>/dev/null || true; fi
}

cm_show_logs() {
    local f
    for f in "$CM_DIR"/daemon.*.log "$CM_DIR"/broker.log "$CM_DIR"/gen.log "$CM_DIR"/pg/postgres.log; do
        [ -s "$f" ] || continue
        printf '\n----- last lines of %s -----\n' "$f" >&2
        tail -n 40 "$f" >&2 || true
    done
}

cm_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    [ -n "${CM_DIR:-}" ] || exit "$rc"
    if [ "$rc" -ne 0 ]; then
        cm_show_logs
        [ "${CM_KEEP:-0}" = 1 ] || cm_log "(CM_KEEP=1 keeps $CM_DIR for a look)"
    fi
    local i pids=("${CM_PIDS[@]+"${CM_PIDS[@]}"}")
    # Newest first: the daemon goes before the broker it talks to.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        cm_stop_pid "${pids[i]}" 5
    done
    if [ "${CM_PG_RUNNING:-0}" = 1 ]; then
        cm_pg_stop fast
    fi
    if [ "${CM_KEEP:-0}" = 1 ]; then
        cm_log "kept $CM_DIR"
    else
        rm -rf "$CM_DIR"
    fi
    cm_log "exit $rc"
    exit "$rc"
}

# cm_require BIN... : the named binaries (relative to CLICKMART_BIN) must exist.
cm_require() {
    local b
    for b in "$@"; do
        [ -x "$CLICKMART_BIN/$b" ] || cm_die "missing $CLICKMART_BIN/$b (set CLICKMART_BIN to the build dir)"
    done
}

# cm_wait_for SECONDS DESCRIPTION COMMAND [ARGS...]: polls COMMAND every 0.25 s until it
# succeeds; returns 1 (with a message) when SECONDS have passed.
cm_wait_for() {
    local timeout=$1 desc=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            cm_log "timed out after ${timeout}s waiting for $desc"
            return 1
        fi
        sleep 0.25
    done
}

# --- checks ---------------------------------------------------------------------------

# cm_ok MSG / cm_bad MSG: a passed / failed check of a test that goes on after a failure,
# so that one run reports every check; cm_summary prints the "N passed, M failed" line
# and returns 1 if any failed (the last command of such a test).
CM_PASSED=0
CM_FAILED=0
cm_ok() {
    CM_PASSED=$((CM_PASSED + 1))
    cm_log "ok: $*"
}
cm_bad() {
    CM_FAILED=$((CM_FAILED + 1))
    cm_log "FAILED: $*"
}
cm_summary() {
    echo "$CM_PASSED passed, $CM_FAILED failed"
    [ "$CM_FAILED" -eq 0 ]
}

cm_free_port() { "$CM_PY" "$CM_LIB_DIR/cmtool.py" free-port; }

# --- Postgres -----------------------------------------------------------------------

# Runs a command as the postgres system user when we are root (initdb refuses root).
cm_as_pg() {
    if [ "$(id -u)" = 0 ]; then
        (cd "$CM_DIR" && runuser -u postgres -- "$@")
    else
        (cd "$CM_DIR" && "$@")
    fi
}

# cm_pg_start: initialises (first time) and starts a throwaway Postgres with its Unix
# socket in $CM_DIR/pg and no TCP listener; exports CM_PG and CM_PG_PORT.
cm_pg_start() {
    local pgdir=$CM_DIR/pg
    [ -x "$CM_PG_BIN/initdb" ] || cm_die "no Postgres in $CM_PG_BIN (set CM_PG_BIN)"
    if [ ! -d "$pgdir/data" ]; then
        mkdir -p "$pgdir"
        if [ "$(id -u)" = 0 ]; then
            id postgres >/dev/null 2>&1 || cm_die "running as root but there is no 'postgres' user"
            chown postgres: "$pgdir"
        fi
        CM_PG_PORT=$(cm_free_port)
        if ! cm_as_pg "$CM_PG_BIN/initdb" -D "$pgdir/data" -E UTF8 --locale=C \
            --auth=trust -U postgres --no-sync >"$CM_DIR/initdb.log" 2>&1; then
            cat "$CM_DIR/initdb.log" >&2
            cm_die "initdb failed"
        fi
        cat >>"$pgdir/data/postgresql.conf" <<EOF

# clickmart integration test
listen_addresses = ''
port = $CM_PG_PORT
unix_socket_directories = '$pgdir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 40
shared_buffers = 64MB
log_min_messages = warning
EOF
    fi
    if ! cm_as_pg "$CM_PG_BIN/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t 60 \
        start >"$CM_DIR/pg_ctl.log" 2>&1; then
        cat "$CM_DIR/pg_ctl.log" "$pgdir/postgres.log" >&2 2>/dev/null
        cm_die "Postgres did not start"
    fi
    CM_PG_RUNNING=1
    export CM_PG_PORT
    export CM_PG="host=$pgdir port=$CM_PG_PORT user=postgres dbname=postgres"
    cm_psql "select 1" >/dev/null || cm_die "cannot connect to Postgres ($CM_PG)"
    cm_log "Postgres up: $CM_PG"
}

# cm_pg_stop [fast|immediate|smart]: stops Postgres (default fast).
cm_pg_stop() {
    local mode=${1:-fast} data=$CM_DIR/pg/data i
    [ "${CM_PG_RUNNING:-0}" = 1 ] || return 0
    local postmaster
    postmaster=$(head -n1 "$data/postmaster.pid" 2>/dev/null || true)
    if ! cm_as_pg "$CM_PG_BIN/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >>"$CM_DIR/pg_ctl.log" 2>&1; then
        local pid
        pid=$(head -n1 "$data/postmaster.pid" 2>/dev/null || true)
        if [ -n "$pid" ]; then
            cm_log "pg_ctl stop failed: SIGKILL postmaster $pid"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    # pg_ctl returns once the pid file is gone; wait for the process itself as well.
    for ((i = 0; i < 50; i++)); do
        if [ -z "$postmaster" ] || [ ! -d "/proc/$postmaster" ]; then break; fi
        grep -q '^State:.*Z' "/proc/$postmaster/status" 2>/dev/null && break
        sleep 0.1
    done
    CM_PG_RUNNING=0
}

cm_pg_restart() {
    cm_pg_stop "${1:-fast}"
    cm_pg_start
}

# cm_psql SQL: runs one statement, unaligned, tuples only.
cm_psql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$CM_PG" -c "$1"; }

# --- broker -------------------------------------------------------------------------

cm__broker_ready() {
    kill -0 "$CM_BROKER_PID" 2>/dev/null || cm_die "clickmart-devbroker exited early"
    [ -s "$CM_DIR/broker.out" ] && [ "$(wc -l <"$CM_DIR/broker.out")" -ge 1 ]
}

# cm_broker_start PARTITIONS TOPIC: starts the dev broker; sets CM_BROKER (host:port)
# and CM_TOPIC.
cm_broker_start() {
    local partitions=${1:-4} topic=${2:-clickmart.events}
    : >"$CM_DIR/broker.out"
    "${CM_SETSID[@]}" "$CLICKMART_BIN/tools/clickmart-devbroker" --partitions "$partitions" --topic "$topic" \
        >"$CM_DIR/broker.out" 2>"$CM_DIR/broker.log" </dev/null &
    CM_BROKER_PID=$!
    cm_track_pid "$CM_BROKER_PID"
    cm_wait_for 20 "the devbroker's address" cm__broker_ready || cm_die "no devbroker"
    CM_BROKER=$(head -n1 "$CM_DIR/broker.out")
    CM_TOPIC=$topic
    export CM_BROKER CM_TOPIC
    cm_log "devbroker $CM_BROKER: topic $topic, $partitions partitions (pid $CM_BROKER_PID)"
}

cm_broker_stop() {
    [ -n "$CM_BROKER_PID" ] || return 0
    cm_stop_pid "$CM_BROKER_PID" 10
    CM_BROKER_PID=""
}

# cm_gen SEED EVENTS [ARGS...]: produces EVENTS events of SEED into $CM_TOPIC with
# clickmart-gen (ARGS go to it too, e.g. --rate), appending its output to
# $CM_DIR/gen.log; dies when it fails.
cm_gen() {
    local seed=$1 events=$2
    shift 2
    "$CLICKMART_BIN/tools/clickmart-gen" --seed "$seed" --events "$events" --brokers "$CM_BROKER" \
        --topic "$CM_TOPIC" --quiet "$@" >>"$CM_DIR/gen.log" 2>&1 </dev/null ||
        cm_die "clickmart-gen failed (see $CM_DIR/gen.log)"
}

# cm_dump_topic TOPIC FILE: every message of TOPIC, in kcat's '%p %o %S\n%s\n' format.
cm_dump_topic() {
    local topic=$1 file=$2
    timeout 300 kcat -C -b "$CM_BROKER" -t "$topic" -o beginning -e -q \
        -f '%p %o %S\n%s\n' >"$file" 2>"$CM_DIR/kcat.log" ||
        {
            cat "$CM_DIR/kcat.log" >&2
            cm_die "kcat could not dump $topic"
        }
}

# --- daemon -------------------------------------------------------------------------

# cm_daemon_start [ARGS...]: starts clickmartd in the background with the common flags
# and ARGS (a flush every 500 ms with parts written ahead every 100 ms, so that every test
# runs the parts too); sets CM_DAEMON_PID and CM_DAEMON_LOG (one log per start).
cm_daemon_start() {
    [ -z "$CM_DAEMON_PID" ] || cm_die "cm_daemon_start: clickmartd $CM_DAEMON_PID is still running"
    CM_DAEMON_RUNS=$((CM_DAEMON_RUNS + 1))
    CM_DAEMON_LOG=$CM_DIR/daemon.$CM_DAEMON_RUNS.log
    mkdir -p "$CM_DIR/state"
    "${CM_SETSID[@]}" "$CLICKMART_BIN/clickmartd" --brokers "$CM_BROKER" --topic "$CM_TOPIC" --pg "$CM_PG" \
        --state-dir "$CM_DIR/state" --status-socket "$CM_DIR/status.sock" \
        --flush-interval-ms 500 --flush-ahead-ms 100 "$@" >"$CM_DAEMON_LOG" 2>&1 </dev/null &
    CM_DAEMON_PID=$!
    cm_track_pid "$CM_DAEMON_PID"
    cm_log "clickmartd started (pid $CM_DAEMON_PID, run $CM_DAEMON_RUNS${*:+: $*})"
}

cm_daemon_alive() { [ -n "$CM_DAEMON_PID" ] && kill -0 "$CM_DAEMON_PID" 2>/dev/null; }

# cm_daemon_wait SECONDS: waits for clickmartd to exit; sets CM_DAEMON_RC and returns 0,
# or returns 1 if it is still running after SECONDS.
cm_daemon_wait() {
    local timeout=$1 pid=$CM_DAEMON_PID
    [ -n "$pid" ] || cm_die "cm_daemon_wait: no daemon"
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    CM_DAEMON_RC=0
    wait "$pid" || CM_DAEMON_RC=$?
    cm__kill_group "$pid"
    cm_untrack_pid "$pid"
    CM_DAEMON_PID=""
    cm_log "clickmartd $pid exited with status $CM_DAEMON_RC"
}

# cm_daemon_signal SIG: sends SIG to clickmartd.
cm_daemon_signal() { kill -"$1" "$CM_DAEMON_PID"; }

# cm_daemon_kill9: kill -9 and reap.
cm_daemon_kill9() {
    local pid=$CM_DAEMON_PID
    [ -n "$pid" ] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    cm__kill_group "$pid"
    cm_untrack_pid "$pid"
    CM_DAEMON_PID=""
    cm_log "clickmartd $pid killed with SIGKILL"
}

# cm_status: the daemon's /status JSON on stdout (fails when it does not answer).
cm_status() {
    curl -s -f --max-time 5 --unix-socket "$CM_DIR/status.sock" http://localhost/status
}

# cm_status_accepted: accepted total from /status, -1 when /status does not answer.
cm_status_accepted() {
    local j
    j=$(cm_status 2>/dev/null) || j=""
    printf '%s' "$j" | "$CM_PY" "$CM_LIB_DIR/cmtool.py" accepted
}

# cm_status_caught_up DUMP: succeeds when /status shows every partition of the dump
# consumed to its end with no lag.
cm_status_caught_up() {
    local j
    j=$(cm_status 2>/dev/null) || return 1
    printf '%s' "$j" | "$CM_PY" "$CM_LIB_DIR/cmtool.py" caught-up "$1"
}

# cm_compare DUMP [ARGS...]: compare.py against $CM_PG for $CM_TOPIC.
cm_compare() {
    local dump=$1
    shift
    # Every mart of the contract exists now: a missing table is a failure,
    # unless a test sets CM_COMPARE_LENIENT=1 (compare.py's own self-test).
    local strict=--require-all
    [ "${CM_COMPARE_LENIENT:-0}" = 1 ] && strict=
    "$CM_PY" "$CM_LIB_DIR/compare.py" --dump "$dump" --pg "$CM_PG" --topic "$CM_TOPIC" \
        $strict "$@"
}
