"""Result revisions: what each job sent, and which earlier results a new job supersedes.

Every object a job queues (pipeline results or "analysis not performed" notices) is
recorded in ``job_outputs`` with its SOP class, instance, series and study UIDs, so that
when the same series is processed again (it changed after it was processed) the earlier
objects can be retracted by a rejection note, also after a restart.

A job's revision (``job_revisions``) counts the versions of its series' content: each job
records a fingerprint of its series' spooled files; a job whose series changed since the
previous job gets the highest earlier revision plus one (so, when every job saw a change,
the number of earlier jobs plus one), and a job that sees exactly the files the previous
job saw (the series was re-sent unchanged) keeps that job's revision, so its objects get
the same UIDs and replace, rather than supersede, the ones PACS holds.

Finishing a job is one transaction (:meth:`RevisionStore.finish`): the job's state and
reason, its objects queued to its destinations, its objects recorded, the rejection
notes queued to the destinations of the jobs they retract, and the retracted objects
marked.
"""

from __future__ import annotations

import hashlib
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
CREATE TABLE IF NOT EXISTS job_revisions (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id), series_instance_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL, revision INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS job_revisions_series ON job_revisions (series_instance_uid, job_id);
"""
READ_CHUNK = 1 << 20
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


def series_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the names and contents of a series' spooled files (order-free)."""
    digests = []
    for path in paths:
        digest = hashlib.sha256()
        try:
            with Path(path).open("rb") as handle:
                while chunk := handle.read(READ_CHUNK):
                    digest.update(chunk)
        except OSError as exc:  # the pipeline will name the file; it still changes the print
            digest.update(f"unreadable: {exc.errno}".encode())
        digests.append(f"{Path(path).name}:{digest.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


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

    def assign_revision(self, job: Job, fingerprint: str) -> int:
        """Record ``job``'s series fingerprint and return its revision: the previous
        job's when the fingerprint is the same, else the highest earlier one plus one.

        A job taken again after a restart is assigned again, with the same result when
        its files did not change.
        """
        series = job.series_instance_uid
        with self.store.transaction() as db:
            previous = db.execute(
                "SELECT fingerprint, revision FROM job_revisions WHERE series_instance_uid = ? "
                "AND job_id < ? ORDER BY job_id DESC LIMIT 1",
                (series, job.id),
            ).fetchone()
            highest = db.execute(
                "SELECT max(revision) FROM job_revisions WHERE series_instance_uid = ? "
                "AND job_id < ?",
                (series, job.id),
            ).fetchone()[0]
            if previous is not None and previous["fingerprint"] == fingerprint:
                revision = int(previous["revision"])
            else:
                revision = int(highest or 0) + 1
            db.execute(
                "INSERT OR REPLACE INTO job_revisions VALUES (?,?,?,?)",
                (job.id, series, fingerprint, revision),
            )
        return revision

    def revision_of(self, job: Job) -> int | None:
        """The revision assigned to ``job``, or ``None`` before it was taken."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT revision FROM job_revisions WHERE job_id = ?", (job.id,)
            ).fetchone()
        return None if row is None else int(row[0])

    def superseded_by(self, job: Job) -> list[OutputRecord]:
        """Objects of earlier jobs of ``job``'s series not yet retracted, oldest first
        (an object ``job`` writes again under the same UID is the caller's to keep)."""
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
