"""docker-compose.yml and the files it references, checked without a Docker engine.

This machine has neither a Docker engine nor the compose plugin, so the file is checked by reading
it: structure, every referenced path, ports, environment variables, the Triton command against the
embedded launcher's flags, and the Prometheus/Grafana wiring. ``docker compose config -q`` runs
too where the plugin exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core import server as embedded

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ escapes a dollar.
_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")
SECRETS = {"STAGEBATCH_ADMIN_KEY", "GRAFANA_ADMIN_PASSWORD"}
# Bind-mount sources that do not exist in a fresh checkout: the builder writes the GPU repository,
# Locust writes results. Docker creates a missing bind source as an empty directory.
GENERATED_SOURCES = {"./model_repository_gpu", "./results"}


def compose_text() -> str:
    return COMPOSE_FILE.read_text()


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution in one string value (the forms docker-compose.yml uses); a missing required one raises."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg
            return value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(substitute, text).replace("$$", "$")


def strings_in(tree: object) -> list[str]:
    """Every string value (and mapping key) of a parsed YAML document."""
    if isinstance(tree, dict):
        return [text for key, value in tree.items() for text in [*strings_in(key), *strings_in(value)]]
    if isinstance(tree, list):
        return [text for item in tree for text in strings_in(item)]
    return [tree] if isinstance(tree, str) else []


def interpolate_tree(tree: object, env: dict[str, str]) -> object:
    # Like compose: parse the YAML first, then substitute inside string values (comments never count,
    # and "${X:-false}" stays the string "false").
    if isinstance(tree, dict):
        return {key: interpolate_tree(value, env) for key, value in tree.items()}
    if isinstance(tree, list):
        return [interpolate_tree(item, env) for item in tree]
    return interpolate(tree, env) if isinstance(tree, str) else tree


def load_compose(env: dict[str, str] | None = None) -> dict:
    env = {**env_example(), "STAGEBATCH_ADMIN_KEY": "test-key", "GRAFANA_ADMIN_PASSWORD": "test-pw", **(env or {})}
    return interpolate_tree(yaml.safe_load(compose_text()), env)


def service(name: str) -> dict:
    return load_compose()["services"][name]


def host_ports(spec: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port in short syntax."""
    published = []
    for entry in spec.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) == 3, f"publish with an explicit host address: {entry!r}"
        published.append((parts[0], int(parts[1]), int(parts[2])))
    return published


def bind_mounts(spec: dict) -> list[tuple[str, str]]:
    mounts = []
    for entry in spec.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        mounts.append((source, target))
    return mounts


def test_compose_declares_the_services_of_the_deployment() -> None:
    services = load_compose()["services"]
    assert set(services) == {"triton", "supervisor", "builder", "locust-master", "locust-worker", "prometheus",
                             "grafana"}
    assert services["builder"]["profiles"] == ["build"], "the one-shot builder must not start with `up`"
    for name, spec in services.items():
        assert "image" in spec, f"service {name} names its image (so built images are reused, not pulled)"


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="the docker compose plugin is not installed here (no Docker engine on this machine)",
)
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    env = {"STAGEBATCH_ADMIN_KEY": "k", "GRAFANA_ADMIN_PASSWORD": "p", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "--profile", "build", "config", "-q"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_required_secrets_fail_loudly_when_missing() -> None:
    raw = yaml.safe_load(compose_text())
    with pytest.raises(KeyError, match="STAGEBATCH_ADMIN_KEY"):
        interpolate_tree(raw, {"GRAFANA_ADMIN_PASSWORD": "p"})
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate_tree(raw, {"STAGEBATCH_ADMIN_KEY": "k"})


def test_every_variable_is_documented_and_secrets_have_no_default() -> None:
    documented = env_example()
    used = {}
    for text in strings_in(yaml.safe_load(compose_text())):
        for match in _VARIABLE.finditer(text):
            used.setdefault(match.group("name"), set()).add(match.group("op"))
    assert used, "docker-compose.yml uses no variables: the regex is broken"
    for name, ops in used.items():
        assert name in documented, f"${{{name}}} is used in docker-compose.yml but not documented in .env.example"
        if name in SECRETS:
            assert ops == {":?"}, f"secret {name} must be required (${{{name}:?...}}), never defaulted"
            assert documented[name] == "", f".env.example must not carry a value for the secret {name}"
        else:
            assert ops <= {":-"}, f"{name} needs a default (${{{name}:-...}}): {ops}"
    unused = set(documented) - set(used)
    assert not unused, f".env.example documents variables docker-compose.yml does not use: {sorted(unused)}"


def test_build_contexts_dockerfiles_and_bind_mount_sources_exist() -> None:
    raw = yaml.safe_load(compose_text())
    compose = load_compose()
    for name, spec in compose["services"].items():
        if "build" in spec:
            context = ROOT / spec["build"]["context"]
            assert context.is_dir(), f"{name}: build context {context} is missing"
            dockerfile = context / spec["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} is missing"
            target = spec["build"].get("target")
            if target:
                assert re.search(rf"^FROM .+ AS {re.escape(target)}$", dockerfile.read_text(), re.M), (
                    f"{name}: {dockerfile.name} has no stage {target}"
                )
        for source, target in bind_mounts(spec):
            if source.startswith("."):
                path = ROOT / source
                assert path.exists() or source in GENERATED_SOURCES, f"{name}: mount source {source} is missing"
            else:
                assert source in raw["volumes"], f"{name}: named volume {source} is not declared"
            assert target.startswith("/"), f"{name}: mount target {target} is not absolute"


def test_published_ports_are_unique_and_bind_loopback_by_default() -> None:
    seen: dict[int, str] = {}
    for name, spec in load_compose()["services"].items():
        for address, host_port, _ in host_ports(spec):
            assert address == "127.0.0.1", f"{name} publishes {host_port} on {address}; the default must be loopback"
            assert host_port not in seen, f"host port {host_port} published by both {seen[host_port]} and {name}"
            seen[host_port] = name
    assert set(seen) == {8000, 8001, 8002, 8089, 5557, 9090, 3000}
    opened = load_compose({"STAGEBATCH_BIND_ADDRESS": "0.0.0.0"})
    assert {address for spec in opened["services"].values() for address, _, _ in host_ports(spec)} == {"0.0.0.0"}


def test_triton_command_matches_the_embedded_launcher() -> None:
    triton = service("triton")
    command = triton["command"]
    assert command[0] == "tritonserver"
    flags = command[1:]
    restriction = f"{','.join(embedded.RESTRICTED_PROTOCOLS)}:{embedded.ADMIN_HEADER}=test-key"
    assert f"--grpc-restricted-protocol={restriction}" in flags
    assert f"--http-restricted-api={restriction}" in flags
    for flag in ("--model-repository=/models", "--model-control-mode=explicit", "--load-model=*"):
        assert flag in flags
    assert ("/models" in {target for _, target in bind_mounts(triton)}), "the repository is mounted at /models"
    ports = {container for _, _, container in host_ports(triton)}
    assert ports == {8000, 8001, 8002}
    assert "--metrics-port=8002" in flags
    assert not any(flag.startswith(("--http-port", "--grpc-port")) and not flag.endswith(("8000", "8001")) for flag in flags)


def test_triton_reserves_a_gpu_and_shared_memory_and_checks_readiness() -> None:
    triton = service("triton")
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and "gpu" in devices[0]["capabilities"]
    assert not ("count" in devices[0] and "device_ids" in devices[0]), "count and device_ids exclude each other"
    assert devices[0]["device_ids"] == ["0"]
    size = re.fullmatch(r"(\d+)([kmg])b?", str(triton["shm_size"]).lower())
    assert size, triton["shm_size"]
    shm_bytes = int(size.group(1)) * {"k": 2**10, "m": 2**20, "g": 2**30}[size.group(2)]
    per_instance = next(
        int(flag.split("=")[-1]) for flag in triton["command"] if "shm-default-byte-size" in flag
    )
    assert shm_bytes >= 64 * per_instance, "room for at least 64 Python-backend instances' shared memory"
    test = triton["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "curl" and test[-1] == "http://localhost:8000/v2/health/ready"
    # health is not among the restricted APIs, so the check needs no key.
    assert "health" not in embedded.RESTRICTED_PROTOCOLS


def test_locust_services_reach_triton_over_grpc_and_the_master() -> None:
    compose = load_compose()
    master, worker = compose["services"]["locust-master"], compose["services"]["locust-worker"]
    assert master["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "--master" in master["command"] and "--worker" in worker["command"]
    assert "--host=triton:8001" in master["command"], "Locust targets Triton's gRPC port"
    assert "--master-host=locust-master" in worker["command"]
    assert "ports" not in worker, "workers publish nothing, so --scale locust-worker=N cannot clash"
    assert {container for _, _, container in host_ports(master)} == {8089, 5557}  # UI, workers
    for spec in (master, worker):
        locustfile = next(arg.split("=", 1)[1] for arg in spec["command"] if arg.startswith("--locustfile="))
        assert (ROOT / locustfile).is_file(), f"{locustfile} does not exist"
        assert spec["build"] == master["build"] and spec["image"] == master["image"]
    assert master["environment"]["LOCUST_HEADLESS"] == "false"


def test_prometheus_scrapes_the_triton_metrics_port() -> None:
    compose = load_compose()
    prometheus = compose["services"]["prometheus"]
    config_source = next(src for src, dst in bind_mounts(prometheus) if dst == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((ROOT / config_source).read_text())
    assert f"--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"triton", "supervisor"}
    for name, job in jobs.items():
        (target,) = [t for group in job["static_configs"] for t in group["targets"]]
        host, port = target.split(":")
        assert host == name and host in compose["services"]
        assert f"--metrics-port={port}" in compose["services"][host]["command"]
        assert job["metrics_path"] == "/metrics"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    compose = load_compose()
    grafana = compose["services"]["grafana"]
    mounts = dict((dst, src) for src, dst in bind_mounts(grafana))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert {container for _, _, container in host_ports(compose["services"]["prometheus"])} == {9090}
    providers = yaml.safe_load((provisioning / "dashboards" / "stagebatch.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_in_container = provider["options"]["path"]
    dashboards = ROOT / mounts[dashboards_in_container]
    files = sorted(dashboards.glob("*.json"))
    assert files, f"no dashboard JSON in {dashboards}"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_in_container + "/") and (dashboards / Path(home).name).is_file()
    for path in files:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == source["uid"], f"{path.name}: panel {panel['title']}"
            assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"])
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_supervisor_sidecar_watches_triton_and_shares_its_processes() -> None:
    compose = load_compose()
    sidecar, triton = compose["services"]["supervisor"], compose["services"]["triton"]
    assert sidecar["command"][:2] == ["stagebatch", "supervise"]
    assert "--url=triton:8001" in sidecar["command"] and "--http-url=http://triton:8000" in sidecar["command"]
    assert "--metrics-host=0.0.0.0" in sidecar["command"], "Prometheus scrapes it from its own container"
    assert sidecar["pid"] == "service:triton", "it must see the stub processes to notice a dead one"
    assert sidecar["environment"]["STAGEBATCH_ADMIN_KEY"] == "test-key", "the repository API needs the key"
    assert sidecar["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "ports" not in sidecar
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert sidecar["image"] == compose["services"]["locust-master"]["image"], "the stagebatch image has the CLI"
