"""Sequence-length distributions, trace replay exactness and trace-file errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.workloads import (
    ArrivalSpec,
    LengthSpec,
    TraceArrivals,
    make_arrival_process,
    make_length_distribution,
    read_trace,
)
from tests.helpers import Z, within
from core.errors import ConfigValidationError



def test_fixed_lengths_are_constant():
    dist = make_length_distribution(LengthSpec.parse("fixed:length=17"), min_length=1, max_length=64)
    assert set(dist.sample(np.random.default_rng(0), 100).tolist()) == {17}


def test_uniform_lengths_cover_both_ends_with_the_uniform_mean():
    lo, hi, n = 8, 40, 20000
    dist = make_length_distribution(LengthSpec("uniform", min_length=lo, max_length=hi), min_length=1, max_length=64)
    values = dist.sample(np.random.default_rng(1), n)
    assert values.min() == lo and values.max() == hi
    variance = ((hi - lo + 1) ** 2 - 1) / 12  # discrete uniform
    assert within(values.mean(), (lo + hi) / 2, math.sqrt(variance / n))
    # each value has probability 1/(hi-lo+1); binomial standard error
    p = 1 / (hi - lo + 1)
    counts = np.bincount(values - lo, minlength=hi - lo + 1) / n
    assert np.all(np.abs(counts - p) <= Z * math.sqrt(p * (1 - p) / n))


def test_longtail_lengths_have_the_median_a_heavy_tail_and_stay_in_range():
    median, sigma, n = 16.0, 1.0, 20000
    dist = make_length_distribution(LengthSpec("longtail", median=median, sigma=sigma), min_length=1, max_length=512)
    values = dist.sample(np.random.default_rng(2), n)
    assert values.min() >= 1 and values.max() <= 512
    # P(X > 4 median) = 1 - Phi(ln 4 / sigma) for a log-normal (rounding moves the boundary by < 0.5)
    p_tail = 0.5 * math.erfc(math.log(4) / sigma / math.sqrt(2))
    assert within(np.mean(values > 4 * median), p_tail, math.sqrt(p_tail * (1 - p_tail) / n))
    # half the mass below the median (values equal to the median split the difference)
    below = np.mean(values < median) + 0.5 * np.mean(values == median)
    assert within(below, 0.5, math.sqrt(0.25 / n) + np.mean(values == median) / Z)


def test_longtail_lengths_are_clipped_to_the_model_range():
    dist = make_length_distribution(LengthSpec("longtail", median=60, sigma=2.0), min_length=4, max_length=64)
    values = dist.sample(np.random.default_rng(3), 5000)
    assert values.min() == 4 and values.max() == 64


def test_file_lengths_are_drawn_from_the_file_in_proportion(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("# lengths seen in production\n8, 8, 8\n32 32\n\n128\n")
    n = 30000
    values = make_length_distribution(LengthSpec("file", path=str(path)), min_length=1, max_length=128).sample(
        np.random.default_rng(4), n
    )
    assert set(values.tolist()) == {8, 32, 128}
    for value, p in ((8, 3 / 6), (32, 2 / 6), (128, 1 / 6)):
        assert within(np.mean(values == value), p, math.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize(
    "spec, message",
    [
        (LengthSpec("fixed", length=200), r"spans \[200, 200\].*\[1, 128\]"),
        (LengthSpec("uniform", min_length=1, max_length=129), r"\[1, 128\]"),
    ],
)
def test_lengths_outside_the_model_range_are_rejected(spec, message):
    with pytest.raises(ConfigValidationError, match=message):
        make_length_distribution(spec, min_length=1, max_length=128)


def test_bad_lengths_files_name_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("4\n5 six\n")
    with pytest.raises(ConfigValidationError, match="line 2: 'six' is not an integer"):
        make_length_distribution(LengthSpec("file", path=str(path)), min_length=1, max_length=8)
    with pytest.raises(ConfigValidationError, match="cannot be read"):
        make_length_distribution(LengthSpec("file", path=str(tmp_path / "missing")), min_length=1, max_length=8)


def test_length_spec_validation():
    with pytest.raises(ConfigValidationError, match="min_length <= max_length"):
        LengthSpec("uniform", min_length=10, max_length=5)
    with pytest.raises(ConfigValidationError, match="sigma > 0"):
        LengthSpec("longtail", median=10)


# ---- traces ---------------------------------------------------------------------------------


def test_trace_replay_is_exact_relative_to_the_first_timestamp_and_scaled_by_speed(tmp_path):
    stamps_ms = [1700000000000.0, 1700000000000.5, 1700000000003.0, 1700000000250.0, 1700000001999.0]
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,seq_len\n" + "".join(f"{t},{i + 1}\n" for i, t in enumerate(stamps_ms)))
    spec = ArrivalSpec.parse(f"trace:trace_path={path},trace_unit=ms,speed=2")
    process = make_arrival_process(spec)
    assert isinstance(process, TraceArrivals)
    expected = (np.asarray(stamps_ms) - stamps_ms[0]) / 1000.0 / 2.0
    times = process.arrival_times_s(10.0, np.random.default_rng(0))
    assert np.array_equal(times, expected)
    assert process.lengths(10.0).tolist() == [1, 2, 3, 4, 5]
    # arrivals at or after the run's end are dropped, with their lengths
    assert process.arrival_times_s(0.125, np.random.default_rng(0)).tolist() == expected[:3].tolist()
    assert process.lengths(0.125).tolist() == [1, 2, 3]


def test_trace_with_comments_whitespace_and_no_lengths(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("# seconds\n0.5\n\n0.75   # a comment\n2\n")
    trace = read_trace(path)
    assert trace.times_s.tolist() == [0.0, 0.25, 1.5] and trace.lengths is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("0\n2\n1\n", "line 3: timestamp 1 is earlier than the previous one"),
        ("0\nabc\n", "line 2: timestamp 'abc' is not a number"),
        ("0,4\n1\n", "line 2: some lines have a seq_len column"),
        ("0\n1,4\n", "line 2: some lines have a seq_len column"),
        ("0,4,5\n", "line 1: expected 'timestamp\\[,seq_len\\]'"),
        ("0,0\n", "seq_len 0 must be >= 1"),
        ("# nothing\n", "no timestamps found"),
        ("0\ninf\n", "not finite"),
    ],
)
def test_bad_trace_files_name_the_line_and_the_rule(tmp_path, content, message):
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(ConfigValidationError, match=message):
        read_trace(path)


def test_missing_trace_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigValidationError, match="cannot be read"):
        make_arrival_process(ArrivalSpec("trace", trace_path=str(tmp_path / "nope.csv")))
