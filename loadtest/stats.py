"""Pure statistics over raw request latencies (microseconds): percentiles, throughput, SLOs, CDFs, CIs.

Nothing here does I/O; every function takes plain numbers so it can be unit-tested and re-run by
``stagebatch report`` on the raw data. Latencies come in as integer microseconds (the load
generator's raw records, not Locust's rounded buckets) and come out in milliseconds, the unit of
``loadtest/`` (as Locust's statistics).

Percentiles use the nearest-rank definition (the smallest latency with at least p% of the
samples at or below it), so every reported percentile is a latency that was actually observed and
the report can be checked against ``requests.csv`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
CONFIDENCE = 0.95  # of every interval the report states
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed, so a report regenerated from the same raw data states the same intervals


def percentile_us(latencies_us: Sequence[int] | np.ndarray, pct: float) -> float:
    """Nearest-rank percentile of raw latencies (µs); NaN for no samples."""
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    values = np.asarray(latencies_us, dtype=np.int64)
    if values.size == 0:
        return math.nan
    return float(nearest_rank(values, pct))


def nearest_rank(values: np.ndarray, pct: float) -> float:
    """Nearest-rank percentile of a non-empty array in its own unit (no checks; the bootstrap's inner loop)."""
    rank = max(math.ceil(pct / 100.0 * values.size), 1) - 1  # 0-based
    return float(np.partition(values, rank)[rank])


@dataclass
class LatencySummary:
    """Client-side summary of one measurement point (latencies in ms, rates per second)."""

    requests: int  # sent during the measured window (warm-up excluded)
    ok: int
    errors: int
    duration_s: float
    throughput_rps: float  # successful responses per second
    offered_rps: float  # requests sent per second
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    slo_ms: float
    slo_attainment: float  # share of all sent requests answered successfully within the SLO
    goodput_rps: float  # successful responses within the SLO per second

    def to_dict(self) -> dict:
        """JSON-ready fields (NaN stays NaN; json writes it as NaN)."""
        return asdict(self)


def summarize(
    latencies_us: Sequence[int] | np.ndarray,
    ok: Sequence[bool] | np.ndarray,
    duration_s: float,
    slo_ms: float,
) -> LatencySummary:
    """Summarize one point: latencies of successful requests only; errors count against the SLO."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    latencies = np.asarray(latencies_us, dtype=np.int64)
    ok_mask = np.asarray(ok, dtype=bool)
    if latencies.shape != ok_mask.shape:
        raise ValueError(f"latencies ({latencies.shape}) and ok flags ({ok_mask.shape}) differ in length")
    good = latencies[ok_mask]
    requests = int(latencies.size)
    n_ok = int(good.size)
    within = int(np.count_nonzero(good <= slo_ms * 1000.0))

    def ms(pct: float) -> float:
        return percentile_us(good, pct) / 1000.0

    return LatencySummary(
        requests=requests,
        ok=n_ok,
        errors=requests - n_ok,
        duration_s=float(duration_s),
        throughput_rps=n_ok / duration_s,
        offered_rps=requests / duration_s,
        avg_ms=float(good.mean()) / 1000.0 if n_ok else math.nan,
        p50_ms=ms(50),
        p90_ms=ms(90),
        p95_ms=ms(95),
        p99_ms=ms(99),
        p999_ms=ms(99.9),
        max_ms=float(good.max()) / 1000.0 if n_ok else math.nan,
        slo_ms=float(slo_ms),
        slo_attainment=within / requests if requests else math.nan,
        goodput_rps=within / duration_s,
    )


def cdf(latencies_us: Sequence[int] | np.ndarray, max_points: int = 200) -> tuple[list[float], list[float]]:
    """Empirical CDF as (latency ms, fraction <= latency), thinned to at most ``max_points`` steps.

    The thinning keeps the first and last samples, so the tail (where batching policies differ) stays exact.
    """
    values = np.sort(np.asarray(latencies_us, dtype=np.int64))
    n = values.size
    if n == 0:
        return [], []
    fractions = np.arange(1, n + 1) / n
    if n > max_points:
        index = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
        values, fractions = values[index], fractions[index]
    return (values / 1000.0).tolist(), fractions.tolist()


def batch_size_mean(histogram: dict[int, int]) -> float:
    """Average batch size from a {batch_size: executions} histogram; NaN when empty."""
    executions = sum(histogram.values())
    if not executions:
        return math.nan
    return sum(size * count for size, count in histogram.items()) / executions


def achieved_rps(
    t_send_us: Sequence[int] | np.ndarray,
    latencies_us: Sequence[int] | np.ndarray,
    ok: Sequence[bool] | np.ndarray,
    duration_s: float,
) -> float:
    """Successful completions inside the measured window, per second (what the server kept up with).

    The window opens at the first send and lasts ``duration_s``; a request sent inside it that
    completes after it closes does not count. For runs that did not record ``achieved_rps``.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    sent = np.asarray(t_send_us, dtype=np.int64)
    if sent.size == 0:
        return 0.0
    done = sent + np.asarray(latencies_us, dtype=np.int64)
    end_us = sent.min() + duration_s * 1e6
    return int(np.count_nonzero(np.asarray(ok, dtype=bool) & (done <= end_us))) / duration_s


@dataclass(frozen=True)
class DifferenceCI:
    """``statistic(b) - statistic(a)`` with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    groups_a: int  # repeats (runs) behind each side
    groups_b: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval excludes 0: only then is the difference a measurable gain or loss."""
        return self.low > 0 or self.high < 0


def bootstrap_difference(
    groups_a: Sequence[Sequence[float] | np.ndarray],
    groups_b: Sequence[Sequence[float] | np.ndarray],
    statistic: Callable[[np.ndarray], float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> DifferenceCI:
    """Percentile bootstrap CI of ``statistic(b) - statistic(a)``, resampling repeats, then samples.

    Each side is a list of groups (one per repeat of a point, e.g. its request latencies). A
    resample draws the groups with replacement and then the samples inside each drawn group, so
    the interval covers run-to-run variation when there are repeats, and request-to-request
    variation only when each side is a single run.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a = [np.asarray(g, dtype=float) for g in groups_a if len(g)]
    b = [np.asarray(g, dtype=float) for g in groups_b if len(g)]
    if not a or not b:
        raise ValueError("each side needs at least one non-empty group")
    rng = np.random.default_rng(seed)

    def resample(groups: list[np.ndarray]) -> np.ndarray:
        picked = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        return np.concatenate([g[rng.integers(g.size, size=g.size)] for g in picked])

    estimate = statistic(np.concatenate(b)) - statistic(np.concatenate(a))
    diffs = np.array([statistic(resample(b)) - statistic(resample(a)) for _ in range(resamples)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return DifferenceCI(float(estimate), float(low), float(high), confidence, len(a), len(b))
