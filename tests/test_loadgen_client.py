"""The load client's timestamps, request bytes and records against fake gRPC channels (no server)."""

from __future__ import annotations

import threading
import time

import pytest
from tritonclient.grpc import service_pb2

from loadtest.client import (
    REORCH_RECORD_PARAMETER,
    RequestRecord,
    TritonLoadClient,
    finish_record,
    parse_targets,
    sender_environment,
)
from loadtest.request_factory import RequestFactory, model_entry
from core.errors import ConfigValidationError
from tests.helpers import seq_manifest

MANIFEST = seq_manifest(max_length=32)
DELAY_S = 0.02


class FakeChannel:
    """Answers every call after ``DELAY_S``; remembers each request and when the fake held it."""

    def __init__(self, record_document: bytes | None = None) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.held: list[tuple[int, int, int]] = []  # (entered wall ns, entered perf ns, left perf ns)
        self.record_document = record_document
        self.lock = threading.Lock()

    def _answer(self, payload: bytes) -> service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest.FromString(payload)
        entered_wall, entered = time.time_ns(), time.perf_counter_ns()
        time.sleep(DELAY_S)
        response = service_pb2.ModelInferResponse(id=request.id, model_name=request.model_name)
        if self.record_document is not None:
            response.outputs.add(name="REORCH_RECORD", datatype="BYTES", shape=[1])
            size = len(self.record_document).to_bytes(4, "little")
            response.raw_output_contents.append(size + self.record_document)
        with self.lock:
            self.requests.append(request)
            self.held.append((entered_wall, entered, time.perf_counter_ns()))
        return response

    def unary_unary(self, path, request_serializer=None, response_deserializer=None):
        assert path.endswith("/ModelInfer") and request_serializer is None
        return lambda payload, timeout=None: self._answer(payload).SerializeToString()

    def stream_stream(self, path, request_serializer=None, response_deserializer=None):
        assert path.endswith("/ModelStreamInfer")

        def call(requests):
            for payload in requests:
                yield service_pb2.ModelStreamInferResponse(infer_response=self._answer(payload))

        return call

    def close(self) -> None:
        pass


def _client(variant: str, protocol: str, channels: list[FakeChannel], records: list[RequestRecord], **kw):
    factory = RequestFactory(model_entry(MANIFEST, "seq"), variant, seed=0)
    return TritonLoadClient("unused:1", factory, model="seq", on_record=records.append, protocol=protocol,
                            channels=channels, **kw)


@pytest.mark.parametrize("variant, protocol", [("whole", "unary"), ("reorch", "stream"), ("reorch", "unary")])
def test_client_timestamps_bracket_the_call_when_the_server_answers_after_a_known_delay(variant, protocol):
    channel = FakeChannel(b'{"bucket": 5}' if variant == "reorch" else None)
    records: list[RequestRecord] = []
    client = _client(variant, protocol, [channel], records)
    for _ in range(3):
        client.send(5)
    assert client.wait_idle(10.0)
    client.close()
    assert len(records) == 3 and all(r.ok for r in records), [r.error for r in records]
    held = {request.id: times for request, times in zip(channel.requests, channel.held)}
    for record in records:
        entered_wall_ns, entered_ns, left_ns = held[record.request_id]
        assert record.t_send_us * 1000 <= entered_wall_ns  # sent before the server had it
        assert record.latency_us * 1000 >= left_ns - entered_ns  # ended after the server let go
        assert record.latency_us >= DELAY_S * 1e6


def test_client_asks_reorch_for_its_record_and_parses_it_only_when_finishing():
    channel = FakeChannel(b'{"bucket": 7, "batch_sizes": [1]}')
    records: list[RequestRecord] = []
    client = _client("reorch", "stream", [channel], records, priority=2)
    client.send(7)
    assert client.wait_idle(10.0)
    client.close()
    request = channel.requests[0]
    assert request.parameters[REORCH_RECORD_PARAMETER].bool_param is True
    assert request.parameters["priority"].uint64_param == 2
    assert request.model_name == "seq_reorch" and request.id == records[0].request_id
    assert list(request.inputs[0].shape) == [1, 7]
    assert records[0].server == b'{"bucket": 7, "batch_sizes": [1]}'  # raw on the hot path
    assert finish_record(records[0]).server == {"bucket": 7, "batch_sizes": [1]}


def test_finish_record_fails_the_request_when_the_record_is_not_a_json_object():
    record = RequestRecord(t_send_us=1, latency_us=2, model="m", variant="reorch", seq_len=3, rows=1, ok=True,
                           error=None, server=b"[1, 2]")
    finish_record(record)
    assert not record.ok and record.server is None and "not a JSON object" in record.error


def test_client_spreads_requests_over_a_list_of_targets_round_robin():
    channels = [FakeChannel(), FakeChannel()]
    records: list[RequestRecord] = []
    client = _client("whole", "unary", channels, records)
    for _ in range(10):
        client.send(4)
    assert client.wait_idle(10.0)
    client.close()
    assert [len(c.requests) for c in channels] == [5, 5]
    assert "reorch_record" not in channels[0].requests[0].parameters  # opt-in: only reorch asks


def test_parse_targets_accepts_one_a_list_or_a_dns_name_and_rejects_the_rest():
    assert parse_targets("127.0.0.1:8001") == ["127.0.0.1:8001"]
    assert parse_targets("a:1, grpc://b:2") == ["a:1", "b:2"]
    assert parse_targets("dns:///triton.ns.svc:8001") == ["dns:///triton.ns.svc:8001"]
    with pytest.raises(ConfigValidationError, match="not host:port"):
        parse_targets("a:1,,b")
    with pytest.raises(ConfigValidationError, match="dns: target names one host"):
        parse_targets("dns:///a:1,b:2")


def test_client_rejects_an_unknown_protocol():
    with pytest.raises(ConfigValidationError, match="protocol 'rest' is unknown"):
        _client("whole", "rest", [FakeChannel()], [])


def test_sender_environment_turns_the_event_engine_client_off_but_keeps_the_callers_choices():
    env = sender_environment({"PATH": "/bin", "GRPC_EXPERIMENTS": "event_engine_client,other"})
    assert env["PATH"] == "/bin"
    experiments = env["GRPC_EXPERIMENTS"].split(",")
    assert experiments[:2] == ["event_engine_client", "other"]  # the caller asked for it: kept on
    assert "-event_engine_client" not in experiments and "-event_engine_callback_cq" in experiments
    assert "-event_engine_client" in sender_environment({})["GRPC_EXPERIMENTS"].split(",")


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_client_sends_a_request_handed_over_early_not_before_its_scheduled_time(protocol):
    channel = FakeChannel(b"{}")
    records: list[RequestRecord] = []
    client = _client("reorch", protocol, [channel], records)
    due_ns = [time.perf_counter_ns() + delay_ms * 1_000_000 for delay_ms in (30, 40)]
    for scheduled_ns in due_ns:
        client.send(5, scheduled_ns=scheduled_ns)
    assert client.wait_idle(10.0)
    client.close()
    assert [r.ok for r in records] == [True, True]
    entered = sorted(entered_ns for _, entered_ns, _ in channel.held)
    assert all(entered_ns >= scheduled_ns for entered_ns, scheduled_ns in zip(entered, due_ns))


def test_client_and_spec_reject_an_unknown_transport_and_fake_channels_on_h2():
    from loadtest.driver import LoadSpec
    from loadtest.workloads import ArrivalSpec

    with pytest.raises(ConfigValidationError, match="transport 'quic' is unknown"):
        _client("whole", "unary", [FakeChannel()], [], transport="quic")
    with pytest.raises(ConfigValidationError, match="give transport='grpcio'"):
        _client("whole", "unary", [FakeChannel()], [], transport="h2")
    with pytest.raises(ConfigValidationError, match="transport 'quic' is unknown"):
        LoadSpec("seq", "whole", ArrivalSpec("poisson", rate_rps=1), None, duration_s=1, transport="quic")
    assert _client("whole", "unary", [FakeChannel()], []).transport == "grpcio"  # fake channels imply grpcio
