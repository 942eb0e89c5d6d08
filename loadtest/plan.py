"""Characterization plans: the YAML schema, its dataclasses, and validation that names file:line.

A plan lists models, the variants to compare, sweeps over request batching, slicing and
reorchestration knobs, and named loads. ``load_plan(path)`` parses and checks everything that can
be checked without a server (keys, types, ranges, known models/variants/policies/knobs, arrival
and length specs) and raises :class:`~core.errors.ConfigValidationError` naming the file,
the line and the key. ``check_against_models`` checks what needs the built models (K larger than
a model allows, max batch size above what was built) before any load runs. ``Plan.points()``
expands the sweeps into the ordered list of measurement points. The format is documented in
``loadtest/plans/README.md``.

Example::

    plan = load_plan("loadtest/plans/quick.yaml")
    for point in plan.points():
        print(point.point_id)
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backends.reorch.policies import BatchPolicy, ReorchKnobs
from loadtest import workloads
from loadtest.client import PROTOCOLS
from loadtest.workloads import ARRIVAL_KINDS, LENGTH_KINDS
from slicing.manifest import VARIANTS
from slicing.slicer import BALANCES
from slicing.zoo import MODEL_NAMES as ZOO_MODELS
from slicing.zoo import SIZES
from core.errors import ConfigValidationError
from core.repository import TARGETS

# Every vocabulary is its owner's: the reorchestrator's policies, the manifest's variants, the zoo's
# models and sizes, the slicer's balances, the repository writer's targets, the workloads' kinds.
REORCH_POLICIES = tuple(policy.value for policy in BatchPolicy)
PLANS_DIR = Path(__file__).parent / "plans"
# arrival fields that are rates: each takes req/s (120) or a multiple of the measured capacity (0.85x)
RATE_FIELDS = ("rate_rps", "off_rate_rps", "spike_rate_rps")
_RELATIVE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*[xX]\s*$")
# a stand-in capacity for checking relative arrivals with the load generator's own rules
_PLACEHOLDER_CAPACITY_RPS = 100.0
CAPACITY_LABELS = VARIANTS


# ---------------------------------------------------------------- YAML with line numbers


class _Map(dict):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]


class _Seq(list):
    """A YAML sequence that remembers its own line and the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records where every mapping, key and sequence item was written."""

    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        mapping = _Map(super().construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {
            self.construct_object(key_node, deep=True): key_node.start_mark.line + 1
            for key_node, _ in node.value
        }
        return mapping

    def construct_sequence(self, node, deep=False):  # noqa: D102 - PyYAML hook
        sequence = _Seq(super().construct_sequence(node, deep=True))
        sequence.line = node.start_mark.line + 1
        sequence.item_lines = [item.start_mark.line + 1 for item in node.value]
        return sequence


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


@dataclass(frozen=True)
class _Where:
    """Where a value sits in the plan: file, line and dotted key path, for error messages."""

    file: str
    line: int
    path: str

    def child(self, key: str | int, line: int | None = None) -> _Where:
        """The location of ``key`` under this one (an int key is a list index)."""
        path = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)
        return _Where(self.file, line or self.line, path)

    def error(self, rule: str) -> ConfigValidationError:
        """A ConfigValidationError that starts with file:line and the key."""
        return ConfigValidationError(f"{self.file}:{self.line}: {self.path or 'plan'}: {rule}")


def _key_line(mapping: Any, key: str, default: int) -> int:
    return getattr(mapping, "key_lines", {}).get(key, default)


def _item_line(sequence: Any, index: int, default: int) -> int:
    lines = getattr(sequence, "item_lines", [])
    return lines[index] if index < len(lines) else default


def _expect_mapping(value: Any, where: _Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping (key: value lines), got {type(value).__name__} {value!r}")
    return value


def _check_keys(mapping: dict, valid: tuple[str, ...] | list[str], where: _Where, *, required=()) -> None:
    """Refuse unknown keys (with the closest valid one) and missing required ones."""
    for key in mapping:
        if key not in valid:
            key_where = where.child(str(key), _key_line(mapping, key, where.line))
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise key_where.error(f"unknown key{hint}; valid keys: {', '.join(valid)}")
    for key in required:
        if key not in mapping:
            raise where.error(f"missing required key '{key}'")


def _as_list(value: Any) -> list:
    """A scalar sweep value means a one-value sweep."""
    return list(value) if isinstance(value, list) else [value]


def _int(value: Any, where: _Where, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise where.error(f"must be >= {minimum}, got {value}")
    return value


def _number(value: Any, where: _Where, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise where.error(f"must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise where.error(f"must be >= {minimum}, got {value}")
    return float(value)


def _choice(value: Any, choices: tuple[str, ...], where: _Where, what: str) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise where.error(f"unknown {what} {value!r}{hint}; valid: {', '.join(choices)}")
    return value


def _str(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"expected a non-empty string, got {value!r}")
    return value


# ---------------------------------------------------------------- the schema


@dataclass
class RepositorySpec:
    """How to get the model repository: reuse ``path`` or build the plan's models into it.

    ``path`` None means ``<out>/repository``. ``build`` False means the repository must already hold
    every model of the plan (e.g. built by ``stagebatch build`` or served by a remote Triton).
    """

    path: str | None = None
    build: bool = True
    size: str = "small"
    target: str = "embedded"
    max_batch_size: int = 16
    stages: int = 4
    balance: str = "measured"
    queue_delay_us: int = 100
    lines: dict[str, int] = field(default_factory=dict, repr=False)  # key -> line, for late errors


@dataclass
class Defaults:
    """Per-point settings every experiment inherits unless it overrides them."""

    duration_s: float = 15.0
    warmup_s: float = 3.0
    slo_ms: float = 100.0
    seed: int = 0
    repeats: int = 1
    protocol: str = ""  # unary | stream; "" = the load generator's default for the variant


@dataclass
class CapacitySpec:
    """The capacity search run before the points when the plan uses relative rates (``capacity:``).

    ``variants`` are measured for every model that needs a capacity; relative rates always refer to
    the ``whole`` variant's sustained rate of the same model. ``enabled: false`` forbids relative
    rates. ``percentile`` is the latency percentile held to the model's SLO for the rate at the SLO.
    """

    enabled: bool = True
    variants: list[str] = field(default_factory=lambda: ["whole"])
    arrival: str = "constant"
    duration_s: float = 3.0
    warmup_s: float = 1.0
    start_rps: float = 50.0
    max_probes: int = 8
    tolerance: float = 0.08
    percentile: float = 99.0


@dataclass
class ModelDef:
    """A model of the plan: its sequence-length distribution (sequence models) and latency SLO."""

    name: str
    lengths: dict | None = None
    slo_ms: float | None = None
    line: int = 0


@dataclass
class LoadDef:
    """A named load: an arrival process (L1's ArrivalSpec fields) and optionally a sweep of one field."""

    name: str
    arrival: dict
    lengths: dict | None = None
    sweep: dict[str, list] = field(default_factory=dict)  # arrival field -> values (a load curve)
    line: int = 0

    def expand(self) -> list[tuple[str, dict]]:
        """(label, arrival fields) for each value of the sweep; one entry without a sweep."""
        if not self.sweep:
            return [(self.name, dict(self.arrival))]
        ((key, values),) = self.sweep.items()
        return [
            (
                f"{self.name}@{key}={value:g}"
                if isinstance(value, (int, float))
                else f"{self.name}@{key}={value}",
                {**self.arrival, key: value},
            )
            for value in values
        ]


@dataclass
class Experiment:
    """One sweep: the product of its axes, for each of its models, variants and loads."""

    name: str
    models: list[str]
    variants: list[str]
    loads: list[str]
    # request batching (None = leave the built value)
    max_batch_size: list[int | None] = field(default_factory=lambda: [None])
    max_queue_delay_us: list[int | None] = field(default_factory=lambda: [None])
    preferred_batch_sizes: list[list[int] | None] = field(default_factory=lambda: [None])
    instance_count: list[int | None] = field(default_factory=lambda: [None])
    max_queue_size: list[int | None] = field(default_factory=lambda: [None])
    default_timeout_us: list[int | None] = field(default_factory=lambda: [None])
    # slicing (ensemble and reorch only)
    stages: list[int | None] = field(default_factory=lambda: [None])
    balance: list[str | None] = field(default_factory=lambda: [None])
    # reorchestration (reorch only)
    policy: list[str | None] = field(default_factory=lambda: [None])
    knobs: dict[str, list] = field(default_factory=dict)
    duration_s: float | None = None
    warmup_s: float | None = None
    slo_ms: float | None = None
    repeats: int | None = None
    protocol: str | None = None
    line: int = 0
    where: dict[str, tuple[str, int]] = field(default_factory=dict)  # axis -> (file, line) for late checks


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
        return (
            self.build_key(),
            self.variant,
            repr(sorted(self.batching.items())),
            repr(sorted(self.reorch.items())),
        )

    def to_dict(self) -> dict:
        """JSON-ready description of the point."""
        return {
            "point_id": self.point_id,
            "experiment": self.experiment,
            "model": self.model,
            "variant": self.variant,
            "load": self.load,
            "arrival": self.arrival,
            "lengths": self.lengths,
            "batching": self.batching,
            "slicing": self.slicing,
            "reorch": self.reorch,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "slo_ms": self.slo_ms,
            "seed": self.seed,
            "repeat": self.repeat,
            "repeats": self.repeats,
            "comparison_key": self.comparison_key,
            "protocol": self.protocol,
        }


@dataclass
class Plan:
    """A validated characterization plan."""

    name: str
    source: str
    description: str
    repository: RepositorySpec
    defaults: Defaults
    capacity: CapacitySpec
    models: dict[str, ModelDef]
    loads: dict[str, LoadDef]
    experiments: list[Experiment]
    raw: dict = field(default_factory=dict, repr=False)

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
            for repeat in range(repeats):
                for model_name in experiment.models:
                    model = self.models[model_name]
                    for variant in experiment.variants:
                        points.extend(self._points_for(experiment, model, variant, seen, repeat, repeats))
        order = {key: i for i, key in enumerate(dict.fromkeys(p.build_key() for p in points))}
        config_order = {key: i for i, key in enumerate(dict.fromkeys(p.config_key() for p in points))}

        def position(p: Point) -> tuple:
            config = config_order[p.config_key()]
            return (order[p.build_key()], p.repeat, -config if p.repeat % 2 else config)

        # stable sort: builds grouped, then repeats, then configurations grouped, plan order otherwise
        return sorted(points, key=position)

    def _points_for(
        self,
        experiment: Experiment,
        model: ModelDef,
        variant: str,
        seen: set[str],
        repeat: int = 0,
        repeats: int = 1,
    ) -> list[Point]:
        sliced = variant in ("ensemble", "reorch")
        stages = experiment.stages if sliced else [None]
        balances = experiment.balance if sliced else [None]
        policies = experiment.policy if variant == "reorch" else [None]
        knob_names = list(experiment.knobs) if variant == "reorch" else []
        knob_values = [experiment.knobs[name] for name in knob_names]
        out = []
        for mbs, delay, preferred, instances, queue_size, timeout, k, balance, policy, knob_combo in itertools.product(
            experiment.max_batch_size,
            experiment.max_queue_delay_us,
            experiment.preferred_batch_sizes,
            experiment.instance_count,
            experiment.max_queue_size,
            experiment.default_timeout_us,
            stages,
            balances,
            policies,
            list(itertools.product(*knob_values)),
        ):
            batching = {
                key: value
                for key, value in (
                    ("max_batch_size", mbs),
                    ("max_queue_delay_us", delay),
                    ("preferred_batch_sizes", preferred),
                    ("instance_count", instances),
                    ("max_queue_size", queue_size),
                    ("default_timeout_us", timeout),
                )
                if value is not None
            }
            slicing = {
                key: value for key, value in (("stages", k), ("balance", balance)) if value is not None
            }
            reorch = {}
            if policy is not None:
                reorch["policy"] = policy
            if knob_names:
                reorch["knobs"] = dict(zip(knob_names, knob_combo))
            for load_name in experiment.loads:
                load = self.loads[load_name]
                for label, arrival in load.expand():
                    lengths = load.lengths if load.lengths is not None else model.lengths
                    slo_ms = experiment.slo_ms or model.slo_ms or self.defaults.slo_ms
                    parts = [experiment.name, model.name, variant]
                    parts += [f"{_short(k_)}{_fmt(v)}" for k_, v in {**batching, **slicing}.items()]
                    parts += [_fmt(v) for v in reorch.values()]
                    parts.append(label)
                    comparison_key = "/".join(
                        [experiment.name, model.name]
                        + [f"{_short(k_)}{_fmt(v)}" for k_, v in batching.items()]
                        + [_fmt(reorch.get("knobs", {}))] * bool(reorch.get("knobs"))
                        + [label]
                    )
                    if repeats > 1:
                        parts.append(f"r{repeat}")
                    point_id = "/".join(parts)
                    if point_id in seen:
                        continue
                    seen.add(point_id)
                    out.append(
                        Point(
                            point_id=point_id,
                            experiment=experiment.name,
                            model=model.name,
                            variant=variant,
                            load=label,
                            arrival=arrival,
                            lengths=lengths,
                            batching=batching,
                            slicing=slicing,
                            reorch=reorch,
                            duration_s=experiment.duration_s or self.defaults.duration_s,
                            warmup_s=self.defaults.warmup_s
                            if experiment.warmup_s is None
                            else experiment.warmup_s,
                            slo_ms=slo_ms,
                            seed=self.defaults.seed + repeat,
                            repeat=repeat,
                            repeats=repeats,
                            comparison_key=comparison_key,
                            protocol=experiment.protocol or self.defaults.protocol,
                        )
                    )
        return out

    def to_dict(self) -> dict:
        """The plan as written (plain dicts), for environment.json."""
        return _plain(self.raw)


# The short names of knobs in point ids and report labels (one table for both).
KNOB_SHORT_NAMES = {
    "max_batch_size": "mbs",
    "max_queue_delay_us": "qd",
    "preferred_batch_sizes": "pref",
    "instance_count": "inst",
    "max_queue_size": "mqs",
    "default_timeout_us": "qto",
    "stages": "k",
    "balance": "",
}


def _short(key: str) -> str:
    return KNOB_SHORT_NAMES.get(key, key)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- parsing


_TOP_KEYS = ("name", "description", "repository", "defaults", "capacity", "models", "loads", "experiments")
_REPOSITORY_KEYS = (
    "path",
    "build",
    "size",
    "target",
    "max_batch_size",
    "stages",
    "balance",
    "queue_delay_us",
)
_DEFAULTS_KEYS = ("duration_s", "warmup_s", "slo_ms", "seed", "repeats", "protocol")
_CAPACITY_KEYS = (
    "enabled",
    "variants",
    "arrival",
    "duration_s",
    "warmup_s",
    "start_rps",
    "max_probes",
    "tolerance",
    "percentile",
)
_MODEL_KEYS = ("lengths", "slo_ms")
_LOAD_KEYS = ("arrival", "lengths", "sweep")
_EXPERIMENT_KEYS = (
    "name",
    "models",
    "variants",
    "loads",
    "batching",
    "slicing",
    "reorch",
    "duration_s",
    "warmup_s",
    "slo_ms",
    "repeats",
    "protocol",
)
_BATCHING_KEYS = (
    "max_batch_size",
    "max_queue_delay_us",
    "preferred_batch_sizes",
    "instance_count",
    "max_queue_size",
    "default_timeout_us",
)
_SLICING_KEYS = ("stages", "balance")
_REORCH_KEYS = ("policy", "knobs")


def resolve_plan_path(plan: str | Path) -> Path:
    """A plan file path, or the name of a shipped plan (``quick``, ``full``)."""
    path = Path(plan)
    if path.is_file():
        return path
    shipped = PLANS_DIR / f"{plan}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PLANS_DIR.glob("*.yaml"))
    raise ConfigValidationError(
        f"plan {str(plan)!r}: no such file and no shipped plan of that name; shipped plans: {', '.join(names)}"
    )


def load_plan(plan: str | Path) -> Plan:
    """Read and validate a plan file (or a shipped plan's name); errors name file:line and key."""
    path = resolve_plan_path(plan)
    text = path.read_text()
    return parse_plan(text, str(path))


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    """Validate plan YAML text; ``source`` is the file name used in error messages."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise ConfigValidationError(
            f"{source}:{line}: not valid YAML: {getattr(error, 'problem', error)}"
        ) from None
    root = _Where(source, 1, "")
    data = _expect_mapping(data, root)
    _check_keys(data, _TOP_KEYS, root, required=("name", "models", "loads", "experiments"))
    at = lambda key: root.child(key, _key_line(data, key, 1))  # noqa: E731

    name = _str(data["name"], at("name"))
    description = data.get("description") or ""
    repository = _parse_repository(data.get("repository") or _Map(), at("repository"))
    defaults = _parse_defaults(data.get("defaults") or _Map(), at("defaults"))
    capacity = _parse_capacity(data.get("capacity") or _Map(), at("capacity"))
    models = _parse_models(data["models"], at("models"), repository)
    loads = _parse_loads(data["loads"], at("loads"))
    experiments = _parse_experiments(data["experiments"], at("experiments"), models, loads, repository)
    plan = Plan(
        name=name,
        source=source,
        description=str(description),
        repository=repository,
        defaults=defaults,
        capacity=capacity,
        models=models,
        loads=loads,
        experiments=experiments,
        raw=data,
    )
    if not plan.points():
        raise root.error("the plan has no measurement points (every experiment is empty)")
    return plan


def _parse_repository(raw: Any, where: _Where) -> RepositorySpec:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _REPOSITORY_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    spec = RepositorySpec()
    spec.lines = {str(key): _key_line(raw, key, where.line) for key in raw}
    spec.lines["."] = where.line
    if "path" in raw:
        spec.path = _str(raw["path"], at("path"))
    if "build" in raw:
        if not isinstance(raw["build"], bool):
            raise at("build").error(f"expected true or false, got {raw['build']!r}")
        spec.build = raw["build"]
    if "size" in raw:
        spec.size = _choice(raw["size"], SIZES, at("size"), "size")
    if "target" in raw:
        spec.target = _choice(raw["target"], TARGETS, at("target"), "target")
    if "max_batch_size" in raw:
        spec.max_batch_size = _int(raw["max_batch_size"], at("max_batch_size"), minimum=1)
    if "stages" in raw:
        spec.stages = _int(raw["stages"], at("stages"), minimum=1)
    if "balance" in raw:
        spec.balance = _choice(raw["balance"], BALANCES, at("balance"), "balance")
    if "queue_delay_us" in raw:
        spec.queue_delay_us = _int(raw["queue_delay_us"], at("queue_delay_us"), minimum=0)
    return spec


def _parse_defaults(raw: Any, where: _Where) -> Defaults:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _DEFAULTS_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    defaults = Defaults()
    if "duration_s" in raw:
        defaults.duration_s = _number(raw["duration_s"], at("duration_s"), positive=True)
    if "warmup_s" in raw:
        defaults.warmup_s = _number(raw["warmup_s"], at("warmup_s"), minimum=0)
    if "slo_ms" in raw:
        defaults.slo_ms = _number(raw["slo_ms"], at("slo_ms"), positive=True)
    if "seed" in raw:
        defaults.seed = _int(raw["seed"], at("seed"), minimum=0)
    if "repeats" in raw:
        defaults.repeats = _int(raw["repeats"], at("repeats"), minimum=1)
    if "protocol" in raw:
        defaults.protocol = _choice(raw["protocol"], PROTOCOLS, at("protocol"), "protocol")
    return defaults


def _parse_capacity(raw: Any, where: _Where) -> CapacitySpec:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _CAPACITY_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    spec = CapacitySpec()
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise at("enabled").error(f"expected true or false, got {raw['enabled']!r}")
        spec.enabled = raw["enabled"]
    if "variants" in raw:
        spec.variants = _names(raw["variants"], at("variants"), CAPACITY_LABELS, "variant")
    if "arrival" in raw:
        spec.arrival = _choice(raw["arrival"], ("constant", "poisson"), at("arrival"), "capacity arrival kind")
    for key in ("duration_s", "start_rps"):
        if key in raw:
            setattr(spec, key, _number(raw[key], at(key), positive=True))
    if "warmup_s" in raw:
        spec.warmup_s = _number(raw["warmup_s"], at("warmup_s"), minimum=0)
    if "max_probes" in raw:
        spec.max_probes = _int(raw["max_probes"], at("max_probes"), minimum=2)
    if "tolerance" in raw:
        spec.tolerance = _number(raw["tolerance"], at("tolerance"), positive=True)
        if spec.tolerance >= 1:
            raise at("tolerance").error(f"must be < 1 (a relative bracket width), got {spec.tolerance}")
    if "percentile" in raw:
        spec.percentile = _number(raw["percentile"], at("percentile"), positive=True)
        if spec.percentile > 100:
            raise at("percentile").error(f"must be <= 100, got {spec.percentile}")
    return spec


# ---------------------------------------------------------------- relative rates


def is_relative(value: Any) -> bool:
    """Whether a rate value is a multiple of the measured capacity (a string such as ``"0.85x"``)."""
    return isinstance(value, str) and bool(_RELATIVE.match(value))


def parse_rate(value: Any, where: _Where | None = None, key: str = "rate_rps") -> tuple[float | None, float | None]:
    """(absolute req/s, None) for a number, (None, multiple) for ``"0.85x"``; errors name the rule.

    Raises:
        ConfigValidationError: not a number nor ``<number>x``, or a multiple that is not > 0.
    """
    where = where or _Where("<plan>", 0, key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, str):
        match = _RELATIVE.match(value)
        if match:
            multiple = float(match.group(1))
            if not multiple > 0:
                raise where.error(
                    f"{value!r}: a multiple of the measured capacity must be > 0 (e.g. 0.85x); "
                    "for no load in a phase give 0"
                )
            return None, multiple
    raise where.error(
        f"{value!r} is not a rate: give req/s (e.g. 120) or a multiple of the whole model's measured "
        "capacity (e.g. 0.85x)"
    )


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
        absolute, multiple = parse_rate(arrival[key], key=key)
        if multiple is not None:
            if capacity_rps is None or not capacity_rps > 0:
                raise ConfigValidationError(
                    f"{key}: {arrival[key]} is relative to {model or 'the model'}'s measured capacity, but no "
                    "capacity was measured (the capacity search is disabled, failed, or cannot reach the "
                    "server); enable 'capacity:' in the plan, pass --capacity FILE, or give rates in req/s"
                )
            absolute = multiple * capacity_rps
            if key == "rate_rps":
                multiple_main = multiple
        resolved[key] = round(absolute, 3)
    load = {
        "rate_rps": resolved.get("rate_rps"),
        "multiple": multiple_main,
        "capacity_rps": None if capacity_rps is None else round(float(capacity_rps), 3),
    }
    return resolved, load


def _parse_models(raw: Any, where: _Where, repository: RepositorySpec) -> dict[str, ModelDef]:
    raw = _expect_mapping(raw, where)
    if not raw:
        raise where.error("lists no models")
    models = {}
    for name, body in raw.items():
        model_where = where.child(str(name), _key_line(raw, name, where.line))
        if repository.build:
            # the runner builds from the zoo; with build: false any model of the repository is fine
            # (checked against its manifest before the first point)
            _choice(name, ZOO_MODELS, model_where, "model")
        body = _expect_mapping(body if body is not None else _Map(), model_where)
        _check_keys(body, _MODEL_KEYS, model_where)
        at = lambda key, b=body, w=model_where: w.child(key, _key_line(b, key, w.line))  # noqa: E731
        lengths = _parse_lengths(body["lengths"], at("lengths")) if "lengths" in body else None
        slo_ms = _number(body["slo_ms"], at("slo_ms"), positive=True) if "slo_ms" in body else None
        models[name] = ModelDef(name=name, lengths=lengths, slo_ms=slo_ms, line=model_where.line)
    return models


def _parse_lengths(raw: Any, where: _Where) -> dict:
    raw = _expect_mapping(raw, where)
    if "kind" not in raw:
        raise where.error(f"missing required key 'kind' (one of {', '.join(LENGTH_KINDS)})")
    _choice(raw["kind"], LENGTH_KINDS, where.child("kind", _key_line(raw, "kind", where.line)), "length kind")
    _check_with_driver("LengthSpec", raw, where)
    return _plain(raw)


def _parse_arrival(raw: Any, where: _Where) -> dict:
    raw = _expect_mapping(raw, where)
    if "kind" not in raw:
        raise where.error(f"missing required key 'kind' (one of {', '.join(ARRIVAL_KINDS)})")
    _choice(
        raw["kind"], ARRIVAL_KINDS, where.child("kind", _key_line(raw, "kind", where.line)), "arrival kind"
    )
    checked = _Map(raw)
    checked.line, checked.key_lines = getattr(raw, "line", where.line), getattr(raw, "key_lines", {})
    for key in RATE_FIELDS:
        if key in raw and isinstance(raw[key], str):
            _, multiple = parse_rate(raw[key], where.child(key, _key_line(raw, key, where.line)), key)
            checked[key] = multiple * _PLACEHOLDER_CAPACITY_RPS  # the generator's own rules still apply
    _check_with_driver("ArrivalSpec", checked, where)
    return _plain(raw)


def _check_with_driver(class_name: str, raw: dict, where: _Where) -> None:
    """Build the load generator's own spec object so its rules (fields, types, ranges) apply to the plan.

    ``loadtest.workloads`` owns the meaning of arrival and length fields; repeating its rules here
    would drift.
    """
    spec_class = getattr(workloads, class_name)
    fields = {f.name: f for f in dataclasses.fields(spec_class)}
    _check_keys(raw, list(fields), where)
    for key, value in raw.items():
        default = fields[key].default
        key_where = where.child(str(key), _key_line(raw, key, where.line))
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = value.is_integer()
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise key_where.error(f"expected {type(default).__name__}, got {value!r}")
    try:
        spec_class(**_plain(raw))
    except (ValueError, TypeError, ConfigValidationError) as error:
        raise where.error(str(error)) from None


def _parse_loads(raw: Any, where: _Where) -> dict[str, LoadDef]:
    raw = _expect_mapping(raw, where)
    if not raw:
        raise where.error("lists no loads")
    loads = {}
    for name, body in raw.items():
        load_where = where.child(str(name), _key_line(raw, name, where.line))
        body = _expect_mapping(body, load_where)
        _check_keys(body, _LOAD_KEYS, load_where, required=("arrival",))
        at = lambda key, b=body, w=load_where: w.child(key, _key_line(b, key, w.line))  # noqa: E731
        arrival = _parse_arrival(body["arrival"], at("arrival"))
        lengths = _parse_lengths(body["lengths"], at("lengths")) if "lengths" in body else None
        sweep: dict[str, list] = {}
        if "sweep" in body:
            sweep_where = at("sweep")
            sweep_raw = _expect_mapping(body["sweep"], sweep_where)
            if len(sweep_raw) != 1:
                raise sweep_where.error(
                    f"sweeps exactly one arrival field, got {len(sweep_raw)}: "
                    f"{', '.join(map(str, sweep_raw)) or 'none'}"
                )
            ((key, values),) = sweep_raw.items()
            key_where = sweep_where.child(str(key), _key_line(sweep_raw, key, sweep_where.line))
            if not isinstance(values, list) or not values:
                raise key_where.error(f"expected a non-empty list of values, got {values!r}")
            for index, value in enumerate(values):
                _parse_arrival(
                    _Map({**arrival, key: value}),
                    key_where.child(index, _item_line(values, index, key_where.line)),
                )
            sweep[str(key)] = list(values)
        loads[name] = LoadDef(name=name, arrival=arrival, lengths=lengths, sweep=sweep, line=load_where.line)
    return loads


def _names(raw: Any, where: _Where, choices: tuple[str, ...] | list[str], what: str) -> list[str]:
    values = _as_list(raw)
    if not values:
        raise where.error(f"lists no {what}s")
    out = []
    for index, value in enumerate(values):
        item_where = (
            where.child(index, _item_line(raw, index, where.line)) if isinstance(raw, list) else where
        )
        out.append(_choice(value, tuple(choices), item_where, what))
    return out


def _sweep(raw: Any, where: _Where, check) -> list:
    values = _as_list(raw)
    if not values:
        raise where.error("an empty sweep has no points; give at least one value")
    out = []
    for index, value in enumerate(values):
        item_where = (
            where.child(index, _item_line(raw, index, where.line)) if isinstance(raw, list) else where
        )
        out.append(check(value, item_where))
    return out


def _parse_experiments(
    raw: Any,
    where: _Where,
    models: dict[str, ModelDef],
    loads: dict[str, LoadDef],
    repository: RepositorySpec,
) -> list[Experiment]:
    if not isinstance(raw, list) or not raw:
        raise where.error("expected a non-empty list of experiments")
    experiments = []
    names: set[str] = set()
    for index, body in enumerate(raw):
        exp_where = where.child(index, _item_line(raw, index, where.line))
        body = _expect_mapping(body, exp_where)
        _check_keys(body, _EXPERIMENT_KEYS, exp_where, required=("name", "models", "variants", "loads"))
        at = lambda key, b=body, w=exp_where: w.child(key, _key_line(b, key, w.line))  # noqa: E731
        name = _str(body["name"], at("name"))
        if "/" in name:
            raise at("name").error(f"{name!r} must not contain '/' (it is part of point ids)")
        if name in names:
            raise at("name").error(f"duplicate experiment name {name!r}")
        names.add(name)
        experiment = Experiment(
            name=name,
            models=_names(body["models"], at("models"), list(models), "model"),
            variants=_names(body["variants"], at("variants"), VARIANTS, "variant"),
            loads=_names(body["loads"], at("loads"), list(loads), "load"),
            line=exp_where.line,
        )
        if "batching" in body:
            _parse_batching(body["batching"], at("batching"), experiment)
        if "slicing" in body:
            _parse_slicing(body["slicing"], at("slicing"), experiment, repository)
        if "reorch" in body:
            _parse_reorch(body["reorch"], at("reorch"), experiment)
        for key in ("duration_s", "slo_ms"):
            if key in body:
                setattr(experiment, key, _number(body[key], at(key), positive=True))
        if "repeats" in body:
            experiment.repeats = _int(body["repeats"], at("repeats"), minimum=1)
        if "warmup_s" in body:
            experiment.warmup_s = _number(body["warmup_s"], at("warmup_s"), minimum=0)
        if "protocol" in body:
            experiment.protocol = _choice(body["protocol"], PROTOCOLS, at("protocol"), "protocol")
        experiments.append(experiment)
    return experiments


def _parse_batching(raw: Any, where: _Where, experiment: Experiment) -> None:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _BATCHING_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    if "max_batch_size" in raw:
        experiment.max_batch_size = _sweep(
            raw["max_batch_size"], at("max_batch_size"), lambda v, w: _int(v, w, minimum=1)
        )
        experiment.where["max_batch_size"] = (at("max_batch_size").file, at("max_batch_size").line)
    if "max_queue_delay_us" in raw:
        experiment.max_queue_delay_us = _sweep(
            raw["max_queue_delay_us"], at("max_queue_delay_us"), lambda v, w: _int(v, w, minimum=0)
        )
    if "instance_count" in raw:
        experiment.instance_count = _sweep(
            raw["instance_count"], at("instance_count"), lambda v, w: _int(v, w, minimum=1)
        )
    for key in ("max_queue_size", "default_timeout_us"):  # Triton's default queue policy
        if key in raw:
            setattr(experiment, key, _sweep(raw[key], at(key), lambda v, w: _int(v, w, minimum=0)))
    if "preferred_batch_sizes" in raw:
        value = raw["preferred_batch_sizes"]
        # one list of sizes is one setting; a list of lists is a sweep over settings
        settings = (
            value
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value)
            else [value]
        )
        checked = []
        for index, setting in enumerate(settings):
            setting_where = at("preferred_batch_sizes")
            if settings is value:
                setting_where = setting_where.child(index, _item_line(value, index, setting_where.line))
            if not isinstance(setting, list):
                raise setting_where.error(f"expected a list of batch sizes (e.g. [4, 8]), got {setting!r}")
            sizes = [_int(v, setting_where, minimum=1) for v in setting]
            if sizes != sorted(set(sizes)):
                raise setting_where.error(f"batch sizes must be distinct and increasing, got {sizes}")
            for mbs in experiment.max_batch_size:
                if mbs is not None and sizes and sizes[-1] > mbs:
                    raise setting_where.error(
                        f"preferred batch size {sizes[-1]} exceeds max_batch_size {mbs}; Triton refuses it"
                    )
            checked.append(sizes)
        experiment.preferred_batch_sizes = checked


def _parse_slicing(raw: Any, where: _Where, experiment: Experiment, repository: RepositorySpec) -> None:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _SLICING_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    if not (set(experiment.variants) & {"ensemble", "reorch"}):
        raise where.error(
            "slicing knobs need the 'ensemble' or 'reorch' variant; this experiment has "
            f"{', '.join(experiment.variants)}"
        )
    if "stages" in raw:
        experiment.stages = _sweep(raw["stages"], at("stages"), lambda v, w: _int(v, w, minimum=1))
        experiment.where["stages"] = (at("stages").file, at("stages").line)
    if "balance" in raw:
        experiment.balance = _sweep(
            raw["balance"], at("balance"), lambda v, w: _choice(v, BALANCES, w, "balance")
        )
    if (experiment.stages != [None] or experiment.balance != [None]) and not repository.build:
        raise where.error("slicing sweeps rebuild the model; set repository.build: true")




def knob_parameter(value: Any) -> str:
    """A knob value as the reorch model's config.pbtxt string parameter (lists become "8,16,32")."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_reorch(raw: Any, where: _Where, experiment: Experiment) -> None:
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _REORCH_KEYS, where)
    at = lambda key: where.child(key, _key_line(raw, key, where.line))  # noqa: E731
    if "reorch" not in experiment.variants:
        raise where.error(
            f"reorch knobs need the 'reorch' variant; this experiment has {', '.join(experiment.variants)}"
        )
    if "policy" in raw:
        experiment.policy = _sweep(
            raw["policy"], at("policy"), lambda v, w: _choice(v, REORCH_POLICIES, w, "reorch policy")
        )
    if "knobs" not in raw:
        return
    knobs_where = at("knobs")
    knobs_raw = _expect_mapping(raw["knobs"], knobs_where)
    # "policy" is its own axis; the rest are the knob dataclass's fields
    _check_keys(knobs_raw, [f.name for f in dataclasses.fields(ReorchKnobs)], knobs_where)
    for key, value in knobs_raw.items():
        key_where = knobs_where.child(str(key), _key_line(knobs_raw, key, knobs_where.line))
        # a list of lists sweeps list-valued knobs (bucket_bounds); a list of scalars sweeps a scalar knob
        values = _sweep(value, key_where, _check_knob_value)
        experiment.knobs[str(key)] = values
        for index, one in enumerate(values):
            try:
                ReorchKnobs.from_parameters({str(key): knob_parameter(one)})
            except (ValueError, TypeError, ConfigValidationError) as error:
                item_where = (
                    key_where.child(index, _item_line(value, index, key_where.line))
                    if isinstance(value, list)
                    else key_where
                )
                raise item_where.error(str(error)) from None


def _check_knob_value(value: Any, where: _Where) -> Any:
    if isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    if isinstance(value, (bool, str, int, float)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise where.error(f"knob values must be >= 0, got {value}")
        return value
    raise where.error(f"expected a number, string, boolean or list of numbers as knob value, got {value!r}")


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
    for experiment in plan.experiments:
        for model in experiment.models:
            limit = limits.get(model)
            if limit is None:
                raise _Where(plan.source, plan.models[model].line, f"models.{model}").error(
                    f"model {model!r} is not in the repository; available: {', '.join(sorted(limits)) or 'none'}"
                )
            for variant in experiment.variants:
                if variant not in limit.variants:
                    raise _Where(
                        plan.source, experiment.line, f"experiments.{experiment.name}.variants"
                    ).error(
                        f"model {model!r} has no {variant!r} variant in the repository "
                        f"(it has {', '.join(limit.variants)})"
                    )
            stages = [k for k in experiment.stages if k is not None]
            if not stages and set(experiment.variants) & {"ensemble", "reorch"}:
                stages = [plan.repository.stages] if plan.repository.build else []
            if limit.max_stages is not None:
                for k in stages:
                    if k > limit.max_stages:
                        file, line = experiment.where.get("stages", (plan.source, experiment.line))
                        raise _Where(file, line, f"experiments.{experiment.name}.slicing.stages").error(
                            f"K={k} is larger than {model} allows (at most {limit.max_stages} stages)"
                        )
            if limit.max_batch_size is not None:
                for mbs in experiment.max_batch_size:
                    if mbs is not None and mbs > limit.max_batch_size:
                        file, line = experiment.where.get("max_batch_size", (plan.source, experiment.line))
                        raise _Where(
                            file, line, f"experiments.{experiment.name}.batching.max_batch_size"
                        ).error(
                            f"{mbs} exceeds the {limit.max_batch_size} {model} was built with; raise "
                            "repository.max_batch_size"
                        )
