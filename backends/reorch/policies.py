"""Batching policies of the stage reorchestrator: small objects behind one ABC.

The scheduler (``scheduler.py``) owns the state and the mechanics of the meta operations; a policy
only answers three questions at the moments the scheduler asks them:

- ``pick_entry_group``: which pending requests form the next batch entering stage 0
  (FIFO, or one sequence-length bucket: *bucketing*);
- ``allows_stretch``: may this new batch be a catch-up batch that merges into ``target`` at
  stage ``boundary`` (*stretch*)?
- ``split_piece_rows``: at stage ``boundary``, should a batch of ``rows`` be cut, and into pieces of
  at most how many rows (*split*)?

Every policy uses *new* (a batch enters stage 0 while older batches are in later stages).

Knobs come from the model's ``config.pbtxt`` parameters (``ReorchKnobs.from_parameters``).
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .cost import CostModel
from .errors import ConfigValidationError
from .state import Batch, Request



class BatchPolicy(str, enum.Enum):
    """Policy names as written in ``config.pbtxt`` (parameter ``policy``)."""

    PIPELINE = "pipeline"  # new only
    LOAD = "load"  # new + stretch
    OPERATOR = "operator"  # new + split
    INPUT = "input"  # new + bucketing
    DVA = "dva"  # all of them, each when the situation calls for it


COST_MODEL_MODES = ("auto", "on", "off")
FUSED_GRAPHS = ("whole", "stages")


@dataclass
class ReorchKnobs:
    """Tunable limits of the reorchestrator; every field is a ``config.pbtxt`` parameter of the same name."""

    max_batch_rows: int = 8
    """Largest batch (in rows) any stage runs; the builder sets it to the model's max_batch_size."""
    stage_concurrency: int = 1
    """Batches a stage may run at the same time (one executor thread each)."""
    max_queued_batches_per_stage: int = 4
    """Back-pressure: a stage does not start a batch while this many wait before the next stage."""
    stretch_max_rows: int = 0
    """Largest merged batch a stretch may create (rows); 0 means max_batch_rows."""
    stretch_last_stage: int = -1
    """A catch-up batch may merge only before a stage index <= this (negative: counted from the end)."""
    stretch_max_wait_us: int = 20000
    """Longest time a batch waits at the boundary for its catch-up batch; then it goes on alone."""
    split_last_stage: int = -2
    """Splits happen only before stage indices <= this (negative: from the end; -2 spares the last stage)."""
    split_min_ratio: float = 0.0
    """Split a batch when rows > favoured size x this ratio; 0 means the policy's default (operator 1, dva 2)."""
    split_min_piece_rows: int = 4
    """Pieces of a split are never smaller than this (guards against noisy favoured sizes of 1-2)."""
    bucket_bounds: tuple[int, ...] = ()
    """Upper bounds of the sequence-length buckets; empty means powers of two up to the model's max length."""
    bucket_min_saving: float = 0.25
    """dva buckets only when FIFO batching would waste at least this fraction of the padded work."""
    intra_op_threads: int = 1
    """onnxruntime intra-op threads per stage session."""
    trace_jsonl: str = ""
    """If set, append one JSON line per answered request to this file (server-side trace)."""
    cost_model: str = "auto"
    """Never lose (``cost.py``): on, off, or auto (= on for the default policy dva, off for the others)."""
    stage_overhead_us: float = 150.0
    """Cost model: what one stage boundary costs (launch, feed build, split, scheduling), microseconds."""
    fuse_max_overhead_share: float = 0.1
    """Cost model: fuse every batch when K boundaries would add more than this share of the chain at batch 1."""
    fuse_margin: float = 0.25
    """Cost model: hysteresis of the fuse decision, as a fraction of its threshold: it switches on above
    (1 + this) x the threshold and off below (1 - this) x it, with the measured per-launch overhead; in between
    it stays (at the start: on). Keeps the decision from flipping on the build's noisy tables."""
    whole_max_arrivals: float = 0.5
    """Cost model: run a batch as the whole chain when fewer requests are expected during it (and no diversity)."""
    burst_rate_ratio: float = 2.0
    """Cost model: the load is bursty while the arrival rate over ``burst_window_ms`` exceeds this x the rate over
    ten times that window; steady load with no length diversity runs like the whole model. 0 = never bursty."""
    burst_window_ms: float = 200.0
    """Cost model: the short window of the burst test (the long one is ten times longer)."""
    max_inflight_rows: int = 0
    """Admission limit: rows inside at once; beyond it answer UNAVAILABLE at once. 0 = sized from memory."""
    responder_threads: int = 1
    """Threads that send answers (more only where parallel sends are safe: docs/reorch.md)."""
    device_boundaries: str = "auto"
    """Fused chains keep boundary tensors on the device (I/O binding): auto (= where every stage runs on CUDA), on, off."""
    fused_graph: str = "whole"
    """What a fused run of the whole chain executes: whole (the whole model's graph, where the repository has it) or stages."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ConfigValidationError(f"reorch knob {name}={value!r} is invalid: {rule}; fix the "
                                            f"parameter '{name}' in the model's config.pbtxt")

        self.bucket_bounds = tuple(int(b) for b in self.bucket_bounds)
        need(self.max_batch_rows >= 1, "max_batch_rows", "must be >= 1")
        need(self.stage_concurrency >= 1, "stage_concurrency", "must be >= 1")
        need(self.max_queued_batches_per_stage >= 1, "max_queued_batches_per_stage", "must be >= 1")
        need(0 <= self.stretch_max_rows, "stretch_max_rows", "must be >= 0 (0 = max_batch_rows)")
        need(self.stretch_max_wait_us >= 0, "stretch_max_wait_us", "must be >= 0")
        need(self.split_min_ratio >= 0, "split_min_ratio", "must be >= 0 (0 = policy default)")
        need(self.split_min_piece_rows >= 1, "split_min_piece_rows", "must be >= 1")
        need(all(b >= 1 for b in self.bucket_bounds), "bucket_bounds", "every bound must be >= 1")
        need(list(self.bucket_bounds) == sorted(set(self.bucket_bounds)), "bucket_bounds",
             "must be strictly increasing")
        need(0 <= self.bucket_min_saving < 1, "bucket_min_saving", "must be in [0, 1)")
        need(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0 (0 = onnxruntime default)")
        need(self.cost_model in COST_MODEL_MODES, "cost_model", f"must be one of {', '.join(COST_MODEL_MODES)}")
        need(self.stage_overhead_us >= 0, "stage_overhead_us", "must be >= 0")
        need(self.fuse_max_overhead_share >= 0, "fuse_max_overhead_share", "must be >= 0")
        need(0 <= self.fuse_margin < 1, "fuse_margin", "must be in [0, 1)")
        need(self.whole_max_arrivals >= 0, "whole_max_arrivals", "must be >= 0 (0 = only under steady load)")
        need(self.burst_rate_ratio >= 0, "burst_rate_ratio", "must be >= 0 (0 = never bursty)")
        need(self.burst_window_ms > 0, "burst_window_ms", "must be > 0")
        need(self.max_inflight_rows >= 0, "max_inflight_rows", "must be >= 0 (0 = sized from memory)")
        need(self.responder_threads >= 1, "responder_threads", "must be >= 1")
        need(self.device_boundaries in COST_MODEL_MODES[:1] + ("on", "off"), "device_boundaries",
             "must be one of auto, on, off")
        need(self.fused_graph in FUSED_GRAPHS, "fused_graph", f"must be one of {', '.join(FUSED_GRAPHS)}")

    @property
    def merged_rows_limit(self) -> int:
        return self.stretch_max_rows or self.max_batch_rows

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], **overrides: object) -> ReorchKnobs:
        """Knobs from parameters (``config.pbtxt`` strings, or plain values); keys that are not knobs are ignored."""
        values: dict[str, object] = {}
        for knob in dataclasses.fields(cls):
            if knob.name not in parameters:
                continue
            value = parameters[knob.name]
            raw = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).strip()
            try:
                if knob.name == "bucket_bounds":
                    values[knob.name] = tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
                elif knob.type in ("int", int):
                    values[knob.name] = int(raw)
                elif knob.type in ("float", float):
                    values[knob.name] = float(raw)
                else:
                    values[knob.name] = raw
            except ValueError:
                raise ConfigValidationError(
                    f"reorch knob {knob.name}={raw!r} is not a valid {knob.type}; fix the parameter "
                    f"'{knob.name}' in the model's config.pbtxt") from None
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_parameters(self) -> dict[str, str]:
        """The knobs as ``config.pbtxt`` string parameters (inverse of ``from_parameters``)."""
        out = {}
        for knob in dataclasses.fields(self):
            value = getattr(self, knob.name)
            out[knob.name] = ",".join(str(b) for b in value) if knob.name == "bucket_bounds" else str(value)
        return out


@dataclass(frozen=True)
class StageContext:
    """What a policy knows about the model: number of stages, favoured sizes, sequence lengths."""

    num_stages: int
    favoured_batch_sizes: tuple[int, ...]
    max_sequence_length: int | None = None  # None: the model has no sequence axis
    bucket_bounds: tuple[int, ...] = field(default=())
    latency_tables_ms: tuple[Mapping[int, float], ...] = field(default=())  # per stage: batch -> ms (cost model)

    def cost_model(self, knobs: ReorchKnobs, policy_never_loses: bool) -> CostModel | None:
        """The cost model these knobs ask for (None: off, or no latency tables to decide with)."""
        if knobs.cost_model == "off" or (knobs.cost_model == "auto" and not policy_never_loses):
            return None
        model = CostModel.from_tables(self.latency_tables_ms, stage_overhead_us=knobs.stage_overhead_us,
                                      fuse_max_overhead_share=knobs.fuse_max_overhead_share,
                                      whole_max_arrivals=knobs.whole_max_arrivals)
        return model if model.has_tables and len(model.latency_tables_ms) == self.num_stages else None

    def resolve_stage(self, index: int) -> int:
        """A stage index from a knob: negative counts from the end (-1 = last stage)."""
        return index if index >= 0 else self.num_stages + index


def default_bucket_bounds(max_length: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``max_length`` (which is always the last bound)."""
    bounds = []
    bound = smallest
    while bound < max_length:
        bounds.append(bound)
        bound *= 2
    bounds.append(max_length)
    return tuple(bounds)


def bucket_of(seq_len: int, bounds: Sequence[int]) -> int:
    """The smallest bound >= ``seq_len``; a request longer than every bound is its own bucket."""
    for bound in bounds:
        if seq_len <= bound:
            return bound
    return seq_len


class Policy(ABC):
    """Base policy: FIFO entry batches, no stretch, no split (that is ``pipeline``)."""

    name: BatchPolicy = BatchPolicy.PIPELINE
    buckets_requests = False  # whether pick_entry_group may group by bucket (records op "bucket")
    never_loses = False  # whether cost_model=auto turns the cost model on for this policy

    def __init__(self, knobs: ReorchKnobs, context: StageContext) -> None:
        self.knobs = knobs
        self.context = context
        self.stretch_last_stage = context.resolve_stage(knobs.stretch_last_stage)
        self.split_last_stage = context.resolve_stage(knobs.split_last_stage)
        self.cost = context.cost_model(knobs, self.never_loses)

    # ---- entry -------------------------------------------------------------------------------
    def pick_entry_group(self, pending: Sequence[Request]) -> tuple[list[Request], bool]:
        """The requests of the next new batch (in order) and whether they were grouped by bucket."""
        return self._fifo_group(pending), False

    def _fifo_group(self, pending: Sequence[Request]) -> list[Request]:
        group: list[Request] = []
        rows = 0
        for request in pending:
            if group and rows + request.rows > self.knobs.max_batch_rows:
                break
            group.append(request)
            rows += request.rows
        return group

    def _bucket_group(self, pending: Sequence[Request]) -> list[Request]:
        # The oldest request's bucket goes first, so no bucket starves.
        bucket = pending[0].bucket
        group: list[Request] = []
        rows = 0
        for request in pending:
            if request.bucket != bucket:
                continue
            if group and rows + request.rows > self.knobs.max_batch_rows:
                break
            group.append(request)
            rows += request.rows
        return group

    # ---- stretch -----------------------------------------------------------------------------
    def allows_stretch(self, target: Batch, boundary: int, group_rows: int, group_pad: int | None) -> bool:
        """May a new batch of ``group_rows`` catch up with ``target`` and merge at ``boundary``?"""
        return False

    def _stretch_fits(self, target: Batch, boundary: int, group_rows: int) -> bool:
        return (1 <= boundary <= self.stretch_last_stage and boundary < self.context.num_stages
                and target.rows + group_rows <= self.knobs.merged_rows_limit)

    # ---- split -------------------------------------------------------------------------------
    def split_piece_rows(self, rows: int, boundary: int) -> int | None:
        """Cut a batch of ``rows`` before stage ``boundary`` into pieces of at most this many rows."""
        return None

    def _split_at(self, rows: int, boundary: int, default_ratio: float) -> int | None:
        if boundary > self.split_last_stage:
            return None
        piece = max(self.context.favoured_batch_sizes[boundary], self.knobs.split_min_piece_rows)
        ratio = self.knobs.split_min_ratio or default_ratio
        if rows > piece * ratio and rows > piece:
            return piece
        return None


class PipelinePolicy(Policy):
    name = BatchPolicy.PIPELINE


class LoadPolicy(Policy):
    """new + stretch: any catch-up that fits the limits is taken."""

    name = BatchPolicy.LOAD

    def allows_stretch(self, target: Batch, boundary: int, group_rows: int, group_pad: int | None) -> bool:
        return self._stretch_fits(target, boundary, group_rows)


class OperatorPolicy(Policy):
    """new + split: batches above the next stage's favoured size are cut."""

    name = BatchPolicy.OPERATOR

    def split_piece_rows(self, rows: int, boundary: int) -> int | None:
        return self._split_at(rows, boundary, default_ratio=1.0)


class InputPolicy(Policy):
    """new + bucketing: a new batch holds requests of one sequence-length bucket."""

    name = BatchPolicy.INPUT
    buckets_requests = True

    def pick_entry_group(self, pending: Sequence[Request]) -> tuple[list[Request], bool]:
        if self.context.max_sequence_length is None:
            return self._fifo_group(pending), False
        return self._bucket_group(pending), True


class DvaPolicy(Policy):
    """All operations, each only where it pays off.

    - bucketing only when the FIFO batch would waste >= ``bucket_min_saving`` of its padded work;
    - stretch only into a batch still below the favoured size of the merge stage, same bucket;
    - split only batches well above the favoured size (``split_min_ratio``, default 2x).
    """

    name = BatchPolicy.DVA
    buckets_requests = True
    never_loses = True

    def pick_entry_group(self, pending: Sequence[Request]) -> tuple[list[Request], bool]:
        fifo = self._fifo_group(pending)
        if self.context.max_sequence_length is None or len(fifo) < 2:
            return fifo, False
        padded = sum(r.rows for r in fifo) * max(r.seq_len for r in fifo)
        useful = sum(r.rows * r.seq_len for r in fifo)
        if 1.0 - useful / padded < self.knobs.bucket_min_saving:
            return fifo, False
        return self._bucket_group(pending), True

    def allows_stretch(self, target: Batch, boundary: int, group_rows: int, group_pad: int | None) -> bool:
        if not self._stretch_fits(target, boundary, group_rows):
            return False
        if target.rows >= self.context.favoured_batch_sizes[boundary]:
            return False  # the running batch already uses the stage well: pipeline instead
        if group_pad is not None and target.pad_to is not None:
            # Merging must not re-introduce the padding bucketing removed.
            longer, shorter = max(group_pad, target.pad_to), min(group_pad, target.pad_to)
            if shorter < longer * (1.0 - self.knobs.bucket_min_saving):
                return False
        return True

    def split_piece_rows(self, rows: int, boundary: int) -> int | None:
        return self._split_at(rows, boundary, default_ratio=2.0)


_POLICIES: dict[BatchPolicy, type[Policy]] = {
    BatchPolicy.PIPELINE: PipelinePolicy,
    BatchPolicy.LOAD: LoadPolicy,
    BatchPolicy.OPERATOR: OperatorPolicy,
    BatchPolicy.INPUT: InputPolicy,
    BatchPolicy.DVA: DvaPolicy,
}


def create_policy(name: str | BatchPolicy, knobs: ReorchKnobs, context: StageContext) -> Policy:
    """The policy object for ``name`` (one of pipeline, load, operator, input, dva)."""
    try:
        policy = BatchPolicy(name)
    except ValueError:
        choices = ", ".join(p.value for p in BatchPolicy)
        raise ConfigValidationError(f"reorch policy {name!r} is unknown: use one of {choices} "
                                    "(parameter 'policy' in the model's config.pbtxt)") from None
    if len(context.favoured_batch_sizes) != context.num_stages:
        raise ConfigValidationError(
            f"favoured_batch_sizes has {len(context.favoured_batch_sizes)} entries for "
            f"{context.num_stages} stages; give one per stage")
    return _POLICIES[policy](knobs, context)
