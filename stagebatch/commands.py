"""The server-side commands: ``stagebatch serve``, ``stagebatch supervise`` and ``stagebatch doctor``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from loadtest.characterization import ADMIN_KEY_ENV
from core.errors import BadParameterError, StagebatchError
from core.server import (
    ADMIN_HEADER,
    TRITON_VERSION,
    EmbeddedTriton,
    TritonDistribution,
    admin_grpc_headers,
)
from core.supervisor import ModelSupervisor, SupervisorPolicy


def serve(
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Model repository directory.")] = Path(
        "model_repository"
    ),
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port (default: a free port).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="HTTP port (default: a free port).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Metrics port (default: a free port).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless you mean to expose it.")] = "127.0.0.1",
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Load only these models (repeatable).")] = None,
    log_file: Annotated[
        Optional[Path], typer.Option(help="Server log file (default: .stagebatch/tritonserver.log).")
    ] = None,
    key_file: Annotated[
        Optional[Path], typer.Option(help="Write the admin key (repository API) to this file, mode 0600.")
    ] = None,
    admin_key_file: Annotated[
        Optional[Path], typer.Option(help="Take the admin key from this file (e.g. a mounted Secret, so that "
                                          "replicas share one key) instead of making a new one.")
    ] = None,
    startup_timeout_s: Annotated[float, typer.Option(help="Seconds to wait for the server and models.")] = 300.0,
    supervise: Annotated[bool, typer.Option(
        "--supervise/--no-supervise",
        help="Reload a model whose Python stub dies or that fails its health probe (3 restarts in 60 s at most).",
    )] = True,
    supervisor_metrics_port: Annotated[Optional[int], typer.Option(
        help="Port of the supervisor's stagebatch_model_restarts_total endpoint (default: a free port).")] = 0,
) -> None:
    """Run the embedded Triton server on REPOSITORY until Ctrl-C or SIGTERM."""
    from rich.console import Console


    console = Console(stderr=True)
    keys = {} if admin_key_file is None else {"admin_key": read_admin_key(admin_key_file)}
    server = EmbeddedTriton(
        repository,
        models=model or None,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_path=log_file or Path(".stagebatch") / "tritonserver.log",
        startup_timeout_s=startup_timeout_s,
        supervise=supervise,
        supervisor_metrics_port=supervisor_metrics_port,
        **keys,
    )
    stopping = False

    def request_stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with console.status(f"starting Triton {repository} ..."):
            server.start()
        if key_file is not None:
            key_file.touch(mode=0o600)
            key_file.write_text(server.admin_key + "\n")
        console.print(
            f"[green]ready[/green]  gRPC {server.grpc_url}   HTTP {server.http_url}   metrics {server.metrics_url}\n"
            f"log: {server.log_path}\n"
            f"repository API key: header '{ADMIN_HEADER}' "
            + (f"(written to {key_file})" if key_file else "(pass --key-file to save it)")
            + (f"\nsupervised: restarts counted at {server.supervisor.metrics_url}" if server.supervisor else "")
            + "\nCtrl-C stops the server."
        )
        while not stopping and server.is_alive():
            time.sleep(0.2)
        if not server.is_alive() and not stopping:
            console.print(f"[red]tritonserver exited unexpectedly[/red]; see {server.log_path}")
            raise typer.Exit(code=1)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("stopped")


def supervise(
    url: Annotated[str, typer.Option(help="Triton's gRPC address HOST:PORT.")] = "127.0.0.1:8001",
    http_url: Annotated[Optional[str], typer.Option(
        help="Triton's HTTP address (http://HOST:PORT); health probes then go over HTTP.")] = None,
    key_file: Annotated[Optional[Path], typer.Option(
        help="File holding the admin key of the repository API (default: $STAGEBATCH_ADMIN_KEY).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the stagebatch_model_restarts_total endpoint.")] = 9108,
    metrics_host: Annotated[str, typer.Option(
        help="Address of the metrics endpoint; 127.0.0.1 unless Prometheus scrapes it from elsewhere.")] = "127.0.0.1",
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="Supervise only these models (repeatable; default: every ready model).")] = None,
    server_pid: Annotated[Optional[int], typer.Option(
        help="The tritonserver process (default: the one this machine or PID namespace runs).")] = None,
    poll_interval_s: Annotated[float, typer.Option(help="Seconds between two looks at the server.")] = 0.5,
) -> None:
    """Watch a running Triton (a sidecar): reload a model whose Python stub died or that fails its health probe."""
    import logging
    import os


    if key_file is not None:
        if not key_file.is_file():
            raise BadParameterError(f"--key-file {key_file}: no such file; pass the file `stagebatch serve --key-file` wrote")
        key = key_file.read_text().strip()
    else:
        key = os.environ.get(ADMIN_KEY_ENV, "")
    if not key:
        raise BadParameterError(f"no admin key: pass --key-file F or set {ADMIN_KEY_ENV} (the repository API needs it)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    supervisor = ModelSupervisor(url, admin_headers=admin_grpc_headers(key), http_url=http_url, server_pid=server_pid,
                                 models=model, policy=SupervisorPolicy(poll_interval_s=poll_interval_s),
                                 metrics_port=metrics_port, metrics_host=metrics_host)
    stopping = False

    def request_stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    sees_processes = supervisor.stubs is not None and supervisor.stubs.live() is not None
    processes = "stub processes and health probes" if sees_processes else \
        "health probes only: the tritonserver process is not visible here (compose: share its PID namespace)"
    try:
        supervisor.start()
        logging.getLogger(__name__).info("supervising %s (%s); restarts counted at %s", url, processes,
                                         supervisor.metrics_url)
        while not stopping:
            time.sleep(0.2)
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def read_admin_key(path: Path) -> str:
    """The admin key stored in ``path`` (surrounding whitespace dropped); a clear error when there is none."""
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise BadParameterError(f"--admin-key-file {path}: cannot be read ({error.strerror})") from None
    if not key or any(character.isspace() for character in key):
        raise BadParameterError(f"--admin-key-file {path}: must hold one key (a single word), e.g. the output "
                                "of `python3 -c \"import secrets; print(secrets.token_hex(16))\"`")
    return key


def doctor() -> None:
    """Report what the embedded-server launcher finds on this machine, and what is missing."""
    import importlib.metadata
    import os
    import sys

    from rich.console import Console
    from rich.table import Table


    console = Console()
    table = Table("check", "status", "details", title="stagebatch doctor")
    problems = 0

    def row(check: str, ok: bool, details: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        table.add_row(check, "[green]ok[/green]" if ok else "[red]missing[/red]", details)

    row("python", sys.version_info >= (3, 10), f"{sys.version.split()[0]} at {sys.executable}")
    try:
        distribution = TritonDistribution.find()
        row("tritonserver binary", True, f"{distribution.binary} (Triton {TRITON_VERSION}, CPU)")
        row("python backend stub", True, str(distribution.stub))
        libpython = list(distribution.python_libdir.glob(f"libpython{sys.version_info.major}.{sys.version_info.minor}*.so*"))
        row(
            "libpython for the stub",
            bool(libpython),
            str(libpython[0]) if libpython else f"no shared libpython in {distribution.python_libdir}: "
            "the Python backend needs a Python built with --enable-shared",
        )
        python3 = distribution.python_bin / "python3"
        row("python3 on PATH for the stub", python3.exists(), f"{python3} (the stub finds its site-packages through it)")
    except StagebatchError as error:
        row("tritonserver (nvidia-pytriton)", False, str(error))
    for package, why in [
        ("tritonclient", "gRPC client"),
        ("onnx", "slicing"),
        ("onnxruntime", "runs ONNX models (CPU)"),
        ("onnxruntime-gpu", "runs ONNX models (GPU)"),
        ("torch", "exports the model zoo"),
        ("locust", "load generation"),
        ("matplotlib", "report plots"),
    ]:
        try:
            version = importlib.metadata.version(package)
            row(package, True, f"{version} ({why})")
        except importlib.metadata.PackageNotFoundError:
            optional = package in ("onnxruntime", "onnxruntime-gpu")
            table.add_row(package, "[yellow]absent[/yellow]" if optional else "[red]missing[/red]", why)
            problems += 0 if optional else 1
    installed = [p for p in ("onnxruntime", "onnxruntime-gpu") if _installed(importlib.metadata, p)]
    row(
        "one onnxruntime flavour",
        len(installed) == 1,
        f"installed: {', '.join(installed) or 'none'} (onnxruntime and onnxruntime-gpu overwrite each other; "
        "install exactly one: extra \\[cpu] or \\[gpu])",
    )
    row("cores", True, f"{os.cpu_count()} (on 2 cores stage pipelining cannot add parallelism)")
    console.print(table)
    if problems:
        console.print(f"[red]{problems} problem(s)[/red]: run `bash scripts/setup.sh` to (re)install the environment.")
        raise typer.Exit(code=1)
    console.print("[green]everything the embedded server needs is here[/green]")


def _installed(metadata, name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
