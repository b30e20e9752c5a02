"""'Analysis not performed': what PACS receives when a routed series cannot be processed.

Two objects in the source's patient and study, so the radiologist finds them beside the
images: a Comprehensive SR (a diagnostic imaging report, LOINC 18748-4, whose Impression
says that the analysis was not performed, which pipeline, why in plain words, and that no
finding may be inferred) and an RGB Secondary Capture with the same lines burned in, for
PACS and viewers that do not display SR. Both are built by highdicom; the source series'
readable instance headers (no pixel data needed) give patient, study and evidence.

UIDs are derived from the source series, the pipeline name, the result revision and the
object kind, like the pipeline's own outputs (``common.revision_seed``): a failure of the
first run of a series has the same UIDs every time, a later revision gets new ones.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import NOT_FOR_DIAGNOSTIC_USE
from pipelines.outputs.common import (
    EVIDENCE_PATIENT_STUDY,
    MANUFACTURER,
    OutputIdentity,
    patient_study_source,
    plain,
    revision_seed,
    revision_suffix,
)
from pipelines.outputs.sc import NOTICE_COLOUR, TEXT_COLOUR, text_panel
from pipelines.outputs.uids import derive_uid

FAILURE_SERIES_BASE = 900  # the pipeline outputs use 901..904
FAILURE_SR_SERIES = FAILURE_SERIES_BASE + 5
FAILURE_SC_SERIES = FAILURE_SERIES_BASE + 6
FAILURE_NOTICE_VERSION = "1"  # version of this notice's wording and structure
TITLE = "ANALYSIS NOT PERFORMED"
NO_INFERENCE = (
    "No finding may be inferred from this result: the absence of an automated finding "
    "does not mean that there is none. Read the images as usual."
)
DETAIL_MAX_CHARS = 400
SC_WIDTH = 640
SC_TITLE_COLOUR = (255, 210, 80)

DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
FINDING = CodedConcept("121071", "DCM", "Finding")
ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
COMMENT = CodedConcept("121106", "DCM", "Comment")


@dataclass(frozen=True)
class FailureNotice:
    """What a failure object says: the pipeline, the reason in words a radiologist
    understands, and the technical reason an admin can look up (no patient data)."""

    pipeline_name: str
    sentence: str
    detail: str
    revision: int = 1

    def lines(self) -> list[str]:
        """The text every failure object shows, in the DICOM default repertoire."""
        detail = self.detail[:DETAIL_MAX_CHARS]
        return [
            plain(line)
            for line in (
                TITLE,
                f"Pipeline: {self.pipeline_name}",
                self.sentence,
                NO_INFERENCE,
                f"Technical reason: {detail}",
                f"{MANUFACTURER} - {NOT_FOR_DIAGNOSTIC_USE}",
            )
        ]


def attributable_headers(headers: Sequence[Dataset]) -> list[Dataset]:
    """The headers that share the first one's patient, study and series, in order.

    The first readable instance (the first acknowledged) decides where the notice goes;
    instances of another patient or study (an inconsistent series) are left out of its
    evidence, so a notice never mixes patients.
    """
    if not headers:
        return []
    first = headers[0]
    keys = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
    return [ds for ds in headers if all(ds.get(k) == first.get(k) for k in keys)]


def failure_identity(
    source: Dataset,
    notice: FailureNotice,
    kind: str,
    series_number: int,
    content_datetime: datetime.datetime,
) -> OutputIdentity:
    """Identity of failure object ``kind`` ("failure-sr" or "failure-sc")."""
    seed = (
        str(source.SeriesInstanceUID),
        notice.pipeline_name,
        "failure-notice",
        *revision_seed(notice.revision),
    )
    description = f"{TITLE} ({notice.pipeline_name})"
    suffix = revision_suffix(notice.revision)
    return OutputIdentity(
        series_instance_uid=derive_uid(*seed, "series-" + kind),
        sop_instance_uid=derive_uid(*seed, kind),
        series_number=series_number,
        series_description=description[: 64 - len(suffix)] + suffix,
        manufacturer_model_name=notice.pipeline_name[:64],
        software_versions=FAILURE_NOTICE_VERSION,
        content_datetime=content_datetime,
    )


def build_failure_sr(
    headers: Sequence[Dataset], notice: FailureNotice, identity: OutputIdentity
) -> hd.sr.ComprehensiveSR:
    """Comprehensive SR stating that the analysis was not performed and why.

    ``headers`` (from :func:`attributable_headers`, first one decides patient and study)
    are the evidence: the SR lists them as the instances it is about.
    """
    source = patient_study_source(headers[0])
    lines = notice.lines()
    items = [
        hd.sr.TextContentItem(
            name=IMPRESSION,
            value=f"{TITLE}: {lines[2]}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=FINDING,
            value=NO_INFERENCE,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=ALGORITHM_NAME,
            value=notice.pipeline_name,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=COMMENT,
            value=lines[4],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=COMMENT,
            value=lines[5],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    root.ContentSequence = hd.sr.ContentSequence(items)
    evidence = [_evidence_item(source, ds) for ds in headers]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=identity.series_description,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        content_date=identity.content_date,
        content_time=identity.content_time,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if "StudyDescription" in source:
        sr.StudyDescription = source.StudyDescription
    return sr


def _evidence_item(source: Dataset, header: Dataset) -> Dataset:
    """The UIDs of ``header`` with the patient and study of ``source`` (highdicom checks
    that every evidence item belongs to the document's patient and study)."""
    item = Dataset()
    for keyword in EVIDENCE_PATIENT_STUDY:
        if keyword in source:
            setattr(item, keyword, source[keyword].value)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        setattr(item, keyword, header[keyword].value)
    return item


def failure_pixels(notice: FailureNotice) -> np.ndarray:
    """The notice's lines, wrapped, on a black RGB panel ``SC_WIDTH`` pixels wide."""
    lines = notice.lines()
    colours = [SC_TITLE_COLOUR, TEXT_COLOUR, TEXT_COLOUR, NOTICE_COLOUR, TEXT_COLOUR]
    colours.append(NOTICE_COLOUR)
    return text_panel(SC_WIDTH, lines, colours)


def build_failure_sc(
    headers: Sequence[Dataset], notice: FailureNotice, identity: OutputIdentity
) -> hd.sc.SCImage:
    """RGB Secondary Capture with the notice's lines burned in."""
    first = headers[0]
    source = patient_study_source(first)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=failure_pixels(notice),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),  # highdicom requires one; emptied below
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=identity.series_description,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        content_date=identity.content_date,
        content_time=identity.content_time,
    )
    if "StudyDescription" in source:
        sc.StudyDescription = source.StudyDescription
    if first.get("BodyPartExamined"):
        sc.BodyPartExamined = first.BodyPartExamined
    else:
        sc.Laterality = ""  # Type 2C, empty: unknown whether the part is paired
    sc.add_new("PatientOrientation", "CS", None)  # Type 2, empty: a text panel has none
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = plain(f"{TITLE}: {notice.sentence}")[:1024]
    return sc


def build_failure_outputs(
    headers: Sequence[Dataset],
    notice: FailureNotice,
    content_datetime: datetime.datetime | None = None,
) -> list[Dataset]:
    """[SR, SC] saying that ``notice.pipeline_name`` did not analyse the series.

    ``headers`` are the readable instance headers of the series in arrival order; with
    none there is no patient or study to attribute a notice to, and the list is empty.
    """
    kept = attributable_headers(headers)
    if not kept:
        return []
    when = content_datetime or datetime.datetime.now()
    first = kept[0]
    sr_identity = failure_identity(first, notice, "failure-sr", FAILURE_SR_SERIES, when)
    sc_identity = failure_identity(first, notice, "failure-sc", FAILURE_SC_SERIES, when)
    return [
        build_failure_sr(kept, notice, sr_identity),
        build_failure_sc(kept, notice, sc_identity),
    ]


__all__ = [
    "FailureNotice",
    "build_failure_outputs",
    "build_failure_sc",
    "build_failure_sr",
]
