"""Host side: lay out ``NAME_reorch`` (the reorchestrator model) in a Triton model repository.

Called by the repository builder (``stagebatch build``) with the model's manifest entry; tests call
it with hand-written entries. Host-only (it lives in the core, not in ``backends/``, which is copied
into model folders and may import nothing of the host).

The model is NOT decoupled: ``execute`` returns ``None`` and the engine answers each request later
through its response sender (one response + FINAL flag). So unary gRPC, HTTP and gRPC streaming
clients can all call it, and Triton keeps handing new batches to the instance while earlier ones are
still inside (docs/reorch.md, measured on tritonserver 2.51).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import backends.reorch
from backends.reorch.policies import ReorchKnobs, StageContext, create_policy
from backends.reorch.spec import StagesSpec, TensorSpec
from core.errors import ConfigValidationError
from core.model_config import (
    STAGES_FILE,
    DynamicBatching,
    TensorConfig,
    check_target,
    reorch_knobs,
    reorch_model_config,
    write_model_config,
)
from core.repository import copy_backends_package

MODEL_GLUE = Path(backends.reorch.__file__).with_name("model.py")


def write_reorch_model(repository: Path | str, name: str, manifest_entry: Mapping[str, Any], *,
                       target: str = "embedded", max_batch_size: int, queue_delay_us: int, policy: str = "dva",
                       knobs: ReorchKnobs | Mapping[str, Any] | None = None,
                       extra_parameters: Mapping[str, Any] | None = None,
                       max_queue_size: int = 0, default_timeout_us: int = 0) -> Path:
    """Write ``<repository>/<NAME>_reorch`` for model ``name``; returns the model directory.

    ``manifest_entry`` is the model's entry of ``manifest.json`` (stage ONNX paths relative to the
    repository root). ``knobs`` default to ``ReorchKnobs()`` with ``max_batch_rows=max_batch_size``.
    ``extra_parameters`` are further config parameters of the glue (``cancel_poll_ms``,
    ``execution_provider``, ``repository_root``; see ``model.py``). ``max_queue_size`` and
    ``default_timeout_us`` are Triton's queue policy of the front batcher (0: none).
    """
    check_target(target)
    if max_batch_size < 1:
        raise ConfigValidationError(f"max_batch_size must be >= 1 for the reorchestrator, got {max_batch_size}")
    batching = DynamicBatching(max_queue_delay_us=queue_delay_us, max_queue_size=max_queue_size,
                               default_timeout_us=default_timeout_us)  # checks the values
    repository = Path(repository)
    spec = StagesSpec.from_manifest_entry(name, dict(manifest_entry))
    spec.max_batch_size = max_batch_size
    if knobs is None:
        knobs = ReorchKnobs(max_batch_rows=max_batch_size)
    elif not isinstance(knobs, ReorchKnobs):
        knobs = reorch_knobs({"max_batch_rows": max_batch_size, **dict(knobs)})
    else:
        knobs = dataclasses.replace(knobs)
    context = StageContext(len(spec.stages), spec.favoured_batch_sizes,
                           spec.max_length if spec.is_sequence else None)
    create_policy(policy, knobs, context)  # refuse a bad policy name now, not at model load
    for stage in spec.stages:
        if not (repository / stage.onnx).is_file():
            raise ConfigValidationError(f"stage {stage.index} of {name!r}: {repository / stage.onnx} does not exist "
                                        "(stage onnx paths are relative to the repository root)")
    model_name = dict(manifest_entry).get("variants", {}).get("reorch") or f"{name}_reorch"
    model_dir = repository / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    copy_backends_package(version_dir)
    shutil.copy2(MODEL_GLUE, version_dir / "model.py")
    (version_dir / STAGES_FILE).write_text(spec.to_json())
    write_model_config(model_dir, reorch_model_config(
        model_name, target=target, max_batch_size=max_batch_size, inputs=[_tensor_config(t) for t in spec.inputs],
        outputs=[_tensor_config(t) for t in spec.outputs], batching=batching, policy=policy, knobs=knobs,
        extra_parameters=extra_parameters))
    return model_dir


def _tensor_config(tensor: TensorSpec) -> TensorConfig:
    return TensorConfig(tensor.name, tensor.dtype.name, list(tensor.shape[1:]), sequence_axis=tensor.sequence_axis)
