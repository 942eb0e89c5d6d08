#!/usr/bin/env bash
# The README's main job: set up the environment (idempotent), build the small models (export,
# slice, verify, write the Triton repository), start the embedded Triton, find each model's
# capacity, run the quick characterization at loads relative to it and write the report (about
# 10 minutes on 2 cores). The console shows a progress bar, one line per point and warnings; the
# full log is DIR/run.log. Prints where the report is; Ctrl-C stops cleanly and prints the
# `--resume` command.
# Extra arguments go to `stagebatch characterize` (e.g. `--plan full`, `--out DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stagebatch characterize --plan quick "$@"
