"""Output writers: a pipeline result as DICOM SEG, Secondary Capture and Comprehensive 3D SR.

Every object is a new series in the source's study, with UIDs derived from the source
series, the pipeline name, the algorithm version and the object kind (``uids``), so a
re-sent series gives the same objects again.
"""

from __future__ import annotations

import datetime

from pydicom.dataset import Dataset

from pipelines.base import PipelineResult
from pipelines.outputs.common import OutputIdentity, output_identity
from pipelines.outputs.sc import build_sc
from pipelines.outputs.seg import build_seg
from pipelines.outputs.sr import build_sr
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries

__all__ = [
    "OutputIdentity",
    "build_outputs",
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
    series_number_base: int = 900,
    content_datetime: datetime.datetime | None = None,
) -> list[Dataset]:
    """[SEG, SC, SR] of ``result``, numbered ``series_number_base`` + 1, 2, 3.

    ``content_datetime`` (default now) becomes each object's ContentDate/ContentTime.
    """
    when = content_datetime or datetime.datetime.now()
    source_uid = str(series.reference.SeriesInstanceUID)
    short = result.algorithm.kind.split()[-1] if result.algorithm.kind else "algorithm"

    def identity(kind: str, offset: int, title: str) -> OutputIdentity:
        """Identity of one output object."""
        return output_identity(
            source_uid,
            pipeline_name,
            result.algorithm,
            kind,
            series_number_base + offset,
            f"{title} ({short})"[:64],
            when,
        )

    seg = build_seg(series, result, identity("seg", 1, "HYPERDENSE SEG"))
    sc = build_sc(series, result, identity("sc-1", 2, "HYPERDENSE SUMMARY"))
    sr = build_sr(series, result, seg, identity("sr", 3, "HYPERDENSE REPORT"))
    return [seg, sc, sr]
