"""The report's sections: one class each, listed in :data:`SECTIONS` in the order they appear.

A section turns a :class:`~loadtest.report.data.RunData` into :class:`Content` (plain-text
paragraphs and bullets, tables, figures); the templates render it as HTML and Markdown. A new
section or figure is one class here plus one entry in :data:`SECTIONS`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from loadtest.report.attribution import KINDS, attribute
from loadtest.report.data import SATURATED, PointData, RunData, by_label, group, load_curve
from loadtest.report.figures import Figure, marker_style, plot, stability_legend
from loadtest.report.findings import findings
from loadtest.stats import cdf

CPU_NOTE = (
    "On a CPU-only machine with 2 cores a pipeline of stages cannot add parallelism: the stages share the "
    "same two cores, so a sliced model never computes more per second than two copies of the whole model. "
    "Whatever the ensemble and the reorchestrator gain here comes from less padding (bucketing requests of "
    "similar length) and less waiting (batches entering while older ones are in later stages, catch-up "
    "batches instead of queueing), and they pay per-stage overhead for it. Pipeline parallelism across "
    "devices shows only on a GPU (see docs/gpu.md)."
)
KIND_COLORS = dict(
    zip(KINDS, ("#bbbbbb", "#cc3311", "#ee8866", "#99ddff", "#4477aa", "#332288", "#44bb99", "#aa4499"))
)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Row:
    """A table row; ``flag`` (e.g. ``saturated``) marks it in the HTML."""

    cells: list[str]
    flag: str = ""


@dataclass
class Table:
    """A table: header and rows."""

    header: list[str]
    rows: list[Row]
    caption: str = ""  # a sentence shown just above the table


@dataclass
class Content:
    """What a section shows (all text is plain; the templates escape it)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether the section has nothing to show."""
        return not (self.paragraphs or self.bullets or self.tables or self.figures)


class Section:
    """A report section: ``title`` and ``build``."""

    title: ClassVar[str]

    def build(self, run: RunData) -> Content:
        """The section's content for ``run``."""
        raise NotImplementedError


def state_cell(point: PointData) -> str:
    """``stable``, ``SATURATED (reason)`` or ``unknown``."""
    if point.saturated:
        return f"SATURATED ({point.unstable_reason})"
    return point.stability


def _heaviest(points: list[PointData]) -> dict[str, PointData]:
    """Per configuration, its stable point under the highest offered load (else its heaviest point)."""
    best: dict[str, PointData] = {}
    for label, repeats in by_label(points).items():
        stable = [p for p in repeats if not p.saturated] or repeats
        best[label] = max(stable, key=lambda p: (p.offered_rps, -p.repeat))
    return best


# ---------------------------------------------------------------- sections


class RunSection(Section):
    title = "Run"

    def build(self, run: RunData) -> Content:
        env = run.environment
        plan = env.get("plan") or {}
        content = Content(self.title)
        content.paragraphs.append(
            f"Plan {plan.get('name', '?')} ({env.get('plan_source', '')}), {len(run.points)} points, started "
            f"{env.get('started_utc', '?')}, finished {env.get('finished_utc', '?')}, server {env.get('server', '?')}."
        )
        facts = {**(env.get("hardware") or {}), **(env.get("software") or {})}
        content.tables.append(Table(["what", "value"], [Row([k, str(v)]) for k, v in facts.items()]))
        return content


class CapacitySection(Section):
    title = "Capacity"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        models = (run.capacity or {}).get("models") or {}
        if not models:
            content.paragraphs.append(
                "No capacity search in this run (capacity.json is absent): the plan used absolute rates only."
            )
            return content
        content.paragraphs.append(
            "From capacity.json: the sustained rate is the highest open-loop rate the server kept up with "
            "(completions within 5% of arrivals, no backlog growth, the generator on schedule); the rate at "
            "the SLO is the highest whose tail latency stayed within the SLO."
        )
        rows = []
        for model, variants in models.items():
            for label, entry in variants.items():
                probes = entry.get("probes") or []
                rows.append(
                    Row(
                        [
                            model,
                            label,
                            fmt(entry.get("sustained_rps")),
                            fmt(entry.get("slo_rps")),
                            f"p{fmt(entry.get('percentile'), 0)} <= {fmt(entry.get('slo_ms'), 0)} ms",
                            str(entry.get("limited_by", "?")),
                            str(len(probes)),
                        ],
                        "limited" if entry.get("limited_by") == "load_generator" else "",
                    )
                )
        content.tables.append(
            Table(
                ["model", "variant", "sustained req/s", "req/s at SLO", "SLO", "limited by", "probes"], rows
            )
        )
        probes = [
            Row(
                [
                    model,
                    label,
                    fmt(probe.get("rate_rps")),
                    "yes" if probe.get("stable") else "no",
                    fmt(probe.get("achieved_rps")),
                    fmt(probe.get("p99_ms")),
                    probe.get("reason") or "-",
                ],
                "" if probe.get("stable") else SATURATED,
            )
            for model, variants in models.items()
            for label, entry in variants.items()
            for probe in entry.get("probes") or []
        ]
        if probes:
            content.tables.append(
                Table(
                    ["model", "variant", "probed req/s", "sustained", "achieved req/s", "p99 ms", "reason"],
                    probes,
                    "The search's probes, in the order run:",
                )
            )
        return content


class ResultsSection(Section):
    title = "Results"
    header: ClassVar[list[str]] = [
        "#",
        "experiment",
        "model",
        "configuration",
        "load",
        "repeat",
        "x capacity",
        "offered req/s",
        "achieved req/s",
        "state",
        "sent",
        "errors",
        "avg ms",
        "p50",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "SLO ms",
        "SLO met",
        "goodput req/s",
    ]

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "Client-side latencies of successful requests, recomputed from requests.csv (nearest-rank "
            "percentiles, ms). x capacity = the load as a multiple of the whole model's measured sustained rate. "
            "Offered = requests sent per second; achieved = successful completions inside "
            "the measured window per second. A SATURATED point did not keep up: its queue grew during the "
            "window, so its latencies measure queue growth and are not compared. SLO met = share of all sent "
            "requests answered successfully within the SLO; goodput = those per second."
        )
        rows = []
        for p in run.points:
            base = [
                str(p.index),
                p.point["experiment"],
                p.point["model"],
                p.label,
                p.point["load"],
                str(p.repeat),
            ]
            s = p.summary
            if s is None:
                rows.append(Row(base + [p.status] + ["n/a"] * (len(self.header) - len(base) - 1), "failed"))
                continue
            rows.append(
                Row(
                    base
                    + [
                        fmt(p.capacity_share, 2),
                        fmt(p.offered_rps),
                        fmt(p.achieved_rps),
                        state_cell(p),
                        str(s.requests),
                        str(s.errors),
                        fmt(s.avg_ms),
                        fmt(s.p50_ms),
                        fmt(s.p90_ms),
                        fmt(s.p95_ms),
                        fmt(s.p99_ms),
                        fmt(s.p999_ms),
                        f"{s.slo_ms:g}",
                        f"{s.slo_attainment:.1%}",
                        fmt(s.goodput_rps),
                    ],
                    SATURATED if p.saturated else "",
                )
            )
        content.tables.append(Table(self.header, rows))
        return content


class ThroughputLatencySection(Section):
    title = "Throughput-latency curves"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "p99 (solid) and p50 (dashed) against achieved throughput, log latency axis: the knee is where "
            "latency leaves its floor. Filled markers are stable points, hollow ones saturated, crosses of "
            "unknown stability; lines join the means over repeats. The dotted vertical line is the sustained "
            "rate from the capacity search."
        )
        for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
            with plot(
                content.figures,
                ("tl", experiment, model),
                f"{model}, experiment {experiment}: latency against achieved throughput",
            ) as (ax,):
                curves: dict[tuple[str, str], list[PointData]] = defaultdict(list)
                for p in points:
                    curves[(p.label, load_curve(p.point["load"]))].append(p)
                for (label, curve_name), curve in sorted(curves.items()):
                    # the line joins the mean over repeats at each load; a marker per repeat
                    levels = sorted(group(curve, "load").values(), key=lambda ps: ps[0].offered_rps)
                    x = [np.mean([p.achieved_rps for p in level]) for level in levels]
                    (line,) = ax.plot(
                        x,
                        [np.mean([p.summary.p99_ms for p in level]) for level in levels],
                        label=f"{label} | {curve_name} p99",
                    )
                    color = line.get_color()
                    p50 = [np.mean([p.summary.p50_ms for p in level]) for level in levels]
                    ax.plot(x, p50, linestyle="--", color=color, alpha=0.6)
                    for p in curve:
                        ax.plot(
                            [p.achieved_rps], [p.summary.p99_ms], linestyle="none", **marker_style(p, color)
                        )
                    capacity = run.capacity_of(curve[0].point)
                    if capacity and capacity.get("sustained_rps"):
                        ax.axvline(capacity["sustained_rps"], color=color, linestyle=":", alpha=0.7)
                ax.axhline(points[0].summary.slo_ms, color="red", linewidth=0.8, alpha=0.5, label="SLO")
                stability_legend(ax)
                ax.set_yscale("log")
                ax.set_xlabel("achieved throughput (completions in the window / s)")
                ax.set_ylabel("latency (ms, log): p99 solid, p50 dashed")
                ax.set_title(f"{model}: throughput vs latency ({experiment})")
        return content


class CdfSection(Section):
    title = "Latency CDFs"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append("Saturated points are drawn dotted: their tails are queue growth.")
        for (experiment, model, load), points in group(
            run.measured_points(), "experiment", "model", "load"
        ).items():
            with plot(
                content.figures,
                ("cdf", experiment, model, load),
                f"{model} under {load}, experiment {experiment}: latency CDF",
                figsize=(7, 4),
                legend_loc="lower right",
            ) as (ax,):
                for p in points:
                    xs, ys = cdf(p.ok_latencies_us)
                    if xs:
                        suffix = ", saturated" if p.saturated else ""
                        repeat = f" r{p.repeat}" if p.record.get("repeats", 1) > 1 else ""
                        ax.step(
                            xs,
                            ys,
                            where="post",
                            linestyle=":" if p.saturated else "-",
                            label=f"{p.label}{repeat} (p99 {p.summary.p99_ms:.1f} ms{suffix})",
                        )
                ax.set_xscale("log")
                ax.set_xlabel("latency (ms, log scale)")
                ax.set_ylabel("fraction of requests")
                ax.set_title(f"{model} under {load} ({experiment})")
        return content


class BatchSizeSection(Section):
    title = "Batch sizes per stage"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "Executions per batch size from Triton's statistics API (batch_stats, before/after deltas) for "
            "whole and stage models; for the reorchestrator, estimated from the batch sizes its per-request "
            "records report (a batch of b rows is seen by b requests). Each configuration at its heaviest "
            "stable load."
        )
        from matplotlib.ticker import MaxNLocator

        for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
            for label, p in _heaviest(points).items():
                stages = [s for s in p.stage_rows() if s.get("batch_histogram")]
                if not stages:
                    continue
                source = stages[0].get("histogram_source", "Triton statistics batch_stats")
                with plot(
                    content.figures,
                    ("hist", experiment, model, label),
                    f"{model} {label} under {p.point['load']}: batch sizes per stage ({source})",
                    figsize=(min(3.2 * len(stages), 14), 2.8),
                    ncols=len(stages),
                    grid_axis="y",
                ) as axes:
                    for ax, stage in zip(axes, stages):
                        hist = {int(k): v for k, v in stage["batch_histogram"].items()}
                        ax.bar(list(hist), list(hist.values()), color="#4477aa")
                        ax.set_title(
                            f"stage {stage['stage']} ({stage['model']})\navg {fmt(stage.get('avg_batch_size'), 2)}",
                            fontsize=8,
                        )
                        ax.set_xlabel("batch size", fontsize=8)
                        ax.tick_params(labelsize=7)
                        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    axes[0].set_ylabel("executions", fontsize=8)
                    axes[0].figure.suptitle(
                        f"{model} {label} under {p.point['load']} ({experiment})", fontsize=9, y=1.1
                    )
        return content


class AttributionSection(Section):
    title = "Latency attribution"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "Where the mean client latency went, per configuration at its heaviest stable load. Whole and "
            "ensemble: Triton's queue and compute (input, infer, output) per request of each model from the "
            "statistics API; client + network is the rest of the client mean. Reorch: the per-request "
            "REORCH_RECORD gives client + network (client latency minus arrival to exit), the front wait "
            "(arrival to stage 0) and, with stage_times_us, each stage's wait and compute and the response "
            "path; otherwise stage wait and compute come from the reorchestrator's metrics. Coverage is the "
            "parts' sum over the measured mean; it should be within 10% of 100%."
        )
        summary_rows, part_rows = [], []
        for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
            bars = []
            for label, p in _heaviest(points).items():
                result = attribute(p)
                if result is None:
                    continue
                bars.append((label, result))
                summary_rows.append(
                    Row(
                        [
                            str(p.index),
                            model,
                            label,
                            p.point["load"],
                            fmt(result.measured_ms, 2),
                            fmt(result.total_ms, 2),
                            f"{result.coverage:.0%}",
                            "yes" if result.adds_up else "NO",
                            "; ".join(result.notes) or "-",
                        ],
                        "" if result.adds_up else "gap",
                    )
                )
                for part in result.parts:
                    part_rows.append(
                        Row(
                            [
                                str(p.index),
                                label,
                                part.name,
                                fmt(part.ms, 2),
                                f"{part.ms / result.measured_ms:.0%}" if result.measured_ms else "n/a",
                                part.source + (" (residual)" if part.residual else ""),
                            ]
                        )
                    )
            if not bars:
                continue
            with plot(
                content.figures,
                ("attr", experiment, model),
                f"{model}, experiment {experiment}: mean latency by part (the black tick is the measured mean)",
                figsize=(8, 0.6 * len(bars) + 1.4),
                grid_axis="x",
                legend_loc="outside",
            ) as (ax,):
                seen = set()
                for y, (label, result) in enumerate(bars):
                    left = 0.0
                    for part in result.parts:
                        width = max(part.ms, 0.0)
                        ax.barh(
                            y,
                            width,
                            left=left,
                            color=KIND_COLORS.get(part.kind, "#999999"),
                            edgecolor="white",
                            hatch="//" if part.residual else None,
                            label=part.kind if part.kind not in seen else None,
                        )
                        seen.add(part.kind)
                        left += width
                    ax.plot([result.measured_ms, result.measured_ms], [y - 0.4, y + 0.4], color="black")
                ax.set_yticks(range(len(bars)))
                ax.set_yticklabels([label for label, _ in bars], fontsize=7)
                ax.set_xlabel("ms per request (mean)")
                ax.set_title(f"{model}: latency attribution, heaviest stable load ({experiment})", fontsize=9)
        if summary_rows:
            content.tables.append(
                Table(
                    [
                        "#",
                        "model",
                        "configuration",
                        "load",
                        "measured mean ms",
                        "sum of parts ms",
                        "coverage",
                        "within 10%",
                        "notes",
                    ],
                    summary_rows,
                )
            )
            content.tables.append(Table(["#", "configuration", "part", "ms", "share", "source"], part_rows))
        stage_rows = [
            Row(
                [
                    str(p.index),
                    p.label,
                    p.point["load"],
                    str(stage["stage"]),
                    stage["model"],
                    fmt(stage.get("executions"), 0),
                    fmt(stage.get("rows"), 0),
                    fmt(stage.get("avg_batch_size"), 2),
                    fmt((stage.get("avg_queue_us") or math.nan) / 1000.0, 2),
                    fmt((stage.get("avg_compute_us") or math.nan) / 1000.0, 2),
                ],
                SATURATED if p.saturated else "",
            )
            for p in run.measured_points()
            for stage in p.stage_rows()
        ]
        if stage_rows:
            content.tables.append(
                Table(
                    [
                        "#",
                        "configuration",
                        "load",
                        "stage",
                        "model",
                        "executions",
                        "rows",
                        "avg batch",
                        "avg queue ms",
                        "avg compute ms",
                    ],
                    stage_rows,
                    "Per-stage facts of every point (server side; reorch wait per row, compute per execution):",
                )
            )
        return content


class ComparisonSection(Section):
    title = "Variant and policy comparison"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "Per load: mean and p99 latency and achieved throughput of each configuration (mean over repeats). "
            "Latency bars of saturated configurations are hatched and faded: they measure queue growth."
        )
        for (experiment, model, load), points in group(
            run.measured_points(), "experiment", "model", "load"
        ).items():
            configs = by_label(points)
            if len(configs) < 2:
                continue
            with plot(
                content.figures,
                ("cmp", experiment, model, load),
                f"{model} under {load}, experiment {experiment}: configurations side by side",
                figsize=(10, 3.4),
                ncols=2,
                grid_axis="y",
            ) as (ax1, ax2):
                x = np.arange(len(configs))
                for i, repeats in enumerate(configs.values()):
                    style = {"hatch": "//", "alpha": 0.4} if any(p.saturated for p in repeats) else {}
                    ax1.bar(
                        i - 0.2,
                        np.mean([p.summary.avg_ms for p in repeats]),
                        0.4,
                        color="#4477aa",
                        label="avg" if i == 0 else None,
                        **style,
                    )
                    ax1.bar(
                        i + 0.2,
                        np.mean([p.summary.p99_ms for p in repeats]),
                        0.4,
                        color="#ee8866",
                        label="p99" if i == 0 else None,
                        **style,
                    )
                    ax2.bar(i, np.mean([p.achieved_rps for p in repeats]), 0.6, color="#228833", **style)
                ax1.set_ylabel("latency (ms)")
                ax2.set_ylabel("achieved throughput (req/s)")
                for ax in (ax1, ax2):
                    ax.set_xticks(x)
                    ax.set_xticklabels(list(configs), rotation=30, ha="right", fontsize=7)
                ax1.figure.suptitle(f"{model} under {load} ({experiment})", fontsize=9)
        rows, operations = [], []
        for p in run.measured_points():
            reorch = p.server().get("reorch")
            if reorch:
                rows.append((p, reorch.get("operations") or {}))
                operations += [op for op in reorch.get("operations") or {} if op not in operations]
        if rows:
            content.tables.append(
                Table(
                    ["#", "configuration", "load"] + operations,
                    [
                        Row(
                            [str(p.index), p.label, p.point["load"]]
                            + [fmt(ops.get(op, 0.0), 0) for op in operations]
                        )
                        for p, ops in rows
                    ],
                    "Reorchestrator meta operations during each point (metrics deltas):",
                )
            )
        return content


class FindingsSection(Section):
    title = "Findings"

    def build(self, run: RunData) -> Content:
        content = Content(self.title, bullets=findings(run))
        if not content.bullets:
            content.paragraphs.append("No comparison had two or more configurations under the same load.")
        return content


class LoadGeneratorSection(Section):
    title = "Load generator check"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        content.paragraphs.append(
            "CPU use of the load generator's busiest process (percent of one core) and arrivals it sent more "
            "than 2 ms behind the open-loop schedule. A point is flagged when the generator used 85% of a core "
            "or more than 5% of its arrivals were late: then the generator, not only the server, shaped the "
            "measurement."
        )
        rows = []
        for p in run.points:
            loadgen = p.record.get("loadgen") or {}
            rows.append(
                Row(
                    [
                        str(p.index),
                        p.point["point_id"],
                        fmt(loadgen.get("cpu_percent")),
                        fmt(loadgen.get("late_arrivals")),
                        fmt(loadgen.get("late_p99_ms"), 2),
                        "yes" if loadgen.get("bottleneck") else "no",
                        "; ".join(loadgen.get("warnings") or []) or "-",
                    ],
                    "flagged" if loadgen.get("bottleneck") else "",
                )
            )
        content.tables.append(
            Table(
                [
                    "#",
                    "point",
                    "load generator CPU %",
                    "late arrivals",
                    "p99 lateness ms",
                    "flagged",
                    "warnings",
                ],
                rows,
            )
        )
        return content


class CrossCheckSection(Section):
    title = "Load generator cross-check"

    def build(self, run: RunData) -> Content:
        content = Content(self.title)
        check = run.crosscheck
        if not check:
            content.paragraphs.append(
                "Skipped: not run (no loadgen_crosscheck.json in the run directory). It measures one point "
                "with perf_analyzer and with stagebatch's generator to show both agree."
            )
            return content
        if check.get("status") != "ok":
            content.paragraphs.append(f"Skipped: {check.get('reason') or 'no reason recorded'}.")
            return content
        content.paragraphs.append(
            f"{check.get('model', '?')} {check.get('variant', '?')} at {fmt(check.get('rate_rps'))} req/s, "
            "measured by both generators."
        )
        rows = []
        for name, key in (("perf_analyzer", "perf_analyzer"), ("stagebatch", "stagebatch")):
            values = check.get(key) or {}
            rows.append(
                Row(
                    [
                        name,
                        fmt(values.get("p50_ms"), 2),
                        fmt(values.get("p99_ms"), 2),
                        fmt(values.get("throughput_rps")),
                    ]
                )
            )
        content.tables.append(Table(["generator", "p50 ms", "p99 ms", "throughput req/s"], rows))
        return content


class CpuNoteSection(Section):
    title = "What a 2-core CPU can show"

    def build(self, run: RunData) -> Content:
        content = Content(self.title, paragraphs=[CPU_NOTE])
        hardware = run.environment.get("hardware") or {}
        if hardware.get("cpu_cores_logical"):
            content.paragraphs.append(
                f"This run's machine: {hardware['cpu_cores_logical']} logical cores, GPU: {hardware.get('gpu', 'none')}."
            )
        return content


# The report, in order: a new section is one class above and one entry here.
SECTIONS: tuple[Section, ...] = (
    RunSection(),
    CapacitySection(),
    ResultsSection(),
    ThroughputLatencySection(),
    CdfSection(),
    BatchSizeSection(),
    AttributionSection(),
    ComparisonSection(),
    FindingsSection(),
    LoadGeneratorSection(),
    CrossCheckSection(),
    CpuNoteSection(),
)
SECTION_TITLES = tuple(section.title for section in SECTIONS)


def build_sections(run: RunData) -> list[Content]:
    """Every section of the report, in order, with its numbers."""
    return [section.build(run) for section in SECTIONS]
