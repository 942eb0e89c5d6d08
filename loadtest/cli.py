"""``stagebatch characterize``, ``capacity`` and ``report``: typer commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from loadtest.capacity import whole_capacity
from loadtest.plan import CAPACITY_LABELS, load_plan, resolve_arrival
from loadtest.report import write_report
from loadtest.rundir import CAPACITY_FILE
from loadtest.characterization import Characterization, RunOptions, console_logging, resume_plan, run_summary
from loadtest.characterization import characterize as run_characterization
from core.errors import BadParameterError, ConfigValidationError

URL_HELP = (
    "gRPC address of a running Triton (default: start the embedded server): host:port, a comma-separated "
    "list of host:port replicas, or dns:///host:port. Reloads use the repository API with the key in "
    "$STAGEBATCH_ADMIN_KEY."
)


def _default_out(name: str) -> Path:
    import datetime as dt

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"{name}-{stamp}"


def _read_capacity_arg(path: Path) -> dict:
    file = path / CAPACITY_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigValidationError(f"--capacity {path}: no such file (give a capacity.json or a run directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigValidationError(f"--capacity {file}: not valid JSON ({error})") from None


def _print_check(parsed, capacity: dict | None) -> None:
    points = parsed.points()
    total_s = sum(p.duration_s + p.warmup_s for p in points)
    typer.echo(f"{parsed.source}: valid; {len(points)} points, {total_s / 60:.1f} min of load")
    relative = [p for p in points if p.relative]
    if relative and capacity is None:
        typer.echo("  (relative rates resolve once capacity is measured; pass --capacity FILE to see them)")
    for point in points:
        line = f"  {point.point_id}"
        if point.relative and capacity is not None:
            rate = whole_capacity(capacity, point.model)
            arrival, load = resolve_arrival(point.arrival, rate, model=point.model)
            rates = ", ".join(f"{k}={arrival[k]:g}" for k in ("rate_rps", "off_rate_rps", "spike_rate_rps") if k in arrival)
            line += f"  -> {rates} req/s (capacity {load['capacity_rps']:g} req/s)"
        typer.echo(line)


def characterize(
    plan: Annotated[
        Optional[str], typer.Option("--plan", "-p", help="Plan file (YAML), or a shipped plan: quick, full.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run directory (default results/<plan>-<UTC time>).")
    ] = None,
    url: Annotated[Optional[str], typer.Option(help=URL_HELP)] = None,
    metrics_url: Annotated[
        Optional[str],
        typer.Option(help="Metrics endpoint of the --url server, for the reorchestrator's counters."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Locust worker processes (0: one local process).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    check: Annotated[
        bool,
        typer.Option("--check", help="Only validate the plan and list its points (with --capacity: their rates)."),
    ] = False,
    capacity: Annotated[
        Optional[Path],
        typer.Option(
            "--capacity",
            help="A capacity.json (or a run directory holding one) to resolve relative rates with, "
            "instead of searching.",
        ),
    ] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", help="Continue an interrupted run in this directory (its own plan)."),
    ] = None,
    crosscheck: Annotated[
        bool,
        typer.Option(help="After the points, replay one stable whole-model point with perf_analyzer too "
                          "(the report's cross-check; skipped with the reason where it cannot be had)."),
    ] = True,
) -> None:
    """Run a characterization plan: every point's raw data, then report.html and report.md."""

    if workers < 0:
        raise BadParameterError(f"--workers {workers}: must be >= 0")
    if resume is not None and plan is not None:
        raise BadParameterError("--resume takes the plan from the run's environment.json; drop --plan")
    if resume is None and plan is None:
        raise BadParameterError("give --plan PLAN (or --resume RUN_DIR)")

    parsed = resume_plan(resume) if resume is not None else load_plan(plan)
    capacity_doc = _read_capacity_arg(capacity) if capacity is not None else None
    if check:
        _print_check(parsed, capacity_doc)
        return
    out = resume if resume is not None else (out or _default_out(parsed.name))
    capacity_file = None
    if capacity is not None:
        capacity_file = capacity / "capacity.json" if capacity.is_dir() else capacity
    options = RunOptions(out_dir=out, url=url, workers=workers, progress=progress, metrics_url=metrics_url,
                         resume=resume is not None, capacity_file=capacity_file, crosscheck=crosscheck)  # fmt: skip
    with console_logging():  # warnings and one line per point; the rest goes to the run's log file
        run_dir = run_characterization(parsed, options)
    for line in run_summary(run_dir):
        typer.echo(line)
    typer.echo(f"report: {run_dir / 'report.html'} (raw data and report.md beside it)")
    failed = _failed_points(run_dir / "points.jsonl")
    if failed:
        # The report is written either way; the exit code tells scripts that points are missing.
        first_id, first_error = failed[0]
        typer.secho(
            f"error: {len(failed)} of {len(parsed.points())} points failed (first: {first_id}: {first_error}); "
            "see points.jsonl and the report",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


def capacity(
    plan: Annotated[
        str, typer.Option("--plan", "-p", help="Plan file (YAML) or shipped plan: its models, SLOs and capacity: settings.")
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run directory (default results/capacity-<UTC time>).")
    ] = None,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="Only these models (repeatable; default: all of the plan's).")
    ] = None,
    variants: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated variants to search: whole, ensemble, reorch (default: the plan's capacity.variants)."),
    ] = None,
    url: Annotated[Optional[str], typer.Option(help=URL_HELP)] = None,
    workers: Annotated[int, typer.Option(help="Locust worker processes (0: one local process).")] = 0,
) -> None:
    """Find each model variant's sustained open-loop rate and its rate within the SLO; write capacity.json."""
    parsed = load_plan(plan)
    if variants is not None:
        chosen = [v.strip() for v in variants.split(",") if v.strip()]
        bad = [v for v in chosen if v not in CAPACITY_LABELS]
        if bad or not chosen:
            raise BadParameterError(f"--variants {variants}: each must be one of {', '.join(CAPACITY_LABELS)}")
        parsed.capacity = parsed.capacity.model_copy(update={"variants": chosen})
    out = out or _default_out("capacity")
    search = Characterization(parsed, RunOptions(out_dir=out, url=url, workers=workers, progress=False))
    with console_logging():
        document = search.run_capacity(model or None)
    for name, labels in document["models"].items():
        for label, entry in labels.items():
            slo = "-" if entry["slo_rps"] is None else f"{entry['slo_rps']:.1f}"
            sustained = "-" if entry["sustained_rps"] is None else f"{entry['sustained_rps']:.1f}"
            typer.echo(
                f"{name} {label}: sustained {sustained} req/s; p{entry['percentile']:g} within "
                f"{entry['slo_ms']:g} ms up to {slo} req/s; limited by {entry['limited_by']}"
            )
    typer.echo(f"capacity: {out / CAPACITY_FILE}")


def _failed_points(points_path: Path) -> list[tuple[str, str]]:
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

    html_path, md_path = write_report(run_dir)
    typer.echo(f"report: {html_path} and {md_path}")
