"""The durable job queue and the outbox, both tables of the :class:`StateStore`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.records import Job, JobState, OutboxItem, OutboxState, SeriesInfo, SeriesState
from dicomnode.state import StateStore


def _job(row: sqlite3.Row) -> Job:
    """Build a :class:`Job` from a ``jobs`` row."""
    return Job(
        id=row["id"],
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        rule=row["rule"],
        pipeline=row["pipeline"],
        destinations=tuple(json.loads(row["destinations"])),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        reason=row["reason"],
    )


def _item(row: sqlite3.Row) -> OutboxItem:
    """Build an :class:`OutboxItem` from an ``outbox`` row."""
    return OutboxItem(
        id=row["id"],
        job_id=row["job_id"],
        path=Path(row["path"]),
        destination=row["destination"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        window_started_at=row["window_started_at"],
        delivered_at=row["delivered_at"],
    )


class JobQueue:
    """Jobs: queued -> running -> done | failed; survives restarts."""

    def __init__(self, store: StateStore) -> None:
        """Use the tables of ``store``."""
        self.store = store

    def enqueue_for_series(
        self, series: SeriesInfo, rule: str, pipeline: str, destinations: Sequence[str], now: float
    ) -> int | None:
        """Mark the series routed and queue its job in one transaction.

        Returns the job id, or ``None`` when an instance arrived meanwhile.
        """
        with self.store.transaction() as db:
            if not self.store.conclude_in(db, series, SeriesState.ROUTED, None):
                return None
            cursor = db.execute(
                "INSERT INTO jobs (series_instance_uid, study_instance_uid, rule, pipeline, "
                "destinations, state, created_at) VALUES (?,?,?,?,?,?,?)",
                (
                    series.series_instance_uid, series.study_instance_uid, rule, pipeline,
                    json.dumps(list(destinations)), JobState.QUEUED.value, now,
                ),
            )  # fmt: skip
            return cursor.lastrowid

    def claim(self, now: float) -> Job | None:
        """Atomically take the oldest queued job and mark it running."""
        with self.store.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? "
                "WHERE id = (SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1) "
                "RETURNING *",
                (JobState.RUNNING.value, now, JobState.QUEUED.value),
            ).fetchone()
        return _job(row) if row else None

    def complete(self, job: Job, results: Sequence[Path], now: float) -> list[int]:
        """Mark a job done and queue each result file for each of its destinations."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, reason = NULL WHERE id = ?",
                (JobState.DONE.value, now, job.id),
            )
            ids = []
            for path in results:
                for destination in job.destinations:
                    cursor = db.execute(
                        "INSERT INTO outbox (job_id, path, destination, state, "
                        "next_attempt_at, created_at) VALUES (?,?,?,?,?,?)",
                        (job.id, str(path), destination, OutboxState.PENDING.value, now, now),
                    )
                    ids.append(int(cursor.lastrowid or 0))
            return ids

    def record_stages(self, job_id: int, seconds: Mapping[str, float]) -> None:
        """Record where a job's time went (``pipelines.stages``), replacing an earlier
        attempt's split."""
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO job_stages (job_id, stage, seconds) VALUES (?,?,?)",
                [(job_id, name, value) for name, value in seconds.items()],
            )

    def stages(self, job_id: int) -> dict[str, float]:
        """The stage split recorded for a job (empty before it ran)."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT stage, seconds FROM job_stages WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {str(row["stage"]): float(row["seconds"]) for row in rows}

    def stage_totals(self) -> list[tuple[str, str, int, float]]:
        """(pipeline, stage, jobs, seconds in all) over every job that recorded its
        stages; stage ``sending`` is a job's finish to its last result delivered (jobs
        whose every result was delivered)."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT j.pipeline, s.stage, count(*), sum(s.seconds) FROM job_stages s "
                "JOIN jobs j ON j.id = s.job_id GROUP BY j.pipeline, s.stage"
            ).fetchall()
            rows += db.execute(
                "SELECT pipeline, 'sending', count(*), sum(delivered - finished_at) FROM ("
                "SELECT j.pipeline, j.finished_at, max(o.delivered_at) AS delivered "
                "FROM jobs j JOIN outbox o ON o.job_id = j.id WHERE j.finished_at IS NOT NULL "
                "GROUP BY j.id HAVING count(o.delivered_at) = count(*)) GROUP BY pipeline"
            ).fetchall()
        return [(str(p), str(s), int(n), float(total)) for p, s, n, total in rows]

    def fail(self, job_id: int, reason: str, now: float) -> None:
        """Mark a job failed with a reason."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                (JobState.FAILED.value, reason, now, job_id),
            )

    def requeue_running(self) -> int:
        """At start-up: put jobs a previous run left ``running`` back in the queue."""
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, started_at = NULL WHERE state = ?",
                (JobState.QUEUED.value, JobState.RUNNING.value),
            )
            return cursor.rowcount

    def get(self, job_id: int) -> Job | None:
        """One job by id, or ``None``."""
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        with self.store.transaction() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [_job(row) for row in rows]

    def count_active(self) -> int:
        """How many jobs are queued or running."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT count(*) FROM jobs WHERE state IN (?, ?)",
                (JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchone()
        return int(row[0])


@dataclass(frozen=True)
class Attempt:
    """One recorded delivery attempt of an outbox item."""

    outbox_id: int
    attempted_at: float
    status: int | None
    error: str | None


class OutboxStore:
    """Outbox rows and the log of every delivery attempt."""

    def __init__(self, store: StateStore) -> None:
        """Use the tables of ``store``."""
        self.store = store

    def due(self, now: float) -> list[OutboxItem]:
        """Pending items whose next attempt time has come, oldest first."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ? ORDER BY id",
                (OutboxState.PENDING.value, now),
            ).fetchall()
        return [_item(row) for row in rows]

    def record_attempt(
        self,
        item: OutboxItem,
        now: float,
        status: int | None,
        error: str | None,
        outcome: OutboxState,
        next_attempt_at: float,
    ) -> None:
        """Log an attempt and move the item to ``outcome`` (pending means retry later)."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO outbox_attempts (outbox_id, attempted_at, status, error) "
                "VALUES (?,?,?,?)",
                (item.id, now, status, error),
            )
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "last_error = ?, delivered_at = ? WHERE id = ?",
                (
                    outcome.value, next_attempt_at, error,
                    now if outcome is OutboxState.SENT else None, item.id,
                ),
            )  # fmt: skip

    def items(self) -> list[OutboxItem]:
        """Every outbox item, oldest first."""
        with self.store.transaction() as db:
            rows = db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
        return [_item(row) for row in rows]

    def attempts(self, outbox_id: int) -> list[Attempt]:
        """The attempts made for one item, in order."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT * FROM outbox_attempts WHERE outbox_id = ? ORDER BY id", (outbox_id,)
            ).fetchall()
        return [Attempt(r["outbox_id"], r["attempted_at"], r["status"], r["error"]) for r in rows]

    def count_unattempted(self, job_id: int) -> int:
        """How many items of job ``job_id`` wait for their first delivery attempt."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT count(*) FROM outbox WHERE job_id = ? AND state = ? AND attempts = 0",
                (job_id, OutboxState.PENDING.value),
            ).fetchone()
        return int(row[0])

    def count_pending(self) -> int:
        """How many items still wait to be sent."""
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT count(*) FROM outbox WHERE state = ?", (OutboxState.PENDING.value,)
            ).fetchone()
        return int(row[0])
