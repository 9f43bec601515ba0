#!/usr/bin/env bash
# Runs the sink's unit test against a real throwaway Postgres: migrations,
# a flush touching every table, repeated flushes, deletes, bad UTF-8.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cm_setup
cm_pg_start
CLICKMART_TEST_PG="$CM_PG" "$CLICKMART_BIN/tests/test_sink"
echo "1 passed, 0 failed"
