"""Model supervision: notice a dead Python stub or a failed health probe, reload the model, count restarts.

Triton 2.51 never restarts a Python-backend stub that died (``kill -9``, the kernel's OOM killer, a
crash inside onnxruntime). What it does instead, measured on the tiny bert_base repository
(docs/gpu.md, "Supervision"):

* the stub process disappears at once, but ``/v2/models/NAME/ready`` and ``/v2/health/ready`` keep
  answering 200 and nothing is logged at the default verbosity;
* each batch the dead instance is given fails after about 1 s with "Stub process 'NAME_0_0' is not
  healthy", so the requests queued in front of it drain at one batch per second; a queue timeout
  (``stagebatch build --default-timeout-us``) rejects the rest at once;
* only an unload + load through the repository API brings the model back (about 3 s for the tiny
  models); the ensemble over a reloaded stage serves again without being reloaded itself.

So a :class:`ModelSupervisor` watches the stub processes of the server (when it can see them: same
machine, or a shared PID namespace in compose) as well as the per-model health probe and the
repository index, and reloads a failed model with the configuration it was serving (a runner's
config override survives the restart). The decisions (:class:`SupervisionLogic`) are pure and
take the time as an argument; the I/O lives in :class:`ModelSupervisor`.

Examples of use::

    supervisor = ModelSupervisor("127.0.0.1:8001", admin_headers=server.admin_headers, server_pid=pid)
    supervisor.start()   # a daemon thread; supervisor.stop() ends it
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, start_http_server

from core.errors import BadParameterError

LOGGER = logging.getLogger(__name__)

RESTARTS_METRIC = "stagebatch_model_restarts_total"
STUB_BINARY = "triton_python_backend_stub"
SERVER_BINARY = "tritonserver"
# argv of a 2.51 stub: binary, model.py path, shm region, shm sizes, parent pid, backend dir, ipc size, instance name, mode
_STUB_INSTANCE_ARG = 8
READY_STATE = "READY"
UNLOADED_REASON = "unloaded"
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SupervisorPolicy:
    """When to act.

    Args:
        poll_interval_s: time between two looks at the server.
        confirm_polls: consecutive bad looks before a model counts as failed (1 look can race a reload).
        max_restarts: restarts allowed within ``crash_window_s``; one more failure leaves the model unloaded.
        crash_window_s: the crash-loop window.
    """

    poll_interval_s: float = 0.5
    confirm_polls: int = 2
    max_restarts: int = 3
    crash_window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise BadParameterError(f"supervisor poll_interval_s={self.poll_interval_s}: must be > 0")
        if self.confirm_polls < 1:
            raise BadParameterError(f"supervisor confirm_polls={self.confirm_polls}: must be >= 1")
        if self.max_restarts < 0:
            raise BadParameterError(f"supervisor max_restarts={self.max_restarts}: must be >= 0")
        if self.crash_window_s <= 0:
            raise BadParameterError(f"supervisor crash_window_s={self.crash_window_s}: must be > 0")


@dataclass(frozen=True)
class ModelObservation:
    """One look at one model.

    Args:
        name: the model.
        state: its state in the repository index (``READY``, ``UNAVAILABLE``, ``LOADING``, ...).
        reason: the index's reason (``unloaded`` after an unload on purpose).
        ready: the health probe (``/v2/models/NAME/ready``); ``None`` when not probed.
        missing_stubs: instances its config promises whose stub process is gone (empty when the
            processes cannot be seen, or for models that have no stubs).
    """

    name: str
    state: str
    reason: str = ""
    ready: bool | None = None
    missing_stubs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restart:
    """Reload ``model``: it failed for ``reason``; ``count`` restarts (this one included) in the window."""

    model: str
    reason: str
    count: int


@dataclass(frozen=True)
class GiveUp:
    """Leave ``model`` unloaded: it failed again after ``count`` restarts in the crash-loop window."""

    model: str
    reason: str
    count: int


Action = Restart | GiveUp


@dataclass
class _ModelTrack:
    strikes: int = 0
    restarts: deque[float] = field(default_factory=deque)
    gave_up: bool = False


class SupervisionLogic:
    """The decisions, with no I/O: feed it observations and the time; it answers what to do.

    A model is watched once it is seen ``READY`` (optionally only the models in ``models``). A
    watched model fails when it is ``READY`` in the index but a stub it should have is gone or its
    health probe says not ready, ``confirm_polls`` looks in a row; or when it turned
    ``UNAVAILABLE`` for another reason than an unload (e.g. our own reload failed). A model
    unloaded on purpose by someone else stops being watched. Each failure restarts the model unless
    ``max_restarts`` restarts already happened within ``crash_window_s``: then the model is given up.
    """

    def __init__(self, policy: SupervisorPolicy | None = None, models: Iterable[str] | None = None) -> None:
        self.policy = policy or SupervisorPolicy()
        self.only = set(models) if models is not None else None
        self._tracks: dict[str, _ModelTrack] = {}
        self._watched: set[str] = set()

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._watched)

    def gave_up(self, model: str) -> bool:
        return model in self._tracks and self._tracks[model].gave_up

    def observe(self, observations: Iterable[ModelObservation], now_s: float) -> list[Action]:
        """The actions for this look (at most one per model)."""
        actions: list[Action] = []
        for seen in observations:
            if self.only is not None and seen.name not in self.only:
                continue
            track = self._tracks.setdefault(seen.name, _ModelTrack())
            failure = self._failure(seen, track)
            if failure is None:
                track.strikes = 0
                continue
            track.strikes += 1
            if track.strikes < self.policy.confirm_polls:
                continue
            track.strikes = 0
            actions.append(self._decide(seen.name, failure, track, now_s))
        return actions

    def _failure(self, seen: ModelObservation, track: _ModelTrack) -> str | None:
        if seen.state == READY_STATE:
            if track.gave_up:  # someone loaded it again: a fresh start
                track.gave_up = False
            self._watched.add(seen.name)
            if seen.missing_stubs:
                return f"stub process {', '.join(seen.missing_stubs)} is gone"
            if seen.ready is False:
                return "health probe: the model is not ready"
            return None
        if seen.name not in self._watched:
            return None
        if seen.state == "UNAVAILABLE" and seen.reason != UNLOADED_REASON:
            return f"the model is UNAVAILABLE: {seen.reason or 'no reason given'}"
        if seen.state == "UNAVAILABLE":  # unloaded on purpose: not ours to bring back
            self._watched.discard(seen.name)
        return None  # LOADING / UNLOADING: someone is working on it

    def _decide(self, model: str, reason: str, track: _ModelTrack, now_s: float) -> Action:
        window_start = now_s - self.policy.crash_window_s
        while track.restarts and track.restarts[0] < window_start:
            track.restarts.popleft()
        if len(track.restarts) >= self.policy.max_restarts:
            track.gave_up = True
            self._watched.discard(model)
            return GiveUp(model, reason, len(track.restarts))
        track.restarts.append(now_s)
        return Restart(model, reason, len(track.restarts))


# ---- I/O: processes, the server's APIs ----


def stub_identity(cmdline: list[str]) -> tuple[str, str] | None:
    """``(model, instance)`` of a Python-backend stub's argv, or ``None`` for any other process.

    The model is the directory above the version directory of ``model.py`` (``<repo>/<model>/<version>/model.py``).
    """
    if not cmdline or not cmdline[0].endswith(STUB_BINARY) or len(cmdline) <= _STUB_INSTANCE_ARG:
        return None
    return Path(cmdline[1]).parent.parent.name, cmdline[_STUB_INSTANCE_ARG]


def expected_stubs(config: Mapping) -> tuple[str, ...]:
    """The stub instance names a model config promises (Python-backend models only; none for others)."""
    if config.get("backend") != "python":
        return ()
    names = []
    for group in config.get("instance_group", []):
        for index in range(int(group.get("count", 1))):
            names.append(f"{group['name']}_{index}")
    return tuple(names)


def find_server_process(grpc_port: int | None = None) -> psutil.Process | None:
    """The one ``tritonserver`` process on this machine (or PID namespace), or ``None``.

    With several, the one whose argv names ``--grpc-port=grpc_port``.
    """
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if process.info.get("name") == SERVER_BINARY or (cmdline and Path(cmdline[0]).name == SERVER_BINARY):
            found.append(process)
    if len(found) > 1 and grpc_port is not None:
        found = [p for p in found if f"--grpc-port={grpc_port}" in (p.info.get("cmdline") or [])]
    return found[0] if len(found) == 1 else None


class StubWatcher:
    """The live stub processes of one tritonserver, by ``(model, instance)``."""

    def __init__(self, server_pid: int | None = None, grpc_port: int | None = None) -> None:
        self.server_pid = server_pid
        self.grpc_port = grpc_port
        self._server: psutil.Process | None = None

    def live(self) -> set[tuple[str, str]] | None:
        """The live stubs; ``None`` when the server process cannot be seen."""
        server = self._server_process()
        if server is None:
            return None
        stubs = set()
        try:
            children = server.children()
        except psutil.Error:
            self._server = None
            return None
        for child in children:
            try:
                identity = stub_identity(child.cmdline())
                if identity is not None and child.status() != psutil.STATUS_ZOMBIE:
                    stubs.add(identity)
            except psutil.Error:
                continue  # it ended while we looked
        return stubs

    def _server_process(self) -> psutil.Process | None:
        if self._server is not None and self._server.is_running():
            return self._server
        try:
            self._server = psutil.Process(self.server_pid) if self.server_pid else find_server_process(self.grpc_port)
        except psutil.Error:
            self._server = None
        return self._server


class ModelSupervisor:
    """Watches a running Triton and reloads the models that fail; a daemon thread.

    Args:
        url: the gRPC address ``host:port``.
        admin_headers: gRPC headers that unlock the repository API (``EmbeddedTriton.admin_headers``).
        http_url: ``http://host:port``; when given, the health probes go over HTTP (as compose's healthcheck).
        server_pid: the tritonserver process; ``None`` looks for it (one server, or the one on the URL's port).
        watch_processes: look at the stub processes (off: health probes and the index only).
        models: supervise only these (default: every model that is seen ready).
        policy: timing and the crash-loop limit.
        metrics_port: serve ``stagebatch_model_restarts_total`` here (0: a free port; ``None``: no endpoint).
        metrics_host: address of the metrics endpoint.
        clock: the time source (tests).
    """

    def __init__(self, url: str, *, admin_headers: Mapping[str, str] | None = None, http_url: str | None = None,
                 server_pid: int | None = None, watch_processes: bool = True, models: Iterable[str] | None = None,
                 policy: SupervisorPolicy | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", clock: Callable[[], float] = time.monotonic) -> None:
        import tritonclient.grpc as grpcclient  # heavy: grpc

        self.url = url
        self.http_url = http_url.rstrip("/") if http_url else None
        self.admin_headers = dict(admin_headers or {})
        self.logic = SupervisionLogic(policy, models)
        self.policy = self.logic.policy
        port = int(url.rsplit(":", 1)[1]) if ":" in url else None
        self.stubs = StubWatcher(server_pid, port) if watch_processes else None
        self.clock = clock
        self.registry = CollectorRegistry()
        self.restarts_total = Counter(RESTARTS_METRIC, "Model reloads after a failure, by model", ["model"],
                                      registry=self.registry)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._metrics_server = None
        self._client = grpcclient.InferenceServerClient(url)
        self._configs: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events: list[str] = []  # one line per restart / give-up, as logged

    # ---- lifecycle ----
    def start(self) -> ModelSupervisor:
        """Serve the metrics (if asked) and watch in a daemon thread."""
        if self._thread is not None:
            return self
        if self.metrics_port is not None:
            self._metrics_server, _ = start_http_server(self.metrics_port, addr=self.metrics_host, registry=self.registry)
            self.metrics_port = int(self._metrics_server.server_port)
            LOGGER.info("supervisor metrics at %s", self.metrics_url)
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="stagebatch-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self._client.close()

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.metrics_host}:{self.metrics_port}/metrics"

    def restarts(self, model: str) -> int:
        """Restarts of ``model`` so far."""
        return int(self.registry.get_sample_value(RESTARTS_METRIC, {"model": model}) or 0)

    def run(self) -> None:
        """Watch until :meth:`stop` (the thread's body; the sidecar calls it directly)."""
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.check_once()
            except Exception as error:  # noqa: BLE001 (the server may be restarting: say so, look again)
                LOGGER.warning("supervisor: cannot look at %s: %s", self.url, error)
            self._stop.wait(max(0.0, self.policy.poll_interval_s - (self.clock() - started)))

    # ---- one look ----
    def check_once(self) -> list[Action]:
        """Look at the server once and act; returns what was done."""
        observations = self.observe()
        actions = self.logic.observe(observations, self.clock())
        for action in actions:
            if isinstance(action, Restart):
                self._restart(action)
            else:
                self._give_up(action)
        return actions

    def observe(self) -> list[ModelObservation]:
        index: dict[str, dict] = {}
        for entry in self._client.get_model_repository_index(headers=self.admin_headers, as_json=True).get("models", []):
            if entry["name"] not in index or entry.get("state") == READY_STATE:  # one entry per version: READY wins
                index[entry["name"]] = entry
        live = self.stubs.live() if self.stubs is not None else None
        observations = []
        for name, entry in index.items():
            state, reason = entry.get("state", ""), entry.get("reason", "")
            if self.logic.only is not None and name not in self.logic.only:
                continue
            if state != READY_STATE:
                self._configs.pop(name, None)
                observations.append(ModelObservation(name, state, reason))
                continue
            missing: tuple[str, ...] = ()
            if live is not None:
                missing = self._missing_stubs(name, live)
            observations.append(ModelObservation(name, state, reason, ready=self._probe(name), missing_stubs=missing))
        return observations

    def _missing_stubs(self, name: str, live: set[tuple[str, str]]) -> tuple[str, ...]:
        if name not in self._configs:
            self._configs[name] = self._config(name)
        missing = tuple(i for i in expected_stubs(self._configs[name]) if (name, i) not in live)
        if missing:  # the config may have changed under us (a reload by someone else): look again
            self._configs[name] = self._config(name)
            missing = tuple(i for i in expected_stubs(self._configs[name]) if (name, i) not in live)
        return missing

    def _config(self, name: str) -> dict:
        return self._client.get_model_config(name, as_json=True, headers=self.admin_headers).get("config", {})

    def _probe(self, name: str) -> bool | None:
        """The model's readiness; ``None`` when the server gave no answer (busy, restarting): a slow
        server under load must not look like a failed model."""
        if self.http_url is None:
            try:
                return bool(self._client.is_model_ready(name, client_timeout=PROBE_TIMEOUT_S))
            except Exception:  # noqa: BLE001 (tritonclient raises one exception class for every transport error)
                return None
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{name}/ready", timeout=PROBE_TIMEOUT_S) as answer:
                return answer.status == 200
        except urllib.error.HTTPError as error:  # an answer: not ready
            return error.code == 200
        except (urllib.error.URLError, OSError):
            return None

    # ---- actions ----
    def _restart(self, action: Restart) -> None:
        started = self.clock()
        config = self._configs.get(action.model)
        try:
            config = self._config(action.model)
        except Exception as error:  # noqa: BLE001 (an unavailable model has no config to read: keep the last one)
            LOGGER.debug("config of %s before its restart: %s", action.model, error)
        try:
            self._client.unload_model(action.model, headers=self.admin_headers)
        except Exception as error:  # noqa: BLE001 (already unloaded is fine)
            LOGGER.debug("unload of %s before its restart: %s", action.model, error)
        outcome = "restarted"
        try:
            if config:
                self._client.load_model(action.model, config=json.dumps(config), headers=self.admin_headers)
            else:
                self._client.load_model(action.model, headers=self.admin_headers)
        except Exception as error:  # noqa: BLE001 (the next look sees it UNAVAILABLE and counts a failure)
            outcome = f"restart failed ({error})"
        self._configs.pop(action.model, None)
        self.restarts_total.labels(model=action.model).inc()
        line = (f"model {action.model!r} {outcome} in {self.clock() - started:.1f} s: {action.reason} "
                f"(restart {action.count} of {self.policy.max_restarts} allowed in {self.policy.crash_window_s:.0f} s)")
        self.events.append(line)
        LOGGER.warning(line)

    def _give_up(self, action: GiveUp) -> None:
        try:
            self._client.unload_model(action.model, headers=self.admin_headers)
        except Exception as error:  # noqa: BLE001
            LOGGER.debug("unload of %s: %s", action.model, error)
        self._configs.pop(action.model, None)
        line = (f"model {action.model!r} left unloaded: it failed again ({action.reason}) after {action.count} "
                f"restarts within {self.policy.crash_window_s:.0f} s (a crash loop); fix the cause, then load it "
                f"through the repository API or restart the server")
        self.events.append(line)
        LOGGER.error(line)
