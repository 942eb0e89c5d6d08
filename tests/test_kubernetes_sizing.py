"""deploy/kubernetes/size_resources.py: a Triton pod's memory estimated from a built repository."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_compose_server import build_tiny_lstm_repository

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "size_resources.py"
_spec = importlib.util.spec_from_file_location("size_resources", SCRIPT)
assert _spec is not None and _spec.loader is not None
size_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(size_resources)


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lstm_repository(tmp_path_factory.mktemp("sizing-repository"))


def test_estimate_counts_every_python_stub_and_the_weights_when_embedded(tiny_repository: Path) -> None:
    sizes = size_resources.estimate(tiny_repository)
    assert sizes["target"] == "embedded" and sizes["gpu_mib"] == 0
    # whole, stage0, stage1 and reorch are Python-backend models here; the ensemble is not.
    stubs = 4 * (size_resources.PYTHON_STUB_MIB + size_resources.SHM_MIB["embedded"])
    weights_mib = sizes["host_mib"] - size_resources.SERVER_MIB - stubs
    onnx_mib = sum(p.stat().st_size for p in tiny_repository.rglob("*.onnx")) / size_resources.MIB
    # whole + stages from their own files, the reorch model loads the stages again: two copies each.
    assert onnx_mib > 0
    assert weights_mib == pytest.approx(2 * (onnx_mib + sum(
        p.stat().st_size for p in tiny_repository.glob("lstm_stage*/**/*.onnx")) / size_resources.MIB))


def test_script_prints_a_resources_block_that_covers_the_estimate(tiny_repository: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), str(tiny_repository)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    resources = yaml.safe_load(result.stdout)["resources"]
    request_mib = int(resources["requests"]["memory"].removesuffix("Mi"))
    assert request_mib % size_resources.ROUND_MIB == 0
    assert request_mib >= size_resources.estimate(tiny_repository)["host_mib"]
    assert resources["limits"]["memory"] == f"{2 * request_mib}Mi"
    assert "nvidia.com/gpu" not in resources["requests"]


def test_script_explains_a_folder_without_a_manifest(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "manifest.json not found" in result.stderr and "stagebatch build" in result.stderr
