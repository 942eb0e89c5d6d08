"""Workloads: when requests arrive and how long their sequences are. Pure numpy, no I/O but trace files.

Arrival processes turn a seeded :class:`numpy.random.Generator` into the arrival timestamps of one
whole run (seconds from the start). The schedule is drawn once for the run, so the same seed gives
the same arrivals whether one process or N Locust workers send them (worker k sends arrivals
k, k+N, k+2N, ...): the superposition the server sees is exactly the drawn schedule.

Examples of use::

    spec = ArrivalSpec.parse("bursty:rate_rps=200,on_s=0.5,off_s=1.5")
    times_s = make_arrival_process(spec).arrival_times_s(60.0, np.random.default_rng(0))
    lengths = make_length_distribution(LengthSpec.parse("longtail:median=32,sigma=0.8"),
                                       min_length=1, max_length=128).sample(np.random.default_rng(1), 100)
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from core.errors import BadParameterError, ConfigValidationError

TRACE_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}  # unit -> ticks per second


# ---------------------------------------------------------------------------------------------
# Specs (validated, serialisable; the Locust CLI and env vars use the compact "kind:k=v,..." form)
# ---------------------------------------------------------------------------------------------


def _parse_compact(text: str, what: str) -> tuple[str, dict[str, str]]:
    """Split ``"kind:key=value,key=value"`` into the kind and a dict of raw strings."""
    kind, _, rest = text.strip().partition(":")
    fields: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadParameterError(
                f"{what} {text!r}: item {item!r} is not key=value; write e.g. 'poisson:rate_rps=50'"
            )
        fields[key.strip()] = value.strip()
    return kind.strip(), fields


def _coerce_fields(cls: type, fields: dict[str, str], what: str) -> dict[str, object]:
    """Cast raw strings to the dataclass field types (int/float/bool/str/Path)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out: dict[str, object] = {}
    for key, raw in fields.items():
        if key not in types or key == "kind":
            known = ", ".join(name for name in types if name != "kind")
            raise BadParameterError(f"{what}: unknown field {key!r}; known fields: {known}")
        type_name = str(types[key])
        try:
            if type_name.startswith("bool"):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("1", "true", "yes")
            elif type_name.startswith("int"):
                out[key] = int(raw)
            elif type_name.startswith("float"):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise BadParameterError(f"{what}: field {key}={raw!r} is not a valid {type_name}") from None
    return out


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigValidationError(message)


_Spec = TypeVar("_Spec", bound="_KindSpec")


class _KindSpec:
    """A dataclass spec of one ``kind`` from a registry, written compactly as ``kind:field=value,...``.

    Subclasses name what they are (``what``) and their registry; each registered class checks the
    fields of its own kind (``check(spec)``).
    """

    kind: str
    what: ClassVar[str]

    @staticmethod
    def registry() -> Mapping[str, Any]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        kinds = self.registry()
        _require(self.kind in kinds, f"{self.what} kind {self.kind!r} is unknown; choose one of {', '.join(kinds)}")
        kinds[self.kind].check(self)

    @classmethod
    def parse(cls: type[_Spec], text: str) -> _Spec:
        """Parse ``"poisson:rate_rps=50"``, ``"closed:users=8"``, ``"fixed:length=64"``, ..."""
        kind, raw = _parse_compact(text, f"{cls.what} spec")
        return cls(kind=kind, **_coerce_fields(cls, raw, f"{cls.what} spec {text!r}"))  # type: ignore[call-arg]

    def to_dict(self) -> dict:
        """Only the fields that differ from the defaults, plus the kind."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "kind" or value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[_Spec], data: dict) -> _Spec:
        return cls(**data)


@dataclass
class ArrivalSpec(_KindSpec):
    """How requests arrive.

    kinds and their fields:
      * ``closed``: ``users`` concurrent users, each sending its next request as soon as the
        previous one is answered (no think time). The only closed-loop kind.
      * ``poisson``: open loop, exponential gaps at ``rate_rps``.
      * ``constant``: open loop, equal gaps at ``rate_rps`` (perf_analyzer's default distribution).
      * ``bursty``: open loop, Poisson at ``rate_rps`` during "on" periods and at ``off_rate_rps``
        (default 0) during "off" periods. ``on_s``/``off_s`` are the period lengths; with
        ``markov=true`` they are the *means* of exponential sojourns (a two-rate Markov-modulated
        Poisson process) instead of a fixed square wave. The run starts in the "on" state.
      * ``spike``: open loop, Poisson at ``rate_rps`` except ``spike_rate_rps`` during
        [``spike_start_s``, ``spike_start_s + spike_duration_s``).
      * ``trace``: open loop, replays the timestamps of ``trace_path`` (see :func:`read_trace`),
        in ``trace_unit`` (s|ms|us), played ``speed`` times faster.
    """

    kind: str
    users: int = 0
    """closed: concurrent users."""
    rate_rps: float = 0.0
    """Every open-loop kind but trace: mean arrivals per second (bursty: while "on")."""
    off_rate_rps: float = 0.0
    on_s: float = 0.0
    off_s: float = 0.0
    markov: bool = False
    """bursty: the off rate, the on/off period lengths and whether they are exponential."""
    spike_rate_rps: float = 0.0
    spike_start_s: float = 0.0
    spike_duration_s: float = 0.0
    """spike: the rate during the spike, when it starts and how long it lasts."""
    trace_path: str = ""
    trace_unit: str = "s"
    speed: float = 1.0

    what: ClassVar[str] = "arrival"

    @staticmethod
    def registry() -> dict[str, type[ArrivalProcess]]:
        return ARRIVALS

    @property
    def is_open_loop(self) -> bool:
        """True for every kind but ``closed``: arrivals never wait for earlier responses."""
        return ARRIVALS[self.kind].open_loop


@dataclass
class LengthSpec(_KindSpec):
    """Sequence lengths (tokens / time steps) of requests to a sequence model.

    kinds and their fields:
      * ``fixed``: every request has ``length``.
      * ``uniform``: integers uniform in [``min_length``, ``max_length``] (inclusive).
      * ``longtail``: log-normal with ``median`` and ``sigma`` (of the underlying normal), rounded
        and clipped to the model's [min_length, max_length] (or the spec's, when given).
      * ``file``: drawn with replacement from the integers in ``path`` (one or more per line,
        ``#`` comments allowed).
    """

    kind: str
    length: int = 0
    min_length: int = 0
    max_length: int = 0
    median: float = 0.0
    sigma: float = 0.0
    path: str = ""

    what: ClassVar[str] = "length"

    @staticmethod
    def registry() -> dict[str, type[LengthDistribution]]:
        return LENGTHS


# ---------------------------------------------------------------------------------------------
# Arrival processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateSegment:
    """A stretch of time with one constant arrival rate."""

    start_s: float
    end_s: float
    rate_rps: float


def _poisson_in_segments(segments: list[RateSegment], rng: np.random.Generator) -> np.ndarray:
    """Exact inhomogeneous Poisson arrivals for a piecewise-constant rate.

    In each segment the count is Poisson(rate * length) and, given the count, the times are
    independent uniforms (the order-statistics property), so no gap-by-gap loop is needed.
    """
    parts = []
    for seg in segments:
        length_s = seg.end_s - seg.start_s
        if length_s <= 0 or seg.rate_rps <= 0:
            continue
        count = rng.poisson(seg.rate_rps * length_s)
        parts.append(np.sort(rng.uniform(seg.start_s, seg.end_s, size=count)))
    return np.concatenate(parts) if parts else np.empty(0)


class ArrivalProcess(ABC):
    """An arrival kind: validates its spec fields and, for open-loop kinds, draws the run's arrivals.

    One subclass per kind, registered with :func:`register_arrival` (like Locust's ``LoadTestShape``
    subclasses): a new kind is a class here, plus any new field it needs on :class:`ArrivalSpec`.
    """

    kind: ClassVar[str]
    open_loop: ClassVar[bool] = True
    # the ArrivalSpec fields in requests per second (plans may give them as multiples of capacity)
    rate_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def check(cls, spec: ArrivalSpec) -> None:
        """Raise ConfigValidationError when ``spec``'s fields do not make a valid arrival of this kind."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        """The process of a checked spec (relative trace paths resolve against ``base_dir``)."""

    @abstractmethod
    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Sorted arrival times in seconds from the start, all in [0, duration_s)."""

    def inter_arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Gaps between consecutive arrivals (the first one measured from time 0)."""
        return np.diff(self.arrival_times_s(duration_s, rng), prepend=0.0)

    @abstractmethod
    def mean_rate_rps(self, duration_s: float) -> float:
        """Expected arrivals per second over a run of ``duration_s``."""

    @classmethod
    def period_s(cls, fields: Mapping[str, Any]) -> float | None:
        """The period of a periodic arrival given by its spec ``fields`` (stability windows align to it)."""
        return None


ARRIVALS: dict[str, type[ArrivalProcess]] = {}


def register_arrival(cls: type[ArrivalProcess]) -> type[ArrivalProcess]:
    """Class decorator: make ``cls.kind`` an arrival kind of specs, plans and the Locust CLI."""
    ARRIVALS[cls.kind] = cls
    return cls


def _check_rate(spec: ArrivalSpec) -> None:
    _require(math.isfinite(spec.rate_rps) and spec.rate_rps > 0,
             f"{spec.kind} arrivals need rate_rps > 0 (got rate_rps={spec.rate_rps})")


@register_arrival
class ClosedLoop(ArrivalProcess):
    """``users`` concurrent users, each sending its next request as soon as the previous is answered."""

    kind = "closed"
    open_loop = False

    @classmethod
    def check(cls, spec: ArrivalSpec) -> None:
        _require(spec.users >= 1, f"closed-loop arrivals need users >= 1 (got users={spec.users})")

    @classmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        raise ConfigValidationError(f"arrival kind {spec.kind!r} is closed-loop and has no arrival process")

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        raise ConfigValidationError("closed-loop users pace themselves: there is no arrival schedule")

    def mean_rate_rps(self, duration_s: float) -> float:
        raise ConfigValidationError("closed-loop users pace themselves: there is no offered rate")


@dataclass
class _OneRate(ArrivalProcess):
    """An open-loop kind at one ``rate_rps`` for the whole run."""

    rate_fields: ClassVar[tuple[str, ...]] = ("rate_rps",)
    rate_rps: float

    @classmethod
    def check(cls, spec: ArrivalSpec) -> None:
        _check_rate(spec)

    @classmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        return cls(spec.rate_rps)

    def mean_rate_rps(self, duration_s: float) -> float:
        return self.rate_rps


@register_arrival
class PoissonArrivals(_OneRate):
    kind: ClassVar[str] = "poisson"

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        return _poisson_in_segments([RateSegment(0.0, duration_s, self.rate_rps)], rng)


@register_arrival
class ConstantArrivals(_OneRate):
    kind: ClassVar[str] = "constant"

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        return np.arange(0.0, duration_s, 1.0 / self.rate_rps)


@register_arrival
@dataclass
class OnOffArrivals(ArrivalProcess):
    """Poisson at ``on_rate_rps`` / ``off_rate_rps`` in alternating on/off periods (starting "on").

    ``markov=False``: periods of exactly ``on_s`` and ``off_s`` (a square wave).
    ``markov=True``: exponential sojourns with means ``on_s`` and ``off_s`` (two-rate MMPP).
    """

    kind: ClassVar[str] = "bursty"
    rate_fields: ClassVar[tuple[str, ...]] = ("rate_rps", "off_rate_rps")
    on_rate_rps: float
    off_rate_rps: float
    on_s: float
    off_s: float
    markov: bool = False

    @classmethod
    def check(cls, spec: ArrivalSpec) -> None:
        _check_rate(spec)
        _require(spec.off_rate_rps >= 0, f"bursty off_rate_rps must be >= 0 (got {spec.off_rate_rps})")
        _require(
            spec.on_s > 0 and spec.off_s > 0,
            f"bursty arrivals need on_s > 0 and off_s > 0 (got on_s={spec.on_s}, off_s={spec.off_s})",
        )

    @classmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        return cls(spec.rate_rps, spec.off_rate_rps, spec.on_s, spec.off_s, spec.markov)

    def segments(self, duration_s: float, rng: np.random.Generator) -> list[RateSegment]:
        """The on/off timeline of one run; drawn from ``rng`` before the arrivals when markov."""
        out: list[RateSegment] = []
        t, on = 0.0, True
        while t < duration_s:
            mean_s = self.on_s if on else self.off_s
            length_s = rng.exponential(mean_s) if self.markov else mean_s
            end = min(t + length_s, duration_s)
            out.append(RateSegment(t, end, self.on_rate_rps if on else self.off_rate_rps))
            t, on = end, not on
        return out

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        return _poisson_in_segments(self.segments(duration_s, rng), rng)

    @classmethod
    def period_s(cls, fields: Mapping[str, Any]) -> float | None:
        """on_s + off_s of the square wave; a Markov-modulated process has no period."""
        if fields.get("markov"):
            return None
        return float(fields.get("on_s") or 0) + float(fields.get("off_s") or 0) or None

    def mean_rate_rps(self, duration_s: float) -> float:
        # long-run mean (exact for the square wave over whole periods, and for the MMPP in the limit)
        total_s = self.on_s + self.off_s
        return (self.on_rate_rps * self.on_s + self.off_rate_rps * self.off_s) / total_s


@register_arrival
@dataclass
class SpikeArrivals(ArrivalProcess):
    kind: ClassVar[str] = "spike"
    rate_fields: ClassVar[tuple[str, ...]] = ("rate_rps", "spike_rate_rps")
    base_rate_rps: float
    spike_rate_rps: float
    spike_start_s: float
    spike_duration_s: float

    @classmethod
    def check(cls, spec: ArrivalSpec) -> None:
        _check_rate(spec)
        _require(spec.spike_rate_rps > 0, f"spike arrivals need spike_rate_rps > 0 (got {spec.spike_rate_rps})")
        _require(
            spec.spike_start_s >= 0 and spec.spike_duration_s > 0,
            "spike arrivals need spike_start_s >= 0 and spike_duration_s > 0 "
            f"(got spike_start_s={spec.spike_start_s}, spike_duration_s={spec.spike_duration_s})",
        )

    @classmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        return cls(spec.rate_rps, spec.spike_rate_rps, spec.spike_start_s, spec.spike_duration_s)

    def segments(self, duration_s: float) -> list[RateSegment]:
        start = min(self.spike_start_s, duration_s)
        end = min(self.spike_start_s + self.spike_duration_s, duration_s)
        return [
            RateSegment(0.0, start, self.base_rate_rps),
            RateSegment(start, end, self.spike_rate_rps),
            RateSegment(end, duration_s, self.base_rate_rps),
        ]

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        return _poisson_in_segments(self.segments(duration_s), rng)

    def mean_rate_rps(self, duration_s: float) -> float:
        segs = self.segments(duration_s)
        return sum(s.rate_rps * (s.end_s - s.start_s) for s in segs) / duration_s if duration_s > 0 else 0.0


@dataclass
class Trace:
    """Arrival times read from a file, relative to its first timestamp, with optional lengths."""

    times_s: np.ndarray
    lengths: np.ndarray | None = None
    source: str = ""


@register_arrival
@dataclass
class TraceArrivals(ArrivalProcess):
    """Replays a trace exactly (the rng is unused); arrivals at or after ``duration_s`` are dropped."""

    kind: ClassVar[str] = "trace"
    trace: Trace
    speed: float = 1.0

    @classmethod
    def check(cls, spec: ArrivalSpec) -> None:
        _require(bool(spec.trace_path), "trace arrivals need trace_path (a file of timestamps)")
        _require(
            spec.trace_unit in TRACE_UNITS,
            f"trace_unit {spec.trace_unit!r} is unknown; choose one of {', '.join(TRACE_UNITS)}",
        )
        _require(spec.speed > 0, f"trace speed must be > 0 (got {spec.speed})")

    @classmethod
    def from_spec(cls, spec: ArrivalSpec, base_dir: Path | None) -> ArrivalProcess:
        path = Path(spec.trace_path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return cls(read_trace(path, spec.trace_unit), spec.speed)

    def arrival_times_s(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        times = self.trace.times_s / self.speed
        return times[times < duration_s]

    def lengths(self, duration_s: float) -> np.ndarray | None:
        """The trace's per-arrival lengths matching :meth:`arrival_times_s`, if it has them."""
        if self.trace.lengths is None:
            return None
        return self.trace.lengths[self.trace.times_s / self.speed < duration_s]

    def mean_rate_rps(self, duration_s: float) -> float:
        return len(self.arrival_times_s(duration_s, np.random.default_rng(0))) / duration_s if duration_s else 0.0


def read_trace(path: str | Path, unit: str = "s") -> Trace:
    """Read a trace file: one arrival per line, ``timestamp`` or ``timestamp,seq_len``.

    Separators may be commas or whitespace; blank lines and ``#`` comments are skipped; a first line
    that is not numeric is taken as a header. Timestamps are in ``unit`` (s|ms|us), must be finite and
    non-decreasing, and are made relative to the first one (so epoch timestamps work). Either every
    line has a length or none does.
    """
    path = Path(path)
    if unit not in TRACE_UNITS:
        raise BadParameterError(f"trace unit {unit!r} is unknown; choose one of {', '.join(TRACE_UNITS)}")
    try:
        text = path.read_text()
    except OSError as error:
        raise BadParameterError(f"trace file {path}: cannot be read ({error.strerror}); check trace_path") from None
    times: list[float] = []
    lengths: list[int] = []
    seen_data = False
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        cells = content.replace(",", " ").split()
        try:
            stamp = float(cells[0])
        except ValueError:
            if not seen_data:  # a header such as "timestamp,seq_len"
                seen_data = True
                continue
            raise ConfigValidationError(
                f"trace file {path} line {number}: timestamp {cells[0]!r} is not a number"
            ) from None
        seen_data = True
        if not math.isfinite(stamp):
            raise ConfigValidationError(f"trace file {path} line {number}: timestamp {cells[0]!r} is not finite")
        if times and stamp < times[-1]:
            raise ConfigValidationError(
                f"trace file {path} line {number}: timestamp {cells[0]} is earlier than the previous one; "
                "sort the trace by time"
            )
        if len(cells) > 2:
            raise ConfigValidationError(
                f"trace file {path} line {number}: expected 'timestamp[,seq_len]', got {len(cells)} columns"
            )
        if len(cells) == 2:
            try:
                length = int(cells[1])
            except ValueError:
                raise ConfigValidationError(
                    f"trace file {path} line {number}: seq_len {cells[1]!r} is not an integer"
                ) from None
            if length < 1:
                raise ConfigValidationError(f"trace file {path} line {number}: seq_len {length} must be >= 1")
            lengths.append(length)
        if bool(lengths) != (len(cells) == 2) or (lengths and len(lengths) != len(times) + 1):
            raise ConfigValidationError(
                f"trace file {path} line {number}: some lines have a seq_len column and some do not; "
                "give it on every line or on none"
            )
        times.append(stamp)
    if not times:
        raise ConfigValidationError(f"trace file {path}: no timestamps found")
    array = np.asarray(times, dtype=np.float64)
    return Trace(
        # subtract in the file's unit first: epoch timestamps would lose precision otherwise
        times_s=(array - array[0]) / TRACE_UNITS[unit],
        lengths=np.asarray(lengths, dtype=np.int64) if lengths else None,
        source=str(path),
    )


ARRIVAL_KINDS = tuple(ARRIVALS)
# every ArrivalSpec field some kind reads as requests per second
ARRIVAL_RATE_FIELDS = tuple(dict.fromkeys(name for cls in ARRIVALS.values() for name in cls.rate_fields))


def make_arrival_process(spec: ArrivalSpec, *, base_dir: Path | None = None) -> ArrivalProcess:
    """The arrival process of an open-loop spec (``closed`` has none: users pace themselves)."""
    return ARRIVALS[spec.kind].from_spec(spec, base_dir)


# ---------------------------------------------------------------------------------------------
# Sequence-length distributions
# ---------------------------------------------------------------------------------------------


class LengthDistribution(ABC):
    """A length kind: validates its spec fields and draws lengths within the model's bounds.

    One subclass per kind, registered with :func:`register_lengths`.
    """

    kind: ClassVar[str]

    @classmethod
    @abstractmethod
    def check(cls, spec: LengthSpec) -> None:
        """Raise ConfigValidationError when ``spec``'s fields do not make valid lengths of this kind."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: LengthSpec, bounds: _LengthBounds, base_dir: Path | None) -> LengthDistribution:
        """The distribution of a checked spec for a model accepting ``bounds``."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` lengths (int64, each within the model's bounds)."""


LENGTHS: dict[str, type[LengthDistribution]] = {}


def register_lengths(cls: type[LengthDistribution]) -> type[LengthDistribution]:
    """Class decorator: make ``cls.kind`` a length kind of specs, plans and the Locust CLI."""
    LENGTHS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class _LengthBounds:
    """The lengths a model accepts, [min_length, max_length]."""

    min_length: int
    max_length: int

    def check(self, low: int, high: int, what: str) -> None:
        if low < self.min_length or high > self.max_length:
            raise ConfigValidationError(
                f"{what} spans [{low}, {high}] but the model accepts lengths in "
                f"[{self.min_length}, {self.max_length}]; choose lengths inside the manifest's sequence range"
            )


@register_lengths
@dataclass
class FixedLengths(LengthDistribution):
    kind: ClassVar[str] = "fixed"
    length: int

    @classmethod
    def check(cls, spec: LengthSpec) -> None:
        _require(spec.length >= 1, f"fixed lengths need length >= 1 (got length={spec.length})")

    @classmethod
    def from_spec(cls, spec: LengthSpec, bounds: _LengthBounds, base_dir: Path | None) -> LengthDistribution:
        bounds.check(spec.length, spec.length, f"fixed length {spec.length}")
        return cls(spec.length)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return np.full(count, self.length, dtype=np.int64)


@register_lengths
@dataclass
class UniformLengths(LengthDistribution):
    kind: ClassVar[str] = "uniform"
    min_length: int
    max_length: int

    @classmethod
    def check(cls, spec: LengthSpec) -> None:
        _require(
            1 <= spec.min_length <= spec.max_length,
            "uniform lengths need 1 <= min_length <= max_length "
            f"(got min_length={spec.min_length}, max_length={spec.max_length})",
        )

    @classmethod
    def from_spec(cls, spec: LengthSpec, bounds: _LengthBounds, base_dir: Path | None) -> LengthDistribution:
        bounds.check(spec.min_length, spec.max_length, "uniform lengths")
        return cls(spec.min_length, spec.max_length)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.integers(self.min_length, self.max_length, size=count, endpoint=True, dtype=np.int64)


@register_lengths
@dataclass
class LongTailLengths(LengthDistribution):
    """Log-normal lengths: many short requests and a few long ones, clipped to the model's range."""

    kind: ClassVar[str] = "longtail"
    median: float
    sigma: float
    min_length: int
    max_length: int

    @classmethod
    def check(cls, spec: LengthSpec) -> None:
        _require(spec.median >= 1, f"longtail lengths need median >= 1 (got median={spec.median})")
        _require(spec.sigma > 0, f"longtail lengths need sigma > 0 (got sigma={spec.sigma})")
        _require(
            spec.max_length == 0 or spec.max_length >= max(spec.min_length, 1),
            f"longtail max_length={spec.max_length} is below min_length={spec.min_length}",
        )

    @classmethod
    def from_spec(cls, spec: LengthSpec, bounds: _LengthBounds, base_dir: Path | None) -> LengthDistribution:
        low = spec.min_length or bounds.min_length
        high = spec.max_length or bounds.max_length
        bounds.check(low, high, "longtail lengths")
        return cls(spec.median, spec.sigma, low, high)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        raw = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=count)
        return np.clip(np.rint(raw), self.min_length, self.max_length).astype(np.int64)


@register_lengths
@dataclass
class EmpiricalLengths(LengthDistribution):
    """Lengths drawn with replacement from the integers of a file."""

    kind: ClassVar[str] = "file"
    values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def check(cls, spec: LengthSpec) -> None:
        _require(bool(spec.path), "file lengths need path (a file of integers)")

    @classmethod
    def from_spec(cls, spec: LengthSpec, bounds: _LengthBounds, base_dir: Path | None) -> LengthDistribution:
        path = Path(spec.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        values = read_lengths_file(path)
        bounds.check(int(values.min()), int(values.max()), f"lengths file {path}")
        return cls(values)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.choice(self.values, size=count, replace=True).astype(np.int64)


LENGTH_KINDS = tuple(LENGTHS)


def read_lengths_file(path: str | Path) -> np.ndarray:
    """Integers from a file: any number per line, separated by commas or whitespace, ``#`` comments."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BadParameterError(f"lengths file {path}: cannot be read ({error.strerror}); check path") from None
    values: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for cell in line.split("#", 1)[0].replace(",", " ").split():
            try:
                values.append(int(cell))
            except ValueError:
                raise ConfigValidationError(f"lengths file {path} line {number}: {cell!r} is not an integer") from None
    if not values:
        raise ConfigValidationError(f"lengths file {path}: no lengths found")
    return np.asarray(values, dtype=np.int64)


def make_length_distribution(
    spec: LengthSpec, *, min_length: int, max_length: int, base_dir: Path | None = None
) -> LengthDistribution:
    """The distribution of ``spec`` for a model accepting lengths in [min_length, max_length]."""
    return LENGTHS[spec.kind].from_spec(spec, _LengthBounds(min_length, max_length), base_dir)


# ---- a run's seeded streams: what the load generator sends and the simulator replays ----

STREAM_ARRIVALS, STREAM_LENGTHS, STREAM_VALUES = 1, 2, 3  # keys of a run's independent random streams


def stream_rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    """The generator of one of a run's seeded streams (``more``: e.g. the sending process's index)."""
    return np.random.default_rng([seed, stream, *more])


def arrival_schedule(arrival: ArrivalSpec, lengths: LengthSpec | None, seed: int, total_s: float, *,
                       sequence: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A run's arrival times (s from its start, warm-up included) and each arrival's sequence length.

    Every sending process draws the same schedule (process k of N sends arrivals k, k+N, ...), and the
    simulator replays it (``tuning.simulate``). ``sequence``: the model's (min, max) length, None for a
    model without a sequence input (lengths None). Lengths come from ``lengths``, else from a trace's
    ``seq_len`` column, else every request has the maximum length.
    """
    process = make_arrival_process(arrival)
    times = process.arrival_times_s(total_s, stream_rng(seed, STREAM_ARRIVALS))
    if sequence is None:
        return times, None
    min_length, max_length = sequence
    if lengths is not None:
        distribution = make_length_distribution(lengths, min_length=min_length, max_length=max_length)
        return times, distribution.sample(stream_rng(seed, STREAM_LENGTHS), len(times))
    if isinstance(process, TraceArrivals) and process.lengths(total_s) is not None:
        return times, process.lengths(total_s)
    return times, np.full(len(times), max_length, dtype=np.int64)
