"""Microbenchmark: the reorchestrator's own costs, without Triton.

1. The scheduler's cost per decision (target below 20 us). A decision is one call into the pure
   core: ``add_requests``, ``schedule`` or ``on_stage_done``. Stages are simulated (discrete events,
   fake clock), so only the scheduler's Python time is timed.
2. With ``--repository DIR`` (a built repository holding ``--model``, e.g. the tiny lstm): the
   engine's answer path in-process (real onnxruntime stages, the engine's threads, a responder that
   only counts): answers/s and microseconds per answer, with the cost model on (fused chain) and off
   (stage by stage). This is the engine's ceiling; through Triton each answer also pays the Python
   backend's response IPC (``bench/reorchestration.py --targets answers`` measures that end to end).

    .venv/bin/python bench/scheduler_cost.py [--requests 20000] [--stages 4] [--seed 0]
    .venv/bin/python bench/scheduler_cost.py --repository model_repository --model lstm --answers 20000
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import threading
import time
from pathlib import Path

from backends.reorch.engine import ReorchEngine
from backends.reorch.executor import make_ort_executors
from backends.reorch.policies import BatchPolicy, ReorchKnobs, StageContext, create_policy
from backends.reorch.scheduler import StageScheduler
from backends.reorch.state import Request
from backends.reorch.spec import StagesSpec
from core.manifest import read_manifest
from loadtest.request_factory import RequestFactory, model_entry


def run(policy: str, requests: int, stages: int, seed: int, max_rows: int = 16) -> dict[str, float]:
    rng = random.Random(seed)
    context = StageContext(stages, tuple([8] * stages), max_sequence_length=128)
    scheduler = StageScheduler(create_policy(policy, ReorchKnobs(max_batch_rows=max_rows, stretch_max_wait_us=2000,
                                                                 stretch_max_rows=2 * max_rows), context))
    events: list = []
    seq = itertools.count()
    now = 0
    for request_id in range(requests):  # bursty Poisson arrivals, long-tailed lengths
        now += int(rng.expovariate(1 / (50 if (request_id // 200) % 2 else 400)))
        length = min(128, max(1, int(rng.paretovariate(1.2) * 8)))
        heapq.heappush(events, (now, next(seq), "arrive", Request(request_id, rng.choice([1, 1, 1, 2]), now, length)))
    spent_ns: list[int] = []
    launches = 0

    def timed(call, *args, **kwargs):
        start = time.perf_counter_ns()
        result = call(*args, **kwargs)
        spent_ns.append(time.perf_counter_ns() - start)
        return result

    answered = 0
    while events or scheduler.next_timer_us() is not None:
        timer = scheduler.next_timer_us()
        if events and (timer is None or events[0][0] <= timer):
            now, _, kind, payload = heapq.heappop(events)
        else:
            now, kind, payload = max(now, timer), "timer", None
        if kind == "arrive":
            answered += len(timed(scheduler.add_requests, [payload], now))
        elif kind == "done":
            answered += len(timed(scheduler.on_stage_done, payload, now))
        for launch in timed(scheduler.schedule, now):
            launches += 1
            duration = 200 + 30 * launch.rows * (launch.pad_to or 1) // 8
            heapq.heappush(events, (now + duration, next(seq), "done", launch.launch_id))
    assert answered == requests, (answered, requests)
    spent_us = [ns / 1000 for ns in spent_ns]
    spent_us.sort()
    return {"decisions": len(spent_us), "launches": launches, "mean_us": statistics.fmean(spent_us),
            "p50_us": spent_us[len(spent_us) // 2], "p99_us": spent_us[int(len(spent_us) * 0.99)],
            "max_us": spent_us[-1], **{f"op_{k}": v for k, v in scheduler.operation_counts.items()}}


def engine_answers(repository: Path, model: str, answers: int, cost_model: str, submit_batch: int = 16) -> dict:
    """Answers/s of the engine in-process: ``answers`` one-row requests, submitted ``submit_batch`` at a time."""
    manifest = read_manifest(repository).raw
    spec = StagesSpec.from_manifest_entry(model, manifest["models"][model])
    entry = model_entry(manifest, model)
    factory = RequestFactory(entry, "reorch", seed=0)
    length = max(entry.min_length or 1, (entry.max_length or 2) // 2) if entry.has_sequence else None
    request = factory.arrays(length)
    done = threading.Semaphore(0)

    def respond(handle, answer) -> None:
        done.release()

    knobs = ReorchKnobs(max_batch_rows=spec.max_batch_size, cost_model=cost_model)
    engine = ReorchEngine(spec, "dva", knobs, make_ort_executors(spec, repository), respond)
    try:
        started = time.perf_counter()
        for first in range(0, answers, submit_batch):
            engine.submit([(i, request) for i in range(first, min(answers, first + submit_batch))])
        for _ in range(answers):
            done.acquire()
        elapsed = time.perf_counter() - started
        ops = dict(engine.scheduler.operation_counts)
    finally:
        engine.close()
    return {"answers_per_s": answers / elapsed, "us_per_answer": elapsed / answers * 1e6, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, default=None, help="built repository: also time the answer path")
    parser.add_argument("--model", default="lstm")
    parser.add_argument("--answers", type=int, default=20000)
    args = parser.parse_args()
    if args.repository is not None:
        print(f"engine answer path in-process ({args.model}, {args.answers} one-row requests; target >= 10,000/s "
              "through Triton, so the engine alone must be well above it)")
        for mode in ("on", "off"):
            result = engine_answers(args.repository, args.model, args.answers, mode)
            print(f"  cost model {mode:<3}: {result['answers_per_s']:>9,.0f} answers/s  "
                  f"{result['us_per_answer']:>6.1f} us/answer  ops {result['ops']}")
    print(f"scheduler cost per decision ({args.requests} requests, {args.stages} stages, target < 20 us)")
    print(f"{'policy':<10}{'decisions':>10}{'launches':>10}{'mean us':>10}{'p50 us':>9}{'p99 us':>9}{'max us':>9}"
          f"  operations")
    for policy in BatchPolicy:
        result = run(policy.value, args.requests, args.stages, args.seed)
        ops = ", ".join(f"{k[3:]}={int(v)}" for k, v in result.items() if k.startswith("op_"))
        verdict = "ok" if result["mean_us"] < 20 else "ABOVE TARGET"
        print(f"{policy.value:<10}{result['decisions']:>10}{result['launches']:>10}{result['mean_us']:>10.2f}"
              f"{result['p50_us']:>9.2f}{result['p99_us']:>9.2f}{result['max_us']:>9.1f}  {ops}  [{verdict}]")


if __name__ == "__main__":
    main()
