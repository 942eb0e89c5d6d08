"""Memory for one Triton pod, estimated from a built repository (its manifest and model configs).

    python deploy/kubernetes/size_resources.py REPOSITORY

prints the ``resources`` block for the Triton container of deploy/kubernetes (overlays/cpu for an
``embedded`` repository, overlays/gpu for a ``gpu`` one) and the GPU memory the models need. How the
estimate is made (docs/kubernetes.md, "Resource requests"):

- every model instance holds its ONNX weights twice (the session's initializers and its arena); a
  reorch model loads every stage of its model;
- every Python-backend instance (every model of an ``embedded`` repository, the reorch models of a
  ``gpu`` one) is one stub process: ``PYTHON_STUB_MIB`` of its own (measured: about 28 MiB unique to
  a stub of the tiny models, 80 MiB resident with the shared libraries) plus its shared-memory
  region in /dev/shm (a memory-backed volume, so it counts against the pod's memory);
- the server itself: ``SERVER_MIB``; on a GPU every process that opens a CUDA context (the server
  and each reorch stub) adds ``CUDA_CONTEXT_MIB`` of host memory for the context and the CUDA,
  cuBLAS and cuDNN libraries it maps (not measured here: no GPU; a generous figure).

The request is the estimate rounded up to 256 MiB; the limit twice that. CPU is a choice, not an
estimate: the cores the embedded server's onnxruntime sessions may use (overlays/cpu requests 2).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from core.errors import StagebatchError
from core.model_config import read_model_config
from core.manifest import read_manifest

MIB = 2**20
SERVER_MIB = 256
PYTHON_STUB_MIB = 64
CUDA_CONTEXT_MIB = 1024
WEIGHT_COPIES = 2
# Python backend shared memory per stub: Triton's default (the embedded server) and the
# --backend-config=python,shm-default-byte-size of docker-compose.yml (overlays/gpu).
SHM_MIB = {"embedded": 1, "gpu": 16}
ROUND_MIB = 256


def weights_bytes(directory: Path) -> int:
    """Bytes of the ONNX files (and external data) under a model's version folder."""
    return sum(path.stat().st_size for pattern in ("*.onnx", "*.onnx.data") for path in directory.rglob(pattern))


def estimate(repository: Path) -> dict[str, float]:
    """Host memory (MiB) of one pod serving every model of ``repository``, and GPU memory (MiB)."""
    manifest = read_manifest(repository)
    target = manifest.target
    host_mib, gpu_mib = float(SERVER_MIB), 0.0
    if target == "gpu":
        host_mib += CUDA_CONTEXT_MIB
    for entry in manifest.models.values():
        stage_bytes = sum((repository / stage.onnx).stat().st_size for stage in entry.stages)
        names = dict(entry.variants)
        names.update({f"stage{stage.index}": stage.model_name for stage in entry.stages})
        for variant, name in names.items():
            config = read_model_config(repository / name / "config.pbtxt")
            if config.get("platform") == "ensemble":
                continue
            instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [{}]))
            model_bytes = stage_bytes if variant == "reorch" else weights_bytes(repository / name)
            model_mib = instances * WEIGHT_COPIES * model_bytes / MIB
            python = config.get("backend") == "python"
            if python:
                host_mib += instances * (PYTHON_STUB_MIB + SHM_MIB[target])
            if target == "gpu":
                gpu_mib += model_mib
                if python:
                    host_mib += instances * CUDA_CONTEXT_MIB
            else:
                host_mib += model_mib
    return {"host_mib": host_mib, "gpu_mib": gpu_mib, "target": target}


def resources_yaml(sizes: dict) -> str:
    request_mib = math.ceil(sizes["host_mib"] / ROUND_MIB) * ROUND_MIB
    gpu = sizes["target"] == "gpu"
    lines = [
        f"# {sizes['target']} repository: about {sizes['host_mib']:.0f} MiB of host memory per Triton pod"
        + (f", {sizes['gpu_mib']:.0f} MiB of model weights on the GPU (plus CUDA contexts and activations)"
           if gpu else ""),
        "resources:",
        f"  requests: {{cpu: \"{4 if gpu else 2}\", memory: {request_mib}Mi"
        + (", nvidia.com/gpu: 1}" if gpu else "}"),
        f"  limits: {{memory: {2 * request_mib}Mi" + (", nvidia.com/gpu: 1}" if gpu else "}"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("repository", type=Path, help="a repository built by `stagebatch build`")
    args = parser.parse_args(argv)
    try:
        print(resources_yaml(estimate(args.repository)))
    except StagebatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
