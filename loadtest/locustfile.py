"""Locust user for Triton over gRPC: closed- and open-loop workloads built from a repository's manifest.

Run it with plain Locust (``--host`` is the server's gRPC address: ``host:port``, a comma-separated
list of them, or ``dns:///name:port``; see :func:`loadtest.client.parse_targets`)::

    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:8001 -u 8 -r 8 -t 30s \\
        --sb-manifest model_repository/manifest.json --sb-model bert_base --sb-variant whole \\
        --sb-lengths uniform:min_length=8,max_length=64 --sb-records results/records.jsonl

    # open loop: Poisson arrivals at 50/s; each Locust process's sender walks its share of the schedule
    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:8001 -u 1 -t 40s \\
        --sb-manifest ... --sb-model bert_base --sb-arrival poisson:rate_rps=50 --sb-duration 30

Every option also reads an environment variable (``STAGEBATCH_MODEL``, ...; see ``--help``).
Distributed: start the master with ``--master --expect-workers N`` and N processes with
``--worker --master-host H``; the master sends the plan to the workers and, for an open loop,
each worker sends every N-th arrival of the one schedule (its sender process walks it, with or
without a user).
Workers return their raw records to the master, which writes ``--sb-records``. Let ``-t`` exceed
``--sb-warmup + --sb-duration`` by a few seconds so the workers can drain and report before Locust
quits.

The requests leave from a sender process per Locust process (:mod:`loadtest.sender`, no gevent);
raw latencies (µs, with variant, sequence length, server record and error) are kept per request;
Locust's own ``request`` event is fired too, so its UI, CSV and HTML reports still work (rounded).
The programmatic API is :func:`loadtest.driver.run_load`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.event
from locust import User, constant, events, task
from locust.env import Environment
from locust.event import Events
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from loadtest.client import RequestRecord
from loadtest.driver import LoadJob, LoadSpec, validate_spec
from loadtest.session import LoadSession, prewarmed_sender
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import StagebatchError
from core.manifest import read_manifest_path

LOGGER = logging.getLogger("loadtest.locustfile")

# Seconds between the master's test start and the common schedule start: spawn messages must
# reach every worker, and each worker's sender process must build its requests and connect.
DISTRIBUTED_START_DELAY_S = 2.0
LOCAL_START_DELAY_S = 1.0
RECORDS_PER_MESSAGE = 2000
UNBOUNDED_CLOSED_LOOP_S = 86400.0


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("stagebatch", "Triton workload (stagebatch)")
    group.add_argument("--sb-manifest", env_var="STAGEBATCH_MANIFEST", default="model_repository/manifest.json",
                       help="manifest.json of the model repository")
    group.add_argument("--sb-model", env_var="STAGEBATCH_MODEL", default="", help="model name in the manifest")
    group.add_argument("--sb-variant", env_var="STAGEBATCH_VARIANT", default="whole",
                       choices=["whole", "ensemble", "reorch"], help="which deployment of the model to load")
    group.add_argument("--sb-arrival", env_var="STAGEBATCH_ARRIVAL", default="closed",
                       help="'closed' (users = -u) or e.g. 'poisson:rate_rps=50', 'bursty:rate_rps=80,on_s=1,off_s=3', "
                            "'spike:rate_rps=10,spike_rate_rps=100,spike_start_s=10,spike_duration_s=5', "
                            "'trace:trace_path=t.csv'")
    group.add_argument("--sb-lengths", env_var="STAGEBATCH_LENGTHS", default="",
                       help="sequence lengths, e.g. 'fixed:length=64', 'uniform:min_length=8,max_length=128', "
                            "'longtail:median=32,sigma=0.8', 'file:path=lengths.txt' (default: the model's max_length)")
    group.add_argument("--sb-duration", env_var="STAGEBATCH_DURATION_S", type=float, default=0.0,
                       help="measured seconds (default: --run-time minus --sb-warmup)")
    group.add_argument("--sb-warmup", env_var="STAGEBATCH_WARMUP_S", type=float, default=0.0,
                       help="seconds sent before the measured window")
    group.add_argument("--sb-seed", env_var="STAGEBATCH_SEED", type=int, default=0)
    group.add_argument("--sb-rows", env_var="STAGEBATCH_ROWS", type=int, default=1, help="batch rows per request")
    group.add_argument("--sb-priority", env_var="STAGEBATCH_PRIORITY", type=int, default=0)
    group.add_argument("--sb-timeout-us", env_var="STAGEBATCH_TIMEOUT_US", type=int, default=0)
    group.add_argument("--sb-protocol", env_var="STAGEBATCH_PROTOCOL", default="", choices=["", "unary", "stream"],
                       help="gRPC call: 'unary' (ModelInfer) or 'stream' (ModelStreamInfer); default: the variant's")
    group.add_argument("--sb-transport", env_var="STAGEBATCH_TRANSPORT", default="", choices=["", "h2", "grpcio"],
                       help="how requests travel: 'h2' (the load generator's own HTTP/2 framing, the default) or 'grpcio'")
    group.add_argument("--sb-records", env_var="STAGEBATCH_RECORDS", default="",
                       help="write every request's raw record (JSON lines) to this file")
    # set by the master (or the driver) and forwarded to workers in Locust's spawn message
    group.add_argument("--sb-plan", default="", help="(internal) the whole plan as JSON")


def plan_from_options(options: Any, host: str | None) -> LoadJob:
    """A plan from the command-line options (a LocalRunner or a master started by ``locust``)."""
    if getattr(options, "sb_plan", ""):
        return LoadJob.from_json(options.sb_plan)
    if not host:
        raise StagebatchError("give the server's gRPC address with --host, e.g. --host 127.0.0.1:8001")
    grpc_url = host  # one host:port, a comma-separated list, or dns:///host:port (loadtest.client.parse_targets)
    manifest_path = Path(options.sb_manifest)
    try:
        manifest = read_manifest_path(manifest_path).raw
    except StagebatchError as error:
        raise StagebatchError(f"--sb-manifest {manifest_path}: cannot read a manifest ({error})") from None
    if not options.sb_model:
        raise StagebatchError(f"give --sb-model; the manifest has: {', '.join(sorted(manifest.get('models', {})))}")
    arrival_text = options.sb_arrival.strip()
    if arrival_text == "closed":
        arrival = ArrivalSpec("closed", users=max(1, int(options.num_users or 1)))
    else:
        arrival = ArrivalSpec.parse(arrival_text)
    duration_s = options.sb_duration or ((options.run_time or 0) - options.sb_warmup)
    if duration_s <= 0 and arrival.kind == "closed" and not options.run_time:
        duration_s = UNBOUNDED_CLOSED_LOOP_S  # web UI without -t: users run until stopped
    if duration_s <= 0:
        raise StagebatchError(
            "give --sb-duration (or -t/--run-time longer than --sb-warmup): an open-loop schedule needs a length"
        )
    spec = LoadSpec(
        model=options.sb_model, variant=options.sb_variant, arrival=arrival,
        lengths=LengthSpec.parse(options.sb_lengths) if options.sb_lengths else None,
        duration_s=duration_s, warmup_s=options.sb_warmup, seed=options.sb_seed, rows=options.sb_rows,
        priority=options.sb_priority, timeout_us=options.sb_timeout_us, protocol=options.sb_protocol,
        transport=options.sb_transport,
    )  # fmt: skip
    validate_spec(manifest, spec)
    return LoadJob(grpc_url, spec, manifest["models"][spec.model], str(manifest.get("target", "embedded")))


class RecordCollector:
    """Gathers the records and summaries of every sending process (on the master or locally)."""

    def __init__(self, expected_processes: int) -> None:
        self.expected_processes = expected_processes
        self.records: list[dict[str, Any]] = []
        self.summaries: dict[int, dict[str, Any]] = {}
        self.complete = gevent.event.Event()

    def add_records(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)

    def add_summary(self, summary: dict[str, Any]) -> None:
        self.summaries[int(summary["index"])] = summary
        if len(self.summaries) >= self.expected_processes:
            self.complete.set()

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            out.writelines(json.dumps(record) + "\n" for record in sorted(self.records, key=lambda r: r["t_send_us"]))


def _fire_request_event(environment: Environment, record: RequestRecord) -> None:
    environment.events.request.fire(
        request_type="grpc",
        name=f"{record.model}/{record.variant}",
        response_time=record.latency_us / 1000.0,
        response_length=0,
        exception=None if record.ok else RuntimeError(record.error),
        context={"seq_len": record.seq_len},
    )


def _start_session(environment: Environment, plan: LoadJob, process_index: int) -> LoadSession:
    runner = environment.runner

    def on_done(session: LoadSession) -> None:
        if isinstance(runner, WorkerRunner):
            dicts = [r.to_dict() for r in session.records]
            for start in range(0, len(dicts), RECORDS_PER_MESSAGE):
                runner.send_message("sb_records", dicts[start : start + RECORDS_PER_MESSAGE])
            runner.send_message("sb_done", session.summary())
        else:
            collector: RecordCollector = environment.sb_collector  # type: ignore[attr-defined]
            collector.add_records([r.to_dict() for r in session.records])
            collector.add_summary(session.summary())

    session = LoadSession(
        plan,
        process_index=process_index,
        on_request=lambda record: _fire_request_event(environment, record),
        on_done=on_done,
    )
    environment.sb_session = session  # type: ignore[attr-defined]
    return session


def _when_runner_is_set(environment: Environment, then: Any, poll_s: float = 0.005) -> None:
    """Call ``then(environment)`` once ``environment.runner`` is set (a greenlet: it yields while waiting)."""
    while environment.runner is None:
        gevent.sleep(poll_s)
    then(environment)


def install(event_hooks: Events) -> None:
    """Attach the run protocol to an Environment's events (Locust's global ones for ``locust -f``)."""

    @event_hooks.init.add_listener
    def on_init(environment: Environment, runner: Any, **_kwargs: Any) -> None:
        environment.sb_session = None  # type: ignore[attr-defined]
        if isinstance(runner, WorkerRunner):
            prewarmed_sender()  # this process will send: start its sender now, not at the test start
            return
        if getattr(environment, "sb_plan", None) is None:
            try:
                environment.sb_plan = plan_from_options(environment.parsed_options, environment.host)  # type: ignore[attr-defined]
            except StagebatchError as error:
                # this is the command-line boundary of a `locust -f` run: one line, exit code 1
                sys.stderr.write(f"error: {error}\n")
                sys.exit(1)
        if isinstance(runner, LocalRunner):
            prewarmed_sender()
        expected = 1
        if isinstance(runner, MasterRunner):
            expected = max(1, int(getattr(environment.parsed_options, "expect_workers", 1) or 1))
            collector = RecordCollector(expected)
            runner.register_message("sb_records", lambda environment, msg, **kw: collector.add_records(msg.data))
            runner.register_message("sb_done", lambda environment, msg, **kw: collector.add_summary(msg.data))
        environment.sb_collector = RecordCollector(expected) if not isinstance(runner, MasterRunner) else collector  # type: ignore[attr-defined]

    @event_hooks.test_start.add_listener
    def on_test_start(environment: Environment, **_kwargs: Any) -> None:
        if environment.runner is None and getattr(environment.parsed_options, "worker", False):
            # A worker's message loop runs from inside WorkerRunner.__init__ (it connects to the master
            # there), so a busy worker can take the first spawn, and fire this, before
            # create_worker_runner has set environment.runner (seen in CI: the worker then took the
            # master's path, failed, and was dropped as missing). Start once the runner is set.
            gevent.spawn(_when_runner_is_set, environment, on_test_start)
            return
        runner = environment.runner
        if isinstance(runner, WorkerRunner):
            plan = LoadJob.from_json(environment.parsed_options.sb_plan)
            _start_session(environment, plan, max(0, runner.worker_index))
            return
        plan: LoadJob = environment.sb_plan  # type: ignore[attr-defined]
        if isinstance(runner, MasterRunner):
            plan.processes = environment.sb_collector.expected_processes  # type: ignore[attr-defined]
            plan.start_epoch_s = time.time() + DISTRIBUTED_START_DELAY_S
            environment.parsed_options.sb_plan = plan.to_json()  # forwarded in the spawn message
        elif isinstance(runner, LocalRunner):
            plan.processes = 1
            plan.start_epoch_s = time.time() + LOCAL_START_DELAY_S
            _start_session(environment, plan, 0)

    @event_hooks.test_stop.add_listener
    def on_test_stop(environment: Environment, **_kwargs: Any) -> None:
        session = getattr(environment, "sb_session", None)
        if session is not None:
            session.finish()  # Locust stopped early: close the window, drain, report

    @event_hooks.quitting.add_listener
    def on_quitting(environment: Environment, **_kwargs: Any) -> None:
        collector = getattr(environment, "sb_collector", None)
        options = environment.parsed_options
        if collector is None or isinstance(environment.runner, WorkerRunner):
            return
        missing = collector.expected_processes - len(collector.summaries)
        if missing > 0:
            LOGGER.warning("%d Locust processes did not report their records before quitting; "
                           "let -t exceed --sb-warmup + --sb-duration", missing)
        if options is not None and getattr(options, "sb_records", ""):
            collector.write(options.sb_records)
            LOGGER.info("wrote %d request records to %s", len(collector.records), options.sb_records)


class TritonUser(User):
    """One user of the process's :class:`LoadSession` (closed loop: one more request-answer chain in
    the sender; open loop: the sender walks the schedule by itself, users stay idle)."""

    wait_time = constant(0)

    @task
    def run_workload(self) -> None:
        session: LoadSession | None = getattr(self.environment, "sb_session", None)
        if session is None:
            raise StopUser()
        if session.spec.arrival.is_open_loop:
            session.run_open_loop()
        else:
            session.run_closed_user()
        session.done.wait()
        while True:  # the window is over: stay idle until Locust stops this user
            gevent.sleep(3600)


install(events)
