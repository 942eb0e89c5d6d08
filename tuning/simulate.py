"""A discrete-event simulator of a built model's variants, in virtual time (``stagebatch simulate``).

Inputs are the manifest's measured per-stage latency tables and a workload given with the plans'
specs (``loadtest.workloads.ArrivalSpec`` / ``LengthSpec``). Three variants:

- ``whole``: one model behind one dynamic batcher (``tuning.batcher``); a batch of ``n`` rows takes
  the *sum of the stage tables* at ``n`` (the manifest has no table of the unsliced model);
- ``ensemble``: K stage models, each behind its own dynamic batcher with the same knobs; a request
  leaves a stage's batch on its own and queues at the next stage's batcher;
- ``reorch``: one dynamic batcher in front (its instance returns at once, so it never blocks), then
  the real ``backends.reorch.scheduler.StageScheduler`` with the real policies and cost model; the
  simulator plays the executor: every launch takes the tables' time for its stages.

Every launch runs on a shared *device*: either ``device_slots`` slots (the default, 1: on a small CPU
each onnxruntime call uses every core, so two launches at once only share them; a pipeline of stages
adds no parallelism), or, with ``SimSettings.cores``, the machine's cores shared by thread count
(processor sharing: ``core_shares``): a launch of ``t`` onnxruntime threads takes at most ``t``
cores, and its time alone at ``t`` threads is the tables' time times the profile's measured
``thread_slowdown`` (the tables are measured with the threads as built). A launch also pays
``launch_overhead_ms`` (Python backend, tensor copies).

Sequence models: a batch pads to its longest request; a stage's time scales linearly with that
length relative to the length the tables were profiled at (see docs/tuning.md).

The measured window, the stability verdict and the latency summary use the same code as real runs
(``loadtest.stability.assess``, ``loadtest.stats.summarize``).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.reorch.cost import interpolate_ms
from backends.reorch.policies import ReorchKnobs, StageContext, create_policy
from backends.reorch.scheduler import StageScheduler
from backends.reorch.state import Request, StageLaunch
from backends.reorch.spec import StagesSpec
from loadtest.stability import arrival_period_s, assess
from loadtest.stats import LatencySummary, summarize
from loadtest.workloads import ArrivalSpec, LengthSpec, arrival_schedule, make_length_distribution
from slicing.zoo import ZOO
from core.errors import BadParameterError, ConfigValidationError
from core.model_config import THREADS_PARAMETER
from tuning.batcher import BatcherSettings, DynamicBatcher

VARIANTS = ("whole", "ensemble", "reorch")
DEFAULT_POLICY = "dva"
LATENCY_SOURCE_WHOLE = "sum of the stage tables per batch size"
UNANSWERED_LATENCY_US = 10**12  # a request still inside when the simulation stops (counted as failed)


# ---------------------------------------------------------------------------------------------
# The model: latency tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelProfile:
    """What the simulator knows about a built model (from its manifest entry)."""

    name: str
    stage_tables_ms: tuple[dict[int, float], ...]
    favoured_batch_sizes: tuple[int, ...]
    max_batch_size: int
    build_queue_delay_us: int = 100
    max_length: int | None = None  # None: no sequence axis
    min_length: int = 1
    profiled_length: int | None = None  # the length the tables were measured at (sequence models)
    whole_graph: bool = False  # the reorchestrator runs a fused whole chain on the whole model's graph
    built_threads: int = 0  # onnxruntime threads the tables were measured with, as built (0: one per core)
    thread_slowdown: Mapping[int, Mapping[int, float]] = field(default_factory=dict)
    """Per onnxruntime thread count other than as built: batch size -> a launch's time at that count
    relative to the tables' (measured by ``tuning.threads``; sizes in between are interpolated)."""

    @classmethod
    def from_manifest_entry(cls, name: str, entry: Mapping[str, Any]) -> ModelProfile:
        """Read the tables, favoured sizes and sequence range through the reorchestrator's own reader."""
        spec = StagesSpec.from_manifest_entry(name, dict(entry))
        tables = tuple(non_decreasing(t) for t in spec.latency_tables_ms)
        missing = [i for i, t in enumerate(tables) if not t]
        if missing or not tables:
            raise ConfigValidationError(
                f"manifest entry of {name!r}: stage(s) {missing or 'all'} have no latency_ms table; rebuild the "
                f"model with 'stagebatch build' (it profiles every stage)")
        if spec.max_batch_size < 1:
            raise ConfigValidationError(f"manifest entry of {name!r}: max_batch_size={spec.max_batch_size}; the "
                                        "simulator models batching models only")
        build = entry.get("build") or {}
        profiled = build.get("profile_seq_len")
        sequence = spec.max_length is not None  # the manifest's "sequence" range
        if sequence and profiled is None:
            profiled = _zoo_default_length(name, entry.get("size"), spec.max_length)
        return cls(name=name, stage_tables_ms=tables, favoured_batch_sizes=spec.favoured_batch_sizes,
                   max_batch_size=spec.max_batch_size,
                   build_queue_delay_us=int(build.get("max_queue_delay_us", 100)),
                   max_length=spec.max_length if sequence else None, min_length=spec.min_length,
                   profiled_length=int(profiled) if profiled else None, whole_graph=bool(spec.whole_onnx))

    @property
    def num_stages(self) -> int:
        return len(self.stage_tables_ms)

    @property
    def is_sequence(self) -> bool:
        return self.max_length is not None

    def length_scale(self, pad_to: int | None) -> float:
        """Time of a batch padded to ``pad_to`` relative to one at the profiled length (linear)."""
        if not self.is_sequence or pad_to is None or not self.profiled_length:
            return 1.0
        return pad_to / self.profiled_length

    def stages_ms(self, first: int, last: int, rows: int, pad_to: int | None = None) -> float:
        """Stages ``first..last`` on a batch of ``rows`` padded to ``pad_to``."""
        compute = sum(interpolate_ms(self.stage_tables_ms[s], rows) for s in range(first, last + 1))
        return compute * self.length_scale(pad_to)

    def whole_ms(self, rows: int, pad_to: int | None = None) -> float:
        return self.stages_ms(0, self.num_stages - 1, rows, pad_to)

    def thread_factor(self, threads: int | None, rows: int) -> float:
        """A launch's time at ``threads`` onnxruntime threads relative to the tables' (None: as built)."""
        if threads is None or threads == self.built_threads:
            return 1.0
        table = self.thread_slowdown.get(threads)
        if not table:
            raise BadParameterError(
                f"intra_op_threads={threads} for {self.name!r}: its tables were measured with {self.built_threads} "
                f"(0: one per core) and no slowdown at {threads} thread(s) is known (measured: "
                f"{sorted(self.thread_slowdown) or 'none'}); measure it with tuning.threads.measure_thread_slowdown "
                "(stagebatch tune does at its start) or leave intra_op_threads unset")
        return interpolate_ms(dict(table), rows)

    def default_batcher(self) -> BatcherSettings:
        """The dynamic batcher as built (max batch size and queue delay of the build, one instance)."""
        return BatcherSettings(max_batch_size=self.max_batch_size, max_queue_delay_us=self.build_queue_delay_us)


def non_decreasing(table: Mapping[int, float]) -> dict[int, float]:
    """A latency table made non-decreasing in batch size: each size takes the least time of any size >= it.

    A larger batch never runs faster than a smaller one; a measured time above a larger batch's is
    noise of a shared machine (it only ever adds time), so the smaller batch keeps the larger's time.
    """
    out: dict[int, float] = {}
    least = float("inf")
    for size in sorted(table, reverse=True):
        least = min(least, float(table[size]))
        out[size] = least
    return dict(sorted(out.items()))


def _zoo_default_length(name: str, size: str | None, max_length: int | None) -> int | None:
    """The zoo's default sequence length: what ``stagebatch build`` profiles the stages at."""
    zoo = ZOO.get(name)
    if zoo is None or size not in zoo.architectures:
        return max_length
    length = zoo.architectures[size].get("default_seq_len")
    if length is None:
        return max_length
    return min(int(length), max_length) if max_length else int(length)


# ---------------------------------------------------------------------------------------------
# What to simulate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantConfig:
    """One served configuration: variant, batcher knobs, and (reorch) policy and knobs."""

    variant: str = "whole"
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    policy: str | None = None
    knobs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise BadParameterError(f"variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.variant != "reorch" and (self.policy or self.knobs):
            raise BadParameterError(f"variant {self.variant!r} takes no reorch policy or knobs; use variant reorch")

    @property
    def label(self) -> str:
        """``whole``, ``ensemble`` or ``reorch:<policy>`` (as capacity.json spells them)."""
        return f"reorch:{self.policy or DEFAULT_POLICY}" if self.variant == "reorch" else self.variant

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "label": self.label, "batching": self.batcher.to_batching()}
        if self.variant == "reorch":
            out["reorch"] = {"policy": self.policy or DEFAULT_POLICY, "knobs": dict(self.knobs)}
        return out


@dataclass(frozen=True)
class Workload:
    """Arrivals and lengths (plan specs), the measured window and the SLO.

    ``duration_s`` is the whole simulated time, warm-up included; the window is ``[warmup_s,
    duration_s)``. (A load run's ``duration_s`` is its window alone, after its warm-up.) Open-loop
    arrivals and lengths are the load generator's own schedule for ``seed``
    (``loadtest.workloads.arrival_schedule``)."""

    arrival: ArrivalSpec
    lengths: LengthSpec | None = None
    duration_s: float = 30.0
    warmup_s: float = 3.0
    slo_ms: float = 100.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise BadParameterError(f"duration_s={self.duration_s}, warmup_s={self.warmup_s}: need duration_s > 0 "
                                    "and warmup_s >= 0")

    def with_rate(self, rate_rps: float) -> Workload:
        """The same workload with an open-loop rate of ``rate_rps``."""
        return dataclasses.replace(self, arrival=dataclasses.replace(self.arrival, rate_rps=float(rate_rps)))


@dataclass(frozen=True)
class SimSettings:
    """Costs the tables do not hold (calibration constants; docs/tuning.md, "Calibration")."""

    launch_overhead_ms: float = 0.3
    """Device time added to every launch (Python backend call, tensor copies)."""
    request_overhead_ms: float = 0.3
    """Added once to every request's latency (gRPC, client, the ensemble's steps; not device time)."""
    inline_overhead_ms: float = 0.3
    """Device time added to a batch the reorchestrator runs inline: the whole chain inside its front
    model's ``execute`` (``ReorchEngine.run_inline``: the Python backend call, one response message)."""
    handoff_ms: float = 0.0
    """Time the reorchestrator's front instance spends on a batch it hands to the scheduler (``execute``
    copies the tensors and submits them); the front takes no other batch meanwhile. Not device time."""
    inline_request_overhead_ms: float = 0.3
    """``request_overhead_ms`` of a request the reorchestrator answered inline (one response from its
    front model's ``execute``, as the whole model answers; the others go through its response sender)."""
    row_device_ms: float = 0.0
    """Device time every row adds to the launch that takes it in (stage 0 or the whole model)."""
    compute_scale: float = 1.0
    """The tables' time is multiplied by this in the server (shared cores, in-server tensor handling)."""
    device_slots: int = 1
    """Launches that run at the same time without slowing each other (1 on a small CPU); unused with ``cores``."""
    cores: int = 0
    """0: the device has ``device_slots`` slots. N > 0: launches share N cores by their onnxruntime
    thread counts (``core_shares``), and ``device_slots`` is not used."""
    drain_s: float = 5.0
    """How long the simulation continues after the last arrival before it counts the rest as failed."""
    variant_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    """Values that replace the ones above, keyed ``MODEL:VARIANT`` or ``VARIANT`` (the first that exists wins;
    written by ``tuning.calibrate``)."""
    reference_capacity_rps: dict[str, float] = field(default_factory=dict)
    """Per model, the whole model's capacity measured by the run these costs were fitted to (its
    ``capacity.json``): how fast the machine was then (``tuning.calibrate.rescaled``)."""

    def for_variant(self, variant: str, model: str | None = None) -> SimSettings:
        """The settings a configuration of ``variant`` (of ``model``) runs with."""
        override = self.variant_overrides.get(f"{model}:{variant}") if model else None
        if override is None:
            override = self.variant_overrides.get(variant)
        return dataclasses.replace(self, variant_overrides={}, **override) if override else self

    def __post_init__(self) -> None:
        if self.device_slots < 1:
            raise BadParameterError(f"device_slots={self.device_slots}: must be >= 1")
        if self.cores < 0:
            raise BadParameterError(f"cores={self.cores}: must be >= 0 (0: the device_slots model)")
        if min(self.launch_overhead_ms, self.request_overhead_ms, self.row_device_ms, self.inline_overhead_ms,
               self.handoff_ms, self.inline_request_overhead_ms) < 0:
            raise BadParameterError("launch_overhead_ms, request_overhead_ms, row_device_ms, inline_overhead_ms, "
                                    "handoff_ms and inline_request_overhead_ms must be >= 0")
        if self.compute_scale <= 0:
            raise BadParameterError(f"compute_scale={self.compute_scale}: must be > 0")


@dataclass
class SimResult:
    """The prediction for one configuration under one workload."""

    config: VariantConfig
    summary: LatencySummary
    stable: bool
    unstable_reason: str | None
    offered_rps: float
    achieved_rps: float
    stage_batches: list[dict[str, Any]]
    operations: dict[str, int]
    cpu_s: float

    @property
    def goodput_rps(self) -> float:
        return self.summary.goodput_rps

    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        return {**self.config.describe(), "p50_ms": _r(s.p50_ms), "p99_ms": _r(s.p99_ms), "avg_ms": _r(s.avg_ms),
                "throughput_rps": _r(s.throughput_rps), "goodput_rps": _r(s.goodput_rps), "slo_ms": s.slo_ms,
                "offered_rps": _r(self.offered_rps), "achieved_rps": _r(self.achieved_rps), "stable": self.stable,
                "unstable_reason": self.unstable_reason, "requests": s.requests, "stages": self.stage_batches,
                "operations": self.operations, "cpu_s": round(self.cpu_s, 3)}


def _r(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 3)


# ---------------------------------------------------------------------------------------------
# The event loop and its parts
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    request_id: int
    arrival_us: int
    length: int | None
    exit_us: int | None = None
    inline: bool = False  # answered inline by the reorchestrator's front model


class _Loop:
    def __init__(self) -> None:
        self.now_us = 0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, when_us: int, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(int(when_us), self.now_us), next(self._seq), action))

    def run(self, until_us: int) -> None:
        while self._events and self._events[0][0] <= until_us:
            when, _, action = heapq.heappop(self._events)
            self.now_us = when
            action()


class _Device:
    """``slots`` launches run at once; the others wait in FIFO order."""

    def __init__(self, loop: _Loop, slots: int) -> None:
        self.loop, self.slots, self.busy = loop, slots, 0
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()
        self.busy_us = 0

    def run(self, duration_us: int, done: Callable[[], None], threads: int = 1) -> None:  # threads: unused by slots
        self._waiting.append((max(1, duration_us), done))
        self._start()

    def _start(self) -> None:
        while self.busy < self.slots and self._waiting:
            duration, done = self._waiting.popleft()
            self.busy += 1
            self.busy_us += duration
            self.loop.at(self.loop.now_us + duration, lambda done=done: self._finish(done))

    def _finish(self, done: Callable[[], None]) -> None:
        self.busy -= 1
        self._start()
        done()


def core_shares(threads: Sequence[int], cores: float) -> list[float]:
    """The cores each running launch gets: max-min fair, a launch of ``t`` threads taking at most ``t``.

    E.g. 2 cores and launches of (1, 2) threads: (1, 1); of (1, 1, 2): (2/3, 2/3, 2/3); of (1,): (1,).
    """
    shares = [0.0] * len(threads)
    left = float(cores)
    order = sorted(range(len(threads)), key=lambda i: threads[i])
    for position, i in enumerate(order):
        shares[i] = min(float(threads[i]), left / (len(order) - position))
        left -= shares[i]
    return shares


class SharedCores:
    """``cores`` cores shared by every running launch (processor sharing), none waiting.

    A launch brings its duration alone (at its own thread count ``t``, which it can run in parallel on
    at most ``t`` cores) and is given ``core_shares``' share ``c``; it then progresses at
    ``min(1, c / t)`` of its speed alone: its ``t`` threads take turns on the ``c`` cores they get. So
    two 1-thread launches on 2 cores each run as fast as alone, and two 2-thread launches each at half
    speed (no faster together than one after the other). Shares change whenever a launch starts or ends.
    """

    def __init__(self, loop: _Loop, cores: int) -> None:
        self.loop, self.cores = loop, cores
        self._running: dict[int, list] = {}  # id -> [remaining alone µs, threads, rate, done]
        self._ids = itertools.count()
        self._since_us = 0
        self._version = 0
        self.busy_us = 0

    def run(self, duration_us: int, done: Callable[[], None], threads: int = 1) -> None:
        self._advance()
        duration = max(1, duration_us)
        self.busy_us += duration
        self._running[next(self._ids)] = [float(duration), min(max(1, threads), self.cores), 1.0, done]
        self._reschedule()

    def _advance(self) -> None:
        elapsed = self.loop.now_us - self._since_us
        if elapsed > 0:
            for entry in self._running.values():
                entry[0] -= elapsed * entry[2]
        self._since_us = self.loop.now_us

    def _reschedule(self) -> None:
        self._version += 1
        if not self._running:
            return
        entries = list(self._running.values())
        for entry, share in zip(entries, core_shares([e[1] for e in entries], self.cores)):
            entry[2] = min(1.0, share / entry[1])
        soonest = min(max(0.0, e[0]) / e[2] for e in entries)
        version = self._version
        self.loop.at(self.loop.now_us + max(1, math.ceil(soonest - 1e-6)), lambda: self._tick(version))

    def _tick(self, version: int) -> None:
        if version != self._version:
            return  # the shares changed since this was set
        self._advance()
        finished = [key for key, entry in self._running.items() if entry[0] <= 1e-6]
        dones = [self._running.pop(key)[3] for key in finished]
        self._reschedule()
        for done in dones:
            done()


@dataclass
class _StageStats:
    """What one stage's launches did (batch sizes, device time, and the tables' share of it).

    ``add(..., launch=False)`` adds time without a launch: the simulator books the compute of a batch
    run inline (inside the front model's ``execute``) on stage 0 without counting a launch there
    (``unlaunched_ms`` says how much of it there is), so calibration leaves that stage's time alone.
    The engine books the same time on its own inline metrics (``server.reorch.inline`` of a run);
    runs made before it did so hold it in stage 0's compute.
    """

    sizes: Counter = field(default_factory=Counter)
    launch_ms: float = 0.0  # sum of launch durations
    row_launch_ms: float = 0.0  # sum of rows x duration (what Triton's per-request compute averages)
    table_ms: float = 0.0  # sum of the tables' time (unscaled) in those launches
    row_table_ms: float = 0.0
    unlaunched_ms: float = 0.0  # time booked without a launch
    inline_rows: int = 0  # rows of those (the front model: rows its instance ran inline)

    def add(self, rows: int, duration_ms: float, table_ms: float, launch: bool = True) -> None:
        if launch:
            self.sizes[rows] += 1
        else:
            self.unlaunched_ms += duration_ms
        self.launch_ms += duration_ms
        self.row_launch_ms += rows * duration_ms
        self.table_ms += table_ms
        self.row_table_ms += rows * table_ms

    def report(self, name: int | str) -> dict[str, Any]:
        launches = sum(self.sizes.values())
        rows = sum(k * v for k, v in self.sizes.items())
        out = {"stage": name, "launches": launches, "avg_batch_size": _r(rows / launches) if launches else None,
               "batch_histogram": {str(k): v for k, v in sorted(self.sizes.items())},
               "avg_launch_ms": _r(self.launch_ms / launches) if launches else None,
               "row_avg_launch_ms": _r(self.row_launch_ms / rows) if rows else None,
               "avg_table_ms": _r(self.table_ms / launches) if launches else None,
               "row_avg_table_ms": _r(self.row_table_ms / rows) if rows else None}
        if self.unlaunched_ms:
            out["unlaunched_ms"] = _r(self.unlaunched_ms)
        if name == FRONT:
            out["inline_share"] = _r(self.inline_rows / rows) if rows else None
        return out


FRONT = "front"  # the reorchestrator's front model in the batch report (after the stages)


class _BatchedModel:
    """One Triton model: a dynamic batcher and ``instance_count`` instances.

    ``start(batch, release)`` runs a batch that an instance took; it calls ``release()`` when the
    instance is free again (after the device ran it, or at once for a model whose ``execute``
    returns before the work is done).
    """

    def __init__(self, loop: _Loop, settings: BatcherSettings,
                 start: Callable[[list[_Job], Callable[[], None]], None]) -> None:
        self.loop, self.batcher, self.start = loop, DynamicBatcher(settings), start
        self.free = settings.instance_count
        self._timer_at: int | None = None

    def add(self, job: _Job) -> None:
        self.batcher.add(job, self.loop.now_us)
        self.pump()

    def pump(self) -> None:
        while self.free > 0:
            batch = self.batcher.take(self.loop.now_us)
            if not batch:
                break
            self.free -= 1
            self.start(batch, self._release)
        deadline = self.batcher.deadline_us()
        if self.free > 0 and deadline is not None and deadline > self.loop.now_us and self._timer_at != deadline:
            self._timer_at = deadline
            self.loop.at(deadline, self.pump)

    def _release(self) -> None:
        self.free += 1
        self.pump()


def _pad(batch: list[_Job]) -> int | None:
    lengths = [j.length for j in batch if j.length is not None]
    return max(lengths) if lengths else None


def _us(ms: float) -> int:
    return round(ms * 1000.0)


class _Variant:
    """Builds the variant's parts on a loop; ``submit`` takes one request, ``finish`` is called back."""

    def __init__(self, profile: ModelProfile, config: VariantConfig, settings: SimSettings, loop: _Loop,
                 finish: Callable[[_Job], None]) -> None:
        self.profile, self.config, self.settings, self.loop, self.finish = profile, config, settings, loop, finish
        self.device = SharedCores(loop, settings.cores) if settings.cores else _Device(loop, settings.device_slots)
        knob_threads = dict(config.knobs).get(THREADS_PARAMETER)
        self.threads = int(knob_threads) if knob_threads is not None else config.batcher.intra_op_threads
        self.stage_stats = [_StageStats() for _ in range(1 if config.variant == "whole" else profile.num_stages)]
        last = profile.num_stages - 1
        if config.variant == "whole":
            self.models = [_BatchedModel(loop, config.batcher, lambda b, release: self._on_device(
                self._cost_us(0, last, len(b), _pad(b)), b, self._complete, release))]
        elif config.variant == "ensemble":
            self.models = [_BatchedModel(loop, config.batcher, lambda b, release, s=stage: self._on_device(
                self._cost_us(s, s, len(b), _pad(b)), b, lambda done, s=s: self._stage_done(s, done), release))
                for stage in range(profile.num_stages)]
        else:
            self._init_reorch()

    def _on_device(self, duration_us: int, batch: list[_Job], done: Callable[[list[_Job]], None],
                   release: Callable[[], None]) -> None:
        def finished() -> None:
            done(batch)
            release()
        self.device.run(duration_us, finished, self._device_threads())

    def _device_threads(self) -> int:
        """The cores a launch of this configuration can use at once (its onnxruntime threads)."""
        threads = self.profile.built_threads if self.threads is None else self.threads
        return threads or max(1, self.settings.cores)

    def _cost_us(self, first: int, last: int, rows: int, pad_to: int | None) -> int:
        """Device time of one launch of stages ``first..last`` (recorded in the stages' statistics).

        Each stage takes ``compute_scale`` x its table's time x the thread slowdown of the
        configuration's ``intra_op_threads`` (``ModelProfile.thread_factor``); the launch overhead is paid once per
        launch; stage 0 also pays ``row_device_ms`` per row. The time is booked as the server's
        statistics book it: Triton's per model; the reorchestrator's metrics count the launch at
        its first stage and book a fused run of the whole chain on stage 0 where the whole model's
        graph runs it (``ReorchEngine._run_whole``), else each stage's own time on that stage.
        """
        s = self.settings
        parts = [(stage, self.profile.stages_ms(stage, stage, rows, pad_to)) for stage in range(first, last + 1)]
        whole_chain = first == 0 and last == self.profile.num_stages - 1
        if self.config.variant == "whole" or (whole_chain and self.profile.whole_graph):
            parts = [(0, sum(table for _, table in parts))]
        total_ms = 0.0
        slowdown = self.profile.thread_factor(self.threads, rows)
        for stage, table_ms in parts:
            ms = (s.compute_scale * slowdown * table_ms + s.launch_overhead_ms / len(parts)
                  + (s.row_device_ms * rows if stage == 0 else 0.0))
            self.stage_stats[stage].add(rows, ms, table_ms, launch=stage == first)
            total_ms += ms
        return _us(total_ms)

    # whole / ensemble
    def _complete(self, batch: list[_Job]) -> None:
        for job in batch:
            self.finish(job)

    def _stage_done(self, stage: int, batch: list[_Job]) -> None:
        if stage + 1 == len(self.models):
            self._complete(batch)
        else:
            for job in batch:
                self.models[stage + 1].add(job)

    # reorch
    def _init_reorch(self) -> None:
        profile, config = self.profile, self.config
        knobs = ReorchKnobs.from_parameters({"max_batch_rows": config.batcher.max_batch_size, **dict(config.knobs)})
        context = StageContext(profile.num_stages, profile.favoured_batch_sizes,
                               max_sequence_length=(profile.max_length or 1 << 30) if profile.is_sequence else None,
                               latency_tables_ms=profile.stage_tables_ms)
        self.scheduler = StageScheduler(create_policy(config.policy or DEFAULT_POLICY, knobs, context))
        self.jobs: dict[int, _Job] = {}
        self._timer_at: int | None = None
        self.front_stats = _StageStats()
        # The front model has one instance (core.model_config.reorch_model_config).
        front = dataclasses.replace(config.batcher, instance_count=1)
        self.models = [_BatchedModel(self.loop, front, self._front_execute)]

    def _front_execute(self, batch: list[_Job], release: Callable[[], None]) -> None:
        """The front model's ``execute`` (``backends/reorch/model.py``): the engine's own decision
        (``StageScheduler.inline_decision``, as ``ReorchEngine.run_inline`` asks it) runs the batch
        inline on the device while the instance waits; otherwise the batch is handed to the
        scheduler (``ReorchEngine.submit``) after ``handoff_ms`` and the instance is free."""
        decision = self.scheduler.inline_decision([1] * len(batch), [job.length for job in batch], self.loop.now_us)
        if decision is not None:
            for job in batch:
                job.inline = True
            self._on_device(self._inline_cost_us(len(batch), _pad(batch)), batch, self._complete, release)
            return
        handoff_ms = self.settings.handoff_ms
        self.front_stats.add(len(batch), handoff_ms, 0.0)

        def handed() -> None:
            self._enter_reorch(batch)
            release()
        if handoff_ms > 0:
            self.loop.at(self.loop.now_us + _us(handoff_ms), handed)
        else:
            handed()

    def _inline_cost_us(self, rows: int, pad_to: int | None) -> int:
        """Device time of a batch run inline: the whole chain plus ``inline_overhead_ms``, booked on the
        front model (its ``execute`` time) and, without a launch, on stage 0 (as the engine's metrics)."""
        s = self.settings
        table_ms = self.profile.whole_ms(rows, pad_to)
        ms = (s.compute_scale * self.profile.thread_factor(self.threads, rows) * table_ms + s.inline_overhead_ms
              + s.row_device_ms * rows)
        self.front_stats.add(rows, ms, table_ms)
        self.front_stats.inline_rows += rows
        self.stage_stats[0].add(rows, ms, table_ms, launch=False)
        return _us(ms)

    def _enter_reorch(self, batch: list[_Job]) -> None:
        requests = []
        for job in batch:
            self.jobs[job.request_id] = job
            requests.append(Request(job.request_id, 1, self.loop.now_us, seq_len=job.length))
        # inline_decision has noted these arrivals (as ReorchEngine.submit after run_inline declines).
        self._answer(self.scheduler.add_requests(requests, self.loop.now_us, arrivals_noted=True))
        self._schedule()

    def _schedule(self) -> None:
        now = self.loop.now_us
        for launch in self.scheduler.schedule(now):
            duration = self._cost_us(launch.stage, launch.final_stage, launch.rows, launch.pad_to)
            self.device.run(duration, lambda launch=launch: self._launch_done(launch), self._device_threads())
        timer = self.scheduler.next_timer_us()
        if timer is not None and self._timer_at != timer:
            self._timer_at = timer
            self.loop.at(timer, self._schedule)

    def _launch_done(self, launch: StageLaunch) -> None:
        self._answer(self.scheduler.on_stage_done(launch.launch_id, self.loop.now_us))
        self._schedule()

    def _answer(self, completions) -> None:
        for completion in completions:
            job = self.jobs.pop(completion.request_id)
            if completion.outcome == "success":
                self.finish(job)

    def submit(self, job: _Job) -> None:
        self.models[0].add(job)

    def batch_report(self) -> list[dict[str, Any]]:
        """Per stage (``whole`` for the whole model), then the reorchestrator's front model."""
        names = ["whole"] if self.config.variant == "whole" else list(range(self.profile.num_stages))
        out = [stats.report(name) for name, stats in zip(names, self.stage_stats)]
        if self.config.variant == "reorch":
            out.append(self.front_stats.report(FRONT))
        return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _lengths(profile: ModelProfile, workload: Workload, rng: np.random.Generator, count: int) -> list[int | None]:
    if not profile.is_sequence:
        return [None] * count
    if workload.lengths is None:  # as the load generator does: full-length requests
        return [int(profile.max_length)] * count
    distribution = make_length_distribution(workload.lengths, min_length=profile.min_length,
                                            max_length=int(profile.max_length))
    return [int(v) for v in distribution.sample(rng, count)]


def simulate(profile: ModelProfile, config: VariantConfig, workload: Workload,
             settings: SimSettings | None = None) -> SimResult:
    """Run ``config`` under ``workload`` in virtual time; latencies over the measured window."""
    settings = (settings or SimSettings()).for_variant(config.variant, profile.name)
    if config.batcher.max_batch_size > profile.max_batch_size:
        raise BadParameterError(
            f"max_batch_size={config.batcher.max_batch_size} exceeds the built model's {profile.max_batch_size}; "
            f"the tables stop there (rebuild with --max-batch {config.batcher.max_batch_size})")
    started = time.process_time()
    loop = _Loop()
    rng = np.random.default_rng(workload.seed)
    jobs: list[_Job] = []
    closed = not workload.arrival.is_open_loop
    duration_us = _us(workload.duration_s * 1000.0)

    def finish(job: _Job) -> None:
        job.exit_us = loop.now_us
        if closed and loop.now_us < duration_us:
            issue(loop.now_us)

    variant = _Variant(profile, config, settings, loop, finish)
    length_pool: list[int | None] = []

    def issue(at_us: int, length: int | None = None) -> None:
        if closed:
            if not length_pool:
                length_pool.extend(reversed(_lengths(profile, workload, rng, 1024)))
            length = length_pool.pop()
        job = _Job(len(jobs), at_us, length)
        jobs.append(job)
        loop.at(at_us, lambda job=job: variant.submit(job))

    if closed:
        for _ in range(workload.arrival.users):
            issue(0)
    else:
        # the load generator's own schedule for this seed: a replayed run sees the arrivals it measured
        times_s, lengths = arrival_schedule(
            workload.arrival, workload.lengths, workload.seed, workload.duration_s,
            sequence=(profile.min_length, int(profile.max_length)) if profile.is_sequence else None)
        for index, t in enumerate(times_s):
            issue(_us(float(t) * 1000.0), None if lengths is None else int(lengths[index]))
    loop.run(duration_us + _us(settings.drain_s * 1000.0))

    window_start_us = _us(workload.warmup_s * 1000.0)
    window_s = workload.duration_s - workload.warmup_s
    overhead_us = _us(settings.request_overhead_ms)
    inline_overhead_us = _us(settings.inline_request_overhead_ms)
    rows = []
    for job in jobs:
        if not window_start_us <= job.arrival_us < duration_us:
            continue
        done = job.exit_us is not None
        rows.append({"t_send_us": job.arrival_us, "late_us": 0, "ok": done,
                     "latency_us": (job.exit_us - job.arrival_us + (inline_overhead_us if job.inline else overhead_us))
                     if done else UNANSWERED_LATENCY_US})
    if not rows:
        raise BadParameterError(f"the workload sends no request in the measured window ({workload.warmup_s} s to "
                                f"{workload.duration_s} s); raise the rate or the duration")
    verdict = assess(rows, window_start_us, window_s, period_s=arrival_period_s(workload.arrival.to_dict()))
    summary = summarize([r["latency_us"] for r in rows], [r["ok"] for r in rows], window_s, workload.slo_ms)
    operations = dict(variant.scheduler.operation_counts) if config.variant == "reorch" else {}
    return SimResult(config=config, summary=summary, stable=verdict.stable, unstable_reason=verdict.unstable_reason,
                     offered_rps=verdict.offered_rps, achieved_rps=verdict.achieved_rps,
                     stage_batches=variant.batch_report(), operations=operations,
                     cpu_s=time.process_time() - started)


def batch1_latency_ms(profile: ModelProfile, settings: SimSettings | None = None) -> float:
    """The fastest any configuration can answer one request alone (whole chain at batch 1)."""
    settings = (settings or SimSettings()).for_variant("whole", profile.name)
    return (settings.compute_scale * profile.whole_ms(1, profile.profiled_length) + settings.launch_overhead_ms
            + settings.row_device_ms + settings.request_overhead_ms)
