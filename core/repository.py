"""Lay out ONNX models in a Triton model repository, for the embedded server or the GPU image.

Folders and files only: the version folder, ``model.onnx`` and, for target ``embedded``, the
Python-backend glue ``backends/onnx_runner/model.py`` with the ``backends`` package copied beside
it (Python models are self-contained; the wheel's Triton has no onnxruntime backend). Target
``gpu`` serves ``model.onnx`` with Triton's own ``onnxruntime`` backend, as in the NGC image. The
``config.pbtxt`` content comes from :mod:`core.model_config`, the one config writer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from core.model_config import (
    ONNX_FILE,
    DynamicBatching,
    TensorConfig,
    onnx_model_config,
    write_model_config,
)

if TYPE_CHECKING:
    import onnx

BACKENDS_PACKAGE = Path(__file__).resolve().parent.parent / "backends"


def copy_backends_package(version_dir: Path) -> None:
    """Copy the ``backends`` package into ``version_dir`` so the model needs nothing installed but numpy/onnxruntime."""
    target = Path(version_dir) / "backends"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BACKENDS_PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def add_onnx_model(
    repository: Path,
    name: str,
    onnx_model: onnx.ModelProto | Path | str,
    *,
    target: str = "embedded",
    max_batch_size: int,
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
    dynamic_batching: DynamicBatching | None = None,
    instance_count: int = 1,
    intra_op_threads: int = 1,
) -> Path:
    """Write ``<repository>/<name>`` serving ``onnx_model``; returns the model directory."""
    config = onnx_model_config(
        name,
        target=target,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=DynamicBatching() if dynamic_batching is None else dynamic_batching,
        instance_count=instance_count,
        intra_op_threads=intra_op_threads,
    )
    model_dir = Path(repository) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / ONNX_FILE
    if isinstance(onnx_model, (str, Path)):
        shutil.copy2(onnx_model, onnx_path)
    else:
        import onnx

        onnx.save_model(onnx_model, str(onnx_path))
    if target == "embedded":
        copy_backends_package(version_dir)
        shutil.copy2(BACKENDS_PACKAGE / "onnx_runner" / "model.py", version_dir / "model.py")
    write_model_config(model_dir, config)
    return model_dir
