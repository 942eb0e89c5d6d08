"""The reorchestrator through the embedded Triton server (gRPC streaming, unary gRPC, HTTP), with tiny staged models."""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.request
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from reorch_models import (
    VOCAB,
    random_sequence_request,
    write_mlp_chain,
    write_sequence_chain,
    write_slow_chain,
)

from backends.reorch.policies import BatchPolicy
from backends.reorch.spec import RECORD_OUTPUT, RECORD_PARAMETER
from stagebatch.cli import main as cli_main
from core.reorch_deploy import write_reorch_model
from core.server import EmbeddedTriton

pytestmark = pytest.mark.server
POLICIES = [p.value for p in BatchPolicy]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    seq_entry, seq_reference = write_sequence_chain(repository, "seqm", favoured=(4, 2, 2))
    for policy in POLICIES:
        write_reorch_model(repository, "seqm", {**seq_entry, "variants": {"reorch": f"seqm_{policy}"}},
                           max_batch_size=8, queue_delay_us=2000, policy=policy,
                           knobs={"stretch_max_wait_us": 5000, "stretch_max_rows": 16})
    # stages far too cheap for their boundaries: the cost model fuses every batch, answered from execute
    fused_entry = {**seq_entry, "stages": [{**stage, "latency_ms": {"1": 0.02, "8": 0.05}} for stage in seq_entry["stages"]],
                   "variants": {"reorch": "seqm_fused"}}
    write_reorch_model(repository, "seqm", fused_entry, max_batch_size=8, queue_delay_us=2000, policy="dva")
    mlp_entry, mlp_reference = write_mlp_chain(repository, "mlp")
    write_reorch_model(repository, "mlp", mlp_entry, max_batch_size=8, queue_delay_us=500, policy="dva")
    # no value range on tokens: an out-of-vocabulary id makes stage 0 (Gather) raise inside onnxruntime
    raw_entry, _ = write_sequence_chain(repository, "raw", value_range=False)
    write_reorch_model(repository, "raw", raw_entry, max_batch_size=8, queue_delay_us=0, policy="pipeline")
    # a manifest for `stagebatch infer` (its reorch variant is the dva model)
    (repository / "manifest.json").write_text(json.dumps(
        {"target": "embedded", "models": {"seqm": {**seq_entry, "variants": {"reorch": "seqm_dva"}}}}))
    # the stage directories hold bare ONNX files (no config): load only the reorchestrator models
    models = [f"seqm_{policy}" for policy in POLICIES] + ["seqm_fused", "mlp_reorch", "raw_reorch"]
    with EmbeddedTriton(repository, models=models) as server:
        yield server, seq_reference, mlp_reference


def _inputs(tensors: dict[str, np.ndarray], client_module=grpcclient) -> list:
    inputs = []
    for name, array in tensors.items():
        tensor = client_module.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream_all(url: str, model: str, requests: list[dict[str, np.ndarray]], timeout_s: float = 60,
               record: bool = False):
    """Send every request on one stream at once; returns {index: (result, error)}."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    parameters = {RECORD_PARAMETER: True} if record else None
    try:
        for index, tensors in enumerate(requests):
            client.async_stream_infer(model, _inputs(tensors), request_id=str(index), parameters=parameters)
        received = [answers.get(timeout=timeout_s) for _ in requests]
    finally:
        client.stop_stream()
    out = {}
    errors = []
    for result, error in received:
        if error is not None:
            errors.append(error)
            continue
        out[int(result.get_response().id)] = (result, None)
    return out, errors


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_the_whole_models_outputs(served, policy):
    server, reference, _ = served
    rng = np.random.default_rng(11)
    requests = [random_sequence_request(rng, int(rng.integers(1, 3)), int(n))
                for n in rng.choice([2, 4, 7, 16, 30, 32], 40)]
    results, errors = stream_all(server.grpc_url, f"seqm_{policy}", requests, record=True)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(len(requests)))
    for index, request in enumerate(requests):
        result = results[index][0]
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(result.as_numpy("hidden"), want["hidden"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("pooled"), want["pooled"], rtol=1e-5, atol=1e-6)
        record = json.loads(result.as_numpy("REORCH_RECORD").ravel()[0])
        assert record["arrival_us"] <= record["stage0_entry_us"] <= record["exit_us"]
        assert len(record["batch_sizes"]) == 3


def test_non_sequence_model_through_the_server(served):
    server, _, reference = served
    rng = np.random.default_rng(2)
    requests = [{"x": rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)} for _ in range(20)]
    results, errors = stream_all(server.grpc_url, "mlp_reorch", requests)
    assert not errors
    for index, request in enumerate(requests):
        np.testing.assert_allclose(results[index][0].as_numpy("y"), reference(request["x"])["y"], rtol=1e-5, atol=1e-6)


def test_a_stage_that_raises_fails_only_its_request_and_the_model_keeps_serving(served):
    server, reference, _ = served
    poison = {"tokens": np.array([[1, 2, VOCAB + 100]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    results, errors = stream_all(server.grpc_url, "raw_reorch", [poison], record=True)
    assert not results and len(errors) == 1
    assert "stage 0 failed" in str(errors[0]) and "REORCH_RECORD" in str(errors[0])
    good = random_sequence_request(np.random.default_rng(0), 2, 5)
    results, errors = stream_all(server.grpc_url, "raw_reorch", [good])
    assert not errors
    np.testing.assert_allclose(results[0][0].as_numpy("hidden"),
                               reference(good["tokens"], good["attention_mask"])["hidden"], rtol=1e-5, atol=1e-6)


def test_unary_grpc_and_http_calls_match_the_whole_models_outputs(served):
    server, reference, _ = served
    rng = np.random.default_rng(21)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    for rows, length in [(1, 3), (2, 17), (3, 32)]:
        request = random_sequence_request(rng, rows, length)
        want = reference(request["tokens"], request["attention_mask"])
        for client, module in ((grpc, grpcclient), (http, httpclient)):
            result = client.infer("seqm_dva", _inputs(request, module))
            np.testing.assert_allclose(result.as_numpy("hidden"), want["hidden"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result.as_numpy("pooled"), want["pooled"], rtol=1e-5, atol=1e-6)


def test_record_is_sent_only_when_the_request_asks_for_it(served):
    server, _, _ = served
    request = random_sequence_request(np.random.default_rng(3), 2, 5)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    plain = grpc.infer("seqm_dva", _inputs(request))
    assert plain.as_numpy(RECORD_OUTPUT) is None and plain.as_numpy("pooled") is not None
    asked = grpc.infer("seqm_dva", _inputs(request), parameters={RECORD_PARAMETER: True})
    records = asked.as_numpy(RECORD_OUTPUT)
    assert records.shape == (2, 1)
    record = json.loads(records[0, 0])
    assert {"arrival_us", "stage0_entry_us", "exit_us", "ops", "bucket", "batch_sizes"} <= set(record)
    assert http.infer("seqm_dva", _inputs(request, httpclient)).as_numpy(RECORD_OUTPUT) is None
    asked = http.infer("seqm_dva", _inputs(request, httpclient), parameters={RECORD_PARAMETER: True})
    assert json.loads(asked.as_numpy(RECORD_OUTPUT)[1, 0])["exit_us"] >= record["arrival_us"]


def test_concurrent_unary_calls_are_each_answered_exactly_once(served):
    server, reference, _ = served
    rng = np.random.default_rng(8)
    requests = [random_sequence_request(rng, 1, int(n)) for n in rng.integers(1, 33, 300)]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    for index, request in enumerate(requests):
        client.async_infer("seqm_dva", _inputs(request), partial(lambda i, result, error: answers.put((i, result, error)), index),
                           request_id=str(index))
    received = [answers.get(timeout=120) for _ in requests]
    assert [e for _, _, e in received if e is not None] == []
    assert sorted(i for i, _, _ in received) == list(range(len(requests)))
    for index, result, _ in received[::37]:
        want = reference(requests[index]["tokens"], requests[index]["attention_mask"])
        np.testing.assert_allclose(result.as_numpy("pooled"), want["pooled"], rtol=1e-5, atol=1e-6)
    with pytest.raises(queue.Empty):
        answers.get(timeout=0.3)  # nothing answered twice


def _metric(metrics_url: str, family: str, model: str) -> float:
    """Sum of a family's samples for ``model`` (0 where it has none yet)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    return sum(float(value) for value in re.findall(rf'{family}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)', text))


def test_fused_batches_answered_from_execute_match_the_whole_model_once_each(served):
    """The inline path of model.py (the cost model fuses every batch; execute returns the responses):
    concurrent unary calls, some asking for the record, each answered once with the chain's outputs."""
    server, reference, _ = served
    rng = np.random.default_rng(14)
    lengths = [int(n) for n in rng.choice([6, 6, 6, 3, 17, 32], 240)]  # mostly one length, like steady load
    requests = [random_sequence_request(rng, 1 + i % 2, n) for i, n in enumerate(lengths)]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    for index, request in enumerate(requests):
        client.async_infer("seqm_fused", _inputs(request), partial(lambda i, result, error: answers.put((i, result, error)), index),
                           request_id=str(index), parameters={RECORD_PARAMETER: True} if index % 3 == 0 else None)
    received = [answers.get(timeout=120) for _ in requests]
    assert [e for _, _, e in received if e is not None] == []
    assert sorted(i for i, _, _ in received) == list(range(len(requests)))
    for index, result, _ in received:
        request = requests[index]
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(result.as_numpy("hidden"), want["hidden"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("pooled"), want["pooled"], rtol=1e-5, atol=1e-6)
        records = result.as_numpy(RECORD_OUTPUT)
        if index % 3 == 0:
            assert records.shape == (request["tokens"].shape[0], 1)
            assert json.loads(records[0, 0])["ops"] == [{"op": "fuse", "stage": 0}]
        else:
            assert records is None
    with pytest.raises(queue.Empty):
        answers.get(timeout=0.3)  # nothing answered twice
    deadline = time.monotonic() + 10  # the model publishes its counters about once a second
    while _metric(server.metrics_url, "stagebatch_reorch_inline_samples_total", "seqm_fused") < 360 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server.metrics_url, "stagebatch_reorch_inline_samples_total", "seqm_fused") == 360  # every row
    assert _metric(server.metrics_url, "stagebatch_reorch_stage_executions_total", "seqm_fused") == 0


def test_bad_request_is_answered_with_invalid_argument(served):
    server, _, _ = served
    too_long = random_sequence_request(np.random.default_rng(0), 1, 40)  # max_length is 32
    results, errors = stream_all(server.grpc_url, "seqm_dva", [too_long])
    assert not results and "sequence length 40" in str(errors[0])
    out_of_range = {"tokens": np.full((1, 3), VOCAB, np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    results, errors = stream_all(server.grpc_url, "seqm_dva", [out_of_range])
    assert not results and "values must lie in [0, 50)" in str(errors[0])


def test_1000_concurrent_streaming_requests_are_all_answered(served):
    server, reference, _ = served
    rng = np.random.default_rng(5)
    requests = [random_sequence_request(rng, 1, int(n)) for n in rng.integers(1, 33, 1000)]
    results, errors = stream_all(server.grpc_url, "seqm_dva", requests, timeout_s=120)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(1000))
    for index in range(0, 1000, 97):
        request = requests[index]
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(results[index][0].as_numpy("hidden"), want["hidden"], rtol=1e-5, atol=1e-6)


def test_metrics_are_published_with_the_documented_names(served):
    server, _, _ = served
    stream_all(server.grpc_url, "mlp_reorch", [{"x": np.ones((2, 4), np.float32)}])
    pattern = r'stagebatch_reorch_requests_total\{[^}]*model="mlp_reorch"[^}]*outcome="success"[^}]*\} (\d+)'
    deadline = time.monotonic() + 10  # the model publishes its counters about once a second
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:  # noqa: S310 (loopback)
            text = response.read().decode()
        success = re.search(pattern, text)
        if (success and int(success.group(1)) >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert success and int(success.group(1)) >= 1
    for family in ("stagebatch_reorch_operations_total", "stagebatch_reorch_stage_executions_total",
                   "stagebatch_reorch_stage_samples_total", "stagebatch_reorch_stage_queue_us_total",
                   "stagebatch_reorch_stage_compute_us_total", "stagebatch_reorch_inflight_requests"):
        assert f"{family}{{" in text, family


def _inflight(metrics_url: str, model: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    found = re.search(rf'stagebatch_reorch_inflight_requests\{{model="{model}"\}} (\S+)', text)
    return float(found.group(1)) if found else -1.0


def _send_many(client, model, count, rng, length=32, rows=8):
    for index in range(count):
        client.async_stream_infer(model, _inputs(random_sequence_request(rng, rows, length)), request_id=str(index))


def test_unloading_answers_every_pending_request(tmp_path, triton_server):
    # NOTE: unload only after the requests reached the model. Unloading while requests still arrive
    # on a stream can crash tritonserver 2.51's gRPC frontend (ASSERTION FAILED !byte_buffer->Valid()),
    # reproduced with a trivial decoupled echo model too: a Triton bug, not the reorchestrator's.
    entry = write_slow_chain(tmp_path, width=1024, depth=100)
    write_reorch_model(tmp_path, "slow", entry, max_batch_size=8, queue_delay_us=0, policy="dva")
    server = triton_server(tmp_path, models=["slow_reorch"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    count = 60
    x = np.ones((8, 1024), np.float32)
    for index in range(count):
        client.async_stream_infer("slow_reorch", _inputs({"x": x}), request_id=str(index))
    time.sleep(0.3)
    assert answers.qsize() < count  # requests are still inside the reorchestrator
    client.unload_model("slow_reorch", headers=server.admin_headers)
    received = [answers.get(timeout=60) for _ in range(count)]
    client.stop_stream()
    errors = [str(error) for _, error in received if error is not None]
    # Triton waits for a decoupled model's pending responses before finalize; whatever is left
    # when finalize runs is answered "shutting down"
    assert all("shutting down" in e for e in errors), errors[:3]
    with pytest.raises(queue.Empty):
        answers.get(timeout=0.5)  # nothing answered twice


def test_client_cancellation_leaves_nothing_in_flight_and_the_model_keeps_serving(tmp_path, triton_server):
    entry, reference = write_sequence_chain(tmp_path, "seqm")
    write_reorch_model(tmp_path, "seqm", entry, max_batch_size=8, queue_delay_us=0, policy="dva",
                       knobs={"stretch_max_wait_us": 1000})
    server = triton_server(tmp_path, models=["seqm_reorch"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: None)
    _send_many(client, "seqm_reorch", 1500, np.random.default_rng(1))
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while _inflight(server.metrics_url, "seqm_reorch") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _inflight(server.metrics_url, "seqm_reorch") == 0
    good = random_sequence_request(np.random.default_rng(2), 1, 6)
    results, errors = stream_all(server.grpc_url, "seqm_reorch", [good])
    assert not errors
    np.testing.assert_allclose(results[0][0].as_numpy("pooled"),
                               reference(good["tokens"], good["attention_mask"])["pooled"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", [[], ["--stream"], ["--http"]])
def test_infer_command_prints_shapes_checksums_and_the_record(served, capsys, protocol):
    server, _, _ = served
    url = server.http_url if protocol == ["--http"] else server.grpc_url
    code = cli_main(["infer", "--url", url, "--model", "seqm", "--variant", "reorch", "--length", "5",
                     "--repository", str(server.repository), *protocol])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "hidden: shape [1, 5, 8] float32 checksum" in out and "pooled: shape [1, 8]" in out
    assert f"{RECORD_OUTPUT}: {{" in out and '"batch_sizes"' in out


def test_infer_command_refuses_a_length_outside_the_models_range(served, capsys):
    server, _, _ = served
    code = cli_main(["infer", "--url", server.grpc_url, "--model", "seqm", "--variant", "reorch", "--length", "99",
                     "--repository", str(server.repository)])
    assert code == 1 and "outside model 'seqm'" in capsys.readouterr().err


@pytest.mark.slow
def test_5000_concurrent_unary_calls_are_each_answered_exactly_once(served):
    server, reference, _ = served
    rng = np.random.default_rng(50)
    requests = [random_sequence_request(rng, 1, int(n)) for n in rng.integers(1, 33, 5000)]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    for index, request in enumerate(requests):
        client.async_infer("seqm_dva", _inputs(request),
                           partial(lambda i, result, error: answers.put((i, result, error)), index))
    received = [answers.get(timeout=300) for _ in requests]
    assert [str(e) for _, _, e in received if e is not None][:3] == []
    assert sorted(i for i, _, _ in received) == list(range(len(requests)))
    for index, result, _ in received[::499]:
        want = reference(requests[index]["tokens"], requests[index]["attention_mask"])
        np.testing.assert_allclose(result.as_numpy("hidden"), want["hidden"], rtol=1e-5, atol=1e-6)
    with pytest.raises(queue.Empty):
        answers.get(timeout=0.5)  # nothing answered twice
