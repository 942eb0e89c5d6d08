"""The joint configuration space and its search by simulation (pure: no server).

Space (``SearchSpace``): variant (whole / ensemble / reorch), for reorch the policy and its knobs,
max batch size, max queue delay, preferred batch sizes, instance count and onnxruntime threads per
instance (as built, or 1: on a small CPU, two single-threaded instances or stages run side by side on
the cores instead of taking turns on all of them). K and the cut balance come from the profiles at
hand: every profile (one per built K) contributes its own candidates; a thread count only where the
profile knows its slowdown (``ModelProfile.thread_slowdown``).

Search (``search``), two rounds of simulation:

1. **screen**: every candidate runs one short simulation at a screening rate (by default the
   simulated SLO capacity of the default whole model, times ``screen_multiple``); candidates are ranked
   by goodput at the SLO there, and only the best ``keep`` go on;
2. **rank**: each survivor's *simulated capacity at the SLO* is searched with the real capacity
   search logic (``loadtest.capacity.search_capacity``) and a simulated prober (a probe passes when the
   simulation is stable and its p99 is within the SLO). The objective orders them:
   ``goodput`` (highest rate within the SLO), ``throughput`` (highest sustained rate, SLO ignored) or
   ``p99`` (lowest p99 at the screening rate).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backends.reorch.policies import BatchPolicy
from loadtest.capacity import CapacityResult, Probe, SearchSettings, search_capacity
from core.errors import BadParameterError
from tuning.batcher import BatcherSettings
from tuning.simulate import (
    DEFAULT_POLICY,
    ModelProfile,
    SimResult,
    SimSettings,
    VariantConfig,
    Workload,
    batch1_latency_ms,
    simulate,
)

OBJECTIVES = ("goodput", "p99", "throughput")
PREFERRED_CHOICES = ("none", "max", "half_max")
# every reorch policy of the registry, the default first
POLICIES = (DEFAULT_POLICY, *(policy.value for policy in BatchPolicy if policy.value != DEFAULT_POLICY))
T = TypeVar("T")
COMPLEXITY = {"whole": 0, "ensemble": 1, "reorch": 2}  # on a tie, the simpler configuration ranks first


@dataclass(frozen=True)
class SearchSpace:
    """The values each knob may take (the defaults are the ``stagebatch tune`` space)."""

    variants: tuple[str, ...] = ("whole", "ensemble", "reorch")
    max_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    queue_delays_us: tuple[int, ...] = (0, 100, 500, 1000, 2000, 5000)
    preferred: tuple[str, ...] = PREFERRED_CHOICES
    instance_counts: tuple[int, ...] = (1, 2)
    intra_op_threads: tuple[int | None, ...] = (None, 1)  # None: as built
    policies: tuple[str, ...] = POLICIES
    reorch_knobs: tuple[tuple[tuple[str, Any], ...], ...] = ((),)

    def __post_init__(self) -> None:
        bad = [p for p in self.preferred if p not in PREFERRED_CHOICES]
        if bad:
            raise BadParameterError(f"preferred choices {bad}: choose from {', '.join(PREFERRED_CHOICES)}")

    def candidates(self, profile: ModelProfile) -> list[VariantConfig]:
        """Every distinct configuration of this space that the profile's tables cover."""
        out: dict[str, VariantConfig] = {}
        sizes = sorted({s for s in self.max_batch_sizes if s <= profile.max_batch_size})
        threads_known = dict.fromkeys(None if t == profile.built_threads else t for t in self.intra_op_threads
                                      if t is None or t == profile.built_threads or t in profile.thread_slowdown)
        for variant, threads in itertools.product(self.variants, threads_known):
            for size in sizes:
                for delay in self.queue_delays_us:
                    if size == 1 and delay:
                        continue  # a batch of one never waits for company
                    for preferred in self.preferred:
                        sizes_pref = _preferred(preferred, size)
                        for instances in self.instance_counts:
                            batcher = BatcherSettings(size, delay if size > 1 else 0, sizes_pref, instances, threads)
                            if variant != "reorch":
                                config = VariantConfig(variant, batcher)
                                out[repr(config)] = config
                                continue
                            if instances != 1:
                                continue  # the reorchestrator runs one instance that returns at once
                            for policy in self.policies:
                                for knobs in self.reorch_knobs:
                                    config = VariantConfig("reorch", batcher, policy, tuple(sorted(knobs)))
                                    out[repr(config)] = config
        return list(out.values())


def _preferred(choice: str, size: int) -> tuple[int, ...]:
    if choice == "none" or size == 1:
        return ()
    if choice == "max":
        return (size,)
    return tuple(sorted({max(1, size // 2), size}))


@dataclass
class Candidate:
    """One configuration of one profile, and what the simulator said about it."""

    profile: ModelProfile
    config: VariantConfig
    screen: SimResult | None = None
    capacity: CapacityResult | None = None  # simulated: probes pass when stable and p99 within the SLO
    sustained: CapacityResult | None = None  # simulated: probes pass when stable (throughput objective)
    score: float = float("-inf")

    @property
    def key(self) -> str:
        """A stable name of the configuration (folder names, resume)."""
        b = self.config.batcher
        parts = [f"k{self.profile.num_stages}" if self.config.variant != "whole" else "", self.config.variant]
        if self.config.variant == "reorch":
            parts.append(self.config.policy or "dva")
            parts += [f"{k}{v}" for k, v in self.config.knobs]
        parts += [f"mbs{b.max_batch_size}", f"d{b.max_queue_delay_us}",
                  "p" + "-".join(map(str, b.preferred_batch_sizes)) if b.preferred_batch_sizes else "",
                  f"i{b.instance_count}", "" if b.intra_op_threads is None else f"t{b.intra_op_threads}"]
        return "_".join(p for p in parts if p)

    def describe(self) -> dict[str, Any]:
        out = {"key": self.key, "stages": self.profile.num_stages, **self.config.describe(),
               "simulated_score": None if self.score == float("-inf") else round(self.score, 3)}
        if self.screen is not None:
            out["screen"] = {k: self.screen.to_dict()[k] for k in ("p50_ms", "p99_ms", "goodput_rps", "stable")}
        if self.capacity is not None:
            out["simulated_slo_rps"] = self.capacity.sustained_rps
        if self.sustained is not None:
            out["simulated_sustained_rps"] = self.sustained.sustained_rps
        return out


@dataclass(frozen=True)
class SearchOptions:
    """How hard to search (durations are simulated seconds)."""

    objective: str = "goodput"
    keep: int = 12  # survivors of the screening round
    keep_per_label: int = 2  # and at least this many of every variant label (whole, ensemble, reorch:POLICY)
    screen_multiple: float = 1.2  # screening rate = this x the default whole model's simulated SLO capacity
    screen_rate_rps: float | None = None  # or this rate, when given
    screen_duration_s: float = 6.0
    rank_duration_s: float = 10.0
    warmup_s: float = 1.0
    tolerance: float = 0.05
    max_probes: int = 10
    max_requests: int = 3000  # a simulated window holds at most about this many requests (fast models)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise BadParameterError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.keep < 1:
            raise BadParameterError(f"keep={self.keep}: must be >= 1")


def simulated_capacity(profile: ModelProfile, config: VariantConfig, workload: Workload, settings: SimSettings,
                       options: SearchOptions, *, within_slo: bool, start_rps: float | None = None) -> CapacityResult:
    """The highest rate the simulation sustains (``within_slo``: and keeps p99 within the SLO)."""
    def prober(rate_rps: float) -> Probe:
        result = simulate(profile, config, bounded(workload.with_rate(rate_rps), options), settings)
        p99 = result.summary.p99_ms
        ok = result.stable and (not within_slo or p99 <= workload.slo_ms)
        reason = result.unstable_reason or (None if ok else f"p99 {p99:.1f} ms above the SLO {workload.slo_ms} ms")
        return Probe(rate_rps, ok, result.achieved_rps, p99, reason)

    # Start near the batch-1 service rate: capacity is at least that (for a stable config), so the
    # bracket closes in a few probes.
    start = start_rps or max(1.0, 0.8 * 1000.0 / batch1_latency_ms(profile, settings))
    search_settings = SearchSettings(start_rps=start, growth=2.0, tolerance=options.tolerance,
                                     max_probes=options.max_probes)
    return search_capacity(prober, slo_ms=workload.slo_ms, percentile=99, settings=search_settings)


def bounded(workload: Workload, options: SearchOptions) -> Workload:
    """``workload`` with a window of at most ``options.max_requests`` requests at its rate (and at least
    0.5 s): a model that serves thousands of requests a second needs no 10 s window to be judged, and
    simulating one would take longer than the search's budget."""
    rate = workload.arrival.rate_rps or 0.0
    if rate <= 0 or workload.duration_s * rate <= options.max_requests:
        return workload
    duration = max(0.5, options.max_requests / rate)
    return dataclasses.replace(workload, duration_s=duration,
                               warmup_s=workload.warmup_s * duration / workload.duration_s)


def check_slo(profile: ModelProfile, slo_ms: float, settings: SimSettings) -> float:
    """Refuse an SLO no configuration can meet; return the batch-1 latency (ms)."""
    floor_ms = batch1_latency_ms(profile, settings)
    settings = settings.for_variant("whole", profile.name)
    if slo_ms <= floor_ms:
        raise BadParameterError(
            f"--slo-ms {slo_ms:g} is below {profile.name}'s batch-1 latency ({floor_ms:.2f} ms: every stage at batch "
            f"size 1 from the manifest's latency_ms tables, plus {settings.launch_overhead_ms + settings.request_overhead_ms:g}"
            f" ms of overheads); no configuration can answer within it. Raise --slo-ms above {floor_ms:.1f} ms, or "
            f"choose a smaller --size")
    return floor_ms


def search(profiles: Sequence[ModelProfile], workload: Workload, *, space: SearchSpace | None = None,
           settings: SimSettings | None = None, options: SearchOptions | None = None,
           progress: Callable[[str], None] | None = None,
           deadline: Callable[[], bool] | None = None) -> tuple[list[Candidate], dict[str, Any]]:
    """Rank the space's candidates over ``profiles``; return them best first, and the search's facts.

    ``workload.arrival`` gives the arrival kind (its rate is replaced by the screening rate and by the
    capacity search's probes). ``deadline()`` returning True stops the ranking round early (the
    candidates ranked so far are kept, the rest keep their screening order).
    """
    space, settings, options = space or SearchSpace(), settings or SimSettings(), options or SearchOptions()
    if not profiles:
        raise BadParameterError("no model profile to search over")
    say = progress or (lambda _: None)
    for profile in profiles:
        check_slo(profile, workload.slo_ms, settings)
    baseline_profile = profiles[0]
    baseline = Candidate(baseline_profile, VariantConfig("whole", baseline_profile.default_batcher()))
    quick = dataclasses.replace(workload, duration_s=options.rank_duration_s, warmup_s=options.warmup_s)
    baseline.capacity = simulated_capacity(baseline_profile, baseline.config, quick, settings, options, within_slo=True)
    base_rps = baseline.capacity.sustained_rps or baseline.capacity.probes[0].rate_rps
    screen_rps = options.screen_rate_rps or base_rps * options.screen_multiple
    say(f"default whole model: simulated {base_rps:.1f} req/s within the SLO; screening at {screen_rps:.1f} req/s")

    candidates = [Candidate(p, c) for p in profiles for c in space.candidates(p)]
    screen_load = bounded(dataclasses.replace(workload.with_rate(screen_rps), duration_s=options.screen_duration_s,
                                              warmup_s=options.warmup_s), options)
    for candidate in candidates:
        if deadline is not None and deadline() and any(c.screen for c in candidates):
            say("time is up: screening stops here (the rest are not ranked)")
            break
        candidate.screen = simulate(candidate.profile, candidate.config, screen_load, settings)
    candidates = [c for c in candidates if c.screen is not None]
    candidates.sort(key=lambda c: (-c.screen.goodput_rps, c.screen.summary.p99_ms))
    say(f"screened {len(candidates)} configurations at {screen_rps:.1f} req/s; ranking the best {options.keep} and "
        f"the best {options.keep_per_label} of every variant")

    survivors = candidates[:options.keep]
    for label in sorted({c.config.label for c in candidates}):  # the best of every variant gets ranked too
        survivors += [c for c in candidates if c.config.label == label and c not in survivors][
            :max(0, options.keep_per_label - sum(s.config.label == label for s in survivors))]
    ranked = []
    for candidate in survivors:
        if deadline is not None and deadline():
            say("time is up: ranking stops here")
            break
        if options.objective == "p99":
            candidate.score = -candidate.screen.summary.p99_ms
        elif options.objective == "goodput":
            candidate.capacity = simulated_capacity(candidate.profile, candidate.config, quick, settings, options,
                                                    within_slo=True, start_rps=screen_rps)
            candidate.score = candidate.capacity.sustained_rps or 0.0
        else:
            candidate.sustained = simulated_capacity(candidate.profile, candidate.config, quick, settings, options,
                                                     within_slo=False, start_rps=screen_rps)
            candidate.score = candidate.sustained.sustained_rps or 0.0
        ranked.append(candidate)
    ranked.sort(key=lambda c: (-round(c.score, 1), COMPLEXITY[c.config.variant], c.config.batcher.max_queue_delay_us))
    ordered = ranked + [c for c in survivors if c not in ranked]
    facts = {"candidates": len(candidates), "screen_rps": round(screen_rps, 2), "objective": options.objective,
             "baseline": {**baseline.describe(), "simulated_slo_rps": baseline.capacity.sustained_rps}}
    return ordered, facts


def diverse(ranked: Sequence[T], count: int, label: Callable[[T], str]) -> list[T]:
    """The best ``count`` of ``ranked``, at most one per label first (then the next best of any label)."""
    chosen: list[T] = []
    labels: set[str] = set()
    for item in ranked:
        if len(chosen) < count and label(item) not in labels:
            chosen.append(item)
            labels.add(label(item))
    chosen += [item for item in ranked if item not in chosen][:count - len(chosen)]
    return sorted(chosen, key=ranked.index)


def _threads_why(candidate: Candidate) -> str:
    """What the configuration's onnxruntime thread count does (from the profile's measured slowdown)."""
    config, profile = candidate.config, candidate.profile
    threads = config.batcher.intra_op_threads
    sizes = [s["avg_batch_size"] for s in (candidate.screen.stage_batches if candidate.screen else [])
             if s.get("avg_batch_size")]
    rows = max(1, round(max(sizes))) if sizes else profile.max_batch_size
    slowdown = profile.thread_factor(threads, rows)
    built = "one per core, as built" if profile.built_threads == 0 else f"{profile.built_threads}, as built"
    at_once = {"whole": f"its {config.batcher.instance_count} instance(s)", "ensemble": "its stages",
               "reorch": "its stage launches"}[config.variant]
    return (f"runs onnxruntime with {threads} thread(s) per launch instead of {built}: a batch of {rows} takes "
            f"{slowdown:.2f}x as long alone, but {at_once} run side by side on the cores instead of taking turns "
            "on all of them")


def why(candidate: Candidate, baseline_rps: float | None) -> str:
    """A sentence on what makes this configuration win (from its simulated behaviour)."""
    config = candidate.config
    b = config.batcher
    bits = []
    if candidate.screen is not None and candidate.screen.stage_batches:
        sizes = [s["avg_batch_size"] for s in candidate.screen.stage_batches if s.get("avg_batch_size")]
        if sizes:
            bits.append(f"it forms batches of {min(sizes):.1f}-{max(sizes):.1f} rows at the screening load")
    if b.max_queue_delay_us:
        bits.append(f"waits up to {b.max_queue_delay_us} µs for company")
    if b.preferred_batch_sizes:
        bits.append(f"sends preferred sizes {list(b.preferred_batch_sizes)} at once")
    if b.instance_count > 1:
        bits.append(f"runs {b.instance_count} instances")
    if b.intra_op_threads is not None:
        bits.append(_threads_why(candidate))
    if config.variant == "reorch":
        ops = candidate.screen.operations if candidate.screen else {}
        used = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:3])
        bits.append(f"re-forms batches between stages with policy {config.policy}" + (f" ({used})" if used else ""))
    elif config.variant == "ensemble":
        bits.append(f"batches each of the {candidate.profile.num_stages} stages on its own")
    gain = ""
    if baseline_rps and candidate.score > 0 and candidate.capacity is not None:
        gain = f"; simulated {candidate.score / baseline_rps:.2f}x the default whole model's rate within the SLO"
    return "; ".join(bits) + gain

