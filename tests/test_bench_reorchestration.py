"""The reorchestration bench's statistics: when a target counts as decided (no server)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "reorchestration.py"
_SPEC = importlib.util.spec_from_file_location("bench_reorchestration", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up
_SPEC.loader.exec_module(bench)


def _steady_comparison(ratios: list[float]):
    check = bench.Check("steady", lambda r: r["reorch"]["avg"] / r["whole"]["avg"], 1.05,
                        lambda mean, low, high: high <= 1.05, lambda mean, low, high: "", ratio=True)
    comparison = bench.Comparison("m", "m steady", np.zeros(1), {}, [check])
    comparison.repeats = [{"whole": {"avg": 10.0}, "reorch": {"avg": 10.0 * r}} for r in ratios]
    return comparison, check


def test_ratio_ci95_is_the_geometric_mean_with_an_interval_around_it():
    mean, low, high = bench.ratio_ci95([0.5, 2.0, 1.0])
    assert mean == pytest.approx(1.0) and low < 1.0 < high
    assert mean == pytest.approx(math.sqrt(low * high))  # symmetric on the log scale


def test_comparison_is_decided_when_the_interval_excludes_the_limit():
    comparison, check = _steady_comparison([0.95, 0.96, 0.97])
    assert comparison.decided and check.met(*comparison.interval(check))
    comparison, check = _steady_comparison([1.30, 1.31, 1.29])
    assert comparison.decided and not check.met(*comparison.interval(check))


def test_comparison_is_undecided_while_the_interval_holds_the_limit_or_has_one_repeat():
    assert not _steady_comparison([0.8, 1.3, 1.05])[0].decided
    assert not _steady_comparison([0.9])[0].decided


def test_reorch_summary_reads_inline_runs_and_the_launch_overhead_apart_from_the_stages(monkeypatch):
    before = 'stagebatch_reorch_inline_executions_total{model="m_reorch"} 2\n'
    after = "\n".join([
        'stagebatch_reorch_operations_total{model="m_reorch",operation="fuse"} 12',
        'stagebatch_reorch_inline_executions_total{model="m_reorch"} 6',
        'stagebatch_reorch_inline_samples_total{model="m_reorch"} 10',
        'stagebatch_reorch_inline_compute_us_total{model="m_reorch"} 4000',
        'stagebatch_reorch_stage_executions_total{model="m_reorch",stage="0"} 2',
        'stagebatch_reorch_stage_samples_total{model="m_reorch",stage="0"} 6',
        'stagebatch_reorch_launch_overhead_us{model="m_reorch"} 276',
    ])
    monkeypatch.setattr(bench, "scrape_metrics", lambda url: after)
    summary = bench.reorch_summary("http://unused", "m_reorch", before)
    assert summary == ("ops fuse 12, rows per launch by stage 3.0, inline 4 batches of 2.5 rows, "
                       "launch overhead 276 us")
    delta = bench.diff_reorch_metrics(before, after, "m_reorch").to_dict()
    assert delta["inline"]["avg_compute_us"] == pytest.approx(1000.0) and delta["stages"]["0"]["executions"] == 2


def _run(arrivals_s, service_s, start=100.0, unanswered=()):
    """Synthetic open-loop run: sent on time; answers from one FIFO server of ``service_s`` per request."""
    sent, done, free_at = {}, {}, start
    for index, at in enumerate(arrivals_s):
        sent[index] = start + at
        free_at = max(free_at, sent[index]) + service_s
        if index not in unanswered:
            done[index] = free_at
    return sent, done


def test_measured_stability_passes_a_server_that_keeps_up():
    arrivals = np.arange(0, 6, 0.01)  # 100/s, served in 2 ms
    sent, done = _run(arrivals, 0.002)
    stability = bench.measured_stability(arrivals, sent, done, {}, 100.0, 1.0, 6.0)
    assert stability.stable and bench.unstable_word(stability) is None
    assert stability.offered_rps == pytest.approx(100, rel=0.02)


def test_measured_stability_flags_a_queue_that_grows():
    arrivals = np.arange(0, 6, 0.01)  # 100/s into a server of 80/s
    sent, done = _run(arrivals, 0.0125)
    stability = bench.measured_stability(arrivals, sent, done, {}, 100.0, 1.0, 6.0)
    assert not stability.stable
    assert bench.unstable_word(stability) in ("completions_behind_arrivals", "backlog_growing")


def test_measured_stability_counts_unanswered_requests_as_waiting():
    arrivals = np.arange(0, 6, 0.01)
    sent, done = _run(arrivals, 0.002, unanswered=set(range(200, 600)))
    stability = bench.measured_stability(arrivals, sent, done, {}, 100.0, 1.0, 6.0)
    assert not stability.stable and stability.subwindows[-1].backlog >= 390


def test_measured_stability_of_an_empty_window_is_none():
    assert bench.measured_stability(np.array([0.1, 0.2]), {}, {}, {}, 0.0, 1.0, 3.0) is None


def test_unstable_repeats_are_named_in_the_verdict():
    comparison, _ = _steady_comparison([1.0, 1.0, 1.0])
    assert comparison.unstable_note() == ""
    comparison.repeats[1]["whole"]["unstable"] = "queue_standing"
    comparison.repeats[2]["whole"]["unstable"] = "backlog_growing"
    note = comparison.unstable_note()
    assert "whole unstable in 2 of 3 (backlog_growing, queue_standing)" in note and "reorch" not in note
    comparison.rival_label = "control"  # an A/A run names its second copy, not reorch
    comparison.repeats[0]["reorch"]["unstable"] = "queue_standing"
    assert "control unstable in 1 of 3 (queue_standing)" in comparison.unstable_note()


def test_measured_stability_of_bursty_arrivals_uses_whole_periods():
    # 1.5 s cycles: 0.5 s at 400/s, 1 s at 20/s, into a server of 250/s; the 8 s schedule's window from 1 s
    # holds 4 whole cycles (7 s would end a cycle's burst early with a queue that drains after it)
    rng = np.random.default_rng(0)
    arrivals = np.sort(np.concatenate([start + rng.uniform(0, 0.5, 200) for start in np.arange(0, 8, 1.5)]
                                      + [start + 0.5 + rng.uniform(0, 1.0, 20) for start in np.arange(0, 8, 1.5)]))
    arrivals = arrivals[arrivals < 8]
    sent, done = _run(arrivals, 0.004)
    stability = bench.measured_stability(arrivals, sent, done, {}, 100.0, 1.0, 8.0, period_s=1.5)
    assert stability.stable, stability.unstable_reason
    assert len(stability.subwindows) == 4 and stability.subwindows[-1].end_s == pytest.approx(6.0)


@pytest.fixture(scope="module")
def tiny_lstm(tmp_path_factory):
    from core.manifest import read_manifest
    from slicing.build import BuildOptions, build_repository

    out = tmp_path_factory.mktemp("tiny_lstm")
    build_repository(out, models=["lstm"], options=BuildOptions(size="tiny", stages=2))
    return out, read_manifest(out).raw


def test_control_overlay_serves_a_second_copy_of_the_whole_model(tiny_lstm):
    import shutil

    from core.model_config import read_model_config

    repository, manifest = tiny_lstm
    overlay = bench.overlay_repository(repository, manifest, ["lstm"], ["dva"], 100, {}, control=True)
    try:
        whole = read_model_config(repository / "lstm" / "config.pbtxt")
        copy = read_model_config(overlay / "lstm_control" / "config.pbtxt")
        assert copy == {**whole, "name": "lstm_control"}
        assert (overlay / "lstm_control" / "1").resolve() == (repository / "lstm" / "1").resolve()
        assert (overlay / "lstm_reorch_dva" / "config.pbtxt").is_file()  # reorch is still deployed beside it
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
    plain = bench.overlay_repository(repository, manifest, ["lstm"], ["dva"], 100, {})
    try:
        assert not (plain / "lstm_control").exists()
    finally:
        shutil.rmtree(plain, ignore_errors=True)


def test_capacity_is_the_highest_sustained_poisson_rate_not_the_closed_loop_rate(tiny_lstm, monkeypatch):
    """The closed loop reads 500 req/s; Poisson arrivals are sustained only up to 300: the steady
    targets' loads must be relative to the latter (at 0.85 x 500 the whole model's queue grows)."""
    from types import SimpleNamespace

    from loadtest.perf_analyzer import PerfAnalyzerUnavailable
    from loadtest.stability import Stability

    _, manifest = tiny_lstm
    probed = []

    async def closed_loop(url, model, inputs, concurrency, duration_s):
        return 500.0

    async def drive(url, model, arrivals, inputs, warmup_s, drain_s, streaming, duration_s=None, period_s=None):
        rate = len(arrivals) / duration_s
        probed.append(rate)
        ok = rate <= 300
        outcome = bench.Outcome(model, latencies_ms=[5.0] * len(arrivals))
        outcome.stability = Stability(rate, min(rate, 300.0), stable=ok,
                                      unstable_reason=None if ok else "backlog_growing: the queue grew")
        return outcome

    def unavailable():
        raise PerfAnalyzerUnavailable("not in this test")

    monkeypatch.setattr(bench, "capacity_rps", closed_loop)
    monkeypatch.setattr(bench, "drive", drive)
    monkeypatch.setattr(bench, "ensure_perf_analyzer", unavailable)
    args = SimpleNamespace(seed=0, capacity_s=1.0, probe_s=20.0, drain_s=1.0, capacity_probes=8)
    found = bench.Bench(SimpleNamespace(grpc_url="localhost:1"), manifest, args, "dva").capacity("lstm")
    assert 250 <= found <= 300  # within the search's 10% tolerance, below the failing rates
    assert probed[0] == pytest.approx(500, rel=0.1) and max(probed) > 300
