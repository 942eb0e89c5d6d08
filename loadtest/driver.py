"""The load driver: run one workload against a Triton server and return every request's record.

:func:`run_load` is the programmatic API (the characterization runner calls it). It checks the
workload against the manifest here, then runs Locust as a library in a child process
(``python -m loadtest.locust_process``): gevent's monkey-patching is process-wide, so the caller
(pytest, the characterization runner) stays unpatched. With ``workers=0`` the child runs a
``LocalRunner``; with ``workers=N`` it runs a ``MasterRunner`` and starts N Locust worker processes
(``locust -f loadtest/locustfile.py --worker``), Locust's own distributed mode.

Workers on other machines: call ``run_load(..., workers=N, remote_workers=M,
master_bind_host="0.0.0.0", master_port=5557)`` and start, on each other machine (with this
project installed)::

    locust -f loadtest/locustfile.py --worker --master-host <this machine> --master-port 5557

The master waits for N + M workers and sends them the whole plan (workload, seed, model entry,
server URL) in Locust's spawn message; every worker sends its records back to the master.

Examples of use::

    spec = LoadSpec(model="bert_base", variant="whole", arrival=ArrivalSpec("poisson", rate_rps=50),
                    lengths=LengthSpec("uniform", min_length=8, max_length=64), duration_s=30, warmup_s=5)
    result = run_load(server.grpc_url, read_manifest(repo).raw, spec)
    p50_us = statistics.median(r.latency_us for r in result.records if r.ok)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import PROTOCOLS, TRANSPORTS, RequestRecord, parse_targets
from loadtest.request_factory import VARIANTS, RequestFactory, model_entry
from loadtest.stability import Stability, assess
from loadtest.workloads import ArrivalSpec, LengthSpec, make_arrival_process, make_length_distribution
from core.errors import ConfigValidationError, StagebatchError

__all__ = ["ArrivalSpec", "LengthSpec", "LoadJob", "LoadResult", "LoadSpec", "RequestRecord", "run_load"]

LOGGER = logging.getLogger(__name__)

# A Locust process runs its greenlets on one core; above this it, not the server, may be the bottleneck.
SATURATION_CPU_PERCENT = 85.0
# Seconds added to the child's deadline for process start-up, worker connection and shut-down.
STARTUP_MARGIN_S = 90.0


@dataclass
class LoadSpec:
    """One workload against one model variant.

    ``duration_s`` is the measured window; it follows ``warmup_s`` seconds whose requests are sent
    but not returned. ``priority``/``timeout_us`` are Triton's per-request priority (1 = highest, 0 =
    the model's default) and server-side queue timeout (0 = none). ``protocol`` is ``unary``
    (``ModelInfer``) or ``stream`` (``ModelStreamInfer``); empty means the variant's default. ``transport``
    is how they travel: ``h2`` (:mod:`loadtest.h2c`) or ``grpcio``; empty means the default. ``client_timeout_s`` bounds each
    request on the client: a request unanswered by then is recorded as an error. An open-loop
    arrival sent more than ``late_tolerance_us`` after its scheduled time counts as late.
    """

    model: str
    variant: str
    arrival: ArrivalSpec
    lengths: LengthSpec | None
    duration_s: float
    warmup_s: float = 0.0
    seed: int = 0
    """Seeds the arrival schedule, the lengths and the input values."""
    priority: int = 0
    timeout_us: int = 0
    rows: int = 1
    """Rows (dim 0) of every request."""
    client_timeout_s: float = 60.0
    late_tolerance_us: int = 2000
    protocol: str = ""  # unary | stream; "" = the variant's default (loadtest.client.DEFAULT_PROTOCOL)
    transport: str = ""  # h2 | grpcio; "" = loadtest.client.DEFAULT_TRANSPORT

    def __post_init__(self) -> None:
        if isinstance(self.arrival, dict):
            self.arrival = ArrivalSpec.from_dict(self.arrival)
        if isinstance(self.lengths, dict):
            self.lengths = LengthSpec.from_dict(self.lengths)
        checks = [
            (self.variant in VARIANTS, f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}"),
            (self.duration_s > 0, f"duration_s must be > 0 (got {self.duration_s})"),
            (self.warmup_s >= 0, f"warmup_s must be >= 0 (got {self.warmup_s})"),
            (self.priority >= 0, f"priority must be >= 0 (0 = the model's default; got {self.priority})"),
            (self.timeout_us >= 0, f"timeout_us must be >= 0 (0 = no server timeout; got {self.timeout_us})"),
            (self.rows >= 1, f"rows must be >= 1 (got {self.rows})"),
            (self.client_timeout_s > 0, f"client_timeout_s must be > 0 (got {self.client_timeout_s})"),
            (self.late_tolerance_us >= 0, f"late_tolerance_us must be >= 0 (got {self.late_tolerance_us})"),
            (self.protocol in ("", *PROTOCOLS),
             f"protocol {self.protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)} (or leave it empty)"),
            (self.transport in ("", *TRANSPORTS),
             f"transport {self.transport!r} is unknown; choose one of {', '.join(TRANSPORTS)} (or leave it empty)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigValidationError(f"LoadSpec: {message}")

    @property
    def drain_timeout_s(self) -> float:
        """How long a sending process waits for its last responses after the window closes."""
        return self.client_timeout_s + 5.0

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["arrival"] = self.arrival.to_dict()
        data["lengths"] = self.lengths.to_dict() if self.lengths is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(**data)


@dataclass
class LoadJob:
    """Everything one Locust process needs to send its share of a workload (JSON-serialisable).

    ``processes`` sending processes split an open-loop schedule round robin (process k sends
    arrivals k, k+processes, ...); all of them start the schedule at ``start_epoch_s`` (wall clock).
    """

    grpc_url: str
    spec: LoadSpec
    model_entry: dict[str, Any]  # the manifest's entry for spec.model, verbatim
    target: str = "embedded"
    processes: int = 1
    start_epoch_s: float = 0.0

    def entry(self):  # -> loadtest.request_factory.ModelEntry
        return model_entry({"target": self.target, "models": {self.spec.model: self.model_entry}}, self.spec.model)

    def to_json(self) -> str:
        data = dict(vars(self))
        data["spec"] = self.spec.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> LoadJob:
        data = json.loads(text)
        data["spec"] = LoadSpec.from_dict(data["spec"])
        return cls(**data)


@dataclass
class LoadResult:
    """The records of the measured window (warm-up excluded) and how the generator coped."""

    spec: LoadSpec
    records: list[RequestRecord]
    duration_s: float  # the measured window
    loadgen_cpu_percent: float  # busiest sending process, in % of one core
    late_arrivals: int  # measured-window arrivals sent more than late_tolerance_us behind schedule
    warnings: list[str] = field(default_factory=list)
    start_epoch_s: float = 0.0  # wall-clock time zero of the schedule (warm-up starts here)
    scheduled_arrivals: int = 0  # open loop: arrivals in the measured window's schedule

    @property
    def errors(self) -> int:
        return sum(1 for record in self.records if not record.ok)

    @property
    def window_start_us(self) -> int:
        """Wall-clock start of the measured window (µs since the epoch)."""
        return int(round((self.start_epoch_s + self.spec.warmup_s) * 1e6))

    def stability(self, period_s: float | None = None) -> Stability:
        """The stability verdict of the measured window (:func:`loadtest.stability.assess`), with the
        generator's busiest process and its lateness tolerance; ``period_s``: see ``assess``."""
        return assess([r.to_dict() for r in self.records], self.window_start_us, float(self.duration_s),
                      period_s=period_s, loadgen_cpu_percent=float(self.loadgen_cpu_percent),
                      late_tolerance_us=self.spec.late_tolerance_us)


def validate_spec(manifest: dict[str, Any], spec: LoadSpec) -> None:
    """Check a spec against the manifest before any process starts (clear errors, nothing sent)."""
    entry = model_entry(manifest, spec.model)
    factory = RequestFactory(entry, spec.variant, rows=spec.rows)
    if spec.arrival.is_open_loop:
        process = make_arrival_process(spec.arrival)  # reads and checks a trace file
        trace_lengths = getattr(process, "lengths", None)
        if entry.has_sequence and spec.lengths is None and trace_lengths is not None:
            lengths = trace_lengths(spec.warmup_s + spec.duration_s)
            if lengths is not None and len(lengths):
                factory.check_length(int(lengths.min()))
                factory.check_length(int(lengths.max()))
    if spec.lengths is not None:
        if not entry.has_sequence:
            raise ConfigValidationError(
                f"model {spec.model!r} has no sequence axis in the manifest; give lengths=None"
            )
        make_length_distribution(spec.lengths, min_length=entry.min_length, max_length=entry.max_length)


def _absolute_paths(spec: LoadSpec) -> LoadSpec:
    """Trace and length files resolved against the caller's working directory (the child's may differ)."""
    data = spec.to_dict()
    if data["arrival"].get("trace_path"):
        data["arrival"]["trace_path"] = str(Path(data["arrival"]["trace_path"]).resolve())
    if data["lengths"] and data["lengths"].get("path"):
        data["lengths"]["path"] = str(Path(data["lengths"]["path"]).resolve())
    return LoadSpec.from_dict(data)


def run_load(
    grpc_url: str,
    manifest: dict[str, Any],
    spec: LoadSpec,
    *,
    workers: int = 0,
    records_path: Path | None = None,
    remote_workers: int = 0,
    master_bind_host: str = "127.0.0.1",
    master_port: int = 0,
) -> LoadResult:
    """Run ``spec`` against ``grpc_url`` and return the measured window's records.

    ``grpc_url``: ``"host:port"``, a comma-separated list of them (requests spread round robin over
    the servers) or ``"dns:///host:port"`` (gRPC's round_robin over every address of the name).

    ``workers=0``: one Locust process (LocalRunner). ``workers=N``: a Locust master plus N local worker
    processes; ``remote_workers`` more may connect from other machines (see the module docstring).
    ``records_path``: also write the returned records as JSON lines there.
    """
    if workers < 0 or remote_workers < 0:
        raise ConfigValidationError(f"workers={workers} and remote_workers={remote_workers} must be >= 0")
    if remote_workers and not workers and master_bind_host == "127.0.0.1":
        raise ConfigValidationError("remote_workers need a master reachable from other machines: set master_bind_host")
    spec = _absolute_paths(spec)
    validate_spec(manifest, spec)
    parse_targets(grpc_url)  # a malformed address fails here, before any process starts
    processes = workers + remote_workers
    plan = LoadJob(
        grpc_url=grpc_url,
        spec=spec,
        model_entry=manifest["models"][spec.model],
        target=str(manifest.get("target", "embedded")),
        processes=max(1, processes),
    )
    with tempfile.TemporaryDirectory(prefix="stagebatch-load-") as tmp:
        work = Path(tmp)
        (work / "plan.json").write_text(plan.to_json())
        command = [
            sys.executable, "-m", "loadtest.locust_process",
            "--plan", str(work / "plan.json"), "--out", str(work),
            "--workers", str(workers), "--remote-workers", str(remote_workers),
            "--master-bind-host", master_bind_host, "--master-port", str(master_port),
        ]  # fmt: skip
        deadline_s = spec.warmup_s + spec.duration_s + spec.drain_timeout_s + STARTUP_MARGIN_S
        log_path = work / "locust.log"
        with open(log_path, "w") as log:
            try:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=deadline_s,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                raise StagebatchError(
                    f"the load run did not finish within {deadline_s:.0f} s; last log lines:\n{_tail(log_path)}"
                ) from None
        summary_path = work / "summary.json"
        if completed.returncode != 0 or not summary_path.exists():
            raise StagebatchError(
                f"the load run failed (exit code {completed.returncode}); last log lines:\n{_tail(log_path)}"
            )
        summary = json.loads(summary_path.read_text())
        all_records = [RequestRecord.from_dict(json.loads(line)) for line in open(work / "records.jsonl")]
    return _result(spec, summary, all_records, records_path)


def _result(spec: LoadSpec, summary: dict[str, Any], all_records: list[RequestRecord],
            records_path: Path | None) -> LoadResult:
    start_us = int(summary["start_epoch_s"] * 1e6)
    window_start_us = start_us + int(spec.warmup_s * 1e6)
    window_end_us = window_start_us + int(spec.duration_s * 1e6)
    # an arrival belongs to the window it was scheduled in, even if it was sent late
    records = [r for r in all_records if window_start_us <= r.t_send_us - r.late_us < window_end_us]
    records.sort(key=lambda r: r.t_send_us)
    late = sum(1 for r in records if r.late_us > spec.late_tolerance_us)
    warnings = list(summary.get("warnings", []))
    processes = summary.get("processes", [])
    cpu = max((p.get("cpu_percent", 0.0) for p in processes), default=0.0)
    if cpu >= SATURATION_CPU_PERCENT:
        warnings.append(
            f"a load-generator process used {cpu:.0f}% of a core (>= {SATURATION_CPU_PERCENT:.0f}%): the generator, "
            "not the server, may limit this run; use more workers or a lower rate"
        )
    if late:
        warnings.append(
            f"{late} of {len(records)} arrivals were sent more than {spec.late_tolerance_us} µs behind schedule "
            "(see each record's late_us)"
        )
    scheduled = sum(p.get("scheduled_in_window", 0) for p in processes)
    if spec.arrival.is_open_loop and len(records) != scheduled:
        warnings.append(f"{scheduled} arrivals were scheduled in the window but {len(records)} were recorded")
    errors = sum(1 for r in records if not r.ok)
    if errors:
        first = next(r.error for r in records if not r.ok)
        warnings.append(f"{errors} of {len(records)} requests failed; first error: {first}")
    if records_path is not None:
        records_path = Path(records_path)
        records_path.parent.mkdir(parents=True, exist_ok=True)
        with open(records_path, "w") as out:
            out.writelines(json.dumps(record.to_dict()) + "\n" for record in records)
    for warning in warnings:
        LOGGER.warning("%s", warning)
    return LoadResult(
        spec=spec,
        records=records,
        duration_s=spec.duration_s,
        loadgen_cpu_percent=cpu,
        late_arrivals=late,
        warnings=warnings,
        start_epoch_s=summary["start_epoch_s"],
        scheduled_arrivals=scheduled,
    )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

