"""The node: receiver plus background loops for assembly, pipeline workers and the outbox.

The pipeline is not imported here: it comes in as ``process``, a callable taking a
:class:`JobSpec` and returning the result files to send, and (optionally) as
:class:`Reporting`: the callables that write a failed job's "analysis not performed"
objects and the rejection notes that retract a series' superseded results.

A ``process`` that is a :class:`JobRunner` also has work to do after a job whose results
need not wait for it (the case store write, a shadow model's run): its ``follow_up`` runs
in the same worker thread once the job is done, its results are queued for sending and
each had its first delivery attempt (so that it does not compete with sending). A marker
file in the job's results folder, written before the job is recorded done and
removed after the follow-up, makes this durable: a node stopped in between runs the
follow-up of every done job that still has its marker at its next start.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

import structlog

from dicomnode.assembler import Assembler
from dicomnode.config import HttpSettings, NodeConfig
from dicomnode.degraded import HealthProblems
from dicomnode.deliveries import DeliveryAdmin, Selection
from dicomnode.disk import caused_by_full_disk
from dicomnode.health import HealthServer, PipelineStatuses, StageCollector, StatusPage
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.outbox import OutboxProcessor
from dicomnode.overview import read_overview
from dicomnode.receiver import Receiver
from dicomnode.records import Job, JobState
from dicomnode.retention import Retention, RetentionCollector, RetentionScheduler
from dicomnode.revisions import (
    Delivery,
    OutputRecord,
    Retraction,
    RevisionStore,
    describe_output,
    group_retractions,
    series_fingerprint,
)
from dicomnode.startup import StartupError, check_writable_dir
from dicomnode.state import StateStore
from dicomnode.studies import study_paths
from pipelines.stages import StageTimer, recording

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What a pipeline run gets: its series' spooled files and where to write results."""

    job_id: int
    series_uid: str
    study_uid: str
    pipeline: str
    rule: str
    instance_paths: tuple[Path, ...]
    destinations: tuple[str, ...]
    output_dir: Path
    revision: int = 1  # 1 + the number of earlier jobs of the series
    # Where the job's time goes; the node records it (``pipelines.stages``).
    stages: StageTimer = field(default_factory=StageTimer, compare=False)


Process = Callable[[JobSpec], list[Path]]
FOLLOW_UP_MARKER = "follow-up.json"
FOLLOW_UP_RESTARTS = 1  # a follow-up that a restarted node could not end either is dropped


class JobRunner(ABC):
    """A :data:`Process` with a follow-up: work after the job that its results do not wait
    for. ``follow_up`` must log its own failures; one that raises is logged by the node
    and never fails the job nor sends anything again."""

    @abstractmethod
    def __call__(self, job: JobSpec) -> list[Path]:
        """Run ``job``; return the result files to send."""

    @abstractmethod
    def follow_up(self, job: JobSpec) -> None:
        """The work after ``job``, done and its results queued; after a restart it runs
        in a new process, with nothing kept in memory from the job."""

    def close(self) -> None:  # noqa: B027 (most runners hold nothing to release)
        """Release what the jobs left running (worker processes); the node calls it once
        its workers have stopped."""


def write_follow_up_marker(spec: JobSpec, restarts: int = 0) -> Path:
    """Record, durably, that ``spec``'s follow-up is still to run: the spec as JSON in
    its results folder (written whole: temporary file, fsync, rename), with how many
    starts of the node have taken it up again (``restarts``)."""
    path = spec.output_dir / FOLLOW_UP_MARKER
    text = json.dumps(
        {
            "job_id": spec.job_id, "series_uid": spec.series_uid, "study_uid": spec.study_uid,
            "pipeline": spec.pipeline, "rule": spec.rule,
            "instance_paths": [str(p) for p in spec.instance_paths],
            "destinations": list(spec.destinations), "revision": spec.revision,
            "restarts": restarts,
        }
    )  # fmt: skip
    staging = path.with_suffix(".tmp")
    with staging.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    staging.replace(path)
    directory = os.open(spec.output_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def read_follow_up_marker(path: Path) -> tuple[JobSpec, int]:
    """The :class:`JobSpec` and restarts a marker of :func:`write_follow_up_marker`
    recorded."""
    data = json.loads(path.read_text(encoding="utf-8"))
    spec = JobSpec(
        job_id=int(data["job_id"]),
        series_uid=str(data["series_uid"]),
        study_uid=str(data["study_uid"]),
        pipeline=str(data["pipeline"]),
        rule=str(data["rule"]),
        instance_paths=tuple(Path(p) for p in data["instance_paths"]),
        destinations=tuple(str(d) for d in data["destinations"]),
        output_dir=path.parent,
        revision=int(data["revision"]),
    )
    return spec, int(data.get("restarts", 0))


FailureReport = Callable[[JobSpec, BaseException], list[Path]]
RetractionNote = Callable[[JobSpec, Retraction], Path]


@dataclass(frozen=True)
class Reporting:
    """What a node sends besides results: ``failure`` writes the objects that tell the
    destinations a job failed (none when nothing can be attributed), ``retraction``
    writes one rejection note retracting a group of superseded objects."""

    failure: FailureReport
    retraction: RetractionNote


DISK_FULL_BACKOFF_S = (5.0, 60.0)  # first retry after 5 s, doubling up to a minute


@dataclass
class _HeldJob:
    """A claimed job a worker keeps back because the disk was full."""

    job: Job
    since: float
    retry_at: float
    tries: int


@dataclass
class _WorkerSlot:
    """One worker thread's own state: the job it holds back, if any."""

    held: _HeldJob | None = None

    def hold(self, job: Job, now: float, exc: BaseException) -> None:
        """Keep ``job`` for a later try; log the first time only."""
        first, maximum = DISK_FULL_BACKOFF_S
        if self.held is None or self.held.job.id != job.id:
            self.held = _HeldJob(job, since=now, retry_at=now + first, tries=1)
            log.warning(
                "job postponed: disk full; it will be retried", job_id=job.id,
                error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            return
        tries = self.held.tries + 1
        self.held = replace(
            self.held, retry_at=now + min(first * 2 ** (tries - 1), maximum), tries=tries
        )


class Node:
    """Composes receiver, state, assembler, workers and outbox; start, stop, wait."""

    def __init__(
        self,
        config: NodeConfig,
        process: Process,
        reporting: Reporting | None = None,
        pipelines: PipelineStatuses | None = None,
    ) -> None:
        """Prepare (not start) a node for ``config`` running jobs with ``process``;
        with ``reporting``, failed jobs and superseded results are reported to PACS;
        ``pipelines`` (the start-up check's statuses) is shown by ``/health``."""
        self.config = config
        self.process = process
        self.reporting = reporting
        self.pipelines = pipelines
        self.store: StateStore | None = None
        self._stop = threading.Event()
        self._wake_outbox = threading.Event()
        self._threads: list[threading.Thread] = []
        self._receiver: Receiver | None = None
        self.health: HealthServer | None = None
        self.retention: RetentionScheduler | None = None
        self.runner = process if isinstance(process, JobRunner) else None
        # Follow-ups a previous run of the node left undone; the workers take them first.
        self._follow_ups: deque[JobSpec] = deque()
        self._following = 0  # follow-ups running now
        self._follow_lock = threading.Lock()

    @property
    def database_path(self) -> Path:
        """Where the SQLite state lives."""
        return self.config.state_dir / "dicomnode.sqlite3"

    def start(self) -> None:
        """Check folders, open state, requeue interrupted jobs, listen, start the loops.

        Raises :class:`StartupError` (one line: an unwritable folder, a port in use, an
        unreadable database) with nothing left running.
        """
        check_writable_dir(self.config.spool_dir, "spool_dir")
        check_writable_dir(self.config.state_dir, "state_dir")
        try:
            self.store = StateStore(self.database_path)
        except sqlite3.Error as exc:
            raise StartupError(
                f"cannot open the state database {self.database_path}: {exc}"
            ) from None
        self.jobs, self.outbox = JobQueue(self.store), OutboxStore(self.store)
        self.revisions = RevisionStore(self.store)
        try:
            self._start_services()
        except BaseException:
            self.stop()
            raise

    def _start_services(self) -> None:
        """Listen, start the background loops and the HTTP endpoint."""
        assert self.store is not None
        self._receiver = Receiver(self.config, self.store)
        self._receiver.start()
        requeued = self.jobs.requeue_running()
        if requeued:
            log.warning("requeued jobs interrupted by a previous stop", count=requeued)
        self._recover_follow_ups()
        self._stop.clear()
        assembler = Assembler(self.config, self.store, self.jobs)
        sender = OutboxProcessor(self.config, self.outbox)
        loops: list[tuple[str, Callable[[], object]]] = [
            ("assembler", lambda: assembler.assemble(time.time())),
            ("outbox", sender.process_due),
        ]
        loops += [
            (f"worker-{i}", functools.partial(self._work_once, _WorkerSlot()))
            for i in range(self.config.worker.threads)
        ]
        for name, step in loops:
            thread = threading.Thread(
                target=self._loop, args=(name, step), name=f"dicomnode-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        retention = Retention(self.config, self.store)
        if self.config.retention.enabled:
            self.retention = RetentionScheduler(retention)
            self.retention.start()
        if self.config.http is not None:
            self.health = HealthServer(
                self.config.http.host,
                self.config.http.port,
                self.store.counts_by_state,
                lambda: self._receiver is not None,
                self.pipelines,
                problems=HealthProblems(
                    self.config,
                    self.store,
                    self.pipelines,
                    ingest=self._receiver.journal.broken_reason,
                ),
                collectors=[RetentionCollector(retention), StageCollector(self.jobs.stage_totals)],
                status_page=self._status_page(self.config.http, self.store),
            )
            self.health.start()

    def _recover_follow_ups(self) -> None:
        """Queue the follow-up of each done job whose marker a previous run left (it
        stopped after the job, before its follow-up ended); remove the markers of jobs
        that are not done (they run again, and their follow-up with them). A follow-up
        taken up ``FOLLOW_UP_RESTARTS`` times already is dropped (logged): one that kills
        the node (out of memory) must not keep it from its jobs."""
        for marker in sorted((self.config.state_dir / "results").glob(f"*/{FOLLOW_UP_MARKER}")):
            job = self.jobs.get(int(marker.parent.name)) if marker.parent.name.isdigit() else None
            if self.runner is None or job is None or job.state is not JobState.DONE:
                marker.unlink()
                continue
            try:
                spec, restarts = read_follow_up_marker(marker)
                if restarts >= FOLLOW_UP_RESTARTS:
                    raise ValueError(f"the node stopped during it {restarts + 1} times")
                write_follow_up_marker(spec, restarts + 1)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("follow-up dropped: case record and shadow run lost", job_id=job.id,
                          reason=f"{type(exc).__name__}: {exc}")  # fmt: skip
                marker.unlink()
                continue
            self._follow_ups.append(spec)
        if self._follow_ups:
            log.warning(
                "follow-ups interrupted by a previous stop will run",
                jobs=[spec.job_id for spec in self._follow_ups],
            )

    def _status_page(self, http: HttpSettings, store: StateStore) -> StatusPage:
        """The status page over ``store``; its re-send button wakes the outbox."""

        def retry(outbox_id: int) -> bool:
            queued = bool(
                DeliveryAdmin(store).retry_deliveries(Selection(ids=(outbox_id,)), time.time())
            )
            if queued:
                log.info("dead letter queued for re-sending", outbox_id=outbox_id, by="status page")
                self._wake_outbox.set()
            return queued

        token = http.token.get_secret_value() if http.token is not None else None
        return StatusPage(lambda: read_overview(store), retry, http.turnaround_alarm_s, token)

    def stop(self) -> None:
        """Stop listening, let the loops finish their current step, close state."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        if self.retention is not None:
            self.retention.stop()
            self.retention = None
        self._stop.set()
        self._wake_outbox.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self.runner is not None:
            try:
                self.runner.close()
            except Exception:  # stopping goes on; what was not released is logged
                log.exception("job runner not closed")
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Node:
        """Start the node."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the node."""
        self.stop()

    def _loop(self, name: str, step: Callable[[], object]) -> None:
        """Run ``step`` until stopped, pausing ``poll_interval_s`` when it did nothing.

        A step that keeps failing the same way (a full disk, a locked database) is logged
        once with its traceback, then once more when it works again: never in a loop.
        """
        failing: str | None = None
        while not self._stop.is_set():
            try:
                did_work = step()
            except Exception as exc:  # a loop must outlive one bad step; the error is logged
                signature = f"{type(exc).__name__}: {exc}"
                if signature != failing:
                    log.exception("background step failed", loop=name)
                failing, did_work = signature, False
            else:
                if failing is not None:
                    log.info("background step works again", loop=name, after=failing)
                failing = None
            if not did_work:
                waiter = self._wake_outbox if name == "outbox" else self._stop
                waiter.wait(self.config.poll_interval_s)
                if name == "outbox":
                    self._wake_outbox.clear()

    def _work_once(self, slot: _WorkerSlot) -> bool:
        """Take one job (or the one this worker holds back), run it; False when idle.

        A job that meets a full disk stays with this worker and is retried with back-off
        (logged once, and once more when it runs again), for ``worker.disk_full_retry_s``;
        after that it fails as a full disk and PACS is told so.
        """
        if self._follow_up_recovered():
            return True
        now = time.time()
        held = slot.held
        if held is not None and now < held.retry_at:
            return False
        job = held.job if held is not None else self.jobs.claim(now)
        if job is None:
            return False
        give_up = held is not None and now - held.since >= self.config.worker.disk_full_retry_s
        try:
            self._run_job(job, retry_disk_full=not give_up)
        except Exception as exc:
            if not caused_by_full_disk(exc):
                raise
            slot.hold(job, now, exc)
            return False
        if held is not None:
            log.info("job resumed after a full disk", job_id=job.id, waited_s=now - held.since)
        slot.held = None
        return True

    def _run_job(self, job: Job, *, retry_disk_full: bool) -> None:
        """Run one job's pipeline and record its results, or its failure and notices.

        A full disk is raised to the caller (to hold the job) while ``retry_disk_full``.
        """
        spec = self._spec(job)
        bound = log.bind(job_id=job.id, study_uid=spec.study_uid, series_uid=spec.series_uid)
        bound.info("job started", pipeline=job.pipeline, instances=len(spec.instance_paths))
        try:
            with recording(spec.stages):
                results = self.process(spec)
        except Exception as exc:  # the single edge where a pipeline's failure is caught
            if retry_disk_full and caused_by_full_disk(exc):
                raise
            self.jobs.record_stages(job.id, spec.stages.seconds())
            reason = str(exc) or type(exc).__name__
            bound.exception("job failed", reason=reason)
            notices = self._failure_notices(spec, exc)
            self._finish(job, spec, JobState.FAILED, reason, notices)
            bound.info("failure reported", objects=len(notices))
            return
        self.jobs.record_stages(job.id, spec.stages.seconds())
        if self.runner is None:
            self._finish(job, spec, JobState.DONE, None, results)
            bound.info("job done", results=len(results), revision=spec.revision)
            return
        try:
            marker: Path | None = write_follow_up_marker(spec)
        except OSError as exc:  # the follow-up still runs, unless the node stops first
            bound.error("follow-up marker not written", error=f"{type(exc).__name__}: {exc}")
            marker = None
        with self._follow_lock:
            self._following += 1
        try:
            self._finish(job, spec, JobState.DONE, None, results)
            bound.info("job done", results=len(results), revision=spec.revision)
            if self._results_attempted(job.id):
                self._follow_up(self.runner, spec, marker)
            else:  # stopping: the marker keeps it for the next start
                bound.info("follow-up left for the next start: the node is stopping")
        finally:
            with self._follow_lock:
                self._following -= 1

    def _results_attempted(self, job_id: int) -> bool:
        """Wait until each result of job ``job_id`` had its first delivery attempt (at
        most ``outbox.timeout_s``), so that the follow-up's work does not compete with
        sending them; False when the node stops meanwhile."""
        deadline = time.monotonic() + self.config.outbox.timeout_s
        while not self._stop.is_set():
            if self.outbox.count_unattempted(job_id) == 0 or time.monotonic() > deadline:
                return True
            self._stop.wait(0.01)
        return False

    def _follow_up_recovered(self) -> bool:
        """Run one follow-up a previous run of the node left undone; False when none."""
        with self._follow_lock:
            if not self._follow_ups or self.runner is None:
                return False
            spec = self._follow_ups.popleft()
            self._following += 1
        try:
            log.info("interrupted follow-up started", job_id=spec.job_id)
            self._follow_up(self.runner, spec, spec.output_dir / FOLLOW_UP_MARKER)
        finally:
            with self._follow_lock:
                self._following -= 1
        return True

    @staticmethod
    def _follow_up(runner: JobRunner, spec: JobSpec, marker: Path | None) -> None:
        """Run ``spec``'s follow-up, then remove its marker; a failure is logged (the
        results are sent already, the job stays done)."""
        started = time.perf_counter()
        try:
            runner.follow_up(spec)
        except Exception as exc:  # the job is done and its results queued: log only
            log.exception(
                "follow-up failed", job_id=spec.job_id, error=f"{type(exc).__name__}: {exc}"
            )
        else:
            log.info("follow-up done", job_id=spec.job_id,
                     seconds=round(time.perf_counter() - started, 3))  # fmt: skip
        if marker is not None:
            marker.unlink(missing_ok=True)

    def _failure_notices(self, spec: JobSpec, exc: BaseException) -> list[Path]:
        """The "analysis not performed" files of a failed job; none without reporting
        or when they cannot be written (the job's reason still says why it failed)."""
        if self.reporting is None:
            return []
        try:
            return self.reporting.failure(spec, exc)
        except Exception as error:  # a notice that cannot be built must not stop the worker
            log.error(
                "failure notice not written", job_id=spec.job_id, series_uid=spec.series_uid,
                error=f"{type(error).__name__}: {error}",
            )  # fmt: skip
            return []

    def _finish(
        self, job: Job, spec: JobSpec, state: JobState, reason: str | None, files: list[Path]
    ) -> None:
        """Record the job's outcome; queue its files and rejection notes that retract
        what it supersedes, all in one transaction."""
        outputs = [describe_output(job.id, path) for path in files]
        written = {record.sop_instance_uid for record in outputs}
        stale_by = self.revisions.newer_finished_job(job)
        superseded = [] if stale_by is not None else self.revisions.superseded_by(job)
        superseded = [r for r in superseded if r.sop_instance_uid not in written]  # replaced
        deliveries = [] if stale_by is not None else [Delivery(p, job.destinations) for p in files]
        retracted: list[OutputRecord] = []
        if self.reporting is not None:
            for group in group_retractions(superseded):
                try:
                    note = self.reporting.retraction(spec, group)
                except Exception as error:  # left unretracted; the next revision retries
                    log.error(
                        "rejection note not written", job_id=job.id,
                        series_uid=spec.series_uid, objects=len(group.records),
                        error=f"{type(error).__name__}: {error}",
                    )  # fmt: skip
                    continue
                deliveries.append(Delivery(note, group.destinations))
                retracted += group.records
        self.revisions.finish(
            job, state, reason, outputs, deliveries, retracted, time.time(), stale_by
        )
        bound = log.bind(job_id=job.id, series_uid=spec.series_uid)
        if retracted:
            bound.info(
                "superseded results retracted", objects=len(retracted),
                jobs=sorted({r.job_id for r in retracted}), revision=spec.revision,
            )  # fmt: skip
        if stale_by is not None:
            bound.warning("results superseded before sending", newer_job=stale_by)
        if deliveries:
            self._wake_outbox.set()

    def _spec(self, job: Job) -> JobSpec:
        """The :class:`JobSpec` for a claimed job; creates its output folder."""
        if self.store is None:
            raise RuntimeError("node is not started")
        output = self.config.state_dir / "results" / str(job.id)
        output.mkdir(parents=True, exist_ok=True)
        paths = study_paths(self.config, self.store, job) or tuple(
            self.store.series_paths(job.series_instance_uid)
        )  # a level = "study" rule's job: every role's series of the study
        revision = self.revisions.assign_revision(job, series_fingerprint(paths))
        return JobSpec(
            job_id=job.id,
            series_uid=job.series_instance_uid,
            study_uid=job.study_instance_uid,
            pipeline=job.pipeline,
            rule=job.rule,
            instance_paths=paths,
            destinations=job.destinations,
            output_dir=output,
            revision=revision,
        )

    def is_idle(self) -> bool:
        """Nothing journaled and not recorded, no series receiving, no job queued or
        running, no follow-up to run, nothing waiting to be sent."""
        if self.store is None:
            return True
        receiver = self._receiver
        with self._follow_lock:
            following = self._following or len(self._follow_ups)
        return (
            not following
            and (receiver is None or receiver.journal.pending() == 0)
            and self.store.count_receiving() == 0
            and self.jobs.count_active() == 0
            and self.outbox.count_pending() == 0
        )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until :meth:`is_idle` or ``timeout`` seconds pass; return whether idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_idle():
                return True
            time.sleep(0.05)
        return self.is_idle()
