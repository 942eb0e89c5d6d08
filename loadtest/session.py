"""One Locust process's share of a load run, as Locust sees it; the requests leave from a sender process.

A :class:`LoadSession` lives in every Locust process that sends (the LocalRunner's process or a
Locust worker). It hands the plan to a :class:`SenderProcess` (``python -m loadtest.sender``, no
gevent: see :mod:`loadtest.sender` for why) and turns what comes back into Locust's world:

* closed loop: each Locust user calls :meth:`LoadSession.run_closed_user`, which adds one
  request-answer-request chain to the sender;
* open loop: the sender walks this process's share of the arrival schedule by itself (also when
  no Locust user of this process exists); :meth:`LoadSession.run_open_loop` only lends a user;
* records arrive in batches during the run; each is parsed (``REORCH_RECORD``), kept, and fired as
  Locust's ``request`` event; at the end the sender's summary (CPU, lateness, warnings) arrives and
  ``on_done`` is called.

A sender process is started ahead of the run (:func:`prewarmed_sender`), so its imports do not
delay the first arrivals.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.subprocess

from loadtest.client import RequestRecord, finish_record, sender_environment
from loadtest.driver import LoadJob
from loadtest.sender import read_frame, write_frame

__all__ = ["LoadSession", "SenderProcess", "prewarmed_sender"]

LOGGER = logging.getLogger(__name__)
SENDER_READY_TIMEOUT_S = 60.0
SENDER_EXIT_TIMEOUT_S = 10.0


class SenderProcess:
    """A ``python -m loadtest.sender`` child with its frame pipes (cooperative under gevent)."""

    def __init__(self) -> None:
        self.proc = gevent.subprocess.Popen(
            [sys.executable, "-m", "loadtest.sender"], stdin=gevent.subprocess.PIPE, stdout=gevent.subprocess.PIPE,
            env=sender_environment(os.environ),
        )
        self._ready = gevent.spawn(read_frame, self.proc.stdout)

    def wait_ready(self, timeout_s: float = SENDER_READY_TIMEOUT_S) -> bool:
        try:
            return self._ready.get(timeout=timeout_s) == ("ready",)
        except gevent.Timeout:
            return False

    def send(self, message: Any) -> None:
        try:
            write_frame(self.proc.stdin, message)
        except (BrokenPipeError, OSError, ValueError):
            LOGGER.warning("the sender process is gone (exit code %s)", self.proc.poll())

    def read(self) -> Any:
        return read_frame(self.proc.stdout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=SENDER_EXIT_TIMEOUT_S)
        except gevent.subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


_prewarmed: SenderProcess | None = None


def prewarmed_sender() -> None:
    """Start a sender process now (imports take a while) for the next :class:`LoadSession` of this process."""
    global _prewarmed
    if _prewarmed is None:
        _prewarmed = SenderProcess()


def _take_sender() -> SenderProcess:
    global _prewarmed
    sender, _prewarmed = _prewarmed, None
    return sender if sender is not None else SenderProcess()


class LoadSession:
    """Sends one process's share of a plan through a sender process; see the module docstring."""

    def __init__(
        self,
        plan: LoadJob,
        *,
        process_index: int,
        on_request: Callable[[RequestRecord], None] | None = None,
        on_done: Callable[[LoadSession], None] | None = None,
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.process_index = process_index
        self.records: list[RequestRecord] = []
        self.warnings: list[str] = []
        self.done = gevent.event.Event()
        self._summary: dict[str, Any] = {"index": process_index, "cpu_percent": 0.0, "late_arrivals": 0,
                                         "scheduled": 0, "scheduled_in_window": 0}
        self._on_request = on_request
        self._on_done = on_done
        self._sender = _take_sender()
        if not self._sender.wait_ready():
            self.warnings.append(f"process {process_index}: the sender process did not start "
                                 f"(exit code {self._sender.proc.poll()}); see its log lines above")
        self._sender.send(("plan", plan.to_json(), process_index))
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        try:
            while True:
                frame = self._sender.read()
                if frame is None:
                    self.warnings.append(
                        f"process {self.process_index}: the sender process ended without its summary "
                        f"(exit code {self._sender.proc.poll()}); see its log lines above"
                    )
                    break
                if frame[0] == "records":
                    for data in frame[1]:
                        self._record(finish_record(RequestRecord(**data)))
                elif frame[0] == "done":
                    self._summary = frame[1]
                    break
        finally:
            self._sender.close()
            self.done.set()
            if self._on_done is not None:
                self._on_done(self)

    def _record(self, record: RequestRecord) -> None:
        self.records.append(record)
        if self._on_request is not None:
            try:
                self._on_request(record)
            except Exception:  # a statistics listener must never lose the record
                LOGGER.exception("request listener failed")

    def run_closed_user(self) -> None:
        """One closed-loop user: the sender runs one more request-answer-request chain until the window closes."""
        self._sender.send(("user",))

    def run_open_loop(self) -> None:
        """Nothing to do: the sender walks this process's share of the schedule by itself."""

    def finish(self) -> None:
        """Close the window now (Locust stopped early), wait for the drain and the summary (idempotent)."""
        if not self.done.is_set():
            self._sender.send(("stop",))
            self.done.wait(timeout=self.spec.drain_timeout_s + SENDER_EXIT_TIMEOUT_S)

    @property
    def late_arrivals(self) -> int:
        return int(self._summary.get("late_arrivals", 0))

    @property
    def cpu_percent(self) -> float:
        return float(self._summary.get("cpu_percent", 0.0))

    def summary(self) -> dict[str, Any]:
        summary = dict(self._summary)
        summary["index"] = self.process_index
        summary["records"] = len(self.records)
        summary["warnings"] = list(summary.get("warnings", [])) + self.warnings
        return summary
