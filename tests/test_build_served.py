"""A built repository of tiny zoo models, loaded in the embedded server: every variant answers.

The client side reads only ``manifest.json`` (names, dtypes, shapes, value ranges), as a load
generator would; the reference is onnxruntime on the repository's own whole-model file.
"""

from __future__ import annotations

import json
import os
import queue
from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from slicing.inputs import InputSpec, make_inputs
from slicing.build import BuildOptions, build_repository
from slicing.zoo import MODEL_NAMES
from core.server import EmbeddedTriton

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    previous = os.environ.get("STAGEBATCH_CACHE_DIR")
    os.environ["STAGEBATCH_CACHE_DIR"] = str(request.config.cache.mkdir("stagebatch"))
    try:
        repository = tmp_path_factory.mktemp("repo")
        build_repository(repository, models=["all"],
                         options=BuildOptions(size="tiny", stages=2, max_batch=8, queue_delay_us=2000))
    finally:
        if previous is None:
            os.environ.pop("STAGEBATCH_CACHE_DIR", None)
        else:
            os.environ["STAGEBATCH_CACHE_DIR"] = previous
    manifest = json.loads((repository / "manifest.json").read_text())
    with EmbeddedTriton(repository) as server:
        yield server, repository, manifest


_NUMPY = {"FP32": "float32", "INT64": "int64", "INT32": "int32", "FP16": "float16", "BOOL": "bool"}


def _specs(entry: dict) -> list[InputSpec]:
    """InputSpecs from the manifest alone (what a load generator has)."""
    return [InputSpec(i["name"], _NUMPY[i["datatype"]], i["shape"],
                      value_range=tuple(i["value_range"]) if "value_range" in i else None,
                      sequence_axis=i.get("sequence_axis"), pad_value=i.get("pad_value", 0),
                      role=i.get("role", "data")) for i in entry["inputs"]]


def _request(entry: dict, rows: int, length: int | None, seed: int) -> dict[str, np.ndarray]:
    return make_inputs(_specs(entry), rows, length, rng=np.random.default_rng(seed), lengths=None if length is None
                       else [length] * rows)


def _infer_inputs(entry: dict, arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    tensors = []
    for spec in entry["inputs"]:
        array = arrays[spec["name"]]
        tensor = grpcclient.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _reference(repository, name: str, arrays: dict[str, np.ndarray], output_names: list[str]) -> dict:
    session = ort.InferenceSession(str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip(output_names, session.run(output_names, arrays)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_served_whole_and_ensemble_answer_like_onnxruntime(served, name):
    server, repository, manifest = served
    entry = manifest["models"][name]
    outputs = [o["name"] for o in entry["outputs"]]
    length = 9 if entry["sequence"] else None
    arrays = _request(entry, 3, length, seed=1)
    expected = _reference(repository, name, arrays, outputs)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for variant in ("whole", "ensemble"):
        result = client.infer(entry["variants"][variant], _infer_inputs(entry, arrays))
        for output in outputs:
            np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{variant} {output}")


@pytest.mark.parametrize("name", ["bert_base", "lstm"])
def test_served_ensemble_batches_requests_of_different_lengths(served, name):
    server, repository, manifest = served
    entry = manifest["models"][name]
    outputs = [o["name"] for o in entry["outputs"]]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    sent = {}
    for index, length in enumerate([4, 16, 1, 11, 7, 16]):
        arrays = _request(entry, 1, length, seed=10 + index)
        sent[index] = arrays
        client.async_infer(entry["variants"]["ensemble"], _infer_inputs(entry, arrays),
                           partial(lambda i, result, error: answers.put((i, result, error)), index))
    for _ in sent:
        index, result, error = answers.get(timeout=60)
        assert error is None, error
        expected = _reference(repository, name, sent[index], outputs)
        for output in outputs:
            np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-4, atol=1e-5,
                                       err_msg=f"request {index} {output}")
    stats = client.get_inference_statistics(entry["stages"][0]["model_name"], as_json=True)["model_stats"][0]
    # requests of different lengths shared stage batches (ragged batching, padded by the runner)
    assert int(stats["execution_count"]) < int(stats["inference_count"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_served_reorch_answers_over_grpc_streaming(served, name):
    server, repository, manifest = served
    entry = manifest["models"][name]
    if "reorch" not in entry["variants"]:
        pytest.skip("the build left the reorch variant out (the model is served without batching)")
    outputs = [o["name"] for o in entry["outputs"]]
    arrays = _request(entry, 2, 5 if entry["sequence"] else None, seed=3)
    expected = _reference(repository, name, arrays, outputs)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(entry["variants"]["reorch"], _infer_inputs(entry, arrays))
        result, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
    assert error is None, error
    for output in outputs:
        np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-4, atol=1e-5)


def test_served_token_ids_outside_the_vocabulary_fail_only_that_request(served):
    server, _, manifest = served
    entry = manifest["models"]["lstm"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    bad = _request(entry, 1, 5, seed=4)
    bad["tokens"][0, 2] = entry["inputs"][0]["value_range"][1]
    for variant in ("whole", "ensemble"):
        with pytest.raises(Exception, match=r"values must lie in \[0, 100\)"):
            client.infer(entry["variants"][variant], _infer_inputs(entry, bad))
    good = client.infer("lstm_ensemble", _infer_inputs(entry, _request(entry, 1, 5, seed=5)))
    assert good.as_numpy("logits").shape == (1, 5, 4)
