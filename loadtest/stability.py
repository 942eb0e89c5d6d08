"""Is a measured point stable? Arrivals against completions in sub-windows of the measured window.

Pure functions over request rows (``t_send_us``, ``latency_us``, ``ok``, ``late_us``), so they are
tested on synthetic records. A point is **stable** when

1. completions keep up with arrivals: over the sub-windows after the first (the first one fills the
   pipeline), successful completions are at least ``1 - KEEP_UP_TOLERANCE`` of arrivals;
2. the backlog (arrived but not yet answered) does not grow from sub-window to sub-window: the
   growth from the end of the first sub-window to the end of the last is at most
   ``BACKLOG_GROWTH_SHARE`` of the arrivals in between (and at least a few requests); and, for
   arrivals that are not periodic, it does not stand still either: a backlog above
   ``STANDING_QUEUE_SHARE`` of a sub-window's arrivals at the end of every sub-window is a queue the
   server only keeps pace with (at capacity, after the warm-up built it), whose latencies are the
   queue's (a quiet run's bert_base at 1.3x capacity: 266-292 requests waiting, 700 ms, "stable"
   under the other rules). In two quiet quick runs the healthy points' lowest backlog was at most 3%
   of a sub-window's arrivals (lstm at 0.5x: 14 of 807); the points past the knee held 13-17%
   at their lowest (the reorchestrator at 1.0x: 64-81 waiting, p50 227 ms against 7 ms at 0.6x; the
   resnet50 ensemble at 0.9x: 191 ms against 20 ms at 0.5x) and 70% at 1.3x; the limit sits between;
3. the load generator kept the schedule: at most ``LATE_ARRIVALS_SHARE`` of arrivals were sent late
   by more than the largest of the tolerance, ``LATE_LATENCY_SHARE`` of the median latency and
   ``LATE_GAP_SHARE`` mean gaps between arrivals (a few ms of lateness against 80 ms latencies
   or 50 ms gaps is noise on a shared machine, not a broken schedule), and its busiest process stayed
   under ``LOADGEN_BUSY_PERCENT`` of a core.

``rate_kept`` says whether the generator still delivered every sub-window's scheduled arrivals
within ``KEEP_UP_TOLERANCE`` (lateness moved few requests across sub-window boundaries): a late but
rate-keeping generator makes arrivals clumpier, which spoils latency figures but not the question
the capacity search asks (does the server keep up with this rate?).

The server-side rules are checked first: a point the server could not keep up with is reported as
such even if the generator was also late. Periodic (bursty) arrivals get sub-windows of whole burst
cycles, so every sub-window boundary falls at the same phase. Field meanings: docs/characterization.md.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from loadtest.workloads import ARRIVALS

KEEP_UP_TOLERANCE = 0.05  # completions may fall this share behind arrivals
BACKLOG_GROWTH_SHARE = 0.05  # backlog growth allowed, as a share of the arrivals over the same span
BACKLOG_GROWTH_MIN = 3  # ... but never less than this many requests (small counts are noise)
STANDING_QUEUE_SHARE = 0.1  # a backlog above this share of a sub-window's arrivals at every sub-window end
MIN_SUBWINDOWS = 3
LATE_ARRIVALS_SHARE = 0.05  # share of arrivals sent late above which the schedule was not kept
LOADGEN_BUSY_PERCENT = 85.0  # a load-generator process this busy (% of one core) may be the limit
LATE_TOLERANCE_US = 2000  # the driver's default: an arrival this late counts as late ...
LATE_LATENCY_SHARE = 0.25  # ... unless it is within this share of the median latency
LATE_GAP_SHARE = 2.0  # ... or within this many mean gaps between arrivals (Poisson gaps vary that much)

# unstable_reason prefixes: the part before ':' says who was the limit
REASON_NO_REQUESTS = "no_requests"
REASON_KEEP_UP = "completions_behind_arrivals"
REASON_BACKLOG = "backlog_growing"
REASON_STANDING = "queue_standing"
REASON_LOADGEN_LATE = "load_generator_late"
REASON_LOADGEN_BUSY = "load_generator_busy"
LOADGEN_REASONS = (REASON_LOADGEN_LATE, REASON_LOADGEN_BUSY)


@dataclass
class Subwindow:
    """Counts over one sub-window; ``backlog`` is arrived-but-unanswered requests at its end."""

    start_s: float  # seconds from the window's start
    end_s: float
    arrivals: int  # scheduled in this sub-window
    completions: int  # successful answers received in this sub-window
    backlog: int  # arrivals so far minus answers (successful or not) so far, at end_s


@dataclass
class Stability:
    """The stability verdict of one point (the contract-5 fields of ``points.jsonl``)."""

    offered_rps: float
    achieved_rps: float
    subwindows: list[Subwindow] = field(default_factory=list)
    backlog_growth_per_s: float = 0.0
    stable: bool = True
    unstable_reason: str | None = None
    keep_up_ratio: float | None = None  # completions / arrivals after the first sub-window
    late_share: float = 0.0
    rate_kept: bool = True  # every sub-window's arrivals were sent within it (within the tolerance)

    @property
    def sustained(self) -> bool:
        """For the capacity search: stable, or only late while still delivering the rate."""
        if self.stable:
            return True
        return self.unstable_reason.split(":")[0] == REASON_LOADGEN_LATE and self.rate_kept

    @property
    def limited_by_load_generator(self) -> bool:
        """True when only the load generator's schedule failed (the server kept up)."""
        return bool(self.unstable_reason) and self.unstable_reason.split(":")[0] in LOADGEN_REASONS

    def to_dict(self) -> dict:
        """JSON-ready fields (``subwindows`` as a list of dicts)."""
        data = asdict(self)
        data["offered_rps"] = round(self.offered_rps, 3)
        data["achieved_rps"] = round(self.achieved_rps, 3)
        data["backlog_growth_per_s"] = round(self.backlog_growth_per_s, 3)
        if self.keep_up_ratio is not None:
            data["keep_up_ratio"] = round(self.keep_up_ratio, 4)
        data["late_share"] = round(self.late_share, 4)
        return data


def subwindow_count(window_s: float, period_s: float | None = None, minimum: int = MIN_SUBWINDOWS) -> int:
    """How many sub-windows: whole periods when the arrivals are periodic and allow at least ``minimum``."""
    if period_s and period_s > 0:
        periods = int(math.floor(window_s / period_s + 1e-9))
        if periods >= minimum:
            return periods
    return minimum


def assess(
    rows: Iterable[Mapping],
    window_start_us: int,
    window_s: float,
    *,
    period_s: float | None = None,
    loadgen_cpu_percent: float | None = None,
    late_tolerance_us: int = LATE_TOLERANCE_US,
    subwindows: int | None = None,
) -> Stability:
    """Judge one point from its measured window's requests.

    Args:
        rows: the window's requests (arrivals scheduled inside it), each with ``t_send_us`` (wall
            clock, µs), ``latency_us``, ``ok`` and ``late_us`` (sent this far behind schedule).
        window_start_us: the measured window's start (wall clock, µs).
        window_s: its length.
        period_s: the arrival process's period (bursty: on_s + off_s), to align sub-windows.
        loadgen_cpu_percent: the busiest load-generator process, % of one core.
        late_tolerance_us: an arrival later than this (and than the shares of the median latency and
            of the mean gap, see the module docstring) counts as late.
        subwindows: the number of sub-windows (default: :func:`subwindow_count`).
    """
    rows = list(rows)
    n = max(MIN_SUBWINDOWS, subwindows or subwindow_count(window_s, period_s))
    window_us = window_s * 1e6
    edges_us = [window_start_us + window_us * i / n for i in range(n + 1)]
    arrivals_at = sorted(int(r["t_send_us"]) - int(r.get("late_us") or 0) for r in rows)
    answers = [(int(r["t_send_us"]) + int(r["latency_us"]), bool(r["ok"])) for r in rows]
    done_at = sorted(t for t, _ in answers)
    ok_at = sorted(t for t, ok in answers if ok)

    def count_before(values: list[int], limit: float) -> int:
        return bisect.bisect_left(values, limit)

    subs = []
    for i in range(n):
        lo, hi = edges_us[i], edges_us[i + 1]
        subs.append(
            Subwindow(
                start_s=round((lo - window_start_us) / 1e6, 3),
                end_s=round((hi - window_start_us) / 1e6, 3),
                arrivals=count_before(arrivals_at, hi) - count_before(arrivals_at, lo),
                completions=count_before(ok_at, hi) - count_before(ok_at, lo),
                backlog=count_before(arrivals_at, hi) - count_before(done_at, hi),
            )
        )
    arrivals = len(rows)
    completions = sum(s.completions for s in subs)
    offered = arrivals / window_s if window_s > 0 else 0.0
    achieved = completions / window_s if window_s > 0 else 0.0
    span_s = subs[-1].end_s - subs[0].end_s
    growth = subs[-1].backlog - subs[0].backlog
    growth_per_s = growth / span_s if span_s > 0 else 0.0
    ok_latencies = sorted(int(r["latency_us"]) for r in rows if r["ok"])
    median_us = ok_latencies[len(ok_latencies) // 2] if ok_latencies else 0
    mean_gap_us = window_us / len(rows) if rows else 0.0
    late_limit_us = max(late_tolerance_us, LATE_LATENCY_SHARE * median_us, LATE_GAP_SHARE * mean_gap_us)
    late = sum(1 for r in rows if int(r.get("late_us") or 0) > late_limit_us)
    late_share = late / arrivals if arrivals else 0.0
    sent_at = sorted(int(r["t_send_us"]) for r in rows)
    moved = sum(
        abs((count_before(sent_at, edges_us[i + 1]) - count_before(sent_at, edges_us[i])) - subs[i].arrivals)
        for i in range(n)
    )
    rate_kept = moved <= max(2, KEEP_UP_TOLERANCE * arrivals)
    tail_arrivals = sum(s.arrivals for s in subs[1:])
    tail_completions = sum(s.completions for s in subs[1:])
    keep_up = tail_completions / tail_arrivals if tail_arrivals else None
    standing = min(s.backlog for s in subs)  # requests waiting at every sub-window's end
    result = Stability(offered_rps=offered, achieved_rps=achieved, subwindows=subs, backlog_growth_per_s=growth_per_s,
                       keep_up_ratio=keep_up, late_share=late_share, rate_kept=rate_kept)  # fmt: skip
    reason = None
    if arrivals == 0:
        reason = f"{REASON_NO_REQUESTS}: no arrivals in the measured window"
    elif keep_up is not None and keep_up < 1 - KEEP_UP_TOLERANCE:
        reason = (
            f"{REASON_KEEP_UP}: {tail_completions} successful completions for {tail_arrivals} arrivals "
            f"after the first sub-window ({keep_up:.0%} < {1 - KEEP_UP_TOLERANCE:.0%})"
        )
    elif growth > max(BACKLOG_GROWTH_MIN, BACKLOG_GROWTH_SHARE * tail_arrivals):
        reason = (
            f"{REASON_BACKLOG}: backlog {subs[0].backlog} -> {subs[-1].backlog} requests "
            f"over {span_s:.1f} s ({growth_per_s:+.1f}/s)"
        )
    elif not period_s and standing > max(BACKLOG_GROWTH_MIN, STANDING_QUEUE_SHARE * arrivals / n):
        reason = (
            f"{REASON_STANDING}: at least {standing} requests waited at the end of every sub-window "
            f"({standing / (arrivals / n):.0%} of a sub-window's arrivals): the server kept pace only with a queue "
            "that never drained, so the latencies are the queue's"
        )
    elif late_share > LATE_ARRIVALS_SHARE and late > 1:
        reason = (
            f"{REASON_LOADGEN_LATE}: {late} of {arrivals} arrivals sent more than "
            f"{late_limit_us / 1000:.1f} ms behind schedule ({late_share:.0%} > {LATE_ARRIVALS_SHARE:.0%})"
        )
    elif loadgen_cpu_percent is not None and loadgen_cpu_percent >= LOADGEN_BUSY_PERCENT:
        reason = (
            f"{REASON_LOADGEN_BUSY}: a load-generator process used {loadgen_cpu_percent:.0f}% of a core "
            f"(>= {LOADGEN_BUSY_PERCENT:.0f}%)"
        )
    result.stable = reason is None
    result.unstable_reason = reason
    return result


def arrival_period_s(arrival: Mapping) -> float | None:
    """The period of a periodic arrival (a square-wave bursty one: on_s + off_s), else None."""
    process = ARRIVALS.get(str(arrival.get("kind")))
    return process.period_s(arrival) if process is not None else None
