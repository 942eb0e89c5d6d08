"""Reorchestrator metrics, named as in docs/architecture.md.

``CountingMetrics`` keeps the same counters in memory (tests, and the values the Triton sink
mirrors); ``TritonMetrics`` publishes them as Python-backend custom metrics on the metrics port.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from .scheduler import OPERATIONS
from .state import OUTCOMES

OPERATIONS_TOTAL = "stagebatch_reorch_operations_total"
REQUESTS_TOTAL = "stagebatch_reorch_requests_total"
STAGE_EXECUTIONS_TOTAL = "stagebatch_reorch_stage_executions_total"
STAGE_SAMPLES_TOTAL = "stagebatch_reorch_stage_samples_total"
STAGE_QUEUE_US_TOTAL = "stagebatch_reorch_stage_queue_us_total"
STAGE_COMPUTE_US_TOTAL = "stagebatch_reorch_stage_compute_us_total"
INFLIGHT_REQUESTS = "stagebatch_reorch_inflight_requests"
# Batches the cost model ran fused inside ``execute`` (``run_inline``): no stage launch, so not in the
# stage families above (stage 0's per-launch figures stay those of its launches).
INLINE_EXECUTIONS_TOTAL = "stagebatch_reorch_inline_executions_total"
INLINE_SAMPLES_TOTAL = "stagebatch_reorch_inline_samples_total"
INLINE_COMPUTE_US_TOTAL = "stagebatch_reorch_inline_compute_us_total"
# One stage launch's overhead (wall time minus compute) as the fuse decision uses it: measured, or the prior.
LAUNCH_OVERHEAD_US = "stagebatch_reorch_launch_overhead_us"
STAGE_FAMILIES = (STAGE_EXECUTIONS_TOTAL, STAGE_SAMPLES_TOTAL, STAGE_QUEUE_US_TOTAL, STAGE_COMPUTE_US_TOTAL)
INLINE_FAMILIES = (INLINE_EXECUTIONS_TOTAL, INLINE_SAMPLES_TOTAL, INLINE_COMPUTE_US_TOTAL)


class CountingMetrics:
    """The reorchestrator's metrics as plain counters: ``counters[(family, label value)]``."""

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, str]] = Counter()
        self.inflight_requests = 0
        self.launch_overhead_us = 0.0
        self._lock = threading.Lock()

    def _add(self, family: str, label: str, amount: int) -> None:
        with self._lock:
            self.counters[(family, label)] += amount

    def operation(self, operation: str, count: int = 1) -> None:
        self._add(OPERATIONS_TOTAL, operation, count)

    def outcome(self, outcome: str, count: int = 1) -> None:
        self._add(REQUESTS_TOTAL, outcome, count)

    def stage_launch(self, stage: int, rows: int, queue_us: int) -> None:
        self._add(STAGE_EXECUTIONS_TOTAL, str(stage), 1)
        self._add(STAGE_SAMPLES_TOTAL, str(stage), rows)
        self._add(STAGE_QUEUE_US_TOTAL, str(stage), queue_us)

    def stage_compute(self, stage: int, compute_us: int) -> None:
        self._add(STAGE_COMPUTE_US_TOTAL, str(stage), compute_us)

    def inline_run(self, rows: int, compute_us: int, succeeded: int, failed: int,
                   operation: str | None = None) -> None:
        """One batch run fused inside ``execute`` (no stage launch), with its requests' outcomes and the
        operation that decided it (FUSE or WHOLE; counted like ``operation``). One lock for all: this
        is on the inline path, which a served model runs with cold caches."""
        with self._lock:
            counters = self.counters
            if operation is not None:
                counters[(OPERATIONS_TOTAL, operation)] += 1
            if rows:
                counters[(INLINE_EXECUTIONS_TOTAL, "")] += 1
                counters[(INLINE_SAMPLES_TOTAL, "")] += rows
                counters[(INLINE_COMPUTE_US_TOTAL, "")] += compute_us
            if succeeded:
                counters[(REQUESTS_TOTAL, "success")] += succeeded
            if failed:
                counters[(REQUESTS_TOTAL, "error")] += failed

    def inflight(self, count: int) -> None:
        self.inflight_requests = count

    def launch_overhead(self, overhead_us: float) -> None:
        self.launch_overhead_us = overhead_us

    def flush(self) -> None:
        """Publish what changed since the last flush (nothing to do in memory)."""


class TritonMetrics(CountingMetrics):
    """Also publishes the counters through ``pb_utils.MetricFamily`` (label ``model``, and ``stage``).

    Every metric update is an IPC round trip to the server, so the hot path only counts in memory
    and ``flush`` (called periodically by the engine, one thread at a time) publishes the deltas.
    """

    def __init__(self, pb_utils: Any, model: str, num_stages: int) -> None:
        super().__init__()
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._families = [
            pb_utils.MetricFamily(OPERATIONS_TOTAL, "Reorchestrator meta operations applied", counter),
            pb_utils.MetricFamily(REQUESTS_TOTAL, "Reorchestrator requests answered, by outcome", counter),
            pb_utils.MetricFamily(STAGE_EXECUTIONS_TOTAL, "Batches run per stage", counter),
            pb_utils.MetricFamily(STAGE_SAMPLES_TOTAL, "Rows run per stage", counter),
            pb_utils.MetricFamily(STAGE_QUEUE_US_TOTAL, "Microseconds batches waited before a stage", counter),
            pb_utils.MetricFamily(STAGE_COMPUTE_US_TOTAL, "Microseconds of stage compute", counter),
            pb_utils.MetricFamily(INFLIGHT_REQUESTS, "Requests inside the reorchestrator", gauge),
            pb_utils.MetricFamily(INLINE_EXECUTIONS_TOTAL, "Batches run fused inside execute", counter),
            pb_utils.MetricFamily(INLINE_SAMPLES_TOTAL, "Rows run fused inside execute", counter),
            pb_utils.MetricFamily(INLINE_COMPUTE_US_TOTAL, "Microseconds of compute run fused inside execute", counter),
            pb_utils.MetricFamily(LAUNCH_OVERHEAD_US, "One stage launch's overhead as the fuse decision uses it", gauge),
        ]
        ops, outcomes, executions, samples, queue, compute, inflight, *inline, overhead = self._families
        self._metrics: dict[tuple[str, str], Any] = {}
        for operation in OPERATIONS:
            self._metrics[(OPERATIONS_TOTAL, operation)] = ops.Metric(labels={"model": model, "operation": operation})
        for outcome in OUTCOMES:
            self._metrics[(REQUESTS_TOTAL, outcome)] = outcomes.Metric(labels={"model": model, "outcome": outcome})
        for stage in range(num_stages):
            labels = {"model": model, "stage": str(stage)}
            self._metrics[(STAGE_EXECUTIONS_TOTAL, str(stage))] = executions.Metric(labels=labels)
            self._metrics[(STAGE_SAMPLES_TOTAL, str(stage))] = samples.Metric(labels=labels)
            self._metrics[(STAGE_QUEUE_US_TOTAL, str(stage))] = queue.Metric(labels=labels)
            self._metrics[(STAGE_COMPUTE_US_TOTAL, str(stage))] = compute.Metric(labels=labels)
        for name, family in zip(INLINE_FAMILIES, inline):
            self._metrics[(name, "")] = family.Metric(labels={"model": model})
        self._inflight = inflight.Metric(labels={"model": model})
        self._overhead = overhead.Metric(labels={"model": model})
        self._published: dict[tuple[str, str], int] = {}
        self._published_inflight = 0
        self._published_overhead = 0.0

    def flush(self) -> None:
        with self._lock:
            current = dict(self.counters)
            inflight = self.inflight_requests
            overhead_us = self.launch_overhead_us
        for key, total in current.items():
            delta = total - self._published.get(key, 0)
            metric = self._metrics.get(key)
            if delta and metric is not None:
                metric.increment(delta)
            self._published[key] = total
        if inflight != self._published_inflight:
            self._inflight.set(inflight)
            self._published_inflight = inflight
        if overhead_us != self._published_overhead:
            self._overhead.set(overhead_us)
            self._published_overhead = overhead_us
