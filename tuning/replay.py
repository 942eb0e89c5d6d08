"""Simulate every measured point of a characterization run and report the simulator's own error.

The run folder is read through ``loadtest.rundir`` (points, environment -> repository -> manifest).
Each point's model, variant, policy and knobs, batching knobs, arrival (with the rate it actually
ran at), lengths, window and SLO are replayed in virtual time. The result goes to
``simulation.json`` in the run folder (:data:`SIMULATION_FILE`; fields in docs/tuning.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.rundir import SIMULATION_FILE, read_environment, read_points, write_json
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import ConfigValidationError
from core.manifest import find_manifest
from tuning.batcher import BatcherSettings
from tuning.simulate import LATENCY_SOURCE_WHOLE, ModelProfile, SimSettings, VariantConfig, Workload, simulate

SCHEMA_VERSION = 1
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
    candidates = [Path(environment["repository"])] if environment.get("repository") else []
    candidates.append(run_dir / "repository")
    for repository in candidates:
        if not repository.is_absolute():
            repository = run_dir / repository
        found = find_manifest(repository)
        if found is not None:
            return found.raw
    raise ConfigValidationError(f"{run_dir}: no manifest.json in the run's repository ({', '.join(map(str, candidates))}); "
                                "the repository must still exist to simulate the run")


def point_config(point: dict[str, Any], profile: ModelProfile) -> VariantConfig:
    """The served configuration of one ``points.jsonl`` point."""
    batcher = BatcherSettings.from_batching(point.get("batching") or {}, profile.default_batcher())
    reorch = point.get("reorch") or {}
    if point["variant"] != "reorch":
        return VariantConfig(point["variant"], batcher)
    return VariantConfig("reorch", batcher, policy=reorch.get("policy"),
                         knobs=tuple(sorted((reorch.get("knobs") or {}).items())))


def point_workload(point: dict[str, Any]) -> Workload:
    arrival = _spec(ArrivalSpec, point["arrival"])
    return Workload(arrival=arrival, lengths=_spec(LengthSpec, point.get("lengths")),
                    duration_s=float(point["duration_s"]), warmup_s=float(point.get("warmup_s", 0.0)),
                    slo_ms=float(point["slo_ms"]), seed=int(point.get("seed", 0)))


def _relative_error(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or not measured:
        return None
    return round((simulated - measured) / measured, 4)


CALIBRATION_GRID = {"launch_overhead_ms": (0.3, 1.0, 2.0, 4.0), "row_device_ms": (0.0, 0.5, 1.0, 2.0, 3.0, 4.0),
                    "request_overhead_ms": (0.3, 2.0, 4.0, 6.0)}


def _replayable(run_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
    """Each point record with its row stub and what to simulate (None and a reason when it cannot be)."""
    manifest = run_manifest(run_dir)
    out = []
    for record in read_points(run_dir):
        point = record.get("point") or {}
        row: dict[str, Any] = {"index": record.get("index"), "point_id": point.get("point_id"),
                               "model": point.get("model"), "variant": point.get("variant"),
                               "rate_rps": (point.get("arrival") or {}).get("rate_rps"),
                               "stable": record.get("stable"), "repeat": record.get("repeat")}
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


def _evaluate(jobs, settings: SimSettings) -> list[dict[str, Any]]:
    rows = []
    for record, stub, job in jobs:
        row = dict(stub)
        rows.append(row)
        if job is None:
            continue
        profile, config, workload = job
        try:
            result = simulate(profile, config, workload, settings)
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
    return rows


def _fit_error(rows: list[dict[str, Any]], variant: str) -> float:
    """Median |p50 error| over every simulated point of ``variant`` (stable ones alone are often too few)."""
    value = summarize_errors([r for r in rows if r.get("variant") == variant])["median_abs_error_p50"]
    return float("inf") if value is None else value


def replay_run(run_dir: str | Path, settings: SimSettings | None = None, *, calibrate: bool = False,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Simulate every complete point of ``run_dir``; write and return ``simulation.json``.

    ``calibrate``: also fit the overheads (:data:`CALIBRATION_GRID`) to this run's points, per variant
    (whole / ensemble / reorch: least median |p50 error| over that variant's points; they pay different
    serving costs). The calibrated figures are in-sample:
    they say how well the model *can* fit, the default ones how well it predicts.
    """
    run_dir = Path(run_dir)
    settings = settings or SimSettings()
    jobs = _replayable(run_dir)
    rows = _evaluate(jobs, settings)
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "settings": dataclasses.asdict(settings),
                                "whole_latency_source": LATENCY_SOURCE_WHOLE, "points": rows,
                                "summary": summarize_errors(rows)}
    if calibrate:
        variants = sorted({r["variant"] for r in rows if "error" in r})
        best = {v: (_fit_error(rows, v), {}) for v in variants}
        names = list(CALIBRATION_GRID)
        for values in itertools.product(*(CALIBRATION_GRID[n] for n in names)):
            combo = dict(zip(names, values))
            trial_rows = _evaluate(jobs, dataclasses.replace(settings, **combo))
            for variant in variants:
                error = _fit_error(trial_rows, variant)
                if error < best[variant][0]:
                    best[variant] = (error, combo)
        fitted = dataclasses.replace(settings, variant_overrides={v: combo for v, (_, combo) in best.items() if combo})
        fitted_rows = _evaluate(jobs, fitted)
        document["calibration"] = {"in_sample": True, "grid": {k: list(v) for k, v in CALIBRATION_GRID.items()},
                                   "settings": dataclasses.asdict(fitted), "points": fitted_rows,
                                   "summary": summarize_errors(fitted_rows)}
    if progress:
        for row in rows:
            if "error" in row and row["error"]["p50"] is not None:
                progress(f"{row['point_id']}: p50 measured {row['measured']['p50_ms']} ms, simulated "
                         f"{row['simulated']['p50_ms']} ms ({row['error']['p50']:+.0%})")
            else:
                progress(f"{row['point_id']}: {row.get('skipped', 'no p50')}")
    write_json(run_dir / SIMULATION_FILE, document)
    return document


def calibrated_settings(path: str | Path) -> SimSettings:
    """The calibrated simulator settings of a ``simulation.json`` (or of a run folder holding one)."""
    path = Path(path)
    file = path / SIMULATION_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigValidationError(f"{file}: missing; run 'stagebatch simulate --run RUN_DIR --calibrate' first")
    document = json.loads(file.read_text())
    values = (document.get("calibration") or {}).get("settings") or document.get("settings")
    if not values:
        raise ConfigValidationError(f"{file}: holds no simulator settings")
    names = {f.name for f in dataclasses.fields(SimSettings)}
    return SimSettings(**{k: v for k, v in values.items() if k in names})


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
    return summary
