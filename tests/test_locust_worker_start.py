"""A worker's test_start can fire before Locust has set ``environment.runner`` (run in a fresh interpreter:
importing the locustfile attaches listeners to Locust's global events)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import types
import gevent
from locust.event import Events
from locust.runners import WorkerRunner
import loadtest.locustfile as locustfile

started = []
locustfile._start_session = lambda environment, plan, index: started.append(index)
locustfile.LoadJob = types.SimpleNamespace(from_json=lambda text: text)
events = Events()
locustfile.install(events)
environment = types.SimpleNamespace(runner=None, parsed_options=types.SimpleNamespace(worker=True, sb_plan="plan"))
events.test_start.fire(environment=environment)  # the first spawn, taken inside WorkerRunner.__init__
gevent.sleep(0.05)
assert started == [], started  # no master path, no failure: it waits
runner = object.__new__(WorkerRunner)
runner.worker_index = 1
environment.runner = runner
gevent.sleep(0.05)
assert started == [1], started
print("ok")
"""


def test_worker_test_start_before_the_runner_is_set_waits_for_it():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
