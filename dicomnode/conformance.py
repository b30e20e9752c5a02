"""What the node's DICOM Conformance Statement (``docs/conformance-statement.md``) states
about the objects it creates and sends, as constants a test checks against the code.

The SCP's SOP classes and transfer syntaxes are :data:`dicomnode.receiver.STORAGE_CLASSES`
and :data:`dicomnode.receiver.TRANSFER_SYNTAXES`; the statuses are
:class:`dicomnode.status.Status`. The objects created are listed here with the highdicom
class that builds each; a test parses ``pipelines/outputs`` to keep the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import uid

from dicomnode.receiver import VERIFICATION_SOP_CLASS


@dataclass(frozen=True)
class CreatedObject:
    """One kind of object the node creates and sends as a Storage SCU."""

    sop_class_uid: str
    builder: str  # the highdicom class, as called in pipelines/outputs ("hd.seg.Segmentation")
    template: str  # the SR template or IOD content, as the statement names it


CREATED_OBJECTS: tuple[CreatedObject, ...] = (
    CreatedObject(
        uid.SegmentationStorage, "hd.seg.Segmentation", "binary SEG, one segment per region"
    ),
    CreatedObject(
        uid.SecondaryCaptureImageStorage,
        "hd.sc.SCImage",
        "RGB overlays, saliency maps, failure notice",
    ),
    CreatedObject(
        uid.Comprehensive3DSRStorage, "hd.sr.Comprehensive3DSR", "TID 1500 Measurement Report"
    ),
    CreatedObject(
        uid.ComprehensiveSRStorage,
        "hd.sr.ComprehensiveSR",
        "diagnostic imaging report (LOINC 18748-4): analysis not performed",
    ),
    CreatedObject(
        uid.KeyObjectSelectionDocumentStorage,
        "hd.ko.KeyObjectSelectionDocument",
        "TID 2010 Key Object Selection: (113001, DCM) rejection note",
    ),
)

SCU_SOP_CLASSES: tuple[str, ...] = (
    VERIFICATION_SOP_CLASS,  # the C-ECHO probe of a destination in back-off
    *(created.sop_class_uid for created in CREATED_OBJECTS),
)

# The outbox offers each file's own transfer syntax, then these (dicomnode.sender).
SCU_TRANSFER_SYNTAXES: tuple[str, ...] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
