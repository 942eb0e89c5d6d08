#!/usr/bin/env bash
# The README's main job: set up the environment (idempotent), build the small models (export,
# slice, verify, write the Triton repository), start the embedded Triton, find each model's
# capacity, run the quick characterization at loads relative to it, replay every point in the
# simulator (costs fitted to the run's own server statistics) and write the report with its
# "Simulator error" section (about 10 minutes on 2 cores). The console shows a progress bar, one
# line per point and warnings; the full log is DIR/run.log. Prints where the report is; Ctrl-C
# stops cleanly and prints the `--resume` command.
# Extra arguments go to `stagebatch characterize` (e.g. `--plan full`, `--out DIR`, `--resume DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

args=("$@")
out=""
resume=""
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out | --resume) out="${args[i + 1]:-}" ;;&
        --resume) resume=1 ;;
        --out=* | --resume=*) out="${args[i]#*=}" ;;&
        --resume=*) resume=1 ;;
    esac
done
plan=(--plan quick)
[ -n "$resume" ] && plan=()  # a resumed run takes its plan from its environment.json
if [ -z "$out" ]; then
    out="results/quick-$(date -u +%Y%m%dT%H%M%SZ)"
    args+=(--out "$out")
fi

status=0
.venv/bin/stagebatch characterize ${plan[@]+"${plan[@]}"} "${args[@]}" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
    exit "$status"  # interrupted or refused; exit 1 means some points failed and the report was written
fi

# The simulator's error against every measured point (in-sample: the costs are fitted to this run).
if .venv/bin/stagebatch simulate --run "$out" --calibrate >"$out/simulate.log" 2>&1; then
    sed -n '/points simulated; serving costs/,$p' "$out/simulate.log"
    .venv/bin/stagebatch report "$out"
else
    echo "warning: the simulator could not replay the run (see $out/simulate.log); the report has no simulator error" >&2
fi
exit "$status"
