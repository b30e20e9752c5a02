"""Generated baseline/follow-up head CT pairs with known truth, to measure how well
:mod:`pipelines.followup.derive` labels them.

Each pair is one synthetic head (``pipelines.synthetic``) scanned twice: the follow-up
is the same anatomy with the patient moved (a rigid shift of up to
:data:`MAX_SHIFT_MM` per axis, as a repositioned head), new UIDs and accession number,
acquired :data:`HOURS` after the baseline (acquired at :data:`BASELINE_TIME`). A sphere
is painted at baseline (haemorrhage 70 HU, or contrast stain 120 HU) and, at follow-up,
at the same anatomical place:

- ``ht``: persisting haemorrhage, radius x 0.97-1.03 (HT, no expansion);
- ``contrast``: nothing (the stain cleared);
- ``expansion``: haemorrhage grown, radius x 1.25-1.45 (volume x 1.95-3.0);

The truth volumes are the painted ones; the truth ABC/2 is measured on the painted
masks; the truth labels apply the same rules (``derive.expansion``) to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.followup.derive import abc2_ml, expansion
from pipelines.lesions import insert_lesion
from pipelines.synthetic import synthetic_head_ct

PairKind = Literal["ht", "contrast", "expansion"]
KINDS: tuple[PairKind, ...] = ("ht", "contrast", "expansion")
MAX_SHIFT_MM = 4.0
HOURS = (20.0, 30.0)
HAEMORRHAGE_HU = 70.0
STAIN_HU = 120.0
RADIUS_MM = (6.0, 9.0)
BASELINE_TIME = datetime(2026, 3, 1, 9, 0, 0)


@dataclass(frozen=True)
class PairTruth:
    """What the pair truly shows."""

    kind: PairKind
    ht_persists: bool
    contrast_cleared: bool
    expansion_planimetric: bool
    expansion_abc2: bool
    baseline_ml: float
    followup_ml: float
    shift_mm: tuple[float, float, float]


@dataclass(frozen=True)
class GeneratedPair:
    """A baseline and follow-up series (datasets) and the truth."""

    baseline: list[Dataset]
    followup: list[Dataset]
    hours: float
    truth: PairTruth


def _stamp_time(datasets: list[Dataset], when: datetime) -> None:
    """Study, series, acquisition and content date/time ``when``."""
    for ds in datasets:
        for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, key, when.strftime("%Y%m%d"))
        for key in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
            setattr(ds, key, when.strftime("%H%M%S"))


def _restamp(datasets: list[Dataset], seed: int, when: datetime) -> None:
    """New study/series/instance UIDs, accession number and date/time for a second scan."""
    study = generate_uid(entropy_srcs=[str(seed), "followup-study"])
    series = generate_uid(entropy_srcs=[str(seed), "followup-series"])
    for index, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), "followup", str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "AccessionNumber" in ds:
            ds.AccessionNumber = f"{ds.AccessionNumber}F"[:16]
    _stamp_time(datasets, when)


def generate_pair(
    seed: int, kind: PairKind, rows: int = 96, n_slices: int = 16, baseline_hu: float | None = None
) -> GeneratedPair:
    """One pair of ``kind`` (see the module); the same seed gives the same pair.
    ``baseline_hu`` overrides the baseline sphere's density (default: by kind), so that
    pairs of different kinds can share one baseline image: a hyperdensity that is blood
    in one patient and contrast in another looks the same on the day."""
    rng = np.random.default_rng([seed, 7])
    thickness = 5.0
    baseline = synthetic_head_ct(seed, n_slices=n_slices, rows=rows, slice_thickness_mm=thickness)
    followup = synthetic_head_ct(seed, n_slices=n_slices, rows=rows, slice_thickness_mm=thickness)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    for ds in followup:
        ds.ImagePositionPatient = [
            round(float(v), 4) for v in np.add(ds.ImagePositionPatient, shift)
        ]
    hours = float(rng.uniform(*HOURS))
    _stamp_time(baseline, BASELINE_TIME)
    _restamp(followup, seed, BASELINE_TIME + timedelta(hours=hours))
    radius = float(rng.uniform(*RADIUS_MM))
    by_kind = STAIN_HU if kind == "contrast" else HAEMORRHAGE_HU
    first = insert_lesion(
        baseline, center_mm=None, radius_mm=radius,
        hu=by_kind if baseline_hu is None else baseline_hu, seed=seed, irregular=False,
    )  # fmt: skip
    spacing = (thickness, float(baseline[0].PixelSpacing[0]), float(baseline[0].PixelSpacing[1]))
    base_abc = abc2_ml(first.masks, spacing)
    if kind == "contrast":
        fu_ml, fu_abc = 0.0, 0.0
    else:
        scale = rng.uniform(1.25, 1.45) if kind == "expansion" else rng.uniform(0.97, 1.03)
        second = insert_lesion(
            followup, center_mm=tuple(np.add(first.center_mm, shift)), radius_mm=radius * scale,
            hu=HAEMORRHAGE_HU, seed=seed + 1, irregular=False,
        )  # fmt: skip
        fu_ml, fu_abc = second.volume_ml, abc2_ml(second.masks, spacing)
    truth = PairTruth(
        kind=kind,
        ht_persists=kind != "contrast",
        contrast_cleared=kind == "contrast",
        expansion_planimetric=expansion(first.volume_ml, fu_ml)[0],
        expansion_abc2=expansion(base_abc, fu_abc)[0],
        baseline_ml=first.volume_ml,
        followup_ml=fu_ml,
        shift_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
    )
    return GeneratedPair(baseline, followup, hours, truth)
