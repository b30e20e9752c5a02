"""Per-case features of the HT-after-thrombectomy model: lesion, radiomics, CNN input,
clinical variables, and the clinical table they come from.

The same functions run at training and at inference, so a case is described the same
way by both:

- lesion: the segmenter's (``pipelines.contract.Segmenter``, by default the threshold
  baseline) largest connected hyperdense region that crosses an acquired frame, the hyperattenuated
  imaging marker (HIM) of the study; a series without one raises ``PipelineError``;
- radiomics: ``pipelines.radiomics.extract_series`` on that region (the study's
  parameter file, ~1781 features);
- CNN input: ``pipelines.cnn.prepare_case``, the 2.5-D crop (frames n-2, n, n+2) on the
  region's largest cross-section, at least 80 mm wide, in a 0-160 HU window, holding the
  lesion only (:data:`CNN_INPUT`);
- clinical: age and sex from the DICOM header (the table's ``age``/``sex_male`` when the
  header lacks them or states an implausible age) and :data:`TABLE_VARIABLES` from a
  clinical table (CSV or JSON) found by AccessionNumber, else by PatientID + StudyDate;
  every value is checked against its plausible range (:mod:`pipelines.ht_after_mt.clinical`,
  which also reads the table).

Missing-value policy (:class:`ImputationPolicy`): a clinical variable that is missing
(no table or no usable row, an empty, unreadable or implausible cell) takes the value
fitted on the training cases only, the median for a numeric variable and the mode (ties:
0) for a 0/1 variable. The values are stored in the model's manifest, and every imputed
variable is named in the prediction with its reason (``RiskPrediction.imputed`` and
``RiskPrediction.clinical_issues``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.base import ClinicalIssue, PipelineError
from pipelines.cnn import CaseInput, InputConfig, prepare_case
from pipelines.cnn.networks import LITE0_MEAN, LITE0_STD
from pipelines.contract import Segmenter
from pipelines.geometry import grid_to_frames
from pipelines.ht_after_mt.clinical import (
    CLINICAL_VARIABLES,
    HEADER_VARIABLES,
    KEY_ACCESSION,
    KEY_DATE,
    KEY_PATIENT,
    MISSING_TOKENS,
    PLAUSIBLE_RANGES,
    TABLE_VARIABLES,
    ClinicalTable,
    ClinicalTableError,
    ClinicalValues,
    PlausibleRange,
    RowLookup,
    clinical_value,
    clinical_values,
    header_age,
    header_sex_male,
    screen_clinical,
)
from pipelines.radiomics import RadiomicsError, extract_series
from pipelines.series import LoadedSeries
from pipelines.stages import charged_to

__all__ = [
    "CLINICAL_VARIABLES",
    "CNN_INPUT",
    "HEADER_VARIABLES",
    "KEY_ACCESSION",
    "KEY_DATE",
    "KEY_PATIENT",
    "MISSING_TOKENS",
    "PLAUSIBLE_RANGES",
    "TABLE_VARIABLES",
    "CaseFeatures",
    "ClinicalTable",
    "ClinicalTableError",
    "ClinicalValues",
    "ImputationPolicy",
    "Lesion",
    "PlausibleRange",
    "RowLookup",
    "case_features",
    "clinical_value",
    "clinical_values",
    "find_lesion",
    "header_age",
    "header_sex_male",
    "input_config_from_dict",
    "input_config_to_dict",
    "radiomics_features",
    "resolve_params",
    "screen_clinical",
]

PARAMS_DIR = Path(__file__).parent / "params"
BUNDLED_PARAMS: dict[str, Path] = {
    "ht_after_mt_original": PARAMS_DIR / "ht_after_mt_original.yaml",
}
"""This package's radiomics parameter files by name (beside ``pipelines.radiomics``')."""

LESION_WINDOW_HU = (0.0, 160.0)
"""The CNN's window: blood (45-95 HU) and contrast staining (90-160 HU) both stay below
white. Model 1.0.0 used the brain window (0-80 HU), which clipped every stain and most
haemorrhage cores to the same white, so the HU level that carries the texture signal
never reached the network (its held-out AUC was 0.49)."""

LESION_CROP_MM = 80.0
"""Smallest side of the CNN's crop: every lesion of the cohort (up to 40 mL, about 42 mm
across, plus the 10 mm margins) fits in it, so nearly every crop has the same physical
size and the network sees the lesion's size. Model 1.0.0's 40 mm floor let the crop
follow the lesion's bounding box, and resizing every crop to 128 px hid the volume."""

LESION_MARGIN_MM = 3.0
"""The CNN sees the lesion only: each channel keeps the pixels within 3 mm of the lesion
on its frame, the rest is black. With the whole crop, the network's Grad-CAM peak lay a
median 7.6 mm from the lesion (2 of 14 peaks within 2 mm, 6 held-out cases) and its own
held-out AUC was 0.60; with the lesion alone, 0.65 (same split and seed)."""

CNN_INPUT = InputConfig(
    window=LESION_WINDOW_HU,
    size=128,
    margin_mm=10.0,
    min_side_mm=LESION_CROP_MM,
    mean=LITE0_MEAN,
    std=LITE0_STD,
    lesion_margin_mm=LESION_MARGIN_MM,
)
"""2.5-D input (frames n-2, n, n+2 as channels), 128 px, lesion window, fixed 80 mm crop,
lesion only (3 mm margin), Lite0 normalisation."""


# --- missing values ----------------------------------------------------------------


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
    segmenter: Segmenter,
    labels: tuple[NDArray[np.integer], int] | None = None,
) -> Lesion:
    """The largest haemorrhage-class hyperdense region that an acquired frame crosses.

    ``labels`` is ``segmenter.segment(series)`` when the caller has it already: the
    haemorrhage-class regions only, so a calcification (choroid plexus, pineal, ...),
    which the baseline labels apart, is never the scored lesion. Raises
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
        "no lesion: no risk computed (no hyperdense lesion found on the acquired frames by "
        f"segmenter {segmenter.name}; calcifications are not scored): the "
        "HT-after-thrombectomy model needs a hyperattenuated area to score"
    )


def resolve_params(params: str | Path) -> str | Path:
    """A name of :data:`BUNDLED_PARAMS` as its path; anything else as given."""
    return BUNDLED_PARAMS.get(params, params) if isinstance(params, str) else params


def radiomics_features(
    series: LoadedSeries, lesion: Lesion, params: str | Path, workers: int = 1
) -> dict[str, float]:
    """pyradiomics features of the lesion; ``PipelineError`` when it cannot be measured.

    ``params``: a name of :data:`BUNDLED_PARAMS` or of ``pipelines.radiomics``' study
    files, or a YAML path; ``workers``: the extraction's pool size.
    """
    try:
        return extract_series(series, lesion.grid_mask, resolve_params(params), workers=workers)
    except RadiomicsError as exc:
        raise PipelineError(f"radiomics of the hyperdense lesion failed: {exc}") from exc


@dataclass(frozen=True)
class CaseFeatures:
    """Everything the model reads from one case, before imputation and PCA."""

    lesion: Lesion
    radiomics: Mapping[str, float]
    cnn_input: CaseInput
    clinical: Mapping[str, float | None]
    clinical_issues: tuple[ClinicalIssue, ...] = ()  # why each missing one is missing


@charged_to("features")
def case_features(
    series: LoadedSeries,
    row: RowLookup | Mapping[str, Any] | None,
    segmenter: Segmenter,
    radiomics_params: str | Path,
    cnn_config: InputConfig = CNN_INPUT,
    labels: tuple[NDArray[np.integer], int] | None = None,
    radiomics_workers: int = 1,
) -> CaseFeatures:
    """Lesion, radiomics, CNN input and clinical values of one case (``row``: its table
    row, or the :class:`RowLookup` saying why there is none); the radiomics with a pool
    of ``radiomics_workers``."""
    lesion = find_lesion(series, segmenter, labels)
    clinical = screen_clinical(series.reference, row)
    return CaseFeatures(
        lesion=lesion,
        radiomics=radiomics_features(series, lesion, radiomics_params, radiomics_workers),
        cnn_input=prepare_case(series, lesion.frame_mask, cnn_config),
        clinical=clinical.values,
        clinical_issues=clinical.issues,
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
        "lesion_margin_mm": config.lesion_margin_mm,
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
        lesion_margin_mm=(
            None if data.get("lesion_margin_mm") is None else float(data["lesion_margin_mm"])
        ),
    )
