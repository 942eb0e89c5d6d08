"""Issue 12's targets, side by side: the reorchestrator's default policy (dva) vs the whole model.

On the embedded server every model is served as ``NAME`` (whole model, Triton's dynamic batcher)
and ``NAME_reorch_<policy>``; each run drives one variant with open-loop arrivals over unary gRPC
(tritonclient.grpc.aio), as a user calls it: no REORCH_RECORD is asked (building and parsing its
JSON is the characterization's cost, not the reorchestrator's); what reorch did comes from its
counters on the metrics port instead. Runs of the variants are interleaved (the order alternates
per repeat) and repeated ``--repeats`` times (>= 3); each target is judged on the per-repeat ratio
reorch / whole with a 95% confidence interval (Student t; ratios on their logarithms: geometric
means). Where that interval still holds the
target's limit after the first repeats, more repeats follow (up to ``--max-repeats``) while the
time budget (``--budget-min``) lasts: the undecided target with the fewest repeats first.

Targets (``--targets``; all by default):

- ``steady``: Poisson at 0.3x, 0.6x and 0.85x of the whole model's capacity, fixed length, every
  model: the default policy's average latency <= 1.05x the whole model's (upper CI bound);
- ``diversity``: bert_base under ``bursty`` (on/off Poisson, 1.6x / 0.1x capacity) and
  ``longtail`` (Poisson 0.6x, log-normal lengths): average latency -46% or better with the CI
  excluding 0, and goodput at the SLO (completions within ``--slo-ms``, default: the whole model's
  p99 in the same repeat, per second) at least the whole model's;
- ``p50``: Poisson at 0.1x capacity, one row per request, every model, sent by perf_analyzer (the
  Python client where it cannot be had): reorch p50 <= whole p50 + 0.3 ms;
- ``answers``: a closed-loop flood of ``--answers-model``'s reorch variant (tiny lstm in the
  issue; the repository's size here): answers/s >= 10,000 from one instance, driven by perf_analyzer
  (Triton's C++ client, ``--flood-concurrency`` async unary calls; loadtest.perf_analyzer sets it up)
  so the client is not the limit. Where perf_analyzer cannot be had, the Python client floods
  instead and the bench says why. The same client against the whole model shows the client's own
  ceiling (then it says so).

Each run also prints the server's CPU time per request (tritonserver and its Python stubs, which
other load on the machine disturbs less than latency) and, from Triton's statistics, the front
batcher's average batch (``batch``: requests per ``execute``) and queue time per request
(``queue``, ms), and reorch's operations and rows per stage launch (its metrics, flushed each
second, so a run's counts are approximate): where the extra time goes.

Each open-loop run's measured window is also judged for stability as a characterization point is
(``loadtest.stability``: completions keep up, the backlog neither grows nor stands). A run that fails
it is marked ``UNSTABLE (reason)`` on its line, and a target judged on such repeats says in how many of
them, per variant: there the average is the queue's, not the batcher's (0.85x sits near the knee, and
this machine's speed drifts by more than the 15% headroom between the capacity search and a run).

Capacity is measured first per model: the highest Poisson rate the whole model sustains, searched
with open-loop probes (``loadtest.capacity``, each probe judged by ``loadtest.stability``, as the
characterization does), started from a short closed-loop run. The closed loop alone (2 x max batch
calls outstanding) fills batches that Poisson arrivals do not: at 0.85x of it the whole model itself
held a growing queue in 3 of 6 bert_base repeats, and every latency there was the queue's.
Every unmet target is printed plainly at the end (``UNMET``), with the undecided ones (CI still
holding the limit) marked.
``--control`` runs every target as an A/A comparison: the side that is reorch otherwise is
``NAME_control``, a second copy of the whole model (same files, same config, its own instance),
with the same schedules, repeats and verdicts. Nothing is there to find, so its intervals are
this machine's noise floor: a target whose control interval cannot fit inside the limit cannot be
decided here for any implementation.
``--quick`` fits in about 7 minutes (3 s runs, budget 6.5 min), the full run in about 12 (5 s runs,
budget 11.5 min), so the figures can be re-run on a quiet machine.

    stagebatch build -m bert_base -m lstm -m resnet50 --size small -o model_repository
    .venv/bin/python bench/reorchestration.py --repository model_repository [--quick]

This machine has 2 cores shared by the client and the server: figures are relative, the client
costs CPU too, and a pipeline of stages cannot add parallelism here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.model_config import read_model_config, write_model_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.reorch.policies import BatchPolicy, ReorchKnobs  # noqa: E402
from backends.reorch.spec import RECORD_OUTPUT  # noqa: E402
from loadtest.capacity import Probe, SearchSettings, search_capacity  # noqa: E402
from loadtest.perf_analyzer import (  # noqa: E402
    PerfAnalyzer,
    PerfAnalyzerUnavailable,
    ensure_perf_analyzer,
    measure_point,
    retried_once,
)
from loadtest.request_factory import RequestFactory, infer_inputs, model_entry  # noqa: E402
from loadtest.server_stats import diff_reorch_metrics, scrape_metrics  # noqa: E402
from loadtest.stability import Stability, assess  # noqa: E402
from loadtest.workloads import LongTailLengths, OnOffArrivals, PoissonArrivals  # noqa: E402
from core.errors import StagebatchError  # noqa: E402
from core.manifest import read_manifest  # noqa: E402
from core.reorch_deploy import write_reorch_model  # noqa: E402
from core.server import EmbeddedTriton  # noqa: E402

SCENARIOS = ("bursty", "longtail", "steady", "overload")
TARGETS = ("steady", "diversity", "p50", "answers")
# Two-sided 95% Student t quantiles by degrees of freedom (no scipy in the venv).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Outcome:
    variant: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unanswered: int = 0
    throughput_rps: float = 0.0
    records: list[dict] = field(default_factory=list)
    stability: Stability | None = None  # the measured window's verdict (loadtest.stability)


def _inputs(arrays: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient

    return infer_inputs(grpcclient, arrays)


async def drive(url: str, model: str, arrivals_s: np.ndarray, inputs: list, warmup_s: float,
                drain_s: float, streaming: bool, parameters: dict | None = None, duration_s: float | None = None,
                period_s: float | None = None) -> Outcome:
    """Open loop: request i is sent at arrivals_s[i] whatever happened before (one gRPC stream, or
    concurrent unary calls). The measured window (from ``warmup_s`` to ``duration_s``, default: the
    last arrival) is judged for stability like a characterization point (``measured_stability``);
    ``period_s`` is the arrival process's period (bursty), to align its sub-windows."""
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    sent: dict[int, float] = {}
    done: dict[int, float] = {}
    failed: dict[int, float] = {}  # unary calls answered with an error
    outcome = Outcome(model)
    start = time.perf_counter() + 0.05

    async def requests():
        for index, at in enumerate(arrivals_s):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[index] = time.perf_counter()
            yield {"model_name": model, "inputs": inputs[index], "request_id": str(index), "parameters": parameters}

    async def receive():
        async for result, error in client.stream_infer(requests()):
            now = time.perf_counter()
            if error is not None:
                outcome.errors.append(str(error))
                continue
            index = int(result.get_response().id)
            done[index] = now
            if index in sent and sent[index] - start >= warmup_s:
                outcome.latencies_ms.append((now - sent[index]) * 1e3)
                _keep_record(outcome, result)
            if len(done) + len(outcome.errors) >= len(arrivals_s):
                return

    def record(index: int, result, now: float) -> None:
        done[index] = now
        if sent[index] - start >= warmup_s:
            outcome.latencies_ms.append((now - sent[index]) * 1e3)
            _keep_record(outcome, result)

    async def one(index: int) -> None:
        try:
            result = await client.infer(model, inputs[index], request_id=str(index), parameters=parameters)
        except Exception as error:  # noqa: BLE001 (counted and reported)
            outcome.errors.append(str(error))
            failed[index] = time.perf_counter()
            return
        record(index, result, time.perf_counter())

    async def unary() -> None:
        tasks = []
        for index, at in enumerate(arrivals_s):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[index] = time.perf_counter()
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)

    deadline = float(arrivals_s[-1]) + drain_s if len(arrivals_s) else drain_s
    try:
        await asyncio.wait_for(receive() if streaming else unary(), timeout=deadline + 5)
    except asyncio.TimeoutError:
        pass
    finally:
        await client.close()
    measured = [i for i in sent if sent[i] - start >= warmup_s]
    finished = [i for i in measured if i in done]
    outcome.unanswered = len(arrivals_s) - len(done) - len(outcome.errors)
    if finished:
        span = max(done[i] for i in finished) - min(sent[i] for i in measured)
        outcome.throughput_rps = len(finished) / span if span > 0 else 0.0
    window_end_s = duration_s if duration_s is not None else (float(arrivals_s[-1]) if len(arrivals_s) else 0.0)
    outcome.stability = measured_stability(arrivals_s, sent, done, failed, start, warmup_s, window_end_s, period_s)
    return outcome


def measured_stability(arrivals_s: np.ndarray, sent: dict[int, float], done: dict[int, float],
                       failed: dict[int, float], start: float, warmup_s: float, window_end_s: float,
                       period_s: float | None = None) -> Stability | None:
    """The stability verdict (loadtest.stability) of one open-loop run's measured window: the arrivals
    scheduled from ``warmup_s`` to ``window_end_s`` (seconds after ``start``, a perf_counter time), sent at
    ``sent``, answered at ``done`` or with an error at ``failed``; never answered counts as still waiting.
    None when the window is empty. Periodic arrivals are judged over whole periods from ``warmup_s`` (the
    window's tail is cut), so every sub-window ends at the same phase of the burst cycle."""
    if period_s and window_end_s - warmup_s >= period_s:
        window_end_s = warmup_s + math.floor((window_end_s - warmup_s) / period_s + 1e-9) * period_s
    rows = []
    for index, at in enumerate(arrivals_s):
        if not warmup_s <= at < window_end_s:
            continue
        sent_at = sent.get(index, start + at)
        answered_at = done.get(index, failed.get(index))
        rows.append({"t_send_us": int(sent_at * 1e6), "late_us": max(0, int((sent_at - start - at) * 1e6)),
                     "ok": index in done,
                     "latency_us": int((answered_at - sent_at) * 1e6) if answered_at is not None else 10 ** 15})
    if not rows or window_end_s <= warmup_s:
        return None
    return assess(rows, int((start + warmup_s) * 1e6), window_end_s - warmup_s, period_s=period_s)


def triton_batching(url: str, model: str) -> tuple[int, int, int, int]:
    """(requests, executions, queue ns, execute ns) so far from Triton's statistics of ``model``: a run's
    deltas give the front batcher's average batch, the time requests waited in it, and the wall time of
    an ``execute`` call (input + infer + output: Triton adds a batch's time once for each of its
    requests, so the sum over requests divided by the requests is that wall, weighted by batch size)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    phases = stats["inference_stats"]
    return (int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)),
            int(phases.get("queue", {}).get("ns", 0)),
            sum(int(phases.get(phase, {}).get("ns", 0)) for phase in ("compute_input", "compute_infer", "compute_output")))


def _keep_record(outcome: Outcome, result) -> None:
    record = result.as_numpy(RECORD_OUTPUT)  # None for the whole model and unasked reorch answers
    if record is not None:
        outcome.records.append(json.loads(record.ravel()[0]))


async def capacity_rps(url: str, model: str, inputs: list, concurrency: int, duration_s: float) -> float:
    """Closed loop: ``concurrency`` unary calls outstanding for ``duration_s``."""
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    stop = time.perf_counter() + duration_s
    counts = [0] * concurrency

    async def user(slot: int) -> None:
        index = slot
        while time.perf_counter() < stop:
            await client.infer(model, inputs[index % len(inputs)])
            counts[slot] += 1
            index += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(user(slot) for slot in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    return sum(counts) / elapsed


BURST_ON_S, BURST_OFF_S = 0.5, 1.0  # the bursty scenario's square wave


def scenario_plan(name: str, capacity: float, duration_s: float, rng: np.random.Generator):
    if name == "bursty":
        return OnOffArrivals(1.6 * capacity, 0.1 * capacity, on_s=BURST_ON_S, off_s=BURST_OFF_S).arrival_times_s(duration_s, rng)
    rate = {"longtail": 0.6, "steady": 0.85, "overload": 1.5}[name] * capacity
    return PoissonArrivals(rate).arrival_times_s(duration_s, rng)


def lengths_for(name: str, entry, count: int, rng: np.random.Generator):
    if not entry.has_sequence:
        return [None] * count
    if name == "longtail":
        dist = LongTailLengths(median=max(entry.min_length, entry.max_length / 8), sigma=1.0,
                               min_length=entry.min_length, max_length=entry.max_length)
        return [int(x) for x in dist.sample(rng, count)]
    return [max(entry.min_length, entry.max_length // 2)] * count


def summarize(outcome: Outcome) -> dict:
    lat = sorted(outcome.latencies_ms)
    if not lat:
        return {"avg": math.nan, "p50": math.nan, "p99": math.nan, "tput": outcome.throughput_rps}
    return {"avg": statistics.fmean(lat), "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "tput": outcome.throughput_rps}


def reorch_summary(metrics_url: str, model: str, before_text: str) -> str:
    """What ``model`` (a reorch variant) did since ``before_text`` (a metrics scrape): its operations,
    rows per launch of each stage, the batches run inline (fused inside ``execute``, no launch) and the
    per-launch overhead its fuse decision uses."""
    delta = diff_reorch_metrics(before_text, scrape_metrics(metrics_url), model)
    ops = " ".join(f"{op} {count:.0f}" for op, count in delta.operations.items() if count >= 1)
    rows = "/".join(f"{values['samples'] / values['executions']:.1f}" for _, values in sorted(delta.stages.items())
                    if values.get("executions"))
    inline = delta.to_dict()["inline"]
    return (f"ops {ops or 'none'}" + (f", rows per launch by stage {rows}" if rows else "")
            + (f", inline {inline['executions']:.0f} batches of {inline['avg_batch_size']:.1f} rows"
               if inline.get("executions") else "")
            + (f", launch overhead {delta.launch_overhead_us:.0f} us" if delta.launch_overhead_us else ""))


def overlay_repository(repository: Path, manifest: dict, models: list[str], policies: list[str],
                       queue_delay_us: int, knobs: dict[str, str], control: bool = False) -> Path:
    """A scratch repository: links to the built models plus NAME_reorch_<policy> for each policy
    (``control``: plus ``NAME_control``, a second copy of the whole model, for an A/A comparison).

    The reorch variants get the whole model's onnxruntime thread count (``intra_op_threads`` of its
    config) unless ``knobs`` set one: with a different count the comparison measures threading, not
    reorchestration (the knob's default, 1, against a build's 0 = all cores made reorch look slower
    and cheaper in CPU). They also get its queue policy (timeout, max queue size), so both front
    batchers are the same (the answers/s target once compared a stalling whole model, built with a
    2 s timeout, against a reorch without one: 615 against 8,854 answers/s).
    """
    overlay = Path(tempfile.mkdtemp(prefix="stagebatch-reorch-bench-"))
    for child in repository.iterdir():
        if child.is_dir():
            os.symlink(child.resolve(), overlay / child.name)
    for name in models:
        entry = manifest["models"][name]
        whole = entry.get("variants", {}).get("whole", name)
        whole_config = read_model_config(repository / whole / "config.pbtxt")
        threads = whole_config.get("parameters", {}).get("intra_op_threads", {}).get("string_value")
        same_threads = {"intra_op_threads": threads} if threads is not None else {}
        # The same front batcher as the whole model, queue policy included: on 2.51 a policy alone stalls
        # requests for up to 500 ms under concurrent calls (docs/gpu.md), whichever variant has it.
        queue_policy = whole_config.get("dynamic_batching", {}).get("default_queue_policy", {})
        if control:
            copy = overlay / control_model(name)
            copy.mkdir()
            for child in (repository / whole).iterdir():
                if child.is_dir():
                    os.symlink(child.resolve(), copy / child.name)
            write_model_config(copy, {**whole_config, "name": control_model(name)})
        for reorch_policy in policies:
            write_reorch_model(overlay, name, {**entry, "variants": {**entry.get("variants", {}),
                                                                    "reorch": f"{name}_reorch_{reorch_policy}"}},
                               target="embedded", max_batch_size=int(entry["max_batch_size"]),
                               queue_delay_us=queue_delay_us, policy=reorch_policy,
                               max_queue_size=int(queue_policy.get("max_queue_size", 0)),
                               default_timeout_us=int(queue_policy.get("default_timeout_microseconds", 0)),
                               knobs={"max_batch_rows": int(entry["max_batch_size"]), **same_threads, **knobs})
    return overlay


def control_model(name: str) -> str:
    """The A/A control's second copy of model ``name``'s whole model (``--control``)."""
    return f"{name}_control"


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% confidence interval (Student t over the repeats)."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return mean, math.nan, math.nan
    half = T95.get(len(clean) - 1, 1.96) * statistics.stdev(clean) / math.sqrt(len(clean))
    return mean, mean - half, mean + half


def ratio_ci95(values: list[float]) -> tuple[float, float, float]:
    """Geometric mean of ratios and its 95% confidence interval (Student t on their logarithms): a
    ratio's spread is multiplicative, and one disturbed repeat (another process taking the cores)
    then moves the interval less than it moves an arithmetic mean."""
    mean, low, high = mean_ci95([math.log(v) for v in values if v > 0 and math.isfinite(v)])
    return math.exp(mean), math.exp(low), math.exp(high)


@dataclass
class Verdict:
    target: str
    figure: str
    met: bool
    decided: bool = True  # False: the confidence interval still holds the limit


@dataclass
class Check:
    """One target judged on a per-repeat figure: ``met(mean, low, high)``; decided once the 95% CI
    does not hold ``limit``."""

    target: str
    figure: Callable[[dict], float]
    limit: float
    met: Callable[[float, float, float], bool]
    describe: Callable[[float, float, float], str]
    ratio: bool = False  # the figure is a ratio: geometric mean and interval (ratio_ci95)
    # False: undecided, it asks no more repeats (goodput below saturation equals the arrival rate for
    # both variants, so its ratio sits at the limit 1.0 however many repeats run)
    asks_repeats: bool = True


@dataclass
class Comparison:
    """Whole vs reorch on one schedule: the repeats run so far and the targets judged on them."""

    model: str
    label: str
    arrivals: np.ndarray
    inputs: dict[str, list]
    checks: list[Check]
    repeats: list[dict[str, dict]] = field(default_factory=list)
    repeat_s: float = 0.0  # wall time of the last repeat
    # Set: perf_analyzer sends the load (Poisson at this rate, len(arrivals) requests of length seq_len)
    # instead of the Python client; its figures have no average and no per-request latencies.
    analyzer_rate_rps: float | None = None
    seq_len: int | None = None
    duration_s: float | None = None  # the schedule's length (the measured window ends there)
    period_s: float | None = None  # the arrival process's period (bursty), for the stability verdict
    rival_label: str = "reorch"  # what the "reorch" side is called in print ("control" in an A/A run)

    def unstable_note(self) -> str:
        """Which repeats failed the stability verdict (loadtest.stability), per variant, and why."""
        notes = []
        for variant in ("whole", "reorch"):
            reasons = [r[variant].get("unstable") for r in self.repeats]
            bad = [reason for reason in reasons if reason]
            if bad:
                kinds = ", ".join(sorted(set(bad)))
                label = self.rival_label if variant == "reorch" else variant
                notes.append(f"{label} unstable in {len(bad)} of {len(reasons)} ({kinds})")
        return "; unstable runs (their latency is the queue's or the generator's): " + "; ".join(notes) if notes else ""

    def interval(self, check: Check) -> tuple[float, float, float]:
        return (ratio_ci95 if check.ratio else mean_ci95)([check.figure(r) for r in self.repeats])

    @property
    def decided(self) -> bool:
        for check in (c for c in self.checks if c.asks_repeats):
            _, low, high = self.interval(check)
            if not (low > check.limit or high <= check.limit):  # NaN bounds: undecided
                return False
        return True


@dataclass
class Bench:
    server: EmbeddedTriton
    manifest: dict
    args: argparse.Namespace
    policy: str
    capacities: dict[str, float] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    analyzer: PerfAnalyzer | None = None
    analyzer_missing: str = ""  # why perf_analyzer cannot be had (then the Python client sends)

    @property
    def url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    def rival(self, name: str) -> str:
        """The model compared with the whole model ``name``: its reorch variant, or with ``--control``
        a second copy of the whole model (an A/A comparison: the noise floor of every target)."""
        return served_rival(self.args, name)

    @property
    def rival_label(self) -> str:
        return "control" if self.args.control else "reorch"

    @property
    def input_kinds(self) -> dict[str, str]:
        """Per side ("whole", "reorch"), the variant whose requests it is sent (RequestFactory): the
        control is a whole model, so it gets the whole model's."""
        return {"whole": "whole", "reorch": "whole" if self.args.control else "reorch"}

    def __post_init__(self) -> None:
        try:
            self.analyzer = ensure_perf_analyzer()
        except PerfAnalyzerUnavailable as error:
            self.analyzer_missing = str(error)

    def capacity(self, name: str) -> float:
        if name not in self.capacities:
            entry = model_entry(self.manifest, name)
            factory = RequestFactory(entry, "whole", seed=self.args.seed)
            lengths = lengths_for("steady", entry, 64, np.random.default_rng(self.args.seed))
            inputs = [_inputs(factory.arrays(n)) for n in lengths]
            closed = asyncio.run(capacity_rps(self.url, name, inputs, 2 * entry.max_batch_size, self.args.capacity_s))
            print(f"# {name}: closed loop ({2 * entry.max_batch_size} calls outstanding) {closed:.0f} req/s; "
                  "open-loop Poisson probes of the whole model (loadtest.capacity, judged by loadtest.stability):",
                  flush=True)
            found = search_capacity(lambda rate: self._capacity_probe(name, inputs, rate), slo_ms=math.inf,
                                    settings=SearchSettings(start_rps=closed, growth=1.5, tolerance=0.1,
                                                            max_probes=self.args.capacity_probes))
            capacity = found.sustained_rps
            if capacity is None:
                capacity = min(p.rate_rps for p in found.probes)
                print(f"# {name}: no probe was sustained, down to {capacity:.0f} req/s; loads are relative to that "
                      "rate, and every run is judged for stability", flush=True)
            self.capacities[name] = capacity
            print(f"# {name}: whole-model capacity {self.capacities[name]:.0f} req/s (highest sustained Poisson rate"
                  f"{'' if found.converged else '; the search did not converge'})", flush=True)
        return self.capacities[name]

    def _capacity_probe(self, name: str, inputs: list, rate: float) -> Probe:
        """One open-loop Poisson probe of the whole model at ``rate`` for ``--probe-s`` (the first
        second, or a third, not judged), with the steady target's inputs; its stability verdict."""
        rng = np.random.default_rng(self.args.seed)
        arrivals = PoissonArrivals(rate).arrival_times_s(self.args.probe_s, rng)
        warmup_s = min(1.0, self.args.probe_s / 3)
        outcome = asyncio.run(drive(self.url, name, arrivals, [inputs[i % len(inputs)] for i in range(len(arrivals))],
                                    warmup_s, self.args.drain_s, streaming=False, duration_s=self.args.probe_s))
        verdict, figures = outcome.stability, summarize(outcome)
        failed = len(outcome.errors) + outcome.unanswered
        if verdict is None:
            reason = "no measured window"
        elif not verdict.sustained:
            reason = verdict.unstable_reason
        else:
            reason = f"{failed} requests failed" if failed else None
        sustained = reason is None
        achieved = verdict.achieved_rps if verdict else 0.0
        print(f"#   {rate:8.0f} req/s: achieved {achieved:.0f}, p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms: "
              f"{'sustained' if sustained else f'not sustained ({reason})'}", flush=True)
        return Probe(rate, sustained, achieved, figures["p99"] if math.isfinite(figures["p99"]) else None, reason,
                     bool(verdict is not None and verdict.limited_by_load_generator and not sustained))

    def plan(self, name: str, label: str, arrivals: np.ndarray, lengths: list, checks: list[Check],
             duration_s: float, period_s: float | None = None) -> None:
        """A comparison of whole vs reorch on the same arrivals and inputs, run by ``run_all``."""
        entry = model_entry(self.manifest, name)
        inputs = {v: [_inputs(RequestFactory(entry, kind, seed=self.args.seed).arrays(n)) for n in lengths]
                  for v, kind in self.input_kinds.items()}
        self.comparisons.append(Comparison(name, label, arrivals, inputs, checks, duration_s=duration_s,
                                           period_s=period_s, rival_label=self.rival_label))

    def run_repeat(self, comparison: Comparison) -> None:
        """One interleaved repeat (the order alternates per repeat); prints its figures."""
        started = time.perf_counter()
        name = comparison.model
        variants = [("whole", name), ("reorch", self.rival(name))]
        order = variants if len(comparison.repeats) % 2 == 0 else variants[::-1]
        figures, ops = {}, ""
        for variant, model in order:
            cpu_before, batching_before = self.server.cpu_seconds(), triton_batching(self.url, model)
            reorch_run = variant == "reorch" and not self.args.control
            metrics_before = scrape_metrics(self.metrics_url) if reorch_run else ""
            if comparison.analyzer_rate_rps is not None:
                assert self.analyzer is not None
                point = measure_point(self.analyzer, self.url, model, model_entry(self.manifest, name),
                                      self.input_kinds[variant],
                                      rate_rps=comparison.analyzer_rate_rps, requests=max(60, len(comparison.arrivals)),
                                      seq_len=comparison.seq_len)
                latency = {"avg": math.nan, "p50": point.p50_ms, "p99": point.p99_ms, "tput": point.throughput_rps,
                           "failed": 0, "latencies": [], "span_s": math.nan, "unstable": None}
            else:
                outcome = asyncio.run(drive(self.url, model, comparison.arrivals, comparison.inputs[variant],
                                            self.args.warmup_s, self.args.drain_s, streaming=False,
                                            duration_s=comparison.duration_s, period_s=comparison.period_s))
                latency = {**summarize(outcome), "failed": len(outcome.errors) + outcome.unanswered,
                           "latencies": outcome.latencies_ms, "span_s": self._span(outcome),
                           "unstable": unstable_word(outcome.stability)}
            cpu_ms = (self.server.cpu_seconds() - cpu_before) * 1e3 / max(1, len(comparison.arrivals))
            served, executions, queue_ns, execute_ns = (after - before for after, before in
                                                        zip(triton_batching(self.url, model), batching_before))
            if reorch_run:
                ops = reorch_summary(self.metrics_url, model, metrics_before)
            figures[variant] = {**latency, "cpu_ms": cpu_ms, "front_batch": served / max(1, executions),
                                "front_queue_ms": queue_ns / 1e6 / max(1, served),
                                # an execute call's wall, weighted by its batch size (triton_batching)
                                "execute_ms": execute_ns / 1e6 / served if served else math.nan}
        comparison.repeats.append(figures)
        comparison.repeat_s = time.perf_counter() - started
        w, r = figures["whole"], figures["reorch"]
        print(f"  {comparison.label:<24} repeat {len(comparison.repeats) - 1}: " + " | ".join(
            f"{v} avg {f['avg']:7.2f} p50 {f['p50']:6.2f} p99 {f['p99']:7.2f} cpu/req {f['cpu_ms']:5.2f} "
            f"batch {f['front_batch']:4.1f} queue {f['front_queue_ms']:6.2f} exec {f['execute_ms']:5.2f}"
            for v, f in (("whole", w), (self.rival_label, r)))
            + f" | failed {w['failed']}/{r['failed']}" + "".join(
                f" | {v} UNSTABLE ({f['unstable']})" for v, f in (("whole", w), (self.rival_label, r)) if f["unstable"])
            + f" | {ops}", flush=True)

    def run_all(self, started: float) -> None:
        """``--repeats`` repeats of every comparison, then more of the undecided ones (fewest repeats
        first) while the budget lasts; then every target is judged."""
        for comparison in self.comparisons:
            while len(comparison.repeats) < self.args.repeats:
                self.run_repeat(comparison)
        budget_s = self.args.budget_min * 60
        while True:
            open_ones = [c for c in self.comparisons if not c.decided and len(c.repeats) < self.args.max_repeats]
            affordable = [c for c in open_ones if time.perf_counter() - started + c.repeat_s <= budget_s]
            if not affordable:
                break
            comparison = min(affordable, key=lambda c: (len(c.repeats), self.comparisons.index(c)))
            print(f"  (undecided: {comparison.label}, one more repeat)", flush=True)
            self.run_repeat(comparison)
        for comparison in self.comparisons:
            for check in comparison.checks:
                mean, low, high = comparison.interval(check)
                decided = low > check.limit or high <= check.limit
                self.judge(check.target, f"{check.describe(mean, low, high)}, {len(comparison.repeats)} repeats"
                           + comparison.unstable_note(), check.met(mean, low, high), decided)

    @staticmethod
    def _span(outcome: Outcome) -> float:
        return len(outcome.latencies_ms) / outcome.throughput_rps if outcome.throughput_rps else math.nan

    def judge(self, target: str, figure: str, met: bool, decided: bool = True) -> None:
        self.verdicts.append(Verdict(target, figure, met, decided))
        print(f"  -> {verdict_word(met, decided)} {target}: {figure}", flush=True)

    # ---- targets --------------------------------------------------------------------------------
    def steady(self, name: str) -> None:
        label = self.rival_label
        entry = model_entry(self.manifest, name)
        for multiple in self.args.steady_loads:
            rng = np.random.default_rng(self.args.seed)
            arrivals = PoissonArrivals(multiple * self.capacity(name)).arrival_times_s(self.args.duration_s, rng)
            lengths = lengths_for("steady", entry, len(arrivals), rng)
            self.plan(name, f"{name} steady {multiple:.2f}x", arrivals, lengths, duration_s=self.args.duration_s,
                      checks=[Check(
                f"{name} steady {multiple:.2f}x avg <= 1.05x whole", lambda r: r["reorch"]["avg"] / r["whole"]["avg"],
                1.05, lambda mean, low, high: high <= 1.05,
                lambda mean, low, high: f"{label}/whole avg {mean:.3f} (geometric mean over repeats, "
                                        f"95% CI {low:.3f}..{high:.3f})", ratio=True)])

    def diversity(self, name: str) -> None:
        label = self.rival_label
        entry = model_entry(self.manifest, name)
        slo = f"{self.args.slo_ms} ms" if self.args.slo_ms else "whole p99"
        for scenario in ("bursty", "longtail"):
            if scenario == "longtail" and not entry.has_sequence:
                continue
            rng = np.random.default_rng(self.args.seed)
            arrivals = scenario_plan(scenario, self.capacity(name), self.args.duration_s, rng)
            lengths = lengths_for(scenario, entry, len(arrivals), rng)
            period_s = BURST_ON_S + BURST_OFF_S if scenario == "bursty" else None
            self.plan(name, f"{name} {scenario}", arrivals, lengths, duration_s=self.args.duration_s,
                      period_s=period_s, checks=[
                Check(f"{name} {scenario} avg -46% vs whole, CI excluding 0",
                      lambda r: r["reorch"]["avg"] / r["whole"]["avg"] - 1, -0.46,
                      lambda mean, low, high: mean <= -0.46 and high < 0,
                      lambda mean, low, high: f"avg change {mean:+.1%} (95% CI {low:+.1%}..{high:+.1%})"),
                Check(f"{name} {scenario} goodput at SLO ({slo}) >= whole", self._goodput_ratio, 1.0,
                      lambda mean, low, high: mean >= 1.0,
                      lambda mean, low, high: f"{label}/whole goodput {mean:.2f} (geometric mean, "
                                              f"95% CI {low:.2f}..{high:.2f})", ratio=True, asks_repeats=False),
            ])

    def _goodput_ratio(self, repeat: dict[str, dict]) -> float:
        slo_ms = self.args.slo_ms or repeat["whole"]["p99"]
        good = {v: sum(x <= slo_ms for x in repeat[v]["latencies"]) / repeat[v]["span_s"] for v in ("whole", "reorch")}
        return good["reorch"] / good["whole"] if good["whole"] else math.nan

    def p50(self, name: str) -> None:
        """Poisson at 0.1x capacity, batch 1, sent by perf_analyzer where it can be had (the reference
        generator: the Python client's own delays are larger than the 0.3 ms judged here)."""
        entry, label = model_entry(self.manifest, name), self.rival_label
        rng = np.random.default_rng(self.args.seed)
        rate = 0.1 * self.capacity(name)
        arrivals = PoissonArrivals(rate).arrival_times_s(self.args.p50_duration_s, rng)
        lengths = lengths_for("steady", entry, len(arrivals), rng)
        client = "perf_analyzer" if self.analyzer is not None else f"Python client ({self.analyzer_missing})"
        self.plan(name, f"{name} 0.1x batch 1", arrivals, lengths, duration_s=self.args.p50_duration_s,
                  checks=[Check(
            f"{name} p50 at 0.1x <= whole + 0.3 ms", lambda r: r["reorch"]["p50"] - r["whole"]["p50"], 0.3,
            lambda mean, low, high: mean <= 0.3,
            lambda mean, low, high: f"{label} - whole p50 {mean:+.3f} ms (95% CI {low:+.3f}..{high:+.3f}); "
                                    f"client: {client}")])
        if self.analyzer is not None:
            self.comparisons[-1].analyzer_rate_rps, self.comparisons[-1].seq_len = rate, lengths[0]

    def _flood(self, analyzer: PerfAnalyzer, model: str, entry, variant: str, length: int | None):
        """One perf_analyzer flood; one retry where it fails or hangs (``retried_once``); None after two
        (said on its line)."""
        result = retried_once(lambda: measure_point(analyzer, self.url, model, entry, variant,
                                                    concurrency=self.args.flood_concurrency,
                                                    requests=self.args.flood_requests, seq_len=length),
                              f"  {model} answers/s flood")
        if result is None:
            print(f"  {model} answers/s: this repeat has no figure (two failed floods)", flush=True)
        return result

    def answers(self, name: str) -> None:
        """Answers/s of one reorch instance, closed loop, by perf_analyzer (else the Python client)."""
        entry = model_entry(self.manifest, name)
        length = lengths_for("steady", entry, 1, np.random.default_rng(0))[0]
        variants = (("whole", name), ("reorch", self.rival(name)))
        analyzer = self.analyzer
        client = f"perf_analyzer, {self.args.flood_concurrency} async unary calls" if analyzer is not None \
            else f"Python client ({self.analyzer_missing})"
        rates: dict[str, list[float]] = {"whole": [], "reorch": []}
        kinds = self.input_kinds
        for variant, model in variants if analyzer is not None else ():  # warm-up, not measured
            measure_point(analyzer, self.url, model, entry, kinds[variant], concurrency=self.args.flood_concurrency,
                          requests=self.args.flood_requests // 4, seq_len=length)
        for repeat in range(self.args.repeats):
            for variant, model in variants if repeat % 2 == 0 else variants[::-1]:
                if analyzer is not None:
                    result = self._flood(analyzer, model, entry, kinds[variant], length)
                    if result is None:
                        continue
                    rates[variant].append(result.throughput_rps)
                    extra = f" p50 {result.p50_ms:.2f} ms, server queue {result.server_queue_ms:.2f} ms, " \
                            f"compute {result.server_compute_ms:.2f} ms per request"
                else:
                    inputs = [_inputs(RequestFactory(entry, kinds[variant], seed=s).arrays(length)) for s in range(8)]
                    rates[variant].append(asyncio.run(capacity_rps(self.url, model, inputs,
                                                                   self.args.flood_concurrency, self.args.flood_s)))
                    extra = ""
                label = self.rival_label if variant == "reorch" else variant
                print(f"  {name} answers/s repeat {repeat}: {label} {rates[variant][-1]:,.0f}/s{extra}", flush=True)
        if not rates["reorch"] or not rates["whole"]:
            self.judge(f"{self.rival(name)} answers/s >= 10,000 (one instance)", "no figure: every flood failed", False)
            return
        reorch, low, high = mean_ci95(rates["reorch"])
        whole = statistics.fmean(rates["whole"])
        limited = " (limited by the client: the whole model gets no more from it)" \
            if analyzer is None and reorch >= 0.9 * whole else ""
        self.judge(f"{self.rival(name)} answers/s >= 10,000 (one instance)",
                   f"{reorch:,.0f} answers/s (95% CI {low:,.0f}..{high:,.0f}); whole model {whole:,.0f}/s; "
                   f"client: {client}{limited}", reorch >= 10_000)


def answers_on_built_model(args: argparse.Namespace, knobs: dict[str, str]) -> list[Verdict]:
    """The answers/s target on ``--answers-model`` built at ``--answers-size`` (its own scratch
    repository and server: the issue's target is about the tiny lstm, whatever ``--repository`` holds)."""
    with tempfile.TemporaryDirectory(prefix="stagebatch-reorch-answers-") as tmp:
        repository = Path(tmp) / "repository"
        command = [sys.executable, "-m", "stagebatch.cli", "build", "-m", args.answers_model, "--size",
                   args.answers_size, "--stages", "2", "-o", str(repository)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"building {args.answers_model} ({args.answers_size}) for the answers/s target failed:\n"
                             + "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:]))
        manifest = read_manifest(repository).raw
        delay_us = int(manifest["models"][args.answers_model].get("build", {}).get("max_queue_delay_us", 100))
        overlay = overlay_repository(repository, manifest, [args.answers_model], [args.policy], delay_us, knobs,
                                     control=args.control)
        print(f"# answers/s: {args.answers_model} built at size {args.answers_size} (its own server)", flush=True)
        try:
            with EmbeddedTriton(overlay, models=[args.answers_model, served_rival(args, args.answers_model)]) as server:
                bench = Bench(server, manifest, args, args.policy)
                bench.answers(args.answers_model)
        finally:
            shutil.rmtree(overlay, ignore_errors=True)
    return bench.verdicts


def served_rival(args: argparse.Namespace, name: str) -> str:
    """The model served beside the whole model ``name`` and compared with it (``Bench.rival``)."""
    return control_model(name) if args.control else f"{name}_reorch_{args.policy}"


def unstable_word(stability: Stability | None) -> str | None:
    """The reason's kind (``queue_standing``, ``backlog_growing``, ...) of an unstable run, else None."""
    if stability is None or stability.stable:
        return None
    return (stability.unstable_reason or "unstable").split(":")[0]


def verdict_word(met: bool, decided: bool) -> str:
    return ("met  " if met else "UNMET") + ("" if decided else " (undecided: CI holds the limit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--models", nargs="+", default=["bert_base", "lstm", "resnet50"])
    parser.add_argument("--diversity-model", default="bert_base", help="model of the bursty / long-tailed target")
    parser.add_argument("--answers-model", default="lstm", help="model of the answers/s target")
    parser.add_argument("--answers-size", default="tiny",
                        help="build --answers-model at this size for the answers/s target (the issue's: tiny); "
                             "'repository': use the one in --repository")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--policy", default=BatchPolicy.DVA.value, choices=[p.value for p in BatchPolicy])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every comparison (>= 3)")
    parser.add_argument("--max-repeats", type=int, default=8, help="repeats of an undecided comparison at most")
    parser.add_argument("--budget-min", type=float, default=11.5,
                        help="more repeats of undecided comparisons only while the run stays within this")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--p50-duration-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--drain-s", type=float, default=30.0, help="wait this long after the last arrival")
    parser.add_argument("--capacity-s", type=float, default=3.0,
                        help="length of the closed-loop run that starts the capacity search")
    parser.add_argument("--probe-s", type=float, default=5.0, help="length of one open-loop capacity probe")
    parser.add_argument("--capacity-probes", type=int, default=6, help="open-loop capacity probes per model at most")
    parser.add_argument("--steady-loads", nargs="+", type=float, default=[0.3, 0.6, 0.85])
    parser.add_argument("--flood-s", type=float, default=2.0, help="length of the answers/s flood (Python client)")
    parser.add_argument("--flood-requests", type=int, default=8000,
                        help="requests of one answers/s flood (perf_analyzer)")
    parser.add_argument("--flood-concurrency", type=int, default=64)
    parser.add_argument("--slo-ms", type=float, default=None, help="SLO of the goodput target (default: whole p99)")
    parser.add_argument("--quick", action="store_true", help="about 7 minutes: 3 s runs, budget 6.5 min")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="a ReorchKnobs value for the reorch variant (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", action="store_true",
                        help="A/A control: compare the whole model with a second copy of itself (NAME_control) "
                             "instead of reorch, with the same schedules, repeats and verdicts: what every "
                             "target reads when there is nothing to find (this machine's noise floor)")
    args = parser.parse_args()
    if args.quick:
        args.duration_s, args.p50_duration_s, args.warmup_s, args.capacity_s, args.probe_s = 3.0, 2.0, 0.5, 1.5, 3.0
        args.capacity_probes = min(args.capacity_probes, 4)
        args.flood_s, args.flood_requests, args.drain_s = 1.0, 4000, 10.0
        args.budget_min = min(args.budget_min, 6.5)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (confidence intervals)")
    try:
        knobs = dict(item.split("=", 1) for item in args.knob)
        ReorchKnobs.from_parameters(knobs)
    except (ValueError, StagebatchError) as error:
        parser.error(f"--knob: {error}")

    manifest = read_manifest(args.repository).raw
    own_answers = "answers" in args.targets and args.answers_size == "repository"
    models = list(dict.fromkeys([*args.models, *([args.diversity_model] if "diversity" in args.targets else []),
                                 *([args.answers_model] if own_answers else [])]))
    for name in models:
        if name not in manifest["models"]:
            parser.error(f"model {name!r} is not in {args.repository}/manifest.json; build it first")
    delay_us = int(manifest["models"][models[0]].get("build", {}).get("max_queue_delay_us", 100))
    overlay = overlay_repository(args.repository, manifest, models, [args.policy], delay_us, knobs,
                                 control=args.control)
    served = [m for name in models for m in (name, served_rival(args, name))]
    if args.control:
        print("# A/A CONTROL: the 'reorch' side of every target is NAME_control, a second copy of the whole model")
    print(f"# issue 12 targets: {args.targets}; models {models}; policy {args.policy}; {args.repeats} interleaved "
          f"repeats of {args.duration_s:.0f} s (first {args.warmup_s:.1f} s not measured), up to {args.max_repeats} "
          f"where undecided within {args.budget_min:.1f} min; unary gRPC, no record asked")
    started = time.perf_counter()
    verdicts: list[Verdict] = []
    if "answers" in args.targets and not own_answers:
        verdicts += answers_on_built_model(args, knobs)
    try:
        with EmbeddedTriton(overlay, models=served) as server:
            bench = Bench(server, manifest, args, args.policy, verdicts=verdicts)
            if own_answers:
                bench.answers(args.answers_model)
            if "p50" in args.targets:
                for name in args.models:
                    bench.p50(name)
            if "steady" in args.targets:
                for name in args.models:
                    bench.steady(name)
            if "diversity" in args.targets:
                bench.diversity(args.diversity_model)
            bench.run_all(started)
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
    print(f"\n# summary ({time.perf_counter() - started:.0f} s)")
    for verdict in bench.verdicts:
        print(f"{verdict_word(verdict.met, verdict.decided)}  {verdict.target}: {verdict.figure}")
    unmet = [v for v in bench.verdicts if not v.met]
    undecided = sum(not v.decided for v in unmet)
    print(f"\n{len(unmet)} of {len(bench.verdicts)} targets UNMET ({undecided} of them undecided)" if unmet
          else "\nevery target met")


if __name__ == "__main__":
    main()
