"""A gevent-friendly Triton gRPC client for load generation: one :class:`RequestRecord` per request.

Unary ``ModelInfer`` serves the ``whole`` and ``ensemble`` variants; the decoupled ``reorch`` variant
answers only on the bidirectional ``ModelStreamInfer`` stream, where responses may come back out of
order, so a :class:`_ResponseStream` matches them to requests by request id. Requests are
Triton's own protobufs (``tritonclient.grpc.service_pb2``) sent on a plain gRPC stub: tritonclient's
stream callback drops the request id of error responses, which would make errors unmatchable.

Every call produces exactly one record, also when it fails, times out or is cancelled: the record
is handed to ``on_record`` in a ``finally`` block. Latencies are raw integers in microseconds
(Locust's own statistics round to two significant digits).

The client must run in greenlets of a process where gevent has monkey-patched the standard
library (a Locust process); :func:`enable_gevent_grpc` makes gRPC's I/O cooperative there.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.queue
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loadtest.request_factory import REORCH_RECORD_OUTPUT

if TYPE_CHECKING:
    from loadtest.request_factory import RequestFactory

LOGGER = logging.getLogger(__name__)

STREAMING_VARIANTS = ("reorch",)
# Triton's own client allows messages up to INT32_MAX; the default 4 MiB is too small for big tensors.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
_gevent_grpc_enabled = False


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
    server: dict | None  # REORCH_RECORD document, parsed
    request_id: str = ""
    late_us: int = 0  # open loop: how far behind its scheduled time the request was sent
    worker: int = 0  # index of the Locust process that sent it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)


def enable_gevent_grpc() -> None:
    """Make gRPC cooperative with gevent (once, before the first channel) when gevent patched the process."""
    global _gevent_grpc_enabled
    if _gevent_grpc_enabled:
        return
    import gevent.monkey

    if gevent.monkey.is_module_patched("socket"):
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
    _gevent_grpc_enabled = True


class StreamClosedError(Exception):
    """The response stream ended before this request was answered."""


class ServerError(Exception):
    """The server answered this request with an error."""


class _ResponseStream:
    """One ``ModelStreamInfer`` call shared by many request greenlets, reopened after it ends."""

    _CLOSE = object()

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub
        self._requests: gevent.queue.Queue | None = None
        self._pending: dict[str, gevent.event.AsyncResult] = {}
        self._reader: gevent.Greenlet | None = None
        self._call: Any = None
        self.unmatched_responses = 0  # responses whose id matched no waiting request

    def call(self, request: service_pb2.ModelInferRequest, timeout_s: float) -> service_pb2.ModelInferResponse:
        if self._reader is None or self._reader.dead:
            self._open()
        assert self._requests is not None
        waiter = gevent.event.AsyncResult()
        pending = self._pending
        pending[request.id] = waiter
        self._requests.put(request)
        try:
            response, error = waiter.get(timeout=timeout_s)
        except gevent.Timeout:
            raise TimeoutError(f"no streamed response within client_timeout_s={timeout_s}") from None
        finally:
            pending.pop(request.id, None)
        if error is not None:
            raise error
        return response

    def _open(self) -> None:
        requests: gevent.queue.Queue = gevent.queue.Queue()
        self._requests = requests
        self._pending = {}
        self._call = self._stub.ModelStreamInfer(iter(requests.get, self._CLOSE))
        self._reader = gevent.spawn(self._read, self._call, self._pending)

    def _read(self, responses: Any, pending: dict[str, gevent.event.AsyncResult]) -> None:
        reason = "the server closed the response stream"
        try:
            for response in responses:
                waiter = pending.pop(response.infer_response.id, None)
                if waiter is None and response.error_message and len(pending) == 1:
                    # an error without a usable id can only belong to the one waiting request
                    waiter = pending.pop(next(iter(pending)))
                if waiter is None:
                    self.unmatched_responses += 1
                    continue
                if response.error_message:
                    waiter.set((None, ServerError(response.error_message)))
                else:
                    waiter.set((response.infer_response, None))
        except grpc.RpcError as error:
            reason = f"stream failed: {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
        finally:
            for waiter in list(pending.values()):
                waiter.set((None, StreamClosedError(reason)))
            pending.clear()

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(self._CLOSE)
        if self._reader is not None:
            self._reader.join(timeout=5)
            if not self._reader.dead and self._call is not None:
                self._call.cancel()
                self._reader.join(timeout=5)


class TritonLoadClient:
    """Sends requests of one model variant and reports each one as a :class:`RequestRecord`.

    ``send`` blocks only the calling greenlet; call it from many greenlets for concurrency. The
    ``on_record`` callback receives every record (success, error, timeout or cancellation).
    """

    def __init__(
        self,
        grpc_url: str,
        factory: RequestFactory,
        *,
        model: str,
        on_record: Callable[[RequestRecord], None],
        priority: int = 0,
        timeout_us: int = 0,
        client_timeout_s: float = 60.0,
        worker: int = 0,
    ) -> None:
        enable_gevent_grpc()
        self.factory = factory
        self.model = model
        self.variant = factory.variant
        self.streaming = factory.variant in STREAMING_VARIANTS
        self.on_record = on_record
        self.priority = priority
        self.timeout_us = timeout_us
        self.client_timeout_s = client_timeout_s
        self.worker = worker
        self._ids = itertools.count()
        self._channel = grpc.insecure_channel(grpc_url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._stream = _ResponseStream(self._stub) if self.streaming else None

    def connect(self, timeout_s: float = 10.0) -> bool:
        """Open the connection now, so the first request does not pay for it; False if not ready in time."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    @property
    def unmatched_responses(self) -> int:
        return self._stream.unmatched_responses if self._stream is not None else 0

    def _request(self, seq_len: int | None, request_id: str) -> service_pb2.ModelInferRequest:
        template = self.factory.request_proto(seq_len)
        if not (self.streaming or self.priority or self.timeout_us):
            return template  # unary without per-request fields: the cached message is sent as is
        request = service_pb2.ModelInferRequest()
        request.CopyFrom(template)
        request.id = request_id
        if self.priority:
            request.parameters["priority"].uint64_param = self.priority
        if self.timeout_us:
            request.parameters["timeout"].int64_param = self.timeout_us
        return request

    def send(self, seq_len: int | None, *, late_us: int = 0) -> RequestRecord:
        """Send one request and wait (this greenlet only) for its answer; never raises for a failed request."""
        request_id = f"{self.worker}-{next(self._ids)}"
        request = self._request(seq_len, request_id)
        ok, error, server = False, None, None
        t_send_us = time.time_ns() // 1000
        start_ns = time.perf_counter_ns()
        try:
            if self._stream is not None:
                response = self._stream.call(request, self.client_timeout_s)
            else:
                response = self._stub.ModelInfer(request, timeout=self.client_timeout_s)
            latency_us = (time.perf_counter_ns() - start_ns) // 1000
            server = _reorch_record(response)
            ok = True
        except grpc.RpcError as rpc_error:
            error = f"{rpc_error.code().name}: {rpc_error.details()}"  # type: ignore[attr-defined]
        except gevent.GreenletExit:
            error = "cancelled: the load generator stopped before the response arrived"
            raise
        except Exception as other:  # stream errors, timeouts, a malformed REORCH_RECORD
            error = f"{type(other).__name__}: {other}"
        finally:
            if not ok:
                latency_us = (time.perf_counter_ns() - start_ns) // 1000
            record = RequestRecord(
                t_send_us=t_send_us,
                latency_us=latency_us,
                model=self.model,
                variant=self.variant,
                seq_len=seq_len,
                rows=self.factory.rows,
                ok=ok,
                error=error,
                server=server,
                request_id=request_id,
                late_us=late_us,
                worker=self.worker,
            )
            self.on_record(record)
        return record

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._channel.close()


def _reorch_record(response: service_pb2.ModelInferResponse) -> dict | None:
    """Parse the ``REORCH_RECORD`` output (BYTES, one JSON document) when the response has it."""
    for index, output in enumerate(response.outputs):
        if output.name != REORCH_RECORD_OUTPUT:
            continue
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            # BYTES tensors are serialised as a 4-byte little-endian length followed by the bytes
            size = int.from_bytes(raw[:4], "little")
            document = raw[4 : 4 + size]
        else:
            document = output.contents.bytes_contents[0]
        parsed = json.loads(document)
        if not isinstance(parsed, dict):
            raise ValueError(f"{REORCH_RECORD_OUTPUT} is not a JSON object: {document[:80]!r}")
        return parsed
    return None
