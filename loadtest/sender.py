"""The sender process: sends one Locust process's share of a load run from one ``grpc.aio`` event loop (no gevent).

Locust keeps what it is good at (users, load shapes, distributed master/workers, events, web UI);
the requests themselves leave from this separate, un-patched process, started by
:class:`loadtest.session.LoadSession` (``python -m loadtest.sender``) before the run starts. Its
main thread runs one event loop (uvloop where installed: :func:`new_event_loop`) that sends every
request and takes every timestamp (see :mod:`loadtest.client`):

* open loop: a task walks this process's share of the precomputed arrival schedule; it sleeps
  until the next arrival is due (the loop's timers tick in milliseconds) and sends every arrival
  due by then; it never waits for a response, so no coordinated omission; an arrival sent late is
  recorded with its lateness, never skipped;
* closed loop: each Locust user of the parent adds one chain here: request, answer, next request,
  until the window closes.

Records go back to the parent in batches (length-prefixed pickles on stdout, written by a flush
thread) while the run goes on; the ``REORCH_RECORD`` JSON stays unparsed here (the parent parses
it). At ``start + warmup + duration`` the window closes; in-flight requests are waited for
(bounded by the client timeout), then a summary frame ends the exchange.

Frames parent -> sender: ``("plan", plan_json, process_index)``, ``("user",)``, ``("stop",)``.
Frames sender -> parent: ``("ready",)``, ``("records", [dict, ...])``, ``("done", summary)``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import psutil

try:
    import uvloop
except ImportError:  # a platform without uvloop (Windows): asyncio's own loop sends, at more CPU per request
    uvloop = None

from loadtest.client import CANCELLED, RequestRecord, TritonLoadClient
from loadtest.driver import LoadJob
from loadtest.request_factory import RequestFactory
from loadtest.workloads import TraceArrivals, make_arrival_process, make_length_distribution

LOGGER = logging.getLogger("loadtest.sender")

# Independent random streams of one seed (numpy SeedSequence entropy lists).
_STREAM_ARRIVALS, _STREAM_LENGTHS, _STREAM_VALUES = 1, 2, 3
_LENGTH_BATCH = 1024
# Records live until the end of the run; moving them out of the collector's reach every so often
# keeps full garbage collections (which scan every live object) from pausing the sender.
_GC_FREEZE_EVERY = 8192
CONNECT_TIMEOUT_S = 10.0
_STOP_CHECK_S = 0.5  # the longest the sender sleeps before it looks whether the run was stopped
FLUSH_INTERVAL_S = 1.0
RECORDS_PER_FRAME = 256
_HEADER = struct.Struct("<I")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The sender's event loop: uvloop's where installed (less CPU per request), else asyncio's own."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


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


class Sender:
    """Sends one process's share of a plan; see the module docstring. ``emit`` gets the outgoing frames.

    :meth:`run` runs the whole exchange on a new event loop (:func:`new_event_loop`); :meth:`add_user`
    and :meth:`stop` may be called from any thread.
    """

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
        self.client: TritonLoadClient | None = None
        self._channels = channels
        self._emit = emit
        self._emitted = 0
        self._stopping = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._users_lock = threading.Lock()
        self._users_waiting = 0
        self._started = False
        self._factory = RequestFactory(self.entry, spec.variant, rows=spec.rows,
                                       seed=[spec.seed, _STREAM_VALUES, process_index])
        self._length_rng = np.random.default_rng([spec.seed, _STREAM_LENGTHS, process_index])
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
        """One more closed-loop chain (now, or at the start if the run has not started); any thread."""
        with self._users_lock:
            if not self._started:
                self._users_waiting += 1
                return
        self._loop.call_soon_threadsafe(self._user_turn)  # type: ignore[union-attr]

    def _next_length(self) -> int | None:
        if not self.entry.has_sequence:
            return None
        if self._length_dist is None:
            return self.entry.max_length
        if not self._lengths_buffer:
            self._lengths_buffer = self._length_dist.sample(self._length_rng, _LENGTH_BATCH).tolist()[::-1]
        return self._lengths_buffer.pop()

    def _user_turn(self) -> None:
        # a closed-loop chain's next request, sent when its previous one has its record (on the loop)
        if self._closing or time.perf_counter_ns() >= self._end_ns:
            return
        self.client.send(self._next_length(), then=self._user_turn)  # type: ignore[union-attr]

    # ---- open loop -----------------------------------------------------------------------------

    def _my_share(self) -> tuple[list[int], list[int | None]]:
        times, lengths = open_loop_schedule(self.plan)
        mine = slice(self.process_index, None, max(1, self.plan.processes))
        my_times = times[mine]
        self.scheduled = len(my_times)
        self.scheduled_in_window = int(np.count_nonzero(my_times >= self.spec.warmup_s))
        my_lengths = lengths[mine].tolist() if lengths is not None else [None] * len(my_times)
        return (np.round(my_times * 1e9).astype(np.int64).tolist(), my_lengths)

    async def _walk_schedule(self) -> None:
        # wake when the next arrival is due (timers tick in milliseconds), send every arrival due by now
        assert self._schedule is not None
        offsets_ns, lengths = self._schedule
        send, start_ns, clock, count, total = self.client.send, self._start_ns, time.perf_counter_ns, 0, len(offsets_ns)  # type: ignore[union-attr]
        while count < total and not self._stopping:
            now_ns = clock()
            due_ns = start_ns + offsets_ns[count]
            if due_ns > now_ns:
                await asyncio.sleep(min((due_ns - now_ns) / 1e9, _STOP_CHECK_S))
                continue
            while count < total and start_ns + offsets_ns[count] <= now_ns:
                send(lengths[count], scheduled_ns=start_ns + offsets_ns[count])
                count += 1
                if count % _GC_FREEZE_EVERY == 0:
                    gc.freeze()

    # ---- the run -------------------------------------------------------------------------------

    async def _sleep_until(self, perf_ns: int) -> None:
        while not self._stopping:
            delay_s = (perf_ns - time.perf_counter_ns()) / 1e9
            if delay_s <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), min(delay_s, _STOP_CHECK_S))  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                pass

    def _flush(self, final: bool = False) -> None:
        end = len(self.records)
        while self._emitted < end:
            chunk = self.records[self._emitted : min(end, self._emitted + RECORDS_PER_FRAME)]
            self._emit(("records", [vars(r) for r in chunk]))
            self._emitted += len(chunk)
            if not final:
                time.sleep(0)  # let the event loop take its timestamps between chunks

    def _flush_loop(self, stop: threading.Event) -> None:
        while not stop.wait(FLUSH_INTERVAL_S):
            self._flush()
            gc.freeze()  # the records so far are long-lived: keep full collections from scanning them

    def run(self) -> dict[str, Any]:
        """Send the share, drain, emit every record and the summary; return the summary."""
        loop = new_event_loop()
        try:
            return loop.run_until_complete(self._run())
        finally:
            loop.close()

    async def _run(self) -> dict[str, Any]:
        spec = self.spec
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._stopping:
            self._wake.set()
        self.client = client = TritonLoadClient(
            self.plan.grpc_url, self._factory, model=spec.model, on_record=self.records.append, protocol=spec.protocol,
            priority=spec.priority, timeout_us=spec.timeout_us, client_timeout_s=spec.client_timeout_s,
            worker=self.process_index, channels=self._channels,
        )  # fmt: skip
        if self._channels is None and not await client.connect(timeout_s=CONNECT_TIMEOUT_S):
            self.warnings.append(
                f"process {self.process_index}: no connection to {self.plan.grpc_url} within {CONNECT_TIMEOUT_S:.0f} s; "
                "requests will be recorded as errors"
            )
        gc.freeze()  # imports, plan, schedule and channels: long-lived
        flushing = threading.Event()
        flusher = threading.Thread(target=self._flush_loop, args=(flushing,), daemon=True, name="stagebatch-flush")
        flusher.start()
        await self._sleep_until(self._start_ns)
        cpu_start, wall_start = self._cpu_seconds(), time.perf_counter()
        with self._users_lock:
            self._started = True
            waiting, self._users_waiting = self._users_waiting, 0
        for _ in range(waiting):
            self._user_turn()
        if self._schedule is not None:
            await self._walk_schedule()
        await self._sleep_until(self._end_ns)
        wall_s = time.perf_counter() - wall_start
        self.cpu_percent = 100.0 * (self._cpu_seconds() - cpu_start) / wall_s if wall_s > 0 else 0.0
        self._closing = True
        if not await client.wait_idle(spec.drain_timeout_s):
            self.warnings.append(
                f"process {self.process_index}: {client.inflight} requests still unanswered "
                f"{spec.drain_timeout_s:.0f} s after the window closed; recorded as cancelled"
            )
            client.cancel_all(CANCELLED)
        await client.close()  # cancels what is left; every request has its record
        if client.unmatched_responses:
            self.warnings.append(
                f"process {self.process_index}: {client.unmatched_responses} streamed responses matched no request"
            )
        flushing.set()
        flusher.join()
        self._flush(final=True)
        summary = self.summary()
        self._emit(("done", summary))
        return summary

    def stop(self) -> None:
        """Close the window now (Locust stopped early); any thread."""
        self._end_ns = min(self._end_ns, time.perf_counter_ns())
        self._stopping = True
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # the loop has finished already

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
        code = main()
    except (BrokenPipeError, KeyboardInterrupt):
        code = 0  # the parent went away: nothing left to report to
    # Every frame is written and flushed. Leave now: the interpreter's shutdown (gRPC's threads and
    # channels, the command thread blocked reading stdin) takes a while and can abort on the stdin
    # lock, and the parent waits for this process to exit.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
