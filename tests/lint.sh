#!/usr/bin/env bash
# The project's static checks, as one test (ctest: lint):
#   - clang-format: every .c and .h file under daemon/ ingest/ aggregator/
#     store/ sink/ tools/ tests/ is formatted as the committed .clang-format says;
#   - cppcheck: no warning, performance or portability finding in the modules
#     and tools/;
#   - clang-tidy: no finding of the committed .clang-tidy in any file the build
#     compiles from the modules, tools/ and tests/unit/.
# Each tool's findings are printed and any finding fails the test. A missing tool
# fails it too, naming the Debian package: CI installs them through
# deploy/install-deps.sh, and a lint test that skipped would pass unseen.
#
# clang-tidy reads the compile commands of a Debug configuration made in a
# temporary directory (configuring takes about a second, nothing is built), so the
# result does not depend on the build type or flags of the tree ctest runs in.
# Each file gets its own clang-tidy process: clang-tidy 14 carries analyzer state
# from one file to the next within a process (see .clang-tidy), and separate
# processes run in parallel. LINT_JOBS sets how many (default: the CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD

CLANG_FORMAT=${CLANG_FORMAT:-clang-format}
CLANG_TIDY=${CLANG_TIDY:-clang-tidy}
CPPCHECK=${CPPCHECK:-cppcheck}

missing=()
for tool in "$CLANG_FORMAT:clang-format" "$CLANG_TIDY:clang-tidy" "$CPPCHECK:cppcheck" \
    cmake:cmake; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
        missing+=("${tool%%:*} (Debian package ${tool##*:})")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "lint: FAILED: missing ${missing[*]}; deploy/install-deps.sh installs them" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/clickmart-lint.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
failed=()

echo "lint: $("$CLANG_FORMAT" --version | head -n1), $("$CPPCHECK" --version)," \
    "$("$CLANG_TIDY" --version | grep -m1 -o 'LLVM version .*')"

# clang-format.
mapfile -t formatted < <(find daemon ingest aggregator store sink tools tests -type f \
    \( -name '*.c' -o -name '*.h' \) | sort)
if "$CLANG_FORMAT" --dry-run -Werror "${formatted[@]}" >"$tmp/format.log" 2>&1; then
    echo "lint: clang-format: ${#formatted[@]} files OK"
else
    cat "$tmp/format.log"
    echo "lint: clang-format: FAILED (run clang-format -i on the files above)"
    failed+=(clang-format)
fi

# cppcheck.
if "$CPPCHECK" --quiet --enable=warning,performance,portability --error-exitcode=1 \
    --inline-suppr -I . daemon ingest aggregator store sink tools >"$tmp/cppcheck.log" 2>&1; then
    echo "lint: cppcheck: OK"
else
    cat "$tmp/cppcheck.log"
    echo "lint: cppcheck: FAILED"
    failed+=(cppcheck)
fi

# clang-tidy, over the files the build compiles (the compile database lists them).
if ! cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >"$tmp/cmake.log" 2>&1; then
    cat "$tmp/cmake.log"
    echo "lint: clang-tidy: FAILED: cannot configure a build for its compile commands"
    exit 1
fi
tidied=()
while IFS= read -r f; do
    if [[ ${f#"$src"/} =~ ^(daemon|ingest|aggregator|store|sink|tools|tests/unit)/[^/]*\.c$ ]]; then
        tidied+=("$f")
    fi
done < <(grep -o '"file": "[^"]*"' "$tmp/build/compile_commands.json" |
    sed 's/^"file": "//; s/"$//' | sort -u)
if [ ${#tidied[@]} -eq 0 ]; then
    echo "lint: clang-tidy: FAILED: no source file in $tmp/build/compile_commands.json"
    exit 1
fi
mkdir "$tmp/tidy"
# One log per file, kept only when clang-tidy fails on it. --warnings-as-errors
# repeats .clang-tidy's setting so that a warning cannot pass as a mere warning.
# The inner script expands its own arguments, hence the single quotes.
# shellcheck disable=SC2016
printf '%s\0' "${tidied[@]}" | xargs -0 -P"${LINT_JOBS:-$(nproc)}" -I{} \
    sh -c 'log="$3/$(printf %s "$4" | tr / _).log"
           "$1" -p "$2" --quiet --warnings-as-errors="*" "$4" >"$log" 2>&1 && rm -f "$log"
           exit 0' \
    sh "$CLANG_TIDY" "$tmp/build" "$tmp/tidy" {}
mapfile -t tidy_logs < <(find "$tmp/tidy" -name '*.log' | sort)
if [ ${#tidy_logs[@]} -eq 0 ]; then
    echo "lint: clang-tidy: ${#tidied[@]} files OK"
else
    for log in "${tidy_logs[@]}"; do
        grep -v -E '^[0-9]+ warnings? (and [0-9]+ errors? )?generated\.$' "$log" || true
    done
    echo "lint: clang-tidy: FAILED in ${#tidy_logs[@]} of ${#tidied[@]} files"
    failed+=(clang-tidy)
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "lint: FAILED: ${failed[*]}"
    exit 1
fi
echo "lint: OK"
