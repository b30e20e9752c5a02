"""Run one job: load the spooled series, run its pipeline, write the output objects.

This is the single place where the service calls into ``pipelines``. A series that cannot
be loaded or processed raises ``JobFailure`` with a kind (``failures.FailureKind``) and a
reason an admin can read; the node records the reason as the job's failure reason, and
:func:`reporting` writes what the destinations receive instead of results: an "analysis
not performed" SR and Secondary Capture stating the kind in a radiologist's words, and
the rejection notes that retract a series' superseded results.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode import phi
from dicomnode.case_store import CaseStoreError, CaseStoreSettings, prediction_of, write_record
from dicomnode.config import NodeConfig
from dicomnode.failures import FailureKind, classify_failure, radiologist_sentence
from dicomnode.node import JobRunner, JobSpec, Reporting
from dicomnode.pipelines_check import PipelinePlan
from dicomnode.revisions import Retraction
from dicomnode.shadow import run_shadow
from dicomnode.studies import run_study_job, study_rule
from pipelines.base import CaseRecord, Pipeline, PipelineError, PipelineResult, PipelineUnavailable
from pipelines.outputs import build_outputs
from pipelines.outputs.failure import FailureNotice, build_failure_outputs
from pipelines.outputs.rejection import RejectedInstance, build_rejection_note
from pipelines.registry import get_pipeline, pipeline_factory, pipeline_names
from pipelines.run_scope import keeping_cases, run_scope
from pipelines.series import LoadedSeries
from pipelines.stages import stage
from pipelines.volume import VolumeLoadError, load_series

log = structlog.get_logger(__name__)

PipelineFactory = Callable[[str], Pipeline]
Keeper = Callable[[str, Dataset, PipelineResult], None]
"""Called as ``keep(pipeline_name, reference_header, result)`` after a job's outputs."""


class JobFailure(Exception):
    """A job could not produce results; the message is the reason shown to admins and
    ``kind`` says which radiologist sentence the failure objects carry."""

    def __init__(self, reason: str, kind: FailureKind = FailureKind.PIPELINE_ERROR) -> None:
        """A failure of ``kind`` with the admin ``reason``."""
        super().__init__(reason)
        self.kind = kind


def check_pipelines(names: Sequence[str]) -> None:
    """Refuse, at start-up, routing rules that name a pipeline that does not exist."""
    unknown = sorted(set(names) - set(pipeline_names()))
    if unknown:
        raise JobFailure(
            f"unknown pipeline(s) {', '.join(unknown)}; known: {', '.join(pipeline_names())}"
        )


def run_pipeline(
    paths: Sequence[Path],
    pipeline_name: str,
    output_dir: Path,
    fallback: str | None = None,
    revision: int = 1,
    pipelines: PipelineFactory = get_pipeline,
    keep: Keeper | None = None,
) -> list[Path]:
    """Load ``paths`` as one series, run ``pipeline_name`` and write its output files.

    When the pipeline is unavailable here (its model files are absent), ``fallback`` runs
    instead, and the outputs name the algorithm that actually ran. ``revision`` is the
    series' result revision (new UIDs from 2 on). ``pipelines`` builds a pipeline by name
    (``pipelines.registry.pipeline_factory`` of the config's ``[pipelines]`` settings; the
    default: every pipeline's default settings); the outputs follow its profile.
    ``keep`` receives the result once the outputs are written (the case store).
    Returns the written files in the order SEG, SC, SR, saliency SCs. Every failure is a
    ``JobFailure`` with its kind.
    """
    phi.remember_files(paths)  # before loading can log one of their values
    series = load_job_series(paths)
    pipeline_name, pipeline, result = run_series(
        series, pipeline_name, fallback, pipelines, keep is not None
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with stage("writers"):
        outputs = build_outputs(
            series, result, pipeline_name=pipeline_name, profile=pipeline.profile, revision=revision
        )
        for dataset in outputs:
            path = output_dir / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            written.append(path)
    log.info(
        "pipeline finished",
        pipeline=pipeline_name,
        algorithm_version=result.algorithm.version,
        series_uid=str(series.reference.SeriesInstanceUID),
        outputs=len(written),
        segments=[s.total.volume_ml if s.total else 0.0 for s in result.segments],
    )
    if keep is not None:
        keep(pipeline_name, series.reference, result)
    return written


def load_job_series(paths: Sequence[Path]) -> LoadedSeries:
    """``paths`` loaded as one series (stage ``load``); ``JobFailure`` when they cannot be."""
    try:
        with stage("load"):
            return load_series(paths)
    except VolumeLoadError as exc:
        raise JobFailure(f"series cannot be loaded: {exc}", classify_failure(exc)) from exc


def run_series(
    series: LoadedSeries,
    pipeline_name: str,
    fallback: str | None,
    pipelines: PipelineFactory,
    keep_case: bool,
) -> tuple[str, Pipeline, PipelineResult]:
    """Run ``pipeline_name`` on ``series``, or ``fallback`` when it is unavailable here;
    returns the name of the one that ran, it and its result. Every failure is a
    ``JobFailure`` with its kind."""
    try:
        try:
            pipeline = pipelines(pipeline_name)
            return pipeline_name, pipeline, run_once(pipeline, series, keep_case)
        except PipelineUnavailable as exc:
            if fallback is None or fallback == pipeline_name:
                raise
            log.warning(
                "pipeline unavailable, running the default", pipeline=pipeline_name,
                fallback=fallback, reason=str(exc),
            )  # fmt: skip
            pipeline = pipelines(fallback)
            return fallback, pipeline, run_once(pipeline, series, keep_case)
    except Exception as exc:  # every pipeline failure becomes a JobFailure with its kind
        kind = classify_failure(exc)
        if not isinstance(exc, PipelineError) and kind is FailureKind.PIPELINE_ERROR:
            raise JobFailure(
                f"pipeline {pipeline_name} failed: {type(exc).__name__}: {exc}", kind
            ) from exc
        raise JobFailure(f"pipeline {pipeline_name} failed: {exc}", kind) from exc


def run_once(pipeline: Pipeline, series: LoadedSeries, keep_case: bool) -> PipelineResult:
    """``pipeline.run(series)`` in its own run scope (``pipelines.run_scope``), whose cached
    segmentations are released when it returns, before the writers; the case record is
    built only when ``keep_case`` (a case store keeps it). Stage ``other`` takes what the
    pipeline does not charge to its own stages."""
    with run_scope(), keeping_cases(keep_case), stage("other"):
        return pipeline.run(series)


def case_keeper(settings: CaseStoreSettings | None) -> Keeper | None:
    """The case store write after each job (None without ``[case_store]``); a failure to
    store is logged and never fails the job."""
    if settings is None:
        return None

    def keep(pipeline: str, reference: Dataset, result: PipelineResult) -> None:
        if result.case_record is not None:
            store_case(settings, pipeline, reference, result.case_record, prediction_of(result))

    return keep


def store_case(
    settings: CaseStoreSettings,
    pipeline: str,
    reference: Dataset,
    record: CaseRecord,
    prediction: Mapping[str, Any] | None,
) -> None:
    """Write a case record into the store; a failure to store is logged, never raised."""
    try:
        write_record(settings, pipeline, reference, record, prediction)
    except (CaseStoreError, OSError, ValueError) as exc:
        log.error("case not stored", pipeline=pipeline, reason=f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class KeptCase:
    """A job's case record, kept in memory from the job to its follow-up."""

    pipeline: str
    reference: Dataset
    record: CaseRecord
    prediction: Mapping[str, Any] | None


class Processor(JobRunner):
    """The node's job runner: each job's pipeline on its spooled instances, falling back
    to ``config.default_pipeline`` when the pipeline is unavailable: at once when ``plan``
    (the start-up check) found it so, else when it raises ``PipelineUnavailable``.

    Its follow-up, after the job's results are queued for sending, writes the case
    record into ``[case_store]`` and runs the pipeline's shadow model, if any. The case
    record comes from the job (kept in memory meanwhile); a follow-up that runs after a
    restart makes it again by running the pipeline on the spooled series (nothing is
    written or sent)."""

    def __init__(self, config: NodeConfig, build: PipelineFactory, plan: PipelinePlan | None):
        """Run the pipelines ``build`` makes, for ``config``."""
        self.config = config
        self.build = build
        self.plan = plan
        self._kept: dict[int, KeptCase] = {}
        self._lock = threading.Lock()

    def pipeline_of(self, job: JobSpec) -> str:
        """The pipeline ``job`` runs: its own, or the default when the start-up check found
        its own unavailable."""
        return self.plan.resolve(job.pipeline) if self.plan is not None else job.pipeline

    def __call__(self, job: JobSpec) -> list[Path]:
        """Run ``job``; return its result files (the case record is kept for the
        follow-up)."""
        rule = study_rule(self.config, job.rule)
        if rule is not None:  # one job for a whole study: its series by role
            return run_study_job(
                job.instance_paths, rule, job.pipeline, job.output_dir, self.build, job.revision
            )
        pipeline = self.pipeline_of(job)
        if pipeline != job.pipeline:
            log.info(
                "routed pipeline unavailable since start, running the default",
                job_id=job.job_id, routed=job.pipeline, pipeline=pipeline,
            )  # fmt: skip

        def keep(name: str, reference: Dataset, result: PipelineResult) -> None:
            if result.case_record is not None:
                kept = KeptCase(name, reference, result.case_record, prediction_of(result))
                with self._lock:
                    self._kept[job.job_id] = kept

        return run_pipeline(
            job.instance_paths, pipeline, job.output_dir, self.config.default_pipeline,
            revision=job.revision, pipelines=self.build,
            keep=keep if self.config.case_store is not None else None,
        )  # fmt: skip

    def follow_up(self, job: JobSpec) -> None:
        """Store ``job``'s case record, then run the shadow model (records only; sends
        nothing); failures are logged."""
        with self._lock:
            kept = self._kept.pop(job.job_id, None)
        if study_rule(self.config, job.rule) is not None:
            return
        pipeline = self.pipeline_of(job)
        settings = self.config.case_store
        if settings is not None:
            if kept is None:  # the node stopped between the job and its follow-up
                kept = self.case_again(job, pipeline)
            if kept is not None:
                store_case(settings, kept.pipeline, kept.reference, kept.record, kept.prediction)
        run_shadow(self.config, pipeline, job.instance_paths)

    def close(self) -> None:
        """Stop the radiomics worker pool, if a job made one."""
        stop_radiomics_pool()

    def case_again(self, job: JobSpec, pipeline: str) -> KeptCase | None:
        """The case record of ``job`` made again from its spooled series; None (logged)
        when the series is gone or the pipeline fails on it now."""
        phi.remember_files(job.instance_paths)
        try:
            series = load_job_series(job.instance_paths)
            name, _, result = run_series(
                series, pipeline, self.config.default_pipeline, self.build, keep_case=True
            )
        except JobFailure as exc:
            log.error("case not stored", job_id=job.job_id, pipeline=pipeline,
                      reason=f"its case record could not be made again: {exc}")  # fmt: skip
            return None
        if result.case_record is None:
            return None
        log.info("case record made again after a restart", job_id=job.job_id, pipeline=name)
        return KeptCase(name, series.reference, result.case_record, prediction_of(result))


def stop_radiomics_pool() -> None:
    """Stop the radiomics worker pool (``[pipelines.radiomics] workers``) when an
    extraction made one, rather than leave its workers to the interpreter's exit (a node
    stopped in-process would keep them); radiomics is not imported for this."""
    if "pipelines.radiomics.engine" in sys.modules:  # else no extraction made a pool
        from pipelines.radiomics.engine import shutdown_pool

        if shutdown_pool():
            log.info("radiomics worker pool stopped")


def processor(
    config: NodeConfig,
    pipelines: PipelineFactory | None = None,
    plan: PipelinePlan | None = None,
) -> Processor:
    """The node's job runner (:class:`Processor`); pipelines are built by ``pipelines``,
    by default from ``config.pipelines``."""
    build = pipeline_factory(config.pipelines) if pipelines is None else pipelines
    return Processor(config, build, plan)


def readable_headers(paths: Sequence[Path], series_uid: str) -> list[Dataset]:
    """Headers (no pixel data) of the files of ``series_uid`` that can be read, in order."""
    headers: list[Dataset] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            log.warning("header unreadable", file=Path(path).name, error=type(exc).__name__)
            continue
        if str(ds.get("SeriesInstanceUID", "")) == series_uid and "StudyInstanceUID" in ds:
            headers.append(ds)
    return headers


def write_failure_notices(spec: JobSpec, failure: BaseException) -> list[Path]:
    """Write the "analysis not performed" SR and SC of a failed job into its output
    folder; none when no instance of the series is readable (nothing to attribute)."""
    kind = classify_failure(failure)
    notice = FailureNotice(
        pipeline_name=spec.pipeline,
        sentence=radiologist_sentence(kind),
        detail=str(failure) or type(failure).__name__,
        revision=spec.revision,
    )
    headers = readable_headers(spec.instance_paths, spec.series_uid)
    datasets = build_failure_outputs(headers, notice)
    if not datasets:
        log.warning(
            "no readable instance: failure not reported to destinations",
            job_id=spec.job_id, series_uid=spec.series_uid, kind=kind.value,
        )  # fmt: skip
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in datasets:
        path = spec.output_dir / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    log.info(
        "failure notices written", job_id=spec.job_id, series_uid=spec.series_uid,
        kind=kind.value, objects=len(written),
    )  # fmt: skip
    return written


def patient_study_header(spec: JobSpec, retraction: Retraction) -> Dataset:
    """Patient and study of a rejection note: the first superseded object still on disk,
    else the first readable instance of the series in the same study."""
    for record in retraction.records:
        try:
            return pydicom.dcmread(record.path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
    for header in readable_headers(spec.instance_paths, spec.series_uid):
        if str(header.StudyInstanceUID) == retraction.study_instance_uid:
            return header
    raise JobFailure(
        f"no file left to give the patient and study of the rejection note of job "
        f"{spec.job_id} ({len(retraction.records)} superseded objects)"
    )


def write_rejection_note(spec: JobSpec, retraction: Retraction) -> Path:
    """Write the IOCM rejection note retracting ``retraction.records`` into the job's
    output folder (its UID is a function of the series, the job and the group)."""
    jobs = sorted({record.job_id for record in retraction.records})
    note = build_rejection_note(
        patient_study_header(spec, retraction),
        list(
            dict.fromkeys(  # an object re-sent unchanged by several jobs is listed once
                RejectedInstance(
                    r.sop_class_uid,
                    r.sop_instance_uid,
                    r.series_instance_uid,
                    r.study_instance_uid,
                )
                for r in retraction.records
            )
        ),
        spec.series_uid,
        f"job-{spec.job_id}|{retraction.key}",
        f"Results of job(s) {', '.join(map(str, jobs))} superseded by revision {spec.revision} "
        "of this series' analysis (the series changed after it was processed)",
    )
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    path = spec.output_dir / f"KO-{note.SOPInstanceUID}.dcm"
    note.save_as(path, enforce_file_format=True)
    return path


def reporting() -> Reporting:
    """The node's failure notices and rejection notes, written with ``pipelines.outputs``."""
    return Reporting(failure=write_failure_notices, retraction=write_rejection_note)
