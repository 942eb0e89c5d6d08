"""Fit the simulator's serving costs to a characterization run's own server statistics.

The manifest's latency tables are measured with each stage alone in one process; in the server a
launch also pays the Python backend (IPC of the tensors, request decoding), the cores are shared
with the load generator, and requests spend time outside the model's queue and compute (gRPC, the
client, the ensemble's steps, the reorchestrator's answer path). None of that is a constant we can
choose; it is measured in every run (``points.jsonl``: per point, per stage, Triton's statistics
or the reorchestrator's metrics: average batch size, queue time and compute time; and the client's
latency). Per model and variant (``MODEL:VARIANT``, and a pooled ``VARIANT`` fallback), from the
stable points whose stages formed batches of at most ``LIGHT_BATCH`` rows on average (there the
launches hardly overlap, so the times are costs), or from that key's lightest points where none is
that light (a fast model batches already at half its capacity). The load generator shares the cores:
each point's measured times are divided by its :func:`client_slowdown`, and every point is simulated
with its device costs multiplied by it (:func:`slowed`), so the fitted costs are the server's own:

- ``compute_scale`` per model (:func:`_batch_scales`): how the server's launch time grows with the
  tables' time, from the whole model's light points together with its *overloaded* ones (unstable,
  under ``SATURATED`` of the offered rate completed: batches of about ``max_batch_size``), by least
  squares; 1 where the run has no overloaded point;
- ``launch_overhead_ms``: the mean excess of the measured compute time of each stage (per request as
  Triton averages it, per launch for the reorchestrator) over ``compute_scale`` x the tables' time of
  the batches the simulator forms at that point. The batches depend on the costs, so the fit is
  repeated. The reorchestrator's stage launches (not its inline runs) happen only where its policy
  splits batches, which light points do not: where no light point has any, its heavy points' are used;
- ``request_overhead_ms``: the median over those points of what a request spends outside the
  server's queues and stages (the client's average latency minus the server's; for the
  reorchestrator, each request's own arrival-to-exit record);
- the reorchestrator (``MODEL:reorch``): a stage whose simulated time holds inline runs booked without
  a launch gives no launch observation; ``inline_overhead_ms`` is the whole model's launch cost (an
  inline run is the whole model's work on the same path); ``inline_request_overhead_ms`` and
  ``request_overhead_ms`` are the outside times of the requests answered inline and of the others,
  from its per-request records; ``handoff_ms`` is fitted from the front model's compute per request;
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
MOSTLY_INLINE = 0.9  # a point whose reorchestrator answered at least this share inline: its front model's time is theirs
LIGHT_LOAD = 0.6  # ... or, for a model batching more even at light load, on its lightest points up to this x capacity
SATURATED = 0.95  # a point whose window completed under this share of the offered rate ran over capacity
MAX_BATCH_SCALE = 3.0  # a fitted compute_scale stays within [1/3, 3]
MIN_TABLE_SPREAD = 1.5  # the overloaded points' tables must be this many times the light points' to fit a slope
MIN_HANDOFF_WEIGHT = 0.5  # sum of squared handed-over shares below which the hand-off time is not fitted
INLINE_OPERATIONS = ("whole", "fuse")  # backends.reorch.cost.WHOLE / FUSE as the records spell them
DEVICE_SLOTS = (1, 2)  # one launch at a time on the cores, or two of different models side by side
METHOD = (f"per MODEL:VARIANT over the stable points with batches <= {LIGHT_BATCH} rows (else its lightest points); "
          "every measured time divided by the point's load-generator slowdown (cores / (cores - sender cores)): "
          "compute_scale per model = least-squares slope of the whole model's measured compute on the tables' time "
          "over its light and overloaded points; launch_overhead_ms = mean of "
          "measured per-stage compute (Triton statistics / reorch metrics) minus compute_scale x the tables' time of the simulated "
          "batches; request_overhead_ms = median(client latency - server queue and compute), for the reorchestrator "
          "per answer path (inline / response sender) from its per-request records; reorch inline_overhead_ms = the "
          "whole model's launch_overhead_ms; handoff_ms from the front model's compute; device_slots (1 or 2) "
          "by the smaller median |p50 error|")


def _fit_launch(observations: list[tuple[float, float]], scale: float = 1.0) -> float:
    """``launch_overhead_ms`` of ``measured = launch + scale x table`` over (table, measured) pairs: the
    mean excess. ``scale`` comes from :func:`_batch_scales`: light points alone form batches of about
    one row, so a slope fitted to them would be told apart from the intercept only by the differences
    between stages, not by batch size, and it extrapolated badly to the large batches of heavy load.
    """
    return max(0.0, statistics.fmean(m - scale * t for t, m in observations))


def front_model_stats(record: dict[str, Any]) -> dict[str, Any] | None:
    """The reorchestrator's front model's Triton statistics at a point (its ``execute``: batches run
    inline and batches handed to the scheduler), or None."""
    server = record.get("server") or {}
    name = (server.get("reorch") or {}).get("model")
    return (server.get("models") or {}).get(name) if name else None


def _ran_inline(server: dict[str, Any]) -> bool:
    """A reorchestrator record of a request answered inline (``ReorchEngine.run_inline``: a fused
    operation at stage 0 that entered stage 0 the moment it arrived)."""
    ops = server.get("ops") or []
    return bool(ops) and ops[0].get("op") in INLINE_OPERATIONS and server.get("stage0_entry_us") == server["arrival_us"]


def _outside_ms(record: dict[str, Any], requests: list[dict] | None, front: dict[str, Any] | None = None,
                handed: float = 0.0, handoff_ms: float = 0.0) -> tuple[float | None, float | None]:
    """What an answer spends outside the server's queues and stages, on average (ms): (the requests
    answered through the scheduler or any other model's, the reorchestrator's answered inline).

    From the reorchestrator's per-request records where there are (client latency minus its
    arrival-to-exit time, which starts inside the front model's ``execute``; less the front model's
    queue, and for requests handed to the scheduler the hand-off time: the simulator models both),
    split by how the request was answered (inline: one response from ``execute``, like the whole
    model; else through the response sender). Else the client's average minus the time in the server:
    the stages' queue and compute, or for the reorchestrator its front model's queue and compute plus,
    for the ``handed`` share, the stages'.
    """
    front_queue_us = (front.get("avg_queue_us") or 0.0) if front else 0.0
    timed = [(_ran_inline(r["server"]), r["latency_us"], r["server"]["exit_us"] - r["server"]["arrival_us"])
             for r in requests or ()
             if r["ok"] and r.get("server") and "exit_us" in r["server"] and "arrival_us" in r["server"]]
    if timed:
        through = [latency - inside for inline, latency, inside in timed if not inline]
        inline = [(latency, inside) for ran_inline, latency, inside in timed if ran_inline]
        inline_ms = None
        if inline and front is not None and front.get("avg_compute_us") is not None \
                and len(inline) >= MOSTLY_INLINE * len(timed):
            # The records start inside execute, after the request was read; the simulator books the whole
            # execute as the launch (inline_overhead_ms is the whole model's launch cost). Triton's own
            # compute of the front model holds all of it: the outside time is measured like the whole model's.
            inline_ms = (statistics.fmean(latency for latency, _ in inline) - front_queue_us
                         - front["avg_compute_us"]) / 1000.0
        elif inline:
            inline_ms = (statistics.fmean(latency - inside for latency, inside in inline) - front_queue_us) / 1000.0
        return ((statistics.fmean(through) - front_queue_us) / 1000.0 - handoff_ms if through else None, inline_ms)
    stages_us = sum((s.get("avg_compute_us") or 0.0) + (s.get("avg_queue_us") or 0.0)
                    for s in record["server"]["stages"])
    in_server_us = stages_us if front is None else front_queue_us + front["avg_compute_us"] + handed * stages_us
    return record["client"]["avg_ms"] - in_server_us / 1000.0, None


def _largest_batch(record: dict[str, Any], front: dict[str, Any] | None) -> float:
    """The largest average batch (rows) any stage or the reorchestrator's front model formed at a point."""
    stages = ((record.get("server") or {}).get("stages")) or []
    sizes = [s.get("avg_batch_size") or 1.0 for s in stages] + ([front.get("avg_batch_size") or 1.0] if front else [])
    return max(sizes, default=1.0)


def _light_limits(jobs) -> dict[str, float]:
    """Per MODEL:VARIANT, the largest average batch a point may have formed to be fitted on:
    ``LIGHT_BATCH``, or the lightest of that key's points run at most ``LIGHT_LOAD`` x capacity where
    none is that light (none: the key takes the variant's pooled costs).

    A model as fast as lstm small forms batches of about 2 rows already at half its capacity; without
    its own points it took the costs pooled over the other models (3.3 ms per launch, where its own
    launches cost about what its tables say) and was predicted 50% too slow at light load."""
    lightest: dict[str, float] = {}
    for record, (profile, config, _) in jobs:
        multiple = (record.get("load") or {}).get("multiple")
        if multiple is not None and multiple > LIGHT_LOAD:
            continue  # near capacity the launches overlap and queue: those times are contention, not costs
        front = front_model_stats(record) if config.variant == "reorch" else None
        key = f"{profile.name}:{config.variant}"
        lightest[key] = min(lightest.get(key, float("inf")), _largest_batch(record, front))
    return {key: max(LIGHT_BATCH, value) for key, value in lightest.items()}


def _observations(jobs, settings: SimSettings, requests: dict[int, list], cores: int) -> tuple[dict[str, list], ...]:
    """Per MODEL:VARIANT: (table ms, measured compute ms) pairs of launches; outside-the-server
    latencies (ms); the reorchestrator front's (simulated hand-off share, measured minus simulated
    inline time per request, ms); and the points without any per-stage or front times."""
    compute: dict[str, list] = defaultdict(list)
    heavy_compute: dict[str, list] = defaultdict(list)
    outside: dict[str, list] = defaultdict(list)
    outside_inline: dict[str, list] = defaultdict(list)
    handoff: dict[str, list] = defaultdict(list)
    latency_only: dict[str, list] = defaultdict(list)
    light_limits = _light_limits(jobs)
    for record, job in jobs:
        profile, config, workload = job
        key = f"{profile.name}:{config.variant}"
        measured_stages = ((record.get("server") or {}).get("stages")) or []
        front = front_model_stats(record) if config.variant == "reorch" else None
        front_timed = front is not None and front.get("avg_compute_us") is not None
        stage_timed = bool(measured_stages) and all(s.get("avg_compute_us") is not None for s in measured_stages)
        if not stage_timed and not front_timed:
            latency_only[key].append((record, job))
            continue
        light = _largest_batch(record, front) <= light_limits.get(key, LIGHT_BATCH)
        if not light and config.variant != "reorch":
            continue  # launches overlap, requests queue and the load generator competes: times are not costs
        factor = client_slowdown(record, cores)
        point_settings = settings.for_variant(config.variant, profile.name)
        result = simulate(profile, config, workload, slowed(settings, factor))
        per_request = config.variant != "reorch"  # Triton averages compute per request; reorch per launch
        for simulated, measured in zip(result.stage_batches, measured_stages if stage_timed else []):
            table = simulated["row_avg_table_ms" if per_request else "avg_table_ms"]
            if table is None or measured.get("avg_compute_us") is None or simulated.get("unlaunched_ms"):
                continue  # no launch here, or time of inline runs booked without one: not a launch's cost
            (compute if light else heavy_compute)[key].append((table, measured["avg_compute_us"] / 1000.0 / factor))
        if not light:
            continue  # a heavy reorchestrator point gives its stage launches only (where no light point has any)
        handed = 0.0
        if front_timed:
            simulated_front = result.stage_batches[-1]
            handed = 1.0 - (simulated_front.get("inline_share") or 0.0)
            inline_ms = (simulated_front.get("row_avg_launch_ms") or 0.0) / factor - point_settings.handoff_ms * handed
            handoff[key].append((handed, front["avg_compute_us"] / 1000.0 / factor - inline_ms))
        through, inline = _outside_ms(record, requests.get(record.get("index")), front if front_timed else None,
                                      handed, point_settings.handoff_ms)
        for values, value in ((outside[key], through), (outside_inline[key], inline)):
            if value is not None:
                values.append(value)
    for key, observations in heavy_compute.items():
        if not compute.get(key):
            # The reorchestrator's stage launches (not its inline runs) happen where its policy splits batches:
            # under bursts, at heavy load; light points run everything inline. Those launches are its only ones.
            compute[key] = observations
    return compute, (outside, outside_inline), handoff, latency_only


def _saturated(record: dict[str, Any]) -> bool:
    """A point run over capacity: unstable, and its window completed under ``SATURATED`` of the rate it
    offered (every stage then forms its largest batches)."""
    offered, achieved = record.get("offered_rps"), record.get("achieved_rps")
    return (record.get("status", "ok") == "ok" and not record.get("stable") and bool(offered)
            and achieved is not None and achieved < SATURATED * offered)


def _batch_scales(jobs, overloaded, settings: SimSettings, cores: int) -> dict[str, float]:
    """Per model, ``compute_scale``: how the server's launch time grows with the tables' time, fitted on
    its whole model's light points (batches of about a row) together with its overloaded ones (batches
    of about ``max_batch_size``): ``measured = launch + scale x table`` by least squares.

    The light points alone cannot tell a cost per launch from one per row of table time (their batches
    are all about one row). bert_base small at 1.3x capacity took 22.4 ms a launch of 8 rows, where its
    tables (padded to the batches' lengths) say 14.6 ms and its light points 3.1 ms more per launch:
    a simulated burst ran 20% faster than the server's and its queue held half as long."""
    light: dict[str, list[tuple[float, float]]] = defaultdict(list)
    limits = _light_limits(jobs)
    for record, (profile, config, workload) in [*jobs, *overloaded]:
        if config.variant != "whole":
            continue
        stages = ((record.get("server") or {}).get("stages")) or []
        if len(stages) != 1 or stages[0].get("avg_compute_us") is None:
            continue
        heavy = _saturated(record)
        if not heavy and (stages[0].get("avg_batch_size") or 1.0) > limits.get(f"{profile.name}:whole", LIGHT_BATCH):
            continue
        factor = client_slowdown(record, cores)
        simulated = simulate(profile, config, workload, slowed(settings, factor)).stage_batches[0]
        if simulated.get("row_avg_table_ms") is not None:
            light[profile.name].append((simulated["row_avg_table_ms"], stages[0]["avg_compute_us"] / 1000.0 / factor, heavy))
    scales = {}
    for model, observations in light.items():
        heavy_tables = [t for t, _, heavy in observations if heavy]
        light_tables = [t for t, _, heavy in observations if not heavy]
        if not heavy_tables or not light_tables or statistics.fmean(heavy_tables) < MIN_TABLE_SPREAD * statistics.fmean(
                light_tables):
            continue  # no batches large enough (in the simulation too) to tell a slope from the launch cost
        tables = np.array([t for t, _, _ in observations])
        measured = np.array([m for _, m, _ in observations])
        slope = float(np.polyfit(tables, measured, 1)[0])
        scales[model] = round(min(MAX_BATCH_SCALE, max(1.0 / MAX_BATCH_SCALE, slope)), 3)
    return scales


def _fit_handoff(observations: list[tuple[float, float]], default: float) -> float:
    """``handoff_ms`` of ``measured front time = inline time + handoff x handed share`` (least squares through
    the origin), or ``default`` where almost nothing was handed over (the points cannot tell it)."""
    weight = sum(share * share for share, _ in observations)
    if weight < MIN_HANDOFF_WEIGHT:
        return default
    return max(0.0, sum(share * excess for share, excess in observations) / weight)


def usable(record: dict[str, Any]) -> bool:
    """A point the calibration may use: stable, with the client's figures."""
    return bool(record.get("stable") and (record.get("client") or {}).get("avg_ms") is not None)


def fit(jobs, base: SimSettings | None = None, requests: dict[int, list] | None = None,
        error: Callable[[list, SimSettings], dict[str, float]] | None = None,
        cores: int = 0) -> tuple[SimSettings, dict[str, Any]]:
    """Fitted settings and the fit's facts from ``(point record, (profile, config, workload))`` pairs.

    ``requests``: the run's per-request rows by point index (``loadtest.rundir.read_requests``).
    ``cores``: the run machine's cores; each point's measured times are divided by its
    :func:`client_slowdown` (the load generator's share of the cores), so the fitted costs are the
    server's own (0: not corrected).
    ``error(jobs, settings)``: median |p50 error| per variant; with it, ``device_slots`` (1 or 2: do
    launches of different models overlap on the cores?) is chosen per variant by the smaller error.
    """
    overloaded = [(record, job) for record, job in jobs if job is not None and _saturated(record)]
    jobs = [(record, job) for record, job in jobs if job is not None and usable(record)]
    if not jobs:
        raise ConfigValidationError("no stable point with server statistics per stage to calibrate from; "
                                    "calibrate from a characterization run whose points were sustained")
    if error is None:
        return _fit_costs(jobs, base or SimSettings(), requests or {}, cores, overloaded)
    fits = {slots: _fit_costs(jobs, dataclasses.replace(base or SimSettings(), device_slots=slots), requests or {}, cores,
                              overloaded)
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


def _fit_costs(jobs, base: SimSettings, requests: dict[int, list], cores: int,
               overloaded: list = ()) -> tuple[SimSettings, dict[str, Any]]:
    settings = dataclasses.replace(base, variant_overrides={})
    facts: dict[str, Any] = {}
    scales: dict[str, float] = {}
    for _ in range(ITERATIONS):
        compute, (outside, outside_inline), handoff, latency_only = _observations(jobs, settings, requests, cores)
        overrides: dict[str, dict[str, float]] = {}

        def outside_all_of(variant: str) -> list[float]:
            return [v for key, values in outside.items() if key.endswith(f":{variant}") for v in values]

        def scale_of(key: str) -> float:
            return scales.get(key.split(":", 1)[0], 1.0)

        for variant in sorted({key.split(":", 1)[1] for key in [*compute, *handoff]}):
            every = [(scale_of(key) * t, m) for key, obs in compute.items() if key.endswith(f":{variant}") for t, m in obs]
            outside_all = outside_all_of(variant)
            handed_all = [o for key, obs in handoff.items() if key.endswith(f":{variant}") for o in obs]
            launch = _fit_launch(every) if every else base.launch_overhead_ms
            overrides[variant] = _values(launch, outside_all, _fit_handoff(handed_all, base.handoff_ms))
        for key in sorted({*compute, *handoff}):
            observations = compute.get(key, [])
            variant = key.split(":", 1)[1]
            launch = _fit_launch(observations, scale_of(key)) if observations else overrides[variant]["launch_overhead_ms"]
            overrides[key] = _values(launch, outside[key] or outside_all_of(variant), _fit_handoff(
                handoff.get(key, []), overrides[variant]["handoff_ms"]), scale_of(key))
            if outside_inline.get(key):
                overrides[key]["inline_request_overhead_ms"] = round(max(0.0, statistics.median(outside_inline[key])), 3)
            facts[key] = {"light_points": len(outside[key]) + len(outside_inline.get(key, [])), "stage_observations": len(observations),
                          "rms_residual_ms": round(float(np.sqrt(np.mean(
                              [(launch + scale_of(key) * t - m) ** 2 for t, m in observations]))), 3) if observations else None}
            if key in handoff:
                facts[key]["front_observations"] = len(handoff[key])
        settings = _with_inline_costs(dataclasses.replace(settings, variant_overrides=overrides))
        scales = _batch_scales(jobs, overloaded, settings, cores)
    for key, points in latency_only.items():
        if key not in overrides:
            overrides[key], facts[key] = _fit_outside_only(key, points, settings, cores)
    return _with_inline_costs(dataclasses.replace(settings, variant_overrides=overrides)), facts


def _with_inline_costs(settings: SimSettings) -> SimSettings:
    """Each reorchestrator key's ``inline_overhead_ms`` := the whole model's ``launch_overhead_ms`` (and
    its ``inline_request_overhead_ms`` := the whole model's ``request_overhead_ms`` where the run's
    records answered no request inline at a light point).

    A batch the reorchestrator runs inline is the whole model's work on the same path: one Python
    backend ``execute`` with the batch, the whole model's graph, one response message. Its own front
    statistics cannot tell it apart from the hand-off time where nearly every batch runs inline.
    """
    overrides = dict(settings.variant_overrides)
    for key in [k for k in overrides if k.endswith("reorch")]:
        model = key.split(":", 1)[0] if ":" in key else None
        whole = (overrides.get(f"{model}:whole") if model else None) or overrides.get("whole")
        if whole is not None:
            overrides[key] = {"inline_request_overhead_ms": whole["request_overhead_ms"], **overrides[key],
                              "inline_overhead_ms": whole["launch_overhead_ms"]}
    return dataclasses.replace(settings, variant_overrides=overrides)


def _fit_outside_only(key: str, points: list, settings: SimSettings,
                      cores: int) -> tuple[dict[str, float], dict[str, Any]]:
    """A model and variant whose points hold no per-stage times (e.g. the reorchestrator's fused chain
    reports none): the launch cost of the variant's other models (else the defaults) and, as the time
    outside, the median of the client's average latency minus the simulated one without it."""
    variant = key.split(":", 1)[1]
    launch = settings.variant_overrides.get(variant, {}).get("launch_overhead_ms", settings.launch_overhead_ms)
    trial = dataclasses.replace(settings, variant_overrides={
        **settings.variant_overrides, key: {**_values(launch, [0.0])}})
    gaps = [record["client"]["avg_ms"] - simulate(*job, slowed(trial, client_slowdown(record, cores))).summary.avg_ms
            for record, job in points]
    return _values(launch, gaps), {"latency_only_points": len(points),
                                   "launch_overhead_from": variant if variant in settings.variant_overrides
                                   else "defaults"}


def _values(launch_ms: float, outside_ms: list[float], handoff_ms: float = 0.0,
            compute_scale: float = 1.0) -> dict[str, float]:
    return {"launch_overhead_ms": round(launch_ms, 3), "compute_scale": compute_scale,
            "request_overhead_ms": round(max(0.0, statistics.median(outside_ms)), 3) if outside_ms else 0.0,
            "row_device_ms": 0.0, "handoff_ms": round(handoff_ms, 3)}


DEVICE_COSTS = ("launch_overhead_ms", "compute_scale", "row_device_ms", "inline_overhead_ms", "handoff_ms")
MAX_CLIENT_SHARE = 0.5  # the load generator is never taken to hold more than this share of the machine's cores


def client_slowdown(record: dict[str, Any], cores: int) -> float:
    """How much slower the server's CPU work ran at a point because the load generator shared the cores.

    The run records the busiest sender process's CPU (``loadgen.cpu_percent``, percent of one core).
    On a machine of ``cores`` cores the server had ``cores - client`` of them: its launches take
    ``cores / (cores - client)`` times what they take alone. On 2 cores the sender takes 8% of a core
    at 100 req/s and 35% at 1,000 req/s (lstm small), so the factor goes from 1.04 to 1.2 across a
    run; a constant cost fitted at light load leaves the fast models' capacity too high. 1 where the
    run did not record it or the core count is unknown."""
    percent = (record.get("loadgen") or {}).get("cpu_percent")
    if not percent or cores <= 0:
        return 1.0
    client = min(float(percent) / 100.0, MAX_CLIENT_SHARE * cores)
    return cores / (cores - client)


def slowed(settings: SimSettings, factor: float) -> SimSettings:
    """``settings`` with every device cost (base and per variant) multiplied by ``factor``."""
    if factor == 1.0:
        return settings
    scaled = {k: getattr(settings, k) * factor for k in DEVICE_COSTS}
    overrides = {key: {**values, **{k: values[k] * factor for k in DEVICE_COSTS if k in values}}
                 for key, values in settings.variant_overrides.items()}
    return dataclasses.replace(settings, variant_overrides=overrides, **scaled)


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
