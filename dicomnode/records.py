"""Plain records passed between the stages: instances, series, jobs, outbox items."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomnode.completeness import InstanceFacts


class SeriesState(StrEnum):
    """Where a series stands in assembly."""

    RECEIVING = "receiving"
    ROUTED = "routed"
    IGNORED = "ignored"


class JobState(StrEnum):
    """Where a job stands in the durable queue."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    """Where one outgoing file stands.

    ``dead_letter``: its retry window (``outbox.retry_window_h``) ran out undelivered; it
    waits for ``dicomnode deliveries retry`` (sent again) or ``discard`` (never sent).
    """

    PENDING = "pending"
    SENT = "sent"
    DEAD_LETTER = "dead_letter"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class Association:
    """Who sent an instance: the peer's calling AE title and the AE title it called."""

    calling_aet: str
    called_aet: str


@dataclass(frozen=True)
class InstanceRecord:
    """One received, spooled instance and the attributes that route its series."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    received_at: float
    association: Association
    modality: str
    body_part_examined: str
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    sha256: str | None = None  # of the dataset bytes as sent, file meta excluded
    facts: InstanceFacts | None = None  # what its header says about its series' size


class RecordOutcome(StrEnum):
    """What recording a received instance did."""

    NEW = "new"  # a SOP Instance UID not stored before
    REPLACED = "replaced"  # same UID, same series, different bytes: the series changed
    UNCHANGED = "unchanged"  # same UID, same series, identical bytes: nothing written


@dataclass(frozen=True)
class StoredInstance:
    """Where an already stored SOP Instance UID belongs, and its content hash."""

    series_instance_uid: str
    study_instance_uid: str
    path: Path
    sha256: str | None


@dataclass(frozen=True)
class SeriesInfo:
    """A series as assembly and routing see it (first instance's attributes)."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    all_localizer: bool
    sop_class_uid: str
    calling_aet: str
    called_aet: str
    first_arrival: float
    last_arrival: float
    state: SeriesState
    reason: str | None
    instance_count: int
    content_changes: int = 0  # times its content changed after an instance was acknowledged


@dataclass(frozen=True)
class Job:
    """A queued run of one pipeline over one series."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    rule: str
    pipeline: str
    destinations: tuple[str, ...]
    state: JobState
    attempts: int
    reason: str | None


@dataclass(frozen=True)
class OutboxItem:
    """One result file to deliver to one destination."""

    id: int
    job_id: int
    path: Path
    destination: str
    state: OutboxState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float = 0.0
    window_started_at: float | None = None  # set by a retry: its retry window starts anew
    delivered_at: float | None = None

    @property
    def window_start(self) -> float:
        """When the current retry window began: queued, or last sent again by hand."""
        return self.created_at if self.window_started_at is None else self.window_started_at
