"""The runner's pure parts: configs a point loads, per-stage rows, the load-generator check."""

from __future__ import annotations

import pytest

from loadtest.plan import Point
from loadtest.characterization import loadgen_bottleneck, point_configs, stage_rows_from_reorch
from loadtest.server_stats import ReorchDelta
from core.errors import ConfigValidationError
from core.model_config import BatchingOverlay, ReorchOverlay, apply_batching, apply_reorch, variant_models

ENTRY = {
    "variants": {"whole": "m", "ensemble": "m_ensemble", "reorch": "m_reorch"},
    "stages": [{"model_name": "m_stage0"}, {"model_name": "m_stage1"}],
}
BASE = {
    "backend": "python",
    "max_batch_size": 8,
    "dynamic_batching": {"max_queue_delay_microseconds": "100"},
    "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    "parameters": {"policy": {"string_value": "dva"}},
}


def _point(variant, batching=None, reorch=None):
    return Point(
        point_id="p",
        experiment="e",
        model="m",
        variant=variant,
        load="l",
        arrival={"kind": "closed"},
        lengths=None,
        batching=batching or {},
        slicing={},
        reorch=reorch or {},
        duration_s=1,
        warmup_s=0,
        slo_ms=10,
        seed=0,
    )


def test_variant_models_lists_dependencies_first():
    assert variant_models(ENTRY, "whole") == ["m"]
    assert variant_models(ENTRY, "ensemble") == ["m_stage0", "m_stage1", "m_ensemble"]
    with pytest.raises(ConfigValidationError, match="no 'reorch' variant"):
        variant_models({"variants": {"whole": "m"}}, "reorch")


def test_apply_batching_sets_only_given_knobs_and_leaves_base_untouched():
    config = apply_batching(
        BASE, BatchingOverlay(max_queue_delay_us=5000, preferred_batch_sizes=(2, 4), instance_count=2)
    )
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 5000,
        "preferred_batch_size": [2, 4],
    }
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 2}]
    assert config["max_batch_size"] == 8
    assert BASE["dynamic_batching"] == {"max_queue_delay_microseconds": "100"}
    assert apply_batching(BASE, BatchingOverlay()) == BASE


def test_reorch_point_sets_policy_knobs_and_rows_limit():
    config = apply_reorch(
        BASE,
        ReorchOverlay(policy="input", knobs={"bucket_bounds": [8, 16], "stretch_max_wait_us": 0}),
        BatchingOverlay(max_batch_size=4),
    )
    assert config["parameters"]["policy"] == {"string_value": "input"}
    assert config["parameters"]["bucket_bounds"] == {"string_value": "8,16"}
    assert config["parameters"]["stretch_max_wait_us"] == {"string_value": "0"}
    assert config["parameters"]["max_batch_rows"] == {"string_value": "4"}


def test_point_configs_batch_the_stages_and_cap_the_ensemble():
    base = {name: {**BASE, "name": name} for name in ("m_stage0", "m_stage1", "m_ensemble")}
    base["m_ensemble"] = {"name": "m_ensemble", "platform": "ensemble", "max_batch_size": 8}
    configs = point_configs(_point("ensemble", {"max_batch_size": 4, "max_queue_delay_us": 0}), ENTRY, base)
    assert list(configs) == ["m_stage0", "m_stage1", "m_ensemble"]
    assert configs["m_stage1"]["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert configs["m_ensemble"] == {"name": "m_ensemble", "platform": "ensemble", "max_batch_size": 4}


def test_reorch_stage_rows_turn_per_request_sizes_into_executions():
    delta = ReorchDelta(
        model="m_reorch", stages={0: {"executions": 3, "samples": 6, "queue_us": 600, "compute_us": 3000}}
    )
    # two requests rode in one batch of 2, four in one batch of 4 at stage 0
    rows = stage_rows_from_reorch("m_reorch", delta, [[2, 1]] * 2 + [[4, 4]] * 4)
    assert rows[0]["batch_histogram"] == {"2": 1.0, "4": 1.0}
    assert (
        rows[0]["avg_batch_size"] == 2
        and rows[0]["avg_queue_us"] == 100
        and rows[0]["avg_compute_us"] == 1000
    )
    assert rows[1]["batch_histogram"] == {"1": 2.0, "4": 1.0} and rows[1]["avg_batch_size"] is None


def test_loadgen_bottleneck_flags_busy_cpu_or_many_late_arrivals():
    assert not loadgen_bottleneck(20.0, 2, 146)
    assert loadgen_bottleneck(90.0, 0, 100)
    assert loadgen_bottleneck(10.0, 20, 100)
