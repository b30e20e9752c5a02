"""Clinical variables of the expansion models: read from the DICOM header and the
clinical table, screened against plausible ranges, the reason kept when one is missing.

The table is the one ``ht_after_mt`` reads (``pipelines.ht_after_mt.clinical.ClinicalTable``:
CSV or JSON keyed by AccessionNumber, or PatientID + StudyDate) with this study's
columns. It fails open: no table, no row, a malformed row, a cell that is not a number
and an implausible value leave the variable missing (imputed by the model with its
training median) and listed with the reason; a reason never quotes a key cell.

=================== ================ ===============================================
variable            range            source
=================== ================ ===============================================
age                 0-120 years      header PatientAge (else the table's ``age``)
sex_male            0 or 1           header PatientSex M/F (else the table)
hypertension        0 or 1           table
antithrombotic      0 or 1           table (antiplatelet or anticoagulant at onset)
gcs                 3-15, whole      table; ``gcs_group`` 0 (13-15), 1 (9-12), 2 (3-8)
fibrinogen_g_l      0.3-12 g/L       table (mg/dL values such as 300 are rejected)
inr                 0.5-10           table
platelets_10e9_l    1-1500 x10^9/L   table
onset_to_ct_min     0-4320 min       table (symptom onset or last seen well to CT)
=================== ================ ===============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from pipelines.base import ClinicalIssue
from pipelines.ht_after_mt.clinical import (
    ABSENT,
    EMPTY,
    NOT_A_VALUE,
    ClinicalTableError,
    PlausibleRange,
    RowLookup,
    checked_header_age,
    clinical_value,
    header_sex_male,
)

BINARY = PlausibleRange(0.0, 1.0, "(no/yes)", whole=True)
PLAUSIBLE_RANGES: Mapping[str, PlausibleRange] = {
    "age": PlausibleRange(0.0, 120.0, "years"),
    "sex_male": BINARY,
    "hypertension": BINARY,
    "antithrombotic": BINARY,
    "gcs": PlausibleRange(3.0, 15.0, whole=True),
    "fibrinogen_g_l": PlausibleRange(0.3, 12.0, "g/L"),
    "inr": PlausibleRange(0.5, 10.0),
    "platelets_10e9_l": PlausibleRange(1.0, 1500.0, "x10^9/L"),
    "onset_to_ct_min": PlausibleRange(0.0, 4320.0, "min"),
}
"""Each read variable's plausible range (see the module's table)."""

MODEL_VARIABLES: tuple[str, ...] = (
    "age",
    "sex_male",
    "hypertension",
    "antithrombotic",
    "gcs_group",
    "fibrinogen_g_l",
    "inr",
    "platelets_10e9_l",
    "onset_to_ct_min",
)
"""The candidate variables of the forward selection (``gcs`` enters as its group)."""


def gcs_group_of(gcs: float) -> float:
    """GCS 13-15 -> 0, 9-12 -> 1, 3-8 -> 2 (the study's groups)."""
    return 0.0 if gcs >= 13 else 1.0 if gcs >= 9 else 2.0


@dataclass(frozen=True)
class ClinicalValues:
    """Screened values of :data:`MODEL_VARIABLES` (None: missing) and why any is missing."""

    values: Mapping[str, float | None]
    issues: tuple[ClinicalIssue, ...]


def _cell(row: Mapping[str, Any] | None, name: str) -> tuple[float | None, str | None]:
    """A table cell as a plausible value, or None and the reason."""
    if row is None or name not in row:
        return None, ABSENT
    try:
        value = clinical_value(row[name], name)
    except ClinicalTableError:
        return None, NOT_A_VALUE
    if value is None:
        return None, EMPTY
    problem = PLAUSIBLE_RANGES[name].problem(value)
    return (None, problem) if problem else (value, None)


def screen_clinical(ds: Dataset, found: RowLookup | Mapping[str, Any] | None) -> ClinicalValues:
    """The model's clinical variables for the study of ``ds`` and its table row."""
    lookup = found if isinstance(found, RowLookup) else RowLookup.of(found)
    row = lookup.row
    values: dict[str, float | None] = {}
    issues: list[ClinicalIssue] = []
    for name in PLAUSIBLE_RANGES:
        header: float | None = None
        header_problem: str | None = None
        if name == "age":
            header, header_problem = checked_header_age(ds)
        elif name == "sex_male":
            header = header_sex_male(ds)
        if header is not None:
            values[name] = header
            continue
        value, problem = _cell(row, name)
        if row is None:
            problem = lookup.reason or problem
        if value is not None and header_problem:
            issues.append(ClinicalIssue(name, f"{header_problem}; the table's value used", False))
        elif value is None:
            issues.append(ClinicalIssue(name, header_problem or problem or ABSENT))
        values[name] = value
    gcs = values.pop("gcs")
    values["gcs_group"] = None if gcs is None else gcs_group_of(gcs)
    renamed = tuple(
        ClinicalIssue("gcs_group", i.reason, i.imputed) if i.variable == "gcs" else i
        for i in issues
    )
    return ClinicalValues({k: values[k] for k in MODEL_VARIABLES}, renamed)
