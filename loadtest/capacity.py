"""Capacity search: the highest open-loop rate a variant sustains, and the highest rate within its SLO.

Pure decision logic; the caller supplies a *prober* that runs one short open-loop load at a rate
and judges it (``loadtest.characterization`` runs it through ``loadtest.driver.run_load`` and
``loadtest.stability.assess``). The search brackets, then bisects, as perf_analyzer's
``--binary-search`` does:

1. **Bracket.** From ``start_rps``, multiply the rate by ``growth`` while probes are sustained. A probe
   that is not sustained closes the bracket; its achieved throughput (what the server completed while
   overloaded) is a good estimate of capacity, so the next probe goes just below it. A probe that
   kept up and failed on its latency percentile alone (the SLO of ``stagebatch tune``) says nothing
   of where the percentile passes: the search divides its rate by ``growth`` instead.
2. **Bisect** (geometric midpoint) between the highest sustained rate and the lowest unsustained
   one until they are within ``tolerance`` of each other or ``max_probes`` probes ran.

The sustained rate is the highest sustained probe. The rate at the SLO is the highest sustained
probe whose latency percentile stays within the SLO (``None`` when none did). When the probe that
bounds the search from above failed because the *load generator* fell behind, the result says
``limited_by: "load_generator"``: the figure is a lower bound of the server's capacity, not the
capacity itself. Field meanings: docs/characterization.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from core.errors import ConfigValidationError

DEFAULT_START_RPS = 50.0
DEFAULT_GROWTH = 3.0
DEFAULT_TOLERANCE = 0.08  # stop when the bracket is this narrow (relative)
DEFAULT_MAX_PROBES = 8
BELOW_ACHIEVED = 0.9  # after an overloaded probe, try this share of what it achieved
KEPT_UP = 0.95  # a failed probe that completed at least this share of its offered rate failed on latency alone
LIMITED_BY_SERVER = "server"
LIMITED_BY_LOADGEN = "load_generator"
WHOLE_LABEL = "whole"


@dataclass
class Probe:
    """One probe of the search: a short open-loop load at ``rate_rps`` and its verdict."""

    rate_rps: float
    stable: bool
    achieved_rps: float
    p99_ms: float | None  # the chosen percentile of successful latencies (ms)
    reason: str | None = None  # why not sustained (stability's unstable_reason)
    load_generator_limited: bool = False  # only the generator's schedule failed

    def to_dict(self) -> dict:
        """The contract-5 probe fields (plus ``load_generator_limited``)."""
        data = asdict(self)
        data["rate_rps"] = round(self.rate_rps, 2)
        data["achieved_rps"] = round(self.achieved_rps, 2)
        data["p99_ms"] = None if self.p99_ms is None else round(self.p99_ms, 2)
        return data


@dataclass
class SearchSettings:
    """Knobs of the search (see the module docstring)."""

    start_rps: float = DEFAULT_START_RPS
    growth: float = DEFAULT_GROWTH
    tolerance: float = DEFAULT_TOLERANCE
    max_probes: int = DEFAULT_MAX_PROBES
    min_rps: float = 0.5  # never probe below this
    max_rps: float = 1e6  # never probe above this

    def __post_init__(self) -> None:
        if not self.start_rps > 0:
            raise ConfigValidationError(f"capacity start_rps must be > 0, got {self.start_rps}")
        if not self.growth > 1:
            raise ConfigValidationError(f"capacity growth must be > 1, got {self.growth}")
        if not 0 < self.tolerance < 1:
            raise ConfigValidationError(f"capacity tolerance must be in (0, 1), got {self.tolerance}")
        if self.max_probes < 2:
            raise ConfigValidationError(f"capacity max_probes must be >= 2, got {self.max_probes}")


@dataclass
class CapacityResult:
    """What the search found for one model variant (one entry of ``capacity.json``)."""

    sustained_rps: float | None  # highest sustained probe rate (None: even the lowest probe failed)
    slo_rps: float | None  # highest sustained probe rate within the SLO
    slo_ms: float
    percentile: float
    limited_by: str  # "server" or "load_generator"
    probes: list[Probe] = field(default_factory=list)
    converged: bool = False  # the bracket closed to the tolerance

    def to_dict(self) -> dict:
        """JSON-ready, as written to ``capacity.json``."""
        return {
            "sustained_rps": None if self.sustained_rps is None else round(self.sustained_rps, 2),
            "slo_rps": None if self.slo_rps is None else round(self.slo_rps, 2),
            "slo_ms": self.slo_ms,
            "percentile": self.percentile,
            "limited_by": self.limited_by,
            "converged": self.converged,
            "probes": [p.to_dict() for p in self.probes],
        }


def bracket(probes: list[Probe]) -> tuple[float | None, Probe | None]:
    """(highest sustained rate, lowest failed probe above it); either may be None (pure).

    A failed probe below a sustained one (noise on a shared machine) does not bound the search.
    """
    lo = max((p.rate_rps for p in probes if p.stable), default=None)
    failed = [p for p in probes if not p.stable and (lo is None or p.rate_rps > lo)]
    return lo, (min(failed, key=lambda p: p.rate_rps) if failed else None)


def _overloaded(probe: Probe) -> bool:
    """The probe's server fell behind (it completed less than ``KEPT_UP`` of the offered rate): what it
    achieved estimates capacity. A probe that kept up and failed on its latency percentile alone says
    nothing of where the percentile passes: its achieved rate is just the offered one (a search that
    went down by ``BELOW_ACHIEVED`` from it took 7% steps: five probes from 72 to 58 req/s, none passing)."""
    return probe.achieved_rps < KEPT_UP * probe.rate_rps


def next_rate(probes: list[Probe], settings: SearchSettings) -> float | None:
    """The rate of the next probe, or None when the search is done (pure)."""
    if len(probes) >= settings.max_probes:
        return None
    if not probes:
        return settings.start_rps
    lo, hi_probe = bracket(probes)
    hi = hi_probe.rate_rps if hi_probe else None
    if hi is None:  # still bracketing upwards
        rate = lo * settings.growth
        return None if rate > settings.max_rps else rate
    if lo is not None and hi / lo - 1 <= settings.tolerance:
        return None
    if lo is None:  # bracketing downwards: go below what the overloaded probe achieved
        estimate = BELOW_ACHIEVED * hi_probe.achieved_rps
        rate = estimate if _overloaded(hi_probe) and 0 < estimate < hi else hi / settings.growth
        return None if rate < settings.min_rps else rate
    rate = math.sqrt(lo * hi)
    # the first probe inside the bracket aims just under what the overloaded probe achieved
    last = probes[-1]
    if not last.stable and last is hi_probe and _overloaded(last):
        estimate = BELOW_ACHIEVED * last.achieved_rps
        if lo < estimate < hi and (hi / estimate - 1) > settings.tolerance / 2:
            rate = estimate
    return rate


def summarize_search(probes: list[Probe], *, slo_ms: float, percentile: float, settings: SearchSettings) -> CapacityResult:
    """The result of a finished search (pure)."""
    sustained = [p for p in probes if p.stable]
    lo, hi_probe = bracket(probes)
    within = [p.rate_rps for p in sustained if p.p99_ms is not None and p.p99_ms <= slo_ms]
    limited_by = LIMITED_BY_LOADGEN if hi_probe is not None and hi_probe.load_generator_limited else LIMITED_BY_SERVER
    converged = lo is not None and hi_probe is not None and hi_probe.rate_rps / lo - 1 <= settings.tolerance
    return CapacityResult(
        sustained_rps=lo,
        slo_rps=max(within) if within else None,
        slo_ms=slo_ms,
        percentile=percentile,
        limited_by=limited_by,
        probes=list(probes),
        converged=converged,
    )


def search_capacity(
    prober: Callable[[float], Probe],
    *,
    slo_ms: float,
    percentile: float = 99,
    settings: SearchSettings | None = None,
    on_probe: Callable[[Probe], None] | None = None,
) -> CapacityResult:
    """Bracket and bisect with ``prober(rate_rps) -> Probe`` (see the module docstring)."""
    settings = settings or SearchSettings()
    probes: list[Probe] = []
    while (rate := next_rate(probes, settings)) is not None:
        probe = prober(rate)
        probes.append(probe)
        if on_probe is not None:
            on_probe(probe)
    return summarize_search(probes, slo_ms=slo_ms, percentile=percentile, settings=settings)


def capacity_document(results: dict[str, dict[str, CapacityResult]], **extra) -> dict:
    """``capacity.json``: ``{"models": {MODEL: {VARIANT_LABEL: result}}}`` plus ``extra`` settings."""
    return {
        "models": {model: {label: r.to_dict() for label, r in labels.items()} for model, labels in results.items()},
        **extra,
    }


def variant_label(variant: str, policy: str | None = None) -> str:
    """``whole``, ``ensemble`` or ``reorch:<policy>`` (the keys of ``capacity.json``)."""
    return f"reorch:{policy or 'default'}" if variant == "reorch" else variant


def whole_capacity(document: dict | None, model: str) -> float | None:
    """The whole model's sustained rate from a ``capacity.json`` document (None when absent)."""
    if not document:
        return None
    entry = (document.get("models") or {}).get(model, {}).get(WHOLE_LABEL)
    return None if entry is None else entry.get("sustained_rps")
