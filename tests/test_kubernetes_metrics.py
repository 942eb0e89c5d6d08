"""The cpu overlay's Triton command, run here: probes, the key file, and the metrics deploy/kubernetes uses.

One server for the module: the ``triton`` container's command line as ``kubectl kustomize
overlays/cpu`` renders it (``stagebatch serve ...``), on a tiny lstm repository built by the real
CLI, with only what a pod has and this machine must not: loopback instead of 0.0.0.0, free ports
instead of 8000-8002, and temporary files instead of the pod's volumes. On it: every probe path of
the manifest answers 200, the key file the supervisor sidecar reads unlocks the repository API, and
the metric names of the Prometheus adapter rule behind the autoscaling component's HPA are on
``/metrics`` (the path of the pod's scrape annotations) after a request. The Grafana dashboard's names
are checked in tests/test_compose_metrics.py, and tests/test_kubernetes_manifests.py shows that the
ConfigMap is that file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from test_compose_metrics import parse_exposition
from test_compose_server import build_tiny_lstm_repository, http
from test_kubernetes_manifests import container, find, needs_kubectl, render

from core import server as embedded

pytestmark = [pytest.mark.server, needs_kubectl]

ROOT = Path(__file__).resolve().parents[1]
AUTOSCALING = ROOT / "deploy" / "kubernetes" / "components" / "autoscaling"
_SERIES = re.compile(r"\b(nv_[a-z0-9_]+)\s*\{")


def adapter_rules() -> list[dict]:
    return yaml.safe_load((AUTOSCALING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


def triton_pod() -> tuple[dict, dict]:
    """(pod template metadata, triton container) of the cpu overlay."""
    template = find(render("overlays/cpu"), "Deployment", "stagebatch-triton")["spec"]["template"]
    return template["metadata"], container({"spec": {"template": template}}, "triton")


def local_command(command: list[str], repository: Path, workdir: Path, ports: dict[str, int]) -> list[str]:
    """The pod's command with loopback, free ports and local files in place of the pod's."""
    replacements = {
        "--repository": str(repository), "--host": "127.0.0.1", "--http-port": str(ports["http"]),
        "--grpc-port": str(ports["grpc"]), "--metrics-port": str(ports["metrics"]),
        "--admin-key-file": str(workdir / "admin-key"), "--log-file": str(workdir / "tritonserver.log"),
    }
    local = []
    for arg in command:
        name, _, _ = arg.partition("=")
        local.append(f"{name}={replacements[name]}" if name in replacements else arg)
    return local


@pytest.fixture(scope="module")
def cpu_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("kubernetes-cpu")
    repository = build_tiny_lstm_repository(workdir / "repository")
    metadata, triton = triton_pod()
    assert triton["command"][:2] == ["stagebatch", "serve"]
    ports = dict(zip(("http", "grpc", "metrics"), embedded.find_free_ports(3)))
    command = local_command(triton["command"], repository, workdir, ports)
    assert "--host=127.0.0.1" in command and f"--http-port={ports['http']}" in command
    (workdir / "admin-key").write_text(secrets.token_hex(16) + "\n")  # the mounted Secret's file
    with open(workdir / "serve.out", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stagebatch.cli", *command[1:]], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while http("GET", f"http://127.0.0.1:{ports['http']}/v2/health/ready") != 200:
            assert process.poll() is None, (workdir / "serve.out").read_text()[-3000:]
            assert time.monotonic() < deadline, (workdir / "serve.out").read_text()[-3000:]
            time.sleep(0.3)
        yield {"ports": ports, "workdir": workdir, "metadata": metadata, "triton": triton}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # what the kubelet sends; serve stops the server
        try:
            process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served_metrics(cpu_triton: dict) -> dict[str, set[str]]:
    """Metric families on the pod's scrape path after one request to the whole model."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{cpu_triton['ports']['grpc']}")
    tokens = np.random.default_rng(0).integers(0, 100, size=(1, 8), dtype=np.int64)
    tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    client.infer("lstm", [tensor])
    path = cpu_triton["metadata"]["annotations"]["prometheus.io/path"]
    port = cpu_triton["metadata"]["annotations"]["prometheus.io/port"]
    assert port == "8002"  # the pod's metrics port, here a free one
    url = f"http://127.0.0.1:{cpu_triton['ports']['metrics']}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        return parse_exposition(response.read().decode())


def test_probe_paths_answer_on_the_cpu_server(cpu_triton: dict) -> None:
    triton = cpu_triton["triton"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = triton[probe]["httpGet"]["path"]
        assert http("GET", f"http://127.0.0.1:{cpu_triton['ports']['http']}{path}") == 200, probe


def test_the_secrets_key_file_unlocks_the_repository_api(cpu_triton: dict) -> None:
    key = (cpu_triton["workdir"] / "admin-key").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    index = f"http://127.0.0.1:{cpu_triton['ports']['http']}/v2/repository/index"
    assert http("POST", index, body=b"{}") == 403
    assert http("POST", index, headers={embedded.ADMIN_HEADER: key}, body=b"{}") == 200


def test_hpa_reads_the_metric_the_adapter_serves() -> None:
    hpa = yaml.safe_load((AUTOSCALING / "hpa.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter_rules()}
    wanted = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"] if metric["type"] == "Pods"}
    assert wanted and wanted <= served


def test_adapter_rule_divides_queue_time_by_successful_requests() -> None:
    (rule,) = adapter_rules()
    names = _SERIES.findall(rule["metricsQuery"])
    assert names == ["nv_inference_queue_duration_us", "nv_inference_request_success"]
    assert _SERIES.findall(rule["seriesQuery"]) == ["nv_inference_queue_duration_us"]
    assert re.fullmatch(rule["name"]["matches"], names[0])


def test_adapter_metrics_exist_on_the_scrape_path(served_metrics: dict[str, set[str]]) -> None:
    for rule in adapter_rules():
        for name in _SERIES.findall(rule["seriesQuery"] + rule["metricsQuery"]):
            assert name in served_metrics, f"{name} (Prometheus adapter rule) is not on a live /metrics"
            # The per-model series the rule sums over per pod.
            assert "model" in served_metrics[name], name
