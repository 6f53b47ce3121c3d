#!/usr/bin/env bash
# Creates .venv with everything the service and its tests need, on a fresh machine.
#   scripts/setup.sh          # service
#   scripts/setup.sh --test   # + test tools (pytest, promtool)
# torch is installed FIRST and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check torch==2.13.0
$PIP install -q --disable-pip-version-check -c requirements.lock -e ".[test]"

if [ "${1:-}" = "--test" ] && ! command -v promtool >/dev/null 2>&1; then
  # promtool (Debian's prometheus package) lints our /metrics output in the tests.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "warning: promtool not found and cannot be installed (need root + apt); the metrics lint test will fail" >&2
  fi
fi
