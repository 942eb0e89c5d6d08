"""The characterization runner: build, (re)load, warm up, measure and record every point of a plan.

For each point of :meth:`loadtest.plan.Plan.points` (ordered so that rebuilds and reloads are
fewest) the runner

1. rebuilds the model when the point's slicing (K, cut balance) differs from what is built
   (``slicing.build``, the ``stagebatch build`` code), then reloads its models;
2. reloads the variant's Triton models through the repository API with the point's request
   batching knobs (max batch size, queue delay, preferred sizes, instance count) and, for the
   reorchestrator, its policy and knobs (``load_model(name, config=json)``), starting from the
   configuration as built, so knobs never leak from one point into the next;
3. warms up with the point's load, then snapshots Triton's statistics (and the reorchestrator's
   metrics), runs the measured load through :func:`loadtest.driver.run_load`, snapshots again;
4. appends the point to ``points.jsonl`` (client summary, server deltas per model and stage,
   load-generator CPU) and its raw requests to ``requests.csv``.

A point that fails (a model that does not load, a load run that raises) is recorded as failed and
the run goes on. ``environment.json`` records the hardware, software versions and the plan.
Raw data layout: see :data:`ENVIRONMENT_FILE`, :data:`POINTS_FILE`, :data:`REQUESTS_FILE`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import capacity as capacity_search
from loadtest.driver import LoadSpec, run_load
from loadtest.environment import collect_environment, utc_now
from loadtest.perf_analyzer import cross_check
from loadtest.plan import (
    ModelLimits,
    Plan,
    Point,
    check_against_models,
    parse_plan,
    resolve_arrival,
)
from loadtest.report import write_report
from loadtest.rundir import (
    CAPACITY_FILE,
    ENVIRONMENT_FILE,
    LOADGEN_CROSSCHECK_FILE,
    LOG_FILE,
    append_point,
    discard_incomplete,
    drop_requests,
    read_capacity,
    read_environment,
    read_points,
    start_run_files,
    write_json,
    write_points,
)
from loadtest.server_stats import diff_reorch_metrics, diff_statistics, scrape_metrics, snapshot_statistics
from loadtest.stability import LOADGEN_REASONS, arrival_period_s, assess
from loadtest.stats import percentile_us, summarize
from loadtest.workloads import ArrivalSpec, LengthSpec
from slicing.build import BuildOptions, build_repository
from slicing.slicer import max_stages
from core.errors import ConfigValidationError, ServerStartError, SliceError, StagebatchError
from core.manifest import find_manifest, read_manifest
from core.model_config import (
    read_model_config,
    variant_configs,
    variant_models,
)
from core.server import ADMIN_HEADER, GRPC_HEADER_PREFIX, EmbeddedTriton

LOGGER = logging.getLogger(__name__)
# one line per point (and per capacity probe) on the console; everything else INFO goes to the log file
PROGRESS = logging.getLogger("loadtest.progress")

# A load generator busier than this (percent of one core) may be what limits a point.
LOADGEN_BUSY_PERCENT = 85.0
# Share of arrivals sent late above which the open-loop schedule was not kept (a few late ones are
# normal when the generator shares the cores with the server).
LATE_ARRIVALS_SHARE = 0.05
ADMIN_KEY_ENV = "STAGEBATCH_ADMIN_KEY"


# ---------------------------------------------------------------- configurations (pure)


def point_configs(point: Point, entry: dict, base_configs: dict[str, dict]) -> dict[str, dict]:
    """The config every model of the point's variant must be loaded with (model name -> config)."""
    return variant_configs(entry, point.variant, base_configs, point.batching, point.reorch)


# ---------------------------------------------------------------- per-stage rows (pure)


def stage_rows_from_triton(names: list[str], deltas: dict) -> list[dict]:
    """Per-stage facts for whole (one stage) and ensemble (its stage models) from statistics deltas."""
    rows = []
    for index, name in enumerate(names):
        delta = deltas[name]
        rows.append(
            {
                "stage": index,
                "model": name,
                "executions": delta.execution_count,
                "rows": delta.inference_count,
                "avg_batch_size": delta.avg_batch_size,
                "avg_queue_us": delta.avg_queue_us,
                "avg_compute_us": delta.avg_compute_us,
                "batch_histogram": {str(k): v for k, v in sorted(delta.batch_histogram.items())},
                "histogram_source": "Triton statistics batch_stats",
            }
        )
    return rows


def stage_rows_from_reorch(model_name: str, reorch, batch_sizes_seen: list[list[int]]) -> list[dict]:
    """Per-stage facts of the reorchestrator from its metrics, histograms from its per-request records.

    A batch of b rows is reported by each of its b requests, so executions of size b ~= count_b / b.
    """
    rows = []
    stage_count = max([len(reorch.stages)] + [len(s) for s in batch_sizes_seen])
    for stage in range(stage_count):
        values = reorch.stages.get(stage, {})
        executions = values.get("executions", 0)
        samples = values.get("samples", 0)
        seen: dict[int, int] = {}
        for sizes in batch_sizes_seen:
            if stage < len(sizes):
                seen[sizes[stage]] = seen.get(sizes[stage], 0) + 1
        histogram = {str(size): round(count / size, 2) for size, count in sorted(seen.items()) if size > 0}
        rows.append(
            {
                "stage": stage,
                "model": f"{model_name}:{stage}",
                "executions": executions,
                "rows": samples,
                "avg_batch_size": samples / executions if executions else None,
                "avg_queue_us": values.get("queue_us", 0) / samples if samples else None,
                "avg_compute_us": values.get("compute_us", 0) / executions if executions else None,
                "batch_histogram": histogram,
                "histogram_source": "reorchestrator per-request records",
            }
        )
    return rows


def loadgen_bottleneck(cpu_percent: float | None, late_arrivals: int, requests: int) -> bool:
    """Whether the load generator, not the server, may have limited the point.

    ``cpu_percent`` is the driver's figure: percent of the one core a gevent process can use.
    """
    busy = cpu_percent is not None and cpu_percent >= LOADGEN_BUSY_PERCENT
    late = requests > 0 and late_arrivals > max(1, LATE_ARRIVALS_SHARE * requests)
    return bool(busy or late)


# ---------------------------------------------------------------- the run


@dataclass
class RunOptions:
    """How to run a plan; ``url`` None starts the embedded server on the plan's repository."""

    out_dir: Path
    url: str | None = None
    workers: int = 0
    progress: bool = True
    admin_headers: dict[str, str] | None = None
    metrics_url: str | None = None
    resume: bool = False  # continue the run in out_dir: skip its complete points
    capacity_file: Path | None = None  # a capacity.json to take instead of searching
    # after the points: replay one stable open-loop whole-model point with perf_analyzer too
    # (loadgen_crosscheck.json; skipped, with the reason, where perf_analyzer cannot be had)
    crosscheck: bool = False


@dataclass
class _State:
    built: dict[str, tuple] = field(default_factory=dict)  # model -> (stages, balance) built now
    loaded: dict[str, str] = field(default_factory=dict)  # triton model -> json of loaded config
    base_configs: dict[str, dict] = field(default_factory=dict)  # triton model -> config as built
    current_model: str | None = None


class Characterization:
    """Runs one plan into one run directory. ``run()`` returns the directory."""

    def __init__(self, plan: Plan, options: RunOptions) -> None:
        self.plan = plan
        self.options = options
        self.out_dir = Path(options.out_dir)
        repo = plan.repository.path
        self.repository = Path(repo) if repo else self.out_dir / "repository"
        if repo and not Path(repo).is_absolute() and not Path(repo).exists():
            # relative to the plan file when not relative to the working directory
            candidate = Path(plan.source).parent / repo
            if candidate.exists():
                self.repository = candidate
        self.state = _State()
        self.manifest: dict = {}
        self.server = None
        self.client = None
        self.replica_clients: list = []
        self.capacity: dict | None = None  # capacity.json document (measured or given)
        self.interrupted = False
        self._server_starts = 0

    # ---- repository ----
    def _read_manifest(self) -> dict:
        self.manifest = read_manifest(self.repository).raw
        return self.manifest

    def _build(self, model: str, stages: int, balance: str) -> None:
        spec = self.plan.repository
        LOGGER.info(
            "building %s (size %s, K=%d, balance %s) into %s",
            model,
            spec.size,
            stages,
            balance,
            self.repository,
        )
        options = BuildOptions(
            size=spec.size,
            stages=stages,
            target=spec.target,
            max_batch=spec.max_batch_size,
            queue_delay_us=spec.queue_delay_us,
            balance=balance,
        )
        build_repository(self.repository, models=[model], options=options, log=LOGGER.info)
        self.state.built[model] = (stages, balance)
        for name in list(self.state.base_configs):
            if name == model or name.startswith(f"{model}_"):
                del self.state.base_configs[name]
        self._read_manifest()

    def _prepare_repository(self) -> None:
        spec = self.plan.repository
        if spec.build:
            found = find_manifest(self.repository)
            existing = found.raw.get("models", {}) if found is not None else {}
            for model in self.plan.models:
                entry = existing.get(model)
                build = (entry or {}).get("build", {})
                same = (
                    entry is not None
                    and entry.get("size") == spec.size
                    and entry.get("max_batch_size") == spec.max_batch_size
                    and build.get("stages") == spec.stages
                    and build.get("balance") == spec.balance
                    and build.get("max_queue_delay_us") == spec.queue_delay_us
                )
                if same:
                    self.state.built[model] = (spec.stages, spec.balance)
                    continue
                try:
                    self._build(model, spec.stages, spec.balance)
                except SliceError as error:
                    line = spec.lines.get("stages", spec.lines.get(".", 1))
                    raise ConfigValidationError(f"{self.plan.source}:{line}: repository: {error}") from None
        self._read_manifest()

    def model_limits(self) -> dict[str, ModelLimits]:
        """What each model in the manifest allows (largest K when the slicer can tell)."""
        limits = {}
        for name, entry in self.manifest.get("models", {}).items():
            max_k = (entry.get("build") or {}).get("max_stages")
            if max_k is None and self.plan.repository.build:
                max_k = self._max_stages(name, entry)
            limits[name] = ModelLimits(
                max_stages=max_k,
                max_batch_size=entry.get("max_batch_size"),
                variants=tuple(entry.get("variants", {})),
            )
        return limits

    def _max_stages(self, name: str, entry: dict) -> int | None:
        whole = self.repository / entry["variants"].get("whole", name) / "1" / "model.onnx"
        if not whole.is_file():
            return None
        try:
            return int(max_stages(whole))
        except StagebatchError:
            return None

    # ---- server ----
    def _start_server(self) -> str:
        import tritonclient.grpc as grpcclient

        if self.options.url:
            url = self.options.url
            headers = self.options.admin_headers
            if headers is None and os.environ.get(ADMIN_KEY_ENV):
                headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: os.environ[ADMIN_KEY_ENV]}
            self.admin_headers = headers or {}
            self.metrics_url = self.options.metrics_url
        else:
            self._server_starts += 1
            log_name = "tritonserver.log" if self._server_starts == 1 else f"tritonserver.{self._server_starts}.log"
            # Supervised: a model whose stub dies is reloaded (with the config it was serving) within
            # seconds; a point during which that happened is recorded as failed (see _run_point).
            self.server = EmbeddedTriton(self.repository, models=[], log_path=self.out_dir / log_name,
                                         supervise=True)
            self.server.start()
            url = self.server.grpc_url
            self.admin_headers = self.server.admin_headers
            self.metrics_url = self.server.metrics_url
        self.url = url  # passed to the load generator as given (it spreads requests over the targets)
        targets = server_targets(url)
        # reloads go to every listed replica; statistics come from the first
        self.replica_clients = [grpcclient.InferenceServerClient(target) for target in targets]
        self.client = self.replica_clients[0]
        return url

    def _stop_server(self) -> None:
        if self.client is not None and self.server is None:
            self._restore_remote_models()
        if self.client is not None:
            for client in self.replica_clients:
                client.close()
            self.client = None
            self.replica_clients = []
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _server_lost(self) -> str | None:
        """Why the server we started is gone (None while it runs, or when it is not ours)."""
        if self.server is not None and not self.server.is_alive():
            return f"tritonserver exited (log: {self.server.log_path})"
        return None

    def _restart_server(self) -> None:
        """Bring back the embedded server we own; every model is loaded again on demand."""
        LOGGER.warning("restarting the embedded tritonserver")
        self._stop_server()
        self.state.loaded.clear()
        self._start_server()

    def _restore_remote_models(self) -> None:
        """A server we did not start gets its models back as built (best effort; failures are logged)."""
        for name in list(self.state.loaded):
            base = self.state.base_configs.get(name)
            if base is None or self.state.loaded[name] == json.dumps(base, sort_keys=True):
                continue
            try:
                self._load(name, base)
            except StagebatchError as error:
                LOGGER.warning("could not restore %s to its configuration as built: %s", name, error)

    def _base_config(self, name: str) -> dict:
        if name not in self.state.base_configs:
            path = self.repository / name / "config.pbtxt"
            if path.is_file():
                config = read_model_config(path)
            else:  # a remote server's repository: take the config it serves
                self._load(name, None)
                config = self.client.get_model_config(name, as_json=True)["config"]
            self.state.base_configs[name] = config
        return self.state.base_configs[name]

    def _load(self, name: str, config: dict | None) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            for client in self.replica_clients:
                if config is None:
                    client.load_model(name, headers=self.admin_headers)
                else:
                    client.load_model(name, config=json.dumps(config), headers=self.admin_headers)
        except InferenceServerException as error:
            raise ServerStartError(f"model {name!r} failed to load: {error.message()}") from None
        self.state.loaded[name] = json.dumps(config, sort_keys=True) if config is not None else ""

    def _unload_model_family(self, model: str) -> None:
        for name in list(self.state.loaded):
            if name == model or name.startswith(f"{model}_"):
                try:
                    for client in self.replica_clients:
                        client.unload_model(name, headers=self.admin_headers)
                except Exception as error:  # noqa: BLE001 - unloading is best effort; the next load reports
                    LOGGER.warning("could not unload %s: %s", name, error)
                del self.state.loaded[name]

    def _ensure(self, point: Point) -> list[str]:
        """Build and load what the point needs; return its Triton model names (entry last)."""
        if self.state.current_model not in (None, point.model):
            self._unload_model_family(self.state.current_model)
        self.state.current_model = point.model
        spec = self.plan.repository
        wanted = (point.slicing.get("stages", spec.stages), point.slicing.get("balance", spec.balance))
        if spec.build and point.variant != "whole" and self.state.built.get(point.model) != wanted:
            self._unload_model_family(point.model)
            self._build(point.model, *wanted)
        entry = self.manifest["models"][point.model]
        names = variant_models(entry, point.variant)
        base = {name: self._base_config(name) for name in names}
        for name, config in point_configs(point, entry, base).items():
            if self.state.loaded.get(name) != json.dumps(config, sort_keys=True):
                self._load(name, config)
        return names

    # ---- one point ----
    def _resolved(self, point: Point) -> tuple[Point, dict]:
        """The point with its relative rates in req/s, and its ``load`` record."""
        capacity = capacity_search.whole_capacity(self.capacity, point.model)
        arrival, load = resolve_arrival(point.arrival, capacity if point.relative else None, model=point.model)
        if not point.relative:
            load["capacity_rps"] = None if capacity is None else round(capacity, 3)
        return dataclasses.replace(point, arrival=arrival), load

    def _load_spec(self, point: Point):
        base_dir = Path(self.plan.source).parent
        arrival = dict(point.arrival)
        if arrival.get("trace_path") and not Path(arrival["trace_path"]).is_absolute():
            arrival["trace_path"] = str(base_dir / arrival["trace_path"])
        lengths = dict(point.lengths) if point.lengths else None
        if lengths and lengths.get("path") and not Path(lengths["path"]).is_absolute():
            lengths["path"] = str(base_dir / lengths["path"])
        entry = self.manifest["models"][point.model]
        if entry.get("sequence") is None:
            lengths = None  # lengths mean nothing to a model without a sequence axis
        return LoadSpec(
            model=point.model,
            variant=point.variant,
            arrival=ArrivalSpec(**arrival),
            lengths=LengthSpec(**lengths) if lengths else None,
            duration_s=point.duration_s,
            warmup_s=point.warmup_s,
            seed=point.seed,
            protocol=point.protocol,
        )

    def _cross_check(self, points: list[Point]) -> None:
        """Replay the first stable open-loop whole-model point with perf_analyzer and with this
        generator, side by side (the report's cross-check section); write loadgen_crosscheck.json."""
        written = {int(record["index"]): record for record in read_points(self.out_dir)}
        steady = [
            point
            for index, point in enumerate(points)
            if point.variant == "whole"
            and written.get(index, {}).get("stable")
            and ArrivalSpec(**self._resolved(point)[0].arrival).is_open_loop
        ]
        if not steady:
            result = {"status": "skipped", "reason": "no stable open-loop point of a whole model in this run"}
        else:
            point, _ = self._resolved(steady[0])
            self._ensure(point)
            LOGGER.info("cross-checking the load generator with perf_analyzer on %s", point.point_id)
            result = {**cross_check(self.url, self.manifest, self._load_spec(point)), "point_id": point.point_id}
        write_json(self.out_dir / LOADGEN_CROSSCHECK_FILE, result)

    def _restarts(self, names: list[str]) -> int:
        """Supervisor restarts of ``names`` so far (0 against a server this runner did not start)."""
        supervisor = self.server.supervisor if self.server is not None else None
        return sum(supervisor.restarts(name) for name in names) if supervisor is not None else 0

    def _run_point(self, index: int, point: Point) -> tuple[dict, list]:
        """Measure one point; return its ``points.jsonl`` record and its request records."""

        started = time.monotonic()
        record: dict[str, Any] = {"index": index, "point": point.to_dict(), "started_utc": utc_now()}
        point, load = self._resolved(point)
        record["point"]["arrival_plan"] = record["point"]["arrival"]
        record["point"]["arrival"] = point.arrival
        names = self._ensure(point)
        reorch_name = names[-1] if point.variant == "reorch" else None
        sampler = _Sampler(self.client, names, self.metrics_url if reorch_name else None)
        restarts_before = self._restarts(names)
        with sampler, _console_quiet("loadtest.driver"):  # its warnings go to the log; the point line judges
            result = run_load(self.url, self.manifest, self._load_spec(point), workers=self.options.workers)
        restarted = self._restarts(names) - restarts_before
        if restarted:
            raise StagebatchError(
                f"the supervisor restarted {restarted} model(s) of this point while it ran (a Python stub "
                f"died); the point's figures would mix two servers; see {self.server.log_path}"
            )
        # server counters over the measured window: the last snapshot before it opened (warm-up excluded),
        # and one after the run, when every request of the window has been answered
        window_start_s = result.start_epoch_s + point.warmup_s
        before = sampler.at_or_before(window_start_s)
        after = sampler.final

        records = list(result.records)
        if not records:
            raise StagebatchError(
                f"the load generator returned no requests for the measured window "
                f"(warnings: {'; '.join(result.warnings) or 'none'})"
            )
        duration_s = float(result.duration_s) or point.duration_s
        summary = summarize(
            [r.latency_us for r in records], [r.ok for r in records], duration_s, point.slo_ms
        )
        deltas = diff_statistics(before.statistics, after.statistics)
        server: dict[str, Any] = {
            "models": {name: delta.to_dict() for name, delta in deltas.items()},
            "window_alignment_s": round(window_start_s - before.time_s, 3),
        }
        if point.variant == "whole":
            server["stages"] = stage_rows_from_triton(names, deltas)
        elif point.variant == "ensemble":
            server["stages"] = stage_rows_from_triton(names[:-1], deltas)
        if reorch_name:
            seen = [list((r.server or {}).get("batch_sizes") or []) for r in records if r.ok and r.server]
            reorch = diff_reorch_metrics(before.metrics or "", after.metrics or "", reorch_name)
            server["reorch"] = reorch.to_dict()
            server["stages"] = stage_rows_from_reorch(reorch_name, reorch, seen)
        late = int(result.late_arrivals)
        cpu = float(result.loadgen_cpu_percent)
        warnings = list(result.warnings)
        bottleneck = loadgen_bottleneck(cpu, late, summary.requests)
        late_p99_ms = percentile_us([int(getattr(r, "late_us", 0) or 0) for r in records], 99) / 1000.0
        first_error = next((r.error for r in records if not r.ok and r.error), None)
        verdict = assess(
            [r.to_dict() for r in records],
            int(round(window_start_s * 1e6)),
            duration_s,
            period_s=arrival_period_s(point.arrival),
            loadgen_cpu_percent=cpu,
            late_tolerance_us=result.spec.late_tolerance_us,
        )
        lost = self._server_lost()
        if lost:
            raise StagebatchError(f"the server failed during the point: {lost}")
        record.update(
            status="ok",
            error=None,
            duration_s=duration_s,
            offered_rps=round(verdict.offered_rps, 3),
            achieved_rps=round(verdict.achieved_rps, 3),
            stable=verdict.stable,
            unstable_reason=verdict.unstable_reason,
            subwindows=[sub.__dict__ for sub in verdict.subwindows],
            backlog_growth_per_s=round(verdict.backlog_growth_per_s, 3),
            stability={
                "keep_up_ratio": verdict.keep_up_ratio,
                "late_share": round(verdict.late_share, 4),
                "rate_kept": verdict.rate_kept,
            },
            repeat=point.repeat,
            repeats=point.repeats,
            comparison_key=point.comparison_key,
            load=load,
            client=summary.to_dict(),
            first_error=first_error,
            server=server,
            loadgen={
                "cpu_percent": cpu,
                "late_arrivals": late,
                "late_share": late / len(records),
                "late_p99_ms": late_p99_ms,
                "warnings": warnings,
                "bottleneck": bottleneck,
                "workers": self.options.workers,
            },
            wall_s=round(time.monotonic() - started, 2),
        )
        return record, records

    # ---- capacity ----
    def capacity_models(self, points: list[Point]) -> list[str]:
        """Models whose whole-model capacity the points need (those with relative rates), in plan order."""
        return list(dict.fromkeys(p.model for p in points if p.relative))

    def _capacity_labels(self, model: str) -> list[tuple[str, str | None]]:
        """(variant, policy) pairs to search for ``model``: ``whole`` first, then the plan's others."""
        wanted = [("whole", None)]
        for variant in self.plan.capacity.variants:
            if variant == "whole":
                continue
            if variant == "reorch":
                policies = [
                    policy
                    for experiment in self.plan.experiments
                    if model in experiment.models and "reorch" in experiment.variants
                    for policy in experiment.policy
                ] or [None]
                wanted += [("reorch", policy) for policy in dict.fromkeys(policies)]
            else:
                wanted.append((variant, None))
        available = self.manifest["models"][model].get("variants", {})
        return [(variant, policy) for variant, policy in wanted if variant in available]

    def _probe(self, model: str, variant: str, policy: str | None, rate_rps: float) -> capacity_search.Probe:
        """One capacity probe: a short open-loop load at ``rate_rps`` on the configuration as built."""

        spec = self.plan.capacity
        definition = self.plan.models[model]
        point = Point(
            point_id=f"capacity/{model}/{capacity_search.variant_label(variant, policy)}/{rate_rps:.1f}",
            experiment="capacity",
            model=model,
            variant=variant,
            load=f"capacity@rate_rps={rate_rps:.1f}",
            arrival={"kind": spec.arrival, "rate_rps": round(rate_rps, 3)},
            lengths=definition.lengths,
            batching={},
            slicing={},
            reorch={"policy": policy} if policy else {},
            duration_s=spec.duration_s,
            warmup_s=spec.warmup_s,
            slo_ms=definition.slo_ms or self.plan.defaults.slo_ms,
            seed=self.plan.defaults.seed,
        )
        self._ensure(point)
        try:
            with _console_quiet("loadtest.driver"):  # an overloaded probe is expected to warn
                result = run_load(self.url, self.manifest, self._load_spec(point), workers=self.options.workers)
        except StagebatchError as error:
            if self._server_lost():
                self._restart_server()
            return capacity_search.Probe(rate_rps, False, 0.0, None, f"load run failed: {error}")
        verdict = result.stability()
        ok = [r.latency_us for r in result.records if r.ok]
        tail_ms = percentile_us(ok, spec.percentile) / 1000.0 if ok else None
        # a generator that sent late but kept every sub-window's rate does not make the rate unsustained
        probe = capacity_search.Probe(
            rate_rps=rate_rps,
            stable=verdict.sustained,
            achieved_rps=verdict.achieved_rps,
            p99_ms=tail_ms,
            reason=verdict.unstable_reason,
            load_generator_limited=verdict.limited_by_load_generator and not verdict.sustained,
        )
        PROGRESS.info(
            "capacity %s %s: %.1f req/s -> %.1f achieved, p%g %s ms, %s",
            model,
            capacity_search.variant_label(variant, policy),
            rate_rps,
            probe.achieved_rps,
            spec.percentile,
            "-" if tail_ms is None else f"{tail_ms:.1f}",
            ("sustained" + (" (generator late, rate kept)" if probe.reason else ""))
            if probe.stable
            else f"not sustained ({(probe.reason or '').split(':')[0]})",
        )
        return probe

    def measure_capacity(self, models: list[str]) -> dict:
        """Search the capacity of each model's variants; write and return ``capacity.json``."""
        spec = self.plan.capacity
        settings = capacity_search.SearchSettings(
            start_rps=spec.start_rps, tolerance=spec.tolerance, max_probes=spec.max_probes
        )
        document = read_capacity(self.out_dir) or {"models": {}}
        document.update(
            {
                "arrival": spec.arrival,
                "probe_duration_s": spec.duration_s,
                "probe_warmup_s": spec.warmup_s,
                "tolerance": spec.tolerance,
                "max_probes": spec.max_probes,
                "server": self.options.url or "embedded tritonserver",
            }
        )
        for model in models:
            slo_ms = self.plan.models[model].slo_ms or self.plan.defaults.slo_ms
            for variant, policy in self._capacity_labels(model):
                label = capacity_search.variant_label(variant, policy)
                if label in document["models"].get(model, {}):
                    continue  # measured before this run was interrupted
                try:
                    result = capacity_search.search_capacity(
                        lambda rate, v=variant, p=policy, m=model: self._probe(m, v, p, rate),
                        slo_ms=slo_ms,
                        percentile=spec.percentile,
                        settings=settings,
                    )
                except StagebatchError as error:
                    LOGGER.warning("capacity search of %s %s failed: %s", model, label, error)
                    continue
                if result.limited_by == capacity_search.LIMITED_BY_LOADGEN:
                    LOGGER.warning(
                        "capacity of %s %s: the load generator fell behind at %s req/s; %s req/s is a lower "
                        "bound of the server's capacity, not the capacity (use more --workers)",
                        model,
                        label,
                        f"{capacity_search.bracket(result.probes)[1].rate_rps:.0f}",
                        f"{result.sustained_rps or 0:.0f}",
                    )
                PROGRESS.info(
                    "capacity %s %s: sustained %s req/s, within the %g ms SLO up to %s req/s (limited by %s)",
                    model,
                    label,
                    "-" if result.sustained_rps is None else f"{result.sustained_rps:.1f}",
                    slo_ms,
                    "-" if result.slo_rps is None else f"{result.slo_rps:.1f}",
                    result.limited_by,
                )
                document["models"].setdefault(model, {})[label] = result.to_dict()
                write_json(self.out_dir / CAPACITY_FILE, document)
        write_json(self.out_dir / CAPACITY_FILE, document)
        return document

    def _prepare_capacity(self, points: list[Point]) -> None:
        """Take or measure the capacity the relative rates need (nothing when every rate is absolute)."""
        needed = self.capacity_models(points)
        if self.options.capacity_file is not None:
            self.capacity = json.loads(Path(self.options.capacity_file).read_text())
            write_json(self.out_dir / CAPACITY_FILE, self.capacity)
        elif needed:
            self.capacity = self.measure_capacity(needed)
        else:
            self.capacity = read_capacity(self.out_dir)

    def check_capacity_source(self, points: list[Point]) -> None:
        """Refuse relative rates up front when no capacity can be had."""
        needed = self.capacity_models(points)
        if needed and self.options.capacity_file is None and not self.plan.capacity.enabled:
            raise ConfigValidationError(
                f"{self.plan.source}: points of {', '.join(needed)} use rates relative to the measured "
                "capacity (e.g. 0.85x), but the plan disables the capacity search (capacity.enabled: false) "
                "and no --capacity FILE was given; enable it, pass --capacity, or give rates in req/s"
            )

    def run_capacity(self, models: list[str] | None = None) -> dict:
        """Only the capacity search (``stagebatch capacity``): build or read the models, search, write."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        models = models or list(self.plan.models)
        unknown = [m for m in models if m not in self.plan.models]
        if unknown:
            raise ConfigValidationError(
                f"--model {', '.join(unknown)}: not in the plan's models ({', '.join(self.plan.models)})"
            )
        with _log_file(self.out_dir / LOG_FILE):
            if self.options.url is None or self.plan.repository.build:
                self._prepare_repository()
            else:
                self._read_manifest()
            self._start_server()
            try:
                return self.measure_capacity(models)
            finally:
                self._stop_server()

    # ---- the whole plan ----
    def _begin(self, points: list[Point]) -> set[int]:
        """Start or resume the run files; return the indices of points already complete."""
        if not self.options.resume:
            start_run_files(self.out_dir)
            return set()
        written = discard_incomplete(self.out_dir)
        ids = {p.point_id: i for i, p in enumerate(points)}
        kept = [
            p
            for p in written
            if p.get("status") == "ok" and ids.get(p["point"]["point_id"]) == int(p["index"])
        ]  # failed points, and points the plan no longer has at that index, run again
        rerun = {int(p["index"]) for p in written} - {int(p["index"]) for p in kept}
        write_points(self.out_dir, kept)
        drop_requests(self.out_dir, rerun)
        done = {int(p["index"]) for p in kept}
        LOGGER.info("resuming %s: %d of %d points complete", self.out_dir, len(done), len(points))
        return done

    def _failed_record(self, index: int, point: Point, error: BaseException) -> dict:
        return {
            "index": index,
            "point": point.to_dict(),
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "started_utc": utc_now(),
            "repeat": point.repeat,
            "repeats": point.repeats,
            "comparison_key": point.comparison_key,
            "stable": False,
            "unstable_reason": f"failed: {error}",
        }

    def run(self) -> Path:
        """Run every point; write the raw data; return the run directory (report written by the caller).

        Ctrl-C discards the current point, keeps the complete ones and sets ``interrupted``.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plan_text = Path(self.plan.source).read_text() if Path(self.plan.source).is_file() else ""
        if self.options.url and any(p.slicing for p in self.plan.points()):
            raise ConfigValidationError(
                "slicing sweeps rebuild models on this machine and cannot reach a "
                f"server at {self.options.url}; drop the slicing knobs or run without --url"
            )
        points = self.plan.points()
        self.check_capacity_source(points)
        with _log_file(self.out_dir / LOG_FILE):
            if self.options.url is None or self.plan.repository.build:
                self._prepare_repository()
            else:
                self._read_manifest()
            check_against_models(self.plan, self.model_limits())
            env_path = self.out_dir / ENVIRONMENT_FILE
            if self.options.resume and env_path.is_file():
                environment = read_environment(self.out_dir)
                environment.setdefault("resumed_utc", []).append(utc_now())
            else:
                environment = collect_environment(
                    self.plan,
                    plan_text,
                    server=self.options.url or "embedded tritonserver",
                    repository=self.repository,
                )
                environment["replicas"] = replica_count(self.options.url)
            write_json(env_path, environment)
            try:
                done = self._begin(points)
                self._start_server()
                self._prepare_capacity(points)
                with _progress(self.options.progress, points, done) as progress:
                    for index, point in enumerate(points):
                        if index in done:
                            continue
                        progress.start(point)
                        requests: list = []
                        try:
                            if self._server_lost():
                                self._restart_server()
                            record, requests = self._run_point(index, point)
                        except (StagebatchError, OSError, RuntimeError, ValueError) as error:
                            LOGGER.warning("point %s failed: %s", point.point_id, error)
                            record = self._failed_record(index, point, error)
                            requests = []
                            if self._server_lost():
                                try:
                                    self._restart_server()
                                except StagebatchError as restart_error:
                                    append_point(self.out_dir, record, requests)
                                    raise restart_error from error
                        append_point(self.out_dir, record, requests)
                        progress.finish(point, record)
                if self.options.crosscheck:
                    self._cross_check(points)
            except KeyboardInterrupt:
                self.interrupted = True
                LOGGER.warning("interrupted: the current point is discarded; complete points are kept")
            finally:
                self._stop_server()
                environment["finished_utc"] = utc_now()
                environment["interrupted"] = self.interrupted
                write_json(env_path, environment)
        return self.out_dir


def server_targets(url: str) -> list[str]:
    """The ``host:port`` targets of a server address (contract 3): a comma-separated list, or
    ``dns:///host:port`` (one target, as named)."""
    targets = [part.strip() for part in url.split(",") if part.strip()]
    return [t[len("dns:///"):] if t.startswith("dns:///") else t for t in targets] or [url]


def replica_count(url: str | None) -> int:
    """How many servers a ``--url`` names: a comma-separated list counts each; one target (or none) is 1.

    A ``dns:///host:port`` target counts as 1 here (its addresses are resolved by gRPC, not listed).
    """
    if not url:
        return 1
    return max(1, len([part for part in url.split(",") if part.strip()]))


class _log_file:
    """Send every log record (INFO and up, the exporter's and onnxruntime's included) to the run's log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler: logging.Handler | None = None

    def __enter__(self) -> _log_file:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, mode="a")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(self.handler)
        self._level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._level)
        self.handler.close()


class ConsoleFilter(logging.Filter):
    """What the console shows: warnings and errors, plus the one-line-per-point progress records."""

    def __init__(self) -> None:
        super().__init__()
        self.muted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging hook
        if record.name == PROGRESS.name:
            return True
        if any(record.name == name or record.name.startswith(name + ".") for name in self.muted):
            return False
        return record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """Progress lines as they are; everything else prefixed with its level ("warning: ...")."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102 - logging hook
        message = record.getMessage()
        if record.name == PROGRESS.name:
            return message
        return f"{record.levelname.lower()}: {message}"


def console_handler() -> logging.Handler:
    """A stderr handler for the CLI: warnings and the progress lines only (see :class:`ConsoleFilter`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter())
    handler.addFilter(ConsoleFilter())
    return handler


class console_logging:
    """For the CLI: the root logger at INFO with only :func:`console_handler`; restored on exit."""

    def __enter__(self) -> console_logging:
        root = logging.getLogger()
        self._saved = (root.handlers[:], root.level)
        root.handlers = [console_handler()]
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: object) -> None:
        root = logging.getLogger()
        root.handlers, level = self._saved
        root.setLevel(level)


class _console_quiet:
    """Keep the named loggers off the console (their records still reach the log file)."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def _filters(self) -> list[ConsoleFilter]:
        return [
            f
            for handler in logging.getLogger().handlers
            for f in handler.filters
            if isinstance(f, ConsoleFilter)
        ]

    def __enter__(self) -> _console_quiet:
        for f in self._filters():
            f.muted.update(self.names)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for f in self._filters():
            f.muted.difference_update(self.names)


@dataclass
class _Snapshot:
    time_s: float  # wall clock (epoch seconds) when taken
    statistics: dict
    metrics: str | None


class _Sampler:
    """Snapshots Triton statistics (and metrics) every ``interval_s`` while a load runs, in a thread.

    ``run_load`` warms up and measures in one child process, so the window's start is known only
    afterwards; the snapshot just before it gives the counters at the window's start.
    """

    interval_s = 0.05  # a statistics call takes ~1 ms; at 50 ms the window is off by a request or two

    def __init__(self, client, names: list[str], metrics_url: str | None) -> None:
        import threading

        self.client, self.names, self.metrics_url = client, names, metrics_url
        self.snapshots: list[_Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stats-sampler", daemon=True)
        self.final: _Snapshot | None = None

    def take(self) -> _Snapshot:
        now = time.time()
        metrics = scrape_metrics(self.metrics_url) if self.metrics_url else None
        return _Snapshot(now, snapshot_statistics(self.client, self.names), metrics)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshots.append(self.take())
            except Exception as error:  # noqa: BLE001 - a missed sample only widens the alignment
                LOGGER.debug("statistics sample failed: %s", error)

    def __enter__(self) -> _Sampler:
        self.snapshots.append(self.take())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_info[0] is None:
            self.final = self.take()

    def at_or_before(self, time_s: float) -> _Snapshot:
        """The latest snapshot taken no later than ``time_s`` (the first one if none was)."""
        earlier = [s for s in self.snapshots if s.time_s <= time_s]
        return earlier[-1] if earlier else self.snapshots[0]


def point_line(position: int, total: int, record: dict) -> str:
    """The console's one line for a finished point."""
    point = record["point"]
    head = f"[{position}/{total}] {point['point_id']}"
    if record.get("status") != "ok":
        return f"{head}: FAILED: {record.get('error')}"
    load = record.get("load") or {}
    multiple = f" ({load['multiple']:g}x)" if load.get("multiple") else ""
    client = record.get("client") or {}
    p99 = client.get("p99_ms")
    verdict = "stable" if record.get("stable") else f"UNSTABLE ({(record.get('unstable_reason') or '').split(':')[0]})"
    return (
        f"{head}: {record.get('offered_rps', 0):.1f} req/s offered{multiple}, "
        f"{record.get('achieved_rps', 0):.1f} achieved, p99 {'-' if p99 is None else f'{p99:.1f}'} ms, {verdict}"
    )


class _progress:
    """A rich progress bar over points (time-weighted) with one line per point; plain lines without a tty."""

    def __init__(self, enabled: bool, points: list[Point], done: set[int] | None = None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.points = points
        self.done = set(done or ())
        self.progress = None
        self.task = None
        self.finished = len(self.done)

    def _weight(self, point: Point) -> float:
        return point.duration_s + point.warmup_s

    def __enter__(self) -> _progress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.logging import RichHandler
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # console log lines go through the bar's console, above the bar, instead of breaking it
        console = Console(stderr=True)
        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        rich_handler = RichHandler(console=console, show_time=False, show_path=False, show_level=False)
        rich_handler.addFilter(ConsoleFilter())
        rich_handler.setFormatter(_ConsoleFormatter())
        root.handlers = [h for h in self._saved_handlers if isinstance(h, logging.FileHandler)] + [rich_handler]
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s of load"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
        )
        total = sum(self._weight(p) for p in self.points)
        self.task = self.progress.add_task("characterize", total=total)
        self.progress.advance(self.task, sum(self._weight(p) for i, p in enumerate(self.points) if i in self.done))
        self.progress.start()
        return self

    def start(self, point: Point) -> None:
        """A point begins."""
        LOGGER.info("point %s", point.point_id)
        if self.progress is not None:
            self.progress.update(self.task, description=f"point {self.finished + 1}/{len(self.points)}")

    def finish(self, point: Point, record: dict) -> None:
        """A point is written: its one console line."""
        self.finished += 1
        PROGRESS.info("%s", point_line(self.finished, len(self.points), record))
        if self.progress is not None:
            self.progress.advance(self.task, self._weight(point))

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            logging.getLogger().handlers = self._saved_handlers


def characterize(plan: Plan, options: RunOptions) -> Path:
    """Run ``plan`` and write its raw data and report into ``options.out_dir``.

    Ctrl-C: the current point is discarded, the report is written from the complete points, the
    resume command is logged, and KeyboardInterrupt is raised again.
    """
    run = Characterization(plan, options)
    run_dir = run.run()
    if read_points(run_dir):
        write_report(run_dir)
    if run.interrupted:
        LOGGER.warning("resume with: stagebatch characterize --resume %s", run_dir)
        raise KeyboardInterrupt
    return run_dir


def run_summary(run_dir: str | Path) -> list[str]:
    """A few lines on a finished run: stable share, capacity per model, each whole curve's coverage.

    For each model's whole variant: is there a stable point meeting its SLO for at least 99% of
    requests, and a point at or past capacity (saturated, i.e. unstable for a server reason, or at
    >= 1x of a server-limited capacity)?
    """
    points = [p for p in read_points(run_dir) if p.get("status") == "ok"]
    failed = len(read_points(run_dir)) - len(points)
    stable = sum(1 for p in points if p.get("stable"))
    lines = [
        f"{len(points)} points measured ({failed} failed): {stable} stable "
        f"({stable / len(points):.0%})" if points else f"no point measured ({failed} failed)"
    ]
    capacity = read_capacity(run_dir) or {"models": {}}
    for model, labels in capacity["models"].items():
        for label, entry in labels.items():
            lines.append(
                f"capacity {model} {label}: sustained {entry.get('sustained_rps')} req/s, at the SLO "
                f"{entry.get('slo_rps')} req/s, limited by {entry.get('limited_by')}"
            )
    for model in dict.fromkeys(p["point"]["model"] for p in points):
        whole = [p for p in points if p["point"]["model"] == model and p["point"]["variant"] == "whole"]
        if not whole:
            continue
        good = any(
            p.get("stable") and (p.get("client") or {}).get("slo_attainment", 0) >= 0.99 for p in whole
        )
        server_limited = (capacity["models"].get(model, {}).get("whole") or {}).get("limited_by") == "server"
        saturated = [
            p
            for p in whole
            if not p.get("stable") and (p.get("unstable_reason") or "").split(":")[0] not in LOADGEN_REASONS
        ]
        past = bool(saturated) or any(
            server_limited and ((p.get("load") or {}).get("multiple") or 0) >= 1.0 for p in whole
        )
        lines.append(
            f"{model} whole: stable point with SLO attainment >= 99%: {'yes' if good else 'no'}; "
            f"point at or past capacity: {'yes' if past else 'no'}"
        )
    return lines


def resume_plan(run_dir: str | Path) -> Plan:
    """The plan a run was started with, from its ``environment.json`` (for ``--resume``)."""
    environment = read_environment(run_dir)
    text = environment.get("plan_text")
    if not text:
        raise ConfigValidationError(
            f"{Path(run_dir) / ENVIRONMENT_FILE}: has no plan_text; this run cannot be resumed"
        )
    return parse_plan(text, environment.get("plan_source") or "<plan>")
