"""Simulate every measured point of a characterization run and report the simulator's own error.

The run folder is read through ``loadtest.rundir`` (points, environment -> repository -> manifest).
Each point's model, variant, policy and knobs, batching knobs, arrival (with the rate it actually
ran at), lengths, window and SLO are replayed in virtual time. The result goes to
``simulation.json`` in the run folder (:data:`SIMULATION_FILE`; fields in docs/tuning.md).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.rundir import (
    REQUESTS_FILE,
    SIMULATION_FILE,
    read_capacity,
    read_environment,
    read_points,
    read_requests,
    write_json,
)
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import ConfigValidationError
from core.manifest import find_manifest
from tuning.batcher import BatcherSettings
from tuning.calibrate import (
    client_slowdown,
    fit,
    front_model_stats,
    rescaled,
    slowed,
    usable,
    whole_capacity_rps,
    write_calibration,
)
from tuning.simulate import FRONT, LATENCY_SOURCE_WHOLE, ModelProfile, SimSettings, VariantConfig, Workload, simulate

SCHEMA_VERSION = 1
CROSS_VALIDATION_FOLDS = 5
ERROR_TARGET = 0.25  # the bar: median relative error of p50 over the stable points
COMPARED = ("p50_ms", "avg_ms", "p99_ms", "throughput_rps")


def _spec(cls: type, data: dict[str, Any] | None):
    if not data:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def run_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of the repository the run served (``environment.json``'s ``repository``)."""
    environment = read_environment(run_dir)
    # the recorded path as written at run time (absolute, or relative to where the run started),
    # then the same relative to the run folder, then the run's own repository/ folder
    recorded = [Path(environment["repository"])] if environment.get("repository") else []
    candidates = [*recorded, *(run_dir / path for path in recorded if not path.is_absolute()), run_dir / "repository"]
    for repository in candidates:
        found = find_manifest(repository)
        if found is not None:
            return found.raw
    raise ConfigValidationError(f"{run_dir}: no manifest.json in the run's repository ({', '.join(map(str, candidates))}); "
                                "the repository must still exist to simulate the run")


def run_cores(run_dir: Path) -> int:
    """The logical cores of the machine the run measured on (``environment.json``; 0 when not recorded)."""
    return int((read_environment(run_dir).get("hardware") or {}).get("cpu_cores_logical") or 0)


def point_config(point: dict[str, Any], profile: ModelProfile) -> VariantConfig:
    """The served configuration of one ``points.jsonl`` point."""
    batcher = BatcherSettings.from_batching(point.get("batching") or {}, profile.default_batcher())
    reorch = point.get("reorch") or {}
    if point["variant"] != "reorch":
        return VariantConfig(point["variant"], batcher)
    return VariantConfig("reorch", batcher, policy=reorch.get("policy"),
                         knobs=tuple(sorted((reorch.get("knobs") or {}).items())))


def point_workload(point: dict[str, Any]) -> Workload:
    """What the point sent: a point's ``duration_s`` is its measured window, after ``warmup_s``; the
    simulator's ``duration_s`` holds both (its window is ``[warmup_s, duration_s)``)."""
    arrival = _spec(ArrivalSpec, point["arrival"])
    warmup_s = float(point.get("warmup_s", 0.0))
    return Workload(arrival=arrival, lengths=_spec(LengthSpec, point.get("lengths")),
                    duration_s=warmup_s + float(point["duration_s"]), warmup_s=warmup_s,
                    slo_ms=float(point["slo_ms"]), seed=int(point.get("seed", 0)))


def _relative_error(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or not measured:
        return None
    return round((simulated - measured) / measured, 4)


def _replayable(run_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
    """Each point record with its row stub and what to simulate (None and a reason when it cannot be)."""
    manifest = run_manifest(run_dir)
    out = []
    for record in read_points(run_dir):
        point = record.get("point") or {}
        row: dict[str, Any] = {"index": record.get("index"), "point_id": point.get("point_id"),
                               "model": point.get("model"), "variant": point.get("variant"),
                               "rate_rps": (point.get("arrival") or {}).get("rate_rps"),
                               "stable": record.get("stable"), "repeat": record.get("repeat"),
                               "comparison_key": point.get("comparison_key") if point.get("repeats", 1) > 1 else None}
        job = None
        entry = (manifest.get("models") or {}).get(point.get("model"))
        stages = (point.get("slicing") or {}).get("stages")
        if record.get("status", "ok") != "ok" or not record.get("client"):
            row["skipped"] = "the point failed; nothing measured"
        elif entry is None:
            row["skipped"] = f"model {point.get('model')!r} is not in the run's manifest"
        elif stages and point["variant"] != "whole" and int(stages) != len(entry.get("stages", [])):
            row["skipped"] = (f"built with K={stages}; the manifest holds the profile of K={len(entry['stages'])} "
                              "only (the last build)")
        else:
            try:
                profile = ModelProfile.from_manifest_entry(point["model"], entry)
                job = (profile, point_config(point, profile), point_workload(point))
            except Exception as error:  # noqa: BLE001 - one point that cannot be replayed does not stop the others
                row["skipped"] = f"{type(error).__name__}: {error}"
        out.append((record, row, job))
    return out


def _stage_rows(simulated: list[dict[str, Any]], measured: list[dict[str, Any]], per_request: bool) -> list[dict]:
    """Per stage (and the reorchestrator's front model, ``front``, as Triton counts it: per request):
    measured and simulated average batch size and compute time (ms)."""
    rows = []
    for sim, meas in zip(simulated, measured):
        compute_us = meas.get("avg_compute_us")
        request_average = per_request or sim["stage"] == FRONT
        rows.append({"stage": sim["stage"], "measured_batch": _round(meas.get("avg_batch_size")),
                     "simulated_batch": sim.get("avg_batch_size"),
                     "measured_compute_ms": None if compute_us is None else round(compute_us / 1000.0, 3),
                     "simulated_compute_ms": sim.get("row_avg_launch_ms" if request_average else "avg_launch_ms")})
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _evaluate(jobs, settings: SimSettings, cores: int) -> list[dict[str, Any]]:
    rows = []
    for record, stub, job in jobs:
        row = dict(stub)
        rows.append(row)
        if job is None:
            continue
        profile, config, workload = job
        try:
            result = simulate(profile, config, workload, slowed(settings, client_slowdown(record, cores)))
        except Exception as error:  # noqa: BLE001 - as above
            row["skipped"] = f"{type(error).__name__}: {error}"
            continue
        simulated = result.to_dict()
        measured = record["client"]
        row["label"] = config.label
        row["measured"] = {k: measured.get(k) for k in COMPARED}
        row["simulated"] = {k: simulated.get(k) for k in COMPARED}
        row["simulated"]["stable"] = result.stable
        row["error"] = {k.removesuffix("_ms").removesuffix("_rps"): _relative_error(simulated.get(k), measured.get(k))
                        for k in COMPARED}
        stages = ((record.get("server") or {}).get("stages")) or []
        front = front_model_stats(record) if config.variant == "reorch" else None
        if stages and front is not None:
            stages = [*stages, front]
        if stages:
            row["stages"] = _stage_rows(simulated["stages"], stages, per_request=config.variant != "reorch")
            batch_errors = [_relative_error(s["simulated_batch"], s["measured_batch"]) for s in row["stages"]]
            batch_errors = [abs(e) for e in batch_errors if e is not None]
            row["error"]["batch"] = round(max(batch_errors), 4) if batch_errors else None
    return rows


def _variant_errors(jobs, settings: SimSettings, cores: int) -> dict[str, float]:
    """Median |p50 error| per variant over ``(record, job)`` pairs (for the calibration's choices)."""
    rows = _evaluate([(record, {"variant": record["point"]["variant"], "stable": True}, job) for record, job in jobs],
                     settings, cores)
    return {variant: figures["stable_median_abs_error_p50"]
            for variant, figures in summarize_errors(rows)["per_variant"].items()}


def replay_run(run_dir: str | Path, settings: SimSettings | None = None, *, calibrate: bool = False,
               calibration_source: str | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Simulate every complete point of ``run_dir``; write and return ``simulation.json``.

    ``calibrate``: first fit the serving costs to this run's server statistics
    (``tuning.calibrate``), write ``calibration.json`` here and simulate with them; the error is then
    in-sample. Otherwise ``settings`` are used as given (``calibration_source`` says where they came
    from: another run's ``calibration.json`` makes the error a prediction).
    """
    run_dir = Path(run_dir)
    settings = base = settings or SimSettings()
    jobs = _replayable(run_dir)
    cores = run_cores(run_dir)
    if calibrate:
        requests_path = run_dir / REQUESTS_FILE
        requests = read_requests(requests_path) if requests_path.is_file() else {}
        settings, facts = _fit_run([(record, job) for record, _, job in jobs], settings, requests, cores)
        used = [record["point"]["point_id"] for record, _, job in jobs if job is not None and usable(record)]
        settings = dataclasses.replace(settings, reference_capacity_rps=whole_capacity_rps(read_capacity(run_dir)))
        calibration_source = str(write_calibration(run_dir, settings, facts, used))
    speed: dict[str, float] = {}
    if not calibrate and settings.reference_capacity_rps:
        settings, speed = rescaled(settings, whole_capacity_rps(read_capacity(run_dir)))
    rows = _evaluate(jobs, settings, cores)
    summary = summarize_errors(rows)
    if calibrate:
        summary["cross_validated"] = cross_validated_errors(jobs, base, requests, cores)
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "settings": dataclasses.asdict(settings),
                                "costs": {"source": calibration_source or "defaults (not calibrated)",
                                                "in_sample": calibrate, "machine_speed_factor": speed},
                                "whole_latency_source": LATENCY_SOURCE_WHOLE, "points": rows,
                                "summary": summary}
    if progress:
        for row in rows:
            if "error" in row and row["error"]["p50"] is not None:
                batches = " / ".join(f"{s['measured_batch']}~{s['simulated_batch']}" for s in row.get("stages", []))
                progress(f"{'S' if row['stable'] else 'u'} {row['point_id']}: p50 measured {row['measured']['p50_ms']:.1f}"
                         f" ms, simulated {row['simulated']['p50_ms']:.1f} ms ({row['error']['p50']:+.0%}); avg "
                         f"{row['measured']['avg_ms']:.1f} ~ {row['simulated']['avg_ms']:.1f} ms; batch measured~simulated "
                         f"{batches}")
            else:
                progress(f"{row['point_id']}: {row.get('skipped', 'no p50')}")
    write_json(run_dir / SIMULATION_FILE, document)
    return document


def cross_validated_errors(jobs, base: SimSettings, requests: dict[int, list], cores: int,
                           folds: int = CROSS_VALIDATION_FOLDS) -> dict[str, Any]:
    """The calibrated simulator's error as a prediction: ``folds``-fold cross-validation over the stable points.

    The stable points are dealt round robin (in run order) into ``folds`` groups; each group is
    simulated with the costs fitted to the run's other points, so no point's own measurement enters
    the costs it is predicted with. A group whose other points cannot be fitted is left out (said in
    ``left_out``)."""
    stable = [i for i, (record, _, job) in enumerate(jobs) if job is not None and usable(record)]
    predicted: list[dict[str, Any]] = []
    left_out = 0
    for fold in range(folds):
        held = set(stable[fold::folds])
        if not held:
            continue
        training = [(record, job) for i, (record, _, job) in enumerate(jobs) if i not in held]
        try:
            fitted, _ = _fit_run(training, base, requests, cores)
        except ConfigValidationError:
            left_out += len(held)
            continue
        predicted += _evaluate([jobs[i] for i in sorted(held)], fitted, cores)
    summary = summarize_errors(predicted)  # every predicted point is stable: its stable figures are the ones
    return {"folds": folds, "points": summary["stable_points"], "left_out": left_out,
            "median_abs_error_p50": summary["stable_median_abs_error_p50"],
            "per_variant_median_abs_error_p50": {variant: figures["stable_median_abs_error_p50"]
                                                 for variant, figures in summary["per_variant"].items()}}


def _fit_run(pairs, base: SimSettings, requests: dict[int, list], cores: int) -> tuple[SimSettings, dict[str, Any]]:
    """``tuning.calibrate.fit`` of ``(record, job)`` pairs, choosing the device slots by this module's p50 errors."""
    return fit(pairs, base, requests, error=lambda chosen, trial: _variant_errors(chosen, trial, cores), cores=cores)


def summarize_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median absolute relative errors, over every simulated point and over the stable ones."""
    simulated = [r for r in rows if "error" in r]
    stable = [r for r in simulated if r.get("stable")]

    def median(points: list[dict[str, Any]], key: str) -> float | None:
        values = [abs(r["error"][key]) for r in points if r["error"].get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    summary: dict[str, Any] = {"points": len(rows), "simulated": len(simulated), "stable_points": len(stable),
                               "target": ERROR_TARGET}
    for key in ("p50", "avg", "p99"):
        summary[f"median_abs_error_{key}"] = median(simulated, key)
        summary[f"stable_median_abs_error_{key}"] = median(stable, key)
    value = summary["stable_median_abs_error_p50"]
    summary["within_target"] = None if value is None else value <= ERROR_TARGET
    summary["stable_median_abs_error_batch"] = median(stable, "batch")
    per_variant = {}
    for variant in sorted({r["variant"] for r in simulated}):
        points = [r for r in stable if r["variant"] == variant]
        per_variant[variant] = {"stable_points": len(points), "stable_median_abs_error_p50": median(points, "p50"),
                                "stable_median_abs_error_avg": median(points, "avg"),
                                "stable_median_abs_error_batch": median(points, "batch")}
    pooled = pooled_p50_errors(stable)
    for variant, figures in per_variant.items():
        errors = [abs(e) for v, e in pooled if v == variant]
        figures["pooled_median_abs_error_p50"] = round(statistics.median(errors), 4) if errors else None
    summary["per_variant"] = per_variant
    summary["pooled_points"] = len(pooled)
    summary["pooled_median_abs_error_p50"] = (round(statistics.median(abs(e) for _, e in pooled), 4)
                                              if pooled else None)
    summary["repeat_noise_p50"] = repeat_noise(simulated)
    return summary


def pooled_p50_errors(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(variant, relative p50 error) per configuration and load: repeats of one point pooled.

    Each repeated point (same ``comparison_key`` and label) is compared once: the median of the
    simulated p50s against the median of the measured ones (a point run once is its own pool).
    Against single repeats the error also holds the run's own noise (``repeat_noise``).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for index, r in enumerate(rows):
        key = f"{r['comparison_key']}/{r['label']}" if r.get("comparison_key") else f"#{index}"
        if r["measured"].get("p50_ms") and r["simulated"].get("p50_ms") is not None:
            groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        measured = statistics.median(r["measured"]["p50_ms"] for r in members)
        simulated = statistics.median(r["simulated"]["p50_ms"] for r in members)
        out.append((members[0]["variant"], (simulated - measured) / measured))
    return out


def repeat_noise(rows: list[dict[str, Any]]) -> float | None:
    """How well the run predicts itself: median |p50 error| of each stable repeat against the mean of the others.

    Points repeated in a run (same configuration and load, interleaved) differ by the machine's own
    drift; no simulator can predict a single point closer than this (None: nothing was repeated).
    """
    groups: dict[str, list[float]] = {}
    for r in rows:
        key = r.get("comparison_key")
        if key and r.get("stable") and r["measured"].get("p50_ms"):
            groups.setdefault(f"{key}/{r['label']}", []).append(r["measured"]["p50_ms"])
    errors = [abs(statistics.fmean(values[:i] + values[i + 1:]) - value) / value
              for values in groups.values() if len(values) > 1 for i, value in enumerate(values)]
    return round(statistics.median(errors), 4) if errors else None
