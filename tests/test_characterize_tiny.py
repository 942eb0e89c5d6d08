"""The characterization runner end to end: tiny models on the embedded server, raw data, report, CLI."""

from __future__ import annotations

import csv
import json
import textwrap

import numpy as np
import pytest

from loadtest import report as report_lib
from loadtest import characterization as runner
from loadtest import rundir
from loadtest.plan import load_plan
from loadtest.stats import summarize
from stagebatch.cli import main
from tests.helpers import tiny_plan_folder

PLAN = textwrap.dedent("""\
    name: tiny
    repository: {path: repo, build: false}
    defaults: {duration_s: 1.5, warmup_s: 0.3, slo_ms: 50}
    models:
      seq:
        lengths: {kind: uniform, min_length: 4, max_length: 16}
    loads:
      poisson:
        arrival: {kind: poisson, rate_rps: 30}
    experiments:
      - name: delays
        models: [seq]
        variants: [whole]
        batching: {max_queue_delay_us: [0, 3000], max_batch_size: 4}
        loads: [poisson]
      - name: policies
        models: [seq]
        variants: [reorch]
        reorch: {policy: [pipeline, dva]}
        loads: [poisson]
    """)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("characterize")
    plan = load_plan(tiny_plan_folder(root, PLAN))
    run_dir = runner.characterize(plan, runner.RunOptions(out_dir=root / "run", progress=False))
    return run_dir


@pytest.mark.server
def test_runner_completes_a_small_plan_with_raw_data(tiny_run):
    points = [json.loads(line) for line in (tiny_run / rundir.POINTS_FILE).read_text().splitlines()]
    assert [p["status"] for p in points] == ["ok"] * 4, [p.get("error") for p in points]
    environment = json.loads((tiny_run / rundir.ENVIRONMENT_FILE).read_text())
    assert environment["plan"]["name"] == "tiny" and "models:" in environment["plan_text"]
    assert environment["hardware"]["cpu_cores_logical"] >= 1
    assert environment["software"]["tritonclient"] and environment["finished_utc"]
    requests = rundir.read_requests(tiny_run / rundir.REQUESTS_FILE)
    for point in points:
        rows = requests[point["index"]]
        assert point["client"]["requests"] == len(rows) > 0
        assert point["client"]["errors"] == 0
        # the server saw the measured window's requests (the window edge may add or drop a couple)
        models = point["server"]["models"]
        served = sum(m["success"] for m in models.values())
        assert abs(served - len(rows)) <= max(3, 0.1 * len(rows)), (served, len(rows))
        assert point["loadgen"]["cpu_percent"] >= 0
        late = sum(r["late_us"] > 2000 for r in rows)  # the driver's default tolerance
        assert point["loadgen"]["late_arrivals"] == late
    whole = [p for p in points if p["point"]["variant"] == "whole"]
    assert [p["point"]["batching"]["max_queue_delay_us"] for p in whole] == [0, 3000]
    for p in whole:  # the batch-size histogram counts every execution of the point
        stage = p["server"]["stages"][0]
        assert sum(stage["batch_histogram"].values()) == stage["executions"] > 0
        assert max(int(k) for k in stage["batch_histogram"]) <= 4  # the reloaded max_batch_size
    assert {p["point"]["reorch"]["policy"] for p in points if p["point"]["variant"] == "reorch"} == {
        "pipeline",
        "dva",
    }


@pytest.mark.server
def test_report_sections_and_numbers_match_raw_data(tiny_run):
    html = (tiny_run / "report.html").read_text()
    md = (tiny_run / "report.md").read_text()
    for title in report_lib.SECTION_TITLES:
        assert f">{title}</h2>" in html and f"## {title}" in md
    with open(tiny_run / rundir.REQUESTS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for line in (tiny_run / rundir.POINTS_FILE).read_text().splitlines():
        point = json.loads(line)
        mine = [r for r in rows if int(r["point"]) == point["index"]]
        latencies = np.array([int(r["latency_us"]) for r in mine])
        ok = np.array([r["ok"] == "1" for r in mine])
        expected = summarize(latencies, ok, point["duration_s"], point["point"]["slo_ms"])
        assert point["client"]["p99_ms"] == pytest.approx(expected.p99_ms)
        assert f"<td>{expected.p99_ms:.1f}</td>" in html
        assert f"| {expected.p50_ms:.1f} |" in md
    assert "reorch[dva]" in html and "qd3000" in html
    # regenerating from the raw data gives the same tables
    before = md
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "report.md").read_text() == before


def test_bad_plan_is_refused_up_front_with_the_wrong_line(tmp_path, capsys):
    bad = PLAN.replace("max_queue_delay_us: [0, 3000]", "max_queue_delay_us: [0, -1]")
    (tmp_path / "plan.yaml").write_text(bad)
    assert main(["characterize", "--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    wrong_line = next(i for i, line in enumerate(bad.splitlines(), start=1) if "-1]" in line)
    assert err.count("\n") == 1 and f"plan.yaml:{wrong_line}:" in err
    assert "must be >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_unknown_model_in_repository_is_refused_before_any_point(tmp_path, capsys):
    tiny_plan_folder(tmp_path, PLAN.replace("  seq:\n", "  bert_base:\n").replace("[seq]", "[bert_base]"))
    assert (
        main(
            [
                "characterize",
                "--plan",
                str(tmp_path / "plan.yaml"),
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "plan.yaml:5: models.bert_base: model 'bert_base' is not in the repository" in err
    assert not (tmp_path / "run" / rundir.POINTS_FILE).exists()


@pytest.mark.server
def test_runner_against_a_running_server_restores_its_models(tmp_path, triton_server):
    import tritonclient.grpc as grpcclient

    plan_text = PLAN.replace("defaults: {duration_s: 1.5", "defaults: {duration_s: 1.0").split(
        "  - name: policies"
    )[0]
    tiny_plan_folder(tmp_path, plan_text)
    server = triton_server(tmp_path / "repo", models=["seq"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    built = client.get_model_config("seq", as_json=True)["config"]
    options = runner.RunOptions(
        out_dir=tmp_path / "run", url=server.grpc_url, admin_headers=server.admin_headers, progress=False
    )
    run_dir = runner.characterize(load_plan(tmp_path / "plan.yaml"), options)
    points = [json.loads(line) for line in (run_dir / rundir.POINTS_FILE).read_text().splitlines()]
    assert [p["status"] for p in points] == ["ok", "ok"]
    assert json.loads((run_dir / rundir.ENVIRONMENT_FILE).read_text())["server"] == server.grpc_url
    # the points ran with queue delays 0 and 3000 µs and max batch 4; the server got its model back as built
    restored = client.get_model_config("seq", as_json=True)["config"]
    assert restored["max_batch_size"] == built["max_batch_size"] == 8
    assert restored["dynamic_batching"] == built["dynamic_batching"]
