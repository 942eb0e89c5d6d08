"""``stagebatch tune``: search by simulation, confirm the best few on the real server, write them out.

Steps, each checked against the budget's clock before it starts:

1. profiles: the built model's manifest (one profile per built K; ``--stages`` builds more Ks), and
   how much slower the model runs with each thread count of the space than as built
   (``tuning.threads``: in-process, a few seconds; the simulator then shares the machine's cores
   among launches by their thread counts, ``SimSettings.cores``);
2. search (``tuning.search``): screen every configuration in simulation, rank the best by simulated
   capacity within the SLO;
3. confirm (``tuning.confirm``): the default whole model and the best ``confirm`` configurations are
   measured in rounds, ``repeats`` rounds at most: the first ``halving_after`` rounds measure every
   one of them once, later rounds only the better half so far (and the default); then, while time is
   left, up to ``extra_rounds`` rounds of only the leader (the configuration most surely above the
   default so far) and the default. The time goes to narrowing the paired interval of the ones that
   matter instead of re-measuring configurations already behind (successive halving);
4. write: ``tune.json`` (everything, also the resume state), ``tune.md`` (the report section) and
   the top N configurations as ready repositories under ``configs/``.

Resume (``--resume DIR``): the search result and every finished measurement are read back from
``DIR/tune.json``; only missing measurements run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.rundir import write_json
from loadtest.tuned import BASELINE_KEY, TUNE_FILE
from core.errors import ConfigValidationError
from core.manifest import read_manifest
from core.model_config import THREADS_PARAMETER, config_parameters, read_model_config
from tuning.batcher import BatcherSettings
from tuning.confirm import FIRST_GROWTH, REFINE_GROWTH, Confirmer, mean_ci95, write_ready_repository
from tuning.search import SearchOptions, SearchSpace, check_slo, diverse, search, why
from tuning.simulate import ModelProfile, SimSettings, VariantConfig, Workload
from tuning.threads import measure_thread_slowdown

REPORT_FILE = "tune.md"
CONFIGS_DIR = "configs"
SEARCH_SHARE = 0.3  # at most this share of the budget goes to the simulated search
CLOSING_S = 5.0  # kept for writing the report and the ready repositories after the last search
REFINE_START = 0.95  # a configuration measured before starts its next search at this share of its mean: with
# REFINE_GROWTH the bracket usually closes in 3 probes instead of 5 (0.9 and x1.5: a passing probe, one far
# above capacity, then bisections), so the same budget gives the leader more paired rounds
REFINE_JITTER = 0.04  # ... times a factor within +-this, drawn per configuration and round: without it the
# searches of two configurations land on the same grid (0.95 x mean x 1.15^k) and their rounds tie (a quiet
# run read 1.442 three rounds running), which narrows the paired interval below the searches' resolution
UNKNOWN_SPEED = 0.75  # the machine's speed against the simulation before the default is measured (see _start_rate)


@dataclass
class Built:
    """One built repository of the model (one K) and its profile."""

    repository: Path
    manifest: dict[str, Any]
    profile: ModelProfile


@dataclass
class TuneOptions:
    model: str
    slo_ms: float
    workload: Workload
    out: Path
    objective: str = "goodput"
    budget_s: float = 15 * 60.0
    top: int = 3
    confirm: int = 3  # configurations confirmed on the server (besides the default whole model)
    repeats: int = 3
    extra_rounds: int = 8  # rounds after the last one that measure only the leader and the default (budget permitting)
    halving_after: int = 2  # rounds that measure every configuration; later ones only the better half
    probe_s: float = 5.0
    probe_warmup_s: float = 1.5
    space: SearchSpace = field(default_factory=SearchSpace)
    settings: SimSettings = field(default_factory=SimSettings)  # cores 0: this machine's (os.cpu_count())
    measure: bool = True  # False: simulate only (no server)


def load_built(repository: Path, model: str) -> Built:
    """The model's profile in ``repository``, with the onnxruntime threads its whole model was built with."""
    manifest = read_manifest(repository)
    entry = manifest.model(model)
    profile = ModelProfile.from_manifest_entry(model, entry.raw)
    whole = Path(repository) / entry.raw.get("variants", {}).get("whole", model) / "config.pbtxt"
    threads = config_parameters(read_model_config(whole)).get(THREADS_PARAMETER) if whole.is_file() else None
    if threads is not None:
        profile = dataclasses.replace(profile, built_threads=int(threads))
    return Built(Path(repository), manifest.raw, profile)


def with_thread_slowdown(builds: list[Built], state: dict[str, Any], space: SearchSpace,
                         say: Callable[[str], None]) -> list[Built]:
    """``builds`` whose profiles know the slowdown of every thread count of ``space`` (measured on the
    first build's model once, kept in ``state["thread_slowdown"]`` for resume; every K shares it)."""
    first = builds[0].profile
    asked = [t for t in space.intra_op_threads if t is not None and t != first.built_threads]
    if not asked:
        return builds
    if "thread_slowdown" not in state:
        began = time.monotonic()
        measured = measure_thread_slowdown(builds[0].repository, builds[0].manifest, first.name, threads=asked,
                                           built_threads=first.built_threads)
        state["thread_slowdown"] = {"built_threads": first.built_threads, "seconds": round(time.monotonic() - began, 1),
                                    "by_threads": {str(t): {str(b): f for b, f in table.items()}
                                                   for t, table in measured.items()}}
        say(f"time at fewer onnxruntime threads than as built ({first.built_threads}), per batch size: "
            f"{state['thread_slowdown']['by_threads']} ({state['thread_slowdown']['seconds']} s)")
    slowdown = {int(t): {int(b): float(f) for b, f in table.items()}
                for t, table in state["thread_slowdown"]["by_threads"].items()}
    return [dataclasses.replace(b, profile=dataclasses.replace(b.profile, thread_slowdown=slowdown)) for b in builds]


def config_from_description(data: dict[str, Any]) -> VariantConfig:
    """Inverse of ``VariantConfig.describe`` (for resume)."""
    batcher = BatcherSettings.from_batching(data["batching"], BatcherSettings())
    reorch = data.get("reorch") or {}
    if data["variant"] != "reorch":
        return VariantConfig(data["variant"], batcher)
    return VariantConfig("reorch", batcher, reorch.get("policy"), tuple(sorted((reorch.get("knobs") or {}).items())))


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s

    @property
    def used_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def left_s(self) -> float:
        return self.budget_s - self.used_s


def tune(builds: list[Built], options: TuneOptions, *, resume: bool = False,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole tuning; returns (and writes) the ``tune.json`` document."""
    clock = _Clock(options.budget_s)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / TUNE_FILE
    state: dict[str, Any] = {}
    if resume:
        if not state_path.is_file():
            raise ConfigValidationError(f"--resume {out}: no {TUNE_FILE} there; start a new tuning with --out")
        state = json.loads(state_path.read_text())
        if state.get("model") != options.model or state.get("slo_ms") != options.slo_ms:
            raise ConfigValidationError(f"--resume {out}: it tuned {state.get('model')} at {state.get('slo_ms')} ms, "
                                        f"not {options.model} at {options.slo_ms} ms; use a new --out")
    settings = options.settings if options.settings.cores else dataclasses.replace(options.settings,
                                                                                    cores=os.cpu_count() or 1)
    floor_ms = check_slo(builds[0].profile, options.slo_ms, settings)
    builds = with_thread_slowdown(builds, state, options.space, say)
    by_k = {b.profile.num_stages: b for b in builds}
    state.update({"model": options.model, "slo_ms": options.slo_ms, "objective": options.objective,
                  "budget_s": options.budget_s, "batch1_latency_ms": round(floor_ms, 3),
                  "workload": {"arrival": options.workload.arrival.kind,
                               "lengths": options.workload.lengths.to_dict() if options.workload.lengths else None},
                  "simulator": dataclasses.asdict(settings)})
    state.setdefault("measurements", [])

    def save() -> None:
        write_json(state_path, state)

    # ---- search (simulation) ----
    if "search" not in state:
        search_deadline = options.budget_s * SEARCH_SHARE
        ordered, facts = search([b.profile for b in builds], options.workload, space=options.space,
                                settings=settings, options=SearchOptions(objective=options.objective),
                                progress=say, deadline=lambda: clock.used_s > search_deadline)
        base_rps = facts["baseline"].get("simulated_slo_rps")
        state["search"] = {**facts, "search_s": round(clock.used_s, 1),
                           "ranked": [{**c.describe(), "why": why(c, base_rps)} for c in ordered]}
        save()
    ranked = state["search"]["ranked"]
    baseline_config = VariantConfig("whole", builds[0].profile.default_batcher())
    to_confirm = [(BASELINE_KEY, builds[0], baseline_config)]
    # the best of each variant (whole, ensemble, reorch) first, so that the reorchestrator's policies,
    # each a label of its own, do not crowd the ensemble out of the confirmation
    for row in diverse(ranked, options.confirm, label=lambda r: r["variant"]):
        to_confirm.append((row["key"], by_k.get(row["stages"], builds[0]), config_from_description(row)))

    # ---- confirm (real server), in rounds; one server per build, kept across the rounds ----
    done = {(m["key"], m["repeat"]) for m in state["measurements"]}
    if options.measure:
        say(f"confirming {len(to_confirm) - 1} configurations and the default whole model on the server "
            f"({options.repeats} rounds at most, {clock.left_s / 60:.1f} min left)")
        with contextlib.ExitStack() as servers:
            confirmers: dict[int, Confirmer] = {}
            for repeat in range(options.repeats + options.extra_rounds):
                round_of = _round_members(state, to_confirm, repeat, options)
                todo = [t for t in round_of if (t[0], repeat) not in done]
                if not todo:
                    continue
                estimate_s = _round_estimate_s(state, len(todo), options)
                if clock.left_s < estimate_s:
                    say(f"round {repeat + 1}: {clock.left_s:.0f} s left, a round takes about {estimate_s:.0f} s; "
                        "stopping")
                    break
                for key, build, config in todo:
                    if clock.left_s < _search_reserve_s(state, options):  # a search may not overrun the budget
                        say(f"  {clock.left_s:.0f} s left: {key} is not measured in round {repeat + 1}")
                        continue
                    k = build.profile.num_stages
                    if k not in confirmers:
                        confirmers[k] = servers.enter_context(Confirmer(
                            build.repository, build.manifest, options.model, options.workload,
                            log_path=out / f"tritonserver.k{k}.log", probe_s=options.probe_s,
                            warmup_s=options.probe_warmup_s, say=say))
                    start = _start_rate(state, key, ranked, repeat)
                    growth = REFINE_GROWTH if _measured_mean(state, key) else FIRST_GROWTH
                    say(f"  round {repeat + 1} {key}: searching from {start:.1f} req/s (x{growth:g} per pass)")
                    began = time.monotonic()
                    result = confirmers[k].rate_within_slo(config, start, seed=repeat, growth=growth)
                    state["measurements"].append({
                        "key": key, "repeat": repeat, "slo_rps": result.sustained_rps,
                        "probes": [p.to_dict() for p in result.probes], "limited_by": result.limited_by,
                        "wall_s": round(time.monotonic() - began, 1)})
                    save()
    state["results"] = _results(state, to_confirm)
    state["used_s"] = round(clock.used_s, 1)
    save()
    _write_outputs(out, state, to_confirm, options, say)
    save()
    return state


def _round_members(state: dict[str, Any], to_confirm, repeat: int, options: TuneOptions) -> list:
    """Who round ``repeat`` measures: everyone in the first ``halving_after`` rounds; then the default
    and the better half of the configurations; after ``repeats`` rounds, the default and the leader
    only. Computed from the recorded measurements alone, so a resumed run picks the same members.

    Better and leader go by the mean paired ratio to the default, not by the low end of its interval
    (which orders the report): after two rounds the interval mostly says how far apart two rounds
    were, and the low end prunes the configuration measured highest as soon as one of its rounds read
    low (a quiet run dropped one at 1.53x and 1.02x for one at 0.99x +- 0.11). More rounds are what
    narrows an interval, so they go to the configurations that may be ahead."""
    if repeat < min(options.halving_after, options.repeats):
        return to_confirm
    measured = [r for r in _results(state, to_confirm) if r["key"] != BASELINE_KEY and r.get("vs_default") is not None]
    ranked = [r["key"] for r in sorted(measured, key=lambda r: r["vs_default"], reverse=True)]
    keep = math.ceil((len(to_confirm) - 1) / 2) if repeat < options.repeats else 1
    chosen = {BASELINE_KEY, *ranked[:keep]} if ranked else set()
    return [t for t in to_confirm if t[0] in chosen]


def _search_estimate_s(state: dict[str, Any], options: TuneOptions) -> float:
    """How long one capacity search on the server takes (the mean so far, else 4 probes)."""
    walls = [m["wall_s"] for m in state["measurements"] if m.get("wall_s")]
    return (sum(walls) / len(walls)) if walls else 4 * (options.probe_s + options.probe_warmup_s + 2)


def _search_reserve_s(state: dict[str, Any], options: TuneOptions) -> float:
    """The time a search may start with: the longest one so far (else 4 probes), and the time to write
    the results after it. The mean was not enough: a quiet 15-minute run started its last search with
    50 s left, the search took 62.5 s, and the run ended 6 s over its budget."""
    walls = [m["wall_s"] for m in state["measurements"] if m.get("wall_s")]
    return (max(walls) if walls else 4 * (options.probe_s + options.probe_warmup_s + 2)) + CLOSING_S


def _round_estimate_s(state: dict[str, Any], count: int, options: TuneOptions) -> float:
    return _search_estimate_s(state, options) * count * 0.8  # a later round may start if most of it fits


def _measured_mean(state: dict[str, Any], key: str) -> float | None:
    """The mean of a configuration's rates within the SLO measured so far (None: none passed yet)."""
    values = [m["slo_rps"] for m in state["measurements"] if m["key"] == key and m.get("slo_rps")]
    return sum(values) / len(values) if values else None


def _refine_jitter(key: str, repeat: int) -> float:
    """A factor in [1 - REFINE_JITTER, 1 + REFINE_JITTER], the same for a configuration and round on every
    run (so a resumed tuning starts where the first would have)."""
    digest = hashlib.sha256(f"{key}/{repeat}".encode()).digest()
    return 1.0 + REFINE_JITTER * (2.0 * int.from_bytes(digest[:8], "big") / 2**64 - 1.0)


def _start_rate(state: dict[str, Any], key: str, ranked: list[dict[str, Any]], repeat: int = 0) -> float:
    """Where a configuration's capacity search starts: near what it measured before, else near its
    simulated rate, corrected by how the default whole model measured against its own simulation (the
    machine's speed now: a search that starts far above the passing rate can spend every probe
    coming down to it)."""
    earlier = _measured_mean(state, key)
    if earlier:
        return REFINE_START * earlier * _refine_jitter(key, repeat)
    baseline_simulated = state["search"]["baseline"].get("simulated_slo_rps")
    if key == BASELINE_KEY:
        simulated = baseline_simulated
    else:
        # a candidate the ranking did not reach (deadline) has only its screening rate
        simulated = next((r.get("simulated_slo_rps") for r in ranked if r["key"] == key), None) or (
            state["search"].get("screen_rps") if key != BASELINE_KEY else None)
    if not simulated:
        return 20.0
    baseline_measured = _measured_mean(state, BASELINE_KEY)
    # Unknown speed (nothing of the default measured yet): start at 0.6x the simulated rate. Uncalibrated, the
    # simulator put bert_base small at 252 req/s where about 130 passed; a probe far above capacity times
    # requests out and the search spends its probes coming down, while one below costs a probe or two going up.
    speed = baseline_measured / baseline_simulated if baseline_measured and baseline_simulated else UNKNOWN_SPEED
    return 0.8 * simulated * speed


def _results(state: dict[str, Any], to_confirm) -> list[dict[str, Any]]:
    rows = []
    ranked = {r["key"]: r for r in state["search"]["ranked"]}
    for key, build, config in to_confirm:
        values = [m["slo_rps"] or 0.0 for m in state["measurements"] if m["key"] == key]
        mean, half = mean_ci95(values)
        row = {"key": key, "stages": build.profile.num_stages, **config.describe(), "repeats": len(values),
               "measured_slo_rps": None if not values else round(mean, 2),
               "ci95_rps": None if half is None else round(half, 2),
               "simulated_slo_rps": (state["search"]["baseline"] if key == BASELINE_KEY else ranked.get(key, {})
                                     ).get("simulated_slo_rps"),
               "why": "the default whole model as built (the baseline)" if key == BASELINE_KEY
               else ranked.get(key, {}).get("why", "")}
        if key != BASELINE_KEY:
            # Paired by round: each round measured the default and this configuration close in time,
            # so the ratio cancels the drift of a shared machine that the absolute figures carry.
            base_by_round = {m["repeat"]: m["slo_rps"] for m in state["measurements"] if m["key"] == BASELINE_KEY}
            ratios = [(m["slo_rps"] or 0.0) / base_by_round[m["repeat"]] for m in state["measurements"]
                      if m["key"] == key and base_by_round.get(m["repeat"])]
            if ratios:
                ratio, ratio_half = mean_ci95(ratios)
                row["vs_default"] = round(ratio, 3)
                row["vs_default_ci95"] = None if ratio_half is None else round(ratio_half, 3)
        rows.append(row)
    measured = [r for r in rows if r["key"] != BASELINE_KEY]
    measured.sort(key=_evidence, reverse=True)
    return [r for r in rows if r["key"] == BASELINE_KEY] + measured


def _evidence(row: dict[str, Any]) -> tuple[float, float]:
    """How surely a configuration beats the default: the low end of its paired ratio's 95% CI first.

    On a shared machine one round can measure a configuration 2x too fast; ranking by the mean would
    crown it. A ratio from one round has no interval: it ranks after every one that has (one round is
    the least evidence, not an interval of width 0). Unmeasured configurations come last, in their
    simulated order.
    """
    if row.get("vs_default") is not None and row.get("vs_default_ci95") is not None:
        return 1.0, row["vs_default"] - row["vs_default_ci95"]
    if row.get("vs_default") is not None:
        return 0.75, row["vs_default"]
    if row["measured_slo_rps"] is not None:
        return 0.5, row["measured_slo_rps"]
    return 0.0, row["simulated_slo_rps"] or 0.0


def _write_outputs(out: Path, state: dict[str, Any], to_confirm, options: TuneOptions, say) -> None:
    configs = {key: (build, config) for key, build, config in to_confirm}
    winners = [r for r in state["results"] if r["key"] != BASELINE_KEY][:options.top]
    written = []
    for rank, row in enumerate(winners, start=1):
        build, config = configs[row["key"]]
        target = out / CONFIGS_DIR / f"{rank}_{row['key']}"
        write_ready_repository(build.repository, build.manifest, options.model, config, options.workload, target,
                               {"rank": rank, "slo_ms": options.slo_ms, "measured_slo_rps": row["measured_slo_rps"],
                                "ci95_rps": row["ci95_rps"], "simulated_slo_rps": row["simulated_slo_rps"],
                                "why": row["why"]})
        row["repository"] = str(target)
        written.append(target)
    state["written"] = [str(p) for p in written]
    (out / REPORT_FILE).write_text(report_markdown(state))
    say(f"wrote {out / REPORT_FILE} and {len(written)} ready repositories under {out / CONFIGS_DIR}")


def _fmt(value: float | None, half: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" ± {half:.1f}" if half is not None else "")


def _ratio(row: dict[str, Any]) -> str:
    if row.get("vs_default") is None:
        return "-"
    half = row.get("vs_default_ci95")
    return f"{row['vs_default']:.2f}x" + (f" ± {half:.2f}" if half is not None else "")


def _threads_text(batching: dict[str, Any]) -> str:
    threads = batching.get("intra_op_threads")
    return "" if threads is None else f" of {threads} onnxruntime thread(s)"


def _threads_note(state: dict[str, Any]) -> str:
    """How the simulator saw the cores and the thread counts (``tune.json``'s ``thread_slowdown``)."""
    cores = state.get("simulator", {}).get("cores")
    measured = state.get("thread_slowdown")
    if not cores or not measured:
        return ""
    built = measured["built_threads"]
    tables = "; ".join(f"at {t} thread(s) " + ", ".join(f"{f:.2f}x" for f in table.values())
                       + f" (batch {', '.join(table)})" for t, table in measured["by_threads"].items())
    return (f" Threads: the simulator shares {cores} cores among the launches running at once by their "
            f"onnxruntime thread counts; a launch alone takes, relative to the threads as built "
            f"({built}{' = one per core' if built == 0 else ''}), {tables} (measured in-process at the start).")


def report_markdown(state: dict[str, Any]) -> str:
    """The report section: the tuned configurations, their measured goodput and why each won."""
    search_facts = state["search"]
    lines = [f"## Tuned configurations: {state['model']} at p99 ≤ {state['slo_ms']:g} ms", "",
             (f"Objective: {state['objective']}. {search_facts['candidates']} configurations were simulated "
             f"(screened at {search_facts['screen_rps']} req/s, {state['workload']['arrival']} arrivals); "
             + ("the best were measured on the embedded server with the capacity search (a probe passes when the "
                "load is sustained and its p99 is within the SLO), in interleaved rounds. Goodput = the highest rate "
                "sustained within the SLO; ± is the 95% confidence interval over the rounds; vs default is the mean "
                "of the per-round ratios to the default whole model (paired: it cancels drift between rounds); the "
                "configurations are ranked by the low end of its interval (the surest gain first). "
                if state["measurements"] else "nothing was measured (simulation only). ")
             + f"Batch-1 latency "
             f"(the SLO floor): {state['batch1_latency_ms']} ms. Used {state.get('used_s', 0) / 60:.1f} of "
             f"{state['budget_s'] / 60:.0f} min." + _threads_note(state)), "",
             "| rank | configuration | variant | K | goodput req/s (measured) | simulated | vs default | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    rank = 0
    for row in state["results"]:
        label = "default" if row["key"] == BASELINE_KEY else str(rank := rank + 1)
        lines.append(f"| {label} | `{row['key']}` | {row['label']} | {row['stages'] if row['variant'] != 'whole' else '-'} | "
                     f"{_fmt(row['measured_slo_rps'], row['ci95_rps'])} | {_fmt(row['simulated_slo_rps'])} | "
                     f"{_ratio(row)} | {row['repeats']} |")
    lines += ["", "Why each won:", ""]
    for row in state["results"]:
        if row["key"] != BASELINE_KEY:
            b = row["batching"]
            knobs = f", policy {row['reorch']['policy']}" if row.get("reorch") else ""
            lines.append(f"- `{row['key']}` (max batch {b['max_batch_size']}, delay {b['max_queue_delay_us']} µs, "
                         f"preferred {b['preferred_batch_sizes'] or 'none'}, {b['instance_count']} instance(s)"
                         f"{_threads_text(b)}{knobs}): "
                         f"{row['why']}." + (f" Ready repository: `{row['repository']}`." if row.get("repository") else ""))
    lines += ["", "Measured on a shared machine unless stated otherwise; re-run on a quiet one for final figures.", ""]
    return "\n".join(lines)
