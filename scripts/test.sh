#!/usr/bin/env bash
# The README's test command: set up the environment (idempotent), then run the test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long tests, `-k server`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
