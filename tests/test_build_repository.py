"""The repository builder on tiny zoo models: what it writes, without starting a server."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from slicing.manifest import check_model_entry
from slicing.build import CRASH_QUEUE_TIMEOUT_US, QUEUE_POLICY_WARNING, BuildOptions, build_repository
from slicing.zoo import MODEL_NAMES
from stagebatch.cli import main
from core.errors import SliceError
from core.model_config import read_model_config, render_model_config


@pytest.fixture(scope="module")
def export_cache(request):
    """Exports go to pytest's cache (keyed by a content hash), not to the user's ~/.cache."""
    previous = os.environ.get("STAGEBATCH_CACHE_DIR")
    os.environ["STAGEBATCH_CACHE_DIR"] = str(request.config.cache.mkdir("stagebatch"))
    yield
    if previous is None:
        os.environ.pop("STAGEBATCH_CACHE_DIR", None)
    else:
        os.environ["STAGEBATCH_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def built(tmp_path_factory, export_cache):
    repository = tmp_path_factory.mktemp("repo")
    options = BuildOptions(size="tiny", stages=2, max_batch=8, queue_delay_us=250)
    builds = build_repository(repository, models=["all"], options=options)
    return repository, builds


def test_build_writes_every_variant_with_valid_configs(built):
    repository, builds = built
    assert [b.name for b in builds] == list(MODEL_NAMES)
    manifest = json.loads((repository / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["target"] == "embedded"
    for name in MODEL_NAMES:
        entry = manifest["models"][name]
        check_model_entry(name, entry)
        assert entry["size"] == "tiny" and entry["max_batch_size"] == 8
        assert entry["variants"]["whole"] == name and entry["variants"]["ensemble"] == f"{name}_ensemble"
        assert len(entry["stages"]) == 2 and entry["build"]["stages"] == 2
        assert entry["build"]["verified_max_rel_error"] < 1e-3
        assert abs(sum(s["cost_share"] for s in entry["stages"]) - 1) < 0.02
        for model_name in [*entry["variants"].values(), *(s["model_name"] for s in entry["stages"])]:
            config = read_model_config(repository / model_name / "config.pbtxt")
            render_model_config(config)  # round-trips through Triton's schema
            assert config["name"] == model_name
            if config.get("platform") != "ensemble" and not model_name.endswith("_reorch"):
                assert config["backend"] == "python"
                assert config["dynamic_batching"].get("max_queue_delay_microseconds") == "250"
                assert (repository / model_name / "1" / "model.py").is_file()
                assert (repository / model_name / "1" / "backends" / "onnx_runner" / "batch.py").is_file()
        for stage in entry["stages"]:
            onnx.checker.check_model(str(repository / stage["onnx"]))
            assert 1 <= stage["favoured_batch_size"] <= 8


def test_build_manifest_describes_inputs_for_load_generators(built):
    repository, _ = built
    models = json.loads((repository / "manifest.json").read_text())["models"]
    bert = {i["name"]: i for i in models["bert_base"]["inputs"]}
    assert bert["input_ids"] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1],
                                 "value_range": [0, 1000], "sequence_axis": 1, "pad_value": 0, "role": "token_ids"}
    assert bert["attention_mask"]["role"] == "attention_mask"
    assert models["bert_base"]["sequence"] == {"max_length": 16, "min_length": 1}
    assert models["lstm"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, 4],
                                          "sequence_axis": 1, "pad_value": 0}]
    assert models["resnet50"]["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert models["resnet50"]["sequence"] is None
    ensemble = read_model_config(repository / "lstm_ensemble" / "config.pbtxt")
    steps = ensemble["ensemble_scheduling"]["step"]
    stages = models["lstm"]["stages"]
    assert [s["model_name"] for s in steps] == [s["model_name"] for s in stages]
    assert stages[0]["outputs"] and all(n.startswith("stage0_out") for n in stages[0]["outputs"])
    assert set(steps[1]["input_map"]) == set(stages[1]["inputs"])


def test_build_merges_into_an_existing_repository_and_replaces_a_rebuilt_model(tmp_path, export_cache):
    build_repository(tmp_path, models=["lstm"], options=BuildOptions(size="tiny", stages=3, max_batch=4))
    assert (tmp_path / "lstm_stage2").is_dir()
    build_repository(tmp_path, models=["resnet50"], options=BuildOptions(size="tiny", stages=2, max_batch=4))
    build_repository(tmp_path, models=["lstm"], options=BuildOptions(size="tiny", stages=2, max_batch=4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["lstm", "resnet50"]
    assert len(manifest["models"]["lstm"]["stages"]) == 2
    assert not (tmp_path / "lstm_stage2").exists()  # the stale third stage of the first build is gone


def test_build_gpu_target_writes_onnxruntime_backend_configs(tmp_path, export_cache):
    build_repository(tmp_path, models=["resnet50"], options=BuildOptions(size="tiny", stages=2, target="gpu"))
    for model_name in ("resnet50", "resnet50_stage0", "resnet50_stage1"):
        config = read_model_config(tmp_path / model_name / "config.pbtxt")
        assert config["backend"] == "onnxruntime"
        assert config["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
        assert not (tmp_path / model_name / "1" / "model.py").exists()
        assert (tmp_path / model_name / "1" / "model.onnx").is_file()
    assert json.loads((tmp_path / "manifest.json").read_text())["target"] == "gpu"


def test_build_too_many_stages_is_a_slice_error_naming_the_largest_k(tmp_path, export_cache):
    with pytest.raises(SliceError, match=r"--stages 500 is too large for lstm: the largest valid K is \d+"):
        build_repository(tmp_path, models=["lstm"], options=BuildOptions(size="tiny", stages=500))


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--model", "lstm", "--size", "tiny", "--stages", "500"], "--stages 500 is too large for lstm"),
    (["--onnx", "NOT_ONNX"], "is not an ONNX model"),
    (["--model", "lstm", "--onnx", "NOT_ONNX"], "exactly one"),
])
def test_build_cli_bad_requests_give_one_line_and_exit_1(tmp_path, capsys, export_cache, argv, message):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is text, not a protobuf")
    argv = [str(not_onnx) if a == "NOT_ONNX" else a for a in argv]
    assert main(["build", *argv, "--out", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err.strip()
    # progress lines may come first; the error is one line, the last one, and there is no traceback
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and message in errors[0], err
    assert "Traceback" not in err


def test_build_user_onnx_file_gets_inferred_specs_and_prints_the_slicer_notes(tmp_path, export_cache):
    import shutil

    from slicing.export import export_zoo_model
    from slicing.zoo import build_zoo_model

    user_file = tmp_path / "my-tagger.onnx"
    shutil.copy(export_zoo_model(build_zoo_model("lstm", "tiny")).path, user_file)
    lines: list[str] = []
    (build,) = build_repository(tmp_path / "repo", onnx_file=user_file,
                                options=BuildOptions(size="tiny", max_batch=4, max_seq_len=32), log=lines.append)
    assert build.name == "my_tagger"
    entry = json.loads((tmp_path / "repo" / "manifest.json").read_text())["models"]["my_tagger"]
    assert entry["family"] == "onnx" and entry["size"] is None and entry["build"]["source"] == "onnx"
    assert entry["inputs"][0]["value_range"] == [0, 100] and entry["inputs"][0]["sequence_axis"] == 1
    assert entry["sequence"] == {"max_length": 32, "min_length": 1}
    assert any("largest valid K" in line for line in lines)  # the slicer's notes reach the user
    from slicing.inputs import infer_input_specs
    from slicing.slicer import max_stages

    proto = onnx.load(str(user_file))
    assert len(entry["stages"]) == min(4, max_stages(proto, infer_input_specs(proto)))  # the default K


def test_build_explicit_cut_tensors_choose_the_boundaries(tmp_path, export_cache):
    (first,) = build_repository(tmp_path / "a", models=["lstm"], options=BuildOptions(size="tiny", stages=3))
    cuts = first.entry["build"]["cut_tensors"]
    assert len(cuts) == 2
    (again,) = build_repository(tmp_path / "b", models=["lstm"],
                                options=BuildOptions(size="tiny", cut_tensors=cuts[:1]))
    assert again.entry["build"]["cut_tensors"] == cuts[:1] and len(again.entry["stages"]) == 2


def test_max_seq_len_bounds_sequence_models_and_skips_the_cnn(tmp_path, export_cache):
    lines: list[str] = []
    build_repository(tmp_path, models=["resnet50", "lstm"],
                     options=BuildOptions(size="tiny", stages=2, max_batch=4, max_seq_len=32), log=lines.append)
    models = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert models["lstm"]["sequence"]["max_length"] == 32
    assert models["resnet50"]["sequence"] is None
    assert any("resnet50: no sequence axis" in line for line in lines)


def test_cli_build_keeps_the_stock_batcher_and_writes_a_queue_timeout_only_when_asked(tmp_path, export_cache, capsys):
    # A queue policy stalls 2.51's batcher for up to 500 ms under concurrent calls (docs/gpu.md): opt-in only.
    assert main(["build", "--model", "lstm", "--size", "tiny", "--stages", "2", "--out", str(tmp_path / "cli")]) == 0
    assert QUEUE_POLICY_WARNING.split(" (")[0] not in capsys.readouterr().err
    assert main(["build", "--model", "lstm", "--size", "tiny", "--stages", "2", "--out", str(tmp_path / "timed"),
                 "--default-timeout-us", str(CRASH_QUEUE_TIMEOUT_US)]) == 0
    assert QUEUE_POLICY_WARNING.split(" (")[0] in " ".join(capsys.readouterr().err.split())
    for name in ("lstm", "lstm_stage0", "lstm_stage1", "lstm_reorch"):
        stock = read_model_config(tmp_path / "cli" / name / "config.pbtxt")["dynamic_batching"]
        assert "default_queue_policy" not in stock, name
        timed = read_model_config(tmp_path / "timed" / name / "config.pbtxt")["dynamic_batching"]
        assert int(timed["default_queue_policy"]["default_timeout_microseconds"]) == CRASH_QUEUE_TIMEOUT_US, name
