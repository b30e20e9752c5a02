"""Where the facts behind completeness by content live in the node's SQLite state.

- ``instance_facts``: one row per instance with what its header says about its series
  (written by :meth:`StateStore.record_instance` in the instance's own transaction);
- ``series_releases``: when an association that sent instances of a series was released
  with no other open association holding the series;
- ``series_completions``: every completeness decision that started a series, with the
  evidence that completed it (one row per decision, so each revision keeps its own).

:class:`ReleaseTracker` is the receiver's in-memory view of which open association sent
which series.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicomnode.completeness import Evidence, InstanceFacts, SeriesFacts, Verdict

if TYPE_CHECKING:
    from dicomnode.state import StateStore

FACTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS instance_facts (
    sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, acquisition_number TEXT, images_in_acquisition INTEGER,
    number_of_slices INTEGER, number_of_frames INTEGER, concatenation_uid TEXT,
    in_concatenation_total INTEGER, orientation TEXT, position_mm REAL);
CREATE INDEX IF NOT EXISTS instance_facts_series ON instance_facts (series_instance_uid);
CREATE TABLE IF NOT EXISTS series_releases (
    series_instance_uid TEXT PRIMARY KEY, released_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS series_completions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series_instance_uid TEXT NOT NULL,
    decided_at REAL NOT NULL, last_arrival REAL NOT NULL, instance_count INTEGER NOT NULL,
    evidence TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS series_completions_series
    ON series_completions (series_instance_uid, id);
"""

_FACT_COLUMNS = (
    "sop_instance_uid, series_instance_uid, sop_class_uid, acquisition_number, "
    "images_in_acquisition, number_of_slices, number_of_frames, concatenation_uid, "
    "in_concatenation_total, orientation, position_mm"
)


def write_instance_facts(db: sqlite3.Connection, series_uid: str, facts: InstanceFacts) -> None:
    """Insert (or replace, for a re-sent instance) one instance's facts; call inside the
    transaction that records the instance."""
    orientation = None if facts.orientation is None else "\\".join(map(repr, facts.orientation))
    db.execute(
        f"INSERT OR REPLACE INTO instance_facts ({_FACT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            facts.sop_instance_uid, series_uid, facts.sop_class_uid, facts.acquisition_number,
            facts.images_in_acquisition, facts.number_of_slices, facts.number_of_frames,
            facts.concatenation_uid, facts.in_concatenation_total, orientation,
            facts.position_mm,
        ),
    )  # fmt: skip


def _facts(row: sqlite3.Row) -> InstanceFacts:
    """Build :class:`InstanceFacts` from an ``instance_facts`` row."""
    orientation = row["orientation"]
    return InstanceFacts(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        acquisition_number=row["acquisition_number"],
        images_in_acquisition=row["images_in_acquisition"],
        number_of_slices=row["number_of_slices"],
        number_of_frames=row["number_of_frames"],
        concatenation_uid=row["concatenation_uid"],
        in_concatenation_total=row["in_concatenation_total"],
        orientation=None if orientation is None else tuple(map(float, orientation.split("\\"))),
        position_mm=row["position_mm"],
    )


@dataclass(frozen=True)
class Completion:
    """One recorded completeness decision of a series."""

    series_instance_uid: str
    decided_at: float
    last_arrival: float
    instance_count: int
    evidence: Evidence
    detail: str


class SeriesFactsStore:
    """The completeness tables of a :class:`StateStore`."""

    def __init__(self, store: StateStore) -> None:
        """Use ``store`` (which creates the tables when it opens)."""
        self.store = store

    def series_facts(
        self, series_uid: str, instance_count: int, last_arrival: float
    ) -> SeriesFacts:
        """The facts of one series for :func:`dicomnode.completeness.is_complete`."""
        with self.store.transaction() as db:
            rows = db.execute(
                f"SELECT {_FACT_COLUMNS} FROM instance_facts f WHERE series_instance_uid = ? "
                "AND EXISTS (SELECT 1 FROM instances i WHERE i.sop_instance_uid = "
                "f.sop_instance_uid AND i.series_instance_uid = f.series_instance_uid)",
                (series_uid,),
            ).fetchall()
            released = db.execute(
                "SELECT released_at FROM series_releases WHERE series_instance_uid = ?",
                (series_uid,),
            ).fetchone()
        return SeriesFacts(
            instance_count=instance_count,
            last_arrival=last_arrival,
            released_at=None if released is None else float(released["released_at"]),
            instances=tuple(_facts(row) for row in rows),
        )

    def release_times(self, series_uids: list[str]) -> dict[str, float]:
        """When an association that sent each of these series was last released (series
        never released are absent)."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT series_instance_uid, released_at FROM series_releases "
                f"WHERE series_instance_uid IN ({','.join('?' * len(series_uids))})",
                series_uids,
            ).fetchall()
        return {str(row[0]): float(row[1]) for row in rows}

    def mark_released(self, series_uids: list[str], at: float) -> None:
        """Record that the associations sending these series were released at ``at``."""
        if not series_uids:
            return
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO series_releases VALUES (?, ?) ON CONFLICT (series_instance_uid) "
                "DO UPDATE SET released_at = max(released_at, excluded.released_at)",
                [(series_uid, at) for series_uid in series_uids],
            )

    def record_completion(
        self, series_uid: str, verdict: Verdict, last_arrival: float, count: int, at: float
    ) -> None:
        """Keep the evidence that completed a series (one row per decision)."""
        evidence = verdict.evidence or Evidence.STABLE_AGE
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO series_completions (series_instance_uid, decided_at, "
                "last_arrival, instance_count, evidence, detail) VALUES (?,?,?,?,?,?)",
                (series_uid, at, last_arrival, count, evidence.value, verdict.detail),
            )

    def completions(self, series_uid: str) -> list[Completion]:
        """Every recorded decision of a series, oldest first."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT * FROM series_completions WHERE series_instance_uid = ? ORDER BY id",
                (series_uid,),
            ).fetchall()
        return [
            Completion(
                series_instance_uid=row["series_instance_uid"],
                decided_at=row["decided_at"],
                last_arrival=row["last_arrival"],
                instance_count=row["instance_count"],
                evidence=Evidence(row["evidence"]),
                detail=row["detail"],
            )
            for row in rows
        ]


class ReleaseTracker:
    """Which open association sent which series; thread-safe.

    A series counts as released when an association that sent it is released and no
    other open association has sent it; an aborted association releases nothing.
    """

    def __init__(self) -> None:
        """Start with no open association."""
        self._lock = threading.Lock()
        self._sent: dict[Hashable, set[str]] = {}

    def stored(self, association: Hashable, series_uid: str) -> None:
        """``association`` sent (and the node recorded) an instance of ``series_uid``."""
        with self._lock:
            self._sent.setdefault(association, set()).add(series_uid)

    def released(self, association: Hashable) -> list[str]:
        """Forget ``association``; the series it sent that no other open one holds."""
        with self._lock:
            sent = self._sent.pop(association, set())
            held = set().union(*self._sent.values()) if self._sent else set()
        return sorted(sent - held)

    def aborted(self, association: Hashable) -> None:
        """Forget ``association`` without releasing its series."""
        with self._lock:
            self._sent.pop(association, None)
