#!/usr/bin/env bash
# A short run of the message-path fuzzer (tests/fuzz, docs/fuzzing.md): libFuzzer with
# ASan, UBSan and LeakSanitizer over validation and acceptance, 20 seconds from the
# committed corpus. Fails on any crash, leak, hang or contract violation. The build and
# everything the run finds go to build-fuzz/ (git-ignored); the corpus is only read.
#
# Run alone with
#   bash tests/integration/test_fuzz_short.sh          (CLICKMART_FUZZ_SECONDS=60 for longer)
set -euo pipefail

SRC=${CLICKMART_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}

if ! command -v clang >/dev/null 2>&1; then
    echo "SKIP: clang is not installed (deploy/install-deps.sh installs clang and libFuzzer)"
    exit 0
fi

"$SRC/tests/fuzz/run.sh" "${CLICKMART_FUZZ_SECONDS:-20}"
echo "1 passed, 0 failed"
