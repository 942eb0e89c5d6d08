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


class CountingMetrics:
    """The reorchestrator's metrics as plain counters: ``counters[(family, label value)]``."""

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, str]] = Counter()
        self.inflight_requests = 0
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

    def inflight(self, count: int) -> None:
        self.inflight_requests = count

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
        ]
        ops, outcomes, executions, samples, queue, compute, inflight = self._families
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
        self._inflight = inflight.Metric(labels={"model": model})
        self._published: dict[tuple[str, str], int] = {}
        self._published_inflight = 0

    def flush(self) -> None:
        with self._lock:
            current = dict(self.counters)
            inflight = self.inflight_requests
        for key, total in current.items():
            delta = total - self._published.get(key, 0)
            metric = self._metrics.get(key)
            if delta and metric is not None:
                metric.increment(delta)
            self._published[key] = total
        if inflight != self._published_inflight:
            self._inflight.set(inflight)
            self._published_inflight = inflight
