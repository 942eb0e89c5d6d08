"""perf_analyzer 2.51, Triton's own C++ load generator, as the reference for this project's generator.

The PyPI package ``perf-analyzer`` is a placeholder; the binary ships inside the
``tritonclient==2.51.0`` wheel (the release of the embedded tritonserver). :func:`ensure_perf_analyzer`
downloads that wheel once with pip, extracts the binary into a cache
(``~/.cache/stagebatch/perf_analyzer``, or ``$STAGEBATCH_CACHE/perf_analyzer``) and links the two
shared libraries it needs and the machine may lack: ``libb64.so.0d`` and ``libcudart.so.12``, taken
from the ``nvidia-pytriton`` wheel's bundled libraries, or from the system (``apt-get install
libb64-0d``). Where something cannot be had, it raises :class:`PerfAnalyzerUnavailable` (a
:class:`~core.errors.StagebatchError`) saying what is missing and how to get it.

:func:`run_schedule` replays an exact arrival schedule with ``--request-intervals`` (async calls, so
it stays open loop, from one worker thread: :data:`REPLAY_THREADS` says why) and reads the
per-request timestamps of ``--profile-export-file``, so both generators are summarised over the
same requests (the warm-up cut the same way).
:func:`cross_check` runs one steady point with both generators.

    from loadtest.perf_analyzer import cross_check
    result = cross_check(server.grpc_url, manifest, spec)   # {"status": "ok"|"skipped", ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from loadtest.client import DEFAULT_PROTOCOL, RECORD_VARIANTS, REORCH_RECORD_PARAMETER, parse_targets
from loadtest.driver import LoadJob, LoadSpec, run_load
from loadtest.request_factory import RequestFactory, model_entry
from loadtest.sender import open_loop_schedule
from loadtest.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_difference, percentile_us
from loadtest.wire import LoopbackCapture, WireUnavailable, loopback_port, window_latencies_us
from core.errors import StagebatchError

LOGGER = logging.getLogger(__name__)

PERF_ANALYZER_VERSION = "2.51.0"
WHEEL_MEMBER = f"tritonclient-{PERF_ANALYZER_VERSION}.data/data/bin/perf_analyzer"
NEEDED_LIBRARIES = {
    "libb64.so.0d": ("libb64-*.so.0d", "apt-get install -y libb64-0d (after apt-get update)"),
    "libcudart.so.12": ("libcudart-*.so.12*", "pip install nvidia-pytriton (its wheel bundles libcudart.so.12)"),
}
PYTRITON_LIBS = "nvidia_pytriton.libs"
SYSTEM_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
DOWNLOAD_TIMEOUT_S = 300.0


class PerfAnalyzerUnavailable(StagebatchError):
    """perf_analyzer cannot be set up on this machine; the message says what is missing and how to fix it."""


def default_cache_dir() -> Path:
    base = os.environ.get("STAGEBATCH_CACHE") or (Path.home() / ".cache" / "stagebatch")
    return Path(base) / "perf_analyzer"


@dataclass
class PerfAnalyzer:
    """A runnable perf_analyzer: the binary and the folder of libraries it needs on ``LD_LIBRARY_PATH``."""

    binary: Path
    lib_dir: Path

    def env(self) -> dict[str, str]:
        previous = os.environ.get("LD_LIBRARY_PATH", "")
        return {**os.environ, "LD_LIBRARY_PATH": f"{self.lib_dir}:{previous}" if previous else str(self.lib_dir)}

    def run(self, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env(),
                              timeout=timeout_s, check=False)


def _download_binary(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="stagebatch-pa-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                   f"tritonclient=={PERF_ANALYZER_VERSION}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            done = subprocess.CompletedProcess(command, 1, "", str(error))
        wheels = sorted(Path(tmp).glob(f"tritonclient-{PERF_ANALYZER_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise PerfAnalyzerUnavailable(
                f"perf_analyzer: cannot download the tritonclient=={PERF_ANALYZER_VERSION} wheel that carries it "
                f"({last[0]}). Fix: give this machine access to a Python package index, or download the wheel "
                f"elsewhere and place its member {WHEEL_MEMBER} at {target}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as member:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                with open(partial, "wb") as out:
                    shutil.copyfileobj(member, out)
        except (KeyError, zipfile.BadZipFile, OSError) as error:
            raise PerfAnalyzerUnavailable(
                f"perf_analyzer: the wheel {wheels[0].name} has no usable {WHEEL_MEMBER} ({error})"
            ) from None
        partial.chmod(0o755)
        partial.replace(target)


def _library_candidates(pattern: str, exact: str, search_dirs: list[Path]) -> list[Path]:
    found: list[Path] = []
    for directory in search_dirs:
        found += sorted(directory.glob(pattern)) + ([directory / exact] if (directory / exact).exists() else [])
    return found


def _default_search_dirs() -> list[Path]:
    site = Path(sysconfig.get_paths()["purelib"])
    return [site / PYTRITON_LIBS, *(Path(d) for d in SYSTEM_LIBRARY_DIRS)]


def ensure_perf_analyzer(cache_dir: Path | None = None, *, search_dirs: list[Path] | None = None,
                         download: bool = True) -> PerfAnalyzer:
    """perf_analyzer 2.51, set up in ``cache_dir`` on first use; :class:`PerfAnalyzerUnavailable` if it cannot be.

    ``search_dirs``: where to look for the shared libraries (default: the nvidia-pytriton wheel's
    bundled libraries, then the system's). ``download=False``: only use what the cache has.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    binary = cache / "perf_analyzer"
    lib_dir = cache / "lib"
    if not binary.exists():
        if not download:
            raise PerfAnalyzerUnavailable(f"perf_analyzer: {binary} does not exist and downloading is off")
        _download_binary(binary)
    lib_dir.mkdir(parents=True, exist_ok=True)
    dirs = search_dirs if search_dirs is not None else _default_search_dirs()
    missing = []
    for name, (pattern, fix) in NEEDED_LIBRARIES.items():
        link = lib_dir / name
        if link.exists():
            continue
        candidates = _library_candidates(pattern, name, dirs)
        if not candidates:
            missing.append(f"{name} (fix: {fix})")
            continue
        if link.is_symlink():
            link.unlink()  # a dangling link from an earlier setup
        link.symlink_to(candidates[0].resolve())
    if missing:
        raise PerfAnalyzerUnavailable(
            "perf_analyzer: shared libraries not found: " + "; ".join(missing)
            + f". Searched {', '.join(str(d) for d in dirs)}"
        )
    analyzer = PerfAnalyzer(binary, lib_dir)
    try:
        probe = analyzer.run(["--version"], timeout_s=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PerfAnalyzerUnavailable(f"perf_analyzer: {binary} does not run ({error})") from None
    if "error while loading shared libraries" in probe.stderr:
        raise PerfAnalyzerUnavailable(f"perf_analyzer: {probe.stderr.strip()} (libraries linked in {lib_dir})")
    return analyzer


@dataclass
class ScheduleResult:
    """What perf_analyzer measured over the requests scheduled after the warm-up."""

    p50_ms: float
    p99_ms: float
    throughput_rps: float
    requests: int
    latencies_us: list[int]
    first_send_ns: int = 0  # when the window's first request was sent (perf_analyzer's clock: the wall clock, ns)

    def to_dict(self) -> dict[str, float]:
        return {"p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "throughput_rps": self.throughput_rps,
                "requests": self.requests}


# perf_analyzer's --max-threads per protocol: one worker thread, asynchronous calls, for both.
#
# How 2.51 times a request (perf_analyzer src/infer_context.cc, InferContext::SendRequest and
# AsyncCallbackFuncImpl; the client library's src/c++/library/grpc_client.cc): the start is taken
# on the worker thread before the request's protobuf is built; the end in the completion callback,
# on a thread of the client library (per worker for unary calls, the completion queue's
# AsyncTransfer; per stream when streaming, AsyncStreamTransfer), after gRPC has parsed the response
# and handed it over. Each worker thread has its own client, completion-queue thread and share of
# the schedule (dealt round-robin), and async sends never wait, so one thread keeps an open-loop
# schedule; more threads only add threads that wake on the machine's cores.
#
# Measured on the 2-core machine, same server and schedules, interleaved, under contention:
# - unary to the tiny bert_base whole at 1,600 req/s (0.5x its capacity; 12 rounds of 2 s): one
#   thread's p50 was 0.87x [0.77, 0.99] of 64 threads', its client share (mean latency less Triton's
#   mean request time) 105 µs [-38, 315] smaller, its own csv's "Network+Server Send/Recv" 369
#   against 571 µs, with as few late sends (0.2% each more than 2 ms late); at 1,000 req/s (12 rounds
#   of 3 s) p50 0.93x [0.64, 1.08], client share 141 µs [13, 362] smaller;
# - at 100 req/s (17 rounds of 6 s) the thread count made no difference (p50 1.00x [0.86, 1.03],
#   client share -36 µs [-112, 171]), nor did blocking calls (--sync, 64 threads: 1.00x [0.94, 1.05]);
# - streaming, where each thread opens its own stream, 64 threads (64 streams of about 11 req/s
#   each at 700 req/s) read about 1.2x the p50 of one thread (8 rounds, docs/loadgen.md).
# One thread, one connection or one stream, like this project's sender.
REPLAY_THREADS = {"unary": 1, "stream": 1}


def _input_data(factory: RequestFactory, lengths: list[int | None]) -> dict[str, Any]:
    steps = []
    for seq_len in lengths:
        arrays = factory.arrays(seq_len)
        steps.append({name: {"content": array[0].reshape(-1).tolist() if factory.rows == 1 else array.reshape(-1).tolist(),
                             "shape": list(array.shape[1:]) if factory.rows == 1 else list(array.shape)}
                      for name, array in arrays.items()})
    return {"data": steps}


_T = TypeVar("_T")


def retry_once(run: Callable[[], _T], what: str) -> _T:
    """``run()``, once more where it raises StagebatchError (perf_analyzer 2.51 was seen, rarely, never
    finishing a run the same server answered on the retry); the first failure is printed as ``what,
    attempt 1: error``, the second is raised."""
    try:
        return run()
    except StagebatchError as error:
        print(f"{what}, attempt 1: {error}", flush=True)
    return run()


def retried_once(run: Callable[[], _T], what: str) -> _T | None:
    """``retry_once``, printing the second failure too (``what, attempt 2: error``): None after two."""
    try:
        return retry_once(run, what)
    except StagebatchError as error:
        print(f"{what}, attempt 2: {error}", flush=True)
        return None


def _run_checked(analyzer: PerfAnalyzer, args: list[str], timeout_s: float, produced: Path) -> None:
    """Run perf_analyzer; StagebatchError (with its last lines) unless it exits 0 and writes ``produced``."""
    try:
        done = analyzer.run(args, timeout_s=timeout_s)
    except subprocess.TimeoutExpired as expired:
        raise StagebatchError(f"perf_analyzer did not finish within {timeout_s:.0f} s; its last lines:\n"
                              f"{_tail(expired.stdout, expired.stderr)}") from None
    if done.returncode != 0 or not produced.exists():
        raise StagebatchError(f"perf_analyzer failed (exit code {done.returncode}):\n{_tail(done.stdout, done.stderr)}")


def _exported_requests(path: Path) -> list[dict[str, Any]]:
    """The requests of a ``--profile-export-file``, in the order they were sent (none if it is missing)."""
    export = json.loads(path.read_text()) if path.exists() else {}
    requests = [r for experiment in export.get("experiments", []) for r in experiment.get("requests", [])]
    requests.sort(key=lambda r: r["timestamp"])
    return requests


def _latencies_and_rate(answered: list[dict[str, Any]]) -> tuple[list[int], float]:
    """Latency (µs, to the first response) of each answered exported request, and their rate (req/s)
    from the first request sent to the last response."""
    latencies_us = [(r["response_timestamps"][0] - r["timestamp"]) // 1000 for r in answered]
    span_s = (max(r["response_timestamps"][-1] for r in answered) - min(r["timestamp"] for r in answered)) / 1e9
    return latencies_us, len(answered) / span_s if span_s > 0 else float("nan")


def _tail(*outputs: str | bytes | None, lines: int = 8) -> str:
    text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o for o in outputs if o)
    return "\n".join(text.strip().splitlines()[-lines:])


def run_schedule(
    analyzer: PerfAnalyzer,
    url: str,
    plan: LoadJob,
    *,
    timeout_s: float | None = None,
    max_threads: int | None = None,
) -> ScheduleResult:
    """Replay ``plan``'s open-loop schedule with perf_analyzer; summarise the measured window.

    ``timeout_s`` (default: the schedule's duration plus a minute) bounds the replay: perf_analyzer
    2.51 with ``--streaming`` was seen waiting for ever on the (non-decoupled) reorchestrator.
    ``max_threads``: perf_analyzer's worker threads (default :data:`REPLAY_THREADS` of the protocol;
    when streaming, each thread has its own stream).
    """
    spec = plan.spec
    timeout_s = timeout_s if timeout_s is not None else spec.duration_s + 60.0
    entry = plan.entry()
    target = parse_targets(url)[0]
    times_s, lengths = open_loop_schedule(plan)
    if len(times_s) < 2:
        raise StagebatchError(f"perf_analyzer: the schedule has {len(times_s)} arrivals; give a longer duration")
    intervals_us = np.diff(np.concatenate([[0.0], times_s]) * 1e6).round().astype(np.int64).clip(min=1)
    factory = RequestFactory(entry, spec.variant, rows=spec.rows, seed=[spec.seed, 3, 0])
    distinct = sorted(set(lengths.tolist())) if lengths is not None else [None]
    # one data step per distinct length, picked in schedule order (perf_analyzer cycles its steps)
    step_lengths = lengths.tolist() if lengths is not None and len(distinct) > 1 else distinct
    protocol = spec.protocol or DEFAULT_PROTOCOL[spec.variant]
    max_threads = max_threads or REPLAY_THREADS[protocol]
    with tempfile.TemporaryDirectory(prefix="stagebatch-pa-run-") as tmp:
        work = Path(tmp)
        (work / "intervals.txt").write_text("\n".join(str(v) for v in intervals_us.tolist()) + "\n")
        (work / "input.json").write_text(json.dumps(_input_data(factory, step_lengths)))
        args = [
            "-m", entry.triton_name(spec.variant), "-u", target.removeprefix("dns:///"), "-i", "grpc", "--async",
            "-b", str(spec.rows),
            "--request-intervals", str(work / "intervals.txt"), "--request-count", str(len(times_s)),
            "--input-data", str(work / "input.json"), "--profile-export-file", str(work / "profile.json"),
            "--max-threads", str(max_threads),
        ]  # fmt: skip
        if protocol == "stream":
            args.append("--streaming")
        if spec.variant in RECORD_VARIANTS:
            args += ["--request-parameter", f"{REORCH_RECORD_PARAMETER}:true:bool"]
        _run_checked(analyzer, args, timeout_s, work / "profile.json")
        requests = _exported_requests(work / "profile.json")
    if not requests:
        raise StagebatchError("perf_analyzer's profile export holds no requests")
    # perf_analyzer 2.51 may send a few requests past --request-count (its threads finish their
    # turn): the schedule's i-th arrival is the i-th request sent, and only those are measured
    in_window = times_s >= spec.warmup_s
    window = [r for r, keep in zip(requests, in_window) if keep and r.get("response_timestamps")]
    if not window:
        raise StagebatchError("perf_analyzer answered no request of the measured window")
    latencies, throughput_rps = _latencies_and_rate(window)
    return ScheduleResult(
        p50_ms=percentile_us(latencies, 50) / 1000,
        p99_ms=percentile_us(latencies, 99) / 1000,
        throughput_rps=throughput_rps,
        requests=len(latencies),
        latencies_us=latencies,
        first_send_ns=int(window[0]["timestamp"]),
    )


def percentile_ratio(ours_runs: Sequence[Sequence[int]], reference_runs: Sequence[Sequence[int]], q: float,
                     **bootstrap: Any) -> tuple[float, float, float]:
    """The ratio of the pooled ``q``-th percentiles (ours / reference) and its 95% bootstrap interval.

    Each side is a list of runs (repeats) of request latencies. The interval comes from
    :func:`loadtest.stats.bootstrap_difference` on the logarithm of the percentile: it resamples
    the runs, then the requests inside each, so it covers both how far a tail percentile such as p99
    moves with the samples alone (at 100 req/s a p99 rests on 1% of the requests) and how far the
    machine drifted between repeats. ``bootstrap``: its ``resamples``/``seed``/``confidence``.
    """
    if not any(len(run) for run in ours_runs) or not any(len(run) for run in reference_runs):
        return float("nan"), float("nan"), float("nan")
    log_ratio = bootstrap_difference(reference_runs, ours_runs, lambda x: float(np.log(np.percentile(x, q))), **bootstrap)
    return float(np.exp(log_ratio.estimate)), float(np.exp(log_ratio.low)), float(np.exp(log_ratio.high))


def pair_ratios(ours_runs: Sequence[Sequence[int]], reference_runs: Sequence[Sequence[int]], q: float) -> list[float]:
    """Per pair, the ratio of the ``q``-th percentiles (nearest rank, as each window's own figures),
    ours / reference; pairs with an empty side are left out."""
    return [percentile_us(ours, q) / percentile_us(ref, q)
            for ours, ref in zip(ours_runs, reference_runs) if len(ours) and len(ref)]


def median_ratio(ours_runs: Sequence[Sequence[int]], reference_runs: Sequence[Sequence[int]], q: float, *,
                 confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """The median over paired runs of the per-run ratio of ``q``-th percentiles (``pair_ratios``),
    and its percentile-bootstrap interval.

    ``ours_runs[i]`` and ``reference_runs[i]`` are one pair: both generators on the same schedule,
    back to back, so the machine's drift between pairs cancels inside each ratio. The interval
    resamples the pairs (each pair's ratio already carries its own sampling noise). Pairs with an
    empty side are left out; NaNs when none is left.
    """
    ratios = np.array(pair_ratios(ours_runs, reference_runs, q))
    if not ratios.size:
        return float("nan"), float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(ratios.size, size=(resamples, ratios.size))
    medians = np.median(ratios[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(ratios)), float(low), float(high)


def stagebatch_summary(records: list, duration_s: float) -> dict[str, float]:
    """The same summary for this project's generator (records of the measured window)."""
    latencies = [r.latency_us for r in records if r.ok]
    return {"p50_ms": percentile_us(latencies, 50) / 1000, "p99_ms": percentile_us(latencies, 99) / 1000,
            "throughput_rps": len(latencies) / duration_s if duration_s else float("nan"), "requests": len(latencies)}


def cross_check(
    url: str,
    manifest: dict[str, Any],
    spec: LoadSpec,
    *,
    cache_dir: Path | None = None,
    analyzer: PerfAnalyzer | None = None,
) -> dict[str, Any]:
    """Replay one steady open-loop point with perf_analyzer and with this project's generator, and
    time both on the wire where the server is on this machine's loopback (:mod:`loadtest.wire`).

    Returns ``{"status": "ok"|"skipped", "reason", "model", "variant", "rate_rps", "protocol",
    "perf_analyzer": {"p50_ms", "p99_ms", "throughput_rps", "requests", ["wire_p50_ms", "wire_p99_ms"]},
    "stagebatch": {...}, "wire": {"status": "ok"|"skipped", "reason"}}``; ``skipped`` (with the reason)
    where perf_analyzer cannot be set up or run. Never raises for that, nor for the wire.
    """
    rate = getattr(spec.arrival, "rate_rps", None)
    result: dict[str, Any] = {
        "status": "skipped", "reason": None, "model": spec.model, "variant": spec.variant, "rate_rps": rate,
        "protocol": spec.protocol or DEFAULT_PROTOCOL[spec.variant], "duration_s": spec.duration_s,
        "arrival": spec.arrival.to_dict(), "perf_analyzer": None, "stagebatch": None,
        "wire": {"status": "skipped", "reason": None},
    }  # fmt: skip
    if not spec.arrival.is_open_loop:
        result["reason"] = "perf_analyzer replays open-loop schedules only; this point is closed loop"
        return result
    port = loopback_port(url)
    wire: dict[str, list[int]] = {}

    def timed(name: str, run: Callable[[], tuple[Any, int, int]]) -> Any:
        """``run()`` -> (its result, first send ns in the window, requests); captured when the wire can be."""
        if port is None:
            result["wire"]["reason"] = f"the server {url} is not one loopback address"
            return run()[0]
        try:
            capture = LoopbackCapture(port)
        except WireUnavailable as error:
            result["wire"]["reason"] = str(error)
            return run()[0]
        with capture:
            value, first_send_ns, count = run()
        wire[name] = window_latencies_us(capture, streaming=result["protocol"] == "stream",
                                         first_send_ns=first_send_ns, count=count)
        return value

    try:
        analyzer = analyzer or ensure_perf_analyzer(cache_dir)
        plan = LoadJob(url, spec, manifest["models"][spec.model], str(manifest.get("target", "embedded")))
        model_entry(manifest, spec.model)  # a clear error for an unknown model

        def replayed() -> tuple[ScheduleResult, int, int]:
            reference = retry_once(lambda: run_schedule(analyzer, url, plan), "load-generator cross-check replay")
            return reference, reference.first_send_ns, reference.requests

        def ours_run() -> tuple[Any, int, int]:
            run = run_load(url, manifest, spec)
            return run, run.window_start_us * 1000, sum(1 for r in run.records if r.ok)

        reference = timed("perf_analyzer", replayed)
        ours = timed("stagebatch", ours_run)
    except StagebatchError as error:
        result["reason"] = str(error)
        LOGGER.warning("load-generator cross-check skipped: %s", error)
        return result
    sides = {"perf_analyzer": reference.to_dict(), "stagebatch": stagebatch_summary(ours.records, ours.duration_s)}
    if all(wire.get(name) for name in sides):
        result["wire"] = {"status": "ok", "reason": None}
        for name, side in sides.items():
            side.update(wire_p50_ms=percentile_us(wire[name], 50) / 1000, wire_p99_ms=percentile_us(wire[name], 99) / 1000)
    elif port is not None and not result["wire"]["reason"]:
        result["wire"]["reason"] = "no request of the window was paired with its answer on the wire"
    result.update(status="ok", **sides)
    return result


@dataclass
class PointResult:
    """perf_analyzer's figures at one load point (one measurement of a fixed request count)."""

    throughput_rps: float
    p50_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float  # compute input + infer + output, per request, from Triton's statistics


def measure_point(analyzer: PerfAnalyzer, url: str, model: str, entry: Any, variant: str, *,
                  concurrency: int | None = None, rate_rps: float | None = None, requests: int = 4000,
                  seq_len: int | None = None, timeout_s: float = 120.0) -> PointResult:
    """Drive the Triton model ``model`` with unary gRPC calls from perf_analyzer (async, C++: not the
    limit a Python client is), with inputs made for ``variant`` of ``entry`` (a manifest entry, as
    ``model_entry`` gives) and no request parameters (no record asked): either closed loop with
    ``concurrency`` calls outstanding, or open loop at ``rate_rps`` with Poisson arrivals.

    One measurement of ``requests`` requests (``--request-count``: no stabilisation windows, which
    a busy 2-core machine often fails; the caller's repeats judge stability). One input step of
    ``seq_len`` (sequence models). Throughput and latencies come from the per-request timestamps of
    ``--profile-export-file``: in this mode 2.51's csv rate is the count over whole seconds
    (4,000 requests read 1,995/s whether they took 1.1 or 2.0 s).
    """
    if (concurrency is None) == (rate_rps is None):
        raise StagebatchError("perf_analyzer load point: give exactly one of concurrency and rate_rps")
    target = parse_targets(url)[0]
    factory = RequestFactory(entry, variant, seed=[0, 3, 0])
    load = (["--concurrency-range", str(concurrency)] if concurrency is not None else
            ["--request-rate-range", f"{rate_rps:.3f}", "--request-distribution", "poisson"])
    with tempfile.TemporaryDirectory(prefix="stagebatch-pa-point-") as tmp:
        work = Path(tmp)
        (work / "input.json").write_text(json.dumps(_input_data(factory, [seq_len])))
        args = ["-m", model, "-u", target.removeprefix("dns:///"), "-i", "grpc", "--async", *load,
                "--request-count", str(requests), "--input-data", str(work / "input.json"),
                "-f", str(work / "out.csv"), "--profile-export-file", str(work / "profile.json")]
        _run_checked(analyzer, args, timeout_s, work / "out.csv")
        header, *rows = [line.split(",") for line in (work / "out.csv").read_text().strip().splitlines()]
        answered = [r for r in _exported_requests(work / "profile.json") if r.get("response_timestamps")]
    if not rows:
        raise StagebatchError("perf_analyzer wrote no measurement")
    row = dict(zip(header, rows[0]))
    compute_us = sum(float(row[f"Server Compute {part}"]) for part in ("Input", "Infer", "Output"))
    result = PointResult(throughput_rps=float(row["Inferences/Second"]), p50_ms=float(row["p50 latency"]) / 1000,
                         p99_ms=float(row["p99 latency"]) / 1000, server_queue_ms=float(row["Server Queue"]) / 1000,
                         server_compute_ms=compute_us / 1000)
    if answered:  # else the csv's own figures (an export without requests)
        latencies_us, result.throughput_rps = _latencies_and_rate(answered)
        result.p50_ms, result.p99_ms = percentile_us(latencies_us, 50) / 1000, percentile_us(latencies_us, 99) / 1000
    return result
