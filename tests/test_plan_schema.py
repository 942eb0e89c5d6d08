"""The plan's JSON Schema (docs/plan.schema.json): committed up to date, and it accepts the shipped plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loadtest.plan import SCHEMA_PATH, plan_json_schema

ROOT = Path(__file__).resolve().parent.parent
PLANS = sorted((ROOT / "loadtest" / "plans").glob("*.yaml")) + sorted((ROOT / "docker").glob("*.yaml"))


def test_committed_plan_schema_is_current_when_the_model_changes():
    committed = json.loads(SCHEMA_PATH.read_text())
    stale = f"{SCHEMA_PATH.relative_to(ROOT)} is stale: rewrite it with `python -m loadtest.plan` and commit it"
    assert committed == plan_json_schema(), stale


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_plan_schema_accepts_every_shipped_plan(path):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(plan_json_schema())
    assert [error.message for error in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


def test_plan_schema_flags_a_typo_and_a_bad_rate_for_editors():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(plan_json_schema())
    plan = yaml.safe_load((ROOT / "loadtest" / "plans" / "quick.yaml").read_text())
    plan["experiments"][0]["batching"] = {"max_queue_dealy_us": [0]}
    plan["loads"]["headline"]["arrival"]["rate_rps"] = "fast"
    messages = " ".join(error.message for error in validator.iter_errors(plan))
    assert "max_queue_dealy_us" in messages and "'fast'" in messages

