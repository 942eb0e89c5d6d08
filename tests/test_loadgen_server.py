"""The load driver and the Locust file against the embedded Triton server with tiny models.

One server serves the whole module (tiny models from ``loadtest.tiny_models``); each test runs a short
load through :func:`run_load` (a child process running Locust) or ``locust -f`` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.driver import LoadSpec, run_load
from loadtest.tiny_models import ERROR_LENGTH, build_repository
from loadtest.workloads import ArrivalSpec, LengthSpec
from core.server import EmbeddedTriton

pytestmark = pytest.mark.server

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repository = tmp_path_factory.mktemp("loadgen_repo")
    manifest = build_repository(repository)
    with EmbeddedTriton(repository) as server:
        yield server, manifest, repository


def test_closed_loop_answers_every_request_inside_the_window(served, tmp_path):
    server, manifest, _ = served
    spec = LoadSpec("ident", "whole", ArrivalSpec("closed", users=3), None, duration_s=1.5, warmup_s=0.5)
    records_path = tmp_path / "records.jsonl"
    result = run_load(server.grpc_url, manifest, spec, records_path=records_path)
    assert len(result.records) > 50
    assert all(r.ok and r.error is None for r in result.records), result.warnings
    start_us = result.start_epoch_s * 1e6
    assert all(start_us + 0.5e6 <= r.t_send_us < start_us + 2.0e6 for r in result.records)
    assert all(r.latency_us > 0 and r.seq_len is None and r.variant == "whole" for r in result.records)
    assert result.late_arrivals == 0 and 0 < result.loadgen_cpu_percent
    lines = records_path.read_text().splitlines()
    assert len(lines) == len(result.records)
    assert json.loads(lines[0])["request_id"] == result.records[0].request_id


def test_open_loop_sends_every_scheduled_arrival_with_its_length(served):
    server, manifest, _ = served
    spec = LoadSpec("seq", "whole", ArrivalSpec("poisson", rate_rps=80), LengthSpec("uniform", min_length=4, max_length=32),
                    duration_s=2.0, warmup_s=0.5, seed=1)
    result = run_load(server.grpc_url, manifest, spec)
    assert result.scheduled_arrivals > 100
    assert len(result.records) == result.scheduled_arrivals  # none lost, none skipped
    assert all(r.ok for r in result.records), result.warnings
    assert {r.seq_len for r in result.records} <= set(range(4, 33))
    assert len({r.seq_len for r in result.records}) > 10


def test_reorch_streaming_matches_responses_and_errors_to_their_requests(served):
    server, manifest, _ = served
    # 8 closed-loop users keep several requests in flight on one stream; length 3 is refused by the model
    spec = LoadSpec("seq", "reorch", ArrivalSpec("closed", users=8), LengthSpec("uniform", min_length=1, max_length=6),
                    duration_s=1.5, client_timeout_s=10.0, seed=2, protocol="stream")
    result = run_load(server.grpc_url, manifest, spec)
    failed = [r for r in result.records if not r.ok]
    succeeded = [r for r in result.records if r.ok]
    assert failed and succeeded
    assert all(r.seq_len == ERROR_LENGTH and "refused" in r.error for r in failed)
    assert all(r.seq_len != ERROR_LENGTH for r in succeeded)
    # the stand-in reorchestrator reports the request's length as its bucket
    assert all(r.server is not None and r.server["bucket"] == r.seq_len for r in succeeded)
    assert not any("matched no request" in w for w in result.warnings)


def test_distributed_mode_splits_one_schedule_over_two_workers(served):
    server, manifest, _ = served
    spec = LoadSpec("ident", "whole", ArrivalSpec("constant", rate_rps=100), None, duration_s=1.5, seed=4)
    result = run_load(server.grpc_url, manifest, spec, workers=2)
    assert result.scheduled_arrivals == 150
    assert len(result.records) == 150 and all(r.ok for r in result.records), result.warnings
    by_worker = {w: [r for r in result.records if r.worker == w] for w in (0, 1)}
    assert len(by_worker[0]) == len(by_worker[1]) == 75
    # constant arrivals every 10 ms, alternating between the workers: sorted sends stay on that grid
    start_us = result.start_epoch_s * 1e6
    scheduled = sorted(round((r.t_send_us - r.late_us - start_us) / 1e4) for r in result.records)
    assert scheduled == list(range(150))


def test_trace_replay_through_the_driver(served, tmp_path):
    server, manifest, _ = served
    trace = tmp_path / "trace.csv"
    trace.write_text("".join(f"{0.02 * i:.3f},{1 + i % 30}\n" for i in range(40)))
    spec = LoadSpec("seq", "whole", ArrivalSpec("trace", trace_path=str(trace)), None, duration_s=1.0)
    result = run_load(server.grpc_url, manifest, spec)
    assert [r.seq_len for r in result.records] == [1 + i % 30 for i in range(40)]
    assert all(r.ok for r in result.records)


def test_locust_headless_command_line_writes_raw_records(served, tmp_path):
    server, _, repository = served
    records = tmp_path / "cli.jsonl"
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
        "--host", server.grpc_url, "-u", "2", "-r", "2", "-t", "3s", "--only-summary",
        "--sb-manifest", str(repository / "manifest.json"), "--sb-model", "seq",
        "--sb-lengths", "uniform:min_length=4,max_length=16", "--sb-records", str(records),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) > 20 and all(row["ok"] and 4 <= row["seq_len"] <= 16 for row in rows)
    assert "seq/whole" in completed.stdout + completed.stderr  # Locust's own statistics still work


def test_locust_command_line_reports_a_bad_model_in_one_line(served, tmp_path):
    server, _, repository = served
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
        "--host", server.grpc_url, "-u", "1", "-t", "2s",
        "--sb-manifest", str(repository / "manifest.json"), "--sb-model", "nope",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert completed.returncode == 1
    assert "error: model 'nope' is not in the manifest; it has: ident, seq" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_driver_parses_the_real_reorchestrators_records(tmp_path):
    """Against backends/reorch (helper R's reorchestrator) rather than the stand-in echo model."""
    from reorch_models import write_sequence_chain

    from core.reorch_deploy import write_reorch_model

    entry, _ = write_sequence_chain(tmp_path, "seqm")
    write_reorch_model(tmp_path, "seqm", entry, max_batch_size=8, queue_delay_us=1000, policy="dva")
    manifest = {"schema_version": 1, "target": "embedded", "models": {"seqm": entry}}
    spec = LoadSpec("seqm", "reorch", ArrivalSpec("poisson", rate_rps=60), LengthSpec("uniform", min_length=1, max_length=32),
                    duration_s=1.5, warmup_s=0.5, seed=3)
    with EmbeddedTriton(tmp_path, models=[entry["variants"]["reorch"]]) as server:
        result = run_load(server.grpc_url, manifest, spec)
    assert len(result.records) == result.scheduled_arrivals > 30
    assert all(r.ok for r in result.records), result.warnings
    stages = len(entry["stages"])
    for record in result.records:
        assert record.server is not None and len(record.server["batch_sizes"]) == stages
        assert record.server["arrival_us"] <= record.server["exit_us"]


@pytest.mark.parametrize("model,protocol,variant", [("ident", "unary", "whole"), ("seq", "stream", "reorch")])
def test_cross_check_times_both_generators_on_the_wire(served, model, protocol, variant):
    """perf_analyzer and ours on one schedule, each window also timed by the kernel: every side has
    its wire percentiles, and a generator never reads a p50 below the wire's (it stamps before its
    bytes leave and after the answer's arrive)."""
    from loadtest.perf_analyzer import PerfAnalyzerUnavailable, cross_check, ensure_perf_analyzer
    from loadtest.wire import LoopbackCapture, WireUnavailable

    try:
        analyzer = ensure_perf_analyzer()
        LoopbackCapture(0).close()
    except (PerfAnalyzerUnavailable, WireUnavailable) as error:
        pytest.skip(str(error))
    server, manifest, _ = served
    lengths = LengthSpec("fixed", length=4) if model == "seq" else None
    spec = LoadSpec(model, variant, ArrivalSpec("poisson", rate_rps=100), lengths, duration_s=2.0, warmup_s=0.5,
                    protocol=protocol)
    check = cross_check(server.grpc_url, manifest, spec, analyzer=analyzer)
    assert check["status"] == "ok", check["reason"]
    assert check["wire"] == {"status": "ok", "reason": None}
    for name in ("perf_analyzer", "stagebatch"):
        side = check[name]
        assert side["requests"] > 150
        assert 0 < side["wire_p50_ms"] <= side["p50_ms"], (name, side)
        assert side["wire_p50_ms"] <= side["wire_p99_ms"]
