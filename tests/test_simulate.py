"""The discrete-event simulator against closed forms (M/D/1, a known batch formation) and its run replay."""

from __future__ import annotations

import json

import pytest

from loadtest.rundir import append_point, start_run_files, write_json
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import BadParameterError
from tuning.batcher import BatcherSettings, DynamicBatcher, batch_formation
from tuning.replay import SIMULATION_FILE, calibrated_settings, replay_run
from tuning.simulate import ModelProfile, SimSettings, VariantConfig, Workload, simulate

NO_OVERHEAD = SimSettings(launch_overhead_ms=0.0, request_overhead_ms=0.0)


def manifest_entry(tables: list[dict[int, float]], max_batch: int = 8, sequence: dict | None = None) -> dict:
    """A manifest entry holding only what the simulator reads (stage tables, batching, sequence range)."""
    return {"max_batch_size": max_batch, "inputs": [], "outputs": [], "sequence": sequence,
            "build": {"max_queue_delay_us": 0},
            "stages": [{"index": i, "onnx": f"m_stage{i}/1/model.onnx", "inputs": [], "outputs": [],
                        "favoured_batch_size": max_batch, "cost_share": 1 / len(tables),
                        "latency_ms": {str(b): ms for b, ms in table.items()}} for i, table in enumerate(tables)]}


def test_simulate_whole_matches_md1_mean_wait_when_batch_size_is_one():
    service_ms, rate_rps = 2.0, 250.0  # rho = 0.5
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 0.5}, {1: 1.5}], max_batch=1))
    workload = Workload(ArrivalSpec.parse(f"poisson:rate_rps={rate_rps}"), duration_s=400.0, warmup_s=10.0, seed=7)
    result = simulate(profile, VariantConfig("whole", BatcherSettings(1, 0)), workload, NO_OVERHEAD)
    rho = rate_rps * service_ms / 1000.0
    expected_ms = service_ms + rho * service_ms / (2 * (1 - rho))  # Pollaczek-Khinchine, deterministic service
    assert result.summary.avg_ms == pytest.approx(expected_ms, rel=0.03)
    assert result.stable


def test_batcher_forms_two_batches_of_four_when_eight_arrive_at_once():
    batches = batch_formation([0] * 8, BatcherSettings(max_batch_size=4, max_queue_delay_us=1000), service_us=500)
    assert [len(b) for b in batches] == [4, 4]


def test_batcher_waits_for_the_queue_delay_then_sends_what_it_has():
    batcher = DynamicBatcher(BatcherSettings(max_batch_size=8, max_queue_delay_us=1000))
    for t in (0, 100, 200):
        batcher.add(t, t)
    assert batcher.take(999) == []
    assert batcher.take(1000) == [0, 100, 200]


def test_batcher_sends_the_largest_preferred_size_at_once():
    batcher = DynamicBatcher(BatcherSettings(max_batch_size=8, max_queue_delay_us=10**6, preferred_batch_sizes=(2, 4)))
    for i in range(5):
        batcher.add(i, 0)
    assert batcher.take(0) == [0, 1, 2, 3]
    assert batcher.take(0) == []  # one left: no preferred size fits, and the delay has not passed


def test_simulate_closed_loop_keeps_batches_of_four_when_eight_users_share_max_batch_four():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.0, 4: 2.0, 8: 4.0}]))
    workload = Workload(ArrivalSpec.parse("closed:users=8"), duration_s=2.0, warmup_s=0.0)
    result = simulate(profile, VariantConfig("whole", BatcherSettings(4, 500)), workload, NO_OVERHEAD)
    assert set(result.stage_batches[0]["batch_histogram"]) == {"4"}


@pytest.mark.parametrize("policy", ["pipeline", "load", "operator", "input", "dva"])
def test_simulate_reorch_answers_every_request_when_the_load_is_sustainable(policy):
    tables = [{1: 1.0, 2: 1.4, 4: 2.2, 8: 3.8}] * 3
    profile = ModelProfile.from_manifest_entry("m", manifest_entry(tables, sequence={"max_length": 64, "min_length": 1}))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=300"), LengthSpec.parse("uniform:min_length=4,max_length=64"),
                        duration_s=5.0, warmup_s=1.0)
    result = simulate(profile, VariantConfig("reorch", BatcherSettings(8, 200), policy), workload)
    assert result.stable
    assert result.summary.errors == 0
    assert len(result.stage_batches) == 3


def test_simulate_ensemble_is_slower_than_whole_at_low_load_when_every_stage_pays_a_launch():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.0, 8: 4.0}] * 4))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=20"), duration_s=10.0, warmup_s=1.0)
    settings = SimSettings(launch_overhead_ms=0.5)
    whole = simulate(profile, VariantConfig("whole", BatcherSettings(8, 0)), workload, settings)
    ensemble = simulate(profile, VariantConfig("ensemble", BatcherSettings(8, 0)), workload, settings)
    assert ensemble.summary.p50_ms == pytest.approx(whole.summary.p50_ms + 3 * 0.5, abs=0.2)


def test_simulate_refuses_a_max_batch_size_above_the_built_tables():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.0, 8: 4.0}]))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=20"), duration_s=2.0, warmup_s=0.0)
    with pytest.raises(BadParameterError, match="max_batch_size=16 exceeds"):
        simulate(profile, VariantConfig("whole", BatcherSettings(16, 0)), workload)


def test_simulate_scales_latency_with_the_padded_length_relative_to_the_profiled_one():
    entry = manifest_entry([{1: 4.0}], max_batch=1, sequence={"max_length": 64, "min_length": 1})
    entry["build"]["profile_seq_len"] = 32
    profile = ModelProfile.from_manifest_entry("m", entry)
    workload = Workload(ArrivalSpec.parse("constant:rate_rps=10"), LengthSpec.parse("fixed:length=16"),
                        duration_s=3.0, warmup_s=0.0)
    result = simulate(profile, VariantConfig("whole", BatcherSettings(1, 0)), workload, NO_OVERHEAD)
    assert result.summary.p50_ms == pytest.approx(2.0, abs=0.01)


def test_replay_run_writes_simulation_json_with_the_error_of_each_point(tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "manifest.json").write_text(json.dumps({"models": {"m": manifest_entry([{1: 1.0, 8: 3.0}] * 2)}}))
    run = tmp_path / "run"
    run.mkdir()
    start_run_files(run)
    write_json(run / "environment.json", {"repository": str(repository)})
    point = {"point_id": "p0", "model": "m", "variant": "whole", "arrival": {"kind": "poisson", "rate_rps": 50.0},
             "lengths": None, "batching": {"max_queue_delay_us": 0}, "slicing": {}, "reorch": {},
             "duration_s": 5.0, "warmup_s": 1.0, "slo_ms": 50.0, "seed": 0}
    measured = {"p50_ms": 2.5, "avg_ms": 2.6, "p99_ms": 4.0, "throughput_rps": 50.0}
    append_point(run, {"index": 0, "status": "ok", "point": point, "stable": True, "client": measured})
    append_point(run, {"index": 1, "status": "failed", "point": {**point, "point_id": "p1"}, "stable": False})
    document = replay_run(run)
    written = json.loads((run / SIMULATION_FILE).read_text())
    assert written["summary"] == document["summary"]
    first, second = written["points"]
    simulated_p50 = first["simulated"]["p50_ms"]
    assert first["error"]["p50"] == pytest.approx((simulated_p50 - 2.5) / 2.5, abs=1e-3)
    assert "skipped" in second
    assert written["summary"]["stable_points"] == 1


def test_profile_drops_noise_when_a_smaller_batch_was_measured_slower_than_a_larger_one():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 10.2, 2: 3.3, 4: 17.2, 8: 48.3}]))
    assert profile.stage_tables_ms[0] == {1: 3.3, 2: 3.3, 4: 17.2, 8: 48.3}


def test_replay_run_calibration_fits_the_overheads_when_the_run_is_slower_than_the_tables(tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "manifest.json").write_text(json.dumps({"models": {"m": manifest_entry([{1: 1.0, 8: 3.0}])}}))
    run = tmp_path / "run"
    run.mkdir()
    start_run_files(run)
    write_json(run / "environment.json", {"repository": str(repository)})
    point = {"point_id": "p0", "model": "m", "variant": "whole", "arrival": {"kind": "constant", "rate_rps": 20.0},
             "lengths": None, "batching": {"max_queue_delay_us": 0}, "slicing": {}, "reorch": {},
             "duration_s": 3.0, "warmup_s": 0.5, "slo_ms": 50.0, "seed": 0}
    # 1 ms of compute + 2 ms launch + 4 ms outside the device
    measured = {"p50_ms": 7.0, "avg_ms": 7.0, "p99_ms": 7.0, "throughput_rps": 20.0}
    append_point(run, {"index": 0, "status": "ok", "point": point, "stable": True, "client": measured})
    document = replay_run(run, NO_OVERHEAD, calibrate=True)
    fitted = document["calibration"]
    assert fitted["in_sample"] is True
    assert fitted["summary"]["median_abs_error_p50"] < 0.05 < document["summary"]["median_abs_error_p50"]
    whole = fitted["settings"]["variant_overrides"]["whole"]
    assert calibrated_settings(run).for_variant("whole").request_overhead_ms == whole["request_overhead_ms"]
    assert calibrated_settings(run).for_variant("reorch").request_overhead_ms == 0.0  # no reorch point: unfitted
