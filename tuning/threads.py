"""How much slower a model runs with fewer onnxruntime threads: measured once, in-process, in seconds.

The manifest's latency tables are measured with the threads as built (``stagebatch build
--intra-op-threads``, 0 = onnxruntime's default: one thread per core). Fewer threads make one launch
slower but leave cores to other launches (instances, stages), so the simulator needs each thread
count's time relative to the tables' (``ModelProfile.thread_slowdown``). ``measure_thread_slowdown``
runs the whole model's graph (or its stages one after the other where the repository has no whole
graph) in this process, with the threads as built and with each asked count, in interleaved pairs,
at a few batch sizes, and keeps the ratio of the fastest runs (as ``stagebatch build`` keeps the
fastest of its rounds for the tables): on a shared machine another process's work slows the
threaded run more than the single-threaded one, so a median ratio would read fewer threads as cheaper.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.reorch.executor import make_ort_executors, make_whole_executor
from backends.reorch.spec import StagesSpec
from loadtest.request_factory import model_entry
from slicing.inputs import make_inputs


class _Graph:
    """The model in one process at one thread count: the whole graph, or its stages chained."""

    def __init__(self, spec: StagesSpec, root: Path, threads: int) -> None:
        whole = make_whole_executor(spec, root, intra_op_threads=threads)
        self.executors = [whole] if whole is not None else make_ort_executors(spec, root, intra_op_threads=threads)

    def run_s(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Seconds one run of the whole chain takes."""
        began = time.perf_counter()
        values = dict(feeds)
        for executor in self.executors:
            values.update(executor.run(values))
        return time.perf_counter() - began


def measure_thread_slowdown(repository: Path, manifest: Mapping[str, Any], model: str, *,
                            threads: Sequence[int] = (1,), built_threads: int = 0,
                            batch_sizes: Sequence[int] | None = None, length: int | None = None,
                            pairs: int = 9, min_s: float = 0.6) -> dict[int, dict[int, float]]:
    """Per thread count: batch size -> the model's time at that count / its time at ``built_threads``.

    Args:
        repository: the built repository (the ONNX files the manifest names).
        manifest: its manifest (dict form).
        model: the model's name in it.
        threads: the thread counts to measure (``built_threads`` itself is left out: 1.0 by definition).
        built_threads: the count the tables were measured with (0: onnxruntime's default).
        batch_sizes: where to measure (default: the powers of 2 up to the model's max batch size, and it).
        length: sequence length of the inputs (default: the model's maximum, as the load generator sends).
        pairs: interleaved (as built, asked) pairs of runs per point at least, after one warm-up run each;
        min_s: and more pairs until this many seconds went to the point (a fast batch gets more pairs).
    """
    entry = manifest["models"][model]
    spec = StagesSpec.from_manifest_entry(model, dict(entry))
    inputs = model_entry(manifest, model)
    largest = max(1, spec.max_batch_size)
    sizes = sorted(set(batch_sizes or [*(1 << i for i in range(largest.bit_length()) if 1 << i <= largest), largest]))
    length = length or inputs.max_length
    rng = np.random.default_rng(0)
    built = _Graph(spec, Path(repository), built_threads)
    out: dict[int, dict[int, float]] = {}
    for count in [t for t in dict.fromkeys(threads) if t != built_threads]:
        other = _Graph(spec, Path(repository), count)
        table = {}
        for size in sizes:
            feeds = make_inputs(inputs.inputs, size, length, rng=rng,
                                lengths=[length] * size if length is not None else None)
            built.run_s(feeds), other.run_s(feeds)  # warm-up
            times: list[tuple[float, float]] = []
            began = time.perf_counter()
            while len(times) < pairs or time.perf_counter() - began < min_s:
                times.append((other.run_s(feeds), built.run_s(feeds)))
            table[size] = round(min(t for t, _ in times) / min(b for _, b in times), 3)
        out[count] = table
    return out
