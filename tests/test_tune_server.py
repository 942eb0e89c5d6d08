"""``stagebatch tune`` and ``simulate --run`` against the real embedded server (tiny BERT, slow)."""

from __future__ import annotations

import json
import textwrap

import pytest

from loadtest import characterization as runner
from loadtest.plan import load_plan
from slicing.build import BuildOptions, build_repository
from stagebatch.cli import main
from tuning.calibrate import read_calibration
from tuning.replay import SIMULATION_FILE, replay_run
from tuning.threads import measure_thread_slowdown

pytestmark = [pytest.mark.slow, pytest.mark.server]

PLAN = textwrap.dedent("""\
    name: simtiny
    repository: {{path: repo, build: false}}
    defaults: {{duration_s: 4, warmup_s: 1, slo_ms: 100, seed: 1}}
    models:
      bert_base:
        lengths: {{kind: fixed, length: 16}}
    loads:
      curve:
        arrival: {{kind: poisson, rate_rps: {rate}}}
    experiments:
      - name: variants
        models: [bert_base]
        variants: [whole, reorch]
        loads: [curve]
    """)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    build_repository(root / "repo", models=["bert_base"], options=BuildOptions(size="tiny", stages=2, max_batch=8))
    return root


def _run(root, rate: int):
    (root / f"plan{rate}.yaml").write_text(PLAN.format(rate=rate))
    return runner.characterize(load_plan(root / f"plan{rate}.yaml"),
                               runner.RunOptions(out_dir=root / f"run{rate}", progress=False))


def test_simulator_p50_is_within_25_percent_of_a_real_tiny_run_when_calibrated_on_another(tiny_bert):
    calibration_run = _run(tiny_bert, 20)
    replay_run(calibration_run, calibrate=True)  # fits the serving costs to the first run (in-sample)
    checked_run = _run(tiny_bert, 60)
    document = replay_run(checked_run, read_calibration(calibration_run))  # predicts the second one
    assert (checked_run / SIMULATION_FILE).is_file()
    summary = document["summary"]
    assert summary["simulated"] == 2, [p.get("skipped") for p in document["points"]]
    assert summary["median_abs_error_p50"] <= 0.25, json.dumps(document["points"], indent=1)


def test_tune_confirms_and_writes_ready_repositories_within_its_budget(tiny_bert, capsys):
    out = tiny_bert / "tuned"
    code = main(["tune", "--model", "bert_base", "--size", "tiny", "--slo-ms", "50", "--repository",
                 str(tiny_bert / "repo"), "--budget-minutes", "2.5", "--confirm", "1", "--top", "1",
                 "--repeats", "2", "--probe-s", "1.5", "--out", str(out)])
    assert code == 0
    state = json.loads((out / "tune.json").read_text())
    assert state["used_s"] <= 2.5 * 60 * 1.2
    measured = [r for r in state["results"] if r["measured_slo_rps"] is not None]
    assert {r["key"] for r in measured} >= {"baseline"}
    ready = sorted((out / "configs").iterdir())
    assert len(ready) == 1 and (ready[0] / "manifest.json").is_file() and (ready[0] / "tuned.json").is_file()
    assert "Why each won" in (out / "tune.md").read_text()
    assert state["simulator"]["cores"] >= 1 and list(state["thread_slowdown"]["by_threads"]) == ["1"]
    assert "Threads: the simulator shares" in (out / "tune.md").read_text()
    # resume: what was measured stays as it was; only the (configuration, round) pairs the budget left out run
    assert main(["tune", "--model", "bert_base", "--size", "tiny", "--slo-ms", "50", "--repository",
                 str(tiny_bert / "repo"), "--budget-minutes", "2.5", "--confirm", "1", "--top", "1",
                 "--repeats", "2", "--resume", str(out)]) == 0
    again = json.loads((out / "tune.json").read_text())
    assert again["measurements"][:len(state["measurements"])] == state["measurements"]
    pairs = [(m["key"], m["repeat"]) for m in again["measurements"]]
    # no pair measured twice; 2 configurations x (2 rounds + 3 extra rounds of the leader) at most
    assert len(pairs) == len(set(pairs)) <= 2 * (2 + 3)


def test_measure_thread_slowdown_times_each_thread_count_at_each_batch_size_of_a_built_model(tiny_bert):
    repository = tiny_bert / "repo"
    manifest = json.loads((repository / "manifest.json").read_text())
    slowdown = measure_thread_slowdown(repository, manifest, "bert_base", threads=(1, 0), batch_sizes=(1, 8),
                                       length=16, pairs=3, min_s=0.0)
    assert list(slowdown) == [1]  # the count as built (0) is 1.0 by definition, not measured
    assert list(slowdown[1]) == [1, 8] and all(value > 0 for value in slowdown[1].values())
