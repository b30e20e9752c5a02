"""Per-case features of the HT-after-thrombectomy model: lesion, radiomics, CNN input,
clinical variables, and the clinical table they come from.

The same functions run at training and at inference, so a case is described the same
way by both:

- lesion: the threshold baseline's (``HyperdenseThresholdPipeline.segment``) largest
  connected hyperdense region that crosses an acquired frame, the hyperattenuated
  imaging marker (HIM) of the study; a series without one raises ``PipelineError``;
- radiomics: ``pipelines.radiomics.extract_series`` on that region (the study's
  parameter file, ~1781 features);
- CNN input: ``pipelines.cnn.prepare_case``, the 2.5-D crop (frames n-2, n, n+2) on the
  region's largest cross-section;
- clinical: age and sex from the DICOM header (the table's ``age``/``sex_male`` when the
  header lacks them) and :data:`TABLE_VARIABLES` from a clinical table (CSV or JSON)
  found by AccessionNumber, else by PatientID + StudyDate.

Missing-value policy (:class:`ImputationPolicy`): a clinical variable that is missing
(no table row, an empty cell, ``NA``) takes the value fitted on the training cases only,
the median for a numeric variable and the mode (ties: 0) for a 0/1 variable. The values
are stored in the model's manifest, and every imputed variable is named in the
prediction (``RiskPrediction.imputed``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.base import PipelineError
from pipelines.cnn import CaseInput, InputConfig, prepare_case
from pipelines.cnn.networks import LITE0_MEAN, LITE0_STD
from pipelines.geometry import grid_to_frames
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.radiomics import RadiomicsError, extract_series
from pipelines.series import LoadedSeries

HEADER_VARIABLES: tuple[str, ...] = ("age", "sex_male")
"""Clinical variables read from the DICOM header (PatientAge, PatientSex)."""

TABLE_VARIABLES: tuple[str, ...] = (
    "hypertension",
    "diabetes",
    "atrial_fibrillation",
    "coronary_artery_disease",
    "hyperlipidaemia",
    "smoking",
    "drinking",
    "nihss",
    "aspects",
    "thrombolysis",
    "anterior_circulation",
    "glucose_mmol_l",
    "onset_to_recanalisation_min",
    "pass_number",
    "mtici_2b_or_better",
    "aspiration_catheter",
    "stent_implantation",
)
"""Clinical variables read from the clinical table (the HT study's list, as the cohort
generator names them; HUmax >= 90 and subarachnoid HIM are image findings, left out)."""

CLINICAL_VARIABLES: tuple[str, ...] = HEADER_VARIABLES + TABLE_VARIABLES

KEY_ACCESSION = "AccessionNumber"
KEY_PATIENT = "PatientID"
KEY_DATE = "StudyDate"
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "missing", "unknown"})
_TRUE = frozenset({"1", "yes", "y", "true", "t", "m", "male"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "female"})

PARAMS_DIR = Path(__file__).parent / "params"
BUNDLED_PARAMS: dict[str, Path] = {
    "ht_after_mt_original": PARAMS_DIR / "ht_after_mt_original.yaml",
}
"""This package's radiomics parameter files by name (beside ``pipelines.radiomics``')."""

CNN_INPUT = InputConfig(size=128, margin_mm=10.0, min_side_mm=40.0, mean=LITE0_MEAN, std=LITE0_STD)
"""2.5-D input (frames n-2, n, n+2 as channels), 128 px, brain window, Lite0 normalisation."""


class ClinicalTableError(ValueError):
    """A clinical table that cannot be read, or one with ambiguous keys."""


# --- clinical table ------------------------------------------------------------------


def clinical_value(raw: object, name: str = "value") -> float | None:
    """A table cell as a number; None when missing. ``yes``/``no``, ``M``/``F`` are 1/0."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, int | float):
        return None if math.isnan(float(raw)) else float(raw)
    text = str(raw).strip().lower()
    if text in MISSING_TOKENS:
        return None
    if text in _TRUE and not text.isdigit():
        return 1.0
    if text in _FALSE and not text.isdigit():
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ClinicalTableError(f"{name}: {raw!r} is neither a number nor yes/no") from None
    return None if math.isnan(value) else value


def _key(value: object) -> str:
    """A key cell, stripped; DICOM dates without separators (2024-08-01 -> 20240801)."""
    return str(value).strip() if value is not None else ""


def _date_key(value: object) -> str:
    return _key(value).replace("-", "").replace(".", "").replace("/", "")


class ClinicalTable:
    """Rows of clinical variables, found by AccessionNumber or PatientID + StudyDate."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], source: str = "clinical table") -> None:
        """Index ``rows`` (dicts of column -> cell); duplicate keys are refused."""
        self.source = source
        self.rows = [dict(row) for row in rows]
        self._by_accession: dict[str, dict[str, Any]] = {}
        self._by_patient_date: dict[tuple[str, str], dict[str, Any]] = {}
        for number, row in enumerate(self.rows, start=1):
            accession = _key(row.get(KEY_ACCESSION))
            if accession:
                if accession in self._by_accession:
                    raise ClinicalTableError(
                        f"{source}: AccessionNumber {accession!r} appears twice (row {number})"
                    )
                self._by_accession[accession] = row
            patient, date = _key(row.get(KEY_PATIENT)), _date_key(row.get(KEY_DATE))
            if patient and date:
                if (patient, date) in self._by_patient_date:
                    raise ClinicalTableError(
                        f"{source}: PatientID + StudyDate {patient} {date} appears twice "
                        f"(row {number})"
                    )
                self._by_patient_date[(patient, date)] = row
        if self.rows and not self._by_accession and not self._by_patient_date:
            raise ClinicalTableError(
                f"{source}: no row has an {KEY_ACCESSION} or a {KEY_PATIENT} + {KEY_DATE} key"
            )

    @classmethod
    def read(cls, path: Path) -> ClinicalTable:
        """A ``.csv`` (header row) or ``.json`` (a list of objects, or ``{"rows": [...]}``)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ClinicalTableError(f"{path}: cannot read the clinical table ({exc})") from exc
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ClinicalTableError(f"{path}: not JSON ({exc})") from exc
            rows = data.get("rows") if isinstance(data, dict) else data
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ClinicalTableError(f"{path}: expected a list of objects or {{'rows': [...]}}")
            return cls(rows, str(path))
        return cls(list(csv.DictReader(text.splitlines())), str(path))

    def lookup(
        self, accession: str | None, patient_id: str | None, study_date: str | None
    ) -> dict[str, Any] | None:
        """The row of this study: by AccessionNumber first, else PatientID + StudyDate."""
        if accession and _key(accession) in self._by_accession:
            return self._by_accession[_key(accession)]
        key = (_key(patient_id), _date_key(study_date))
        return self._by_patient_date.get(key) if all(key) else None

    def lookup_dataset(self, ds: Dataset) -> dict[str, Any] | None:
        """The row of the study ``ds`` belongs to (its AccessionNumber, PatientID, StudyDate)."""
        return self.lookup(
            str(ds.get("AccessionNumber", "") or ""),
            str(ds.get("PatientID", "") or ""),
            str(ds.get("StudyDate", "") or ""),
        )


def header_age(ds: Dataset) -> float | None:
    """PatientAge (``nnnY``, ``nnnM``, ``nnnW``, ``nnnD``) in years; None when absent."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}.get(text[-1])
    return None if per_year is None else float(text[:-1]) / per_year


def header_sex_male(ds: Dataset) -> float | None:
    """1 for PatientSex M, 0 for F; None for O, empty or absent."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {"M": 1.0, "F": 0.0}.get(sex)


def clinical_values(ds: Dataset, row: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Every clinical variable of a case (None when missing): header first for age/sex."""
    row = row or {}
    values = {name: clinical_value(row.get(name), name) for name in CLINICAL_VARIABLES}
    for name, from_header in (("age", header_age(ds)), ("sex_male", header_sex_male(ds))):
        if from_header is not None:
            values[name] = from_header
    return values


@dataclass(frozen=True)
class ImputationPolicy:
    """Fill values for missing clinical variables, fitted on the training cases only."""

    values: Mapping[str, float]
    rules: Mapping[str, str]  # "median" or "mode"

    @classmethod
    def fit(cls, rows: Iterable[Mapping[str, float | None]]) -> ImputationPolicy:
        """Median of each numeric variable, mode (ties: 0) of each 0/1 one."""
        rows = list(rows)
        values: dict[str, float] = {}
        rules: dict[str, str] = {}
        for name in CLINICAL_VARIABLES:
            seen = np.array([r[name] for r in rows if r.get(name) is not None], dtype=float)
            if seen.size == 0:
                raise ValueError(f"clinical variable {name!r} has no value in any training case")
            if set(np.unique(seen)) <= {0.0, 1.0}:
                values[name] = 1.0 if (seen == 1.0).sum() > (seen == 0.0).sum() else 0.0
                rules[name] = "mode"
            else:
                values[name] = float(np.median(seen))
                rules[name] = "median"
        return cls(values, rules)

    def apply(self, values: Mapping[str, float | None]) -> tuple[list[float], list[str]]:
        """The variables in :data:`CLINICAL_VARIABLES` order, and the names imputed."""
        out, imputed = [], []
        for name in CLINICAL_VARIABLES:
            value = values.get(name)
            if value is None:
                imputed.append(name)
                value = self.values[name]
            out.append(float(value))
        return out, imputed

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready, for the manifest: ``{name: {"value": v, "rule": r}}``."""
        return {n: {"value": self.values[n], "rule": self.rules[n]} for n in CLINICAL_VARIABLES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> ImputationPolicy:
        """The policy of :meth:`to_dict`; every clinical variable must be present."""
        missing = [n for n in CLINICAL_VARIABLES if n not in data]
        if missing:
            raise ValueError(f"the imputation policy lacks {', '.join(missing)}")
        return cls(
            {n: float(data[n]["value"]) for n in CLINICAL_VARIABLES},
            {n: str(data[n]["rule"]) for n in CLINICAL_VARIABLES},
        )


# --- image features ------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """The region the model describes, on the volume grid and on the acquired frames."""

    grid_mask: NDArray[np.bool_]  # on series.volume's grid
    frame_mask: NDArray[np.bool_]  # on series.frames
    volume_ml: float  # on the grid
    regions_found: int  # hyperdense regions the baseline found in all


def find_lesion(
    series: LoadedSeries,
    segmenter: HyperdenseThresholdPipeline,
    labels: tuple[NDArray[np.int32], int] | None = None,
) -> Lesion:
    """The largest hyperdense region that an acquired frame crosses.

    ``labels`` is ``segmenter.segment(series)`` when the caller has it already. Raises
    ``PipelineError`` when the baseline finds no such region (no HIM: nothing to score).
    """
    grid_labels, count = labels if labels is not None else segmenter.segment(series)
    for label in range(1, count + 1):  # largest first
        grid_mask = grid_labels == label
        frame_mask = grid_to_frames(series, grid_mask)
        if frame_mask.any():
            volume = float(grid_mask.sum()) * series.volume.voxel_volume_ml
            return Lesion(grid_mask, frame_mask, volume, count)
    raise PipelineError(
        "no hyperdense lesion found on the acquired frames (threshold baseline, "
        f"{segmenter.parameters.low_hu:g}-{segmenter.parameters.high_hu:g} HU): the "
        "HT-after-thrombectomy model needs a hyperattenuated area to score"
    )


def resolve_params(params: str | Path) -> str | Path:
    """A name of :data:`BUNDLED_PARAMS` as its path; anything else as given."""
    return BUNDLED_PARAMS.get(params, params) if isinstance(params, str) else params


def radiomics_features(
    series: LoadedSeries, lesion: Lesion, params: str | Path
) -> dict[str, float]:
    """pyradiomics features of the lesion; ``PipelineError`` when it cannot be measured.

    ``params``: a name of :data:`BUNDLED_PARAMS` or of ``pipelines.radiomics``' study
    files, or a YAML path.
    """
    try:
        return extract_series(series, lesion.grid_mask, resolve_params(params))
    except RadiomicsError as exc:
        raise PipelineError(f"radiomics of the hyperdense lesion failed: {exc}") from exc


@dataclass(frozen=True)
class CaseFeatures:
    """Everything the model reads from one case, before imputation and PCA."""

    lesion: Lesion
    radiomics: Mapping[str, float]
    cnn_input: CaseInput
    clinical: Mapping[str, float | None]


def case_features(
    series: LoadedSeries,
    row: Mapping[str, Any] | None,
    segmenter: HyperdenseThresholdPipeline,
    radiomics_params: str | Path,
    cnn_config: InputConfig = CNN_INPUT,
    labels: tuple[NDArray[np.int32], int] | None = None,
) -> CaseFeatures:
    """Lesion, radiomics, CNN input and clinical values of one case (``row``: its table row)."""
    lesion = find_lesion(series, segmenter, labels)
    return CaseFeatures(
        lesion=lesion,
        radiomics=radiomics_features(series, lesion, radiomics_params),
        cnn_input=prepare_case(series, lesion.frame_mask, cnn_config),
        clinical=clinical_values(series.reference, row),
    )


def input_config_to_dict(config: InputConfig) -> dict[str, Any]:
    """JSON-ready CNN input settings (for the manifest)."""
    return {
        "window": list(config.window),
        "size": config.size,
        "margin_mm": config.margin_mm,
        "min_side_mm": config.min_side_mm,
        "channel_offsets": list(config.channel_offsets),
        "sample_offsets": list(config.sample_offsets),
        "mean": list(config.mean),
        "std": list(config.std),
    }


def input_config_from_dict(data: Mapping[str, Any]) -> InputConfig:
    """The :class:`InputConfig` of :func:`input_config_to_dict`."""
    return InputConfig(
        window=(float(data["window"][0]), float(data["window"][1])),
        size=int(data["size"]),
        margin_mm=float(data["margin_mm"]),
        min_side_mm=float(data["min_side_mm"]),
        channel_offsets=tuple(int(v) for v in data["channel_offsets"]),  # type: ignore[arg-type]
        sample_offsets=tuple(int(v) for v in data["sample_offsets"]),
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
    )
