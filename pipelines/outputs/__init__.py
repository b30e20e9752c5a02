"""Output writers: a pipeline result as DICOM SEG, Secondary Capture and Comprehensive 3D SR.

Every object is a new series in the source's study, with UIDs derived from the source
series, the pipeline name, the algorithm version, the object kind and the result revision
(``uids``): the first result of a series (revision 1) always has the same UIDs, and a
series processed again after it changed (revision 2, 3, ...) gets new ones, so the
superseded objects can be retracted by a rejection note (``rejection``).
"""

from __future__ import annotations

import datetime
from dataclasses import replace

from pydicom.dataset import Dataset

from pipelines.base import PipelineResult
from pipelines.contract import GENERIC_PROFILE, OutputProfile, Writer
from pipelines.outputs.common import OutputIdentity, output_identity, revision_suffix
from pipelines.outputs.regions import segment_plan
from pipelines.outputs.saliency import build_saliency_sc
from pipelines.outputs.sc import build_sc
from pipelines.outputs.seg import build_seg
from pipelines.outputs.sr import build_sr
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries

__all__ = [
    "OutputIdentity",
    "build_outputs",
    "build_saliency_sc",
    "build_sc",
    "build_seg",
    "build_sr",
    "derive_uid",
    "output_identity",
]


def build_outputs(
    series: LoadedSeries,
    result: PipelineResult,
    *,
    pipeline_name: str,
    profile: OutputProfile = GENERIC_PROFILE,
    series_number_base: int = 900,
    content_datetime: datetime.datetime | None = None,
    revision: int = 1,
) -> list[Dataset]:
    """[SEG, SC, SR, saliency SCs...] of ``result``, series ``series_number_base`` + 1..4.

    ``profile`` (the pipeline's, ``pipelines.contract``; default: generic titles, every
    writer) gives each series' title and
    which objects are written; those it leaves out are skipped (their series numbers and
    UIDs stay those of the full set). Each heat map of the result becomes one Secondary
    Capture of the fourth series.

    ``content_datetime`` (default now) becomes each object's ContentDate/ContentTime.
    ``revision`` is the result revision of the series (see ``common.revision_seed``).
    """
    when = content_datetime or datetime.datetime.now()
    source_uid = str(series.reference.SeriesInstanceUID)
    short = result.algorithm.kind.split()[-1] if result.algorithm.kind else "algorithm"
    suffix = revision_suffix(revision)

    def identity(kind: str, offset: int, title: str) -> OutputIdentity:
        """Identity of one output object."""
        return output_identity(
            source_uid,
            pipeline_name,
            result.algorithm,
            kind,
            series_number_base + offset,
            f"{title} ({short})"[: 64 - len(suffix)] + suffix,
            when,
            revision,
        )

    outputs: list[Dataset] = []
    if profile.writes(Writer.SEG):
        plan = segment_plan(result)  # one plan for the SEG and the SR's groups
        seg = build_seg(series, result, identity("seg", 1, profile.seg_title), plan=plan)
        outputs.append(seg)
    if profile.writes(Writer.SC):
        outputs.append(build_sc(series, result, identity("sc-1", 2, profile.sc_title)))
    if profile.writes(Writer.SR):  # the profile guarantees the SEG it references
        sr_identity = identity("sr", 3, profile.sr_title)
        outputs.append(build_sr(series, result, seg, sr_identity, plan=plan))
    if profile.writes(Writer.SALIENCY):
        outputs += [
            build_saliency_sc(
                series,
                result,
                heatmap,
                replace(
                    identity(f"gradcam-{number}", 4, profile.saliency_title),
                    instance_number=number,
                ),
            )
            for number, heatmap in enumerate(result.heatmaps, start=1)
        ]
    return outputs
