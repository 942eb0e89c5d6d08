"""manifest.json and the ensemble config, as pure functions (no export, no server)."""

from __future__ import annotations

import json

import pytest

from slicing import manifest as manifest_lib
from slicing.inputs import InputSpec
from slicing.build import BuildOptions
from core.errors import BadParameterError, ConfigValidationError
from core.manifest import find_manifest, read_manifest
from core.model_config import EnsembleStep, TensorConfig, ensemble_config, render_model_config


def _entry(name: str, stages: int = 2) -> dict:
    outputs = [manifest_lib.tensor_entry("logits", "float32", [-1, -1, 4], sequence_axis=1)]
    stage_entries = []
    for index in range(stages):
        last = index == stages - 1
        stage_entries.append({
            "index": index, "model_name": f"{name}_stage{index}", "onnx": f"{name}_stage{index}/1/model.onnx",
            "inputs": ["tokens"] if index == 0 else [f"stage{index - 1}_out0"],
            "outputs": ["logits"] if last else [f"stage{index}_out0"], "tensors": {},
            "cost_share": 1 / stages, "favoured_batch_size": 4, "latency_ms": {"1": 0.1}})
    return {
        "family": "lstm", "size": "tiny", "max_batch_size": 8,
        "variants": {"whole": name, "ensemble": f"{name}_ensemble"},
        "inputs": [manifest_lib.input_entry(InputSpec("tokens", "int64", [-1, -1], value_range=(0, 100),
                                                      sequence_axis=1, role="token_ids"))],
        "outputs": outputs, "sequence": {"max_length": 16, "min_length": 1}, "stages": stage_entries,
        "build": {"stages": stages},
    }


def test_build_manifest_input_entries_follow_the_contract():
    entry = manifest_lib.input_entry(InputSpec("attention_mask", "int64", [-1, -1], value_range=(0, 2),
                                               sequence_axis=1, role="attention_mask"))
    assert entry == {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 2],
                     "sequence_axis": 1, "pad_value": 0, "role": "attention_mask"}
    images = manifest_lib.input_entry(InputSpec("images", "float32", [-1, 3, 32, 32]))
    assert images == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}


def test_build_manifest_merges_models_and_replaces_same_names(tmp_path):
    first = manifest_lib.merge_manifest(None, "embedded", {"a": _entry("a")})
    manifest_lib.write_manifest(tmp_path, first)
    loaded = read_manifest(tmp_path).raw
    merged = manifest_lib.merge_manifest(loaded, "embedded", {"b": _entry("b"), "a": _entry("a", stages=3)})
    assert sorted(merged["models"]) == ["a", "b"] and len(merged["models"]["a"]["stages"]) == 3
    assert merged["schema_version"] == 1 and merged["target"] == "embedded"
    assert json.loads((tmp_path / "manifest.json").read_text())["models"]["a"]["build"]["stages"] == 2


def test_build_manifest_refuses_another_target_and_broken_entries(tmp_path):
    existing = manifest_lib.merge_manifest(None, "embedded", {"a": _entry("a")})
    with pytest.raises(BadParameterError, match="built for target 'embedded', not 'gpu'"):
        manifest_lib.merge_manifest(existing, "gpu", {"b": _entry("b")})
    broken = _entry("c")
    broken["stages"][-1]["outputs"] = ["stage1_out0"]
    with pytest.raises(ConfigValidationError, match="the last stage writes"):
        manifest_lib.merge_manifest(None, "embedded", {"c": broken})
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigValidationError, match="not valid JSON"):
        find_manifest(tmp_path)


def test_build_ensemble_config_maps_tensors_by_name_and_renders():
    steps = [EnsembleStep("bert_base_stage0", ["input_ids", "attention_mask"], ["stage0_out0"]),
             EnsembleStep("bert_base_stage1", ["stage0_out0", "attention_mask"], ["last_hidden_state"])]
    inputs = [TensorConfig("input_ids", "int64", [-1], sequence_axis=1),
              TensorConfig("attention_mask", "int64", [-1], sequence_axis=1)]
    outputs = [TensorConfig("last_hidden_state", "float32", [-1, 32], sequence_axis=1)]
    config = ensemble_config("bert_base_ensemble", 8, inputs, outputs, steps)
    text = render_model_config(config)
    assert 'platform: "ensemble"' in text and "max_batch_size: 8" in text
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["bert_base_stage0", "bert_base_stage1"]
    assert steps[1]["input_map"] == {"stage0_out0": "stage0_out0", "attention_mask": "attention_mask"}
    assert steps[1]["output_map"] == {"last_hidden_state": "last_hidden_state"}


@pytest.mark.parametrize("kwargs, message", [
    ({"stages": 0}, "--stages 0"), ({"target": "tpu"}, "--target 'tpu'"), ({"max_batch": 0}, "--max-batch 0"),
    ({"queue_delay_us": -1}, "--queue-delay-us -1"), ({"balance": "guess"}, "--balance 'guess'"),
    ({"size": "huge"}, "--size 'huge'"), ({"stages": 2, "cut_tensors": ["a", "b"]}, "disagrees with 2 --cut"),
])
def test_build_options_reject_bad_values(kwargs, message):
    with pytest.raises(BadParameterError, match=message):
        BuildOptions(**kwargs)


def test_read_manifest_gives_typed_entries_when_the_builder_wrote_the_file(tmp_path):
    manifest_lib.write_manifest(tmp_path, manifest_lib.merge_manifest(None, "gpu", {"a": _entry("a", stages=3)}))
    manifest = read_manifest(tmp_path)
    entry = manifest.model("a")
    assert manifest.target == "gpu" and manifest.schema_version == 1 and list(manifest.models) == ["a"]
    assert entry.triton_name("ensemble") == "a_ensemble" and entry.num_stages == 3
    assert [stage.model_name for stage in entry.stages] == ["a_stage0", "a_stage1", "a_stage2"]
    assert entry.stages[0].latency_ms == {1: 0.1} and entry.sequence.max_length == 16
    assert entry.inputs[0].value_range == (0, 100) and entry.inputs[0].sequence_axis == 1
    assert entry.raw == manifest.raw["models"]["a"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found: build the repository first"),
        ('{"schema_version": 2, "models": {}}', "schema_version 2, this stagebatch reads 1"),
        ('{"models": {"a": {"max_batch_size": "eight"}}}', "model 'a' has a malformed entry"),
        ("[]", "holds list, not a manifest object"),
    ],
)
def test_read_manifest_names_the_file_and_the_fix_when_it_is_unusable(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ConfigValidationError, match=message):
        read_manifest(tmp_path)


def test_read_manifest_names_the_models_it_has_when_asked_for_another(tmp_path):
    (tmp_path / "manifest.json").write_text('{"models": {"a": {}, "b": {}}}')
    assert find_manifest(tmp_path / "elsewhere") is None
    with pytest.raises(ConfigValidationError, match="no model 'c' \\(it has a, b\\)"):
        read_manifest(tmp_path).model("c")
