"""The scheduler's records: requests, batches between stages, launches and final answers.

Plain data with no behaviour beyond small accessors, so the policies (which read batches and requests)
and the scheduler (which changes them) both import this module and not each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

OUTCOMES = ("success", "error", "cancelled")


@dataclass
class Request:
    """One client request (maybe several rows) and its record of what happened to it."""

    request_id: int
    rows: int
    arrival_us: int
    seq_len: int | None = None  # length along the sequence axis; None for non-sequence models
    bucket: int | None = None  # set when the request entered in a bucketed batch
    stage0_entry_us: int | None = None
    exit_us: int | None = None
    ops: list[dict] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # rows of its batch at each stage it ran
    # [wait_us, compute_us] at each stage it ran: waited since it was ready for the stage (stage 0
    # entry, or the end of the stage before), then computed (stages after the first of a fused run wait 0)
    stage_times_us: list[list[int]] = field(default_factory=list)
    ready_us: int | None = None  # when it became ready for its next stage
    launched_us: int | None = None  # when its current launch started
    cancelled: bool = False

    def record(self) -> dict:
        """The per-request record (docs/architecture.md, output REORCH_RECORD)."""
        return {"arrival_us": self.arrival_us, "stage0_entry_us": self.stage0_entry_us,
                "exit_us": self.exit_us, "ops": list(self.ops), "bucket": self.bucket,
                "batch_sizes": list(self.batch_sizes), "stage_times_us": [list(t) for t in self.stage_times_us]}


class BatchState(enum.Enum):
    QUEUED = "queued"  # waiting before stage `stage`
    RUNNING = "running"  # running stage `stage`
    HELD = "held"  # at the boundary before stage `stage`, waiting for its merge partner


@dataclass
class MergePlan:
    """A stretch in progress: ``catchup`` runs stages 0..boundary-1, then merges into ``target``."""

    target_id: int
    catchup_id: int
    boundary: int
    deadline_us: int | None = None  # set when the first of the two reaches the boundary

    def partner_of(self, batch_id: int) -> int:
        return self.catchup_id if batch_id == self.target_id else self.target_id


@dataclass
class Batch:
    batch_id: int
    request_ids: list[int]
    stage: int
    rows: int  # == sum of the members' rows
    state: BatchState = BatchState.QUEUED
    pad_to: int | None = None  # longest member along the sequence axis (the launch pads to it)
    bucket: int | None = None
    queued_since_us: int = 0
    merge: MergePlan | None = None
    fused: bool = False  # runs every stage in one launch (cost model: fuse / whole)


@dataclass(frozen=True)
class StageLaunch:
    """Run ``stage`` on the concatenation of these requests' rows (in this order)."""

    launch_id: int
    stage: int
    request_ids: tuple[int, ...]
    rows: int
    pad_to: int | None  # pad sequence tensors to this length (None: no sequence axis)
    queue_wait_us: int  # time the batch waited before this stage (metrics)
    last_stage: int = -1  # a fused launch runs stage..last_stage; -1: only ``stage``

    @property
    def final_stage(self) -> int:
        return self.stage if self.last_stage < 0 else self.last_stage


@dataclass(frozen=True)
class Completion:
    """The final answer for one request: success (outputs are with the caller), error or cancelled."""

    request_id: int
    outcome: str  # one of OUTCOMES
    message: str
    record: dict
    rows: int = 1
