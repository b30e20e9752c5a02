"""Administering deliveries and jobs: list, retry, discard; the counts ``/health`` needs.

Used by the ``dicomnode deliveries`` and ``dicomnode jobs`` commands (on the state
database of a running or stopped node) and by the outbox's back-off reset. Each change is
one conditional UPDATE, so a dead letter retried twice at once is queued once, and the
outbox loop (the only sender) delivers it exactly once.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass

from dicomnode.jobs import _item
from dicomnode.records import JobState, OutboxItem, OutboxState
from dicomnode.state import StateStore

AGE_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_age(text: str) -> float:
    """Seconds in an age such as ``90``, ``90s``, ``30m``, ``2h`` or ``3d``."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"not an age: {text!r} (use e.g. 90s, 30m, 2h, 3d)")
    return float(match.group(1)) * AGE_UNITS_S[match.group(2) or "s"]


@dataclass(frozen=True)
class Selection:
    """Which rows a command acts on: all given conditions hold."""

    states: tuple[str, ...] = ()
    destination: str | None = None
    older_than_s: float | None = None  # created at least this long ago
    ids: tuple[int, ...] = ()

    def where(self, now: float, table_alias: str = "") -> tuple[str, list[object]]:
        """The SQL condition and its arguments."""
        prefix = f"{table_alias}." if table_alias else ""
        clauses: list[str] = ["1"]
        args: list[object] = []
        if self.states:
            clauses.append(f"{prefix}state IN ({','.join('?' * len(self.states))})")
            args += self.states
        if self.destination is not None:
            clauses.append(f"{prefix}destination = ?")
            args.append(self.destination)
        if self.older_than_s is not None:
            clauses.append(f"{prefix}created_at <= ?")
            args.append(now - self.older_than_s)
        if self.ids:
            clauses.append(f"{prefix}id IN ({','.join('?' * len(self.ids))})")
            args += self.ids
        return " AND ".join(clauses), args


@dataclass(frozen=True)
class JobSummary:
    """A job as an administrator sees it: no patient or study identifiers."""

    id: int
    rule: str
    pipeline: str
    destinations: tuple[str, ...]
    state: JobState
    attempts: int
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    retried_by: int | None


def _summary(row: sqlite3.Row) -> JobSummary:
    """A :class:`JobSummary` from a ``jobs`` row."""
    return JobSummary(
        id=row["id"],
        rule=row["rule"],
        pipeline=row["pipeline"],
        destinations=tuple(json.loads(row["destinations"])),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        reason=row["reason"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        retried_by=row["retried_by"],
    )


class DeliveryAdmin:
    """Queries and changes on the outbox and job tables for administrators."""

    def __init__(self, store: StateStore) -> None:
        """Use the tables of ``store``."""
        self.store = store

    def deliveries(self, selection: Selection, now: float) -> list[OutboxItem]:
        """Outbox items matching ``selection``, oldest first."""
        where, args = selection.where(now)
        with self.store.transaction() as db:
            rows = db.execute(f"SELECT * FROM outbox WHERE {where} ORDER BY id", args).fetchall()
        return [_item(row) for row in rows]

    def retry_deliveries(self, selection: Selection, now: float) -> list[int]:
        """Queue the dead letters matching ``selection`` again, due now, with a fresh
        retry window; returns their ids (items in any other state are left alone)."""
        where, args = selection.where(now)
        with self.store.transaction() as db:
            rows = db.execute(
                "UPDATE outbox SET state = ?, next_attempt_at = ?, window_started_at = ? "
                f"WHERE state = ? AND {where} RETURNING id",
                [OutboxState.PENDING.value, now, now, OutboxState.DEAD_LETTER.value, *args],
            ).fetchall()
        return sorted(int(row[0]) for row in rows)

    def discard_deliveries(self, selection: Selection, now: float) -> list[int]:
        """Give up on the dead letters and pending items matching ``selection``: they
        are never sent (retention may then remove them); returns their ids."""
        where, args = selection.where(now)
        with self.store.transaction() as db:
            rows = db.execute(
                f"UPDATE outbox SET state = ? WHERE state IN (?, ?) AND {where} RETURNING id",
                [
                    OutboxState.DISCARDED.value, OutboxState.DEAD_LETTER.value,
                    OutboxState.PENDING.value, *args,
                ],
            ).fetchall()  # fmt: skip
        return sorted(int(row[0]) for row in rows)

    def backed_off_destinations(self, now: float) -> list[str]:
        """Destinations with pending items that failed before and are not yet due."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT DISTINCT destination FROM outbox WHERE state = ? AND attempts > 0 "
                "AND next_attempt_at > ? ORDER BY destination",
                (OutboxState.PENDING.value, now),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def reset_backoff(self, destination: str, now: float) -> int:
        """Make every backed-off pending item of ``destination`` due now; how many."""
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE state = ? AND destination = ? "
                "AND next_attempt_at > ?",
                (now, OutboxState.PENDING.value, destination, now),
            )
        return cursor.rowcount

    def jobs(self, selection: Selection, now: float) -> list[JobSummary]:
        """Jobs matching ``selection`` (``destination``: one of the job's), oldest first."""
        where, args = Selection(
            selection.states, None, selection.older_than_s, selection.ids
        ).where(now)
        with self.store.transaction() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY id", args).fetchall()
        found = [_summary(row) for row in rows]
        if selection.destination is not None:
            found = [job for job in found if selection.destination in job.destinations]
        return found

    def retry_jobs(self, selection: Selection, now: float) -> list[tuple[int, int]]:
        """Queue a new job for each failed, not yet retried job matching ``selection``
        (same series, rule, pipeline and destinations); returns (failed id, new id)."""
        failed = [
            job
            for job in self.jobs(selection, now)
            if job.state is JobState.FAILED and job.retried_by is None
        ]
        pairs: list[tuple[int, int]] = []
        with self.store.transaction() as db:
            for job in failed:
                cursor = db.execute(
                    "INSERT INTO jobs (series_instance_uid, study_instance_uid, rule, pipeline, "
                    "destinations, state, created_at) SELECT series_instance_uid, "
                    "study_instance_uid, rule, pipeline, destinations, ?, ? FROM jobs "
                    "WHERE id = ? AND retried_by IS NULL",
                    (JobState.QUEUED.value, now, job.id),
                )
                if cursor.rowcount != 1:
                    continue
                new_id = int(cursor.lastrowid or 0)
                db.execute("UPDATE jobs SET retried_by = ? WHERE id = ?", (new_id, job.id))
                pairs.append((job.id, new_id))
        return pairs

    def problem_counts(self, now: float, failed_job_window_s: float) -> dict[str, int]:
        """Dead letters, and failed jobs not retried that finished within the window."""
        with self.store.transaction() as db:
            dead = db.execute(
                "SELECT count(*) FROM outbox WHERE state = ?", (OutboxState.DEAD_LETTER.value,)
            ).fetchone()[0]
            failed = db.execute(
                "SELECT count(*) FROM jobs WHERE state = ? AND retried_by IS NULL "
                "AND coalesce(finished_at, created_at) >= ?",
                (JobState.FAILED.value, now - failed_job_window_s),
            ).fetchone()[0]
        return {"dead_letters": int(dead), "failed_jobs": int(failed)}
