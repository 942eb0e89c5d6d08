"""Side-by-side: the stage reorchestrator (every policy) vs Triton's dynamic batcher and the ensemble.

On the embedded server, one run per model serves ``NAME`` (whole model, dynamic batcher),
``NAME_ensemble`` (stages chained by Triton) and ``NAME_reorch_<policy>`` for each policy, and
drives each with the *same* open-loop arrivals and inputs (tritonclient.grpc.aio; one gRPC stream for
the decoupled reorchestrator, concurrent unary calls for the whole model and the ensemble):

- ``bursty``: on/off Poisson arrivals (1.6x then 0.1x capacity, 0.5 s on / 1 s off), fixed length;
- ``longtail``: Poisson at 0.6x capacity, log-normal sequence lengths (sequence models only);
- ``steady``: Poisson at 0.85x capacity, fixed length (no diversity: reorch must not lose here);
- ``overload``: Poisson at 1.5x capacity, fixed length (throughput = completions / time).

Capacity is measured first, per model and scenario, on the whole model (closed loop). Prints avg,
p50, p99 latency and throughput per variant, ratios to the whole model, and what the reorchestrator
did (share of requests stretched / split / bucketed, from each response's REORCH_RECORD).

    stagebatch build -m bert_base -m lstm --size small -o model_repository
    .venv/bin/python bench/reorchestration.py --repository model_repository --models bert_base lstm

Smoke run: ``--duration-s 3 --warmup-s 1 --scenarios steady --policies dva``. This machine has 2
cores shared by the client and the server: numbers are relative, and the client costs CPU too.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stagebatch.reorch_deploy import write_reorch_model  # noqa: E402
from backends.reorch.errors import StagebatchError  # noqa: E402
from backends.reorch.policies import BatchPolicy, ReorchKnobs  # noqa: E402
from loadtest.request_factory import RequestFactory, model_entry  # noqa: E402
from loadtest.workloads import LongTailLengths, OnOffArrivals, PoissonArrivals  # noqa: E402
from stagebatch.server import EmbeddedTriton  # noqa: E402

SCENARIOS = ("bursty", "longtail", "steady", "overload")


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

    from stagebatch.model_config import triton_wire_dtype

    items = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), triton_wire_dtype(array.dtype.name))
        item.set_data_from_numpy(array)
        items.append(item)
    return items


async def drive(url: str, model: str, arrivals_s: np.ndarray, inputs: list, warmup_s: float,
                drain_s: float, streaming: bool) -> Outcome:
    """Open loop: request i is sent at arrivals_s[i] whatever happened before (one gRPC stream for
    the decoupled reorchestrator, concurrent unary calls for the others)."""
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
            yield {"model_name": model, "inputs": inputs[index], "request_id": str(index)}

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
                try:
                    record = result.as_numpy("REORCH_RECORD")
                except Exception:  # noqa: BLE001 (whole/ensemble have no record)
                    record = None
                if record is not None:
                    outcome.records.append(json.loads(record.ravel()[0]))
            if len(done) + len(outcome.errors) >= len(arrivals_s):
                return

    def record(index: int, result, now: float) -> None:
        done[index] = now
        if sent[index] - start >= warmup_s:
            outcome.latencies_ms.append((now - sent[index]) * 1e3)

    async def one(index: int) -> None:
        try:
            result = await client.infer(model, inputs[index], request_id=str(index))
        except Exception as error:  # noqa: BLE001 (counted and reported)
            outcome.errors.append(str(error))
            return
        record(index, result, time.perf_counter())

    async def unary() -> None:
        # WAR: non-decoupled models get unary calls. Streaming them at several thousand req/s
        # crashed tritonserver 2.51 (segfault in TRITONSERVER_InferenceRequestDelete).
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
    share = {op: sum(any(o["op"] == op for o in r["ops"]) for r in records) / len(records)
             for op in ("stretch", "split", "bucket")}
    first = statistics.fmean(r["batch_sizes"][0] for r in records if r["batch_sizes"])
    last = statistics.fmean(r["batch_sizes"][-1] for r in records if r["batch_sizes"])
    return (f"stretch {share['stretch']:.0%} split {share['split']:.0%} bucket {share['bucket']:.0%}, "
            f"batch rows stage0 {first:.1f} -> last {last:.1f}")


def overlay_repository(repository: Path, manifest: dict, models: list[str], policies: list[str],
                       queue_delay_us: int, knobs: dict[str, str]) -> Path:
    """A scratch repository: links to the built models plus NAME_reorch_<policy> for each policy."""
    overlay = Path(tempfile.mkdtemp(prefix="stagebatch-reorch-bench-"))
    for child in repository.iterdir():
        if child.is_dir():
            os.symlink(child.resolve(), overlay / child.name)
    for name in models:
        entry = manifest["models"][name]
        for policy in policies:
            write_reorch_model(overlay, name, {**entry, "variants": {"reorch": f"{name}_reorch_{policy}"}},
                               target="embedded", max_batch_size=int(entry["max_batch_size"]),
                               queue_delay_us=queue_delay_us, policy=policy,
                               knobs={"max_batch_rows": int(entry["max_batch_size"]), **knobs})
    return overlay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--models", nargs="+", default=["bert_base", "lstm"])
    parser.add_argument("--policies", nargs="+", default=[p.value for p in BatchPolicy])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--drain-s", type=float, default=30.0, help="wait this long after the last arrival")
    parser.add_argument("--capacity-s", type=float, default=3.0, help="closed-loop capacity probe length")
    parser.add_argument("--no-ensemble", action="store_true")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="a ReorchKnobs value for every reorch variant (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        knobs = dict(item.split("=", 1) for item in args.knob)
        ReorchKnobs.from_parameters(knobs)
    except (ValueError, StagebatchError) as error:
        parser.error(f"--knob: {error}")

    manifest = json.loads((args.repository / "manifest.json").read_text())
    for name in args.models:
        if name not in manifest["models"]:
            parser.error(f"model {name!r} is not in {args.repository}/manifest.json; build it first")
    delay_us = int(manifest["models"][args.models[0]].get("build", {}).get("max_queue_delay_us", 100))
    overlay = overlay_repository(args.repository, manifest, args.models, args.policies, delay_us,
                                 knobs)
    served = []
    for name in args.models:
        served += [name] + ([] if args.no_ensemble else [f"{name}_ensemble"])
        served += [f"{name}_reorch_{p}" for p in args.policies]
    print(f"# reorchestration bench: models {args.models}, policies {args.policies}, "
          f"{args.duration_s:.0f} s per run (first {args.warmup_s:.0f} s not measured)")
    try:
        with EmbeddedTriton(overlay, models=served) as server:
            for name in args.models:
                entry = model_entry(manifest, name)
                variants = [("whole", name)] + ([] if args.no_ensemble else [("ensemble", f"{name}_ensemble")])
                variants += [(f"reorch/{p}", f"{name}_reorch_{p}") for p in args.policies]
                for scenario in args.scenarios:
                    if scenario == "longtail" and not entry.has_sequence:
                        continue
                    run_scenario(server.grpc_url, entry, name, scenario, variants, args)
    finally:
        shutil.rmtree(overlay, ignore_errors=True)


def run_scenario(url: str, entry, name: str, scenario: str, variants, args) -> None:
    rng = np.random.default_rng(args.seed)
    factories = {label: RequestFactory(entry, label.split("/")[0], seed=args.seed) for label, _ in variants}
    probe_lengths = lengths_for(scenario, entry, 64, np.random.default_rng(args.seed + 1))
    probe_inputs = [_inputs(factories["whole"].arrays(n)) for n in probe_lengths]
    capacity = asyncio.run(capacity_rps(url, name, probe_inputs, 2 * entry.max_batch_size, args.capacity_s))
    arrivals = scenario_plan(scenario, capacity, args.duration_s, rng)
    lengths = lengths_for(scenario, entry, len(arrivals), rng)
    print(f"\n## {name} / {scenario}: whole-model capacity {capacity:.0f} req/s, {len(arrivals)} requests "
          f"(mean {len(arrivals) / args.duration_s:.0f} req/s)"
          + (f", lengths median {int(np.median(lengths))} max {max(lengths)}" if entry.has_sequence else ""))
    print(f"{'variant':<18}{'avg ms':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'avg vs whole':>14}"
          f"{'req/s vs whole':>16}{'errors':>8}  reorch operations")
    base = None
    for label, model in variants:
        inputs = [_inputs(factories[label].arrays(n)) for n in lengths]
        outcome = asyncio.run(drive(url, model, arrivals, inputs, args.warmup_s, args.drain_s,
                                    streaming=label.startswith("reorch")))
        figures = summarize(outcome)
        base = base or figures
        avg_ratio = figures["avg"] / base["avg"] - 1 if base["avg"] else math.nan
        tput_ratio = figures["tput"] / base["tput"] if base["tput"] else math.nan
        failed = len(outcome.errors) + outcome.unanswered
        print(f"{label:<18}{figures['avg']:>9.1f}{figures['p50']:>9.1f}{figures['p99']:>9.1f}{figures['tput']:>9.1f}"
              f"{avg_ratio:>+13.0%} {tput_ratio:>14.2f}x{failed:>8}  {reorch_summary(outcome.records)}", flush=True)
        if outcome.errors:
            print(f"    first error: {outcome.errors[0][:200]}")


if __name__ == "__main__":
    main()
