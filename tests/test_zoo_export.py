"""Zoo models in size ``tiny``: build, export to ONNX with dynamic axes, run, and agree with torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slicing.export import export_key, export_zoo_model
from slicing.inputs import make_inputs
from slicing.zoo import MODEL_NAMES, build_zoo_model
from core.errors import BadParameterError


@pytest.fixture(scope="module")
def export_dir(request):
    # pytest's cache survives between runs; entries are keyed by a hash of everything that matters.
    # The same directory the build tests use (STAGEBATCH_CACHE_DIR/exports), so each model exports once.
    return request.config.cache.mkdir("stagebatch") / "exports"


@pytest.fixture(scope="module")
def exported(export_dir):
    built = {}
    for name in MODEL_NAMES:
        model = build_zoo_model(name, "tiny")
        built[name] = (model, export_zoo_model(model, directory=export_dir))
    return built


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _declared(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_tiny_export_matches_torch_at_other_batch_and_length(exported, name):
    model, export = exported[name]
    session = _session(export.path)
    for batch, seq_len in [(1, None), (5, 9)]:
        seq_len = seq_len if model.sequence else None
        feeds = make_inputs(model.input_specs, batch, seq_len, rng=np.random.default_rng(batch))
        with torch.no_grad():
            expected = model.module(*(torch.from_numpy(feeds[n]) for n in model.input_names))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(model.output_names, feeds)
        for output, want, have in zip(model.outputs, expected, got):
            assert have.shape == tuple(want.shape)
            np.testing.assert_allclose(have, want.numpy(), rtol=1e-4, atol=1e-5, err_msg=output.name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_tiny_export_declares_dynamic_batch_and_sequence(exported, name):
    model, export = exported[name]
    proto = onnx.load(str(export.path))
    onnx.checker.check_model(proto)
    assert export.opset >= 18
    inputs = {i.name: _declared(i) for i in proto.graph.input}
    outputs = {o.name: _declared(o) for o in proto.graph.output}
    assert list(inputs) == model.input_names and list(outputs) == model.output_names
    for spec in model.input_specs:
        assert inputs[spec.name][0] == "batch"
        if spec.sequence_axis is not None:
            assert inputs[spec.name][spec.sequence_axis] == "seq"
    for output in model.outputs:
        declared = outputs[output.name]
        # every dynamic dim is symbolic, every static one matches (the exporter once froze the LSTM's seq)
        assert [-1 if isinstance(d, str) else d for d in declared] == output.shape
        if output.sequence_axis is not None:
            assert declared[output.sequence_axis] == "seq"
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("name", ["bert_base", "lstm"])
def test_zoo_sequence_outputs_are_padding_safe(exported, name):
    model, export = exported[name]
    session = _session(export.path)
    lengths = [12, 3, 7]
    batch = make_inputs(model.input_specs, 3, 12, rng=np.random.default_rng(0), lengths=lengths)
    padded = dict(zip(model.output_names, session.run(model.output_names, batch)))
    for row, length in enumerate(lengths):
        alone = {n: a[row : row + 1, :length] for n, a in batch.items()}
        single = dict(zip(model.output_names, session.run(model.output_names, alone)))
        for output in model.outputs:
            want = single[output.name]
            have = padded[output.name][row : row + 1]
            if output.sequence_axis is not None:
                have = have[:, :length]
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=f"{output.name} row {row}")


def test_zoo_export_is_cached_and_keyed_by_seed(exported, export_dir):
    model, first = exported["lstm"]
    again = export_zoo_model(build_zoo_model("lstm", "tiny"), directory=export_dir)
    assert again.cached and again.path == first.path and again.export_s == 0.0
    assert export_key(build_zoo_model("lstm", "tiny", seed=1)) != export_key(model)


def test_zoo_weights_are_seeded_and_loadable(tmp_path):
    a, b = build_zoo_model("lstm", "tiny"), build_zoo_model("lstm", "tiny")
    c = build_zoo_model("lstm", "tiny", seed=1)
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key])
    assert not torch.equal(a.module.embedding.weight, c.module.embedding.weight)
    path = tmp_path / "lstm.pt"
    torch.save(c.module.state_dict(), path)
    loaded = build_zoo_model("lstm", "tiny", weights=path)
    assert torch.equal(loaded.module.embedding.weight, c.module.embedding.weight)
    assert loaded.weights_sha256 and export_key(loaded) != export_key(a)


def test_zoo_weights_mismatch_is_one_clear_error(tmp_path):
    path = tmp_path / "bert.pt"
    torch.save(build_zoo_model("bert_base", "tiny").module.state_dict(), path)
    with pytest.raises(BadParameterError, match=r"does not match lstm: \d+ missing keys"):
        build_zoo_model("lstm", "tiny", weights=path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(BadParameterError, match="cannot be read as a torch state dict"):
        build_zoo_model("lstm", "tiny", weights=garbage)
    with pytest.raises(BadParameterError, match="no such file"):
        build_zoo_model("lstm", "tiny", weights=tmp_path / "missing.pt")


def test_zoo_rejects_unknown_names_sizes_and_lengths():
    with pytest.raises(BadParameterError, match="unknown model 'vgg'"):
        build_zoo_model("vgg")
    with pytest.raises(BadParameterError, match="unknown size 'huge'"):
        build_zoo_model("lstm", "huge")
    with pytest.raises(BadParameterError, match=r"outside \[1, 64\]"):
        build_zoo_model("bert_base", "tiny", max_seq_len=65)
    with pytest.raises(BadParameterError, match="no sequence axis"):
        build_zoo_model("resnet50", "tiny", max_seq_len=8)
