"""Latency on the wire: gRPC calls to a server on the loopback, timed by the kernel, not by a client.

A load generator reads a request's latency from its own clocks, so its own work lands in every
figure. This module is the arbiter between generators: it captures the server port's TCP traffic on
the loopback interface (a Linux ``AF_PACKET`` socket with kernel receive timestamps,
``SO_TIMESTAMPNS``; it needs root or ``CAP_NET_RAW``), reassembles each direction of each
connection, splits it into HTTP/2 frames (:func:`loadtest.h2c.split_frames`) and pairs every
request with its answer:

* **Unary calls** (``ModelInfer``): one HTTP/2 stream per call. Sent: the packet that carried the
  client's ``END_STREAM``. Answered: the packet that carried the server's ``END_STREAM`` (the
  trailers with ``grpc-status``, which is what ends the call for any client).
* **Streaming calls** (``ModelStreamInfer``): many gRPC messages on one HTTP/2 stream. Each message
  is timed by the packet holding its last byte, and requests are paired with answers by the
  ``id`` both carry (``ModelInferRequest.id``, ``ModelStreamInferResponse.infer_response.id``), in
  order of arrival where ids are missing or repeat.

A generator's *overhead* is then its reading minus the wire's, over the same requests. Both
directions are timed where the server's kernel received the bytes, so the wire latency still holds
the server's own socket work but none of the client's.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Iterable

from loadtest.h2c import DATA, END_STREAM, GRPC_PREFIX, HEADERS, PREFACE, split_frames

SO_TIMESTAMPNS = 35  # linux/asm-generic/socket.h; not in Python's socket module
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4  # the loopback shows every packet twice: sent (this) and received
_TIMESPEC = struct.Struct("qq")
_TCP_HEAD = struct.Struct("!HHI")
_SEQ_SPACE = 1 << 32
_HALF_SEQ = 1 << 31


class WireUnavailable(Exception):
    """The loopback cannot be captured here (not Linux, or no root / CAP_NET_RAW)."""


@dataclass(frozen=True)
class Segment:
    """One TCP segment with payload, as the kernel received it on the loopback."""

    at_ns: int  # kernel receive time, CLOCK_REALTIME ns
    source_port: int
    dest_port: int
    seq: int
    payload: bytes


@dataclass(frozen=True)
class Exchange:
    """One request and its answer on the wire."""

    client_port: int
    stream_id: int
    request_id: str  # "" for unary calls (the HTTP/2 stream identifies them)
    sent_ns: int
    answered_ns: int

    @property
    def latency_us(self) -> int:
        return (self.answered_ns - self.sent_ns) // 1000


def parse_packet(packet: bytes, at_ns: int, port: int) -> Segment | None:
    """The TCP segment of one IPv4 packet if it goes to or from ``port`` and carries payload (pure)."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_TCP:
        return None
    header = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big") or len(packet)
    if len(packet) < header + 20:
        return None
    source, dest, seq = _TCP_HEAD.unpack_from(packet, header)
    if port not in (source, dest):
        return None
    payload = packet[header + (packet[header + 12] >> 4) * 4 : total]
    return Segment(at_ns, source, dest, seq, bytes(payload)) if payload else None


class LoopbackCapture:
    """Captures the TCP payload to and from ``port`` on the loopback while open (a context manager)."""

    def __init__(self, port: int, *, interface: str = "lo", buffer_bytes: int = 64 << 20) -> None:
        if not sys.platform.startswith("linux") or not hasattr(socket, "AF_PACKET"):
            raise WireUnavailable("capturing the loopback needs Linux (AF_PACKET sockets)")
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        except PermissionError as error:
            raise WireUnavailable(f"capturing the loopback needs root or CAP_NET_RAW ({error})") from None
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self._sock.bind((interface, 0))
        self.port = port
        self.segments: list[Segment] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._capture, name="wire-capture", daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close()

    def _capture(self) -> None:
        port, keep, receive = self.port, self.segments.append, self._sock.recvmsg
        while True:
            stopping = self._stopping.is_set()
            # once asked to stop, read what the kernel already queued (a window's last answers), then end
            ready, _, _ = select.select([self._sock], [], [], 0 if stopping else 0.05)
            if not ready:
                if stopping:
                    return
                continue
            packet, ancillary, _, address = receive(65_600, 64)
            if address[2] == PACKET_OUTGOING:
                continue
            at_ns = 0
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                    at_ns = seconds * 1_000_000_000 + nanoseconds
            segment = parse_packet(packet, at_ns, port)
            if segment is not None:
                keep(segment)


def _byte_stream(segments: list[Segment]) -> tuple[bytes, list[tuple[int, int]]]:
    """One direction's payload in sequence order (retransmissions dropped) and (end offset, time) per segment."""
    if not segments:
        return b"", []
    # the earliest sequence number, in TCP's modular order (a capture may start with a later segment)
    anchor = segments[0].seq
    first = (anchor + min((s.seq - anchor + _HALF_SEQ) % _SEQ_SPACE - _HALF_SEQ for s in segments)) % _SEQ_SPACE
    ordered = sorted(segments, key=lambda s: ((s.seq - first) % _SEQ_SPACE, s.at_ns))
    data, marks, next_offset = bytearray(), [], 0
    for segment in ordered:
        offset = (segment.seq - first) % _SEQ_SPACE
        if offset + len(segment.payload) <= next_offset:
            continue  # a retransmission of bytes already placed
        data += segment.payload[max(0, next_offset - offset):]
        next_offset = len(data)
        marks.append((next_offset, segment.at_ns))
    return bytes(data), marks


def _time_of(offset: int, marks: list[tuple[int, int]], start: int) -> tuple[int, int]:
    """(time of the segment holding byte ``offset - 1``, index to resume from): ``marks`` are in order."""
    index = start
    while index < len(marks) - 1 and marks[index][0] < offset:
        index += 1
    return marks[index][1], index


def _messages(payload: bytes, pending: bytearray) -> list[bytes]:
    """Complete gRPC messages out of a stream's DATA bytes (``pending`` keeps a message split across frames)."""
    pending += payload
    messages, position = [], 0
    while len(pending) - position >= 5:
        _, size = GRPC_PREFIX.unpack_from(pending, position)
        if len(pending) - position - 5 < size:
            break
        messages.append(bytes(pending[position + 5 : position + 5 + size]))
        position += 5 + size
    del pending[:position]
    return messages


def _events(segments: list[Segment], to_server: bool) -> Iterable[tuple[int, int, int, bytes | None]]:
    """(stream id, time, END_STREAM flag, a gRPC message or None) for one direction of one connection."""
    data, marks = _byte_stream(segments)
    position = len(PREFACE) if to_server and data.startswith(PREFACE) else 0
    frames, _ = split_frames(data, position)
    pending: dict[int, bytearray] = defaultdict(bytearray)
    mark = 0
    for kind, flags, stream_id, payload, end in frames:
        if not stream_id or kind not in (DATA, HEADERS):
            continue
        at_ns, mark = _time_of(end, marks, mark)
        if kind == DATA:
            for message in _messages(payload, pending[stream_id]):
                yield stream_id, at_ns, 0, message
        if flags & END_STREAM:
            yield stream_id, at_ns, 1, None


def _request_id(message: bytes, *, answer: bool) -> str:
    from tritonclient.grpc import service_pb2  # heavy: only where a stream is paired

    try:
        if answer:
            parsed = service_pb2.ModelStreamInferResponse.FromString(message)
            return parsed.infer_response.id
        return service_pb2.ModelInferRequest.FromString(message).id
    except Exception:  # noqa: BLE001 - not a Triton message: pair it by order
        return ""


def exchanges(segments: Iterable[Segment], server_port: int, *, streaming: bool = False) -> list[Exchange]:
    """Pair every request to ``server_port`` with its answer (pure; see the module docstring).

    Requests never answered in the capture are left out. Sorted by the time they were sent."""
    flows: dict[tuple[int, bool], list[Segment]] = defaultdict(list)
    for segment in segments:
        to_server = segment.dest_port == server_port
        flows[(segment.source_port if to_server else segment.dest_port, to_server)].append(segment)
    paired: list[Exchange] = []
    for client_port in sorted({port for port, _ in flows}):
        requests = list(_events(flows.get((client_port, True), []), True))
        answers = list(_events(flows.get((client_port, False), []), False))
        if streaming:
            paired += _pair_stream(client_port, requests, answers)
        else:
            sent = {stream: at for stream, at, end, _ in requests if end}
            for stream, at, end, _ in answers:
                if end and stream in sent:
                    paired.append(Exchange(client_port, stream, "", sent.pop(stream), at))
    return sorted(paired, key=lambda e: e.sent_ns)


def _pair_stream(client_port: int, requests: list, answers: list) -> list[Exchange]:
    waiting: dict[tuple[int, str], deque[int]] = defaultdict(deque)
    for stream, at, _, message in requests:
        if message is not None:
            waiting[(stream, _request_id(message, answer=False))].append(at)
    paired = []
    for stream, at, _, message in answers:
        if message is None:
            continue
        request_id = _request_id(message, answer=True)
        queue = waiting.get((stream, request_id))
        if queue:
            paired.append(Exchange(client_port, stream, request_id, queue.popleft(), at))
    return paired


def window_latencies_us(capture: LoopbackCapture, *, streaming: bool, first_send_ns: int, count: int) -> list[int]:
    """The wire's latencies of one measured window: the first ``count`` requests sent from
    ``first_send_ns`` on (a generator stamps a request before its bytes reach the wire, so its first
    stamp in the window precedes that request on the wire; the warm-up's requests went earlier)."""
    sent = [e for e in exchanges(capture.segments, capture.port, streaming=streaming) if e.sent_ns >= first_send_ns]
    return [e.latency_us for e in sent[:count]]


def loopback_port(url: str) -> int | None:
    """The port of a single loopback server address (``127.0.0.1:8001``, ``localhost:8001``); None for
    anything the loopback capture cannot see (other hosts, lists, ``dns:///`` names)."""
    host, _, port = url.split("://", 1)[-1].rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return None
    return int(port)
