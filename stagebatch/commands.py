"""The server-side commands: ``stagebatch serve`` and ``stagebatch doctor``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer


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
    startup_timeout_s: Annotated[float, typer.Option(help="Seconds to wait for the server and models.")] = 300.0,
) -> None:
    """Run the embedded Triton server on REPOSITORY until Ctrl-C or SIGTERM."""
    from rich.console import Console

    from stagebatch.server import ADMIN_HEADER, EmbeddedTriton

    console = Console(stderr=True)
    server = EmbeddedTriton(
        repository,
        models=model or None,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_path=log_file or Path(".stagebatch") / "tritonserver.log",
        startup_timeout_s=startup_timeout_s,
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


def doctor() -> None:
    """Report what the embedded-server launcher finds on this machine, and what is missing."""
    import importlib.metadata
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    from stagebatch.errors import StagebatchError
    from stagebatch.server import TRITON_VERSION, TritonDistribution

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
