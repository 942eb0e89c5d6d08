"""The report from synthetic raw data: every section, numbers equal to the raw requests."""

from __future__ import annotations

import csv
import json
import re

import pytest

from loadtest import report as report_lib
from loadtest import rundir
from loadtest.report.data import SATURATED, STABLE, UNKNOWN
from loadtest.report.render import markdown_cell
from loadtest.report.sections import CrossCheckSection, SimulationSection
from loadtest.stats import summarize
from core.errors import ConfigValidationError
from tests.report_runs import DURATION_S, SLO_MS, Spec, capacity_document, write_run

CONFIGS = (("whole", None, 20.0), ("ensemble", None, 15.0), ("reorch", "dva", 10.0))


def _specs(saturate_at_20: bool = False) -> list[Spec]:
    return [
        Spec(
            variant,
            rate,
            mean_ms * rate / 10,
            policy=policy,
            error_share=0.02,
            saturated=saturate_at_20 and rate == 20.0,
        )
        for rate in (10.0, 20.0)
        for variant, policy, mean_ms in CONFIGS
    ]


CAPACITY = capacity_document(reorch_slo_rps=14.0, probes=True)


@pytest.mark.parametrize("new_format", [True, False], ids=["new-points", "old-points"])
def test_report_has_every_section_and_numbers_match_raw_requests(tmp_path, new_format):
    write_run(tmp_path, _specs(), new_format=new_format, failed=True)
    html_path, md_path = report_lib.write_report(tmp_path)
    html = html_path.read_text()
    md = md_path.read_text()
    for title in report_lib.SECTION_TITLES:
        assert f">{title}</h2>" in html
        assert f"## {title}" in md
    assert "<img" in html and "data:image/png;base64," in html
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r"(src|href)=['\"](?!data:|#)", html)
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 5
    # every p99 in the results table equals the p99 recomputed from requests.csv
    requests = rundir.read_requests(tmp_path / rundir.REQUESTS_FILE)
    data = report_lib.load_run(tmp_path)
    for point in data.points[:-1]:
        rows = requests[point.index]
        expected = summarize([r["latency_us"] for r in rows], [r["ok"] for r in rows], DURATION_S, SLO_MS)
        assert point.summary.p99_ms == expected.p99_ms
        assert f"<td>{expected.p99_ms:.1f}</td>" in html
        assert f"| {expected.p99_ms:.1f} |" in md
        assert point.stability == (STABLE if new_format else UNKNOWN)
    findings = report_lib.findings(data)
    assert any("failed: ServerStartError" in f for f in findings)
    assert any("2-core" in line or "2 cores" in line for line in md.splitlines())
    assert "Skipped: not run" in html  # no cross-check file


def test_report_marks_saturated_points_and_shows_capacity_and_crosscheck(tmp_path):
    crosscheck = {
        "status": "ok",
        "reason": None,
        "model": "bert_base",
        "variant": "whole",
        "rate_rps": 10.0,
        "perf_analyzer": {"p50_ms": 11.25, "p99_ms": 30.5, "throughput_rps": 9.9},
        "stagebatch": {"p50_ms": 11.75, "p99_ms": 31.25, "throughput_rps": 9.8},
    }
    write_run(tmp_path, _specs(saturate_at_20=True), capacity=CAPACITY, crosscheck=crosscheck)
    html = report_lib.write_report(tmp_path)[0].read_text()
    data = report_lib.load_run(tmp_path)
    saturated = [p for p in data.points if p.saturated]
    assert len(saturated) == 3 and all(p.point["arrival"]["rate_rps"] == 20.0 for p in saturated)
    assert html.count('<tr class="saturated">') >= 3
    assert "SATURATED (backlog grew 40 req/s)" in html
    # capacity table and cross-check side by side
    assert "<td>21.0</td>" in html and "<td>reorch:dva</td>" in html
    assert "<td>11.25</td>" in html and "<td>11.75</td>" in html and "<td>31.25</td>" in html


def test_report_derives_saturation_and_achieved_rate_when_an_old_run_did_not_record_them(tmp_path):
    write_run(
        tmp_path, [Spec("whole", 20.0, 10.0, saturated=True), Spec("whole", 10.0, 10.0)], new_format=False
    )
    saturated, stable = report_lib.load_run(tmp_path).points
    assert saturated.stability == SATURATED and "derived" in saturated.unstable_reason
    assert saturated.achieved_rps < 0.95 * saturated.offered_rps
    assert stable.stability == UNKNOWN and stable.achieved_rps == pytest.approx(stable.offered_rps, rel=0.02)


def test_point_label_is_the_configuration_without_model_load_or_repeat():
    point = {
        "variant": "reorch",
        "reorch": {"policy": "dva", "knobs": {"max_wait_us": 500}},
        "batching": {"max_batch_size": 8, "preferred_batch_sizes": [4, 8]},
        "slicing": {"stages": 3},
        "model": "m",
        "load": "l",
    }
    assert report_lib.point_label(point) == "reorch[dva] max_wait_us=500 mbs8 pref4-8 k3"


def test_report_refuses_a_directory_without_raw_data(tmp_path):
    with pytest.raises(ConfigValidationError, match="environment.json: missing"):
        report_lib.write_report(tmp_path)


def test_markdown_table_cells_escape_pipes():
    assert markdown_cell("a|b\nc") == "a\\|b c"


def test_report_attributes_reorch_front_wait_when_the_run_files_carry_the_records(tmp_path, monkeypatch):
    """load_run reads each request's REORCH_RECORD from a ``server`` entry of rundir.read_requests."""
    write_run(
        tmp_path,
        [Spec("reorch", 20.0, 10.0, policy="dva", repeat=r, repeats=2, stage_times=True) for r in range(2)]
        + [Spec("whole", 20.0, 10.0, repeat=r, repeats=2) for r in range(2)],
    )
    with open(tmp_path / rundir.REQUESTS_FILE, newline="") as handle:
        servers = [json.loads(row["server"]) if row["server"] else None for row in csv.DictReader(handle)]
    read_requests = rundir.read_requests

    def with_records(path, points=None):
        grouped = read_requests(path, points)
        rows = [row for index in sorted(grouped) for row in grouped[index]]
        for row, server in zip(rows, servers):
            row["server"] = server
        return grouped

    monkeypatch.setattr(rundir, "read_requests", with_records)
    html = report_lib.write_report(tmp_path)[0].read_text()
    reorch = report_lib.load_run(tmp_path).points[0]
    assert len(reorch.server_records) == reorch.ok.sum()
    assert "<td>front wait (arrival to stage 0)</td>" in html and "<td>response path</td>" in html
    assert "2 and 2 repeats" in html


def test_crosscheck_section_says_why_it_was_skipped(tmp_path):
    run = report_lib.RunData(tmp_path, {}, crosscheck={"status": "skipped", "reason": "perf_analyzer not found"})
    content = CrossCheckSection().build(run)
    assert content.paragraphs == ["Skipped: perf_analyzer not found."] and not content.tables


def _crosscheck(wire: dict) -> dict:
    side = {"p50_ms": 2.2, "p99_ms": 4.0, "throughput_rps": 100.0, "requests": 800}
    return {"status": "ok", "model": "bert_base", "variant": "whole", "rate_rps": 100, "protocol": "unary",
            "perf_analyzer": {**side, "wire_p50_ms": 1.8, "wire_p99_ms": 3.5},
            "stagebatch": {**side, "p50_ms": 1.95, "wire_p50_ms": 1.85, "wire_p99_ms": 3.6}, "wire": wire}


def test_crosscheck_section_shows_each_generator_against_the_wire(tmp_path):
    content = CrossCheckSection().build(report_lib.RunData(tmp_path, {}, crosscheck=_crosscheck({"status": "ok"})))
    (table,) = content.tables
    assert table.header[4:7] == ["wire p50 ms", "wire p99 ms", "p50 above the wire µs"]
    cells = {row.cells[0]: row.cells for row in table.rows}
    assert cells["perf_analyzer"][6] == "+400" and cells["stagebatch"][6] == "+100"


def test_crosscheck_section_says_why_the_wire_was_not_timed(tmp_path):
    check = _crosscheck({"status": "skipped", "reason": "capturing the loopback needs root or CAP_NET_RAW"})
    content = CrossCheckSection().build(report_lib.RunData(tmp_path, {}, crosscheck=check))
    assert "Not timed on the wire: capturing the loopback needs root or CAP_NET_RAW." in content.paragraphs
    assert "wire p50 ms" not in content.tables[0].header


def test_simulation_section_shows_the_error_summary_and_each_point(tmp_path):
    simulation = {
        "whole_latency_source": "sum of the stage tables per batch size",
        "points": [
            {"point_id": "a", "stable": True, "measured": {"p50_ms": 10.0}, "simulated": {"p50_ms": 12.0},
             "error": {"p50": 0.2}},
            {"point_id": "b", "skipped": "built with another K"},
        ],
        "summary": {"stable_points": 1, "stable_median_abs_error_p50": 0.2, "median_abs_error_p50": 0.2,
                    "stable_median_abs_error_avg": 0.1, "target": 0.25},
    }
    content = SimulationSection().build(report_lib.RunData(tmp_path, {}, simulation=simulation))
    assert "20.0%" in content.paragraphs[0] and "target 25.0%" in content.paragraphs[0]
    rows = [row.cells for row in content.tables[0].rows]
    assert rows[0] == ["a", "stable", "10.00", "12.00", "20.0%"]
    assert rows[1][-1] == "built with another K"


def test_simulation_section_says_how_to_get_one_when_absent(tmp_path):
    content = SimulationSection().build(report_lib.RunData(tmp_path, {}))
    assert "stagebatch simulate --run" in content.paragraphs[0] and not content.tables


def test_simulation_section_shows_the_pooled_error_when_the_run_repeated_points(tmp_path):
    summary = {"stable_points": 3, "stable_median_abs_error_p50": 0.3, "pooled_points": 2,
               "pooled_median_abs_error_p50": 0.15, "repeat_noise_p50": 0.3,
               "per_variant": {"whole": {"stable_median_abs_error_p50": 0.3, "pooled_median_abs_error_p50": 0.15}}}
    content = SimulationSection().build(report_lib.RunData(tmp_path, {}, simulation={"points": [], "summary": summary}))
    pooled = content.paragraphs[-1]
    assert "repeats pooled" in pooled and "15.0%" in pooled and "whole 15.0%" in pooled


def test_simulation_section_shows_the_cross_validated_error_as_the_prediction(tmp_path):
    summary = {"stable_points": 3, "stable_median_abs_error_p50": 0.2, "repeat_noise_p50": None, "per_variant": {},
               "cross_validated": {"folds": 5, "points": 3, "left_out": 1, "median_abs_error_p50": 0.31,
                                   "per_variant_median_abs_error_p50": {"whole": 0.31}}}
    content = SimulationSection().build(report_lib.RunData(tmp_path, {}, simulation={"points": [], "summary": summary}))
    cross = next(p for p in content.paragraphs if "cross-validation" in p)
    assert "31.0%" in cross and "whole 31.0%" in cross and "1 points could not be predicted" in cross
