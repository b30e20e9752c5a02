"""Result revisions: what each job sent, and which earlier results a new job supersedes.

Every object a job queues (pipeline results or "analysis not performed" notices) is
recorded in ``job_outputs`` with its SOP class, instance, series and study UIDs, so that
when the same series is processed again (it changed after it was processed) the earlier
objects can be retracted by a rejection note, also after a restart. A job's revision is
the number of earlier jobs of its series plus one.

Finishing a job is one transaction (:meth:`RevisionStore.finish`): the job's state and
reason, its objects queued to its destinations, its objects recorded, the rejection
notes queued to the destinations of the jobs they retract, and the retracted objects
marked.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicomnode.records import Job, JobState, OutboxState
from dicomnode.state import StateStore

OUTPUTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_outputs (
    job_id INTEGER NOT NULL REFERENCES jobs (id), sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, source_series_uid TEXT NOT NULL, path TEXT NOT NULL,
    retracted_by INTEGER REFERENCES jobs (id), PRIMARY KEY (job_id, sop_instance_uid));
CREATE INDEX IF NOT EXISTS job_outputs_source ON job_outputs (source_series_uid, job_id);
"""
FINISHED_STATES = (JobState.DONE.value, JobState.FAILED.value)


@dataclass(frozen=True)
class OutputRecord:
    """One object a job queued: its UIDs, its file and the job's destinations."""

    job_id: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Retraction:
    """Superseded objects that go to the same destinations, in one study."""

    destinations: tuple[str, ...]
    study_instance_uid: str
    records: tuple[OutputRecord, ...]

    @property
    def key(self) -> str:
        """Names the group among the retractions of one job (for the note's UID)."""
        return f"{self.study_instance_uid}|{','.join(self.destinations)}"


@dataclass(frozen=True)
class Delivery:
    """A file to queue for some destinations."""

    path: Path
    destinations: tuple[str, ...]


def describe_output(job_id: int, path: Path) -> OutputRecord:
    """The UIDs of one object a job wrote (header only)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutputRecord(
        job_id=job_id,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        path=path,
    )


def group_retractions(records: Sequence[OutputRecord]) -> list[Retraction]:
    """Superseded objects grouped by (destinations, study): one rejection note each."""
    groups: dict[tuple[tuple[str, ...], str], list[OutputRecord]] = {}
    for record in records:
        key = (record.destinations, record.study_instance_uid)
        groups.setdefault(key, []).append(record)
    return [
        Retraction(destinations, study, tuple(items))
        for (destinations, study), items in groups.items()
    ]


def _record(row: sqlite3.Row) -> OutputRecord:
    """Build an :class:`OutputRecord` from a ``job_outputs`` row joined with its job."""
    return OutputRecord(
        job_id=row["job_id"],
        sop_class_uid=row["sop_class_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        path=Path(row["path"]),
        destinations=tuple(json.loads(row["destinations"])),
    )


class RevisionStore:
    """The ``job_outputs`` table of a :class:`StateStore` (created on first use)."""

    def __init__(self, store: StateStore) -> None:
        """Use ``store``, adding the ``job_outputs`` table if it is absent."""
        self.store = store
        with store.transaction() as db:
            for statement in OUTPUTS_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def revision_of(self, job: Job) -> int:
        """1 + the number of earlier jobs of ``job``'s series."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT count(*) FROM jobs WHERE series_instance_uid = ? AND id < ?",
                (job.series_instance_uid, job.id),
            ).fetchone()
        return int(row[0]) + 1

    def superseded_by(self, job: Job) -> list[OutputRecord]:
        """Objects of earlier jobs of ``job``'s series not yet retracted, oldest first."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT o.*, j.destinations FROM job_outputs o JOIN jobs j ON j.id = o.job_id "
                "WHERE o.source_series_uid = ? AND o.job_id < ? AND o.retracted_by IS NULL "
                "ORDER BY o.job_id, o.rowid",
                (job.series_instance_uid, job.id),
            ).fetchall()
        return [_record(row) for row in rows]

    def newer_finished_job(self, job: Job) -> int | None:
        """A later job of the same series that already finished, if any (its results
        make ``job``'s stale before they are sent)."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT max(id) FROM jobs WHERE series_instance_uid = ? AND id > ? "
                "AND state IN (?, ?)",
                (job.series_instance_uid, job.id, *FINISHED_STATES),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def outputs(self, job_id: int) -> list[OutputRecord]:
        """The objects a job recorded, in the order it queued them."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT o.*, j.destinations FROM job_outputs o JOIN jobs j ON j.id = o.job_id "
                "WHERE o.job_id = ? ORDER BY o.rowid",
                (job_id,),
            ).fetchall()
        return [_record(row) for row in rows]

    def retracted_by(self, job_id: int) -> list[OutputRecord]:
        """The objects a job's rejection notes retracted."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT o.*, j.destinations FROM job_outputs o JOIN jobs j ON j.id = o.job_id "
                "WHERE o.retracted_by = ? ORDER BY o.job_id, o.rowid",
                (job_id,),
            ).fetchall()
        return [_record(row) for row in rows]

    def finish(
        self,
        job: Job,
        state: JobState,
        reason: str | None,
        outputs: Sequence[OutputRecord],
        deliveries: Sequence[Delivery],
        retracted: Sequence[OutputRecord],
        now: float,
        stale_by: int | None = None,
    ) -> list[int]:
        """In one transaction: set the job's ``state`` and ``reason``, record its
        ``outputs``, queue every delivery, and mark ``retracted`` as retracted by ``job``.

        With ``stale_by`` (a later, finished job of the series) the job's outputs are
        recorded as already retracted by that job, and nothing of them is queued.
        Returns the outbox ids queued.
        """
        with self.store.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                (state.value, reason, now, job.id),
            )
            for record in outputs:
                db.execute(
                    "INSERT OR REPLACE INTO job_outputs (job_id, sop_instance_uid, "
                    "sop_class_uid, series_instance_uid, study_instance_uid, "
                    "source_series_uid, path, retracted_by) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        job.id, record.sop_instance_uid, record.sop_class_uid,
                        record.series_instance_uid, record.study_instance_uid,
                        job.series_instance_uid, str(record.path), stale_by,
                    ),
                )  # fmt: skip
            for record in retracted:
                db.execute(
                    "UPDATE job_outputs SET retracted_by = ? WHERE job_id = ? "
                    "AND sop_instance_uid = ?",
                    (job.id, record.job_id, record.sop_instance_uid),
                )
            ids = []
            for delivery in deliveries:
                for destination in delivery.destinations:
                    cursor = db.execute(
                        "INSERT INTO outbox (job_id, path, destination, state, "
                        "next_attempt_at, created_at) VALUES (?,?,?,?,?,?)",
                        (
                            job.id, str(delivery.path), destination,
                            OutboxState.PENDING.value, now, now,
                        ),
                    )  # fmt: skip
                    ids.append(int(cursor.lastrowid or 0))
            return ids
