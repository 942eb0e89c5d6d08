"""Benchmark: how much load one load-generator core sends, and whether it measures latency faithfully.

Against a trivial model (``ident``: y = x + 1, FP32 [1, 4]) on the embedded Triton, in one run:

1. capacity: open-loop constant-rate runs through :func:`loadtest.driver.run_load` (one Locust
   process) at rising rates, doubling then bisecting. A rate is *sustained* when every arrival was
   answered, at most ``--max-late-fraction`` (default 5%) was sent more than ``late_tolerance_us``
   (2 ms) behind schedule and the generator process stayed below 85% of a core. Printed per rate:
   achieved rate, late arrivals, generator CPU, and the generator's CPU cost per request, from which
   ``requests/s per core = 1e6 / cpu_us_per_request`` (what a saturated core would send).
   On a small machine the server shares the cores, so the search may stop at the *server's* limit:
   the CPU column tells which side ran out.
2. fidelity: at a moderate Poisson rate the same schedule (same seed) is sent by the driver and by a
   minimal ``tritonclient.grpc.aio`` client in this process; p50/p99 side by side and their ratio.
   Target (issue 5): |p50 driver / p50 aio - 1| < 5%.

    .venv/bin/python bench/loadgen_capacity.py                 # full run (a few minutes)
    .venv/bin/python bench/loadgen_capacity.py --smoke         # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tiny test models

from loadgen_models import build_repository  # noqa: E402

from loadtest.driver import LoadPlan, LoadResult, LoadSpec, run_load  # noqa: E402
from loadtest.workloads import ArrivalSpec  # noqa: E402

MODEL = "ident"
SATURATION_CPU_PERCENT = 85.0


def sustained(result: LoadResult, max_late_fraction: float) -> bool:
    n = len(result.records)
    return (
        n == result.scheduled_arrivals
        and result.errors == 0
        and result.late_arrivals <= max_late_fraction * max(n, 1)
        and result.loadgen_cpu_percent < SATURATION_CPU_PERCENT
    )


def run_rate(url: str, manifest: dict, rate: float, duration_s: float, warmup_s: float) -> LoadResult:
    spec = LoadSpec(MODEL, "whole", ArrivalSpec("constant", rate_rps=rate), None, duration_s=duration_s, warmup_s=warmup_s)
    return run_load(url, manifest, spec)


def describe(rate: float, result: LoadResult, ok: bool) -> str:
    n = len(result.records)
    achieved = n / result.duration_s
    cpu_us_per_request = result.loadgen_cpu_percent / 100.0 * 1e6 / achieved if achieved else float("nan")
    lat = np.asarray([r.latency_us for r in result.records if r.ok]) if n else np.asarray([0])
    late_p99_ms = np.percentile([r.late_us for r in result.records], 99) / 1000 if n else 0.0
    return (
        f"{rate:9.0f} {achieved:9.0f} {result.late_arrivals:6d} {late_p99_ms:8.1f} {result.errors:5d} "
        f"{result.loadgen_cpu_percent:6.0f}% "
        f"{cpu_us_per_request:9.0f} {1e6 / cpu_us_per_request if cpu_us_per_request else 0:11.0f} "
        f"{np.percentile(lat, 50):8.0f} {np.percentile(lat, 99):8.0f}  {'yes' if ok else 'no'}"
    )


def capacity_search(url: str, manifest: dict, args: argparse.Namespace) -> None:
    print("\n== capacity: open-loop constant rate, one Locust process ==")
    print(f"{'rate/s':>9} {'achieved':>9} {'late':>6} {'late99ms':>8} {'err':>5} {'cpu':>7} {'cpu µs/req':>9} {'req/s/core':>11} "
          f"{'p50 µs':>8} {'p99 µs':>8}  sustained")
    best, worst = 0.0, None
    rate = args.start_rate
    while rate <= args.max_rate:
        result = run_rate(url, manifest, rate, args.duration_s, args.warmup_s)
        ok = sustained(result, args.max_late_fraction)
        print(describe(rate, result, ok), flush=True)
        if not ok:
            worst = rate
            break
        best = rate
        rate *= 2
    for _ in range(args.bisect_steps if worst else 0):
        rate = (best + worst) / 2
        result = run_rate(url, manifest, rate, args.duration_s, args.warmup_s)
        ok = sustained(result, args.max_late_fraction)
        print(describe(rate, result, ok), flush=True)
        best, worst = (rate, worst) if ok else (best, rate)
    print(f"highest sustained rate: {best:.0f} req/s from one Locust process"
          + (f" (first failing: {worst:.0f})" if worst else f" (no failure up to --max-rate {args.max_rate:.0f})"))


async def aio_latencies_us(url: str, plan: LoadPlan) -> tuple[list[int], int]:
    """Send the plan's open-loop schedule with a minimal tritonclient.grpc.aio client; (latencies, errors)."""
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    from loadtest.request_factory import NUMPY_TO_TRITON, RequestFactory
    from loadtest.session import open_loop_schedule

    times, _ = open_loop_schedule(plan)
    spec = plan.spec
    arrays = RequestFactory(plan.entry(), spec.variant).arrays(None)
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), NUMPY_TO_TRITON[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    model_name = plan.entry().triton_name(spec.variant)
    latencies: list[int] = []
    errors = 0
    async with aioclient.InferenceServerClient(url) as client:
        await client.infer(model_name, inputs)  # connect before the clock starts

        async def one(offset_s: float) -> None:
            nonlocal errors
            start = time.perf_counter_ns()
            try:
                await client.infer(model_name, inputs)
            except Exception:
                errors += 1
                return
            if offset_s >= spec.warmup_s:
                latencies.append((time.perf_counter_ns() - start) // 1000)

        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        tasks = []
        for offset in times.tolist():
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(offset)))
        await asyncio.gather(*tasks)
    return latencies, errors


def fidelity(url: str, manifest: dict, args: argparse.Namespace) -> None:
    print(f"\n== fidelity: Poisson {args.compare_rate:.0f} req/s, same schedule, driver vs tritonclient.grpc.aio ==")
    spec = LoadSpec(MODEL, "whole", ArrivalSpec("poisson", rate_rps=args.compare_rate), None,
                    duration_s=args.duration_s, warmup_s=args.warmup_s, seed=args.seed)
    plan = LoadPlan(url, spec, manifest["models"][MODEL], str(manifest.get("target", "embedded")))
    rows = []
    for repeat in range(args.repeats):
        # alternate which client goes first, so a drift in the shared machine's load cancels out
        order = ("driver", "aio") if repeat % 2 == 0 else ("aio", "driver")
        for who in order:
            if who == "driver":
                result = run_load(url, manifest, spec)
                driver = np.asarray([r.latency_us for r in result.records if r.ok])
            else:
                aio, aio_errors = asyncio.run(aio_latencies_us(url, plan))
                aio_arr = np.asarray(aio)
        row = (np.percentile(driver, 50), np.percentile(aio_arr, 50), np.percentile(driver, 99), np.percentile(aio_arr, 99))
        rows.append(row)
        print(f"repeat {repeat} ({' then '.join(order)}): driver n={len(driver)} errors={result.errors} "
              f"late={result.late_arrivals} cpu={result.loadgen_cpu_percent:.0f}% p50={row[0]:.0f} p99={row[2]:.0f} | "
              f"aio n={len(aio_arr)} errors={aio_errors} p50={row[1]:.0f} p99={row[3]:.0f} | p50 ratio {row[0] / row[1]:.3f}")
    p50_d, p50_a, p99_d, p99_a = (float(np.median([row[i] for row in rows])) for i in range(4))
    ratios = [row[0] / row[1] for row in rows]
    print(f"medians over {len(rows)} repeats:")
    print(f"{'':10} {'driver':>10} {'aio':>10} {'ratio':>8}")
    print(f"{'p50 µs':10} {p50_d:10.0f} {p50_a:10.0f} {p50_d / p50_a:8.3f}")
    print(f"{'p99 µs':10} {p99_d:10.0f} {p99_a:10.0f} {p99_d / p99_a:8.3f}")
    median_ratio = float(np.median(ratios))
    verdict = "within" if abs(median_ratio - 1) < 0.05 else "OUTSIDE"
    print(f"p50 difference (median of per-repeat ratios, range {min(ratios):.3f}..{max(ratios):.3f}): "
          f"{100 * (median_ratio - 1):+.1f}% ({verdict} the 5% target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--start-rate", type=float, default=250.0)
    parser.add_argument("--max-rate", type=float, default=16000.0)
    parser.add_argument("--bisect-steps", type=int, default=3)
    parser.add_argument("--max-late-fraction", type=float, default=0.05,
                        help="share of arrivals allowed to be late. A generator that cannot keep up falls behind on "
                             "most arrivals; on a 2-core machine shared with the server, OS scheduling jitter alone "
                             "makes ~1-2%% of arrivals late at any rate (measured: 250 req/s, 1.1%%)")
    parser.add_argument("--compare-rate", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="short runs: checks the script, measures nothing")
    parser.add_argument("--skip-capacity", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.duration_s, args.warmup_s, args.max_rate, args.bisect_steps, args.repeats = 1.5, 0.5, 500.0, 0, 1

    from stagebatch.server import EmbeddedTriton

    with tempfile.TemporaryDirectory(prefix="loadgen-bench-") as tmp:
        repository = Path(tmp) / "repo"
        manifest = build_repository(repository)
        with EmbeddedTriton(repository, models=[MODEL]) as server:
            print(f"server {server.grpc_url}, model {MODEL!r} (FP32 [1, 4], y = x + 1), "
                  f"runs of {args.duration_s:g} s after {args.warmup_s:g} s warm-up")
            if not args.skip_capacity:
                capacity_search(server.grpc_url, manifest, args)
            fidelity(server.grpc_url, manifest, args)


if __name__ == "__main__":
    main()
