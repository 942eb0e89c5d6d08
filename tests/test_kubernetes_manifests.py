"""deploy/kubernetes, checked offline: no cluster is reachable from here.

Every kustomization renders with ``kubectl kustomize`` (the kustomize that ships with kubectl), every
rendered object validates against the OpenAPI schemas of a pinned Kubernetes version
(``kubernetes-validate``, offline, strict: unknown fields fail), and the deployment agrees with
docker-compose.yml: images, the Triton command and flags, ports, probe paths, the build, the Locust
commands and workload, and the Grafana dashboard. The command lines the pods run are parsed by the
project's own CLI (typer), so an option that does not exist fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from test_compose_config import load_compose

from core import server as embedded
from stagebatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "autoscaling")
# The Kubernetes versions the manifests are validated against (kubernetes-validate's offline schemas):
# the oldest that docs/kubernetes.md supports and a current one.
KUBERNETES_VERSIONS = ("1.25.0", "1.31.0")
# Kinds that no Kubernetes schema describes: custom resources, checked by their own tests below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "stagebatch.json"
SUPERVISOR_KEY_FILE = "/var/run/stagebatch/admin-key"

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (with its built-in kustomize) is not installed: the manifests cannot be rendered here",
)


@cache
def render(path: str) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize`` renders from a kustomization folder under deploy/kubernetes
    (or ``with-pvc/OVERLAY``: that overlay plus components/repository-pvc, as a user composes it)."""
    if path.startswith("with-pvc/"):
        folder = Path(tempfile.mkdtemp(prefix="stagebatch-kustomize-"))
        overlay, component = KUBERNETES / "overlays" / path.split("/", 1)[1], KUBERNETES / "components" / "repository-pvc"
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(overlay, folder)], "components": [os.path.relpath(component, folder)]}))
    else:
        folder = KUBERNETES / path
    result = subprocess.run(["kubectl", "kustomize", str(folder)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def find(objects: tuple[dict, ...], kind: str, name: str) -> dict:
    """The rendered object of a kind and name (generated ConfigMaps match by their name before the hash)."""
    for obj in objects:
        actual = obj["metadata"]["name"]
        if obj["kind"] == kind and (actual == name or actual.rsplit("-", 1)[0] == name):
            return obj
    raise AssertionError(f"no {kind} {name} among {[(o['kind'], o['metadata']['name']) for o in objects]}")


def container(deployment: dict, name: str, init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("initContainers" if init else "containers", [])
    return next(c for c in containers if c["name"] == name)


def config_data(objects: tuple[dict, ...], name: str) -> dict[str, str]:
    return find(objects, "ConfigMap", name)["data"]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command arguments from the container's environment."""
    expanded = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        expanded.append(arg)
    return expanded


def parse_cli(args: list[str]) -> Any:
    """Parse a ``stagebatch ...`` command line with the real CLI (its click context), without running it."""
    assert args[0] == "stagebatch", args
    command = typer.main.get_command(app).commands.get(args[1])  # type: ignore[attr-defined]
    if command is None:
        pytest.skip(f"`stagebatch {args[1]}` is not in this checkout's CLI yet (another branch adds it)")
    return command.make_context(args[1], list(args[2:]))


def compose_service(name: str) -> dict:
    return load_compose()["services"][name]


@needs_kubectl
@pytest.mark.parametrize("path", ["base", *(f"overlays/{name}" for name in OVERLAYS), "with-pvc/cpu", "with-pvc/gpu"])
def test_every_kustomization_renders_and_validates_against_kubernetes(path: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    objects = render(path)
    assert objects
    validated = 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        validated += 1
    assert validated >= 8


def test_every_overlay_folder_is_rendered_by_the_tests() -> None:
    folders = {path.name for path in (KUBERNETES / "overlays").iterdir() if (path / "kustomization.yaml").exists()}
    assert folders == set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("path", [*(f"overlays/{name}" for name in OVERLAYS), "with-pvc/cpu", "with-pvc/gpu"])
def test_images_are_the_compose_images(path: str) -> None:
    objects = render(path)
    compose = load_compose()["services"]
    images = {
        c["image"] for obj in objects if obj["kind"] in ("Deployment", "Job")
        for key in ("containers", "initContainers") for c in obj["spec"]["template"]["spec"].get(key, [])
    }
    cpu = path.endswith("/cpu")
    allowed = {compose["builder"]["image"], compose["locust-master"]["image"]}
    if not cpu:
        allowed.add(compose["triton"]["image"])
    assert images <= allowed, images - allowed
    triton = container(find(objects, "Deployment", "stagebatch-triton"), "triton")
    expected = compose["builder"]["image"] if cpu else compose["triton"]["image"]
    assert triton["image"] == expected
    # The compose Triton image is the NGC 24.10 server (the same 2.51.0 as the embedded binary).
    dockerfile = (ROOT / "docker" / "triton.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in dockerfile


@needs_kubectl
def test_gpu_triton_runs_the_compose_command_with_the_key_from_the_secret() -> None:
    objects = render("overlays/gpu")
    triton = container(find(objects, "Deployment", "stagebatch-triton"), "triton")
    key_source = next(e for e in triton["env"] if e["name"] == "STAGEBATCH_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
    assert key_source == {"name": "stagebatch-admin-key", "key": "admin-key"}
    compose_command = load_compose({"STAGEBATCH_ADMIN_KEY": "test-key"})["services"]["triton"]["command"]
    assert expand(triton["command"], {"STAGEBATCH_ADMIN_KEY": "test-key"}) == compose_command
    # The header name is the embedded server's.
    assert f"{embedded.ADMIN_HEADER}=$(STAGEBATCH_ADMIN_KEY)" in " ".join(triton["command"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_ports_and_probes_agree_with_compose(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    triton = container(find(objects, "Deployment", "stagebatch-triton"), "triton")
    ports = {port["name"]: port["containerPort"] for port in triton["ports"]}
    compose_ports = {int(str(entry).split(":")[-1]) for entry in compose_service("triton")["ports"]}
    assert set(ports.values()) == compose_ports
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert "--metrics-port=8002" in compose_service("triton")["command"]
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert "http://localhost:8000/v2/health/ready" in compose_service("triton")["healthcheck"]["test"]


@needs_kubectl
def test_cpu_triton_runs_the_embedded_server_on_the_fixed_ports() -> None:
    objects = render("overlays/cpu")
    triton = container(find(objects, "Deployment", "stagebatch-triton"), "triton")
    params = parse_cli(triton["command"]).params
    assert (params["host"], params["http_port"], params["grpc_port"], params["metrics_port"]) == (
        "0.0.0.0", 8000, 8001, 8002)
    assert str(params["repository"]) == "/models"
    # Every replica takes the Secret's key (the file the supervisor sidecar reads too).
    assert str(params["admin_key_file"]) == SUPERVISOR_KEY_FILE
    volumes = {v["name"]: v for v in find(objects, "Deployment", "stagebatch-triton")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["admin-key"]["secret"]["secretName"] == "stagebatch-admin-key"
    assert "nvidia.com/gpu" not in json.dumps(triton["resources"])


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "autoscaling"])
def test_gpu_triton_gets_one_gpu_and_the_compose_shared_memory(overlay: str) -> None:
    deployment = find(render(f"overlays/{overlay}"), "Deployment", "stagebatch-triton")
    triton = container(deployment, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert compose_service("triton")["shm_size"] == "2gb"
    assert volumes["admin-key"]["secret"]["secretName"] == "stagebatch-admin-key"
    # A rollout never needs a spare GPU.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_init_containers_build_what_the_overlay_serves(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    build_env = config_data(objects, "stagebatch-build")
    for deployment in ("stagebatch-triton", "stagebatch-locust-master"):
        build = container(find(objects, "Deployment", deployment), "build", init=True)
        assert build["envFrom"][0]["configMapRef"]["name"].startswith("stagebatch-build-")
        params = parse_cli(expand(build["command"], build_env)).params
        # FLOPs balancing: every pod cuts the models at the same tensors (measured would time each pod).
        assert params["balance"] == "flops"
        assert str(params["out"]) == "/models"
        assert params["target"] == ("embedded" if overlay == "cpu" else "gpu")
    if overlay != "cpu":
        # docker-compose.yml's builder, with its defaults from .env.example.
        compose_build = compose_service("builder")["command"]
        assert expand(build["command"], build_env) == compose_build


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_supervisor_sidecar_watches_its_own_server(overlay: str) -> None:
    deployment = find(render(f"overlays/{overlay}"), "Deployment", "stagebatch-triton")
    sidecar = container(deployment, "supervisor")
    script = sidecar["command"][-1]
    command = shlex.split(script.split("exec ", 1)[1])
    assert command == [
        "stagebatch", "supervise", "--url", "127.0.0.1:8001", "--http-url", "http://127.0.0.1:8000",
        "--key-file", SUPERVISOR_KEY_FILE, "--metrics-port", "9102", "--metrics-host", "0.0.0.0",
    ]
    assert sidecar["ports"] == [{"name": "supervisor", "containerPort": 9102}]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["admin-key"] + "/admin-key" == SUPERVISOR_KEY_FILE
    parse_cli(command)  # skipped until the supervise command is in this checkout


@needs_kubectl
def test_grpc_service_is_headless_and_http_metrics_service_is_plain() -> None:
    objects = render("overlays/cpu")
    grpc = find(objects, "Service", "stagebatch-triton-grpc")
    assert grpc["spec"]["clusterIP"] == "None"
    assert [(p["port"], p["targetPort"]) for p in grpc["spec"]["ports"]] == [(8001, "grpc")]
    plain = find(objects, "Service", "stagebatch-triton")
    assert "clusterIP" not in plain["spec"]
    assert {p["port"]: p["targetPort"] for p in plain["spec"]["ports"]} == {8000: "http", 8002: "metrics"}
    labels = find(objects, "Deployment", "stagebatch-triton")["spec"]["template"]["metadata"]["labels"]
    for service in (grpc, plain, find(objects, "Service", "stagebatch-supervisor")):
        assert service["spec"]["selector"].items() <= labels.items()


@needs_kubectl
def test_locust_runs_the_compose_commands_against_every_triton_replica() -> None:
    objects = render("overlays/cpu")
    master = container(find(objects, "Deployment", "stagebatch-locust-master"), "locust")
    worker = container(find(objects, "Deployment", "stagebatch-locust-worker"), "locust")
    compose_master = compose_service("locust-master")["command"]
    compose_worker = compose_service("locust-worker")["command"]
    assert master["command"][:-1] == [arg for arg in compose_master if not arg.startswith("--host=")]
    assert master["command"][-1] == "--host=dns:///stagebatch-triton-grpc.$(POD_NAMESPACE).svc.cluster.local:8001"
    assert worker["command"] == ["--master-host=stagebatch-locust-master" if arg.startswith("--master-host=")
                                 else arg for arg in compose_worker]
    master_service = find(objects, "Service", "stagebatch-locust-master")
    assert {p["port"] for p in master_service["spec"]["ports"]} == {8089, 5557}
    master_labels = find(objects, "Deployment", "stagebatch-locust-master")["spec"]["template"]["metadata"]["labels"]
    assert master_service["spec"]["selector"].items() <= master_labels.items()
    # Ready (so reachable through the Service) in headless runs too, when the web UI is off.
    assert master["readinessProbe"]["tcpSocket"] == {"port": "master"}
    # The same workload variables, with the same defaults, as the compose master.
    workload = config_data(objects, "stagebatch-workload")
    assert workload == {key: str(value) for key, value in compose_service("locust-master")["environment"].items()}
    assert workload["STAGEBATCH_MANIFEST"] == "/models/manifest.json"
    assert {m["mountPath"] for m in master["volumeMounts"]} >= {"/models", "/opt/stagebatch/results"}


@needs_kubectl
def test_grafana_dashboard_configmap_is_the_compose_dashboard() -> None:
    data = config_data(render("overlays/cpu"), "stagebatch-grafana-dashboards")
    assert data == {"stagebatch.json": DASHBOARD.read_text()}


@needs_kubectl
def test_prometheus_scrapes_triton_metrics_and_the_supervisor() -> None:
    objects = render("overlays/autoscaling")
    annotations = find(objects, "Deployment", "stagebatch-triton")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}
    supervisor = find(objects, "Service", "stagebatch-supervisor")["metadata"]["annotations"]
    assert supervisor["prometheus.io/port"] == "9102"
    monitor = find(objects, "ServiceMonitor", "stagebatch-triton")
    selected = [obj for obj in objects if obj["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= obj["metadata"].get("labels", {}).items()]
    port_names = {port["name"] for service in selected for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names, endpoint
        assert endpoint["path"] == "/metrics"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "supervisor"}


@needs_kubectl
def test_autoscaler_owns_the_triton_replica_count() -> None:
    objects = render("overlays/autoscaling")
    assert "replicas" not in find(objects, "Deployment", "stagebatch-triton")["spec"]
    hpa = find(objects, "HorizontalPodAutoscaler", "stagebatch-triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stagebatch-triton"}
    assert render("overlays/gpu") and "replicas" in find(render("overlays/gpu"), "Deployment", "stagebatch-triton")["spec"]


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_repository_pvc_component_builds_once_and_mounts_the_claim(overlay: str) -> None:
    objects = render(f"with-pvc/{overlay}")
    job = find(objects, "Job", "stagebatch-build")
    job_spec = job["spec"]["template"]["spec"]
    build_env = config_data(objects, "stagebatch-build")
    script = job_spec["containers"][0]["command"][-1]
    build_line = script.split("&&")[1]
    # The init containers' build, run once.
    init_build = container(find(render(f"overlays/{overlay}"), "Deployment", "stagebatch-triton"), "build", init=True)
    assert shlex.split(expand([build_line], build_env)[0]) == expand(init_build["command"], build_env)
    marker = script.split("&&")[-1].split()[-1]
    assert job_spec["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "stagebatch-models"}}]
    for name in ("stagebatch-triton", "stagebatch-locust-master"):
        spec = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["wait-for-repository"]
        assert marker in spec["initContainers"][0]["command"][-1]
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "stagebatch-models", "readOnly": True}}


def test_docs_name_only_paths_that_exist() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    paths = set(re.findall(r"\b((?:deploy/kubernetes|docker)/[\w./-]*\w)", text))
    assert "deploy/kubernetes/overlays/cpu" in paths
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, missing
