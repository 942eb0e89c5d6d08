"""The Docker images' pins agree with the project's (pyproject.toml, the embedded server's version)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from core import server as embedded

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def find_python310() -> str | None:
    """A working python3.10 (pyenv shims exist even where the version is not selected)."""
    for candidate in (shutil.which("python3.10"), "/root/.pyenv/versions/3.10.13/bin/python3.10"):
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


PYTHON310 = find_python310()

# nvidia-pytriton release -> (the Triton server it embeds, the NGC container of that server, the ONNX
# Runtime version of that container's onnxruntime backend). Sources: PyTriton CHANGELOG ("Version of
# Triton Inference Server embedded in wheel: 2.51.0"), Triton build.py TRITON_VERSION_MAP
# {"2.51.0": ("24.10", ..., "1.19.2" ORT, ...)}.
PYTRITON_TO_TRITON = {"0.7.0": ("2.51.0", "24.10", "1.19.2")}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_requirements() -> dict[str, Requirement]:
    meta = project()
    requirements = [Requirement(spec) for spec in meta["dependencies"]]
    for extra in meta["optional-dependencies"].values():
        requirements += [Requirement(spec) for spec in extra]
    return {req.name: req for req in requirements}


def requirements_file(path: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def pinned_triton() -> tuple[str, str, str]:
    pytriton = project_requirements()["nvidia-pytriton"]
    (spec,) = pytriton.specifier
    assert spec.operator == "==", "nvidia-pytriton is pinned exactly: it decides the embedded server version"
    return PYTRITON_TO_TRITON[spec.version]


def test_triton_image_is_the_container_of_the_embedded_server() -> None:
    server_version, container, _ = pinned_triton()
    assert embedded.TRITON_VERSION == server_version
    froms = re.findall(r"^FROM (\S+)", (DOCKER / "triton.Dockerfile").read_text(), re.M)
    assert froms == [f"nvcr.io/nvidia/tritonserver:{container}-py3"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["triton"]["image"].endswith(f":{container}")


def test_triton_python_requirements_agree_with_pyproject() -> None:
    ours = project_requirements()
    _, _, ort_version = pinned_triton()
    pins = {req.name: req for req in requirements_file(DOCKER / "triton-requirements.txt")}
    assert set(pins) == {"numpy", "onnxruntime-gpu"}
    assert pins["numpy"].specifier == ours["numpy"].specifier
    (ort,) = pins["onnxruntime-gpu"].specifier
    assert ort.operator == "=="
    # The same ONNX Runtime as the image's onnxruntime backend (a CUDA 12 + cuDNN 9 build), and
    # allowed by the project's own `gpu` extra.
    assert ort.version == ort_version
    assert ours["onnxruntime-gpu"].specifier.contains(ort.version)
    # The image's Python is 3.10: the project must support it.
    assert SpecifierSet(project()["requires-python"]).contains("3.10")
    dockerfile = (DOCKER / "triton.Dockerfile").read_text()
    assert "triton-requirements.txt" in dockerfile and "check_triton_python.py" in dockerfile


def test_loadtest_image_requirements_agree_with_pyproject() -> None:
    ours = project_requirements()
    for req in requirements_file(DOCKER / "loadtest-requirements.txt"):
        assert req.name in ours, f"{req.name} is in the loadtest image but not a project dependency"
        assert req.specifier == ours[req.name].specifier, f"{req.name}: {req.specifier} != {ours[req.name].specifier}"
        assert req.extras <= ours[req.name].extras


def test_stagebatch_image_uses_a_supported_python_and_the_cpu_extra() -> None:
    dockerfile = (DOCKER / "stagebatch.Dockerfile").read_text()
    (base,) = re.findall(r"^FROM python:(\d+\.\d+)-slim AS base$", dockerfile, re.M)
    assert SpecifierSet(project()["requires-python"]).contains(base)
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)
    assert stages == ["base", "loadtest", "builder"]
    builder = dockerfile.split("AS builder", 1)[1]
    assert '".[cpu]"' in builder, "the builder installs the project with the onnxruntime CPU extra, not both"
    assert "onnxruntime-gpu" not in dockerfile
    ignored = (DOCKER / "stagebatch.Dockerfile.dockerignore").read_text().split()
    for heavy in (".venv", ".git", "model_repository", "model_repository_gpu", "results", ".env"):
        assert heavy in ignored, f"{heavy} must stay out of the build context"


def test_triton_python_check_rejects_an_environment_without_the_cuda_provider() -> None:
    # This test environment has the CPU onnxruntime wheel and Python 3.11: the build-time check
    # must refuse it, naming both problems.
    result = subprocess.run(
        [sys.executable, str(DOCKER / "check_triton_python.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "no CUDA provider" in result.stderr
    assert "3.10" in result.stderr


def test_triton_python_check_resolves_shared_libraries() -> None:
    sys.path.insert(0, str(DOCKER))
    sys.dont_write_bytecode, saved = True, sys.dont_write_bytecode
    try:
        import check_triton_python
    finally:
        sys.path.remove(str(DOCKER))
        sys.dont_write_bytecode = saved
    import onnxruntime

    state = next((Path(onnxruntime.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so"))
    assert check_triton_python.missing_libraries(str(state)) == []
    broken = Path(check_triton_python.__file__).parent / "does-not-exist.so"
    with pytest.raises(subprocess.CalledProcessError):
        check_triton_python.missing_libraries(str(broken))


@pytest.mark.skipif(PYTHON310 is None, reason="no working python3.10 here")
def test_triton_python_check_is_valid_python_310() -> None:
    # The check runs in the image's Python 3.10.
    path = DOCKER / "check_triton_python.py"
    result = subprocess.run(
        [PYTHON310, "-c", f"compile(open({str(path)!r}).read(), {str(path)!r}, 'exec')"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
