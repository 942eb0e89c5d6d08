"""The load client's timestamps, request bytes and records against fake ``grpc.aio`` channels (no server)."""

from __future__ import annotations

import asyncio
import time

import pytest
from tritonclient.grpc import service_pb2

from loadtest.driver import LoadJob, LoadSpec
from loadtest.client import (
    REORCH_RECORD_PARAMETER,
    RequestRecord,
    TritonLoadClient,
    finish_record,
    parse_targets,
    sender_environment,
)
from loadtest.request_factory import RequestFactory, model_entry
from loadtest.sender import Sender
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import ConfigValidationError

MANIFEST = {
    "target": "embedded",
    "models": {
        "seq": {
            "max_batch_size": 8, "variants": {"whole": "seq", "reorch": "seq_reorch"},
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 100],
                        "sequence_axis": 1}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
            "sequence": {"max_length": 32, "min_length": 1},
        }
    },
}  # fmt: skip
DELAY_S = 0.02


class FakeChannel:
    """A ``grpc.aio`` channel that answers every call after ``DELAY_S``; remembers each request and when it held it."""

    def __init__(self, record_document: bytes | None = None) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.held: list[tuple[int, int, int]] = []  # (entered wall ns, entered perf ns, left perf ns)
        self.record_document = record_document

    async def _answer(self, payload: bytes) -> service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest.FromString(payload)
        entered_wall, entered = time.time_ns(), time.perf_counter_ns()
        await asyncio.sleep(DELAY_S)
        response = service_pb2.ModelInferResponse(id=request.id, model_name=request.model_name)
        if self.record_document is not None:
            response.outputs.add(name="REORCH_RECORD", datatype="BYTES", shape=[1])
            size = len(self.record_document).to_bytes(4, "little")
            response.raw_output_contents.append(size + self.record_document)
        self.requests.append(request)
        self.held.append((entered_wall, entered, time.perf_counter_ns()))
        return response

    def unary_unary(self, path, request_serializer=None, response_deserializer=None):
        assert path.endswith("/ModelInfer") and request_serializer is None

        async def call(payload, timeout=None):
            return (await asyncio.wait_for(self._answer(payload), timeout)).SerializeToString()

        return call

    def stream_stream(self, path, request_serializer=None, response_deserializer=None):
        assert path.endswith("/ModelStreamInfer")

        async def responses(requests):
            async for payload in requests:
                yield service_pb2.ModelStreamInferResponse(infer_response=await self._answer(payload))

        return lambda requests: FakeStreamCall(responses(requests))

    async def close(self) -> None:
        pass


class FakeStreamCall:
    """A ``grpc.aio`` stream call: iterates over the responses; ``cancel`` ends it."""

    def __init__(self, responses) -> None:
        self.responses = responses

    def __aiter__(self):
        return self.responses.__aiter__()

    def cancel(self) -> bool:
        return True


def _client(variant: str, protocol: str, channels: list[FakeChannel], records: list[RequestRecord], **kw):
    factory = RequestFactory(model_entry(MANIFEST, "seq"), variant, seed=0)
    return TritonLoadClient("unused:1", factory, model="seq", on_record=records.append, protocol=protocol,
                            channels=channels, **kw)


def _send_all(variant: str, protocol: str, channels: list[FakeChannel], sends: list[dict], **kw) -> list[RequestRecord]:
    """Send ``client.send(**each)`` from one event loop, wait for every record, close; the records."""
    records: list[RequestRecord] = []

    async def main() -> None:
        client = _client(variant, protocol, channels, records, **kw)
        for each in sends:
            client.send(**each)
        assert await client.wait_idle(10.0)
        await client.close()

    asyncio.run(main())
    return records


@pytest.mark.parametrize("variant, protocol", [("whole", "unary"), ("reorch", "stream"), ("reorch", "unary")])
def test_client_timestamps_bracket_the_call_when_the_server_answers_after_a_known_delay(variant, protocol):
    channel = FakeChannel(b'{"bucket": 5}' if variant == "reorch" else None)
    records = _send_all(variant, protocol, [channel], [{"seq_len": 5}] * 3)
    assert len(records) == 3 and all(r.ok for r in records), [r.error for r in records]
    held = {request.id: times for request, times in zip(channel.requests, channel.held)}
    for record in records:
        entered_wall_ns, entered_ns, left_ns = held[record.request_id]
        assert record.t_send_us * 1000 <= entered_wall_ns  # sent before the server had it
        assert record.latency_us * 1000 >= left_ns - entered_ns  # ended after the server let go
        assert record.latency_us >= DELAY_S * 1e6


def test_client_asks_reorch_for_its_record_and_parses_it_only_when_finishing():
    channel = FakeChannel(b'{"bucket": 7, "batch_sizes": [1]}')
    records = _send_all("reorch", "stream", [channel], [{"seq_len": 7}], priority=2)
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
    _send_all("whole", "unary", channels, [{"seq_len": 4}] * 10)
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
    async def make() -> None:
        _client("whole", "rest", [FakeChannel()], [])

    with pytest.raises(ConfigValidationError, match="protocol 'rest' is unknown"):
        asyncio.run(make())


def test_sender_environment_turns_the_event_engine_client_off_but_keeps_the_callers_choices():
    env = sender_environment({"PATH": "/bin", "GRPC_EXPERIMENTS": "event_engine_client,other"})
    assert env["PATH"] == "/bin"
    experiments = env["GRPC_EXPERIMENTS"].split(",")
    assert experiments[:2] == ["event_engine_client", "other"]  # the caller asked for it: kept on
    assert "-event_engine_client" not in experiments and "-event_engine_callback_cq" in experiments
    assert "-event_engine_client" in sender_environment({})["GRPC_EXPERIMENTS"].split(",")


def _plan(arrival: ArrivalSpec, protocol: str, duration_s: float, **kw) -> LoadJob:
    spec = LoadSpec("seq", "reorch", arrival, LengthSpec("fixed", length=5), duration_s=duration_s, protocol=protocol, **kw)
    return LoadJob("unused:1", spec, MANIFEST["models"]["seq"], start_epoch_s=time.time() + 0.05)


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_sender_sends_every_scheduled_arrival_once_and_never_before_its_time(protocol):
    channel = FakeChannel(b"{}")
    frames: list = []
    sender = Sender(_plan(ArrivalSpec("constant", rate_rps=200), protocol, 0.1), process_index=0, emit=frames.append,
                    channels=[channel])
    summary = sender.run()
    offsets_ns = sender._schedule[0]
    due_ns = [sender._start_ns + offset for offset in offsets_ns]
    entered = sorted(entered_ns for _, entered_ns, _ in channel.held)
    assert len(entered) == len(due_ns) == summary["records"] == summary["scheduled"] > 0
    assert all(e >= d for e, d in zip(entered, due_ns))
    sent = [record for frame in frames if frame[0] == "records" for record in frame[1]]
    assert sorted(r["request_id"] for r in sent) == sorted(r.id for r in channel.requests)  # each once
    assert all(r["ok"] for r in sent) and frames[-1] == ("done", summary)


def test_sender_runs_each_closed_loop_user_as_one_request_at_a_time():
    channel = FakeChannel(b"{}")
    sender = Sender(_plan(ArrivalSpec("closed", users=2), "unary", 0.2), process_index=0, emit=lambda frame: None,
                    channels=[channel])
    sender.add_user()
    sender.add_user()
    sender.run()
    spans = sorted((entered, left) for _, entered, left in channel.held)
    assert 2 * 3 <= len(spans) <= 2 * 0.2 / DELAY_S + 2 and all(r.ok for r in sender.records)
    at_once = max(sum(1 for e, l in spans if e <= entered < l) for entered, _ in spans)
    assert at_once <= 2


class SilentChannel(FakeChannel):
    """Never answers: every call hangs until its deadline (unary) or until it is cancelled."""

    async def _answer(self, payload: bytes) -> service_pb2.ModelInferResponse:
        self.requests.append(service_pb2.ModelInferRequest.FromString(payload))
        await asyncio.sleep(3600)

    def stream_stream(self, path, request_serializer=None, response_deserializer=None):
        async def responses(requests):  # takes every request, answers none
            async for payload in requests:
                self.requests.append(service_pb2.ModelInferRequest.FromString(payload))
            await asyncio.sleep(3600)
            yield None

        return lambda requests: FakeStreamCall(responses(requests))


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_sender_records_each_unanswered_request_once_as_failed_when_the_server_never_answers(protocol):
    channel = SilentChannel()
    plan = _plan(ArrivalSpec("constant", rate_rps=100), protocol, 0.05, client_timeout_s=0.1)
    sender = Sender(plan, process_index=0, emit=lambda frame: None, channels=[channel])
    summary = sender.run()
    assert summary["records"] == summary["scheduled"] == len(sender.records) > 0
    assert len({r.request_id for r in sender.records}) == len(sender.records)
    assert not any(r.ok for r in sender.records)
    assert all("Timeout" in r.error for r in sender.records), {r.error for r in sender.records}
