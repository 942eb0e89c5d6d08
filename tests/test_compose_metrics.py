"""The Grafana dashboard queries metrics that Triton and the reorchestrator really export.

A tiny repository with all three variants (whole, ensemble, reorch) is built and served by the
embedded Triton (the same 2.51.0 as the compose image); after a few requests through each
variant, every metric name and label the dashboard uses must appear on the live ``/metrics``.
GPU metrics cannot appear on this machine: those names are checked against the list Triton
2.51.0 documents (docs/user_guide/metrics.md of the server's v2.51.0 tag).
"""

from __future__ import annotations

import json
import queue
import re
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_compose_server import build_tiny_lstm_repository

from core.manifest import read_manifest
from core.server import EmbeddedTriton

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "docker" / "grafana" / "dashboards"
# Triton 2.51.0's GPU metric families (docs/user_guide/metrics.md at tag v2.51.0); label gpu_uuid.
TRITON_GPU_METRICS = {
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
}
_METRIC_NAME = re.compile(r"\b((?:nv|stagebatch)_[a-z0-9_]+)\b")
_GROUPING = re.compile(r"\bby \(([^)]*)\)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, query expression, legend format) of every panel target."""
    queries = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append((path.name, target["expr"], target.get("legendFormat", "")))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                queries.append((path.name, variable["definition"], ""))
    return queries


def parse_exposition(text: str) -> dict[str, set[str]]:
    """Metric family name -> label names seen, from Prometheus text exposition."""
    families: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest.split("}")[0])) if rest else set()
            families.setdefault(name.split()[0], set()).update(labels)
    return families


@pytest.fixture(scope="module")
def served_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    repository = build_tiny_lstm_repository(tmp_path_factory.mktemp("metrics-repository"))
    variants = read_manifest(repository).model("lstm").variants
    assert set(variants) == {"whole", "ensemble", "reorch"}, variants
    with EmbeddedTriton(repository) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tokens = np.random.default_rng(0).integers(0, 100, size=(1, 8), dtype=np.int64)

        def request() -> list[grpcclient.InferInput]:
            tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
            tensor.set_data_from_numpy(tokens)
            return [tensor]

        for name in (variants["whole"], variants["ensemble"]):
            for _ in range(3):
                client.infer(name, request())
        # The reorchestrator is decoupled: gRPC streaming only.
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), responses))
        try:
            for index in range(4):
                client.async_stream_infer(variants["reorch"], request(), request_id=str(index))
            for _ in range(4):
                result, error = responses.get(timeout=60)
                assert error is None, error
        finally:
            client.stop_stream()
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:  # noqa: S310 (loopback)
            return parse_exposition(response.read().decode())


def test_dashboard_has_queries_for_every_area() -> None:
    names = {name for _, expr, _ in dashboard_queries() for name in _METRIC_NAME.findall(expr)}
    # queue time, compute time, batch sizes, and the reorchestrator's operations
    assert {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_count", "nv_inference_exec_count", "stagebatch_reorch_operations_total"} <= names


def test_dashboard_metric_names_exist_on_a_live_server(served_metrics: dict[str, set[str]]) -> None:
    missing = []
    for dashboard, expr, _ in dashboard_queries():
        for name in _METRIC_NAME.findall(expr):
            if name in TRITON_GPU_METRICS:
                continue
            if name not in served_metrics:
                missing.append(f"{dashboard}: {name} (in {expr})")
    assert not missing, "\n".join(missing)


def test_dashboard_gpu_metrics_are_triton_251_names() -> None:
    gpu_names = {name for _, expr, _ in dashboard_queries() for name in _METRIC_NAME.findall(expr)
                 if name.startswith(("nv_gpu_", "nv_energy"))}
    assert gpu_names and gpu_names <= TRITON_GPU_METRICS


def test_dashboard_labels_exist_on_the_metrics_they_group(served_metrics: dict[str, set[str]]) -> None:
    problems = []
    for dashboard, expr, legend in dashboard_queries():
        names = [name for name in _METRIC_NAME.findall(expr) if name not in TRITON_GPU_METRICS]
        if not names:
            continue
        wanted = set(_LEGEND_LABEL.findall(legend))
        for grouping in _GROUPING.findall(expr):
            wanted |= {label.strip() for label in grouping.split(",") if label.strip()}
        for name in names:
            absent = wanted - served_metrics.get(name, set())
            if absent:
                problems.append(f"{dashboard}: {name} has no label(s) {sorted(absent)} (in {expr})")
    assert not problems, "\n".join(problems)
