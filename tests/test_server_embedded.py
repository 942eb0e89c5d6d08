"""The embedded Triton server, through real gRPC calls (no mocks)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from helpers import add_decoupled_echo, add_matmul, add_tokens, matmul_model, token_model
from core.errors import ServerStartError
from core.server import EmbeddedTriton, model_load_errors

pytestmark = pytest.mark.server


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    add_matmul(repository, "matmul", max_batch_size=8)
    add_tokens(repository, "tokens", vocab=50)
    add_decoupled_echo(repository, "echo")
    with EmbeddedTriton(repository) as server:
        yield server


def test_unary_inference_returns_what_onnxruntime_returns(served):
    model, _ = matmul_model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    result = client.infer("matmul", [_input("x", x, "FP32")]).as_numpy("y")
    np.testing.assert_allclose(result, session.run(None, {"x": x})[0], rtol=1e-6)


def test_cpu_seconds_counts_the_server_and_its_stubs_and_grows_with_requests(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    x = np.ones((1, 4), dtype=np.float32)
    before = served.cpu_seconds()
    for _ in range(300):
        client.infer("matmul", [_input("x", x, "FP32")])
    assert before > 0 and served.cpu_seconds() > before
    assert EmbeddedTriton(served.repository).cpu_seconds() == 0.0  # not started: nothing to count


def test_requests_of_different_lengths_share_a_batch_and_get_their_own_rows_back(served):
    _, table = token_model(50)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    results: queue.Queue = queue.Queue()
    rng = np.random.default_rng(2)
    sent = {}
    for index, length in enumerate([3, 7, 1, 12, 7]):
        ids = rng.integers(0, 50, size=(1, length), dtype=np.int64)
        sent[str(index)] = ids
        client.async_infer(
            "tokens",
            [_input("ids", ids, "INT64")],
            partial(lambda i, result, error: results.put((i, result, error)), str(index)),
            request_id=str(index),
        )
    for _ in sent:
        index, result, error = results.get(timeout=30)
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("y"), table[sent[index]])
    statistics = client.get_inference_statistics("tokens", as_json=True)["model_stats"][0]
    # Five requests in fewer executions: they were batched despite their different lengths.
    assert int(statistics["execution_count"]) < int(statistics["inference_count"])


def test_decoupled_model_answers_over_grpc_streaming(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    client.async_stream_infer("echo", [_input("x", x, "FP32")], parameters={"repeat": 3})
    received = [responses.get(timeout=30) for _ in range(3)]
    client.stop_stream()
    for result, error in received:
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("y"), x * 2)


@pytest.mark.parametrize(
    ("case", "inputs", "expected"),
    [
        ("wrong input name", lambda: [_input("nope", np.ones((1, 4), np.float32), "FP32")], "nope"),
        ("wrong dtype", lambda: [_input("x", np.ones((1, 4), np.int32), "INT32")], "data-type"),
        ("wrong shape", lambda: [_input("x", np.ones((1, 5), np.float32), "FP32")], "shape"),
        ("batch above the maximum", lambda: [_input("x", np.ones((9, 4), np.float32), "FP32")], "batch"),
    ],
)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(served, case, inputs, expected):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("matmul", inputs())
    assert "INVALID_ARG" in str(raised.value.status()) or "StatusCode.INVALID_ARGUMENT" in str(raised.value.status())
    assert expected in str(raised.value).lower() or expected in str(raised.value)
    good = client.infer("matmul", [_input("x", np.ones((1, 4), np.float32), "FP32")])
    assert good.as_numpy("y").shape == (1, 3)


def test_token_ids_outside_the_vocabulary_fail_only_that_request(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    bad = np.array([[1, 2, 50]], dtype=np.int64)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tokens", [_input("ids", bad, "INT64")])
    assert "[0, 50)" in str(raised.value)
    good = client.infer("tokens", [_input("ids", np.array([[1, 2, 3]], np.int64), "INT64")])
    assert good.as_numpy("y").shape == (1, 3, 4)


def test_repository_api_needs_the_admin_key(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("matmul")
    index = client.get_model_repository_index(headers=served.admin_headers, as_json=True)
    assert {model["name"] for model in index["models"]} == {"matmul", "tokens", "echo"}
    # Inference, health, metadata and statistics stay open.
    assert client.is_server_ready()
    assert client.get_model_metadata("matmul").name == "matmul"
    client.get_inference_statistics("matmul")


def test_stop_leaves_no_server_or_stub_process(tmp_path):
    add_matmul(tmp_path)
    server = EmbeddedTriton(tmp_path).start()
    root = psutil.Process(server._process.pid)
    family = [root, *root.children(recursive=True)]
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in family[1:])
    server.stop()
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_a_model_that_fails_to_load_reports_its_own_error(tmp_path):
    add_matmul(tmp_path, "good")
    add_matmul(tmp_path, "broken")
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(ServerStartError) as raised:
        EmbeddedTriton(tmp_path, startup_timeout_s=60).start()
    message = str(raised.value)
    assert "'broken'" in message
    assert "good" not in message.split("server log")[0]


def test_load_errors_are_parsed_from_the_log():
    log = (
        "E1129 03:50:01.1 1 model_lifecycle.cc:654] \"failed to load 'm1' version 1: Internal: boom\"\n"
        "| m2   | 1       | UNAVAILABLE: Invalid argument: bad dims |\n"
    )
    assert model_load_errors(log) == {"m1": 'Internal: boom"', "m2": "Invalid argument: bad dims"}


def test_cli_serve_runs_until_sigterm_and_cleans_up(tmp_path):
    add_matmul(tmp_path)
    key_file = tmp_path / "key"
    process = subprocess.Popen(
        [sys.executable, "-m", "stagebatch.cli", "serve", "--repository", str(tmp_path), "--key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        output.append(line)
        if "ready" in line or not line:
            break
    assert any("ready" in line for line in output), "".join(output)
    assert len(key_file.read_text().strip()) == 32
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    children = psutil.Process(process.pid).children(recursive=True)
    assert children
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    time.sleep(0.5)
    assert [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
