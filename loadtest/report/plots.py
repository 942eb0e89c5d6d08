"""The report's figure sections: throughput-latency curves, CDFs, batch sizes, attribution, comparison.

Each is a :class:`~loadtest.report.content.Section`; the shared plot setup is
:func:`loadtest.report.figures.plot`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from backends.reorch.scheduler import OPERATIONS
from loadtest.report.attribution import KINDS, attribute
from loadtest.report.content import Content, Row, Section, Table, fmt, heaviest, row_flag
from loadtest.report.data import PointData, RunData, by_label, group, load_curve
from loadtest.report.figures import marker_style, plot, stability_legend
from loadtest.stats import cdf

KIND_COLORS = dict(
    zip(KINDS, ("#bbbbbb", "#cc3311", "#ee8866", "#99ddff", "#4477aa", "#332288", "#44bb99", "#aa4499"))
)


def _minor_log_label(value: float, _position) -> str:
    """Label the 2x and 5x minor ticks of a log axis in plain numbers (``20``, ``50``), none else."""
    if value <= 0:
        return ""
    return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


class ThroughputLatencySection(Section):
    title = "Throughput-latency curves"
    intro = """
        p99 (solid) and p50 (dashed) against achieved throughput, log latency axis: the knee is where
        latency leaves its floor. Filled markers are stable points, hollow circles saturated, hollow squares
        points the load generator sent off schedule, crosses of unknown stability; lines join the means over
        repeats. The dotted vertical line is the sustained rate from the capacity search.
    """

    def build(self, run: RunData) -> Content:
        content = self.start()
        from matplotlib.ticker import FuncFormatter

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
                ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
                ax.set(xlabel="achieved throughput (completions in the window / s)",
                       ylabel="latency (ms, log): p99 solid, p50 dashed",
                       title=f"{model}: throughput vs latency ({experiment})")  # fmt: skip
        return content


class CdfSection(Section):
    title = "Latency CDFs"
    intro = "Saturated points are drawn dotted: their tails are queue growth."

    def build(self, run: RunData) -> Content:
        content = self.start()
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
                        repeat = f" r{p.repeat}" if (p.record.get("repeats") or 1) > 1 else ""
                        ax.step(
                            xs,
                            ys,
                            where="post",
                            linestyle=":" if p.saturated else "-",
                            label=f"{p.label}{repeat} (p99 {p.summary.p99_ms:.1f} ms{suffix})",
                        )
                ax.set(xscale="log", xlabel="latency (ms, log scale)", ylabel="fraction of requests",
                       title=f"{model} under {load} ({experiment})")  # fmt: skip
        return content


class BatchSizeSection(Section):
    title = "Batch sizes per stage"
    intro = """
        Executions per batch size from Triton's statistics API (batch_stats, before/after deltas) for whole
        and stage models; for the reorchestrator, estimated from the batch sizes its per-request records
        report (a batch of b rows is seen by b requests). Each configuration at its heaviest stable load.
    """

    def build(self, run: RunData) -> Content:
        content = self.start()
        from matplotlib.ticker import MaxNLocator

        for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
            for label, p in heaviest(points).items():
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
    intro = """
        Where the mean client latency went, per configuration at its heaviest stable load. Whole and
        ensemble: Triton's queue and compute (input, infer, output) per request of each model from the
        statistics API; client + network is the rest of the client mean. Reorch: the per-request
        REORCH_RECORD gives client + network (client latency minus arrival to exit), the front wait (arrival
        to stage 0) and, with stage_times_us, each stage's wait and compute and the response path; otherwise
        stage wait and compute come from the reorchestrator's metrics. Coverage is the parts' sum over the
        measured mean; it should be within 10% of 100%.
    """

    def build(self, run: RunData) -> Content:
        content = self.start()
        summary_rows, part_rows = [], []
        for (experiment, model), points in group(run.measured_points(), "experiment", "model").items():
            bars = []
            for label, p in heaviest(points).items():
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
                row_flag(p),
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
    intro = """
        Per load: mean and p99 latency and achieved throughput of each configuration (mean over repeats).
        Bars of configurations that were not stable (saturated or sent off schedule) are hatched and faded.
    """

    def build(self, run: RunData) -> Content:
        content = self.start()
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
                    style = {"hatch": "//", "alpha": 0.4} if any(p.unstable for p in repeats) else {}
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
        reorch_points = [(p, p.server().get("reorch")) for p in run.measured_points()]
        rows = [(p, reorch.get("operations") or {}) for p, reorch in reorch_points if reorch]
        # the scheduler's list of operations, in its order; any other name a run recorded after them
        seen = {op for _, ops in rows for op in ops}
        operations = [op for op in OPERATIONS if op in seen] + sorted(seen - set(OPERATIONS))
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
