"""The supervisor against a real server: the `stagebatch supervise` sidecar, and the crash-loop limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from loadtest.tiny_models import build_repository  # the load generator's tiny models and manifest
from stagebatch.cli import main
from core.server import EmbeddedTriton, find_free_port
from core.supervisor import ModelSupervisor, SupervisorPolicy, stub_identity

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("supervised_repo")
    build_repository(repository)
    with EmbeddedTriton(repository, extra_args=("--exit-timeout-secs=5",)) as served:
        yield served


def kill_stub(server: EmbeddedTriton, model: str) -> None:
    for child in psutil.Process(server._process.pid).children():
        try:
            identity = stub_identity(child.cmdline())
        except psutil.Error:  # killed earlier: a zombie tritonserver never reaps
            continue
        if identity is not None and identity[0] == model:
            os.kill(child.pid, signal.SIGKILL)
            return
    raise AssertionError(f"no stub of {model!r}")


def infer_ident(server: EmbeddedTriton) -> str:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), np.float32))
    try:
        client.infer("ident", [x], client_timeout=10)
        return "ok"
    except Exception as error:  # noqa: BLE001
        return str(error)


def wait_until(predicate, timeout_s: float = 60.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return predicate()


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read().decode()
    except OSError:
        return ""


def test_supervise_command_reloads_a_model_whose_stub_died_and_counts_it(server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(server.admin_key + "\n")
    port = find_free_port()
    # No --server-pid: it finds the tritonserver serving --url among the machine's servers.
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "stagebatch.cli", "supervise", "--url", server.grpc_url, "--http-url", server.http_url,
         "--key-file", str(key_file), "--metrics-port", str(port), "--model", "ident"],
        stderr=subprocess.PIPE, text=True,
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        assert wait_until(lambda: scrape(metrics)), "the sidecar's metrics endpoint never answered"
        assert infer_ident(server) == "ok"
        kill_stub(server, "ident")
        assert "not healthy" in infer_ident(server)
        assert wait_until(lambda: infer_ident(server) == "ok"), "the model was never reloaded"
        assert wait_until(lambda: 'stagebatch_model_restarts_total{model="ident"} 1.0' in scrape(metrics))
    finally:
        sidecar.send_signal(signal.SIGTERM)
        _, log = sidecar.communicate(timeout=30)
    assert sidecar.returncode == 0, log
    assert "stub processes and health probes" in log
    restarts = [line for line in log.splitlines() if "'ident' restarted" in line]
    assert len(restarts) == 1 and "stub process ident_0_0 is gone" in restarts[0], log


def test_supervise_command_refuses_to_start_without_a_key(monkeypatch):
    monkeypatch.delenv("STAGEBATCH_ADMIN_KEY", raising=False)
    assert main(["supervise", "--url", "127.0.0.1:1"]) == 1


def test_supervisor_leaves_a_crash_looping_model_unloaded(server):
    supervisor = ModelSupervisor(server.grpc_url, admin_headers=server.admin_headers, server_pid=server._process.pid,
                                 models=["ident"], policy=SupervisorPolicy(poll_interval_s=0.2, max_restarts=1))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    supervisor.start()
    try:
        assert wait_until(lambda: "ident" in supervisor.logic.watched)
        kill_stub(server, "ident")
        assert wait_until(lambda: supervisor.restarts("ident") == 1 and infer_ident(server) == "ok")
        kill_stub(server, "ident")
        assert wait_until(lambda: supervisor.logic.gave_up("ident"))
        assert not client.is_model_ready("ident")
        assert "left unloaded" in supervisor.events[-1] and "crash loop" in supervisor.events[-1]
    finally:
        supervisor.stop()
        client.load_model("ident", headers=server.admin_headers)  # leave the server as we found it


def test_embedded_server_runs_its_supervisor_and_stops_it(tmp_path):
    build_repository(tmp_path)
    with EmbeddedTriton(tmp_path, models=["ident"], supervise=True, supervisor_metrics_port=0) as served:
        supervisor = served.supervisor
        assert supervisor is not None and supervisor._thread.is_alive()
        assert wait_until(lambda: "ident" in supervisor.logic.watched)
        assert "stagebatch_model_restarts_total" in scrape(supervisor.metrics_url)
    assert served.supervisor is None and supervisor._thread is None
    assert scrape(supervisor.metrics_url) == "", "the metrics endpoint outlived the server"
