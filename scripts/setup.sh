#!/usr/bin/env bash
# Idempotent environment setup: a virtual environment in .venv with stagebatch installed (editable).
# Re-running it is cheap: it only installs when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${STAGEBATCH_VENV:-.venv}
EXTRA=${STAGEBATCH_EXTRA:-cpu}   # cpu | gpu (onnxruntime vs onnxruntime-gpu; never both)

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.stagebatch-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-$EXTRA"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of torch: pip finds 2.13.0+cpu on this machine's disk; elsewhere this pulls
    # the default build for the platform.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.9"
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRA,dev]"
    echo "$want" > "$stamp"
fi
