"""Server-side facts for a measurement point: Triton statistics and reorchestrator metrics, as deltas.

Triton's statistics API and the metrics endpoint report counters cumulative since the model was
loaded, so the runner takes a snapshot before and after each point and keeps the difference.
Snapshots are I/O (``snapshot_statistics``, ``scrape_metrics``); the differences are pure
(``diff_statistics``, ``diff_reorch_metrics``) and tested without a server.

Statistics come from ``client.get_inference_statistics(name, as_json=True)``: per model
``inference_count``, ``execution_count``, ``inference_stats.{success,fail,queue,compute_input,
compute_infer,compute_output}`` as ``{count, ns}`` and ``batch_stats`` (one entry per batch size the
model executed, with the number of executions). Reorchestrator metrics are the
``stagebatch_reorch_*`` families, named once in ``backends.reorch.metrics``.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from backends.reorch.metrics import (
    INLINE_COMPUTE_US_TOTAL,
    INLINE_EXECUTIONS_TOTAL,
    INLINE_SAMPLES_TOTAL,
    LAUNCH_OVERHEAD_US,
    OPERATIONS_TOTAL,
    REQUESTS_TOTAL,
    STAGE_COMPUTE_US_TOTAL,
    STAGE_EXECUTIONS_TOTAL,
    STAGE_QUEUE_US_TOTAL,
    STAGE_SAMPLES_TOTAL,
)

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class ModelStatsDelta:
    """What one Triton model did during a point (all times are totals in µs)."""

    model: str
    inference_count: int = 0  # rows inferred (a batch of n counts n)
    execution_count: int = 0  # batches executed
    success: int = 0  # requests answered successfully
    fail: int = 0
    queue_us: float = 0.0
    compute_input_us: float = 0.0
    compute_infer_us: float = 0.0
    compute_output_us: float = 0.0
    batch_histogram: dict[int, int] = field(default_factory=dict)  # batch size -> executions

    @property
    def avg_batch_size(self) -> float:
        """Rows per execution; NaN without executions."""
        return self.inference_count / self.execution_count if self.execution_count else float("nan")

    @property
    def avg_queue_us(self) -> float:
        """Average time a request waited in this model's queue."""
        requests = self.success + self.fail
        return self.queue_us / requests if requests else float("nan")

    @property
    def avg_compute_us(self) -> float:
        """Average compute (input + infer + output) per request."""
        requests = self.success + self.fail
        total = self.compute_input_us + self.compute_infer_us + self.compute_output_us
        return total / requests if requests else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready, with the derived averages."""
        data = asdict(self)
        data["batch_histogram"] = {str(k): v for k, v in sorted(self.batch_histogram.items())}
        data.update(
            avg_batch_size=self.avg_batch_size,
            avg_queue_us=self.avg_queue_us,
            avg_compute_us=self.avg_compute_us,
        )
        return data


def _int(value: Any) -> int:
    # protobuf JSON writes uint64 as strings
    return int(value or 0)


def flatten_statistics(model_stats: dict) -> dict[str, Any]:
    """One model's entry of the statistics JSON as flat cumulative counters."""
    inference_stats = model_stats.get("inference_stats", {}) or {}
    flat: dict[str, Any] = {
        "inference_count": _int(model_stats.get("inference_count")),
        "execution_count": _int(model_stats.get("execution_count")),
    }
    for name in _DURATIONS:
        entry = inference_stats.get(name, {}) or {}
        flat[f"{name}_count"] = _int(entry.get("count"))
        flat[f"{name}_ns"] = _int(entry.get("ns"))
    histogram = {}
    for batch in model_stats.get("batch_stats", []) or []:
        # each execution is counted once in compute_infer of its batch size
        histogram[_int(batch.get("batch_size"))] = _int((batch.get("compute_infer", {}) or {}).get("count"))
    flat["batch_histogram"] = histogram
    return flat


def snapshot_statistics(client, model_names: list[str]) -> dict[str, dict[str, Any]]:
    """Cumulative statistics of each model now (tritonclient gRPC client)."""
    snapshot = {}
    for name in model_names:
        response = client.get_inference_statistics(model_name=name, as_json=True)
        entries = response.get("model_stats", [])
        # one entry per loaded version; sum them (we only ever load version 1, but be exact)
        total: dict[str, Any] = {"batch_histogram": {}}
        for entry in entries:
            flat = flatten_statistics(entry)
            for key, value in flat.items():
                if key == "batch_histogram":
                    for size, count in value.items():
                        total["batch_histogram"][size] = total["batch_histogram"].get(size, 0) + count
                else:
                    total[key] = total.get(key, 0) + value
        snapshot[name] = total
    return snapshot


def diff_statistics(before: dict[str, dict], after: dict[str, dict]) -> dict[str, ModelStatsDelta]:
    """Per-model deltas between two snapshots; a model missing from ``before`` counts from zero."""
    deltas = {}
    for name, now in after.items():
        then = before.get(name, {})

        def d(key: str, now: dict = now, then: dict = then) -> int:
            return int(now.get(key, 0)) - int(then.get(key, 0))

        histogram = {}
        for size, count in now.get("batch_histogram", {}).items():
            delta = count - then.get("batch_histogram", {}).get(size, 0)
            if delta:
                histogram[int(size)] = delta
        deltas[name] = ModelStatsDelta(
            model=name,
            inference_count=d("inference_count"),
            execution_count=d("execution_count"),
            success=d("success_count"),
            fail=d("fail_count"),
            queue_us=d("queue_ns") / 1000.0,
            compute_input_us=d("compute_input_ns") / 1000.0,
            compute_infer_us=d("compute_infer_ns") / 1000.0,
            compute_output_us=d("compute_output_ns") / 1000.0,
            batch_histogram=histogram,
        )
    return deltas


# ---------------------------------------------------------------- Prometheus metrics

REORCH_PREFIX = "stagebatch_reorch_"
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, prefix: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of the Prometheus text format as {(name, sorted labels): value}, names starting with ``prefix``."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        labels = tuple(sorted((m["key"], m["value"]) for m in _LABEL.finditer(match["labels"] or "")))
        try:
            samples[(match["name"], labels)] = float(match["value"])
        except ValueError:
            continue
    return samples


def scrape_metrics(metrics_url: str, timeout_s: float = 5.0) -> str:
    """The metrics endpoint's text (only ever 127.0.0.1 or a URL the user gave)."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:  # noqa: S310 - http(s) URL from config
        return response.read().decode("utf-8", "replace")


@dataclass
class ReorchDelta:
    """What the reorchestrator of one model did during a point."""

    model: str
    operations: dict[str, float] = field(default_factory=dict)  # new|stretch|split|bucket -> count
    requests: dict[str, float] = field(default_factory=dict)  # success|error|cancelled -> count
    stages: dict[int, dict[str, float]] = field(
        default_factory=dict
    )  # stage -> executions, samples, queue_us, compute_us (stage launches only)
    inline: dict[str, float] = field(default_factory=dict)  # executions, samples, compute_us run fused in execute
    launch_overhead_us: float | None = None  # the fuse decision's per-launch overhead at the end (a gauge)

    def to_dict(self) -> dict:
        """JSON-ready, with average batch size per stage."""
        stages = {}
        for stage, values in sorted(self.stages.items()):
            executions = values.get("executions", 0)
            stages[str(stage)] = {
                **values,
                "avg_batch_size": values.get("samples", 0) / executions if executions else None,
            }
        executions = self.inline.get("executions", 0)
        return {
            "model": self.model,
            "operations": self.operations,
            "requests": self.requests,
            "stages": stages,
            "inline": {
                **self.inline,
                "avg_batch_size": self.inline.get("samples", 0) / executions if executions else None,
                "avg_compute_us": self.inline.get("compute_us", 0) / executions if executions else None,
            },
            "launch_overhead_us": self.launch_overhead_us,
        }


_STAGE_METRICS = {
    STAGE_EXECUTIONS_TOTAL: "executions",
    STAGE_SAMPLES_TOTAL: "samples",
    STAGE_QUEUE_US_TOTAL: "queue_us",
    STAGE_COMPUTE_US_TOTAL: "compute_us",
}
_INLINE_METRICS = {
    INLINE_EXECUTIONS_TOTAL: "executions",
    INLINE_SAMPLES_TOTAL: "samples",
    INLINE_COMPUTE_US_TOTAL: "compute_us",
}


def diff_reorch_metrics(before_text: str, after_text: str, model: str) -> ReorchDelta:
    """Reorchestrator counters of ``model`` (its Triton model name label) between two scrapes."""
    before = parse_prometheus(before_text, REORCH_PREFIX)
    after = parse_prometheus(after_text, REORCH_PREFIX)
    delta = ReorchDelta(model=model)
    for (name, labels), value in after.items():
        label = dict(labels)
        if label.get("model") != model:
            continue
        if name == LAUNCH_OVERHEAD_US:
            delta.launch_overhead_us = value
            continue
        change = value - before.get((name, labels), 0.0)
        if name == OPERATIONS_TOTAL:
            delta.operations[label.get("operation", "?")] = (
                delta.operations.get(label.get("operation", "?"), 0) + change
            )
        elif name == REQUESTS_TOTAL:
            delta.requests[label.get("outcome", "?")] = (
                delta.requests.get(label.get("outcome", "?"), 0) + change
            )
        elif name in _STAGE_METRICS and "stage" in label:
            stage = delta.stages.setdefault(int(label["stage"]), {})
            key = _STAGE_METRICS[name]
            stage[key] = stage.get(key, 0) + change
        elif name in _INLINE_METRICS:
            key = _INLINE_METRICS[name]
            delta.inline[key] = delta.inline.get(key, 0) + change
    return delta
