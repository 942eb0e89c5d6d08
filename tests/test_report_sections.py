"""The report from synthetic raw data: every section, numbers equal to the raw requests."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from loadtest import report as report_lib
from loadtest import runner
from loadtest.stats import summarize
from stagebatch.errors import ConfigValidationError


@dataclass
class FakeRecord:  # the fields of loadtest.client.RequestRecord the runner writes
    t_send_us: int
    latency_us: int
    ok: bool
    seq_len: int | None
    rows: int
    error: str | None
    server: dict | None


def _point(index, variant, load, policy=None, rate=10.0, qd=None):
    batching = {} if qd is None else {"max_queue_delay_us": qd}
    return {
        "point_id": f"e/bert_base/{variant}/{policy or ''}/{load}",
        "experiment": "e",
        "model": "bert_base",
        "variant": variant,
        "load": load,
        "arrival": {"kind": "poisson", "rate_rps": rate},
        "lengths": None,
        "batching": batching,
        "slicing": {},
        "reorch": {"policy": policy} if policy else {},
        "duration_s": 10.0,
        "warmup_s": 1.0,
        "slo_ms": 30.0,
        "seed": 0,
    }


def _write_run(tmp_path, rng):
    configs = [("whole", None, 20.0), ("ensemble", None, 15.0), ("reorch", "dva", 10.0)]
    points, rows = [], []
    index = 0
    for load, rate in (("curve@rate_rps=10", 10.0), ("curve@rate_rps=20", 20.0)):
        for variant, policy, scale_ms in configs:
            n = int(rate * 10)
            latencies = (rng.gamma(2.0, scale_ms * 500, size=n) * (rate / 10)).astype(int) + 100
            ok = rng.random(n) > 0.02
            stages = [
                {
                    "stage": s,
                    "model": f"bert_base_stage{s}",
                    "executions": 40,
                    "rows": 100,
                    "avg_batch_size": 2.5,
                    "avg_queue_us": 1500.0 + s,
                    "avg_compute_us": 4000.0,
                    "batch_histogram": {"1": 10, "2": 10, "4": 15},
                }
                for s in range(2)
            ]
            batch_sizes = [[2, 4]] if variant == "reorch" else None
            for i in range(n):
                record = FakeRecord(
                    1_000_000 + i * 1000,
                    int(latencies[i]),
                    bool(ok[i]),
                    None,
                    1,
                    None if ok[i] else "boom",
                    {"batch_sizes": [2, 4]} if batch_sizes else None,
                )
                rows.append(runner.request_row(index, record))
            summary = summarize(latencies, ok, 10.0, 30.0)
            points.append(
                {
                    "index": index,
                    "point": _point(index, variant, load, policy, rate),
                    "status": "ok",
                    "error": None,
                    "duration_s": 10.0,
                    "client": summary.to_dict(),
                    "first_error": "boom",
                    "server": {
                        "stages": stages,
                        "reorch": {"operations": {"new": 5, "stretch": 3}} if variant == "reorch" else None,
                    },
                    "loadgen": {"cpu_percent": 12.0, "late_arrivals": 0, "warnings": [], "bottleneck": False},
                }
            )
            index += 1
    points.append(
        {
            "index": index,
            "point": _point(index, "whole", "spike"),
            "status": "failed",
            "error": "ServerStartError: model 'x' failed to load",
        }
    )
    (tmp_path / runner.POINTS_FILE).write_text("".join(runner.dumps(p) + "\n" for p in points))
    with open(tmp_path / runner.REQUESTS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(runner.REQUEST_COLUMNS)
        writer.writerows(rows)
    (tmp_path / runner.ENVIRONMENT_FILE).write_text(
        json.dumps(
            {
                "plan": {"name": "synthetic"},
                "plan_source": "p.yaml",
                "server": "embedded",
                "hardware": {"cpu_cores_logical": 2, "gpu": "none"},
                "software": {"python": "3.11"},
                "started_utc": "2026-11-29T04:00:00Z",
                "finished_utc": "2026-11-29T04:01:00Z",
            }
        )
    )
    return points


def test_report_has_every_section_and_numbers_match_raw_requests(tmp_path):
    points = _write_run(tmp_path, np.random.default_rng(3))
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
    requests = runner.read_requests(tmp_path / runner.REQUESTS_FILE)
    data = report_lib.load_run(tmp_path)
    for point in data.points[:-1]:
        rows = requests[point.index]
        latencies = np.array([r["latency_us"] for r in rows])
        ok = np.array([r["ok"] for r in rows])
        expected = summarize(latencies, ok, 10.0, 30.0)
        assert point.summary.p99_ms == expected.p99_ms == points[point.index]["client"]["p99_ms"]
        assert f"<td>{expected.p99_ms:.1f}</td>" in html
        assert f"| {expected.p99_ms:.1f} |" in md
    # findings quote the same numbers
    findings = report_lib.findings(data)
    whole = data.points[3].summary  # whole under rate 20 is the baseline of that comparison
    best = min((p for p in data.points[4:6]), key=lambda p: p.summary.p99_ms).summary
    assert any(f"from {whole.p99_ms:.1f} to {best.p99_ms:.1f} ms" in f for f in findings), findings
    assert any("failed: ServerStartError" in f for f in findings)
    assert any("2-core" in line or "2 cores" in line for line in md.splitlines())


def test_report_refuses_a_directory_without_raw_data(tmp_path):
    with pytest.raises(ConfigValidationError, match="environment.json: missing"):
        report_lib.write_report(tmp_path)
