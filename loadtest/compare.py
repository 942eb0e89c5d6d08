"""``stagebatch compare RUN_A RUN_B``: the matching points of two runs side by side.

Points match when they share experiment, model, configuration (variant, policy, knobs), workload
(load curve) and load: the multiple of capacity when both runs planned one, else the load as
written (which carries the rate). Each match is compared as the report compares configurations
(:func:`loadtest.report.findings.compare_configs`): at the same offered load only, saturated points
by achieved throughput, differences with a 95% bootstrap confidence interval. Where the offered
loads differ (e.g. the same multiple of two machines' capacities) no winner is named.

Writes ``compare.html`` and ``compare.md`` (the report's templates) and prints the table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from loadtest.report import PointData, RunData, load_run
from loadtest.report.content import Content, Row, Table, fmt, state_cell
from loadtest.report.findings import NO_WINNER, Comparison, compare_configs
from loadtest.report.render import render_html, render_markdown

HTML_FILE = "compare.html"
MARKDOWN_FILE = "compare.md"
HEADER = [
    "model",
    "configuration",
    "workload",
    "load",
    "A offered",
    "B offered",
    "A achieved",
    "B achieved",
    "A state",
    "B state",
    "A p99 ms",
    "B p99 ms",
    "A sustained",
    "B sustained",
    "B against A",
]

MatchKey = tuple[str, str, str, str, str]


def match_key(point: PointData) -> MatchKey:
    """(experiment, model, configuration label, workload, load) of a point."""
    p = point.point
    multiple = point.load_multiple
    load = f"{multiple:g}x capacity" if multiple is not None else p["load"]
    return (p["experiment"], p["model"], point.label, p["load"].split("@", 1)[0], load)


def _by_key(run: RunData) -> dict[MatchKey, list[PointData]]:
    groups: dict[MatchKey, list[PointData]] = defaultdict(list)
    for point in run.measured_points():
        groups[match_key(point)].append(point)
    return groups


@dataclass
class Match:
    """The repeats of one matched point in each run, and their comparison."""

    key: MatchKey
    a: list[PointData]
    b: list[PointData]
    comparison: Comparison
    sustained_a: float | None = None  # the variant's sustained rate in each run's capacity.json
    sustained_b: float | None = None

    def cells(self) -> list[str]:
        """The row of :data:`HEADER`."""
        _, model, label, workload, load = self.key

        def mean(points: list[PointData], value) -> float:
            return float(np.mean([value(p) for p in points]))

        def state(points: list[PointData]) -> str:
            return " / ".join(sorted({state_cell(p) for p in points}))

        verdict = self.comparison.verdict
        return [
            model,
            label,
            workload,
            load,
            fmt(mean(self.a, lambda p: p.offered_rps)),
            fmt(mean(self.b, lambda p: p.offered_rps)),
            fmt(mean(self.a, lambda p: p.achieved_rps)),
            fmt(mean(self.b, lambda p: p.achieved_rps)),
            state(self.a),
            state(self.b),
            fmt(mean(self.a, lambda p: p.summary.p99_ms)),
            fmt(mean(self.b, lambda p: p.summary.p99_ms)),
            fmt(self.sustained_a),
            fmt(self.sustained_b),
            verdict,
        ]


def _sustained(run: RunData, point: PointData) -> float | None:
    return (run.capacity_of(point.point) or {}).get("sustained_rps")


@dataclass
class RunComparison:
    """Two runs lined up."""

    run_a: RunData
    run_b: RunData
    matches: list[Match]
    only_a: list[MatchKey]
    only_b: list[MatchKey]


def compare_runs(run_a: RunData, run_b: RunData) -> RunComparison:
    """Line up the matching points of two runs and compare each match (B against A)."""
    a, b = _by_key(run_a), _by_key(run_b)
    matches = [
        Match(
            key,
            a[key],
            b[key],
            compare_configs(a[key], b[key], None),
            _sustained(run_a, a[key][0]),
            _sustained(run_b, b[key][0]),
        )
        for key in a
        if key in b
    ]
    return RunComparison(run_a, run_b, matches, [k for k in a if k not in b], [k for k in b if k not in a])


def sections(result: RunComparison) -> list[Content]:
    """The comparison as report sections (rendered by the report's templates)."""
    runs = Content("Runs")
    for name, run in (("A", result.run_a), ("B", result.run_b)):
        env = run.environment
        runs.paragraphs.append(
            f"{name}: {run.run_dir} (plan {(env.get('plan') or {}).get('name', '?')}, started "
            f"{env.get('started_utc', '?')}, {(env.get('hardware') or {}).get('cpu_cores_logical', '?')} cores)."
        )
    table = Content("Matching points")
    table.paragraphs.append(
        "Offered, achieved and sustained (each run's capacity search) in req/s. B against A: better, worse, no measurable difference (the 95% "
        "interval spans 0) or no winner (different offered loads, or both saturated without repeats)."
    )
    if result.matches:
        table.tables.append(
            Table(
                HEADER,
                [
                    Row(m.cells(), "flagged" if m.comparison.verdict == NO_WINNER else "")
                    for m in result.matches
                ],
            )
        )
    else:
        table.paragraphs.append("No point of A matches a point of B.")
    findings = Content(
        "Findings",
        bullets=[
            f"{m.key[1]} {m.key[2]} under {m.key[4]} ({m.key[3]}): B {m.comparison.text}"
            for m in result.matches
        ],
    )
    unmatched = Content("Unmatched points")
    for name, keys in (("A", result.only_a), ("B", result.only_b)):
        for key in keys:
            unmatched.bullets.append(f"only in {name}: {key[1]} {key[2]} under {key[4]} ({key[3]}, {key[0]})")
    return [runs, table, findings, unmatched]


def write_comparison(result: RunComparison, out_dir: Path) -> tuple[Path, Path]:
    """Write ``compare.html`` and ``compare.md`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"stagebatch compare: {result.run_a.run_dir.name} (A) vs {result.run_b.run_dir.name} (B)"
    content = sections(result)
    html_path, md_path = out_dir / HTML_FILE, out_dir / MARKDOWN_FILE
    html_path.write_text(render_html(content, title))
    md_path.write_text(render_markdown(content, title))
    return html_path, md_path


def compare(
    run_a: Annotated[Path, typer.Argument(help="Run directory A (the baseline).")],
    run_b: Annotated[Path, typer.Argument(help="Run directory B (compared against A).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for compare.html and compare.md [./compare_A_vs_B].")
    ] = None,
) -> None:
    """Line up the matching points of two runs, with 95% confidence intervals; no winner where loads differ."""
    result = compare_runs(load_run(run_a), load_run(run_b))
    table = RichTable(*HEADER, title=f"B ({run_b}) against A ({run_a})")
    for match in result.matches:
        table.add_row(*(Text(cell) for cell in match.cells()))  # Text: "[dva]" is not markup
    console = Console()
    if not console.is_terminal:
        console.width = 220  # a pipe or a log: don't wrap the 13 columns at 80
    console.print(table)
    for name, keys in (("A", result.only_a), ("B", result.only_b)):
        if keys:
            typer.echo(f"{len(keys)} point(s) only in {name}")
    out_dir = out or Path(f"compare_{Path(run_a).name}_vs_{Path(run_b).name}")
    html_path, md_path = write_comparison(result, out_dir)
    typer.echo(f"comparison: {html_path} and {md_path}")
