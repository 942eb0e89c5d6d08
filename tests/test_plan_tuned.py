"""The plan variant ``tuned``: the best configuration of a ``stagebatch tune`` result, beside the others."""

from __future__ import annotations

import json
import textwrap

import pytest

from core.errors import ConfigValidationError
from core.model_config import (
    BatchingOverlay,
    DynamicBatching,
    TensorConfig,
    config_parameters,
    onnx_model_config,
)
from loadtest import characterization as runner
from loadtest import rundir
from loadtest.plan import load_plan, parse_plan
from loadtest.report.data import point_label
from loadtest.tuned import TUNE_FILE, read_tuned
from tests.helpers import tiny_plan_folder

PLAN = textwrap.dedent("""\
    name: tuned
    repository: {size: tiny, stages: 2}
    defaults: {duration_s: 2, warmup_s: 0.5, repeats: 2}
    models:
      bert_base: {tuned: TUNE_DIR}
    loads:
      steady:
        arrival: {kind: poisson, rate_rps: 1x}
        sweep: {rate_rps: [0.5x, 0.85x]}
    experiments:
      - name: versus
        models: [bert_base]
        variants: [whole, tuned]
        loads: [steady]
    """)

RESULTS = [
    {"key": "baseline", "variant": "whole", "batching": {}, "measured_slo_rps": 100.0},
    {"key": "reorch-k3-dva-mbs16", "stages": 3, "variant": "reorch", "label": "reorch:dva",
     "batching": {"max_batch_size": 16, "max_queue_delay_us": 500, "preferred_batch_sizes": [], "instance_count": 1},
     "reorch": {"policy": "dva", "knobs": {"stretch_max_wait_us": 1000}}, "measured_slo_rps": 140.0},
    {"key": "whole-mbs8", "stages": 3, "variant": "whole", "batching": {"max_batch_size": 8},
     "measured_slo_rps": 120.0},
]


def write_tune(folder, model="bert_base", results=RESULTS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TUNE_FILE).write_text(json.dumps({"model": model, "slo_ms": 100, "results": results}))
    return folder


def plan_text(tune_dir) -> str:
    return PLAN.replace("TUNE_DIR", str(tune_dir))


def test_tuned_points_run_the_best_confirmed_configuration_and_compare_with_whole(tmp_path):
    plan = parse_plan(plan_text(write_tune(tmp_path / "tune")), "tuned.yaml")
    points = plan.points()
    tuned = [p for p in points if p.tuned]
    assert sorted(p.point_id for p in tuned) == [f"versus/bert_base/tuned/steady@rate_rps={rate}x/r{repeat}"
                                                 for rate in ("0.5", "0.85") for repeat in (0, 1)]
    first = tuned[0]
    assert (first.variant, first.tuned, first.slicing) == ("reorch", "reorch-k3-dva-mbs16", {"stages": 3})
    assert first.batching.max_batch_size == 16
    assert first.reorch.to_mapping() == {"policy": "dva", "knobs": {"stretch_max_wait_us": 1000}}
    whole = {p.comparison_key for p in points if p.variant == "whole" and not p.tuned}
    assert {p.comparison_key for p in tuned} == whole  # the report compares them load by load
    assert point_label(first.to_dict()).startswith("tuned:reorch[dva]")


def test_tuned_variant_without_a_tune_result_is_refused_with_its_line(tmp_path):
    text = PLAN.replace("bert_base: {tuned: TUNE_DIR}", "bert_base: {}")
    with pytest.raises(ConfigValidationError) as caught:
        parse_plan(text, "tuned.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if "variants: [whole, tuned]" in row)
    assert f"tuned.yaml:{line}:" in str(caught.value) and "models.bert_base.tuned" in str(caught.value)


@pytest.mark.parametrize("setup, message", [
    (lambda d: d, "no tune.json"),
    (lambda d: write_tune(d, model="lstm"), "it tuned 'lstm', not 'bert_base'"),
    (lambda d: write_tune(d, results=[{**RESULTS[0]}, {**RESULTS[1], "measured_slo_rps": None}]),
     "no confirmed configuration"),
])
def test_unusable_tune_result_is_refused_at_the_tuned_key(tmp_path, setup, message):
    folder = tmp_path / "tune"
    folder.mkdir()
    setup(folder)
    text = plan_text(folder)
    plan = parse_plan(text, "tuned.yaml")
    with pytest.raises(ConfigValidationError) as caught:
        plan.points()
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if "tuned:" in row)
    assert f"tuned.yaml:{line}:" in str(caught.value) and message in str(caught.value)


def test_read_tuned_accepts_the_file_itself_and_whole_configs_have_no_stages(tmp_path):
    folder = write_tune(tmp_path / "t", results=[RESULTS[0], RESULTS[2]])
    tuned = read_tuned(folder / TUNE_FILE, "bert_base")
    assert (tuned.variant, tuned.stages, tuned.batching) == ("whole", None, {"max_batch_size": 8})


E2E_PLAN = textwrap.dedent("""\
    name: tuned_e2e
    repository: {path: repo, build: false}
    defaults: {duration_s: 1.5, warmup_s: 0.3, slo_ms: 50}
    models:
      seq:
        lengths: {kind: fixed, length: 8}
        tuned: TUNE_DIR
    loads:
      poisson:
        arrival: {kind: poisson, rate_rps: 30}
    experiments:
      - name: versus
        models: [seq]
        variants: [whole, tuned]
        loads: [poisson]
    """)


@pytest.mark.server
def test_characterization_runs_the_tuned_configuration_beside_the_default(tmp_path):
    tune = write_tune(tmp_path / "tune", model="seq", results=[
        {"key": "baseline", "variant": "whole", "batching": {}, "measured_slo_rps": 30.0},
        {"key": "whole-mbs4-qd2000", "stages": 2, "variant": "whole",
         "batching": {"max_batch_size": 4, "max_queue_delay_us": 2000}, "measured_slo_rps": 40.0}])
    plan = load_plan(tiny_plan_folder(tmp_path, E2E_PLAN.replace("TUNE_DIR", str(tune))))
    run_dir = runner.characterize(plan, runner.RunOptions(out_dir=tmp_path / "run", progress=False))
    points = [json.loads(line) for line in (run_dir / rundir.POINTS_FILE).read_text().splitlines()]
    assert [p["status"] for p in points] == ["ok", "ok"], [p.get("error") for p in points]
    tuned = next(p for p in points if p["point"]["tuned"])
    assert tuned["point"]["batching"] == {"max_batch_size": 4, "max_queue_delay_us": 2000}
    assert tuned["comparison_key"] == next(p for p in points if not p["point"]["tuned"])["comparison_key"]
    assert "tuned:whole mbs4 qd2000" in (run_dir / "report.md").read_text()


def test_tuned_threads_and_instances_reach_the_point_and_the_config_it_loads(tmp_path):
    batching = {"max_batch_size": 8, "max_queue_delay_us": 0, "preferred_batch_sizes": [], "instance_count": 2,
                "intra_op_threads": 1}
    folder = write_tune(tmp_path / "tune", results=[RESULTS[0], {"key": "whole_mbs8_d0_i2_t1", "variant": "whole",
                                                                 "batching": batching, "measured_slo_rps": 150.0}])
    point = next(p for p in parse_plan(plan_text(folder), "tuned.yaml").points() if p.tuned)
    assert point.batching == BatchingOverlay(8, 0, (), 2, intra_op_threads=1)
    built = onnx_model_config("bert_base", target="embedded", max_batch_size=8, inputs=[TensorConfig("x", "float32", [3])],
                              outputs=[TensorConfig("y", "float32", [3])], dynamic_batching=DynamicBatching(),
                              intra_op_threads=0)
    config = runner.point_configs(point, {"variants": {"whole": "bert_base"}}, {"bert_base": built})["bert_base"]
    assert config_parameters(config)["intra_op_threads"] == "1"
    assert config["instance_group"][0]["count"] == 2
