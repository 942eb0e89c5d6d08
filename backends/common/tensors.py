"""Pure helpers to batch per-request tensors and give each request its rows back.

Sequence tensors of different lengths are right-padded to a common length along their sequence
axis; outputs are cut back to each request's own length. Models served this way are
padding-safe: the valid prefix of an output does not depend on right padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_to_length(array: np.ndarray, axis: int, length: int, pad_value: float = 0) -> np.ndarray:
    """Right-pad ``array`` along ``axis`` to ``length`` (no copy when it already has that length)."""
    current = array.shape[axis]
    if current == length:
        return array
    if current > length:
        raise ValueError(f"cannot pad a tensor of length {current} down to {length} along axis {axis}")
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - current)
    return np.pad(array, widths, mode="constant", constant_values=pad_value)


def concat_rows(
    arrays: Sequence[np.ndarray],
    sequence_axis: int | None = None,
    pad_value: float = 0,
    length: int | None = None,
) -> np.ndarray:
    """Concatenate per-request arrays along the batch axis 0.

    With a ``sequence_axis``, each array is first right-padded to ``length`` (default: the longest).
    """
    if sequence_axis is not None:
        target = length if length is not None else max(a.shape[sequence_axis] for a in arrays)
        arrays = [pad_to_length(a, sequence_axis, target, pad_value) for a in arrays]
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays, axis=0)


def split_rows(
    array: np.ndarray,
    rows: Sequence[int],
    sequence_axis: int | None = None,
    lengths: Sequence[int | None] | None = None,
) -> list[np.ndarray]:
    """Split a batched array back into per-request pieces of ``rows[i]`` rows.

    With a ``sequence_axis`` and ``lengths``, each piece is cut back to its request's length.
    """
    if sum(rows) != array.shape[0]:
        raise ValueError(f"cannot split {array.shape[0]} rows into requests of {list(rows)} rows")
    pieces = []
    start = 0
    for index, count in enumerate(rows):
        piece = array[start : start + count]
        start += count
        if sequence_axis is not None and lengths is not None and lengths[index] is not None:
            length = lengths[index]
            if piece.shape[sequence_axis] > length:
                piece = np.take(piece, np.arange(length), axis=sequence_axis)
        pieces.append(np.ascontiguousarray(piece))
    return pieces


def value_range_violation(array: np.ndarray, value_range: Sequence[float] | None) -> str | None:
    """A message when an integer tensor has values outside ``[lo, hi)``, else None."""
    if value_range is None or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        return None
    low, high = value_range
    found_min, found_max = int(array.min()), int(array.max())
    if found_min < low or found_max >= high:
        return f"values must lie in [{int(low)}, {int(high)}), found min {found_min} and max {found_max}"
    return None
