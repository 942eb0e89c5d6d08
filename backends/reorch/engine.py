"""The reorchestrator engine: the pure scheduler, the stage executors and the tensors, joined by threads.

No Triton import: ``model.py`` hands requests in as ``(handle, {name: array})`` and gets every
answer back through ``respond(handle, answer)``, exactly once per request, from whichever thread
finished it. Tested in-process with real onnxruntime stages; served by ``model.py``.

Threads: one pool per stage (onnxruntime releases the GIL while it computes; the scheduler bounds
the running launches of each stage to ``stage_concurrency``), a responder thread that sends the
answers, and one timer thread (stretch hold deadlines, cancellation polling). Every event
(requests in, a stage done, a timer) ends in ``_pump``, which asks the scheduler for launches under
one lock and hands them to the stage pools outside it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from backends.common.tensors import value_range_violation

from .errors import BadRequestError
from .executor import StageExecutor, build_feeds, split_even, split_outputs
from .metrics import CountingMetrics
from .policies import ReorchKnobs, StageContext, create_policy
from .scheduler import StageScheduler
from .state import Completion, Request, StageLaunch
from .spec import StagesSpec

LOGGER = logging.getLogger(__name__)

# Answer kinds; model.py maps them to Triton error codes.
SUCCESS, INVALID, STAGE_ERROR, CANCELLED, SHUTDOWN = "success", "invalid", "stage_error", "cancelled", "shutdown"
OVERLOADED = "overloaded"  # refused at once: the admission limit (max_inflight_rows) is reached
# Default admission limit: the rows whose largest boundary tensors fit in this share of available memory.
ADMISSION_MEMORY_SHARE = 0.25


class Answer(NamedTuple):
    """The one final answer for a request (a named tuple: several per batch on the inline path, where a
    frozen dataclass's construction cost three times as much)."""

    kind: str  # SUCCESS | INVALID | STAGE_ERROR | CANCELLED | SHUTDOWN | OVERLOADED
    message: str
    outputs: dict[str, np.ndarray] | None  # model outputs (SUCCESS only)
    record: dict  # the per-request record (docs/architecture.md, REORCH_RECORD); {} where not asked (run_inline)

    @property
    def ok(self) -> bool:
        return self.kind == SUCCESS


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_inflight_rows(spec: StagesSpec, memory_bytes: int | None) -> int:
    """Admission limit sized from memory: rows whose largest per-row boundary tensors fit in a share of it."""
    floor = 4 * spec.max_batch_size
    if memory_bytes is None:
        return max(floor, 4096)
    return max(floor, int(memory_bytes * ADMISSION_MEMORY_SHARE / spec.largest_row_bytes()))


class ReorchEngine:
    """Serve requests through the stages of ``spec`` under ``policy``; answers through ``respond``."""

    def __init__(self, spec: StagesSpec, policy: str, knobs: ReorchKnobs, executors: Sequence[StageExecutor],
                 respond: Callable[[Any, Answer], None], *, metrics: CountingMetrics | None = None,
                 cancel_probe: Callable[[Sequence[Any]], Sequence[bool]] | None = None,
                 cancel_poll_s: float = 0.2, metrics_flush_s: float = 1.0,
                 clock_us: Callable[[], int] = wall_clock_us, whole: StageExecutor | None = None) -> None:
        if len(executors) != len(spec.stages):
            raise ValueError(f"{len(executors)} stage executors for {len(spec.stages)} stages")
        context = StageContext(len(spec.stages), spec.favoured_batch_sizes,
                               max_sequence_length=(spec.max_length or 1 << 30) if spec.is_sequence else None,
                               latency_tables_ms=tuple(spec.latency_tables_ms))
        self.spec = spec
        self.knobs = knobs
        self.scheduler = StageScheduler(create_policy(policy, knobs, context))
        self.executors = list(executors)
        # A fused run of the whole chain executes the whole model's graph where there is one: the same
        # work as the whole model (the K stage graphs cost 10-15% more on CPU: docs/reorch.md).
        self.whole = whole
        self.metrics = metrics if metrics is not None else CountingMetrics()
        self._respond = respond
        self._cancel_probe = cancel_probe
        self._cancel_poll_s = cancel_poll_s
        self._metrics_flush_s = metrics_flush_s
        self._now_us = clock_us
        self._needed_after = [spec.needed_after(i) for i in range(len(spec.stages))]
        # run_inline's checks, worked out once: per input (name, dtype, dimensions, the fixed
        # (axis, size) pairs after the batch axis, sequence axis); the inputs with a value range.
        self._shape_checks = [(t.name, t.dtype, len(t.shape),
                               tuple((axis, size) for axis, size in enumerate(t.shape) if axis > 0 and size >= 0),
                               t.sequence_axis) for t in spec.inputs]
        self._range_checks = [(t.name, t.dtype, t.value_range) for t in spec.inputs if t.value_range is not None]
        self._output_names = tuple(t.name for t in spec.outputs)
        # "auto": on where every stage runs on CUDA; "on" forces the I/O-binding path (tests on CPU).
        self._device_boundaries = knobs.device_boundaries == "on" or (
            knobs.device_boundaries == "auto"
            and all(getattr(r, "device", "cpu") == "cuda" and hasattr(r, "run_bound") for r in executors))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._handles: dict[int, Any] = {}
        self._tensors: dict[int, dict[str, np.ndarray]] = {}
        self.max_inflight_rows = knobs.max_inflight_rows or default_inflight_rows(spec, available_memory_bytes())
        self._inflight_rows = 0
        self._reported_ops: Counter[str] = Counter()
        self._closing = False
        self._trace = open(knobs.trace_jsonl, "a", buffering=1) if knobs.trace_jsonl else None  # noqa: SIM115
        self._trace_lock = threading.Lock()
        # A handle must never be probed while (or after) its final answer is sent (Triton frees the
        # response factory with it): probes and answers never overlap. With one responder thread the
        # lock is uncontended; several responders send in parallel only where docs/reorch.md shows
        # it safe on 2.51 (non-decoupled model, no cancellation probe).
        self._sender_lock = threading.Lock()
        self._parallel_sends = knobs.responder_threads > 1 and cancel_probe is None
        # Answers are sent by their own thread(s): a stage thread goes back to computing at once
        # instead of waiting for one response IPC per request of its batch.
        self._responders = ThreadPoolExecutor(knobs.responder_threads, thread_name_prefix="reorch-respond")
        # The scheduler bounds how many launches of each stage run; a pool thread may also carry its
        # batch on into later stages (see _pump), so each pool has a thread per stage to spare.
        self._pools = [ThreadPoolExecutor(knobs.stage_concurrency * len(spec.stages),
                                          thread_name_prefix=f"reorch-stage{i}")
                       for i in range(len(spec.stages))]
        self._timer = threading.Thread(target=self._timer_loop, name="reorch-timer", daemon=True)
        self._timer.start()

    # ---- requests in ----------------------------------------------------------------------------
    def validate(self, tensors: Mapping[str, np.ndarray], check_values: bool = True) -> tuple[int, int | None]:
        """Rows and sequence length of one request; raises BadRequestError naming what is wrong.

        ``check_values=False`` leaves out the value-range check (``run_inline`` checks a whole batch at once).
        """
        rows: int | None = None
        length: int | None = None
        for tensor in self.spec.inputs:
            array = tensors.get(tensor.name)
            if array is None:
                raise BadRequestError(f"missing input '{tensor.name}'")
            if array.dtype != tensor.dtype:
                raise BadRequestError(f"input '{tensor.name}' must be {tensor.dtype.name}, got {array.dtype.name}")
            if array.ndim != len(tensor.shape):
                raise BadRequestError(f"input '{tensor.name}' must have {len(tensor.shape)} dimensions "
                                      f"(batch first, {list(tensor.shape)}), got shape {list(array.shape)}")
            for axis in range(1, array.ndim):
                if tensor.shape[axis] >= 0 and array.shape[axis] != tensor.shape[axis]:
                    raise BadRequestError(f"input '{tensor.name}' must have shape {list(tensor.shape)} "
                                          f"(-1 = any), got {list(array.shape)}")
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise BadRequestError(f"inputs disagree on the batch size: '{tensor.name}' has "
                                      f"{array.shape[0]} rows, expected {rows}")
            if tensor.sequence_axis is not None:
                if length is None:
                    length = array.shape[tensor.sequence_axis]
                elif array.shape[tensor.sequence_axis] != length:
                    raise BadRequestError(f"inputs disagree on the sequence length: '{tensor.name}' has "
                                          f"{array.shape[tensor.sequence_axis]}, expected {length}")
            violation = value_range_violation(array, tensor.value_range) if check_values else None
            if violation:
                raise BadRequestError(f"input '{tensor.name}': {violation}")
        assert rows is not None
        if not 1 <= rows <= self.spec.max_batch_size:
            raise BadRequestError(f"a request may carry 1..{self.spec.max_batch_size} rows, got {rows}")
        if length is not None:
            longest = self.spec.max_length
            if length < self.spec.min_length or (longest is not None and length > longest):
                raise BadRequestError(f"sequence length {length} is outside "
                                      f"[{self.spec.min_length}, {longest}] for this model")
        return rows, length

    def submit(self, items: Sequence[tuple[Any, Mapping[str, np.ndarray]]], *, arrivals_noted: bool = False) -> None:
        """Take one dynamic-batcher batch of requests; bad ones are answered at once (INVALID).

        ``arrivals_noted``: ``run_inline`` declined this batch, and its cost model has counted the
        arrivals already."""
        now = self._now_us()
        rejected: list[tuple[Any, Answer]] = []
        accepted: list[tuple[Any, Request, dict[str, np.ndarray]]] = []
        for handle, tensors in items:
            try:
                rows, length = self.validate(tensors)
            except BadRequestError as error:
                record = Request(-1, 1, now, exit_us=now).record()
                rejected.append((handle, Answer(INVALID, str(error), None, record)))
                continue
            accepted.append((handle, Request(next(self._ids), rows, now, seq_len=length), dict(tensors)))
        with self._lock:
            admitted = []
            for handle, request, tensors in accepted:
                if self._inflight_rows + request.rows > self.max_inflight_rows:
                    record = Request(-1, request.rows, now, exit_us=now).record()
                    rejected.append((handle, Answer(
                        OVERLOADED, f"the reorchestrator holds {self._inflight_rows} rows in flight and its "
                        f"admission limit is max_inflight_rows={self.max_inflight_rows}: retry later, or raise "
                        "the limit (parameter 'max_inflight_rows' in the model's config.pbtxt)", None, record)))
                    continue
                self._inflight_rows += request.rows
                self._handles[request.request_id] = handle
                self._tensors[request.request_id] = tensors
                admitted.append(request)
            completions = self.scheduler.add_requests(admitted, now, arrivals_noted=arrivals_noted)
            answers = self._answers(completions)
        self._deliver(rejected + answers)
        self._pump()

    def quick_shape(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, int | None] | None:
        """``validate``'s answer for a well-formed request without its value-range check, in one short
        pass over precomputed checks; None where anything is off (``validate`` then names it)."""
        rows = length = None
        for name, dtype, ndim, fixed, sequence_axis in self._shape_checks:
            array = tensors.get(name)
            if array is None or array.ndim != ndim or array.dtype != dtype:
                return None
            shape = array.shape
            for axis, size in fixed:
                if shape[axis] != size:
                    return None
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                return None
            if sequence_axis is not None:
                if length is None:
                    length = shape[sequence_axis]
                elif shape[sequence_axis] != length:
                    return None
        spec = self.spec
        if rows is None or not 1 <= rows <= spec.max_batch_size:
            return None
        if length is not None and (length < spec.min_length or (spec.max_length is not None
                                                                 and length > spec.max_length)):
            return None
        return rows, length

    def run_inline(self, items: Sequence[tuple[Any, Mapping[str, np.ndarray]]],
                   records: Sequence[bool] | None = None) -> list[tuple[Any, Answer]] | None:
        """Answer a whole dynamic-batcher batch here, running the chain fused, when the cost model says
        stage boundaries cannot pay (``fuse``) or cannot pay now (``whole``: nothing else inside, no
        load, no diversity). Returns one answer per item, in order; None: use ``submit`` instead.

        ``records``: per item, whether its record is wanted (None: every item's). An answer nobody
        asked the record of (and no trace file) carries an empty record: none is built.

        The caller (``model.py``) then returns the answers from ``execute``: one response message
        for the batch, exactly like the whole model, instead of one per request through its sender.
        Served, each call comes after an idle wait for the next batch, with cold caches: every Python
        step here costs several times its warm cost (docs/reorch.md), so the path stays short: checks
        worked out at construction (``quick_shape``; ``validate`` only to name what is wrong), value
        ranges once over the batch, no record unless asked, one metrics update per batch.
        """
        now = self._now_us()
        # Value ranges once over the batch (a failure is then pinned per request by validate).
        values_ok = True
        for name, dtype, value_range in self._range_checks:
            arrays = [t[name] for _, t in items if name in t and t[name].dtype == dtype]  # a wrong dtype fails
            joined = arrays[0] if len(arrays) == 1 else np.concatenate([a.ravel() for a in arrays]) if arrays else None
            if joined is not None and value_range_violation(joined, value_range) is not None:
                values_ok = False
        checks: list[tuple[int, int | None] | str] = []
        members: list[Mapping[str, np.ndarray]] = []
        rows: list[int] = []
        lengths: list[int | None] = []
        for _, tensors in items:
            check = self.quick_shape(tensors) if values_ok else None
            if check is None:
                try:
                    check = self.validate(tensors, check_values=not values_ok)
                except BadRequestError as error:
                    checks.append(str(error))
                    continue
            checks.append(check)
            members.append(tensors)
            rows.append(check[0])
            lengths.append(check[1])
        with self._lock:
            if self._closing:
                return None
            decision = self.scheduler.inline_decision(rows, lengths, now)
            if decision is None:
                return None
            # The scheduler counted this decision (and nothing else since the last report): report it
            # with the batch's metrics below instead of diffing every operation's count.
            self._reported_ops[decision] += 1
        pad_to = max((n for n in lengths if n is not None), default=None)
        compute_us: list[int] = []
        per_member, error, failed = (self._run_stages(0, len(self.spec.stages) - 1, members, pad_to,
                                                      rows, lengths, compute_us) if members else ([], None, 0))
        trace = self._trace is not None
        if per_member is not None and error is None and records is not None and not trace \
                and len(checks) == len(members) and not any(records):
            # The common case: every request valid and answered, no record asked.
            output_names = self._output_names
            answers = [(handle, Answer(SUCCESS, "", outputs if len(outputs) == len(output_names) else
                                       {name: outputs[name] for name in output_names}, {}))
                       for (handle, _), outputs in zip(items, per_member)]
            self.metrics.inline_run(sum(rows), sum(compute_us), len(answers), 0, decision)
            return answers
        exit_us = self._now_us()
        answers = []
        produced = iter(per_member or [])
        succeeded = 0
        total_rows = sum(rows)
        for index, ((handle, _), check) in enumerate(zip(items, checks)):
            wanted = records is None or records[index] or trace
            if isinstance(check, str):
                answer = Answer(INVALID, check, None, Request(-1, 1, now, exit_us=now).record() if wanted else {})
            else:
                record = Request(-1, check[0], now, seq_len=check[1], stage0_entry_us=now, exit_us=exit_us,
                                 ops=[{"op": decision, "stage": 0}], batch_sizes=[total_rows] * len(self.spec.stages),
                                 stage_times_us=[[0, c] for c in compute_us]).record() if wanted else {}
                if error is None:
                    outputs = next(produced)
                    answer = Answer(SUCCESS, "", {name: outputs[name] for name in self._output_names}, record)
                    succeeded += 1
                else:
                    answer = Answer(STAGE_ERROR, f"stage {failed} failed: {error}", None, record)
            if trace:
                self._write_trace(answer)
            answers.append((handle, answer))
        self.metrics.inline_run(total_rows, sum(compute_us), succeeded, len(checks) - succeeded, decision)
        return answers

    def close(self, reason: str = "shutting down") -> None:
        """Answer everything pending with SHUTDOWN; later requests get the same answer."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            answers = self._answers(self.scheduler.shutdown(reason, self._now_us()))
            self._wake.notify_all()
        self._deliver(answers)
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self._responders.shutdown(wait=True)  # every answer is out before finalize returns
        self._timer.join(timeout=5)
        self._flush_metrics()
        if self._trace is not None:
            with self._trace_lock:
                self._trace.close()
                self._trace = None

    @property
    def inflight_requests(self) -> int:
        with self._lock:
            return self.scheduler.inflight_requests

    # ---- the loop -------------------------------------------------------------------------------
    def _pump(self, after: StageLaunch | None = None) -> tuple | None:
        """Launch what may run now. With ``after`` (a launch that just finished), the launch that
        continues its requests into the next stage is returned instead of submitted, so the
        finishing thread runs it itself: no thread hand-off on the critical path."""
        pumped_us = self._now_us()  # a launch's wall time (its overhead's measure) starts here
        with self._lock:
            if self._closing:
                return None
            launches = self.scheduler.schedule(self._now_us())
            jobs = []
            for launch in launches:
                members = [self._tensors[r] for r in launch.request_ids]
                rows = [self.scheduler.requests[r].rows for r in launch.request_ids]
                lengths = [self.scheduler.requests[r].seq_len for r in launch.request_ids]
                jobs.append((launch, members, rows, lengths, pumped_us))
            self._report_operations()
            self._wake.notify_all()  # a hold deadline may have appeared
        inline = None
        for job in jobs:
            launch = job[0]
            self.metrics.stage_launch(launch.stage, launch.rows, launch.queue_wait_us)
            if (inline is None and after is not None and launch.stage == after.final_stage + 1
                    and not set(launch.request_ids).isdisjoint(after.request_ids)):
                inline = job
                continue
            try:
                self._pools[launch.stage].submit(self._run_launch, *job)
            except RuntimeError:  # the pool shut down meanwhile: close() answered these requests
                return None
        return inline

    def _run_launch(self, launch: StageLaunch, members: list[dict[str, np.ndarray]], rows: list[int],
                    lengths: list[int | None], pumped_us: int) -> None:
        job: tuple | None = (launch, members, rows, lengths, pumped_us)
        while job is not None:
            job = self._run_one(*job)

    def _run_stages(self, first: int, last: int, members: list[dict[str, np.ndarray]], pad_to: int | None,
                     rows: list[int], lengths: list[int | None], compute_us: list[int]
                     ) -> tuple[list[dict[str, np.ndarray]] | None, str | None, int]:
        """Run stages first..last on one batch; a fused run keeps the batch's tensors whole between stages.

        Returns (per-member tensors still needed after ``last``, or None; the error, if a stage raised;
        the index of the last stage run). Appends each stage's compute time (µs: feeds, graph, split)
        to ``compute_us``; the caller books it (stage launches and inline runs have their own metrics).
        """
        if self.whole is not None and first == 0 and last == len(self.spec.stages) - 1:
            return self._run_whole(members, pad_to, rows, lengths, compute_us)
        batched: dict[str, Any] = {}
        index = first
        # Device data path: in a fused run, boundary tensors stay on the device between stages
        # (OrtValues through I/O binding); host copies only where the batch is built and split.
        bound = self._device_boundaries and last > first
        for index in range(first, last + 1):
            stage = self.spec.stages[index]
            started = time.perf_counter()
            try:
                feeds = build_feeds(self.spec, stage, members, pad_to, batched)
                if bound:
                    outputs = self.executors[index].run_bound(feeds, keep_on_device=index < last)
                else:
                    outputs = self.executors[index].run(feeds)
                if index == last:
                    return (split_outputs(self.spec, stage, outputs, rows, lengths, batched=batched,
                                          keep=self._needed_after[index]), None, index)
                batched.update(outputs)
            except Exception as exc:  # a stage failure fails exactly this batch; the executors go on
                error = f"{type(exc).__name__}: {exc}"
                LOGGER.warning("stage %d failed for a batch of %d rows: %s", index, sum(rows), error)
                return None, error, index
            finally:
                compute_us.append(int((time.perf_counter() - started) * 1e6))
        return None, "no stage ran", index

    def _run_whole(self, members: list[dict[str, np.ndarray]], pad_to: int | None, rows: list[int],
                   lengths: list[int | None], compute_us: list[int]
                   ) -> tuple[list[dict[str, np.ndarray]] | None, str | None, int]:
        """``_run_stages`` of the whole chain on the whole model's graph. Its compute time is stage 0's
        (the other stages get 0), so a request's stage times still add up; a failure is reported as
        stage 0's, naming the whole graph."""
        assert self.whole is not None
        last = len(self.spec.stages) - 1
        started = time.perf_counter()
        try:
            if len(members) == 1 and pad_to == lengths[0]:
                # One request at its own length: its tensors are the feeds, the outputs its answer.
                outputs = self.whole.run(members[0])
                return [{name: outputs[name] for name in self.whole.stage.outputs}], None, last
            if pad_to is None or lengths.count(pad_to) == len(lengths):
                # Every member at the batch's length (steady fixed-length load, or no sequence axis):
                # nothing to pad or cut, so the feeds are plain concatenations and the answers views.
                outputs = self.whole.run({name: np.concatenate([m[name] for m in members])
                                          for name in self.whole.stage.inputs})
                return split_even(self.whole.stage, outputs, rows), None, last
            outputs = self.whole.run(build_feeds(self.spec, self.whole.stage, members, pad_to))
            return split_outputs(self.spec, self.whole.stage, outputs, rows, lengths), None, last
        except Exception as exc:  # fails exactly this batch, like a stage
            error = f"the whole-model graph of the fused chain: {type(exc).__name__}: {exc}"
            LOGGER.warning("fused chain failed for a batch of %d rows: %s", sum(rows), error)
            return None, error, 0
        finally:
            compute_us.extend([int((time.perf_counter() - started) * 1e6)] + [0] * last)

    def _run_one(self, launch: StageLaunch, members: list[dict[str, np.ndarray]], rows: list[int],
                 lengths: list[int | None], pumped_us: int) -> tuple | None:
        last = launch.final_stage
        compute_us: list[int] = []
        per_member, error, index = self._run_stages(launch.stage, last, members, launch.pad_to, rows, lengths,
                                                    compute_us)
        for stage, stage_us in enumerate(compute_us, start=launch.stage):
            self.metrics.stage_compute(stage, stage_us)
        cancelled = self._probe_cancelled(launch.request_ids) if error is None else []
        with self._lock:
            if self._closing:
                return None
            now = self._now_us()
            completions = self.scheduler.cancel(cancelled, now) if cancelled else []
            if per_member is not None:
                keep = self._needed_after[last]
                for request_id, produced in zip(launch.request_ids, per_member):
                    tensors = self._tensors.get(request_id)
                    if tensors is None:
                        continue
                    tensors.update(produced)
                    for name in [n for n in tensors if n not in keep]:
                        del tensors[name]  # free what no later stage reads
            completions += self.scheduler.on_stage_done(launch.launch_id, now, error,
                                                        failed_stage=index if error is not None else None,
                                                        compute_us=compute_us)
            if error is None:
                # What this launch cost beyond its compute: hand-off, scheduling, waiting for a core.
                self.scheduler.note_launch_overhead(self._now_us() - pumped_us - sum(compute_us))
                if self.scheduler.fuse is not None:
                    self.metrics.launch_overhead(self.scheduler.fuse.overhead_us)
            answers = self._answers(completions)
        self._deliver(answers)
        return self._pump(after=launch)

    def _timer_loop(self) -> None:
        last_poll = last_flush = time.monotonic()
        while True:
            if time.monotonic() - last_flush >= self._metrics_flush_s:
                last_flush = time.monotonic()
                self._flush_metrics()
            with self._lock:
                if self._closing:
                    return
                timer_us = self.scheduler.next_timer_us()
                wait_s = self._metrics_flush_s
                if self._cancel_probe is not None:
                    wait_s = min(wait_s, self._cancel_poll_s)
                if timer_us is not None:
                    wait_s = min(wait_s, max(0.0, (timer_us - self._now_us()) / 1e6))
                if wait_s > 0:
                    self._wake.wait(wait_s)
                if self._closing:
                    return
                waiting: list[int] = []
                if self._cancel_probe is not None and time.monotonic() - last_poll >= self._cancel_poll_s:
                    last_poll = time.monotonic()
                    waiting = self.scheduler.waiting_request_ids()
            if waiting:
                cancelled = self._probe_cancelled(waiting)
                if cancelled:
                    with self._lock:
                        answers = self._answers(self.scheduler.cancel(cancelled, self._now_us()))
                    self._deliver(answers)
            self._pump()

    def _flush_metrics(self) -> None:
        # Metric updates are IPC too: one at a time with the answers (see _sender_lock).
        try:
            with self._sender_lock:
                self.metrics.flush()
        except Exception as exc:  # metrics must never take the engine down
            LOGGER.warning("could not publish metrics: %s", exc)

    # ---- answers --------------------------------------------------------------------------------
    def _probe_cancelled(self, request_ids: Sequence[int]) -> list[int]:
        if self._cancel_probe is None:
            return []
        with self._sender_lock:
            with self._lock:  # still unanswered (answers leave _handles before they are sent)
                known = [(r, self._handles[r]) for r in request_ids if r in self._handles]
            try:
                flags = self._cancel_probe([handle for _, handle in known]) if known else []
            except Exception as exc:  # a failing probe must not lose requests; treat as not cancelled
                LOGGER.warning("cancellation probe failed: %s", exc)
                return []
        return [r for (r, _), flag in zip(known, flags) if flag]

    def _answers(self, completions: Sequence[Completion]) -> list[tuple[Any, Answer]]:
        """Turn scheduler completions into answers (call under the lock)."""
        answers = []
        for completion in completions:
            handle = self._handles.pop(completion.request_id)
            tensors = self._tensors.pop(completion.request_id, {})
            self._inflight_rows -= completion.rows
            if completion.outcome == "success":
                outputs = {t.name: tensors[t.name] for t in self.spec.outputs}
                answers.append((handle, Answer(SUCCESS, "", outputs, completion.record)))
            elif completion.outcome == "cancelled":
                answers.append((handle, Answer(CANCELLED, completion.message, None, completion.record)))
            else:
                kind = SHUTDOWN if self._closing else STAGE_ERROR
                answers.append((handle, Answer(kind, completion.message, None, completion.record)))
        self.metrics.inflight(self.scheduler.inflight_requests)
        self._report_operations()
        return answers

    def _deliver(self, answers: Sequence[tuple[Any, Answer]]) -> None:
        if not answers:
            return
        try:
            self._responders.submit(self._send, answers)
        except RuntimeError:  # responders already shut down (close finished): answer here
            self._send(answers)

    def _send(self, answers: Sequence[tuple[Any, Answer]]) -> None:
        for handle, answer in answers:
            self.metrics.outcome({SUCCESS: "success", CANCELLED: "cancelled"}.get(answer.kind, "error"))
            self._write_trace(answer)
            try:
                if self._parallel_sends:
                    self._respond(handle, answer)
                else:
                    with self._sender_lock:
                        self._respond(handle, answer)
            except Exception as exc:  # the client may be gone; the other answers must still go out
                LOGGER.warning("could not deliver an answer (%s): %s", answer.kind, exc)

    def _write_trace(self, answer: Answer) -> None:
        if self._trace is not None:
            line = json.dumps({"outcome": answer.kind, "message": answer.message, **answer.record})
            with self._trace_lock:
                if self._trace is not None:
                    self._trace.write(line + "\n")

    def _report_operations(self) -> None:
        counts = self.scheduler.operation_counts
        for operation, total in counts.items():
            delta = total - self._reported_ops[operation]
            if delta:
                self.metrics.operation(operation, delta)
                self._reported_ops[operation] = total
