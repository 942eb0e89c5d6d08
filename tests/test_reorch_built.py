"""The reorchestrator over repositories built by ``stagebatch build`` (tiny bert_base and lstm)."""

from __future__ import annotations

import copy
import json
import queue

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from test_reorch_engine import Answers

from backends.reorch.engine import SUCCESS, ReorchEngine
from backends.reorch.executor import make_ort_executors, make_whole_executor
from backends.reorch.policies import BatchPolicy, ReorchKnobs
from backends.reorch.spec import StagesSpec
from slicing.build import BuildOptions, build_repository
from core.server import EmbeddedTriton

POLICIES = [p.value for p in BatchPolicy]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    build_repository(out, models=["bert_base", "lstm"], options=BuildOptions(size="tiny", stages=3))
    return out, json.loads((out / "manifest.json").read_text())


def random_request(rng, entry, rows, length):
    tensors = {}
    for tensor in entry["inputs"]:
        low, high = tensor.get("value_range", [0, 2])
        if tensor.get("role") == "attention_mask":
            tensors[tensor["name"]] = np.ones((rows, length), np.int64)
        else:
            tensors[tensor["name"]] = rng.integers(low, high, (rows, length), dtype=np.int64)
    return tensors


@pytest.mark.parametrize("model", ["bert_base", "lstm"])
@pytest.mark.parametrize("policy", POLICIES)
def test_reorch_engine_equals_the_whole_model_on_built_stages(built, model, policy):
    out, manifest = built
    entry = copy.deepcopy(manifest["models"][model])
    for stage in entry["stages"]:
        stage["favoured_batch_size"] = 2  # small favoured sizes make operator/dva split
    spec = StagesSpec.from_manifest_entry(model, entry)
    answers = Answers()
    engine = ReorchEngine(spec, policy, ReorchKnobs(max_batch_rows=16, stretch_max_wait_us=3000),
                          make_ort_executors(spec, out), answers)
    whole = ort.InferenceSession(str(out / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    requests = [random_request(rng, entry, int(rng.integers(1, 3)), int(n)) for n in rng.integers(1, 17, 30)]
    try:
        for start in range(0, len(requests), 5):
            engine.submit([(i, requests[i]) for i in range(start, start + 5)])
        answers.wait(len(requests))
    finally:
        engine.close()
    names = [o.name for o in whole.get_outputs()]
    for index, request in enumerate(requests):
        answer = answers.by_handle[index]
        assert answer.kind == SUCCESS, answer.message
        want = dict(zip(names, whole.run(names, request)))
        for name, array in answer.outputs.items():
            np.testing.assert_allclose(array, want[name], rtol=1e-4, atol=1e-5, err_msg=f"{model}/{policy}/{name}")


@pytest.mark.server
def test_built_reorch_model_serves_the_whole_models_outputs(built):
    out, manifest = built
    entry = manifest["models"]["bert_base"]
    rng = np.random.default_rng(9)
    requests = [random_request(rng, entry, 1, int(n)) for n in rng.integers(1, 17, 24)]

    def inputs(tensors):
        items = []
        for name, array in tensors.items():
            item = grpcclient.InferInput(name, list(array.shape), "INT64")
            item.set_data_from_numpy(array)
            items.append(item)
        return items

    with EmbeddedTriton(out, models=["bert_base", "bert_base_reorch"]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        expected = [client.infer("bert_base", inputs(r)) for r in requests]
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for index, request in enumerate(requests):
            client.async_stream_infer("bert_base_reorch", inputs(request), request_id=str(index))
        received = [answers.get(timeout=60) for _ in requests]
        client.stop_stream()
    for result, error in received:
        assert error is None, error
        index = int(result.get_response().id)
        for name in ("last_hidden_state", "pooler_output"):
            np.testing.assert_allclose(result.as_numpy(name), expected[index].as_numpy(name), rtol=1e-4, atol=1e-5)


def test_fused_runs_execute_the_whole_models_graph_and_book_it_on_stage_0(built):
    out, manifest = built
    entry = manifest["models"]["lstm"]
    spec = StagesSpec.from_manifest_entry("lstm", entry)
    assert spec.whole_onnx == "lstm/1/model.onnx"
    assert StagesSpec.from_json(spec.to_json()).whole_onnx == spec.whole_onnx
    whole = make_whole_executor(spec, out)
    calls = []
    run = whole.run
    whole.run = lambda feeds: calls.append(len(feeds)) or run(feeds)
    engine = ReorchEngine(spec, "dva", ReorchKnobs(max_batch_rows=16, fuse_max_overhead_share=0.0, stage_overhead_us=1e6),
                          make_ort_executors(spec, out), Answers(), whole=whole)
    reference = ort.InferenceSession(str(out / "lstm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    requests = [random_request(rng, entry, 1, 8) for _ in range(4)]
    try:
        answers = engine.run_inline(list(enumerate(requests)))  # the stages are "too cheap": fuse, inline
    finally:
        engine.close()
    assert answers is not None and calls == [1]
    for (index, answer), request in zip(answers, requests):
        assert answer.kind == SUCCESS, answer.message
        assert answer.record["ops"] == [{"op": "fuse", "stage": 0}]
        times = answer.record["stage_times_us"]
        assert len(times) == len(spec.stages) and times[0][1] > 0 and all(t[1] == 0 for t in times[1:])
        want = reference.run(["logits"], request)[0]
        np.testing.assert_allclose(answer.outputs["logits"], want, rtol=1e-4, atol=1e-5)


def test_a_scratch_deploy_of_a_built_entry_keeps_the_whole_graph(built, tmp_path):
    # As bench/reorchestration.py deploys NAME_reorch_<policy>: the entry's variants name only the
    # reorch variant. Before, stages.json then named no whole graph (fused runs chained the stages).
    out, manifest = built
    entry = {**manifest["models"]["lstm"], "variants": {"reorch": "lstm_reorch_dva"}}
    spec = StagesSpec.from_manifest_entry("lstm", entry)
    assert spec.whole_onnx == "lstm/1/model.onnx"
    assert make_whole_executor(spec, out) is not None


def test_no_whole_executor_where_the_repository_lacks_the_whole_graph(built, tmp_path):
    out, manifest = built
    spec = StagesSpec.from_manifest_entry("lstm", manifest["models"]["lstm"])
    assert make_whole_executor(spec, tmp_path) is None  # fused runs then chain the stage graphs
    spec.whole_onnx = ""
    assert make_whole_executor(spec, out) is None
