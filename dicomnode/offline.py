"""``dicomnode run``: route and process a folder of DICOM files exactly as the node would."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode import phi
from dicomnode.config import NodeConfig
from dicomnode.pipelines_check import PipelinePlan
from dicomnode.processing import JobFailure, run_pipeline
from dicomnode.records import SeriesInfo, SeriesState
from dicomnode.routing import Ignored, route
from dicomnode.studies import StudyJobFailure, run_study_job, study_rule
from pipelines.registry import PipelineFactory, pipeline_factory
from pipelines.volume import is_localizer

OFFLINE_AET = "OFFLINE"


@dataclass(frozen=True)
class SeriesOutcome:
    """What happened to one series of the folder."""

    series_instance_uid: str
    instances: int
    decision: str  # "processed", "ignored" or "failed"
    reason: str
    outputs: tuple[Path, ...]


def _scan(folder: Path) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]], list[Path]]:
    """Group the folder's DICOM files by series; also return the files that are not DICOM."""
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            skipped.append(path)
            continue
        phi.remember_identifiers(header)
        if "SeriesInstanceUID" not in header or "SOPClassUID" not in header:
            skipped.append(path)
            continue
        by_series[str(header.SeriesInstanceUID)].append((path, header))
    return by_series, skipped


def _series_info(headers: list[pydicom.Dataset], now: float) -> SeriesInfo:
    """Routing attributes of a series, as the receiver would record them."""
    first = headers[0]
    return SeriesInfo(
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        body_part_examined=str(first.get("BodyPartExamined", "")),
        series_description=str(first.get("SeriesDescription", "")),
        protocol_name=str(first.get("ProtocolName", "")),
        image_type=tuple(str(v).strip() for v in first.get("ImageType") or ()),
        all_localizer=all(is_localizer(h) for h in headers),
        sop_class_uid=str(first.SOPClassUID),
        calling_aet=OFFLINE_AET,
        called_aet=OFFLINE_AET,
        first_arrival=now,
        last_arrival=now,
        state=SeriesState.RECEIVING,
        reason=None,
        instance_count=len(headers),
    )


def run_folder(
    folder: Path, out_dir: Path, config: NodeConfig, plan: PipelinePlan | None = None
) -> list[SeriesOutcome]:
    """Route every series in ``folder`` by ``config``'s rules; run the routed ones.

    Outputs are written to ``out_dir/<SeriesInstanceUID>/``. Non-DICOM files are skipped.
    A pipeline the start-up check (``plan``) found unavailable is replaced by its fallback,
    and one that turns out unavailable while running by ``config.default_pipeline``, as
    the node does. Pipelines are built from ``config.pipelines``.
    """
    build = pipeline_factory(config.pipelines)
    by_series, _ = _scan(folder)
    outcomes = []
    studies: dict[tuple[str, str, str], list[tuple[str, list[tuple[Path, pydicom.Dataset]]]]]
    studies = defaultdict(list)
    for series_uid, members in sorted(by_series.items()):
        decision = route(_series_info([h for _, h in members], time.time()), config.routes)
        if isinstance(decision, Ignored):
            outcomes.append(SeriesOutcome(series_uid, len(members), "ignored", decision.reason, ()))
            continue
        if study_rule(config, decision.rule) is not None:  # one run per study, below
            study_uid = str(members[0][1].get("StudyInstanceUID", ""))
            studies[(decision.rule, decision.pipeline, study_uid)].append((series_uid, members))
            continue
        pipeline = plan.resolve(decision.pipeline) if plan is not None else decision.pipeline
        paths = [p for p, _ in members]
        try:
            written = run_pipeline(
                paths, pipeline, out_dir / series_uid, config.default_pipeline,
                pipelines=build,
            )  # fmt: skip
        except JobFailure as exc:
            outcomes.append(SeriesOutcome(series_uid, len(members), "failed", str(exc), ()))
            continue
        reason = f"rule {decision.rule}"
        if pipeline != decision.pipeline:
            reason += f" ({decision.pipeline} unavailable, ran the default {pipeline})"
        outcomes.append(
            SeriesOutcome(series_uid, len(members), "processed", reason, tuple(written))
        )
    for (rule_name, pipeline, study_uid), group in studies.items():
        outcomes += _run_study(rule_name, pipeline, study_uid, group, out_dir, config, build)
    return outcomes


def _run_study(
    rule_name: str,
    pipeline: str,
    study_uid: str,
    group: list[tuple[str, list[tuple[Path, pydicom.Dataset]]]],
    out_dir: Path,
    config: NodeConfig,
    build: PipelineFactory,
) -> list[SeriesOutcome]:
    """Run a study-level rule's pipeline once on the study's series (``dicomnode.studies``);
    every series of the group gets the outcome, the outputs listed once."""
    rule = study_rule(config, rule_name)
    assert rule is not None
    paths = [p for _, members in group for p, _ in members]
    try:
        written = tuple(run_study_job(paths, rule, pipeline, out_dir / study_uid, build))
        decision, reason = "processed", f"rule {rule_name} (study of {len(group)} series)"
    except (StudyJobFailure, JobFailure) as exc:
        written, decision, reason = (), "failed", str(exc)
    return [
        SeriesOutcome(uid, len(members), decision, reason, written if index == 0 else ())
        for index, (uid, members) in enumerate(group)
    ]


def non_dicom_files(folder: Path) -> list[Path]:
    """Files in ``folder`` that are not DICOM instances (reported, never processed)."""
    return _scan(folder)[1]
