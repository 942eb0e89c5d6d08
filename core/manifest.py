"""The one reader of ``manifest.json``: what a built model repository holds, as typed records.

``slicing/manifest.py`` writes the file (and checks each entry against the contract before it does);
everything else reads it here: the CLI, the load generator, the characterization, tuning, the
Kubernetes sizing script and the benches. The format is documented in docs/architecture.md.

Reading is lenient about keys a consumer does not need (tests and hand-written repositories hold
partial entries) and strict about the ones it gets: a present value of the wrong kind raises
:class:`~core.errors.ConfigValidationError` naming the file, the model and the field.

Code that still works on the JSON document keeps it verbatim in ``Manifest.raw`` and
``ModelEntry.raw``.

Example:
    >>> manifest = read_manifest(Path("model_repository"))
    >>> entry = manifest.model("bert_base")
    >>> entry.variants["reorch"], [stage.model_name for stage in entry.stages]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigValidationError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
DEFAULT_TARGET = "embedded"
_Value = TypeVar("_Value")


def pick(table: Mapping[str, _Value], key: str, problem: str, fix: str = "pick one of those") -> _Value:
    """``table[key]``, or a ConfigValidationError saying ``problem``, what the table has, and ``fix``."""
    if key not in table:
        raise ConfigValidationError(f"{problem} (it has {', '.join(table) or 'none'}); {fix}")
    return table[key]


def manifest_path(repository: Path | str) -> Path:
    """Where a repository keeps its manifest."""
    return Path(repository) / MANIFEST_NAME


@dataclass(frozen=True)
class TensorEntry:
    """One input, output or boundary tensor: batch-first ``shape`` with -1 for dynamic dims."""

    name: str
    datatype: str  # the inference protocol's datatype: FP32, INT64, ...
    shape: tuple[int, ...]
    sequence_axis: int | None = None
    value_range: tuple[float, float] | None = None  # half-open [lo, hi)
    pad_value: float = 0
    role: str = "data"  # "attention_mask" for a mask input

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> TensorEntry:
        value_range = data.get("value_range")
        return cls(
            name=str(name),
            datatype=str(data.get("datatype", "")),
            shape=tuple(int(dim) for dim in data.get("shape", (-1,))),
            sequence_axis=None if data.get("sequence_axis") is None else int(data["sequence_axis"]),
            value_range=None if value_range is None else (value_range[0], value_range[1]),
            pad_value=data.get("pad_value", 0),
            role=str(data.get("role", "data")),
        )


@dataclass(frozen=True)
class StageEntry:
    """One stage model of a sliced model."""

    index: int
    model_name: str
    onnx: str  # relative to the repository root
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: dict[str, TensorEntry]  # boundary tensors this stage writes
    cost_share: float
    favoured_batch_size: int | None
    latency_ms: dict[int, float]  # batch size -> measured latency

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageEntry:
        favoured = data.get("favoured_batch_size")
        return cls(
            index=int(data["index"]),
            model_name=str(data.get("model_name", "")),
            onnx=str(data.get("onnx", "")),
            inputs=tuple(data.get("inputs", ())),
            outputs=tuple(data.get("outputs", ())),
            tensors={name: TensorEntry.from_dict(name, meta) for name, meta in (data.get("tensors") or {}).items()},
            cost_share=float(data.get("cost_share", 1.0)),
            favoured_batch_size=None if favoured is None else int(favoured),
            latency_ms={int(batch): float(ms) for batch, ms in (data.get("latency_ms") or {}).items()},
        )


@dataclass(frozen=True)
class SequenceRange:
    """The lengths a sequence model accepts."""

    max_length: int
    min_length: int = 1


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository: its Triton model names per variant, tensors, stages and build."""

    name: str
    family: str | None
    size: str | None
    max_batch_size: int
    variants: dict[str, str]  # variant (whole | ensemble | reorch) -> Triton model name
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    sequence: SequenceRange | None
    stages: tuple[StageEntry, ...]
    build: dict[str, Any]
    ragged_variants: tuple[str, ...] | None
    raw: dict[str, Any] = field(repr=False, compare=False)  # the JSON entry, verbatim

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ModelEntry:
        sequence = data.get("sequence")
        ragged = data.get("ragged_variants")
        return cls(
            name=str(name),
            family=data.get("family"),
            size=data.get("size"),
            max_batch_size=int(data.get("max_batch_size", 0)),
            variants={str(variant): str(model) for variant, model in (data.get("variants") or {}).items()},
            inputs=tuple(TensorEntry.from_dict(t["name"], t) for t in data.get("inputs", ())),
            outputs=tuple(TensorEntry.from_dict(t["name"], t) for t in data.get("outputs", ())),
            sequence=None
            if not sequence
            else SequenceRange(int(sequence["max_length"]), int(sequence.get("min_length", 1))),
            stages=tuple(sorted((StageEntry.from_dict(s) for s in data.get("stages", ())), key=lambda s: s.index)),
            build=dict(data.get("build") or {}),
            ragged_variants=None if ragged is None else tuple(ragged),
            raw=dict(data),
        )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def triton_name(self, variant: str) -> str:
        """The Triton model serving ``variant``; raises when the repository was built without it."""
        return pick(self.variants, variant, f"model {self.name!r} has no variant {variant!r} in the manifest")


@dataclass(frozen=True)
class Manifest:
    """A repository's ``manifest.json``."""

    path: Path
    schema_version: int
    target: str  # embedded | gpu
    created_utc: str | None
    models: dict[str, ModelEntry]
    raw: dict[str, Any] = field(repr=False, compare=False)  # the JSON document, verbatim

    def model(self, name: str) -> ModelEntry:
        """The entry of ``name``; raises naming the models the repository has."""
        build = f"build it with `stagebatch build --model {name}` into {self.path.parent}"
        return pick(self.models, name, f"{self.path} has no model {name!r}", build)


def parse_manifest(document: Mapping[str, Any], path: Path | str = MANIFEST_NAME) -> Manifest:
    """The typed view of a manifest document; raises ConfigValidationError on a malformed field."""
    path = Path(path)
    version = document.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigValidationError(
            f"{path} has schema_version {version!r}, this stagebatch reads {SCHEMA_VERSION}; "
            "rebuild the repository (stagebatch build) or build into another --out directory"
        )
    models = {}
    for name, entry in (document.get("models") or {}).items():
        try:
            models[name] = ModelEntry.from_dict(name, entry)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ConfigValidationError(
                f"{path}: model {name!r} has a malformed entry ({type(error).__name__}: {error}); "
                "rebuild it with `stagebatch build`"
            ) from None
    return Manifest(
        path=path,
        schema_version=int(version),
        target=str(document.get("target", DEFAULT_TARGET)),
        created_utc=document.get("created_utc"),
        models=models,
        raw=dict(document),
    )


def read_manifest_path(path: Path | str) -> Manifest:
    """Read a manifest file given by its own path (``--sb-manifest`` and the like)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigValidationError(f"{path} not found: build the repository first with `stagebatch build`")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigValidationError(
            f"{path} is not valid JSON ({error}); delete it and rebuild, or build into another --out directory"
        ) from None
    if not isinstance(document, dict):
        raise ConfigValidationError(f"{path} holds {type(document).__name__}, not a manifest object; rebuild it")
    return parse_manifest(document, path)


def read_manifest(repository: Path | str) -> Manifest:
    """Read ``REPOSITORY/manifest.json``; raises ConfigValidationError when it is missing or malformed."""
    return read_manifest_path(manifest_path(repository))


def find_manifest(repository: Path | str) -> Manifest | None:
    """Like :func:`read_manifest`, but None when the repository has no manifest (yet)."""
    path = manifest_path(repository)
    return read_manifest_path(path) if path.is_file() else None
