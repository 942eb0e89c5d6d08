"""The Triton gRPC client of the load generator: plain threads, no gevent; one :class:`RequestRecord` per request.

It runs in the sender process (:mod:`loadtest.sender`), never in a gevent-patched Locust process:
sending from gevent greenlets made every response hop from gRPC's threads to the gevent hub before
its timestamp was taken, which added 0.6-1 ms to every latency (issue 10).

Two transports (``transport``, :data:`TRANSPORTS`):

* **h2** (the default, :mod:`loadtest.h2c`): gRPC framed by hand over cleartext HTTP/2 on a plain
  socket. A request due now is written by the thread that sends it; one handed over ahead of its
  time goes to a writer thread that waits for the time. The send time is taken just before the
  socket write, the end time by the connection's reader thread right after the ``recv`` that
  completed the response, before anything is parsed. Unary calls get one HTTP/2 stream each;
  ``stream`` calls share one long-lived ``ModelStreamInfer`` stream per target, matched by request
  id. It costs a fraction of grpcio's CPU per request (docs/loadgen.md).
* **grpcio**: unary calls from a pool of threads that make one blocking call each (the pool grows
  when no thread is idle; the send time is taken on that thread just before the call, the end
  time as soon as it returns); ``stream`` calls on one bidirectional stream per target (the send
  time when gRPC pulls the request off the queue to write it, the end time on the reader thread).

Requests are serialised once per distinct input (:meth:`RequestFactory.request_bytes`); each call
only appends its id (and the run's constant parameters) as protobuf fields, which protobuf merges.
The ``REORCH_RECORD`` JSON is not parsed on the hot path: the record keeps its raw bytes in
``server`` until :func:`finish_record` parses it after the window.

The server address may be one ``host:port``, a comma-separated list of them (one channel or h2c
connection each, requests spread round robin), or one ``dns:///host:port`` (round robin over the
addresses the name resolves to: gRPC's ``round_robin`` policy, or one h2c connection per address);
see :func:`parse_targets`.

Every call produces exactly one record, also when it fails, times out or is cancelled.
Latencies are raw integers in microseconds.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2

from loadtest.h2c import Call, H2cConnection, H2cError, request_headers, split_target
from loadtest.request_factory import REORCH_RECORD_OUTPUT
from core.errors import ConfigValidationError

if TYPE_CHECKING:
    from loadtest.request_factory import RequestFactory

LOGGER = logging.getLogger(__name__)

PROTOCOLS = ("unary", "stream")
# How requests travel: "h2" is loadtest.h2c (gRPC framed by hand on a plain socket, one reader thread
# per connection), "grpcio" the grpc package (blocking calls from a thread pool; one bidirectional
# stream per target). h2 is the default: measured in docs/loadgen.md ("How requests are sent").
TRANSPORTS = ("h2", "grpcio")
DEFAULT_TRANSPORT = "h2"
# The protocol a variant gets when the run does not say: unary for all, since the reorchestrator
# answers unary ModelInfer too (it is not decoupled; docs/reorch.md). Streaming stays available.
DEFAULT_PROTOCOL = {"whole": "unary", "ensemble": "unary", "reorch": "unary"}
# Variants whose requests ask for the reorchestrator's REORCH_RECORD (contract 1: opt-in per request)
RECORD_VARIANTS = ("reorch",)
REORCH_RECORD_PARAMETER = "reorch_record"
_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Triton's own client allows messages up to INT32_MAX; the default 4 MiB is too small for big tensors.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
# gRPC's EventEngine client (on by default in grpcio 1.6x-1.8x) moves every read and write through a
# pool of event_engine threads before the waiting thread wakes: 2-3 more thread switches per request.
# With it off, the thread that waits on a call polls the socket itself. Measured in the sender process
# against the trivial model (2 shared cores, under contention): CPU per request 500 -> 380 µs with
# blocking calls at 1,000 req/s, and a third of the late arrivals at 2,000 req/s. An experiment a later
# grpcio no longer knows is ignored. Set in the sender's environment (read when grpc starts).
GRPC_EXPERIMENTS_OFF = ("event_engine_client", "event_engine_listener", "event_engine_callback_cq", "event_engine_fork")
MAX_UNARY_THREADS = 256
# h2: after a failed connect, requests fail at once with its error for this long before the next try
H2_RECONNECT_BACKOFF_S = 1.0
PRESTARTED_UNARY_THREADS = 4
_ID_TAG = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["id"].number << 3 | 2  # length-delimited


@dataclass
class RequestRecord:
    """One request as the load generator saw it (``server``: the reorchestrator's record, if any)."""

    t_send_us: int  # wall clock (µs since the epoch) when the request was handed to gRPC
    latency_us: int  # send to final response (or error), monotonic clock
    model: str  # manifest model name
    variant: str  # whole | ensemble | reorch
    seq_len: int | None  # real sequence length (None for models without a sequence axis)
    rows: int  # batch rows in this request
    ok: bool
    error: str | None
    server: Any  # REORCH_RECORD: raw bytes in the sender, the parsed dict after finish_record
    request_id: str = ""
    late_us: int = 0  # open loop: how far behind its scheduled time the request was sent
    worker: int = 0  # index of the Locust process that sent it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)


def finish_record(record: RequestRecord) -> RequestRecord:
    """Parse the raw ``REORCH_RECORD`` bytes (kept off the hot path); a malformed one makes the request fail."""
    raw = record.server
    if isinstance(raw, (bytes, bytearray, memoryview, str)):
        try:
            parsed = json.loads(raw)
        except ValueError as error:
            record.server, record.ok, record.error = None, False, f"{type(error).__name__}: {error}"
            return record
        if isinstance(parsed, dict):
            record.server = parsed
        else:
            text = f"{REORCH_RECORD_OUTPUT} is not a JSON object: {bytes(raw[:80])!r}"
            record.server, record.ok, record.error = None, False, f"ValueError: {text}"
    return record


def parse_targets(url: str) -> list[str]:
    """The gRPC channel targets of a server address.

    ``"host:port"`` gives one; ``"h1:p1,h2:p2"`` one per address (requests alternate between them);
    ``"dns:///host:port"`` one channel whose ``round_robin`` policy spreads requests over every address
    the name resolves to (a Kubernetes headless Service). A ``grpc://`` prefix is dropped.
    """
    text = str(url).strip()
    if text.startswith("dns:"):
        if "," in text:
            raise ConfigValidationError(f"server address {url!r}: a dns: target names one host; drop the comma list")
        return [text]
    targets = [part.strip().split("://", 1)[-1] for part in text.split(",")]
    bad = [t for t in targets if not t or ":" not in t]
    if bad:
        raise ConfigValidationError(
            f"server address {url!r}: {bad[0]!r} is not host:port; give 'host:port', 'h1:p1,h2:p2' or 'dns:///host:port'"
        )
    return targets


def sender_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus the gRPC settings of a sending process (:data:`GRPC_EXPERIMENTS_OFF`), keeping the caller's own."""
    experiments = [e for e in environ.get("GRPC_EXPERIMENTS", "").split(",") if e]
    named = {e.lstrip("-") for e in experiments}
    experiments += [f"-{e}" for e in GRPC_EXPERIMENTS_OFF if e not in named]
    return {**environ, "GRPC_EXPERIMENTS": ",".join(experiments)}


def open_channel(target: str) -> grpc.Channel:
    """An insecure channel to one target (``round_robin`` over a dns: name's addresses)."""
    options = list(_CHANNEL_OPTIONS)
    if target.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.insecure_channel(target, options=options)


def _encode_id(request_id: str) -> bytes:
    data = request_id.encode()
    size, varint = len(data), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            return bytes([_ID_TAG]) + bytes(varint) + data


class StreamClosedError(Exception):
    """The response stream ended before this request was answered."""


class _Pending:
    """One request in flight (slots: created on the hot path)."""

    __slots__ = ("late_us", "payload", "request_id", "scheduled_ns", "seq_len", "start_ns", "t_send_us", "then")

    def __init__(self, request_id: str, seq_len: int | None, payload: bytes, scheduled_ns: int | None,
                 then: Callable[[], None] | None) -> None:
        self.request_id = request_id
        self.seq_len = seq_len
        self.payload = payload
        self.scheduled_ns = scheduled_ns
        self.then = then
        self.start_ns = 0
        self.t_send_us = 0
        self.late_us = 0

    def wait_until_due(self) -> None:
        """Sleep until the scheduled time (the scheduler hands open-loop arrivals over a little ahead)."""
        if self.scheduled_ns is not None:
            delay_ns = self.scheduled_ns - time.perf_counter_ns()
            if delay_ns > 0:
                time.sleep(delay_ns / 1e9)

    def stamp(self) -> None:
        """Take the send time now (just before the request goes to gRPC)."""
        self.start_ns = start = time.perf_counter_ns()
        self.t_send_us = time.time_ns() // 1000
        if self.scheduled_ns is not None and start > self.scheduled_ns:
            self.late_us = (start - self.scheduled_ns) // 1000


class _ResponseStream:
    """One ``ModelStreamInfer`` call shared by all requests to one target, reopened after it ends."""

    _CLOSE = object()

    def __init__(self, channel: Any, complete: Callable[[_Pending, int, Any, str | None], None]) -> None:
        self._method = channel.stream_stream(
            _STREAM_METHOD, request_serializer=None, response_deserializer=service_pb2.ModelStreamInferResponse.FromString
        )
        self._complete = complete
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._pending: dict[str, _Pending] = {}
        self._call: Any = None
        self._reader: threading.Thread | None = None
        self.unmatched_responses = 0  # responses whose id matched no waiting request

    def send(self, pending: _Pending) -> None:
        with self._lock:
            if self._reader is None or not self._reader.is_alive():
                self._open()
            self._pending[pending.request_id] = pending
            self._queue.put(pending)  # type: ignore[union-attr]

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        self._queue = requests
        self._pending = {}
        self._call = self._method(self._requests(requests))
        self._reader = threading.Thread(target=self._read, args=(self._call, self._pending), daemon=True,
                                        name="stagebatch-stream-reader")
        self._reader.start()

    def _requests(self, requests: queue.SimpleQueue):
        # runs in gRPC's request-consuming thread: the send time is when gRPC takes the request to write it
        while True:
            pending = requests.get()
            if pending is self._CLOSE:
                return
            pending.wait_until_due()
            pending.stamp()
            yield pending.payload

    def _read(self, responses: Any, pending: dict[str, _Pending]) -> None:
        reason = "the server closed the response stream"
        try:
            for response in responses:
                end_ns = time.perf_counter_ns()
                request = pending.pop(response.infer_response.id, None)
                if request is None and response.error_message and len(pending) == 1:
                    # an error without a usable id can only belong to the one waiting request
                    request = pending.pop(next(iter(pending)))
                if request is None:
                    self.unmatched_responses += 1
                    continue
                if response.error_message:
                    self._complete(request, end_ns, None, response.error_message)
                else:
                    self._complete(request, end_ns, response.infer_response, None)
        except grpc.RpcError as error:
            reason = f"stream failed: {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - a failing stream must still answer every waiting request
            reason = f"stream failed: {type(error).__name__}: {error}"
        finally:
            self.fail_all(f"{StreamClosedError.__name__}: {reason}", pending)

    def fail_all(self, reason: str, pending: dict[str, _Pending] | None = None) -> None:
        pending = self._pending if pending is None else pending
        end_ns = time.perf_counter_ns()
        for request_id in list(pending):
            request = pending.pop(request_id, None)
            if request is not None:
                if not request.start_ns:
                    request.stamp()
                self._complete(request, end_ns, None, reason)

    def expire(self, now_ns: int, timeout_ns: int) -> None:
        """Fail the requests waiting longer than the client timeout."""
        for request_id, request in list(self._pending.items()):
            if request.start_ns and now_ns - request.start_ns > timeout_ns and self._pending.pop(request_id, None):
                self._complete(request, now_ns, None, f"TimeoutError: no streamed response within "
                                                      f"client_timeout_s={timeout_ns / 1e9:g}")

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(self._CLOSE)
        if self._reader is not None:
            self._reader.join(timeout=5)
            if self._reader.is_alive() and self._call is not None:
                self._call.cancel()
                self._reader.join(timeout=5)


class _UnaryWorkers:
    """Threads that each make one blocking ``ModelInfer`` call at a time; a new one starts when none is idle.

    A blocking call waits on its own completion queue with the GIL released, and its thread wakes
    straight from gRPC's completion: measured against perf_analyzer, this kept p50 within a few
    percent where ``future()`` callbacks (one polling thread for every call) and ``grpc.aio`` added
    0.3-0.6 ms and delayed the sending thread.
    """

    _STOP = object()

    def __init__(self, run: Callable[[Any, _Pending], None], max_threads: int) -> None:
        self._run = run
        self._max_threads = max_threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        for _ in range(min(PRESTARTED_UNARY_THREADS, max_threads)):
            self._start()

    def _start(self) -> None:
        thread = threading.Thread(target=self._work, daemon=True, name="stagebatch-unary")
        self._threads.append(thread)
        self._idle += 1
        thread.start()

    def submit(self, method: Any, pending: _Pending) -> None:
        with self._lock:
            if self._idle <= self._queue.qsize() and len(self._threads) < self._max_threads:
                self._start()  # every thread is busy or claimed: one more
        self._queue.put((method, pending))

    def _work(self) -> None:
        get, run, lock = self._queue.get, self._run, self._lock
        while True:
            item = get()
            if item is self._STOP:
                return
            with lock:
                self._idle -= 1
            try:
                run(*item)
            finally:
                with lock:
                    self._idle += 1

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            thread.join(timeout=5)


class _H2Target:
    """The h2c connections to one target (one per address a ``dns:`` name resolves to, used in turn),
    each reopened when it has closed or is going away."""

    def __init__(self, target: str, connect_timeout_s: float = 10.0) -> None:
        self._target = target
        self._connect_timeout_s = connect_timeout_s
        self._addresses: list[tuple[str, int]] = []
        self._connections: list[H2cConnection | None] = []
        self._retired: list[H2cConnection] = []
        self._failed: tuple[float, str] | None = None  # when the last connect failed, and why
        self._turn = 0
        self._lock = threading.Lock()
        self.closed = False

    def connection(self, connect_timeout_s: float | None = None) -> H2cConnection:
        """A usable connection (opened now if need be); :class:`H2cError` if none can be had."""
        with self._lock:
            if self.closed:
                raise H2cError("the client is closed")
            if not self._addresses:
                try:
                    self._addresses = split_target(self._target)
                except (OSError, ValueError) as error:
                    raise H2cError(f"cannot resolve {self._target}: {error}") from None
                self._connections = [None] * len(self._addresses)
            index = self._turn = (self._turn + 1) % len(self._addresses)
            connection = self._connections[index]
            if connection is None or not connection.usable:
                if connection is not None and connection.closed_reason is None:
                    self._retired.append(connection)  # going away: its calls in flight still finish there
                self._retired = [c for c in self._retired if c.closed_reason is None]
                now = time.monotonic()
                if self._failed is not None and now - self._failed[0] < H2_RECONNECT_BACKOFF_S:
                    raise H2cError(self._failed[1])  # fail fast: a dead server costs no connect timeout per request
                host, port = self._addresses[index]
                try:
                    connection = H2cConnection(host, port, connect_timeout_s=connect_timeout_s or self._connect_timeout_s)
                except H2cError as error:
                    self._failed = (time.monotonic(), str(error))
                    raise
                self._failed = None
                self._connections[index] = connection
            return connection

    def connections(self) -> list[H2cConnection]:
        """Every connection that may still have calls in flight."""
        with self._lock:
            return [c for c in self._connections if c is not None] + self._retired

    def close(self, reason: str) -> None:
        with self._lock:
            self.closed = True
            connections = [c for c in self._connections if c is not None] + self._retired
        for connection in connections:
            connection.close(reason)


class _H2Stream:
    """One ``ModelStreamInfer`` call over h2c shared by all requests to one target, reopened after it ends."""

    def __init__(self, target: _H2Target, headers: Callable[[str], bytes],
                 complete: Callable[[_Pending, int, Any, str | None], None]) -> None:
        self._target = target
        self._headers = headers
        self._complete = complete
        self._lock = threading.Lock()
        self._call: Call | None = None
        self._connection: H2cConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self.unmatched_responses = 0

    def _open(self) -> tuple[H2cConnection, Call]:
        # holds self._lock
        connection = self._target.connection()
        pending: dict[str, _Pending] = {}
        call = Call(lambda end_ns, body, error: self._ended(pending, end_ns, error),
                    on_message=lambda end_ns, body: self._message(pending, end_ns, body))
        connection.start(call, self._headers(connection.authority))
        self._connection, self._call, self._pending = connection, call, pending
        return connection, call

    def send(self, pending: _Pending) -> None:
        with self._lock:
            try:
                if self._call is None or self._call.ended:
                    self._open()
            except H2cError as error:
                pending.stamp()
                self._complete(pending, time.perf_counter_ns(), None, f"UNAVAILABLE: {error}")
                return
            connection, call, waiting = self._connection, self._call, self._pending
            waiting[pending.request_id] = pending
        # outside the lock: a send waiting for flow control must not block the reader's matching
        if not connection.send_message(call, pending.payload, stamp=pending.stamp):  # type: ignore[union-attr, arg-type]
            with self._lock:
                failed = waiting.pop(pending.request_id, None) is not None
            if failed:
                if not pending.start_ns:
                    pending.stamp()
                self._complete(pending, time.perf_counter_ns(), None,
                               f"{StreamClosedError.__name__}: the stream ended before the request was sent")

    def _message(self, pending: dict[str, _Pending], end_ns: int, body: bytes) -> None:
        response = service_pb2.ModelStreamInferResponse.FromString(body)
        with self._lock:
            request = pending.pop(response.infer_response.id, None)
            if request is None and response.error_message and len(pending) == 1:
                # an error without a usable id can only belong to the one waiting request
                request = pending.pop(next(iter(pending)))
        if request is None:
            self.unmatched_responses += 1
        elif response.error_message:
            self._complete(request, end_ns, None, response.error_message)
        else:
            self._complete(request, end_ns, response.infer_response, None)

    def _ended(self, pending: dict[str, _Pending], end_ns: int, error: str | None) -> None:
        self.fail_all(f"{StreamClosedError.__name__}: {error or 'the server ended the response stream'}", pending, end_ns)

    def fail_all(self, reason: str, pending: dict[str, _Pending] | None = None, end_ns: int | None = None) -> None:
        with self._lock:
            pending = self._pending if pending is None else pending
            requests = [pending.pop(request_id) for request_id in list(pending)]
        end_ns = end_ns or time.perf_counter_ns()
        for request in requests:
            if not request.start_ns:
                request.stamp()
            self._complete(request, end_ns, None, reason)

    def expire(self, now_ns: int, timeout_ns: int) -> None:
        """Fail the requests waiting longer than the client timeout."""
        with self._lock:
            late = [rid for rid, r in self._pending.items() if r.start_ns and now_ns - r.start_ns > timeout_ns]
            requests = [self._pending.pop(rid) for rid in late]
        for request in requests:
            self._complete(request, now_ns, None, f"TimeoutError: no streamed response within "
                                                  f"client_timeout_s={timeout_ns / 1e9:g}")

    def close(self, wait_s: float = 5.0) -> None:
        """Half-close the stream; wait a little for the server to end it."""
        with self._lock:
            connection, call = self._connection, self._call
        if connection is None or call is None:
            return
        connection.finish(call)
        deadline = time.monotonic() + wait_s
        while not call.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        if not call.ended:
            connection.cancel(call, f"{StreamClosedError.__name__}: the client closed the stream")


class _H2Writer:
    """The thread that sends requests handed over ahead of their time, each when it is due."""

    _STOP = object()

    def __init__(self, send: Callable[[int, _Pending], None]) -> None:
        self._send = send
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, daemon=True, name="stagebatch-h2-writer")
        self._thread.start()

    def submit(self, turn: int, pending: _Pending) -> None:
        self._queue.put((turn, pending))

    def _work(self) -> None:
        get, send = self._queue.get, self._send
        while True:
            item = get()
            if item is self._STOP:
                return
            item[1].wait_until_due()
            send(*item)

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout=5)


class TritonLoadClient:
    """Sends requests of one model variant asynchronously and reports each one as a :class:`RequestRecord`.

    :meth:`send` returns at once; ``on_record`` receives every record (success, error, timeout or
    cancellation) on the thread that made the call. ``channels`` replaces the real channels (tests);
    ``max_threads`` bounds the unary calls in flight (more wait, and their lateness is recorded).
    """

    def __init__(
        self,
        grpc_url: str,
        factory: RequestFactory,
        *,
        model: str,
        on_record: Callable[[RequestRecord], None],
        protocol: str = "",
        priority: int = 0,
        timeout_us: int = 0,
        client_timeout_s: float = 60.0,
        worker: int = 0,
        channels: list[Any] | None = None,
        max_threads: int = MAX_UNARY_THREADS,
        transport: str = "",
    ) -> None:
        self.factory = factory
        self.model = model
        self.variant = factory.variant
        self.protocol = protocol or DEFAULT_PROTOCOL[factory.variant]
        if self.protocol not in PROTOCOLS:
            raise ConfigValidationError(f"protocol {self.protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
        # fake grpcio channels (tests) imply grpcio
        self.transport = transport or ("grpcio" if channels is not None else DEFAULT_TRANSPORT)
        if self.transport not in TRANSPORTS:
            raise ConfigValidationError(f"transport {self.transport!r} is unknown; choose one of {', '.join(TRANSPORTS)}")
        if self.transport == "h2" and channels is not None:
            raise ConfigValidationError("channels are grpcio channels: give transport='grpcio' with them")
        self.on_record = on_record
        self.client_timeout_s = client_timeout_s
        self.worker = worker
        self.wants_record = factory.variant in RECORD_VARIANTS
        self._ids = itertools.count()
        self._prefix = f"{worker}-"
        self._channels: list[Any] = []
        self._unary: list[Any] = []
        self._streams: list[Any] = []
        self._targets: list[_H2Target] = []
        if self.transport == "h2":
            self._targets = [_H2Target(t) for t in parse_targets(grpc_url)]
            self._unary_headers: dict[str, bytes] = {}
            if self.protocol == "stream":
                self._streams = [_H2Stream(t, self._stream_headers, self._complete) for t in self._targets]
            self._writer = _H2Writer(self._send_h2)
            self._turn = itertools.cycle(range(len(self._targets)))
        else:
            self._channels = channels if channels is not None else [open_channel(t) for t in parse_targets(grpc_url)]
            self._turn = itertools.cycle(range(len(self._channels)))
            self._unary = [
                channel.unary_unary(_INFER_METHOD, request_serializer=None, response_deserializer=None)
                for channel in self._channels
            ]
            if self.protocol == "stream":
                self._streams = [_ResponseStream(c, self._complete) for c in self._channels]
            self._workers = _UnaryWorkers(self._call_unary, max_threads)
        # the run's constant request parameters, serialised once and appended to every request
        params = service_pb2.ModelInferRequest()
        if priority:
            params.parameters["priority"].uint64_param = priority
        if timeout_us:
            params.parameters["timeout"].int64_param = timeout_us
        if self.wants_record:
            params.parameters[REORCH_RECORD_PARAMETER].bool_param = True
        self._suffix = params.SerializeToString()
        self._lock = threading.Condition()
        self._sent = 0
        self._completed = 0

    # ---- connection ---------------------------------------------------------------------------

    def connect(self, timeout_s: float = 10.0) -> bool:
        """Open every connection now, so the first request does not pay for it; False if not ready in time."""
        if self.transport == "h2":
            try:
                for target in self._targets:
                    target.connection(timeout_s)
            except H2cError as error:
                LOGGER.warning("%s", error)
                return False
            return True
        try:
            for channel in self._channels:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    @property
    def unmatched_responses(self) -> int:
        return sum(stream.unmatched_responses for stream in self._streams)

    @property
    def inflight(self) -> int:
        return self._sent - self._completed

    # ---- sending ------------------------------------------------------------------------------

    def send(self, seq_len: int | None, *, scheduled_ns: int | None = None,
             then: Callable[[], None] | None = None) -> None:
        """Send one request now, or at ``scheduled_ns`` (``perf_counter_ns``) if that is later.

        Its record goes to ``on_record``, then ``then()`` runs (closed loop). The thread that makes
        the call waits for the scheduled time itself, so an open-loop scheduler may hand arrivals
        over a little early and wake once for several of them.
        """
        with self._lock:  # the factory's cache is shared by the scheduler and the closed-loop callbacks
            self._sent += 1
            request_id = self._prefix + str(next(self._ids))
            template = self.factory.request_bytes(seq_len)
        pending = _Pending(request_id, seq_len, template + self._suffix + _encode_id(request_id), scheduled_ns, then)
        turn = next(self._turn)
        if self.transport == "h2":
            if scheduled_ns is not None and scheduled_ns > time.perf_counter_ns():
                self._writer.submit(turn, pending)  # it sends when due
            else:
                self._send_h2(turn, pending)
            return
        if self._streams:
            self._streams[turn].send(pending)
            return
        self._workers.submit(self._unary[turn], pending)

    def _stream_headers(self, authority: str) -> bytes:
        return request_headers(_STREAM_METHOD, authority)

    def _send_h2(self, turn: int, pending: _Pending) -> None:
        if self._streams:
            self._streams[turn].send(pending)
            return
        try:
            connection = self._targets[turn].connection()
        except H2cError as error:
            pending.stamp()
            self._complete(pending, time.perf_counter_ns(), None, f"UNAVAILABLE: {error}")
            return
        headers = self._unary_headers.get(connection.authority)
        if headers is None:
            headers = self._unary_headers[connection.authority] = request_headers(
                _INFER_METHOD, connection.authority, self.client_timeout_s)
        call = Call(lambda end_ns, body, error: self._complete(pending, end_ns, body, error), context=pending)
        connection.start(call, headers, pending.payload, stamp=pending.stamp)

    def _call_unary(self, method: Any, pending: _Pending) -> None:
        pending.wait_until_due()
        pending.stamp()  # on the thread that makes the call, just before it
        try:
            response = method(pending.payload, timeout=self.client_timeout_s)
        except grpc.RpcError as rpc_error:
            end_ns = time.perf_counter_ns()
            code = rpc_error.code()  # type: ignore[attr-defined]
            self._complete(pending, end_ns, None, f"{code.name if code else 'UNKNOWN'}: {rpc_error.details()}")  # type: ignore[attr-defined]
        except Exception as other:  # noqa: BLE001 - a channel that cannot even start the call still yields one record
            self._complete(pending, time.perf_counter_ns(), None, f"{type(other).__name__}: {other}")
        else:
            self._complete(pending, time.perf_counter_ns(), response, None)

    def _complete(self, pending: _Pending, end_ns: int, response: Any, error: str | None) -> None:
        server = None
        if error is None and self.wants_record:
            try:
                if isinstance(response, bytes):
                    response = service_pb2.ModelInferResponse.FromString(response)
                server = reorch_record_bytes(response)
            except Exception as other:  # noqa: BLE001 - a malformed response fails this request only
                error = f"{type(other).__name__}: {other}"
        record = RequestRecord(
            t_send_us=pending.t_send_us,
            latency_us=(end_ns - pending.start_ns) // 1000,
            model=self.model,
            variant=self.variant,
            seq_len=pending.seq_len,
            rows=self.factory.rows,
            ok=error is None,
            error=error,
            server=server,
            request_id=pending.request_id,
            late_us=pending.late_us,
            worker=self.worker,
        )
        try:
            self.on_record(record)
        finally:
            with self._lock:
                self._completed += 1
                if self._completed == self._sent:
                    self._lock.notify_all()
            if pending.then is not None:
                pending.then()

    # ---- end ----------------------------------------------------------------------------------

    def expire(self) -> None:
        """Fail streamed requests older than the client timeout (unary calls carry a gRPC deadline)."""
        now_ns, timeout_ns = time.perf_counter_ns(), int(self.client_timeout_s * 1e9)
        for stream in self._streams:
            stream.expire(now_ns, timeout_ns)
        for connection, call in self._h2_open_calls():
            request = call.context
            if isinstance(request, _Pending) and request.start_ns and now_ns - request.start_ns > timeout_ns:
                connection.cancel(call, f"DEADLINE_EXCEEDED: no response within "
                                        f"client_timeout_s={self.client_timeout_s:g}")

    def _h2_open_calls(self) -> list[tuple[H2cConnection, Call]]:
        """Every h2 call not yet ended, with its connection (a snapshot)."""
        return [(connection, call) for target in self._targets for connection in target.connections()
                for call in connection.open_calls]

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every sent request has its record; False if some are still in flight."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._completed < self._sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(timeout=min(left, 0.2))
                self._lock.release()
                try:
                    self.expire()
                finally:
                    self._lock.acquire()
        return True

    def cancel_all(self, reason: str) -> None:
        """Record every request still waiting as failed with ``reason`` (the window closed long ago)."""
        for stream in self._streams:
            stream.fail_all(reason)
        for connection, call in self._h2_open_calls():
            connection.cancel(call, reason)

    def close(self) -> None:
        if self.transport == "h2":
            self._writer.close()
        for stream in self._streams:
            stream.close()
        for target in self._targets:
            target.close("CANCELLED: the load generator closed the connection")  # each open call gets its record
        for channel in self._channels:
            channel.close()  # cancels the calls still in flight: each gets its record
        if self.transport == "grpcio":
            self._workers.close()


def reorch_record_bytes(response: service_pb2.ModelInferResponse) -> bytes | None:
    """The raw ``REORCH_RECORD`` document (BYTES, one JSON document) when the response has it."""
    for index, output in enumerate(response.outputs):
        if output.name != REORCH_RECORD_OUTPUT:
            continue
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            # BYTES tensors are serialised as a 4-byte little-endian length followed by the bytes
            size = int.from_bytes(raw[:4], "little")
            return raw[4 : 4 + size]
        return output.contents.bytes_contents[0]
    return None
