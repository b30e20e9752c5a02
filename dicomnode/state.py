"""Durable node state in SQLite: instances, series, the job queue and the outbox.

One connection (WAL, ``synchronous=FULL``) shared by all threads behind one lock; every
public method is one transaction. Job and outbox operations live in :mod:`.jobs`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dicomnode.records import (
    InstanceRecord,
    RecordOutcome,
    SeriesInfo,
    SeriesState,
    StoredInstance,
)
from dicomnode.series_facts import FACTS_SCHEMA, write_instance_facts

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, path TEXT NOT NULL, sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL, received_at REAL NOT NULL,
    calling_aet TEXT NOT NULL, called_aet TEXT NOT NULL, is_localizer INTEGER NOT NULL,
    sha256 TEXT);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL, body_part_examined TEXT NOT NULL,
    series_description TEXT NOT NULL, protocol_name TEXT NOT NULL,
    image_type TEXT NOT NULL, all_localizer INTEGER NOT NULL, sop_class_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL, called_aet TEXT NOT NULL, first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL, state TEXT NOT NULL, reason TEXT,
    content_changes INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_arrival);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL, rule TEXT NOT NULL, pipeline TEXT NOT NULL,
    destinations TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS job_stages (
    job_id INTEGER NOT NULL REFERENCES jobs (id), stage TEXT NOT NULL,
    seconds REAL NOT NULL, PRIMARY KEY (job_id, stage));
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs (id),
    path TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS outbox_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, outbox_id INTEGER NOT NULL REFERENCES outbox (id),
    attempted_at REAL NOT NULL, status INTEGER, error TEXT);
"""

# Columns added after the first release: (table, column, declaration) for databases
# created before them.
MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("instances", "sha256", "TEXT"),
    ("series", "content_changes", "INTEGER NOT NULL DEFAULT 0"),
    ("outbox", "window_started_at", "REAL"),
    ("outbox", "delivered_at", "REAL"),
    ("jobs", "retried_by", "INTEGER"),
)

# Data rewritten for databases created before a state was renamed: outbox items given up
# as "failed" are dead letters, which `dicomnode deliveries retry` can send again.
DATA_MIGRATIONS: tuple[str, ...] = (
    "UPDATE outbox SET state = 'dead_letter' WHERE state = 'failed'",
)

_INSTANCE_COLUMNS = (
    "sop_instance_uid, series_instance_uid, study_instance_uid, path, sop_class_uid, "
    "transfer_syntax_uid, received_at, calling_aet, called_aet, is_localizer, sha256"
)

_SERIES_COLUMNS = (
    "series_instance_uid, study_instance_uid, modality, body_part_examined, "
    "series_description, protocol_name, image_type, all_localizer, sop_class_uid, "
    "calling_aet, called_aet, first_arrival, last_arrival, state, reason"
)


def _series(row: sqlite3.Row, count: int) -> SeriesInfo:
    """Build a :class:`SeriesInfo` from a ``series`` row."""
    return SeriesInfo(
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        modality=row["modality"],
        body_part_examined=row["body_part_examined"],
        series_description=row["series_description"],
        protocol_name=row["protocol_name"],
        image_type=tuple(filter(None, row["image_type"].split("\\"))),
        all_localizer=bool(row["all_localizer"]),
        sop_class_uid=row["sop_class_uid"],
        calling_aet=row["calling_aet"],
        called_aet=row["called_aet"],
        first_arrival=row["first_arrival"],
        last_arrival=row["last_arrival"],
        state=SeriesState(row["state"]),
        reason=row["reason"],
        instance_count=count,
        content_changes=row["content_changes"],
    )


class InstanceConflict(Exception):
    """A SOP Instance UID that is already stored in another series or study."""

    def __init__(self, existing: StoredInstance) -> None:
        """Keep where the UID already belongs."""
        super().__init__("SOP Instance UID already stored in another series or study")
        self.existing = existing


def _stored(row: sqlite3.Row | None) -> StoredInstance | None:
    """A :class:`StoredInstance` from an ``instances`` row, or ``None``."""
    if row is None:
        return None
    return StoredInstance(
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        path=Path(row["path"]),
        sha256=row["sha256"],
    )


class StateStore:
    """The node's SQLite database; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the database at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # Point reads of the ingest path: WAL lets them run while a commit flushes.
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        self._reader_lock = threading.Lock()
        self._conn.executescript(SCHEMA)
        self._conn.executescript(FACTS_SCHEMA)
        self._migrate()
        # Whether a series has acknowledged instances not recorded here yet (set by the
        # receiver to its journal's): such a series is not concluded.
        self.unrecorded: Callable[[str], bool] = lambda series_uid: False

    def _migrate(self) -> None:
        """Add the columns of :data:`MIGRATIONS` missing from an older database."""
        with self.transaction() as db:
            for table, column, declaration in MIGRATIONS:
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for statement in DATA_MIGRATIONS:
                db.execute(statement)

    def close(self) -> None:
        """Close the connections."""
        with self._lock, self._reader_lock:
            self._conn.close()
            self._reader.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block as one ``BEGIN IMMEDIATE`` transaction."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def stored_instance(self, sop_uid: str) -> StoredInstance | None:
        """Where a SOP Instance UID is stored and its content hash, or ``None`` (committed
        state: read on its own connection, not held up by a commit in flight)."""
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT series_instance_uid, study_instance_uid, path, sha256 FROM instances "
                "WHERE sop_instance_uid = ?",
                (sop_uid,),
            ).fetchone()
        return _stored(row)

    def record_instance(self, rec: InstanceRecord) -> RecordOutcome:
        """Record a spooled instance and its series' latest arrival.

        A SOP Instance UID already stored in another series or study raises
        :class:`InstanceConflict` and changes nothing. The same UID with the same
        ``sha256`` changes nothing (:attr:`RecordOutcome.UNCHANGED`). Otherwise the series
        goes (back) to ``receiving`` so it is assembled and processed again; its
        ``content_changes`` grows when an instance was replaced by different bytes or
        joined the series after it was routed or ignored.
        """
        (outcome,) = self.record_instances([rec])
        if isinstance(outcome, InstanceConflict):
            raise outcome
        return outcome

    def record_instances(
        self, recs: Sequence[InstanceRecord]
    ) -> list[RecordOutcome | InstanceConflict]:
        """Record several instances in one transaction (one commit: one WAL fsync), in
        order, each as :meth:`record_instance` does; a conflicting one changes nothing and
        its :class:`InstanceConflict` takes its place in the list returned."""
        outcomes: list[RecordOutcome | InstanceConflict] = []
        with self.transaction() as db:
            for rec in recs:
                db.execute("SAVEPOINT instance")
                try:
                    outcomes.append(_record(db, rec))
                except InstanceConflict as conflict:
                    outcomes.append(conflict)
                    db.execute("ROLLBACK TO instance")
                db.execute("RELEASE instance")
        return outcomes

    def _series_rows(self, where: str, args: tuple[object, ...]) -> list[SeriesInfo]:
        """Series matching a WHERE clause, with their instance counts."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_SERIES_COLUMNS}, content_changes, (SELECT count(*) FROM instances i "
                "WHERE i.series_instance_uid = s.series_instance_uid) AS n "
                f"FROM series s WHERE {where} ORDER BY first_arrival",
                args,
            ).fetchall()
        return [_series(row, row["n"]) for row in rows]

    def get_series(self, series_uid: str) -> SeriesInfo | None:
        """One series by UID, or ``None``."""
        found = self._series_rows("series_instance_uid = ?", (series_uid,))
        return found[0] if found else None

    def all_series(self) -> list[SeriesInfo]:
        """Every series known, oldest first."""
        return self._series_rows("1", ())

    def stable_series(self, received_before: float) -> list[SeriesInfo]:
        """Series still receiving whose last instance arrived before ``received_before``."""
        return self._series_rows(
            "state = ? AND last_arrival < ?", (SeriesState.RECEIVING.value, received_before)
        )

    def series_paths(self, series_uid: str) -> list[Path]:
        """Spool paths of a series' instances, in arrival order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT path FROM instances WHERE series_instance_uid = ? "
                "ORDER BY received_at, sop_instance_uid",
                (series_uid,),
            ).fetchall()
        return [Path(row["path"]) for row in rows]

    def instance_path(self, sop_uid: str) -> Path | None:
        """Spool path of one instance, or ``None`` when it was never recorded."""
        with self._lock:
            row = self._conn.execute(
                "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
            ).fetchone()
        return Path(row["path"]) if row else None

    def conclude_series(self, series: SeriesInfo, state: SeriesState, reason: str | None) -> bool:
        """Move a series out of ``receiving`` unless an instance arrived meanwhile (or is
        acknowledged and not recorded yet).

        Returns whether it moved. Call inside :meth:`transaction` to enqueue atomically.
        """
        with self.transaction() as db:
            return self.conclude_in(db, series, state, reason)

    def conclude_in(
        self, db: sqlite3.Connection, series: SeriesInfo, state: SeriesState, reason: str | None
    ) -> bool:
        """The conditional UPDATE behind :meth:`conclude_series`; no update while the
        series has instances acknowledged and not recorded yet (:attr:`unrecorded`)."""
        if self.unrecorded(series.series_instance_uid):
            return False
        cursor = db.execute(
            "UPDATE series SET state = ?, reason = ? WHERE series_instance_uid = ? "
            "AND state = ? AND last_arrival = ?",
            (
                state.value, reason, series.series_instance_uid,
                SeriesState.RECEIVING.value, series.last_arrival,
            ),
        )  # fmt: skip
        return cursor.rowcount == 1

    def counts_by_state(self) -> dict[str, dict[str, int]]:
        """Row counts per state of the series, jobs and outbox tables, and instances."""
        counts: dict[str, dict[str, int]] = {}
        with self._lock:
            for table in ("series", "jobs", "outbox"):
                rows = self._conn.execute(
                    f"SELECT state, count(*) FROM {table} GROUP BY state"
                ).fetchall()
                counts[table] = {str(state): int(n) for state, n in rows}
            row = self._conn.execute("SELECT count(*) FROM instances").fetchone()
            counts["instances"] = {"stored": int(row[0])}
            row = self._conn.execute("SELECT count(*) FROM outbox_attempts").fetchone()
            counts["outbox_attempts"] = {"all": int(row[0])}
        return counts

    def count_receiving(self) -> int:
        """How many series are still receiving."""
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM series WHERE state = ?", (SeriesState.RECEIVING.value,)
            ).fetchone()
        return int(row[0])


def _record(db: sqlite3.Connection, rec: InstanceRecord) -> RecordOutcome:
    """Record one instance inside the caller's transaction (see
    :meth:`StateStore.record_instance`)."""
    localizer = int("LOCALIZER" in (part.upper() for part in rec.image_type))
    assoc = rec.association
    existing = _stored(
        db.execute(
            "SELECT series_instance_uid, study_instance_uid, path, sha256 "
            "FROM instances WHERE sop_instance_uid = ?",
            (rec.sop_instance_uid,),
        ).fetchone()
    )
    if existing is not None:
        if (existing.series_instance_uid, existing.study_instance_uid) != (
            rec.series_instance_uid, rec.study_instance_uid,
        ):  # fmt: skip
            raise InstanceConflict(existing)
        if rec.sha256 is not None and existing.sha256 == rec.sha256:
            return RecordOutcome.UNCHANGED
    prior = db.execute(
        "SELECT state FROM series WHERE series_instance_uid = ?",
        (rec.series_instance_uid,),
    ).fetchone()
    concluded = prior is not None and prior["state"] != SeriesState.RECEIVING.value
    db.execute(
        f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            rec.sop_instance_uid, rec.series_instance_uid, rec.study_instance_uid,
            str(rec.path), rec.sop_class_uid, rec.transfer_syntax_uid,
            rec.received_at, assoc.calling_aet, assoc.called_aet, localizer,
            rec.sha256,
        ),
    )  # fmt: skip
    if rec.facts is not None:
        write_instance_facts(db, rec.series_instance_uid, rec.facts)
    db.execute(
        f"INSERT INTO series ({_SERIES_COLUMNS}) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL) "
        "ON CONFLICT (series_instance_uid) DO UPDATE SET "
        "last_arrival = max(last_arrival, excluded.last_arrival), "
        "calling_aet = excluded.calling_aet, called_aet = excluded.called_aet, "
        "state = excluded.state, reason = NULL",
        (
            rec.series_instance_uid, rec.study_instance_uid, rec.modality,
            rec.body_part_examined, rec.series_description, rec.protocol_name,
            "\\".join(rec.image_type), localizer, rec.sop_class_uid,
            assoc.calling_aet, assoc.called_aet, rec.received_at, rec.received_at,
            SeriesState.RECEIVING.value,
        ),
    )  # fmt: skip
    if existing is not None or concluded:
        db.execute(
            "UPDATE series SET content_changes = content_changes + 1 WHERE series_instance_uid = ?",
            (rec.series_instance_uid,),
        )
    db.execute(
        "UPDATE series SET all_localizer = (SELECT min(is_localizer) FROM instances "
        "WHERE series_instance_uid = ?) WHERE series_instance_uid = ?",
        (rec.series_instance_uid, rec.series_instance_uid),
    )
    return RecordOutcome.REPLACED if existing is not None else RecordOutcome.NEW
