"""``write_reorch_model``: the NAME_reorch layout and its refusals (no server)."""

from __future__ import annotations

import pytest
from reorch_models import write_sequence_chain

from core.reorch_deploy import write_reorch_model
from backends.reorch.spec import StagesSpec
from core.errors import ConfigValidationError
from core.model_config import config_parameters, read_model_config


def test_layout_config_and_stages_json(tmp_path):
    entry, _ = write_sequence_chain(tmp_path, "seqm")
    model_dir = write_reorch_model(tmp_path, "seqm", entry, max_batch_size=8, queue_delay_us=300, policy="input",
                                   knobs={"stretch_max_wait_us": 700})
    assert model_dir == tmp_path / "seqm_reorch"
    version = model_dir / "1"
    assert (version / "model.py").is_file() and (version / "backends" / "reorch" / "scheduler.py").is_file()
    config = read_model_config(model_dir / "config.pbtxt")
    assert not config.get("model_transaction_policy", {}).get("decoupled", False)  # answered through the sender
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "300"
    assert config["max_batch_size"] == 8
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["tokens"]["allow_ragged_batch"] and inputs["attention_mask"]["dims"] == ["-1"]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["REORCH_RECORD"]["data_type"] == "TYPE_STRING"
    parameters = config_parameters(config)
    assert parameters["policy"] == "input" and parameters["stretch_max_wait_us"] == "700"
    assert parameters["max_batch_rows"] == "8"
    spec = StagesSpec.load(version / "stages.json")
    assert [s.onnx for s in spec.stages] == [f"seqm_stage{i}/1/model.onnx" for i in range(3)]
    assert spec.favoured_batch_sizes == (4, 4, 4) and spec.max_length == 32
    assert spec.tensor("stage0_out0").sequence_axis == 1


@pytest.mark.parametrize("change, message", [
    (dict(policy="fastest"), "unknown"),
    (dict(knobs={"stretch_wait": 1}), "unknown reorch knobs"),
    (dict(knobs={"stage_concurrency": 0}), "stage_concurrency"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(target="tpu"), "target"),
])
def test_bad_arguments_are_refused_with_the_rule(tmp_path, change, message):
    entry, _ = write_sequence_chain(tmp_path, "seqm")
    arguments = dict(max_batch_size=8, queue_delay_us=0, policy="dva") | change
    with pytest.raises(ConfigValidationError, match=message):
        write_reorch_model(tmp_path, "seqm", entry, **arguments)


def test_missing_stage_file_and_broken_chain_are_refused(tmp_path):
    entry, _ = write_sequence_chain(tmp_path, "seqm")
    (tmp_path / "seqm_stage1" / "1" / "model.onnx").unlink()
    with pytest.raises(ConfigValidationError, match="does not exist"):
        write_reorch_model(tmp_path, "seqm", entry, max_batch_size=8, queue_delay_us=0)
    entry["stages"][2]["inputs"] = ["stage9_out0"]
    with pytest.raises(ConfigValidationError, match="chain contract"):
        write_reorch_model(tmp_path, "seqm", entry, max_batch_size=8, queue_delay_us=0)


def test_whole_graph_is_found_where_the_entry_lists_only_the_reorch_variant():
    # A scratch deploy (bench/reorchestration.py's overlay) passes the entry with ``variants`` replaced
    # by the reorch variant's name alone; the whole graph then still lies under the model's own name.
    # Before, whole_onnx came out empty and every fused run chained the stage graphs.
    from backends.reorch.spec import whole_onnx_path

    stages = [{"index": 0, "model_name": "m_stage0", "onnx": "m_stage0/1/model.onnx"}]
    assert whole_onnx_path({"stages": stages, "variants": {"reorch": "m_reorch_dva"}}, "m") == "m/1/model.onnx"
    assert whole_onnx_path({"stages": stages, "variants": {"whole": "w", "reorch": "r"}}, "m") == "w/1/model.onnx"
    assert whole_onnx_path({"stages": stages, "onnx": "x/model.onnx"}, "m") == "x/model.onnx"
    assert whole_onnx_path({"stages": [{"index": 0, "onnx": "elsewhere.onnx"}]}, "m") == ""  # not the layout
