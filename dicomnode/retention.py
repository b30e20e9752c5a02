"""Retention: remove delivered data older than its configured age, in the serving process.

Every ``retention.interval_s`` (an apscheduler job in the ``serve`` process):

- **spool**: the spooled instances (files and rows) of a series that is no longer
  receiving, whose last instance arrived more than ``spool_age_h`` ago, and whose jobs are
  all finished and *settled*;
- **results**: the results folder ``<state_dir>/results/<job id>`` of a settled job that
  finished more than ``results_age_h`` ago;
- **state rows**: a settled job finished more than ``state_age_h`` ago with its outbox
  rows, attempts and output records; then series rows older than that with no instance
  and no job left;
- **cases**: the retraining case store's own limits (``[case_store]`` retention_days,
  max_cases; ``dicomnode.case_store.prune``), when one is configured.

A job is *settled* when it finished (done or failed) and none of its outbox items is
pending or a dead letter: data is removed only once delivered (or discarded by an
administrator), never before. Every deletion is counted durably (table
``retention_deleted``) and exported as ``dicomnode_retention_deleted_total{kind}``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomnode.case_store import CaseStoreError
from dicomnode.case_store import prune as prune_cases
from dicomnode.config import HOUR_S, NodeConfig
from dicomnode.records import JobState, OutboxState, SeriesState
from dicomnode.revisions import RevisionStore
from dicomnode.state import StateStore

log = structlog.get_logger(__name__)

COUNTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS retention_deleted (kind TEXT PRIMARY KEY, count INTEGER NOT NULL)"
)
KINDS = ("spool_files", "spool_bytes", "instances", "results_folders", "results_bytes",
         "jobs", "outbox_items", "series", "cases")  # fmt: skip
FIRST_RUN_DELAY_S = 60.0  # after start, unless the interval is shorter
FRESH_WRITE_MARGIN_S = 5.0  # a spool file written this long after its series' last
# arrival was re-sent meanwhile: it is left alone

_DONE, _FAILED = JobState.DONE.value, JobState.FAILED.value
_PENDING, _DEAD = OutboxState.PENDING.value, OutboxState.DEAD_LETTER.value
_SETTLED_JOB = (
    f"j.state IN ('{_DONE}', '{_FAILED}') AND NOT EXISTS (SELECT 1 FROM outbox o "
    f"WHERE o.job_id = j.id AND o.state IN ('{_PENDING}', '{_DEAD}'))"
)


def _tree_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Retention:
    """One retention pass over a node's state, spool and results."""

    def __init__(self, config: NodeConfig, store: StateStore) -> None:
        """Act on ``store`` and the folders of ``config`` per ``config.retention``."""
        self.config = config
        self.store = store
        RevisionStore(store)  # its tables must exist for the joins below
        with store.transaction() as db:
            db.execute(COUNTS_SCHEMA)

    @property
    def results_root(self) -> Path:
        """Where jobs write their results, one folder per job id."""
        return self.config.state_dir / "results"

    def run_once(self, now: float | None = None) -> dict[str, int]:
        """Remove what is old enough and settled; return the counts deleted by kind."""
        moment = time.time() if now is None else now
        settings = self.config.retention
        deleted: Counter[str] = Counter()
        if settings.spool_age_h is not None:
            deleted += self._spool(moment - settings.spool_age_h * HOUR_S)
        if settings.results_age_h is not None:
            deleted += self._results(moment - settings.results_age_h * HOUR_S)
        if settings.state_age_h is not None:
            deleted += self._state_rows(moment - settings.state_age_h * HOUR_S)
        if self.config.case_store is not None:  # retraining's cases: their own limits
            deleted["cases"] += prune_cases(self.config.case_store, moment)
        self._count(deleted)
        if deleted:
            log.info("retention removed delivered data", **dict(sorted(deleted.items())))
        return {kind: deleted.get(kind, 0) for kind in KINDS}

    def _count(self, deleted: Counter[str]) -> None:
        """Add this pass's deletions to the durable counters."""
        with self.store.transaction() as db:
            for kind, n in deleted.items():
                db.execute(
                    "INSERT INTO retention_deleted (kind, count) VALUES (?, ?) "
                    "ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
                    (kind, n),
                )

    def totals(self) -> dict[str, int]:
        """Everything deleted so far, by kind (all kinds present)."""
        with self.store.transaction() as db:
            rows = db.execute("SELECT kind, count FROM retention_deleted").fetchall()
        found = {str(kind): int(n) for kind, n in rows}
        return {kind: found.get(kind, 0) for kind in KINDS}

    def _spool(self, cutoff: float) -> Counter[str]:
        """Spooled instances of concluded, settled series whose last arrival is old."""
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT s.series_instance_uid, s.last_arrival FROM series s "
                "WHERE s.state != ? AND s.last_arrival <= ? AND EXISTS (SELECT 1 FROM "
                "instances i WHERE i.series_instance_uid = s.series_instance_uid) "
                "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = "
                f"s.series_instance_uid AND NOT ({_SETTLED_JOB}))",
                (SeriesState.RECEIVING.value, cutoff),
            ).fetchall()
        deleted: Counter[str] = Counter()
        for series_uid, last_arrival in rows:
            deleted += self._remove_series_instances(series_uid, last_arrival)
        return deleted

    def _remove_series_instances(self, series_uid: str, last_arrival: float) -> Counter[str]:
        """Delete one series' instance rows and files, if it did not change meanwhile.

        Runs under the store's lock: the receiver records a new instance (turning the
        series back to receiving) only after this is done.
        """
        deleted: Counter[str] = Counter()
        with self.store.transaction() as db:
            current = db.execute(
                "SELECT state, last_arrival FROM series WHERE series_instance_uid = ?",
                (series_uid,),
            ).fetchone()
            if current is None or current["state"] == SeriesState.RECEIVING.value:
                return deleted
            if current["last_arrival"] != last_arrival:
                return deleted
            paths = [
                Path(row[0])
                for row in db.execute(
                    "SELECT path FROM instances WHERE series_instance_uid = ?", (series_uid,)
                )
            ]
            for path in paths:
                deleted += self._unlink_spooled(path, last_arrival)
            cursor = db.execute(
                "DELETE FROM instances WHERE series_instance_uid = ?", (series_uid,)
            )
            deleted["instances"] += cursor.rowcount
        for folder in {path.parent for path in paths}:
            for empty in (folder, folder.parent):
                try:
                    empty.rmdir()
                except OSError:  # not empty (another series of the study) or gone
                    break
        return deleted

    @staticmethod
    def _unlink_spooled(path: Path, last_arrival: float) -> Counter[str]:
        """Remove one spooled file unless it was written after its series' last arrival."""
        deleted: Counter[str] = Counter()
        try:
            stats = path.stat()
        except FileNotFoundError:
            return deleted
        if stats.st_mtime > last_arrival + FRESH_WRITE_MARGIN_S:
            return deleted
        path.unlink(missing_ok=True)
        deleted["spool_files"] += 1
        deleted["spool_bytes"] += stats.st_size
        return deleted

    def _settled_jobs(self, cutoff: float) -> list[int]:
        """Ids of settled jobs that finished at or before ``cutoff``."""
        with self.store.transaction() as db:
            rows = db.execute(
                f"SELECT j.id FROM jobs j WHERE {_SETTLED_JOB} AND j.finished_at IS NOT NULL "
                "AND j.finished_at <= ? ORDER BY j.id",
                (cutoff,),
            ).fetchall()
        return [int(row[0]) for row in rows]

    def _results(self, cutoff: float) -> Counter[str]:
        """Results folders of settled jobs finished at or before ``cutoff``."""
        deleted: Counter[str] = Counter()
        for job_id in self._settled_jobs(cutoff):
            folder = self.results_root / str(job_id)
            if not folder.is_dir():
                continue
            size = _tree_bytes(folder)
            shutil.rmtree(folder)
            deleted["results_folders"] += 1
            deleted["results_bytes"] += size
        return deleted

    def _state_rows(self, cutoff: float) -> Counter[str]:
        """Rows of settled jobs finished before ``cutoff``, then empty old series."""
        deleted: Counter[str] = Counter()
        for job_id in self._settled_jobs(cutoff):
            if (self.results_root / str(job_id)).is_dir():
                continue  # its results are kept longer than its rows: keep both
            try:
                deleted += self._delete_job(job_id)
            except sqlite3.IntegrityError as exc:  # a table this module does not know
                log.error("job rows kept: still referenced", job_id=job_id, error=str(exc))
        with self.store.transaction() as db:
            cursor = db.execute(
                "DELETE FROM series WHERE state != ? AND last_arrival <= ? AND NOT EXISTS "
                "(SELECT 1 FROM instances i WHERE i.series_instance_uid = "
                "series.series_instance_uid) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
                "j.series_instance_uid = series.series_instance_uid)",
                (SeriesState.RECEIVING.value, cutoff),
            )
            deleted["series"] += cursor.rowcount
        return deleted

    def _delete_job(self, job_id: int) -> Counter[str]:
        """Delete one job with its outbox rows, attempts, outputs and revision."""
        deleted: Counter[str] = Counter()
        with self.store.transaction() as db:
            db.execute(
                "DELETE FROM outbox_attempts WHERE outbox_id IN "
                "(SELECT id FROM outbox WHERE job_id = ?)",
                (job_id,),
            )
            deleted["outbox_items"] += db.execute(
                "DELETE FROM outbox WHERE job_id = ?", (job_id,)
            ).rowcount
            db.execute("UPDATE job_outputs SET retracted_by = NULL WHERE retracted_by = ?",
                       (job_id,))  # fmt: skip
            db.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM job_revisions WHERE job_id = ?", (job_id,))
            deleted["jobs"] += db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
        return deleted


class RetentionCollector(Collector):
    """Prometheus counters of everything retention deleted, by kind."""

    def __init__(self, retention: Retention) -> None:
        """Read the durable counters of ``retention``."""
        self.retention = retention

    def collect(self) -> Iterator[Metric]:
        """``dicomnode_retention_deleted_total{kind}``."""
        family = CounterMetricFamily(
            "dicomnode_retention_deleted",
            "Items removed by retention (files, bytes, rows), by kind",
            labels=["kind"],
        )
        for kind, count in self.retention.totals().items():
            family.add_metric([kind], count)
        yield family


class RetentionScheduler:
    """Runs :meth:`Retention.run_once` every ``retention.interval_s`` with apscheduler."""

    def __init__(self, retention: Retention) -> None:
        """Schedule ``retention``; call :meth:`start` to begin."""
        self.retention = retention
        self.scheduler = BackgroundScheduler(daemon=True)
        interval = retention.config.retention.interval_s
        first = datetime.now() + timedelta(seconds=min(FIRST_RUN_DELAY_S, interval))
        self.scheduler.add_job(
            self._run, "interval", seconds=interval, next_run_time=first,
            max_instances=1, coalesce=True, id="retention",
        )  # fmt: skip

    def _run(self) -> None:
        """One pass; an error is logged and the next pass runs as scheduled."""
        try:
            self.retention.run_once()
        except (OSError, sqlite3.Error, CaseStoreError) as exc:
            log.error("retention pass failed", error=f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        """Start the scheduler thread."""
        self.scheduler.start()

    def stop(self) -> None:
        """Stop it, waiting for a running pass to end."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)


def spool_is_empty(spool_dir: Path) -> bool:
    """Whether no spooled file is left under ``spool_dir`` (for checks and tests)."""
    return not any(name.endswith(".dcm") for _, _, names in os.walk(spool_dir) for name in names)
