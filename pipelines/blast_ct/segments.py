"""The four BLAST-CT v1 lesion classes as coded SEG segments (SNOMED CT).

pydicom's ``codes.SCT`` holds ``IntracranialHemorrhage`` but not the specific
intracranial findings, so those are written out here with their SNOMED CT concept ids.
Extra-axial haemorrhage (subdural or extradural) has no single pre-coordinated concept:
it is coded as its parent, intracranial hemorrhage, and named in the label.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from pipelines.base import SegmentClass

CEREBRAL_HEMORRHAGE = CodedConcept("274100004", "SCT", "Cerebral hemorrhage")
CEREBRAL_EDEMA = CodedConcept("2032001", "SCT", "Cerebral edema")
INTRAVENTRICULAR_HEMORRHAGE = CodedConcept("274110009", "SCT", "Intraventricular hemorrhage")

_CATEGORY = CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)

IPH_SEGMENT = SegmentClass("IPH intraparenchymal haemorrhage", _CATEGORY, CEREBRAL_HEMORRHAGE)
EAH_SEGMENT = SegmentClass(
    "EAH extra-axial haemorrhage (subdural or extradural)",
    _CATEGORY,
    CodedConcept.from_code(codes.SCT.IntracranialHemorrhage),
)
OEDEMA_SEGMENT = SegmentClass("Perilesional oedema", _CATEGORY, CEREBRAL_EDEMA)
IVH_SEGMENT = SegmentClass(
    "IVH intraventricular haemorrhage", _CATEGORY, INTRAVENTRICULAR_HEMORRHAGE
)

CLASS_SEGMENTS: tuple[SegmentClass, ...] = (IPH_SEGMENT, EAH_SEGMENT, OEDEMA_SEGMENT, IVH_SEGMENT)
"""Segments of network classes 1..4 (class 0 is background)."""

HAEMORRHAGE_CLASSES: tuple[int, ...] = (1, 2, 4)
"""Network classes that are haemorrhage (IPH, EAH, IVH); class 3 is oedema."""

HAEMORRHAGE_SEGMENT = SegmentClass(
    "Haemorrhage (BLAST-CT IPH, EAH or IVH)",
    _CATEGORY,
    CodedConcept.from_code(codes.SCT.IntracranialHemorrhage),
)
"""The haemorrhage classes together, as the lesion a risk model scores."""
