"""The report's sections: one class each, listed in :data:`SECTIONS` in the order they appear.

A section turns a :class:`~loadtest.report.data.RunData` into
:class:`~loadtest.report.content.Content` (plain-text paragraphs and bullets, tables, figures); the
templates render it as HTML and Markdown. A new section is one class (here, or in
:mod:`loadtest.report.plots` for a figure) plus one entry in :data:`SECTIONS`.
"""

from __future__ import annotations

from typing import ClassVar

from loadtest.report.content import Content, Row, Section, Table, fmt, row_flag, state_cell
from loadtest.report.data import SATURATED, RunData
from loadtest.report.findings import findings
from loadtest.report.plots import (
    AttributionSection,
    BatchSizeSection,
    CdfSection,
    ComparisonSection,
    ThroughputLatencySection,
)

CPU_NOTE = (
    "On a CPU-only machine with 2 cores a pipeline of stages cannot add parallelism: the stages share the "
    "same two cores, so a sliced model never computes more per second than two copies of the whole model. "
    "Whatever the ensemble and the reorchestrator gain here comes from less padding (bucketing requests of "
    "similar length) and less waiting (batches entering while older ones are in later stages, catch-up "
    "batches instead of queueing), and they pay per-stage overhead for it. Pipeline parallelism across "
    "devices shows only on a GPU (see docs/gpu.md)."
)

# ---------------------------------------------------------------- sections


class RunSection(Section):
    title = "Run"

    def build(self, run: RunData) -> Content:
        env = run.environment
        plan = env.get("plan") or {}
        content = Content(self.title)
        content.paragraphs.append(
            f"Plan {plan.get('name', '?')} ({env.get('plan_source', '')}), {len(run.points)} points, started "
            f"{env.get('started_utc', '?')}, finished {env.get('finished_utc', '?')}, server {env.get('server', '?')}"
            f" ({env.get('replicas', 1)} Triton replica{'s' if env.get('replicas', 1) != 1 else ''})."
        )
        facts = {**(env.get("hardware") or {}), **(env.get("software") or {})}
        content.tables.append(Table(["what", "value"], [Row([k, str(v)]) for k, v in facts.items()]))
        return content


class CapacitySection(Section):
    title = "Capacity"
    intro = """
        From capacity.json: the sustained rate is the highest open-loop rate the server kept up with
        (completions within 5% of arrivals, no backlog growth, the generator on schedule); the rate at the
        SLO is the highest whose tail latency stayed within the SLO.
    """

    def build(self, run: RunData) -> Content:
        models = (run.capacity or {}).get("models") or {}
        if not models:
            return self.only(
                "No capacity search in this run (capacity.json is absent): the plan used absolute rates only."
            )
        content = self.start()
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
    intro = """
        Client-side latencies of successful requests, recomputed from requests.csv (nearest-rank
        percentiles, ms). x capacity = the load as a multiple of the whole model's measured sustained rate.
        Offered = requests sent per second; achieved = successful completions inside the measured window per
        second. A SATURATED point did not keep up: its queue grew during the window, so its latencies
        measure queue growth and are not compared. An UNSTABLE: load generator point was sent off its
        open-loop schedule (late arrivals, or a busy generator): the server saw other arrivals than planned,
        so it is not compared either. SLO met = share of all sent requests answered successfully within the
        SLO; goodput = those per second.
    """
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
        content = self.start()
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
                    row_flag(p),
                )
            )
        content.tables.append(Table(self.header, rows))
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
    intro = """
        CPU use of the load generator's busiest process (percent of one core) and arrivals it sent more than
        2 ms behind the open-loop schedule. A point is flagged when the generator used 85% of a core or more
        than 5% of its arrivals were late: then the generator, not only the server, shaped the measurement.
    """

    def build(self, run: RunData) -> Content:
        content = self.start()
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
        if not (check := run.crosscheck):
            return self.only(
                "Skipped: not run (no loadgen_crosscheck.json in the run directory). It measures one point "
                "with perf_analyzer and with stagebatch's generator to show both agree."
            )
        if check.get("status") != "ok":
            return self.only(f"Skipped: {check.get('reason') or 'no reason recorded'}.")
        content = self.start()
        content.paragraphs.append(
            f"{check.get('model', '?')} {check.get('variant', '?')} at {fmt(check.get('rate_rps'))} req/s "
            f"over {check.get('protocol') or 'gRPC'}, measured by both generators (the same open-loop schedule)."
        )
        wire = check.get("wire") or {}
        on_wire = wire.get("status") == "ok"
        rows = []
        for name in ("perf_analyzer", "stagebatch"):
            side = check.get(name) or {}
            cells = [fmt(side.get("p50_ms"), 2), fmt(side.get("p99_ms"), 2), fmt(side.get("throughput_rps"))]
            if on_wire:
                above_us = (side["p50_ms"] - side["wire_p50_ms"]) * 1000
                cells += [fmt(side.get("wire_p50_ms"), 2), fmt(side.get("wire_p99_ms"), 2), f"{above_us:+.0f}"]
            rows.append(Row([name, *cells, fmt(side.get("requests"))]))
        header = ["generator", "p50 ms", "p99 ms", "throughput req/s"]
        if on_wire:
            header += ["wire p50 ms", "wire p99 ms", "p50 above the wire µs"]
            content.paragraphs.append(
                "The wire columns time the same requests by the kernel on the loopback (loadtest.wire): what "
                "neither generator's own work is in. The closer a generator's p50 to its wire p50, the less "
                "of itself it measures."
            )
        else:
            content.paragraphs.append(f"Not timed on the wire: {wire.get('reason') or 'not recorded in this run'}.")
        content.tables.append(Table([*header, "requests"], rows))
        return content


class SimulationSection(Section):
    title = "Simulator error"

    def build(self, run: RunData) -> Content:
        document = run.simulation
        if not document:
            return self.only(
                "Not simulated (no simulation.json): `stagebatch simulate --run RUN_DIR` replays every point "
                "of this run in virtual time and writes it."
            )
        content = self.start()
        summary = document.get("summary") or {}
        content.paragraphs.append(
            f"Each point replayed by the simulator from the manifest's stage latency tables "
            f"({document.get('whole_latency_source', '?')} for the whole model). Median |error| of p50 over "
            f"the {summary.get('stable_points', '?')} stable points: "
            f"{_percent(summary.get('stable_median_abs_error_p50'))} (all points "
            f"{_percent(summary.get('median_abs_error_p50'))}); of the mean: "
            f"{_percent(summary.get('stable_median_abs_error_avg'))}; target "
            f"{_percent(summary.get('target'))}."
        )
        costs = document.get("costs") or {}
        per_variant = _per_variant(summary, "stable_median_abs_error_p50")
        content.paragraphs.append(
            f"Serving costs: {costs.get('source', 'the defaults')}"
            f"{' (fitted to this same run: a fit, not a prediction)' if costs.get('in_sample') else ''}. "
            f"Per variant: {per_variant or 'n/a'}. The run's own repeat-to-repeat spread of p50: "
            f"{_percent(summary.get('repeat_noise_p50'))} (no prediction can be closer than the run is to itself)."
        )
        cross = summary.get("cross_validated")
        if cross and cross.get("median_abs_error_p50") is not None:
            per_variant_cv = ", ".join(f"{variant} {_percent(value)}"
                                       for variant, value in (cross.get("per_variant_median_abs_error_p50") or {}).items())
            content.paragraphs.append(
                f"As a prediction ({cross.get('folds')}-fold cross-validation: each stable point simulated with the "
                f"costs fitted to the run's other points, so its own measurement is not in them): median |error| of "
                f"p50 {_percent(cross['median_abs_error_p50'])} over {cross.get('points')} points; per variant: "
                f"{per_variant_cv or 'n/a'}"
                + (f"; {cross['left_out']} points could not be predicted (their folds left nothing to fit)"
                   if cross.get("left_out") else "") + "."
            )
        if summary.get("pooled_median_abs_error_p50") is not None:
            content.paragraphs.append(
                f"With each repeated point's repeats pooled (the median of its measured p50s against the median "
                f"of its simulated ones; {summary.get('pooled_points', '?')} configurations and loads): median "
                f"|error| of p50 {_percent(summary.get('pooled_median_abs_error_p50'))}; per variant: "
                f"{_per_variant(summary, 'pooled_median_abs_error_p50')}."
            )
        rows = []
        for point in document.get("points") or []:
            if "error" not in point:
                rows.append(Row([point.get("point_id", "?"), "", "", "", point.get("skipped", "not simulated")]))
                continue
            measured, simulated, error = point["measured"], point["simulated"], point["error"]
            rows.append(Row([
                point.get("point_id", "?"),
                "stable" if point.get("stable") else "unstable",
                fmt(measured.get("p50_ms"), 2),
                fmt(simulated.get("p50_ms"), 2),
                f"{_percent(error.get('p50'))}",
            ]))
        content.tables.append(Table(["point", "state", "measured p50 ms", "simulated p50 ms", "p50 error"], rows))
        return content


def _per_variant(summary: dict, figure: str) -> str:
    """``variant x%, ...`` of one figure of ``summary['per_variant']`` (simulation.json)."""
    return ", ".join(f"{variant} {_percent(figures.get(figure))}"
                     for variant, figures in (summary.get("per_variant") or {}).items())


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100.0 * fraction:.1f}%"


class CpuNoteSection(Section):
    title = "What a 2-core CPU can show"
    intro = CPU_NOTE

    def build(self, run: RunData) -> Content:
        content = self.start()
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
    SimulationSection(),
    CpuNoteSection(),
)
SECTION_TITLES = tuple(section.title for section in SECTIONS)


def build_sections(run: RunData) -> list[Content]:
    """Every section of the report, in order, with its numbers."""
    return [section.build(run) for section in SECTIONS]
