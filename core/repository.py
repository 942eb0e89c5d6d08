"""Lay out ONNX models in a Triton model repository, for the embedded server or the GPU image.

Target ``embedded``: a Python-backend model running ``backends/onnx_runner`` with onnxruntime
(the wheel's Triton has no onnxruntime backend). Target ``gpu``: Triton's own ``onnxruntime``
backend with GPU instances, as in the NGC image. Python models are self-contained: the
``backends`` package is copied into their version directory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigValidationError
from core.model_config import numpy_to_triton_dtype, string_parameters, write_model_config

if TYPE_CHECKING:
    import onnx

TARGETS = ("embedded", "gpu")
BACKENDS_PACKAGE = Path(__file__).resolve().parent.parent / "backends"
TIMEOUT_ACTIONS = ("REJECT", "DELAY")


@dataclass
class TensorConfig:
    """One model input or output as the repository needs it."""

    name: str
    dtype: str  # numpy dtype name
    dims: list[int]  # without the batch dim when max_batch_size > 0; -1 = dynamic
    sequence_axis: int | None = None  # axis in the full, batch-first shape
    pad_value: float = 0
    value_range: tuple[float, float] | None = None  # integer inputs: valid values [lo, hi)

    def to_config(self, *, ragged: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "data_type": numpy_to_triton_dtype(self.dtype), "dims": list(self.dims)}
        if ragged and self.sequence_axis is not None:
            # Requests of different lengths may share a batch: the runner pads them itself.
            entry["allow_ragged_batch"] = True
        return entry

    def runner_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.sequence_axis is not None:
            meta["sequence_axis"] = self.sequence_axis
            meta["pad_value"] = self.pad_value
        if self.value_range is not None:
            meta["value_range"] = list(self.value_range)
        return meta


@dataclass
class DynamicBatching:
    """Triton's dynamic batcher settings (``dynamic_batching`` in ``model_config.proto``)."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    priority_levels: int = 0
    default_priority_level: int = 0
    max_queue_size: int = 0
    default_timeout_us: int = 0
    timeout_action: str = "REJECT"
    allow_timeout_override: bool = False
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        for name in ("max_queue_delay_us", "priority_levels", "max_queue_size", "default_timeout_us"):
            if getattr(self, name) < 0:
                raise ConfigValidationError(f"dynamic batching: {name} must be >= 0, got {getattr(self, name)}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ConfigValidationError(f"dynamic batching: preferred batch sizes must be >= 1, got {self.preferred_batch_sizes}")
        if self.timeout_action not in TIMEOUT_ACTIONS:
            raise ConfigValidationError(f"dynamic batching: timeout_action must be one of {TIMEOUT_ACTIONS}, got {self.timeout_action!r}")
        if self.priority_levels and not 1 <= self.default_priority_level <= self.priority_levels:
            raise ConfigValidationError(
                f"dynamic batching: default_priority_level must be in [1, {self.priority_levels}], got {self.default_priority_level}"
            )

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
        if self.preferred_batch_sizes:
            config["preferred_batch_size"] = list(self.preferred_batch_sizes)
        if self.preserve_ordering:
            config["preserve_ordering"] = True
        if self.priority_levels:
            config["priority_levels"] = self.priority_levels
            config["default_priority_level"] = self.default_priority_level
        if self.max_queue_size or self.default_timeout_us or self.allow_timeout_override or self.timeout_action != "REJECT":
            config["default_queue_policy"] = {
                "timeout_action": self.timeout_action,
                "default_timeout_microseconds": self.default_timeout_us,
                "allow_timeout_override": self.allow_timeout_override,
                "max_queue_size": self.max_queue_size,
            }
        return config


def copy_backends_package(version_dir: Path) -> None:
    """Copy the ``backends`` package into ``version_dir`` so the model needs nothing installed but numpy/onnxruntime."""
    target = Path(version_dir) / "backends"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BACKENDS_PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def onnx_model_config(
    name: str,
    *,
    target: str,
    max_batch_size: int,
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
    dynamic_batching: DynamicBatching | None,
    instance_count: int = 1,
    intra_op_threads: int = 1,
) -> dict[str, Any]:
    """The model config (dict form) of an ONNX model for ``target``."""
    if target not in TARGETS:
        raise ConfigValidationError(f"target must be one of {TARGETS}, got {target!r}")
    if max_batch_size < 0:
        raise ConfigValidationError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if instance_count < 1:
        raise ConfigValidationError(f"instance_count must be >= 1, got {instance_count}")
    embedded = target == "embedded"
    config: dict[str, Any] = {
        "name": name,
        "max_batch_size": max_batch_size,
        "input": [tensor.to_config(ragged=embedded and max_batch_size > 0) for tensor in inputs],
        "output": [tensor.to_config() for tensor in outputs],
        "instance_group": [{"count": instance_count, "kind": "KIND_CPU" if embedded else "KIND_GPU"}],
    }
    if dynamic_batching is not None and max_batch_size > 0:
        config["dynamic_batching"] = dynamic_batching.to_config()
    if embedded:
        config["backend"] = "python"
        meta = {tensor.name: tensor.runner_meta() for tensor in [*inputs, *outputs] if tensor.runner_meta()}
        config["parameters"] = string_parameters(
            {"onnx_file": "model.onnx", "intra_op_threads": intra_op_threads, "tensor_meta": meta}
        )
    else:
        config["backend"] = "onnxruntime"
    return config


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
    onnx_path = version_dir / "model.onnx"
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
