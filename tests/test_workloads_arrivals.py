"""Arrival processes checked statistically: seeded generators, tolerances derived from the sample size.

Every tolerance is ``Z`` standard errors of the statistic under the process's own law (a seeded
draw fails only if the generator is wrong, or with probability ~6e-5 for an unlucky seed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.workloads import (
    ArrivalSpec,
    ConstantArrivals,
    OnOffArrivals,
    PoissonArrivals,
    SpikeArrivals,
    make_arrival_process,
)
from tests.helpers import within
from core.errors import BadParameterError, ConfigValidationError



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_count_mean_gap_and_dispersion_match_the_rate(seed):
    rate, duration = 200.0, 100.0
    times = PoissonArrivals(rate).arrival_times_s(duration, np.random.default_rng(seed))
    n = len(times)
    # count ~ Poisson(rate * duration)
    assert within(n, rate * duration, math.sqrt(rate * duration))
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < duration
    # gaps ~ Exp(rate): mean 1/rate with standard error (1/rate)/sqrt(n)
    gaps = np.diff(times)
    assert within(gaps.mean(), 1 / rate, (1 / rate) / math.sqrt(len(gaps)))
    # P(gap > mean) = e^-1 for an exponential (binomial standard error)
    p = math.exp(-1)
    assert within(np.mean(gaps > 1 / rate), p, math.sqrt(p * (1 - p) / len(gaps)))
    # index of dispersion of counts in k windows: (k-1) D ~ chi2(k-1), so sd(D) ~ sqrt(2/(k-1))
    k = 1000
    counts = np.histogram(times, bins=k, range=(0, duration))[0]
    dispersion = counts.var(ddof=1) / counts.mean()
    assert within(dispersion, 1.0, math.sqrt(2 / (k - 1)))


def test_constant_arrivals_are_evenly_spaced_without_dispersion():
    times = ConstantArrivals(50.0).arrival_times_s(10.0, np.random.default_rng(0))
    assert len(times) == 500
    assert np.allclose(np.diff(times), 0.02)


def test_same_seed_gives_the_same_schedule_and_different_seeds_differ():
    process = make_arrival_process(ArrivalSpec.parse("poisson:rate_rps=30"))
    a = process.arrival_times_s(20.0, np.random.default_rng([7, 1]))
    b = process.arrival_times_s(20.0, np.random.default_rng([7, 1]))
    c = process.arrival_times_s(20.0, np.random.default_rng([8, 1]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_square_wave_bursts_put_the_expected_share_of_arrivals_in_on_periods():
    on_rate, off_rate, on_s, off_s, duration = 200.0, 20.0, 0.5, 1.5, 200.0
    process = OnOffArrivals(on_rate, off_rate, on_s, off_s, markov=False)
    times = process.arrival_times_s(duration, np.random.default_rng(3))
    in_on = (times % (on_s + off_s)) < on_s
    periods = duration / (on_s + off_s)
    expected_on, expected_off = on_rate * on_s * periods, off_rate * off_s * periods
    # counts in on and off time are independent Poissons
    assert within(in_on.sum(), expected_on, math.sqrt(expected_on))
    assert within((~in_on).sum(), expected_off, math.sqrt(expected_off))
    assert process.mean_rate_rps(duration) == pytest.approx((expected_on + expected_off) / duration)


def test_on_off_with_zero_off_rate_sends_nothing_while_off():
    process = OnOffArrivals(100.0, 0.0, 1.0, 2.0)
    times = process.arrival_times_s(30.0, np.random.default_rng(0))
    assert len(times) > 0 and np.all((times % 3.0) < 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_markov_modulated_bursts_have_exponential_sojourns_and_the_stationary_on_fraction(seed):
    a, b, duration = 0.4, 1.2, 2000.0  # mean on and off sojourns
    process = OnOffArrivals(300.0, 10.0, a, b, markov=True)
    rng = np.random.default_rng(seed)
    segments = process.segments(duration, rng)
    on = np.array([s.end_s - s.start_s for s in segments[:-1] if s.rate_rps == 300.0])
    off = np.array([s.end_s - s.start_s for s in segments[:-1] if s.rate_rps == 10.0])
    # exponential sojourns: mean a (b) with standard error a/sqrt(n) (b/sqrt(n))
    assert within(on.mean(), a, a / math.sqrt(len(on)))
    assert within(off.mean(), b, b / math.sqrt(len(off)))
    # fraction of time on -> a/(a+b); delta method over m cycles: sd = sqrt(((1-f)a)^2 + (f b)^2) / ((a+b) sqrt(m))
    f = a / (a + b)
    m = len(on)
    time_on = sum(s.end_s - s.start_s for s in segments if s.rate_rps == 300.0)
    sd = math.sqrt(((1 - f) * a) ** 2 + (f * b) ** 2) / ((a + b) * math.sqrt(m))
    assert within(time_on / duration, f, sd)
    # given the timeline, the arrivals in on time are Poisson(rate * time on)
    times = process.arrival_times_s(duration, np.random.default_rng(seed))
    rng_again = np.random.default_rng(seed)
    timeline = process.segments(duration, rng_again)
    in_on = np.zeros(len(times), dtype=bool)
    for seg in timeline:
        if seg.rate_rps == 300.0:
            in_on |= (times >= seg.start_s) & (times < seg.end_s)
    t_on = sum(s.end_s - s.start_s for s in timeline if s.rate_rps == 300.0)
    assert within(in_on.sum(), 300.0 * t_on, math.sqrt(300.0 * t_on))
    assert within((~in_on).sum(), 10.0 * (duration - t_on), math.sqrt(10.0 * (duration - t_on)))


def test_spike_raises_the_rate_only_inside_its_window():
    base, spike, start, length, duration = 50.0, 1000.0, 5.0, 2.0, 12.0
    process = SpikeArrivals(base, spike, start, length)
    times = process.arrival_times_s(duration, np.random.default_rng(11))
    inside = (times >= start) & (times < start + length)
    assert within(inside.sum(), spike * length, math.sqrt(spike * length))
    outside_s = duration - length
    assert within((~inside).sum(), base * outside_s, math.sqrt(base * outside_s))
    # shape: per-second counts jump at the spike's edges
    per_second = np.histogram(times, bins=12, range=(0, 12))[0]
    assert per_second[5] > 5 * per_second[4] and per_second[6] > 5 * per_second[7]
    assert process.mean_rate_rps(duration) == pytest.approx((base * outside_s + spike * length) / duration)


def test_spike_is_cut_at_the_end_of_the_run():
    process = SpikeArrivals(10.0, 100.0, spike_start_s=8.0, spike_duration_s=10.0)
    assert [(s.start_s, s.end_s) for s in process.segments(10.0)] == [(0.0, 8.0), (8.0, 10.0), (10.0, 10.0)]


def test_interarrival_times_sum_back_to_the_arrival_times():
    process = PoissonArrivals(40.0)
    gaps = process.inter_arrival_times_s(5.0, np.random.default_rng(2))
    times = process.arrival_times_s(5.0, np.random.default_rng(2))
    assert np.allclose(np.cumsum(gaps), times)


@pytest.mark.parametrize(
    "text, message",
    [
        ("poisson", "rate_rps > 0"),
        ("poisson:rate_rps=-1", "rate_rps > 0"),
        ("closed:users=0", "users >= 1"),
        ("bursty:rate_rps=10,on_s=1", "on_s > 0 and off_s > 0"),
        ("spike:rate_rps=10,spike_rate_rps=50", "spike_duration_s > 0"),
        ("trace", "trace_path"),
        ("trace:trace_path=t.csv,trace_unit=h", "trace_unit"),
        ("gamma:rate_rps=3", "unknown"),
    ],
)
def test_bad_arrival_specs_name_the_field_and_rule(text, message):
    with pytest.raises(ConfigValidationError, match=message):
        ArrivalSpec.parse(text)


def test_arrival_spec_parse_casts_types_and_rejects_unknown_fields():
    spec = ArrivalSpec.parse("bursty:rate_rps=80,on_s=0.5,off_s=2,markov=true")
    assert (spec.rate_rps, spec.on_s, spec.off_s, spec.markov) == (80.0, 0.5, 2.0, True)
    assert ArrivalSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(BadParameterError, match="unknown field 'rate'"):
        ArrivalSpec.parse("poisson:rate=5")
    with pytest.raises(BadParameterError, match="not a valid float"):
        ArrivalSpec.parse("poisson:rate_rps=fast")
    with pytest.raises(BadParameterError, match="key=value"):
        ArrivalSpec.parse("poisson:50")
