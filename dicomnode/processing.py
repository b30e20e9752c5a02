"""Run one job: load the spooled series, run its pipeline, write the output objects.

This is the single place where the service calls into ``pipelines``. A series that cannot
be loaded or processed raises ``JobFailure`` with a kind (``failures.FailureKind``) and a
reason an admin can read; the node records the reason as the job's failure reason, and
:func:`reporting` writes what the destinations receive instead of results: an "analysis
not performed" SR and Secondary Capture stating the kind in a radiologist's words, and
the rejection notes that retract a series' superseded results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
from dicomnode.node import JobSpec, Process, Reporting
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
    try:
        with stage("load"):
            series = load_series(paths)
    except VolumeLoadError as exc:
        raise JobFailure(f"series cannot be loaded: {exc}", classify_failure(exc)) from exc
    try:
        try:
            pipeline = pipelines(pipeline_name)
            result = run_once(pipeline, series, keep is not None)
        except PipelineUnavailable as exc:
            if fallback is None or fallback == pipeline_name:
                raise
            log.warning(
                "pipeline unavailable, running the default", pipeline=pipeline_name,
                fallback=fallback, reason=str(exc),
            )  # fmt: skip
            pipeline_name = fallback
            pipeline = pipelines(fallback)
            result = run_once(pipeline, series, keep is not None)
    except Exception as exc:  # every pipeline failure becomes a JobFailure with its kind
        kind = classify_failure(exc)
        if not isinstance(exc, PipelineError) and kind is FailureKind.PIPELINE_ERROR:
            raise JobFailure(
                f"pipeline {pipeline_name} failed: {type(exc).__name__}: {exc}", kind
            ) from exc
        raise JobFailure(f"pipeline {pipeline_name} failed: {exc}", kind) from exc
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


def processor(
    config: NodeConfig,
    pipelines: PipelineFactory | None = None,
    plan: PipelinePlan | None = None,
) -> Process:
    """The node's job callback: run each job's pipeline on its spooled instances, falling
    back to ``config.default_pipeline`` when the pipeline is unavailable: at once when
    ``plan`` (the start-up check) found it so, else when it raises ``PipelineUnavailable``.
    Pipelines are built by ``pipelines``, by default from ``config.pipelines``."""
    build = pipeline_factory(config.pipelines) if pipelines is None else pipelines
    keep = case_keeper(config.case_store)

    def process_job(job: JobSpec) -> list[Path]:
        rule = study_rule(config, job.rule)
        if rule is not None:  # one job for a whole study: its series by role
            return run_study_job(
                job.instance_paths, rule, job.pipeline, job.output_dir, build, job.revision
            )
        pipeline = plan.resolve(job.pipeline) if plan is not None else job.pipeline
        if pipeline != job.pipeline:
            log.info(
                "routed pipeline unavailable since start, running the default",
                job_id=job.job_id, routed=job.pipeline, pipeline=pipeline,
            )  # fmt: skip
        written = run_pipeline(
            job.instance_paths, pipeline, job.output_dir, config.default_pipeline,
            revision=job.revision, pipelines=build, keep=keep,
        )  # fmt: skip
        run_shadow(config, pipeline, job.instance_paths)  # records only; sends nothing
        return written

    return process_job


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
