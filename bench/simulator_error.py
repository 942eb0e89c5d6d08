"""The simulator's error against two characterization runs: uncalibrated, fitted (in-sample), predicted.

Calibrates on run A (``calibration.json``), predicts run B with it, and the other way round; prints
the median |error| of p50 and of the mean over each run's stable points, per variant; the same for p50
with each repeated point's repeats pooled (median of the repeats against the median of their
simulations); and the runs' own repeat noise. The runs are read only: their files are copied to a temporary folder (the
repository is linked), where ``simulation.json`` and ``calibration.json`` are written.

    .venv/bin/python bench/simulator_error.py results/final-quick2 results/final-quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from loadtest.rundir import CAPACITY_FILE, ENVIRONMENT_FILE, POINTS_FILE, REQUESTS_FILE
from tuning.calibrate import read_calibration
from tuning.replay import replay_run, run_manifest


def _copy(run: Path, into: Path) -> Path:
    run_manifest(run)  # the repository must still exist
    target = into / run.name
    target.mkdir(parents=True)
    for name in (POINTS_FILE, ENVIRONMENT_FILE, CAPACITY_FILE, REQUESTS_FILE):
        if (run / name).is_file():
            shutil.copy(run / name, target / name)
    (target / "repository").symlink_to((run / "repository").resolve())  # found when the run's path is not
    return target


def _line(label: str, document: dict) -> str:
    summary = document["summary"]
    parts = [f"{variant} {_pct(f['stable_median_abs_error_p50'])}/{_pct(f['stable_median_abs_error_avg'])} "
             f"(n={f['stable_points']})" for variant, f in summary["per_variant"].items()]
    pooled = "; ".join(f"{variant} {_pct(f['pooled_median_abs_error_p50'])}" for variant, f in summary["per_variant"].items())
    return (f"{label:44s} all {_pct(summary['stable_median_abs_error_p50'])}/{_pct(summary['stable_median_abs_error_avg'])}"
            f" (n={summary['stable_points']}); " + "; ".join(parts) + "\n" + " " * 45 +
            f"repeats pooled, p50: all {_pct(summary['pooled_median_abs_error_p50'])} (n={summary['pooled_points']}); "
            + pooled)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=lambda text: Path(text).resolve())
    parser.add_argument("run_b", type=lambda text: Path(text).resolve())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="simerr-") as tmp:
        a, b = _copy(args.run_a, Path(tmp) / "a"), _copy(args.run_b, Path(tmp) / "b")
        print("median |error| over stable points, p50/avg, per variant")
        for run in (a, b):
            document = replay_run(run)
            print(_line(f"{run.name}: uncalibrated", document))
            print(f"{'':44s} repeats of one point differ by {_pct(document['summary']['repeat_noise_p50'])} (run noise)")
        for source, target in ((a, b), (b, a)):
            print(_line(f"{source.name}: fitted to itself (in-sample)", replay_run(source, calibrate=True)))
            print(_line(f"{target.name}: predicted from {source.name}",
                        replay_run(target, read_calibration(source), calibration_source=str(source))))


if __name__ == "__main__":
    main()
