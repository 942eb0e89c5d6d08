"""The sender process: sends one Locust process's share of a load run from plain threads (no gevent).

Locust keeps what it is good at (users, load shapes, distributed master/workers, events, web UI);
the requests themselves leave from this separate, un-patched process, started by
:class:`loadtest.session.LoadSession` (``python -m loadtest.sender``) before the run starts:

* open loop: the main thread walks this process's share of the precomputed arrival schedule and
  hands each arrival to the client shortly before its time (:data:`HANDOVER_AHEAD_NS`; the thread
  that makes the call waits for the time itself); it never waits for a response, so no coordinated
  omission; an arrival sent late is recorded with its lateness, never skipped;
* closed loop: each Locust user of the parent adds one chain here: request, answer, next request,
  until the window closes.

Timestamps are taken on the threads that make the calls (see :mod:`loadtest.client`). Records go back to the
parent in batches (length-prefixed pickles on stdout) while the run goes on; the ``REORCH_RECORD``
JSON stays unparsed here (the parent parses it). At ``start + warmup + duration`` the window
closes; in-flight requests are waited for (bounded by the client timeout), then a summary frame
ends the exchange.

Frames parent -> sender: ``("plan", plan_json, process_index)``, ``("user",)``, ``("stop",)``.
Frames sender -> parent: ``("ready",)``, ``("records", [dict, ...])``, ``("done", summary)``.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import psutil

from loadtest.client import RequestRecord, TritonLoadClient
from loadtest.driver import LoadJob
from loadtest.request_factory import RequestFactory
from loadtest.workloads import STREAM_LENGTHS, STREAM_VALUES, arrival_schedule, make_length_distribution, stream_rng

LOGGER = logging.getLogger("loadtest.sender")

# Independent random streams of one seed (numpy SeedSequence entropy lists).
_LENGTH_BATCH = 1024
# Records live until the end of the run; moving them out of the collector's reach every so often
# keeps full garbage collections (which scan every live object) from pausing the sender.
_GC_FREEZE_EVERY = 8192
# Open loop: arrivals go to the client this long before they are due; the calling thread waits out
# the rest (loadtest.client). At high rates the scheduler then wakes once for several arrivals
# instead of once each, one thread switch less per request.
HANDOVER_AHEAD_NS = 2_000_000
CONNECT_TIMEOUT_S = 10.0
FLUSH_INTERVAL_S = 1.0
RECORDS_PER_FRAME = 256
_HEADER = struct.Struct("<I")


def write_frame(out: BinaryIO, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(body)) + body)
    out.flush()


def read_frame(source: BinaryIO) -> Any:
    """The next frame, or None at the end of the stream."""
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = source.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def open_loop_schedule(plan: LoadJob) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole run's arrival times (s from start) and lengths, identical in every process."""
    spec, entry = plan.spec, plan.entry()
    return arrival_schedule(spec.arrival, spec.lengths, spec.seed, spec.warmup_s + spec.duration_s,
                            sequence=(entry.min_length, entry.max_length) if entry.has_sequence else None)


class Sender:
    """Sends one process's share of a plan; see the module docstring. ``emit`` gets the outgoing frames."""

    def __init__(self, plan: LoadJob, *, process_index: int, emit: Callable[[Any], None],
                 channels: list[Any] | None = None) -> None:
        self.plan = plan
        self.spec = spec = plan.spec
        self.process_index = process_index
        self.entry = plan.entry()
        self.records: list[RequestRecord] = []
        self.warnings: list[str] = []
        self.scheduled = 0
        self.scheduled_in_window = 0
        self.cpu_percent = 0.0
        self._emit = emit
        self._emitted = 0
        self._stop = threading.Event()
        self._closing = False
        self._users_lock = threading.Lock()
        self._users_waiting = 0
        self._started = False
        self._user_turns: queue.SimpleQueue = queue.SimpleQueue()
        factory = RequestFactory(self.entry, spec.variant, rows=spec.rows, seed=[spec.seed, STREAM_VALUES, process_index])
        self.client = TritonLoadClient(
            plan.grpc_url, factory, model=spec.model, on_record=self.records.append, protocol=spec.protocol,
            priority=spec.priority, timeout_us=spec.timeout_us, client_timeout_s=spec.client_timeout_s,
            worker=process_index, channels=channels, transport=spec.transport,
        )  # fmt: skip
        if channels is None and not self.client.connect(timeout_s=CONNECT_TIMEOUT_S):
            self.warnings.append(
                f"process {process_index}: no connection to {plan.grpc_url} within {CONNECT_TIMEOUT_S:.0f} s; "
                "requests will be recorded as errors"
            )
        self._length_rng = stream_rng(spec.seed, STREAM_LENGTHS, process_index)
        self._lengths_buffer: list[int] = []
        self._length_dist = (
            make_length_distribution(spec.lengths, min_length=self.entry.min_length, max_length=self.entry.max_length)
            if self.entry.has_sequence and spec.lengths is not None
            else None
        )
        self._schedule = self._my_share() if spec.arrival.is_open_loop else None
        # map the common wall-clock start onto this process's monotonic clock once
        # (wall clock read first: any error in the mapping sends an arrival late, never before its time)
        wall_ns = time.time_ns()
        start_epoch_ns = int((plan.start_epoch_s or wall_ns / 1e9) * 1e9)
        self._start_ns = time.perf_counter_ns() + (start_epoch_ns - wall_ns) + 1000
        self._end_ns = self._start_ns + int((spec.warmup_s + spec.duration_s) * 1e9)
        self._process = psutil.Process()

    # ---- closed loop ---------------------------------------------------------------------------

    def add_user(self) -> None:
        """One more closed-loop chain (now, or at the start if the run has not started)."""
        with self._users_lock:
            if not self._started:
                self._users_waiting += 1
                return
        self._user_turns.put(None)

    def _next_length(self) -> int | None:
        if not self.entry.has_sequence:
            return None
        if self._length_dist is None:
            return self.entry.max_length
        if not self._lengths_buffer:
            self._lengths_buffer = self._length_dist.sample(self._length_rng, _LENGTH_BATCH).tolist()[::-1]
        return self._lengths_buffer.pop()

    def _run_users(self) -> None:
        # one thread turns every finished closed-loop request into the next one (no recursion in callbacks)
        again = self._user_turns.put
        while True:
            token = self._user_turns.get()
            if token is _STOP or self._closing or time.perf_counter_ns() >= self._end_ns:
                if token is _STOP:
                    return
                continue
            self.client.send(self._next_length(), then=lambda: again(None))

    # ---- open loop -----------------------------------------------------------------------------

    def _my_share(self) -> tuple[list[int], list[int | None]]:
        times, lengths = open_loop_schedule(self.plan)
        mine = slice(self.process_index, None, max(1, self.plan.processes))
        my_times = times[mine]
        self.scheduled = len(my_times)
        self.scheduled_in_window = int(np.count_nonzero(my_times >= self.spec.warmup_s))
        my_lengths = lengths[mine].tolist() if lengths is not None else [None] * len(my_times)
        return (np.round(my_times * 1e9).astype(np.int64).tolist(), my_lengths)

    def _walk_schedule(self) -> None:
        assert self._schedule is not None
        send, start_ns = self.client.send, self._start_ns
        for count, (offset_ns, seq_len) in enumerate(zip(*self._schedule)):
            if self._stop.is_set():
                break
            due_ns = start_ns + offset_ns
            delay_ns = due_ns - HANDOVER_AHEAD_NS - time.perf_counter_ns()
            if delay_ns > 0:
                time.sleep(delay_ns / 1e9)
            send(seq_len, scheduled_ns=due_ns)
            if count % _GC_FREEZE_EVERY == _GC_FREEZE_EVERY - 1:
                gc.freeze()

    # ---- the run -------------------------------------------------------------------------------

    def _sleep_until(self, perf_ns: int) -> None:
        while not self._stop.is_set():
            delay_s = (perf_ns - time.perf_counter_ns()) / 1e9
            if delay_s <= 0:
                return
            self._stop.wait(min(delay_s, 0.5))

    def _flush(self, final: bool = False) -> None:
        end = len(self.records)
        while self._emitted < end:
            chunk = self.records[self._emitted : min(end, self._emitted + RECORDS_PER_FRAME)]
            self._emit(("records", [vars(r) for r in chunk]))
            self._emitted += len(chunk)
            if not final:
                time.sleep(0)  # let a waiting call thread take its timestamp between chunks

    def _flush_loop(self, stop: threading.Event) -> None:
        while not stop.wait(FLUSH_INTERVAL_S):
            self._flush()
            gc.freeze()  # the records so far are long-lived: keep full collections from scanning them

    def run(self) -> dict[str, Any]:
        """Send the share, drain, emit every record and the summary; return the summary."""
        gc.freeze()  # imports, plan and schedule: long-lived
        flushing = threading.Event()
        flusher = threading.Thread(target=self._flush_loop, args=(flushing,), daemon=True, name="stagebatch-flush")
        flusher.start()
        users = threading.Thread(target=self._run_users, daemon=True, name="stagebatch-users")
        users.start()
        self._sleep_until(self._start_ns)
        cpu_start, wall_start = self._cpu_seconds(), time.perf_counter()
        with self._users_lock:
            self._started = True
            for _ in range(self._users_waiting):
                self._user_turns.put(None)
        if self._schedule is not None:
            self._walk_schedule()
        self._sleep_until(self._end_ns)
        wall_s = time.perf_counter() - wall_start
        self.cpu_percent = 100.0 * (self._cpu_seconds() - cpu_start) / wall_s if wall_s > 0 else 0.0
        self._closing = True
        if not self.client.wait_idle(self.spec.drain_timeout_s):
            self.warnings.append(
                f"process {self.process_index}: {self.client.inflight} requests still unanswered "
                f"{self.spec.drain_timeout_s:.0f} s after the window closed; recorded as cancelled"
            )
            self.client.cancel_all("cancelled: the load generator stopped before the response arrived")
        self.client.close()  # cancels what is left; every request has its record
        self.client.wait_idle(5.0)
        if self.client.unmatched_responses:
            self.warnings.append(
                f"process {self.process_index}: {self.client.unmatched_responses} streamed responses matched no request"
            )
        self._user_turns.put(_STOP)
        flushing.set()
        flusher.join()
        self._flush(final=True)
        summary = self.summary()
        self._emit(("done", summary))
        return summary

    def stop(self) -> None:
        """Close the window now (Locust stopped early)."""
        self._end_ns = min(self._end_ns, time.perf_counter_ns())
        self._stop.set()

    def summary(self) -> dict[str, Any]:
        late = sum(1 for r in self.records if r.late_us > self.spec.late_tolerance_us)
        return {
            "index": self.process_index,
            "cpu_percent": self.cpu_percent,
            "late_arrivals": late,
            "scheduled": self.scheduled,
            "scheduled_in_window": self.scheduled_in_window,
            "records": len(self.records),
            "warnings": self.warnings,
        }

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system


_STOP = object()


def _commands(source: BinaryIO, sender: Sender) -> None:
    while True:
        frame = read_frame(source)
        if frame is None or frame[0] == "stop":
            sender.stop()
            return
        if frame[0] == "user":
            sender.add_user()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # frames own the real stdout; anything else printed goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    lock = threading.Lock()

    def emit(message: Any) -> None:
        with lock:
            write_frame(out, message)

    emit(("ready",))
    source = sys.stdin.buffer
    frame = read_frame(source)
    if frame is None or frame[0] != "plan":
        return 0  # the parent went away before the run (e.g. a prewarmed sender it did not need)
    _, plan_json, process_index = frame
    sender = Sender(LoadJob.from_json(plan_json), process_index=process_index, emit=emit)
    threading.Thread(target=_commands, args=(source, sender), daemon=True, name="stagebatch-commands").start()
    sender.run()
    out.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)  # the parent went away: nothing left to report to
