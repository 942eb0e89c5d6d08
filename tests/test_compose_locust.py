"""The Locust services as composed (commands and environment from docker-compose.yml), run as a
headless master and two worker processes against a Triton started with the compose flags.

Only what cannot exist outside Docker changes: the gRPC address (``triton:8001`` -> the local
port), the master's address (``locust-master`` -> 127.0.0.1, on a free port) and the paths
(the tiny repository's manifest, a temporary records file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.server import find_free_port
from test_compose_config import load_compose
from test_compose_server import build_tiny_lstm_repository, start_compose_triton

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lstm_repository(tmp_path_factory.mktemp("locust-repository"))


def locust_command(command: list[str]) -> list[str]:
    assert command[0] == "locust"
    return [sys.executable, "-m", "locust", *command[1:]]


@pytest.mark.parametrize("variant", ["whole", "reorch"])
def test_headless_master_and_two_workers_as_composed(tiny_repository: Path, tmp_path: Path, variant: str) -> None:
    compose = load_compose({
        "LOCUST_HEADLESS": "true", "LOCUST_USERS": "4", "LOCUST_SPAWN_RATE": "4", "LOCUST_RUN_TIME": "9s",
        "LOCUST_EXPECT_WORKERS": "2", "STAGEBATCH_MODEL": "lstm", "STAGEBATCH_VARIANT": variant,
        "STAGEBATCH_LENGTHS": "uniform:min_length=2,max_length=16", "STAGEBATCH_DURATION_S": "3",
    })
    master, worker = compose["services"]["locust-master"], compose["services"]["locust-worker"]
    master_port = find_free_port()
    records = tmp_path / "records.jsonl"
    with start_compose_triton(tiny_repository, tmp_path / "server") as ports:
        master_env = {**os.environ, **{key: str(value) for key, value in master["environment"].items()}}
        master_env.update(STAGEBATCH_MANIFEST=str(tiny_repository / "manifest.json"), STAGEBATCH_RECORDS=str(records))
        master_args = [arg.replace("--host=triton:8001", f"--host=127.0.0.1:{ports['grpc']}") for arg in master["command"]]
        worker_args = [arg.replace("--master-host=locust-master", "--master-host=127.0.0.1") for arg in worker["command"]]
        assert master_args != master["command"] and worker_args != worker["command"]
        logs = [open(tmp_path / f"{name}.log", "w") for name in ("master", "worker0", "worker1")]  # noqa: SIM115
        try:
            processes = [subprocess.Popen(
                [*locust_command(master_args), "--master-bind-host=127.0.0.1", f"--master-bind-port={master_port}"],
                env=master_env, cwd=ROOT, stdout=logs[0], stderr=subprocess.STDOUT)]
            for log in logs[1:]:
                # Workers get no workload environment: the master sends them the plan.
                processes.append(subprocess.Popen([*locust_command(worker_args), f"--master-port={master_port}"],
                                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            try:
                codes = [process.wait(timeout=120) for process in processes]
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
        finally:
            for log in logs:
                log.close()
    master_log = (tmp_path / "master.log").read_text()
    assert codes == [0, 0, 0], master_log[-3000:]
    sent = [json.loads(line) for line in records.read_text().splitlines()]
    assert sent, master_log[-3000:]
    assert all(record["ok"] and record["variant"] == variant for record in sent), [r for r in sent if not r["ok"]][:3]
    # Both workers sent part of the load.
    assert len({record["request_id"].split("-")[0] for record in sent}) == 2
    if variant == "reorch":
        assert all(record["server"]["batch_sizes"] for record in sent)
