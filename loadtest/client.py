"""The Triton gRPC client of the load generator: one ``grpc.aio`` event loop, no gevent; one :class:`RequestRecord` per request.

It runs in the sender process (:mod:`loadtest.sender`), on that process's event loop (uvloop where
installed), never in a gevent-patched Locust process: sending from gevent greenlets made every
response hop from gRPC's threads to the gevent hub before its timestamp was taken, which added
0.6-1 ms to every latency (issue 10). A thread per call kept the timestamps close but cost about
270 µs of CPU per request (one thread switch or more each way); one event loop costs about half.
Here:

* **unary** (``ModelInfer``): :meth:`TritonLoadClient.send` starts one task per request; the send
  time is taken in that task just before the call is handed to gRPC, the end time as soon as the
  call's result wakes it;
* **stream** (``ModelStreamInfer``, the decoupled ``reorch`` variant): one bidirectional stream per
  target; the send time is taken when gRPC pulls the request off the queue to write it, the end
  time by the stream's reader task as soon as the response arrives; responses are matched by
  request id.

Requests are serialised once per distinct input (:meth:`RequestFactory.request_bytes`); each call
only appends its id (and the run's constant parameters) as protobuf fields, which protobuf merges.
The ``REORCH_RECORD`` JSON is not parsed on the hot path: the record keeps its raw bytes in
``server`` until :func:`finish_record` parses it after the window.

The server address may be one ``host:port``, a comma-separated list of them (one channel each,
requests spread round robin), or one ``dns:///host:port`` (gRPC's ``round_robin`` policy over the
addresses the name resolves to); see :func:`parse_targets`.

Every call produces exactly one record, also when it fails, times out or is cancelled.
Latencies are raw integers in microseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2

from loadtest.request_factory import REORCH_RECORD_OUTPUT
from core.errors import ConfigValidationError

if TYPE_CHECKING:
    from loadtest.request_factory import RequestFactory

LOGGER = logging.getLogger(__name__)

PROTOCOLS = ("unary", "stream")
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
# pool of event_engine threads first: more thread switches per request. Measured in the sender process
# against the trivial model (2 shared cores, under contention): with blocking calls on threads, CPU per
# request 500 -> 380 µs at 1,000 req/s; with the grpc.aio loop, 514 -> 380 µs at 1,000 req/s and no
# change at 2,000 req/s. An experiment a later grpcio no longer knows is ignored. Set in the sender's
# environment (read when grpc starts).
GRPC_EXPERIMENTS_OFF = ("event_engine_client", "event_engine_listener", "event_engine_callback_cq", "event_engine_fork")
STREAM_CLOSE_TIMEOUT_S = 5.0  # closing a stream still waiting for answers: then it is cancelled
STREAM_END_WAIT_S = 0.5  # closing a stream with every request answered
IDLE_POLL_S = 0.2  # how often a drain looks for streamed requests past the client timeout
CANCELLED = "cancelled: the load generator stopped before the response arrived"
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


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure ``grpc.aio`` channel to one target (``round_robin`` over a dns: name's addresses); call on the loop."""
    options = list(_CHANNEL_OPTIONS)
    if target.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.aio.insecure_channel(target, options=options)


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

    __slots__ = ("done", "late_us", "payload", "request_id", "scheduled_ns", "seq_len", "start_ns", "t_send_us", "then")

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
        self.done = False

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
        self._queue: asyncio.Queue | None = None
        self._pending: dict[str, _Pending] = {}
        self._call: Any = None
        self._reader: asyncio.Task | None = None
        self.unmatched_responses = 0  # responses whose id matched no waiting request

    def send(self, pending: _Pending) -> None:
        if self._reader is None or self._reader.done():
            self._open()
        self._pending[pending.request_id] = pending
        self._queue.put_nowait(pending)  # type: ignore[union-attr]

    def _open(self) -> None:
        self._queue = requests = asyncio.Queue()
        self._pending = {}
        self._call = self._method(self._requests(requests))
        self._reader = asyncio.get_running_loop().create_task(self._read(self._call, self._pending))

    async def _requests(self, requests: asyncio.Queue):
        # consumed by gRPC's writer: the send time is when gRPC takes the request to write it
        while True:
            pending = await requests.get()
            if pending is self._CLOSE:
                return
            pending.stamp()
            yield pending.payload

    async def _read(self, responses: Any, pending: dict[str, _Pending]) -> None:
        reason = "the server closed the response stream"
        try:
            async for response in responses:
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
        except asyncio.CancelledError:
            reason = "the stream was cancelled"
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

    async def close(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(self._CLOSE)
        if self._reader is not None:
            # a stream with nothing left to answer only has to see the end of the requests
            wait_s = STREAM_CLOSE_TIMEOUT_S if self._pending else STREAM_END_WAIT_S
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), wait_s)
            except asyncio.TimeoutError:
                self._call.cancel()
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)


class TritonLoadClient:
    """Sends requests of one model variant from an asyncio event loop; one :class:`RequestRecord` each.

    Create it, and call every method, on the loop's thread. :meth:`send` returns at once;
    ``on_record`` receives every record (success, error, timeout or cancellation) on that thread.
    ``channels`` replaces the real ``grpc.aio`` channels (tests).
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
    ) -> None:
        self.factory = factory
        self.model = model
        self.variant = factory.variant
        self.protocol = protocol or DEFAULT_PROTOCOL[factory.variant]
        if self.protocol not in PROTOCOLS:
            raise ConfigValidationError(f"protocol {self.protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
        self.on_record = on_record
        self.client_timeout_s = client_timeout_s
        self.worker = worker
        self.wants_record = factory.variant in RECORD_VARIANTS
        self._ids = itertools.count()
        self._prefix = f"{worker}-"
        self._loop = asyncio.get_running_loop()
        self._channels = channels if channels is not None else [open_channel(t) for t in parse_targets(grpc_url)]
        self._turn = itertools.cycle(range(len(self._channels)))
        self._unary = [
            channel.unary_unary(_INFER_METHOD, request_serializer=None, response_deserializer=None)
            for channel in self._channels
        ]
        self._streams = [_ResponseStream(c, self._complete) for c in self._channels] if self.protocol == "stream" else []
        self._calls: set[asyncio.Task] = set()  # unary calls in flight (the loop keeps only weak references)
        # the run's constant request parameters, serialised once and appended to every request
        params = service_pb2.ModelInferRequest()
        if priority:
            params.parameters["priority"].uint64_param = priority
        if timeout_us:
            params.parameters["timeout"].int64_param = timeout_us
        if self.wants_record:
            params.parameters[REORCH_RECORD_PARAMETER].bool_param = True
        self._suffix = params.SerializeToString()
        self._sent = 0
        self._completed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cancel_reason = CANCELLED

    # ---- connection ---------------------------------------------------------------------------

    async def connect(self, timeout_s: float = 10.0) -> bool:
        """Open every connection now, so the first request does not pay for it; False if not ready in time."""
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), timeout_s)
        except asyncio.TimeoutError:
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
        """Send one request now (on the loop's thread); ``scheduled_ns`` (``perf_counter_ns``) is when it was due.

        Its record goes to ``on_record``, then ``then()`` runs (closed loop: the next request).
        """
        self._sent += 1
        self._idle.clear()
        request_id = self._prefix + str(next(self._ids))
        pending = _Pending(request_id, seq_len, self.factory.request_bytes(seq_len) + self._suffix + _encode_id(request_id),
                           scheduled_ns, then)  # fmt: skip
        turn = next(self._turn)
        if self._streams:
            self._streams[turn].send(pending)
            return
        task = self._loop.create_task(self._call_unary(self._unary[turn], pending))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call_unary(self, method: Any, pending: _Pending) -> None:
        pending.stamp()  # just before the call is handed to gRPC
        try:
            response = await method(pending.payload, timeout=self.client_timeout_s)
        except grpc.RpcError as rpc_error:
            end_ns = time.perf_counter_ns()
            code = rpc_error.code()  # type: ignore[attr-defined]
            self._complete(pending, end_ns, None, f"{code.name if code else 'UNKNOWN'}: {rpc_error.details()}")  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            self._complete(pending, time.perf_counter_ns(), None, self._cancel_reason)
        except Exception as other:  # noqa: BLE001 - a channel that cannot even start the call still yields one record
            self._complete(pending, time.perf_counter_ns(), None, f"{type(other).__name__}: {other}")
        else:
            self._complete(pending, time.perf_counter_ns(), response, None)

    def _complete(self, pending: _Pending, end_ns: int, response: Any, error: str | None) -> None:
        if pending.done:
            return  # answered already (a late response after a timeout or cancel): exactly one record
        pending.done = True
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
            self._completed += 1
            if self._completed == self._sent:
                self._idle.set()
            if pending.then is not None:
                pending.then()

    # ---- end ----------------------------------------------------------------------------------

    def expire(self) -> None:
        """Fail streamed requests older than the client timeout (unary calls carry a gRPC deadline)."""
        now_ns, timeout_ns = time.perf_counter_ns(), int(self.client_timeout_s * 1e9)
        for stream in self._streams:
            stream.expire(now_ns, timeout_ns)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every sent request has its record; False if some are still in flight."""
        deadline = time.monotonic() + timeout_s
        while self._completed < self._sent:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), min(left, IDLE_POLL_S))
            except asyncio.TimeoutError:
                self.expire()
        return True

    def cancel_all(self, reason: str) -> None:
        """Record every request still waiting as failed with ``reason`` (the window closed long ago)."""
        self._cancel_reason = reason
        for stream in self._streams:
            stream.fail_all(reason)
        for task in list(self._calls):
            task.cancel()

    async def close(self) -> None:
        """Close the streams and channels; every request still in flight gets its (cancelled) record."""
        for stream in self._streams:
            await stream.close()
        await asyncio.sleep(0)  # a call task cancelled before its first step would never write its record
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


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
