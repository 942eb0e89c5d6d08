#!/usr/bin/env bash
# The README's main job: set up the environment (idempotent), build the small models (export,
# slice, verify, write the Triton repository), start the embedded Triton, run the quick
# characterization and write the report. Prints where the report is.
# Extra arguments go to `stagebatch characterize` (e.g. `--plan full`, `--out DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stagebatch characterize --plan quick "$@"
