"""The fault suite: each case asserts that no request is lost, none answered twice and none hung.

One supervised server on the tiny bert_base repository (built with a 2 s queue timeout, so that the
requests queued in front of a dead stub are refused at once instead of draining at one batch per
second) serves every case of the module. The fast cases run by default; the ``slow`` ones are the
issue's full sizes (2,000 requests in flight, 1,000 streams) and print the figures::

    .venv/bin/python -m pytest tests/test_fault_suite.py -m slow -s

Requests go over gRPC with grpc.aio (one event loop, thousands in flight); reorch is called over
streams (one request per stream), which works whether the model is decoupled or not.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
import psutil
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loadtest.request_factory import RequestFactory, model_entry
from slicing.build import CRASH_QUEUE_TIMEOUT_US, BuildOptions, build_repository
from core.errors import BadParameterError
from core.model_config import read_model_config
from core.server import EmbeddedTriton
from core.supervisor import stub_identity

pytestmark = pytest.mark.server

QUEUE_TIMEOUT_US = CRASH_QUEUE_TIMEOUT_US  # `stagebatch build --default-timeout-us 2000000`: a dead stub's queue fails fast
CLIENT_DEADLINE_S = float(os.environ.get("FAULT_DEADLINE_S", "30"))  # an answer later than this counts as hung
SEQ_LEN = 8
STREAMED = ("reorch",)  # variants called over streams
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("fault_repo")
    build_repository(out, models=["bert_base"], options=BuildOptions(
        size="tiny", stages=2, max_batch=8, default_timeout_us=QUEUE_TIMEOUT_US, intra_op_threads=1))
    return out


@pytest.fixture(scope="module")
def server(repository):
    with EmbeddedTriton(repository, supervise=True, supervisor_metrics_port=0,
                        extra_args=("--exit-timeout-secs=5",)) as served:
        yield served


@pytest.fixture(scope="module")
def manifest(repository):
    return json.loads((repository / "manifest.json").read_text())


def factory(manifest, variant: str) -> RequestFactory:
    return RequestFactory(model_entry(manifest, "bert_base"), variant, seed=3)


# ---- the client side: every request's answers, counted ----


@dataclass
class Outcome:
    """What one request got: its answers (``ok`` or the error), when the first came, and when it was sent."""

    sent_s: float
    answers: list[str] = field(default_factory=list)
    answered_s: float | None = None

    @property
    def hung(self) -> bool:
        return not self.answers or self.answers == ["DEADLINE_EXCEEDED"]


async def call(stub, request: service_pb2.ModelInferRequest, streamed: bool, outcome: Outcome, *,
               cancel_after_s: float | None = None, deadline_s: float = CLIENT_DEADLINE_S) -> None:
    """Send ``request``; record every answer. A stream is half-closed after its first answer and read to its
    end, so that a second answer would be seen; ``cancel_after_s`` cancels the stream instead."""
    def note(answer: str) -> None:
        if outcome.answered_s is None:
            outcome.answered_s = time.monotonic()
        outcome.answers.append(answer)

    try:
        if not streamed:
            await stub.ModelInfer(request, timeout=deadline_s)
            note("ok")
            return
        first = asyncio.Event()

        async def requests():
            yield request
            await first.wait()

        stream = stub.ModelStreamInfer(requests(), timeout=deadline_s)
        if cancel_after_s is not None:
            asyncio.get_running_loop().call_later(cancel_after_s, stream.cancel)
        async for response in stream:
            note(response.error_message or "ok")
            first.set()
    except asyncio.CancelledError:
        if cancel_after_s is None:
            raise
        note("CANCELLED")
    except grpc.aio.AioRpcError as error:
        note(error.code().name if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
             else f"{error.code().name}: {error.details()}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def stub_pid(server: EmbeddedTriton, model: str) -> int:
    for child in psutil.Process(server._process.pid).children():
        try:
            identity = stub_identity(child.cmdline())
        except psutil.Error:  # a stub killed earlier stays a zombie: tritonserver does not reap it
            continue
        if identity is not None and identity[0] == model:
            return child.pid
    raise AssertionError(f"no stub process of {model!r}")


@dataclass
class KillReport:
    in_flight: int
    outcomes: list[Outcome]
    kill_s: float
    last_answer_after_kill_s: float
    serving_again_after_kill_s: float | None
    live_throughout: bool
    restarts: int

    def summary(self, model: str, variant: str) -> str:
        errors = sum(1 for o in self.outcomes if o.answers and o.answers[0] != "ok")
        serving = "never" if self.serving_again_after_kill_s is None else f"{self.serving_again_after_kill_s:.2f} s"
        return (f"kill {model} under {variant} load: {self.in_flight} in flight at the kill, "
                f"{len(self.outcomes) - errors} ok + {errors} errors, {sum(o.hung for o in self.outcomes)} hung; "
                f"last answer {self.last_answer_after_kill_s:.2f} s after the kill; serving again after {serving}; "
                f"server live throughout: {self.live_throughout}; supervisor restarts: {self.restarts}")


def kill_under_load(server: EmbeddedTriton, manifest, variant: str, victim: str, requests: int) -> KillReport:
    """Send ``requests`` requests at once to ``variant``, kill ``victim``'s stub while they are held, and watch."""
    make = factory(manifest, variant)
    streamed = variant in STREAMED
    restarts_before = server.supervisor.restarts(victim)

    async def scenario() -> KillReport:
        async with grpc.aio.insecure_channel(server.grpc_url, options=GRPC_OPTIONS) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            outcomes = [Outcome(time.monotonic()) for _ in range(requests)]
            tasks = []
            for index, outcome in enumerate(outcomes):
                request = service_pb2.ModelInferRequest()
                request.CopyFrom(make.request_proto(SEQ_LEN))
                request.id = str(index)
                tasks.append(asyncio.create_task(call(stub, request, streamed, outcome)))
            # Kill once the server holds requests: a few answered, most not yet.
            while sum(o.answered_s is not None for o in outcomes) < max(1, requests // 20):
                await asyncio.sleep(0.01)
            os.kill(stub_pid(server, victim), signal.SIGKILL)
            kill_s = time.monotonic()
            in_flight = [o for o in outcomes if o.answered_s is None]
            live, serving_s = True, None
            while True:  # probe: a fresh request every 0.25 s until one is answered ok; the server stays live
                probe = Outcome(time.monotonic())
                request = service_pb2.ModelInferRequest()
                request.CopyFrom(make.request_proto(SEQ_LEN))
                await call(stub, request, streamed, probe, deadline_s=10)
                live = live and await asyncio.to_thread(http_status, f"{server.http_url}/v2/health/live") == 200
                if probe.answers == ["ok"]:
                    serving_s = probe.answered_s - kill_s
                    break
                if time.monotonic() - kill_s > 60:
                    break
                await asyncio.sleep(0.25)
            await asyncio.gather(*tasks)
            answered = [o.answered_s for o in in_flight if o.answered_s is not None]
            return KillReport(len(in_flight), in_flight, kill_s, max(answered, default=kill_s) - kill_s, serving_s,
                              live, server.supervisor.restarts(victim) - restarts_before)

    return asyncio.run(scenario())


def assert_each_answered_once(outcomes: list[Outcome]) -> None:
    hung = [o for o in outcomes if o.hung]
    twice = [o.answers for o in outcomes if len(o.answers) > 1]
    assert not hung, f"{len(hung)} of {len(outcomes)} requests hung (no answer within {CLIENT_DEADLINE_S:.0f} s)"
    assert not twice, f"{len(twice)} requests answered more than once, e.g. {twice[:3]}"


# ---- the build gives every batcher the queue timeout (max_queue_size: whole and reorch only) ----


def test_build_queue_policy_reaches_whole_stages_and_reorch(tmp_path, repository):
    policies = {name: read_model_config(repository / name / "config.pbtxt")["dynamic_batching"].get("default_queue_policy")
                for name in ("bert_base", "bert_base_stage0", "bert_base_stage1", "bert_base_reorch")}
    assert {name: int(p["default_timeout_microseconds"]) for name, p in policies.items()} == dict.fromkeys(
        policies, QUEUE_TIMEOUT_US)
    out = tmp_path / "capped"
    build_repository(out, models=["bert_base"], options=BuildOptions(size="tiny", stages=2, max_queue_size=64))
    sizes = {name: read_model_config(out / name / "config.pbtxt")["dynamic_batching"]
             .get("default_queue_policy", {}).get("max_queue_size")
             for name in ("bert_base", "bert_base_stage0", "bert_base_reorch")}
    assert sizes == {"bert_base": 64, "bert_base_stage0": None, "bert_base_reorch": 64}


@pytest.mark.parametrize("option", ["max_queue_size", "default_timeout_us"])
def test_build_refuses_a_negative_queue_policy(option):
    with pytest.raises(BadParameterError, match="--" + option.replace("_", "-")):
        BuildOptions(size="tiny", **{option: -1})


# ---- kill a stub under load ----


def test_kill_whole_model_stub_under_load_answers_every_request_and_serves_again(server, manifest):
    report = kill_under_load(server, manifest, "whole", "bert_base", requests=300)
    print(report.summary("bert_base", "whole"))
    assert_each_answered_once(report.outcomes)
    assert report.serving_again_after_kill_s is not None, "the model never served again"
    assert report.live_throughout and server.is_alive()
    assert report.restarts == 1
    assert any("'bert_base' restarted" in line for line in server.supervisor.events)


@pytest.mark.slow
@pytest.mark.parametrize("variant, victim", [
    ("whole", "bert_base"), ("ensemble", "bert_base_stage0"), ("ensemble", "bert_base_stage1"),
    # the reorchestrator is no longer decoupled: Triton fails the requests its dead stub held, as for the others
    ("reorch", "bert_base_reorch"),
])
def test_kill_any_stub_under_2000_in_flight_meets_the_done_when(server, manifest, variant, victim):
    report = kill_under_load(server, manifest, variant, victim, requests=2000)
    print(report.summary(victim, variant))
    assert_each_answered_once(report.outcomes)
    assert report.serving_again_after_kill_s is not None
    assert report.live_throughout and server.is_alive()
    assert report.restarts == 1


def test_supervisor_metrics_endpoint_counts_restarts(server):
    text = urllib.request.urlopen(server.supervisor.metrics_url, timeout=5).read().decode()
    assert "stagebatch_model_restarts_total" in text


# ---- streams: concurrency and cancellation ----


def stream_many(server: EmbeddedTriton, manifest, streams: int, cancel_share: float = 0.0,
                seed: int = 0) -> tuple[list[Outcome], list[Outcome]]:
    """Open ``streams`` reorch streams at once (one request each); cancel ``cancel_share`` of them after 0-50 ms.

    Returns (kept, cancelled) outcomes.
    """
    make = factory(manifest, "reorch")
    rng = random.Random(seed)
    cancelled_at = {i for i in range(streams) if rng.random() < cancel_share}

    async def scenario():
        async with grpc.aio.insecure_channel(server.grpc_url, options=GRPC_OPTIONS) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            outcomes = [Outcome(time.monotonic()) for _ in range(streams)]
            tasks = []
            for index, outcome in enumerate(outcomes):
                request = service_pb2.ModelInferRequest()
                request.CopyFrom(make.request_proto(rng.randint(1, 16)))
                request.id = str(index)
                cancel_after_s = rng.uniform(0, 0.05) if index in cancelled_at else None
                tasks.append(asyncio.create_task(call(stub, request, True, outcome, cancel_after_s=cancel_after_s)))
            await asyncio.gather(*tasks)
            return outcomes

    outcomes = asyncio.run(scenario())
    return ([o for i, o in enumerate(outcomes) if i not in cancelled_at],
            [o for i, o in enumerate(outcomes) if i in cancelled_at])


def assert_still_serving(server: EmbeddedTriton, manifest, variant: str = "reorch") -> None:
    probe = Outcome(time.monotonic())

    async def once():
        async with grpc.aio.insecure_channel(server.grpc_url, options=GRPC_OPTIONS) as channel:
            request = service_pb2.ModelInferRequest()
            request.CopyFrom(factory(manifest, variant).request_proto(SEQ_LEN))
            await call(service_pb2_grpc.GRPCInferenceServiceStub(channel), request, variant in STREAMED, probe)

    asyncio.run(once())
    assert probe.answers == ["ok"], probe.answers
    assert http_status(f"{server.http_url}/v2/health/live") == 200 and server.is_alive()


def assert_ok_or_queue_timeout(outcomes: list[Outcome]) -> None:
    """Every answer is a result, or the queue policy's refusal (the module's 2 s timeout, on 2 busy cores)."""
    others = [o.answers for o in outcomes if o.answers != ["ok"] and "timeout expired" not in o.answers[0]]
    assert others == [], others[:3]
    assert any(o.answers == ["ok"] for o in outcomes)


@pytest.mark.parametrize("streams", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_concurrent_reorch_streams_are_each_answered_exactly_once(server, manifest, streams):
    restarts = server.supervisor.restarts("bert_base_reorch")
    kept, _ = stream_many(server, manifest, streams)
    assert_each_answered_once(kept)
    assert_ok_or_queue_timeout(kept)
    assert server.supervisor.restarts("bert_base_reorch") == restarts, "the reorch stub died under the streams"


@pytest.mark.parametrize("streams", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_clients_cancelling_30_percent_of_streams_leave_the_rest_answered_once(server, manifest, streams):
    restarts = server.supervisor.restarts("bert_base_reorch")
    kept, cancelled = stream_many(server, manifest, streams, cancel_share=0.3, seed=streams)
    assert 0.2 * streams < len(cancelled) < 0.4 * streams
    assert_each_answered_once(kept)
    assert_ok_or_queue_timeout(kept)
    # A cancelled stream ends with at most one answer (its own, if it came first) and never hangs.
    assert all(len(o.answers) <= 2 and o.answers[-1] in ("CANCELLED", "ok") for o in cancelled), \
        [o.answers for o in cancelled if len(o.answers) > 2 or o.answers[-1] not in ("CANCELLED", "ok")][:3]
    assert server.supervisor.restarts("bert_base_reorch") == restarts, "the reorch stub died under cancellations"
    assert_still_serving(server, manifest)


# ---- property-based fuzz of raw ModelInferRequests ----

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "", "NOPE"]
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}


def fuzz_strategy(manifest):
    from hypothesis import strategies as st

    entry = model_entry(manifest, "bert_base")
    names = [spec.name for spec in entry.inputs]

    factories = {variant: factory(manifest, variant) for variant in ("whole", "ensemble", "reorch")}

    @st.composite
    def mutated(draw):
        """A valid request with at most one thing wrong: it reaches the model more often than a random one."""
        variant = draw(st.sampled_from(sorted(factories)))
        request = service_pb2.ModelInferRequest()
        request.CopyFrom(factories[variant].request_proto(draw(st.integers(1, entry.max_length))))
        where = draw(st.integers(0, len(request.inputs) - 1))
        mutation = draw(st.sampled_from(["none", "bytes", "truncate", "dim", "record"]))
        if mutation == "bytes":  # token ids out of the vocabulary, masks of any value
            size = len(request.raw_input_contents[where])
            request.raw_input_contents[where] = draw(st.binary(min_size=size, max_size=size))
        elif mutation == "truncate":
            request.raw_input_contents[where] = request.raw_input_contents[where][:-draw(st.integers(1, 8))]
        elif mutation == "dim":
            request.inputs[where].shape[draw(st.integers(0, len(request.inputs[where].shape) - 1))] = \
                draw(st.integers(-1, 40).filter(lambda dim: dim != 0))
        elif mutation == "record":
            request.parameters["reorch_record"].bool_param = draw(st.booleans())
        return variant, request

    @st.composite
    def arbitrary(draw):
        variant = draw(st.sampled_from(["whole", "ensemble", "reorch"]))
        request = service_pb2.ModelInferRequest(model_name=entry.triton_name(variant))
        if draw(st.integers(0, 3)) == 0:
            request.model_version = draw(st.sampled_from(["", "1", "2", "-1", "x"]))
        count = draw(st.sampled_from([len(names)] * 4 + [0, 1, len(names) + 1]))
        raw = draw(st.integers(0, 3)) > 0
        for index in range(count):
            tensor = request.inputs.add()
            tensor.name = draw(st.sampled_from([names[index]] * 6 + ["", "tokens", "x" * 300]) if index < len(names)
                               else st.sampled_from([*names, "extra"]))
            tensor.datatype = draw(st.sampled_from(["INT64"] * 6 + DATATYPES))
            shape = draw(st.one_of(st.tuples(st.integers(-1, 9), st.integers(-1, 20)).map(list),
                                   st.lists(st.integers(-2, 20), min_size=0, max_size=4))
                         .filter(lambda dims: not dims or dims[0] != 0))  # zero rows hang: see the test below
            tensor.shape.extend(shape)
            if raw:
                elements = 1
                for dim in shape:
                    elements *= max(dim, 0)
                exact = elements * ITEM_BYTES.get(tensor.datatype, 1)
                size = draw(st.sampled_from([exact, max(0, exact - 1), exact + 3, 0]))
                request.raw_input_contents.append(draw(st.binary(min_size=min(size, 4096), max_size=min(size, 4096))))
            else:
                elements = 1
                for dim in shape:
                    elements *= max(dim, 0)
                tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-5, 2**40), min_size=min(elements, 200),
                                                                    max_size=min(elements, 200))))
        if draw(st.integers(0, 3)) == 0:
            key = draw(st.sampled_from(["reorch_record", "timeout", "junk", "sequence_id", "priority"]))
            parameter = request.parameters[key]
            kind = draw(st.sampled_from(["bool", "int", "string"]))
            if kind == "bool":
                parameter.bool_param = draw(st.booleans())
            elif kind == "int":
                parameter.int64_param = draw(st.integers(-(2**40), 2**40))
            else:
                parameter.string_param = draw(st.text(max_size=20))
        if draw(st.booleans()):
            output = request.outputs.add()
            output.name = draw(st.sampled_from(["last_hidden_state", "REORCH_RECORD", "nope"]))
        return variant, request

    return st.one_of(mutated(), arbitrary())


def fuzz(server: EmbeddedTriton, manifest, examples: int) -> list[list[str]]:
    from hypothesis import HealthCheck, given, settings

    seen: list[list[str]] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_strategy(manifest))
    def check(case):
        variant, request = case
        outcome = Outcome(time.monotonic())

        async def once():
            async with grpc.aio.insecure_channel(server.grpc_url, options=GRPC_OPTIONS) as channel:
                await call(service_pb2_grpc.GRPCInferenceServiceStub(channel), request, variant in STREAMED, outcome,
                           deadline_s=20)

        asyncio.run(once())
        seen.append(outcome.answers)
        assert len(outcome.answers) == 1 and not outcome.hung, (variant, str(request)[:500], outcome.answers)
        assert http_status(f"{server.http_url}/v2/health/live") == 200, "the server died"

    check()
    return seen


@pytest.mark.parametrize("examples", [40, pytest.param(300, marks=pytest.mark.slow)])
def test_fuzzed_raw_requests_each_get_one_answer_and_the_server_stays_live(server, manifest, examples):
    restarts = {name: server.supervisor.restarts(name) for name in ("bert_base", "bert_base_reorch",
                                                                      "bert_base_stage0", "bert_base_stage1")}
    answers = fuzz(server, manifest, examples)
    kinds = collections.Counter(re.sub(r"\d+", "N", a[0])[:70] for a in answers)
    print(f"{len(answers)} fuzzed requests:", dict(kinds.most_common(8)))
    assert len(answers) >= examples
    for variant in ("whole", "ensemble", "reorch"):
        assert_still_serving(server, manifest, variant)
    assert {name: server.supervisor.restarts(name) for name in restarts} == restarts, "a fuzzed request killed a stub"


@pytest.mark.xfail(strict=True, reason=(
    "found by the fuzz: a request of shape [0, 0] to the whole model or a stage (Python backend, onnx_runner) "
    "is never answered on 2.51 (the ensemble answers it with an error); remove this marker once it is"))
@pytest.mark.parametrize("model", ["bert_base", "bert_base_stage0"])
def test_a_request_with_zero_rows_is_answered(server, model):
    request = service_pb2.ModelInferRequest(model_name=model)
    for name in ("input_ids", "attention_mask"):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "INT64"
        tensor.shape.extend([0, 0])
        request.raw_input_contents.append(b"")
    outcome = Outcome(time.monotonic())

    async def once():
        async with grpc.aio.insecure_channel(server.grpc_url, options=GRPC_OPTIONS) as channel:
            await call(service_pb2_grpc.GRPCInferenceServiceStub(channel), request, False, outcome, deadline_s=5)

    asyncio.run(once())
    assert not outcome.hung, outcome.answers
