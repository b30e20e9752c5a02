"""The pipeline contract beyond its result types: what a pipeline declares about its
outputs (:class:`OutputProfile`) and the interchangeable lesion segmenters that risk models
consume (:class:`Segmenter`).

A pipeline (``pipelines.base.Pipeline``) carries its registry ``name``, its
``algorithm`` identity and its ``profile``: the titles of its SEG, Secondary Capture, SR
and saliency series, the segment classes (labels and codes) its SEG may hold and which
writers run. The output writers (``pipelines.outputs.build_outputs``) read the titles and
writers from the profile, never from the pipeline's name.

A segmenter labels candidate lesions of a series on its volume grid, largest first; any
risk model takes its lesion from whichever segmenter its settings name
(``pipelines.settings``), and says which one produced the scored region.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from pipelines.base import Algorithm, PipelineResult, SegmentClass
from pipelines.series import LoadedSeries

TITLE_LIMIT = 64
"""SeriesDescription is LO: at most 64 characters (a revision suffix is added after)."""


class Writer(StrEnum):
    """The output objects a pipeline may produce."""

    SEG = "seg"
    SC = "sc"
    SR = "sr"
    SALIENCY = "saliency"  # one Secondary Capture per heat map of the result


ALL_WRITERS = frozenset(Writer)


@dataclass(frozen=True)
class OutputProfile:
    """What a pipeline's outputs are called and hold.

    ``seg_title``, ``sc_title``, ``sr_title`` and ``saliency_title`` become the
    SeriesDescription of each output series (the algorithm's kind is appended in
    parentheses, and a revision suffix from revision 2 on). ``segments`` are the coded
    segment classes the pipeline's SEG may hold, in segment-number order (empty: as the
    result's segments say). ``writers``
    says which objects are written; the SEG is written whenever the SR is, since the SR
    references its segments.
    """

    seg_title: str
    sc_title: str
    sr_title: str
    saliency_title: str
    segments: tuple[SegmentClass, ...]
    writers: frozenset[Writer] = ALL_WRITERS

    def __post_init__(self) -> None:
        """Refuse titles that cannot be a SeriesDescription and an SR without its SEG."""
        for name in ("seg_title", "sc_title", "sr_title", "saliency_title"):
            title = getattr(self, name)
            if not title.strip() or len(title) > TITLE_LIMIT or not title.isascii():
                raise ValueError(f"OutputProfile.{name} must be 1-64 ASCII characters: {title!r}")
        if Writer.SR in self.writers and Writer.SEG not in self.writers:
            raise ValueError("OutputProfile.writers: the SR references the SEG, write both")

    def writes(self, writer: Writer) -> bool:
        """Whether ``writer``'s object is part of the outputs."""
        return writer in self.writers


GENERIC_PROFILE = OutputProfile(
    seg_title="DICOMNODE SEG",
    sc_title="DICOMNODE SUMMARY",
    sr_title="DICOMNODE REPORT",
    saliency_title="SALIENCY",
    segments=(),
)
"""Titles of a result written without its pipeline's profile (every writer runs)."""

LabelledRegions = tuple[NDArray[np.int32], int]
"""Candidate lesions on ``series.volume``'s grid: labels 1..count (0 is background),
largest first, and the count, as ``pipelines.measure.connected_regions`` returns them."""


class Segmenter(Protocol):
    """A named lesion segmenter: any risk model can take its lesion from one.

    ``name`` is the segmenter's registry name (``hyperdense_regions``,
    ``hyperdense_unet``, ``blast_ct``), ``segment_class`` the coded class of the regions it
    finds, ``algorithm`` its identity (named in the risk model's outputs as the source of
    the scored region).
    """

    name: str

    @property
    def algorithm(self) -> Algorithm:
        """The identity of the method behind the regions."""
        ...

    @property
    def segment_class(self) -> SegmentClass:
        """The coded class of the regions (SEG segment of the scored lesion)."""
        ...

    def check(self) -> None:
        """Verify the segmenter's artefacts; ``PipelineUnavailable`` when they fail."""
        ...

    def segment(self, series: LoadedSeries) -> LabelledRegions:
        """Labelled candidate lesions of ``series`` on its volume grid, largest first."""
        ...


class StudyPipeline(Protocol):
    """A study-level pipeline: it reads several series of one study, each in a role
    (e.g. ``dwi``, ``adc``, ``flair``, ``t1``), chosen by the routing rule's role matchers
    (``dicomnode.studies``). ``required_roles`` must be present, ``optional_roles`` are
    used when present. The result is on the series of ``reference_role``: the outputs
    (SEG, SC, SR, saliency SCs) are written on its frames, once for the study.
    """

    name: str
    required_roles: tuple[str, ...]
    optional_roles: tuple[str, ...]
    reference_role: str

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        ...

    @property
    def profile(self) -> OutputProfile:
        """Titles, segment classes and writers of the pipeline's outputs."""
        ...

    def check(self) -> None:
        """Verify the pipeline's artefacts; ``PipelineUnavailable`` when they fail."""
        ...

    def run_study(self, series_by_role: Mapping[str, LoadedSeries]) -> PipelineResult:
        """Process the study's series by role; the result is on the reference role's."""
        ...


def is_study_pipeline(pipeline: object) -> bool:
    """Whether ``pipeline`` is study-level (has ``run_study``)."""
    return callable(getattr(pipeline, "run_study", None))
