"""What a run ran on: hardware, software versions and the plan, for ``environment.json``."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path

from loadtest.plan import Plan
from core.server import TRITON_VERSION


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in (
        "stagebatch",
        "nvidia-pytriton",
        "tritonclient",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx",
        "numpy",
        "torch",
        "transformers",
        "locust",
        "gevent",
        "matplotlib",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_output(command: list[str], timeout_s: float, cwd: Path | None = None) -> str:
    """A command's stripped standard output, or "" when it cannot run or fails to answer in time."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def _gpu() -> str:
    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    return _command_output(query, timeout_s=10).replace("\n", "; ") or "none"


def _git_commit() -> str | None:
    return _command_output(["git", "rev-parse", "HEAD"], timeout_s=5, cwd=Path(__file__).parent) or None


def collect_environment(plan: Plan, plan_text: str, *, server: str, repository: Path) -> dict:
    """Hardware, software versions and the plan, for ``environment.json``."""
    import psutil

    hardware = {
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu(),
        "machine": platform.machine(),
        "os": platform.platform(),
    }
    software = {"python": platform.python_version(), "git_commit": _git_commit(), **_package_versions()}
    software["tritonserver (embedded)"] = TRITON_VERSION
    return {
        "plan": plan.to_dict(),
        "plan_source": plan.source,
        "plan_text": plan_text,
        "server": server,
        "repository": str(repository),
        "hardware": hardware,
        "software": software,
        "started_utc": utc_now(),
        "finished_utc": None,
        "argv": sys.argv,
    }


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


