#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh --test) and runs the tests.
#   scripts/run-tests.sh            the whole suite (what CI runs via .ci/run)
#   scripts/run-tests.sh --fast     the unit tests that are not slow (no servers started): a quick check
# Any other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if [[ "${1:-}" == "--fast" ]]; then
  shift
  exec .venv/bin/python -m pytest -q -m "not system and not slow" "$@"
fi
# --durations: every run (CI included) ends with its slowest tests, to keep the suite under its budget.
exec .venv/bin/python -m pytest -q --durations=30 "$@"
