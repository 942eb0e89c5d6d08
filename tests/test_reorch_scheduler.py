"""The reorchestrator's pure core under a fake clock and fake stages: each operation, its limits, faults."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.reorch.errors import ConfigValidationError
from backends.reorch.policies import ReorchKnobs, StageContext, bucket_of, create_policy, default_bucket_bounds
from backends.reorch.scheduler import make_requests
from backends.reorch.state import Request
from reorch_sim import Simulation, make_scheduler

POLICIES = ["pipeline", "load", "operator", "input", "dva"]


def by_id(completions):
    return {c.request_id: c for c in completions}


def test_pipeline_new_batch_enters_stage0_while_older_batch_is_in_later_stages():
    sim = Simulation(make_scheduler("pipeline", num_stages=3))
    sim.arrive(0, make_requests([2], 0))
    sim.arrive(100, make_requests([1], 0, first_id=1))
    done = by_id(sim.run())
    first_batch_stage2 = next(l for l in sim.launches if l.stage == 2 and 0 in l.request_ids)
    second_batch_stage0 = next(l for l in sim.launches if l.stage == 0 and 1 in l.request_ids)
    # the second batch started stage 0 at 1200 us (when the first left it), long before the first exited
    assert second_batch_stage0.launch_id < first_batch_stage2.launch_id
    assert {c.outcome for c in done.values()} == {"success"}
    assert done[1].record["ops"] == [{"op": "new", "stage": 0}]
    assert done[1].record["batch_sizes"] == [1, 1, 1]
    assert sim.scheduler.operation_counts["new"] == 2 and sim.scheduler.is_idle()


def test_pipeline_entry_batch_takes_pending_requests_up_to_max_rows():
    sim = Simulation(make_scheduler("pipeline", max_batch_rows=4))
    sim.arrive(0, make_requests([1], 0))
    sim.arrive(10, make_requests([2, 2, 1], 0, first_id=1))  # arrive while stage 0 is busy
    sim.run()
    stage0 = [l.request_ids for l in sim.launches if l.stage == 0]
    assert stage0 == [(0,), (1, 2), (3,)]


def test_stretch_merges_catchup_batch_into_the_running_batch():
    sim = Simulation(make_scheduler("load", num_stages=3, stretch_max_wait_us=5000))
    sim.arrive(0, make_requests([1], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))  # arrives while request 0 runs stage 0
    done = by_id(sim.run())
    assert sim.scheduler.operation_counts["stretch"] == 1
    assert done[0].record["batch_sizes"] == [1, 1, 2]
    assert done[1].record["batch_sizes"] == [1, 1, 2]
    assert {"op": "stretch", "stage": 2} in done[1].record["ops"]
    assert {"op": "stretch", "stage": 2} in done[0].record["ops"]
    assert done[0].record["exit_us"] == done[1].record["exit_us"]
    assert [l.stage for l in sim.launches if 0 in l.request_ids and 1 in l.request_ids] == [2]


def test_stretch_hold_expires_after_max_wait_and_both_batches_go_on_alone():
    sim = Simulation(make_scheduler("load", num_stages=3, stretch_max_wait_us=300))
    sim.arrive(0, make_requests([1], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))
    done = by_id(sim.run())
    assert sim.scheduler.operation_counts["stretch"] == 0
    assert done[0].record["batch_sizes"] == [1, 1, 1] and done[1].record["batch_sizes"] == [1, 1, 1]
    # request 0 waited exactly the 300 us at the boundary, not for the catch-up
    stage2_of_0 = [l for l in sim.launches if l.stage == 2 and l.request_ids == (0,)]
    assert stage2_of_0 and done[0].outcome == "success"
    assert done[0].record["exit_us"] == 2200 + 300 + 1100


def test_stretch_respects_max_merged_rows():
    sim = Simulation(make_scheduler("load", num_stages=3, max_batch_rows=8, stretch_max_rows=6))
    sim.arrive(0, make_requests([4], 0))
    sim.arrive(500, make_requests([3], 0, first_id=1))
    sim.run()
    assert sim.scheduler.operation_counts["stretch"] == 0
    assert max(l.rows for l in sim.launches) == 4


def test_stretch_respects_last_merge_stage():
    sim = Simulation(make_scheduler("load", num_stages=3, stretch_last_stage=1))
    sim.arrive(0, make_requests([1], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))  # merge would be before stage 2 > 1
    sim.run()
    assert sim.scheduler.operation_counts["stretch"] == 0


def test_pipeline_policy_never_stretches_or_splits():
    sim = Simulation(make_scheduler("pipeline", num_stages=3, favoured=(2, 2, 2)))
    sim.arrive(0, make_requests([1] * 8, 0))
    sim.arrive(500, make_requests([1], 0, first_id=8))
    sim.run()
    assert sim.scheduler.operation_counts["stretch"] == 0 and sim.scheduler.operation_counts["split"] == 0


def test_split_cuts_batch_above_favoured_size_and_pieces_answer_independently():
    sim = Simulation(make_scheduler("operator", num_stages=3, favoured=(8, 4, 4)))
    sim.arrive(0, make_requests([1] * 8, 0))
    done = by_id(sim.run())
    assert sim.scheduler.operation_counts["split"] == 1
    assert [done[i].record["batch_sizes"] for i in (0, 7)] == [[8, 4, 4], [8, 4, 4]]
    assert done[0].record["ops"][-1] == {"op": "split", "stage": 1}
    assert done[0].record["exit_us"] < done[7].record["exit_us"]  # the first piece answers first


def test_split_never_happens_before_the_last_stages():
    sim = Simulation(make_scheduler("operator", num_stages=3, favoured=(8, 8, 2)))
    sim.arrive(0, make_requests([1] * 8, 0))
    sim.run()
    assert sim.scheduler.operation_counts["split"] == 0  # stage 2 is the last: split_last_stage=-2


def test_split_keeps_multi_row_requests_whole():
    sim = Simulation(make_scheduler("operator", num_stages=2, favoured=(8, 3), split_last_stage=-1,
                                    split_min_piece_rows=1))
    sim.arrive(0, make_requests([2, 2, 2, 2], 0))
    done = by_id(sim.run())
    assert [l.rows for l in sim.launches if l.stage == 1] == [2, 2, 2, 2]
    assert all(c.outcome == "success" for c in done.values())


def test_split_pieces_are_never_below_the_minimum_piece_size():
    # a noisy profile may claim a favoured size of 1; pieces stay at split_min_piece_rows (4)
    sim = Simulation(make_scheduler("operator", num_stages=3, favoured=(8, 1, 8)))
    sim.arrive(0, make_requests([1] * 8, 0))
    sim.run()
    assert [l.rows for l in sim.launches if l.stage == 1] == [4, 4]


def test_bucketing_groups_by_sequence_length_and_pads_to_longest_in_bucket():
    sim = Simulation(make_scheduler("input", num_stages=2, max_sequence_length=64))
    sim.arrive(0, make_requests([1, 1, 1, 1], 0, seq_lens=[5, 60, 7, 50]))
    done = by_id(sim.run())
    stage0 = [(l.request_ids, l.pad_to) for l in sim.launches if l.stage == 0]
    assert stage0 == [((0, 2), 7), ((1, 3), 60)]
    assert done[0].record["bucket"] == 8 and done[1].record["bucket"] == 64
    assert {"op": "bucket", "stage": 0} in done[0].record["ops"]


def test_fifo_baseline_pads_batch_to_longest_request():
    sim = Simulation(make_scheduler("pipeline", num_stages=2, max_sequence_length=64))
    sim.arrive(0, make_requests([1, 1, 1, 1], 0, seq_lens=[5, 60, 7, 50]))
    done = by_id(sim.run())
    assert [(l.request_ids, l.pad_to) for l in sim.launches if l.stage == 0] == [((0, 1, 2, 3), 60)]
    assert done[0].record["bucket"] is None


@pytest.mark.parametrize("lengths, bucketed", [([9, 16, 17, 12], False), ([5, 60, 7, 50], True)])
def test_dva_buckets_only_when_padding_waste_is_large(lengths, bucketed):
    sim = Simulation(make_scheduler("dva", num_stages=2, max_sequence_length=64))
    sim.arrive(0, make_requests([1] * 4, 0, seq_lens=lengths))
    sim.run()
    assert (sim.scheduler.operation_counts["bucket"] > 0) is bucketed


def test_dva_does_not_stretch_into_a_batch_already_at_favoured_size():
    sim = Simulation(make_scheduler("dva", num_stages=3, favoured=(4, 4, 4)))
    sim.arrive(0, make_requests([4], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))
    sim.run()
    assert sim.scheduler.operation_counts["stretch"] == 0
    sim = Simulation(make_scheduler("dva", num_stages=3, favoured=(4, 4, 4)))
    sim.arrive(0, make_requests([2], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))
    sim.run()
    assert sim.scheduler.operation_counts["stretch"] == 1


def test_back_pressure_bounds_batches_waiting_before_a_stage():
    # stage 1 is slow: stage 0 must stop starting batches once one waits before stage 1
    sim = Simulation(make_scheduler("pipeline", num_stages=2, max_queued_batches_per_stage=1, max_batch_rows=1),
                     stage_time_us=lambda stage, rows, pad: 100 if stage == 0 else 10_000)
    for i in range(6):
        sim.arrive(i, make_requests([1], 0, first_id=i))
    sim.run(until_us=5_000)
    assert len(sim.scheduler.queues[1]) <= 1
    assert len(sim.scheduler.pending) >= 3


def test_stage_failure_fails_only_its_batch():
    sim = Simulation(make_scheduler("pipeline", num_stages=3),
                     fail=lambda launch: "boom" if launch.stage == 1 and 0 in launch.request_ids else None)
    sim.arrive(0, make_requests([1, 1], 0))
    sim.arrive(500, make_requests([1], 0, first_id=2))
    done = by_id(sim.run())
    assert done[0].outcome == "error" and done[1].outcome == "error"
    assert "stage 1 failed: boom" in done[0].message
    assert done[2].outcome == "success"


def test_failure_of_catchup_releases_held_target():
    sim = Simulation(make_scheduler("load", num_stages=3, stretch_max_wait_us=50_000),
                     fail=lambda launch: "bad" if launch.request_ids == (1,) else None)
    sim.arrive(0, make_requests([1], 0))
    sim.arrive(500, make_requests([1], 0, first_id=1))
    done = by_id(sim.run())
    assert done[0].outcome == "success" and done[1].outcome == "error"
    assert done[0].record["exit_us"] < 50_000  # did not wait for the hold deadline


def test_cancel_pending_is_answered_at_once_and_running_at_next_boundary():
    sim = Simulation(make_scheduler("pipeline", num_stages=3))
    sim.arrive(0, make_requests([1, 1], 0))
    sim.arrive(100, make_requests([1], 0, first_id=2))
    sim.cancel_at(200, [2, 0])  # 2 is pending; 0 is running stage 0
    done = by_id(sim.run())
    assert done[2].outcome == "cancelled" and done[2].record["exit_us"] == 200
    assert done[0].outcome == "cancelled" and done[0].record["exit_us"] == 1200  # end of stage 0
    assert done[1].outcome == "success" and done[1].record["batch_sizes"] == [2, 1, 1]


def test_shutdown_answers_everything_and_later_requests():
    sim = Simulation(make_scheduler("dva", num_stages=3))
    sim.arrive(0, make_requests([1, 1], 0))
    sim.arrive(100, make_requests([1], 0, first_id=2))
    sim.run(until_us=150)
    completions = sim.scheduler.shutdown("shutting down", 150)
    assert sorted(c.request_id for c in completions) == [0, 1, 2]
    assert all(c.outcome == "error" and c.message == "shutting down" for c in completions)
    late = sim.scheduler.add_requests(make_requests([1], 200, first_id=9), 200)
    assert [c.request_id for c in late] == [9]
    assert sim.scheduler.on_stage_done(0, 300) == []  # a launch finishing after shutdown is ignored


def test_knobs_validate_and_parse_from_config_parameters():
    knobs = ReorchKnobs.from_parameters({"stretch_max_wait_us": "700", "bucket_bounds": "16,32,128",
                                         "split_min_ratio": "1.5", "policy": "dva"})
    assert knobs.stretch_max_wait_us == 700 and knobs.bucket_bounds == (16, 32, 128)
    assert ReorchKnobs.from_parameters(knobs.to_parameters()) == knobs
    with pytest.raises(ConfigValidationError, match="max_batch_rows"):
        ReorchKnobs(max_batch_rows=0)
    with pytest.raises(ConfigValidationError, match="bucket_bounds"):
        ReorchKnobs(bucket_bounds=(32, 16))
    with pytest.raises(ConfigValidationError, match="stage_concurrency"):
        ReorchKnobs.from_parameters({"stage_concurrency": "two"})
    with pytest.raises(ConfigValidationError, match="unknown"):
        create_policy("fastest", ReorchKnobs(), StageContext(2, (8, 8)))


def test_buckets():
    assert default_bucket_bounds(128) == (8, 16, 32, 64, 128)
    assert default_bucket_bounds(100) == (8, 16, 32, 64, 100)
    assert [bucket_of(n, (8, 16)) for n in (1, 8, 9, 17)] == [8, 8, 16, 17]


@st.composite
def workloads(draw):
    policy = draw(st.sampled_from(POLICIES + ["load", "dva"]))  # stretch needs more draws to show up
    num_stages = draw(st.integers(1, 4))
    max_rows = draw(st.integers(1, 8))
    favoured = tuple(draw(st.integers(1, max_rows)) for _ in range(num_stages))
    sequence = draw(st.booleans())
    window_us = draw(st.sampled_from([2_000, 6_000, 30_000]))  # heavy to light load
    arrivals = draw(st.lists(st.tuples(st.integers(0, window_us), st.integers(1, max_rows),
                                       st.integers(1, 64)), min_size=1, max_size=40))
    cancels = draw(st.lists(st.tuples(st.integers(0, 8_000), st.integers(0, 39)), max_size=6))
    fail_seed = draw(st.integers(0, 6))
    knobs = dict(max_batch_rows=max_rows, stretch_max_wait_us=draw(st.integers(0, 3000)),
                 stage_concurrency=draw(st.integers(1, 2)),
                 max_queued_batches_per_stage=draw(st.integers(1, 3)),
                 stretch_max_rows=draw(st.integers(0, 2 * max_rows)))
    return policy, num_stages, favoured, sequence, arrivals, cancels, fail_seed, knobs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_property_no_request_lost_or_answered_twice_sizes_and_stage_order(workload):
    policy, num_stages, favoured, sequence, arrivals, cancels, fail_seed, knobs = workload
    scheduler = make_scheduler(policy, num_stages=num_stages, favoured=favoured,
                               max_sequence_length=64 if sequence else None, **knobs)
    fail = (lambda launch: "injected" if fail_seed and launch.launch_id % 7 == fail_seed - 1 else None)
    sim = Simulation(scheduler, stage_time_us=lambda s, rows, pad: 300 + 50 * rows + (pad or 0), fail=fail)
    for i, (at, rows, length) in enumerate(arrivals):
        sim.arrive(at, [Request(i, rows, at, seq_len=length if sequence else None)])
    for at, rid in cancels:
        sim.cancel_at(at, [rid])
    completions = sim.run()
    ids = [c.request_id for c in completions]
    assert sorted(ids) == list(range(len(arrivals))), "every request answered exactly once"
    assert scheduler.is_idle() and not scheduler.batches and not scheduler.launches
    merged_limit = knobs["stretch_max_rows"] or knobs["max_batch_rows"]
    stages_seen: dict[int, list[int]] = defaultdict(list)
    for launch in sim.launches:
        assert 1 <= launch.rows <= max(knobs["max_batch_rows"], merged_limit)
        assert launch.rows == sum(arrivals[r][1] for r in launch.request_ids)
        if sequence:
            assert launch.pad_to == max(arrivals[r][2] for r in launch.request_ids)
        for r in launch.request_ids:
            stages_seen[r].append(launch.stage)
    for completion in completions:
        seen = stages_seen[completion.request_id]
        assert seen == list(range(len(seen))), "stages run in order, each once"
        if completion.outcome == "success":
            assert len(seen) == num_stages and len(completion.record["batch_sizes"]) == num_stages
