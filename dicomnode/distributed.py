"""Scale-out on Celery: pipeline jobs run by worker processes on other hosts.

The node keeps its durable SQLite queue, its receiver and its outbox; with ``[celery]`` in
the config, each job is handed to Celery instead of being run in the node's own threads:

- the node's worker thread packs the job (its spooled instances, the pipeline, the
  fallback and the result revision) into the task message and waits for the task's result;
- a ``dicomnode worker`` process on any host that reaches the broker (a GPU box) unpacks
  the instances into a private temporary folder, runs the pipeline exactly as the node
  would (``processing.run_pipeline``, with its own ``[pipelines]`` settings: weights
  folder, device), and returns the output objects in the task result; a job failure
  comes back as its reason and kind, so the node reports it to PACS as usual;
- the node writes the returned objects into the job's output folder and queues them in its
  outbox, once: the task is one step of the node's job, so a result is consumed by exactly
  one waiting job.

Tasks are acknowledged late and rejected when their worker is lost, with one task per
worker slot at a time: a worker killed mid-job leaves its message unacknowledged, and the
broker gives it to another worker after ``visibility_timeout_s``. Files travel
zlib-compressed and base64-encoded in JSON (no pickle crosses the broker); each file's
SHA-256 is checked on arrival.

A result also carries the job's stage split (``pipelines.stages``, timed on the worker,
with ``transfer``: unpacking the series and packing the outputs), which the node records
as for its own jobs beside its own side of the job: ``dispatch`` (packing and
publishing), ``broker`` (its wait less the worker's split) and ``result`` (writing the
returned objects); and, only when the message says the node has a ``[case_store]``,
the case record (features, inputs, prediction and the arrays as a deflated ``.npz``,
base64); the node stores it with its own settings (salt, folder), so workers need no
case store and nothing identifying travels beyond the reference instance's SOP Instance
UID, which names the header the node reads from its spool. The node stores it in the
job's follow-up (``node.JobRunner``), once the results are queued for sending; a node
stopped in between asks the workers for the job again at its next start, for the case
record only.

A result also names the shadow version of the job's model, as the worker's model store
says (``dicomnode.shadow``); the node's follow-up then sends the series again (read from
its spool) in a ``dicomnode.shadow`` task, whose worker runs that version and returns the
prediction's record, which the node appends to its own ``<state_dir>/shadow`` file, as
in-process. A shadow that fails on the worker comes back as its reason, logged on the
node; it never fails the job. A node stopped before its follow-up ends sends the shadow
task at its next start.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
from celery import Celery
from celery.result import AsyncResult
from celery.signals import setup_logging, worker_ready
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode import phi
from dicomnode.case_store import CaseStoreSettings, prediction_of, save_arrays
from dicomnode.config import CelerySettings, NodeConfig
from dicomnode.failures import FailureKind
from dicomnode.node import JobRunner, JobSpec
from dicomnode.processing import JobFailure, run_pipeline, stop_radiomics_pool, store_case
from dicomnode.shadow import ShadowFailure, append_record, shadow_prediction, shadow_settings
from pipelines.base import CaseRecord, PipelineResult
from pipelines.registry import pipeline_factory
from pipelines.settings import PipelinesSettings
from pipelines.stages import StageTimer, recording, stage

log = structlog.get_logger(__name__)

TASK_NAME = "dicomnode.run_job"
SHADOW_TASK_NAME = "dicomnode.shadow"
# 2: the worker's split has ``transfer``; 3: a result names the shadow version, and the
# shadow task exists
PAYLOAD_FORMAT = "dicomnode-job/3"

Payload = dict[str, Any]


class PayloadError(ValueError):
    """A task message or result that is not what this version of dicomnode sends."""


def pack_files(paths: Sequence[Path]) -> list[dict[str, str]]:
    """Each file as ``{name, sha256, data}`` (zlib, base64), in order; names are
    positions (``0000.dcm``), never the spool's paths."""
    packed = []
    for index, path in enumerate(paths):
        data = path.read_bytes()
        packed.append(
            {
                "name": f"{index:04d}.dcm",
                "sha256": hashlib.sha256(data).hexdigest(),
                "data": base64.b64encode(zlib.compress(data, 1)).decode("ascii"),
            }
        )
    return packed


def unpack_files(packed: Sequence[Mapping[str, str]], folder: Path) -> list[Path]:
    """Write the files of :func:`pack_files` into ``folder``; ``PayloadError`` when one is
    damaged (its hash differs) or named outside the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in packed:
        name = str(item["name"])
        if Path(name).name != name or not name.endswith(".dcm"):
            raise PayloadError(f"file name {name!r} is not a plain .dcm name")
        data = zlib.decompress(base64.b64decode(item["data"]))
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise PayloadError(f"file {name} does not match its SHA-256")
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def job_payload(job: JobSpec, fallback: str | None, case_record: bool = False) -> Payload:
    """The task message of ``job``: what a worker needs and nothing that names a patient;
    ``case_record``: whether the worker returns the job's case record (the node has a
    case store)."""
    return {
        "format": PAYLOAD_FORMAT,
        "job_id": job.job_id,
        "pipeline": job.pipeline,
        "fallback": fallback,
        "revision": job.revision,
        "case_record": case_record,
        "files": pack_files(job.instance_paths),
    }


def shadow_payload(job: JobSpec) -> Payload:
    """The message of ``job``'s shadow run: its pipeline and its spooled instances."""
    return {
        "format": PAYLOAD_FORMAT,
        "job_id": job.job_id,
        "pipeline": job.pipeline,
        "files": pack_files(job.instance_paths),
    }


def pack_case(pipeline: str, reference: Dataset, result: PipelineResult) -> Payload | None:
    """The case record of a run as JSON: the arrays as a deflated ``.npz`` (base64) with
    its SHA-256; None when the pipeline keeps nothing for retraining."""
    record = result.case_record
    if record is None:
        return None
    buffer = io.BytesIO()
    save_arrays(buffer, record.arrays)
    blob = buffer.getvalue()
    return {
        "pipeline": pipeline,
        "reference_uid": str(reference.SOPInstanceUID),
        "prediction": prediction_of(result),
        "features": record.features,
        "inputs": record.inputs,
        "arrays_sha256": hashlib.sha256(blob).hexdigest(),
        "arrays": base64.b64encode(blob).decode("ascii"),
    }


def unpack_case(packed: Mapping[str, Any]) -> CaseRecord:
    """The :class:`CaseRecord` of :func:`pack_case`; ``PayloadError`` when its arrays
    are damaged."""
    blob = base64.b64decode(packed["arrays"])
    if hashlib.sha256(blob).hexdigest() != packed["arrays_sha256"]:
        raise PayloadError("case record arrays do not match their SHA-256")
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return CaseRecord(arrays, dict(packed["features"]), dict(packed["inputs"]))


def check_payload(payload: Mapping[str, Any]) -> None:
    """``PayloadError`` unless ``payload`` is a task message of this version."""
    if payload.get("format") != PAYLOAD_FORMAT:
        raise PayloadError(f"task format {payload.get('format')!r} is not {PAYLOAD_FORMAT}")


def run_payload(payload: Mapping[str, Any], settings: PipelinesSettings) -> Payload:
    """Run one task message in a private temporary folder (the worker's side) with the
    pipelines of ``settings``: the output files and the shadow version of the pipeline's
    model (None: no shadow), or the job failure's reason and kind; the stage split either
    way, and the case record when the message asks for it."""
    check_payload(payload)
    job_id = int(payload["job_id"])
    bound = log.bind(job_id=job_id, pipeline=payload["pipeline"])
    timer = StageTimer()
    cases: list[Payload | None] = []

    def keep(pipeline: str, reference: Dataset, result: PipelineResult) -> None:
        with stage("writers"):
            cases.append(pack_case(pipeline, reference, result))

    with (
        tempfile.TemporaryDirectory(prefix=f"dicomnode-job-{job_id}-") as tmp,
        recording(timer),
    ):
        with stage("transfer"):
            paths = unpack_files(payload["files"], Path(tmp) / "in")
        bound.info("remote job started", instances=len(paths))
        try:
            outputs = run_pipeline(
                paths, str(payload["pipeline"]), Path(tmp) / "out", payload.get("fallback"),
                revision=int(payload["revision"]), pipelines=pipeline_factory(settings),
                keep=keep if payload.get("case_record") else None,
            )  # fmt: skip
        except JobFailure as exc:
            bound.warning("remote job failed", reason=str(exc), kind=exc.kind.value)
            return {"format": PAYLOAD_FORMAT, "ok": False, "reason": str(exc),
                    "kind": exc.kind, "stages": timer.seconds()}  # fmt: skip
        case = cases[0] if cases else None
        pinned = shadow_settings(str(payload["pipeline"]), settings)
        shadow = None if pinned is None else pinned[1]
        bound.info("remote job done", outputs=len(outputs), case_record=case is not None,
                   shadow=shadow)  # fmt: skip
        with stage("transfer"):
            packed = pack_files(outputs)
        return {"format": PAYLOAD_FORMAT, "ok": True, "outputs": packed,
                "stages": timer.seconds(), "case": case, "shadow": shadow}  # fmt: skip


def run_shadow_payload(payload: Mapping[str, Any], settings: PipelinesSettings) -> Payload:
    """Run the shadow version of a shadow message's pipeline (the model store of
    ``settings``) on its series, in a private temporary folder (the worker's side): the
    prediction's record (``dicomnode.shadow.RECORD_FIELDS``; None: no shadow now), or
    the failure's reason."""
    check_payload(payload)
    job_id, pipeline = int(payload["job_id"]), str(payload["pipeline"])
    bound = log.bind(job_id=job_id, pipeline=pipeline)
    with tempfile.TemporaryDirectory(prefix=f"dicomnode-shadow-{job_id}-") as tmp:
        paths = unpack_files(payload["files"], Path(tmp))
        phi.remember_files(paths)  # before loading can log one of their values
        try:
            record = shadow_prediction(pipeline, settings, paths)
        except ShadowFailure as exc:
            bound.warning("shadow run failed", shadow=exc.version, reason=str(exc))
            return {"format": PAYLOAD_FORMAT, "ok": False, "shadow": exc.version,
                    "reason": str(exc)}  # fmt: skip
    bound.info("shadow run done", shadow=None if record is None else record["shadow"])
    return {"format": PAYLOAD_FORMAT, "ok": True, "record": record}


def check_result(result: Mapping[str, Any]) -> None:
    """``PayloadError`` unless ``result`` is a task result of this version."""
    if result.get("format") != PAYLOAD_FORMAT:
        raise PayloadError(f"task result format {result.get('format')!r} is not {PAYLOAD_FORMAT}")


def outputs_of(result: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """The output files of a task result written into ``output_dir`` (the node's side);
    a failed job raises its ``JobFailure``."""
    check_result(result)
    if not result["ok"]:
        raise JobFailure(str(result["reason"]), FailureKind(result["kind"]))
    arrived = output_dir / ".arrived"
    # The worker names its outputs by position; here they get the node's own names.
    written = [path.rename(output_dir / _output_name(path))
               for path in unpack_files(result["outputs"], arrived)]  # fmt: skip
    arrived.rmdir()
    return written


def _output_name(path: Path) -> str:
    """``<Modality>-<SOPInstanceUID>.dcm``, as the node names the outputs it writes."""
    ds = pydicom.dcmread(
        path, stop_before_pixels=True, specific_tags=["Modality", "SOPInstanceUID"]
    )
    name = f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
    if Path(name).name != name:
        raise PayloadError(f"output {path.name} has an unusable SOP Instance UID")
    return name


def store_remote_case(
    settings: CaseStoreSettings, packed: Mapping[str, Any], instance_paths: Sequence[Path]
) -> None:
    """Write a returned case record into the node's case store, with the header of its
    reference instance read from the job's spooled files; a failure is logged, never
    raised (as for the node's own jobs)."""
    try:
        record = unpack_case(packed)
    except (PayloadError, KeyError, TypeError, ValueError, OSError) as exc:
        log.error("case not stored", reason=f"returned case record unusable: {exc}")
        return
    reference = _instance_header(instance_paths, str(packed["reference_uid"]))
    if reference is None:
        log.error("case not stored", reason="its reference instance is not in the job")
        return
    store_case(settings, str(packed["pipeline"]), reference, record, packed.get("prediction"))


def _instance_header(paths: Sequence[Path], sop_instance_uid: str) -> Dataset | None:
    """The header (no pixel data) of the file of ``sop_instance_uid`` among ``paths``."""
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue
        if str(ds.get("SOPInstanceUID", "")) == sop_instance_uid:
            return ds
    return None


def celery_app(settings: CelerySettings) -> Celery:
    """The Celery application of node and workers: JSON only, late acknowledgement, one
    task per worker slot, redelivery after ``visibility_timeout_s``."""
    app = Celery("dicomnode", broker=settings.broker_url,
                 backend=settings.result_backend or settings.broker_url)  # fmt: skip
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=int(settings.job_timeout_s) + 3600,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
    )
    return app


def broker_seconds(waited_s: float, remote: Mapping[str, float]) -> float:
    """The node's wait for a task result that the worker's own split does not account
    for: the queue until a worker is free and the messages' transport (never negative)."""
    return max(0.0, waited_s - sum(float(v) for v in remote.values()))


@dataclass(frozen=True)
class Returned:
    """What a job's follow-up needs of its task result: the case record (None: none
    returned) and whether the worker's model has a shadow version."""

    case: Payload | None
    shadow: bool


class CeleryProcessor(JobRunner):
    """The node's job runner in scale-out mode: send each job to the workers, wait for
    its result (at most ``job_timeout_s``) and write the returned objects. Its follow-up,
    after the job's results are queued for sending, stores the returned case record
    (``[case_store]``) and has the workers run the shadow version of the job's model,
    if any, recording the returned prediction; one that runs after a restart asks the
    workers for the job again and keeps only its case record (nothing is written or
    sent), then sends the shadow task."""

    def __init__(self, config: NodeConfig, settings: CelerySettings, app: Celery) -> None:
        """Send ``config``'s jobs through ``app`` (``settings``: its queue and timeout)."""
        self.config = config
        self.settings = settings
        self.celery = app
        self._returned: dict[int, Returned] = {}
        self._lock = threading.Lock()

    def send(self, task: str, job: JobSpec, payload: Payload) -> AsyncResult:
        """Publish ``payload`` to the workers' ``task`` (the payload, the largest object of
        a job, is not kept once published)."""
        task_id = f"{task}-{job.job_id}-{uuid.uuid4().hex}"
        pending = self.celery.send_task(task, args=[payload], task_id=task_id,
                                        queue=self.settings.queue)  # fmt: skip
        log.info("task sent to the Celery workers", task=task, job_id=job.job_id, task_id=task_id)
        return pending

    def wait(self, pending: AsyncResult) -> Payload:
        """The result of ``pending`` (at most ``job_timeout_s``); the worker's unexpected
        error or the wait's timeout is raised."""
        try:
            return dict(pending.get(timeout=self.settings.job_timeout_s, propagate=True))
        finally:
            pending.forget()

    def remote_result(self, job: JobSpec) -> Payload:
        """The workers' result of ``job``: its stage split recorded in ``job.stages``."""
        with stage("dispatch"):
            case_record = self.config.case_store is not None
            pending = self.send(
                TASK_NAME, job, job_payload(job, self.config.default_pipeline, case_record)
            )
        sent = time.perf_counter()
        try:
            result = self.wait(pending)
        except Exception as exc:  # the worker's unexpected error or the wait's timeout
            job.stages.add({"broker": time.perf_counter() - sent})
            if isinstance(exc, JobFailure):
                raise
            raise JobFailure(f"remote job failed: {type(exc).__name__}: {exc}") from exc
        waited = time.perf_counter() - sent
        check_result(result)
        remote: Mapping[str, float] = result.get("stages") or {}
        job.stages.add(remote)
        job.stages.add({"broker": broker_seconds(waited, remote)})
        return result

    def __call__(self, job: JobSpec) -> list[Path]:
        """Run ``job`` on the workers; return its result files (what its follow-up needs
        of the result is kept)."""
        result = self.remote_result(job)
        with stage("result"):
            job.output_dir.mkdir(parents=True, exist_ok=True)
            written = outputs_of(result, job.output_dir)
        case = result.get("case") if self.config.case_store is not None else None
        with self._lock:
            self._returned[job.job_id] = Returned(case, result.get("shadow") is not None)
        return written

    def follow_up(self, job: JobSpec) -> None:
        """Store ``job``'s returned case record, then have the workers run the shadow
        model (records only; sends nothing); failures are logged."""
        with self._lock:
            returned = self._returned.pop(job.job_id, None)
        if returned is None:  # the node stopped between the job and its follow-up
            returned = self.again(job)
        settings = self.config.case_store
        if settings is not None and returned.case is not None:
            store_remote_case(settings, returned.case, job.instance_paths)
        if returned.shadow:
            self.shadow(job)

    def again(self, job: JobSpec) -> Returned:
        """What the follow-up of ``job`` needs, after a restart: with a case store, the
        case record from running the job on the workers again (none, logged, when it
        fails now) and whether its model has a shadow; without, only the shadow task
        (its worker says whether there is a shadow)."""
        if self.config.case_store is None:
            return Returned(None, shadow=True)
        try:
            result = self.remote_result(job)
        except (JobFailure, PayloadError) as exc:
            log.error("case not stored", job_id=job.job_id,
                      reason=f"its case record could not be made again: {exc}")  # fmt: skip
            return Returned(None, shadow=True)
        if not result.get("ok"):
            reason = f"its case record could not be made again: {result.get('reason')}"
            log.error("case not stored", job_id=job.job_id, reason=reason)
            return Returned(None, shadow=True)
        case = result.get("case")
        return Returned(None if case is None else dict(case), result.get("shadow") is not None)

    def shadow(self, job: JobSpec) -> None:
        """Have the workers run the shadow version of ``job``'s model on its spooled
        series and append the returned record to the node's shadow file; a failure is
        logged, never raised."""
        bound = log.bind(job_id=job.job_id, pipeline=job.pipeline)
        try:
            pending = self.send(SHADOW_TASK_NAME, job, shadow_payload(job))
            result = self.wait(pending)
            check_result(result)
        except Exception as exc:  # the worker's unexpected error, a timeout, a lost spool
            bound.warning("shadow run failed", reason=f"{type(exc).__name__}: {exc}")
            return
        if not result.get("ok"):
            bound.warning("shadow run failed", shadow=result.get("shadow"),
                          reason=f"on the worker: {result.get('reason')}")  # fmt: skip
            return
        record = result.get("record")
        if record is None:  # the shadow was stopped since the job
            return
        try:
            append_record(self.config.state_dir, job.pipeline, record)
        except (OSError, TypeError, ValueError) as exc:
            bound.error("shadow prediction not recorded", reason=f"{type(exc).__name__}: {exc}")


def celery_processor(config: NodeConfig, app: Celery | None = None) -> CeleryProcessor:
    """The node's job runner in scale-out mode (:class:`CeleryProcessor`)."""
    settings = config.celery
    if settings is None:
        raise ValueError("celery_processor needs a [celery] section in the config")
    return CeleryProcessor(config, settings, celery_app(settings) if app is None else app)


def register_worker_task(app: Celery, config: NodeConfig) -> None:
    """Define the tasks the workers run (a job, a shadow run), on pipelines built from
    ``config.pipelines``."""
    settings = config.pipelines

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_job(payload: dict[str, Any]) -> Payload:
        return run_payload(payload, settings)

    @app.task(name=SHADOW_TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_shadow(payload: dict[str, Any]) -> Payload:
        return run_shadow_payload(payload, settings)


def _keep_node_logging(**_: object) -> None:
    """Celery's ``setup_logging`` receiver: its presence stops Celery configuring logging."""


def _log_ready(sender: object = None, **_: object) -> None:
    """Say, in the node's log, that the worker takes jobs."""
    log.info("celery worker ready", worker=str(getattr(sender, "hostname", sender)))


def run_worker(config: NodeConfig, hostname: str | None = None) -> None:
    """Run a Celery worker for ``config`` until it is stopped (``dicomnode worker``)."""
    settings = config.celery
    if settings is None:
        raise ValueError("dicomnode worker needs a [celery] section in the config")
    app = celery_app(settings)
    register_worker_task(app, config)
    # The node's JSON logging (configured by the CLI) stays: Celery adds no handler.
    setup_logging.connect(_keep_node_logging, weak=False)
    worker_ready.connect(_log_ready, weak=False)
    pool = "solo" if settings.worker_concurrency == 1 else "prefork"
    argv = [
        "--quiet",  # no banner on stdout: every line the worker writes is the node's JSON
        "worker", "--queues", settings.queue, "--pool", pool,
        "--concurrency", str(settings.worker_concurrency),
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    if hostname:
        argv += ["--hostname", hostname]
    try:
        app.worker_main(argv)
    finally:  # a solo worker runs radiomics in this process: stop its pool, if any
        stop_radiomics_pool()
