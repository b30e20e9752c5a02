"""Run one job: load the spooled series, run its pipeline, write the output objects.

This is the single place where the service calls into ``pipelines``. A series that cannot
be loaded or processed raises ``JobFailure`` with a reason an admin can read; the node
records it as the job's failure reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from dicomnode import phi
from dicomnode.config import NodeConfig
from dicomnode.node import JobSpec, Process
from dicomnode.pipelines_check import PipelinePlan
from pipelines.base import PipelineError, PipelineUnavailable
from pipelines.outputs import build_outputs
from pipelines.registry import get_pipeline, pipeline_names
from pipelines.volume import VolumeLoadError, load_series

log = structlog.get_logger(__name__)


class JobFailure(Exception):
    """A job could not produce results; the message is the reason shown to admins."""


def check_pipelines(names: Sequence[str]) -> None:
    """Refuse, at start-up, routing rules that name a pipeline that does not exist."""
    unknown = sorted(set(names) - set(pipeline_names()))
    if unknown:
        raise JobFailure(
            f"unknown pipeline(s) {', '.join(unknown)}; known: {', '.join(pipeline_names())}"
        )


def run_pipeline(
    paths: Sequence[Path], pipeline_name: str, output_dir: Path, fallback: str | None = None
) -> list[Path]:
    """Load ``paths`` as one series, run ``pipeline_name`` and write its output files.

    When the pipeline is unavailable here (its model files are absent), ``fallback`` runs
    instead, and the outputs name the algorithm that actually ran. Returns the written
    files in the order SEG, SC, SR, saliency SCs.
    """
    phi.remember_files(paths)  # before loading can log one of their values
    try:
        series = load_series(paths)
    except VolumeLoadError as exc:
        raise JobFailure(f"series cannot be loaded: {exc}") from exc
    try:
        try:
            result = get_pipeline(pipeline_name).run(series)
        except PipelineUnavailable as exc:
            if fallback is None or fallback == pipeline_name:
                raise
            log.warning(
                "pipeline unavailable, running the default", pipeline=pipeline_name,
                fallback=fallback, reason=str(exc),
            )  # fmt: skip
            pipeline_name = fallback
            result = get_pipeline(fallback).run(series)
    except PipelineError as exc:
        raise JobFailure(f"pipeline {pipeline_name} failed: {exc}") from exc
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in build_outputs(series, result, pipeline_name=pipeline_name):
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
    return written


def processor(config: NodeConfig, plan: PipelinePlan | None = None) -> Process:
    """The node's job callback: run each job's pipeline on its spooled instances, falling
    back to ``config.default_pipeline`` when the pipeline is unavailable: at once when
    ``plan`` (the start-up check) found it so, else when it raises ``PipelineUnavailable``."""

    def process_job(job: JobSpec) -> list[Path]:
        pipeline = plan.resolve(job.pipeline) if plan is not None else job.pipeline
        if pipeline != job.pipeline:
            log.info(
                "routed pipeline unavailable since start, running the default",
                job_id=job.job_id, routed=job.pipeline, pipeline=pipeline,
            )  # fmt: skip
        return run_pipeline(job.instance_paths, pipeline, job.output_dir, config.default_pipeline)

    return process_job
