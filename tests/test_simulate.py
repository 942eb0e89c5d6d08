"""The discrete-event simulator against closed forms (M/D/1, a known batch formation) and its run replay."""

from __future__ import annotations

import csv
import json

import pytest

from loadtest.rundir import append_point, start_run_files, write_json
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import BadParameterError, ConfigValidationError
from tuning.batcher import BatcherSettings, DynamicBatcher, batch_formation
from tuning.calibrate import client_slowdown, read_calibration, rescaled, slowed
from tuning.replay import SIMULATION_FILE, point_workload, replay_run, run_manifest
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


def test_simulate_forms_batches_of_three_and_four_when_a_train_arrives_every_ms_and_a_batch_takes_3_45_ms():
    # a busy server takes whatever arrived during the last batch: 3 or 4 requests; on average 3.45
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 3.45, 8: 3.45}]))
    workload = Workload(ArrivalSpec.parse("constant:rate_rps=1000"), duration_s=3.0, warmup_s=0.0)
    result = simulate(profile, VariantConfig("whole", BatcherSettings(8, 0)), workload, NO_OVERHEAD)
    histogram = result.stage_batches[0]["batch_histogram"]
    assert set(histogram) <= {"1", "3", "4"} and histogram.get("1", 0) <= 2  # batches of one only start the train
    assert result.stage_batches[0]["avg_batch_size"] == pytest.approx(3.45, abs=0.02)


@pytest.mark.parametrize("policy", ["pipeline", "load", "operator", "input", "dva"])
def test_simulate_reorch_answers_every_request_when_the_load_is_sustainable(policy):
    tables = [{1: 1.0, 2: 1.4, 4: 2.2, 8: 3.8}] * 3
    profile = ModelProfile.from_manifest_entry("m", manifest_entry(tables, sequence={"max_length": 64, "min_length": 1}))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=300"), LengthSpec.parse("uniform:min_length=4,max_length=64"),
                        duration_s=5.0, warmup_s=1.0)
    result = simulate(profile, VariantConfig("reorch", BatcherSettings(8, 200), policy), workload)
    assert result.stable
    assert result.summary.errors == 0
    assert [s["stage"] for s in result.stage_batches] == [0, 1, 2, "front"]


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


def _run_with_points(tmp_path, tables, points, capacity_rps=None):
    """A run folder whose repository manifest holds model ``m`` with ``tables``, and these point records."""
    repository = tmp_path / "repo"
    repository.mkdir(exist_ok=True)
    (repository / "manifest.json").write_text(json.dumps({"models": {"m": manifest_entry(tables)}}))
    run = tmp_path / "run"
    run.mkdir()
    start_run_files(run)
    write_json(run / "environment.json", {"repository": str(repository)})
    if capacity_rps:
        write_json(run / "capacity.json", {"models": {"m": {"whole": {"sustained_rps": capacity_rps}}}})
    for index, record in enumerate(points):
        append_point(run, {"index": index, "status": "ok", **record})
    return run


def _point(variant, rate_rps, measured_p50_ms, stages, client_avg_ms, point_id=None):
    point = {"point_id": point_id or f"{variant}@{rate_rps}", "model": "m", "variant": variant,
             "arrival": {"kind": "constant", "rate_rps": rate_rps}, "lengths": None,
             "batching": {"max_queue_delay_us": 0}, "slicing": {}, "reorch": {}, "duration_s": 3.0, "warmup_s": 0.5,
             "slo_ms": 50.0, "seed": 0}
    client = {"p50_ms": measured_p50_ms, "avg_ms": client_avg_ms, "p99_ms": measured_p50_ms,
              "throughput_rps": rate_rps}
    return {"point": point, "stable": True, "client": client, "server": {"stages": stages}}


def test_calibration_fits_the_launch_cost_and_outside_time_when_the_server_adds_them(tmp_path):
    # the table says 1 ms at batch 1; the server measured 3 ms of compute per launch and the client 7 ms
    stage = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [_point("whole", 20.0, 7.0, [stage], 7.0)])
    document = replay_run(run, NO_OVERHEAD, calibrate=True)
    assert document["costs"]["in_sample"] is True
    fitted = read_calibration(run).for_variant("whole", "m")
    assert fitted.launch_overhead_ms == pytest.approx(2.0, abs=0.01)
    assert fitted.request_overhead_ms == pytest.approx(4.0, abs=0.01)
    assert document["summary"]["per_variant"]["whole"]["stable_median_abs_error_p50"] < 0.02
    assert read_calibration(run).for_variant("reorch", "m").launch_overhead_ms == 0.0  # no reorch point: unfitted


@pytest.mark.parametrize("light_batch", [1.0, 2.0])
def test_calibration_fits_the_lightest_points_and_ignores_heavy_ones_whose_launches_overlap(tmp_path, light_batch):
    # light_batch 2.0: a fast model batches 2 rows already at its lightest point; its own launch cost is fitted
    # from that point instead of being left to the defaults (or to other models' costs)
    light = {"avg_batch_size": light_batch, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    heavy = {"avg_batch_size": 6.0, "avg_queue_us": 50000.0, "avg_compute_us": 90000.0}
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [_point("whole", 20.0, 7.0, [light], 7.0),
                                                          _point("whole", 300.0, 200.0, [heavy], 200.0)])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    # 20 req/s at constant spacing with no queue delay: the simulator forms batches of 1 (table 1 ms)
    assert read_calibration(run).for_variant("whole", "m").launch_overhead_ms == pytest.approx(2.0, abs=0.01)


def test_read_calibration_refuses_a_folder_without_calibration_json(tmp_path):
    with pytest.raises(ConfigValidationError, match="--calibrate"):
        read_calibration(tmp_path)


def test_rescaled_scales_device_costs_by_the_ratio_of_measured_capacities():
    settings = SimSettings(variant_overrides={"whole": {"launch_overhead_ms": 2.0, "request_overhead_ms": 1.0}},
                           reference_capacity_rps={"m": 300.0})
    slower, factors = rescaled(settings, {"m": 150.0})
    assert factors == {"m": 2.0}
    whole = slower.for_variant("whole", "m")
    assert (whole.launch_overhead_ms, whole.compute_scale, whole.request_overhead_ms) == (4.0, 2.0, 1.0)
    assert rescaled(settings, {"other": 10.0}) == (settings, {})


def test_replay_run_compares_batch_sizes_per_stage_when_the_run_has_server_statistics(tmp_path):
    stage = {"avg_batch_size": 2.0, "avg_queue_us": 0.0, "avg_compute_us": 1000.0}
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [_point("whole", 20.0, 2.0, [stage], 2.0)])
    row = replay_run(run, NO_OVERHEAD)["points"][0]
    assert row["stages"][0]["measured_batch"] == 2.0
    assert row["stages"][0]["simulated_batch"] == 1.0  # 20 req/s, 1 ms each: every request alone
    assert row["error"]["batch"] == pytest.approx(0.5)


def test_calibration_fits_the_outside_time_from_the_client_when_a_point_has_no_stage_times(tmp_path):
    point = _point("whole", 20.0, 7.0, [], 7.0)
    del point["server"]
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [point])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    fitted = read_calibration(run).for_variant("whole", "m")
    assert fitted.launch_overhead_ms == 0.0  # nothing to fit it from: the defaults given
    assert fitted.request_overhead_ms == pytest.approx(6.0, abs=0.01)  # 7 ms measured, 1 ms simulated


@pytest.mark.parametrize("recorded", ["relative", "absolute", "moved"])
def test_run_manifest_finds_the_repository_from_a_relative_run_path(tmp_path, monkeypatch, recorded):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "results" / "run"
    (run / "repository").mkdir(parents=True)
    (run / "repository" / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": {}}))
    path = {"relative": "results/run/repository", "absolute": str(run / "repository"),
            "moved": "elsewhere/repository"}[recorded]
    write_json(run / "environment.json", {"repository": path})
    assert run_manifest(run.relative_to(tmp_path))["models"] == {}


def test_simulate_reorch_runs_a_steady_train_inline_and_blocks_the_front_like_the_whole_model():
    # two stages of 1.2 + 2.25 ms: the engine's own decision (StageScheduler.inline_decision) runs every
    # steady batch inline, inside the front model's one instance, so the front forms the whole model's
    # batches (3 or 4 of a train arriving every ms; 3.45 on average) and no stage launch happens
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.2, 8: 1.2}, {1: 2.25, 8: 2.25}]))
    workload = Workload(ArrivalSpec.parse("constant:rate_rps=1000"), duration_s=3.0, warmup_s=0.0)
    settings = SimSettings(launch_overhead_ms=0.0, request_overhead_ms=0.0, inline_overhead_ms=0.0)
    # fuse_margin 0: these tables sit inside the fuse decision's band (0.87 of the threshold), where the
    # engine would start fused; the single threshold leaves them staged, so "whole" decides per batch
    config = VariantConfig("reorch", BatcherSettings(8, 0), "dva", knobs=(("fuse_margin", 0.0),))
    result = simulate(profile, config, workload, settings)
    stage0, stage1, front = result.stage_batches
    assert set(result.operations) == {"whole"}
    assert front["inline_share"] == 1.0
    assert front["avg_batch_size"] == pytest.approx(3.45, abs=0.02)
    assert (stage0["launches"], stage1["launches"]) == (0, 0)
    assert stage0["unlaunched_ms"] == pytest.approx(front["launches"] * 3.45, rel=0.01)  # inline time, booked without a launch


def test_simulate_reorch_hands_bursts_to_the_scheduler_after_the_handoff_time():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.0, 8: 3.0}] * 2))
    workload = Workload(ArrivalSpec.parse("bursty:rate_rps=600,off_rate_rps=20,on_s=0.5,off_s=1"), duration_s=4.0, warmup_s=0.5)
    settings = SimSettings(handoff_ms=0.5)
    result = simulate(profile, VariantConfig("reorch", BatcherSettings(8, 100), "pipeline"), workload, settings)
    front = result.stage_batches[-1]
    assert front["inline_share"] < 1.0 and result.operations.get("new", 0) > 0
    assert result.summary.errors == 0


def _reorch_point(rate_rps, p50_ms, stages, front_compute_us, front_batch=1.0):
    record = _point("reorch", rate_rps, p50_ms, stages, p50_ms)
    record["server"].update({"reorch": {"model": "m_reorch"}, "models": {"m_reorch": {
        "avg_batch_size": front_batch, "avg_queue_us": 0.0, "avg_compute_us": front_compute_us}}})
    return record


def test_calibration_takes_the_inline_cost_from_the_whole_model_and_ignores_inline_time_booked_on_stage_0(tmp_path):
    # the whole model: 1 ms of table, 3 ms measured -> 2 ms per launch. The reorchestrator ran every
    # batch inline: its stage 0 books that time without a launch (40 ms "per launch"), which must not
    # become a launch cost; the inline run costs what a whole-model launch does
    whole = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    inline_stage0 = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 40000.0}
    idle = {"avg_batch_size": None, "avg_queue_us": None, "avg_compute_us": None}
    run = _run_with_points(tmp_path, [{1: 0.5, 8: 1.5}] * 2, [
        _point("whole", 20.0, 7.0, [whole], 7.0), _reorch_point(20.0, 7.0, [inline_stage0, idle], 3000.0)])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    fitted = read_calibration(run).for_variant("reorch", "m")
    assert fitted.inline_overhead_ms == pytest.approx(2.0, abs=0.01)
    assert fitted.launch_overhead_ms < 5.0


def test_simulate_adds_the_inline_answer_path_cost_to_requests_the_reorchestrator_answered_inline():
    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 0.4, 8: 0.4}, {1: 0.6, 8: 0.6}]))
    workload = Workload(ArrivalSpec.parse("constant:rate_rps=20"), duration_s=3.0, warmup_s=0.5)
    settings = SimSettings(launch_overhead_ms=0.0, inline_overhead_ms=0.0, request_overhead_ms=9.0,
                           inline_request_overhead_ms=2.0)
    result = simulate(profile, VariantConfig("reorch", BatcherSettings(8, 0), "dva"), workload, settings)
    assert result.stage_batches[-1]["inline_share"] == 1.0
    assert result.summary.p50_ms == pytest.approx(1.0 + 2.0, abs=0.01)  # the chain alone, then the inline path


def _reorch_run_with_records(tmp_path, p50_ms, front_compute_us, requests):
    """A run of one light reorch point (front queue 1 ms) and its per-request rows: (server record, latency µs)."""
    stage = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 2000.0}
    record = _reorch_point(20.0, p50_ms, [stage, stage], front_compute_us)
    record["server"]["models"]["m_reorch"]["avg_queue_us"] = 1000.0
    run = _run_with_points(tmp_path, [{1: 0.5, 8: 1.5}] * 2, [record])
    with open(run / "requests.csv", "a", newline="") as handle:
        writer = csv.writer(handle)
        for server, latency_us in requests:
            writer.writerow([0, 0, latency_us, 1, "", 1, 0, "", "", json.dumps(server)])
    return run


INLINE_RECORD = {"arrival_us": 0, "stage0_entry_us": 0, "exit_us": 2000, "ops": [{"op": "whole", "stage": 0}]}


def test_calibration_fits_the_outside_time_of_each_answer_path_from_the_reorchestrator_records(tmp_path):
    # records: inline answers spent 3 ms outside their arrival-to-exit time, the others 8 ms; the front
    # model queued each for 1 ms (modelled by the simulator, so not outside)
    handed = {"arrival_us": 0, "stage0_entry_us": 50, "exit_us": 4000, "ops": [{"op": "new", "stage": 0}]}
    run = _reorch_run_with_records(tmp_path, 7.0, 2000.0, [(INLINE_RECORD, 5000), (handed, 12000)])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    fitted = read_calibration(run).for_variant("reorch", "m")
    assert fitted.inline_request_overhead_ms == pytest.approx(3.0 - 1.0, abs=0.01)
    assert fitted.request_overhead_ms == pytest.approx(8.0 - 1.0, abs=0.01)


@pytest.mark.parametrize(("percent", "cores", "factor"), [(50.0, 2, 4 / 3), (None, 2, 1.0), (50.0, 0, 1.0),
                                                          (300.0, 2, 2.0)])
def test_client_slowdown_is_the_share_of_the_cores_the_server_kept(percent, cores, factor):
    record = {"loadgen": {"cpu_percent": percent}} if percent is not None else {}
    assert client_slowdown(record, cores) == pytest.approx(factor)


def test_calibration_divides_out_the_load_generators_share_of_the_cores(tmp_path):
    # the sender took a whole core of 2: the server's 3 ms launch ran at half speed, so it costs 1.5 ms alone
    stage = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    point = {**_point("whole", 20.0, 7.0, [stage], 7.0), "loadgen": {"cpu_percent": 100.0}}
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [point])
    write_json(run / "environment.json", {"repository": str(tmp_path / "repo"), "hardware": {"cpu_cores_logical": 2}})
    document = replay_run(run, NO_OVERHEAD, calibrate=True)
    assert read_calibration(run).for_variant("whole", "m").launch_overhead_ms == pytest.approx(0.5, abs=0.01)
    assert document["points"][0]["simulated"]["p50_ms"] == pytest.approx(7.0, abs=0.05)  # replayed at half speed too


def test_slowed_scales_every_device_cost_and_leaves_the_request_overheads():
    settings = SimSettings(launch_overhead_ms=1.0, request_overhead_ms=2.0,
                           variant_overrides={"m:whole": {"launch_overhead_ms": 3.0, "request_overhead_ms": 4.0}})
    doubled = slowed(settings, 2.0).for_variant("whole", "m")
    assert (doubled.launch_overhead_ms, doubled.compute_scale, doubled.request_overhead_ms) == (6.0, 2.0, 4.0)


def test_simulate_replays_the_load_generators_own_arrivals_and_lengths():
    # the same seed gives the simulator the schedule the sender draws (loadtest.workloads.arrival_schedule)
    from loadtest.workloads import arrival_schedule

    profile = ModelProfile.from_manifest_entry("m", manifest_entry([{1: 1.0, 8: 3.0}], sequence={
        "input": "input_ids", "axis": 1, "max_length": 64, "min_length": 1}))
    arrival, lengths = ArrivalSpec("poisson", rate_rps=50.0), LengthSpec("uniform", min_length=1, max_length=64)
    workload = Workload(arrival=arrival, lengths=lengths, duration_s=2.0, warmup_s=0.0, seed=7)
    result = simulate(profile, VariantConfig("whole", BatcherSettings(max_batch_size=8)), workload, NO_OVERHEAD)
    times, drawn = arrival_schedule(arrival, lengths, 7, 2.0, sequence=(1, 64))
    assert result.offered_rps == pytest.approx(len(times) / 2.0)
    assert len(set(drawn.tolist())) > 1  # lengths vary: the sender's lengths stream, not one fixed length


def test_replay_simulates_the_warm_up_and_then_the_points_whole_window():
    # a point's duration_s is its measured window after the warm-up; the simulator's includes the warm-up
    point = _point("whole", 25.0, 1.0, [], 1.0)["point"]
    point.update(duration_s=4.0, warmup_s=1.0)
    workload = point_workload(point)
    assert (workload.duration_s, workload.warmup_s) == (5.0, 1.0)


def test_calibration_cross_validates_each_point_with_costs_fitted_to_the_others(tmp_path):
    # five light points whose server added 2 ms per launch and 4 ms outside: every fold's fit finds the same
    # costs, so each held-out point is predicted as well as it is fitted; one point alone cannot be
    stage = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    points = [_point("whole", rate, 7.0, [stage], 7.0) for rate in (10.0, 12.0, 14.0, 16.0, 18.0)]
    document = replay_run(_run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], points), NO_OVERHEAD, calibrate=True)
    cross = document["summary"]["cross_validated"]
    assert (cross["folds"], cross["points"], cross["left_out"]) == (5, 5, 0)
    assert cross["median_abs_error_p50"] < 0.02
    (tmp_path / "one").mkdir()
    alone = replay_run(_run_with_points(tmp_path / "one", [{1: 1.0, 8: 3.0}], points[:1]), NO_OVERHEAD,
                       calibrate=True)["summary"]["cross_validated"]
    assert (alone["points"], alone["left_out"]) == (0, 1)


def test_calibration_measures_inline_answers_outside_time_against_the_front_models_whole_execute(tmp_path):
    # every answer inline: the records start inside execute (2 ms of arrival-to-exit), but Triton timed the
    # whole execute at 4 ms and the front queue at 1 ms; the client saw 6 ms: 1 ms outside, not 3
    run = _reorch_run_with_records(tmp_path, 6.0, 4000.0, [(INLINE_RECORD, 6000)] * 10)
    replay_run(run, NO_OVERHEAD, calibrate=True)
    assert read_calibration(run).for_variant("reorch", "m").inline_request_overhead_ms == pytest.approx(1.0, abs=0.01)


def test_calibration_fits_how_launches_grow_with_the_tables_from_the_light_and_the_overloaded_points(tmp_path):
    # the server's launch = 1 ms + 2 x the tables' time: 3 ms at batch 1 (table 1 ms), 7 ms at batch 8 (table
    # 3 ms); the light point alone reads 2 ms per launch at the tables' scale, which batches of 8 would then
    # take as 5 ms
    light = {"avg_batch_size": 1.0, "avg_queue_us": 0.0, "avg_compute_us": 3000.0}
    over = {**_point("whole", 4000.0, 900.0, [{"avg_batch_size": 8.0, "avg_queue_us": 5e5, "avg_compute_us": 7000.0}],
                     900.0), "stable": False, "offered_rps": 4000.0, "achieved_rps": 1100.0}
    run = _run_with_points(tmp_path, [{1: 1.0, 8: 3.0}], [_point("whole", 20.0, 3.0, [light], 3.0), over])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    fitted = read_calibration(run).for_variant("whole", "m")
    assert fitted.compute_scale == pytest.approx(2.0, abs=0.05)
    assert fitted.launch_overhead_ms == pytest.approx(1.0, abs=0.05)
    (tmp_path / "light").mkdir()
    alone = _run_with_points(tmp_path / "light", [{1: 1.0, 8: 3.0}], [_point("whole", 20.0, 3.0, [light], 3.0)])
    replay_run(alone, NO_OVERHEAD, calibrate=True)
    assert read_calibration(alone).for_variant("whole", "m").compute_scale == 1.0  # nothing to tell a slope by


def test_calibration_fits_the_reorchestrators_stage_launches_where_only_heavy_points_made_any(tmp_path):
    # pipeline runs every stage as its own launch; the only point that did was heavy (batches of 4 at 0.9x):
    # its launches are the only observation of their cost, 6 ms against 0.5 ms of table
    stage = {"avg_batch_size": 4.0, "avg_queue_us": 0.0, "avg_compute_us": 6000.0}
    record = _reorch_point(20.0, 20.0, [stage, stage], 100.0)
    record["point"]["reorch"] = {"policy": "pipeline"}
    record["load"] = {"multiple": 0.9}
    run = _run_with_points(tmp_path, [{1: 0.5, 8: 1.5}] * 2, [record])
    replay_run(run, NO_OVERHEAD, calibrate=True)
    assert read_calibration(run).for_variant("reorch", "m").launch_overhead_ms == pytest.approx(5.5, abs=0.1)
