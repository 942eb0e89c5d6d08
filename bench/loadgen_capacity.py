"""Benchmark: is the load generator as faithful as perf_analyzer, and how much can one process send?

One command, about 11 minutes on a quiet 2-core machine (it prints its duration; ``--quick``: about
2 minutes, checks the script and gives rough figures):

1. **Model capacity**: the tiny ``bert_base`` (built here with ``stagebatch build``), fixed length
   16, open-loop constant-rate probes through :func:`loadtest.driver.run_load`, searched as the
   characterization searches (:mod:`loadtest.capacity`: doubling, then bisecting) and judged by its
   verdict (:mod:`loadtest.stability`: the server kept up, no backlog grew or stood, the generator
   sent on time), once for unary calls to ``whole`` and once for streaming calls to ``reorch``.
   ``--capacity unary=R`` skips the probes for a protocol.
2. **Fidelity** at four points: unary to ``whole`` and streaming to ``reorch``, each at ``--rate``
   (100 req/s, ``--duration-s`` 10 s windows) and at ``--multiple`` (0.5) x its capacity
   (``--multiple-duration-s`` 2 s windows). Poisson arrivals. A *pair* is perf_analyzer 2.51
   (Triton's C++ generator, ``--request-intervals``, async calls from one worker thread:
   :data:`loadtest.perf_analyzer.REPLAY_THREADS` says why) and this project's generator sending
   the same schedule back to back, over the same measured window, in alternating order; ``--pairs`` (8)
   pairs per point, each with a new schedule, and the pairs visit the points in turn, so the
   machine's drift falls inside no ratio but lands between pairs. Printed per pair: p50/p99 of both,
   their ratios (ours / perf_analyzer), and each generator's client share (mean latency minus the
   server's mean time per request from Triton's statistics), and, where the loopback can be
   captured (root or ``CAP_NET_RAW``; ``--no-wire`` skips it), how far each generator's p50 lies
   above the **wire's** p50 for the same requests: :mod:`loadtest.wire` times every request and
   answer by the kernel's receive timestamps, an arbiter that belongs to neither generator. Per
   point, the verdict of the issue's
   done-when: the **median over pairs of the per-pair ratio**, p50 within 1.00 +- 0.05 and p99
   within 1.00 +- 0.10, ``met`` or ``MISSED``, ``decided`` when its 95% interval (resampling pairs)
   lies on one side of the band's edge and there are at least 6 pairs, else ``undecided``. Beside
   it the ratio of the pooled percentiles with its interval
   (:func:`loadtest.perf_analyzer.percentile_ratio`), and how many pairs (and requests per
   generator) this run's spread says a +-band interval takes. Then each generator against the wire:
   the median over pairs of its p50 and p99 over the wire's, with 95% intervals.
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
import contextlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from loadtest.client import TRANSPORTS
from loadtest.capacity import Probe, SearchSettings, search_capacity
from loadtest.driver import LoadJob, LoadSpec, run_load
from loadtest.perf_analyzer import (
    REPLAY_THREADS,
    PerfAnalyzerUnavailable,
    ScheduleResult,
    ensure_perf_analyzer,
    median_ratio,
    pair_ratios,
    percentile_ratio,
    retried_once,
    run_schedule,
)
from loadtest.server_stats import snapshot_statistics
from loadtest.stats import percentile_us
from loadtest.tiny_models import build_repository
from loadtest.wire import LoopbackCapture, WireUnavailable, loopback_port, window_latencies_us
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.manifest import read_manifest
from core.server import EmbeddedTriton

MODEL = "bert_base"
SEQ_LEN = 16
TRIVIAL_MODEL = "ident"
TOLERANCE = {"p50": 0.05, "p99": 0.10}
QUANTILE = {"p50": 50, "p99": 99}
MAX_LATE_FRACTION = 0.05
# Fewest pairs whose median can decide: all 6 ratios on one side of a band edge happen by chance
# with probability 2 / 2**6 = 0.03 (a sign test), so 6 can; 3 pairs cannot (0.25).
MIN_PAIRS_TO_DECIDE = 6
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
                    seed=seed, protocol=protocol, transport=args.transport)


# ---- 1. model capacity ----------------------------------------------------------------------------

def model_capacity(url: str, manifest: dict, protocol: str, args: argparse.Namespace) -> float:
    print(f"\n== 1. capacity of {MODEL}/{CALLS[protocol]} ({protocol}), length {SEQ_LEN}: "
          "open-loop constant-rate probes (loadtest.capacity, judged by loadtest.stability) ==")
    print(f"{'rate/s':>8} {'achieved':>8} {'p50 ms':>8} {'p99 ms':>8} {'late':>5} {'cpu':>5}  verdict")

    def probe(rate: float) -> Probe:
        spec = spec_for(protocol, ArrivalSpec("constant", rate_rps=rate), args, duration_s=args.probe_s, warmup_s=1.0)
        result = run_load(url, manifest, spec)
        verdict = result.stability()
        lat = [r.latency_us for r in result.records if r.ok] or [0]
        print(f"{rate:8.0f} {verdict.achieved_rps:8.0f} {percentile_us(lat, 50) / 1000:8.2f} "
              f"{percentile_us(lat, 99) / 1000:8.2f} {result.late_arrivals:5d} {result.loadgen_cpu_percent:4.0f}%  "
              f"{'sustained' if verdict.sustained else 'not sustained: ' + (verdict.unstable_reason or '')}", flush=True)
        return Probe(rate, verdict.sustained, verdict.achieved_rps, percentile_us(lat, 99) / 1000,
                     verdict.unstable_reason, verdict.limited_by_load_generator and not verdict.sustained)

    found = search_capacity(probe, slo_ms=float("inf"), settings=SearchSettings(
        start_rps=args.capacity_start, growth=2.0, tolerance=0.1, max_probes=args.capacity_probes))
    capacity = found.sustained_rps or args.capacity_start
    print(f"capacity: {capacity:.0f} req/s (highest sustained rate; limited by {found.limited_by}"
          f"{'' if found.converged else '; the search did not converge'})")
    return capacity


# ---- 2. fidelity against perf_analyzer ------------------------------------------------------------

@dataclass
class Window:
    """One generator's measured window of a pair: latencies, and the client's share of their mean."""

    latencies_us: list[int]
    server_mean_us: float  # the server's own mean time per request over the window (Triton statistics)
    wire_us: list[int] = field(default_factory=list)  # the same requests' latencies on the wire (loadtest.wire)

    def p50_over_wire_us(self) -> float | None:
        """The generator's p50 minus the wire's for the same requests, µs (None without a capture)."""
        if not self.wire_us or not self.latencies_us:
            return None
        return float(percentile_us(self.latencies_us, 50) - percentile_us(self.wire_us, 50))

    @property
    def client_share_us(self) -> float:
        """Mean client latency minus the server's mean request time: the client's and the network's share."""
        return float(np.mean(self.latencies_us)) - self.server_mean_us if self.latencies_us else float("nan")


@dataclass
class Point:
    """One fidelity point: its pairs of windows (perf_analyzer and ours on one schedule, back to back)."""

    protocol: str
    rate_rps: float
    label: str
    duration_s: float  # measured seconds of each window at this point
    reference: list[Window] = field(default_factory=list)
    ours: list[Window] = field(default_factory=list)

    def ratios(self, name: str) -> list[float]:
        return pair_ratios([w.latencies_us for w in self.ours], [w.latencies_us for w in self.reference],
                           QUANTILE[name])

    def median(self, name: str) -> tuple[float, float, float]:
        return median_ratio([w.latencies_us for w in self.ours], [w.latencies_us for w in self.reference], QUANTILE[name])

    def pooled(self, name: str) -> tuple[float, float, float]:
        return percentile_ratio([w.latencies_us for w in self.ours], [w.latencies_us for w in self.reference],
                                QUANTILE[name])

    def over_wire(self, who: str, name: str) -> tuple[float, float, float]:
        """Median over pairs of ``who``'s percentile / the wire's for the same requests, and its interval."""
        windows = [w for w in (self.reference if who == "perf_analyzer" else self.ours) if w.wire_us]
        return median_ratio([w.latencies_us for w in windows], [w.wire_us for w in windows], QUANTILE[name])


class ServerTime:
    """The server's mean time per request of one model between two moments (Triton's statistics:
    receipt to response, queue included), to split a client's latency into server and client shares."""

    def __init__(self, url: str, model: str) -> None:
        self._client = grpcclient.InferenceServerClient(url)
        self._model = model
        self._before: dict = {}

    def start(self) -> None:
        self._before = snapshot_statistics(self._client, [self._model])[self._model]

    def mean_us(self) -> float:
        after = snapshot_statistics(self._client, [self._model])[self._model]
        count = after["success_count"] - self._before.get("success_count", 0)
        return (after["success_ns"] - self._before.get("success_ns", 0)) / count / 1000 if count else float("nan")

    def close(self) -> None:
        self._client.close()


def run_pair(analyzer, url: str, manifest: dict, point: Point, pair: int, args: argparse.Namespace) -> None:
    spec = spec_for(point.protocol, ArrivalSpec("poisson", rate_rps=point.rate_rps), args, seed=args.seed + pair,
                    duration_s=point.duration_s)
    plan = LoadJob(url, spec, manifest["models"][MODEL], str(manifest.get("target", "embedded")))
    server = ServerTime(url, plan.entry().triton_name(spec.variant))
    order = ("perf_analyzer", "ours") if pair % 2 == 0 else ("ours", "perf_analyzer")
    windows = {}
    port = loopback_port(url) if args.wire else None
    try:
        for who in order:
            server.start()
            with LoopbackCapture(port) if port is not None else contextlib.nullcontext() as capture:
                if who == "perf_analyzer":
                    reference = replay(analyzer, url, plan)
                    if reference is None:
                        print(f"{point.label:>26} {pair:4d} skipped: perf_analyzer failed twice (above)", flush=True)
                        return
                    latencies, first_send_ns = reference.latencies_us, reference.first_send_ns
                else:
                    result = run_load(url, manifest, spec)
                    latencies, first_send_ns = [r.latency_us for r in result.records if r.ok], result.window_start_us * 1000
            wire = [] if capture is None else window_latencies_us(
                capture, streaming=point.protocol == "stream", first_send_ns=first_send_ns, count=len(latencies))
            windows[who] = Window(latencies, server.mean_us(), wire)
    finally:
        server.close()
    reference, ours = windows["perf_analyzer"], windows["ours"]
    point.reference.append(reference)
    point.ours.append(ours)
    row = []
    for name in ("p50", "p99"):
        q = QUANTILE[name]
        pa_ms, ours_ms = percentile_us(reference.latencies_us, q) / 1000, percentile_us(ours.latencies_us, q) / 1000
        row.append(f"{pa_ms:7.3f} {ours_ms:7.3f} {ours_ms / pa_ms:6.3f}")
    print(f"{point.label:>26} {pair:4d} {'pa,ours' if order[0] == 'perf_analyzer' else 'ours,pa':>7} {' '.join(row)} "
          f"{reference.client_share_us:6.0f} {ours.client_share_us:6.0f} {_us(reference.p50_over_wire_us()):>6} "
          f"{_us(ours.p50_over_wire_us()):>6} {len(reference.latencies_us):5d} "
          f"{len(ours.latencies_us):5d} {result.late_arrivals:4d} {result.loadgen_cpu_percent:4.0f}%", flush=True)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def replay(analyzer, url: str, plan: LoadJob) -> ScheduleResult | None:
    """perf_analyzer's measurement of ``plan``'s schedule (a ``ScheduleResult``); one retry where a replay
    fails or hangs; None after two (``retried_once``)."""
    return retried_once(lambda: run_schedule(analyzer, url, plan,
                                             timeout_s=plan.spec.duration_s + plan.spec.warmup_s + 30.0),
                        "perf_analyzer replay")


def fidelity(analyzer, url: str, manifest: dict, points: list[Point], args: argparse.Namespace) -> None:
    print(f"\n== 2. fidelity: Poisson arrivals; {args.pairs} pairs per point: perf_analyzer (pa) and ours on one "
          "schedule, back to back, the order alternating; pairs visit the points in turn ==")
    print("perf_analyzer: --async --request-intervals, --max-threads "
          + ", ".join(f"{threads} ({protocol})" for protocol, threads in REPLAY_THREADS.items()))
    print("client = mean latency minus the server's mean time per request (Triton statistics, warm-up included), µs")
    print("+wire = p50 minus the wire's p50 for the same requests (loadtest.wire: kernel timestamps), µs"
          + ("" if args.wire else "; not measured (--no-wire or no capture)"))
    print(f"{'point':>26} {'pair':>4} {'order':>7} {'pa p50':>7} {'our p50':>7} {'ratio':>6} "
          f"{'pa p99':>7} {'our p99':>7} {'ratio':>6} {'client':>6} {'client':>6} {'+wire':>6} {'+wire':>6} "
          f"{'n pa':>5} {'n our':>5} {'late':>4} {'cpu':>5}")
    print(f"{'':>26} {'':>4} {'':>7} {'':>7} {'':>7} {'':>6} {'':>7} {'':>7} {'':>6} {'pa':>6} {'ours':>6} "
          f"{'pa':>6} {'ours':>6}")
    for pair in range(args.pairs):
        for point in points:
            run_pair(analyzer, url, manifest, point, pair, args)


def verdict(ratio: float, low: float, high: float, tolerance: float, pairs: int) -> str:
    """``met``/``MISSED`` on the ratio, and whether its interval decides it (never with fewer than
    :data:`MIN_PAIRS_TO_DECIDE` pairs: a bootstrap of the median of 3 values only spans those 3)."""
    met = abs(ratio - 1) <= tolerance
    inside = [abs(bound - 1) <= tolerance for bound in (low, high)]
    decided = all(inside) if met else not any(inside) and (low - 1) * (high - 1) > 0
    if pairs < MIN_PAIRS_TO_DECIDE:
        return f"{'met' if met else 'MISSED'} (undecided: {pairs} < {MIN_PAIRS_TO_DECIDE} pairs)"
    return f"{'met' if met else 'MISSED'} ({'decided' if decided else 'undecided'})"


def pairs_needed(pairs: int, low: float, high: float, tolerance: float) -> int:
    """Pairs for a 95% interval of the median ratio about ``+-tolerance`` wide (it narrows as 1/sqrt(pairs))."""
    if not (low > 0 and high > 0) or high == low:
        return pairs
    half_width = (np.log(high) - np.log(low)) / 2
    return max(2, int(np.ceil(pairs * (half_width / np.log1p(tolerance)) ** 2)))


def verdicts(points: list[Point]) -> None:
    print("\n== targets (issue 10): median over pairs of the per-pair ratio ours / perf_analyzer, 95% intervals "
          "(median: resampling pairs; pooled: the percentile of all pairs' requests, resampling pairs, then requests) ==")
    print(f"{'point':>26} {'pct':>4} {'median [95% CI]':>23} {'pooled [95% CI]':>23} {'range':>13} {'pairs':>5} "
          f"{'for +-band':>10} {'req/gen':>7}  band        verdict (on the median)")
    for point in points:
        for name, tolerance in TOLERANCE.items():
            ratios = point.ratios(name)
            if not ratios:
                print(f"{point.label:>26} {name:>4} no pair measured (perf_analyzer failed)")
                continue
            median, low, high = point.median(name)
            pooled, pooled_low, pooled_high = point.pooled(name)
            needed = pairs_needed(len(ratios), low, high, tolerance)
            per_generator = needed * sum(len(w.latencies_us) for w in point.reference) // len(point.reference)
            print(f"{point.label:>26} {name:>4} {median:6.3f} [{low:.3f}, {high:.3f}]  {pooled:6.3f} "
                  f"[{pooled_low:.3f}, {pooled_high:.3f}]  {min(ratios):.2f}..{max(ratios):.2f} {len(ratios):5d} "
                  f"{needed:10d} {per_generator:7d}  1.00+-{tolerance:.2f}  {name} {verdict(median, low, high, tolerance, len(ratios))}")
        print(f"{'':>26} per-pair ratios p50: {' '.join(f'{r:.2f}' for r in point.ratios('p50'))}; "
              f"p99: {' '.join(f'{r:.2f}' for r in point.ratios('p99'))}")
        shares = [(r.client_share_us, o.client_share_us) for r, o in zip(point.reference, point.ours)]
        print(f"{'':>26} client share (mean latency - server's mean), median over pairs: perf_analyzer "
              f"{np.median([s[0] for s in shares]):.0f} µs, ours {np.median([s[1] for s in shares]):.0f} µs")
        if any(w.wire_us for w in point.ours + point.reference):
            for name in TOLERANCE:
                over = {who: point.over_wire(who, name) for who in ("perf_analyzer", "ours")}
                print(f"{'':>26} against the wire, {name} / the wire's, median over pairs [95% CI]: "
                      + "; ".join(f"{who} {m:.3f} [{lo:.3f}, {hi:.3f}]" for who, (m, lo, hi) in over.items()))
            above = [(r.p50_over_wire_us(), o.p50_over_wire_us())
                     for r, o in zip(point.reference, point.ours) if r.wire_us and o.wire_us]
            print(f"{'':>26} p50 above the wire's, median over pairs: perf_analyzer "
                  f"{np.median([a[0] for a in above]):+.0f} µs, ours {np.median([a[1] for a in above]):+.0f} µs")
    print("against the wire: each generator's percentile over the wire's for the same requests (1.000: it adds "
          "nothing to what the kernel saw)")
    print("for +-band: pairs this point would need for a median interval of +-band (from this run's spread); "
          "req/gen: requests per generator that takes")


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
                            duration_s=args.loadgen_s, warmup_s=1.0, transport=args.transport)
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
    parser.add_argument("--pairs", type=int, default=8, help="pairs of windows (perf_analyzer, ours) per point")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds of each window at --rate")
    parser.add_argument("--multiple-duration-s", type=float, default=2.0,
                        help="measured seconds of each window at --multiple x capacity")
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--probe-s", type=float, default=2.0, help="measured seconds of each capacity probe")
    parser.add_argument("--capacity-start", type=float, default=400.0)
    parser.add_argument("--capacity-probes", type=int, default=6)
    parser.add_argument("--capacity", nargs="+", default=[], metavar="PROTOCOL=REQ_PER_S",
                        help="skip part 1 for these protocols and take this capacity (e.g. unary=1600)")
    parser.add_argument("--loadgen-rate", type=float, default=3000.0)
    parser.add_argument("--loadgen-s", type=float, default=8.0, help="measured seconds of the generator-capacity run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", default="", choices=["", *TRANSPORTS],
                        help="our generator's transport (default: loadtest.client.DEFAULT_TRANSPORT)")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--no-wire", dest="wire", action="store_false",
                        help="do not time the fidelity windows on the wire (loadtest.wire)")
    parser.add_argument("--skip-loadgen-capacity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short runs while developing (rough figures)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.duration_s, args.multiple_duration_s, args.probe_s, args.capacity_probes = 3, 3.0, 1.0, 1.5, 3
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
    if analyzer is not None and args.wire:
        try:
            LoopbackCapture(0).close()
            print("wire: the loopback is captured during every fidelity window (loadtest.wire)")
        except WireUnavailable as error:
            args.wire = False
            print(f"wire: skipped: {error}")
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
    print(f"bench duration: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
