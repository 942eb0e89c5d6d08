"""The stability detector on synthetic request records: steady, growing backlog, bursty but stable, late generator."""

from __future__ import annotations

import numpy as np

from loadtest import stability

START_US = 1_000_000_000_000


def _queue(arrivals_s: np.ndarray, service_s: float, servers: int = 1) -> list[dict]:
    """Rows of a FIFO queue with ``servers`` servers of fixed service time (window-relative arrivals)."""
    free = [0.0] * servers
    rows = []
    for t in arrivals_s:
        i = int(np.argmin(free))
        begin = max(t, free[i])
        free[i] = begin + service_s
        rows.append({"t_send_us": START_US + int(t * 1e6), "latency_us": int((free[i] - t) * 1e6), "ok": True, "late_us": 0})
    return rows


def _poisson(rate: float, window_s: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * window_s * 2) + 10)
    times = np.cumsum(gaps)
    return times[times < window_s]


def test_stability_is_stable_when_load_is_well_below_service_rate():
    rows = _queue(_poisson(50, 6), service_s=0.01)  # 50 req/s against 100 req/s
    verdict = stability.assess(rows, START_US, 6)
    assert verdict.stable, verdict.unstable_reason
    assert len(verdict.subwindows) >= 3
    assert abs(verdict.offered_rps - 50) < 10 and verdict.achieved_rps <= verdict.offered_rps + 1
    assert sum(s.arrivals for s in verdict.subwindows) == len(rows)


def test_stability_reports_growing_backlog_when_arrivals_exceed_service_rate():
    rows = _queue(_poisson(150, 6), service_s=0.01)  # 150 req/s against 100 req/s
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.stable
    assert verdict.unstable_reason.split(":")[0] in (stability.REASON_KEEP_UP, stability.REASON_BACKLOG)
    assert verdict.backlog_growth_per_s > 20
    assert not verdict.limited_by_load_generator
    assert verdict.achieved_rps < 110


def test_stability_is_stable_when_bursts_overload_briefly_then_drain():
    # 1 s at 160 req/s then 2 s at 10 req/s against 100 req/s: the backlog of each burst drains
    times, t = [], 0.0
    rng = np.random.default_rng(3)
    while t < 9:
        in_burst = (t % 3.0) < 1.0
        t += rng.exponential(1 / (160 if in_burst else 10))
        times.append(t)
    rows = _queue(np.array([x for x in times if x < 9]), service_s=0.01)
    period = stability.arrival_period_s({"kind": "bursty", "on_s": 1, "off_s": 2})
    verdict = stability.assess(rows, START_US, 9, period_s=period)
    assert len(verdict.subwindows) == 3
    assert verdict.stable, verdict.unstable_reason


def test_stability_blames_the_generator_when_arrivals_were_sent_late():
    rows = _queue(_poisson(50, 6), service_s=0.01)
    for row in rows[::5]:  # every fifth arrival left 100 ms (five mean gaps) behind schedule
        row["late_us"] = 100_000
        row["t_send_us"] += 100_000
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.stable and verdict.limited_by_load_generator
    assert verdict.unstable_reason.startswith(stability.REASON_LOADGEN_LATE)


def test_stability_blames_the_generator_when_its_process_was_busy():
    rows = _queue(_poisson(50, 6), service_s=0.01)
    verdict = stability.assess(rows, START_US, 6, loadgen_cpu_percent=97)
    assert not verdict.stable and verdict.limited_by_load_generator


def test_stability_is_unstable_when_requests_fail():
    rows = _queue(_poisson(50, 6), service_s=0.01)
    for row in rows[::3]:
        row["ok"] = False
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.stable and verdict.unstable_reason.startswith(stability.REASON_KEEP_UP)


def test_stability_is_unstable_when_nothing_arrived():
    verdict = stability.assess([], START_US, 3)
    assert not verdict.stable and verdict.offered_rps == 0


def test_stability_ignores_lateness_small_against_the_latency():
    rows = _queue(_poisson(10, 6), service_s=0.08)  # ~80 ms latencies
    for row in rows[::4]:  # a quarter of the arrivals 5 ms late: noise on a shared machine
        row["late_us"] = 5_000
        row["t_send_us"] += 5_000
    verdict = stability.assess(rows, START_US, 6)
    assert verdict.stable, verdict.unstable_reason


def test_capacity_counts_a_late_generator_that_kept_the_rate_as_sustained():
    rows = _queue(_poisson(50, 6), service_s=0.01)
    for row in rows[::5]:  # late, but each by far less than a sub-window
        row["late_us"] = 100_000
        row["t_send_us"] += 100_000
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.stable and verdict.rate_kept and verdict.sustained
    for row in rows:  # everything pushed 1.5 s: sub-windows lost their arrivals to the next ones
        row["late_us"] = 1_500_000
        row["t_send_us"] += 1_500_000
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.rate_kept and not verdict.sustained


def test_stability_reports_a_standing_queue_when_the_server_only_keeps_pace_with_a_backlog():
    # 200 requests already queued at the window's start (the warm-up built them), then arrivals at exactly
    # the service rate: completions keep up and the backlog does not grow, but it never drains either
    arrivals = np.concatenate([np.full(200, 0.0), np.arange(0.0, 6.0, 0.01)])
    rows = _queue(arrivals, service_s=0.01)
    verdict = stability.assess(rows, START_US, 6)
    assert not verdict.stable
    assert verdict.unstable_reason.startswith(stability.REASON_STANDING)
    assert not verdict.limited_by_load_generator


def test_stability_reports_a_standing_queue_of_a_seventh_of_a_sub_windows_arrivals():
    # the quiet runs' reorchestrator at 1.0x capacity: 64-81 of about 404 arrivals per sub-window waiting at
    # every look (p50 227 ms, 7 ms at 0.6x); here 30 of 200, with arrivals at the service rate after them
    arrivals = np.concatenate([np.full(30, 0.0), np.arange(0.0, 6.0, 0.01)])
    verdict = stability.assess(_queue(arrivals, service_s=0.01), START_US, 6)
    assert not verdict.stable and verdict.unstable_reason.startswith(stability.REASON_STANDING)
    arrivals = np.concatenate([np.full(15, 0.0), np.arange(0.0, 6.0, 0.01)])  # 15 of 200: below a tenth
    assert stability.assess(_queue(arrivals, service_s=0.01), START_US, 6).stable


def test_stability_is_stable_at_high_but_sustainable_load_when_the_queue_stays_short():
    rows = _queue(_poisson(90, 6, seed=5), service_s=0.01)  # 90% utilization: a short, fluctuating queue
    verdict = stability.assess(rows, START_US, 6)
    assert verdict.stable, verdict.unstable_reason


def _load_result(rate: float, service_s: float, warmup_s: float, window_s: float):
    """A LoadResult as run_load returns it: a constant-rate schedule through a FIFO queue, window records only."""
    from loadtest.client import RequestRecord
    from loadtest.driver import LoadResult, LoadSpec
    from loadtest.workloads import ArrivalSpec

    arrivals = np.arange(0, warmup_s + window_s, 1 / rate)
    rows = _queue(arrivals, service_s)
    records = [RequestRecord(t_send_us=r["t_send_us"], latency_us=r["latency_us"], model="m", variant="whole",
                             seq_len=None, rows=1, ok=True, error=None, server=None)
               for t, r in zip(arrivals, rows) if t >= warmup_s]
    spec = LoadSpec("m", "whole", ArrivalSpec("constant", rate_rps=rate), None, duration_s=window_s, warmup_s=warmup_s)
    return LoadResult(spec, records, duration_s=window_s, loadgen_cpu_percent=10.0, late_arrivals=0,
                      start_epoch_s=START_US / 1e6, scheduled_arrivals=len(records))


def test_a_load_results_verdict_covers_its_measured_window_after_the_warm_up():
    light = _load_result(rate=50, service_s=0.01, warmup_s=1.0, window_s=4.0)
    assert light.window_start_us == START_US + 1_000_000
    verdict = light.stability()
    assert verdict.sustained, verdict.unstable_reason
    assert sum(s.arrivals for s in verdict.subwindows) == len(light.records)
    # twice the service rate, with the queue the warm-up already built: a latency trend over the window's
    # quarters (the last quarter's median under twice the first's) calls this steady; the verdict does not
    overloaded = _load_result(rate=200, service_s=0.01, warmup_s=3.0, window_s=2.0)
    latencies = [r.latency_us for r in overloaded.records]
    quarter = len(latencies) // 4
    assert np.median(latencies[-quarter:]) <= 2 * np.median(latencies[:quarter])
    assert not overloaded.stability().sustained
