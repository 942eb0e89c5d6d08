"""perf_analyzer's setup fails with a clear message, never a traceback, where it cannot be had (no server)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import loadtest.perf_analyzer as pa
from loadtest.driver import LoadJob, LoadSpec
from loadtest.workloads import ArrivalSpec

MANIFEST = {
    "target": "embedded",
    "models": {"ident": {"max_batch_size": 8, "variants": {"whole": "ident"},
                         "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": []}},
}  # fmt: skip


def _failing_pip(monkeypatch):
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if "download" in command:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for tritonclient==2.51.0")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(pa.subprocess, "run", run)


def test_perf_analyzer_setup_names_the_wheel_and_the_fix_when_it_cannot_be_downloaded(tmp_path, monkeypatch):
    _failing_pip(monkeypatch)
    with pytest.raises(pa.PerfAnalyzerUnavailable, match=r"cannot download the tritonclient==2\.51\.0 wheel .*No matching") as error:
        pa.ensure_perf_analyzer(tmp_path / "cache")
    assert "Fix:" in str(error.value)


def test_perf_analyzer_setup_names_each_missing_library_and_how_to_get_it(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "perf_analyzer").write_text("#!/bin/sh\n")  # a binary is there, its libraries are not
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pa.PerfAnalyzerUnavailable) as error:
        pa.ensure_perf_analyzer(cache, search_dirs=[empty], download=False)
    message = str(error.value)
    assert "libb64.so.0d (fix: apt-get install -y libb64-0d" in message
    assert "libcudart.so.12 (fix: pip install nvidia-pytriton" in message


def test_cross_check_is_skipped_with_the_reason_when_perf_analyzer_cannot_be_had(tmp_path, monkeypatch):
    _failing_pip(monkeypatch)
    spec = LoadSpec("ident", "whole", ArrivalSpec("poisson", rate_rps=100), None, duration_s=1.0)
    result = pa.cross_check("127.0.0.1:1", MANIFEST, spec, cache_dir=tmp_path / "cache")
    assert result["status"] == "skipped" and "cannot download" in result["reason"]
    assert result["perf_analyzer"] is None and result["rate_rps"] == 100 and result["variant"] == "whole"


def test_cross_check_is_skipped_for_a_closed_loop_point():
    spec = LoadSpec("ident", "whole", ArrivalSpec("closed", users=2), None, 1.0)
    result = pa.cross_check("127.0.0.1:1", MANIFEST, spec)
    assert result["status"] == "skipped" and "open-loop" in result["reason"]


class FakeAnalyzer(pa.PerfAnalyzer):
    """Writes a profile export like perf_analyzer 2.51's: every scheduled request answered after 1 ms,
    then ``extra`` more requests past --request-count answered after 50 ms."""

    def __init__(self, extra: int) -> None:
        super().__init__(pa.Path("perf_analyzer"), pa.Path("."))
        self.extra = extra
        self.args: list[str] = []

    def run(self, args, timeout_s):
        self.args = args
        count = int(args[args.index("--request-count") + 1])
        gaps_us = [int(v) for v in open(args[args.index("--request-intervals") + 1]).read().split()]
        sent_ns, requests = 10**12, []
        for index in range(count + self.extra):
            sent_ns += gaps_us[index % len(gaps_us)] * 1000
            latency_ns = 1_000_000 if index < count else 50_000_000
            requests.append({"timestamp": sent_ns, "response_timestamps": [sent_ns + latency_ns]})
        profile = args[args.index("--profile-export-file") + 1]
        pa.Path(profile).write_text(json.dumps({"experiments": [{"requests": requests[::-1]}]}))
        return subprocess.CompletedProcess(args, 0, "", "")


def test_run_schedule_measures_the_scheduled_requests_after_the_warmup_only_when_perf_analyzer_sends_more():
    spec = LoadSpec("ident", "whole", ArrivalSpec("constant", rate_rps=100), None, duration_s=1.0, warmup_s=0.5)
    plan = LoadJob("127.0.0.1:1", spec, MANIFEST["models"]["ident"])
    result = pa.run_schedule(FakeAnalyzer(extra=5), "127.0.0.1:1", plan)
    assert result.requests == 100  # the 150 scheduled arrivals less the 50 of the warm-up; not the 5 extra
    assert result.p99_ms == pytest.approx(1.0)


@pytest.mark.parametrize("protocol", ["unary", "stream"])
def test_run_schedule_sends_async_calls_from_one_worker_thread_like_the_sender(protocol):
    spec = LoadSpec("ident", "whole", ArrivalSpec("constant", rate_rps=100), None, duration_s=0.5, protocol=protocol)
    plan = LoadJob("127.0.0.1:1", spec, MANIFEST["models"]["ident"])
    analyzer = FakeAnalyzer(extra=0)
    pa.run_schedule(analyzer, "127.0.0.1:1", plan)
    assert analyzer.args[analyzer.args.index("--max-threads") + 1] == "1"
    assert "--async" in analyzer.args and "--sync" not in analyzer.args
    assert ("--streaming" in analyzer.args) == (protocol == "stream")
    pa.run_schedule(analyzer, "127.0.0.1:1", plan, max_threads=16)
    assert analyzer.args[analyzer.args.index("--max-threads") + 1] == "16"


def test_percentile_ratio_is_one_for_the_same_samples_and_finds_a_scaled_tail():
    rng = np.random.default_rng(1)
    reference = [rng.lognormal(7.5, 0.5, 1000) for _ in range(3)]
    ratio, low, high = pa.percentile_ratio(reference, reference, 99)
    assert ratio == pytest.approx(1.0) and low < 1.0 < high
    ratio, low, high = pa.percentile_ratio([run * 1.3 for run in reference], reference, 99)
    assert ratio == pytest.approx(1.3) and low < 1.3 < high and low > 1.0


def test_percentile_ratio_interval_widens_when_the_repeats_drift_apart():
    rng = np.random.default_rng(2)
    reference = [rng.lognormal(7.5, 0.5, 1000) for _ in range(4)]
    steady = pa.percentile_ratio([rng.lognormal(7.5, 0.5, 1000) for _ in range(4)], reference, 99)
    drifting = pa.percentile_ratio([rng.lognormal(7.5, 0.5, 1000) * f for f in (0.7, 1.0, 1.0, 1.4)], reference, 99)
    assert drifting[2] - drifting[1] > steady[2] - steady[1]


def test_median_ratio_cancels_drift_that_both_generators_of_a_pair_share():
    rng = np.random.default_rng(3)
    drift = (0.6, 0.8, 1.0, 1.2, 1.5, 1.9)  # the machine slows down and speeds up between pairs
    reference = [rng.lognormal(7.5, 0.3, 2000) * f for f in drift]
    ours = [rng.lognormal(7.5, 0.3, 2000) * f * 1.2 for f in drift]
    ratio, low, high = pa.median_ratio(ours, reference, 50)
    assert ratio == pytest.approx(1.2, rel=0.03) and low <= ratio <= high and high - low < 0.1
    _, pooled_low, pooled_high = pa.percentile_ratio(ours, reference, 50)
    assert pooled_high - pooled_low > high - low  # the unpaired pooled interval carries the drift


def test_median_ratio_leaves_out_pairs_with_an_empty_side():
    assert pa.median_ratio([[2.0, 2.0], []], [[1.0, 1.0], [1.0]], 50) == (2.0, 2.0, 2.0)
    assert all(np.isnan(pa.median_ratio([[]], [[1.0]], 50)))


class CsvAnalyzer(pa.PerfAnalyzer):
    """Writes perf_analyzer 2.51's csv report (-f) for one closed-loop measurement, or fails."""

    CSV = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
           "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
           "64,1958.5,8,1982,13099,233,2002,1673,1,18632,24991,38544,74697\n")

    def __init__(self, returncode: int = 0) -> None:
        super().__init__(pa.Path("perf_analyzer"), pa.Path("."))
        self.returncode = returncode
        self.args: list[str] = []

    def run(self, args, timeout_s):
        """100 requests, one every 10 ms from t = 1 s, each answered after 2 ms (the last one after 20 ms)."""
        self.args = args
        if self.returncode == 0:
            pa.Path(args[args.index("-f") + 1]).write_text(self.CSV)
            requests = [{"timestamp": 10**9 + i * 10**7, "response_timestamps": [10**9 + i * 10**7 + 2 * 10**6]}
                        for i in range(100)]
            requests[-1]["response_timestamps"] = [10**9 + 99 * 10**7 + 20 * 10**6]
            export = json.dumps({"experiments": [{"requests": requests}]})
            pa.Path(args[args.index("--profile-export-file") + 1]).write_text(export)
        return subprocess.CompletedProcess(args, self.returncode, "", "Thread [0] had error: boom")


def test_measure_point_takes_rate_and_latencies_from_the_request_timestamps_and_server_times_from_the_csv():
    entry = pa.model_entry(MANIFEST, "ident")
    analyzer = CsvAnalyzer()
    result = pa.measure_point(analyzer, "127.0.0.1:1", "ident_reorch", entry, "whole", concurrency=64, requests=500)
    assert analyzer.args[analyzer.args.index("-m") + 1] == "ident_reorch"
    assert analyzer.args[analyzer.args.index("--request-count") + 1] == "500"
    assert result.throughput_rps == pytest.approx(100 / 1.01)  # 100 answers from 1.00 s to 2.01 s
    assert result.p50_ms == pytest.approx(2.0) and "--request-rate-range" not in analyzer.args
    assert result.server_queue_ms == pytest.approx(13.099)
    assert result.server_compute_ms == pytest.approx((233 + 2002 + 1673) / 1000)


def test_measure_point_at_a_rate_sends_poisson_arrivals_without_a_concurrency():
    analyzer = CsvAnalyzer()
    pa.measure_point(analyzer, "127.0.0.1:1", "ident", pa.model_entry(MANIFEST, "ident"), "whole", rate_rps=12.5)
    assert analyzer.args[analyzer.args.index("--request-rate-range") + 1] == "12.500"
    assert "poisson" in analyzer.args and "--concurrency-range" not in analyzer.args
    with pytest.raises(pa.StagebatchError, match="exactly one"):
        pa.measure_point(analyzer, "127.0.0.1:1", "ident", pa.model_entry(MANIFEST, "ident"), "whole")


def test_measure_point_raises_with_perf_analyzers_last_lines_when_it_fails():
    entry = pa.model_entry(MANIFEST, "ident")
    with pytest.raises(pa.StagebatchError, match=r"(?s)exit code 99.*boom"):
        pa.measure_point(CsvAnalyzer(returncode=99), "127.0.0.1:1", "ident", entry, "whole", concurrency=1)


def test_retried_once_retries_a_failed_run_once_and_says_why(capsys):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise pa.StagebatchError("perf_analyzer did not finish within 120 s")
        return "figures"

    assert pa.retried_once(flaky, "replay") == "figures" and len(calls) == 2
    assert "replay, attempt 1: perf_analyzer did not finish within 120 s" in capsys.readouterr().out

    def broken():
        raise pa.StagebatchError("perf_analyzer failed (exit code 1)")

    assert pa.retried_once(broken, "flood") is None
    out = capsys.readouterr().out
    assert "flood, attempt 1:" in out and "flood, attempt 2:" in out


def test_retry_once_runs_again_after_one_failure_and_raises_the_second(capsys):
    attempts = iter([pa.StagebatchError("hung"), "answered"])

    def flaky():
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert pa.retry_once(flaky, "replay") == "answered"
    assert "replay, attempt 1: hung" in capsys.readouterr().out
    with pytest.raises(pa.StagebatchError, match="again"):
        pa.retry_once(lambda: (_ for _ in ()).throw(pa.StagebatchError("again")), "replay")
    assert pa.retried_once(lambda: (_ for _ in ()).throw(pa.StagebatchError("again")), "replay") is None
    assert "replay, attempt 2: again" in capsys.readouterr().out


def test_cross_check_replays_once_more_when_perf_analyzer_hangs_then_skips_with_the_reason(monkeypatch, capsys):
    calls = []

    def hung(analyzer, url, plan):
        calls.append(url)
        raise pa.StagebatchError(f"perf_analyzer did not finish within 62 s (call {len(calls)})")

    monkeypatch.setattr(pa, "run_schedule", hung)
    spec = LoadSpec("ident", "whole", ArrivalSpec("poisson", rate_rps=100), None, duration_s=1.0)
    result = pa.cross_check("127.0.0.1:1", MANIFEST, spec, analyzer=FakeAnalyzer(extra=0))
    assert len(calls) == 2 and result["status"] == "skipped" and "(call 2)" in result["reason"]
    assert "cross-check replay, attempt 1: perf_analyzer did not finish within 62 s (call 1)" in capsys.readouterr().out
