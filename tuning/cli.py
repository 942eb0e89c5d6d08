"""``stagebatch simulate`` and ``stagebatch tune``: typer commands (heavy imports inside)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from loadtest.workloads import ArrivalSpec, LengthSpec
from slicing.build import BuildOptions, build_repository
from core.errors import BadParameterError
from core.manifest import find_manifest, manifest_path
from tuning.batcher import BatcherSettings
from tuning.calibrate import read_calibration
from tuning.replay import replay_run
from tuning.search import OBJECTIVES
from tuning.simulate import SimSettings, VariantConfig, Workload
from tuning.simulate import simulate as run_simulation
from tuning.threads import measure_thread_slowdown
from tuning.tune import TuneOptions, load_built
from tuning.tune import tune as run_tune

ARRIVAL_HELP = "Arrival spec as in plans, e.g. poisson:rate_rps=100 (closed:users=N for closed loop)."
LENGTHS_HELP = "Length spec as in plans, e.g. fixed:length=64 or uniform:min_length=8,max_length=128."


def _settings(launch_overhead_ms: float, row_device_ms: float, request_overhead_ms: float, device_slots: int):
    return SimSettings(launch_overhead_ms=launch_overhead_ms, row_device_ms=row_device_ms,
                       request_overhead_ms=request_overhead_ms, device_slots=device_slots)


def simulate(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name in the repository's manifest.")] = None,
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Built repository (manifest.json).")] = Path(
        "model_repository"),
    variant: Annotated[list[str] | None, typer.Option(
        "--variant", help="whole, ensemble, reorch or reorch:POLICY (repeatable; default: whole, ensemble, reorch:dva).")] = None,
    arrival: Annotated[str, typer.Option(help=ARRIVAL_HELP)] = "poisson:rate_rps=100",
    lengths: Annotated[str | None, typer.Option(help=LENGTHS_HELP)] = None,
    duration_s: Annotated[float, typer.Option(help="Simulated seconds (warm-up included).")] = 30.0,
    warmup_s: Annotated[float, typer.Option(help="Simulated warm-up, left out of the figures.")] = 3.0,
    slo_ms: Annotated[float, typer.Option(help="Goodput counts answers within this latency.")] = 100.0,
    max_batch_size: Annotated[int | None, typer.Option(help="Dynamic batcher max batch size (default: as built).")] = None,
    queue_delay_us: Annotated[int | None, typer.Option(help="Max queue delay, µs (default: as built).")] = None,
    preferred: Annotated[list[int] | None, typer.Option("--preferred", help="Preferred batch size (repeatable).")] = None,
    instances: Annotated[int, typer.Option(help="Instances of each batched model.")] = 1,
    knob: Annotated[list[str] | None, typer.Option("--knob", help="Reorch knob NAME=VALUE (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of arrivals and lengths.")] = 0,
    run: Annotated[Path | None, typer.Option("--run", help="A characterize run folder: simulate each of its points, "
                                                "report the error, write simulation.json there.")] = None,
    calibrate: Annotated[bool, typer.Option(
        help="With --run: fit the serving costs to the run's server statistics, write calibration.json there, "
             "and simulate with them (in-sample).")] = False,
    calibration: Annotated[Path | None, typer.Option(
        help="Serving costs from a calibration.json (or a run folder holding one) written by --calibrate.")] = None,
    launch_overhead_ms: Annotated[float, typer.Option(help="Device time of every launch beyond the tables (ms).")] = 0.3,
    row_device_ms: Annotated[float, typer.Option(help="Device time every row adds to a launch (ms).")] = 0.0,
    request_overhead_ms: Annotated[float, typer.Option(help="Latency every request adds outside the server (ms).")] = 0.3,
    device_slots: Annotated[int, typer.Option(help="Launches that run at once without slowing each other.")] = 1,
    cores: Annotated[int, typer.Option(help="Cores the launches share by their onnxruntime thread counts (0: the "
                                            "--device-slots model instead).")] = 0,
    intra_op_threads: Annotated[int | None, typer.Option(
        help="onnxruntime threads per instance (default: as built; another count's slowdown is timed in-process "
             "first, a few seconds).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Predict latency, throughput, goodput and batch sizes of a model's variants in virtual time."""
    from rich.console import Console
    from rich.table import Table


    console = Console(width=160)
    settings = (read_calibration(calibration) if calibration is not None
                else _settings(launch_overhead_ms, row_device_ms, request_overhead_ms, device_slots))
    if cores:
        settings = dataclasses.replace(settings, cores=cores)
    if run is not None:
        document = replay_run(run, settings, calibrate=calibrate,
                              calibration_source=str(calibration) if calibration is not None else None,
                              progress=lambda line: console.print(line, highlight=False))
        if as_json:
            typer.echo(json.dumps(document["summary"], indent=2))
            return
        _print_error_summary(console, document, Path(run))
        return
    if model is None:
        raise BadParameterError("give --model NAME (or --run RUN_DIR to simulate a characterization run)")
    built = load_built(repository, model)
    profile = built.profile
    if intra_op_threads is not None and intra_op_threads != profile.built_threads:
        profile = dataclasses.replace(profile, thread_slowdown=measure_thread_slowdown(
            built.repository, built.manifest, model, threads=(intra_op_threads,), built_threads=profile.built_threads))
    base = profile.default_batcher()
    batcher = BatcherSettings(max_batch_size=max_batch_size or base.max_batch_size,
                              max_queue_delay_us=base.max_queue_delay_us if queue_delay_us is None else queue_delay_us,
                              preferred_batch_sizes=tuple(preferred or ()), instance_count=instances,
                              intra_op_threads=intra_op_threads)
    knobs = tuple(sorted(_knob(k) for k in knob or ()))
    configs = []
    for name in variant or ["whole", "ensemble", "reorch:dva"]:
        kind, _, policy = name.partition(":")
        configs.append(VariantConfig(kind, batcher, policy or ("dva" if kind == "reorch" else None),
                                     knobs if kind == "reorch" else ()))
    workload = Workload(ArrivalSpec.parse(arrival), LengthSpec.parse(lengths) if lengths else None,
                        duration_s=duration_s, warmup_s=warmup_s, slo_ms=slo_ms, seed=seed)
    results = [run_simulation(profile, config, workload, settings) for config in configs]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    table = Table(title=f"{model}: simulated {workload.arrival.kind} load, {duration_s - warmup_s:g} s window "
                        f"(whole = {profile.num_stages}-stage tables summed)")
    for column in ("variant", "p50 ms", "p99 ms", "avg ms", "throughput", f"goodput@{slo_ms:g}ms", "stable",
                   "batch size per stage", "CPU s"):
        table.add_column(column)
    for r in results:
        d = r.to_dict()
        sizes = " / ".join(f"{s['avg_batch_size']:.1f}" if s["avg_batch_size"] else "-" for s in d["stages"])
        table.add_row(d["label"], _num(d["p50_ms"]), _num(d["p99_ms"]), _num(d["avg_ms"]), _num(d["throughput_rps"]),
                      _num(d["goodput_rps"]), "yes" if r.stable else f"no ({(r.unstable_reason or '').split(':')[0]})",
                      sizes, f"{r.cpu_s:.2f}")
    console.print(table)


def tune(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model (built into --repository if missing).")],
    slo_ms: Annotated[float, typer.Option(help="Latency objective: p99 within this (ms).")],
    size: Annotated[str, typer.Option(help="Zoo model size (when tune builds it).")] = "small",
    objective: Annotated[str, typer.Option(help="goodput (rate within the SLO), p99, or throughput.")] = "goodput",
    budget_minutes: Annotated[float, typer.Option(help="Wall-clock budget of the whole tuning.")] = 15.0,
    top: Annotated[int, typer.Option(help="Configurations written as ready repositories.")] = 3,
    confirm: Annotated[int, typer.Option(help="Configurations measured on the server besides the default.")] = 3,
    repeats: Annotated[int, typer.Option(help="Measurement rounds at most (each measures every configuration).")] = 3,
    extra_rounds: Annotated[int, typer.Option(help="Rounds after those, while time is left, of only the leader "
                                                   "and the default (they narrow the leader's interval).")] = 8,
    halving_after: Annotated[int, typer.Option(help="Rounds that measure every configuration; later rounds measure "
                                                    "the better half so far (and the default).")] = 2,
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Built repository (manifest.json).")] = Path(
        "model_repository"),
    stages: Annotated[list[int] | None, typer.Option(
        "--stages", "-k", help="Also search these K (each built once into OUT/builds/kK; repeatable).")] = None,
    arrival: Annotated[str, typer.Option(help="Arrival kind of the confirmation (its rate is searched).")] = "poisson",
    lengths: Annotated[str | None, typer.Option(help=LENGTHS_HELP)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default results/tune-MODEL-TIME).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume the tuning in this folder.")] = None,
    simulate_only: Annotated[bool, typer.Option("--simulate-only", help="Search only; measure nothing.")] = False,
    probe_s: Annotated[float, typer.Option(help="Measured seconds of each confirmation probe.")] = 5.0,
    calibration: Annotated[Path | None, typer.Option(
        help="Simulator overheads from a simulation.json (or run folder) made with simulate --run --calibrate.")] = None,
) -> None:
    """Find the best configuration under an SLO: simulate the joint space, confirm the best on the server."""
    import datetime as dt


    if objective not in OBJECTIVES:
        raise BadParameterError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if budget_minutes <= 0:
        raise BadParameterError(f"--budget-minutes {budget_minutes}: must be > 0")
    if resume is not None:
        out = resume
    if out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = Path("results") / f"tune-{model}-{stamp}"
    started = dt.datetime.now(dt.timezone.utc)
    found = find_manifest(repository)
    entry = found.raw.get("models", {}).get(model) if found is not None else None
    if entry is None or entry.get("size") not in (None, size):
        typer.echo(f"building {model} ({size}) into {repository} ...", err=True)
        build_repository(repository, models=[model], options=BuildOptions(size=size))
    builds = [load_built(repository, model)]
    for k in stages or ():
        if k == builds[0].profile.num_stages:
            continue
        target = out / "builds" / f"k{k}"
        if not manifest_path(target).is_file():
            typer.echo(f"building {model} with K={k} into {target} ...", err=True)
            build_repository(target, models=[model], options=BuildOptions(size=size, stages=k))
        builds.append(load_built(target, model))
    spec = ArrivalSpec(kind=arrival, rate_rps=1.0) if arrival != "closed" else None
    if spec is None:
        raise BadParameterError("--arrival closed: tuning searches an open-loop rate; give poisson or constant")
    used_s = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    workload = Workload(spec, LengthSpec.parse(lengths) if lengths else None, slo_ms=slo_ms)
    options = TuneOptions(model=model, slo_ms=slo_ms, workload=workload, out=out, objective=objective,
                          budget_s=budget_minutes * 60.0 - used_s, top=top, confirm=confirm, repeats=repeats,
                          extra_rounds=extra_rounds, halving_after=halving_after, probe_s=probe_s, measure=not simulate_only)
    if calibration is not None:
        options.settings = read_calibration(calibration, say=lambda line: typer.echo(line, err=True))
    run_tune(builds, options, resume=resume is not None, say=lambda line: typer.echo(line, err=True))
    typer.echo((out / "tune.md").read_text())


def _print_error_summary(console, document: dict, run: Path) -> None:
    summary = document["summary"]
    source = document["costs"]["source"]
    kind = "in-sample fit" if document["costs"]["in_sample"] else "prediction"
    console.print(f"{summary['simulated']} of {summary['points']} points simulated; serving costs: {source} ({kind})",
                  highlight=False)
    for variant, figures in summary["per_variant"].items():
        console.print(f"  {variant:9s} median |error| over {figures['stable_points']} stable points: p50 "
                      f"{_pct(figures['stable_median_abs_error_p50'])}, avg {_pct(figures['stable_median_abs_error_avg'])}"
                      f", batch size {_pct(figures['stable_median_abs_error_batch'])}", highlight=False)
    console.print(f"  all       median |error| over {summary['stable_points']} stable points: p50 "
                  f"{_pct(summary['stable_median_abs_error_p50'])} (target {summary['target']:.0%}), avg "
                  f"{_pct(summary['stable_median_abs_error_avg'])}; every point: p50 {_pct(summary['median_abs_error_p50'])}"
                  f"; repeats of the same point differ by {_pct(summary['repeat_noise_p50'])} (median |p50 error| of a repeat "
                  f"against the others: the run's own noise); wrote {run / 'simulation.json'}", highlight=False)
    cross = summary.get("cross_validated")
    if cross and cross.get("median_abs_error_p50") is not None:
        per_variant = ", ".join(f"{v} {_pct(e)}" for v, e in cross["per_variant_median_abs_error_p50"].items())
        console.print(f"  predicted ({cross['folds']}-fold cross-validation, each point with costs fitted to the others): "
                      f"p50 {_pct(cross['median_abs_error_p50'])} over {cross['points']} stable points ({per_variant})",
                      highlight=False)


def _knob(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise BadParameterError(f"--knob {text!r}: write NAME=VALUE (a field of backends.reorch.policies.ReorchKnobs)")
    return name.strip(), value.strip()


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
