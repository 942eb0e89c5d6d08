"""Benchmark: what cutting a model into a chain of K stages costs over running it whole.

For each zoo model (``full`` size by default) and K = 2, 4, 8 (as far as the model allows), the
stage chain and the whole model run in one process, onnxruntime CPU, graph optimization ALL,
spinning off, the same intra-op threads. Whole and chain runs are interleaved (alternating order)
so drifting machine load hits both alike. Printed per (model, K, batch): median whole ms, median
chain ms, their ratio, and the ratio of the fastest runs (robust to other processes' load).
Target (issue 3): chain / whole <= 1.03 at K = 4.

    .venv/bin/python bench/slicing_overhead.py                       # full models, K 2 4 8, batch 1 16
    .venv/bin/python bench/slicing_overhead.py --size tiny --reps 3  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from slicing.chain import StageChain, verify_chain
from slicing.export import export_zoo_model
from slicing.inputs import make_inputs
from slicing.slicer import slice_model
from slicing.zoo import build_zoo_model
from core.errors import StagebatchError


def interleaved(first, second, reps: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Times (ms) of two callables run alternately, the order flipping every rep."""
    for _ in range(warmup):
        first()
        second()
    times_first, times_second = [], []
    for rep in range(reps):
        pairs = [(first, times_first), (second, times_second)]
        for run, times in (pairs if rep % 2 == 0 else pairs[::-1]):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return times_first, times_second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert_base", "lstm"])
    parser.add_argument("--size", default="full", choices=["tiny", "small", "full"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each side per row")
    parser.add_argument("--balance", default="measured", choices=["measured", "profile", "flops"])
    parser.add_argument("--seq-len", type=int, default=None, help="default: the zoo model's default length")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every session")
    args = parser.parse_args(argv)


    print(f"slicing overhead: size {args.size}, balance {args.balance}, {args.threads} intra-op threads, "
          f"{args.reps} interleaved reps per row")
    header = f"{'model':<10} {'K':>2} {'batch':>5} {'whole ms':>10} {'chain ms':>10} {'ratio':>7} {'ratio(min)':>10}  cut tensors"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models:
        zoo = build_zoo_model(name, args.size)
        exported = export_zoo_model(zoo)
        seq_len = args.seq_len or (zoo.sequence.default_length if zoo.sequence else None)
        for stages in args.stages:
            try:
                result = slice_model(exported.path, stages, input_specs=zoo.input_specs, balance=args.balance,
                                     profile_batch_size=8, seq_len=seq_len, intra_op_threads=args.threads)
            except StagebatchError as error:
                print(f"{name:<10} {stages:>2}  skipped: {error}")
                continue
            report = verify_chain(result, batch_sizes=(1, 2), seq_lens=(seq_len,) if seq_len else None,
                                  timing_reps=1, intra_op_threads=args.threads)
            error = max(report.max_rel_error.values())
            chain = StageChain(result, args.threads)
            for batch in args.batches:
                lengths = [seq_len] * batch if seq_len else None
                feeds = make_inputs(result.input_specs, batch, seq_len, rng=np.random.default_rng(batch),
                                    lengths=lengths)
                whole, chained = interleaved(lambda: chain.run_whole(feeds), lambda: chain.run_chain(feeds), args.reps)
                whole_ms, chain_ms = statistics.median(whole), statistics.median(chained)
                ratio, ratio_min = chain_ms / whole_ms, min(chained) / min(whole)
                rows.append((name, stages, batch, ratio, ratio_min))
                cuts = " | ".join("+".join(group) for group in result.boundaries)
                print(f"{name:<10} {stages:>2} {batch:>5} {whole_ms:>10.2f} {chain_ms:>10.2f} {ratio:>7.3f} "
                      f"{ratio_min:>10.3f}  {cuts} (max rel err {error:.1e})", flush=True)
            del chain
    at_four = [row for row in rows if row[1] == 4]
    if at_four:
        worst = max(at_four, key=lambda row: row[3])
        print(f"\nK=4: worst median ratio {worst[3]:.3f} ({worst[0]}, batch {worst[2]}); target <= 1.03: "
              f"{'met' if worst[3] <= 1.03 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
