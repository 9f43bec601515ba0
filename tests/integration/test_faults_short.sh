#!/usr/bin/env bash
# The fault suite (tests/faults/) at its short setting: crash loop, Postgres outage,
# broker outage, slow Postgres, map/disk full, restarts with a wiped state dir or fewer
# partitions; every table must equal the contract and a fault-free run. About 2.5-3
# minutes on a 2-core machine with a release build. See docs/faults.md.
#
#   CLICKMART_BIN=build bash tests/integration/test_faults_short.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FAULTS_SCALE=short exec bash "$HERE/../faults/run.sh"
