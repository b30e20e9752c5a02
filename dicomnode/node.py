"""The node: receiver plus background loops for assembly, pipeline workers and the outbox.

The pipeline is not imported here: it comes in as ``process``, a callable taking a
:class:`JobSpec` and returning the result files to send.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from dicomnode.assembler import Assembler
from dicomnode.config import NodeConfig
from dicomnode.health import HealthServer, PipelineStatuses
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.outbox import OutboxProcessor
from dicomnode.receiver import Receiver
from dicomnode.records import Job
from dicomnode.startup import StartupError, check_writable_dir
from dicomnode.state import StateStore

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


Process = Callable[[JobSpec], list[Path]]


class Node:
    """Composes receiver, state, assembler, workers and outbox; start, stop, wait."""

    def __init__(
        self, config: NodeConfig, process: Process, pipelines: PipelineStatuses | None = None
    ) -> None:
        """Prepare (not start) a node for ``config`` running jobs with ``process``;
        ``pipelines`` (the start-up check's statuses) is shown by ``/health``."""
        self.config = config
        self.process = process
        self.pipelines = pipelines
        self.store: StateStore | None = None
        self._stop = threading.Event()
        self._wake_outbox = threading.Event()
        self._threads: list[threading.Thread] = []
        self._receiver: Receiver | None = None
        self.health: HealthServer | None = None

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
        self._stop.clear()
        assembler = Assembler(self.config, self.store, self.jobs)
        sender = OutboxProcessor(self.config, self.outbox)
        loops: list[tuple[str, Callable[[], object]]] = [
            ("assembler", lambda: assembler.assemble(time.time())),
            ("outbox", sender.process_due),
        ]
        loops += [(f"worker-{i}", self._work_once) for i in range(self.config.worker.threads)]
        for name, step in loops:
            thread = threading.Thread(
                target=self._loop, args=(name, step), name=f"dicomnode-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if self.config.http is not None:
            self.health = HealthServer(
                self.config.http.host,
                self.config.http.port,
                self.store.counts_by_state,
                lambda: self._receiver is not None,
                self.pipelines,
            )
            self.health.start()

    def stop(self) -> None:
        """Stop listening, let the loops finish their current step, close state."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        self._stop.set()
        self._wake_outbox.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
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

    def _work_once(self) -> bool:
        """Take one job, run the pipeline, queue its results; False when none was queued."""
        job = self.jobs.claim(time.time())
        if job is None:
            return False
        spec = self._spec(job)
        bound = log.bind(job_id=job.id, study_uid=spec.study_uid, series_uid=spec.series_uid)
        bound.info("job started", pipeline=job.pipeline, instances=len(spec.instance_paths))
        try:
            results = self.process(spec)
        except Exception as exc:  # the single edge where a pipeline's failure is caught
            reason = str(exc) or type(exc).__name__
            bound.exception("job failed", reason=reason)
            self.jobs.fail(job.id, reason, time.time())
            return True
        self.jobs.complete(job, results, time.time())
        bound.info("job done", results=len(results))
        self._wake_outbox.set()
        return True

    def _spec(self, job: Job) -> JobSpec:
        """The :class:`JobSpec` for a claimed job; creates its output folder."""
        if self.store is None:
            raise RuntimeError("node is not started")
        output = self.config.state_dir / "results" / str(job.id)
        output.mkdir(parents=True, exist_ok=True)
        return JobSpec(
            job_id=job.id,
            series_uid=job.series_instance_uid,
            study_uid=job.study_instance_uid,
            pipeline=job.pipeline,
            rule=job.rule,
            instance_paths=tuple(self.store.series_paths(job.series_instance_uid)),
            destinations=job.destinations,
            output_dir=output,
        )

    def is_idle(self) -> bool:
        """No series receiving, no job queued or running, nothing waiting to be sent."""
        if self.store is None:
            return True
        return (
            self.store.count_receiving() == 0
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
