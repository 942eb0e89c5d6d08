"""When re-forming batches cannot pay: the reorchestrator's cost model ("never lose").

Pure (no clock, no threads). It reads the stages' measured latency tables (``latency_ms`` per batch
size per stage, from the manifest through ``stages.json``) and the live queue state the scheduler
passes in, and makes two decisions, each counted as an operation:

- **fuse** (static): the stages are too cheap for the per-stage overhead of re-forming (one launch,
  one feed build and one split per stage, plus scheduling under the lock). If ``K`` stage launches
  would add more than ``fuse_max_overhead_share`` of the chain's own batch-1 latency, every batch
  runs the whole chain as one fused stage (no boundary, no re-forming);
- **whole** (per batch): nothing can join or leave the batch on its way, so the stage boundaries
  only cost: no other batch is in the pipeline, nothing is waiting behind this batch, its rows have
  no length diversity the policy would use (no bucketing), and fewer than ``whole_max_arrivals``
  requests are expected to arrive while the chain runs (arrival rate x chain latency). Then the
  batch runs the chain fused, exactly like the whole model would.

Without latency tables (hand-written test models) the model makes no decisions.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FUSE, WHOLE = "fuse", "whole"


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

    def fuse_always(self) -> bool:
        """Static: are the stage boundaries too expensive for these stages?"""
        if not self.has_tables or len(self.latency_tables_ms) < 2:
            return False
        overhead_us = len(self.latency_tables_ms) * self.stage_overhead_us
        return overhead_us > self.fuse_max_overhead_share * self.chain_us(1)

    def run_whole(self, rows: int, *, pipeline_busy: bool, waiting_behind: int, diverse: bool,
                  arrival_rate_per_us: float) -> bool:
        """Per batch: would this batch gain nothing from stage boundaries right now?"""
        if not self.has_tables or pipeline_busy or waiting_behind > 0 or diverse:
            return False
        return arrival_rate_per_us * self.chain_us(rows) < self.whole_max_arrivals
