"""Fit the simulator's serving costs to a characterization run's own server statistics.

The manifest's latency tables are measured with each stage alone in one process; in the server a
launch also pays the Python backend (IPC of the tensors, request decoding), the cores are shared
with the load generator, and requests spend time outside the model's queue and compute (gRPC, the
client, the ensemble's steps, the reorchestrator's answer path). None of that is a constant we can
choose; it is measured in every run (``points.jsonl``: per point, per stage, Triton's statistics
or the reorchestrator's metrics: average batch size, queue time and compute time; and the client's
latency). Per model and variant (``MODEL:VARIANT``, and a pooled ``VARIANT`` fallback), from the
stable points whose stages formed batches of at most ``LIGHT_BATCH`` rows on average (there the
launches hardly overlap and the load generator hardly competes, so the times are costs):

- ``launch_overhead_ms``: the mean excess of the measured compute time of each stage (per request as
  Triton averages it, per launch for the reorchestrator) over the tables' time of the batches the
  simulator forms at that point. The batches depend on the costs, so the fit is repeated;
- ``request_overhead_ms``: the median over those points of what a request spends outside the
  server's queues and stages (the client's average latency minus the server's; for the
  reorchestrator, each request's own arrival-to-exit record);
- ``device_slots``: 1 or 2 per variant, whichever predicts the run's stable points better;
- ``reference_capacity_rps``: the whole model's capacity from the run's ``capacity.json``, so that
  another run's capacity rescales the device costs to its machine speed (:func:`rescaled`).

The result is ``calibration.json`` in the run folder (generated: ``results/`` is not in git), which
``stagebatch simulate --calibration`` and ``stagebatch tune --calibration`` read. Fit it on one run
and check it on another (``stagebatch simulate --run OTHER --calibration RUN``): the error on the
run it was fitted to is in-sample.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigValidationError
from loadtest.rundir import write_json
from tuning.simulate import SimSettings, simulate

CALIBRATION_FILE = "calibration.json"
SCHEMA_VERSION = 1
ITERATIONS = 3
LIGHT_BATCH = 1.5  # costs are fitted on points whose stages form batches of at most this many rows on average
DEVICE_SLOTS = (1, 2)  # one launch at a time on the cores, or two of different models side by side
METHOD = (f"per MODEL:VARIANT over the stable points with batches <= {LIGHT_BATCH} rows: launch_overhead_ms = mean of "
          "measured per-stage compute (Triton statistics / reorch metrics) minus the tables' time of the simulated "
          "batches; request_overhead_ms = median(client latency - server queue and compute); device_slots (1 or 2) "
          "by the smaller median |p50 error|")


def _fit_launch(observations: list[tuple[float, float]]) -> float:
    """``launch_overhead_ms`` of ``measured = launch + table`` over (table, measured) pairs: the mean excess.

    The tables are taken at face value (the same onnxruntime session, timed alone); what the server
    adds is a cost per launch. A slope fitted to these points would be told apart from the intercept
    only by the differences between stages, not by batch size (light points form batches of about 1),
    and it extrapolates badly to the large batches of heavy load.
    """
    return max(0.0, statistics.fmean(m - t for t, m in observations))


def _outside_ms(record: dict[str, Any], requests: list[dict] | None) -> float:
    """What an answer spends outside the server's queues and stages, on average (ms).

    From the reorchestrator's per-request records where there are (client latency minus its
    arrival-to-exit time), else the client's average minus the stages' queue and compute times.
    """
    timed = [r["latency_us"] - (r["server"]["exit_us"] - r["server"]["arrival_us"]) for r in requests or ()
             if r["ok"] and r.get("server") and "exit_us" in r["server"] and "arrival_us" in r["server"]]
    if timed:
        return statistics.fmean(timed) / 1000.0
    in_server_us = sum(s["avg_compute_us"] + (s.get("avg_queue_us") or 0.0) for s in record["server"]["stages"])
    return record["client"]["avg_ms"] - in_server_us / 1000.0


def _observations(jobs, settings: SimSettings, requests: dict[int, list]) -> tuple[dict[str, list], ...]:
    """Per MODEL:VARIANT: (table ms, measured compute ms) pairs, outside-the-server latencies (ms), and
    the points without per-stage times (the client's latency is all there is of them)."""
    compute: dict[str, list] = defaultdict(list)
    outside: dict[str, list] = defaultdict(list)
    latency_only: dict[str, list] = defaultdict(list)
    for record, job in jobs:
        profile, config, workload = job
        key = f"{profile.name}:{config.variant}"
        measured_stages = ((record.get("server") or {}).get("stages")) or []
        if not measured_stages or any(s.get("avg_compute_us") is None for s in measured_stages):
            latency_only[key].append((record, job))
            continue
        if not all((s.get("avg_batch_size") or 1.0) <= LIGHT_BATCH for s in measured_stages):
            continue  # launches overlap, requests queue and the load generator competes: times are not costs
        result = simulate(profile, config, workload, settings)
        for simulated, measured in zip(result.stage_batches, measured_stages):
            per_request = config.variant != "reorch"  # Triton averages compute per request; reorch per launch
            table = simulated["row_avg_table_ms" if per_request else "avg_table_ms"]
            if table is None or measured.get("avg_compute_us") is None:
                continue
            compute[key].append((table, measured["avg_compute_us"] / 1000.0))
        outside[key].append(_outside_ms(record, requests.get(record.get("index"))))
    return compute, outside, latency_only


def usable(record: dict[str, Any]) -> bool:
    """A point the calibration may use: stable, with the client's figures."""
    return bool(record.get("stable") and (record.get("client") or {}).get("avg_ms") is not None)


def fit(jobs, base: SimSettings | None = None, requests: dict[int, list] | None = None,
        error: Callable[[list, SimSettings], dict[str, float]] | None = None) -> tuple[SimSettings, dict[str, Any]]:
    """Fitted settings and the fit's facts from ``(point record, (profile, config, workload))`` pairs.

    ``requests``: the run's per-request rows by point index (``loadtest.rundir.read_requests``).
    ``error(jobs, settings)``: median |p50 error| per variant; with it, ``device_slots`` (1 or 2: do
    launches of different models overlap on the cores?) is chosen per variant by the smaller error.
    """
    jobs = [(record, job) for record, job in jobs if job is not None and usable(record)]
    if not jobs:
        raise ConfigValidationError("no stable point with server statistics per stage to calibrate from; "
                                    "calibrate from a characterization run whose points were sustained")
    if error is None:
        return _fit_costs(jobs, base or SimSettings(), requests or {})
    fits = {slots: _fit_costs(jobs, dataclasses.replace(base or SimSettings(), device_slots=slots), requests or {})
            for slots in DEVICE_SLOTS}
    errors = {slots: error(jobs, settings) for slots, (settings, _) in fits.items()}
    overrides: dict[str, dict[str, float]] = {}
    facts: dict[str, Any] = {}
    for key in fits[DEVICE_SLOTS[0]][0].variant_overrides:
        variant = key.split(":", 1)[-1]
        slots = min(DEVICE_SLOTS, key=lambda n: errors[n].get(variant, float("inf")))
        overrides[key] = {**fits[slots][0].variant_overrides[key], "device_slots": slots}
        if key in fits[slots][1]:
            facts[key] = {**fits[slots][1][key], "device_slots_p50_error": {n: errors[n].get(variant) for n in errors}}
    return dataclasses.replace(base or SimSettings(), variant_overrides=overrides), facts


def _fit_costs(jobs, base: SimSettings, requests: dict[int, list]) -> tuple[SimSettings, dict[str, Any]]:
    settings = dataclasses.replace(base, variant_overrides={})
    facts: dict[str, Any] = {}
    for _ in range(ITERATIONS):
        compute, outside, latency_only = _observations(jobs, settings, requests)
        overrides: dict[str, dict[str, float]] = {}
        for variant in sorted({key.split(":", 1)[1] for key in compute}):
            every = [o for key, obs in compute.items() if key.endswith(f":{variant}") for o in obs]
            outside_all = [v for key, values in outside.items() if key.endswith(f":{variant}") for v in values]
            overrides[variant] = _values(_fit_launch(every), outside_all)
        for key, observations in compute.items():
            launch = _fit_launch(observations)
            overrides[key] = _values(launch, outside[key])
            facts[key] = {"light_points": len(outside[key]), "stage_observations": len(observations),
                          "rms_residual_ms": round(float(np.sqrt(np.mean(
                              [(launch + t - m) ** 2 for t, m in observations]))), 3)}
        settings = dataclasses.replace(settings, variant_overrides=overrides)
    for key, points in latency_only.items():
        if key not in compute:
            overrides[key], facts[key] = _fit_outside_only(key, points, settings)
    return dataclasses.replace(settings, variant_overrides=overrides), facts


def _fit_outside_only(key: str, points: list, settings: SimSettings) -> tuple[dict[str, float], dict[str, Any]]:
    """A model and variant whose points hold no per-stage times (e.g. the reorchestrator's fused chain
    reports none): the launch cost of the variant's other models (else the defaults) and, as the time
    outside, the median of the client's average latency minus the simulated one without it."""
    variant = key.split(":", 1)[1]
    launch = settings.variant_overrides.get(variant, {}).get("launch_overhead_ms", settings.launch_overhead_ms)
    trial = dataclasses.replace(settings, variant_overrides={
        **settings.variant_overrides, key: {**_values(launch, [0.0])}})
    gaps = [record["client"]["avg_ms"] - simulate(*job, trial).summary.avg_ms for record, job in points]
    return _values(launch, gaps), {"latency_only_points": len(points),
                                   "launch_overhead_from": variant if variant in settings.variant_overrides
                                   else "defaults"}


def _values(launch_ms: float, outside_ms: list[float]) -> dict[str, float]:
    return {"launch_overhead_ms": round(launch_ms, 3), "compute_scale": 1.0,
            "request_overhead_ms": round(max(0.0, statistics.median(outside_ms)), 3), "row_device_ms": 0.0}


DEVICE_COSTS = ("launch_overhead_ms", "compute_scale", "row_device_ms")


def whole_capacity_rps(capacity: dict[str, Any] | None) -> dict[str, float]:
    """Per model, the whole model's sustained rate from a run's ``capacity.json`` (empty without one)."""
    out = {}
    for model, variants in ((capacity or {}).get("models") or {}).items():
        rate = (variants.get("whole") or {}).get("sustained_rps")
        if rate:
            out[model] = float(rate)
    return out


def rescaled(settings: SimSettings, capacity_rps: dict[str, float]) -> tuple[SimSettings, dict[str, float]]:
    """``settings`` with device costs scaled to a machine as fast as ``capacity_rps`` says.

    A shared machine's speed drifts between runs (other work on the cores). Each run measures the
    whole model's capacity first; the ratio of the calibration run's capacity to this run's scales
    the device costs of that model's variants. Returns the settings and the factor per model.
    """
    factors = {model: settings.reference_capacity_rps[model] / rate for model, rate in capacity_rps.items()
               if rate and settings.reference_capacity_rps.get(model)}
    if not factors:
        return settings, {}
    overrides = dict(settings.variant_overrides)
    variants = {key.split(":", 1)[-1] for key in overrides}
    for model, factor in factors.items():
        for variant in variants:
            base = overrides.get(f"{model}:{variant}") or overrides.get(variant) or {}
            values = {**{k: getattr(settings, k) for k in DEVICE_COSTS}, **base}
            overrides[f"{model}:{variant}"] = {**base, **{k: round(values[k] * factor, 4) for k in DEVICE_COSTS}}
    return dataclasses.replace(settings, variant_overrides=overrides), {m: round(f, 3) for m, f in factors.items()}


def write_calibration(run_dir: Path, settings: SimSettings, facts: dict[str, Any], points: list[str]) -> Path:
    """Write ``calibration.json`` (the settings, where they came from, how well each key fitted)."""
    path = Path(run_dir) / CALIBRATION_FILE
    write_json(path, {"schema_version": SCHEMA_VERSION,
                      "source": {"run": str(Path(run_dir).resolve()), "points": points, "method": METHOD,
                                 "fitted_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
                      "settings": dataclasses.asdict(settings), "fit": facts})
    return path


def read_calibration(path: str | Path, say: Callable[[str], None] | None = None) -> SimSettings:
    """The simulator settings of a ``calibration.json`` (or of a run folder holding one)."""
    path = Path(path)
    file = path / CALIBRATION_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigValidationError(f"{file}: missing; run 'stagebatch simulate --run RUN_DIR --calibrate' first "
                                    "(it fits the serving costs to that run's server statistics)")
    document = json.loads(file.read_text())
    values = document.get("settings")
    if not values:
        raise ConfigValidationError(f"{file}: holds no simulator settings; calibrate again")
    if say:
        say(f"simulator calibration from {document.get('source', {}).get('run', file)}")
    names = {f.name for f in dataclasses.fields(SimSettings)}
    return SimSettings(**{k: v for k, v in values.items() if k in names})
