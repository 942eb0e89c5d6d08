"""Pure scheduling core of the stage reorchestrator (no Triton, no onnxruntime, no clock).

The core decides groupings of request ids only; the caller keeps the tensors. Time is passed in
(microseconds). The caller's loop is::

    completions = scheduler.add_requests(requests, now_us)     # one dynamic-batcher batch
    for launch in scheduler.schedule(now_us):                  # batches to run now
        ... run launch.stage on launch.request_ids, padded to launch.pad_to ...
        completions = scheduler.on_stage_done(launch.launch_id, now_us, error=None)
    # wake up at scheduler.next_timer_us() even if nothing else happens

State: requests wait in ``pending`` (entry queue); a ``Batch`` is QUEUED before a stage, RUNNING a
stage, or HELD at a stage boundary waiting for its merge partner (stretch). Each stage has one FIFO
queue and at most ``stage_concurrency`` running batches; a stage does not start a batch while
``max_queued_batches_per_stage`` batches wait before the next stage (back-pressure).

Meta operations (DVABatch, ATC'22):

- **new**: a batch enters stage 0 while older batches are still in later stages;
- **stretch**: the new batch is a *catch-up* for a batch already in the pipeline; the older batch
  is held at the boundary ``m`` it reaches next, the catch-up runs stages ``0..m-1``, and the two
  continue merged from stage ``m``. A held batch goes on alone after ``stretch_max_wait_us``;
- **split**: before stage ``m`` a batch larger than the policy allows is cut into pieces that
  continue and answer independently;
- **bucket**: a new batch holds requests of one sequence-length bucket and is padded only to its
  longest request.

Never-lose decisions of the cost model (``cost.py``; the default policy only), counted like the
operations above:

- **fuse**: the stages are too cheap for the per-stage overhead: every batch runs the whole chain
  as one launch (a *fused* batch: no boundary, no re-forming). The decision (``FuseDecision``)
  uses the per-launch overhead the caller measures (``note_launch_overhead``); its switches are
  counted as **fuse_on** and **fuse_off**;
- **whole**: this batch can gain nothing from boundaries now (no length diversity, and steady
  load or no load): it runs the chain fused, like the whole model.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable, Sequence

from .cost import FUSE, FUSE_OFF, FUSE_ON, WHOLE, ArrivalMeter, FuseDecision
from .policies import Policy, bucket_of, default_bucket_bounds
from .state import Batch, BatchState, Completion, MergePlan, Request, StageLaunch

# Every operation name, in the order reports show them (metrics label ``operation``; the one list).
OPERATIONS = ("new", "stretch", "split", "bucket", FUSE, WHOLE, FUSE_ON, FUSE_OFF)
ARRIVAL_EWMA_WEIGHT = 0.1  # weight of the newest inter-arrival gap in the arrival-rate estimate
ENTRY_SCAN_WINDOW = 256  # pending requests a new batch is chosen from (oldest first)


class StageScheduler:
    """Batches of request ids through K stages under a policy; every request completes exactly once."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.knobs = policy.knobs
        self.num_stages = policy.context.num_stages
        context = policy.context
        if context.max_sequence_length is None:
            self.bucket_bounds: tuple[int, ...] = ()
        else:
            self.bucket_bounds = (self.knobs.bucket_bounds or context.bucket_bounds
                                  or default_bucket_bounds(context.max_sequence_length))
        self.requests: dict[int, Request] = {}
        self.pending: dict[int, None] = {}  # request ids at the entry, in arrival order (O(1) removal)
        self.batches: dict[int, Batch] = {}
        self.queues: list[deque[int]] = [deque() for _ in range(self.num_stages)]
        self.running: list[int] = [0] * self.num_stages
        self.launches: dict[int, int] = {}  # launch id -> batch id
        self.operation_counts: Counter[str] = Counter()
        self.closed_reason: str | None = None
        self.cost = policy.cost
        self.fuse = FuseDecision(self.cost, self.knobs.fuse_margin) if self.cost is not None else None
        self._last_arrival_us: int | None = None
        self._arrival_gap_us: float | None = None  # EWMA of the gap between arrivals
        self.arrivals = ArrivalMeter(self.knobs.burst_window_ms * 1000, self.knobs.burst_rate_ratio)
        self._ids = itertools.count()

    # ---- inputs ---------------------------------------------------------------------------------
    def add_requests(self, requests: Iterable[Request], now_us: int, *,
                     arrivals_noted: bool = False) -> list[Completion]:
        """Queue requests at the entry (one call per dynamic-batcher batch); answers them if closed.

        ``arrivals_noted``: ``inline_decision`` was asked about this batch first and declined; it has
        noted these arrivals already (counting them again would double the measured rate)."""
        completions = []
        requests = list(requests)
        if not arrivals_noted:
            self.arrivals.note(len(requests), now_us)
        for request in requests:
            if request.request_id in self.requests:
                raise ValueError(f"request id {request.request_id} is already in the scheduler")
            if request.rows < 1 or request.rows > self.knobs.max_batch_rows:
                raise ValueError(f"request {request.request_id} has {request.rows} rows; "
                                 f"allowed 1..{self.knobs.max_batch_rows}")
            if self.closed_reason is not None:
                completions.append(Completion(request.request_id, "error", self.closed_reason,
                                              request.record(), request.rows))
                continue
            if request.seq_len is not None and self.bucket_bounds:
                request.bucket = bucket_of(request.seq_len, self.bucket_bounds)  # provisional, for grouping
            self.requests[request.request_id] = request
            self.pending[request.request_id] = None
            if not arrivals_noted:
                self._note_arrival(now_us)
        return completions

    def note_launch_overhead(self, overhead_us: float) -> None:
        """One launch's measured overhead (its wall time minus its compute time, µs): the fuse decision's
        evidence. A switch of the decision is counted (FUSE_ON, FUSE_OFF)."""
        if self.fuse is None:
            return
        switched = self.fuse.note_launch(overhead_us)
        if switched is not None:
            self.operation_counts[switched] += 1

    @property
    def _fuse_always(self) -> bool:
        return self.fuse is not None and self.fuse.fused

    def _note_arrival(self, now_us: int) -> None:
        if self._last_arrival_us is not None:
            gap = max(0, now_us - self._last_arrival_us)
            previous = gap if self._arrival_gap_us is None else self._arrival_gap_us
            self._arrival_gap_us = previous + ARRIVAL_EWMA_WEIGHT * (gap - previous)
        self._last_arrival_us = now_us

    def arrival_rate_per_us(self, now_us: int) -> float:
        """Recent arrival rate (requests per µs); decays while nothing arrives."""
        if self._arrival_gap_us is None or self._last_arrival_us is None:
            return 0.0
        gap = max(self._arrival_gap_us, now_us - self._last_arrival_us, 1.0)
        return 1.0 / gap

    def cancel(self, request_ids: Iterable[int], now_us: int) -> list[Completion]:
        """Cancel requests: answered at once unless running, else dropped at the next boundary."""
        completions = []
        touched: set[int] = set()
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.cancelled:
                continue
            request.cancelled = True
            if request_id in self.pending:
                del self.pending[request_id]
                completions.append(self._finish(request_id, "cancelled", "cancelled by the client", now_us))
        for batch in list(self.batches.values()):
            if batch.state is not BatchState.RUNNING and any(
                    self.requests[r].cancelled for r in batch.request_ids):
                touched.add(batch.batch_id)
        for batch_id in touched:
            completions.extend(self._drop_cancelled(self.batches[batch_id], now_us))
        return completions

    # ---- decisions ------------------------------------------------------------------------------
    def schedule(self, now_us: int) -> list[StageLaunch]:
        """Launch every batch that may run now: later stages first (finish work in flight), then entry."""
        launches: list[StageLaunch] = []
        self._expire_holds(now_us)
        for stage in reversed(range(self.num_stages)):
            queue = self.queues[stage]
            while queue and self._stage_free(stage):
                batch = self.batches[queue.popleft()]
                launches.append(self._launch(batch, now_us))
        while self.pending and self._stage_free(0):
            launches.append(self._launch_new(now_us))
        return launches

    def on_stage_done(self, launch_id: int, now_us: int, error: str | None = None,
                      failed_stage: int | None = None, compute_us: Sequence[int] = ()) -> list[Completion]:
        """A launch finished (``error``: it raised, in ``failed_stage`` of a fused launch); returns the
        requests that are now answered. ``compute_us``: the compute time of each stage it ran."""
        if launch_id not in self.launches:  # finished after shutdown: already answered
            return []
        batch = self.batches[self.launches.pop(launch_id)]
        stage = batch.stage
        self.running[stage] -= 1
        for r in batch.request_ids:
            request = self.requests.get(r)
            if request is None:
                continue
            wait = max(0, (request.launched_us or now_us) - (request.ready_us or request.launched_us or now_us))
            request.stage_times_us.extend([wait if i == 0 else 0, int(c)] for i, c in enumerate(compute_us))
            request.ready_us = now_us
        if error is not None:
            self._dissolve_merge(batch, now_us)
            del self.batches[batch.batch_id]
            where = stage if failed_stage is None else failed_stage
            return [self._finish(r, "error", f"stage {where} failed: {error}", now_us)
                    for r in batch.request_ids]
        completions = self._drop_cancelled(batch, now_us, running_done=True)
        if batch.batch_id not in self.batches:  # every member was cancelled
            return completions
        if stage == self.num_stages - 1 or batch.fused:
            del self.batches[batch.batch_id]
            completions.extend(self._finish(r, "success", "", now_us) for r in batch.request_ids)
            return completions
        self._arrive_at_boundary(batch, stage + 1, now_us)
        return completions

    def next_timer_us(self) -> int | None:
        """When ``schedule`` must run again even without new events (a hold deadline), if ever."""
        deadlines = [b.merge.deadline_us for b in self.batches.values()
                     if b.state is BatchState.HELD and b.merge is not None and b.merge.deadline_us is not None]
        return min(deadlines) if deadlines else None

    def shutdown(self, reason: str, now_us: int) -> list[Completion]:
        """Answer every request still inside with an error; later requests are answered the same way."""
        self.closed_reason = reason
        completions = [self._finish(r, "error", reason, now_us) for r in list(self.requests)]
        self.pending.clear()
        self.batches.clear()
        self.launches.clear()
        for queue in self.queues:
            queue.clear()
        self.running = [0] * self.num_stages
        return completions

    # ---- queries --------------------------------------------------------------------------------
    @property
    def inflight_requests(self) -> int:
        return len(self.requests)

    def is_idle(self) -> bool:
        return not self.requests

    def waiting_request_ids(self) -> list[int]:
        """Requests not running a stage now (at the entry, queued or held): cancellable at once."""
        ids = list(self.pending)
        for batch in self.batches.values():
            if batch.state is not BatchState.RUNNING:
                ids.extend(batch.request_ids)
        return ids

    # ---- mechanics ------------------------------------------------------------------------------
    def _stage_free(self, stage: int) -> bool:
        if self.running[stage] >= self.knobs.stage_concurrency:
            return False
        if stage + 1 < self.num_stages:
            return len(self.queues[stage + 1]) < self.knobs.max_queued_batches_per_stage
        return True

    def _new_batch(self, request_ids: list[int], stage: int, now_us: int, bucket: int | None = None) -> Batch:
        members = [self.requests[r] for r in request_ids]
        lengths = [m.seq_len for m in members if m.seq_len is not None]
        batch = Batch(next(self._ids), list(request_ids), stage, sum(m.rows for m in members),
                      pad_to=max(lengths) if lengths else None, bucket=bucket, queued_since_us=now_us)
        self.batches[batch.batch_id] = batch
        return batch

    def _launch(self, batch: Batch, now_us: int) -> StageLaunch:
        batch.state = BatchState.RUNNING
        self.running[batch.stage] += 1
        launch_id = next(self._ids)
        self.launches[launch_id] = batch.batch_id
        stages = self.num_stages - batch.stage if batch.fused else 1
        for r in batch.request_ids:
            self.requests[r].batch_sizes.extend([batch.rows] * stages)
            self.requests[r].launched_us = now_us
        return StageLaunch(launch_id, batch.stage, tuple(batch.request_ids), batch.rows, batch.pad_to,
                           max(0, now_us - batch.queued_since_us),
                           last_stage=self.num_stages - 1 if batch.fused else -1)

    def _launch_new(self, now_us: int) -> StageLaunch:
        # Look at the oldest ENTRY_SCAN_WINDOW pending requests only: O(1) decisions under backlog.
        window = [self.requests[r] for r in itertools.islice(self.pending, ENTRY_SCAN_WINDOW)]
        group, bucketed = self.policy.pick_entry_group(window)
        group_rows = sum(r.rows for r in group)
        group_pad = max((r.seq_len for r in group if r.seq_len is not None), default=None)
        fused = self._fused_decision(group_rows, len(window) - len(group), bucketed, now_us)
        target, boundary = (None, 0) if fused else \
            self._stretch_target(group_rows, group_pad, group[0].bucket if bucketed else None)
        ids = [r.request_id for r in group]
        for r in ids:
            del self.pending[r]
        batch = self._new_batch(ids, 0, now_us, bucket=group[0].bucket if bucketed else None)
        for request in group:
            request.stage0_entry_us = now_us
            request.ready_us = now_us
            if not bucketed:
                request.bucket = None
        if bucketed:
            self.operation_counts["bucket"] += 1
            for request in group:
                request.ops.append({"op": "bucket", "stage": 0})
        if fused is not None:
            batch.fused = True
            self.operation_counts[fused] += 1
            for request in group:
                request.ops.append({"op": fused, "stage": 0})
        elif target is None:
            self.operation_counts["new"] += 1
            for request in group:
                request.ops.append({"op": "new", "stage": 0})
        else:
            plan = MergePlan(target.batch_id, batch.batch_id, boundary)
            target.merge = batch.merge = plan
            if target.state is BatchState.QUEUED:  # it is at the boundary already: hold it now
                self.queues[target.stage].remove(target.batch_id)
                self._hold(target, now_us)
        return self._launch(batch, now_us)

    def inline_decision(self, rows: Sequence[int], lengths: Sequence[int | None], now_us: int) -> str | None:
        """Whether a whole dynamic-batcher batch may run the chain at once, inside the caller (FUSE or
        WHOLE), instead of entering the scheduler: the cost model says fuse always, or nothing else is
        inside and the batch gains nothing from boundaries, or the load is steady and the batch has no
        length diversity (batches already inside go on meanwhile). Notes the arrivals (not while every
        batch is fused: nothing reads them then) and counts the decision."""
        if self._fuse_always and self.closed_reason is None:
            self.operation_counts[FUSE] += 1
            return FUSE
        for _ in rows:
            self._note_arrival(now_us)
        self.arrivals.note(len(rows), now_us)
        if self.cost is None or self.num_stages < 2 or self.closed_reason is not None:
            return None
        known = [(r, n) for r, n in zip(rows, lengths) if n is not None]
        diverse = False
        if len(known) > 1:
            padded = sum(r for r, _ in known) * max(n for _, n in known)
            diverse = 1.0 - sum(r * n for r, n in known) / padded >= self.knobs.bucket_min_saving
        if sum(rows) > self.knobs.max_batch_rows or not self.cost.run_whole(
                sum(rows), pipeline_busy=bool(self.requests), waiting_behind=0, diverse=diverse,
                arrival_rate_per_us=self.arrival_rate_per_us(now_us), steady=not self.arrivals.bursty(now_us)):
            return None
        self.operation_counts[WHOLE] += 1
        return WHOLE

    def _fused_decision(self, group_rows: int, waiting_behind: int, bucketed: bool, now_us: int) -> str | None:
        """FUSE or WHOLE when the cost model says the next batch gains nothing from boundaries, else None."""
        if self.cost is None or self.num_stages < 2:
            return None
        if self._fuse_always:
            return FUSE
        if self.cost.run_whole(group_rows, pipeline_busy=bool(self.batches), waiting_behind=waiting_behind,
                               diverse=bucketed, arrival_rate_per_us=self.arrival_rate_per_us(now_us),
                               steady=not self.arrivals.bursty(now_us)):
            return WHOLE
        return None

    def _stretch_target(self, group_rows: int, group_pad: int | None,
                        bucket: int | None) -> tuple[Batch | None, int]:
        """The batch a new batch should catch up with (cheapest catch-up first), if the policy allows."""
        best: tuple[int, int, Batch] | None = None
        for batch in self.batches.values():
            if batch.merge is not None or batch.state is BatchState.HELD or batch.fused:
                continue
            boundary = batch.stage + 1 if batch.state is BatchState.RUNNING else batch.stage
            if bucket is not None and batch.bucket is not None and batch.bucket != bucket:
                continue
            if not self.policy.allows_stretch(batch, boundary, group_rows, group_pad):
                continue
            key = (boundary, batch.batch_id)
            if best is None or key < best[:2]:
                best = (boundary, batch.batch_id, batch)
        return (best[2], best[0]) if best is not None else (None, 0)

    def _hold(self, batch: Batch, now_us: int) -> None:
        batch.state = BatchState.HELD
        assert batch.merge is not None
        if batch.merge.deadline_us is None:
            batch.merge.deadline_us = now_us + self.knobs.stretch_max_wait_us

    def _enqueue(self, batch: Batch, stage: int, now_us: int) -> None:
        batch.stage = stage
        batch.state = BatchState.QUEUED
        batch.queued_since_us = now_us
        self.queues[stage].append(batch.batch_id)

    def _arrive_at_boundary(self, batch: Batch, stage: int, now_us: int) -> None:
        """``batch`` finished stage-1: merge, hold, split or simply queue before ``stage``."""
        batch.stage = stage
        plan = batch.merge
        if plan is not None and plan.boundary == stage:
            partner = self.batches.get(plan.partner_of(batch.batch_id))
            if partner is not None and partner.state is BatchState.HELD and partner.stage == stage:
                self._merge(self.batches[plan.target_id], self.batches[plan.catchup_id], stage, now_us)
                return
            self._hold(batch, now_us)
            return
        piece_rows = None if plan is not None else self.policy.split_piece_rows(batch.rows, stage)
        if piece_rows is not None and len(batch.request_ids) > 1:
            self._split(batch, stage, piece_rows, now_us)
            return
        self._enqueue(batch, stage, now_us)

    def _merge(self, target: Batch, catchup: Batch, stage: int, now_us: int) -> None:
        target.request_ids.extend(catchup.request_ids)
        target.rows += catchup.rows
        lengths = [p for p in (target.pad_to, catchup.pad_to) if p is not None]
        target.pad_to = max(lengths) if lengths else None
        if target.bucket != catchup.bucket:
            target.bucket = None
        target.merge = None
        del self.batches[catchup.batch_id]
        self.operation_counts["stretch"] += 1
        for r in target.request_ids:
            self.requests[r].ops.append({"op": "stretch", "stage": stage})
        self._enqueue(target, stage, now_us)

    def _split(self, batch: Batch, stage: int, piece_rows: int, now_us: int) -> None:
        pieces: list[list[int]] = [[]]
        rows = 0
        for r in batch.request_ids:
            request_rows = self.requests[r].rows
            if pieces[-1] and rows + request_rows > piece_rows:
                pieces.append([])
                rows = 0
            pieces[-1].append(r)
            rows += request_rows
        if len(pieces) == 1:
            self._enqueue(batch, stage, now_us)
            return
        del self.batches[batch.batch_id]
        self.operation_counts["split"] += 1
        for piece in pieces:
            new = self._new_batch(piece, stage, now_us, bucket=batch.bucket)
            for r in piece:
                self.requests[r].ops.append({"op": "split", "stage": stage})
            self._enqueue(new, stage, now_us)

    def _dissolve_merge(self, batch: Batch, now_us: int) -> None:
        """Cancel ``batch``'s planned merge; a partner held at the boundary goes on alone."""
        plan = batch.merge
        if plan is None:
            return
        batch.merge = None
        partner = self.batches.get(plan.partner_of(batch.batch_id))
        if partner is None:
            return
        partner.merge = None
        if partner.state is BatchState.HELD:
            self._enqueue(partner, partner.stage, now_us)

    def _expire_holds(self, now_us: int) -> None:
        for batch in list(self.batches.values()):
            plan = batch.merge
            if (batch.state is BatchState.HELD and plan is not None and plan.deadline_us is not None
                    and plan.deadline_us <= now_us):
                self._dissolve_merge(batch, now_us)
                self._enqueue(batch, batch.stage, now_us)

    def _drop_cancelled(self, batch: Batch, now_us: int, running_done: bool = False) -> list[Completion]:
        """Remove cancelled members of a batch at a boundary; an emptied batch disappears."""
        cancelled = [r for r in batch.request_ids if self.requests[r].cancelled]
        if not cancelled:
            return []
        batch.request_ids = [r for r in batch.request_ids if not self.requests[r].cancelled]
        batch.rows = sum(self.requests[r].rows for r in batch.request_ids)
        lengths = [self.requests[r].seq_len for r in batch.request_ids
                   if self.requests[r].seq_len is not None]
        batch.pad_to = max(lengths) if lengths else None  # type: ignore[type-var]
        completions = [self._finish(r, "cancelled", "cancelled by the client", now_us) for r in cancelled]
        if not batch.request_ids:
            self._dissolve_merge(batch, now_us)
            if batch.state is BatchState.QUEUED:
                self.queues[batch.stage].remove(batch.batch_id)
            del self.batches[batch.batch_id]
        return completions

    def _finish(self, request_id: int, outcome: str, message: str, now_us: int) -> Completion:
        request = self.requests.pop(request_id)
        request.exit_us = now_us
        return Completion(request_id, outcome, message, request.record(), request.rows)


def make_requests(rows: Sequence[int], now_us: int, seq_lens: Sequence[int | None] | None = None,
                  first_id: int = 0) -> list[Request]:
    """Convenience for tests and benchmarks: requests with consecutive ids."""
    seq = seq_lens if seq_lens is not None else [None] * len(rows)
    return [Request(first_id + i, r, now_us, seq_len=s) for i, (r, s) in enumerate(zip(rows, seq))]
