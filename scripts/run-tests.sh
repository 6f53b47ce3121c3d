#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh --test) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
