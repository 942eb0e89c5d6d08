"""The reorchestrator engine in-process: real onnxruntime stages, real threads, no Triton."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from reorch_models import random_sequence_request, write_mlp_chain, write_sequence_chain

from backends.reorch.engine import CANCELLED, INVALID, SHUTDOWN, STAGE_ERROR, SUCCESS, ReorchEngine
from backends.reorch.errors import BadRequestError, StageContractError
from backends.reorch.executor import WHOLE_GRAPH, make_ort_executors, split_even
from backends.reorch.metrics import INLINE_EXECUTIONS_TOTAL, OPERATIONS_TOTAL, REQUESTS_TOTAL, CountingMetrics
from backends.reorch.policies import BatchPolicy, ReorchKnobs
from backends.reorch.scheduler import FUSE
from backends.reorch.spec import StageSpec, StagesSpec

POLICIES = [p.value for p in BatchPolicy]


class Answers:
    """Collects answers; fails the test if a handle is answered twice."""

    def __init__(self) -> None:
        self.by_handle: dict = {}
        self.twice: list = []
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def __call__(self, handle, answer) -> None:
        with self.lock:
            if handle in self.by_handle:
                self.twice.append(handle)
            self.by_handle[handle] = answer
            self.done.notify_all()

    def wait(self, count: int, timeout_s: float = 20) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: len(self.by_handle) >= count, timeout_s), \
                f"only {len(self.by_handle)} of {count} answered"
        assert not self.twice


def make_engine(tmp_path, kind="sequence", policy="dva", executors=None, probe=None, **knob_values):
    if kind == "sequence":
        entry, reference = write_sequence_chain(tmp_path, favoured=(4, 2, 2))
        name = "seqm"
    else:
        entry, reference = write_mlp_chain(tmp_path)
        name = "mlp"
    spec = StagesSpec.from_manifest_entry(name, entry)
    knob_values.setdefault("max_batch_rows", spec.max_batch_size)
    knob_values.setdefault("stretch_max_rows", 2 * spec.max_batch_size)
    knobs = ReorchKnobs(**knob_values)
    answers = Answers()
    metrics = CountingMetrics()
    engine = ReorchEngine(spec, policy, knobs, executors or make_ort_executors(spec, tmp_path), answers,
                          metrics=metrics, cancel_probe=probe)
    return engine, answers, reference, metrics


def submit_in_waves(engine, requests, waves=6, pause_s=0.002):
    """Submit like a dynamic batcher would: several small batches, a little apart."""
    chunks = np.array_split(np.arange(len(requests)), waves)
    for chunk in chunks:
        engine.submit([(int(i), requests[int(i)]) for i in chunk])
        time.sleep(pause_s)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_the_whole_models_outputs_for_sequence_model(tmp_path, policy):
    engine, answers, reference, metrics = make_engine(tmp_path, "sequence", policy, stretch_max_wait_us=3000)
    rng = np.random.default_rng(7)
    lengths = [int(x) for x in rng.choice([3, 5, 9, 30, 31, 32], 60)]
    requests = [random_sequence_request(rng, int(rng.integers(1, 3)), n) for n in lengths]
    try:
        submit_in_waves(engine, requests, waves=12)
        answers.wait(len(requests))
    finally:
        engine.close()
    for index, request in enumerate(requests):
        answer = answers.by_handle[index]
        assert answer.kind == SUCCESS, answer.message
        want = reference(request["tokens"], request["attention_mask"])
        assert answer.outputs["hidden"].shape == want["hidden"].shape
        np.testing.assert_allclose(answer.outputs["hidden"], want["hidden"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer.outputs["pooled"], want["pooled"], rtol=1e-5, atol=1e-6)
        record = answer.record
        assert record["arrival_us"] <= record["stage0_entry_us"] <= record["exit_us"]
        assert len(record["batch_sizes"]) == 3
        # one [wait, compute] per stage, inside the request's time from stage 0 entry to exit
        times = record["stage_times_us"]
        assert len(times) == 3 and all(wait >= 0 and compute > 0 for wait, compute in times)
        assert sum(map(sum, times)) <= record["exit_us"] - record["stage0_entry_us"] + 1000  # perf_counter vs clock
    assert metrics.counters[(REQUESTS_TOTAL, "success")] == len(requests)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_the_whole_models_outputs_for_mlp(tmp_path, policy):
    engine, answers, reference, _ = make_engine(tmp_path, "mlp", policy)
    rng = np.random.default_rng(3)
    requests = [{"x": rng.standard_normal((int(rng.integers(1, 5)), 4)).astype(np.float32)} for _ in range(40)]
    try:
        submit_in_waves(engine, requests)
        answers.wait(len(requests))
    finally:
        engine.close()
    for index, request in enumerate(requests):
        answer = answers.by_handle[index]
        assert answer.kind == SUCCESS, answer.message
        np.testing.assert_allclose(answer.outputs["y"], reference(request["x"])["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy, want_buckets", [("input", {8, 32}), ("dva", {8, None})])
def test_bucketing_shows_up_in_records_and_metrics(tmp_path, policy, want_buckets):
    # dva buckets the short requests out; the long rest wastes little padding, so it goes FIFO
    engine, answers, _, metrics = make_engine(tmp_path, "sequence", policy)
    rng = np.random.default_rng(1)
    requests = [random_sequence_request(rng, 1, n) for n in [2, 30, 3, 31, 2, 32, 4, 29]]
    try:
        engine.submit([(i, r) for i, r in enumerate(requests)])
        answers.wait(len(requests))
    finally:
        engine.close()
    buckets = {answers.by_handle[i].record["bucket"] for i in range(len(requests))}
    assert buckets == want_buckets
    assert metrics.counters[("stagebatch_reorch_operations_total", "bucket")] >= len(want_buckets - {None})
    assert sum(v for (family, _), v in metrics.counters.items()
               if family == "stagebatch_reorch_stage_samples_total") == 3 * len(requests)


class PoisonExecutor:
    """Wraps an executor; raises when the batch carries NaN (the poison request's x)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def run(self, feeds):
        if np.isnan(feeds["stage0_out0"]).any():
            raise RuntimeError("poisoned batch")
        return self.inner.run(feeds)


def test_a_stage_that_raises_fails_only_its_batch_and_the_engine_goes_on(tmp_path):
    entry, reference = write_mlp_chain(tmp_path)
    spec = StagesSpec.from_manifest_entry("mlp", entry)
    executors = make_ort_executors(spec, tmp_path)
    engine, answers, reference, metrics = make_engine(
        tmp_path, "mlp", "pipeline", executors=[executors[0], PoisonExecutor(executors[1])])
    poison = {"x": np.full((1, 4), np.nan, np.float32)}
    good = {"x": np.ones((1, 4), np.float32)}
    try:
        engine.submit([("poison", poison), ("same-batch", good)])
        answers.wait(2)
        engine.submit([("later", good)])
        answers.wait(3)
    finally:
        engine.close()
    assert answers.by_handle["poison"].kind == STAGE_ERROR
    assert "stage 1 failed: RuntimeError: poisoned batch" in answers.by_handle["poison"].message
    assert answers.by_handle["same-batch"].kind == STAGE_ERROR
    assert answers.by_handle["later"].kind == SUCCESS
    assert metrics.counters[(REQUESTS_TOTAL, "error")] == 2


BAD_REQUESTS = [
    ({"tokens": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int64)}, "must be int64"),
    ({"tokens": np.zeros((1, 4), np.int64)}, "missing input 'attention_mask'"),
    ({"tokens": np.zeros((9, 4), np.int64), "attention_mask": np.ones((9, 4), np.int64)}, "1..8 rows"),
    ({"tokens": np.full((1, 4), 50, np.int64), "attention_mask": np.ones((1, 4), np.int64)}, "values must lie"),
    ({"tokens": np.zeros((1, 33), np.int64), "attention_mask": np.ones((1, 33), np.int64)}, "sequence length 33"),
    ({"tokens": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 5), np.int64)}, "disagree"),
    ({"tokens": np.zeros((4,), np.int64), "attention_mask": np.ones((4,), np.int64)}, "dimensions"),
    ({"tokens": np.zeros((2, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)}, "batch size"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_bad_requests_are_answered_at_once_with_invalid(tmp_path, bad, message):
    engine, answers, _, _ = make_engine(tmp_path, "sequence", "dva")
    good = random_sequence_request(np.random.default_rng(0), 1, 5)
    try:
        engine.submit([("bad", bad), ("good", good)])
        answers.wait(2)
    finally:
        engine.close()
    assert answers.by_handle["bad"].kind == INVALID and message in answers.by_handle["bad"].message
    assert answers.by_handle["good"].kind == SUCCESS


class SlowExecutor:
    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def run(self, feeds):
        time.sleep(self.delay_s)
        return self.inner.run(feeds)


def test_cancelled_requests_are_dropped_at_the_next_boundary(tmp_path):
    entry, _ = write_mlp_chain(tmp_path)
    spec = StagesSpec.from_manifest_entry("mlp", entry)
    executors = [SlowExecutor(r, 0.05) for r in make_ort_executors(spec, tmp_path)]
    cancelled = {"c1", "c2"}
    engine, answers, _, _ = make_engine(
        tmp_path, "mlp", "pipeline", executors=executors,
        probe=lambda handles: [h in cancelled for h in handles])
    x = {"x": np.ones((1, 4), np.float32)}
    try:
        engine.submit([("c1", x), ("ok", x)])
        engine.submit([("c2", x)])
        answers.wait(3)
    finally:
        engine.close()
    assert answers.by_handle["c1"].kind == CANCELLED and answers.by_handle["c2"].kind == CANCELLED
    assert answers.by_handle["ok"].kind == SUCCESS
    assert answers.by_handle["c1"].record["batch_sizes"] == [2]  # ran stage 0, dropped before stage 1


def test_close_answers_everything_pending_and_later_requests(tmp_path):
    entry, _ = write_mlp_chain(tmp_path)
    spec = StagesSpec.from_manifest_entry("mlp", entry)
    executors = [SlowExecutor(r, 0.2) for r in make_ort_executors(spec, tmp_path)]
    engine, answers, _, _ = make_engine(tmp_path, "mlp", "dva", executors=executors)
    x = {"x": np.ones((1, 4), np.float32)}
    engine.submit([(i, x) for i in range(5)])
    engine.close()
    answers.wait(5)
    engine.submit([("late", x)])
    answers.wait(6)
    assert {a.kind for a in answers.by_handle.values()} == {SHUTDOWN}
    assert answers.by_handle[0].message == "shutting down"


def test_trace_jsonl_has_one_line_per_request(tmp_path):
    trace = tmp_path / "trace.jsonl"
    engine, answers, _, _ = make_engine(tmp_path, "mlp", "dva", trace_jsonl=str(trace))
    x = {"x": np.ones((2, 4), np.float32)}
    try:
        engine.submit([(i, x) for i in range(4)])
        answers.wait(4)
    finally:
        engine.close()
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 4 and all(line["outcome"] == "success" for line in lines)
    assert all(line["batch_sizes"] for line in lines)


def test_a_near_empty_stage_keeps_no_favoured_batch_size(tmp_path):
    entry, _ = write_sequence_chain(tmp_path, favoured=(4, 1, 2))
    entry["stages"][1]["cost_share"] = 0.01  # its profile is per-call noise: splitting before it only adds calls
    spec = StagesSpec.from_manifest_entry("seqm", entry)
    assert spec.favoured_batch_sizes[1] == spec.max_batch_size
    assert spec.favoured_batch_sizes[0] == 4


@pytest.mark.parametrize("count, responders", [(5000, 1), (5000, 4)])
def test_5000_concurrent_requests_are_each_answered_exactly_once(tmp_path, count, responders):
    engine, answers, reference, _ = make_engine(tmp_path, "mlp", "dva", responder_threads=responders)
    rng = np.random.default_rng(3)
    requests = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(count)]
    try:
        for start in range(0, count, 16):  # dynamic-batcher sized batches, all at once
            engine.submit([(i, requests[i]) for i in range(start, min(count, start + 16))])
        answers.wait(count, timeout_s=120)
    finally:
        engine.close()
    assert sorted(answers.by_handle) == list(range(count)) and not answers.twice
    assert all(answer.kind == SUCCESS for answer in answers.by_handle.values())
    for index in range(0, count, 997):
        np.testing.assert_allclose(answers.by_handle[index].outputs["y"], reference(requests[index]["x"])["y"],
                                   rtol=1e-5, atol=1e-6)


# ---- the inline path (run_inline): what a served model runs for every batch at steady load ------------
CHEAP_TABLES = [{1: 0.02, 8: 0.05}] * 3  # 20 µs stages: boundaries cannot pay, so every batch runs fused


class ChainAsWhole:
    """A whole-model graph for fused runs (``ReorchEngine(whole=...)``), made of the stage graphs run in turn."""

    def __init__(self, spec: StagesSpec, executors) -> None:
        self.stage = StageSpec(WHOLE_GRAPH, "whole.onnx", tuple(t.name for t in spec.inputs),
                               tuple(t.name for t in spec.outputs), spec.max_batch_size)
        self.executors = executors
        self.batches: list[int] = []

    def run(self, feeds):
        self.batches.append(next(iter(feeds.values())).shape[0])
        tensors = dict(feeds)
        for executor in self.executors:
            tensors.update(executor.run({name: tensors[name] for name in executor.stage.inputs}))
        return {name: tensors[name] for name in self.stage.outputs}


def make_inline_engine(tmp_path, with_whole: bool):
    entry, reference = write_sequence_chain(tmp_path, favoured=(4, 2, 2))
    for stage, table in zip(entry["stages"], CHEAP_TABLES):
        stage["latency_ms"] = {str(b): ms for b, ms in table.items()}
    spec = StagesSpec.from_manifest_entry("seqm", entry)
    executors = make_ort_executors(spec, tmp_path)
    whole = ChainAsWhole(spec, executors) if with_whole else None
    answers, metrics = Answers(), CountingMetrics()
    engine = ReorchEngine(spec, "dva", ReorchKnobs(max_batch_rows=8), executors, answers, metrics=metrics,
                          whole=whole)
    return engine, answers, reference, metrics, whole


@pytest.mark.parametrize("with_whole", [True, False])
def test_inline_batches_without_records_get_the_whole_models_outputs_once_each(tmp_path, with_whole):
    """The served steady-load path: no record asked, every request valid (run_inline's short path)."""
    engine, answers, reference, metrics, whole = make_inline_engine(tmp_path, with_whole)
    rng = np.random.default_rng(11)
    batches = [[random_sequence_request(rng, rows, n) for rows, n in [(1, 3), (2, 9), (1, 5), (3, 7)]],
               [random_sequence_request(rng, 1, 6)],  # one request at its own length: its tensors are the feeds
               [random_sequence_request(rng, 1, n) for n in (32, 1, 17, 2, 9, 4, 30, 8)],
               [random_sequence_request(rng, rows, 6) for rows in (1, 2, 1, 3)]]  # one length: nothing to pad or cut
    try:
        results = [engine.run_inline([((b, i), r) for i, r in enumerate(batch)], [False] * len(batch))
                   for b, batch in enumerate(batches)]
        # Then one batch through the stage scheduler: its operations are reported by the other path.
        engine.submit([("staged", random_sequence_request(rng, 1, 4))])
        answers.wait(1)
    finally:
        engine.close()
    for b, (batch, result) in enumerate(zip(batches, results)):
        assert result is not None and [handle for handle, _ in result] == [(b, i) for i in range(len(batch))]
        for (_, answer), request in zip(result, batch):
            assert answer.kind == SUCCESS and answer.ok, answer.message
            assert answer.record == {}  # nobody asked: no record built
            assert set(answer.outputs) == {"hidden", "pooled"}
            want = reference(request["tokens"], request["attention_mask"])
            assert answer.outputs["hidden"].shape == want["hidden"].shape  # cut back to its own length
            np.testing.assert_allclose(answer.outputs["hidden"], want["hidden"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(answer.outputs["pooled"], want["pooled"], rtol=1e-5, atol=1e-6)
    if whole is not None:
        assert whole.batches[:4] == [7, 1, 8, 7]  # each batch ran the whole graph once
    assert answers.by_handle["staged"].kind == SUCCESS
    total = sum(len(batch) for batch in batches)
    assert metrics.counters[(REQUESTS_TOTAL, "success")] == total + 1
    assert metrics.counters[(INLINE_EXECUTIONS_TOTAL, "")] == len(batches)
    # Every decision counted once in the metrics, whichever path reported it.
    assert engine.scheduler.operation_counts[FUSE] == len(batches) + 1
    assert metrics.counters[(OPERATIONS_TOTAL, FUSE)] == engine.scheduler.operation_counts[FUSE]
    assert engine.inflight_requests == 0


def test_inline_batch_with_a_bad_request_or_an_asked_record_answers_each_once_in_order(tmp_path):
    engine, _, reference, metrics, _ = make_inline_engine(tmp_path, True)
    rng = np.random.default_rng(12)
    good = [random_sequence_request(rng, 1, n) for n in (4, 8)]
    try:
        mixed = engine.run_inline([("a", good[0])] + [(f"bad{i}", bad) for i, (bad, _) in enumerate(BAD_REQUESTS)]
                                  + [("b", good[1])], [False] * (len(BAD_REQUESTS) + 2))
        asked = engine.run_inline([("plain", good[0]), ("asks", good[1])], [False, True])
    finally:
        engine.close()
    assert [handle for handle, _ in mixed] == ["a"] + [f"bad{i}" for i in range(len(BAD_REQUESTS))] + ["b"]
    for (_, answer), (_, message) in zip(mixed[1:-1], BAD_REQUESTS):
        assert answer.kind == INVALID and message in answer.message and answer.outputs is None
    for (_, answer), request in zip([mixed[0], mixed[-1]], good):
        assert answer.kind == SUCCESS
        np.testing.assert_allclose(answer.outputs["hidden"], reference(request["tokens"], request["attention_mask"])
                                   ["hidden"], rtol=1e-5, atol=1e-6)
    assert asked[0][1].record == {} and asked[1][1].record["ops"] == [{"op": FUSE, "stage": 0}]
    assert metrics.counters[(REQUESTS_TOTAL, "error")] == len(BAD_REQUESTS)
    assert metrics.counters[(REQUESTS_TOTAL, "success")] == 4


def test_quick_shape_agrees_with_validate(tmp_path):
    engine, _, _, _, _ = make_inline_engine(tmp_path, False)
    rng = np.random.default_rng(13)
    try:
        for rows, n in [(1, 1), (8, 32), (3, 17)]:
            request = random_sequence_request(rng, rows, n)
            assert engine.quick_shape(request) == engine.validate(request) == (rows, n)
        for bad, message in BAD_REQUESTS:
            with pytest.raises(BadRequestError, match=message):
                engine.validate(bad)
            if message != "values must lie":  # value ranges are checked once per batch instead
                assert engine.quick_shape(bad) is None, message
    finally:
        engine.close()


def test_split_even_gives_each_member_its_rows_and_refuses_a_broken_contract():
    stage = StageSpec(WHOLE_GRAPH, "whole.onnx", ("x",), ("y", "z"), 8)
    y, z = np.arange(24, dtype=np.float32).reshape(6, 4), np.arange(6, dtype=np.int64)
    pieces = split_even(stage, {"y": y, "z": z, "extra": y}, [1, 3, 2])
    assert [sorted(p) for p in pieces] == [["y", "z"]] * 3
    assert [p["y"].shape for p in pieces] == [(1, 4), (3, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in pieces]), y)
    np.testing.assert_array_equal(pieces[1]["z"], [1, 2, 3])
    assert all(p["y"].flags.c_contiguous for p in pieces)
    with pytest.raises(StageContractError, match="did not return its output 'z'"):
        split_even(stage, {"y": y}, [6])
    with pytest.raises(StageContractError, match="batch-first"):
        split_even(stage, {"y": y, "z": z}, [1, 2])
