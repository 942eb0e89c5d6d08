"""docker-compose.yml's Triton command, run for real on the embedded tritonserver (the same 2.51.0).

There is no GPU or Docker here, but the NGC 24.10 image and the nvidia-pytriton wheel carry the
same server version, so the compose file's exact flags are run on the local binary: they must
parse, the server must become ready (the healthcheck's URL), inference must stay open and the
repository API must need the admin key, over both HTTP and gRPC.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from helpers import add_matmul
from core import server as embedded
from test_compose_config import load_compose

pytestmark = pytest.mark.server

ADMIN_KEY = "compose-test-key"


def build_tiny_lstm_repository(repository: Path) -> Path:
    """A tiny lstm repository (whole, 2 stages + ensemble, reorch) built by the real CLI."""
    root = Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "stagebatch.cli", "build", "--model=lstm", "--size=tiny", "--stages=2",
         "--balance=flops", f"--out={repository}"],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    return repository


def compose_triton_command(repository: Path, ports: dict[str, int], backend_directory: Path) -> list[str]:
    """The compose service's command with the container paths and ports swapped for local ones."""
    command = load_compose({"STAGEBATCH_ADMIN_KEY": ADMIN_KEY})["services"]["triton"]["command"]
    local = []
    for arg in command[1:]:
        if arg == "--model-repository=/models":
            arg = f"--model-repository={repository}"
        elif arg.startswith("--metrics-port="):
            arg = f"--metrics-port={ports['metrics']}"
        local.append(arg)
    # Only what differs from the container: loopback addresses, free ports, the wheel's backends.
    return [
        str(embedded.TritonDistribution.find().binary),
        *local,
        f"--backend-directory={backend_directory}",
        f"--http-port={ports['http']}",
        f"--grpc-port={ports['grpc']}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
    ]


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # not listening (yet)


@contextlib.contextmanager
def start_compose_triton(repository: Path, workdir: Path) -> Iterator[dict[str, int]]:
    """Run the compose service's tritonserver command on ``repository``; yields its local ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    distribution = embedded.TritonDistribution.find()
    backends = distribution.prepare_backend_directory(workdir / "backends")
    ports = dict(zip(("http", "grpc", "metrics"), embedded.find_free_ports(3)))
    command = compose_triton_command(repository, ports, backends)
    log_path = workdir / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=distribution.environment(), cwd=workdir, start_new_session=True,
        )
    try:
        ready_url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
        deadline = time.monotonic() + 120
        while http("GET", ready_url) != 200:
            assert process.poll() is None, f"tritonserver exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after 120 s: {log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        yield ports
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def compose_triton(tmp_path: Path):
    repository = tmp_path / "repository"
    repository.mkdir()
    weight = add_matmul(repository, "matmul")
    with start_compose_triton(repository, tmp_path) as ports:
        yield ports, weight, tmp_path / "tritonserver.log"


def test_compose_flags_serve_inference_and_guard_the_repository_api(compose_triton) -> None:
    ports, weight, _ = compose_triton
    base = f"http://127.0.0.1:{ports['http']}"
    header = {embedded.ADMIN_HEADER: ADMIN_KEY}

    # HTTP: the repository API needs the key; health does not (the compose healthcheck sends none).
    assert http("POST", f"{base}/v2/repository/index", body=b"{}") == 403
    assert http("POST", f"{base}/v2/repository/index", headers={embedded.ADMIN_HEADER: "wrong"}, body=b"{}") == 403
    assert http("POST", f"{base}/v2/repository/index", headers=header, body=b"{}") == 200
    assert http("GET", f"{base}/v2/health/ready") == 200

    # gRPC: the same key, under Triton's gRPC header prefix (as EmbeddedTriton.admin_headers sends it).
    grpc_header = {embedded.GRPC_HEADER_PREFIX + embedded.ADMIN_HEADER: ADMIN_KEY}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    index = client.get_model_repository_index(headers=grpc_header, as_json=True)
    assert [model["name"] for model in index["models"]] == ["matmul"]
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("matmul", headers=header)  # the HTTP spelling does not unlock gRPC
    assert client.is_model_ready("matmul")

    # Inference needs no key.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = grpcclient.InferInput("x", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    result = client.infer("matmul", [request])
    np.testing.assert_allclose(result.as_numpy("y"), x @ weight, rtol=1e-5)

    # The metrics port Prometheus scrapes answers, with the model's counters.
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=30) as response:  # noqa: S310
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="matmul",version="1"} 1' in metrics


def test_compose_python_backend_settings_reach_the_server(compose_triton) -> None:
    _, _, log_path = compose_triton
    # The Python backend takes the shared-memory settings (the backend table logs its config).
    python_rows = [line for line in log_path.read_text().splitlines() if line.startswith("| python ")]
    assert len(python_rows) == 1, python_rows
    assert '"shm-default-byte-size":"16777216"' in python_rows[0]
    assert '"shm-growth-byte-size":"16777216"' in python_rows[0]
