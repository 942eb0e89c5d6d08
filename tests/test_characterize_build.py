"""The characterization runner building zoo models itself: ensemble stages, reorch, and a K rebuild."""

from __future__ import annotations

import json
import textwrap

import pytest

from loadtest import report as report_lib
from loadtest import characterization as runner
from loadtest import rundir
from loadtest.report.attribution import attribute
from loadtest.plan import load_plan

BUILD_PLAN = textwrap.dedent("""\
    name: tinybuild
    repository: {size: tiny, max_batch_size: 4, stages: 2}
    defaults: {duration_s: 1.0, warmup_s: 0.3, slo_ms: 100}
    models:
      bert_base:
        lengths: {kind: uniform, min_length: 4, max_length: 16}
    loads:
      poisson: {arrival: {kind: poisson, rate_rps: 25}}
    experiments:
      - name: variants
        models: [bert_base]
        variants: [ensemble, reorch]
        loads: [poisson]
      - name: slicing
        models: [bert_base]
        variants: [ensemble]
        slicing: {stages: 3}
        loads: [poisson]
    """)


@pytest.mark.server
def test_runner_builds_and_rebuilds_sliced_models(tmp_path):
    (tmp_path / "plan.yaml").write_text(BUILD_PLAN)
    run_dir = runner.characterize(
        load_plan(tmp_path / "plan.yaml"), runner.RunOptions(out_dir=tmp_path / "run", progress=False)
    )
    points = {
        json.loads(line)["point"]["point_id"]: json.loads(line)
        for line in (run_dir / rundir.POINTS_FILE).read_text().splitlines()
    }
    assert all(p["status"] == "ok" for p in points.values()), [p.get("error") for p in points.values()]
    ensemble = points["variants/bert_base/ensemble/poisson"]
    assert [s["model"] for s in ensemble["server"]["stages"]] == ["bert_base_stage0", "bert_base_stage1"]
    rebuilt = points["slicing/bert_base/ensemble/k3/poisson"]
    assert [s["stage"] for s in rebuilt["server"]["stages"]] == [0, 1, 2]  # rebuilt with K=3
    for point in (ensemble, rebuilt):
        for stage in point["server"]["stages"]:
            assert stage["executions"] > 0 and sum(stage["batch_histogram"].values()) == stage["executions"]
    reorch = points["variants/bert_base/reorch/poisson"]["server"]
    assert reorch["reorch"]["requests"].get("success", 0) > 0
    # the reorchestrator's counters reach the point: tiny stages are too cheap for the per-stage
    # overhead, so its cost model runs each batch as one fused chain (counted as "fuse")
    operations = reorch["reorch"]["operations"]
    assert operations.get("new", 0) + operations.get("fuse", 0) > 0, operations
    assert len(reorch["stages"]) == 2
    # every reorch request's record times its stages, so the latency attribution adds up
    run = report_lib.load_run(run_dir)
    reorch_point = next(p for p in run.points if p.point["point_id"] == "variants/bert_base/reorch/poisson")
    attribution = attribute(reorch_point)
    assert any(part.name == "stage 0 compute" for part in attribution.parts), attribution.notes
    assert attribution.adds_up, (attribution.coverage, attribution.notes)
    manifest = json.loads((run_dir / "repository" / "manifest.json").read_text())
    assert manifest["models"]["bert_base"]["build"]["stages"] == 3
