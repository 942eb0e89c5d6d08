"""The simulated configuration search and ``stagebatch tune``'s refusals (no server)."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from loadtest.capacity import CapacityResult, Probe
from loadtest.workloads import ArrivalSpec
from stagebatch.cli import main
from core.errors import BadParameterError
from core.model_config import write_model_config
from tuning import tune as tune_module
from tuning.batcher import BatcherSettings
from tuning.confirm import mean_ci95
from tuning.search import SearchOptions, SearchSpace, bounded, check_slo, diverse, search
from tuning.simulate import ModelProfile, SimSettings, VariantConfig, Workload
from tuning.tune import TuneOptions, config_from_description

PLANTED = {1: 4.0, 2: 8.0, 4: 4.4, 8: 40.0}  # batch 4 is by far the cheapest per row


def profile_of(tables, max_batch=8) -> ModelProfile:
    entry = {"max_batch_size": max_batch, "inputs": [], "outputs": [], "sequence": None, "build": {},
             "stages": [{"index": i, "onnx": f"m_stage{i}/1/model.onnx", "inputs": [], "outputs": [],
                         "favoured_batch_size": max_batch, "latency_ms": {str(b): ms for b, ms in t.items()}}
                        for i, t in enumerate(tables)]}
    return ModelProfile.from_manifest_entry("m", entry)


def test_search_finds_the_planted_batch_size_when_one_size_is_far_cheaper():
    space = SearchSpace(variants=("whole",), max_batch_sizes=(1, 2, 4, 8), queue_delays_us=(0, 2000),
                        preferred=("none",), instance_counts=(1,))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=200.0)
    ranked, facts = search([profile_of([PLANTED])], workload, space=space,
                           options=SearchOptions(keep=4, screen_duration_s=3.0, rank_duration_s=5.0))
    assert facts["candidates"] == 7  # batch 1 never waits: (1, 0) and 3 sizes x 2 delays
    assert ranked[0].config.batcher.max_batch_size == 4
    assert ranked[0].score > 2 * facts["baseline"]["simulated_slo_rps"]


def test_check_slo_refuses_an_slo_below_the_batch1_latency():
    profile = profile_of([{1: 30.0, 8: 90.0}, {1: 30.0, 8: 90.0}])
    with pytest.raises(BadParameterError, match=r"--slo-ms 50 is below m's batch-1 latency \(60\.\d+ ms"):
        check_slo(profile, 50.0, SimSettings())
    assert check_slo(profile, 100.0, SimSettings()) == pytest.approx(60.6)


def test_tune_cli_refuses_an_slo_below_the_batch1_latency_with_a_clear_message(tmp_path, capsys):
    repository = tmp_path / "repo"
    repository.mkdir()
    entry = {"size": "small", "max_batch_size": 8, "inputs": [], "outputs": [], "sequence": None, "build": {},
             "variants": {"whole": "m"},
             "stages": [{"index": 0, "onnx": "m_stage0/1/model.onnx", "inputs": [], "outputs": [],
                         "favoured_batch_size": 8, "latency_ms": {"1": 40.0, "8": 100.0}}]}
    (repository / "manifest.json").write_text(json.dumps({"models": {"m": entry}}))
    code = main(["tune", "--model", "m", "--slo-ms", "10", "--repository", str(repository),
                 "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "--slo-ms 10 is below m's batch-1 latency (40.6" in err
    assert "Raise --slo-ms" in err


def test_search_space_skips_queue_delays_for_batch_one_and_instances_for_reorch():
    space = SearchSpace(variants=("whole", "reorch"), max_batch_sizes=(1, 4), queue_delays_us=(0, 500),
                        preferred=("none",), instance_counts=(1, 2), policies=("dva",))
    configs = space.candidates(profile_of([PLANTED]))
    assert all(c.batcher.max_queue_delay_us == 0 for c in configs if c.batcher.max_batch_size == 1)
    assert all(c.batcher.instance_count == 1 for c in configs if c.variant == "reorch")
    assert len(configs) == 2 * 3 + 3  # whole: 3 batcher settings x 2 instance counts; reorch: 3


def test_config_from_description_round_trips_a_single_threaded_reorch_configuration():
    config = VariantConfig("reorch", BatcherSettings(8, 500, (4, 8), 1, 1), "load", (("stretch_max_wait_us", 5000),))
    assert config_from_description(config.describe()) == config


def test_mean_ci95_uses_student_t_for_few_repeats():
    mean, half = mean_ci95([10.0, 12.0, 14.0])
    assert mean == pytest.approx(12.0)
    assert half == pytest.approx(4.303 * 2.0 / 3 ** 0.5, rel=1e-3)
    assert mean_ci95([5.0]) == (5.0, None)


def test_diverse_takes_one_per_label_first_then_the_next_best():
    rows = [{"k": 1, "label": "reorch:dva"}, {"k": 2, "label": "reorch:dva"}, {"k": 3, "label": "whole"},
            {"k": 4, "label": "whole"}]
    assert [r["k"] for r in diverse(rows, 3, label=lambda r: r["label"])] == [1, 2, 3]
    assert [r["k"] for r in diverse(rows, 2, label=lambda r: r["label"])] == [1, 3]


class FakeConfirmer:
    """Stands in for the server: a configuration's rate within the SLO is 10 x its max batch size."""

    calls: ClassVar[list] = []
    growths: ClassVar[list] = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def rate_within_slo(self, config, start_rps, seed, growth=1.5):
        FakeConfirmer.calls.append((config.batcher.max_batch_size, seed))
        FakeConfirmer.growths.append((config.batcher.max_batch_size, seed, growth))
        rate = 10.0 * config.batcher.max_batch_size + seed
        return CapacityResult(rate, rate, 100.0, 99, "server", [Probe(rate, True, rate, 5.0)])


def _built_model_m(tmp_path):
    """A repository holding the whole model ``m`` (max batch 8, one stage table), loaded for tune."""
    repository = tmp_path / "repo"
    write_model_config(repository / "m", {
        "name": "m", "backend": "python", "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 100}})
    (repository / "m" / "1").mkdir()
    entry = {"max_batch_size": 8, "inputs": [], "outputs": [], "sequence": None, "build": {"max_queue_delay_us": 100},
             "variants": {"whole": "m"},
             "stages": [{"index": 0, "onnx": "m_stage0/1/model.onnx", "inputs": [], "outputs": [],
                         "favoured_batch_size": 8, "latency_ms": {"1": 2.0, "2": 2.5, "4": 3.0, "8": 4.0}}]}
    (repository / "manifest.json").write_text(json.dumps({"target": "embedded", "models": {"m": entry}}))
    return tune_module.load_built(repository, "m")


def test_tune_measures_in_rounds_then_only_the_leader_writes_ready_repositories_and_resumes_without_measuring_again(tmp_path, monkeypatch):
    built = _built_model_m(tmp_path)
    monkeypatch.setattr(tune_module, "Confirmer", FakeConfirmer)
    FakeConfirmer.calls = []
    options = TuneOptions(model="m", slo_ms=100.0, workload=Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0),
                          out=tmp_path / "out", top=1, confirm=2, repeats=2, extra_rounds=2,
                          space=SearchSpace(variants=("whole",), max_batch_sizes=(2, 4), queue_delays_us=(0,),
                                            preferred=("none",), instance_counts=(1,), intra_op_threads=(None,)))
    state = tune_module.tune([built], options, say=lambda _: None)
    # default + 2 configurations in 2 full rounds, then 2 rounds of the leader (batch 4) and the default
    assert sorted(FakeConfirmer.calls) == sorted([(8, 0), (2, 0), (4, 0), (8, 1), (2, 1), (4, 1),
                                                  (8, 2), (4, 2), (8, 3), (4, 3)])
    best, loser = state["results"][1:]
    assert best["key"] == "whole_mbs4_d0_i1" and best["measured_slo_rps"] == 41.5 and best["ci95_rps"] is not None
    assert (best["repeats"], loser["repeats"]) == (4, 2)
    assert best["vs_default"] == pytest.approx(sum((40 + r) / (80 + r) for r in range(4)) / 4, abs=1e-3)  # paired
    ready = tmp_path / "out" / "configs" / "1_whole_mbs4_d0_i1"
    assert "max_batch_size: 4" in (ready / "m" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in (tmp_path / "repo" / "m" / "config.pbtxt").read_text()  # the source is untouched
    assert json.loads((ready / "tuned.json").read_text())["configuration"]["batching"]["max_batch_size"] == 4
    FakeConfirmer.calls = []
    tune_module.tune([built], options, resume=True, say=lambda _: None)
    assert FakeConfirmer.calls == []


def test_tune_measures_only_the_better_half_after_the_halving_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "Confirmer", FakeConfirmer)
    FakeConfirmer.calls = []
    options = TuneOptions(model="m", slo_ms=100.0, workload=Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0),
                          out=tmp_path / "out", top=1, confirm=2, repeats=3, extra_rounds=0, halving_after=2,
                          space=SearchSpace(variants=("whole",), max_batch_sizes=(2, 4), queue_delays_us=(0,),
                                            preferred=("none",), instance_counts=(1,), intra_op_threads=(None,)))
    state = tune_module.tune([_built_model_m(tmp_path)], options, say=lambda _: None)
    assert [call for call in FakeConfirmer.calls if call[1] == 2] == [(8, 2), (4, 2)]  # batch 2 is behind: left out
    assert [r["repeats"] for r in state["results"]] == [3, 3, 2]


class NoisyConfirmer(FakeConfirmer):
    """Batch 4 measures far above the default in one round and at it in the other (mean 1.5x, a wide
    interval); batch 2 measures 0.95x every round (a narrow interval)."""

    def rate_within_slo(self, config, start_rps, seed, growth=1.5):
        FakeConfirmer.calls.append((config.batcher.max_batch_size, seed))
        rate = {8: 40.0, 2: 38.0, 4: (80.0 if seed % 2 == 0 else 40.0)}[config.batcher.max_batch_size]
        return CapacityResult(rate, rate, 100.0, 99, "server", [Probe(rate, True, rate, 5.0)])


def test_tune_keeps_measuring_the_configuration_with_the_highest_mean_ratio_when_its_interval_is_wide(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "Confirmer", NoisyConfirmer)
    FakeConfirmer.calls = []
    options = TuneOptions(model="m", slo_ms=100.0, workload=Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0),
                          out=tmp_path / "out", top=1, confirm=2, repeats=2, extra_rounds=2, halving_after=2,
                          space=SearchSpace(variants=("whole",), max_batch_sizes=(2, 4), queue_delays_us=(0,),
                                            preferred=("none",), instance_counts=(1,), intra_op_threads=(None,)))
    tune_module.tune([_built_model_m(tmp_path)], options, say=lambda _: None)
    # after two rounds batch 4 reads 1.5x (interval 1.0..2.0 wide), batch 2 0.95x with no spread: the
    # extra rounds go to batch 4, whose interval more rounds can narrow
    assert sorted(call for call in FakeConfirmer.calls if call[1] >= 2) == [(4, 2), (4, 3), (8, 2), (8, 3)]


def test_search_ranks_the_best_of_every_variant_when_one_variant_fills_the_kept_places():
    space = SearchSpace(variants=("whole", "ensemble"), max_batch_sizes=(2, 4, 8), queue_delays_us=(0, 2000),
                        preferred=("none",), instance_counts=(1,))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=200.0)
    settings = SimSettings(variant_overrides={"whole": {"launch_overhead_ms": 20.0}})  # whole pays far more
    ranked, _ = search([profile_of([PLANTED, PLANTED])], workload, space=space, settings=settings,
                       options=SearchOptions(keep=2, keep_per_label=1, screen_duration_s=2.0, rank_duration_s=3.0))
    assert [c.config.variant for c in ranked] == ["ensemble", "ensemble", "whole"]


def test_start_rate_follows_the_machine_speed_the_default_measured_when_a_configuration_is_new():
    state = {"search": {"baseline": {"simulated_slo_rps": 150.0}},
             "measurements": [{"key": "baseline", "repeat": 0, "slo_rps": 50.0}]}
    ranked = [{"key": "k3_ensemble", "simulated_slo_rps": 270.0}]
    assert tune_module._start_rate(state, "k3_ensemble", ranked) == pytest.approx(0.8 * 270.0 * 50.0 / 150.0)
    # measured before: just below it, by a factor of its own per configuration and round
    starts = {tune_module._start_rate(state, "baseline", ranked, repeat) for repeat in range(1, 6)}
    assert all(47.5 * 0.96 <= start <= 47.5 * 1.04 for start in starts) and len(starts) == 5
    assert tune_module._start_rate(state, "baseline", ranked, 3) == tune_module._start_rate(state, "baseline", ranked, 3)
    state["search"]["screen_rps"] = 180.0
    assert tune_module._start_rate(state, "unranked", ranked) == pytest.approx(0.8 * 180.0 * 50.0 / 150.0)


def test_start_rate_starts_below_the_simulated_rate_when_the_default_has_not_passed_yet():
    state = {"search": {"baseline": {"simulated_slo_rps": 250.0}}, "measurements": []}
    assert tune_module._start_rate(state, "baseline", []) == pytest.approx(0.6 * 250.0)
    state["measurements"] = [{"key": "baseline", "repeat": 0, "slo_rps": 0.0}]  # no probe passed
    ranked = [{"key": "k4_ensemble", "simulated_slo_rps": 300.0}]
    assert tune_module._start_rate(state, "k4_ensemble", ranked) == pytest.approx(0.6 * 300.0)


def test_results_rank_the_configuration_most_surely_above_the_default_first_when_one_round_was_lucky():
    measurements = [{"key": "baseline", "repeat": r, "slo_rps": 40.0} for r in range(3)]
    measurements += [{"key": "steady", "repeat": r, "slo_rps": 50.0} for r in range(3)]
    measurements += [{"key": "lucky", "repeat": r, "slo_rps": v} for r, v in enumerate((40.0, 40.0, 120.0))]
    state = {"search": {"baseline": {}, "ranked": [{"key": "steady"}, {"key": "lucky"}]}, "measurements": measurements}
    build = tune_module.Built(None, {}, profile_of([PLANTED]))
    config = VariantConfig("whole", BatcherSettings(8, 100))
    rows = tune_module._results(state, [("baseline", build, config), ("lucky", build, config), ("steady", build, config)])
    assert [r["key"] for r in rows] == ["baseline", "steady", "lucky"]  # lucky's mean ratio is higher (1.67 > 1.25)


def test_results_rank_a_configuration_measured_in_one_round_after_those_with_an_interval():
    measurements = [{"key": "baseline", "repeat": r, "slo_rps": 100.0} for r in range(2)]
    measurements += [{"key": "twice", "repeat": r, "slo_rps": v} for r, v in enumerate((110.0, 150.0))]
    measurements += [{"key": "once", "repeat": 0, "slo_rps": 90.0}]
    state = {"search": {"baseline": {}, "ranked": [{"key": "once"}, {"key": "twice"}]}, "measurements": measurements}
    build = tune_module.Built(None, {}, profile_of([PLANTED]))
    config = VariantConfig("whole", BatcherSettings(8, 100))
    rows = tune_module._results(state, [("baseline", build, config), ("once", build, config), ("twice", build, config)])
    assert [r["key"] for r in rows] == ["baseline", "twice", "once"]  # twice: 1.3x +- 2.5 (low end < 0.9)


def test_bounded_shortens_the_window_when_a_fast_model_would_be_simulated_for_too_many_requests():
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=2000"), duration_s=10.0, warmup_s=1.0)
    short = bounded(workload, SearchOptions(max_requests=3000))
    assert (short.duration_s, short.warmup_s) == pytest.approx((1.5, 0.15))
    assert bounded(workload.with_rate(100.0), SearchOptions(max_requests=3000)).duration_s == 10.0


def test_search_reserve_is_the_longest_search_so_far_and_the_closing_time_when_searches_vary(tmp_path):
    options = TuneOptions(model="m", slo_ms=100.0, workload=Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0),
                          out=tmp_path)
    state = {"measurements": [{"key": "baseline", "repeat": 0, "wall_s": 30.0},
                              {"key": "a", "repeat": 0, "wall_s": 62.5}, {"key": "b", "repeat": 0, "wall_s": 50.0}]}
    # the mean (47.5 s) let a 62.5 s search start with 50 s left: the run ended 6 s over its budget
    assert tune_module._search_reserve_s(state, options) == pytest.approx(62.5 + tune_module.CLOSING_S)
    fresh = tune_module._search_reserve_s({"measurements": []}, options)
    assert fresh == pytest.approx(4 * (options.probe_s + options.probe_warmup_s + 2) + tune_module.CLOSING_S)


def test_tune_refines_a_configuration_measured_before_with_small_steps(tmp_path, monkeypatch):
    built = _built_model_m(tmp_path)
    monkeypatch.setattr(tune_module, "Confirmer", FakeConfirmer)
    FakeConfirmer.calls, FakeConfirmer.growths = [], []
    options = TuneOptions(model="m", slo_ms=100.0, workload=Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0),
                          out=tmp_path / "out", top=1, confirm=1, repeats=2, extra_rounds=0,
                          space=SearchSpace(variants=("whole",), max_batch_sizes=(4,), queue_delays_us=(0,),
                                            preferred=("none",), instance_counts=(1,), intra_op_threads=(None,)))
    tune_module.tune([built], options, say=lambda _: None)
    first = [g for _, seed, g in FakeConfirmer.growths if seed == 0]
    later = [g for _, seed, g in FakeConfirmer.growths if seed == 1]
    assert set(first) == {1.5} and later and set(later) == {1.15}
