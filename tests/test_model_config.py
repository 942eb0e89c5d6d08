"""Config rendering and the ONNX runner's batching logic (pure, no server)."""

from __future__ import annotations

import numpy as np
import pytest

from backends.common.tensors import concat_rows, split_rows
from backends.onnx_runner.batch import BatchRunner, TensorInfo
from core.errors import ConfigValidationError
from backends.reorch.policies import ReorchKnobs
from core.model_config import (
    BatchingOverlay,
    DynamicBatching,
    ReorchOverlay,
    TensorConfig,
    apply_batching,
    apply_reorch,
    config_parameters,
    onnx_model_config,
    python_model_config,
    read_model_config,
    render_model_config,
    reorch_model_config,
    write_model_config,
)


def test_render_refuses_a_misspelled_field_naming_it():
    with pytest.raises(ConfigValidationError, match="max_batch_sise"):
        render_model_config({"name": "m", "backend": "python", "max_batch_sise": 4})


def test_config_round_trips_through_pbtxt(tmp_path):
    config = onnx_model_config(
        "m",
        target="embedded",
        max_batch_size=8,
        inputs=[TensorConfig("ids", "int64", [-1], sequence_axis=1, value_range=(0, 10))],
        outputs=[TensorConfig("y", "float32", [-1, 4], sequence_axis=1)],
        dynamic_batching=DynamicBatching(max_queue_delay_us=500, preferred_batch_sizes=[4, 8]),
    )
    write_model_config(tmp_path, config)
    parsed = read_model_config(tmp_path / "config.pbtxt")
    assert parsed["input"][0]["allow_ragged_batch"] is True
    assert parsed["dynamic_batching"]["max_queue_delay_microseconds"] == "500"
    assert parsed["backend"] == "python"


def test_gpu_target_uses_the_onnxruntime_backend_on_gpu_instances():
    config = onnx_model_config(
        "m", target="gpu", max_batch_size=4, inputs=[TensorConfig("x", "float32", [3])],
        outputs=[TensorConfig("y", "float32", [3])], dynamic_batching=DynamicBatching(),
    )
    assert config["backend"] == "onnxruntime"
    assert config["instance_group"][0]["kind"] == "KIND_GPU"
    assert "allow_ragged_batch" not in config["input"][0]
    render_model_config(config)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_queue_delay_us": -1}, {"preferred_batch_sizes": [0]}, {"timeout_action": "DROP"},
     {"priority_levels": 2, "default_priority_level": 3}],
)
def test_dynamic_batching_refuses_impossible_values(kwargs):
    with pytest.raises(ConfigValidationError):
        DynamicBatching(**kwargs)


def test_queue_policy_and_priorities_render():
    config = DynamicBatching(priority_levels=2, default_priority_level=2, max_queue_size=16).to_config()
    render_model_config({"name": "m", "backend": "python", "max_batch_size": 4, "dynamic_batching": config})
    assert config["default_queue_policy"]["max_queue_size"] == 16


@pytest.mark.parametrize("target, kind", [("embedded", "KIND_CPU"), ("gpu", "KIND_GPU")])
def test_reorch_config_carries_every_knob_and_the_record_output_for_each_target(target, kind):
    config = reorch_model_config(
        "m_reorch", target=target, max_batch_size=8,
        inputs=[TensorConfig("ids", "int64", [-1], sequence_axis=1)], outputs=[TensorConfig("y", "float32", [4])],
        batching=DynamicBatching(max_queue_delay_us=100, max_queue_size=5), policy="input",
        knobs=ReorchKnobs(max_batch_rows=8, bucket_bounds=(8, 16)), extra_parameters={"cancel_poll_ms": 5},
    )
    render_model_config(config)
    assert config["instance_group"] == [{"count": 1, "kind": kind}]
    assert config["input"][0]["allow_ragged_batch"] is True
    assert [o["name"] for o in config["output"]] == ["y", "REORCH_RECORD"]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 5
    parameters = config_parameters(config)
    assert parameters["policy"] == "input" and parameters["bucket_bounds"] == "8,16"
    assert parameters["cancel_poll_ms"] == "5" and set(ReorchKnobs().to_parameters()) <= set(parameters)


def test_python_model_config_writes_only_what_is_given():
    config = python_model_config("echo", max_batch_size=8, inputs=[TensorConfig("x", "float32", [4])],
                                 outputs=[TensorConfig("y", "float32", [4])], decoupled=True)
    render_model_config(config)
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert "dynamic_batching" not in config and "parameters" not in config


def test_batching_overlay_removes_the_queue_policy_when_set_back_to_triton_defaults():
    built = {"name": "m", "max_batch_size": 8, "dynamic_batching": DynamicBatching(max_queue_size=4).to_config()}
    config = apply_batching(built, BatchingOverlay(max_queue_size=0))
    assert "default_queue_policy" not in config["dynamic_batching"]
    assert built["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 4  # the base is left as built


def test_batching_overlay_refuses_an_unknown_knob_naming_it():
    with pytest.raises(ConfigValidationError, match="max_delay"):
        BatchingOverlay.from_mapping({"max_delay": 5})


def test_batching_overlay_sets_intra_op_threads_of_a_python_model_and_leaves_it_when_unset():
    built = onnx_model_config("m", target="embedded", max_batch_size=8, inputs=[TensorConfig("x", "float32", [3])],
                              outputs=[TensorConfig("y", "float32", [3])], dynamic_batching=DynamicBatching(),
                              intra_op_threads=0)
    config = apply_batching(built, BatchingOverlay.from_mapping({"intra_op_threads": 1, "instance_count": 2}))
    assert config_parameters(config)["intra_op_threads"] == "1"
    assert config_parameters(built)["intra_op_threads"] == "0"  # the base is left as built
    assert apply_batching(built, BatchingOverlay()) == built
    render_model_config(config)


def test_batching_overlay_refuses_intra_op_threads_for_a_model_without_onnxruntime_threads():
    gpu = onnx_model_config("m", target="gpu", max_batch_size=4, inputs=[TensorConfig("x", "float32", [3])],
                            outputs=[TensorConfig("y", "float32", [3])], dynamic_batching=DynamicBatching())
    with pytest.raises(ConfigValidationError, match="intra_op_threads=1 for model 'm'"):
        apply_batching(gpu, BatchingOverlay(intra_op_threads=1))


def test_reorch_overlay_writes_knobs_as_reorch_knobs_renders_them_and_refuses_unknown_ones():
    config = apply_reorch({"name": "m_reorch"}, ReorchOverlay(knobs={"split_min_ratio": 2, "bucket_bounds": [4, 8]}),
                          BatchingOverlay())
    assert config_parameters(config) == {"split_min_ratio": "2.0", "bucket_bounds": "4,8"}
    with pytest.raises(ConfigValidationError, match="stretch_wait"):
        apply_reorch({}, ReorchOverlay(knobs={"stretch_wait": 1}), BatchingOverlay())


def test_concat_pads_and_split_cuts_back():
    a = np.ones((1, 2), np.int64)
    b = np.full((2, 5), 7, np.int64)
    batched = concat_rows([a, b], sequence_axis=1, pad_value=0)
    assert batched.shape == (3, 5)
    assert batched[0].tolist() == [1, 1, 0, 0, 0]
    pieces = split_rows(batched, [1, 2], sequence_axis=1, lengths=[2, 5])
    np.testing.assert_array_equal(pieces[0], a)
    np.testing.assert_array_equal(pieces[1], b)
    with pytest.raises(ValueError):
        split_rows(batched, [1, 1])


class _DoublingSession:
    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def run(self, names, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        if self.fail:
            raise RuntimeError("stage exploded")
        return [feeds["ids"].astype(np.float32) * 2]


def _runner(session):
    return BatchRunner(
        session=session,
        input_dtypes={"ids": np.dtype(np.int64)},
        output_names=["y"],
        tensor_info={"ids": TensorInfo(sequence_axis=1, value_range=(0, 10)), "y": TensorInfo(sequence_axis=1)},
    )


def test_runner_batches_valid_requests_once_and_answers_each():
    session = _DoublingSession()
    results = _runner(session).run(
        [{"ids": np.array([[1, 2]])}, {"ids": np.array([[3, 4, 5]])}, {"ids": np.array([[11]])}, {}]
    )
    assert session.calls == [{"ids": (2, 3)}]
    assert results[0].outputs["y"].tolist() == [[2.0, 4.0]]
    assert results[1].outputs["y"].tolist() == [[6.0, 8.0, 10.0]]
    assert results[2].invalid and "[0, 10)" in results[2].error
    assert results[3].invalid and "missing input 'ids'" in results[3].error


def test_runner_failure_fails_the_batch_with_the_reason():
    results = _runner(_DoublingSession(fail=True)).run([{"ids": np.array([[1]])}, {"ids": np.array([[2]])}])
    assert all(not r.invalid and "stage exploded" in r.error for r in results)
