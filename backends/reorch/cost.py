"""When re-forming batches cannot pay: the reorchestrator's cost model ("never lose").

Pure (no clock, no threads). It reads the stages' measured latency tables (``latency_ms`` per batch
size per stage, from the manifest through ``stages.json``) and the live queue state the scheduler
passes in, and makes two decisions, each counted as an operation:

- **fuse**: the stages are too cheap for the per-stage overhead of re-forming (one launch,
  one feed build and one split per stage, plus scheduling under the lock). If ``K`` stage launches
  would add more than ``fuse_max_overhead_share`` of the chain's own batch-1 latency, every batch
  runs the whole chain as one fused stage (no boundary, no re-forming). ``FuseDecision`` keeps this
  decision: it starts from the ``stage_overhead_us`` prior and then uses the per-launch overhead
  the engine measures, with a hysteresis band (``fuse_margin``) around the threshold, so that
  neither the build's noisy latency tables nor measurement noise flip it back and forth;
- **whole** (per batch): the stage boundaries can only cost, because there is neither length nor
  load diversity: the batch's rows have no length spread the policy would use (no bucketing) and
  either the load is steady (no burst: ``ArrivalMeter``), or no other batch is in the pipeline,
  nothing waits behind this batch and fewer than ``whole_max_arrivals`` requests are expected while
  the chain runs (arrival rate x chain latency). Then the batch runs the chain fused, exactly like
  the whole model would. Under steady load with fixed lengths every batch does: re-forming batches
  pays only where lengths differ or bursts arrive (DVABatch's cases).

Without latency tables (hand-written test models) the model makes no decisions.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FUSE, WHOLE = "fuse", "whole"
# The fuse decision switching: on (every batch fused from now on) and off (batches may use stages again).
FUSE_ON, FUSE_OFF = "fuse_on", "fuse_off"


def interpolate_ms(table: Mapping[int, float], rows: int) -> float:
    """Latency of ``rows`` from a batch-size table: linear between measured sizes, linear past the ends."""
    sizes = sorted(table)
    if rows in table:
        return float(table[rows])
    if len(sizes) == 1:
        return float(table[sizes[0]]) * rows / sizes[0]
    index = bisect.bisect_left(sizes, rows)
    low, high = (sizes[0], sizes[1]) if index == 0 else \
        (sizes[-2], sizes[-1]) if index >= len(sizes) else (sizes[index - 1], sizes[index])
    slope = (table[high] - table[low]) / (high - low)
    return max(0.0, float(table[low]) + slope * (rows - low))


@dataclass(frozen=True)
class CostModel:
    latency_tables_ms: tuple[Mapping[int, float], ...]
    stage_overhead_us: float = 150.0
    fuse_max_overhead_share: float = 0.1
    whole_max_arrivals: float = 0.5

    @classmethod
    def from_tables(cls, tables: Sequence[Mapping[int, float]], **limits: float) -> CostModel:
        return cls(tuple(dict(t) for t in tables), **limits)

    @property
    def has_tables(self) -> bool:
        return bool(self.latency_tables_ms) and all(self.latency_tables_ms)

    def chain_us(self, rows: int) -> float:
        """Estimated latency of the whole chain on a batch of ``rows`` (µs)."""
        return sum(interpolate_ms(table, rows) for table in self.latency_tables_ms) * 1000.0

    def fuse_ratio(self, overhead_us: float | None = None) -> float:
        """``K`` launches' overhead over the share of the chain's batch-1 latency they may cost: above 1
        the stage boundaries are too expensive for these stages. ``overhead_us``: one launch's
        overhead (default: the ``stage_overhead_us`` prior). 0 without tables or with one stage."""
        if not self.has_tables or len(self.latency_tables_ms) < 2:
            return 0.0
        per_launch = self.stage_overhead_us if overhead_us is None else overhead_us
        allowed = self.fuse_max_overhead_share * self.chain_us(1)
        return math.inf if allowed <= 0 else len(self.latency_tables_ms) * per_launch / allowed

    def run_whole(self, rows: int, *, pipeline_busy: bool, waiting_behind: int, diverse: bool,
                  arrival_rate_per_us: float, steady: bool = False) -> bool:
        """Per batch: would this batch gain nothing from stage boundaries right now?

        ``steady``: the load has no bursts (``ArrivalMeter.bursty`` is False).
        """
        if not self.has_tables or diverse:
            return False
        if steady:
            return True
        if pipeline_busy or waiting_behind > 0:
            return False
        return arrival_rate_per_us * self.chain_us(rows) < self.whole_max_arrivals


class FuseDecision:
    """Whether every batch runs the whole chain fused: the ``fuse`` decision, robust to noise.

    The ratio ``CostModel.fuse_ratio`` compares K launches' overhead with the share of the chain's
    batch-1 latency (from the build's tables) they may cost. A band of ``margin`` around 1 keeps the
    current state: the decision switches on above ``1 + margin`` and off below ``1 - margin``.
    Inside the band at the start it is on: fused runs cost what the whole model costs, so the safe
    side ("never lose"). The build's tables vary by 15-35% at batch 1 between builds, so a single
    threshold decided by one build's profile flipped lstm between fused and staged (docs/reorch.md).

    The per-launch overhead starts at the ``stage_overhead_us`` prior; once ``min_samples``
    launches were measured (``note_launch``: a launch's wall time minus its compute time) it is the
    median of the last ``window`` of them. Only launches through the engine's stages are measured,
    so while every batch runs fused no new sample arrives and the decision stays: it cannot flap.
    """

    def __init__(self, cost: CostModel, margin: float = 0.25, window: int = 64, min_samples: int = 16) -> None:
        self.cost = cost
        self.margin = margin
        self.min_samples = max(1, min_samples)
        self._samples: deque[float] = deque(maxlen=max(window, self.min_samples))
        self.fused = cost.fuse_ratio() > 1.0 - margin

    @property
    def overhead_us(self) -> float:
        """One launch's overhead as the decision uses it: measured where enough samples, else the prior."""
        if len(self._samples) < self.min_samples:
            return self.cost.stage_overhead_us
        return statistics.median(self._samples)

    @property
    def measured_launches(self) -> int:
        return len(self._samples)

    def note_launch(self, overhead_us: float) -> str | None:
        """One launch's measured overhead (µs); returns FUSE_ON or FUSE_OFF where the decision switched."""
        self._samples.append(max(0.0, float(overhead_us)))
        if len(self._samples) < self.min_samples:
            return None
        ratio = self.cost.fuse_ratio(self.overhead_us)
        if not self.fused and ratio > 1.0 + self.margin:
            self.fused = True
            return FUSE_ON
        if self.fused and ratio < 1.0 - self.margin:
            self.fused = False
            return FUSE_OFF
        return None


class ArrivalMeter:
    """Load diversity: is the arrival rate bursting above its recent level?

    Two exponentially weighted request counts in continuous time, with time constants ``short_us``
    and ``10 x short_us``; each divided by its time constant is a rate. The load counts as bursty
    while the short-term rate exceeds ``ratio`` x the long-term one. Poisson arrivals at a steady
    rate stay below 2x (with at least a handful of requests per short window); an on/off source
    goes far above it when it switches on (from its low "off" rate; load resuming after a silence longer
than the long window starts the meter afresh). ``ratio`` 0: no load is ever bursty.
    """

    LONG_OVER_SHORT = 10

    def __init__(self, short_us: float, ratio: float) -> None:
        self.short_us = max(1.0, float(short_us))
        self.long_us = self.short_us * self.LONG_OVER_SHORT
        self.ratio = ratio
        self._short = self._long = 0.0
        self._at_us: int | None = None
        self._first_us: int | None = None

    def note(self, count: int, now_us: int) -> None:
        """``count`` requests arrived at ``now_us`` (one dynamic-batcher batch). After a silence longer
        than the long window the meter starts afresh: load resuming from idle is judged on its own."""
        if self._at_us is not None and now_us - self._at_us > self.long_us:
            self._at_us = self._first_us = None
        self._short, self._long = self._decayed(now_us)
        self._short += count
        self._long += count
        self._at_us = now_us
        if self._first_us is None:
            self._first_us = now_us

    def rates_per_us(self, now_us: int) -> tuple[float, float]:
        """(short-term, long-term) arrival rates. The long-term one is bias-corrected over the time
        since the first arrival, so a steady load is not taken for a burst while the meter warms up."""
        short, long = self._decayed(now_us)
        seen_us = max(1.0, now_us - (self._first_us if self._first_us is not None else now_us))
        return short / self.short_us, long / (self.long_us * -math.expm1(-seen_us / self.long_us))

    def bursty(self, now_us: int) -> bool:
        if self.ratio <= 0 or self._at_us is None:
            return False
        short, long = self.rates_per_us(now_us)
        return short > self.ratio * long

    def _decayed(self, now_us: int) -> tuple[float, float]:
        if self._at_us is None:
            return 0.0, 0.0
        elapsed = max(0, now_us - self._at_us)
        return self._short * math.exp(-elapsed / self.short_us), self._long * math.exp(-elapsed / self.long_us)
