"""A run directory as the report sees it: points with their raw requests, stability and labels.

Every client-side number is recomputed from ``requests.csv`` (so the report and the raw data cannot
disagree). Fields that newer runs record in ``points.jsonl`` (``offered_rps``, ``achieved_rps``,
``stable``, ``repeat``, ``load``, ``comparison_key``; see docs/characterization.md) are read when
present; for older runs the report derives what the raw requests allow (achieved throughput,
saturation when completions fell 5% or more behind arrivals) and calls the rest unknown.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import rundir
from loadtest.capacity import variant_label
from loadtest.plan import KNOB_SHORT_NAMES
from loadtest.stability import LOADGEN_REASONS
from loadtest.stats import LatencySummary, achieved_rps, summarize
from core.errors import ConfigValidationError

# A point whose completions inside the window fell this share or more behind its arrivals did not keep
# up (issue 9's first stability rule); used only for runs that did not record ``stable``.
KEEP_UP_SHARE = 0.95
# Offered loads closer than this (relative) count as the same load when two points are compared.
SAME_LOAD_TOLERANCE = 0.05

STABLE = "stable"
SATURATED = "saturated"  # the server did not keep up: the queue grew over the window
GENERATOR_LIMITED = "generator-limited"  # the load generator did not keep its schedule
UNKNOWN = "unknown"  # an older run that did not record stability



def point_label(point: dict) -> str:
    """The configuration of a point without model, experiment, load and repeat.

    ``variant[policy] knob=value mbs8 qd2000 k4`` (only what the point sets; ``tuned:`` first for the
    plan's tuned variant): what differs within a comparison. The one label of the report, its tables, plots, findings and ``stagebatch compare``.
    """
    label = ("tuned:" if point.get("tuned") else "") + point["variant"]
    reorch = point.get("reorch") or {}
    if reorch.get("policy"):
        label += f"[{reorch['policy']}]"
    for key, value in (reorch.get("knobs") or {}).items():
        label += f" {key}={value}"
    for key, value in {**(point.get("batching") or {}), **(point.get("slicing") or {})}.items():
        text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
        label += f" {KNOB_SHORT_NAMES.get(key, key)}{text}"
    return label


def capacity_label(point: dict) -> str:
    """The point's key in ``capacity.json``: ``whole``, ``ensemble`` or ``reorch:<policy>``."""
    return variant_label(point["variant"], (point.get("reorch") or {}).get("policy"))


def load_curve(load: str) -> str:
    """``poisson@rate_rps=20`` -> ``poisson``: the points of one load curve."""
    return load.split("@", 1)[0]


@dataclass
class PointData:
    """One measurement point as recorded, with its client summary recomputed from requests.csv."""

    index: int
    record: dict  # the points.jsonl line
    latencies_us: np.ndarray
    ok: np.ndarray
    t_send_us: np.ndarray
    batch_sizes_seen: list[list[int]]  # per request: the batch size at each stage (reorch records)
    server_records: list[dict] = field(default_factory=list)  # REORCH_RECORDs of successful requests
    summary: LatencySummary | None = None
    derived_achieved_rps: float | None = None

    @property
    def point(self) -> dict:
        """The plan's point (``Point.to_dict``)."""
        return self.record["point"]

    @property
    def label(self) -> str:
        """See :func:`point_label`."""
        return point_label(self.point)

    @property
    def status(self) -> str:
        """``ok`` or ``failed``."""
        return self.record.get("status", "ok")

    @property
    def measured(self) -> bool:
        """Whether the point ran and has a client summary."""
        return self.summary is not None

    @property
    def repeat(self) -> int:
        """0-based repeat of this point (0 for runs without repeats)."""
        return int(self.record.get("repeat") or 0)

    @property
    def offered_rps(self) -> float:
        """Requests sent per second in the measured window."""
        value = self.record.get("offered_rps")
        return float(value) if value is not None else self.summary.offered_rps

    @property
    def achieved_rps(self) -> float:
        """Successful completions inside the measured window per second (recorded, else derived)."""
        value = self.record.get("achieved_rps")
        if value is not None:
            return float(value)
        return (
            self.derived_achieved_rps
            if self.derived_achieved_rps is not None
            else self.summary.throughput_rps
        )

    @property
    def stability(self) -> str:
        """:data:`STABLE`, :data:`SATURATED`, :data:`GENERATOR_LIMITED` or :data:`UNKNOWN` (old runs)."""
        stable = self.record.get("stable")
        if stable is not None:
            if stable:
                return STABLE
            reason = str(self.record.get("unstable_reason") or "")
            return GENERATOR_LIMITED if reason.split(":")[0] in LOADGEN_REASONS else SATURATED
        if self.measured and self.offered_rps > 0 and self.achieved_rps < KEEP_UP_SHARE * self.offered_rps:
            return SATURATED
        return UNKNOWN

    @property
    def saturated(self) -> bool:
        """Whether the point's queue did not keep up: its latencies measure queue growth."""
        return self.stability == SATURATED

    @property
    def unstable(self) -> bool:
        """Whether the point is known not to be stable (saturated or limited by the load generator)."""
        return self.stability in (SATURATED, GENERATOR_LIMITED)

    @property
    def unstable_reason(self) -> str | None:
        """Why the point is not stable (recorded, or the derived keep-up rule for old runs)."""
        if self.record.get("stable") is False:
            return self.record.get("unstable_reason") or "not stable"
        if self.stability == SATURATED:
            return (
                f"derived: achieved {self.achieved_rps:.1f} of {self.offered_rps:.1f} req/s offered "
                f"(< {KEEP_UP_SHARE:.0%})"
            )
        return None

    @property
    def load_multiple(self) -> float | None:
        """The load as a multiple of measured capacity, when the plan gave one."""
        return (self.record.get("load") or {}).get("multiple")

    @property
    def capacity_share(self) -> float | None:
        """Offered load over the whole model's measured sustained rate (None when none was measured)."""
        load = self.record.get("load") or {}
        if load.get("multiple") is not None:
            return float(load["multiple"])
        if load.get("capacity_rps"):
            return self.offered_rps / float(load["capacity_rps"])
        return None

    @property
    def comparison_key(self) -> str:
        """Equal for points that differ only by variant/policy and repeat."""
        key = self.record.get("comparison_key") or self.point.get("comparison_key")
        if key:
            return str(key)
        p = self.point  # an older run: every configuration under the same load
        return f"{p['experiment']}/{p['model']}/{p['load']}"

    @property
    def ok_latencies_us(self) -> np.ndarray:
        """Latencies of the successful requests."""
        return self.latencies_us[self.ok]

    def server(self) -> dict:
        """The point's server-side deltas (``server`` of points.jsonl), empty when absent."""
        return self.record.get("server") or {}

    def stage_rows(self) -> list[dict]:
        """The runner's normalized per-stage facts (``server.stages``)."""
        return self.server().get("stages") or []


@dataclass
class RunData:
    """Everything in a run directory."""

    run_dir: Path
    environment: dict
    points: list[PointData] = field(default_factory=list)
    capacity: dict | None = None  # capacity.json
    crosscheck: dict | None = None  # loadgen_crosscheck.json
    simulation: dict | None = None  # simulation.json (stagebatch simulate --run)

    def measured_points(self) -> list[PointData]:
        """Points that ran and have a client summary."""
        return [p for p in self.points if p.measured]

    def capacity_of(self, point: dict) -> dict | None:
        """The capacity.json entry of a point's model and variant, when one was measured."""
        models = (self.capacity or {}).get("models") or {}
        return (models.get(point["model"]) or {}).get(capacity_label(point))


def group(points: Iterable[PointData], *keys: str) -> dict[tuple, list[PointData]]:
    """Points grouped by fields of their plan point, in first-seen order."""
    groups: dict[tuple, list[PointData]] = defaultdict(list)
    for p in points:
        groups[tuple(p.point[k] for k in keys)].append(p)
    return groups


def by_label(points: Iterable[PointData]) -> dict[str, list[PointData]]:
    """Points grouped by configuration label (the repeats of each configuration), in first-seen order."""
    groups: dict[str, list[PointData]] = defaultdict(list)
    for p in points:
        groups[p.label].append(p)
    return groups


def _server_record(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigValidationError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; a missing or broken file is a ConfigValidationError naming it."""
    run_dir = Path(run_dir)
    environment = rundir.read_environment(run_dir)
    for name in (rundir.POINTS_FILE, rundir.REQUESTS_FILE):
        if not (run_dir / name).is_file():
            raise ConfigValidationError(
                f"{run_dir / name}: missing; is {run_dir} a directory written by 'stagebatch characterize'?"
            )
    records = rundir.read_points(run_dir)
    requests = rundir.read_requests(run_dir / rundir.REQUESTS_FILE, [int(r["index"]) for r in records])
    data = RunData(
        run_dir=run_dir,
        environment=environment,
        capacity=rundir.read_capacity(run_dir),
        crosscheck=_read_json(run_dir / rundir.LOADGEN_CROSSCHECK_FILE),
        simulation=_read_json(run_dir / rundir.SIMULATION_FILE),
    )
    for record in records:
        index = int(record["index"])
        rows = requests.get(index, [])
        latencies = np.array([r["latency_us"] for r in rows], dtype=np.int64)
        ok = np.array([r["ok"] for r in rows], dtype=bool)
        sent = np.array([r["t_send_us"] for r in rows], dtype=np.int64)
        point = PointData(index=index, record=record, latencies_us=latencies, ok=ok, t_send_us=sent,
                          batch_sizes_seen=[r["batch_sizes"] for r in rows if r.get("batch_sizes")])  # fmt: skip
        for row in rows:
            server = _server_record(row.get("server"))
            if row["ok"] and server is not None:
                point.server_records.append({**server, "latency_us": row["latency_us"]})
        duration_s = record.get("duration_s")
        if point.status == "ok" and duration_s and latencies.size:
            point.summary = summarize(latencies, ok, duration_s, record["point"]["slo_ms"])
            point.derived_achieved_rps = achieved_rps(sent, latencies, ok, duration_s)
        data.points.append(point)
    return data
