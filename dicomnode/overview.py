"""What the node is doing, read from its durable state for the status page and metrics.

Only counts, job and delivery bookkeeping and timings are read: no patient identifier and
no UID leaves this module. Turnaround is the time from the last instance of a series
arriving to the last of its job's results being acknowledged by a destination (the
figure a stroke team waits for); it is known once every result of the job was delivered.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dicomnode.records import JobState, OutboxState
from dicomnode.state import StateStore

RECENT_JOBS = 50
"""How many of the latest jobs the page lists."""

PERCENTILES = (50.0, 90.0, 99.0)

TURNAROUND_BUCKETS_S = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds of the turnaround histogram (seconds)."""


@dataclass(frozen=True)
class JobLine:
    """One job as the page lists it."""

    job_id: int
    pipeline: str
    rule: str
    state: str
    instances: int
    created_at: float
    duration_s: float | None  # start of the run to its end
    turnaround_s: float | None  # last instance received to last result delivered
    reason: str | None


@dataclass(frozen=True)
class DeliveryLine:
    """One outbox item not delivered yet (pending, or a dead letter: its retry window
    ran out)."""

    outbox_id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None

    @property
    def dead(self) -> bool:
        """Whether the node stopped trying: only an operator's re-send moves it again."""
        return self.state == OutboxState.DEAD_LETTER.value


@dataclass(frozen=True)
class Overview:
    """The state of the node at one moment."""

    counts: dict[str, dict[str, int]]
    jobs: tuple[JobLine, ...]
    deliveries: tuple[DeliveryLine, ...]
    turnarounds_s: tuple[float, ...]  # every delivered job's turnaround, oldest first

    def turnaround_percentiles(self) -> dict[float, float]:
        """p50/p90/p99 of the turnaround in seconds (empty before the first delivery)."""
        return {p: percentile(self.turnarounds_s, p) for p in PERCENTILES if self.turnarounds_s}

    @property
    def dead_letters(self) -> tuple[DeliveryLine, ...]:
        """The deliveries the node gave up on."""
        return tuple(line for line in self.deliveries if line.dead)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` by linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


_TURNAROUND_SQL = """
SELECT j.id AS job_id, max(a.attempted_at) - s.last_arrival AS turnaround
FROM jobs j
JOIN series s ON s.series_instance_uid = j.series_instance_uid
JOIN outbox o ON o.job_id = j.id
JOIN outbox_attempts a ON a.outbox_id = o.id AND o.state = :sent
WHERE j.state = :done
  AND NOT EXISTS (SELECT 1 FROM outbox o2 WHERE o2.job_id = j.id AND o2.state != :sent)
GROUP BY j.id
ORDER BY j.id
"""

_JOBS_SQL = """
SELECT j.id, j.pipeline, j.rule, j.state, j.created_at, j.started_at, j.finished_at,
       j.reason, (SELECT count(*) FROM instances i
                  WHERE i.series_instance_uid = j.series_instance_uid) AS instances
FROM jobs j ORDER BY j.id DESC LIMIT :limit
"""

_DELIVERIES_SQL = """
SELECT id, job_id, destination, state, attempts, next_attempt_at, last_error
FROM outbox WHERE state IN (:pending, :dead) ORDER BY id
"""


def read_overview(store: StateStore, recent: int = RECENT_JOBS) -> Overview:
    """The counts, the ``recent`` latest jobs, every undelivered item and all turnarounds."""
    counts = store.counts_by_state()
    with store.transaction() as db:
        turnaround = _turnarounds(db)
        jobs = tuple(
            JobLine(
                job_id=int(row["id"]),
                pipeline=str(row["pipeline"]),
                rule=str(row["rule"]),
                state=str(row["state"]),
                instances=int(row["instances"]),
                created_at=float(row["created_at"]),
                duration_s=_duration(row["started_at"], row["finished_at"], row["state"]),
                turnaround_s=turnaround.get(int(row["id"])),
                reason=row["reason"],
            )
            for row in db.execute(_JOBS_SQL, {"limit": recent})
        )
        deliveries = tuple(
            DeliveryLine(
                outbox_id=int(row["id"]),
                job_id=int(row["job_id"]),
                destination=str(row["destination"]),
                state=str(row["state"]),
                attempts=int(row["attempts"]),
                next_attempt_at=float(row["next_attempt_at"]),
                last_error=row["last_error"],
            )
            for row in db.execute(
                _DELIVERIES_SQL,
                {"pending": OutboxState.PENDING.value, "dead": OutboxState.DEAD_LETTER.value},
            )
        )
    return Overview(counts, jobs, deliveries, tuple(turnaround.values()))


def _turnarounds(db: sqlite3.Connection) -> dict[int, float]:
    """Turnaround in seconds of every job whose results were all delivered, by job id."""
    rows = db.execute(_TURNAROUND_SQL, {"sent": OutboxState.SENT.value, "done": JobState.DONE})
    return {int(row["job_id"]): max(float(row["turnaround"]), 0.0) for row in rows}


def _duration(started: float | None, finished: float | None, state: str) -> float | None:
    """How long a finished job ran; ``None`` while it waits or runs."""
    if started is None or finished is None or state in (JobState.QUEUED, JobState.RUNNING):
        return None
    return max(float(finished) - float(started), 0.0)


def histogram_buckets(values: Sequence[float]) -> list[tuple[str, int]]:
    """Cumulative Prometheus buckets (``le`` label, count) of ``values``, ``+Inf`` last."""
    buckets = [(_le(bound), sum(1 for v in values if v <= bound)) for bound in TURNAROUND_BUCKETS_S]
    return [*buckets, ("+Inf", len(values))]


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it."""
    return repr(float(bound))
