"""A minimal gRPC client over cleartext HTTP/2 (h2c, prior knowledge) on a plain TCP socket.

The load generator's default transport (:mod:`loadtest.client`): grpcio's blocking call costs
210-300 µs of CPU per request on the 2-core VM, most of it in grpcio's Python layer and its
thread hand-overs; here a request is one ``sendall`` of pre-encoded frames from the thread that
takes its send time, and one reader thread per connection parses every response.

* **Requests**: a HEADERS frame (HPACK literals without indexing, encoded once per call kind) and
  DATA frames carrying the 5-byte gRPC prefix and the already-serialised message. Unary calls end
  their stream with the message; a streaming call keeps one stream open for many messages.
* **Responses**: the reader thread parses frames; DATA are gRPC messages, the trailing HEADERS carry
  ``grpc-status``/``grpc-message`` (decoded with the ``hpack`` package; identical header blocks
  that do not change the decoder's table are decoded once). The end time is the monotonic clock
  right after the ``recv`` that completed the response, before anything is parsed.
* **Flow control**: the connection and every stream get a window of 2**31 - 1 (SETTINGS and one
  WINDOW_UPDATE), topped up as data arrives; sends respect the server's windows and frame size.
* **Failures**: RST_STREAM fails its call, GOAWAY fails the calls the server did not take, a closed
  socket fails every call still open: every call ends exactly once (``on_end``).

Not a general HTTP/2 client: no TLS, no server push, no priorities, no request compression.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
# top the receive windows up once this much was consumed (a WINDOW_UPDATE per 16 MiB, not per frame)
WINDOW_REFILL = 1 << 24
MAX_STREAM_ID = 2**31 - 1
RECV_BYTES = 1 << 18
_FRAME = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
GRPC_PREFIX = struct.Struct(">BL")
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 4: "SETTINGS_TIMEOUT",
             5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR",
             10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}
GRPC_STATUS = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
               "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
               "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class H2cError(Exception):
    """A connection-level failure (connect, handshake, protocol)."""


def split_frames(buffer: bytes, position: int = 0) -> tuple[list[tuple[int, int, int, bytes, int]], int]:
    """The complete frames in ``buffer`` from ``position`` on, each as (type, flags, stream id, payload,
    offset just past it), and the offset where the first incomplete frame starts (pure)."""
    frames, available, unpack = [], len(buffer), _FRAME.unpack_from
    while available - position >= 9:
        high, low, kind, flags, stream_id = unpack(buffer, position)
        end = position + 9 + (high << 8 | low)
        if end > available:
            break
        frames.append((kind, flags, stream_id & MAX_STREAM_ID, buffer[position + 9 : end], end))
        position = end
    return frames, position


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, with a literal name and no Huffman coding."""
    name_bytes, value_bytes = name.encode(), value.encode()
    return (b"\x00" + _hpack_int(len(name_bytes), 7, 0) + name_bytes
            + _hpack_int(len(value_bytes), 7, 0) + value_bytes)


def request_headers(path: str, authority: str, timeout_s: float | None = None) -> bytes:
    """The HPACK block of a gRPC call's request headers (constant per call kind: encode it once)."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", "stagebatch-h2c")]
    if timeout_s:
        fields.append(("grpc-timeout", f"{min(int(timeout_s * 1000), 99_999_999)}m"))
    return b"".join(_literal(name, value) for name, value in fields)


def grpc_message(payload: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return GRPC_PREFIX.pack(0, len(payload)) + payload


class Call:
    """One HTTP/2 stream: a unary call (``streaming=False``) or a long-lived bidirectional one.

    ``on_message(end_ns, body)`` gets each complete response message of a streaming call;
    ``on_end(end_ns, body, error)`` ends every call exactly once: a unary call's single response
    message (None if it had none) and ``error`` (None when ``grpc-status`` is 0).
    """

    __slots__ = ("body", "buffer", "context", "ended", "error", "headers_block", "on_end", "on_message", "received",
                 "send_window", "stream_id", "streaming", "trailers")

    def __init__(self, on_end: Callable[[int, bytes | None, str | None], None],
                 on_message: Callable[[int, bytes], None] | None = None, context: object = None) -> None:
        self.on_end = on_end
        self.context = context  # the caller's own (e.g. its request, for expiry)
        self.on_message = on_message
        self.streaming = on_message is not None
        self.stream_id = 0
        self.send_window = DEFAULT_WINDOW
        self.buffer = b""
        self.body: bytes | None = None
        self.headers_block = b""
        self.trailers = False
        self.received = 0
        self.ended = False
        self.error: str | None = None


class _HeaderDecoder:
    """hpack's decoder with a cache of blocks that leave its dynamic table as it was."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 16
        self._cache: dict[bytes, dict[str, str]] = {}

    def _table_state(self) -> tuple[int, int, int]:
        table = self._decoder.header_table
        entries = table.dynamic_entries
        return len(entries), id(entries[0]) if entries else 0, table.maxsize

    def decode(self, block: bytes) -> dict[str, str]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        before = self._table_state()
        headers = {name: value for name, value in self._decoder.decode(block, raw=False)}
        if self._table_state() == before:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[block] = headers
        else:
            self._cache.clear()  # entries may now refer to other table slots
        return headers


class H2cConnection:
    """One h2c connection to a gRPC server; thread-safe :meth:`start`/:meth:`send_message`, one reader thread.

    ``on_closed(reason)`` runs once on the reader thread after the connection ended and every open
    call got its ``on_end``.
    """

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 10.0,
                 on_closed: Callable[[str], None] | None = None) -> None:
        self.host, self.port = host, port
        self.authority = f"{host}:{port}"
        self._on_closed = on_closed
        self._lock = threading.Condition(threading.Lock())
        self._calls: dict[int, Call] = {}
        self._next_id = 1
        self._peer_window = DEFAULT_WINDOW  # the server's initial stream window for our sends
        self._send_window = DEFAULT_WINDOW  # the connection's window for our sends
        self._max_frame = DEFAULT_MAX_FRAME
        self._max_streams = 1 << 30
        self._recv_consumed = 0
        self._decoder = _HeaderDecoder()
        self._settled = threading.Event()  # the server's first SETTINGS arrived
        self._orphan_block = b""  # a header block of a stream no longer open (decoded to keep the table in step)
        self.closed_reason: str | None = None
        self.going_away = False
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        except OSError as error:
            raise H2cError(f"cannot connect to {host}:{port}: {error}") from None
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = struct.pack(">HLHLHL", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW,
                               SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
        self._sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings)
                           + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", MAX_WINDOW - DEFAULT_WINDOW)))
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"stagebatch-h2c-{host}:{port}")
        self._reader.start()
        if not self._settled.wait(connect_timeout_s):
            self.close()
            raise H2cError(f"{host}:{port} sent no HTTP/2 SETTINGS within {connect_timeout_s:g} s (not an h2c gRPC port?)")

    @property
    def usable(self) -> bool:
        return self.closed_reason is None and not self.going_away and self._next_id < MAX_STREAM_ID - 2

    @property
    def open_calls(self) -> list[Call]:
        """The calls not yet ended (a snapshot)."""
        with self._lock:
            return list(self._calls.values())

    # ---- sending ------------------------------------------------------------------------------

    def start(self, call: Call, headers_block: bytes, message: bytes | None = None, *,
              stamp: Callable[[], None] | None = None) -> None:
        """Open ``call``'s stream and send its headers and first message (a unary call ends its side there).

        ``stamp()`` runs just before the bytes go to the socket. A call on a closed connection ends
        at once with the reason.
        """
        data = grpc_message(message) if message is not None else None
        with self._lock:
            while len(self._calls) >= self._max_streams and self.closed_reason is None:
                self._lock.wait()
            if not self.usable:
                reason = self.closed_reason or "the connection is going away"
                if stamp is not None:
                    stamp()
                self._end_now(call, f"UNAVAILABLE: {reason}")
                return
            call.stream_id = stream_id = self._next_id
            self._next_id += 2
            call.send_window = self._peer_window
            self._calls[stream_id] = call
            end = 0 if call.streaming else END_STREAM
            head = frame(HEADERS, END_HEADERS | (end if data is None else 0), stream_id, headers_block)
            if data is not None and len(data) <= min(self._max_frame, call.send_window, self._send_window):
                call.send_window -= len(data)
                self._send_window -= len(data)
                self._write(head + frame(DATA, end, stream_id, data), stamp)
            else:
                self._write(head, stamp)
                if data is not None:
                    self._send_data(call, data, end)

    def send_message(self, call: Call, message: bytes, *, stamp: Callable[[], None] | None = None) -> bool:
        """One more message on an open streaming call; False (nothing sent) if the call has ended."""
        data = grpc_message(message)
        with self._lock:
            if call.ended or self.closed_reason is not None:
                return False
            if len(data) <= min(self._max_frame, call.send_window, self._send_window):
                call.send_window -= len(data)
                self._send_window -= len(data)
                self._write(frame(DATA, 0, call.stream_id, data), stamp)
            else:
                self._send_data(call, data, 0, stamp)
        return True

    def finish(self, call: Call) -> None:
        """Half-close a streaming call (the server ends it after its last response)."""
        with self._lock:
            if not call.ended and self.closed_reason is None:
                self._write(frame(DATA, END_STREAM, call.stream_id))

    def cancel(self, call: Call, reason: str) -> None:
        """Reset ``call``'s stream and end it with ``reason`` now."""
        with self._lock:
            if call.ended or self._calls.pop(call.stream_id, None) is None:
                return
            if self.closed_reason is None:
                self._write(frame(RST_STREAM, 0, call.stream_id, struct.pack(">L", 8)))
            self._lock.notify_all()
        self._end(call, time.perf_counter_ns(), None, reason)

    def _send_data(self, call: Call, data: bytes, end: int, stamp: Callable[[], None] | None = None) -> None:
        # holds self._lock; waits (releasing it) for WINDOW_UPDATEs when a window is spent
        view, offset = memoryview(data), 0
        while offset < len(data):
            size = min(self._max_frame, call.send_window, self._send_window, len(data) - offset)
            if size <= 0:
                if self.closed_reason is not None or call.ended:
                    return
                self._lock.wait(1.0)
                continue
            last = offset + size >= len(data)
            call.send_window -= size
            self._send_window -= size
            self._write(frame(DATA, end if last else 0, call.stream_id, bytes(view[offset : offset + size])), stamp)
            stamp = None
            offset += size

    def _write(self, payload: bytes, stamp: Callable[[], None] | None = None) -> None:
        # holds self._lock: frames of one writer go out whole and stream ids in order
        if stamp is not None:
            stamp()
        try:
            self._sock.sendall(payload)
        except OSError as error:
            self.closed_reason = self.closed_reason or f"send failed: {error}"
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # the reader ends every open call
            except OSError:
                pass

    # ---- receiving ----------------------------------------------------------------------------

    def _read(self) -> None:
        reason = "the server closed the connection"
        buffer = b""
        recv = self._sock.recv
        try:
            while True:
                chunk = recv(RECV_BYTES)
                end_ns = time.perf_counter_ns()
                if not chunk:
                    break
                buffer = buffer + chunk if buffer else chunk
                frames, position = split_frames(buffer)
                for kind, flags, stream_id, payload, _ in frames:
                    self._frame(kind, flags, stream_id, payload, end_ns)
                buffer = buffer[position:]
        except OSError as error:
            reason = f"connection failed: {error}"
        except Exception as error:  # noqa: BLE001 - a protocol surprise still ends every call
            reason = f"h2c reader failed: {type(error).__name__}: {error}"
        finally:
            self._shut(self.closed_reason or reason)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, end_ns: int) -> None:
        if kind == DATA:
            self._data(flags, stream_id, payload, end_ns)
        elif kind == HEADERS or kind == CONTINUATION:
            self._headers(kind, flags, stream_id, payload, end_ns)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if not flags & ACK:
                with self._lock:
                    self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">L", payload)[0] & MAX_WINDOW
            with self._lock:
                if stream_id == 0:
                    self._send_window += increment
                elif stream_id in self._calls:
                    self._calls[stream_id].send_window += increment
                self._lock.notify_all()
        elif kind == RST_STREAM:
            code = struct.unpack(">L", payload)[0]
            call = self._pop(stream_id)
            if call is not None:
                self._end(call, end_ns, None, f"{'UNAVAILABLE' if code == 7 else 'INTERNAL'}: stream reset by the "
                                              f"server (RST_STREAM {H2_ERRORS.get(code, code)})")
        elif kind == GOAWAY:
            last_id, code = struct.unpack(">LL", payload[:8])
            last_id &= MAX_STREAM_ID
            debug = payload[8:].decode(errors="replace")
            with self._lock:
                self.going_away = True
                refused = [sid for sid in self._calls if sid > last_id]
                calls = [self._calls.pop(sid) for sid in refused]
                self._lock.notify_all()
            for call in calls:
                self._end(call, end_ns, None, f"UNAVAILABLE: GOAWAY {H2_ERRORS.get(code, code)} before the server "
                                              f"took the call{': ' + debug if debug else ''}")
        elif kind == PUSH_PROMISE:
            raise H2cError("PUSH_PROMISE received although push is disabled")

    def _settings(self, payload: bytes) -> None:
        with self._lock:
            for offset in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HL", payload, offset)
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta, self._peer_window = value - self._peer_window, value
                    for call in self._calls.values():
                        call.send_window += delta
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self._max_frame = value
                elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                    self._max_streams = value
            self._write(frame(SETTINGS, ACK, 0))
            self._lock.notify_all()
        self._settled.set()

    def _data(self, flags: int, stream_id: int, payload: bytes, end_ns: int) -> None:
        consumed = len(payload)
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        call = self._calls.get(stream_id)
        self._recv_consumed += consumed
        if call is not None and consumed:
            call.received += consumed
            if call.streaming and call.received >= WINDOW_REFILL:
                increment, call.received = call.received, 0
                with self._lock:
                    self._write(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment)))
        if self._recv_consumed >= WINDOW_REFILL:
            increment, self._recv_consumed = self._recv_consumed, 0
            with self._lock:
                self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", increment)))
        if call is None:
            return
        if call.buffer:
            call.buffer += payload  # a bytearray: a large message arrives over many frames
            buffer = call.buffer
        else:
            buffer = payload
        while len(buffer) >= 5:
            compressed, size = GRPC_PREFIX.unpack_from(buffer)
            if len(buffer) < 5 + size:
                break
            body, buffer = bytes(buffer[5 : 5 + size]), buffer[5 + size :]
            if compressed:
                call.error = call.error or "INTERNAL: compressed response message (compression not negotiated)"
            elif call.streaming:
                call.on_message(end_ns, body)  # type: ignore[misc]
            elif call.body is None:
                call.body = body
            else:
                call.error = call.error or "INTERNAL: more than one response message on a unary call"
        call.buffer = bytearray(buffer) if buffer else b""
        if flags & END_STREAM:
            self._finish(call, end_ns, "INTERNAL: the server ended the call without grpc-status")

    def _headers(self, kind: int, flags: int, stream_id: int, payload: bytes, end_ns: int) -> None:
        call = self._calls.get(stream_id)
        if kind == HEADERS:
            start, end = 0, len(payload)
            if flags & PADDED:
                start, end = 1, end - payload[0]
            if flags & PRIORITY:
                start += 5
            block = payload[start:end]
            if call is None:
                self._orphan_block = block
            else:
                call.headers_block = block
                call.trailers = bool(flags & END_STREAM)
        elif call is None:
            self._orphan_block += payload
        else:
            call.headers_block += payload
        if not flags & END_HEADERS:
            return
        if call is None:
            self._decoder.decode(self._orphan_block)  # keep the decoder's table in step
            self._orphan_block = b""
            return
        headers = self._decoder.decode(call.headers_block)
        call.headers_block = b""
        status = headers.get(":status")
        if status is not None and status != "200":
            call.error = call.error or f"UNAVAILABLE: HTTP status {status} (not a gRPC server?)"
        code = headers.get("grpc-status")
        if code is not None:
            if code != "0":
                name = GRPC_STATUS[int(code)] if code.isdigit() and int(code) < len(GRPC_STATUS) else f"STATUS_{code}"
                call.error = call.error or f"{name}: {unquote(headers.get('grpc-message', ''))}"
            self._finish(call, end_ns, None)
        elif call.trailers:
            self._finish(call, end_ns, "INTERNAL: the server ended the call without grpc-status")

    def _finish(self, call: Call, end_ns: int, error: str | None) -> None:
        if self._pop(call.stream_id) is None:
            return
        error = call.error or error
        if error is None and call.buffer:
            error = "INTERNAL: the call ended inside a message"
        if error is None and not call.streaming and call.body is None:
            error = "INTERNAL: the server sent no response message"
        self._end(call, end_ns, call.body, error)

    def _pop(self, stream_id: int) -> Call | None:
        with self._lock:
            call = self._calls.pop(stream_id, None)
            if call is not None:
                self._lock.notify_all()
            return call

    def _end(self, call: Call, end_ns: int, body: bytes | None, error: str | None) -> None:
        if call.ended:
            return
        call.ended = True
        call.on_end(end_ns, body if error is None else None, error)

    def _end_now(self, call: Call, reason: str) -> None:
        self._end(call, time.perf_counter_ns(), None, reason)

    def _shut(self, reason: str) -> None:
        with self._lock:
            self.closed_reason = self.closed_reason or reason
            calls, self._calls = list(self._calls.values()), {}
            self._lock.notify_all()
        try:
            self._sock.close()
        except OSError:
            pass
        self._settled.set()
        end_ns = time.perf_counter_ns()
        for call in calls:
            self._end(call, end_ns, None, f"UNAVAILABLE: {self.closed_reason}")
        if self._on_closed is not None:
            self._on_closed(self.closed_reason or reason)

    # ---- end ----------------------------------------------------------------------------------

    def close(self, reason: str = "closed by the client") -> None:
        """Close the connection; every open call ends with ``reason``."""
        with self._lock:
            self.closed_reason = self.closed_reason or reason
            if self._sock.fileno() >= 0:
                try:
                    self._sock.sendall(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))
                except OSError:
                    pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)


def split_target(target: str, default_port: int = 8001) -> list[tuple[str, int]]:
    """The (host, port) pairs of one gRPC target: ``host:port``, or ``dns:///name:port`` (every address it resolves to)."""
    text = target
    resolve = text.startswith("dns:")
    if resolve:
        text = text[4:].lstrip("/")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text) if port_text else default_port
    if not resolve:
        return [(host, port)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[tuple[str, int]] = []
    for info in infos:
        address = (str(info[4][0]), port)
        if address not in seen:
            seen.append(address)
    return seen

