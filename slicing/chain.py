"""Running a stage chain beside the whole model: numerical verification and per-stage latency profile.

:func:`verify_chain` checks that the stages reproduce the whole model on random valid inputs (and
times both, interleaved); :func:`profile_stages` measures each stage's latency per batch size and
its favoured batch size, which the repository builder writes into the manifest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from backends.common.ort import make_session
from slicing.cost import median_ms
from slicing.inputs import make_inputs
from slicing.normalize import relative_error
from slicing.slicer import SliceResult
from core.errors import BadParameterError, SliceError

DEFAULT_VERIFY_SEQ_LENS = (7, 16)


@dataclass
class VerificationReport:
    max_rel_error: dict[str, float]  # per output, max |chain - whole| / max |whole| over all runs
    latency_ratio: float  # chain / whole, summed medians over the timed batch sizes
    latency_ms: dict[int, tuple[float, float]]  # batch -> (whole, chain) median ms
    batch_sizes: list[int]
    seq_lens: list[int | None]

    def ratio_at(self, batch: int) -> float:
        whole_ms, chain_ms = self.latency_ms[batch]
        return chain_ms / whole_ms


@dataclass
class StageProfile:
    index: int
    latency_ms: dict[int, float]  # batch size -> median latency
    favoured_batch_size: int


class StageChain:
    """Sessions of the whole model and of every stage, sharing one tensor namespace per run."""

    def __init__(self, result: SliceResult, intra_op_threads: int = 2):

        self.result = result
        self.whole = make_session(result.whole, intra_op_threads=intra_op_threads)
        self.stages = [make_session(stage.model, intra_op_threads=intra_op_threads) for stage in result.stages]
        self.whole_inputs = [v.name for v in result.whole.graph.input]
        self.output_names = [v.name for v in result.whole.graph.output]

    def run_whole(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.whole.run(self.output_names, feeds)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors
            shapes = {name: value.shape for name, value in feeds.items()}
            raise SliceError(f"the whole model failed on inputs {shapes}: {str(error).splitlines()[0]}; "
                             "use batch sizes and sequence lengths the model supports") from None
        return dict(zip(self.output_names, values))

    def run_chain(self, feeds: dict[str, np.ndarray], *, check: bool = False) -> dict[str, np.ndarray]:
        namespace = dict(feeds)
        for stage, session in zip(self.result.stages, self.stages):
            stage_feeds = {name: namespace[name] for name in stage.inputs}
            try:
                values = session.run(stage.outputs, stage_feeds)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors
                raise SliceError(f"stage {stage.index} failed on inputs "
                                 f"{ {k: v.shape for k, v in stage_feeds.items()} }: {str(error).splitlines()[0]}") from None
            if check and self.result.batchable:
                batch = next(iter(feeds.values())).shape[0]
                for name, value in zip(stage.outputs, values):
                    if value.shape[:1] != (batch,):
                        raise SliceError(f"stage {stage.index} output {name!r} has shape {value.shape}, "
                                         f"not batch-first with batch {batch}")
            namespace.update(zip(stage.outputs, values))
        return {name: namespace[name] for name in self.output_names}

    def inputs(self, batch: int, seq_len: int | None, seed: int) -> dict[str, np.ndarray]:
        return make_inputs(self.result.input_specs, batch, seq_len, rng=np.random.default_rng(seed))


def _fixed_batch(result: SliceResult) -> int | None:
    if result.batchable:
        return None
    return next((s.shape[0] for s in result.input_specs if s.shape and s.shape[0] != -1), 1)


def verify_chain(result: SliceResult, batch_sizes=(1, 4), seq_lens=None, rtol: float = 1e-4, *,
                 timing_reps: int = 5, intra_op_threads: int = 2) -> VerificationReport:
    """Run the stage chain against the whole model on random valid inputs; raise SliceError on a mismatch.

    Inputs are valid by construction (token ids below the vocabulary, masks of real lengths, random
    lengths per row). The error is relative to each output's scale (max |whole|). Timing: whole and
    chain runs interleaved, medians per batch size.
    """
    fixed = _fixed_batch(result)
    batch_sizes = [fixed] if fixed is not None else [int(b) for b in batch_sizes]
    if any(b < 1 for b in batch_sizes):
        raise BadParameterError(f"batch_sizes {batch_sizes} must be >= 1")
    has_sequence = any(s.sequence_axis is not None for s in result.input_specs)
    seq_list: list[int | None] = ([int(s) for s in (seq_lens or DEFAULT_VERIFY_SEQ_LENS)] if has_sequence else [None])
    chain = StageChain(result, intra_op_threads)
    errors = {name: 0.0 for name in chain.output_names}
    seed = 0
    for batch in batch_sizes:
        for seq_len in seq_list:
            seed += 1
            feeds = chain.inputs(batch, seq_len, seed)
            whole = chain.run_whole(feeds)
            chained = chain.run_chain(feeds, check=True)
            for name in chain.output_names:
                error = relative_error(whole[name], chained[name])
                errors[name] = max(errors[name], error)
                if not error <= rtol:
                    raise SliceError(
                        f"stage chain differs from the whole model on output {name!r} at batch {batch}"
                        f"{f', seq {seq_len}' if seq_len else ''}: relative error {error:.2e} > rtol {rtol:g} "
                        f"(shapes {whole[name].shape} vs {chained[name].shape})")
    latency: dict[int, tuple[float, float]] = {}
    for batch in batch_sizes:
        feeds = chain.inputs(batch, seq_list[-1], 99)
        whole_ms, chain_ms = interleaved_ms(lambda: chain.run_whole(feeds), lambda: chain.run_chain(feeds),
                                            reps=timing_reps)
        latency[batch] = (whole_ms, chain_ms)
    ratio = sum(c for _, c in latency.values()) / max(sum(w for w, _ in latency.values()), 1e-9)
    return VerificationReport(errors, ratio, latency, batch_sizes, seq_list)


def interleaved_ms(first, second, *, reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Medians (ms) of two callables timed alternately, so drifting machine load hits both alike."""
    for _ in range(warmup):
        first()
        second()
    times_first, times_second = [], []
    for rep in range(reps):
        order = ((first, times_first), (second, times_second))
        for run, times in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_first), statistics.median(times_second)


def profile_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (included even when it is not a power of two)."""
    if max_batch < 1:
        raise BadParameterError(f"max_batch={max_batch} must be >= 1")
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def favoured_batch_size(latency_ms: dict[int, float], min_gain: float = 0.05) -> int:
    """The batch size after which per-sample time stops improving by more than ``min_gain``.

    Walks the batch sizes upwards; the first size whose successor improves the per-sample time by
    less than ``min_gain`` (relative) is favoured. The largest size if it keeps improving.
    """
    sizes = sorted(latency_ms)
    if not sizes:
        raise BadParameterError("latency_ms is empty")
    for size, following in zip(sizes, sizes[1:]):
        per_sample, next_per_sample = latency_ms[size] / size, latency_ms[following] / following
        if next_per_sample > per_sample * (1.0 - min_gain):
            return size
    return sizes[-1]


def profile_stages(result: SliceResult, max_batch: int, seq_len: int | None = None, *, reps: int = 5,
                   min_gain: float = 0.05, intra_op_threads: int = 2) -> list[StageProfile]:
    """Median latency of each stage at batch sizes 1, 2, 4, .. max_batch, and its favoured batch size."""

    fixed = _fixed_batch(result)
    sizes = [fixed] if fixed is not None else profile_batch_sizes(max_batch)
    has_sequence = any(s.sequence_axis is not None for s in result.input_specs)
    if has_sequence and seq_len is None:
        seq_len = DEFAULT_VERIFY_SEQ_LENS[-1]
    chain = StageChain(result, intra_op_threads)
    latency: list[dict[int, float]] = [{} for _ in result.stages]
    for batch in sizes:
        # Full-length rows: a stage's cost at a batch size is for padded batches of seq_len.
        lengths = [seq_len] * batch if has_sequence else None
        namespace = make_inputs(result.input_specs, batch, seq_len, rng=np.random.default_rng(batch),
                                lengths=lengths)
        for stage, session in zip(result.stages, chain.stages):
            feeds = {name: namespace[name] for name in stage.inputs}
            values = session.run(stage.outputs, feeds)
            namespace.update(zip(stage.outputs, values))
            latency[stage.index][batch] = median_ms(lambda: session.run(stage.outputs, feeds), reps=reps)
    return [StageProfile(stage.index, latency[stage.index], favoured_batch_size(latency[stage.index], min_gain))
            for stage in result.stages]
