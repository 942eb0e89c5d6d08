"""Threads and cores in the simulator: the processor-sharing rule by hand, and a planted thread/instance optimum."""

from __future__ import annotations

import dataclasses

import pytest

from core.errors import BadParameterError
from loadtest.workloads import ArrivalSpec
from tuning.batcher import BatcherSettings
from tuning.search import Candidate, SearchOptions, SearchSpace, search, why
from tuning.simulate import (
    ModelProfile,
    SharedCores,
    SimSettings,
    VariantConfig,
    Workload,
    _Loop,
    core_shares,
    simulate,
)

SLOWDOWN = 1.4  # one thread takes 1.4x the time of the two threads as built (about bert_base small's)
CORES = SimSettings(launch_overhead_ms=0.0, request_overhead_ms=0.0, cores=2)


def profile(slowdown: dict | None = None, max_batch: int = 8) -> ModelProfile:
    entry = {"max_batch_size": max_batch, "inputs": [], "outputs": [], "sequence": None, "build": {},
             "stages": [{"index": i, "onnx": f"m_stage{i}/1/model.onnx", "inputs": [], "outputs": [],
                         "favoured_batch_size": max_batch, "latency_ms": {"1": 2.0, "8": 8.0}} for i in range(2)]}
    base = ModelProfile.from_manifest_entry("m", entry)
    return dataclasses.replace(base, thread_slowdown={1: {1: SLOWDOWN, 8: SLOWDOWN}} if slowdown is None else slowdown)


@pytest.mark.parametrize(("threads", "cores", "expected"), [
    ((2,), 2, [2.0]),
    ((1,), 2, [1.0]),
    ((1, 2), 2, [1.0, 1.0]),  # fair share 1 each
    ((1, 1, 2), 2, [2 / 3, 2 / 3, 2 / 3]),
    ((1, 4), 3, [1.0, 2.0]),  # the 1-thread launch leaves its second core to the other
])
def test_core_shares_are_max_min_fair_and_capped_by_threads(threads, cores, expected):
    assert core_shares(threads, cores) == pytest.approx(expected)


def test_shared_cores_finish_launches_at_the_hand_computed_times():
    loop = _Loop()
    device = SharedCores(loop, cores=2)
    finished: dict[str, int] = {}

    def start(name: str, duration_us: int, threads: int) -> None:
        device.run(duration_us, lambda: finished.setdefault(name, loop.now_us), threads)

    # A (2 threads, 10 ms alone) and B (1 thread, 4 ms) from 0: one core each, A at half its speed.
    # B ends at 4 ms; A has done 2 ms of its 10 and runs alone from there: ends at 4 + 8 = 12 ms.
    loop.at(0, lambda: start("A", 10_000, 2))
    loop.at(0, lambda: start("B", 4_000, 1))
    # C, D, E (1 thread, 3 ms) from 20 ms: 2/3 of a core each, all end at 20 + 4.5 ms.
    for name in "CDE":
        loop.at(20_000, lambda name=name: start(name, 3_000, 1))
    loop.run(10**6)
    assert finished == {"B": 4_000, "A": 12_000, "C": 24_500, "D": 24_500, "E": 24_500}


def _saturated_rps(config: VariantConfig, settings: SimSettings = CORES) -> float:
    workload = Workload(ArrivalSpec.parse("closed:users=64"), duration_s=3.0, warmup_s=0.5)
    return simulate(profile(), config, workload, settings).summary.throughput_rps


def test_two_single_thread_instances_beat_one_instance_as_built_when_the_cores_are_shared():
    one_as_built = _saturated_rps(VariantConfig("whole", BatcherSettings(8, 0)))
    two_single = _saturated_rps(VariantConfig("whole", BatcherSettings(8, 0, instance_count=2, intra_op_threads=1)))
    two_as_built = _saturated_rps(VariantConfig("whole", BatcherSettings(8, 0, instance_count=2)))
    one_single = _saturated_rps(VariantConfig("whole", BatcherSettings(8, 0, intra_op_threads=1)))
    assert one_as_built == pytest.approx(8 / 0.016, rel=0.02)  # batches of 8 at 16 ms (both stages' tables)
    assert two_single / one_as_built == pytest.approx(2 / SLOWDOWN, rel=0.03)  # both cores busy, each 1.4x slower
    assert two_as_built / one_as_built == pytest.approx(1.0, rel=0.03)  # two 2-thread launches only take turns
    assert one_single / one_as_built == pytest.approx(1 / SLOWDOWN, rel=0.03)


def test_ensemble_stages_overlap_on_the_cores_only_when_single_threaded():
    as_built = _saturated_rps(VariantConfig("ensemble", BatcherSettings(8, 0)))
    single = _saturated_rps(VariantConfig("ensemble", BatcherSettings(8, 0, intra_op_threads=1)))
    assert single / as_built == pytest.approx(2 / SLOWDOWN, rel=0.05)


def test_threads_slow_a_launch_by_the_profile_factor_when_the_device_has_slots():
    slots = dataclasses.replace(CORES, cores=0)
    config = VariantConfig("whole", BatcherSettings(8, 0, intra_op_threads=1))
    assert _saturated_rps(config, slots) == pytest.approx(8 / 0.016 / SLOWDOWN, rel=0.02)


def test_simulate_refuses_a_thread_count_whose_slowdown_was_not_measured():
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=10"), duration_s=1.0, warmup_s=0.0)
    with pytest.raises(BadParameterError, match="intra_op_threads=3 for 'm'.*measured: \\[1\\]"):
        simulate(profile(), VariantConfig("whole", BatcherSettings(8, 0, intra_op_threads=3)), workload, CORES)


def test_search_space_offers_a_thread_count_only_where_the_profile_knows_its_slowdown():
    space = SearchSpace(variants=("whole",), max_batch_sizes=(8,), queue_delays_us=(0,), preferred=("none",),
                        instance_counts=(1,))
    assert [c.batcher.intra_op_threads for c in space.candidates(profile())] == [None, 1]
    assert [c.batcher.intra_op_threads for c in space.candidates(profile(slowdown={}))] == [None]


def test_search_finds_the_planted_two_single_thread_instances_and_says_why():
    space = SearchSpace(variants=("whole",), max_batch_sizes=(8,), queue_delays_us=(0, 1000), preferred=("none",),
                        instance_counts=(1, 2))
    workload = Workload(ArrivalSpec.parse("poisson:rate_rps=1"), slo_ms=100.0)
    ranked, facts = search([profile()], workload, space=space, settings=CORES,
                           options=SearchOptions(keep=8, screen_duration_s=3.0, rank_duration_s=4.0))
    best = ranked[0]
    assert (best.config.batcher.instance_count, best.config.batcher.intra_op_threads) == (2, 1)
    assert best.key.endswith("_i2_t1")
    assert best.score > 1.2 * facts["baseline"]["simulated_slo_rps"]
    text = why(best, facts["baseline"]["simulated_slo_rps"])
    assert "1 thread(s) per launch" in text and "side by side" in text


def test_why_names_the_thread_slowdown_at_the_batch_size_formed():
    candidate = Candidate(profile(slowdown={1: {1: 1.1, 8: 1.5}}),
                          VariantConfig("ensemble", BatcherSettings(8, 0, intra_op_threads=1)))
    assert "a batch of 8 takes 1.50x as long alone" in why(candidate, None)
