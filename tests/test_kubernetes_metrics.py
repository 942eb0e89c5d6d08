"""The metric names deploy/kubernetes scales and scrapes on exist on a live server's ``/metrics``.

The Prometheus adapter rule behind the autoscaling component's HPA reads Triton's metrics; they must
appear on a real Triton 2.51.0 (the embedded one: the same version as the NGC 24.10 image) after a
few requests, with the module-scoped server of tests/test_compose_metrics.py. The Grafana dashboard's
names are checked there, and tests/test_kubernetes_manifests.py shows that the ConfigMap is that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_compose_metrics import served_metrics  # noqa: F401 (the module-scoped server fixture)

pytestmark = pytest.mark.server

AUTOSCALING = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "components" / "autoscaling"
_SERIES = re.compile(r"\b(nv_[a-z0-9_]+)\s*\{")


def adapter_rules() -> list[dict]:
    return yaml.safe_load((AUTOSCALING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


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


def test_adapter_metrics_exist_on_a_live_server(served_metrics: dict[str, set[str]]) -> None:  # noqa: F811
    for rule in adapter_rules():
        for name in _SERIES.findall(rule["seriesQuery"] + rule["metricsQuery"]):
            assert name in served_metrics, f"{name} (Prometheus adapter rule) is not on a live /metrics"
            # The per-model series the rule sums over per pod.
            assert "model" in served_metrics[name], name
