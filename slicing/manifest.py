"""``manifest.json``: what a built model repository holds (see docs/architecture.md).

Pure functions: entries are built from plain values, checked against the contract, and merged into
an existing manifest so that building into a repository that already has models keeps them.
Load generators and checks read the manifest instead of guessing names, dtypes or value ranges.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slicing.zoo import ZOO
from core.errors import BadParameterError, ConfigValidationError
from core.manifest import MANIFEST_NAME, SCHEMA_VERSION, manifest_path
from core.model_config import triton_wire_dtype

# The zoo's families, then "onnx" for a user's own file.
FAMILIES = (*dict.fromkeys(entry.family for entry in ZOO.values()), "onnx")
VARIANTS = ("whole", "ensemble", "reorch")


def wire_dtype(dtype: str) -> str:
    """numpy dtype name -> the inference protocol's datatype (``float32`` -> ``FP32``)."""
    return triton_wire_dtype(dtype)


def tensor_entry(name: str, dtype: str, shape: list[int], *, sequence_axis: int | None = None,
                 value_range: tuple[float, float] | None = None, pad_value: float | None = None,
                 role: str | None = None) -> dict[str, Any]:
    """One input or output: batch-first ``shape`` with -1 for dynamic dims."""
    entry: dict[str, Any] = {"name": name, "datatype": wire_dtype(dtype), "shape": [int(d) for d in shape]}
    if value_range is not None:
        lo, hi = value_range
        entry["value_range"] = [int(lo), int(hi)] if float(lo).is_integer() and float(hi).is_integer() \
            else [float(lo), float(hi)]
    if sequence_axis is not None:
        entry["sequence_axis"] = int(sequence_axis)
        entry["pad_value"] = pad_value if pad_value is not None else 0
    if role is not None and role != "data":
        entry["role"] = role
    return entry


def input_entry(spec) -> dict[str, Any]:
    """The manifest entry of a :class:`slicing.inputs.InputSpec`."""
    return tensor_entry(spec.name, spec.dtype, spec.shape, sequence_axis=spec.sequence_axis,
                        value_range=spec.value_range, pad_value=spec.pad_value, role=spec.role)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_model_entry(name: str, entry: dict[str, Any]) -> None:
    """Raise ConfigValidationError when ``entry`` breaks the manifest contract."""
    def fail(rule: str) -> None:
        raise ConfigValidationError(f"manifest entry {name!r}: {rule}")

    for key in ("family", "size", "max_batch_size", "variants", "inputs", "outputs", "sequence", "stages",
                "build"):
        if key not in entry:
            fail(f"missing key {key!r}")
    if entry["family"] not in FAMILIES:
        fail(f"family {entry['family']!r} is not one of {FAMILIES}")
    variants = entry["variants"]
    if "whole" not in variants or any(v not in VARIANTS for v in variants):
        fail(f"variants {sorted(variants)} must include 'whole' and only name {VARIANTS}")
    if "ensemble" in variants and not entry["stages"]:
        fail("an ensemble variant needs its stages")
    for group in ("inputs", "outputs"):
        for tensor in entry[group]:
            if not {"name", "datatype", "shape"} <= set(tensor):
                fail(f"{group} entry {tensor} needs name, datatype and shape")
            axis = tensor.get("sequence_axis")
            if axis is not None and not 0 < axis < len(tensor["shape"]):
                fail(f"{group} {tensor['name']!r}: sequence_axis {axis} is outside shape {tensor['shape']}")
    for position, stage in enumerate(entry["stages"]):
        if stage.get("index") != position:
            fail(f"stage {position} has index {stage.get('index')}")
        for key in ("model_name", "onnx", "inputs", "outputs", "tensors", "cost_share", "favoured_batch_size"):
            if key not in stage:
                fail(f"stage {position} misses {key!r}")
    if entry["stages"]:
        last = entry["stages"][-1]
        if sorted(last["outputs"]) != sorted(t["name"] for t in entry["outputs"]):
            fail(f"the last stage writes {last['outputs']}, not the model outputs")


def merge_manifest(existing: dict[str, Any] | None, target: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A manifest holding ``existing``'s models plus ``entries`` (which replace same-named models)."""
    if existing is not None and existing.get("target") != target:
        raise BadParameterError(
            f"the repository was built for target {existing.get('target')!r}, not {target!r}: one Triton "
            f"repository serves one target; use another --out directory")
    models = dict(existing["models"]) if existing else {}
    for name, entry in entries.items():
        check_model_entry(name, entry)
        models[name] = entry
    return {"schema_version": SCHEMA_VERSION, "target": target, "created_utc": utc_now(),
            "models": dict(sorted(models.items()))}


def write_manifest(repository: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (readers never see half a file)."""
    path = manifest_path(repository)
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path
