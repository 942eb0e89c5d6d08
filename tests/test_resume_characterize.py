"""Relative loads with a given capacity, and resuming an interrupted characterization.

Fast cases share one uninterrupted run of a tiny plan; the slow case interrupts a real run
(Ctrl-C, and a killed tritonserver) and resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loadtest import characterization as runner
from loadtest.plan import parse_plan
from loadtest.rundir import POINTS_FILE, REQUESTS_FILE, read_environment, read_points, read_requests
from stagebatch.cli import main
from tests.helpers import tiny_plan_folder

CAPACITY = {"models": {"seq": {"whole": {"sustained_rps": 40.0, "slo_rps": 40.0, "slo_ms": 50, "percentile": 99,
                                          "limited_by": "server", "probes": []}}}}  # fmt: skip

PLAN = textwrap.dedent("""\
    name: tinyrel
    repository: {path: repo, build: false}
    defaults: {duration_s: 1.2, warmup_s: 0.3, slo_ms: 50, repeats: 2}
    models:
      seq:
        lengths: {kind: uniform, min_length: 4, max_length: 16}
    loads:
      curve:
        arrival: {kind: poisson, rate_rps: 1x}
        sweep: {rate_rps: [0.5x]}
    experiments:
      - name: variants
        models: [seq]
        variants: [whole, reorch]
        loads: [curve]
    """)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_plan_folder(root, PLAN)
    (root / "capacity.json").write_text(json.dumps(CAPACITY))
    return root


@pytest.fixture(scope="module")
def full_run(tiny):
    plan = parse_plan(PLAN, str(tiny / "plan.yaml"))
    options = runner.RunOptions(out_dir=tiny / "full", progress=False, capacity_file=tiny / "capacity.json")
    return runner.characterize(plan, options)


def _ids(run_dir: Path) -> list[str]:
    return sorted(p["point"]["point_id"] for p in read_points(run_dir) if p["status"] == "ok")


@pytest.mark.server
def test_relative_points_record_load_stability_and_comparison_keys(full_run):
    points = read_points(full_run)
    assert [p["status"] for p in points] == ["ok"] * 4, [p.get("error") for p in points]
    for point in points:
        assert point["load"] == {"rate_rps": 20.0, "multiple": 0.5, "capacity_rps": 40.0}
        assert point["point"]["arrival"]["rate_rps"] == 20.0 and point["point"]["arrival_plan"]["rate_rps"] == "0.5x"
        assert len(point["subwindows"]) >= 3 and isinstance(point["stable"], bool)
        assert set(point["subwindows"][0]) == {"start_s", "end_s", "arrivals", "completions", "backlog"}
        assert point["offered_rps"] > 0 and point["achieved_rps"] >= 0
        assert point["repeats"] == 2 and point["repeat"] in (0, 1)
        assert "backlog_growth_per_s" in point and "unstable_reason" in point
    assert len({p["comparison_key"] for p in points}) == 1
    assert [(p["repeat"], p["point"]["variant"]) for p in points] == [
        (0, "whole"), (0, "reorch"), (1, "reorch"), (1, "whole")
    ]  # fmt: skip
    assert json.loads((full_run / "capacity.json").read_text()) == CAPACITY
    assert read_environment(full_run)["replicas"] == 1


@pytest.mark.server
def test_resume_runs_only_missing_points_and_drops_half_written_ones(full_run, tiny):
    crashed = tiny / "crashed"
    shutil.copytree(full_run, crashed)
    lines = (crashed / POINTS_FILE).read_text().splitlines(keepends=True)
    # two complete points, then a torn line; the third point's request rows were written before the crash
    (crashed / POINTS_FILE).write_text("".join(lines[:2]) + lines[2][:40])
    header, *rows = (crashed / REQUESTS_FILE).read_text().splitlines(keepends=True)
    kept = [r for r in rows if int(r.split(",")[0]) < 3]
    (crashed / REQUESTS_FILE).write_text(header + "".join(kept) + "3,17,1")  # and a torn row
    assert len(read_points(crashed)) == 2

    assert main(["characterize", "--resume", str(crashed), "--capacity", str(tiny / "capacity.json"),
                 "--no-progress"]) == 0  # fmt: skip
    assert _ids(crashed) == _ids(full_run)
    points = read_points(crashed)
    assert sorted(p["index"] for p in points) == [0, 1, 2, 3]
    requests = read_requests(crashed / REQUESTS_FILE)
    for point in points:  # each point's rows once: the resumed points' own, none left from the crash
        assert point["client"]["requests"] == len(requests[point["index"]])
    assert read_environment(crashed)["resumed_utc"]
    assert (crashed / "report.html").is_file()


def test_resume_refuses_a_directory_without_a_run(tmp_path, capsys):
    assert main(["characterize", "--resume", str(tmp_path)]) == 1
    assert "environment.json: missing" in capsys.readouterr().err


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "stagebatch.cli", "characterize", *args, "--no-progress"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_points(run_dir: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_points(run_dir)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no point was written in time"
        time.sleep(0.2)


@pytest.mark.server
@pytest.mark.slow
def test_interrupted_and_crashed_runs_resume_to_the_same_points(full_run, tiny):
    capacity = str(tiny / "capacity.json")
    # Ctrl-C after the first point: clean stop, report from what is complete, the resume hint
    run_dir = tiny / "interrupted"
    process = _run_cli(["--plan", str(tiny / "plan.yaml"), "--out", str(run_dir), "--capacity", capacity], tiny)
    _wait_for_points(run_dir, 1, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and (run_dir / "report.html").is_file()
    assert 1 <= len(read_points(run_dir)) < 4
    assert main(["characterize", "--resume", str(run_dir), "--capacity", capacity, "--no-progress"]) == 0
    assert _ids(run_dir) == _ids(full_run)

    # tritonserver killed in the middle of a point: that point fails with the reason, the rest run
    run_dir = tiny / "killed"
    process = _run_cli(["--plan", str(tiny / "plan.yaml"), "--out", str(run_dir), "--capacity", capacity], tiny)
    _wait_for_points(run_dir, 1, process)
    time.sleep(0.5)
    servers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "tritonserver"], capture_output=True, text=True)
    for pid in servers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    process.communicate(timeout=300)
    points = read_points(run_dir)
    assert len(points) == 4
    assert servers.stdout.split(), "no tritonserver child to kill"
    assert (run_dir / "tritonserver.2.log").is_file()  # the runner brought its server back and went on
    assert main(["characterize", "--resume", str(run_dir), "--capacity", capacity, "--no-progress"]) == 0
    assert _ids(run_dir) == _ids(full_run)
