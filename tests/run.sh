#!/usr/bin/env bash
# Build with AddressSanitizer and UndefinedBehaviorSanitizer and run every
# test (unit and integration) with ctest. Usage: tests/run.sh [ctest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-asan}
cmake -S . -B "$BUILD" -DASAN=ON -DUBSAN=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
# librdkafka keeps a few process-wide allocations until exit; the daemon's
# own leaks are still reported through the unit tests.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest --test-dir "$BUILD" --output-on-failure "$@"
