"""docker/prometheus.yml and every Grafana dashboard query, run by a real Prometheus.

Where the ``prometheus`` and ``promtool`` binaries exist (Debian: ``apt-get install prometheus``),
``promtool`` checks the scrape config, and a Prometheus built from it (target swapped for the local
metrics port) scrapes a Triton started with the compose flags while requests flow through the
whole, ensemble and reorch variants. Every dashboard query, with Grafana's variables filled in,
must then parse and return data (GPU panels excepted: no GPU here). Skipped without the binaries.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from core.manifest import read_manifest
from core.server import find_free_port
from test_compose_metrics import TRITON_GPU_METRICS, dashboard_queries
from test_compose_server import build_tiny_lstm_repository, start_compose_triton

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                       reason="prometheus/promtool not installed (Debian: apt-get install prometheus)"),
]

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_INTERVAL_S = 1


def test_promtool_accepts_the_scrape_config() -> None:
    result = subprocess.run(["promtool", "check", "config", str(ROOT / "docker" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    """Fill in the dashboard's Grafana variables as Grafana would: all models, a rate window.

    A ``label_values(metric, label)`` variable query becomes ``count by (label) (metric)``, the
    PromQL that returns the same label values.
    """
    expr = re.sub(r"label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)", r"count by (\2) (\1)", expr)
    return expr.replace("$__rate_interval", f"{10 * SCRAPE_INTERVAL_S}s").replace('"$model"', '".*"')


def query(base_url: str, expr: str) -> dict:
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (loopback)
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # 400: the expression does not parse
        return json.loads(error.read())


def send_requests(grpc_url: str, variants: dict[str, str], seconds: float) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    rng = np.random.default_rng(0)

    def request() -> list[grpcclient.InferInput]:
        tokens = rng.integers(0, 100, size=(1, int(rng.integers(2, 16))), dtype=np.int64)
        tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
        tensor.set_data_from_numpy(tokens)
        return [tensor]

    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put(error), responses))
    sent = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            client.infer(variants["whole"], request())
            client.infer(variants["ensemble"], request())
            client.async_stream_infer(variants["reorch"], request(), request_id=str(sent))
            sent += 1
            time.sleep(0.02)
        errors = [responses.get(timeout=60) for _ in range(sent)]
        assert not any(errors), [e for e in errors if e][:3]
    finally:
        client.stop_stream()


def test_dashboard_queries_return_data_from_prometheus_scraping_triton(tmp_path: Path) -> None:
    repository = build_tiny_lstm_repository(tmp_path / "repository")
    variants = read_manifest(repository).model("lstm").variants

    with start_compose_triton(repository, tmp_path / "server") as ports:
        config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
        # Triton's job only: the supervisor sidecar (its own job) does not run here.
        job = next(job for job in config["scrape_configs"] if job["job_name"] == "triton")
        config["scrape_configs"] = [job]
        (group,) = job["static_configs"]
        assert group["targets"] == ["triton:8002"]
        group["targets"] = [f"127.0.0.1:{ports['metrics']}"]  # the compose service name, resolved locally
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        web_port = find_free_port()
        base_url = f"http://127.0.0.1:{web_port}"
        with open(tmp_path / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{web_port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            send_requests(f"127.0.0.1:{ports['grpc']}", variants, seconds=8)
            time.sleep(3 * SCRAPE_INTERVAL_S)
            targets = query(base_url, "up")
            assert targets["status"] == "success" and targets["data"]["result"], targets
            assert targets["data"]["result"][0]["value"][1] == "1", "Prometheus cannot scrape Triton"
            problems = []
            for dashboard, expr, _ in dashboard_queries():
                promql = grafana_to_promql(expr)
                answer = query(base_url, promql)
                if answer.get("status") != "success":
                    problems.append(f"{dashboard}: {promql}: {answer.get('error')}")
                elif not answer["data"]["result"] and not set(re.findall(r"\bnv_[a-z_]+", expr)) & TRITON_GPU_METRICS:
                    problems.append(f"{dashboard}: {promql}: no data")
            assert not problems, "\n".join(problems)
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(timeout=10)
