"""Request building from a manifest entry, spec validation and schedule partitioning (no server)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from loadtest.driver import LoadJob, LoadSpec, validate_spec
from loadtest.request_factory import RequestFactory, model_entry
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.errors import ConfigValidationError

MANIFEST = {
    "schema_version": 1,
    "target": "embedded",
    "models": {
        "bert": {
            "family": "bert", "size": "tiny", "max_batch_size": 16,
            "variants": {"whole": "bert", "ensemble": "bert_ensemble", "reorch": "bert_reorch"},
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 30522],
                 "sequence_axis": 1, "pad_value": 0},
                {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 2],
                 "sequence_axis": 1, "pad_value": 0, "role": "attention_mask"},
            ],
            "outputs": [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 32], "sequence_axis": 1}],
            "sequence": {"max_length": 64, "min_length": 1},
        },
        "cnn": {
            "family": "cnn", "size": "tiny", "max_batch_size": 8, "variants": {"whole": "cnn"},
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
            "sequence": None,
        },
    },
}  # fmt: skip


def test_ragged_variant_gets_tensors_of_the_real_length_with_a_full_mask():
    factory = RequestFactory(model_entry(MANIFEST, "bert"), "whole", rows=2, seed=0)
    arrays = factory.arrays(10)
    assert arrays["input_ids"].shape == (2, 10) and arrays["input_ids"].dtype == np.int64
    assert np.all(arrays["attention_mask"] == 1)
    assert arrays["input_ids"].min() >= 0 and arrays["input_ids"].max() < 30522


def test_non_ragged_variant_is_padded_to_max_length_with_mask_zero_after_the_real_length():
    gpu = copy.deepcopy(MANIFEST)
    gpu["target"] = "gpu"
    entry = model_entry(gpu, "bert")
    assert entry.is_ragged("reorch") and not entry.is_ragged("whole")
    arrays = RequestFactory(entry, "whole", seed=1).arrays(10)
    assert arrays["input_ids"].shape == (1, 64)
    assert arrays["attention_mask"][0, :10].tolist() == [1] * 10
    assert arrays["attention_mask"][0, 10:].tolist() == [0] * 54
    assert np.all(arrays["input_ids"][0, 10:] == 0)  # pad_value after the real length
    assert RequestFactory(entry, "reorch").arrays(10)["input_ids"].shape == (1, 10)


def test_explicit_ragged_variants_override_the_target_default():
    manifest = copy.deepcopy(MANIFEST)
    manifest["models"]["bert"]["ragged_variants"] = ["reorch"]
    assert RequestFactory(model_entry(manifest, "bert"), "ensemble").arrays(5)["input_ids"].shape == (1, 64)


def test_fixed_shape_model_gets_its_shape_and_float_values():
    arrays = RequestFactory(model_entry(MANIFEST, "cnn"), "whole", rows=3).arrays(None)
    assert arrays["images"].shape == (3, 3, 8, 8) and arrays["images"].dtype == np.float32


def test_request_proto_carries_names_datatypes_shapes_and_bytes():
    factory = RequestFactory(model_entry(MANIFEST, "bert"), "reorch", seed=0, variety=2)
    request = factory.request_proto(7)
    assert request.model_name == "bert_reorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("input_ids", "INT64", [1, 7]),
        ("attention_mask", "INT64", [1, 7]),
    ]
    assert [len(raw) for raw in request.raw_input_contents] == [7 * 8, 7 * 8]
    # a few prepared requests per length are reused round robin
    again = [factory.request_proto(7) for _ in range(3)]
    assert again[1] is request and again[0] is not request


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: model_entry(MANIFEST, "gpt"), "model 'gpt' is not in the manifest; it has: bert, cnn"),
        (lambda: RequestFactory(model_entry(MANIFEST, "cnn"), "reorch"), "has no variant 'reorch'"),
        (lambda: RequestFactory(model_entry(MANIFEST, "cnn"), "whole", rows=9), r"rows=9 .* max_batch_size=8"),
        (lambda: RequestFactory(model_entry(MANIFEST, "bert"), "whole").arrays(65), r"outside .* \[1, 64\]"),
        (lambda: RequestFactory(model_entry(MANIFEST, "cnn"), "whole").arrays(4), "no sequence axis"),
    ],
)
def test_request_building_errors_name_the_field_and_the_fix(call, message):
    with pytest.raises(ConfigValidationError, match=message):
        call()


def test_manifest_inputs_of_unsupported_datatype_are_rejected():
    manifest = copy.deepcopy(MANIFEST)
    manifest["models"]["cnn"]["inputs"][0]["datatype"] = "BYTES"
    with pytest.raises(ConfigValidationError, match="datatype 'BYTES' cannot be generated"):
        model_entry(manifest, "cnn")


def test_validate_spec_checks_lengths_against_the_manifest():
    good = LoadSpec("bert", "whole", ArrivalSpec("poisson", rate_rps=5), LengthSpec("uniform", min_length=1, max_length=64), 1.0)
    validate_spec(MANIFEST, good)
    with pytest.raises(ConfigValidationError, match=r"\[1, 64\]"):
        validate_spec(MANIFEST, LoadSpec("bert", "whole", ArrivalSpec("closed", users=1), LengthSpec("fixed", length=65), 1.0))
    with pytest.raises(ConfigValidationError, match="no sequence axis"):
        validate_spec(MANIFEST, LoadSpec("cnn", "whole", ArrivalSpec("closed", users=1), LengthSpec("fixed", length=4), 1.0))
    with pytest.raises(ConfigValidationError, match="variant 'fast'"):
        LoadSpec("cnn", "fast", ArrivalSpec("closed", users=1), None, 1.0)


def test_load_plan_round_trips_through_json():
    spec = LoadSpec("bert", "reorch", ArrivalSpec.parse("bursty:rate_rps=9,on_s=1,off_s=2"),
                    LengthSpec("longtail", median=8, sigma=0.5), duration_s=3, warmup_s=1, seed=5, priority=1)
    plan = LoadJob("127.0.0.1:1", spec, MANIFEST["models"]["bert"], processes=3, start_epoch_s=12.5)
    assert LoadJob.from_json(plan.to_json()) == plan


def test_open_loop_schedule_is_the_same_in_every_process_and_partitions_exactly():
    from loadtest.sender import open_loop_schedule

    spec = LoadSpec("bert", "whole", ArrivalSpec("poisson", rate_rps=300), LengthSpec("uniform", min_length=1, max_length=64),
                    duration_s=4, warmup_s=1, seed=3)
    plan = LoadJob("127.0.0.1:1", spec, MANIFEST["models"]["bert"], processes=3)
    times, lengths = open_loop_schedule(plan)
    times2, lengths2 = open_loop_schedule(plan)
    assert np.array_equal(times, times2) and np.array_equal(lengths, lengths2)
    shares = [times[k::3] for k in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == times.tolist()
    assert lengths.min() >= 1 and lengths.max() <= 64 and len(lengths) == len(times)


def _record(t_send_us: int, late_us: int = 0, ok: bool = True):
    from loadtest.client import RequestRecord

    return RequestRecord(t_send_us=t_send_us, latency_us=100, model="bert", variant="whole", seq_len=4, rows=1,
                         ok=ok, error=None if ok else "UNAVAILABLE: down", server=None, late_us=late_us)


def test_result_keeps_the_window_by_scheduled_time_and_explains_generator_trouble(tmp_path):
    from loadtest.driver import _result

    spec = LoadSpec("bert", "whole", ArrivalSpec("poisson", rate_rps=5), None, duration_s=2.0, warmup_s=1.0)
    start_s = 1000.0
    base = int(start_s * 1e6)
    records = [
        _record(base + 500_000),                      # warm-up: excluded
        _record(base + 1_003_000, late_us=5_000),     # scheduled at 0.998 s (warm-up) but sent late: excluded
        _record(base + 1_000_000),                    # first of the window
        _record(base + 2_500_000, late_us=3_000),     # late beyond the 2 ms tolerance
        _record(base + 2_999_999, ok=False),
        _record(base + 3_000_000),                    # end of the window: excluded
    ]
    summary = {"start_epoch_s": start_s, "warnings": [],
               "processes": [{"index": 0, "cpu_percent": 91.0, "scheduled_in_window": 3}]}
    out = tmp_path / "records.jsonl"
    result = _result(spec, summary, records, out)
    assert [r.t_send_us - base for r in result.records] == [1_000_000, 2_500_000, 2_999_999]
    assert result.late_arrivals == 1 and result.errors == 1
    assert result.loadgen_cpu_percent == 91.0
    text = " | ".join(result.warnings)
    assert "91% of a core" in text and "1 of 3 arrivals were sent more than 2000 µs" in text
    assert "1 of 3 requests failed; first error: UNAVAILABLE: down" in text
    assert len(out.read_text().splitlines()) == 3
