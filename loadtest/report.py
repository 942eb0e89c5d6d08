"""The characterization report: plots and findings computed from a run directory's raw data.

``write_report(run_dir)`` reads ``environment.json``, ``points.jsonl`` and ``requests.csv`` (written
by :mod:`loadtest.runner`), recomputes every client-side number from the raw request latencies
(so the report and the raw data cannot disagree), draws the plots with matplotlib and writes

- ``report.html``: one self-contained file, plots embedded as base64 PNG;
- ``report.md`` with the plots as PNG files under ``plots/``.

Sections: run, results table, throughput-latency curves, latency CDFs, batch-size histograms per
stage, per-stage queue vs compute time, variant/policy comparison, findings, load generator check,
and a note on what a 2-core CPU can show.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import rundir as raw
from loadtest.stats import cdf, relative_change, summarize, throughput_at_slo
from stagebatch.errors import ConfigValidationError

MAX_FIGURES_PER_SECTION = 24
SECTION_TITLES = (
    "Run",
    "Results",
    "Throughput-latency curves",
    "Latency CDFs",
    "Batch sizes per stage",
    "Queue vs compute time per stage",
    "Variant and policy comparison",
    "Findings",
    "Load generator check",
    "What a 2-core CPU can show",
)

CPU_NOTE = (
    "On a CPU-only machine with 2 cores a pipeline of stages cannot add parallelism: the stages share the "
    "same two cores, so a sliced model never computes more per second than two copies of the whole model. "
    "Whatever the ensemble and the reorchestrator gain here comes from less padding (bucketing requests of "
    "similar length) and less waiting (batches entering while older ones are in later stages, catch-up "
    "batches instead of queueing), and they pay per-stage overhead for it. Pipeline parallelism across "
    "devices shows only on a GPU (see docs/gpu.md)."
)


# ---------------------------------------------------------------- reading a run


@dataclass
class PointData:
    """One measurement point as recorded, with its client summary recomputed from requests.csv."""

    index: int
    record: dict  # the points.jsonl line
    latencies_us: np.ndarray
    ok: np.ndarray
    batch_sizes_seen: list[list[int]]  # per request: the batch size at each stage (reorch records)
    summary: Any = None  # stats.LatencySummary

    @property
    def point(self) -> dict:
        return self.record["point"]

    @property
    def label(self) -> str:
        """The configuration without model, experiment and load: what differs within a comparison."""
        return config_label(self.point)

    @property
    def status(self) -> str:
        return self.record.get("status", "ok")


@dataclass
class RunData:
    """Everything in a run directory."""

    run_dir: Path
    environment: dict
    points: list[PointData] = field(default_factory=list)


def config_label(point: dict) -> str:
    """``variant[policy knobs] mbs8 qd2000 k4`` (only what the point sets)."""
    label = point["variant"]
    reorch = point.get("reorch") or {}
    if reorch.get("policy"):
        label += f"[{reorch['policy']}]"
    for key, value in (reorch.get("knobs") or {}).items():
        label += f" {key}={value}"
    short = {
        "max_batch_size": "mbs",
        "max_queue_delay_us": "qd",
        "preferred_batch_sizes": "pref",
        "instance_count": "inst",
        "stages": "k",
        "balance": "cuts=",
    }
    for key, value in {**(point.get("batching") or {}), **(point.get("slicing") or {})}.items():
        text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
        label += f" {short.get(key, key)}{text}"
    return label


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; a missing or broken file is a ConfigValidationError naming it."""
    run_dir = Path(run_dir)
    env_path = run_dir / raw.ENVIRONMENT_FILE
    points_path = run_dir / raw.POINTS_FILE
    requests_path = run_dir / raw.REQUESTS_FILE
    for path in (env_path, points_path, requests_path):
        if not path.is_file():
            raise ConfigValidationError(
                f"{path}: missing; is {run_dir} a directory written by 'stagebatch characterize'?"
            )
    environment = json.loads(env_path.read_text())
    records = []
    for number, line in enumerate(points_path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigValidationError(
                    f"{points_path}:{number}: not a JSON line ({error.msg})"
                ) from None
    requests = raw.read_requests(requests_path)
    data = RunData(run_dir=run_dir, environment=environment)
    for record in records:
        index = record["index"]
        rows = requests.get(index, [])
        latencies = np.array([r["latency_us"] for r in rows], dtype=np.int64)
        ok = np.array([r["ok"] for r in rows], dtype=bool)
        seen = [r["batch_sizes"] for r in rows if r.get("batch_sizes")]
        point = PointData(index=index, record=record, latencies_us=latencies, ok=ok, batch_sizes_seen=seen)
        if point.status == "ok" and record.get("duration_s"):
            point.summary = summarize(latencies, ok, record["duration_s"], record["point"]["slo_ms"])
        data.points.append(point)
    return data


# ---------------------------------------------------------------- figures


@dataclass
class Figure:
    """A rendered plot: PNG bytes and a caption."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A report section: paragraphs, tables (header + rows) and figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _render(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buffer.getvalue()


def _slug(*parts: str) -> str:
    text = "_".join(parts)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:120]


def _ok_points(data: RunData) -> list[PointData]:
    return [p for p in data.points if p.summary is not None]


def _group(points: list[PointData], *keys: str) -> dict[tuple, list[PointData]]:
    groups: dict[tuple, list[PointData]] = defaultdict(list)
    for p in points:
        groups[tuple(p.point[k] for k in keys)].append(p)
    return groups


def _load_base(load: str) -> str:
    """``poisson@rate_rps=20`` -> ``poisson``: points of one load curve."""
    return load.split("@", 1)[0]


def _fmt_ms(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def throughput_latency_figures(data: RunData) -> list[Figure]:
    """Per experiment and model: p99 (solid) and p50 (dashed) vs throughput, one line per config and load curve."""
    plt = _plt()
    figures = []
    for (experiment, model), points in _group(_ok_points(data), "experiment", "model").items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        curves: dict[tuple[str, str], list[PointData]] = defaultdict(list)
        for p in points:
            curves[(p.label, _load_base(p.point["load"]))].append(p)
        for (label, load), curve in sorted(curves.items()):
            curve.sort(key=lambda p: p.summary.offered_rps)
            x = [p.summary.throughput_rps for p in curve]
            (line,) = ax.plot(x, [p.summary.p99_ms for p in curve], marker="o", label=f"{label} | {load} p99")
            ax.plot(
                x,
                [p.summary.p50_ms for p in curve],
                marker=".",
                linestyle="--",
                color=line.get_color(),
                alpha=0.6,
            )
        ax.set_xlabel("throughput (successful requests/s)")
        ax.set_ylabel("latency (ms): p99 solid, p50 dashed")
        ax.set_title(f"{model}: throughput vs latency ({experiment})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        figures.append(
            Figure(
                _slug("tl", experiment, model),
                f"{model}, experiment {experiment}: latency against achieved throughput",
                _render(fig),
            )
        )
    return figures[:MAX_FIGURES_PER_SECTION]


def cdf_figures(data: RunData) -> list[Figure]:
    """Per experiment, model and load: the latency CDF of every configuration."""
    plt = _plt()
    figures = []
    for (experiment, model, load), points in _group(_ok_points(data), "experiment", "model", "load").items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for p in points:
            xs, ys = cdf(p.latencies_us[p.ok])
            if xs:
                ax.step(xs, ys, where="post", label=f"{p.label} (p99 {p.summary.p99_ms:.1f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{model} under {load} ({experiment})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        figures.append(
            Figure(
                _slug("cdf", experiment, model, load),
                f"{model} under {load}, experiment {experiment}: latency CDF",
                _render(fig),
            )
        )
    return figures[:MAX_FIGURES_PER_SECTION]


def _heaviest(points: list[PointData]) -> dict[str, PointData]:
    """Per configuration, its point under the highest offered load (where batching matters most)."""
    best: dict[str, PointData] = {}
    for p in points:
        current = best.get(p.label)
        if current is None or p.summary.offered_rps > current.summary.offered_rps:
            best[p.label] = p
    return best


def stage_rows(point: PointData) -> list[dict]:
    """The point's per-stage server facts (runner's normalized ``server.stages``)."""
    return ((point.record.get("server") or {}).get("stages")) or []


def batch_histogram_figures(data: RunData) -> list[Figure]:
    """Per experiment, model and configuration (at its heaviest load): executions per batch size, per stage."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    figures = []
    for (experiment, model), points in _group(_ok_points(data), "experiment", "model").items():
        for label, p in _heaviest(points).items():
            stages = [s for s in stage_rows(p) if s.get("batch_histogram")]
            if not stages:
                continue
            fig, axes = plt.subplots(1, len(stages), figsize=(min(3.2 * len(stages), 14), 2.8), squeeze=False)
            for ax, stage in zip(axes[0], stages):
                hist = {int(k): v for k, v in stage["batch_histogram"].items()}
                ax.bar(list(hist), list(hist.values()), color="#4477aa")
                ax.set_title(
                    f"stage {stage['stage']} ({stage['model']})\navg {_fmt(stage.get('avg_batch_size'), 2)}",
                    fontsize=8,
                )
                ax.set_xlabel("batch size", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[0][0].set_ylabel("executions", fontsize=8)
            fig.suptitle(f"{model} {label} under {p.point['load']} ({experiment})", fontsize=9, y=1.1)
            source = stages[0].get("histogram_source", "Triton statistics batch_stats")
            figures.append(
                Figure(
                    _slug("hist", experiment, model, label),
                    f"{model} {label} under {p.point['load']}: batch sizes per stage ({source})",
                    _render(fig),
                )
            )
    return figures[:MAX_FIGURES_PER_SECTION]


def queue_compute_figures(data: RunData) -> list[Figure]:
    """Per experiment and model (heaviest load of each config): average queue and compute time per stage."""
    plt = _plt()
    figures = []
    for (experiment, model), points in _group(_ok_points(data), "experiment", "model").items():
        heaviest = _heaviest(points)
        rows = [(label, p, stage_rows(p)) for label, p in heaviest.items() if stage_rows(p)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.55 * sum(len(s) for _, _, s in rows) + 1.2))
        y, ticks, labels = 0, [], []
        for label, _, stages in rows:
            for stage in stages:
                queue_ms = (stage.get("avg_queue_us") or 0) / 1000.0
                compute_ms = (stage.get("avg_compute_us") or 0) / 1000.0
                ax.barh(y, queue_ms, color="#ee8866", label="queue" if y == 0 else None)
                ax.barh(y, compute_ms, left=queue_ms, color="#4477aa", label="compute" if y == 0 else None)
                ticks.append(y)
                labels.append(f"{label} s{stage['stage']}")
                y += 1
            y += 0.5
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per request (average)")
        ax.set_title(f"{model}: queue vs compute per stage, heaviest load ({experiment})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        figures.append(
            Figure(
                _slug("qc", experiment, model),
                f"{model}, experiment {experiment}: average queue "
                "and compute time per request and stage, at each configuration's heaviest load",
                _render(fig),
            )
        )
    return figures[:MAX_FIGURES_PER_SECTION]


def comparison_figures(data: RunData) -> list[Figure]:
    """Per experiment, model and load: avg/p99 latency and throughput bars per configuration."""
    plt = _plt()
    figures = []
    for (experiment, model, load), points in _group(_ok_points(data), "experiment", "model", "load").items():
        if len(points) < 2:
            continue
        labels = [p.label for p in points]
        x = np.arange(len(points))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
        ax1.bar(x - 0.2, [p.summary.avg_ms for p in points], 0.4, label="avg", color="#4477aa")
        ax1.bar(x + 0.2, [p.summary.p99_ms for p in points], 0.4, label="p99", color="#ee8866")
        ax1.set_ylabel("latency (ms)")
        ax1.legend(fontsize=8)
        ax2.bar(x, [p.summary.throughput_rps for p in points], 0.6, color="#228833")
        ax2.set_ylabel("throughput (req/s)")
        for ax in (ax1, ax2):
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"{model} under {load} ({experiment})", fontsize=9)
        figures.append(
            Figure(
                _slug("cmp", experiment, model, load),
                f"{model} under {load}, experiment {experiment}: configurations side by side",
                _render(fig),
            )
        )
    return figures[:MAX_FIGURES_PER_SECTION]


# ---------------------------------------------------------------- findings


def _baseline(points: list[PointData]) -> PointData:
    """The one-entry baseline of a comparison: the first whole-model point, else the first point."""
    for p in points:
        if p.point["variant"] == "whole":
            return p
    return points[0]


def findings(data: RunData) -> list[str]:
    """Sentences with numbers, each computed from the recomputed summaries."""
    out: list[str] = []
    ok_points = _ok_points(data)
    for (experiment, model, load), points in _group(ok_points, "experiment", "model", "load").items():
        if len(points) < 2:
            continue
        base = _baseline(points)
        others = [p for p in points if p is not base and not math.isnan(p.summary.p99_ms)]
        if not others or math.isnan(base.summary.p99_ms):
            continue
        best = min(others, key=lambda p: p.summary.p99_ms)
        change = relative_change(base.summary.p99_ms, best.summary.p99_ms)
        verb = "cut" if best.summary.p99_ms < base.summary.p99_ms else "raised"
        out.append(
            f"For {model} under {load} ({experiment}), {best.label} {verb} p99 from {base.summary.p99_ms:.1f} to "
            f"{best.summary.p99_ms:.1f} ms ({change:+.0%}) against {base.label}; average "
            f"{base.summary.avg_ms:.1f} -> {best.summary.avg_ms:.1f} ms, throughput "
            f"{base.summary.throughput_rps:.1f} -> {best.summary.throughput_rps:.1f} req/s, SLO "
            f"({best.summary.slo_ms:g} ms) attainment {base.summary.slo_attainment:.0%} -> "
            f"{best.summary.slo_attainment:.0%}."
        )
        worst = max(others, key=lambda p: p.summary.p99_ms)
        if worst is not best and worst.summary.p99_ms > base.summary.p99_ms:
            out.append(
                f"For {model} under {load} ({experiment}), the slowest configuration, {worst.label}, had p99 "
                f"{worst.summary.p99_ms:.1f} ms against {base.summary.p99_ms:.1f} ms for {base.label} "
                f"({relative_change(base.summary.p99_ms, worst.summary.p99_ms):+.0%})."
            )
    # throughput at the SLO along load curves
    for (experiment, model), points in _group(ok_points, "experiment", "model").items():
        curves: dict[tuple[str, str], list[PointData]] = defaultdict(list)
        for p in points:
            curves[(p.label, _load_base(p.point["load"]))].append(p)
        results = []
        for (label, load), curve in curves.items():
            if len(curve) < 2:
                continue
            slo_ms = curve[0].summary.slo_ms
            value = throughput_at_slo([(p.summary.throughput_rps, p.summary.p99_ms) for p in curve], slo_ms)
            results.append((label, load, slo_ms, value))
        if results:
            parts = [
                f"{label} ({load}): {_fmt(value) if value is not None else 'none met it'}"
                for label, load, _, value in sorted(results, key=lambda r: -(r[3] or 0))
            ]
            out.append(
                f"For {model} ({experiment}), the highest throughput with p99 within the "
                f"{results[0][2]:g} ms SLO, in req/s: " + "; ".join(parts) + "."
            )
    # batching at the stages
    for (experiment, model, load), points in _group(ok_points, "experiment", "model", "load").items():
        sizes = []
        for p in points:
            stages = stage_rows(p)
            values = [s.get("avg_batch_size") for s in stages if s.get("avg_batch_size") is not None]
            if values:
                sizes.append(f"{p.label} {' / '.join(f'{v:.2f}' for v in values)}")
        if len(sizes) >= 2:
            out.append(
                f"Average batch size per stage for {model} under {load} ({experiment}): "
                + "; ".join(sizes)
                + "."
            )
    for p in data.points:
        if p.status != "ok":
            out.append(f"Point {p.point['point_id']} failed: {p.record.get('error')}.")
        elif p.summary is not None and p.summary.errors:
            first = p.record.get("first_error") or "see requests.csv"
            out.append(
                f"Point {p.point['point_id']}: {p.summary.errors} of {p.summary.requests} requests failed "
                f"(first error: {first})."
            )
    bottlenecked = [p for p in data.points if (p.record.get("loadgen") or {}).get("bottleneck")]
    if bottlenecked:
        loadgen = [p.record["loadgen"] for p in bottlenecked]
        busiest = max(lg.get("cpu_percent") or 0 for lg in loadgen)
        facts = [f"busiest process {busiest:.0f}% of a core"]
        late_shares = [lg["late_share"] for lg in loadgen if lg.get("late_share") is not None]
        late_p99s = [lg["late_p99_ms"] for lg in loadgen if lg.get("late_p99_ms") is not None]
        if late_shares and late_p99s:
            facts.append(
                f"up to {max(late_shares):.0%} of arrivals sent late, p99 lateness up to "
                f"{max(late_p99s):.1f} ms"
            )
        else:
            facts.append(
                f"up to {max(lg.get('late_arrivals') or 0 for lg in loadgen)} late arrivals in a point"
            )
        out.append(
            f"In {len(bottlenecked)} of {len(data.points)} points the load generator was near CPU saturation or "
            f"did not keep the open-loop schedule ({'; '.join(facts)}). Where the CPU is "
            "low, the cause is the generator sharing the cores with the server: arrivals came burstier than "
            "planned, so these points' latencies include some load-generator delay."
        )
    return out


# ---------------------------------------------------------------- sections


def _results_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    header = [
        "#",
        "experiment",
        "model",
        "configuration",
        "load",
        "sent",
        "errors",
        "req/s",
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
    rows = []
    for p in data.points:
        base = [str(p.index), p.point["experiment"], p.point["model"], p.label, p.point["load"]]
        s = p.summary
        if s is None:
            rows.append(base + [p.status] + ["n/a"] * (len(header) - len(base) - 1))
            continue
        rows.append(
            base
            + [
                str(s.requests),
                str(s.errors),
                _fmt(s.throughput_rps),
                _fmt_ms(s.avg_ms),
                _fmt_ms(s.p50_ms),
                _fmt_ms(s.p90_ms),
                _fmt_ms(s.p95_ms),
                _fmt_ms(s.p99_ms),
                _fmt_ms(s.p999_ms),
                f"{s.slo_ms:g}",
                f"{s.slo_attainment:.1%}",
                _fmt(s.goodput_rps),
            ]
        )
    return header, rows


def _stage_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    header = [
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
    ]
    rows = []
    for p in _ok_points(data):
        for stage in stage_rows(p):
            rows.append(
                [
                    str(p.index),
                    p.label,
                    p.point["load"],
                    str(stage["stage"]),
                    stage["model"],
                    _fmt(stage.get("executions"), 0),
                    _fmt(stage.get("rows"), 0),
                    _fmt(stage.get("avg_batch_size"), 2),
                    _fmt((stage.get("avg_queue_us") or math.nan) / 1000.0, 2),
                    _fmt((stage.get("avg_compute_us") or math.nan) / 1000.0, 2),
                ]
            )
    return header, rows


def _loadgen_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    header = ["#", "point", "load generator CPU %", "late arrivals", "p99 lateness ms", "flagged", "warnings"]
    rows = []
    for p in data.points:
        loadgen = p.record.get("loadgen") or {}
        rows.append(
            [
                str(p.index),
                p.point["point_id"],
                _fmt(loadgen.get("cpu_percent")),
                _fmt(loadgen.get("late_arrivals")),
                _fmt(loadgen.get("late_p99_ms"), 2),
                "yes" if loadgen.get("bottleneck") else "no",
                "; ".join(loadgen.get("warnings") or []) or "-",
            ]
        )
    return header, rows


def _reorch_table(data: RunData) -> tuple[list[str], list[list[str]]] | None:
    rows = []
    for p in _ok_points(data):
        reorch = (p.record.get("server") or {}).get("reorch")
        if not reorch:
            continue
        ops = reorch.get("operations") or {}
        rows.append(
            [str(p.index), p.label, p.point["load"]]
            + [_fmt(ops.get(op, 0.0), 0) for op in ("new", "stretch", "split", "bucket")]
        )
    if not rows:
        return None
    return ["#", "configuration", "load", "new", "stretch", "split", "bucket"], rows


def build_sections(data: RunData) -> list[Section]:
    """Every section of the report, in order, with its numbers."""
    env = data.environment
    plan = env.get("plan") or {}
    hardware = env.get("hardware") or {}
    software = env.get("software") or {}
    run = Section("Run")
    run.paragraphs.append(
        f"Plan <b>{html.escape(str(plan.get('name', '?')))}</b> ({html.escape(str(env.get('plan_source', '')))}), "
        f"{len(data.points)} points, started {env.get('started_utc', '?')}, finished {env.get('finished_utc', '?')}, "
        f"server {html.escape(str(env.get('server', '?')))}."
    )
    run.tables.append(
        (["what", "value"], [[k, html.escape(str(v))] for k, v in {**hardware, **software}.items()])
    )
    results = Section("Results")
    results.paragraphs.append(
        "Client-side latencies of successful requests, recomputed from requests.csv "
        "(nearest-rank percentiles, ms). SLO met = share of all sent requests answered "
        "successfully within the SLO; goodput = those per second."
    )
    results.tables.append(_results_table(data))
    curves = Section("Throughput-latency curves", figures=throughput_latency_figures(data))
    cdfs = Section("Latency CDFs", figures=cdf_figures(data))
    hist = Section("Batch sizes per stage", figures=batch_histogram_figures(data))
    hist.paragraphs.append(
        "Executions per batch size from Triton's statistics API (batch_stats, before/after "
        "deltas) for whole and stage models; for the reorchestrator, estimated from the "
        "batch sizes its per-request records report (a batch of b rows is seen by b requests)."
    )
    queue = Section("Queue vs compute time per stage", figures=queue_compute_figures(data))
    queue.tables.append(_stage_table(data))
    compare = Section("Variant and policy comparison", figures=comparison_figures(data))
    reorch_table = _reorch_table(data)
    if reorch_table:
        compare.paragraphs.append("Reorchestrator meta operations during each point (metrics deltas):")
        compare.tables.append(reorch_table)
    found = Section("Findings", bullets=findings(data))
    if not found.bullets:
        found.paragraphs.append("No comparison had two or more configurations under the same load.")
    loadgen = Section("Load generator check")
    loadgen.paragraphs.append(
        "CPU use of the load generator's busiest process (percent of one core) and arrivals it sent more than "
        "2 ms behind the open-loop schedule. A point is flagged when the generator used 85% of a core or more "
        "than 5% of its arrivals were late: then the generator, not only the server, shaped the measurement."
    )
    loadgen.tables.append(_loadgen_table(data))
    note = Section("What a 2-core CPU can show", paragraphs=[CPU_NOTE])
    cores = hardware.get("cpu_cores_logical")
    if cores:
        note.paragraphs.append(
            f"This run's machine: {cores} logical cores, GPU: {hardware.get('gpu', 'none')}."
        )
    return [run, results, curves, cdfs, hist, queue, compare, found, loadgen, note]


# ---------------------------------------------------------------- writers


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:left}th{background:#f0f0f0}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;
color:#555}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}li{margin:.4em 0}"""


def render_html(sections: list[Section], title: str) -> str:
    """One self-contained HTML page (images inline as base64)."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    parts.append(
        "<ul>"
        + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
        + "</ul>"
    )
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2>")
        parts.extend(f"<p>{p}</p>" for p in section.paragraphs)
        if section.bullets:
            parts.append("<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in section.bullets) + "</ul>")
        for header, rows in section.tables:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts.extend("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
            parts.append("</table>")
        for figure in section.figures:
            encoded = base64.b64encode(figure.png).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(figure.name)}' src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
            )
        if not (section.paragraphs or section.bullets or section.tables or section.figures):
            parts.append("<p>No data for this section in this run.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return html.unescape(str(text).replace("<b>", "**").replace("</b>", "**")).replace("|", "\\|")


def render_markdown(sections: list[Section], title: str, plots_dir: str = "plots") -> str:
    """Markdown with the plots as files under ``plots_dir`` (written by ``write_report``)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [_md_cell(paragraph).replace("\\|", "|"), ""]
        lines += [f"- {b}" for b in section.bullets] + ([""] if section.bullets else [])
        for header, rows in section.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for figure in section.figures:
            lines += [f"![{figure.caption}]({plots_dir}/{figure.name}.png)", ""]
        if not (section.paragraphs or section.bullets or section.tables or section.figures):
            lines += ["No data for this section in this run.", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """(Re)write ``report.html``, ``report.md`` and ``plots/*.png`` in ``run_dir``; returns the two paths."""
    data = load_run(run_dir)
    sections = build_sections(data)
    plan_name = (data.environment.get("plan") or {}).get("name", "run")
    title = f"stagebatch characterization: {plan_name}"
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    for section in sections:
        for figure in section.figures:
            (plots / f"{figure.name}.png").write_bytes(figure.png)
    html_path = run_dir / "report.html"
    md_path = run_dir / "report.md"
    html_path.write_text(render_html(sections, title))
    md_path.write_text(render_markdown(sections, title))
    return html_path, md_path
