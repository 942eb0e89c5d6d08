"""Confirm simulated winners on the real embedded server, and write them as ready repositories.

One ``EmbeddedTriton`` serves the built repository; each configuration is loaded through the
repository API with its own ``config.pbtxt`` (``loadtest.characterization.point_configs``: the same code that
applies a plan point's batching and reorch knobs), and its rate within the SLO is searched with the
capacity search (``loadtest.capacity.search_capacity``), a probe passing when the server kept up
(``loadtest.stability.assess``: stable, or unstable only because the load generator sent late or was
busy, which on a shared 2-core machine says nothing of the server) and its p99 is within the SLO. Repeats run in rounds (every
configuration once per round), so slow drift of a shared machine hits all of them alike.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.capacity import CapacityResult, Probe, SearchSettings, search_capacity
from loadtest.driver import LoadSpec, run_load
from loadtest.plan import Point
from loadtest.characterization import point_configs, variant_models
from loadtest.stats import percentile_us
from loadtest.workloads import ArrivalSpec
from slicing.manifest import write_manifest
from core.errors import ServerStartError, StagebatchError
from core.model_config import read_model_config, write_model_config
from core.server import EmbeddedTriton
from tuning.simulate import VariantConfig, Workload

FIRST_GROWTH = 1.5  # a configuration's first search brackets upwards by this factor per passing probe
REFINE_GROWTH = 1.15  # a later search starts just below the earlier mean and steps by this (see tuning.tune)

# Two-sided 95% Student-t quantiles by degrees of freedom (1..10); beyond that the normal 1.96 is close.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% confidence interval (None with fewer than 2 values)."""
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def tune_point(model: str, config: VariantConfig, workload: Workload) -> Point:
    """A plan point standing for one tuned configuration (what ``point_configs`` applies)."""
    reorch: dict[str, Any] = {}
    if config.variant == "reorch":
        reorch = {"policy": config.policy or "dva", "knobs": dict(config.knobs)}
    return Point(point_id=f"tune/{model}/{config.label}", experiment="tune", model=model, variant=config.variant,
                 load="capacity", arrival=workload.arrival.to_dict(),
                 lengths=workload.lengths.to_dict() if workload.lengths else None,
                 batching=config.batcher.to_batching(), slicing={}, reorch=reorch, duration_s=workload.duration_s,
                 warmup_s=workload.warmup_s, slo_ms=workload.slo_ms, seed=workload.seed)


def candidate_configs(repository: Path, manifest: dict[str, Any], model: str, config: VariantConfig,
                      workload: Workload) -> dict[str, dict]:
    """Model name -> the ``config.pbtxt`` (dict form) this configuration serves them with."""
    entry = manifest["models"][model]
    point = tune_point(model, config, workload)
    names = variant_models(entry, config.variant)
    base = {name: read_model_config(repository / name / "config.pbtxt") for name in names}
    return point_configs(point, entry, base)


def write_ready_repository(repository: Path, manifest: dict[str, Any], model: str, config: VariantConfig,
                           workload: Workload, out: Path, facts: dict[str, Any]) -> Path:
    """A self-contained repository serving ``config`` (files hard-linked where possible) plus ``tuned.json``."""
    entry = manifest["models"][model]
    configs = candidate_configs(repository, manifest, model, config, workload)
    needed = list(configs)
    if config.variant == "reorch":  # the reorchestrator reads the stage ONNX files from the repository root
        needed += [stage["model_name"] for stage in entry.get("stages", [])]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in dict.fromkeys(needed):
        shutil.copytree(repository / name, out / name, copy_function=_link_or_copy)
    for name, model_config in configs.items():
        (out / name / "config.pbtxt").unlink()  # a hard link: replace, never write through it
        write_model_config(out / name, model_config)
    write_manifest(out, {**{k: v for k, v in manifest.items() if k != "models"}, "models": {model: entry}})
    (out / "tuned.json").write_text(json.dumps({"model": model, "configuration": config.describe(), **facts},
                                               indent=2) + "\n")
    return out


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


class Confirmer:
    """Measures configurations of one model on one embedded server (a context manager)."""

    def __init__(self, repository: Path, manifest: dict[str, Any], model: str, workload: Workload, *,
                 log_path: Path, probe_s: float = 6.0, warmup_s: float = 2.0, tolerance: float = 0.08,
                 max_probes: int = 6, say: Callable[[str], None] = lambda _: None) -> None:
        self.repository, self.manifest, self.model, self.workload = Path(repository), manifest, model, workload
        self.log_path, self.probe_s, self.warmup_s = log_path, probe_s, warmup_s
        self.tolerance, self.max_probes, self.say = tolerance, max_probes, say
        self.server: EmbeddedTriton | None = None
        self.loaded: dict[str, str] = {}

    def __enter__(self) -> Confirmer:  # noqa: PYI034 - the project's context managers name their class
        import tritonclient.grpc as grpcclient

        self.server = EmbeddedTriton(self.repository, models=[], log_path=self.log_path)
        self.server.start()
        self.client = grpcclient.InferenceServerClient(self.server.grpc_url)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _load(self, config: VariantConfig) -> None:
        from tritonclient.utils import InferenceServerException

        configs = candidate_configs(self.repository, self.manifest, self.model, config, self.workload)
        for name in [n for n in self.loaded if n not in configs]:
            self.client.unload_model(name, headers=self.server.admin_headers)
            del self.loaded[name]
        for name, model_config in configs.items():
            text = json.dumps(model_config, sort_keys=True)
            if self.loaded.get(name) == text:
                continue
            try:
                self.client.load_model(name, config=json.dumps(model_config), headers=self.server.admin_headers)
            except InferenceServerException as error:
                raise ServerStartError(f"model {name!r} failed to load: {error.message()}") from None
            self.loaded[name] = text

    def _probe(self, config: VariantConfig, rate_rps: float, seed: int) -> Probe:
        arrival = ArrivalSpec(**{**self.workload.arrival.to_dict(), "rate_rps": float(rate_rps)})
        spec = LoadSpec(model=self.model, variant=config.variant, arrival=arrival, lengths=self.workload.lengths,
                        duration_s=self.probe_s, warmup_s=self.warmup_s, seed=seed)
        try:
            result = run_load(self.server.grpc_url, self.manifest, spec)
        except StagebatchError as error:
            return Probe(rate_rps, False, 0.0, None, f"load run failed: {error}")
        verdict = result.stability()
        ok = [r.latency_us for r in result.records if r.ok]
        p99 = percentile_us(ok, 99) / 1000.0 if ok else None
        within = p99 is not None and p99 <= self.workload.slo_ms
        # The server kept up when the only complaint is the load generator's (it sent late, or was busy):
        # assess checks keep-up and backlog first, so those held. The answers met the SLO or not all the same.
        kept_up = verdict.stable or verdict.limited_by_load_generator
        passed = kept_up and within
        reason = (None if passed else
                  verdict.unstable_reason if not kept_up else f"p99 {p99} ms above the SLO {self.workload.slo_ms} ms")
        note = "" if verdict.stable or not passed else f" (load generator: {verdict.unstable_reason.split(':')[0]})"
        self.say(f"    {rate_rps:7.1f} req/s -> achieved {verdict.achieved_rps:.1f}, p99 "
                 f"{'-' if p99 is None else f'{p99:.1f}'} ms: {'pass' + note if passed else reason}")
        return Probe(rate_rps, passed, verdict.achieved_rps, p99, reason)

    def rate_within_slo(self, config: VariantConfig, start_rps: float, seed: int,
                        growth: float = FIRST_GROWTH) -> CapacityResult:
        """The highest rate this configuration sustains with p99 within the SLO (one capacity search from
        ``start_rps``, multiplying the rate by ``growth`` while probes pass)."""
        self._load(config)
        settings = SearchSettings(start_rps=max(1.0, start_rps), growth=growth, tolerance=self.tolerance,
                                  max_probes=self.max_probes)
        return search_capacity(lambda rate: self._probe(config, rate, seed), slo_ms=self.workload.slo_ms,
                               percentile=99, settings=settings)
