"""Synthetic run directories for the report, findings and compare tests (no server).

``write_run(path, specs)`` writes ``environment.json``, ``points.jsonl`` and ``requests.csv`` the
way the runner does (through :mod:`loadtest.rundir`); ``new_format`` adds the fields of
points.jsonl that newer runs record (offered/achieved rate, stability, repeats, load, comparison key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest import rundir

DURATION_S = 10.0
SLO_MS = 30.0
EPOCH_US = 1_800_000_000_000_000


def capacity_document(*, reorch_slo_rps: float | None = None, probes: bool = False) -> dict:
    """A ``capacity.json`` for bert_base: whole sustains 15 req/s (12 within the SLO), reorch:dva 21."""

    def entry(sustained_rps: float, slo_rps: float | None, probe_list: list[dict]) -> dict:
        found = {"sustained_rps": sustained_rps, "slo_rps": slo_rps, "slo_ms": 30, "percentile": 99,
                 "limited_by": "server"}
        return {**found, "probes": probe_list} if probes else found

    whole = entry(15.0, 12.0, [{"rate_rps": 15.0, "stable": True}])
    return {"models": {"bert_base": {"whole": whole, "reorch:dva": entry(21.0, reorch_slo_rps, [])}}}


@dataclass
class Request:  # the fields of loadtest.client.RequestRecord that rundir.request_row writes
    t_send_us: int
    latency_us: int
    ok: bool
    seq_len: int | None = None
    rows: int = 1
    error: str | None = None
    server: dict | None = None
    late_us: int = 0


@dataclass
class Spec:
    """One synthetic point."""

    variant: str
    rate_rps: float
    mean_ms: float  # mean latency of a request (stable points)
    policy: str | None = None
    load: str | None = None  # defaults to curve@rate_rps=<rate>
    repeat: int = 0
    repeats: int = 1
    saturated: bool = False  # latencies grow over the window; completions fall behind
    error_share: float = 0.0
    multiple: float | None = None
    experiment: str = "e"
    model: str = "bert_base"
    stages: int = 2
    reorch_records: bool = True  # per-request REORCH_RECORDs (reorch only)
    stage_times: bool = False  # REORCH_RECORDs carry stage_times_us
    extra: dict = field(default_factory=dict)


def _point(spec: Spec) -> dict:
    load = spec.load or f"curve@rate_rps={spec.rate_rps:g}"
    return {
        "point_id": f"{spec.experiment}/{spec.model}/{spec.variant}/{spec.policy or ''}/{load}/r{spec.repeat}",
        "experiment": spec.experiment,
        "model": spec.model,
        "variant": spec.variant,
        "load": load,
        "arrival": {"kind": "poisson", "rate_rps": spec.rate_rps},
        "lengths": None,
        "batching": {},
        "slicing": {},
        "reorch": {"policy": spec.policy} if spec.policy else {},
        "duration_s": DURATION_S,
        "warmup_s": 1.0,
        "slo_ms": SLO_MS,
        "seed": 0,
    }


def _latencies_us(spec: Spec, rng, n: int) -> np.ndarray:
    base = rng.gamma(4.0, spec.mean_ms * 250.0, size=n)  # mean = spec.mean_ms ms
    if spec.saturated:  # the queue grows by half the window over the window
        base = base + np.linspace(0, DURATION_S * 0.5e6, n)
    return base.astype(np.int64) + 100


def _stage_rows(spec: Spec, mean_ms: float) -> tuple[list[dict], dict]:
    """Stage rows and statistics deltas whose queue + compute is 80% of ``mean_ms`` per request."""
    n = int(spec.rate_rps * DURATION_S)
    names = (
        [spec.model] if spec.variant == "whole" else [f"{spec.model}_stage{s}" for s in range(spec.stages)]
    )
    per_stage_us = 0.8 * mean_ms * 1000 / len(names)
    rows, models = [], {}
    for s, name in enumerate(names):
        queue_us, compute_us = 0.25 * per_stage_us, 0.75 * per_stage_us
        rows.append(
            {
                "stage": s,
                "model": name,
                "executions": n // 2,
                "rows": n,
                "avg_batch_size": 2.0,
                "avg_queue_us": queue_us,
                "avg_compute_us": compute_us,
                "batch_histogram": {"1": 10, "2": n // 2 - 10},
            }
        )
        models[name] = {
            "model": name,
            "success": n,
            "fail": 0,
            "queue_us": queue_us * n,
            "compute_input_us": 0.1 * compute_us * n,
            "compute_infer_us": 0.8 * compute_us * n,
            "compute_output_us": 0.1 * compute_us * n,
        }
    return rows, models


def _reorch_record(spec: Spec, latency_us: int, t_send_us: int) -> dict:
    """A REORCH_RECORD: 10% client + network, 30% front wait, 50% stages, 10% response path."""
    arrival = t_send_us + int(0.05 * latency_us)
    entry = arrival + int(0.3 * latency_us)
    exit_ = arrival + int(0.9 * latency_us)
    record = {
        "arrival_us": arrival,
        "stage0_entry_us": entry,
        "exit_us": exit_,
        "ops": [],
        "bucket": 64,
        "batch_sizes": [2] * spec.stages,
    }
    if spec.stage_times:
        per = 0.5 * latency_us / spec.stages
        record["stage_times_us"] = [[0.4 * per, 0.6 * per] for _ in range(spec.stages)]
    return record


def write_run(
    path: Path,
    specs: list[Spec],
    *,
    seed: int = 0,
    new_format: bool = True,
    capacity: dict | None = None,
    crosscheck: dict | None = None,
    failed: bool = False,
) -> list[dict]:
    """Write a run directory of ``specs`` (plus one failed point when ``failed``); return its records."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    rundir.start_run_files(path)
    records = []
    for index, spec in enumerate(specs):
        n = int(spec.rate_rps * DURATION_S)
        sent = EPOCH_US + (np.arange(n) * 1e6 / spec.rate_rps).astype(np.int64)
        latencies = _latencies_us(spec, rng, n)
        ok = rng.random(n) >= spec.error_share
        requests = []
        for i in range(n):
            server = None
            if spec.variant == "reorch" and spec.reorch_records and ok[i]:
                server = _reorch_record(spec, int(latencies[i]), int(sent[i]))
            requests.append(
                Request(
                    int(sent[i]), int(latencies[i]), bool(ok[i]), None, 1, None if ok[i] else "boom", server
                )
            )
        mean_ms = float(latencies[ok].mean()) / 1000
        stages, models = _stage_rows(spec, mean_ms)
        server: dict = {"models": models, "stages": stages}
        if spec.variant == "reorch":
            server = {"models": {}, "stages": stages, "reorch": {"operations": {"new": 5, "stretch": 3}}}
        done = sent + latencies
        achieved = int(np.count_nonzero(ok & (done <= sent[0] + DURATION_S * 1e6))) / DURATION_S
        record = {
            "index": index,
            "point": _point(spec),
            "status": "ok",
            "error": None,
            "duration_s": DURATION_S,
            "first_error": "boom" if spec.error_share else None,
            "server": server,
            "loadgen": {"cpu_percent": 12.0, "late_arrivals": 0, "warnings": [], "bottleneck": False},
        }
        if new_format:
            record.update(
                offered_rps=n / DURATION_S,
                achieved_rps=achieved,
                stable=not spec.saturated,
                unstable_reason="backlog grew 40 req/s" if spec.saturated else None,
                subwindows=[],
                backlog_growth_per_s=40.0 if spec.saturated else 0.0,
                repeat=spec.repeat,
                repeats=spec.repeats,
                load={"rate_rps": spec.rate_rps, "multiple": spec.multiple, "capacity_rps": None},
                comparison_key=f"{spec.experiment}/{spec.model}/{_point(spec)['load']}",
            )
        record.update(spec.extra)
        rundir.append_point(path, record, requests)
        records.append(record)
    if failed:
        record = {
            "index": len(specs),
            "point": _point(Spec("whole", 10.0, 1.0, load="spike")),
            "status": "failed",
            "error": "ServerStartError: model 'x' failed to load",
        }
        rundir.append_point(path, record)
        records.append(record)
    (path / rundir.ENVIRONMENT_FILE).write_text(
        json.dumps(
            {
                "plan": {"name": "synthetic"},
                "plan_source": "p.yaml",
                "server": "embedded",
                "hardware": {"cpu_cores_logical": 2, "gpu": "none"},
                "software": {"python": "3.11"},
                "started_utc": "2026-11-29T04:00:00Z",
                "finished_utc": "2026-11-29T04:01:00Z",
            }
        )
    )
    if capacity is not None:
        (path / rundir.CAPACITY_FILE).write_text(json.dumps(capacity))
    if crosscheck is not None:
        (path / rundir.LOADGEN_CROSSCHECK_FILE).write_text(json.dumps(crosscheck))
    return records
