"""Characterization plans: read and check a plan file, and expand it into measurement points.

A plan lists models, the variants to compare, sweeps over request batching, slicing and
reorchestration knobs, and named loads. ``load_plan(path)`` checks everything that can be checked
without a server (the schema: :mod:`loadtest.plan.schema`) and raises
:class:`~core.errors.ConfigValidationError` naming the file, the line, the key, the value and the rule
broken (:mod:`loadtest.plan.located`). ``check_against_models`` checks what needs the built models (K
larger than a model allows, a max batch size above the one built) before any load runs.
``Plan.points()`` expands the sweeps into the ordered measurement points. The format is documented in
``loadtest/plans/README.md``; its JSON Schema, for editors, is ``docs/plan.schema.json``.

Example::

    plan = load_plan("loadtest/plans/quick.yaml")
    for point in plan.points():
        print(point.point_id)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr

from core.errors import ConfigValidationError
from core.model_config import BatchingOverlay, ReorchOverlay
from loadtest.plan.located import locate, read_yaml, validate
from loadtest.plan.schema import (
    CAPACITY_LABELS,
    RATE_FIELDS,
    Batching,
    Experiment,
    PlanFile,
    Slicing,
    is_relative,
    parse_rate,
    plan_json_schema,
)
from loadtest.tuned import TUNED_VARIANT, TunedConfig, read_tuned
from slicing.manifest import VARIANTS

PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "plan.schema.json"
__all__ = ["CAPACITY_LABELS", "KNOB_SHORT_NAMES", "ModelLimits", "Plan", "Point", "check_against_models",
           "is_relative", "load_plan", "parse_plan", "parse_rate", "plan_json_schema", "resolve_arrival",
           "resolve_plan_path", "write_json_schema"]


@dataclass
class Point:
    """One measurement: a model variant under one configuration and one load, for a fixed time."""

    point_id: str
    experiment: str
    model: str
    variant: str
    load: str
    arrival: dict
    lengths: dict | None
    batching: BatchingOverlay  # only the knobs this point sets (a mapping is converted)
    slicing: dict[str, Any]  # stages, balance (ensemble/reorch only)
    reorch: ReorchOverlay  # policy, knobs (reorch only; a mapping is converted)
    duration_s: float
    warmup_s: float
    slo_ms: float
    seed: int
    repeat: int = 0  # 0-based
    repeats: int = 1
    comparison_key: str = ""  # equal for points that differ only by variant/policy and repeat
    protocol: str = ""  # how requests are sent: unary | stream; "" = the generator's default for the variant
    tuned: str = ""  # the tune.json configuration key this point runs (plan variant `tuned`); "" otherwise

    def __post_init__(self) -> None:
        if not isinstance(self.batching, BatchingOverlay):
            self.batching = BatchingOverlay.from_mapping(self.batching or {})
        if not isinstance(self.reorch, ReorchOverlay):
            self.reorch = ReorchOverlay.from_mapping(self.reorch or {})

    @property
    def relative(self) -> bool:
        """Whether any of the point's rates is a multiple of the measured capacity."""
        return any(is_relative(self.arrival.get(key)) for key in RATE_FIELDS)

    def build_key(self) -> tuple:
        """Points with equal keys share one repository build of the model."""
        return (self.model, self.slicing.get("stages"), self.slicing.get("balance"))

    def config_key(self) -> tuple:
        """Points with equal keys share one loaded configuration (no reload between them)."""
        settings = (repr(sorted(self.batching.to_mapping().items())), repr(sorted(self.reorch.to_mapping().items())))
        return (self.build_key(), self.variant, *settings)

    def to_dict(self) -> dict:
        """JSON-ready description of the point (batching and reorch as the knobs they set)."""
        return {**dataclasses.asdict(self), "batching": self.batching.to_mapping(), "reorch": self.reorch.to_mapping()}


# The short names of knobs in point ids and report labels (one table for both).
KNOB_SHORT_NAMES = {"max_batch_size": "mbs", "max_queue_delay_us": "qd", "preferred_batch_sizes": "pref",
                    "instance_count": "inst", "max_queue_size": "mqs", "default_timeout_us": "qto",
                    "stages": "k", "balance": ""}


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    return str(value)


class Plan(PlanFile):
    """A validated plan: the file's content, where it came from, and where each key is written."""

    source: str = "<plan>"
    raw: dict = Field(default_factory=dict, repr=False)
    lines: dict = Field(default_factory=dict, repr=False)  # key path -> line, for errors found after parsing
    _tuned: dict = PrivateAttr(default_factory=dict)  # model -> TunedConfig, read on first use

    def points(self) -> list[Point]:
        """All measurement points, ordered so that rebuilds and reloads are fewest.

        Repeats are interleaved: within one build, every configuration runs its repeat 0, then every
        configuration its repeat 1 in the reverse order, and so on (A B C, C B A, A B C), so a drift
        of the machine over time does not favour one variant.
        """
        points: list[Point] = []
        seen: set[str] = set()
        for experiment in self.experiments:
            repeats = experiment.repeats or self.defaults.repeats
            for repeat, model, variant in itertools.product(range(repeats), experiment.models,
                                                            experiment.variants):
                if variant == TUNED_VARIANT:
                    points.extend(self._tuned_points(experiment, model, seen, repeat, repeats))
                else:
                    points.extend(self._points_for(experiment, model, variant, seen, repeat, repeats))
        order = {key: i for i, key in enumerate(dict.fromkeys(p.build_key() for p in points))}
        config_order = {key: i for i, key in enumerate(dict.fromkeys(p.config_key() for p in points))}

        def position(p: Point) -> tuple:
            config = config_order[p.config_key()]
            return (order[p.build_key()], p.repeat, -config if p.repeat % 2 else config)

        # stable sort: builds grouped, then repeats, then configurations grouped, plan order otherwise
        return sorted(points, key=position)

    def _points_for(self, experiment: Experiment, model_name: str, variant: str, seen: set[str], repeat: int,
                    repeats: int) -> list[Point]:
        sliced = variant in ("ensemble", "reorch")
        axes = {key: getattr(experiment.batching, key) for key in Batching.model_fields}
        axes |= {key: getattr(experiment.slicing, key) if sliced else None for key in Slicing.model_fields}
        axes = {key: values or [None] for key, values in axes.items()}
        policies = experiment.policy if variant == "reorch" else [None]
        knobs = experiment.reorch.knobs if variant == "reorch" else {}
        out = []
        for *values, policy, knob_combo in itertools.product(*axes.values(), policies,
                                                             itertools.product(*knobs.values())):
            settings = {key: value for key, value in zip(axes, values) if value is not None}
            batching = {key: value for key, value in settings.items() if key in Batching.model_fields}
            reorch: dict[str, Any] = {} if policy is None else {"policy": policy}
            if knobs:
                reorch["knobs"] = dict(zip(knobs, knob_combo))
            settings_id = [f"{KNOB_SHORT_NAMES.get(k, k)}{_fmt(v)}" for k, v in settings.items()]
            knobs_id = [_fmt(reorch["knobs"])] if reorch.get("knobs") else []
            out += self._at_loads(
                experiment, model_name, seen, repeat, repeats,
                id_parts=[experiment.name, model_name, variant, *settings_id, *map(_fmt, reorch.values())],
                comparison_parts=[experiment.name, model_name, *settings_id[: len(batching)], *knobs_id],
                variant=variant, batching=batching, reorch=reorch,
                slicing={key: v for key, v in settings.items() if key in Slicing.model_fields})
        return out

    def _at_loads(self, experiment: Experiment, model_name: str, seen: set[str], repeat: int, repeats: int, *,
                  id_parts: list[str], comparison_parts: list[str], **config: Any) -> list[Point]:
        """One configuration (``config``: variant, batching, slicing, reorch, ...) at each of the
        experiment's loads; a point id already in ``seen`` is skipped."""
        model, defaults = self.models[model_name], self.defaults
        out = []
        for load_name in experiment.loads:
            load = self.loads[load_name]
            for label, arrival in load.expand(load_name):
                point_id = "/".join([*id_parts, label, *([f"r{repeat}"] if repeats > 1 else [])])
                if point_id in seen:
                    continue
                seen.add(point_id)
                out.append(Point(
                    point_id, experiment.name, model_name, load=label, arrival=arrival,
                    lengths=model.lengths if load.lengths is None else load.lengths,
                    duration_s=experiment.duration_s or defaults.duration_s,
                    warmup_s=defaults.warmup_s if experiment.warmup_s is None else experiment.warmup_s,
                    slo_ms=experiment.slo_ms or model.slo_ms or defaults.slo_ms,
                    seed=defaults.seed + repeat, repeat=repeat, repeats=repeats,
                    comparison_key="/".join([*comparison_parts, label]),
                    protocol=experiment.protocol or defaults.protocol, **config))
        return out

    def tuned_config(self, model: str) -> TunedConfig:
        """The best configuration of the model's ``tuned`` result (read once per plan)."""
        if model not in self._tuned:
            try:
                self._tuned[model] = read_tuned(self.models[model].tuned, model)
            except ConfigValidationError as error:
                raise self.error(("models", model, "tuned"), str(error)) from None
        return self._tuned[model]

    def _tuned_points(self, experiment: Experiment, model_name: str, seen: set[str], repeat: int,
                      repeats: int) -> list[Point]:
        """The ``tuned`` variant: the tuned configuration at each of the experiment's loads.

        Its comparison key leaves the configuration out, so the report compares it with the other
        variants of the experiment at the same load (the default whole model among them).
        """
        tuned = self.tuned_config(model_name)
        if tuned.stages is not None and not self.repository.build:
            raise self.error(("models", model_name, "tuned"), f"the tuned {tuned.variant} has {tuned.stages} stages; "
                             "running it rebuilds the model: set repository.build: true")
        return self._at_loads(
            experiment, model_name, seen, repeat, repeats,
            id_parts=[experiment.name, model_name, TUNED_VARIANT], comparison_parts=[experiment.name, model_name],
            variant=tuned.variant, batching=tuned.batching, reorch=tuned.reorch, tuned=tuned.key,
            slicing={} if tuned.stages is None else {"stages": tuned.stages})

    def to_dict(self) -> dict:
        """The plan as written (plain dicts), for environment.json."""
        return json.loads(json.dumps(self.raw, default=str))

    def error(self, loc: tuple, rule: str) -> ConfigValidationError:
        """An error about the key at ``loc`` (a path of keys and indices), naming its file:line."""
        line, path = locate(self.lines, loc)
        return ConfigValidationError(f"{self.source}:{line}: {path}: {rule}")


# ---------------------------------------------------------------- reading


def resolve_plan_path(plan: str | Path) -> Path:
    """A plan file path, or the name of a shipped plan (``quick``, ``full``)."""
    path = Path(plan)
    if path.is_file():
        return path
    shipped = PLANS_DIR / f"{plan}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in PLANS_DIR.glob("*.yaml")))
    raise ConfigValidationError(f"plan {str(plan)!r}: no such file and no shipped plan of that name; shipped "
                                f"plans: {names}")


def load_plan(plan: str | Path) -> Plan:
    """Read and validate a plan file (or a shipped plan's name); errors name file:line and key."""
    path = resolve_plan_path(plan)
    return parse_plan(path.read_text(), str(path))


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    """Validate plan YAML text; ``source`` is the file name used in error messages.

    Of several errors the one written first in the file is raised; the message counts the others.
    """
    data, lines = read_yaml(text, source)
    document = validate(PlanFile, data, source, lines)
    plan = Plan.model_construct(**dict(document), source=source, raw=data, lines=lines)
    section = {str(key[1]): line for key, line in lines.items() if len(key) == 2 and key[0] == "repository"}
    plan.repository._lines = {**section, ".": lines.get(("repository",), 1)}
    return plan


# ---------------------------------------------------------------- relative rates at run time


def resolve_arrival(arrival: dict, capacity_rps: float | None, *, model: str = "") -> tuple[dict, dict]:
    """The arrival with every relative rate turned into req/s, and the point's ``load`` record.

    ``load`` is ``{"rate_rps": R, "multiple": m or None, "capacity_rps": C or None}`` for the main
    rate (``rate_rps``; ``users`` for closed loops).

    Raises:
        ConfigValidationError: a relative rate without a measured capacity.
    """
    resolved = dict(arrival)
    multiple_main = None
    for key in RATE_FIELDS:
        if key not in arrival:
            continue
        absolute, multiple = parse_rate(arrival[key])
        if multiple is not None:
            if capacity_rps is None or not capacity_rps > 0:
                raise ConfigValidationError(
                    f"{key}: {arrival[key]} is relative to {model or 'the model'}'s measured capacity, but "
                    "no capacity was measured (the capacity search is disabled, failed, or cannot reach the "
                    "server); enable 'capacity:' in the plan, pass --capacity FILE, or give rates in req/s")
            absolute = multiple * capacity_rps
            if key == "rate_rps":
                multiple_main = multiple
        resolved[key] = round(absolute, 3)
    capacity = None if capacity_rps is None else round(float(capacity_rps), 3)
    return resolved, {"rate_rps": resolved.get("rate_rps"), "multiple": multiple_main,
                      "capacity_rps": capacity}


# ---------------------------------------------------------------- checks against built models


@dataclass
class ModelLimits:
    """What a built (or buildable) model allows: the largest K and the built max batch size."""

    max_stages: int | None = None
    max_batch_size: int | None = None
    variants: tuple[str, ...] = VARIANTS


def check_against_models(plan: Plan, limits: dict[str, ModelLimits]) -> None:
    """Refuse sweep values a model cannot take (K too large, batch above the built maximum, missing variant).

    Called by the runner before the first point, once the models are exported or the manifest is read.
    """
    for index, experiment in enumerate(plan.experiments):
        at = ("experiments", index)
        for model in experiment.models:
            limit = limits.get(model)
            if limit is None:
                available = ", ".join(sorted(limits)) or "none"
                raise plan.error(("models", model), f"model {model!r} is not in the repository; available: "
                                 f"{available}")
            for variant in experiment.variants:
                if variant == TUNED_VARIANT:
                    variant = plan.tuned_config(model).variant
                if variant not in limit.variants:
                    raise plan.error((*at, "variants"), f"model {model!r} has no {variant!r} variant in the "
                                     f"repository (it has {', '.join(limit.variants)})")
            stages = [k for k in experiment.slicing.stages or [] if k is not None]
            if not stages and set(experiment.variants) & {"ensemble", "reorch"} and plan.repository.build:
                stages = [plan.repository.stages]
            for k in stages if limit.max_stages is not None else []:
                if k > limit.max_stages:
                    raise plan.error((*at, "slicing", "stages"), f"K={k} is larger than {model} allows (at "
                                     f"most {limit.max_stages} stages)")
            for mbs in (experiment.batching.max_batch_size or []) if limit.max_batch_size is not None else []:
                if mbs > limit.max_batch_size:
                    raise plan.error((*at, "batching", "max_batch_size"), f"{mbs} exceeds the "
                                     f"{limit.max_batch_size} {model} was built with; raise "
                                     "repository.max_batch_size")


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the plan's JSON Schema (``python -m loadtest.plan [PATH]``), for editors."""
    path.write_text(json.dumps(plan_json_schema(), indent=2) + "\n")
    return path
