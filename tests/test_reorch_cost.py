"""The cost model's never-lose decisions (fuse, whole) on synthetic stage latency tables."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from reorch_models import random_sequence_request, write_sequence_chain
from reorch_sim import Simulation, make_scheduler
from test_reorch_engine import Answers

from backends.reorch.cost import FUSE, FUSE_OFF, FUSE_ON, WHOLE, ArrivalMeter, CostModel, FuseDecision, interpolate_ms
from backends.reorch.engine import OVERLOADED, SUCCESS, ReorchEngine, default_inflight_rows
from backends.reorch.executor import make_ort_executors
from backends.reorch.metrics import (
    INLINE_COMPUTE_US_TOTAL,
    INLINE_EXECUTIONS_TOTAL,
    INLINE_SAMPLES_TOTAL,
    OPERATIONS_TOTAL,
    REQUESTS_TOTAL,
    STAGE_COMPUTE_US_TOTAL,
    STAGE_EXECUTIONS_TOTAL,
    CountingMetrics,
)
from backends.reorch.policies import ReorchKnobs
from backends.reorch.scheduler import OPERATIONS, make_requests
from backends.reorch.spec import StagesSpec

CHEAP = [{1: 0.02, 8: 0.05}] * 3  # 20 µs stages: boundaries (150 µs each) cannot pay
COSTLY = [{1: 3.0, 2: 4.0, 4: 6.0, 8: 10.0}] * 3  # 3 ms stages: 450 µs of boundaries is half the allowed 900


def test_interpolate_ms_is_linear_between_and_beyond_measured_sizes():
    table = {1: 1.0, 4: 4.0, 8: 6.0}
    assert interpolate_ms(table, 4) == 4.0
    assert interpolate_ms(table, 2) == pytest.approx(2.0)
    assert interpolate_ms(table, 16) == pytest.approx(10.0)
    assert interpolate_ms({2: 3.0}, 4) == pytest.approx(6.0)


def test_fuse_decision_starts_fused_when_stages_are_too_cheap_for_the_boundary_overhead():
    assert FuseDecision(CostModel.from_tables(CHEAP)).fused
    assert not FuseDecision(CostModel.from_tables(COSTLY)).fused
    assert not FuseDecision(CostModel.from_tables([{}, {}, {}])).fused  # no tables: no decision
    assert CostModel.from_tables(COSTLY).fuse_ratio() == pytest.approx(0.5)


@pytest.mark.parametrize("chain_ms", [4.09, 5.45, 4.63])  # lstm small's batch-1 chain in three builds
def test_fuse_decision_is_the_same_for_every_build_of_a_chain_near_the_threshold(chain_ms):
    # 3 stages x 150 µs = 450 µs against 10% of the chain: 409 / 545 / 463 µs. One threshold put the
    # three builds on different sides (fused, staged, staged); inside the band they all start fused.
    tables = [{1: chain_ms / 3, 8: chain_ms}] * 3
    assert FuseDecision(CostModel.from_tables(tables), margin=0.25).fused
    assert CostModel.from_tables(tables).fuse_ratio() > 1.0 - 0.25


def test_fuse_decision_switches_on_only_once_enough_launches_measure_an_overhead_above_the_band():
    decision = FuseDecision(CostModel.from_tables(COSTLY), margin=0.25, window=8, min_samples=4)
    allowed_us = 0.1 * 9000 / 3  # per launch: 300 µs keeps the ratio at 1
    assert [decision.note_launch(allowed_us * 1.4) for _ in range(3)] == [None] * 3  # too few samples
    assert decision.overhead_us == 150.0 and not decision.fused  # still the prior
    assert decision.note_launch(allowed_us * 1.4) == FUSE_ON
    assert decision.fused and decision.overhead_us == pytest.approx(allowed_us * 1.4)
    assert decision.note_launch(allowed_us * 1.4) is None  # counted once


def test_fuse_decision_does_not_flap_on_measurements_around_the_threshold():
    decision = FuseDecision(CostModel.from_tables(COSTLY), margin=0.25, window=8, min_samples=4)
    allowed_us = 300.0
    rng = np.random.default_rng(5)
    switches = [decision.note_launch(allowed_us * rng.uniform(0.8, 1.2)) for _ in range(500)]
    assert switches.count(None) == 500 and not decision.fused
    switches = [decision.note_launch(allowed_us * rng.uniform(1.3, 2.0)) for _ in range(100)]  # above the band
    assert switches.count(FUSE_ON) == 1
    switches = [decision.note_launch(allowed_us * rng.uniform(0.8, 1.2)) for _ in range(500)]
    assert switches.count(None) == 500 and decision.fused  # back inside the band: it stays on
    switches = [decision.note_launch(allowed_us * rng.uniform(0.2, 0.6)) for _ in range(100)]  # below it
    assert switches.count(FUSE_OFF) == 1 and not decision.fused


def test_scheduler_counts_a_measured_fuse_switch_and_fuses_the_next_batches():
    scheduler = make_scheduler("dva", latency_tables_ms=COSTLY)
    assert scheduler.inline_decision([1], [None], 0) == WHOLE  # idle, staged chain: like the whole model
    for _ in range(scheduler.fuse.min_samples):
        scheduler.note_launch_overhead(2_000.0)  # 3 x 2 ms of overhead against a 9 ms chain
    assert scheduler.operation_counts[FUSE_ON] == 1 and scheduler.operation_counts[FUSE_OFF] == 0
    assert scheduler.inline_decision([1, 1], [5, 40], 1_000) == FUSE  # even with length diversity
    assert make_scheduler("pipeline", latency_tables_ms=COSTLY).fuse is None  # no cost model: nothing to decide


@pytest.mark.parametrize("busy, waiting, diverse, rate, steady, want", [
    (False, 0, False, 0.0, False, True),  # idle, one batch, no diversity: the whole model
    (True, 0, False, 0.0, False, False),  # another batch is in the pipeline during a burst: stretch may pay
    (False, 3, False, 0.0, False, False),  # requests wait behind this batch during a burst
    (False, 0, True, 0.0, False, False),  # length diversity the policy uses (bucketing)
    (False, 0, False, 1 / 1000, False, False),  # a burst: ~9 arrivals expected during the 9 ms chain
    (True, 3, False, 1 / 1000, True, True),  # the same load, steady: nothing to gain from boundaries
    (False, 0, True, 1 / 1000, True, False),  # steady, but lengths differ: bucketing may pay
])
def test_run_whole_only_without_load_or_length_diversity(busy, waiting, diverse, rate, steady, want):
    model = CostModel.from_tables(COSTLY)
    assert model.run_whole(1, pipeline_busy=busy, waiting_behind=waiting, diverse=diverse,
                           arrival_rate_per_us=rate, steady=steady) is want


def poisson_batches(rng, rate_per_us: float, until_us: int, start_us: int = 0):
    """(time, count) of Poisson arrivals, grouped as a dynamic batcher with a 1 ms window would."""
    now, batches = start_us, []
    while now < until_us:
        now += int(rng.exponential(1 / rate_per_us))
        if batches and now - batches[-1][0] < 1000:
            batches[-1] = (batches[-1][0], batches[-1][1] + 1)
        else:
            batches.append((now, 1))
    return batches


def test_arrival_meter_calls_steady_poisson_load_steady_and_an_on_off_source_bursty():
    rng = np.random.default_rng(0)
    steady = ArrivalMeter(short_us=200_000, ratio=2.0)
    verdicts = []
    for at, count in poisson_batches(rng, 100 / 1e6, 10_000_000):  # 100 req/s for 10 s
        steady.note(count, at)
        verdicts.append(steady.bursty(at))
    assert sum(verdicts) / len(verdicts) < 0.01
    bursty = ArrivalMeter(short_us=200_000, ratio=2.0)
    for at, count in poisson_batches(rng, 10 / 1e6, 3_000_000):  # 10 req/s, then 200 req/s
        bursty.note(count, at)
    assert not bursty.bursty(3_000_000)
    on = poisson_batches(rng, 200 / 1e6, 3_300_000, start_us=3_000_000)
    for at, count in on:
        bursty.note(count, at)
    assert bursty.bursty(on[-1][0])
    assert not ArrivalMeter(short_us=200_000, ratio=0.0).bursty(0)  # ratio 0: never bursty
    resumed = 60_000_000  # the same 200 req/s after a minute of silence: steady from its start
    later = [(at, count) for at, count in poisson_batches(rng, 200 / 1e6, resumed + 500_000, start_us=resumed)]
    for at, count in later:
        bursty.note(count, at)
    assert not bursty.bursty(later[-1][0])


def test_inline_decision_runs_steady_fixed_length_load_whole_even_with_requests_inside():
    scheduler = make_scheduler("dva", latency_tables_ms=COSTLY)  # a 9 ms chain: boundaries could pay
    rng = np.random.default_rng(1)
    decisions = [scheduler.inline_decision([1] * count, [None] * count, at)
                 for at, count in poisson_batches(rng, 1 / 1000, 3_000_000)]  # ~6 arrivals per chain
    assert decisions.count(WHOLE) / len(decisions) > 0.95
    assert scheduler.operation_counts[WHOLE] == decisions.count(WHOLE)
    scheduler.add_requests(make_requests([1], 3_000_000, first_id=0), 3_000_000)  # a batch is inside
    assert scheduler.inline_decision([1], [None], 3_001_000) == WHOLE


def test_a_batch_inline_decision_declines_is_counted_once_when_it_enters_the_scheduler():
    asked_first = make_scheduler("dva", latency_tables_ms=COSTLY)
    entered_only = make_scheduler("dva", latency_tables_ms=COSTLY)
    rng = np.random.default_rng(3)
    next_id = declined = 0
    for at, count in poisson_batches(rng, 1 / 2000, 2_000_000):
        requests = make_requests([1] * count, at, first_id=next_id)
        next_id += count
        lengths = [8 + 56 * (i % 2) for i in range(count)]  # two or more: length diversity, declined
        if asked_first.inline_decision([1] * count, lengths, at) is None:
            asked_first.add_requests(requests, at, arrivals_noted=True)
            declined += 1
        entered_only.add_requests(make_requests([1] * count, at, first_id=next_id), at)
        next_id += count
    assert declined > 10
    assert asked_first.arrivals.rates_per_us(2_000_000) == pytest.approx(entered_only.arrivals.rates_per_us(2_000_000))
    assert asked_first.arrival_rate_per_us(2_000_000) == pytest.approx(entered_only.arrival_rate_per_us(2_000_000))


def test_operations_tuple_names_the_new_decisions():
    assert OPERATIONS[:4] == ("new", "stretch", "split", "bucket")
    assert {FUSE, WHOLE, FUSE_ON, FUSE_OFF} <= set(OPERATIONS)


def test_scheduler_fuses_every_batch_of_cheap_stages_under_dva():
    scheduler = make_scheduler("dva", latency_tables_ms=CHEAP)
    sim = Simulation(scheduler)
    for i in range(5):
        sim.arrive(i * 50, make_requests([1], 0, first_id=i))
    completions = sim.run()
    assert len(completions) == 5 and all(c.outcome == "success" for c in completions)
    assert all(launch.final_stage == 2 and launch.stage == 0 for launch in sim.launches)
    assert scheduler.operation_counts[FUSE] == len(sim.launches)
    assert scheduler.operation_counts["new"] == 0
    record = completions[0].record
    assert record["ops"] == [{"op": FUSE, "stage": 0}] and len(record["batch_sizes"]) == 3


def test_scheduler_runs_a_lone_request_whole_and_pipelines_under_a_burst():
    scheduler = make_scheduler("dva", latency_tables_ms=COSTLY)
    sim = Simulation(scheduler)
    sim.arrive(0, make_requests([1], 0))
    sim.run()
    assert scheduler.operation_counts[WHOLE] == 1 and scheduler.operation_counts["new"] == 0
    burst = make_requests([1] * 40, 0, first_id=100)
    for i, request in enumerate(burst):
        sim.arrive(1_000_000 + i * 100, [request])  # 10 per ms: a chain of 9+ ms sees many arrive
    sim.run()
    assert scheduler.operation_counts["new"] + scheduler.operation_counts["stretch"] > 0
    assert len(sim.completions) == 41


@pytest.mark.parametrize("policy, mode, want_decisions", [
    ("pipeline", "auto", False), ("dva", "auto", True), ("dva", "off", False), ("load", "on", True)])
def test_cost_model_applies_to_dva_by_default_and_where_switched_on(policy, mode, want_decisions):
    scheduler = make_scheduler(policy, latency_tables_ms=CHEAP, cost_model=mode)
    sim = Simulation(scheduler)
    sim.arrive(0, make_requests([1, 1], 0))
    sim.run()
    decided = scheduler.operation_counts[FUSE] + scheduler.operation_counts[WHOLE]
    assert (decided > 0) is want_decisions


def _engine(tmp_path, tables, clock_us=None, **knob_values):
    entry, reference = write_sequence_chain(tmp_path, favoured=(4, 2, 2))
    for stage, table in zip(entry["stages"], tables):
        stage["latency_ms"] = {str(b): ms for b, ms in table.items()}
    spec = StagesSpec.from_manifest_entry("seqm", entry)
    answers, metrics = Answers(), CountingMetrics()
    extra = {"clock_us": clock_us} if clock_us is not None else {}
    engine = ReorchEngine(spec, "dva", ReorchKnobs(max_batch_rows=8, **knob_values), make_ort_executors(spec, tmp_path),
                          answers, metrics=metrics, **extra)
    return engine, answers, reference, metrics


class SteppingClock:
    """A fake clock (µs) that moves ``step_us`` on every reading: every launch looks that slow."""

    def __init__(self, step_us: int) -> None:
        self.now_us, self.step_us = 0, step_us
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.now_us += self.step_us
            return self.now_us


def test_engine_measures_its_launch_overhead_and_switches_to_fused_once(tmp_path):
    # Stages far too slow to fuse by the prior (COSTLY), but every launch takes 2 ms more than its compute
    # by the fake clock: after min_samples launches the decision switches on, once, and later batches fuse.
    engine, answers, _, metrics = _engine(tmp_path, COSTLY, clock_us=SteppingClock(1_000), cost_model="on")
    rng = np.random.default_rng(7)
    try:
        needed = engine.scheduler.fuse.min_samples
        for index in range(needed):
            engine.submit([(index, random_sequence_request(rng, 1, 6))])
            answers.wait(index + 1)
        launches = metrics.counters[(STAGE_EXECUTIONS_TOTAL, "0")]
        inline = engine.run_inline([("after", random_sequence_request(rng, 1, 5)),
                                    ("long", random_sequence_request(rng, 1, 30))])
    finally:
        engine.close()
    assert launches >= 1 and metrics.counters[(OPERATIONS_TOTAL, FUSE_ON)] == 1
    assert engine.scheduler.fuse.fused and metrics.launch_overhead_us > 1_000
    assert [answer.record["ops"] for _, answer in inline] == [[{"op": FUSE, "stage": 0}]] * 2


def test_fused_chain_returns_the_whole_models_outputs_and_counts_fuse(tmp_path):
    engine, answers, reference, metrics = _engine(tmp_path, CHEAP)
    rng = np.random.default_rng(4)
    requests = [random_sequence_request(rng, int(rng.integers(1, 3)), int(n)) for n in rng.integers(1, 33, 30)]
    try:
        for start in range(0, 30, 5):
            engine.submit([(i, requests[i]) for i in range(start, start + 5)])
        answers.wait(30)
    finally:
        engine.close()
    for index, request in enumerate(requests):
        answer = answers.by_handle[index]
        assert answer.kind == SUCCESS
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(answer.outputs["hidden"], want["hidden"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer.outputs["pooled"], want["pooled"], rtol=1e-5, atol=1e-6)
    assert metrics.counters[(OPERATIONS_TOTAL, FUSE)] >= 1


def test_admission_limit_answers_unavailable_at_once_beyond_max_inflight_rows(tmp_path):
    engine, answers, _, _ = _engine(tmp_path, COSTLY, max_inflight_rows=3)
    request = random_sequence_request(np.random.default_rng(0), 2, 8)
    try:
        engine.submit([("a", request), ("b", request), ("c", request)])  # 2 + 2 > 3: b and c refused
        answers.wait(3)
    finally:
        engine.close()
    assert answers.by_handle["a"].kind == SUCCESS
    for handle in ("b", "c"):
        assert answers.by_handle[handle].kind == OVERLOADED
        assert "max_inflight_rows=3" in answers.by_handle[handle].message


def test_default_admission_limit_is_sized_from_memory(tmp_path):
    entry, _ = write_sequence_chain(tmp_path)
    spec = StagesSpec.from_manifest_entry("seqm", entry)
    small = default_inflight_rows(spec, 64 * 1024 * 1024)
    large = default_inflight_rows(spec, 64 * 1024**3)
    assert 4 * spec.max_batch_size <= small < large
    assert default_inflight_rows(spec, None) >= 4 * spec.max_batch_size


class FailOnDemand:
    """Wraps a stage executor; raises MemoryError (as onnxruntime does on a too-big batch) while armed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.armed = False

    def run(self, feeds):
        if self.armed:
            raise MemoryError("Failed to allocate memory for a batch")
        return self.inner.run(feeds)


def test_a_failure_inside_a_fused_chain_names_its_stage_and_later_batches_go_on(tmp_path):
    engine, answers, _, _ = _engine(tmp_path, CHEAP)
    failing = FailOnDemand(engine.executors[1])
    engine.executors[1] = failing
    request = random_sequence_request(np.random.default_rng(1), 1, 6)
    try:
        failing.armed = True
        engine.submit([("failed", request)])
        answers.wait(1)
        failing.armed = False
        engine.submit([("later", request)])
        answers.wait(2)
    finally:
        engine.close()
    assert "stage 1 failed: MemoryError" in answers.by_handle["failed"].message
    assert answers.by_handle["later"].kind == SUCCESS


def test_inline_runs_have_their_own_metrics_and_stage_0_books_only_its_launches(tmp_path):
    engine, answers, _, metrics = _engine(tmp_path, CHEAP)
    rng = np.random.default_rng(8)
    try:
        engine.run_inline([("a", random_sequence_request(rng, 2, 6)), ("b", random_sequence_request(rng, 1, 4))])
        engine.run_inline([("c", random_sequence_request(rng, 1, 6))])
    finally:
        engine.close()
    assert metrics.counters[(INLINE_EXECUTIONS_TOTAL, "")] == 2 and metrics.counters[(INLINE_SAMPLES_TOTAL, "")] == 4
    assert metrics.counters[(INLINE_COMPUTE_US_TOTAL, "")] > 0
    assert metrics.counters[(STAGE_EXECUTIONS_TOTAL, "0")] == 0 and metrics.counters[(STAGE_COMPUTE_US_TOTAL, "0")] == 0


def test_run_inline_answers_a_batch_of_cheap_stages_in_order_with_one_invalid(tmp_path):
    engine, _, reference, metrics = _engine(tmp_path, CHEAP)
    rng = np.random.default_rng(9)
    good = [random_sequence_request(rng, 1, n) for n in (3, 9, 4)]
    bad = {"tokens": np.zeros((1, 40), np.int64), "attention_mask": np.ones((1, 40), np.int64)}
    out_of_range = {"tokens": np.full((1, 3), 50, np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    try:
        answers = engine.run_inline([("a", good[0]), ("bad", bad), ("b", good[1]), ("c", good[2])])
        refused = engine.run_inline([("range", out_of_range), ("fine", good[0])])
    finally:
        engine.close()
    assert [handle for handle, _ in answers] == ["a", "bad", "b", "c"]
    kinds = [answer.kind for _, answer in answers]
    assert kinds == [SUCCESS, "invalid", SUCCESS, SUCCESS]
    assert [a.kind for _, a in refused] == ["invalid", SUCCESS] and "values must lie" in refused[0][1].message
    for (_, answer), request in zip([answers[0], answers[2], answers[3]], good):
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(answer.outputs["hidden"], want["hidden"], rtol=1e-5, atol=1e-6)
        assert answer.record["ops"] == [{"op": FUSE, "stage": 0}] and answer.record["batch_sizes"] == [3, 3, 3]
    assert metrics.counters[(OPERATIONS_TOTAL, FUSE)] == 2


def test_run_inline_builds_a_record_only_for_the_requests_that_ask(tmp_path):
    engine, _, _, metrics = _engine(tmp_path, CHEAP)
    rng = np.random.default_rng(3)
    try:
        answers = engine.run_inline([("asks", random_sequence_request(rng, 1, 3)),
                                     ("plain", random_sequence_request(rng, 1, 5))], [True, False])
    finally:
        engine.close()
    assert answers[0][1].record["ops"] == [{"op": FUSE, "stage": 0}] and answers[1][1].record == {}
    assert [a.kind for _, a in answers] == [SUCCESS, SUCCESS]
    assert metrics.counters[(REQUESTS_TOTAL, "success")] == 2


def test_run_inline_declines_when_boundaries_may_pay(tmp_path):
    engine, answers, _, _ = _engine(tmp_path, COSTLY, cost_model="off")
    request = random_sequence_request(np.random.default_rng(0), 1, 5)
    try:
        assert engine.run_inline([("x", request)]) is None  # cost model off: the scheduler decides
    finally:
        engine.close()
    engine, answers, _, _ = _engine(tmp_path, COSTLY)
    try:
        assert engine.run_inline([("lone", request)])[0][1].record["ops"] == [{"op": WHOLE, "stage": 0}]
        long, short = random_sequence_request(np.random.default_rng(1), 1, 32), request
        assert engine.run_inline([("long", long), ("short", short)]) is None  # length diversity: bucketing may pay
    finally:
        engine.close()


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("provider, mode", [
    ("cpu", "on"),  # the I/O-binding path with OrtValues in host memory: runs everywhere
    pytest.param("cuda", "auto", marks=pytest.mark.skipif(not _cuda_available(), reason="needs CUDA")),
])
def test_fused_chain_keeps_boundary_tensors_as_device_values(tmp_path, provider, mode):
    entry, reference = write_sequence_chain(tmp_path, favoured=(4, 2, 2))
    for stage, table in zip(entry["stages"], CHEAP):
        stage["latency_ms"] = {str(b): ms for b, ms in table.items()}
    spec = StagesSpec.from_manifest_entry("seqm", entry)
    executors = make_ort_executors(spec, tmp_path, execution_provider=provider)
    seen: list[str] = []
    for executor in executors:
        bound = executor.run_bound

        def spy(feeds, *, keep_on_device, _bound=bound):
            seen.extend(type(v).__name__ for v in feeds.values())
            return _bound(feeds, keep_on_device=keep_on_device)
        executor.run_bound = spy
    engine = ReorchEngine(spec, "dva", ReorchKnobs(max_batch_rows=8, device_boundaries=mode), executors, Answers())
    rng = np.random.default_rng(2)
    requests = [random_sequence_request(rng, 1, n) for n in (4, 9)]
    try:
        answers = engine.run_inline([(i, r) for i, r in enumerate(requests)])
    finally:
        engine.close()
    assert "OrtValue" in seen  # a later stage was fed an earlier stage's output without a host copy
    for (_, answer), request in zip(answers, requests):
        want = reference(request["tokens"], request["attention_mask"])
        np.testing.assert_allclose(answer.outputs["hidden"], want["hidden"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(answer.outputs["pooled"], want["pooled"], rtol=1e-4, atol=1e-5)
