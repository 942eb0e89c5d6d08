"""Server-side deltas: Triton statistics JSON and the reorchestrator's Prometheus counters."""

from __future__ import annotations

import math

from loadtest.server_stats import diff_reorch_metrics, diff_statistics, flatten_statistics, parse_prometheus


def _stats(inference, execution, success, queue_ns, infer_ns, batches):
    # the shape tritonclient's get_inference_statistics(as_json=True) returns (uint64 as strings)
    return {
        "name": "m",
        "version": "1",
        "inference_count": str(inference),
        "execution_count": str(execution),
        "inference_stats": {
            "success": {"count": str(success), "ns": "0"},
            "fail": {},
            "queue": {"count": str(success), "ns": str(queue_ns)},
            "compute_input": {"count": str(execution), "ns": "0"},
            "compute_infer": {"count": str(execution), "ns": str(infer_ns)},
            "compute_output": {"count": str(execution), "ns": "0"},
        },
        "batch_stats": [
            {"batch_size": str(size), "compute_infer": {"count": str(n), "ns": "1"}}
            for size, n in batches.items()
        ],
    }


def test_diff_statistics_gives_per_point_counts_and_histogram():
    before = {"m": flatten_statistics(_stats(10, 5, 10, 1_000_000, 2_000_000, {1: 2, 4: 3}))}
    after = {"m": flatten_statistics(_stats(30, 9, 30, 5_000_000, 6_000_000, {1: 2, 4: 6, 8: 1}))}
    delta = diff_statistics(before, after)["m"]
    assert (delta.inference_count, delta.execution_count, delta.success) == (20, 4, 20)
    assert delta.batch_histogram == {4: 3, 8: 1}  # batch size 1 did not run during the point
    assert delta.avg_batch_size == 5.0
    assert delta.queue_us == 4000.0 and delta.avg_queue_us == 200.0
    assert delta.compute_infer_us == 4000.0
    assert delta.to_dict()["batch_histogram"] == {"4": 3, "8": 1}


def test_diff_statistics_counts_from_zero_for_a_model_loaded_during_the_point():
    after = {"m": flatten_statistics(_stats(3, 1, 3, 0, 0, {3: 1}))}
    delta = diff_statistics({}, after)["m"]
    assert delta.execution_count == 1 and delta.batch_histogram == {3: 1}
    assert math.isnan(diff_statistics({}, {"x": {}})["x"].avg_batch_size)


_BEFORE = """# HELP stagebatch_reorch_operations_total ops
# TYPE stagebatch_reorch_operations_total counter
stagebatch_reorch_operations_total{model="bert_reorch",operation="stretch"} 3
stagebatch_reorch_operations_total{model="other_reorch",operation="stretch"} 100
stagebatch_reorch_stage_executions_total{model="bert_reorch",stage="0"} 10
stagebatch_reorch_stage_samples_total{model="bert_reorch",stage="0"} 40
nv_inference_count{model="bert",version="1"} 7
"""
_AFTER = """stagebatch_reorch_operations_total{model="bert_reorch",operation="stretch"} 8
stagebatch_reorch_operations_total{model="bert_reorch",operation="bucket"} 2
stagebatch_reorch_operations_total{model="other_reorch",operation="stretch"} 150
stagebatch_reorch_requests_total{model="bert_reorch",outcome="success"} 12
stagebatch_reorch_stage_executions_total{model="bert_reorch",stage="0"} 14
stagebatch_reorch_stage_samples_total{model="bert_reorch",stage="0"} 64
stagebatch_reorch_stage_queue_us_total{model="bert_reorch",stage="0"} 2400
stagebatch_reorch_stage_compute_us_total{model="bert_reorch",stage="0"} 8000
"""


def test_diff_reorch_metrics_keeps_only_the_model_and_subtracts():
    delta = diff_reorch_metrics(_BEFORE, _AFTER, "bert_reorch")
    assert delta.operations == {"stretch": 5, "bucket": 2}
    assert delta.requests == {"success": 12}
    stage = delta.to_dict()["stages"]["0"]
    assert stage["executions"] == 4 and stage["samples"] == 24 and stage["avg_batch_size"] == 6


def test_parse_prometheus_reads_labels_and_skips_comments():
    samples = parse_prometheus(_BEFORE)
    assert samples[("nv_inference_count", (("model", "bert"), ("version", "1")))] == 7
    assert all(not name.startswith("#") for name, _ in samples)
    assert len(parse_prometheus(_BEFORE, prefix="stagebatch_reorch_")) == 4
