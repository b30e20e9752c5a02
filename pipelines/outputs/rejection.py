"""IOCM rejection notes: retract superseded results with a Key Object Selection Document.

When a series changes after it was processed, its new results carry new UIDs and the
previous ones are retracted (IHE IOCM, PS3.3 A.35.4 Key Object Selection Document IOD)
by a KOS titled (113001, DCM, "Rejected for Quality Reasons") that references every
superseded instance with its series and study. Built by highdicom (``hd.ko``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.outputs.common import EVIDENCE_PATIENT_STUDY, MANUFACTURER, patient_study_source
from pipelines.outputs.uids import derive_uid

REJECTED_FOR_QUALITY_REASONS = CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
REJECTION_SERIES_NUMBER = 907  # pipeline outputs use 901..904, failure notices 905..906
REJECTION_VERSION = "1"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # SR and KOS storage classes: no pixels


@dataclass(frozen=True)
class RejectedInstance:
    """One superseded object, as the node recorded it when it was sent."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def reference_dataset(patient_study: Dataset, rejected: RejectedInstance) -> Dataset:
    """A header-only dataset of ``rejected`` in ``patient_study``'s patient and study.

    Image objects (SEG, SC) are given Rows and Columns so the note references them as
    IMAGE content items; SR objects become COMPOSITE items.
    """
    ds = Dataset()
    for keyword in EVIDENCE_PATIENT_STUDY:
        if keyword in patient_study:
            setattr(ds, keyword, patient_study[keyword].value)
    ds.SOPClassUID = rejected.sop_class_uid
    ds.SOPInstanceUID = rejected.sop_instance_uid
    ds.SeriesInstanceUID = rejected.series_instance_uid
    ds.StudyInstanceUID = rejected.study_instance_uid
    if not rejected.sop_class_uid.startswith(SR_CLASS_PREFIX):
        ds.Rows = 1
        ds.Columns = 1
    return ds


def rejection_uids(source_series_uid: str, superseding_key: str) -> tuple[str, str]:
    """(series, instance) UIDs of the note that a given superseding run writes.

    ``superseding_key`` names that run (e.g. its job and the destinations the note goes
    to), so a run repeated after a crash writes the same note again.
    """
    seed = (source_series_uid, "rejection-note", superseding_key)
    return derive_uid(*seed, "series"), derive_uid(*seed, "instance")


def build_rejection_note(
    patient_study: Dataset,
    rejected: Sequence[RejectedInstance],
    source_series_uid: str,
    superseding_key: str,
    description: str,
    content_datetime: datetime.datetime | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS "Rejected for Quality Reasons" referencing every instance of ``rejected``.

    ``patient_study`` (a superseded object or a source instance) gives the patient and
    study; every rejected instance must belong to that study (a KOS references one).
    """
    if not rejected:
        raise ValueError("a rejection note must reference at least one instance")
    studies = {item.study_instance_uid for item in rejected}
    if studies != {str(patient_study.StudyInstanceUID)}:
        raise ValueError(
            f"rejected instances span {len(studies)} studies; a rejection note covers the "
            "study of its patient/study source only"
        )
    source = patient_study_source(patient_study)
    evidence = [reference_dataset(source, item) for item in rejected]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=evidence,
        description=description[:1024],
    )
    series_uid, sop_uid = rejection_uids(source_series_uid, superseding_key)
    when = content_datetime or datetime.datetime.now()
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="REJECTED FOR QUALITY REASONS",
        manufacturer_model_name="dicomnode rejection note",
        software_versions=REJECTION_VERSION,
        content_date=when.date(),
        content_time=when.time().replace(microsecond=0),
    )
    if "StudyDescription" in source:
        note.StudyDescription = source.StudyDescription
    return note
