"""Child process of :func:`loadtest.driver.run_load`: Locust as a library, local or master + workers.

``python -m loadtest.locust_process --plan plan.json --out DIR [--workers N]`` runs the plan and
writes ``DIR/records.jsonl`` (every request of every process, warm-up included) and
``DIR/summary.json`` (schedule start, per-process CPU, lateness, warnings). It exits 0 when the run
completed, 1 with one line on stderr otherwise. Importing Locust monkey-patches this process
with gevent, which is why it is a separate process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from locust import argument_parser  # noqa: I001  (imports locust first: gevent monkey-patching)
from locust.env import Environment
from locust.event import Events

from loadtest import locustfile
from loadtest.driver import LoadJob
from core.errors import StagebatchError

LOGGER = logging.getLogger("loadtest.locust_process")
LOCUSTFILE = Path(locustfile.__file__).resolve()
WORKER_CONNECT_TIMEOUT_S = 60.0
WORKER_EXIT_TIMEOUT_S = 15.0


def _parsed_options(processes: int) -> argparse.Namespace:
    options = argument_parser.get_parser().parse_args(["-f", str(LOCUSTFILE), "--headless"])
    options.expect_workers = processes
    options.sb_plan = ""
    options.sb_records = ""
    return options


def _user_count(plan: LoadJob, processes: int) -> int:
    # closed loop: the users; open loop: one schedule-walking user per sending process
    return plan.spec.arrival.users if not plan.spec.arrival.is_open_loop else max(1, processes)


def run(plan: LoadJob, out_dir: Path, *, workers: int, remote_workers: int, master_bind_host: str,
        master_port: int) -> None:
    import gevent

    processes = workers + remote_workers
    events = Events()
    locustfile.install(events)
    environment = Environment(
        user_classes=[locustfile.TritonUser],
        events=events,
        host=plan.grpc_url,
        parsed_options=_parsed_options(max(1, processes)),
        stop_timeout=0,
    )
    environment.sb_plan = plan  # type: ignore[attr-defined]
    worker_procs: list[subprocess.Popen] = []
    if processes == 0:
        runner = environment.create_local_runner()
    else:
        runner = environment.create_master_runner(master_bind_host=master_bind_host, master_bind_port=master_port)
    events.init.fire(environment=environment, runner=runner, web_ui=None)
    try:
        if processes:
            port = runner.server.port  # type: ignore[attr-defined]
            LOGGER.info("Locust master listening on %s:%d for %d workers", master_bind_host, port, processes)
            for index in range(workers):
                worker_procs.append(subprocess.Popen(
                    [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host", "127.0.0.1",
                     "--master-port", str(port), "--loglevel", "WARNING"],
                    stdout=sys.stdout, stderr=sys.stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                ))  # fmt: skip
            deadline = time.monotonic() + WORKER_CONNECT_TIMEOUT_S
            while len(runner.clients.ready) < processes:  # type: ignore[attr-defined]
                if time.monotonic() > deadline or any(p.poll() is not None for p in worker_procs):
                    raise StagebatchError(
                        f"only {len(runner.clients.ready)} of {processes} Locust workers connected "  # type: ignore[attr-defined]
                        f"within {WORKER_CONNECT_TIMEOUT_S:.0f} s; see the worker log lines above"
                    )
                gevent.sleep(0.1)
        users = _user_count(plan, processes)
        runner.start(users, spawn_rate=max(users, 1))
        spec = plan.spec
        wait_s = spec.warmup_s + spec.duration_s + spec.drain_timeout_s + 30.0 + (5.0 if processes else 1.0)
        collector = environment.sb_collector  # type: ignore[attr-defined]
        if not collector.complete.wait(timeout=wait_s):
            raise StagebatchError(
                f"{len(collector.summaries)} of {collector.expected_processes} Locust processes reported "
                f"within {wait_s:.0f} s"
            )
    finally:
        runner.quit()
        for proc in worker_procs:
            try:
                proc.wait(timeout=WORKER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=5)
    plan = environment.sb_plan  # type: ignore[attr-defined]  (start_epoch_s set at test start)
    collector = environment.sb_collector  # type: ignore[attr-defined]
    with open(out_dir / "records.jsonl", "w") as out:
        for record in collector.records:
            out.write(json.dumps(record) + "\n")
    summaries = [collector.summaries[k] for k in sorted(collector.summaries)]
    summary = {
        "start_epoch_s": plan.start_epoch_s,
        "processes": summaries,
        "warnings": [w for s in summaries for w in s.get("warnings", [])],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--remote-workers", type=int, default=0)
    parser.add_argument("--master-bind-host", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = LoadJob.from_json(args.plan.read_text())
        run(plan, args.out, workers=args.workers, remote_workers=args.remote_workers,
            master_bind_host=args.master_bind_host, master_port=args.master_port)
    except StagebatchError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
