"""Benchmark: is the load generator as faithful as perf_analyzer, and how much can one process send?

One command, about 9 minutes on a quiet 2-core machine (``--quick``: about 2 minutes, checks
the script and gives rough figures):

1. **Model capacity**: the tiny ``bert_base`` (built here with ``stagebatch build``), fixed length
   16, open-loop constant-rate probes through :func:`loadtest.driver.run_load` (doubling, then
   bisecting), once for unary calls to ``whole`` and once for streaming calls to ``reorch``. A rate
   is sustained when every arrival was sent on time (at most 5% more than 2 ms late, generator
   below 85% of a core) and answered without error, and the queue did not grow (median latency of
   the window's last quarter at most twice that of its first quarter plus 2 ms). ``--capacity
   unary=R`` skips the probes for a protocol.
2. **Fidelity** at four points: unary to ``whole`` and streaming to ``reorch``, each at ``--rate``
   (100 req/s, ``--duration-s`` 20 s per run) and at ``--multiple`` (0.5) x its capacity
   (``--multiple-duration-s`` 5 s per run). Poisson arrivals; perf_analyzer 2.51 (Triton's C++
   generator, ``--request-intervals``) and this project's generator send the *same schedule*, over
   the same measured window. Interleaved: every repeat visits every point, and the order of the
   two generators alternates. Repeated ``--repeats`` (3) times with a new schedule. Printed per
   run: p50/p99 of both and their ratios (ours / perf_analyzer); per point: the median, range and
   list of the per-repeat ratios, and the ratio of the percentiles of all repeats' requests pooled
   with its 95% interval, which resamples the repeats and then the requests inside each (so it
   covers the machine's drift between repeats as well as sampling noise). The verdict takes the
   pooled ratio: p50 within 1.00 +- 0.05, p99 within 1.00 +- 0.10, printed ``met`` or ``MISSED``,
   ``decided`` when the whole interval lies on one side of the band's edge, else ``undecided``.
3. **Generator capacity**: open-loop constant rate against a trivial model (``ident``, y = x + 1)
   from one sending process at ``--loadgen-rate`` (3,000 req/s): late arrivals (sent > 2 ms behind
   schedule), lateness p50/p99, the sender's CPU and its CPU cost per request, and the cores the
   server used (where server and sender need every core, lateness is the machine's).

perf_analyzer is set up by :func:`loadtest.perf_analyzer.ensure_perf_analyzer` (cached); where it
cannot be had, part 2 says why and is skipped. The server, both generators and the bench share the
machine's cores: on 2 cores, figures taken while anything else runs are indicative only.

    .venv/bin/python bench/loadgen_capacity.py            # the figures (run under flock /work/locks/measure.lock)
    .venv/bin/python bench/loadgen_capacity.py --quick    # a short run while developing
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest.driver import SATURATION_CPU_PERCENT, LoadJob, LoadResult, LoadSpec, run_load
from loadtest.perf_analyzer import (
    PerfAnalyzerUnavailable,
    ensure_perf_analyzer,
    percentile_ratio,
    run_schedule,
)
from loadtest.stats import percentile_us
from loadtest.tiny_models import build_repository
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import StagebatchError
from core.manifest import read_manifest
from core.server import EmbeddedTriton

MODEL = "bert_base"
SEQ_LEN = 16
TRIVIAL_MODEL = "ident"
TOLERANCE = {"p50": 0.05, "p99": 0.10}
QUANTILE = {"p50": 50, "p99": 99}
MAX_LATE_FRACTION = 0.05
CALLS = {"unary": "whole", "stream": "reorch"}  # protocol -> the variant it is measured on


def build_bert(out: Path) -> dict:
    command = [sys.executable, "-m", "stagebatch.cli", "build", "--model", MODEL, "--size", "tiny", "--stages", "2",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"building the tiny {MODEL} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return read_manifest(out).raw


def spec_for(protocol: str, arrival: ArrivalSpec, args: argparse.Namespace, *, seed: int = 0,
             duration_s: float | None = None, warmup_s: float | None = None) -> LoadSpec:
    return LoadSpec(MODEL, CALLS[protocol], arrival, LengthSpec("fixed", length=SEQ_LEN),
                    duration_s=duration_s or args.duration_s, warmup_s=args.warmup_s if warmup_s is None else warmup_s,
                    seed=seed, protocol=protocol)


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


def model_capacity(url: str, manifest: dict, protocol: str, args: argparse.Namespace) -> float:
    print(f"\n== 1. capacity of {MODEL}/{CALLS[protocol]} ({protocol}), length {SEQ_LEN}: "
          "open-loop constant-rate probes ==")
    print(f"{'rate/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'late':>5} {'cpu':>5}  steady")
    best, worst, rate = 0.0, None, args.capacity_start
    for _ in range(args.capacity_probes):
        spec = spec_for(protocol, ArrivalSpec("constant", rate_rps=rate), args, duration_s=args.probe_s, warmup_s=1.0)
        result = run_load(url, manifest, spec)
        ok = queue_steady(result)
        lat = [r.latency_us for r in result.records if r.ok] or [0]
        print(f"{rate:8.0f} {percentile_us(lat, 50) / 1000:8.2f} {percentile_us(lat, 99) / 1000:8.2f} "
              f"{result.late_arrivals:5d} {result.loadgen_cpu_percent:4.0f}%  {'yes' if ok else 'no'}", flush=True)
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

@dataclass
class Point:
    """One fidelity point: each repeat's latencies of both generators, and the per-repeat ratios."""

    protocol: str
    rate_rps: float
    label: str
    duration_s: float  # measured seconds of each run at this point
    reference_runs: list[list[int]] = field(default_factory=list)
    ours_runs: list[list[int]] = field(default_factory=list)
    repeat_ratios: dict[str, list[float]] = field(default_factory=lambda: {"p50": [], "p99": []})

    def pooled(self, name: str) -> tuple[float, float, float]:
        return percentile_ratio(self.ours_runs, self.reference_runs, QUANTILE[name])


def run_point(analyzer, url: str, manifest: dict, point: Point, repeat: int, args: argparse.Namespace) -> None:
    spec = spec_for(point.protocol, ArrivalSpec("poisson", rate_rps=point.rate_rps), args, seed=args.seed + repeat,
                    duration_s=point.duration_s)
    plan = LoadJob(url, spec, manifest["models"][MODEL], str(manifest.get("target", "embedded")))
    order = ("perf_analyzer", "ours") if repeat % 2 == 0 else ("ours", "perf_analyzer")
    for who in order:
        if who == "perf_analyzer":
            reference = replay(analyzer, url, plan)
            if reference is None:
                print(f"{point.label:>26} {repeat:6d} skipped: perf_analyzer failed twice (above)", flush=True)
                return
        else:
            result = run_load(url, manifest, spec)
            ours = [r.latency_us for r in result.records if r.ok]
    point.reference_runs.append(reference)
    point.ours_runs.append(ours)
    row = []
    for name in ("p50", "p99"):
        pa_ms, ours_ms = percentile_us(reference, QUANTILE[name]) / 1000, percentile_us(ours, QUANTILE[name]) / 1000
        point.repeat_ratios[name].append(ours_ms / pa_ms)
        row.append(f"{pa_ms:8.3f} {ours_ms:8.3f} {ours_ms / pa_ms:6.3f}")
    print(f"{point.label:>26} {repeat:6d} {' then '.join('pa' if o == 'perf_analyzer' else 'ours' for o in order):>12} "
          f"{' '.join(row)} {len(reference):6d} {len(ours):6d} {result.late_arrivals:5d} {result.loadgen_cpu_percent:4.0f}%",
          flush=True)


def replay(analyzer, url: str, plan: LoadJob) -> list[int] | None:
    """perf_analyzer's latencies for ``plan``'s schedule; one retry where a replay fails or hangs (2.51
    was seen, rarely, never finishing a replay the same server answered on the retry); None after two."""
    for attempt in (1, 2):
        try:
            return run_schedule(analyzer, url, plan, timeout_s=plan.spec.duration_s + plan.spec.warmup_s + 30.0).latencies_us
        except StagebatchError as error:
            print(f"perf_analyzer replay, attempt {attempt}: {error}", flush=True)
    return None


def fidelity(analyzer, url: str, manifest: dict, points: list[Point], args: argparse.Namespace) -> None:
    print(f"\n== 2. fidelity: Poisson arrivals, the same schedule for both generators, {args.repeats} repeats; "
          f"each repeat visits every point, the generators' order alternates ==")
    print(f"{'point':>26} {'repeat':>6} {'order':>12} {'pa p50':>8} {'ours p50':>8} {'ratio':>6} "
          f"{'pa p99':>8} {'ours p99':>8} {'ratio':>6} {'n pa':>6} {'n ours':>6} {'late':>5} {'cpu':>5}")
    for repeat in range(args.repeats):
        for point in points:
            run_point(analyzer, url, manifest, point, repeat, args)


def verdict(ratio: float, low: float, high: float, tolerance: float) -> str:
    """``met``/``MISSED`` on the pooled ratio, and whether its 95% interval decides it."""
    met = abs(ratio - 1) <= tolerance
    inside = [abs(bound - 1) <= tolerance for bound in (low, high)]
    decided = all(inside) if met else not any(inside) and (low - 1) * (high - 1) > 0
    return f"{'met' if met else 'MISSED'} ({'decided' if decided else 'undecided: the interval crosses the band edge'})"


def verdicts(points: list[Point]) -> None:
    print("\n== targets: ours / perf_analyzer; verdict on the pooled ratio; its 95% interval resamples repeats, "
          "then requests ==")
    print(f"{'point':>26} {'pct':>4} {'per repeat: median (range)':>28} {'pooled [95% CI]':>24} {'n pa':>6} "
          f"{'n ours':>6}  band         verdict")
    for point in points:
        for name, tolerance in TOLERANCE.items():
            ratios = point.repeat_ratios[name]
            if not ratios:
                print(f"{point.label:>26} {name:>4} no repeat measured (perf_analyzer failed)")
                continue
            ratio, low, high = point.pooled(name)
            print(f"{point.label:>26} {name:>4} {statistics.median(ratios):10.3f} ({min(ratios):.3f}..{max(ratios):.3f})"
                  f"      {ratio:6.3f} [{low:.3f}, {high:.3f}] {sum(map(len, point.reference_runs)):6d} "
                  f"{sum(map(len, point.ours_runs)):6d}  1.00 +- {tolerance:.2f}  {name} {verdict(ratio, low, high, tolerance)}")
        print(f"{'':>26} {'':>4} per-repeat ratios p50: {' '.join(f'{r:.3f}' for r in point.repeat_ratios['p50'])}; "
              f"p99: {' '.join(f'{r:.3f}' for r in point.repeat_ratios['p99'])}")


# ---- 3. generator capacity ------------------------------------------------------------------------

def loadgen_capacity(args: argparse.Namespace) -> None:
    print(f"\n== 3. generator capacity: one sending process, open-loop constant rate, trivial model {TRIVIAL_MODEL!r} ==")
    print(f"{'rate/s':>8} {'achieved':>9} {'late':>6} {'late %':>7} {'late p50':>9} {'late p99':>9} {'errors':>6} "
          f"{'cpu':>5} {'cpu µs/req':>10} {'server':>7} {'lat p50':>8}  sustained")
    with tempfile.TemporaryDirectory(prefix="loadgen-bench-ident-") as tmp:
        manifest = build_repository(Path(tmp) / "repo")
        with EmbeddedTriton(Path(tmp) / "repo", models=[TRIVIAL_MODEL]) as server:
            rate = args.loadgen_rate
            spec = LoadSpec(TRIVIAL_MODEL, "whole", ArrivalSpec("constant", rate_rps=rate), None,
                            duration_s=args.loadgen_s, warmup_s=1.0)
            server_start, wall_start = server.cpu_seconds(), time.monotonic()
            result = run_load(server.grpc_url, manifest, spec)
            server_cores = (server.cpu_seconds() - server_start) / (time.monotonic() - wall_start)
            n = len(result.records)
            achieved = n / result.duration_s
            cpu_us = result.loadgen_cpu_percent / 100 * 1e6 / achieved if achieved else float("nan")
            late_fraction = result.late_arrivals / max(n, 1)
            late_us = [r.late_us for r in result.records] or [0]
            latency_us = [r.latency_us for r in result.records if r.ok] or [0]
            ok = n == result.scheduled_arrivals and result.errors == 0 and late_fraction <= MAX_LATE_FRACTION
            print(f"{rate:8.0f} {achieved:9.0f} {result.late_arrivals:6d} {100 * late_fraction:6.1f}% "
                  f"{percentile_us(late_us, 50) / 1000:7.2f}ms {percentile_us(late_us, 99) / 1000:7.2f}ms "
                  f"{result.errors:6d} {result.loadgen_cpu_percent:4.0f}% {cpu_us:10.0f} {server_cores:6.2f}c "
                  f"{percentile_us(latency_us, 50) / 1000:6.2f}ms  {'yes' if ok else 'NO'}", flush=True)
            print(f"target: one process sends {rate:.0f} req/s open loop: {'met' if ok else 'MISSED'} "
                  f"(late = sent > 2 ms behind schedule; at most {100 * MAX_LATE_FRACTION:.0f}% allowed; "
                  f"server = cores the server used over the run, start-up and drain included: where it and the "
                  f"sender need all the cores, lateness is the machine's, not the sender's)")
            for warning in result.warnings:
                print(f"  warning: {warning}")


def parse_capacities(items: list[str]) -> dict[str, float]:
    capacities = {}
    for item in items:
        protocol, _, rate = item.partition("=")
        if protocol not in CALLS or not rate:
            sys.exit(f"--capacity {item!r}: give PROTOCOL=REQ_PER_S with PROTOCOL one of {', '.join(CALLS)}")
        capacities[protocol] = float(rate)
    return capacities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--multiple", type=float, default=0.5, help="second rate: this multiple of the capacity")
    parser.add_argument("--protocols", nargs="+", default=list(CALLS), choices=list(CALLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds of each fidelity run at --rate")
    parser.add_argument("--multiple-duration-s", type=float, default=5.0,
                        help="measured seconds of each fidelity run at --multiple x capacity")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--probe-s", type=float, default=2.0, help="measured seconds of each capacity probe")
    parser.add_argument("--capacity-start", type=float, default=400.0)
    parser.add_argument("--capacity-probes", type=int, default=5)
    parser.add_argument("--capacity", nargs="+", default=[], metavar="PROTOCOL=REQ_PER_S",
                        help="skip part 1 for these protocols and take this capacity (e.g. unary=1600)")
    parser.add_argument("--loadgen-rate", type=float, default=3000.0)
    parser.add_argument("--loadgen-s", type=float, default=8.0, help="measured seconds of the generator-capacity run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-loadgen-capacity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short runs while developing (rough figures)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.duration_s, args.multiple_duration_s, args.probe_s, args.capacity_probes = 2, 4.0, 2.0, 1.5, 3
        args.loadgen_s = 3.0
    known = parse_capacities(args.capacity)
    started = time.monotonic()
    print("(figures measured on a shared machine are indicative only; compare on a quiet one)")
    analyzer = None
    if not args.skip_fidelity:
        try:
            analyzer = ensure_perf_analyzer()
            print(f"perf_analyzer: {analyzer.binary}")
        except PerfAnalyzerUnavailable as error:
            print(f"perf_analyzer unavailable, fidelity skipped: {error}")
    points: list[Point] = []
    if analyzer is not None:
        with tempfile.TemporaryDirectory(prefix="loadgen-bench-") as tmp:
            repository = Path(tmp) / "repo"
            manifest = build_bert(repository)
            names = [manifest["models"][MODEL]["variants"][CALLS[protocol]] for protocol in args.protocols]
            with EmbeddedTriton(repository, models=names) as server:
                for protocol in args.protocols:
                    capacity = known.get(protocol) or model_capacity(server.grpc_url, manifest, protocol, args)
                    for rate, what, duration_s in (
                        (args.rate, "", args.duration_s),
                        (args.multiple * capacity, f" ({args.multiple:g}x cap)", args.multiple_duration_s),
                    ):
                        points.append(Point(protocol, rate, f"{CALLS[protocol]} {protocol} {rate:.0f}/s{what}", duration_s))
                fidelity(analyzer, server.grpc_url, manifest, points, args)
        print(f"(parts 1-2: {time.monotonic() - started:.0f} s)")
    if not args.skip_loadgen_capacity:
        loadgen_capacity(args)
    if points:
        verdicts(points)
    elif not args.skip_fidelity:
        print("fidelity: skipped (perf_analyzer unavailable, see above)")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
