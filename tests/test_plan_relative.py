"""Relative rates (0.85x), repeats and queue-policy knobs in plans: parsing, expansion and errors."""

from __future__ import annotations

import textwrap

import pytest

from loadtest import characterization as runner
from loadtest.plan import parse_plan, parse_rate, resolve_arrival
from core.errors import ConfigValidationError
from core.model_config import BatchingOverlay, apply_batching

PLAN = textwrap.dedent("""\
    name: rel
    repository: {path: repo, build: false}
    defaults: {duration_s: 2, warmup_s: 0.5, repeats: 2}
    models:
      seq: {}
    loads:
      curve:
        arrival: {kind: poisson, rate_rps: 1x}
        sweep: {rate_rps: [0.3x, 0.85x, 1.2x]}
      burst:
        arrival: {kind: bursty, rate_rps: 1.6x, off_rate_rps: 0.1x, on_s: 1, off_s: 2}
      fixed:
        arrival: {kind: poisson, rate_rps: 25}
    experiments:
      - name: variants
        models: [seq]
        variants: [whole, reorch]
        loads: [curve]
      - name: bursts
        models: [seq]
        variants: [whole]
        batching: {max_queue_size: 16, default_timeout_us: 50000}
        loads: [burst, fixed]
        repeats: 1
    """)


def test_parse_rate_accepts_numbers_and_multiples():
    assert parse_rate(120) == (120.0, None)
    assert parse_rate("0.85x") == (None, 0.85)
    assert parse_rate("1X") == (None, 1.0)


@pytest.mark.parametrize("value, rule", [("0x", "must be > 0"), ("-1x", "must be > 0"), ("abc", "is not a rate")])
def test_relative_rate_is_refused_with_its_line_when_not_a_positive_multiple(value, rule):
    text = PLAN.replace("[0.3x, 0.85x, 1.2x]", f"[0.3x, {value}]")
    with pytest.raises(ConfigValidationError) as caught:
        parse_plan(text, "rel.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if value in row)
    assert f"rel.yaml:{line}:" in str(caught.value) and rule in str(caught.value)


def test_relative_rate_in_arrival_field_is_refused_when_not_a_rate():
    text = PLAN.replace("off_rate_rps: 0.1x", "off_rate_rps: -1x")
    with pytest.raises(ConfigValidationError, match=r"burst\.arrival\.off_rate_rps: '-1x'.*must be > 0"):
        parse_plan(text, "rel.yaml")


def test_resolve_arrival_multiplies_the_capacity_and_records_the_load():
    arrival, load = resolve_arrival({"kind": "bursty", "rate_rps": "1.6x", "off_rate_rps": "0.1x", "on_s": 1}, 200.0)
    assert arrival["rate_rps"] == pytest.approx(320) and arrival["off_rate_rps"] == pytest.approx(20)
    assert load == {"rate_rps": pytest.approx(320), "multiple": 1.6, "capacity_rps": 200.0}
    absolute, load = resolve_arrival({"kind": "poisson", "rate_rps": 30}, None)
    assert absolute["rate_rps"] == 30 and load["multiple"] is None


def test_relative_rate_without_a_measured_capacity_is_a_clear_error():
    with pytest.raises(ConfigValidationError, match="no capacity was measured.*--capacity"):
        resolve_arrival({"kind": "poisson", "rate_rps": "0.85x"}, None, model="seq")


def test_relative_rates_are_refused_up_front_when_capacity_search_is_disabled(tmp_path):
    plan = parse_plan(PLAN.replace("defaults:", "capacity: {enabled: false}\ndefaults:"), "rel.yaml")
    run = runner.Characterization(plan, runner.RunOptions(out_dir=tmp_path / "run", url="127.0.0.1:1"))
    with pytest.raises(ConfigValidationError, match="capacity.enabled: false"):
        run.run()
    assert not (tmp_path / "run" / "points.jsonl").exists()


def test_repeats_interleave_variants_and_share_a_comparison_key():
    points = parse_plan(PLAN, "rel.yaml").points()
    variants = [p for p in points if p.experiment == "variants"]
    assert len(variants) == 2 * 2 * 3 and {p.repeats for p in variants} == {2}
    order = [(p.repeat, p.variant) for p in variants]
    assert order[:6] == [(0, "whole")] * 3 + [(0, "reorch")] * 3  # repeat 0: A then B
    assert order[6:] == [(1, "reorch")] * 3 + [(1, "whole")] * 3  # repeat 1: B then A
    keys = {}
    for p in variants:
        keys.setdefault(p.comparison_key, set()).add((p.variant, p.repeat))
    assert len(keys) == 3 and all(len(v) == 4 for v in keys.values())
    assert len({p.point_id for p in points}) == len(points)
    assert {p.seed for p in variants if p.repeat == 1} != {p.seed for p in variants if p.repeat == 0}


def test_queue_policy_knobs_reach_the_config_through_dynamic_batching():
    points = parse_plan(PLAN, "rel.yaml").points()
    burst = next(p for p in points if p.experiment == "bursts")
    assert burst.batching == {"max_queue_size": 16, "default_timeout_us": 50000}
    config = apply_batching({"max_batch_size": 8, "dynamic_batching": {}}, BatchingOverlay.from_mapping(burst.batching))
    policy = config["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == 16 and policy["default_timeout_microseconds"] == 50000
    assert policy["timeout_action"] == "REJECT"


def test_shipped_plans_use_relative_loads():
    from loadtest.plan import load_plan

    for name in ("quick", "full"):
        plan = load_plan(name)
        assert all(p.relative for p in plan.points() if p.arrival.get("kind") != "closed"), name
