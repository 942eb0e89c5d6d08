"""Characterization plans: the shipped plans parse; bad plans are refused with file:line and the key."""

from __future__ import annotations

import textwrap

import pytest

from loadtest.plan import ModelLimits, check_against_models, load_plan, parse_plan
from core.errors import ConfigValidationError

GOOD = textwrap.dedent("""\
    name: t
    repository: {size: tiny, max_batch_size: 8, stages: 2}
    defaults: {duration_s: 2, warmup_s: 0.5, slo_ms: 50}
    models:
      bert_base:
        lengths: {kind: uniform, min_length: 4, max_length: 16}
      resnet50: {}
    loads:
      closed2: {arrival: {kind: closed, users: 2}}
      curve:
        arrival: {kind: poisson, rate_rps: 10}
        sweep: {rate_rps: [5, 10]}
    experiments:
      - name: variants
        models: [bert_base, resnet50]
        variants: [whole, ensemble]
        batching:
          max_queue_delay_us: [0, 1000]
        loads: [closed2, curve]
      - name: policies
        models: [bert_base]
        variants: [reorch]
        reorch:
          policy: [dva, input]
          knobs: {stretch_max_wait_us: [500, 2000]}
        slicing: {stages: [2, 3]}
        loads: [curve]
    """)


def _error(text: str) -> str:
    with pytest.raises(ConfigValidationError) as info:
        parse_plan(text, "p.yaml")
    return str(info.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_plan_expands_every_sweep_into_ordered_points():
    plan = parse_plan(GOOD, "p.yaml")
    points = plan.points()
    # variants: 2 models x 2 variants x 2 delays x 3 loads; policies: 2 policies x 2 knobs x 2 K x 2 rates
    assert len(points) == 24 + 16
    ids = [p.point_id for p in points]
    assert len(set(ids)) == len(ids)
    assert "variants/bert_base/whole/qd1000/curve@rate_rps=5" in ids
    policy_point = next(p for p in points if p.variant == "reorch")
    assert policy_point.reorch["policy"] in ("dva", "input")
    assert policy_point.slicing["stages"] in (2, 3)
    whole = next(p for p in points if p.variant == "whole")
    assert whole.slicing == {} and whole.reorch == {}
    assert whole.lengths == {"kind": "uniform", "min_length": 4, "max_length": 16}
    # points sharing a build are adjacent: each build key appears in one run
    keys = [p.build_key() for p in points]
    assert all(keys.index(k) == i or keys[i - 1] == k for i, k in enumerate(keys))


@pytest.mark.parametrize("name", ["quick", "full"])
def test_shipped_plans_parse(name):
    plan = load_plan(name)
    assert plan.points()
    if name == "quick":  # a few minutes on 2 cores
        assert sum(p.duration_s + p.warmup_s for p in plan.points()) <= 5 * 60


def test_unknown_model_is_refused_with_its_line_and_suggestion():
    text = GOOD.replace("  resnet50: {}", "  resnet05: {}")
    message = _error(text)
    assert message.startswith(f"p.yaml:{_line_of(text, 'resnet05')}: models.resnet05:")
    assert "did you mean 'resnet50'" in message


def test_typo_in_batching_knob_lists_valid_keys():
    text = GOOD.replace("max_queue_delay_us: [0, 1000]", "max_queue_dealy_us: [0, 1000]")
    message = _error(text)
    assert message.startswith(f"p.yaml:{_line_of(text, 'dealy')}: experiments[0].batching.max_queue_dealy_us")
    assert "did you mean 'max_queue_delay_us'" in message and "preferred_batch_sizes" in message


def test_typo_in_reorch_knob_is_refused():
    text = GOOD.replace("stretch_max_wait_us", "strech_max_wait_us")
    message = _error(text)
    assert f"p.yaml:{_line_of(text, 'strech')}:" in message and "stretch_max_wait_us" in message


@pytest.mark.parametrize(
    "old,new,needle,rule",
    [
        ("max_queue_delay_us: [0, 1000]", "max_queue_delay_us: [0, -5]", "-5", "must be >= 0"),
        ("max_queue_delay_us: [0, 1000]", "max_batch_size: 0", "max_batch_size: 0", "must be >= 1"),
        ("rate_rps: [5, 10]", "rate_rps: [5, 0]", "rate_rps: [5, 0]", "rate_rps > 0"),
        ("{kind: closed, users: 2}", "{kind: closed, users: 0}", "users: 0", "users >= 1"),
        ("policy: [dva, input]", "policy: [dva, fastest]", "fastest", "unknown reorch policy 'fastest'"),
        ("variants: [whole, ensemble]", "variants: [whole, ensembel]", "ensembel", "did you mean 'ensemble'"),
        ("{duration_s: 2,", "{duration_s: -1,", "duration_s: -1", "must be > 0"),
        ("[500, 2000]", "[500, -1]", "[500, -1]", ">= 0"),
        ("slicing: {stages: [2, 3]}", "slicing: {stages: [0]}", "stages: [0]", "must be >= 1"),
        ("loads: [curve]\n", "loads: [curv]\n", "[curv]", "did you mean 'curve'"),
        (
            "{kind: uniform, min_length: 4, max_length: 16}",
            "{kind: uniform, min_length: 20, max_length: 16}",
            "min_length: 20",
            "min_length <= max_length",
        ),
    ],
)
def test_impossible_values_are_refused_with_the_line(old, new, needle, rule):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    message = _error(text)
    assert message.startswith(f"p.yaml:{_line_of(text, needle)}:"), message
    assert rule in message, message


def test_preferred_sizes_above_max_batch_and_unsorted_are_refused():
    text = GOOD.replace(
        "max_queue_delay_us: [0, 1000]", "max_batch_size: 4\n      preferred_batch_sizes: [2, 8]"
    )
    assert "exceeds max_batch_size 4" in _error(text)
    text = GOOD.replace("max_queue_delay_us: [0, 1000]", "preferred_batch_sizes: [8, 2]")
    assert "distinct and increasing" in _error(text)


def test_structure_errors_name_the_rule():
    assert "not valid YAML" in _error("name: [unclosed\n")
    assert "missing required key 'experiments'" in _error("name: x\nmodels: {lstm: {}}\nloads: {}\n")
    assert "knobs need the" in _error(GOOD.replace("variants: [reorch]", "variants: [whole]"))


def test_k_larger_than_model_allows_is_refused_before_running():
    text = GOOD
    plan = parse_plan(text, "p.yaml")
    limits = {"bert_base": ModelLimits(max_stages=2, max_batch_size=8), "resnet50": ModelLimits(max_stages=6)}
    with pytest.raises(ConfigValidationError) as info:
        check_against_models(plan, limits)
    assert str(info.value).startswith(f"p.yaml:{_line_of(text, 'stages: [2, 3]')}:")
    assert "K=3 is larger than bert_base allows (at most 2 stages)" in str(info.value)
    check_against_models(
        plan, {"bert_base": ModelLimits(max_stages=3), "resnet50": ModelLimits(max_stages=3)}
    )
    with pytest.raises(ConfigValidationError, match="'resnet50' is not in the repository"):
        check_against_models(plan, {"bert_base": ModelLimits(max_stages=3)})


def test_missing_plan_names_the_shipped_ones():
    with pytest.raises(ConfigValidationError, match="shipped plans: .*quick"):
        load_plan("no-such-plan")


def test_plan_protocol_defaults_to_the_generators_choice_and_experiments_override_it():
    text = GOOD.replace("defaults: {duration_s: 2,", "defaults: {protocol: stream, duration_s: 2,").replace(
        "  - name: policies\n", "  - name: policies\n    protocol: unary\n")
    points = parse_plan(text, "p.yaml").points()
    assert {p.protocol for p in points if p.experiment == "variants"} == {"stream"}
    assert {p.protocol for p in points if p.experiment == "policies"} == {"unary"}
    assert {p.protocol for p in parse_plan(GOOD, "p.yaml").points()} == {""}  # the variant's default


def test_plan_refuses_an_unknown_protocol_naming_its_line():
    text = GOOD.replace("defaults: {duration_s: 2,", "defaults: {protocol: carrier-pigeon, duration_s: 2,")
    message = _error(text)
    assert "protocol" in message and "unary" in message and f"p.yaml:{_line_of(text, 'carrier')}" in message


BLOCK = textwrap.dedent("""\
    name: block
    repository:
      size: tiny
    models:
      bert_base:
        lengths:
          kind: uniform
          min_length: 4
          max_length: 16
    loads:
      curve:
        arrival:
          kind: poisson
          rate_rps: 10
        sweep:
          rate_rps:
            - 5
            - 10
    experiments:
      - name: variants
        models: bert_base
        variants:
          - whole
          - reorch
        loads: curve
        reorch:
          knobs:
            bucket_bounds:
              - [8, 16]
              - [4, 8]
    """)


# (old, new, the line the error names, where in the plan it says the error is), in a block-style plan
BLOCK_ERRORS = {
    "sweep item": ("- 10\n", "- -10\n", "- -10", "loads.curve.sweep.rate_rps[1]"),
    "list item": ("- reorch\n", "- reorhc\n", "reorhc", "experiments[0].variants[1]"),
    "owner's rule": ("max_length: 16\n", "max_length: 2\n", "lengths:", "models.bert_base.lengths"),
    "nested key": ("min_length: 4\n", "min_lenght: 4\n", "min_lenght", "models.bert_base.lengths.min_lenght"),
    "list in list": ("- [4, 8]\n", "- [8, 4]\n", "[8, 4]", "reorch.knobs.bucket_bounds[1]"),
    "scalar sweep": ("models: bert_base\n", "models: bert\n", "models: bert", "experiments[0].models"),
    "type": ("size: tiny\n", "size: 3\n", "size: 3", "repository.size"),
}


@pytest.mark.parametrize("case", BLOCK_ERRORS)
def test_errors_name_the_line_of_the_key_or_item_when_the_plan_is_written_in_block_style(case):
    old, new, needle, where = BLOCK_ERRORS[case]
    parse_plan(BLOCK, "b.yaml")
    text = BLOCK.replace(old, new, 1)
    message = _error_in(text, "b.yaml")
    assert message.startswith(f"b.yaml:{_line_of(text, needle)}: "), message
    assert where in message.split(": ")[1], message


def test_of_several_errors_the_first_in_the_file_is_named_and_the_others_counted():
    text = BLOCK.replace("size: tiny\n", "size: huge\n").replace("- reorch\n", "- reorhc\n")
    message = _error_in(text, "b.yaml")
    assert message.startswith(f"b.yaml:{_line_of(text, 'huge')}: repository.size: unknown size 'huge'")
    assert "1 more error(s)" in message and "\n" not in message


def _error_in(text: str, source: str) -> str:
    with pytest.raises(ConfigValidationError) as info:
        parse_plan(text, source)
    return str(info.value)
