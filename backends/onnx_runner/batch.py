"""Batch execution of one ONNX model for a list of requests, without any Triton import.

The Triton glue (``model.py``) turns ``pb_utils`` requests into dicts of numpy arrays, calls
:meth:`BatchRunner.run`, and turns each result back into a response: every request gets exactly
one result, its outputs or its own error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.common.tensors import concat_rows, split_rows, value_range_violation


@dataclass
class TensorInfo:
    """What the runner must know about one input or output beyond the Triton config."""

    sequence_axis: int | None = None
    pad_value: float = 0
    value_range: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TensorInfo:
        value_range = values.get("value_range")
        return cls(
            sequence_axis=values.get("sequence_axis"),
            pad_value=values.get("pad_value", 0),
            value_range=tuple(value_range) if value_range is not None else None,
        )


class RequestError(Exception):
    """A request that cannot run; only that request fails (INVALID_ARG)."""


@dataclass
class RequestResult:
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    invalid: bool = False  # True: the request itself was bad (INVALID_ARG); False: the run failed


@dataclass
class BatchRunner:
    """Runs ``session`` on the concatenation of many requests' rows."""

    session: Any  # onnxruntime.InferenceSession (anything with .run(output_names, feeds))
    input_dtypes: dict[str, np.dtype]
    output_names: list[str]
    tensor_info: dict[str, TensorInfo] = field(default_factory=dict)
    batching: bool = True  # False: max_batch_size 0; each request runs alone

    def info(self, name: str) -> TensorInfo:
        return self.tensor_info.get(name, TensorInfo())

    def check(self, inputs: dict[str, np.ndarray]) -> tuple[int, int | None]:
        """Validate one request; return its rows and its sequence length (None without a sequence axis)."""
        rows = None
        length = None
        for name, dtype in self.input_dtypes.items():
            if name not in inputs:
                raise RequestError(f"missing input '{name}'")
            array = inputs[name]
            if array.dtype != dtype:
                raise RequestError(f"input '{name}' must be {dtype}, got {array.dtype}")
            violation = value_range_violation(array, self.info(name).value_range)
            if violation:
                raise RequestError(f"input '{name}': {violation}")
            if self.batching:
                if array.ndim == 0:
                    raise RequestError(f"input '{name}' needs a batch dimension")
                if rows is None:
                    rows = array.shape[0]
                elif array.shape[0] != rows:
                    raise RequestError(f"inputs disagree on the batch size: '{name}' has {array.shape[0]} rows, expected {rows}")
            axis = self.info(name).sequence_axis
            if axis is not None and array.ndim > axis:
                if length is None:
                    length = array.shape[axis]
                elif array.shape[axis] != length:
                    raise RequestError(
                        f"inputs disagree on the sequence length: '{name}' has {array.shape[axis]}, expected {length}"
                    )
        return (rows or 1), length

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[RequestResult]:
        results: list[RequestResult | None] = [None] * len(requests)
        valid: list[tuple[int, int, int | None]] = []  # (request index, rows, sequence length)
        for index, inputs in enumerate(requests):
            try:
                rows, length = self.check(inputs)
            except RequestError as error:
                results[index] = RequestResult(error=str(error), invalid=True)
                continue
            valid.append((index, rows, length))
        groups = [valid] if self.batching else [[entry] for entry in valid]
        for group in groups:
            if group:
                self._run_group(requests, group, results)
        return [result if result is not None else RequestResult(error="internal: no result") for result in results]

    def _run_group(self, requests, group: list[tuple[int, int, int | None]], results) -> None:
        indices = [index for index, _, _ in group]
        rows = [count for _, count, _ in group]
        lengths = [length for _, _, length in group]
        try:
            feeds = {}
            for name in self.input_dtypes:
                info = self.info(name)
                arrays = [requests[index][name] for index in indices]
                if self.batching:
                    feeds[name] = concat_rows(arrays, info.sequence_axis, info.pad_value)
                else:
                    feeds[name] = arrays[0]
            outputs = self.session.run(self.output_names, feeds)
            per_request: list[dict[str, np.ndarray]] = [{} for _ in indices]
            for name, array in zip(self.output_names, outputs):
                if self.batching:
                    pieces = split_rows(array, rows, self.info(name).sequence_axis, lengths)
                else:
                    pieces = [array]
                for position, piece in enumerate(pieces):
                    per_request[position][name] = piece
            for position, index in enumerate(indices):
                results[index] = RequestResult(outputs=per_request[position])
        except Exception as error:  # a failed run fails exactly the requests of this batch
            message = f"model execution failed for a batch of {len(indices)} request(s): {type(error).__name__}: {error}"
            for index in indices:
                results[index] = RequestResult(error=message)
