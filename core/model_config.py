"""The one writer of Triton model configurations: every ``config.pbtxt`` and every overlay on one.

A configuration is a dict in the protobuf-JSON form of Triton's ``ModelConfig``
(``model_config.proto``; field names as in ``config.pbtxt``). This module is the only place that
knows those field names. It builds them from typed specs:

- :class:`TensorConfig` (one input or output), :class:`DynamicBatching` (the dynamic batcher and
  its default queue policy) and, for the reorchestrator, ``backends.reorch.policies.ReorchKnobs``
  (whose ``to_parameters`` is the one knob -> parameter mapping);
- the configs: :func:`onnx_model_config` (a whole model or one stage, ``embedded`` or ``gpu``
  target), :func:`ensemble_config`, :func:`reorch_model_config` and :func:`python_model_config`
  (hand-written Python-backend models of the tests and benches);
- the overlays the characterization applies to a config as built (:class:`BatchingOverlay`,
  :class:`ReorchOverlay`, :func:`variant_configs`).

Configs are validated with the ``model_config_pb2`` module shipped in tritonclient, so a typo in a
field name or an enum value is refused here, with the field named, rather than by the server at
load time. Folder layouts (version folders, ``model.py``, the ``backends`` package) are written by
``core.repository`` and ``core.reorch_deploy``; they take their configs from here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from backends.reorch.policies import ReorchKnobs
from backends.reorch.spec import RECORD_OUTPUT, TensorSpec
from core.errors import ConfigValidationError

CONFIG_FILE = "config.pbtxt"
TARGETS = ("embedded", "gpu")  # embedded: Python backend + onnxruntime on CPU; gpu: onnxruntime backend, KIND_GPU
TIMEOUT_ACTIONS = ("REJECT", "DELAY")
ONNX_FILE = "model.onnx"  # the ONNX file in a model's version folder
# onnxruntime's intra-op threads of a Python-backend model running onnxruntime (backends/onnx_runner and the
# reorchestrator, whose ReorchKnobs field of this name writes the same parameter); 0 = onnxruntime's default
THREADS_PARAMETER = "intra_op_threads"
STAGES_FILE = "stages.json"  # the reorchestrator's description of its stages, in its version folder


# ---------------------------------------------------------------- datatypes


def triton_wire_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"FP32"``, ``"object"`` -> ``"BYTES"``: the datatype names of the inference protocol.

    The mapping is tritonclient's own (``tritonclient.utils.np_to_triton_dtype``), so it cannot drift
    from what the clients send.
    """
    try:
        wire = np_to_triton_dtype(np.dtype(dtype))
    except TypeError:
        wire = None
    if wire is None:
        raise ConfigValidationError(
            f"dtype {dtype!r} has no Triton equivalent; use a numpy bool, integer, float16/32/64 or object dtype"
        )
    return wire


def numpy_to_triton_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"TYPE_FP32"``: the config form (Triton calls the wire's BYTES ``TYPE_STRING`` there)."""
    wire = triton_wire_dtype(dtype)
    return "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"


# ---------------------------------------------------------------- typed specs


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
        """The ``input``/``output`` entry; ``ragged``: requests of different lengths may share a batch."""
        entry: dict[str, Any] = {"name": self.name, "data_type": numpy_to_triton_dtype(self.dtype), "dims": list(self.dims)}
        if ragged and self.sequence_axis is not None:
            # Requests of different lengths may share a batch: the runner pads them itself.
            entry["allow_ragged_batch"] = True
        return entry

    def runner_meta(self) -> dict[str, Any]:
        """What ``backends/onnx_runner`` must know beyond the config entry (padding, valid values).

        The backends' own tensor description (``TensorSpec.to_dict``) without the datatype and shape,
        which the config entry already gives.
        """
        spec = TensorSpec(self.name, np.dtype(self.dtype), tuple(self.dims), sequence_axis=self.sequence_axis,
                          pad_value=self.pad_value, value_range=self.value_range)
        return {key: value for key, value in spec.to_dict().items() if key not in ("datatype", "shape")}


@dataclass
class DynamicBatching:
    """Triton's dynamic batcher settings (``dynamic_batching`` in ``model_config.proto``), queue policy included."""

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

    def has_queue_policy(self) -> bool:
        """Whether the queue policy differs from Triton's default (then ``default_queue_policy`` is written)."""
        return bool(self.max_queue_size or self.default_timeout_us or self.allow_timeout_override
                    or self.timeout_action != "REJECT")

    def queue_policy_config(self) -> dict[str, Any]:
        """The ``default_queue_policy`` entry."""
        return {
            "timeout_action": self.timeout_action,
            "default_timeout_microseconds": self.default_timeout_us,
            "allow_timeout_override": self.allow_timeout_override,
            "max_queue_size": self.max_queue_size,
        }

    def to_config(self) -> dict[str, Any]:
        """The ``dynamic_batching`` entry."""
        config: dict[str, Any] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
        if self.preferred_batch_sizes:
            config["preferred_batch_size"] = list(self.preferred_batch_sizes)
        if self.preserve_ordering:
            config["preserve_ordering"] = True
        if self.priority_levels:
            config["priority_levels"] = self.priority_levels
            config["default_priority_level"] = self.default_priority_level
        if self.has_queue_policy():
            config["default_queue_policy"] = self.queue_policy_config()
        return config


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble: a model whose tensors map by their own names (the chain contract)."""

    model_name: str
    inputs: Sequence[str]
    outputs: Sequence[str]


# ---------------------------------------------------------------- configs


def check_target(target: str) -> None:
    """Refuse a target that is not one of :data:`TARGETS`."""
    if target not in TARGETS:
        raise ConfigValidationError(f"target must be one of {TARGETS}, got {target!r}")


def string_parameters(values: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Config ``parameters`` from plain values (dicts and lists become JSON strings)."""
    rendered = {}
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, list, tuple, bool)) else str(value)
        rendered[key] = {"string_value": text}
    return rendered


def _instance_group(count: int, target: str) -> list[dict[str, Any]]:
    return [{"count": count, "kind": "KIND_CPU" if target == "embedded" else "KIND_GPU"}]


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
    """The model config of an ONNX model (a whole model or one stage) for ``target``.

    ``embedded``: a Python-backend model running ``backends/onnx_runner`` on ``model.onnx``;
    ``gpu``: Triton's ``onnxruntime`` backend with GPU instances.
    """
    check_target(target)
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
        "instance_group": _instance_group(instance_count, target),
    }
    if dynamic_batching is not None and max_batch_size > 0:
        config["dynamic_batching"] = dynamic_batching.to_config()
    if embedded:
        config["backend"] = "python"
        meta = {tensor.name: tensor.runner_meta() for tensor in [*inputs, *outputs] if tensor.runner_meta()}
        config["parameters"] = string_parameters(
            {"onnx_file": ONNX_FILE, THREADS_PARAMETER: intra_op_threads, "tensor_meta": meta}
        )
    else:
        config["backend"] = "onnxruntime"
    return config


def ensemble_config(name: str, max_batch_size: int, inputs: list[TensorConfig], outputs: list[TensorConfig],
                    steps: Sequence[EnsembleStep]) -> dict[str, Any]:
    """The ensemble running ``steps`` in order; every tensor maps by its own name (the chain contract)."""
    return {
        "name": name, "platform": "ensemble", "max_batch_size": max_batch_size,
        "input": [t.to_config() for t in inputs], "output": [t.to_config() for t in outputs],
        "ensemble_scheduling": {"step": [
            {"model_name": step.model_name, "model_version": -1,
             "input_map": {n: n for n in step.inputs}, "output_map": {n: n for n in step.outputs}}
            for step in steps
        ]},
    }


def reorch_model_config(name: str, *, target: str, max_batch_size: int, inputs: list[TensorConfig],
                        outputs: list[TensorConfig], batching: DynamicBatching, policy: str, knobs: ReorchKnobs,
                        extra_parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of the stage reorchestrator ``name``; ``batching`` is its front batcher.

    Not decoupled: ``execute`` returns at once and the engine answers each request later through its
    response sender. ``extra_parameters`` are further parameters of the glue (``backends/reorch/model.py``).
    """
    check_target(target)
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [t.to_config(ragged=True) for t in inputs],  # requests of different lengths share a batch
        "output": [t.to_config() for t in outputs] + [TensorConfig(RECORD_OUTPUT, "object", [1]).to_config()],
        "model_transaction_policy": {"decoupled": False},  # answered later through the response sender
        "dynamic_batching": batching.to_config(),
        # One instance: it keeps many batches in flight itself (execute returns at once).
        "instance_group": _instance_group(1, target),
        "parameters": string_parameters({"policy": policy, "stages_file": STAGES_FILE, **knobs.to_parameters(),
                                         **dict(extra_parameters or {})}),
    }


def python_model_config(name: str, *, max_batch_size: int, inputs: list[TensorConfig], outputs: list[TensorConfig],
                        dynamic_batching: DynamicBatching | None = None, decoupled: bool | None = None,
                        instance_count: int = 1, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A hand-written Python-backend model on CPU (its ``model.py`` is the caller's); ``decoupled=None``: unset."""
    config: dict[str, Any] = {
        "name": name, "backend": "python", "max_batch_size": max_batch_size,
        "input": [t.to_config() for t in inputs], "output": [t.to_config() for t in outputs],
    }
    if decoupled is not None:
        config["model_transaction_policy"] = {"decoupled": decoupled}
    if dynamic_batching is not None:
        config["dynamic_batching"] = dynamic_batching.to_config()
    config["instance_group"] = _instance_group(instance_count, "embedded")
    if parameters:
        config["parameters"] = string_parameters(parameters)
    return config


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """A config's ``parameters`` as plain strings (what ``string_parameters`` wrote)."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


# ---------------------------------------------------------------- overlays (the characterization's knobs)


@dataclass(frozen=True)
class BatchingOverlay:
    """Request-batching and instance knobs laid over a config as built; ``None`` leaves the built value."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None  # () removes the built preferred sizes
    instance_count: int | None = None
    max_queue_size: int | None = None
    default_timeout_us: int | None = None
    intra_op_threads: int | None = None  # onnxruntime threads of each instance (0: onnxruntime's default)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BatchingOverlay:
        """From a plan point's ``batching`` dict (only the knobs it sets)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigValidationError(f"unknown batching knobs {unknown}; the knobs are {sorted(names)}")
        return cls(**{key: (tuple(int(v) for v in value) if key == "preferred_batch_sizes" else int(value))
                      for key, value in values.items() if value is not None})

    def to_mapping(self) -> dict[str, Any]:
        """The knobs it sets, in field order (a point's ``batching`` in points.jsonl)."""
        return {f.name: list(value) if isinstance(value, tuple) else value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class ReorchOverlay:
    """The reorchestrator's policy and knobs laid over its config as built (empty: leave them)."""

    policy: str | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ReorchOverlay:
        """From a plan point's ``reorch`` dict (``policy``, ``knobs``)."""
        return cls(policy=values.get("policy") or None, knobs=dict(values.get("knobs") or {}))

    def to_mapping(self) -> dict[str, Any]:
        """What it sets: ``policy`` and ``knobs`` when given (a point's ``reorch`` in points.jsonl)."""
        return {**({"policy": self.policy} if self.policy else {}), **({"knobs": dict(self.knobs)} if self.knobs else {})}


def reorch_knobs(values: Mapping[str, Any]) -> ReorchKnobs:
    """Reorch knobs from plain values (the rest at their defaults); an unknown knob name is refused."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ReorchKnobs)})
    if unknown:
        raise ConfigValidationError(f"unknown reorch knobs {unknown}; the knobs are the fields of "
                                    "backends.reorch.policies.ReorchKnobs")
    return ReorchKnobs.from_parameters(values)


def knob_parameters(knobs: Mapping[str, Any]) -> dict[str, str]:
    """Only the given reorch knobs (plain values) as ``config.pbtxt`` strings (``ReorchKnobs.to_parameters``)."""
    parameters = reorch_knobs(knobs).to_parameters()
    return {key: parameters[key] for key in knobs}


def apply_batching(config: Mapping[str, Any], batching: BatchingOverlay) -> dict[str, Any]:
    """A copy of a model config (dict form) with ``batching`` laid over it."""
    config = copy.deepcopy(dict(config))
    if batching.max_batch_size is not None:
        config["max_batch_size"] = batching.max_batch_size
    if batching.max_queue_delay_us is not None or batching.preferred_batch_sizes is not None:
        dynamic = config.setdefault("dynamic_batching", {})
        if batching.max_queue_delay_us is not None:
            dynamic["max_queue_delay_microseconds"] = batching.max_queue_delay_us
        if batching.preferred_batch_sizes:
            dynamic["preferred_batch_size"] = list(batching.preferred_batch_sizes)
        elif batching.preferred_batch_sizes is not None:
            dynamic.pop("preferred_batch_size", None)
    if batching.instance_count is not None:
        groups = config.get("instance_group") or [{"kind": "KIND_CPU"}]
        config["instance_group"] = [{**groups[0], "count": batching.instance_count}]
    if batching.max_queue_size is not None or batching.default_timeout_us is not None:
        dynamic = config.setdefault("dynamic_batching", {})
        built = dynamic.get("default_queue_policy") or {}
        queue = DynamicBatching(
            max_queue_size=int(built.get("max_queue_size", 0)) if batching.max_queue_size is None
            else batching.max_queue_size,
            default_timeout_us=int(built.get("default_timeout_microseconds", 0)) if batching.default_timeout_us is None
            else batching.default_timeout_us,
        )
        if queue.has_queue_policy():
            dynamic["default_queue_policy"] = queue.queue_policy_config()
        else:
            dynamic.pop("default_queue_policy", None)
    if batching.intra_op_threads is not None:
        if config.get("backend") != "python":
            raise ConfigValidationError(
                f"intra_op_threads={batching.intra_op_threads} for model {config.get('name')!r} (backend "
                f"{config.get('backend') or config.get('platform')!r}): only the embedded target's Python-backend "
                "models run onnxruntime with a thread count; leave intra_op_threads unset for this model")
        if batching.intra_op_threads < 0:
            raise ConfigValidationError(f"intra_op_threads={batching.intra_op_threads}: must be >= 0 "
                                        "(0 = onnxruntime's default)")
        config.setdefault("parameters", {}).update(string_parameters({THREADS_PARAMETER: batching.intra_op_threads}))
    return config


def apply_reorch(config: Mapping[str, Any], reorch: ReorchOverlay, batching: BatchingOverlay) -> dict[str, Any]:
    """A copy of the reorchestrator's config with the policy and knobs as string parameters.

    The stage batch limit (knob ``max_batch_rows``) follows ``batching.max_batch_size`` unless the
    knobs set it: the reorchestrator never forms a stage batch above what its batcher may hand it.
    """
    config = copy.deepcopy(dict(config))
    knobs = dict(reorch.knobs)
    if batching.max_batch_size is not None:
        knobs = {"max_batch_rows": batching.max_batch_size, **knobs}
    values: dict[str, Any] = {"policy": reorch.policy} if reorch.policy else {}
    config.setdefault("parameters", {}).update(string_parameters({**values, **knob_parameters(knobs)}))
    return config


def variant_models(entry: Mapping[str, Any], variant: str) -> list[str]:
    """Triton model names a variant of a manifest entry uses, in load order (dependencies first, entry model last)."""
    variants = entry.get("variants", {})
    if variant not in variants:
        raise ConfigValidationError(
            f"the manifest has no {variant!r} variant for this model (it has {', '.join(variants)})"
        )
    if variant == "ensemble":
        return [stage["model_name"] for stage in entry.get("stages", [])] + [variants["ensemble"]]
    return [variants[variant]]


def variant_configs(entry: Mapping[str, Any], variant: str, base_configs: Mapping[str, Mapping[str, Any]],
                    batching: BatchingOverlay, reorch: ReorchOverlay | None = None) -> dict[str, dict[str, Any]]:
    """The config every model of ``variant`` must be loaded with (model name -> config), from the configs as built."""
    names = variant_models(entry, variant)
    configs = {}
    for name in names:
        config = base_configs[name]
        if variant == "ensemble" and name == names[-1]:
            # the ensemble itself has no batcher; its max batch size must not exceed its stages'
            configs[name] = apply_batching(config, BatchingOverlay(max_batch_size=batching.max_batch_size))
            continue
        config = apply_batching(config, batching)
        if variant == "reorch":
            config = apply_reorch(config, reorch or ReorchOverlay(), batching)
        configs[name] = config
    return configs


# ---------------------------------------------------------------- text form


def parse_model_config(config: dict[str, Any]):  # -> model_config_pb2.ModelConfig
    """Validate ``config`` against Triton's ModelConfig schema and return the protobuf message."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    message = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(config, message)
    except json_format.ParseError as error:
        name = config.get("name", "?")
        raise ConfigValidationError(f"model config for {name!r} is not valid for Triton: {error}") from None
    return message


def render_model_config(config: dict[str, Any]) -> str:
    """The ``config.pbtxt`` text of ``config`` (validated first)."""
    from google.protobuf import text_format

    return text_format.MessageToString(parse_model_config(config))


def read_model_config(path: Path) -> dict[str, Any]:
    """Parse a ``config.pbtxt`` back into the dict form."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(), message)
    except text_format.ParseError as error:
        raise ConfigValidationError(f"{path}: not a valid Triton model config: {error}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def write_model_config(model_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``<model_dir>/config.pbtxt``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILE
    path.write_text(render_model_config(config))
    return path
