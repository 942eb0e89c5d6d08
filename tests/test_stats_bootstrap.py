"""The bootstrap confidence interval and the achieved rate, on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.stats import achieved_rps, bootstrap_difference, nearest_rank, percentile_us


def test_bootstrap_interval_covers_the_true_mean_difference_and_excludes_zero_when_samples_differ():
    rng = np.random.default_rng(1)
    a = rng.normal(10.0, 1.0, size=2000)
    b = rng.normal(11.0, 1.0, size=2000)
    ci = bootstrap_difference([a], [b], np.mean)
    # standard error of the difference is sqrt(2/2000) ~ 0.032: the interval is about +-0.06 wide
    assert ci.low < 1.0 < ci.high
    assert 0.08 < ci.high - ci.low < 0.18
    assert ci.excludes_zero and ci.estimate == pytest.approx(b.mean() - a.mean())


def test_bootstrap_interval_spans_zero_when_both_sides_come_from_one_distribution():
    rng = np.random.default_rng(2)
    ci = bootstrap_difference([rng.exponential(5.0, 500)], [rng.exponential(5.0, 500)], np.mean)
    assert ci.low < 0 < ci.high and not ci.excludes_zero


def test_bootstrap_over_repeats_is_wider_than_over_requests_when_runs_disagree():
    rng = np.random.default_rng(3)
    # three repeats per side whose means differ run to run by far more than the request noise
    a = [rng.normal(m, 1.0, 1000) for m in (10.0, 12.0, 14.0)]
    b = [rng.normal(m, 1.0, 1000) for m in (11.0, 13.0, 15.0)]
    pooled = bootstrap_difference([np.concatenate(a)], [np.concatenate(b)], np.mean)
    repeats = bootstrap_difference(a, b, np.mean)
    assert pooled.excludes_zero  # a single pooled "run" overstates certainty
    assert not repeats.excludes_zero
    assert repeats.groups_a == repeats.groups_b == 3


def test_bootstrap_is_reproducible_and_refuses_empty_sides():
    values = [np.arange(100.0)]
    assert bootstrap_difference(values, values, np.mean) == bootstrap_difference(values, values, np.mean)
    with pytest.raises(ValueError):
        bootstrap_difference([[]], values, np.mean)
    with pytest.raises(ValueError):
        bootstrap_difference(values, values, np.mean, confidence=1.0)


def test_nearest_rank_equals_percentile_us():
    values = np.random.default_rng(4).integers(0, 10**6, size=999)
    for pct in (1, 50, 99, 99.9, 100):
        assert nearest_rank(values, pct) == percentile_us(values, pct)


def test_achieved_rps_counts_only_successes_completed_inside_the_window():
    sent = [0, 1_000_000, 2_000_000, 3_000_000]  # µs
    latencies = [100, 100, 100, 2_000_000]  # the last completes after the 4 s window
    assert achieved_rps(sent, latencies, [True, False, True, True], duration_s=4.0) == 0.5
    assert achieved_rps([], [], [], duration_s=1.0) == 0.0
    with pytest.raises(ValueError):
        achieved_rps(sent, latencies, [True] * 4, duration_s=0)
