"""``stages.json``: what the reorchestrator knows about its model (written by ``core.reorch_deploy``).

It is the manifest entry of the model (docs/architecture.md) reduced to what serving needs:
model inputs/outputs, every stage's ONNX path (relative to the repository root), input and output
names, favoured batch size, measured latency per batch size (``latency_ms``, the cost model's table)
and the metadata of every tensor (dtype, shape, sequence axis, padding). ``whole_onnx`` is the whole
model's graph (relative to the repository root, may be empty): a fused run executes it instead of
the K stage graphs, so it costs what the whole model costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigValidationError

# Inference-protocol datatype names (as in manifest.json) -> numpy dtypes.
_WIRE_TO_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """``"FP32"``/``"TYPE_FP32"``/``"float32"`` -> ``np.dtype('float32')``."""
    name = datatype.removeprefix("TYPE_")
    try:
        return np.dtype(_WIRE_TO_NUMPY.get(name, name.lower() if name.isupper() else name))
    except TypeError:
        raise ConfigValidationError(f"datatype {datatype!r} is not supported by the reorchestrator "
                                    f"(use one of {', '.join(_WIRE_TO_NUMPY)})") from None


# The optional output with the per-request record (docs/architecture.md), and the request parameter
# (bool true) that asks for it: without it an answer carries only the model outputs.
RECORD_OUTPUT = "REORCH_RECORD"
RECORD_PARAMETER = "reorch_record"

# Stages below this share of the whole model's cost keep no favoured batch size (see from_manifest_entry).
NEGLIGIBLE_COST_SHARE = 0.05

def _latency_table(stage: dict[str, Any]) -> dict[int, float]:
    return {int(batch): float(ms) for batch, ms in (stage.get("latency_ms") or {}).items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # batch-first, -1 = dynamic
    sequence_axis: int | None = None
    pad_value: float = 0
    value_range: tuple[float, float] | None = None  # integer inputs: valid values [lo, hi)

    @classmethod
    def from_dict(cls, name: str, entry: dict[str, Any]) -> TensorSpec:
        value_range = entry.get("value_range")
        return cls(name=name, dtype=numpy_dtype(entry["datatype"]), shape=tuple(entry.get("shape", [-1])),
                   sequence_axis=entry.get("sequence_axis"), pad_value=entry.get("pad_value", 0),
                   value_range=tuple(value_range) if value_range is not None else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"datatype": self.dtype.name, "shape": list(self.shape)}
        if self.sequence_axis is not None:
            out["sequence_axis"] = self.sequence_axis
            out["pad_value"] = self.pad_value
        if self.value_range is not None:
            out["value_range"] = list(self.value_range)
        return out


def whole_onnx_path(entry: dict[str, Any], model: str = "") -> str:
    """The whole model's graph of a manifest entry, relative to the repository root ("" if unknown).

    The entry's own ``onnx`` where it has one; else the whole-model variant laid out as the stages
    are (a stage's ``onnx`` is ``<its model_name>/...``: the same path under the whole model's name).
    The whole variant's name is ``variants.whole``, or the model's own name ``model`` where the entry
    does not list it (the repository's default layout). An entry whose ``variants`` were replaced by
    only the reorch variant's name (a scratch deploy) otherwise lost the whole graph, and its fused
    runs chained the K stage graphs: on resnet50 small 0.5-0.6 ms more CPU per request than the whole
    model (docs/reorch.md, "Why reorch cost more CPU than the whole model").
    """
    if entry.get("onnx"):
        return str(entry["onnx"])
    whole = (entry.get("variants") or {}).get("whole") or model
    stages = entry.get("stages") or []
    first = stages[0] if stages else {}
    prefix = f"{first.get('model_name', '')}/"
    if not whole or prefix == "/" or not str(first.get("onnx", "")).startswith(prefix):
        return ""
    return f"{whole}/{first['onnx'][len(prefix):]}"


@dataclass(frozen=True)
class StageSpec:
    index: int
    onnx: str  # relative to the repository root
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    favoured_batch_size: int
    latency_ms: dict[int, float] = field(default_factory=dict, compare=False)  # batch size -> median ms (may be empty)


@dataclass
class StagesSpec:
    model: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    stages: list[StageSpec]
    tensors: dict[str, TensorSpec] = field(default_factory=dict)  # every tensor by name (inputs, boundaries, outputs)
    max_length: int | None = None  # sequence models: longest accepted sequence
    min_length: int = 1
    whole_onnx: str = ""  # the whole model's graph, relative to the repository root ("" = unknown)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigValidationError(f"model {self.model!r}: stages.json lists no stages")
        for tensor in [*self.inputs, *self.outputs]:
            self.tensors.setdefault(tensor.name, tensor)
        available = {t.name for t in self.inputs}
        for stage in self.stages:
            missing = [name for name in stage.inputs if name not in available]
            if missing:
                raise ConfigValidationError(
                    f"model {self.model!r}: stage {stage.index} reads {missing}, which no earlier stage "
                    "writes and which are not model inputs (chain contract, docs/architecture.md)")
            available.update(stage.outputs)
        missing = [t.name for t in self.outputs if t.name not in available]
        if missing:
            raise ConfigValidationError(f"model {self.model!r}: outputs {missing} are written by no stage")

    @property
    def is_sequence(self) -> bool:
        return any(t.sequence_axis is not None for t in self.inputs)

    @property
    def latency_tables_ms(self) -> list[dict[int, float]]:
        """Each stage's measured latency per batch size (empty dicts where the manifest has none)."""
        return [dict(s.latency_ms) for s in self.stages]

    @property
    def favoured_batch_sizes(self) -> tuple[int, ...]:
        return tuple(s.favoured_batch_size for s in self.stages)

    def largest_row_bytes(self) -> int:
        """Upper bound of the bytes one row holds while inside: every tensor of the chain at the longest length."""
        longest = self.max_length or 512
        total = 0
        for tensor in self.tensors.values():
            elements = 1
            for axis, size in enumerate(tensor.shape[1:], start=1):
                elements *= longest if axis == tensor.sequence_axis else max(size, 1)
            total += elements * tensor.dtype.itemsize
        return max(total, 1)

    def tensor(self, name: str) -> TensorSpec:
        return self.tensors.get(name) or TensorSpec(name, np.dtype("float32"), (-1,))

    def needed_after(self, stage_index: int) -> set[str]:
        """Tensor names still read by stages after ``stage_index`` or returned as outputs."""
        names = {t.name for t in self.outputs}
        for stage in self.stages[stage_index + 1:]:
            names.update(stage.inputs)
        return names

    @classmethod
    def from_manifest_entry(cls, model: str, entry: dict[str, Any]) -> StagesSpec:
        """From a ``manifest.json`` model entry (docs/architecture.md)."""
        try:
            inputs = [TensorSpec.from_dict(t["name"], t) for t in entry["inputs"]]
            outputs = [TensorSpec.from_dict(t["name"], t) for t in entry["outputs"]]
            tensors: dict[str, TensorSpec] = {}
            stages = []
            max_batch = int(entry["max_batch_size"])
            for stage in sorted(entry["stages"], key=lambda s: s["index"]):
                for name, meta in stage.get("tensors", {}).items():
                    tensors[name] = TensorSpec.from_dict(name, meta)
                favoured = int(stage.get("favoured_batch_size") or max_batch)
                if float(stage.get("cost_share", 1.0)) < NEGLIGIBLE_COST_SHARE:
                    # A near-empty stage's profile is per-call noise: its "favoured" size says nothing,
                    # and splitting batches before it would only add calls.
                    favoured = max_batch
                stages.append(StageSpec(int(stage["index"]), stage["onnx"], tuple(stage["inputs"]),
                                        tuple(stage["outputs"]), favoured, _latency_table(stage)))
            sequence = entry.get("sequence") or {}
        except (KeyError, TypeError) as error:
            raise ConfigValidationError(f"manifest entry of {model!r} lacks {error} (see the manifest.json "
                                        "schema in docs/architecture.md)") from None
        return cls(model, max_batch, inputs, outputs, stages, tensors,
                   max_length=sequence.get("max_length"), min_length=int(sequence.get("min_length", 1)),
                   whole_onnx=whole_onnx_path(entry, model))

    def to_json(self) -> str:
        return json.dumps({
            "model": self.model, "max_batch_size": self.max_batch_size,
            "inputs": [{"name": t.name, **t.to_dict()} for t in self.inputs],
            "outputs": [{"name": t.name, **t.to_dict()} for t in self.outputs],
            "stages": [{"index": s.index, "onnx": s.onnx, "inputs": list(s.inputs), "outputs": list(s.outputs),
                        "favoured_batch_size": s.favoured_batch_size,
                        "latency_ms": {str(b): ms for b, ms in sorted(s.latency_ms.items())}} for s in self.stages],
            "tensors": {name: t.to_dict() for name, t in self.tensors.items()},
            "sequence": None if self.max_length is None else {"max_length": self.max_length,
                                                              "min_length": self.min_length},
            "whole_onnx": self.whole_onnx,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StagesSpec:
        data = json.loads(text)
        tensors = {name: TensorSpec.from_dict(name, meta) for name, meta in data["tensors"].items()}
        sequence = data.get("sequence") or {}
        return cls(data["model"], int(data["max_batch_size"]),
                   [TensorSpec.from_dict(t["name"], t) for t in data["inputs"]],
                   [TensorSpec.from_dict(t["name"], t) for t in data["outputs"]],
                   [StageSpec(s["index"], s["onnx"], tuple(s["inputs"]), tuple(s["outputs"]),
                              int(s["favoured_batch_size"]), _latency_table(s)) for s in data["stages"]],
                   tensors, max_length=sequence.get("max_length"), min_length=int(sequence.get("min_length", 1)),
                   whole_onnx=data.get("whole_onnx", ""))

    @classmethod
    def load(cls, path: Path | str) -> StagesSpec:
        return cls.from_json(Path(path).read_text())
