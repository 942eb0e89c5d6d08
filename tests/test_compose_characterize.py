"""docs/gpu.md's characterization recipe, shrunk: `stagebatch characterize --url` against a Triton
started with docker-compose.yml's exact flags, the admin key given only through $STAGEBATCH_ADMIN_KEY.

The plan is docker/full-gpu.yaml with its repository pointed at a tiny build, its points cut down
to a few short ones, and the embedded target (this machine's Triton has no onnxruntime backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_compose_server import ADMIN_KEY, build_tiny_lstm_repository, start_compose_triton

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]


def small_gpu_plan(repository: Path, path: Path) -> Path:
    plan = yaml.safe_load((ROOT / "docker" / "full-gpu.yaml").read_text())
    assert plan["repository"]["build"] is False
    plan["repository"].update(path=str(repository), target="embedded", size="tiny", max_batch_size=16)
    plan["defaults"].update(duration_s=1.5, warmup_s=0.5)
    plan["models"] = {"lstm": {"lengths": {"kind": "uniform", "min_length": 2, "max_length": 16}, "slo_ms": 500}}
    plan["loads"] = {"poisson": {"arrival": {"kind": "poisson", "rate_rps": 20}}}
    by_name = {experiment["name"]: experiment for experiment in plan["experiments"]}
    variants = dict(by_name["variants"], models=["lstm"], variants=["whole", "reorch"], loads=["poisson"], repeats=1)
    batching = dict(by_name["request_batching"], models=["lstm"], variants=["whole"], loads=["poisson"],
                    batching={"max_queue_delay_us": [2000]})
    plan["experiments"] = [variants, batching]
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lstm_repository(tmp_path_factory.mktemp("characterize-repository"))


def read_points(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "points.jsonl").read_text().splitlines()]


def characterize(plan: Path, out: Path, ports: dict[str, int], key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STAGEBATCH_ADMIN_KEY"}
    if key is not None:
        env["STAGEBATCH_ADMIN_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "stagebatch.cli", "characterize", "--plan", str(plan), "--out", str(out),
         "--url", f"127.0.0.1:{ports['grpc']}", "--metrics-url", f"http://127.0.0.1:{ports['metrics']}/metrics",
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )


def test_characterize_url_against_the_composed_server(tiny_repository: Path, tmp_path: Path) -> None:
    plan = small_gpu_plan(tiny_repository, tmp_path / "plan.yaml")
    with start_compose_triton(tiny_repository, tmp_path / "server") as ports:
        # Without the key every reload is refused; the runner records each point as failed.
        refused = characterize(plan, tmp_path / "refused", ports, key=None)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "3 of 3 points failed" in refused.stderr
        failed = read_points(tmp_path / "refused")
        assert [point["status"] for point in failed] == ["failed"] * 3
        assert all("restricted" in point["error"] for point in failed)

        done = characterize(plan, tmp_path / "run", ports, key=ADMIN_KEY)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    points = read_points(tmp_path / "run")
    # whole, reorch, whole with a 2 ms queue delay
    assert [point["point"]["variant"] for point in points] == ["whole", "reorch", "whole"]
    assert [point["status"] for point in points] == ["ok"] * 3, [point.get("error") for point in points]
    for point in points:
        assert point["client"]["requests"] > 0 and point["client"]["errors"] == 0, point["client"]
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "report.md").is_file()
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["server"] == f"127.0.0.1:{ports['grpc']}"
