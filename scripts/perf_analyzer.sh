#!/usr/bin/env bash
# Set up perf_analyzer 2.51 (the reference load generator) in ~/.cache/stagebatch/perf_analyzer and
# print how to run it; says what is missing where it cannot be had. See docs/loadgen.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" - <<'PYEOF'
import sys
from loadtest.perf_analyzer import PerfAnalyzerUnavailable, ensure_perf_analyzer
try:
    analyzer = ensure_perf_analyzer()
except PerfAnalyzerUnavailable as error:
    sys.exit(f"error: {error}")
print(f"LD_LIBRARY_PATH={analyzer.lib_dir} {analyzer.binary} -m MODEL -u 127.0.0.1:8001 -i grpc ...")
PYEOF
