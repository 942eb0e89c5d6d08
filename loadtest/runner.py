"""The characterization runner: build, (re)load, warm up, measure and record every point of a plan.

For each point of :meth:`loadtest.plan.Plan.points` (ordered so that rebuilds and reloads are
fewest) the runner

1. rebuilds the model when the point's slicing (K, cut balance) differs from what is built
   (``slicing.repository``, the ``stagebatch build`` code), then reloads its models;
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

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.environment import collect_environment, utc_now
from loadtest.plan import ModelLimits, Plan, Point, check_against_models, knob_parameter
from loadtest.rundir import (  # noqa: F401 - re-exported for older callers
    ENVIRONMENT_FILE,
    POINTS_FILE,
    REQUEST_COLUMNS,
    REQUESTS_FILE,
    append_point,
    dumps,
    read_requests,
    request_row,
    start_run_files,
)
from stagebatch.errors import ConfigValidationError, ServerStartError, SliceError, StagebatchError

LOGGER = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# A load generator busier than this (percent of one core) may be what limits a point.
LOADGEN_BUSY_PERCENT = 85.0
# Share of arrivals sent late above which the open-loop schedule was not kept (a few late ones are
# normal when the generator shares the cores with the server).
LATE_ARRIVALS_SHARE = 0.05
ADMIN_KEY_ENV = "STAGEBATCH_ADMIN_KEY"


# ---------------------------------------------------------------- configurations (pure)


def variant_models(entry: dict, variant: str) -> list[str]:
    """Triton model names a variant uses, in load order (dependencies first, entry model last)."""
    variants = entry.get("variants", {})
    if variant not in variants:
        raise ConfigValidationError(
            f"the manifest has no {variant!r} variant for this model (it has {', '.join(variants)})"
        )
    if variant == "ensemble":
        return [stage["model_name"] for stage in entry.get("stages", [])] + [variants["ensemble"]]
    return [variants[variant]]


def apply_batching(config: dict, batching: dict) -> dict:
    """A copy of a Triton model config (dict form) with the point's request-batching knobs."""
    config = copy.deepcopy(config)
    if "max_batch_size" in batching:
        config["max_batch_size"] = int(batching["max_batch_size"])
    dynamic = config.get("dynamic_batching")
    if any(key in batching for key in ("max_queue_delay_us", "preferred_batch_sizes")):
        dynamic = config.setdefault("dynamic_batching", {})
    if "max_queue_delay_us" in batching:
        dynamic["max_queue_delay_microseconds"] = int(batching["max_queue_delay_us"])
    if "preferred_batch_sizes" in batching:
        if batching["preferred_batch_sizes"]:
            dynamic["preferred_batch_size"] = [int(v) for v in batching["preferred_batch_sizes"]]
        else:
            dynamic.pop("preferred_batch_size", None)
    if "instance_count" in batching:
        groups = config.get("instance_group") or [{"kind": "KIND_CPU"}]
        config["instance_group"] = [{**groups[0], "count": int(batching["instance_count"])}]
    return config


def apply_reorch(config: dict, reorch: dict, batching: dict) -> dict:
    """A copy of the reorch model's config with the point's policy and knobs as string parameters."""
    config = copy.deepcopy(config)
    parameters = config.setdefault("parameters", {})
    if "max_batch_size" in batching:
        # the reorchestrator never forms a stage batch above what its dynamic batcher may hand it
        parameters["max_batch_rows"] = {"string_value": str(int(batching["max_batch_size"]))}
    if reorch.get("policy"):
        parameters["policy"] = {"string_value": str(reorch["policy"])}
    for key, value in (reorch.get("knobs") or {}).items():
        parameters[key] = {"string_value": knob_parameter(value)}
    return config


def point_configs(point: Point, entry: dict, base_configs: dict[str, dict]) -> dict[str, dict]:
    """The config every model of the point's variant must be loaded with (model name -> config)."""
    names = variant_models(entry, point.variant)
    configs = {}
    for name in names:
        config = base_configs[name]
        if point.variant == "ensemble" and name == names[-1]:
            # the ensemble itself has no batcher; its max batch size must not exceed its stages'
            if "max_batch_size" in point.batching:
                config = {**copy.deepcopy(config), "max_batch_size": int(point.batching["max_batch_size"])}
            configs[name] = config
            continue
        config = apply_batching(config, point.batching)
        if point.variant == "reorch":
            config = apply_reorch(config, point.reorch, point.batching)
        configs[name] = config
    return configs


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

    # ---- repository ----
    def _read_manifest(self) -> dict:
        path = self.repository / MANIFEST_FILE
        if not path.is_file():
            raise ConfigValidationError(
                f"{path}: missing; build the models first (stagebatch build ...) or set repository.build: true"
            )
        self.manifest = json.loads(path.read_text())
        return self.manifest

    def _build(self, model: str, stages: int, balance: str) -> None:
        from slicing.repository import BuildOptions, build_repository  # export, slice, verify, write

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
            manifest_path = self.repository / MANIFEST_FILE
            existing = (
                json.loads(manifest_path.read_text()).get("models", {}) if manifest_path.is_file() else {}
            )
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
        try:
            from slicing.slicer import max_stages
        except ImportError:
            return None
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
                from stagebatch.server import ADMIN_HEADER, GRPC_HEADER_PREFIX

                headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: os.environ[ADMIN_KEY_ENV]}
            self.admin_headers = headers or {}
            self.metrics_url = self.options.metrics_url
        else:
            from stagebatch.server import EmbeddedTriton

            self.server = EmbeddedTriton(
                self.repository, models=[], log_path=self.out_dir / "tritonserver.log"
            )
            self.server.start()
            url = self.server.grpc_url
            self.admin_headers = self.server.admin_headers
            self.metrics_url = self.server.metrics_url
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        return url

    def _stop_server(self) -> None:
        if self.client is not None and self.server is None:
            self._restore_remote_models()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None

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
                from stagebatch.model_config import read_model_config

                config = read_model_config(path)
            else:  # a remote server's repository: take the config it serves
                self._load(name, None)
                config = self.client.get_model_config(name, as_json=True)["config"]
            self.state.base_configs[name] = config
        return self.state.base_configs[name]

    def _load(self, name: str, config: dict | None) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            if config is None:
                self.client.load_model(name, headers=self.admin_headers)
            else:
                self.client.load_model(name, config=json.dumps(config), headers=self.admin_headers)
        except InferenceServerException as error:
            raise ServerStartError(f"model {name!r} failed to load: {error.message()}") from None
        self.state.loaded[name] = json.dumps(config, sort_keys=True) if config is not None else ""

    def _unload_model_family(self, model: str) -> None:
        for name in list(self.state.loaded):
            if name == model or name.startswith(f"{model}_"):
                try:
                    self.client.unload_model(name, headers=self.admin_headers)
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
    def _load_spec(self, point: Point):
        from loadtest.driver import LoadSpec
        from loadtest.workloads import ArrivalSpec, LengthSpec

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
        )

    def _run_point(self, index: int, point: Point) -> tuple[dict, list]:
        """Measure one point; return its ``points.jsonl`` record and its request records."""
        from loadtest.driver import run_load
        from loadtest.server_stats import diff_reorch_metrics, diff_statistics
        from loadtest.stats import percentile_us, summarize

        started = time.monotonic()
        record: dict[str, Any] = {"index": index, "point": point.to_dict(), "started_utc": utc_now()}
        names = self._ensure(point)
        reorch_name = names[-1] if point.variant == "reorch" else None
        sampler = _Sampler(self.client, names, self.metrics_url if reorch_name else None)
        with sampler:
            result = run_load(self.url, self.manifest, self._load_spec(point), workers=self.options.workers)
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
        record.update(
            status="ok",
            error=None,
            duration_s=duration_s,
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

    # ---- the whole plan ----
    def run(self) -> Path:
        """Run every point; write the raw data; return the run directory (report written by the caller)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plan_text = Path(self.plan.source).read_text() if Path(self.plan.source).is_file() else ""
        if self.options.url and any(p.slicing for p in self.plan.points()):
            raise ConfigValidationError(
                "slicing sweeps rebuild models on this machine and cannot reach a "
                f"server at {self.options.url}; drop the slicing knobs or run without --url"
            )
        points = self.plan.points()
        if self.options.url is None or self.plan.repository.build:
            self._prepare_repository()
        else:
            self._read_manifest()
        check_against_models(self.plan, self.model_limits())
        server_label = self.options.url or "embedded tritonserver"
        environment = collect_environment(
            self.plan, plan_text, server=server_label, repository=self.repository
        )
        env_path = self.out_dir / ENVIRONMENT_FILE
        env_path.write_text(dumps(environment))
        self._start_server()
        try:
            start_run_files(self.out_dir)
            with _progress(self.options.progress, points) as advance:
                for index, point in enumerate(points):
                    advance(point)
                    requests: list = []
                    try:
                        record, requests = self._run_point(index, point)
                    except (StagebatchError, OSError, RuntimeError, ValueError) as error:
                        LOGGER.warning("point %s failed: %s", point.point_id, error)
                        record = {
                            "index": index,
                            "point": point.to_dict(),
                            "status": "failed",
                            "error": f"{type(error).__name__}: {error}",
                            "started_utc": utc_now(),
                        }
                    append_point(self.out_dir, record, requests)
        finally:
            self._stop_server()
            environment["finished_utc"] = utc_now()
            env_path.write_text(dumps(environment))
        return self.out_dir


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
        from loadtest.server_stats import scrape_metrics, snapshot_statistics

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


class _progress:
    """A rich progress bar over points (time-weighted), or nothing when disabled."""

    def __init__(self, enabled: bool, points: list[Point]) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.points = points
        self.progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda point: LOGGER.info("point %s", point.point_id)
        from rich.console import Console
        from rich.logging import RichHandler
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # log lines go through the bar's console, above the bar, instead of breaking it
        console = Console(stderr=True)
        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        root.handlers = [RichHandler(console=console, show_time=False, show_path=False)]
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s of load"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
        )
        total = sum(p.duration_s + p.warmup_s for p in self.points)
        task = self.progress.add_task("characterize", total=total)
        self.progress.start()
        last: list[Point] = []

        def advance(point: Point) -> None:
            if last:
                self.progress.advance(task, last[-1].duration_s + last[-1].warmup_s)
            last.append(point)
            self.progress.update(task, description=f"point {len(last)}/{len(self.points)}")
            self.progress.console.print(
                f"point {len(last)}/{len(self.points)}: {point.point_id}", highlight=False
            )

        self._finish = lambda: last and self.progress.advance(task, last[-1].duration_s + last[-1].warmup_s)
        return advance

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self._finish()
            self.progress.stop()
            logging.getLogger().handlers = self._saved_handlers


def characterize(plan: Plan, options: RunOptions) -> Path:
    """Run ``plan`` and write its raw data and report into ``options.out_dir``."""
    from loadtest.report import write_report

    run_dir = Characterization(plan, options).run()
    write_report(run_dir)
    return run_dir
