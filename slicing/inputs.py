"""Model inputs as the load generator and the verification need them: specs and random valid values.

An :class:`InputSpec` says what a valid value of one model input looks like (dtype, batch-first shape,
integer value range, sequence axis, role). :func:`make_inputs` draws random valid inputs from specs
(token ids below the vocabulary size, attention masks of real lengths), and
:func:`infer_input_specs` derives specs from an ONNX file a user brings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.errors import BadParameterError

if TYPE_CHECKING:
    import onnx

ROLES = ("data", "token_ids", "attention_mask", "lengths")
DEFAULT_SEQ_LEN = 16


@dataclass
class InputSpec:
    """One model input, as the load generator and verification need it."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: list[int]  # -1 for dynamic dims; dim 0 is the batch axis when batchable
    value_range: tuple[float, float] | None = None  # integers: [lo, hi) valid values (token ids < vocab)
    sequence_axis: int | None = None  # axis that is the sequence length, if any
    pad_value: float = 0
    role: str = "data"  # "data" | "token_ids" | "attention_mask" | "lengths"

    def __post_init__(self) -> None:
        try:
            np.dtype(self.dtype)
        except TypeError as error:
            raise BadParameterError(
                f"input {self.name!r}: dtype {self.dtype!r} is not a numpy dtype name; use e.g. 'float32'"
            ) from error
        self.shape = [int(d) for d in self.shape]
        if any(d == 0 or d < -1 for d in self.shape):
            raise BadParameterError(
                f"input {self.name!r}: shape {self.shape} may only hold positive sizes or -1 (dynamic)")
        if self.role not in ROLES:
            raise BadParameterError(f"input {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.sequence_axis is not None and not 0 <= self.sequence_axis < len(self.shape):
            raise BadParameterError(
                f"input {self.name!r}: sequence_axis {self.sequence_axis} is outside its shape {self.shape}")
        if self.value_range is not None:
            lo, hi = self.value_range
            if not lo < hi:
                raise BadParameterError(
                    f"input {self.name!r}: value_range {self.value_range} must be [lo, hi) with lo < hi")
            self.value_range = (lo, hi)

    @property
    def is_integer(self) -> bool:
        return np.issubdtype(np.dtype(self.dtype), np.integer)


def default_lengths(batch: int, seq_len: int, rng: np.random.Generator) -> list[int]:
    """Real lengths of a batch: the first row is full, the others uniform in [1, seq_len]."""
    lengths = [seq_len] + [int(n) for n in rng.integers(1, seq_len + 1, size=batch - 1)]
    return lengths[:batch]


def make_inputs(specs: list[InputSpec], batch: int, seq_len: int | None = None,
                rng: np.random.Generator | None = None,
                lengths: list[int] | None = None) -> dict[str, np.ndarray]:
    """Random valid inputs for ``batch`` rows.

    Dynamic dim 0 becomes ``batch``, a dynamic sequence axis becomes ``seq_len``. Sequence inputs get
    per-row real lengths (``lengths``, or random ones with the first row full): an ``attention_mask``
    is 1 up to each row's length and 0 after it, token ids after the length are ``pad_value``.
    """
    if batch < 1:
        raise BadParameterError(f"batch={batch} must be >= 1")
    rng = rng if rng is not None else np.random.default_rng(0)
    has_sequence = any(spec.sequence_axis is not None for spec in specs)
    if has_sequence and seq_len is None:
        seq_len = DEFAULT_SEQ_LEN
    if lengths is not None:
        if not has_sequence:
            raise BadParameterError("lengths were given but no input has a sequence axis")
        if len(lengths) != batch or any(not 1 <= n <= seq_len for n in lengths):
            raise BadParameterError(
                f"lengths {lengths} must hold {batch} values in [1, seq_len={seq_len}]")
    elif has_sequence:
        lengths = default_lengths(batch, seq_len, rng)

    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = _concrete_shape(spec, batch, seq_len)
        arrays[spec.name] = _draw(spec, shape, rng, lengths)
    return arrays


def _concrete_shape(spec: InputSpec, batch: int, seq_len: int | None) -> list[int]:
    shape = list(spec.shape)
    if shape and shape[0] == -1:
        shape[0] = batch
    elif shape and shape[0] != batch and spec.role != "lengths":
        raise BadParameterError(
            f"input {spec.name!r} has a fixed batch dim {shape[0]}; ask for batch={shape[0]}")
    if spec.sequence_axis is not None:
        if shape[spec.sequence_axis] == -1:
            shape[spec.sequence_axis] = seq_len
    if -1 in shape:
        raise BadParameterError(
            f"input {spec.name!r} has dynamic dims {spec.shape} besides the batch and sequence axes; "
            "give a fixed shape in its InputSpec")
    return shape


def _draw(spec: InputSpec, shape: list[int], rng: np.random.Generator,
          lengths: list[int] | None) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if spec.role == "lengths":
        return np.asarray(lengths, dtype=dtype).reshape(shape)
    if spec.role == "attention_mask" and spec.sequence_axis is not None:
        positions = np.arange(shape[spec.sequence_axis])
        row_mask = positions[None, :] < np.asarray(lengths)[:, None]  # [batch, seq]
        view_shape = [1] * len(shape)
        view_shape[0], view_shape[spec.sequence_axis] = shape[0], shape[spec.sequence_axis]
        return np.broadcast_to(row_mask.reshape(view_shape), shape).astype(dtype)
    if dtype == np.bool_:
        values = rng.integers(0, 2, size=shape).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        lo, hi = spec.value_range if spec.value_range is not None else (0, 2)
        values = rng.integers(int(np.ceil(lo)), int(np.ceil(hi)), size=shape).astype(dtype)
    else:
        values = rng.standard_normal(size=shape).astype(dtype)
        if spec.value_range is not None:
            lo, hi = spec.value_range
            values = (lo + (hi - lo) * rng.random(size=shape)).astype(dtype)
    if spec.sequence_axis is not None and lengths is not None and spec.role != "attention_mask":
        positions = np.arange(shape[spec.sequence_axis])
        padded = positions[None, :] >= np.asarray(lengths)[:, None]
        view_shape = [1] * len(shape)
        view_shape[0], view_shape[spec.sequence_axis] = shape[0], shape[spec.sequence_axis]
        values = np.where(padded.reshape(view_shape), np.asarray(spec.pad_value, dtype=dtype), values)
    return np.ascontiguousarray(values)


# ---------------------------------------------------------------------------------------------
# Specs of a user-supplied ONNX model
# ---------------------------------------------------------------------------------------------

_GATHER_LIKE = {"Gather": 1, "GatherElements": 1}  # op -> index of its indices input


def infer_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Input specs of an ONNX model: dtypes, shapes, and the valid range of integer inputs.

    Integer inputs that index a ``Gather`` on an initializer table (embeddings) get
    ``value_range [0, rows)``; 2-D integer inputs whose name mentions a mask get the role
    ``attention_mask``. A dynamic non-batch axis of a sequence-like input becomes its sequence axis.
    """
    from onnx import helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue  # old exporters list initializers as inputs; they are weights, not inputs
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                 for d in tensor_type.shape.dim]
        spec_kwargs: dict = {}
        if np.issubdtype(np.dtype(dtype), np.integer):
            rows = _gather_table_rows(value.name, consumers, initializers)
            if rows is not None:
                spec_kwargs.update(value_range=(0, rows), role="token_ids")
            elif "mask" in value.name.lower():
                spec_kwargs.update(value_range=(0, 2), role="attention_mask")
            elif "length" in value.name.lower() and len(shape) == 1:
                spec_kwargs.update(role="lengths")
        dynamic_rest = [axis for axis, d in enumerate(shape) if d == -1 and axis > 0]
        if len(dynamic_rest) == 1 and len(shape) >= 2:
            spec_kwargs["sequence_axis"] = dynamic_rest[0]
        if spec_kwargs.get("role") == "attention_mask" and "sequence_axis" not in spec_kwargs:
            spec_kwargs["role"] = "data"  # a fixed-length mask: random 0/1 values are valid
        specs.append(InputSpec(value.name, dtype, shape, **spec_kwargs))
    return specs


def _gather_table_rows(name: str, consumers: dict, initializers: dict) -> int | None:
    """Rows of the initializer table that integer tensor ``name`` indexes (following Cast/Reshape)."""
    from onnx import numpy_helper

    frontier, seen = [name], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in consumers.get(current, []):
            index_input = _GATHER_LIKE.get(node.op_type)
            if index_input is not None and len(node.input) > index_input and node.input[index_input] == current:
                table = initializers.get(node.input[0])
                if table is not None:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    return int(numpy_helper.to_array(table).shape[axis])
            elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"):
                frontier.extend(node.output)
    return None
