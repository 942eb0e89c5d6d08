"""Benchmark: the load generator's transports (``h2``: loadtest.h2c, ``grpcio``) against perf_analyzer.

Against the embedded server serving the trivial ``ident`` model (``loadtest.tiny_models``):

1. **Latency and client CPU at --rate (100 req/s, Poisson)**, unary and streaming: each round draws
   one schedule (its own seed) and replays it with perf_analyzer (pa), the sender over grpcio and
   the sender over h2, back to back, the order rotating each round. Per window: p50/p99, each
   generator's CPU per request (the sender's own figure over the sending window; perf_analyzer's
   is the child's whole CPU time, start-up included, over its requests, so an upper bound) and its
   client share (mean latency minus Triton's mean time per request over the window). At the end:
   the median over rounds of the per-round ratios ours / perf_analyzer, and pooled percentiles.
2. **Send-rate capability**: one sender process, open loop, constant --loadgen-rate (3,000 req/s)
   against ``ident``, each transport in turn, --loadgen-rounds times: late arrivals (> 2 ms behind
   schedule), CPU and CPU per request.

    .venv/bin/python bench/loadgen_transport.py                 # about 8 minutes
    .venv/bin/python bench/loadgen_transport.py --rounds 2 --duration-s 3 --skip-capacity   # a smoke run
    .venv/bin/python bench/loadgen_transport.py --repository results/quick-a/repository --model bert_base \
        --skip-capacity          # part 1 against a built model's whole variant, fixed length 16

On a shared 2-core machine the figures are indicative only: compare within a round.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from loadtest.driver import LoadJob, LoadSpec, run_load
from loadtest.perf_analyzer import PerfAnalyzerUnavailable, ensure_perf_analyzer, run_schedule
from loadtest.server_stats import snapshot_statistics
from loadtest.stats import percentile_us
from loadtest.tiny_models import build_repository
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import StagebatchError
from core.manifest import read_manifest
from core.server import EmbeddedTriton

GENERATORS = ("pa", "grpcio", "h2")
SEQ_LEN = 16  # the fixed length of --repository's model


def server_mean_us(client, model: str, before: dict) -> float:
    after = snapshot_statistics(client, [model])[model]
    count = after["success_count"] - before.get("success_count", 0)
    return (after["success_ns"] - before.get("success_ns", 0)) / count / 1000 if count else float("nan")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_window(who: str, analyzer, url: str, manifest: dict, spec: LoadSpec, stats_client) -> dict:
    triton_name = manifest["models"][spec.model]["variants"]["whole"]
    before = snapshot_statistics(stats_client, [triton_name])[triton_name]
    if who == "pa":
        plan = LoadJob(url, spec, manifest["models"][spec.model], str(manifest.get("target", "embedded")))
        cpu_before = children_cpu_s()
        result = run_schedule(analyzer, url, plan, timeout_s=spec.duration_s + spec.warmup_s + 60.0)
        scheduled = spec.arrival.rate_rps * (spec.duration_s + spec.warmup_s)
        latencies, cpu_us, late = result.latencies_us, (children_cpu_s() - cpu_before) * 1e6 / scheduled, None
    else:
        run = run_load(url, manifest, LoadSpec(**{**spec.to_dict(), "transport": who}))
        latencies = [r.latency_us for r in run.records if r.ok]
        achieved = len(run.records) / run.duration_s
        cpu_us = run.loadgen_cpu_percent / 100 * 1e6 / achieved if achieved else float("nan")
        late = run.late_arrivals
    return {"latencies": latencies, "cpu_us": cpu_us, "late": late,
            "client_us": float(np.mean(latencies)) - server_mean_us(stats_client, triton_name, before) if latencies
            else float("nan")}


def fidelity(analyzer, url: str, manifest: dict, args: argparse.Namespace) -> None:
    print(f"\n== 1. {args.rate:.0f} req/s Poisson to {args.model!r}, {args.duration_s:g} s windows, {args.rounds} rounds; "
          "order rotates ==")
    print(f"{'protocol':>8} {'round':>5} {'gen':>7} {'p50 ms':>7} {'p99 ms':>7} {'r p50':>6} {'r p99':>6} "
          f"{'cpu µs/req':>10} {'client µs':>9} {'n':>5} {'late':>4}")
    stats_client = grpcclient.InferenceServerClient(url)
    results: dict[str, dict[str, list[dict]]] = {p: {g: [] for g in GENERATORS} for p in args.protocols}
    try:
        for round_index in range(args.rounds):
            for protocol in args.protocols:
                spec = LoadSpec(args.model, "whole", ArrivalSpec("poisson", rate_rps=args.rate), args.lengths,
                                duration_s=args.duration_s, warmup_s=args.warmup_s, seed=args.seed + round_index,
                                protocol=protocol)
                shift = round_index % len(GENERATORS)
                order = GENERATORS[shift:] + GENERATORS[:shift]
                windows = {}
                for who in order:
                    try:
                        windows[who] = one_window(who, analyzer, url, manifest, spec, stats_client)
                    except StagebatchError as error:
                        print(f"{protocol:>8} {round_index:5d} {who:>7} failed: {error}", flush=True)
                if "pa" not in windows:
                    continue
                reference = windows["pa"]["latencies"]
                for who in GENERATORS:
                    if who not in windows:
                        continue
                    w = windows[who]
                    results[protocol][who].append(w)
                    p50, p99 = percentile_us(w["latencies"], 50) / 1000, percentile_us(w["latencies"], 99) / 1000
                    r50 = percentile_us(w["latencies"], 50) / percentile_us(reference, 50)
                    r99 = percentile_us(w["latencies"], 99) / percentile_us(reference, 99)
                    print(f"{protocol:>8} {round_index:5d} {who:>7} {p50:7.3f} {p99:7.3f} {r50:6.3f} {r99:6.3f} "
                          f"{w['cpu_us']:10.0f} {w['client_us']:9.0f} {len(w['latencies']):5d} "
                          f"{'' if w['late'] is None else w['late']:>4}", flush=True)
    finally:
        stats_client.close()
    print("\n== summary: median over rounds of the per-round ratio to perf_analyzer (range); pooled percentiles ==")
    for protocol in args.protocols:
        reference = results[protocol]["pa"]
        for who in GENERATORS:
            windows = results[protocol][who]
            if not windows:
                continue
            pairs = [(w, r) for w, r in zip(windows, reference)]
            line = f"{protocol:>8} {who:>7}"
            for q in (50, 99):
                ratios = [percentile_us(w["latencies"], q) / percentile_us(r["latencies"], q) for w, r in pairs]
                pooled = percentile_us([x for w in windows for x in w["latencies"]], q) / 1000
                line += f"  p{q} ratio {np.median(ratios):.3f} ({min(ratios):.2f}..{max(ratios):.2f}) pooled {pooled:.3f} ms"
            line += (f"  cpu {np.median([w['cpu_us'] for w in windows]):.0f} µs/req"
                     f"  client {np.median([w['client_us'] for w in windows]):.0f} µs")
            print(line, flush=True)


def capacity(url: str, manifest: dict, args: argparse.Namespace) -> None:
    print(f"\n== 2. one sender process, open loop, constant {args.loadgen_rate:.0f} req/s to {args.model!r}, "
          f"{args.loadgen_s:g} s windows ==")
    print(f"{'round':>5} {'transport':>9} {'achieved':>8} {'late %':>7} {'late p50':>8} {'late p99':>8} {'errors':>6} "
          f"{'cpu':>5} {'cpu µs/req':>10} {'lat p50':>8}")
    for round_index in range(args.loadgen_rounds):
        order = ("grpcio", "h2") if round_index % 2 == 0 else ("h2", "grpcio")
        for transport in order:
            spec = LoadSpec(args.model, "whole", ArrivalSpec("constant", rate_rps=args.loadgen_rate), args.lengths,
                            duration_s=args.loadgen_s, warmup_s=1.0, transport=transport)
            result = run_load(url, manifest, spec)
            n = len(result.records)
            achieved = n / result.duration_s
            late_us = [r.late_us for r in result.records] or [0]
            latency_us = [r.latency_us for r in result.records if r.ok] or [0]
            print(f"{round_index:5d} {transport:>9} {achieved:8.0f} {100 * result.late_arrivals / max(n, 1):6.1f}% "
                  f"{percentile_us(late_us, 50) / 1000:6.2f}ms {percentile_us(late_us, 99) / 1000:6.2f}ms "
                  f"{result.errors:6d} {result.loadgen_cpu_percent:4.0f}% "
                  f"{result.loadgen_cpu_percent / 100 * 1e6 / achieved if achieved else float('nan'):10.0f} "
                  f"{percentile_us(latency_us, 50) / 1000:6.2f}ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--protocols", nargs="+", default=["unary", "stream"], choices=["unary", "stream"])
    parser.add_argument("--loadgen-rate", type=float, default=3000.0)
    parser.add_argument("--loadgen-s", type=float, default=5.0)
    parser.add_argument("--loadgen-rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, default=None,
                        help="a built model repository (manifest.json) instead of the tiny models")
    parser.add_argument("--model", default="ident", help="the model whose whole variant is measured")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-capacity", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    print("(figures measured on a shared machine are indicative only)")
    with tempfile.TemporaryDirectory(prefix="loadgen-transport-") as tmp:
        if args.repository is not None:
            repository = args.repository
            manifest = read_manifest(repository).raw
        else:
            repository = Path(tmp) / "repo"
            manifest = build_repository(repository)
        if args.model not in manifest["models"]:
            parser.error(f"--model {args.model!r}: the manifest has {', '.join(sorted(manifest['models']))}")
        entry = manifest["models"][args.model]
        args.lengths = LengthSpec("fixed", length=SEQ_LEN) if entry.get("sequence") else None
        with EmbeddedTriton(repository, models=[entry["variants"]["whole"]]) as server:
            if not args.skip_fidelity:
                try:
                    analyzer = ensure_perf_analyzer()
                except PerfAnalyzerUnavailable as error:
                    print(f"perf_analyzer unavailable, part 1 skipped: {error}")
                else:
                    fidelity(analyzer, server.grpc_url, manifest, args)
            if not args.skip_capacity:
                capacity(server.grpc_url, manifest, args)
    print(f"bench duration: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
