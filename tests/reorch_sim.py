"""A deterministic discrete-event driver for the reorchestrator's pure core (fake clock, fake stages)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.reorch.policies import ReorchKnobs, StageContext, create_policy
from backends.reorch.scheduler import StageScheduler
from backends.reorch.state import Completion, Request, StageLaunch


def make_scheduler(policy: str = "pipeline", num_stages: int = 3, favoured: tuple[int, ...] | None = None,
                   max_sequence_length: int | None = None, latency_tables_ms=(), **knobs) -> StageScheduler:
    knobs.setdefault("max_batch_rows", 8)
    context = StageContext(num_stages, favoured or (knobs["max_batch_rows"],) * num_stages, max_sequence_length,
                           latency_tables_ms=tuple(latency_tables_ms))
    return StageScheduler(create_policy(policy, ReorchKnobs(**knobs), context))


@dataclass
class Simulation:
    """Runs a scheduler against fake stages: a launch of stage s with n rows takes stage_time_us(s, n, pad)."""

    scheduler: StageScheduler
    stage_time_us: Callable[[int, int, int | None], int] = lambda stage, rows, pad: 1000 + 100 * rows
    fail: Callable[[StageLaunch], str | None] = lambda launch: None
    now_us: int = 0
    completions: list[Completion] = field(default_factory=list)
    launches: list[StageLaunch] = field(default_factory=list)
    _events: list = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def arrive(self, at_us: int, requests: list[Request]) -> None:
        heapq.heappush(self._events, (at_us, next(self._seq), "arrive", requests))

    def cancel_at(self, at_us: int, ids: list[int]) -> None:
        heapq.heappush(self._events, (at_us, next(self._seq), "cancel", ids))

    def _pump(self) -> None:
        for launch in self.scheduler.schedule(self.now_us):
            self.launches.append(launch)
            done = self.now_us + self.stage_time_us(launch.stage, launch.rows, launch.pad_to)
            heapq.heappush(self._events, (done, next(self._seq), "done", launch))

    def run(self, until_us: int = 10**12) -> list[Completion]:
        while True:
            timer = self.scheduler.next_timer_us()
            if self._events and (timer is None or self._events[0][0] <= timer):
                at, _, kind, payload = heapq.heappop(self._events)
            elif timer is not None:
                at, kind, payload = timer, "timer", None
            else:
                break
            if at > until_us:
                break
            self.now_us = max(self.now_us, at)
            if kind == "arrive":
                for request in payload:
                    request.arrival_us = self.now_us
                self.completions += self.scheduler.add_requests(payload, self.now_us)
            elif kind == "cancel":
                self.completions += self.scheduler.cancel(payload, self.now_us)
            elif kind == "done":
                self.completions += self.scheduler.on_stage_done(payload.launch_id, self.now_us,
                                                                 error=self.fail(payload))
            self._pump()
        return self.completions
