"""Latency attribution: the parts add up to the measured mean (within 10%), and say when they cannot."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.report import load_run
from loadtest.report.attribution import CLIENT, FRONT, RESPONSE, attribute
from loadtest.report.data import PointData
from loadtest.stats import summarize
from tests.report_runs import Spec, write_run


def _reorch_point(stage_times: bool, stage_rows: list[dict]) -> PointData:
    """A reorch point whose records split each latency 10% client, 30% front, 50% stages, 10% response."""
    rng = np.random.default_rng(0)
    latencies = rng.integers(5_000, 50_000, size=300)
    records = []
    for latency in latencies:
        arrival = 1_000 + int(0.05 * latency)
        record = {
            "arrival_us": arrival,
            "stage0_entry_us": arrival + int(0.3 * latency),
            "exit_us": arrival + int(0.9 * latency),
            "latency_us": int(latency),
        }
        if stage_times:
            record["stage_times_us"] = [[0.1 * latency, 0.15 * latency], [0.1 * latency, 0.15 * latency]]
        records.append(record)
    ok = np.ones(latencies.size, dtype=bool)
    point = PointData(
        index=0,
        record={"point": {"variant": "reorch", "slo_ms": 100}, "server": {"stages": stage_rows}},
        latencies_us=latencies,
        ok=ok,
        t_send_us=np.zeros(latencies.size, dtype=np.int64),
        batch_sizes_seen=[],
        server_records=records,
    )
    point.summary = summarize(latencies, ok, 10.0, 100)
    return point


def test_attribution_of_whole_and_ensemble_adds_up_from_triton_statistics(tmp_path):
    write_run(tmp_path, [Spec("whole", 20.0, 10.0), Spec("ensemble", 20.0, 10.0, stages=3)])
    for point in load_run(tmp_path).points:
        result = attribute(point)
        assert result.total_ms == pytest.approx(point.summary.avg_ms)
        assert result.adds_up
        client = [p for p in result.parts if p.kind == CLIENT]
        assert len(client) == 1 and client[0].residual
        # synthetic Triton time is 80% of the mean: the rest is client and network
        assert client[0].ms == pytest.approx(0.2 * point.summary.avg_ms, rel=0.02)
    ensemble = attribute(load_run(tmp_path).points[1])
    assert {p.name for p in ensemble.parts} >= {"stage 2 queue", "stage 2 compute infer"}


def test_attribution_of_reorch_counts_the_front_wait_and_adds_up_with_stage_times():
    point = _reorch_point(stage_times=True, stage_rows=[])
    result = attribute(point)
    parts = {p.name: p.ms for p in result.parts}
    mean = point.summary.avg_ms
    assert parts["client + network"] == pytest.approx(0.1 * mean, rel=0.02)
    assert parts["front wait (arrival to stage 0)"] == pytest.approx(0.3 * mean, rel=0.02)
    assert parts["stage 1 compute"] == pytest.approx(0.15 * mean, rel=0.02)
    assert [p.ms for p in result.parts if p.kind == RESPONSE] == [pytest.approx(0.1 * mean, rel=0.05)]
    assert not any(p.residual for p in result.parts)
    assert result.adds_up and result.coverage == pytest.approx(1.0, abs=0.01)


def test_attribution_of_reorch_flags_a_gap_when_the_stage_metrics_miss_time():
    point = _reorch_point(stage_times=False, stage_rows=[])
    mean_us = point.summary.avg_ms * 1000
    # metrics that account for only a fifth of the time in stages
    rows = [{"stage": s, "avg_queue_us": 0.02 * mean_us, "avg_compute_us": 0.03 * mean_us} for s in range(2)]
    point.record["server"]["stages"] = rows
    result = attribute(point)
    assert [p.kind for p in result.parts][:2] == [CLIENT, FRONT]
    assert result.coverage == pytest.approx(0.5, abs=0.02) and not result.adds_up
    assert any("response path is not measured" in note for note in result.notes)


def test_attribution_of_reorch_without_records_keeps_the_rest_as_one_residual(tmp_path):
    write_run(tmp_path, [Spec("reorch", 20.0, 10.0, policy="dva", reorch_records=False)])
    (point,) = load_run(tmp_path).points
    result = attribute(point)
    assert result.parts[-1].residual and result.total_ms == pytest.approx(point.summary.avg_ms)
    assert any("front wait cannot be told" in note for note in result.notes)
