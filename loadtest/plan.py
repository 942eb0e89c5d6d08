"""Characterization plans: the YAML schema, declared once with pydantic, and its expansion into points.

A plan lists models, the variants to compare, sweeps over request batching, slicing and
reorchestration knobs, and named loads. ``load_plan(path)`` checks everything that can be checked
without a server and raises :class:`~core.errors.ConfigValidationError` naming the file, the line,
the key, the value and the rule broken. ``check_against_models`` checks what needs the built models
(K larger than a model allows, a max batch size above the one built) before any load runs.
``Plan.points()`` expands the sweeps into the ordered measurement points. Every vocabulary is its
owner's (the workloads' kinds, the zoo, the manifest's variants, the reorchestrator's policies and
knobs); the load generator's own spec classes check arrival and length fields. The format is
documented in ``loadtest/plans/README.md``; its JSON Schema, for editors, is
``docs/plan.schema.json`` (``python -m loadtest.plan`` rewrites it).

Example::

    plan = load_plan("loadtest/plans/quick.yaml")
    for point in plan.points():
        print(point.point_id)
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from backends.reorch.policies import BatchPolicy, ReorchKnobs
from core.errors import ConfigValidationError
from core.repository import TARGETS
from loadtest.client import PROTOCOLS
from loadtest.workloads import ARRIVAL_KINDS, LENGTH_KINDS, ArrivalSpec, LengthSpec
from slicing.manifest import VARIANTS
from slicing.slicer import BALANCES
from slicing.zoo import SIZES, ZOO

REORCH_POLICIES = tuple(policy.value for policy in BatchPolicy)
KNOB_NAMES = tuple(knob.name for knob in dataclasses.fields(ReorchKnobs))
CAPACITY_LABELS = VARIANTS
CAPACITY_ARRIVALS = ("constant", "poisson")  # the capacity search probes open loops with even or Poisson gaps
PLANS_DIR = Path(__file__).parent / "plans"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "plan.schema.json"
# arrival fields that are rates: each takes req/s (120) or a multiple of the measured capacity (0.85x)
RATE_FIELDS = ("rate_rps", "off_rate_rps", "spike_rate_rps")
_RELATIVE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*[xX]\s*$")
# a stand-in capacity for checking relative arrivals with the load generator's own rules
_PLACEHOLDER_CAPACITY_RPS = 100.0

# ---------------------------------------------------------------- errors: file:line, key, value, rule


def _did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rule(text: str, at: Any = ()) -> PydanticCustomError:
    """A broken rule, raised by a validator; ``at`` (a key or a tuple of keys) extends the error's place."""
    where = at if isinstance(at, tuple) else (at,)
    return PydanticCustomError("plan_rule", "{rule}", {"rule": text, "at": where})


def _check_choice(value: Any, choices: tuple, what: str, at: Any = ()) -> Any:
    if value not in choices:
        listed = ", ".join(map(str, choices))
        raise _rule(f"unknown {what} {value!r}{_did_you_mean(value, choices)}; valid: {listed}", at)
    return value


_RULES = {  # pydantic's error types in the plan's words; the error's context and value fill them in
    "greater_than": "must be > {gt}, got {value!r}",
    "greater_than_equal": "must be >= {ge}, got {value!r}",
    "less_than": "must be < {lt}, got {value!r}",
    "less_than_equal": "must be <= {le}, got {value!r}",
    "int_type": "expected an integer, got {value!r}",
    "float_type": "expected a number, got {value!r}",
    "bool_type": "expected true or false, got {value!r}",
    "string_type": "expected a string, got {value!r}",
    "string_too_short": "expected a non-empty string, got {value!r}",
    "list_type": "expected a list (e.g. [4, 8]), got {value!r}",
    "dict_type": "expected a mapping (key: value lines), got {kind} {value!r}",
    "too_short": "must not be empty: give at least {min_length}",
    "too_long": "takes at most {max_length}, got {count}: {listed}",
}


def _location(error: dict) -> tuple:
    return tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))


def _rule_text(error: dict) -> str:
    """What an error says: the rule broken and the value given (and the valid ones, for a typo)."""
    ctx, kind = error.get("ctx") or {}, error["type"]
    if kind == "plan_rule":
        return ctx["rule"]
    if kind == "missing":
        return f"missing required key '{error['loc'][-1]}'"
    kind = "dict_type" if kind == "model_type" else kind
    if kind not in _RULES:
        return f"{error['msg']}, got {error.get('input')!r}"
    value = error.get("input")
    bounds = {key: int(v) if isinstance(v, float) and v.is_integer() else v for key, v in ctx.items()}
    many = isinstance(value, (dict, list))
    count, listed = (len(value), ", ".join(map(str, value))) if many else (None, "")
    return _RULES[kind].format(value=value, kind=type(value).__name__, count=count, listed=listed, **bounds)


def _locate(lines: dict[tuple, int], loc: tuple) -> tuple[int, str]:
    """The line of the deepest part of ``loc`` written in the file, and that part as a dotted path."""
    while loc and loc not in lines:
        loc = loc[:-1]
    path = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in loc).lstrip(".")
    return lines.get(loc, lines.get((), 1)), path or "plan"


def _yaml_lines(node: yaml.Node, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """Path of keys and list indices -> the 1-based line where that key or item is written."""
    lines = {(): node.start_mark.line + 1} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        children = [(getattr(key, "value", None), key, value) for key, value in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(index, item, item) for index, item in enumerate(node.value)]
    else:
        return lines
    for key, mark_node, value in children:
        lines[(*path, key)] = mark_node.start_mark.line + 1
        _yaml_lines(value, (*path, key), lines)
    return lines


# ---------------------------------------------------------------- the schema's building blocks

T = TypeVar("T")


def Choice(what: str, choices: Iterable[str]) -> Any:  # a type factory, named like the types it makes
    """A string of a vocabulary; an unknown one is refused naming the closest valid one."""
    valid = tuple(choices)
    check = AfterValidator(lambda value: _check_choice(value, valid, what))
    return Annotated[str, check, WithJsonSchema({"type": "string", "enum": list(valid)})]


class _OneOrMany:
    """A sweep's JSON Schema: one value, or a list of values."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict:
        many = handler(core_schema)
        return {"anyOf": [many["items"], many]}


# a sweep: one value, or a non-empty list of values (one point each)
Sweep = Annotated[list[T], BeforeValidator(lambda v: v if isinstance(v, list) else [v]), Field(min_length=1),
                  _OneOrMany()]
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
Variant = Choice("variant", VARIANTS)
Balance = Choice("balance", BALANCES)
Protocol = Choice("protocol", PROTOCOLS)
Size = Choice("size", SIZES)
Target = Choice("target", TARGETS)
CapacityArrival = Choice("capacity arrival kind", CAPACITY_ARRIVALS)
Policy = Choice("reorch policy", REORCH_POLICIES)
KnobName = Choice("reorch knob", KNOB_NAMES)


def parse_rate(value: Any) -> tuple[float | None, float | None]:
    """(absolute req/s, None) for a number, (None, multiple) for ``"0.85x"``.

    Raises:
        ConfigValidationError: not a number nor ``<number>x``, or a multiple that is not > 0.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    match = _RELATIVE.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigValidationError(f"{value!r} is not a rate: give req/s (e.g. 120) or a multiple of the "
                                    "whole model's measured capacity (e.g. 0.85x)")
    if not float(match.group(1)) > 0:
        raise ConfigValidationError(f"{value!r}: a multiple of the measured capacity must be > 0 (e.g. "
                                    "0.85x); for no load in a phase give 0")
    return None, float(match.group(1))


def is_relative(value: Any) -> bool:
    """Whether a rate value is a multiple of the measured capacity (a string such as ``"0.85x"``)."""
    return isinstance(value, str) and bool(_RELATIVE.match(value))


def _owner_rule(check: Any, *args: Any, at: Any = ()) -> Any:
    """``check(*args)``; an error of the owner's (load generator, reorchestrator) becomes a plan rule."""
    try:
        return check(*args)
    except (ConfigValidationError, ValueError, TypeError) as error:
        raise _rule(str(error).split("; fix the parameter")[0], at) from None  # the fix is in the plan


def _rate(value: Any) -> Any:
    _owner_rule(parse_rate, value)
    return value


_RATE_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _RELATIVE.pattern}]}
Rate = Annotated[Any, PlainValidator(_rate), WithJsonSchema(_RATE_SCHEMA)]


class _Section(BaseModel):
    """A mapping of the plan: strict types; unknown keys refused naming the closest one; null = empty."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        valid = list(cls.model_fields)
        for key in data if isinstance(data, dict) else ():
            if key not in valid:
                raise _rule(f"unknown key{_did_you_mean(key, valid)}; valid keys: {', '.join(valid)}", key)
        return data


def _owner_spec(owner: type, what: str, kinds: tuple[str, ...]) -> type[_Section]:
    """The plan's form of a load-generator spec: the owner's fields and types, then the owner's own rules.

    Rate fields also take multiples of the capacity (``0.85x``), checked with a stand-in capacity.
    """
    hints = typing.get_type_hints(owner)
    fields = {f.name: (Rate if f.name in RATE_FIELDS else hints[f.name], f.default)
              for f in dataclasses.fields(owner) if f.name != "kind"}

    def owner_rules(spec: BaseModel) -> BaseModel:
        values = {key: getattr(spec, key) for key in spec.model_fields_set}
        for key in set(values) & set(RATE_FIELDS):
            _, multiple = parse_rate(values[key])
            values[key] = values[key] if multiple is None else multiple * _PLACEHOLDER_CAPACITY_RPS
        _owner_rule(lambda: owner(**values))
        return spec

    def need_kind(data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            raise _rule(f"missing required key 'kind' (one of {', '.join(kinds)})")
        return data

    kind = Annotated[Choice(f"{what} kind", kinds), Field(description=f"one of {', '.join(kinds)}")]
    validators = {"need_kind": model_validator(mode="before")(need_kind),
                  "owner_rules": model_validator(mode="after")(owner_rules)}
    return create_model(owner.__name__, __base__=_Section, __doc__=owner.__doc__, __validators__=validators,
                        kind=(kind, ...), **fields)


def _as_written(value: Any, handler: Any) -> Any:
    """Validate, then keep the mapping as written (``15`` stays ``15``, ``0.85x`` stays a string)."""
    handler(value)
    return value


ArrivalFields = _owner_spec(ArrivalSpec, "arrival", ARRIVAL_KINDS)
Arrival = Annotated[ArrivalFields, WrapValidator(_as_written)]
Lengths = Annotated[_owner_spec(LengthSpec, "length", LENGTH_KINDS), WrapValidator(_as_written)]


def _settings(value: Any) -> Any:
    """Preferred batch sizes: one list of sizes is one setting; a list of lists sweeps settings."""
    return value if isinstance(value, list) and value and all(isinstance(s, list) for s in value) else [value]


def _batch_sizes(sizes: list[int]) -> list[int]:
    if sizes != sorted(set(sizes)):
        raise _rule(f"batch sizes must be distinct and increasing, got {sizes}")
    return sizes


def _knob_value(value: Any) -> Any:
    def plain(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if plain(value) or isinstance(value, str) or (isinstance(value, list) and all(map(plain, value))):
        return value
    raise _rule(f"expected a number, a string or a list of numbers as knob value, got {value!r} "
                "(quote on/off/yes/no: YAML reads them as true/false)")


KnobValue = Annotated[Any, PlainValidator(_knob_value)]


# ---------------------------------------------------------------- the schema


class RepositorySpec(_Section):
    """How to get the model repository: reuse ``path`` or build the plan's models into it."""

    path: Text = None
    """Default <out>/repository; relative to the working directory or the plan file."""
    build: bool = True
    """Build the plan's zoo models; false: the repository (and its manifest.json) must exist already."""
    size: Size = "small"
    target: Target = "embedded"
    max_batch_size: Count = 16
    """max_batch_size of every batcher as built."""
    stages: Count = 4
    """K as built (slicing sweeps rebuild with other values)."""
    balance: Balance = "measured"
    queue_delay_us: NonNegativeInt = 100
    """Max queue delay of every batcher as built."""
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def lines(self) -> dict[str, int]:
        """Key -> its line in the plan file ("." is the section's), for errors found after parsing."""
        return self._lines


class Defaults(_Section):
    """Per-point settings every experiment inherits unless it overrides them."""

    duration_s: Positive = 15.0
    """Measured window (split into >= 3 sub-windows for stability)."""
    warmup_s: NonNegative = 3.0
    slo_ms: Positive = 100.0
    seed: NonNegativeInt = 0
    """Repeat r uses seed + r."""
    repeats: Count = 1
    protocol: Protocol = ""
    """unary | stream; default: the load generator's choice for the variant."""


class CapacitySpec(_Section):
    """The capacity search run before the points when the plan uses relative rates (``0.85x``).

    Relative rates refer to the ``whole`` variant's sustained rate of the same model; ``enabled: false``
    forbids them. ``percentile`` is the latency percentile held to the model's SLO for the rate at the SLO.
    """

    enabled: bool = True
    variants: Sweep[Variant] = ["whole"]
    arrival: CapacityArrival = "constant"
    duration_s: Positive = 3.0
    warmup_s: NonNegative = 1.0
    start_rps: Positive = 50.0
    max_probes: Annotated[int, Field(ge=2)] = 8
    tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.08
    """Stop when the bracket is this narrow (relative)."""
    percentile: Annotated[float, Field(gt=0, le=100)] = 99.0


class ModelDef(_Section):
    """A model of the plan: its sequence-length distribution (sequence models) and latency SLO."""

    lengths: Lengths = None
    slo_ms: Positive = None
    """Overrides defaults.slo_ms for this model."""


class Load(_Section):
    """A named load: an arrival process (loadtest.workloads.ArrivalSpec), optionally swept over one field."""

    arrival: Arrival
    lengths: Lengths = None
    """Overrides the model's lengths."""
    sweep: Annotated[dict[str, Annotated[list, Field(min_length=1)]], Field(min_length=1, max_length=1)] = {}
    """One arrival field and its values: one point each (a load curve)."""

    @model_validator(mode="after")
    def _sweep_values(self) -> Load:
        for key, values in self.sweep.items():
            for index, value in enumerate(values):
                try:
                    ArrivalFields.model_validate({**self.arrival, key: value})
                except ValidationError as error:
                    first = error.errors()[0]
                    raise _rule(_rule_text(first), ("sweep", key, index, *_location(first))) from None
        return self

    def expand(self, name: str) -> list[tuple[str, dict]]:
        """(label, arrival fields) for each value of the sweep; one entry without a sweep."""
        if not self.sweep:
            return [(name, dict(self.arrival))]
        ((key, values),) = self.sweep.items()
        return [(f"{name}@{key}={value:g}" if isinstance(value, (int, float)) else f"{name}@{key}={value}",
                 {**self.arrival, key: value}) for value in values]


class Batching(_Section):
    """Request batching, for every variant (unset: the value as built). Order = point-id order."""

    max_batch_size: Sweep[Count] = None
    max_queue_delay_us: Sweep[NonNegativeInt] = None
    preferred_batch_sizes: Annotated[
        list[Annotated[list[Count], AfterValidator(_batch_sizes)]], _OneOrMany(),
        BeforeValidator(_settings),
    ] = None
    """One list of sizes is one setting ([] = none); a list of lists sweeps."""
    instance_count: Sweep[Count] = None
    max_queue_size: Sweep[NonNegativeInt] = None
    """Triton's default queue policy (0 = unbounded)."""
    default_timeout_us: Sweep[NonNegativeInt] = None
    """Queue timeout; timed-out requests are rejected."""

    @model_validator(mode="after")
    def _preferred_within_max(self) -> Batching:
        for index, sizes in enumerate(self.preferred_batch_sizes or []):
            for mbs in self.max_batch_size or []:
                if sizes and sizes[-1] > mbs:
                    raise _rule(f"preferred batch size {sizes[-1]} exceeds max_batch_size {mbs}; Triton "
                                "refuses it", ("preferred_batch_sizes", index))
        return self


class Slicing(_Section):
    """Slicing (ensemble and reorch only); each value rebuilds the model."""

    stages: Sweep[Count] = None
    balance: Sweep[Balance] = None


class Reorch(_Section):
    """Reorchestration (reorch only): policies and backends.reorch.policies.ReorchKnobs fields."""

    policy: Sweep[Policy] = None
    knobs: dict[KnobName, Sweep[KnobValue]] = {}
    """A list sweeps a knob; list-valued knobs as "a,b,c" strings or lists of lists."""

    @field_validator("knobs")
    @classmethod
    def _knob_rules(cls, knobs: dict[str, list]) -> dict[str, list]:
        for name, values in knobs.items():
            for index, value in enumerate(values):
                _owner_rule(ReorchKnobs.from_parameters, {name: value}, at=(name, index))
        return knobs


class Experiment(_Section):
    """One sweep: the product of its axes, for each of its models, variants and loads."""

    name: Text
    """Unique; part of point ids."""
    models: Sweep[str]
    variants: Sweep[Variant]
    loads: Sweep[str]
    batching: Batching = Batching()
    slicing: Slicing = Slicing()
    reorch: Reorch = Reorch()
    duration_s: Positive = None
    warmup_s: NonNegative = None
    slo_ms: Positive = None
    repeats: Count = None
    """Run every point this many times, interleaved (A B C, C B A, ...)."""
    protocol: Protocol = None

    @property
    def policy(self) -> list[str | None]:
        """The reorch policies swept; ``[None]``: the one built."""
        return self.reorch.policy or [None]

    @model_validator(mode="after")
    def _knobs_fit_the_variants(self) -> Experiment:
        if "/" in self.name:
            raise _rule(f"{self.name!r} must not contain '/' (it is part of point ids)", "name")
        if "slicing" in self.model_fields_set and not set(self.variants) & {"ensemble", "reorch"}:
            raise _rule("slicing knobs need the 'ensemble' or 'reorch' variant; this experiment has "
                        f"{', '.join(self.variants)}", "slicing")
        if "reorch" in self.model_fields_set and "reorch" not in self.variants:
            raise _rule("reorch knobs need the 'reorch' variant; this experiment has "
                        f"{', '.join(self.variants)}", "reorch")
        return self


class PlanFile(_Section):
    """A characterization plan as written (loadtest/plans/README.md)."""

    model_config = ConfigDict(title="stagebatch characterization plan")

    name: Text
    """Names the run directory."""
    description: Annotated[str, BeforeValidator(lambda v: "" if v is None else v)] = ""
    repository: RepositorySpec = RepositorySpec()
    defaults: Defaults = Defaults()
    capacity: CapacitySpec = CapacitySpec()
    models: Annotated[dict[str, ModelDef], Field(min_length=1)]
    """Every model the experiments use (zoo models when repository.build is true)."""
    loads: Annotated[dict[str, Load], Field(min_length=1)]
    experiments: Annotated[list[Experiment], Field(min_length=1)]

    @model_validator(mode="after")
    def _references(self) -> PlanFile:
        if self.repository.build:  # else the repository's manifest is checked before the first point
            for name in self.models:
                _check_choice(name, tuple(ZOO), "model", ("models", name))
        names: set[str] = set()
        for index, experiment in enumerate(self.experiments):
            at = ("experiments", index)
            if experiment.name in names:
                raise _rule(f"duplicate experiment name {experiment.name!r}", (*at, "name"))
            names.add(experiment.name)
            for axis, valid in (("models", tuple(self.models)), ("loads", tuple(self.loads))):
                for item, value in enumerate(getattr(experiment, axis)):
                    _check_choice(value, valid, axis[:-1], (*at, axis, item))
            if (experiment.slicing.stages or experiment.slicing.balance) and not self.repository.build:
                raise _rule("slicing sweeps rebuild the model; set repository.build: true", (*at, "slicing"))
        return self


# ---------------------------------------------------------------- points


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
    batching: dict[str, Any]  # only the knobs this point sets: max_batch_size, max_queue_delay_us, ...
    slicing: dict[str, Any]  # stages, balance (ensemble/reorch only)
    reorch: dict[str, Any]  # policy, knobs (reorch only)
    duration_s: float
    warmup_s: float
    slo_ms: float
    seed: int
    repeat: int = 0  # 0-based
    repeats: int = 1
    comparison_key: str = ""  # equal for points that differ only by variant/policy and repeat
    protocol: str = ""  # how requests are sent: unary | stream; "" = the generator's default for the variant

    @property
    def relative(self) -> bool:
        """Whether any of the point's rates is a multiple of the measured capacity."""
        return any(is_relative(self.arrival.get(key)) for key in RATE_FIELDS)

    def build_key(self) -> tuple:
        """Points with equal keys share one repository build of the model."""
        return (self.model, self.slicing.get("stages"), self.slicing.get("balance"))

    def config_key(self) -> tuple:
        """Points with equal keys share one loaded configuration (no reload between them)."""
        settings = (repr(sorted(self.batching.items())), repr(sorted(self.reorch.items())))
        return (self.build_key(), self.variant, *settings)

    def to_dict(self) -> dict:
        """JSON-ready description of the point."""
        return dataclasses.asdict(self)


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
        model, defaults = self.models[model_name], self.defaults
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
            for load_name in experiment.loads:
                load = self.loads[load_name]
                for label, arrival in load.expand(load_name):
                    settings_id = [f"{KNOB_SHORT_NAMES.get(k, k)}{_fmt(v)}" for k, v in settings.items()]
                    batching_id = settings_id[: len(batching)]
                    parts = [experiment.name, model_name, variant, *settings_id, *map(_fmt, reorch.values())]
                    knobs_id = [_fmt(reorch["knobs"])] if reorch.get("knobs") else []
                    comparison_key = "/".join([experiment.name, model_name, *batching_id, *knobs_id, label])
                    point_id = "/".join([*parts, label, *([f"r{repeat}"] if repeats > 1 else [])])
                    if point_id in seen:
                        continue
                    seen.add(point_id)
                    out.append(Point(
                        point_id, experiment.name, model_name, variant, label, arrival,
                        lengths=model.lengths if load.lengths is None else load.lengths, batching=batching,
                        slicing={key: v for key, v in settings.items() if key in Slicing.model_fields},
                        reorch=reorch, duration_s=experiment.duration_s or defaults.duration_s,
                        warmup_s=defaults.warmup_s if experiment.warmup_s is None else experiment.warmup_s,
                        slo_ms=experiment.slo_ms or model.slo_ms or defaults.slo_ms,
                        seed=defaults.seed + repeat, repeat=repeat, repeats=repeats,
                        comparison_key=comparison_key, protocol=experiment.protocol or defaults.protocol))
        return out

    def to_dict(self) -> dict:
        """The plan as written (plain dicts), for environment.json."""
        return json.loads(json.dumps(self.raw, default=str))

    def error(self, loc: tuple, rule: str) -> ConfigValidationError:
        """An error about the key at ``loc`` (a path of keys and indices), naming its file:line."""
        line, path = _locate(self.lines, loc)
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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        problem = getattr(error, "problem", error)
        raise ConfigValidationError(f"{source}:{line}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    lines = _yaml_lines(node) if node else {}
    try:
        document = PlanFile.model_validate(data)
    except ValidationError as error:
        found = sorted(((_locate(lines, _location(e)), _rule_text(e)) for e in error.errors()),
                       key=lambda item: item[0][0])
        ((line, path), rule) = found[0]
        more = f" ({len(found) - 1} more error(s) after this one)" if len(found) > 1 else ""
        raise ConfigValidationError(f"{source}:{line}: {path}: {rule}{more}") from None
    plan = Plan.model_construct(**dict(document), source=source, raw=data, lines=lines)
    section = {str(key[1]): line for key, line in lines.items() if len(key) == 2 and key[0] == "repository"}
    plan.repository._lines = {**section, ".": lines.get(("repository",), 1)}
    return plan


# ---------------------------------------------------------------- relative rates and knobs at run time


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


def knob_parameters(knobs: dict[str, Any]) -> dict[str, str]:
    """A point's reorch knobs as config.pbtxt string parameters, written by ``ReorchKnobs.to_parameters``."""
    parameters = ReorchKnobs.from_parameters(knobs).to_parameters()
    return {name: parameters[name] for name in knobs}


def knob_parameter(value: Any, name: str | None = None) -> str:
    """One knob value as its config.pbtxt string parameter, as ``ReorchKnobs.to_parameters`` writes it.

    Without ``name`` the knob is the one whose type takes the value: a list is ``bucket_bounds`` (the one
    list-valued knob), a scalar is written as every scalar knob is, ``str(value)``.
    """
    if name is None:  # the runner's call: a list can only be bucket_bounds
        if not isinstance(value, (list, tuple)):
            return str(value)
        name = "bucket_bounds"
    return knob_parameters({name: value})[name]


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


# ---------------------------------------------------------------- the JSON Schema, for editors


def plan_json_schema() -> dict:
    """The JSON Schema of a plan file, as committed in ``docs/plan.schema.json``."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **PlanFile.model_json_schema()}


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the plan's JSON Schema (``python -m loadtest.plan [PATH]``)."""
    path.write_text(json.dumps(plan_json_schema(), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_json_schema(*(Path(arg) for arg in sys.argv[1:2])))
