"""Capacity search against a real server model with a known service time, then relative loads on it.

``sleeper`` is a Python-backend model that sleeps :data:`SERVICE_S` per batch of at most
:data:`MAX_BATCH` requests, so it serves at most MAX_BATCH / SERVICE_S requests per second.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from loadtest import characterization as runner
from loadtest.plan import parse_plan
from loadtest.rundir import read_capacity, read_points
from core.model_config import DynamicBatching, TensorConfig, python_model_config, write_model_config

SERVICE_S = 0.1
MAX_BATCH = 4
CAPACITY_RPS = MAX_BATCH / SERVICE_S  # 40 req/s

SLEEPER_MODEL = f'''
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep({SERVICE_S})  # one fixed service time per batch, whatever its size
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
            for r in requests
        ]
'''

PLAN = textwrap.dedent("""\
    name: sleeper
    repository: {path: repo, build: false}
    capacity: {duration_s: 2.5, warmup_s: 0.5, start_rps: 15, max_probes: 8}
    defaults: {duration_s: 3, warmup_s: 0.5, slo_ms: 800}
    models:
      sleeper: {}
    loads:
      curve:
        arrival: {kind: constant, rate_rps: 1x}
        sweep: {rate_rps: [0.5x, 1.5x]}
    experiments:
      - name: curve
        models: [sleeper]
        variants: [whole]
        loads: [curve]
    """)


def build_sleeper_repository(repository):
    """The sleeper model and its manifest entry."""
    (repository / "sleeper" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "sleeper" / "1" / "model.py").write_text(SLEEPER_MODEL)
    write_model_config(repository / "sleeper", python_model_config(
        "sleeper", max_batch_size=MAX_BATCH, inputs=[TensorConfig("x", "float32", [4])],
        outputs=[TensorConfig("y", "float32", [4])], dynamic_batching=DynamicBatching(max_queue_delay_us=0)))
    manifest = {
        "schema_version": 1,
        "target": "embedded",
        "models": {
            "sleeper": {
                "family": "onnx", "size": None, "max_batch_size": MAX_BATCH,
                "variants": {"whole": "sleeper"},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                "sequence": None, "stages": [],
            }
        },
    }  # fmt: skip
    (repository / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.server
@pytest.mark.slow
def test_capacity_search_finds_a_known_capacity_then_relative_loads_use_it(tmp_path):
    build_sleeper_repository(tmp_path / "repo")
    (tmp_path / "plan.yaml").write_text(PLAN)
    plan = parse_plan(PLAN, str(tmp_path / "plan.yaml"))
    run_dir = runner.characterize(plan, runner.RunOptions(out_dir=tmp_path / "run", progress=False))

    entry = read_capacity(run_dir)["models"]["sleeper"]["whole"]
    assert entry["limited_by"] == "server", entry
    assert abs(entry["sustained_rps"] - CAPACITY_RPS) <= 0.1 * CAPACITY_RPS, entry
    assert len(entry["probes"]) <= 8 and entry["slo_ms"] == 800 and entry["percentile"] == 99

    points = read_points(run_dir)
    assert [p["status"] for p in points] == ["ok", "ok"], [p.get("error") for p in points]
    below, past = sorted(points, key=lambda p: p["load"]["multiple"])
    for point, multiple in ((below, 0.5), (past, 1.5)):
        assert point["load"] == {
            "rate_rps": pytest.approx(multiple * entry["sustained_rps"], abs=0.01),
            "multiple": multiple,
            "capacity_rps": pytest.approx(entry["sustained_rps"], abs=0.01),
        }
        assert point["point"]["arrival"]["rate_rps"] == point["load"]["rate_rps"]
        assert len(point["subwindows"]) >= 3
    assert below["stable"], below["unstable_reason"]
    assert not past["stable"] and past["backlog_growth_per_s"] > 0
    assert past["achieved_rps"] <= 1.1 * CAPACITY_RPS
    assert (run_dir / "report.html").is_file() and (run_dir / "run.log").is_file()


@pytest.mark.server
def test_capacity_command_writes_capacity_json_with_bounded_probes(tmp_path, capsys):
    from stagebatch.cli import main

    build_sleeper_repository(tmp_path / "repo")
    fast = PLAN.replace(
        "capacity: {duration_s: 2.5, warmup_s: 0.5, start_rps: 15, max_probes: 8}",
        "capacity: {duration_s: 1.0, warmup_s: 0.2, start_rps: 10, max_probes: 2}",
    )
    (tmp_path / "plan.yaml").write_text(fast)
    assert main(["capacity", "--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "cap")]) == 0
    out = capsys.readouterr().out
    entry = read_capacity(tmp_path / "cap")["models"]["sleeper"]["whole"]
    assert len(entry["probes"]) == 2 and entry["probes"][0]["rate_rps"] == 10
    assert entry["probes"][1]["rate_rps"] == 30  # x3 after a sustained probe
    assert entry["probes"][0]["stable"] and entry["sustained_rps"] >= 10
    assert "sleeper whole: sustained" in out and "capacity.json" in out
    assert main(["capacity", "--plan", str(tmp_path / "plan.yaml"), "--variants", "bogus"]) == 1
