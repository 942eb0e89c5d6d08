"""What a Triton queue policy costs the dynamic batcher on tritonserver 2.51, side by side.

One embedded server serves the same graph (the same version directory, linked) three times, each
with the whole model's config except the front batcher's queue policy:

- ``NAME``: Triton's stock batcher (no queue policy);
- ``NAME_timeout``: ``default_timeout_microseconds`` (``--timeout-us``, default the 2 s that
  answers a crashed stub's queue within seconds, ``slicing.build.CRASH_QUEUE_TIMEOUT_US``);
- ``NAME_queue_size``: ``max_queue_size`` (``--max-queue-size``) alone.

perf_analyzer 2.51 (async unary gRPC, a fixed request count; ``loadtest.perf_analyzer``) drives each
in a closed loop at every ``--concurrency``; the variants' order rotates per round, ``--rounds``
rounds. Each line prints throughput, p50 and p99 (perf_analyzer's per-request timestamps), and the
time a request waited in Triton's queue (its statistics). The summary gives, per concurrency and
variant, the median over rounds and each round's ratio to the stock batcher.

Measured on the 2-core machine (docs/gpu.md): with either policy, under 8 calls outstanding,
requests wait up to the batcher thread's 500 ms idle wait (p99 503 ms; 1,006 ms with 64
outstanding), and throughput falls to a tenth to a third of the stock batcher's. One call at a time
keeps p99 near the stock batcher's, but a few stalls beyond it still cost 25-80% of the throughput.
The stalls come and go: a round of a few hundred requests can miss them.
So ``stagebatch build`` writes no queue policy unless asked.

    .venv/bin/python bench/queue_policy.py                 # builds a tiny lstm in a scratch directory
    .venv/bin/python bench/queue_policy.py --repository results/quick-r/repository --model bert_base
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.manifest import read_manifest  # noqa: E402
from core.model_config import read_model_config, write_model_config  # noqa: E402
from core.server import EmbeddedTriton  # noqa: E402
from loadtest.perf_analyzer import PerfAnalyzerUnavailable, ensure_perf_analyzer, measure_point  # noqa: E402
from loadtest.request_factory import model_entry  # noqa: E402
from slicing.build import CRASH_QUEUE_TIMEOUT_US, BuildOptions, build_repository  # noqa: E402

STOCK, TIMEOUT, QUEUE_SIZE = "stock", "timeout", "queue_size"


def variant_policies(timeout_us: int, max_queue_size: int) -> dict[str, dict]:
    """The ``default_queue_policy`` of each variant (None: no policy, the stock batcher)."""
    return {STOCK: None, TIMEOUT: {"default_timeout_microseconds": timeout_us},
            QUEUE_SIZE: {"max_queue_size": max_queue_size}}


def overlay(repository: Path, model: str, policies: dict[str, dict | None]) -> tuple[Path, dict[str, str]]:
    """A scratch repository with ``model``'s version directory linked once per variant; returns it and
    the served name of each variant."""
    config = read_model_config(repository / model / "config.pbtxt")
    if "dynamic_batching" not in config:
        raise SystemExit(f"{model} has no dynamic batcher: nothing to compare")
    scratch = Path(tempfile.mkdtemp(prefix="stagebatch-queue-policy-"))
    names = {}
    for variant, policy in policies.items():
        name = model if policy is None else f"{model}_{variant}"
        batching = {key: value for key, value in config["dynamic_batching"].items() if key != "default_queue_policy"}
        if policy is not None:
            batching["default_queue_policy"] = policy
        write_model_config(scratch / name, {**config, "name": name, "dynamic_batching": batching})
        for child in (repository / model).iterdir():
            if child.is_dir():
                os.symlink(child.resolve(), scratch / name / child.name)
        names[variant] = name
    (scratch / "manifest.json").symlink_to((repository / "manifest.json").resolve())
    return scratch, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="a built repository (default: build a tiny MODEL)")
    parser.add_argument("--model", default="lstm")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--timeout-us", type=int, default=CRASH_QUEUE_TIMEOUT_US)
    parser.add_argument("--max-queue-size", type=int, default=1024)
    args = parser.parse_args()
    try:
        analyzer = ensure_perf_analyzer()
    except PerfAnalyzerUnavailable as error:
        raise SystemExit(f"perf_analyzer 2.51 is needed for this bench and cannot be had: {error}") from None
    with tempfile.TemporaryDirectory(prefix="stagebatch-queue-policy-build-") as tmp:
        repository = args.repository
        if repository is None:  # `stagebatch build -m MODEL --size tiny --stages 2`: the stock batcher
            repository = Path(tmp) / "repository"
            build_repository(repository, models=[args.model], options=BuildOptions(size="tiny", stages=2))
        entry = model_entry(read_manifest(repository).raw, args.model)
        scratch, names = overlay(repository, args.model, variant_policies(args.timeout_us, args.max_queue_size))
        print(f"# {args.model} from {repository}: {', '.join(f'{v} = {n}' for v, n in names.items())}; "
              f"perf_analyzer closed loop, {args.requests} requests per measurement, {args.rounds} rounds, "
              f"order rotating", flush=True)
        results: dict[tuple[int, str], list] = {}
        try:
            measure_all(analyzer, scratch, names, entry, args, results)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    summarize(names, args, results)


def measure_all(analyzer, scratch: Path, names: dict[str, str], entry, args: argparse.Namespace,
                results: dict[tuple[int, str], list]) -> None:
    """Every round, concurrency and variant (the order rotating per round), into ``results``."""
    with EmbeddedTriton(scratch, models=list(names.values())) as server:
        for variant in names:  # warm-up, not measured
            measure_point(analyzer, server.grpc_url, names[variant], entry, "whole", concurrency=1,
                          requests=200, seq_len=args.seq_len)
        order = list(names)
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for variant in order[round_index % len(order):] + order[:round_index % len(order)]:
                    point = measure_point(analyzer, server.grpc_url, names[variant], entry, "whole",
                                          concurrency=concurrency, requests=args.requests, seq_len=args.seq_len)
                    results.setdefault((concurrency, variant), []).append(point)
                    print(f"  round {round_index} concurrency {concurrency:3d} {variant:10s} "
                          f"{point.throughput_rps:8.0f}/s p50 {point.p50_ms:7.2f} p99 {point.p99_ms:8.2f} ms "
                          f"queue {point.server_queue_ms:7.2f} ms", flush=True)


def summarize(names: dict[str, str], args: argparse.Namespace, results: dict[tuple[int, str], list]) -> None:
    print("\n# median over rounds; per round: ratio to the stock batcher's throughput, and p99")
    for concurrency in args.concurrency:
        stock = results[(concurrency, STOCK)]
        for variant in names:
            points = results[(concurrency, variant)]
            ratios = " ".join(f"{p.throughput_rps / s.throughput_rps:.2f}" for p, s in zip(points, stock))
            print(f"concurrency {concurrency:3d} {variant:10s} "
                  f"throughput {statistics.median(p.throughput_rps for p in points):8.0f}/s "
                  f"p50 {statistics.median(p.p50_ms for p in points):7.2f} "
                  f"p99 {statistics.median(p.p99_ms for p in points):8.2f} ms "
                  f"queue {statistics.median(p.server_queue_ms for p in points):7.2f} ms | "
                  f"throughput / stock per round: {ratios} | p99 per round: "
                  + " ".join(f"{p.p99_ms:.1f}" for p in points))


if __name__ == "__main__":
    main()
