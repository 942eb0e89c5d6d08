"""Embedded Triton Inference Server: the ``tritonserver`` binary from the nvidia-pytriton wheel.

We use the binary only, not PyTriton's Python API. This module finds the binary and its
libraries inside the installed wheel, prepares a backend directory holding the Python backend
and the stub that matches the running interpreter, and runs the server as a child process bound
to 127.0.0.1 with explicit model control. The repository, shared-memory and trace APIs are
restricted by a key generated per launch that only our own tools receive
(:attr:`EmbeddedTriton.admin_headers`); inference, health, metadata and statistics stay open.

Examples of use::

    with EmbeddedTriton("model_repository") as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        client.load_model("m", config=..., headers=server.admin_headers)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.errors import ServerStartError
from core.supervisor import ModelSupervisor, SupervisorPolicy

LOGGER = logging.getLogger(__name__)

TRITON_VERSION = "2.51.0"
ADMIN_HEADER = "stagebatch-admin-key"
# Triton's gRPC frontend expects restricted-protocol headers with this prefix; HTTP uses the bare name.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
# The APIs that change server state: only our own tools get the key for them.
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace")
SUPPORTED_STUB_VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the wheel's Triton live on this machine."""

    binary: Path
    libraries: Path  # nvidia_pytriton.libs: the binary's bundled shared libraries
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for the running Python
    python_libdir: Path  # libpythonX.Y.so of the interpreter the stub must embed
    python_bin: Path  # directory whose python3 the 3.11+ stub finds on PATH (our venv)

    @classmethod
    def find(cls) -> TritonDistribution:
        """Locate the binary, libraries and the stub matching this interpreter, or explain what is missing."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServerStartError(
                "nvidia-pytriton is not installed in this environment: run `bash scripts/setup.sh` "
                "(or `pip install nvidia-pytriton==0.7.0`)."
            )
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        root = package_dir / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if version not in SUPPORTED_STUB_VERSIONS:
            raise ServerStartError(
                f"Python {version} has no Triton Python-backend stub in nvidia-pytriton 0.7.0 "
                f"(supported: {', '.join(SUPPORTED_STUB_VERSIONS)})."
            )
        found = cls(
            binary=root / "bin" / "tritonserver",
            libraries=package_dir.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            python_libdir=Path(sysconfig.get_config_var("LIBDIR") or sys.base_prefix + "/lib"),
            python_bin=Path(sys.executable).parent,
        )
        missing = [str(path) for path in found.required_paths() if not path.exists()]
        if missing:
            raise ServerStartError(f"the nvidia-pytriton installation is incomplete; missing: {', '.join(missing)}")
        return found

    def required_paths(self) -> list[Path]:
        return [
            self.binary,
            self.libraries,
            self.python_backend / "libtriton_python.so",
            self.python_backend / "triton_python_backend_utils.py",
            self.stub,
        ]

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the server and its stubs.

        The 3.11+ stub initialises Python in isolated mode: it ignores PYTHONPATH and finds its
        prefix by looking for ``python3`` on PATH, so our interpreter's bin directory goes first.
        The interpreter's own libpython goes first on LD_LIBRARY_PATH so the stub does not pick a
        different system build of the same minor version.
        """
        env = dict(os.environ if base is None else base)
        library_path = [str(self.python_libdir), str(self.libraries)]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(library_path)
        env["PATH"] = f"{self.python_bin}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def prepare_backend_directory(self, directory: Path) -> Path:
        """Lay out ``<directory>/python`` with the backend library, its utils and the matching stub."""
        python_dir = directory / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in (
            self.python_backend / "libtriton_python.so",
            self.python_backend / "triton_python_backend_utils.py",
            self.stub,
        ):
            target = python_dir / source.name
            if not target.exists():
                shutil.copy2(source, target)
        return directory


def admin_grpc_headers(admin_key: str) -> dict[str, str]:
    """gRPC headers carrying ``admin_key`` (Triton wants the restricted-protocol header under its gRPC prefix)."""
    return {GRPC_HEADER_PREFIX + ADMIN_HEADER: admin_key}


def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago on ``host`` (all held open while chosen,
    so the operating system cannot hand out the same one twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host``."""
    return find_free_ports(1, host)[0]


def _die_with_parent() -> None:
    # The server must not outlive us, even if we are killed without a chance to clean up.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)'(?: version \d+)?: (.*)$")
_TABLE_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|?$")


def model_load_errors(log_text: str) -> dict[str, str]:
    """Each model's own load error, as the server logged it (``failed to load 'm' ...`` lines and the status table)."""
    errors: dict[str, str] = {}
    for line in log_text.splitlines():
        match = _LOAD_FAILURE.search(line) or _TABLE_ROW.search(line.strip())
        if match:
            name, message = match.group(1), match.group(2).strip()
            # Keep the first (most specific) message per model.
            errors.setdefault(name, message)
    return errors


@dataclass
class EmbeddedTriton:
    """A tritonserver child process serving ``repository``; a context manager.

    Args:
        repository: the model repository directory.
        models: models to load at start; ``None`` loads every model in the repository.
        host: address every endpoint binds to.
        grpc_port, http_port, metrics_port: ``None`` picks free ports.
        log_path: server log file; default: a file in a fresh temporary directory.
        startup_timeout_s: how long to wait for the server and all models to be ready.
        extra_args: more ``tritonserver`` arguments.
        supervise: run a :class:`~core.supervisor.ModelSupervisor` in a thread while the server
            runs: a model whose stub dies (or that fails its health probe) is reloaded.
        supervisor_policy: its timing and crash-loop limit (default: ``SupervisorPolicy()``).
        supervisor_metrics_port: its ``stagebatch_model_restarts_total`` endpoint (0: a free port;
            ``None``: none; :attr:`supervisor` counts restarts either way).
    """

    repository: Path | str
    models: list[str] | None = None
    host: str = "127.0.0.1"
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    log_path: Path | str | None = None
    startup_timeout_s: float = 180.0
    extra_args: tuple[str, ...] = ()
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))
    supervise: bool = False
    supervisor_policy: SupervisorPolicy | None = None
    supervisor_metrics_port: int | None = None

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.supervisor: ModelSupervisor | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workspace: tempfile.TemporaryDirectory[str] | None = None
        self._log_file = None

    # ---- endpoints ----
    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC headers that unlock the restricted repository, shared-memory and trace APIs."""
        return admin_grpc_headers(self.admin_key)

    @property
    def http_admin_headers(self) -> dict[str, str]:
        """The same key for the HTTP endpoints."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    # ---- lifecycle ----
    def command(self, distribution: TritonDistribution, backend_directory: Path) -> list[str]:
        restriction = f"{','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_HEADER}={self.admin_key}"
        args = [
            str(distribution.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backend_directory}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--grpc-restricted-protocol={restriction}",
            f"--http-restricted-api={restriction}",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        for name in ["*"] if self.models is None else self.models:
            args.append(f"--load-model={name}")
        return [*args, *self.extra_args]

    def start(self) -> EmbeddedTriton:
        """Start the server and wait until it and every model are ready."""
        if self._process is not None:
            raise ServerStartError("this EmbeddedTriton is already running")
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository {self.repository} does not exist or is not a directory")
        distribution = TritonDistribution.find()
        self._workspace = tempfile.TemporaryDirectory(prefix="stagebatch-triton-")
        workspace = Path(self._workspace.name)
        backend_directory = distribution.prepare_backend_directory(workspace / "backends")
        spare = iter(find_free_ports(3, self.host or "127.0.0.1"))
        self.grpc_port = self.grpc_port or next(spare)
        self.http_port = self.http_port or next(spare)
        self.metrics_port = self.metrics_port or next(spare)
        self.log_path = Path(self.log_path) if self.log_path else workspace / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        command = self.command(distribution, backend_directory)
        LOGGER.info("starting tritonserver: %s", " ".join(command).replace(self.admin_key, "***"))
        self._process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=distribution.environment(),
            cwd=workspace,
            start_new_session=True,  # its own process group: we stop the server and every stub together
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_until_ready()
            if self.supervise:
                self.supervisor = ModelSupervisor(
                    self.grpc_url, admin_headers=self.admin_headers, http_url=self.http_url,
                    server_pid=self._process.pid, policy=self.supervisor_policy,
                    metrics_port=self.supervisor_metrics_port, metrics_host=self._client_host,
                ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        ready_url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerStartError(self._failure_message(f"tritonserver exited with code {self._process.returncode}"))
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:  # noqa: S310 (loopback)
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            errors = model_load_errors(self.logs())
            if errors:
                raise ServerStartError(self._failure_message("a model failed to load"))
            time.sleep(0.2)
        raise ServerStartError(
            self._failure_message(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s")
        )

    def _failure_message(self, what: str) -> str:
        errors = model_load_errors(self.logs())
        if errors:
            details = "; ".join(f"model '{name}': {message}" for name, message in sorted(errors.items()))
            return f"{what}: {details} (server log: {self.log_path})"
        tail = " | ".join(line for line in self.logs().strip().splitlines()[-5:])
        return f"{what}; last log lines: {tail} (server log: {self.log_path})"

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) used so far by tritonserver and its backend stubs (its child
        processes): what serving costs, apart from the clients on the same machine. A stub that exited
        meanwhile no longer counts."""
        if self._process is None:
            return 0.0
        try:
            server = psutil.Process(self._process.pid)
            processes = [server, *server.children(recursive=True)]
        except psutil.Error:  # the server exited
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # exited meanwhile
                continue
            total += times.user + times.system
        return total

    def logs(self) -> str:
        """The server log so far."""
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        return Path(self.log_path).read_text(errors="replace")

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server: SIGINT, a timed wait, then SIGKILL of its whole process group (stubs included)."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                LOGGER.warning("tritonserver did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            # Stubs are in the same process group; make sure none outlives the server.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workspace is not None:
            # Keep the log when it lives in the workspace: copy it out first.
            if self.log_path is not None and Path(self.log_path).is_relative_to(self._workspace.name):
                kept = Path(tempfile.gettempdir()) / f"stagebatch-tritonserver-{os.getpid()}-{self.grpc_port}.log"
                with contextlib.suppress(OSError):
                    shutil.copy2(self.log_path, kept)
                    self.log_path = kept
            self._workspace.cleanup()
            self._workspace = None

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
