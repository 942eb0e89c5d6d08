"""Honest findings: sentences with numbers that never read latency off a saturated queue.

Rules (issue 9):

- two configurations are compared at the same offered load only; where the loads differ no winner
  is named;
- when a side is saturated its latencies measure queue growth, not the server, so the comparison is
  of achieved throughput (and of capacity from ``capacity.json`` when there is one);
- a difference is stated with its 95% bootstrap confidence interval and called a gain or a loss only
  when the interval excludes 0; otherwise "no measurable difference". With repeats the interval
  resamples repeats (run-to-run variation); from single runs it covers request-to-request variation
  only, and the sentence says so;
- "highest throughput within the SLO" uses achieved throughput of stable points only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from loadtest.report.data import (
    GENERATOR_LIMITED,
    SAME_LOAD_TOLERANCE,
    STABLE,
    UNKNOWN,
    PointData,
    RunData,
    by_label,
    group,
    load_curve,
)
from loadtest.stats import DifferenceCI, bootstrap_difference, nearest_rank

TAIL_PCT = 99.0  # the latency percentile findings compare

# verdicts
BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no measurable difference"
NO_WINNER = "no winner"


@dataclass
class Comparison:
    """One configuration against another at one load."""

    metric: str  # "p99 ms", "achieved req/s" or "" (nothing comparable)
    base_value: float
    other_value: float
    ci: DifferenceCI | None
    verdict: str  # BETTER / WORSE (for ``other`` against ``base``), NO_DIFFERENCE or NO_WINNER
    text: str  # the sentence, without the subject


def _p99(values: np.ndarray) -> float:
    return nearest_rank(values, TAIL_PCT) / 1000.0


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _basis(a: list[PointData], b: list[PointData]) -> str:
    if len(a) > 1 and len(b) > 1:
        return f"{len(b)} and {len(a)} repeats, interval over repeats"
    return "from single runs: the interval covers request-to-request variation only, not run-to-run"


def _runs(a: list[PointData], b: list[PointData]) -> str:
    if len(a) > 1 and len(b) > 1:
        return f"means of {len(b)} and {len(a)} repeats"
    return "single runs"


def _ci_text(ci: DifferenceCI, unit: str) -> str:
    return f"{ci.estimate:+.1f} {unit}, {ci.confidence:.0%} CI [{ci.low:+.1f}, {ci.high:+.1f}]"


def _verdict(ci: DifferenceCI, lower_is_better: bool) -> str:
    if not ci.excludes_zero:
        return NO_DIFFERENCE
    return BETTER if (ci.estimate < 0) == lower_is_better else WORSE


def _offered(points: list[PointData]) -> float:
    return float(np.mean([p.offered_rps for p in points]))


def _achieved(points: list[PointData]) -> float:
    return float(np.mean([p.achieved_rps for p in points]))


def _capacity_sentence(run: RunData | None, base: PointData, other: PointData) -> str:
    if run is None:
        return ""
    a, b = run.capacity_of(base.point), run.capacity_of(other.point)
    if not a or not b or not a.get("sustained_rps") or not b.get("sustained_rps"):
        return ""
    limited = [c for c in (a, b) if c.get("limited_by") == "load_generator"]
    text = (
        f" Capacity search: {other.label} sustained {b['sustained_rps'] / a['sustained_rps']:.2f}x "
        f"{base.label}'s rate ({b['sustained_rps']:.1f} vs {a['sustained_rps']:.1f} req/s)"
    )
    if limited:
        text += "; the load generator limited the search, so this is a lower bound, not the server's capacity"
    return text + "."


def compare_configs(base: list[PointData], other: list[PointData], run: RunData | None = None) -> Comparison:
    """Compare ``other`` against ``base`` (each: the repeats of one configuration at one load).

    ``run`` gives ``capacity.json`` for saturated comparisons.
    """
    base = [p for p in base if p.measured and p.ok.any()]
    other = [p for p in other if p.measured and p.ok.any()]
    if not base or not other:
        return Comparison(
            "", math.nan, math.nan, None, NO_WINNER, "could not be compared: a side has no successful request"
        )
    offered_a, offered_b = _offered(base), _offered(other)
    if abs(offered_b - offered_a) > SAME_LOAD_TOLERANCE * max(offered_a, offered_b):
        return Comparison(
            "offered req/s",
            offered_a,
            offered_b,
            None,
            NO_WINNER,
            f"ran at different offered loads ({offered_b:.1f} vs {offered_a:.1f} req/s): no winner named",
        )
    off_schedule = [p for p in base + other if p.stability == GENERATOR_LIMITED]
    if off_schedule:
        which = "the baseline" if off_schedule[0] in base else "this configuration"
        return Comparison(
            "",
            math.nan,
            math.nan,
            None,
            NO_WINNER,
            f"the load generator did not keep its open-loop schedule for {which} "
            f"({off_schedule[0].unstable_reason}), so the server saw other arrivals than planned: no winner named.",
        )
    saturated_a = any(p.saturated for p in base)
    saturated_b = any(p.saturated for p in other)
    achieved_a, achieved_b = _achieved(base), _achieved(other)
    if saturated_a or saturated_b:
        capacity = _capacity_sentence(run, base[0], other[0])
        if saturated_a and saturated_b:
            ci = None
            verdict = NO_WINNER
            text = (
                f"both saturated at {offered_a:.1f} req/s offered, so latencies are not compared; achieved "
                f"{achieved_b:.1f} vs {achieved_a:.1f} req/s ({achieved_b / achieved_a:.2f}x)"
                if achieved_a
                else f"both saturated at {offered_a:.1f} req/s offered, so latencies are not compared"
            )
            if len(base) > 1 and len(other) > 1:
                ci = bootstrap_difference(
                    [[p.achieved_rps] for p in base], [[p.achieved_rps] for p in other], _mean
                )
                verdict = _verdict(ci, lower_is_better=False)
                text += f" ({_ci_text(ci, 'req/s')}, {_basis(base, other)}"
                outcome = {BETTER: "measurably more served", WORSE: "measurably less served"}.get(
                    verdict, verdict
                )
                text += f"; {outcome})"
            else:
                text += f" ({_runs(base, other)})"
            return Comparison("achieved req/s", achieved_a, achieved_b, ci, verdict, text + "." + capacity)
        if saturated_a:
            verdict, text = BETTER, f"kept up with {offered_a:.1f} req/s offered where the baseline saturated"
        else:
            verdict, text = WORSE, f"saturated at {offered_a:.1f} req/s offered where the baseline kept up"
        text += (
            f"; latencies are not compared; achieved {achieved_b:.1f} vs {achieved_a:.1f} req/s"
            f" ({_runs(base, other)})."
        )
        return Comparison("achieved req/s", achieved_a, achieved_b, None, verdict, text + capacity)
    ci = bootstrap_difference([p.ok_latencies_us for p in base], [p.ok_latencies_us for p in other], _p99)
    verdict = _verdict(ci, lower_is_better=True)
    p99_a = _p99(np.concatenate([p.ok_latencies_us for p in base]))
    p99_b = p99_a + ci.estimate
    if verdict == NO_DIFFERENCE:
        text = f"no measurable difference in p99 ({p99_b:.1f} vs {p99_a:.1f} ms; {_ci_text(ci, 'ms')} spans 0"
    else:
        change = "lower" if verdict == BETTER else "higher"
        text = f"p99 {change}: {p99_b:.1f} vs {p99_a:.1f} ms ({_ci_text(ci, 'ms')}"
    text += f"; {_basis(base, other)})"
    unknown = [p for p in base + other if p.stability == UNKNOWN]
    if unknown:
        text += "; stability was not recorded for these points, so a queue may have been growing"
    return Comparison(f"p{TAIL_PCT:g} ms", p99_a, p99_b, ci, verdict, text + ".")


def _baseline_label(labels: list[str], points: dict[str, list[PointData]]) -> str:
    for label in labels:
        if points[label][0].point["variant"] == "whole":
            return label
    return labels[0]


def comparison_findings(run: RunData) -> list[str]:
    """Each configuration against the baseline (the whole model, else the first) at the same load."""
    out = []
    groups: dict[str, list[PointData]] = defaultdict(list)
    for p in run.measured_points():
        groups[p.comparison_key].append(p)
    for points in groups.values():
        configs = by_label(points)
        if len(configs) < 2:
            continue
        base_label = _baseline_label(list(configs), configs)
        first = configs[base_label][0].point
        subject = f"For {first['model']} under {first['load']} ({first['experiment']})"
        for label, repeats in configs.items():
            if label == base_label:
                continue
            result = compare_configs(configs[base_label], repeats, run)
            out.append(f"{subject}, {label} against {base_label}: {result.text}")
    return out


def slo_findings(run: RunData) -> list[str]:
    """Per model and load curve: the highest achieved throughput of a stable point whose p99 met the SLO."""
    out = []
    for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
        curves: dict[tuple[str, str], list[PointData]] = defaultdict(list)
        for p in points:
            curves[(p.label, load_curve(p.point["load"]))].append(p)
        results = []
        for (label, curve), curve_points in curves.items():
            levels = group(curve_points, "load")
            if len(levels) < 2:
                continue
            slo_ms = curve_points[0].summary.slo_ms
            meeting = [
                _achieved(level)
                for level in levels.values()
                if all(p.stability == STABLE and p.summary.p99_ms <= slo_ms for p in level)
            ]
            results.append((label, curve, slo_ms, max(meeting) if meeting else None))
        if results:
            parts = [
                f"{label} ({curve}): " + (f"{value:.1f}" if value is not None else "no stable point met it")
                for label, curve, _, value in sorted(results, key=lambda r: -(r[3] or 0))
            ]
            out.append(
                f"For {model} ({experiment}), the highest achieved throughput of a stable point with p99 within "
                f"the {results[0][2]:g} ms SLO, in req/s: " + "; ".join(parts) + "."
            )
    return out


def capacity_findings(run: RunData) -> list[str]:
    """Per model: each variant's sustained rate against the whole model's (from capacity.json)."""
    out = []
    for model, variants in ((run.capacity or {}).get("models") or {}).items():
        whole = (variants.get("whole") or {}).get("sustained_rps")
        parts = []
        for label, entry in variants.items():
            rate = entry.get("sustained_rps")
            if rate is None:
                continue
            text = f"{label} {rate:.1f} req/s"
            if whole and label != "whole":
                text += f" ({rate / whole:.2f}x whole)"
            if entry.get("limited_by") == "load_generator":
                text += " (limited by the load generator: a lower bound, not the server's capacity)"
            parts.append(text)
        if parts:
            out.append(f"Sustained rate of {model} (capacity search): " + "; ".join(parts) + ".")
    return out


def saturation_findings(run: RunData) -> list[str]:
    """How many points were saturated or of unknown stability."""
    measured = run.measured_points()
    if not measured:
        return []
    saturated = [p for p in measured if p.saturated]
    off_schedule = [p for p in measured if p.stability == GENERATOR_LIMITED]
    unknown = [p for p in measured if p.stability == UNKNOWN]
    out = []
    if off_schedule:
        out.append(
            f"In {len(off_schedule)} of {len(measured)} points the load generator did not keep its open-loop "
            "schedule (late arrivals or a busy generator): the server saw other arrivals than planned, and no "
            "finding compares them."
        )
    if saturated:
        out.append(
            f"{len(saturated)} of {len(measured)} points were saturated (their queues did not keep up); "
            "their latencies measure queue growth over the window, not the server, and no finding quotes them."
        )
    if unknown:
        out.append(
            f"{len(unknown)} of {len(measured)} points did not record their stability (an older run); where "
            "completions kept up with arrivals within 5% they are treated as comparable."
        )
    return out


def batching_findings(run: RunData) -> list[str]:
    """Average batch size per stage of the configurations under one load."""
    out = []
    for (experiment, model, load), points in group(
        run.measured_points(), "experiment", "model", "load"
    ).items():
        sizes = []
        for label, repeats in by_label(points).items():
            values = [
                s.get("avg_batch_size")
                for s in repeats[0].stage_rows()
                if s.get("avg_batch_size") is not None
            ]
            if values:
                sizes.append(f"{label} {' / '.join(f'{v:.2f}' for v in values)}")
        if len(sizes) >= 2:
            out.append(
                f"Average batch size per stage for {model} under {load} ({experiment}): "
                + "; ".join(sizes)
                + "."
            )
    return out


def failure_findings(run: RunData) -> list[str]:
    """Failed points and points with failed requests."""
    out = []
    for p in run.points:
        if p.status != "ok":
            out.append(f"Point {p.point['point_id']} failed: {p.record.get('error')}.")
        elif p.measured and p.summary.errors:
            first = p.record.get("first_error") or "see requests.csv"
            out.append(
                f"Point {p.point['point_id']}: {p.summary.errors} of {p.summary.requests} requests failed "
                f"(first error: {first})."
            )
    return out


def loadgen_findings(run: RunData) -> list[str]:
    """Points where the load generator may have shaped the measurement.

    A saturated point's late arrivals follow from the server's backlog (the generator's sending threads
    wait on it): they are named apart, since its achieved rate still measures the server.
    """
    late = [p for p in run.points if (p.record.get("loadgen") or {}).get("bottleneck")]
    flagged = [p for p in late if not p.saturated]
    backlogged = [p for p in late if p.saturated]
    out = []
    if flagged:
        loadgen = [p.record["loadgen"] for p in flagged]
        facts = [f"busiest process {max(lg.get('cpu_percent') or 0 for lg in loadgen):.0f}% of a core"]
        late_shares = [lg["late_share"] for lg in loadgen if lg.get("late_share") is not None]
        late_p99s = [lg["late_p99_ms"] for lg in loadgen if lg.get("late_p99_ms") is not None]
        if late_shares and late_p99s:
            facts.append(
                f"up to {max(late_shares):.0%} of arrivals sent more than 2 ms late, p99 lateness up to "
                f"{max(late_p99s):.1f} ms"
            )
        else:
            facts.append(f"up to {max(lg.get('late_arrivals') or 0 for lg in loadgen)} late arrivals in a point")
        out.append(
            f"In {len(flagged)} of {len(run.points)} points that kept up, the load generator was near CPU saturation "
            f"or sent arrivals more than 2 ms late ({'; '.join(facts)}). Where the CPU is low, the cause is the "
            "generator sharing the cores with the server: arrivals came burstier than planned, so these points' "
            "latencies include some load-generator delay (the stability verdict allows lateness up to two mean "
            "gaps between arrivals)."
        )
    if backlogged:
        out.append(
            f"In {len(backlogged)} saturated points arrivals also left late: the server's backlog held the "
            "generator's sending threads. Their achieved rate still measures the server; no finding uses their "
            "latencies."
        )
    return out


# The findings, in the order the report lists them: one function per kind (a new kind is one entry).
FINDINGS = (
    saturation_findings,
    capacity_findings,
    comparison_findings,
    slo_findings,
    batching_findings,
    failure_findings,
    loadgen_findings,
)


def findings(run: RunData) -> list[str]:
    """Every finding of the run, as sentences."""
    return [sentence for kind in FINDINGS for sentence in kind(run)]
