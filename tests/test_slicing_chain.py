"""Slicing real (small) exported models end to end: cut, extract, verify against the whole model, profile."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import slicing_models as toy
from slicing.chain import profile_stages, verify_chain
from slicing.slicer import max_stages, slice_model
from core.errors import BadParameterError, SliceError

SPECS = {"cnn": toy.CNN_SPECS, "bert": toy.BERT_SPECS, "lstm": toy.LSTM_SPECS, "inception": toy.INCEPTION_SPECS}


def _check_stage_contract(result) -> None:
    whole_inputs = {v.name for v in result.whole.graph.input}
    whole_outputs = [v.name for v in result.whole.graph.output]
    for stage in result.stages:
        onnx.checker.check_model(stage.model)
        graph = stage.model.graph
        # Only the initializers it uses.
        used = {name for node in graph.node for name in node.input}
        assert {init.name for init in graph.initializer} <= used
        for name in stage.inputs:
            assert name in whole_inputs or name.startswith(f"stage{stage.index - 1}_out")
        last = stage.index == len(result.stages) - 1
        expected = whole_outputs if last else [f"stage{stage.index}_out{j}" for j in range(len(stage.outputs))]
        assert stage.outputs == expected
        assert set(stage.tensors) == set(stage.inputs) | set(stage.outputs)
        if result.batchable:  # dynamic batch axis kept on every stage input and output
            for value in list(graph.input) + list(graph.output):
                assert value.type.tensor_type.shape.dim[0].dim_param, (stage.index, value.name)
    assert sum(stage.cost_share for stage in result.stages) == pytest.approx(1.0)


@pytest.mark.parametrize("name,stages", [("cnn", 2), ("cnn", 4), ("bert", 2), ("bert", 3), ("lstm", 2), ("lstm", 3)])
def test_slicing_chain_equals_whole_model(name, stages):
    result = slice_model(toy.load(name), stages, input_specs=SPECS[name], balance="flops")
    assert len(result.stages) == stages
    _check_stage_contract(result)
    report = verify_chain(result, batch_sizes=(1, 3), timing_reps=1)
    assert all(error <= 1e-4 for error in report.max_rel_error.values())
    assert set(report.latency_ms) == {1, 3} and report.latency_ratio > 0


def test_slicing_bert_boundary_is_hidden_state_plus_mask():
    result = slice_model(toy.load("bert"), 3, input_specs=SPECS["bert"], balance="flops")
    assert [len(group) for group in result.boundaries] == [1, 1]
    for stage in result.stages[1:]:
        assert sorted(stage.inputs) == sorted(["attention_mask", f"stage{stage.index - 1}_out0"])
        meta = stage.tensors[f"stage{stage.index - 1}_out0"]
        assert meta.shape == [-1, -1, 16] and meta.sequence_axis == 1


def test_slicing_lstm_time_major_boundary_is_sent_batch_first():
    result = slice_model(toy.load("lstm"), 3, input_specs=SPECS["lstm"], balance="flops")
    ops = [node.op_type for node in result.stages[0].model.graph.node]
    assert ops[-1] == "Transpose"  # LSTM Y [seq, 1, batch, hidden] leaves as [batch, seq, 1, hidden]
    assert result.stages[0].tensors["stage0_out0"].shape == [-1, -1, 1, 12]
    # The zero initial state's shape is rebuilt from the stage's own input: no need for `tokens`.
    assert result.stages[1].inputs == ["stage0_out0"]
    verify_chain(result, batch_sizes=(2,), seq_lens=(9,), timing_reps=1)


def test_slicing_lstm_too_many_stages_names_the_largest_k():
    model = toy.load("lstm")
    largest = max_stages(model, SPECS["lstm"])
    assert largest == 5  # embedding | LSTM layer 1 | LSTM layer 2 | head MatMul | head Add
    with pytest.raises(SliceError) as caught:
        slice_model(model, 8, input_specs=SPECS["lstm"])
    message = str(caught.value)
    assert "largest valid K is 5" in message and "single ONNX node" in message and "\n" not in message


def test_slicing_graph_output_produced_before_the_last_stage():
    """BERT's last_hidden_state is an output and feeds the pooler: cut right after it."""
    result = slice_model(toy.load("bert"), cut_tensors=["last_hidden_state"], input_specs=SPECS["bert"])
    assert result.stages[0].outputs == ["stage0_out0"]
    assert result.stages[1].outputs == ["last_hidden_state", "pooler_output"]
    verify_chain(result, batch_sizes=(2,), timing_reps=1)


def test_slicing_branchy_inception_cuts_between_blocks():
    result = slice_model(toy.load("inception"), 3, input_specs=SPECS["inception"], balance="flops")
    assert all(len(group) == 1 for group in result.boundaries)
    # Every cut is at a whole-block output: a Concat of four branches, or the ReLU right after one.
    analysis_ops = {node.output[0]: node.op_type for node in result.whole.graph.node}
    assert all(analysis_ops[group[0]] in ("Concat", "Relu") for group in result.boundaries)
    verify_chain(result, batch_sizes=(1, 5), timing_reps=1)


def test_slicing_explicit_cut_tensors():
    model = toy.load("cnn")
    result = slice_model(model, cut_tensors=["relu_2", "relu_6"], input_specs=SPECS["cnn"])
    assert result.cut_tensors == ["relu_2", "relu_6"] and len(result.stages) == 3
    verify_chain(result, batch_sizes=(2,), timing_reps=1)
    with pytest.raises(SliceError, match="unknown cut tensor.*'no_such_tensor'"):
        slice_model(model, cut_tensors=["no_such_tensor"], input_specs=SPECS["cnn"])
    with pytest.raises(SliceError, match="'blocks.0.conv1.weight'.*initializer"):
        slice_model(model, cut_tensors=["blocks.0.conv1.weight"], input_specs=SPECS["cnn"])


@pytest.mark.parametrize("balance", ["measured", "profile"])
def test_slicing_balances_by_measured_time(balance):
    result = slice_model(toy.load("cnn"), 3, input_specs=SPECS["cnn"], balance=balance, profile_batch_size=4)
    expected = "stage costs measured" if balance == "measured" else "stage costs from onnxruntime's profiler"
    assert any(note.startswith(expected) for note in result.notes), result.notes
    verify_chain(result, batch_sizes=(4,), timing_reps=1)


def test_slicing_user_model_opset9_fixed_batch_is_made_batchable():
    model = toy.load("user_cnn")
    assert model.opset_import[0].version == 9 and len(model.graph.input) > 1  # initializers listed as inputs
    result = slice_model(model, 3, balance="flops")  # specs inferred from the file
    assert result.batchable
    assert any(note.startswith("made batchable") for note in result.notes)
    assert [v.name for v in result.whole.graph.input] == ["images"]
    assert result.input_specs[0].shape == [-1, 3, 16, 16]
    _check_stage_contract(result)
    report = verify_chain(result, batch_sizes=(1, 5), timing_reps=1)
    assert report.batch_sizes == [1, 5]


def test_slicing_user_model_that_folds_its_batch_is_served_without_batching():
    result = slice_model(toy.load("user_reshaping"), 1, balance="flops")
    assert not result.batchable
    assert any("served without batching" in note and "folds the batch" in note for note in result.notes)
    report = verify_chain(result, batch_sizes=(1, 4), timing_reps=1)
    assert report.batch_sizes == [1]  # only its fixed batch
    [profile] = profile_stages(result, max_batch=8, reps=1)
    assert list(profile.latency_ms) == [1] and profile.favoured_batch_size == 1


def test_slicing_verification_fails_naming_the_output_when_a_stage_is_wrong():
    result = slice_model(toy.load("cnn"), 2, input_specs=SPECS["cnn"], balance="flops")
    stage = result.stages[1].model
    weight = stage.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    with pytest.raises(SliceError, match=r"differs from the whole model on output 'logits' at batch 1"):
        verify_chain(result, batch_sizes=(1,), timing_reps=1)


def test_slicing_rejects_files_that_are_not_onnx(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("this is not a model\n")
    for path in (text, tmp_path / "missing.onnx"):
        with pytest.raises(SliceError) as caught:
            slice_model(path, 2)
        assert "\n" not in str(caught.value)
    with pytest.raises(BadParameterError, match="balance"):
        slice_model(toy.load("cnn"), 2, balance="fastest")
    with pytest.raises(BadParameterError, match="give num_stages or cut_tensors"):
        slice_model(toy.load("cnn"))
    with pytest.raises(BadParameterError, match=r"make 1 boundaries \(relu_2\), so 2 stages, not num_stages=3"):
        slice_model(toy.load("cnn"), 3, cut_tensors=["relu_2"], input_specs=SPECS["cnn"])


def test_slicing_profile_stages_gives_latency_per_power_of_two():
    result = slice_model(toy.load("bert"), 2, input_specs=SPECS["bert"], balance="flops")
    profiles = profile_stages(result, max_batch=8, seq_len=8, reps=2)
    assert [p.index for p in profiles] == [0, 1]
    for profile in profiles:
        assert sorted(profile.latency_ms) == [1, 2, 4, 8]
        assert all(value > 0 for value in profile.latency_ms.values())
        assert profile.favoured_batch_size in profile.latency_ms


def test_slicing_stage_models_run_standalone_from_their_files(tmp_path):
    """A stage saved to disk and reloaded runs on its own (what the repository builder does)."""
    import onnxruntime as ort

    result = slice_model(toy.load("bert"), 2, input_specs=SPECS["bert"], balance="flops")
    path = tmp_path / "stage1.onnx"
    onnx.save(result.stages[1].model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"attention_mask": np.ones((2, 5), np.int64),
             "stage0_out0": np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)}
    outputs = session.run(None, {k: v for k, v in feeds.items() if k in result.stages[1].inputs})
    assert outputs[0].shape == (2, 5, 16)


def test_slicing_errors_reach_the_cli_as_one_line(tmp_path, capsys):
    from stagebatch.cli import main

    path = tmp_path / "cnn.onnx"
    onnx.save(toy.load("cnn"), str(path))
    for extra in (["--cut", "no_such_tensor"], ["--stages", "40"]):
        code = main(["build", "--onnx", str(path), "--out", str(tmp_path / "repo"), "--balance", "flops", *extra])
        error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(error_lines) == 1, error_lines
        assert "Traceback" not in error_lines[0]
        assert ("no_such_tensor" in error_lines[0]) if "--cut" in extra else ("largest valid K is" in error_lines[0])
