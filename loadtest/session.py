"""One Locust process's share of a load run: schedule, in-flight requests, records, CPU, lateness.

A :class:`LoadSession` lives in every process that sends requests (the LocalRunner's process or a
Locust worker). Locust users only lend it greenlets:

* closed loop: each user calls :meth:`LoadSession.run_closed_user`, which sends a request, waits
  for its answer and sends the next, until the window closes;
* open loop: one user per process calls :meth:`LoadSession.run_open_loop`, which walks this
  process's share of the precomputed arrival schedule and spawns one greenlet per arrival, so an
  arrival never waits for an earlier response (no coordinated omission). If no user of the process
  has taken the schedule by its start (fewer users than workers), the session walks it itself. An arrival that the
  process cannot send on time is sent as soon as possible and its lateness recorded, never skipped.

Requests run in the session's own greenlet group, not in the user's greenlet: when Locust stops
its users, requests already sent still complete and are recorded. A watchdog closes the window at
``start + warmup + duration``, waits for the in-flight requests (bounded by the client timeout) and
then calls ``on_done`` with this process's summary.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.pool
import numpy as np
import psutil

from loadtest.client import RequestRecord, TritonLoadClient
from loadtest.driver import LoadPlan
from loadtest.request_factory import RequestFactory
from loadtest.workloads import TraceArrivals, make_arrival_process, make_length_distribution

LOGGER = logging.getLogger(__name__)

# Independent random streams of one seed (numpy SeedSequence entropy lists).
_STREAM_ARRIVALS, _STREAM_LENGTHS, _STREAM_VALUES = 1, 2, 3
_LENGTH_BATCH = 1024
# Records live until the end of the run; moving them out of the collector's reach every so often
# keeps full garbage collections (which scan every live object) from pausing the sender.
_GC_FREEZE_EVERY = 8192
CONNECT_TIMEOUT_S = 10.0


def open_loop_schedule(plan: LoadPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole run's arrival times (s from start) and lengths, identical in every process."""
    spec = plan.spec
    entry = plan.entry()
    total_s = spec.warmup_s + spec.duration_s
    process = make_arrival_process(spec.arrival)
    times = process.arrival_times_s(total_s, np.random.default_rng([spec.seed, _STREAM_ARRIVALS]))
    lengths = None
    if entry.has_sequence:
        if spec.lengths is not None:
            dist = make_length_distribution(spec.lengths, min_length=entry.min_length, max_length=entry.max_length)
            lengths = dist.sample(np.random.default_rng([spec.seed, _STREAM_LENGTHS]), len(times))
        elif isinstance(process, TraceArrivals) and process.lengths(total_s) is not None:
            lengths = process.lengths(total_s)
        else:
            lengths = np.full(len(times), entry.max_length, dtype=np.int64)
    return times, lengths


class LoadSession:
    """Sends one process's share of a plan; see the module docstring."""

    def __init__(
        self,
        plan: LoadPlan,
        *,
        process_index: int,
        on_request: Callable[[RequestRecord], None] | None = None,
        on_done: Callable[[LoadSession], None] | None = None,
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.process_index = process_index
        self.entry = plan.entry()
        self.records: list[RequestRecord] = []
        self.inflight = gevent.pool.Group()
        self.late_arrivals = 0
        self.scheduled = 0
        self.scheduled_in_window = 0
        self.cpu_percent = 0.0
        self.warnings: list[str] = []
        self.done = gevent.event.Event()
        self._on_request = on_request
        self._on_done = on_done
        self._closing = False
        self._open_loop_claimed = False
        factory = RequestFactory(
            self.entry, self.spec.variant, rows=self.spec.rows, seed=[self.spec.seed, _STREAM_VALUES, process_index]
        )
        self.client = TritonLoadClient(
            plan.grpc_url,
            factory,
            model=self.spec.model,
            on_record=self._record,
            priority=self.spec.priority,
            timeout_us=self.spec.timeout_us,
            client_timeout_s=self.spec.client_timeout_s,
            worker=process_index,
        )
        if not self.client.connect(timeout_s=CONNECT_TIMEOUT_S):
            self.warnings.append(
                f"process {process_index}: no connection to {plan.grpc_url} within {CONNECT_TIMEOUT_S:.0f} s; "
                "requests will be recorded as errors"
            )
        self._length_rng = np.random.default_rng([self.spec.seed, _STREAM_LENGTHS, process_index])
        self._lengths_buffer: list[int] = []
        self._length_dist = (
            make_length_distribution(self.spec.lengths, min_length=self.entry.min_length, max_length=self.entry.max_length)
            if self.entry.has_sequence and self.spec.lengths is not None
            else None
        )
        self._schedule: tuple[list[float], list[int | None]] | None = None
        if self.spec.arrival.is_open_loop:
            self._schedule = self._my_share()  # before the start: drawing a long schedule takes a while
        # map the common wall-clock start onto this process's monotonic clock once
        start_epoch = plan.start_epoch_s or time.time()
        self.start_epoch_s = start_epoch
        self._start_perf = time.perf_counter() + (start_epoch - time.time())
        self._end_perf = self._start_perf + self.spec.warmup_s + self.spec.duration_s
        self._process = psutil.Process()
        gc.freeze()  # imports, plan and schedule: long-lived
        self._watchdog = gevent.spawn(self._watch)

    # ---- records -------------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        self.records.append(record)
        if len(self.records) % _GC_FREEZE_EVERY == 0:
            gc.freeze()
        if record.late_us > self.spec.late_tolerance_us:
            self.late_arrivals += 1
        if self._on_request is not None:
            try:
                self._on_request(record)
            except Exception:  # a statistics listener must never lose the record
                LOGGER.exception("request listener failed")

    def _send(self, seq_len: int | None, scheduled_perf: float | None) -> RequestRecord:
        late_us = 0
        if scheduled_perf is not None:
            late_us = max(0, int((time.perf_counter() - scheduled_perf) * 1e6))
        return self.client.send(seq_len, late_us=late_us)

    # ---- closed loop ---------------------------------------------------------------------------

    def _next_length(self) -> int | None:
        if not self.entry.has_sequence:
            return None
        if self._length_dist is None:
            return self.entry.max_length
        if not self._lengths_buffer:
            self._lengths_buffer = self._length_dist.sample(self._length_rng, _LENGTH_BATCH).tolist()[::-1]
        return self._lengths_buffer.pop()

    def run_closed_user(self) -> None:
        """One closed-loop user: request, wait for the answer, repeat until the window closes."""
        self._sleep_until(self._start_perf)
        while not self._closing and time.perf_counter() < self._end_perf:
            request = self.inflight.spawn(self._send, self._next_length(), None)
            request.join()

    # ---- open loop -----------------------------------------------------------------------------

    def _my_share(self) -> tuple[list[float], list[int | None]]:
        times, lengths = open_loop_schedule(self.plan)
        mine = slice(self.process_index, None, max(1, self.plan.processes))
        my_times = times[mine]
        self.scheduled = len(my_times)
        self.scheduled_in_window = int(np.count_nonzero(my_times >= self.spec.warmup_s))
        my_lengths = lengths[mine].tolist() if lengths is not None else [None] * len(my_times)
        return my_times.tolist(), my_lengths

    def run_open_loop(self) -> None:
        """Send this process's arrivals on schedule; only the first caller in a process sends."""
        if self._open_loop_claimed or self._schedule is None:
            return
        self._open_loop_claimed = True
        for offset_s, seq_len in zip(*self._schedule):
            if self._closing:
                break
            due = self._start_perf + offset_s
            delay = due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            self.inflight.spawn(self._send, seq_len, due)

    # ---- end of the run ------------------------------------------------------------------------

    def _sleep_until(self, perf_time: float) -> None:
        delay = perf_time - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)

    def _watch(self) -> None:
        # CPU use over the sending window only (not the idle wait before it, nor the drain after it)
        self._sleep_until(self._start_perf)
        if self._schedule is not None and not self._open_loop_claimed:
            # no Locust user of this process took the schedule (e.g. `-u` below the worker count):
            # send this process's share anyway rather than silently dropping it
            LOGGER.info("process %d: no user claimed the open-loop schedule; the session sends it", self.process_index)
            gevent.spawn(self.run_open_loop)
        cpu_start, wall_start = self._cpu_seconds(), time.perf_counter()
        self._sleep_until(self._end_perf)
        wall_s = time.perf_counter() - wall_start
        self.cpu_percent = 100.0 * (self._cpu_seconds() - cpu_start) / wall_s if wall_s > 0 else 0.0
        self.finish()

    def finish(self) -> None:
        """Close the window, wait for in-flight requests, and report (idempotent)."""
        if self._closing:
            self.done.wait()
            return
        self._closing = True
        self.inflight.join(timeout=self.spec.drain_timeout_s)
        if len(self.inflight):
            self.warnings.append(
                f"process {self.process_index}: {len(self.inflight)} requests still unanswered "
                f"{self.spec.drain_timeout_s:.0f} s after the window closed; recorded as cancelled"
            )
            self.inflight.kill(block=True, timeout=5)
        if self.client.unmatched_responses:
            self.warnings.append(
                f"process {self.process_index}: {self.client.unmatched_responses} streamed responses matched no request"
            )
        self.client.close()
        self.done.set()
        if self._on_done is not None:
            self._on_done(self)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.process_index,
            "cpu_percent": self.cpu_percent,
            "late_arrivals": self.late_arrivals,
            "scheduled": self.scheduled,
            "scheduled_in_window": self.scheduled_in_window,
            "records": len(self.records),
            "warnings": self.warnings,
        }

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system
