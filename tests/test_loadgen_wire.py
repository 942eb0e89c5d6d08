"""loadtest.wire: gRPC requests paired with their answers from captured loopback TCP segments."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from tritonclient.grpc import service_pb2

from loadtest.h2c import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame, grpc_message, split_frames
from loadtest.wire import LoopbackCapture, Segment, WireUnavailable, exchanges, parse_packet

SERVER = 8001
CLIENT = 40000


def to_server(at_ns: int, seq: int, payload: bytes, client: int = CLIENT) -> Segment:
    return Segment(at_ns, client, SERVER, seq, payload)


def to_client(at_ns: int, seq: int, payload: bytes, client: int = CLIENT) -> Segment:
    return Segment(at_ns, SERVER, client, seq, payload)


def unary_request(stream_id: int) -> bytes:
    return frame(HEADERS, END_HEADERS, stream_id, b"\x82") + frame(DATA, END_STREAM, stream_id, grpc_message(b"x" * 40))


def unary_answer(stream_id: int) -> tuple[bytes, bytes]:
    """(headers + message, trailers): what a server sends for one unary call."""
    return (frame(HEADERS, END_HEADERS, stream_id, b"\x88") + frame(DATA, 0, stream_id, grpc_message(b"y" * 20)),
            frame(HEADERS, END_HEADERS | END_STREAM, stream_id, b"\x40"))


def test_split_frames_returns_complete_frames_and_where_the_incomplete_one_starts():
    first, second = frame(DATA, END_STREAM, 1, b"abc"), frame(HEADERS, 0, 3, b"defgh")
    frames, position = split_frames(first + second[:7])
    assert frames == [(DATA, END_STREAM, 1, b"abc", len(first))]
    assert position == len(first)
    frames, position = split_frames(first + second, len(first))
    assert frames == [(HEADERS, 0, 3, b"defgh", len(first) + len(second))]


def test_a_unary_call_is_timed_from_the_requests_end_stream_to_the_trailers():
    head = PREFACE + frame(SETTINGS, 0, 0)
    answer, trailers = unary_answer(1)
    segments = [
        to_server(1_000, 100, head),
        to_server(5_000, 100 + len(head), unary_request(1)),
        to_client(9_000, 700, answer),
        to_client(12_000, 700 + len(answer), trailers),
    ]
    (exchange,) = exchanges(segments, SERVER)
    assert (exchange.client_port, exchange.stream_id, exchange.sent_ns, exchange.answered_ns) == (CLIENT, 1, 5_000, 12_000)


def test_segments_out_of_order_retransmitted_and_frames_split_across_segments():
    request = PREFACE + unary_request(1) + unary_request(3)
    cut = len(PREFACE) + len(unary_request(1)) + 5  # stream 3's HEADERS frame split in two segments
    answer1, trailers1 = unary_answer(1)
    answer3, trailers3 = unary_answer(3)
    reply = answer1 + trailers1 + answer3 + trailers3
    seq = 2**32 - 10  # the sequence numbers wrap inside the capture
    segments = [
        to_server(2_000, (seq + cut) % 2**32, request[cut:]),  # arrives in the capture before its predecessor
        to_server(1_000, seq, request[:cut]),
        to_server(2_500, seq, request[:cut]),  # a retransmission
        to_client(4_000, 50, reply[: len(answer1) + len(trailers1)]),
        to_client(7_000, 50 + len(answer1) + len(trailers1), reply[len(answer1) + len(trailers1):]),
    ]
    found = {e.stream_id: e.latency_us for e in exchanges(segments, SERVER)}
    assert found == {1: (4_000 - 1_000) // 1000, 3: (7_000 - 2_000) // 1000}


def test_an_unanswered_request_and_other_ports_are_left_out():
    answer, trailers = unary_answer(1)
    segments = [
        to_server(1_000, 0, PREFACE + unary_request(1) + unary_request(3)),
        to_client(3_000, 0, answer + trailers),
        Segment(2_000, 50000, 9999, 0, PREFACE + unary_request(1)),
    ]
    assert [e.stream_id for e in exchanges(segments, SERVER)] == [1]


def stream_request(request_id: str) -> bytes:
    return frame(DATA, 0, 1, grpc_message(service_pb2.ModelInferRequest(model_name="m", id=request_id).SerializeToString()))


def stream_answer(request_id: str) -> bytes:
    response = service_pb2.ModelStreamInferResponse(infer_response=service_pb2.ModelInferResponse(id=request_id))
    return frame(DATA, 0, 1, grpc_message(response.SerializeToString()))


def test_streamed_requests_are_paired_with_answers_by_id_whatever_the_order():
    head = PREFACE + frame(HEADERS, END_HEADERS, 1, b"\x83")
    a, b = stream_request("a"), stream_request("b")
    answer_b, answer_a = stream_answer("b"), stream_answer("a")
    segments = [
        to_server(1_000_000, 0, head + a),
        to_server(2_000_000, len(head) + len(a), b),
        to_client(3_000_000, 0, frame(HEADERS, END_HEADERS, 1, b"\x88") + answer_b),
        to_client(9_000_000, len(frame(HEADERS, END_HEADERS, 1, b"\x88")) + len(answer_b), answer_a),
    ]
    found = {e.request_id: e.latency_us for e in exchanges(segments, SERVER, streaming=True)}
    assert found == {"a": 8_000, "b": 1_000}


def test_a_streamed_message_split_over_two_frames_is_timed_by_its_last_byte():
    message = grpc_message(service_pb2.ModelInferRequest(id="r").SerializeToString())
    head = PREFACE + frame(HEADERS, END_HEADERS, 1, b"\x83")
    first, second = frame(DATA, 0, 1, message[:4]), frame(DATA, 0, 1, message[4:])
    segments = [
        to_server(1_000, 0, head + first),
        to_server(4_000, len(head) + len(first), second),
        to_client(10_000, 0, stream_answer("r")),
    ]
    (exchange,) = exchanges(segments, SERVER, streaming=True)
    assert (exchange.sent_ns, exchange.answered_ns) == (4_000, 10_000)


def ipv4_tcp(source: int, dest: int, seq: int, payload: bytes, options: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", source, dest, seq, 0, (5 + len(options) // 4) << 4, 0x18, 65535, 0, 0) + options
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
    return ip + tcp + payload


def test_parse_packet_keeps_the_ports_tcp_payload_only():
    packet = ipv4_tcp(CLIENT, SERVER, 77, b"hello", options=b"\x01\x01\x01\x01")
    assert parse_packet(packet, 5, SERVER) == Segment(5, CLIENT, SERVER, 77, b"hello")
    assert parse_packet(packet + b"\x00\x00", 5, SERVER).payload == b"hello"  # link padding past the IP length
    assert parse_packet(packet, 5, 1234) is None
    assert parse_packet(ipv4_tcp(CLIENT, SERVER, 1, b""), 5, SERVER) is None  # a bare ACK
    udp = bytearray(packet)
    udp[9] = socket.IPPROTO_UDP
    assert parse_packet(bytes(udp), 5, SERVER) is None


def test_the_capture_times_a_real_loopback_call_by_the_kernel():
    """A server that answers 50 ms after the request's END_STREAM: the wire reads 50 ms, give or take
    the loopback's and the scheduler's delays, never less."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        capture = LoopbackCapture(port)
    except WireUnavailable as error:
        listener.close()
        pytest.skip(str(error))
    answer, trailers = unary_answer(1)

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            expected = len(PREFACE) + len(unary_request(1))
            received = b""
            while len(received) < expected:
                received += connection.recv(4096)
            time.sleep(0.05)
            connection.sendall(answer + trailers)
            connection.recv(1)  # until the client closes

    server = threading.Thread(target=serve)
    server.start()
    with capture:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(PREFACE + unary_request(1))
            received = b""
            while len(received) < len(answer) + len(trailers):
                received += client.recv(4096)
        server.join()
    listener.close()  # closing the capture read what the kernel had queued: no wait needed
    (exchange,) = exchanges(capture.segments, port)
    assert 50_000 <= exchange.latency_us < 150_000
    assert abs(exchange.sent_ns / 1e9 - time.time()) < 60  # kernel timestamps on the wall clock
