"""``stagebatch characterize`` and ``stagebatch report``: typer commands (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def characterize(
    plan: Annotated[
        str, typer.Option("--plan", "-p", help="Plan file (YAML), or a shipped plan: quick, full.")
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run directory (default results/<plan>-<UTC time>).")
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option(
            help="gRPC host:port of a running Triton (default: start the embedded server). Reloads use the "
            "repository API with the key in $STAGEBATCH_ADMIN_KEY."
        ),
    ] = None,
    metrics_url: Annotated[
        Optional[str],
        typer.Option(help="Metrics endpoint of the --url server, for the reorchestrator's counters."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Locust worker processes (0: one local process).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    check: Annotated[
        bool, typer.Option("--check", help="Only validate the plan and list its points; run nothing.")
    ] = False,
) -> None:
    """Run a characterization plan: every point's raw data, then report.html and report.md."""
    import datetime as dt
    import logging

    from loadtest.plan import load_plan
    from stagebatch.errors import BadParameterError

    if workers < 0:
        raise BadParameterError(f"--workers {workers}: must be >= 0")
    parsed = load_plan(plan)
    points = parsed.points()
    if check:
        total_s = sum(p.duration_s + p.warmup_s for p in points)
        typer.echo(f"{parsed.source}: valid; {len(points)} points, {total_s / 60:.1f} min of load")
        for point in points:
            typer.echo(f"  {point.point_id}")
        return
    from loadtest.runner import RunOptions
    from loadtest.runner import characterize as run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = Path("results") / f"{parsed.name}-{stamp}"
    run_dir = run(
        parsed, RunOptions(out_dir=out, url=url, workers=workers, progress=progress, metrics_url=metrics_url)
    )
    typer.echo(f"report: {run_dir / 'report.html'} (raw data and report.md beside it)")
    failed = _failed_points(run_dir / "points.jsonl")
    if failed:
        # The report is written either way; the exit code tells scripts that points are missing.
        first_id, first_error = failed[0]
        typer.secho(
            f"error: {len(failed)} of {len(points)} points failed (first: {first_id}: {first_error}); "
            "see points.jsonl and the report",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


def _failed_points(points_path: Path) -> list[tuple[str, str]]:
    import json

    if not points_path.exists():
        return []
    failed = []
    for line in points_path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            if point.get("status") == "failed":
                failed.append((point.get("point", {}).get("point_id", "?"), point.get("error") or ""))
    return failed


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'stagebatch characterize'.")],
) -> None:
    """Regenerate report.html and report.md of a run from its raw data."""
    from loadtest.report import write_report

    html_path, md_path = write_report(run_dir)
    typer.echo(f"report: {html_path} and {md_path}")
