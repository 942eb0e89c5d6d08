"""Triton's dynamic batcher, modelled by its documented rules (pure: no clock, no I/O).

What is modelled (docs/tuning.md, "The dynamic batcher model"):

- requests wait in one FIFO queue per model;
- a batch is formed only when a model instance is free. Triton (no queue policy, no priorities) may
  keep up to 2 x instance_count payloads formed ahead of busy instances, and such a payload keeps
  growing until an instance takes it; that look-ahead is *not* modelled separately: forming the
  batch at the moment an instance takes it gives the same batch whenever a waiting payload would
  have grown to the same size (it does unless it filled up to max_batch_size first);
- with ``preferred_batch_sizes``: when the queue holds at least one preferred size, the largest
  preferred size that fits leaves at once (even when more are queued: a preferred size wins over
  ``max_batch_size``, as the docs say: "the largest preferred size it can, or else the largest size");
- otherwise a batch of ``max_batch_size`` leaves at once when the queue holds that many;
- otherwise the batcher waits until the oldest request has waited ``max_queue_delay_us``, then sends
  everything queued (up to ``max_batch_size``); a delay of 0 sends at once;
- ``instance_count`` instances take batches independently.

Not modelled: priority levels, queue policies (timeouts, max queue size), ragged-batch limits and
``preserve_ordering`` (which changes no latency of an in-order FIFO).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import BadParameterError


@dataclass(frozen=True)
class BatcherSettings:
    """The knobs of one model's dynamic batcher and instance group (``config.pbtxt``)."""

    max_batch_size: int = 16
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = field(default=())
    instance_count: int = 1
    intra_op_threads: int | None = None
    """onnxruntime threads of each instance (``core.model_config.BatchingOverlay.intra_op_threads``;
    None: as built, 0: onnxruntime's default, one per core)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(int(s) for s in self.preferred_batch_sizes)))
        if self.max_batch_size < 1:
            raise BadParameterError(f"max_batch_size={self.max_batch_size}: must be >= 1")
        if self.max_queue_delay_us < 0:
            raise BadParameterError(f"max_queue_delay_us={self.max_queue_delay_us}: must be >= 0")
        if self.instance_count < 1:
            raise BadParameterError(f"instance_count={self.instance_count}: must be >= 1")
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise BadParameterError(f"intra_op_threads={self.intra_op_threads}: must be >= 0 (0: onnxruntime's "
                                    "default) or unset (as built)")
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise BadParameterError(f"preferred_batch_sizes {list(self.preferred_batch_sizes)}: {bad} outside "
                                    f"1..max_batch_size={self.max_batch_size}; drop them or raise max_batch_size")

    def to_batching(self) -> dict[str, Any]:
        """The same knobs as a plan point's ``batching`` dict (``core.model_config.apply_batching``)."""
        out = {"max_batch_size": self.max_batch_size, "max_queue_delay_us": self.max_queue_delay_us,
               "preferred_batch_sizes": list(self.preferred_batch_sizes), "instance_count": self.instance_count}
        if self.intra_op_threads is not None:
            out["intra_op_threads"] = self.intra_op_threads
        return out

    @classmethod
    def from_batching(cls, batching: dict[str, Any], base: BatcherSettings) -> BatcherSettings:
        """``base`` with the knobs a plan point's ``batching`` dict sets."""
        return cls(max_batch_size=int(batching.get("max_batch_size", base.max_batch_size)),
                   max_queue_delay_us=int(batching.get("max_queue_delay_us", base.max_queue_delay_us)),
                   preferred_batch_sizes=tuple(batching.get("preferred_batch_sizes", base.preferred_batch_sizes)),
                   instance_count=int(batching.get("instance_count", base.instance_count)),
                   intra_op_threads=_optional_int(batching.get("intra_op_threads", base.intra_op_threads)))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


class DynamicBatcher:
    """One model's request queue; ``take`` answers what a free instance receives now."""

    def __init__(self, settings: BatcherSettings) -> None:
        self.settings = settings
        self._queue: deque[tuple[Any, int]] = deque()  # (item, enqueue time µs)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: Any, now_us: int) -> None:
        self._queue.append((item, now_us))

    def deadline_us(self) -> int | None:
        """When the oldest request has waited the maximum queue delay (None: queue empty)."""
        return self._queue[0][1] + self.settings.max_queue_delay_us if self._queue else None

    def _size_now(self, now_us: int) -> int:
        queued = len(self._queue)
        fitting = [s for s in self.settings.preferred_batch_sizes if s <= queued]
        if fitting:
            return fitting[-1]
        limit = self.settings.max_batch_size
        if queued >= limit:
            return limit
        deadline = self.deadline_us()
        if deadline is not None and now_us >= deadline:
            return queued
        return 0

    def take(self, now_us: int) -> list[Any]:
        """The batch a free instance gets at ``now_us`` (empty: nothing, or wait for the delay)."""
        size = self._size_now(now_us)
        return [self._queue.popleft()[0] for _ in range(size)]


def batch_formation(arrivals_us: Sequence[int], settings: BatcherSettings, service_us: int) -> list[list[int]]:
    """Batches (arrival indices) one model forms for these arrivals when each batch takes ``service_us``.

    A small closed helper for tests and docs: one queue, ``instance_count`` identical instances.
    """
    batcher = DynamicBatcher(settings)
    free_at = [0] * settings.instance_count
    order = sorted(range(len(arrivals_us)), key=lambda i: arrivals_us[i])
    batches: list[list[int]] = []
    position = 0
    now = 0
    while position < len(order) or len(batcher):
        instance = min(range(len(free_at)), key=free_at.__getitem__)
        now = max(now, free_at[instance])
        while position < len(order) and arrivals_us[order[position]] <= now:
            batcher.add(order[position], arrivals_us[order[position]])
            position += 1
        batch = batcher.take(now)
        if batch:
            batches.append(batch)
            free_at[instance] = now + service_us
            continue
        events = [t for t in (batcher.deadline_us(),
                              arrivals_us[order[position]] if position < len(order) else None) if t is not None]
        now = max(now + 1, min(events)) if events else now + 1
    return batches
