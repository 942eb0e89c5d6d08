"""Latency attribution: where a point's mean client latency went, part by part, and whether it adds up.

- whole and ensemble: Triton's queue and compute (input, infer, output) per request of each model,
  from the statistics deltas in ``points.jsonl`` (per stage model for the ensemble); client and
  network is the rest of the client's mean (client latency minus server time).
- reorch: from the per-request ``REORCH_RECORD`` (``requests.csv``): client and network (client
  latency minus arrival-to-exit on the server), the front wait (arrival to stage 0 entry) and, when
  the records carry ``stage_times_us``, each stage's wait and compute and the response path (the
  rest of stage 0 entry to exit). Without ``stage_times_us`` the stages' wait and compute come from
  the reorchestrator's metrics (per row and per execution), and the response path is not measured.

``coverage`` is the parts' sum over the measured mean; outside 0.9-1.1 the attribution misses
something (or counts it twice) and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loadtest.report.data import PointData

COVERAGE_TOLERANCE = 0.10  # the parts must sum to the measured mean within this share

# kinds of parts (one colour each in the figure)
CLIENT = "client + network"
QUEUE = "queue / wait"
FRONT = "front wait"
COMPUTE_INPUT = "compute input"
COMPUTE_INFER = "compute infer"
COMPUTE_OUTPUT = "compute output"
COMPUTE = "compute"
RESPONSE = "response path"
NO_STAGE_METRICS = "the reorchestrator's stage metrics recorded no executions in the window"
KINDS = (CLIENT, FRONT, QUEUE, COMPUTE_INPUT, COMPUTE_INFER, COMPUTE, COMPUTE_OUTPUT, RESPONSE)


@dataclass
class Part:
    """One part of the mean latency."""

    name: str
    kind: str  # one of KINDS
    ms: float
    source: str
    residual: bool = False  # computed as the rest of the measured mean, not measured itself


@dataclass
class Attribution:
    """The parts of one point's mean latency."""

    measured_ms: float
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        """Sum of the parts."""
        return float(sum(p.ms for p in self.parts))

    @property
    def coverage(self) -> float:
        """Sum of the parts over the measured mean (1.0 = adds up exactly)."""
        return self.total_ms / self.measured_ms if self.measured_ms else math.nan

    @property
    def adds_up(self) -> bool:
        """Whether the parts sum to the measured mean within :data:`COVERAGE_TOLERANCE`."""
        return abs(self.coverage - 1.0) <= COVERAGE_TOLERANCE


def _per_request_ms(total_us: float | None, requests: int) -> float:
    return (total_us or 0.0) / requests / 1000.0 if requests else math.nan


def _triton_parts(point: PointData, names: list[str]) -> list[Part] | None:
    models = point.server().get("models") or {}
    parts = []
    for stage, name in enumerate(names):
        delta = models.get(name)
        if not delta:
            return None
        requests = int(delta.get("success") or 0) + int(delta.get("fail") or 0)
        prefix = f"stage {stage} " if len(names) > 1 else ""
        source = f"Triton statistics of {name}"
        parts += [
            Part(f"{prefix}queue", QUEUE, _per_request_ms(delta.get("queue_us"), requests), source),
            Part(
                f"{prefix}compute input",
                COMPUTE_INPUT,
                _per_request_ms(delta.get("compute_input_us"), requests),
                source,
            ),
            Part(
                f"{prefix}compute infer",
                COMPUTE_INFER,
                _per_request_ms(delta.get("compute_infer_us"), requests),
                source,
            ),
            Part(
                f"{prefix}compute output",
                COMPUTE_OUTPUT,
                _per_request_ms(delta.get("compute_output_us"), requests),
                source,
            ),
        ]
    return parts


def _reorch_stage_parts(point: PointData) -> list[Part]:
    """Stage wait and compute from the reorchestrator's metrics; stages without executions are left out."""
    parts = []
    for row in point.stage_rows():
        if row.get("avg_queue_us") is None and row.get("avg_compute_us") is None:
            continue
        stage = row["stage"]
        source = "reorchestrator metrics (wait per row, compute per execution)"
        parts.append(Part(f"stage {stage} wait", QUEUE, (row.get("avg_queue_us") or 0.0) / 1000.0, source))
        parts.append(
            Part(f"stage {stage} compute", COMPUTE, (row.get("avg_compute_us") or 0.0) / 1000.0, source)
        )
    return parts


def _reorch(point: PointData, measured_ms: float) -> Attribution:
    result = Attribution(measured_ms)
    records = [r for r in point.server_records if {"arrival_us", "stage0_entry_us", "exit_us"} <= set(r)]
    if not records:
        stages = _reorch_stage_parts(point)
        if not stages:
            result.notes.append(NO_STAGE_METRICS)
        rest = measured_ms - sum(p.ms for p in stages)
        result.parts = stages + [
            Part(
                "front wait, response path, client + network",
                CLIENT,
                rest,
                "the rest of the client mean (no per-request REORCH_RECORD in requests.csv)",
                residual=True,
            )
        ]
        result.notes.append(
            "no per-request records: the front wait cannot be told from client and network time"
        )
        return result
    latency = np.array([r["latency_us"] for r in records], dtype=float)
    arrival = np.array([r["arrival_us"] for r in records], dtype=float)
    entry = np.array([r["stage0_entry_us"] for r in records], dtype=float)
    exit_ = np.array([r["exit_us"] for r in records], dtype=float)
    source = f"REORCH_RECORD of {len(records)} requests"
    result.parts.append(
        Part("client + network", CLIENT, float(np.mean(latency - (exit_ - arrival))) / 1000, source)
    )
    result.parts.append(
        Part("front wait (arrival to stage 0)", FRONT, float(np.mean(entry - arrival)) / 1000, source)
    )
    timed = [r["stage_times_us"] for r in records if r.get("stage_times_us")]
    if len(timed) == len(records) and len({len(t) for t in timed}) == 1:
        times = np.array(timed, dtype=float)  # requests x stages x (wait, compute)
        for stage in range(times.shape[1]):
            result.parts.append(
                Part(f"stage {stage} wait", QUEUE, float(times[:, stage, 0].mean()) / 1000, source)
            )
            result.parts.append(
                Part(f"stage {stage} compute", COMPUTE, float(times[:, stage, 1].mean()) / 1000, source)
            )
        in_stages = times.sum(axis=(1, 2))
        result.parts.append(
            Part("response path", RESPONSE, float(np.mean(exit_ - entry - in_stages)) / 1000, source)
        )
    else:
        stages = _reorch_stage_parts(point)
        if not stages:
            result.notes.append(NO_STAGE_METRICS)
        result.parts += stages
        result.notes.append(
            "stage waits and computes from the reorchestrator's metrics; the response path is not measured "
            "without per-request stage_times_us"
        )
    return result


def attribute(point: PointData) -> Attribution | None:
    """The parts of the point's mean client latency; None when the point has no server facts."""
    if not point.measured or not point.ok.any():
        return None
    measured_ms = point.summary.avg_ms
    variant = point.point["variant"]
    if variant == "reorch":
        if not point.stage_rows() and not point.server_records:
            return None
        return _reorch(point, measured_ms)
    names = [row["model"] for row in point.stage_rows()]
    parts = _triton_parts(point, names) if names else None
    if parts is None:
        return None
    server_ms = sum(p.ms for p in parts)
    client = Part(
        "client + network",
        CLIENT,
        max(measured_ms - server_ms, 0.0),
        "client mean minus Triton's queue and compute",
        residual=True,
    )
    result = Attribution(measured_ms, [client] + parts)
    if server_ms > measured_ms * (1 + COVERAGE_TOLERANCE):
        result.notes.append(
            f"Triton's time ({server_ms:.1f} ms) exceeds the client mean: the statistics window and the "
            "measured window differ"
        )
    if variant == "ensemble":
        result.notes.append("the ensemble's own scheduling between stages is inside client + network")
    return result
