"""The configuration ``stagebatch tune`` chose, as a characterization plan reads it (variant ``tuned``).

``stagebatch tune --out DIR`` writes ``DIR/tune.json`` (:data:`TUNE_FILE`, docs/tuning.md). Its
``results`` list the default whole model first (key :data:`BASELINE_KEY`), then the confirmed
configurations, best measured first. A plan's ``tuned`` variant runs the best one on the plan's
repository: its variant, request batching, number of stages and reorch policy and knobs, so the report
compares it with the default whole model at the same loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigValidationError
from slicing.manifest import VARIANTS

TUNE_FILE = "tune.json"  # stagebatch tune's output and resume state
BASELINE_KEY = "baseline"  # the default whole model's row in tune.json's results
TUNED_VARIANT = "tuned"  # the plan variant that runs the best tuned configuration


@dataclass(frozen=True)
class TunedConfig:
    """The best configuration of one ``stagebatch tune`` run, as plan point settings."""

    key: str  # the configuration's name in tune.json
    variant: str  # whole | ensemble | reorch
    batching: dict[str, Any] = field(default_factory=dict)  # plan batching knobs
    stages: int | None = None  # K (ensemble and reorch)
    reorch: dict[str, Any] = field(default_factory=dict)  # policy and knobs (reorch)
    measured_slo_rps: float | None = None  # tune's own measurement of its goodput at the SLO
    source: str = ""  # the tune.json it came from


def tune_file(path: str | Path) -> Path:
    """``path`` itself when it is a file, else ``path/tune.json``."""
    path = Path(path)
    return path if path.is_file() else path / TUNE_FILE


def read_tuned(path: str | Path, model: str) -> TunedConfig:
    """The best confirmed configuration in a tune output (a folder holding tune.json, or the file).

    Raises:
        ConfigValidationError: no tune.json, a tuning of another model, or no confirmed configuration.
    """
    file = tune_file(path)
    if not file.is_file():
        raise ConfigValidationError(f"{path}: no {TUNE_FILE}; run `stagebatch tune --model {model} --out {path}` "
                                    "first, or point `tuned` at its output folder")
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigValidationError(f"{file}: not a tune result ({error})") from None
    if state.get("model") != model:
        raise ConfigValidationError(f"{file}: it tuned {state.get('model')!r}, not {model!r}")
    rows = [row for row in state.get("results") or [] if row.get("key") != BASELINE_KEY]
    best = next((row for row in rows if row.get("measured_slo_rps") is not None), None)
    if best is None:
        raise ConfigValidationError(f"{file}: no confirmed configuration yet (the tuning stopped before measuring "
                                    "one); resume it with `stagebatch tune --resume`")
    if best.get("variant") not in VARIANTS:
        raise ConfigValidationError(f"{file}: best configuration has variant {best.get('variant')!r}, "
                                    f"not one of {', '.join(VARIANTS)}")
    reorch = best.get("reorch") or {}
    return TunedConfig(
        key=str(best["key"]), variant=best["variant"], batching=dict(best.get("batching") or {}),
        stages=best.get("stages") if best["variant"] != "whole" else None,
        reorch={key: value for key, value in reorch.items() if value not in (None, {})},
        measured_slo_rps=best.get("measured_slo_rps"), source=str(file))
