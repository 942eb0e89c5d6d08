"""Issue 12's targets, side by side: the reorchestrator's default policy (dva) vs the whole model.

On the embedded server every model is served as ``NAME`` (whole model, Triton's dynamic batcher)
and ``NAME_reorch_<policy>``; each run drives one variant with open-loop arrivals over unary gRPC
(tritonclient.grpc.aio; reorch requests ask for their REORCH_RECORD). Runs of the variants are
interleaved (the order alternates per repeat) and repeated ``--repeats`` times (>= 3); each target
is judged on the per-repeat ratio reorch / whole with a 95% confidence interval (Student t).

Targets (``--targets``; all by default):

- ``steady``: Poisson at 0.3x, 0.6x and 0.85x of the whole model's capacity, fixed length, every
  model: the default policy's average latency <= 1.05x the whole model's (upper CI bound);
- ``diversity``: bert_base under ``bursty`` (on/off Poisson, 1.6x / 0.1x capacity) and
  ``longtail`` (Poisson 0.6x, log-normal lengths): average latency -46% or better with the CI
  excluding 0, and goodput at the SLO (completions within ``--slo-ms``, default: the whole model's
  p99 in the same repeat, per second) at least the whole model's;
- ``p50``: Poisson at 0.1x capacity, one row per request, every model, no record asked (as a user
  calls it): reorch p50 <= whole p50 + 0.3 ms;
- ``answers``: a closed-loop flood of the first sequence model's reorch variant (tiny lstm in the
  issue): answers/s >= 10,000 from one instance. The same client against the whole model shows the
  client's own ceiling (on 2 shared cores the Python client is often the limit: then it says so).

Each run also prints the server's CPU time per request (tritonserver and its Python stubs, which
other load on the machine disturbs less than latency) and, from Triton's statistics, the front
batcher's average batch (``batch``: requests per ``execute``) and queue time per request
(``queue``, ms): where the extra time goes.

Capacity is measured first per model (closed loop on the whole model). Every unmet target is printed
plainly at the end (``UNMET``). ``--quick`` fits in about 5 minutes (short runs, 3 repeats, fewer
loads) so the figures can be re-run on a quiet machine.

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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from core.model_config import read_model_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.reorch.policies import BatchPolicy, ReorchKnobs  # noqa: E402
from backends.reorch.scheduler import OPERATIONS  # noqa: E402
from backends.reorch.spec import RECORD_OUTPUT, RECORD_PARAMETER  # noqa: E402
from loadtest.request_factory import RequestFactory, infer_inputs, model_entry  # noqa: E402
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


def _inputs(arrays: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient

    return infer_inputs(grpcclient, arrays)


async def drive(url: str, model: str, arrivals_s: np.ndarray, inputs: list, warmup_s: float,
                drain_s: float, streaming: bool, parameters: dict | None = None) -> Outcome:
    """Open loop: request i is sent at arrivals_s[i] whatever happened before (one gRPC stream, or
    concurrent unary calls)."""
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    sent: dict[int, float] = {}
    done: dict[int, float] = {}
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
    return outcome


def server_cpu_s() -> float:
    """CPU seconds (user + system) used so far by the server and its Python stubs (children of this process).

    Less sensitive to other load on the machine than latency: per request it shows where the cost goes.
    """
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def triton_batching(url: str, model: str) -> tuple[int, int, int]:
    """(requests, executions, queue ns) so far from Triton's statistics of ``model``: a run's deltas
    give the front batcher's average batch and the time requests waited in it."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return (int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)),
            int(stats["inference_stats"].get("queue", {}).get("ns", 0)))


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


def scenario_plan(name: str, capacity: float, duration_s: float, rng: np.random.Generator):
    if name == "bursty":
        return OnOffArrivals(1.6 * capacity, 0.1 * capacity, on_s=0.5, off_s=1.0).arrival_times_s(duration_s, rng)
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


def reorch_summary(records: list[dict]) -> str:
    if not records:
        return ""
    share = {op: sum(any(o["op"] == op for o in r["ops"]) for r in records) / len(records) for op in OPERATIONS}
    first = statistics.fmean(r["batch_sizes"][0] for r in records if r["batch_sizes"])
    last = statistics.fmean(r["batch_sizes"][-1] for r in records if r["batch_sizes"])
    shares = " ".join(f"{op} {value:.0%}" for op, value in share.items() if value)
    return f"{shares}, batch rows stage0 {first:.1f} -> last {last:.1f}"


def overlay_repository(repository: Path, manifest: dict, models: list[str], policies: list[str],
                       queue_delay_us: int, knobs: dict[str, str]) -> Path:
    """A scratch repository: links to the built models plus NAME_reorch_<policy> for each policy.

    The reorch variants get the whole model's onnxruntime thread count (``intra_op_threads`` of its
    config) unless ``knobs`` set one: with a different count the comparison measures threading, not
    reorchestration (the knob's default, 1, against a build's 0 = all cores made reorch look slower
    and cheaper in CPU).
    """
    overlay = Path(tempfile.mkdtemp(prefix="stagebatch-reorch-bench-"))
    for child in repository.iterdir():
        if child.is_dir():
            os.symlink(child.resolve(), overlay / child.name)
    for name in models:
        entry = manifest["models"][name]
        whole = entry.get("variants", {}).get("whole", name)
        threads = read_model_config(repository / whole / "config.pbtxt").get("parameters", {}).get(
            "intra_op_threads", {}).get("string_value")
        same_threads = {"intra_op_threads": threads} if threads is not None else {}
        for policy in policies:
            write_reorch_model(overlay, name, {**entry, "variants": {"reorch": f"{name}_reorch_{policy}"}},
                               target="embedded", max_batch_size=int(entry["max_batch_size"]),
                               queue_delay_us=queue_delay_us, policy=policy,
                               knobs={"max_batch_rows": int(entry["max_batch_size"]), **same_threads, **knobs})
    return overlay


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


@dataclass
class Verdict:
    target: str
    figure: str
    met: bool


@dataclass
class Bench:
    url: str
    manifest: dict
    args: argparse.Namespace
    policy: str
    capacities: dict[str, float] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)

    def capacity(self, name: str) -> float:
        if name not in self.capacities:
            entry = model_entry(self.manifest, name)
            factory = RequestFactory(entry, "whole", seed=self.args.seed)
            lengths = lengths_for("steady", entry, 64, np.random.default_rng(self.args.seed))
            inputs = [_inputs(factory.arrays(n)) for n in lengths]
            self.capacities[name] = asyncio.run(capacity_rps(self.url, name, inputs, 2 * entry.max_batch_size,
                                                             self.args.capacity_s))
            print(f"# {name}: whole-model capacity {self.capacities[name]:.0f} req/s (closed loop)", flush=True)
        return self.capacities[name]

    def compare(self, name: str, label: str, arrivals: np.ndarray, lengths: list,
                record: bool = True) -> list[dict[str, dict]]:
        """Interleaved repeats of whole vs reorch on the same arrivals and inputs; per repeat {variant: figures}.

        ``record``: reorch requests ask for their REORCH_RECORD (as the characterization does).
        """
        entry = model_entry(self.manifest, name)
        variants = [("whole", name, None),
                    ("reorch", f"{name}_reorch_{self.policy}", {RECORD_PARAMETER: True} if record else None)]
        inputs = {v: [_inputs(RequestFactory(entry, v, seed=self.args.seed).arrays(n)) for n in lengths]
                  for v, _, _ in variants}
        repeats = []
        for repeat in range(self.args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]
            figures = {}
            for variant, model, parameters in order:
                cpu_before, batching_before = server_cpu_s(), triton_batching(self.url, model)
                outcome = asyncio.run(drive(self.url, model, arrivals, inputs[variant], self.args.warmup_s,
                                            self.args.drain_s, streaming=False, parameters=parameters))
                cpu_ms = (server_cpu_s() - cpu_before) * 1e3 / max(1, len(arrivals))
                served, executions, queue_ns = (after - before for after, before in
                                                zip(triton_batching(self.url, model), batching_before))
                figures[variant] = {**summarize(outcome), "failed": len(outcome.errors) + outcome.unanswered,
                                    "cpu_ms": cpu_ms, "front_batch": served / max(1, executions),
                                    "front_queue_ms": queue_ns / 1e6 / max(1, served),
                                    "latencies": outcome.latencies_ms, "span_s": self._span(outcome),
                                    "ops": reorch_summary(outcome.records)}
            repeats.append(figures)
            w, r = figures["whole"], figures["reorch"]
            print(f"  {label:<24} repeat {repeat}: " + " | ".join(
                f"{v} avg {f['avg']:7.2f} p50 {f['p50']:6.2f} p99 {f['p99']:7.2f} cpu/req {f['cpu_ms']:5.2f} "
                f"batch {f['front_batch']:4.1f} queue {f['front_queue_ms']:6.2f}" for v, f in (("whole", w), ("reorch", r)))
                + f" | failed {w['failed']}/{r['failed']}  {r['ops']}", flush=True)
        return repeats

    @staticmethod
    def _span(outcome: Outcome) -> float:
        return len(outcome.latencies_ms) / outcome.throughput_rps if outcome.throughput_rps else math.nan

    def judge(self, target: str, figure: str, met: bool) -> None:
        self.verdicts.append(Verdict(target, figure, met))
        print(f"  -> {'met  ' if met else 'UNMET'} {target}: {figure}", flush=True)

    # ---- targets --------------------------------------------------------------------------------
    def steady(self, name: str) -> None:
        entry = model_entry(self.manifest, name)
        for multiple in self.args.steady_loads:
            rng = np.random.default_rng(self.args.seed)
            arrivals = PoissonArrivals(multiple * self.capacity(name)).arrival_times_s(self.args.duration_s, rng)
            lengths = lengths_for("steady", entry, len(arrivals), rng)
            repeats = self.compare(name, f"{name} steady {multiple:.2f}x", arrivals, lengths)
            mean, low, high = mean_ci95([r["reorch"]["avg"] / r["whole"]["avg"] for r in repeats])
            self.judge(f"{name} steady {multiple:.2f}x avg <= 1.05x whole",
                       f"reorch/whole avg {mean:.3f} (95% CI {low:.3f}..{high:.3f})", high <= 1.05)

    def diversity(self, name: str) -> None:
        entry = model_entry(self.manifest, name)
        for scenario in ("bursty", "longtail"):
            if scenario == "longtail" and not entry.has_sequence:
                continue
            rng = np.random.default_rng(self.args.seed)
            arrivals = scenario_plan(scenario, self.capacity(name), self.args.duration_s, rng)
            lengths = lengths_for(scenario, entry, len(arrivals), rng)
            repeats = self.compare(name, f"{name} {scenario}", arrivals, lengths)
            mean, low, high = mean_ci95([r["reorch"]["avg"] / r["whole"]["avg"] - 1 for r in repeats])
            self.judge(f"{name} {scenario} avg -46% vs whole, CI excluding 0",
                       f"avg change {mean:+.1%} (95% CI {low:+.1%}..{high:+.1%})", mean <= -0.46 and high < 0)
            ratios = []
            for r in repeats:
                slo_ms = self.args.slo_ms or r["whole"]["p99"]
                good = {v: sum(x <= slo_ms for x in r[v]["latencies"]) / r[v]["span_s"] for v in ("whole", "reorch")}
                ratios.append(good["reorch"] / good["whole"] if good["whole"] else math.nan)
            mean, low, high = mean_ci95(ratios)
            slo = f"{self.args.slo_ms} ms" if self.args.slo_ms else "whole p99"
            self.judge(f"{name} {scenario} goodput at SLO ({slo}) >= whole",
                       f"reorch/whole goodput {mean:.2f} (95% CI {low:.2f}..{high:.2f})", mean >= 1.0)

    def p50(self, name: str) -> None:
        entry = model_entry(self.manifest, name)
        rng = np.random.default_rng(self.args.seed)
        arrivals = PoissonArrivals(0.1 * self.capacity(name)).arrival_times_s(self.args.p50_duration_s, rng)
        lengths = lengths_for("steady", entry, len(arrivals), rng)
        # as a user calls it: no record asked (the record's JSON is the characterization's cost)
        repeats = self.compare(name, f"{name} 0.1x batch 1", arrivals, lengths, record=False)
        mean, low, high = mean_ci95([r["reorch"]["p50"] - r["whole"]["p50"] for r in repeats])
        self.judge(f"{name} p50 at 0.1x <= whole + 0.3 ms",
                   f"reorch - whole p50 {mean:+.3f} ms (95% CI {low:+.3f}..{high:+.3f})", mean <= 0.3)

    def answers(self, name: str) -> None:
        entry = model_entry(self.manifest, name)
        length = lengths_for("steady", entry, 1, np.random.default_rng(0))[0]
        rates = {}
        for variant, model in (("whole", name), ("reorch", f"{name}_reorch_{self.policy}")):
            inputs = [_inputs(RequestFactory(entry, variant, seed=s).arrays(length)) for s in range(8)]
            rates[variant] = [asyncio.run(capacity_rps(self.url, model, inputs, self.args.flood_concurrency,
                                                       self.args.flood_s)) for _ in range(self.args.repeats)]
        reorch, low, high = mean_ci95(rates["reorch"])
        whole = statistics.fmean(rates["whole"])
        limited = " (limited by the client: the whole model gets no more from it)" if reorch >= 0.9 * whole else ""
        self.judge(f"{name}_reorch answers/s >= 10,000 (one instance)",
                   f"{reorch:,.0f} answers/s (95% CI {low:,.0f}..{high:,.0f}); same client on the whole model "
                   f"{whole:,.0f}/s{limited}", reorch >= 10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--models", nargs="+", default=["bert_base", "lstm", "resnet50"])
    parser.add_argument("--diversity-model", default="bert_base", help="model of the bursty / long-tailed target")
    parser.add_argument("--answers-model", default="lstm", help="model of the answers/s target")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--policy", default=BatchPolicy.DVA.value, choices=[p.value for p in BatchPolicy])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--p50-duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--drain-s", type=float, default=30.0, help="wait this long after the last arrival")
    parser.add_argument("--capacity-s", type=float, default=3.0, help="closed-loop capacity probe length")
    parser.add_argument("--steady-loads", nargs="+", type=float, default=[0.3, 0.6, 0.85])
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--flood-concurrency", type=int, default=256)
    parser.add_argument("--slo-ms", type=float, default=None, help="SLO of the goodput target (default: whole p99)")
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: short runs, 3 repeats")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="a ReorchKnobs value for the reorch variant (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.duration_s, args.p50_duration_s, args.warmup_s, args.capacity_s = 3.0, 2.0, 0.5, 1.5
        args.flood_s, args.drain_s, args.repeats = 2.0, 10.0, max(3, min(args.repeats, 3))
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (confidence intervals)")
    try:
        knobs = dict(item.split("=", 1) for item in args.knob)
        ReorchKnobs.from_parameters(knobs)
    except (ValueError, StagebatchError) as error:
        parser.error(f"--knob: {error}")

    manifest = read_manifest(args.repository).raw
    models = list(dict.fromkeys([*args.models, *(m for t, m in (("diversity", args.diversity_model),
                                                                ("answers", args.answers_model)) if t in args.targets)]))
    for name in models:
        if name not in manifest["models"]:
            parser.error(f"model {name!r} is not in {args.repository}/manifest.json; build it first")
    delay_us = int(manifest["models"][models[0]].get("build", {}).get("max_queue_delay_us", 100))
    overlay = overlay_repository(args.repository, manifest, models, [args.policy], delay_us, knobs)
    served = [m for name in models for m in (name, f"{name}_reorch_{args.policy}")]
    print(f"# issue 12 targets: {args.targets}; models {models}; policy {args.policy}; {args.repeats} interleaved "
          f"repeats of {args.duration_s:.0f} s (first {args.warmup_s:.1f} s not measured); unary gRPC")
    started = time.perf_counter()
    try:
        with EmbeddedTriton(overlay, models=served) as server:
            bench = Bench(server.grpc_url, manifest, args, args.policy)
            if "answers" in args.targets:
                bench.answers(args.answers_model)
            if "p50" in args.targets:
                for name in args.models:
                    bench.p50(name)
            if "steady" in args.targets:
                for name in args.models:
                    bench.steady(name)
            if "diversity" in args.targets:
                bench.diversity(args.diversity_model)
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
    print(f"\n# summary ({time.perf_counter() - started:.0f} s)")
    for verdict in bench.verdicts:
        print(f"{'met  ' if verdict.met else 'UNMET'}  {verdict.target}: {verdict.figure}")
    unmet = [v for v in bench.verdicts if not v.met]
    print(f"\n{len(unmet)} of {len(bench.verdicts)} targets UNMET" if unmet else "\nevery target met")


if __name__ == "__main__":
    main()
