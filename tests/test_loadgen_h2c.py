"""The h2c transport (loadtest/h2c.py) through TritonLoadClient, against a fake in-process HTTP/2 gRPC server."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import hpack
import pytest
from tritonclient.grpc import service_pb2

from loadtest import h2c
from loadtest.client import RequestRecord, TritonLoadClient
from loadtest.request_factory import RequestFactory, model_entry
from tests.helpers import seq_manifest

MANIFEST = seq_manifest(max_length=4096)
DELAY_S = 0.02


class FakeServer:
    """A gRPC server speaking just enough h2c: it decodes each request message and lets ``behaviour``
    answer it: ``behaviour(server, stream_id, request_bytes)`` (called on the server's thread).

    It gives the client the protocol's default 64 KiB windows and tops them up as data arrives, and
    encodes its headers with hpack's default encoder (Huffman strings, dynamic table).
    """

    def __init__(self, behaviour: Callable[[FakeServer, int, bytes], None]) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.lock = threading.Lock()
        self.paths: dict[int, str] = {}
        self.received: list[tuple[int, int, int]] = []  # (stream id, wall ns, perf ns) when a message was complete
        self.answered: dict[int, int] = {}  # stream id -> perf ns just before the answer went out
        self.sock: socket.socket | None = None
        self.violations: list[str] = []  # flow control or frame size broken by the client
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.sendall(h2c.frame(kind, flags, stream_id, payload))

    def answer(self, stream_id: int, message: bytes | None, status: int = 0, text: str = "",
               end_stream: bool = True) -> None:
        """Response headers, one message (split into 16 KiB frames), then trailers."""
        self.answered[stream_id] = time.perf_counter_ns()
        if message is not None:
            self.send(h2c.HEADERS, h2c.END_HEADERS, stream_id,
                      self.encoder.encode([(":status", "200"), ("content-type", "application/grpc")]))
            data = h2c.grpc_message(message)
            for offset in range(0, len(data), h2c.DEFAULT_MAX_FRAME):
                self.send(h2c.DATA, 0, stream_id, data[offset : offset + h2c.DEFAULT_MAX_FRAME])
        if end_stream:
            trailers = [("grpc-status", str(status))] + ([("grpc-message", text)] if text else [])
            if message is None:
                trailers = [(":status", "200"), ("content-type", "application/grpc"), *trailers]
            self.send(h2c.HEADERS, h2c.END_HEADERS | h2c.END_STREAM, stream_id, self.encoder.encode(trailers))

    def _serve(self) -> None:
        self.sock, _ = self.listener.accept()
        sock = self.sock
        buffer = b""
        while len(buffer) < len(h2c.PREFACE):
            buffer += sock.recv(65536)
        assert buffer.startswith(h2c.PREFACE)
        buffer = buffer[len(h2c.PREFACE) :]
        self.send(h2c.SETTINGS, 0, 0, struct.pack(">HL", h2c.SETTINGS_MAX_CONCURRENT_STREAMS, 1000))
        messages: dict[int, bytes] = {}
        windows = {0: h2c.DEFAULT_WINDOW}  # what the client may still send, per stream and on the connection
        try:
            while True:
                while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    buffer += chunk
                size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                stream_id = int.from_bytes(buffer[5:9], "big") & h2c.MAX_STREAM_ID
                payload, buffer = buffer[9 : 9 + size], buffer[9 + size :]
                if kind == h2c.SETTINGS and not flags & h2c.ACK:
                    self.send(h2c.SETTINGS, h2c.ACK, 0)
                elif kind == h2c.HEADERS:
                    self.paths[stream_id] = dict(self.decoder.decode(payload))[":path"]
                elif kind == h2c.DATA:
                    windows[0] -= size
                    windows[stream_id] = windows.get(stream_id, h2c.DEFAULT_WINDOW) - size
                    if size > h2c.DEFAULT_MAX_FRAME or windows[0] < 0 or windows[stream_id] < 0:
                        self.violations.append(f"DATA of {size} bytes on stream {stream_id}, windows {windows}")
                    if size:  # give the window back a little later, as a real server does
                        time.sleep(0.005)
                        windows[0] += size
                        windows[stream_id] += size
                        self.send(h2c.WINDOW_UPDATE, 0, 0, struct.pack(">L", size))
                        self.send(h2c.WINDOW_UPDATE, 0, stream_id, struct.pack(">L", size))
                    data = messages.get(stream_id, b"") + payload
                    while len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
                        length = int.from_bytes(data[1:5], "big")
                        self.received.append((stream_id, time.time_ns(), time.perf_counter_ns()))
                        self.behaviour(self, stream_id, data[5 : 5 + length])
                        data = data[5 + length :]
                    messages[stream_id] = data
                    if flags & h2c.END_STREAM and self.paths[stream_id].endswith("/ModelStreamInfer"):
                        self.send(h2c.HEADERS, h2c.END_HEADERS | h2c.END_STREAM, stream_id,
                                  self.encoder.encode([("grpc-status", "0")]))  # the client half-closed: end it
        except OSError:
            return

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
        self.listener.close()


def echo(server: FakeServer, stream_id: int, payload: bytes, *, delay_s: float = 0.0, extra: bytes = b"") -> None:
    """Answer a ModelInferRequest (unary) or a streamed one with its id; ``extra`` pads the response."""
    request = service_pb2.ModelInferRequest.FromString(payload)
    time.sleep(delay_s)
    response = service_pb2.ModelInferResponse(id=request.id, model_name=request.model_name)
    if extra:
        response.raw_output_contents.append(extra)
    if server.paths[stream_id].endswith("/ModelStreamInfer"):
        server.answer(stream_id, service_pb2.ModelStreamInferResponse(infer_response=response).SerializeToString(),
                      end_stream=False)
    else:
        server.answer(stream_id, response.SerializeToString())


def run_client(server: FakeServer, lengths: list[int], *, protocol: str = "unary", variant: str = "whole",
               timeout_s: float = 10.0, **kw) -> tuple[list[RequestRecord], TritonLoadClient]:
    records: list[RequestRecord] = []
    factory = RequestFactory(model_entry(MANIFEST, "seq"), variant, seed=0)
    client = TritonLoadClient(server.url, factory, model="seq", on_record=records.append, protocol=protocol,
                              transport="h2", **kw)
    assert client.connect(timeout_s=5)
    for length in lengths:
        client.send(length)
    assert client.wait_idle(timeout_s), f"{client.inflight} requests without a record"
    client.close()
    return records, client


@pytest.fixture
def serve():
    servers: list[FakeServer] = []

    def start(behaviour):
        server = FakeServer(behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_h2c_round_trip_and_the_timestamps_bracket_the_call(serve, protocol):
    server = serve(lambda s, sid, payload: echo(s, sid, payload, delay_s=DELAY_S))
    records, _ = run_client(server, [5, 6, 7], protocol=protocol)
    assert len(records) == 3 and all(r.ok for r in records), [r.error for r in records]
    assert sorted(r.seq_len for r in records) == [5, 6, 7]
    path = "/inference.GRPCInferenceService/" + ("ModelStreamInfer" if protocol == "stream" else "ModelInfer")
    assert set(server.paths.values()) == {path}
    assert len(server.paths) == (1 if protocol == "stream" else 3)  # one long-lived stream
    for record, (_, received_wall_ns, received_ns) in zip(sorted(records, key=lambda r: r.t_send_us), server.received):
        assert record.t_send_us * 1000 <= received_wall_ns  # stamped before the server had it
        assert record.latency_us >= DELAY_S * 1e6  # ended after the server's delay


def test_h2c_reports_a_grpc_error_status_with_its_message(serve):
    def refuse(server, stream_id, payload):
        length = service_pb2.ModelInferRequest.FromString(payload).inputs[0].shape[1]
        if length == 3:
            server.answer(stream_id, None, status=3, text="length 3 is refused%21")  # trailers-only, percent-encoded
        else:
            echo(server, stream_id, payload)

    server = serve(refuse)
    records, _ = run_client(server, [2, 3, 4])
    by_length = {r.seq_len: r for r in records}
    assert len(records) == 3 and by_length[2].ok and by_length[4].ok
    assert not by_length[3].ok and by_length[3].error == "INVALID_ARGUMENT: length 3 is refused!"


def test_h2c_rst_stream_fails_only_its_request(serve):
    def reset_length_3(server, stream_id, payload):
        if service_pb2.ModelInferRequest.FromString(payload).inputs[0].shape[1] == 3:
            server.send(h2c.RST_STREAM, 0, stream_id, struct.pack(">L", 2))
        else:
            echo(server, stream_id, payload)

    server = serve(reset_length_3)
    records, _ = run_client(server, [3, 4, 3])
    errors = sorted((r.seq_len, r.error) for r in records if not r.ok)
    assert len(records) == 3 and [length for length, _ in errors] == [3, 3]
    assert "RST_STREAM INTERNAL_ERROR" in errors[0][1]


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_h2c_every_request_gets_one_record_when_the_server_closes_mid_flight(serve, protocol):
    seen = []

    def answer_two_then_close(server, stream_id, payload):
        seen.append(stream_id)
        if len(seen) <= 2:
            echo(server, stream_id, payload)
        elif len(seen) == 4:
            server.close()  # two requests in flight, unanswered

    server = serve(answer_two_then_close)
    records, client = run_client(server, [4, 5, 6, 7], protocol=protocol)
    assert len(records) == 4 and len({r.request_id for r in records}) == 4
    assert sum(r.ok for r in records) == 2
    failed = [r for r in records if not r.ok]
    assert all("closed the connection" in r.error for r in failed), [r.error for r in failed]
    assert client.inflight == 0


def test_h2c_goaway_fails_the_requests_the_server_did_not_take(serve):
    seen = []

    def goaway_after_first(server, stream_id, payload):
        seen.append(stream_id)
        if len(seen) == 1:
            first = stream_id
            server.send(h2c.GOAWAY, 0, 0, struct.pack(">LL", first, 0) + b"draining")
            server.listener.close()  # and no new connections
            echo(server, stream_id, payload)

    server = serve(goaway_after_first)
    records: list[RequestRecord] = []
    factory = RequestFactory(model_entry(MANIFEST, "seq"), "whole", seed=0)
    client = TritonLoadClient(server.url, factory, model="seq", on_record=records.append, transport="h2")
    assert client.connect(timeout_s=5)
    client.send(4)
    deadline = time.monotonic() + 5
    while not records and time.monotonic() < deadline:
        time.sleep(0.01)
    client.send(5)  # the old connection is going away; a new one is refused
    assert client.wait_idle(15.0)
    client.close()
    assert len(records) == 2 and records[0].ok
    assert not records[1].ok and records[1].error.startswith("UNAVAILABLE")


def test_h2c_moves_a_2_mb_request_and_a_2_mb_response_through_flow_control(serve):
    big = bytes(range(256)) * (2 * 1024 * 1024 // 256)
    server = serve(lambda s, sid, payload: echo(s, sid, payload, extra=big))
    records: list[RequestRecord] = []
    factory = RequestFactory(model_entry(MANIFEST, "seq"), "reorch", seed=0)
    responses = []

    client = TritonLoadClient(server.url, factory, model="seq", on_record=records.append, transport="h2")
    # REORCH_RECORD is looked up in the response: the 2 MB response is parsed whole
    original = client._complete

    def keep(pending, end_ns, response, error):
        responses.append(response)
        original(pending, end_ns, response, error)

    client._complete = keep
    assert client.connect(timeout_s=5)
    client.send(4096)  # 4096 int64 ids + mask: a 64 KiB request, past the server's default 64 KiB window
    client.send(4096)
    assert client.wait_idle(20.0)
    client.close()
    assert len(records) == 2 and all(r.ok for r in records), [r.error for r in records]
    assert not server.violations
    assert all(service_pb2.ModelInferResponse.FromString(r).raw_output_contents[0] == big for r in responses)


def test_h2c_request_to_a_port_that_does_not_listen_gets_an_error_record():
    records: list[RequestRecord] = []
    factory = RequestFactory(model_entry(MANIFEST, "seq"), "whole", seed=0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = TritonLoadClient(f"127.0.0.1:{port}", factory, model="seq", on_record=records.append, transport="h2")
    assert not client.connect(timeout_s=1)
    client.send(4)
    assert client.wait_idle(5.0)
    client.close()
    assert len(records) == 1 and not records[0].ok and records[0].error.startswith("UNAVAILABLE: cannot connect")


def test_h2c_client_timeout_cancels_a_request_the_server_never_answers(serve):
    server = serve(lambda s, sid, payload: None)  # never answers
    records, _ = run_client(server, [4], client_timeout_s=0.3)
    assert len(records) == 1 and not records[0].ok and records[0].error.startswith("DEADLINE_EXCEEDED")


def test_request_headers_decode_to_the_grpc_call():
    block = h2c.request_headers("/inference.GRPCInferenceService/ModelInfer", "h:1", timeout_s=60)
    headers = dict(hpack.Decoder().decode(block))
    assert headers == {":method": "POST", ":scheme": "http", ":path": "/inference.GRPCInferenceService/ModelInfer",
                       ":authority": "h:1", "content-type": "application/grpc", "te": "trailers",
                       "user-agent": "stagebatch-h2c", "grpc-timeout": "60000m"}


def test_h2c_a_server_that_never_speaks_http2_fails_fast_after_the_first_try():
    records: list[RequestRecord] = []
    factory = RequestFactory(model_entry(MANIFEST, "seq"), "whole", seed=0)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (backlog), never answers
        client = TritonLoadClient(f"127.0.0.1:{silent.getsockname()[1]}", factory, model="seq",
                                  on_record=records.append, transport="h2")
        started = time.monotonic()
        assert not client.connect(timeout_s=0.3)
        for _ in range(3):
            client.send(4)
        assert client.wait_idle(5.0)
        elapsed = time.monotonic() - started
        client.close()
    assert len(records) == 3 and all("no HTTP/2 SETTINGS" in r.error for r in records), [r.error for r in records]
    assert elapsed < 0.3 + 1.0  # no connect timeout per request: they fail with the last error
