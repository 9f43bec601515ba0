#!/usr/bin/env bash
# Install every Debian package that clickmart's build, tests and quick start
# need. Idempotent: packages already installed are left alone. Runs as root,
# or through sudo when not root.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  librdkafka-dev libuv1-dev liblmdb-dev libpq-dev libjansson-dev
  libxxhash-dev libcmocka-dev libinih-dev libhttp-parser-dev r-mathlib
  postgresql postgresql-client kcat lmdb-utils
  curl python3 zstd procps util-linux
  clang libclang-rt-dev
  # the lint test (tests/lint.sh)
  clang-tidy clang-format cppcheck
  # operators: sd_notify, promtool for /metrics, systemd-analyze for the unit,
  # headless Chromium (and a font) for the live page test
  libsystemd-dev prometheus systemd chromium fonts-dejavu-core python3-yaml
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-deps: not root and no sudo; install these packages: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"
