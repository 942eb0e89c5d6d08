"""Pure statistics of the characterization: percentiles, SLOs, CDFs, throughput at the SLO."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.stats import batch_size_mean, cdf, percentile_us, summarize


def test_percentile_is_nearest_rank_when_samples_are_1_to_100():
    values = list(range(1, 101))  # µs
    assert percentile_us(values, 50) == 50
    assert percentile_us(values, 99) == 99
    assert percentile_us(values, 99.9) == 100
    assert percentile_us(values, 100) == 100
    assert percentile_us([7], 50) == 7


def test_percentile_is_nan_when_no_samples_and_refuses_bad_pct():
    assert math.isnan(percentile_us([], 50))
    with pytest.raises(ValueError):
        percentile_us([1, 2], 0)
    with pytest.raises(ValueError):
        percentile_us([1, 2], 101)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=300),
    st.floats(min_value=0.1, max_value=100),
)
def test_percentile_is_an_observed_value_with_enough_mass_below(values, pct):
    p = percentile_us(values, pct)
    assert p in values
    assert sum(v <= p for v in values) >= math.ceil(pct / 100 * len(values))
    assert sum(v < p for v in values) < math.ceil(pct / 100 * len(values))


def test_summarize_counts_errors_against_slo_and_excludes_them_from_latency():
    latencies = [1000, 2000, 3000, 4000, 900_000]  # µs
    ok = [True, True, True, True, False]
    s = summarize(latencies, ok, duration_s=2.0, slo_ms=2.5)
    assert (s.requests, s.ok, s.errors) == (5, 4, 1)
    assert s.throughput_rps == 2.0 and s.offered_rps == 2.5
    assert s.avg_ms == pytest.approx(2.5)
    assert s.p50_ms == 2.0 and s.p99_ms == 4.0 and s.max_ms == 4.0
    assert s.slo_attainment == pytest.approx(2 / 5)  # 1 ms and 2 ms of 5 sent
    assert s.goodput_rps == pytest.approx(1.0)


def test_summarize_is_nan_not_crash_when_every_request_failed():
    s = summarize([5, 6], [False, False], duration_s=1.0, slo_ms=10)
    assert s.ok == 0 and math.isnan(s.p99_ms) and math.isnan(s.avg_ms) and s.slo_attainment == 0


def test_summarize_refuses_mismatched_inputs():
    with pytest.raises(ValueError):
        summarize([1, 2], [True], duration_s=1.0, slo_ms=1)
    with pytest.raises(ValueError):
        summarize([1], [True], duration_s=0, slo_ms=1)


def test_cdf_ends_at_one_and_keeps_extremes_when_thinned():
    rng = np.random.default_rng(0)
    values = rng.integers(100, 100_000, size=5000)
    xs, ys = cdf(values, max_points=100)
    assert len(xs) <= 100
    assert xs[0] == values.min() / 1000 and xs[-1] == values.max() / 1000
    assert ys[-1] == 1.0
    assert all(a <= b for a, b in zip(xs, xs[1:])) and all(a <= b for a, b in zip(ys, ys[1:]))
    assert cdf([]) == ([], [])


def test_batch_size_mean_is_nan_when_no_executions():
    assert batch_size_mean({1: 2, 4: 2}) == 2.5
    assert math.isnan(batch_size_mean({}))
