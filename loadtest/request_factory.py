"""Build Triton inference inputs from a ``manifest.json`` model entry, without torch or onnx.

The manifest (docs/architecture.md) says each input's datatype, batch-first shape (-1 = dynamic),
integer ``value_range`` [lo, hi), ``sequence_axis``, ``pad_value`` and ``role``; value drawing is
:func:`slicing.inputs.make_inputs` (one place for "a random valid input"). A request has ``rows``
rows (dim 0) of one real sequence length; an ``attention_mask`` is 1 up to that length and 0 after.

Padding: a variant that accepts ragged batches gets tensors of exactly the request's length; a
variant that cannot (Triton's own onnxruntime backend on the ``gpu`` target batches only equal
shapes) gets tensors padded to ``sequence.max_length``. A model entry may say which variants are
ragged with ``"ragged_variants": [...]``; without it, every variant of an ``embedded`` repository
is ragged (the onnx_runner and the reorchestrator pad batches themselves) and only ``reorch`` is
ragged on ``gpu``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from slicing.inputs import ROLES, InputSpec, make_inputs
from core.errors import ConfigValidationError
from core.manifest import Manifest, TensorEntry, parse_manifest, pick
from core.model_config import triton_wire_dtype

if TYPE_CHECKING:
    from tritonclient.grpc import service_pb2

VARIANTS = ("whole", "ensemble", "reorch")
# Triton datatype string -> numpy dtype name (BYTES/BF16 inputs cannot be generated at random)
TRITON_TO_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
NUMPY_TO_TRITON = {v: k for k, v in TRITON_TO_NUMPY.items()}
REORCH_RECORD_OUTPUT = "REORCH_RECORD"


@dataclass
class ModelEntry:
    """What the load generator needs from one ``manifest["models"][name]`` entry."""

    name: str
    target: str
    max_batch_size: int
    variants: dict[str, str]  # variant -> Triton model name
    inputs: list[InputSpec]
    output_names: list[str]
    min_length: int | None = None  # None: the model has no sequence axis
    max_length: int | None = None
    ragged_variants: list[str] = field(default_factory=list)

    @property
    def has_sequence(self) -> bool:
        return self.max_length is not None

    def triton_name(self, variant: str) -> str:
        return pick(self.variants, variant, f"model {self.name!r} has no variant {variant!r} in the manifest")

    def is_ragged(self, variant: str) -> bool:
        return variant in self.ragged_variants



def infer_inputs(client_module: Any, arrays: Mapping[str, np.ndarray]) -> list:
    """``client_module.InferInput`` objects holding ``arrays`` (``tritonclient.grpc`` or ``.http``)."""
    inputs = []
    for name, array in arrays.items():
        item = client_module.InferInput(name, list(array.shape), triton_wire_dtype(array.dtype.name))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs

def model_entry(manifest: Manifest | Mapping[str, Any], model: str) -> ModelEntry:
    """The load generator's view of one model of a manifest (read by :mod:`core.manifest`).

    Errors name the field and the fix.
    """
    if not isinstance(manifest, Manifest):
        if not isinstance(manifest.get("models"), dict):
            raise ConfigValidationError("manifest has no 'models' object; rebuild the repository with `stagebatch build`")
        manifest = parse_manifest(manifest)
    if model not in manifest.models:
        raise ConfigValidationError(
            f"model {model!r} is not in the manifest; it has: {', '.join(sorted(manifest.models)) or 'none'}"
        )
    entry = manifest.models[model]
    where = f"manifest model {model!r}"
    missing = [key for key in ("max_batch_size", "variants", "inputs") if key not in entry.raw]
    if missing:
        raise ConfigValidationError(
            f"{where}: missing field {', '.join(missing)}; expected max_batch_size, variants, inputs, outputs"
        )
    inputs = [_input_spec(tensor, where) for tensor in entry.inputs]
    sequence = entry.sequence
    if sequence is not None and not 1 <= sequence.min_length <= sequence.max_length:
        raise ConfigValidationError(
            f"{where}: sequence min_length={sequence.min_length} max_length={sequence.max_length} is not "
            "1 <= min <= max"
        )
    if sequence is None and any(spec.sequence_axis is not None for spec in inputs):
        raise ConfigValidationError(f"{where}: inputs have a sequence_axis but 'sequence' (max_length) is missing")
    if entry.ragged_variants is not None:
        ragged = list(entry.ragged_variants)
    else:
        ragged = [v for v in entry.variants if manifest.target == "embedded" or v == "reorch"]
    return ModelEntry(model, manifest.target, entry.max_batch_size, dict(entry.variants), inputs,
                      [tensor.name for tensor in entry.outputs], sequence and sequence.min_length,
                      sequence and sequence.max_length, ragged)  # fmt: skip


def _input_spec(tensor: TensorEntry, where: str) -> InputSpec:
    if tensor.datatype not in TRITON_TO_NUMPY:
        raise ConfigValidationError(
            f"{where} input {tensor.name!r}: datatype {tensor.datatype!r} cannot be generated; "
            f"supported: {', '.join(TRITON_TO_NUMPY)}"
        )
    if tensor.role not in ROLES:
        raise ConfigValidationError(f"{where} input {tensor.name!r}: role {tensor.role!r} is not one of {', '.join(ROLES)}")
    return InputSpec(name=tensor.name, dtype=TRITON_TO_NUMPY[tensor.datatype], shape=list(tensor.shape),
                     value_range=tensor.value_range, sequence_axis=tensor.sequence_axis, pad_value=tensor.pad_value,
                     role=tensor.role)  # fmt: skip


class RequestFactory:
    """Ready-to-send inputs of one model variant, per sequence length.

    Tensor values do not change what a request costs the server, only shapes and lengths do, so a
    few random requests per length are built (serialised) once and reused (``variety`` of them, round robin):
    the generator then spends its CPU on sending, not on drawing random numbers.
    """

    def __init__(
        self, entry: ModelEntry, variant: str, *, rows: int = 1, seed: int | list[int] = 0, variety: int = 4, cache_size: int = 512
    ) -> None:
        if rows < 1 or (entry.max_batch_size > 0 and rows > entry.max_batch_size):
            raise ConfigValidationError(
                f"rows={rows} per request must be in [1, max_batch_size={entry.max_batch_size}] for model {entry.name!r}"
            )
        self.entry = entry
        self.variant = variant
        self.model_name = entry.triton_name(variant)
        self.rows = rows
        self.pad_to_max = entry.has_sequence and not entry.is_ragged(variant)
        self._rng = np.random.default_rng(seed)
        self._variety = max(1, variety)
        self._cache: OrderedDict[int | None, tuple[list[tuple[Any, bytes]], int]] = OrderedDict()
        self._cache_size = cache_size

    def check_length(self, seq_len: int | None) -> None:
        entry = self.entry
        if not entry.has_sequence:
            if seq_len is not None:
                raise ConfigValidationError(f"model {entry.name!r} has no sequence axis; do not give lengths")
            return
        if seq_len is None or not entry.min_length <= seq_len <= entry.max_length:  # type: ignore[operator]
            raise ConfigValidationError(
                f"sequence length {seq_len} is outside model {entry.name!r}'s range "
                f"[{entry.min_length}, {entry.max_length}]"
            )

    def arrays(self, seq_len: int | None) -> dict[str, np.ndarray]:
        """One random valid request (numpy arrays by input name) of real length ``seq_len``."""
        self.check_length(seq_len)
        if seq_len is None:
            return make_inputs(self.entry.inputs, self.rows, rng=self._rng)
        padded = self.entry.max_length if self.pad_to_max else seq_len
        return make_inputs(self.entry.inputs, self.rows, padded, rng=self._rng, lengths=[seq_len] * self.rows)

    def request_proto(self, seq_len: int | None) -> service_pb2.ModelInferRequest:
        """A ``ModelInferRequest`` (no id or parameters: the client appends those)."""
        return self._next(seq_len)[0]

    def request_bytes(self, seq_len: int | None) -> bytes:
        """:meth:`request_proto` serialised (once per prepared request, not per call)."""
        return self._next(seq_len)[1]

    def _next(self, seq_len: int | None) -> tuple[service_pb2.ModelInferRequest, bytes]:
        from tritonclient.grpc import service_pb2

        cached = self._cache.get(seq_len)
        if cached is None:
            sets = []
            for _ in range(self._variety):
                request = service_pb2.ModelInferRequest(model_name=self.model_name)
                for name, array in self.arrays(seq_len).items():
                    tensor = request.inputs.add()
                    tensor.name = name
                    tensor.datatype = NUMPY_TO_TRITON[array.dtype.name]
                    tensor.shape.extend(array.shape)
                    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
                sets.append((request, request.SerializeToString()))
            cached = (sets, 0)
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
        sets, turn = cached
        self._cache[seq_len] = (sets, turn + 1)
        self._cache.move_to_end(seq_len)
        return sets[turn % len(sets)]
