"""Linear partitioning of a chain of units into K contiguous stages (pure logic, no I/O).

Units are the pieces between consecutive candidate cuts, in topological order; cutting between unit
``u`` and ``u + 1`` ships ``cut_bytes[u]`` bytes per sample to the next stage. The partition first
minimises the slowest stage's cost (the pipeline's throughput bound, as in PipeDream's and
torchgpipe's balancers), then, among partitions whose slowest stage is within ``tie_rtol`` of that
optimum, the bytes crossing the cuts: measured costs are noisy, and a smaller boundary is a sure gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import SliceError


@dataclass(frozen=True)
class Partition:
    """K contiguous stages over the units."""

    cuts: tuple[int, ...]  # cut u means: between unit u and unit u + 1; strictly increasing, K - 1 of them
    stage_costs: tuple[float, ...]
    crossing_bytes: float  # sum of cut_bytes over the cuts

    @property
    def slowest_cost(self) -> float:
        return max(self.stage_costs)

    @property
    def num_stages(self) -> int:
        return len(self.stage_costs)


def partition_units(unit_costs: list[float], cut_bytes: list[float], num_stages: int, *,
                    tie_rtol: float = 0.02) -> Partition:
    """Split ``unit_costs`` into ``num_stages`` contiguous stages (see the module docstring)."""
    count = len(unit_costs)
    if len(cut_bytes) != max(count - 1, 0):
        raise ValueError(f"cut_bytes needs {count - 1} entries for {count} units, got {len(cut_bytes)}")
    if num_stages < 1:
        raise SliceError(f"num_stages={num_stages} must be >= 1")
    if num_stages > count:
        raise SliceError(f"{num_stages} stages need at least {num_stages} units; there are {count}")
    if any(cost < 0 or math.isnan(cost) for cost in unit_costs):
        raise ValueError(f"unit costs must be non-negative numbers, got {unit_costs}")
    if tie_rtol < 0:
        raise ValueError(f"tie_rtol={tie_rtol} must be >= 0")

    prefix = [0.0]
    for cost in unit_costs:
        prefix.append(prefix[-1] + cost)

    def segment(start: int, stop: int) -> float:  # cost of units [start, stop)
        return prefix[stop] - prefix[start]

    # Pass 1: the smallest achievable slowest stage. best[k][j]: first j units in k stages.
    inf = math.inf
    best = [[inf] * (count + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, count - (num_stages - k) + 1):
            best[k][j] = min((max(best[k - 1][i], segment(i, j)) for i in range(k - 1, j)), default=inf)
    optimum = best[num_stages][count]

    # Pass 2: fewest crossing bytes (then the lower slowest stage) with every stage within the limit.
    limit = optimum * (1.0 + tie_rtol) + 1e-12
    score: list[list[tuple[float, float] | None]] = [[None] * (count + 1) for _ in range(num_stages + 1)]
    choice = [[-1] * (count + 1) for _ in range(num_stages + 1)]
    score[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for j in range(k, count - (num_stages - k) + 1):
            for i in range(k - 1, j):
                previous = score[k - 1][i]
                cost = segment(i, j)
                if previous is None or cost > limit:
                    continue
                boundary = cut_bytes[i - 1] if i > 0 else 0.0
                candidate = (previous[0] + boundary, max(previous[1], cost))
                if score[k][j] is None or candidate < score[k][j]:
                    score[k][j] = candidate
                    choice[k][j] = i
    assert score[num_stages][count] is not None  # the pass-1 optimum itself is within the limit

    starts = []
    j = count
    for k in range(num_stages, 0, -1):
        i = choice[k][j]
        starts.append(i)
        j = i
    starts.reverse()  # first unit of each stage
    bounds = starts + [count]
    cuts = tuple(start - 1 for start in starts[1:])
    stage_costs = tuple(segment(bounds[s], bounds[s + 1]) for s in range(num_stages))
    return Partition(cuts=cuts, stage_costs=stage_costs,
                     crossing_bytes=float(sum(cut_bytes[c] for c in cuts)))
