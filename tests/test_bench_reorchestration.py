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
