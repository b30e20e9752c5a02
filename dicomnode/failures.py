"""Why a job failed, as a kind: the admin reads the job's reason, the radiologist reads the
sentence of its kind in the "analysis not performed" objects sent to PACS.

``classify_failure`` is a pure function of the exception (and its causes), so the same
failure always gets the same kind and sentence.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from dicomnode.disk import is_disk_full_error
from model_store.registry import ModelStoreError
from pipelines.base import ModelRefused, NotHeadCt, PipelineUnavailable
from pipelines.volume import InconsistentSeries, VolumeLoadError

CLINICAL_TABLE_PREFIX = "clinical table"  # ht_after_mt's reason for an unreadable table


class FailureKind(StrEnum):
    """What kind of failure stopped a job."""

    DISK_FULL = "disk-full"
    MODEL_REFUSED = "model-refused"
    MODEL_UNAVAILABLE = "model-unavailable"
    CLINICAL_TABLE_UNREADABLE = "clinical-table-unreadable"
    NOT_HEAD_CT = "not-head-ct"
    UNLOADABLE_SERIES = "unloadable-series"
    INCONSISTENT_SERIES = "inconsistent-series"
    PIPELINE_ERROR = "pipeline-error"


RADIOLOGIST_SENTENCES: dict[FailureKind, str] = {
    FailureKind.DISK_FULL: (
        "The analysis could not be completed because the analysis server ran out of storage space."
    ),
    FailureKind.MODEL_REFUSED: (
        "The analysis was not run because the files of its model failed their integrity "
        "check on the analysis server."
    ),
    FailureKind.MODEL_UNAVAILABLE: (
        "The analysis was not run because its model is not installed on the analysis server."
    ),
    FailureKind.CLINICAL_TABLE_UNREADABLE: (
        "The analysis was not completed because the clinical data it needs could not be read."
    ),
    FailureKind.NOT_HEAD_CT: (
        "The analysis was not run because the images do not look like a head CT: no "
        "intracranial soft tissue was found."
    ),
    FailureKind.UNLOADABLE_SERIES: (
        "The analysis was not run because the images of this series could not be read as "
        "one CT volume (missing, damaged or undecodable images)."
    ),
    FailureKind.INCONSISTENT_SERIES: (
        "The analysis was not run because the images of this series do not form one "
        "consistent acquisition (several patients, studies, frames of reference or "
        "image geometries)."
    ),
    FailureKind.PIPELINE_ERROR: (
        "The analysis was not completed because the analysis software stopped with an "
        "internal error on this series."
    ),
}


def radiologist_sentence(kind: FailureKind) -> str:
    """The sentence a radiologist reads for a failure of ``kind``."""
    return RADIOLOGIST_SENTENCES[kind]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions that caused it, outermost first (cycles cut)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _kind_of(exc: BaseException) -> FailureKind | None:
    """The kind one exception (not its causes) stands for, if it says."""
    declared = getattr(exc, "kind", None)
    if isinstance(declared, FailureKind):
        return declared
    if is_disk_full_error(exc):
        return FailureKind.DISK_FULL
    if isinstance(exc, (ModelStoreError, ModelRefused)):
        return FailureKind.MODEL_REFUSED
    if isinstance(exc, PipelineUnavailable):
        return FailureKind.MODEL_UNAVAILABLE
    if isinstance(exc, NotHeadCt):
        return FailureKind.NOT_HEAD_CT
    if isinstance(exc, InconsistentSeries):
        return FailureKind.INCONSISTENT_SERIES
    if isinstance(exc, VolumeLoadError):
        return FailureKind.UNLOADABLE_SERIES
    if str(exc).lower().startswith(CLINICAL_TABLE_PREFIX):
        return FailureKind.CLINICAL_TABLE_UNREADABLE
    return None


def classify_failure(exc: BaseException) -> FailureKind:
    """The kind of a job's failure: the first exception in its cause chain that names
    one (a declared ``kind``, disk full, a refused or absent model, not a head CT, an
    inconsistent or unloadable series, an unreadable clinical table), else a pipeline
    error."""
    for item in _chain(exc):
        kind = _kind_of(item)
        if kind is not None:
            return kind
    return FailureKind.PIPELINE_ERROR
