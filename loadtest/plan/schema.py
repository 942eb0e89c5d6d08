"""The plan's schema, declared once: every section of a plan file, its types, ranges and rules.

Vocabularies are their owners': the workloads' arrival and length kinds (whose spec classes also
check their fields), the zoo's models and sizes, the manifest's variants, the slicer's balances, the
repository writer's targets, the reorchestrator's policies and knobs (checked by ``ReorchKnobs``).
``docs/plan.schema.json`` is written from :class:`PlanFile` (``python -m loadtest.plan``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any

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

from backends.reorch.policies import BatchPolicy, ReorchKnobs
from core.errors import ConfigValidationError
from core.model_config import TARGETS
from loadtest.client import PROTOCOLS
from loadtest.plan.located import (
    Choice,
    Count,
    NonNegative,
    NonNegativeInt,
    OneOrMany,
    Positive,
    Section,
    Sweep,
    Text,
    check_choice,
    location,
    rule,
    rule_text,
)
from loadtest.tuned import TUNED_VARIANT
from loadtest.workloads import ARRIVAL_KINDS, ARRIVAL_RATE_FIELDS, LENGTH_KINDS, ArrivalSpec, LengthSpec
from slicing.manifest import VARIANTS
from slicing.slicer import BALANCES
from slicing.zoo import SIZES, ZOO

REORCH_POLICIES = tuple(policy.value for policy in BatchPolicy)
KNOB_NAMES = tuple(knob.name for knob in dataclasses.fields(ReorchKnobs))
CAPACITY_LABELS = VARIANTS
CAPACITY_ARRIVALS = ("constant", "poisson")  # the capacity search probes open loops with even or Poisson gaps
# arrival fields that are rates: each takes req/s (120) or a multiple of the measured capacity (0.85x)
RATE_FIELDS = ARRIVAL_RATE_FIELDS
_RELATIVE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*[xX]\s*$")
# a stand-in capacity for checking relative arrivals with the load generator's own rules
_PLACEHOLDER_CAPACITY_RPS = 100.0

Variant = Choice("variant", VARIANTS)
PlanVariant = Choice("variant", (*VARIANTS, TUNED_VARIANT))  # tuned: the best `stagebatch tune` result
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
        raise rule(str(error).split("; fix the parameter")[0], at) from None  # the fix is in the plan


def _rate(value: Any) -> Any:
    _owner_rule(parse_rate, value)
    return value


_RATE_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _RELATIVE.pattern}]}
Rate = Annotated[Any, PlainValidator(_rate), WithJsonSchema(_RATE_SCHEMA)]


def _owner_spec(owner: type, what: str, kinds: tuple[str, ...]) -> type[Section]:
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
            raise rule(f"missing required key 'kind' (one of {', '.join(kinds)})")
        return data

    kind = Annotated[Choice(f"{what} kind", kinds), Field(description=f"one of {', '.join(kinds)}")]
    validators = {"need_kind": model_validator(mode="before")(need_kind),
                  "owner_rules": model_validator(mode="after")(owner_rules)}
    return create_model(owner.__name__, __base__=Section, __doc__=owner.__doc__, __validators__=validators,
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
        raise rule(f"batch sizes must be distinct and increasing, got {sizes}")
    return sizes


def _knob_value(value: Any) -> Any:
    def plain(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if plain(value) or isinstance(value, str) or (isinstance(value, list) and all(map(plain, value))):
        return value
    raise rule(f"expected a number, a string or a list of numbers as knob value, got {value!r} "
               "(quote on/off/yes/no: YAML reads them as true/false)")


_NUMBER = {"type": "number"}
KnobValue = Annotated[Any, PlainValidator(_knob_value),
                      WithJsonSchema({"anyOf": [_NUMBER, {"type": "string"}, {"type": "array", "items": _NUMBER}]})]


def _knob_properties(schema: dict) -> None:
    """Every knob as a property of the JSON Schema, so that editors complete knob names."""
    schema["properties"] = {name: schema["additionalProperties"] for name in KNOB_NAMES}


class RepositorySpec(Section):
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


class Defaults(Section):
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


class CapacitySpec(Section):
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


class ModelDef(Section):
    """A model of the plan: its sequence-length distribution (sequence models) and latency SLO."""

    lengths: Lengths = None
    slo_ms: Positive = None
    """Overrides defaults.slo_ms for this model."""
    tuned: Annotated[str, Field(min_length=1)] | None = None
    """A `stagebatch tune --out` folder (or its tune.json): the configuration the `tuned` variant runs."""


class Load(Section):
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
                    raise rule(rule_text(first), ("sweep", key, index, *location(first))) from None
        return self

    def expand(self, name: str) -> list[tuple[str, dict]]:
        """(label, arrival fields) for each value of the sweep; one entry without a sweep."""
        if not self.sweep:
            return [(name, dict(self.arrival))]
        ((key, values),) = self.sweep.items()
        return [(f"{name}@{key}={value:g}" if isinstance(value, (int, float)) else f"{name}@{key}={value}",
                 {**self.arrival, key: value}) for value in values]


class Batching(Section):
    """Request batching, for every variant (unset: the value as built). Order = point-id order."""

    max_batch_size: Sweep[Count] = None
    max_queue_delay_us: Sweep[NonNegativeInt] = None
    preferred_batch_sizes: Annotated[
        list[Annotated[list[Count], AfterValidator(_batch_sizes)]], OneOrMany(),
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
                    raise rule(f"preferred batch size {sizes[-1]} exceeds max_batch_size {mbs}; Triton "
                               "refuses it", ("preferred_batch_sizes", index))
        return self


class Slicing(Section):
    """Slicing (ensemble and reorch only); each value rebuilds the model."""

    stages: Sweep[Count] = None
    balance: Sweep[Balance] = None


class Reorch(Section):
    """Reorchestration (reorch only): policies and backends.reorch.policies.ReorchKnobs fields."""

    policy: Sweep[Policy] = None
    knobs: Annotated[dict[KnobName, Sweep[KnobValue]], Field(json_schema_extra=_knob_properties)] = {}
    """A list sweeps a knob; list-valued knobs as "a,b,c" strings or lists of lists."""

    @field_validator("knobs")
    @classmethod
    def _knob_rules(cls, knobs: dict[str, list]) -> dict[str, list]:
        for name, values in knobs.items():
            for index, value in enumerate(values):
                _owner_rule(ReorchKnobs.from_parameters, {name: value}, at=(name, index))
        return knobs


class Experiment(Section):
    """One sweep: the product of its axes, for each of its models, variants and loads."""

    name: Text
    """Unique; part of point ids."""
    models: Sweep[str]
    variants: Sweep[PlanVariant]
    """whole, ensemble, reorch, or tuned (the model's `tuned` result, with its own batching, K and reorch
    settings; the experiment's batching, slicing and reorch sweeps do not apply to it)."""
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
            raise rule(f"{self.name!r} must not contain '/' (it is part of point ids)", "name")
        if "slicing" in self.model_fields_set and not set(self.variants) & {"ensemble", "reorch"}:
            raise rule("slicing knobs need the 'ensemble' or 'reorch' variant; this experiment has "
                       f"{', '.join(self.variants)}", "slicing")
        if "reorch" in self.model_fields_set and "reorch" not in self.variants:
            raise rule("reorch knobs need the 'reorch' variant; this experiment has "
                       f"{', '.join(self.variants)}", "reorch")
        return self


class PlanFile(Section):
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
                check_choice(name, tuple(ZOO), "model", ("models", name))
        names: set[str] = set()
        for index, experiment in enumerate(self.experiments):
            at = ("experiments", index)
            if experiment.name in names:
                raise rule(f"duplicate experiment name {experiment.name!r}", (*at, "name"))
            names.add(experiment.name)
            for axis, valid in (("models", tuple(self.models)), ("loads", tuple(self.loads))):
                for item, value in enumerate(getattr(experiment, axis)):
                    check_choice(value, valid, axis[:-1], (*at, axis, item))
            if TUNED_VARIANT in experiment.variants:
                for item, model in enumerate(experiment.models):
                    if self.models[model].tuned is None:
                        raise rule(f"the {TUNED_VARIANT!r} variant needs models.{model}.tuned: a `stagebatch tune "
                                   f"--model {model} --out DIR` folder", (*at, "variants",
                                                                          experiment.variants.index(TUNED_VARIANT)))
            if (experiment.slicing.stages or experiment.slicing.balance) and not self.repository.build:
                raise rule("slicing sweeps rebuild the model; set repository.build: true", (*at, "slicing"))
        return self


def plan_json_schema() -> dict:
    """The JSON Schema of a plan file, as committed in ``docs/plan.schema.json``."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **PlanFile.model_json_schema()}
