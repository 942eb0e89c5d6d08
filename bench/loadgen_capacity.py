"""Benchmark: is the load generator as faithful as perf_analyzer, and how much can one process send?

Three parts, one run (about 4-5 minutes on a quiet machine):

1. **Model capacity**: the tiny ``bert_base`` (built here with ``stagebatch build``), fixed length
   16, open-loop constant-rate probes through :func:`loadtest.driver.run_load` (doubling, then
   bisecting). A rate is sustained when every arrival was sent on time (at most 5% more than 2 ms
   late, generator below 85% of a core) and answered without error, and the queue did not grow
   (median latency of the window's last quarter at most twice that of its first quarter plus 2 ms).
   Where the generator falls behind first, the capacity found is the generator's, and says so.
2. **Fidelity**: at ``--rate`` (100 req/s) and at ``--multiple`` (0.5) x the capacity, Poisson
   arrivals, the *same schedule* sent by perf_analyzer 2.51 (Triton's C++ generator, with
   ``--request-intervals``) and by this project's generator, interleaved (the order alternates)
   and repeated (``--repeats``, default 3). Both are summarised over the same measured window.
   Printed: p50/p99 per repeat, the median of the per-repeat ratios (ours / perf_analyzer) with
   their range, and whether the targets are met: p50 ratio within 1.00 +- 0.05, p99 ratio within
   1.00 +- 0.10. Default: unary calls to the ``whole`` model; ``--streaming``: streaming calls to
   the ``reorch`` variant.
3. **Generator capacity**: open-loop constant rate against a trivial model (``ident``, y = x + 1)
   from one sending process: sustained at ``--loadgen-rate`` (3,000 req/s)? Printed with the late
   arrivals, the sender's CPU and its CPU cost per request (``req/s per core``).

perf_analyzer is set up by :func:`loadtest.perf_analyzer.ensure_perf_analyzer` (cached); where it
cannot be had, part 2 says why and is skipped.

    .venv/bin/python bench/loadgen_capacity.py                 # unary to the whole model
    .venv/bin/python bench/loadgen_capacity.py --streaming     # streaming to reorch
    .venv/bin/python bench/loadgen_capacity.py --smoke         # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest.driver import SATURATION_CPU_PERCENT, LoadJob as LoadPlan, LoadResult, LoadSpec, run_load  # noqa: E501
from loadtest.perf_analyzer import (
    PerfAnalyzerUnavailable,
    ensure_perf_analyzer,
    run_schedule,
    stagebatch_summary,
)
from loadtest.stats import percentile_us
from loadtest.tiny_models import build_repository
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.manifest import read_manifest
from core.server import EmbeddedTriton

MODEL = "bert_base"
SEQ_LEN = 16
TRIVIAL_MODEL = "ident"
P50_TOLERANCE = 0.05
P99_TOLERANCE = 0.10
MAX_LATE_FRACTION = 0.05


def build_bert(out: Path) -> dict:
    command = [sys.executable, "-m", "stagebatch.cli", "build", "--model", MODEL, "--size", "tiny", "--stages", "2",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"building the tiny {MODEL} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return read_manifest(out).raw


def spec_for(variant: str, arrival: ArrivalSpec, args: argparse.Namespace, *, seed: int = 0,
             duration_s: float | None = None, warmup_s: float | None = None, model: str = MODEL) -> LoadSpec:
    lengths = LengthSpec("fixed", length=SEQ_LEN) if model == MODEL else None
    return LoadSpec(model, variant, arrival, lengths, duration_s=duration_s or args.duration_s,
                    warmup_s=args.warmup_s if warmup_s is None else warmup_s, seed=seed,
                    protocol="stream" if args.streaming else "unary")


# ---- 1. model capacity ----------------------------------------------------------------------------

def queue_steady(result: LoadResult) -> bool:
    """Every arrival sent on time and answered, and the server's queue did not grow."""
    ok = [r for r in result.records if r.ok]
    if len(ok) < 8 or len(ok) != len(result.records) or len(result.records) != result.scheduled_arrivals:
        return False
    if result.late_arrivals > MAX_LATE_FRACTION * len(result.records) or result.loadgen_cpu_percent >= SATURATION_CPU_PERCENT:
        return False  # the generator fell behind: this rate says nothing about the server
    quarter = len(ok) // 4
    first = statistics.median(r.latency_us for r in ok[:quarter])
    last = statistics.median(r.latency_us for r in ok[-quarter:])
    return last <= 2 * first + 2000


def model_capacity(url: str, manifest: dict, variant: str, args: argparse.Namespace) -> float:
    print(f"\n== 1. capacity of {MODEL}/{variant} ({'stream' if args.streaming else 'unary'}), length {SEQ_LEN}: "
          "open-loop constant-rate probes ==")
    print(f"{'rate/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'late':>5} {'cpu':>5}  steady")
    best, worst, rate = 0.0, None, args.capacity_start
    steps = 0
    while steps < args.capacity_probes:
        spec = spec_for(variant, ArrivalSpec("constant", rate_rps=rate), args, duration_s=args.probe_s, warmup_s=1.0)
        result = run_load(url, manifest, spec)
        ok = queue_steady(result)
        lat = [r.latency_us for r in result.records if r.ok] or [0]
        print(f"{rate:8.0f} {percentile_us(lat, 50) / 1000:8.2f} {percentile_us(lat, 99) / 1000:8.2f} "
              f"{result.late_arrivals:5d} {result.loadgen_cpu_percent:4.0f}%  {'yes' if ok else 'no'}", flush=True)
        steps += 1
        if ok:
            best = rate
            rate = rate * 2 if worst is None else (rate + worst) / 2
        else:
            worst = rate
            rate = (best + worst) / 2 if best else rate / 2
        if worst is not None and best and worst - best <= 0.1 * best:
            break
    capacity = best or args.capacity_start
    print(f"capacity: {capacity:.0f} req/s (highest steady rate{'' if worst else '; no unsteady rate found'})")
    return capacity


# ---- 2. fidelity against perf_analyzer ------------------------------------------------------------

def fidelity(analyzer, url: str, manifest: dict, variant: str, rate: float, args: argparse.Namespace) -> dict:
    label = f"{variant} ({'stream' if args.streaming else 'unary'}) at {rate:.0f} req/s"
    print(f"\n== 2. fidelity: {label}, Poisson, same schedule, {args.repeats} interleaved repeats ==")
    print(f"{'repeat':>6} {'order':>24} {'pa p50':>8} {'ours p50':>8} {'ratio':>6} {'pa p99':>8} {'ours p99':>8} "
          f"{'ratio':>6} {'late':>5} {'cpu':>5}")
    rows = []
    for repeat in range(args.repeats):
        spec = spec_for(variant, ArrivalSpec("poisson", rate_rps=rate), args, seed=args.seed + repeat)
        plan = LoadPlan(url, spec, manifest["models"][MODEL], str(manifest.get("target", "embedded")))
        order = ("perf_analyzer", "stagebatch") if repeat % 2 == 0 else ("stagebatch", "perf_analyzer")
        for who in order:
            if who == "perf_analyzer":
                reference = run_schedule(analyzer, url, plan).to_dict()
            else:
                result = run_load(url, manifest, spec)
                ours = stagebatch_summary(result.records, result.duration_s)
        row = (reference["p50_ms"], ours["p50_ms"], reference["p99_ms"], ours["p99_ms"])
        rows.append(row)
        print(f"{repeat:6d} {' then '.join('pa' if o == 'perf_analyzer' else 'ours' for o in order):>24} "
              f"{row[0]:8.3f} {row[1]:8.3f} {row[1] / row[0]:6.3f} {row[2]:8.3f} {row[3]:8.3f} {row[3] / row[2]:6.3f} "
              f"{result.late_arrivals:5d} {result.loadgen_cpu_percent:4.0f}%", flush=True)
    p50_ratios = [r[1] / r[0] for r in rows]
    p99_ratios = [r[3] / r[2] for r in rows]
    verdict = {
        "label": label,
        "p50": (statistics.median(p50_ratios), min(p50_ratios), max(p50_ratios)),
        "p99": (statistics.median(p99_ratios), min(p99_ratios), max(p99_ratios)),
    }
    for name, tolerance in (("p50", P50_TOLERANCE), ("p99", P99_TOLERANCE)):
        median, low, high = verdict[name]
        print(f"{name} ratio ours/perf_analyzer: median {median:.3f} (range {low:.3f}..{high:.3f}); "
              f"target 1.00 +- {tolerance:.2f}: {'met' if abs(median - 1) <= tolerance else 'MISSED'}")
    return verdict


# ---- 3. generator capacity ------------------------------------------------------------------------

def loadgen_capacity(args: argparse.Namespace) -> None:
    print(f"\n== 3. generator capacity: one sending process, open-loop constant rate, trivial model {TRIVIAL_MODEL!r} ==")
    print(f"{'rate/s':>8} {'achieved':>9} {'late':>6} {'late %':>7} {'errors':>6} {'cpu':>5} {'cpu µs/req':>10} "
          f"{'req/s/core':>10}  sustained")
    with tempfile.TemporaryDirectory(prefix="loadgen-bench-ident-") as tmp:
        manifest = build_repository(Path(tmp) / "repo")
        with EmbeddedTriton(Path(tmp) / "repo", models=[TRIVIAL_MODEL]) as server:
            for rate in args.loadgen_rates:
                spec = LoadSpec(TRIVIAL_MODEL, "whole", ArrivalSpec("constant", rate_rps=rate), None,
                                duration_s=args.probe_s, warmup_s=1.0)
                result = run_load(server.grpc_url, manifest, spec)
                n = len(result.records)
                achieved = n / result.duration_s
                cpu_us = result.loadgen_cpu_percent / 100 * 1e6 / achieved if achieved else float("nan")
                late_fraction = result.late_arrivals / max(n, 1)
                ok = n == result.scheduled_arrivals and result.errors == 0 and late_fraction <= MAX_LATE_FRACTION
                print(f"{rate:8.0f} {achieved:9.0f} {result.late_arrivals:6d} {100 * late_fraction:6.1f}% "
                      f"{result.errors:6d} {result.loadgen_cpu_percent:4.0f}% {cpu_us:10.0f} "
                      f"{1e6 / cpu_us if cpu_us else 0:10.0f}  {'yes' if ok else 'NO'}", flush=True)
                print(f"target: one process sends >= {rate:.0f} req/s open loop: {'met' if ok else 'MISSED'} "
                      f"(late = sent > 2 ms behind schedule; at most {100 * MAX_LATE_FRACTION:.0f}% allowed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streaming", action="store_true", help="streaming calls to the reorch variant")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--multiple", type=float, default=0.5, help="second rate: this multiple of the capacity")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--probe-s", type=float, default=3.0, help="measured seconds of each capacity probe")
    parser.add_argument("--capacity-start", type=float, default=200.0)
    parser.add_argument("--capacity-probes", type=int, default=6)
    parser.add_argument("--loadgen-rates", type=float, nargs="*", default=[3000.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loadgen-capacity", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="short runs: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.duration_s, args.warmup_s, args.probe_s, args.capacity_probes = 1, 1.5, 0.5, 1.0, 2
        args.loadgen_rates = [500.0]
    variant = "reorch" if args.streaming else "whole"
    started = time.monotonic()
    print("(figures measured on a shared machine are indicative only; compare on a quiet one)")
    try:
        analyzer = ensure_perf_analyzer()
        print(f"perf_analyzer: {analyzer.binary}")
    except PerfAnalyzerUnavailable as error:
        analyzer = None
        print(f"perf_analyzer unavailable, fidelity skipped: {error}")
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="loadgen-bench-") as tmp:
        repository = Path(tmp) / "repo"
        manifest = build_bert(repository)
        names = [manifest["models"][MODEL]["variants"]["whole"]]
        if variant == "reorch":
            names = [manifest["models"][MODEL]["variants"]["reorch"]]
        with EmbeddedTriton(repository, models=names) as server:
            capacity = model_capacity(server.grpc_url, manifest, variant, args)
            if analyzer is not None:
                for rate in (args.rate, args.multiple * capacity):
                    verdicts.append(fidelity(analyzer, server.grpc_url, manifest, variant, rate, args))
    if not args.skip_loadgen_capacity:
        loadgen_capacity(args)
    print("\n== targets ==")
    for verdict in verdicts:
        for name, tolerance in (("p50", P50_TOLERANCE), ("p99", P99_TOLERANCE)):
            median, low, high = verdict[name]
            print(f"{verdict['label']}: {name} ratio median {median:.3f} (range {low:.3f}..{high:.3f}) "
                  f"within 1.00 +- {tolerance:.2f}: {'met' if abs(median - 1) <= tolerance else 'MISSED'}")
    if analyzer is None:
        print("fidelity: skipped (perf_analyzer unavailable, see above)")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
