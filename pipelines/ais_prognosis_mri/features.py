"""A prepared study's features: radiomics of the infarct ROI on the z-scored DWI, the
2.5-D CNN input (DWI slices n-2, n, n+2 around the largest ROI slice n) and the clinical
variables (NIHSS, ICH) from a clinical table."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pipelines.ais_prognosis_mri.imaging import ROLE_DWI, PreparedStudy
from pipelines.base import PipelineError
from pipelines.cnn import CaseInput, InputConfig, prepare_frames
from pipelines.radiomics.extract import extract
from pipelines.radiomics.params import PARAMS_DIR, RadiomicsError
from pipelines.stages import charged_to

RADIOMICS_PARAMS = PARAMS_DIR / "ais_prognosis_mri.yaml"
CLINICAL_VARIABLES = ("nihss", "ich")
CLINICAL_LABELS = {"nihss": "NIHSS at admission", "ich": "intracranial haemorrhage (ICH)"}
CNN_INPUT = InputConfig(
    window=(-2.0, 6.0),  # z-scored DWI: the brain's mean - 2 SD .. + 6 SD
    size=48,
    margin_mm=10.0,
    min_side_mm=60.0,
    channel_offsets=(-2, 0, 2),
)
PLAUSIBLE = {"nihss": (0.0, 42.0), "ich": (0.0, 1.0)}


@charged_to("features")
def radiomics_features(study: PreparedStudy, workers: int = 1) -> dict[str, float]:
    """pyradiomics features (``ais_prognosis_mri.yaml``) of the whole infarct ROI, with a
    pool of ``workers``."""
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    dwi = study.zscored[ROLE_DWI]
    try:
        return extract(dwi, study.spacing, study.roi, RADIOMICS_PARAMS, workers=workers)
    except RadiomicsError as exc:
        raise PipelineError(f"radiomics of the infarct ROI failed: {exc}") from exc


@charged_to("features")
def cnn_input(study: PreparedStudy, config: InputConfig = CNN_INPUT) -> CaseInput:
    """The 2.5-D sample of the z-scored DWI around the ROI's largest slice."""
    spacing = study.spacing
    return prepare_frames(study.zscored[ROLE_DWI], study.roi, (spacing[1], spacing[2]), config)


@dataclass(frozen=True)
class ClinicalLookup:
    """A study's clinical variables (those found) and why the others are missing."""

    values: Mapping[str, float]
    reasons: Mapping[str, str]  # variable -> why it is not in ``values``


def read_clinical_table(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a CSV clinical table keyed by ``study_instance_uid`` (or ``accession``).

    Columns: ``study_instance_uid`` or ``accession_number``, ``nihss``, ``ich`` (0/1).
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"clinical table {path.name} unreadable: {exc}") from exc
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        for key in ("study_instance_uid", "accession_number"):
            value = (row.get(key) or "").strip()
            if value:
                table[f"{key}:{value}"] = row
    return table


def clinical_lookup(table: Mapping[str, Mapping[str, str]] | None, ds: Dataset) -> ClinicalLookup:
    """NIHSS and ICH of the study of ``ds`` from ``table``; implausible values refused."""
    if table is None:
        return ClinicalLookup({}, dict.fromkeys(CLINICAL_VARIABLES, "no clinical table"))
    row = table.get(f"study_instance_uid:{ds.get('StudyInstanceUID', '')}") or table.get(
        f"accession_number:{ds.get('AccessionNumber', '')}"
    )
    if row is None:
        return ClinicalLookup({}, dict.fromkeys(CLINICAL_VARIABLES, "no row for this study"))
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for name in CLINICAL_VARIABLES:
        text = (row.get(name) or "").strip()
        try:
            value = float(text)
        except ValueError:
            reasons[name] = "no numeric value in the table"
            continue
        low, high = PLAUSIBLE[name]
        if not low <= value <= high or not np.isfinite(value):
            reasons[name] = f"value outside plausible range {low:g}-{high:g}"
            continue
        values[name] = value
    return ClinicalLookup(values, reasons)
