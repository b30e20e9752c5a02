"""A seeded synthetic cohort of admission head CTs of spontaneous ICH, with haematoma
expansion (HE) outcomes.

Generative model (version ``GENERATOR_VERSION``); every number is also written to
``cohort.json``. For each case:

1. Clinical variables (``draw_clinical``), with ranges typical of admission ICH cohorts:
   age ~ N(65, 13) in 25-95; male 60%; hypertension (55%, rising with age);
   antithrombotic medication (15%, rising with age; 40% of those anticoagulated);
   GCS = 15 - round(Gamma(1.2, 2.5)) in 3-15, grouped as ``gcs_group`` 0 (13-15),
   1 (9-12), 2 (3-8); fibrinogen ~ N(3.0, 0.75) g/L in 1.0-6.5; INR = 1 + Gamma(2,
   0.04), + U(0.6, 1.8) when anticoagulated, in 0.8-4.5; platelets ~ N(225, 60) x10^9/L
   in 40-500; onset-to-CT time lognormal about 150 min (sigma 0.6) in 20-1440 min.
2. The clinical score ``c``: the sum of ``CLINICAL_WEIGHTS`` (per standard deviation,
   signs as Lee et al. and the HE literature report: older age, worse GCS group, lower
   fibrinogen, higher INR, lower platelets, earlier CT and antithrombotics raise the
   risk; age, GCS group and fibrinogen carry most) over the z-scored variables, divided
   by its standard deviation (means and SDs from a fixed reference draw).
3. One image latent ``m`` ~ N(0, 1), independent of ``c``: the NCCT expansion markers.
4. The outcome, HE (growth >= 6 mL or >= 33% at follow-up), ``label_he`` ~
   Bernoulli(sigmoid(b0 + bc c + bm m)) with ``OUTCOME`` b0 = -0.9, bc = bm = 1.4
   (prevalence about 32%). The follow-up growth written to the truth is drawn given the
   label: HE: the threshold growth max(6 mL, 33%) times 1 + Exp(0.5); no HE: between
   -10% and 90% of the threshold.
5. The image from ``m`` plus noise (``lesion_plan``): volume = exp(ln 14 + 0.35 m +
   0.35 N(0, 1)) mL in 3-60 (deep 65%, lobar 35%), lobulation 0.18 + 0.06 m + 0.02
   N(0, 1) in 0.06-0.35 (irregular shape), and the markers, each present with
   probability sigmoid(a + k m): swirl sign (a = -0.4, k = 1.6; hypodense swirls of
   rim - 20 HU inside the clot), black hole sign (a = -1.2, k = 1.6; a sharp round
   hypodense area of 28-38 HU, radius 0.35 of the haematoma's), blend sign (a = -0.9,
   k = 1.4; one half of the clot 18 HU lower, sharp margin) and satellite lesions
   (Poisson(exp(-0.9 + 0.9 m)) up to 3, 0.3-1.2 mL, beside the haematoma). Rim 58 HU,
   core 70 HU, heterogeneity 4 HU (``pipelines.lesions`` physics), scanner noise 5 HU.

So the clinical table carries ``c``, the image (markers, shape, volume) carries ``m``,
each with noise; the fusion predicts best. Truth (``ground_truth/<case>.npz`` and
``cases.csv``): haematoma masks, planimetric and ABC/2 volumes, markers, latents,
true probability, growth.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.cohort import identify_slice
from pipelines.ich_expansion.geometry import abc2_volume_ml
from pipelines.lesions import (
    CENTRE_MARGIN_MM,
    Haemorrhage,
    HeadFrames,
    PaintedLesion,
    Site,
    paint_haemorrhage,
    radius_for_volume,
    write_hu,
)
from pipelines.synthetic import synthetic_head_ct, write_series

GENERATOR_VERSION = "1.0.0"
SCANNER_NOISE_HU = 5.0
REFERENCE_SEED, REFERENCE_SIZE = 20240401, 50000
STUDY_DESCRIPTION = "CT HEAD ADMISSION ICH (SYNTHETIC COHORT)"
SERIES_DESCRIPTION = "ICH ADMISSION NCCT 5mm"
LABEL = "label_he"

CLINICAL_WEIGHTS: dict[str, float] = {
    "age": 0.30,
    "gcs_group": 0.45,
    "fibrinogen_g_l": -0.45,
    "inr": 0.20,
    "platelets_10e9_l": -0.10,
    "onset_to_ct_min": -0.20,
    "antithrombotic": 0.15,
    "sex_male": 0.0,
    "hypertension": 0.0,
}
CLINICAL_VARIABLES: tuple[str, ...] = tuple(CLINICAL_WEIGHTS)
OUTCOME = {"intercept": -0.9, "clinical": 1.4, "image": 1.4}
MARKERS = {  # marker -> (a, k): present with probability sigmoid(a + k m)
    "swirl": (-0.4, 1.6),
    "black_hole": (-1.2, 1.6),
    "blend": (-0.9, 1.4),
}
SATELLITE_RATE = (-0.9, 0.9)  # Poisson(exp(a + k m)), at most MAX_SATELLITES
MAX_SATELLITES = 3
HE_ABSOLUTE_ML, HE_RELATIVE = 6.0, 0.33
RIM_HU, CORE_HU, HETEROGENEITY_HU = 58.0, 70.0, 4.0
SWIRL_DROP_HU, BLEND_DROP_HU = 20.0, 18.0
BLACK_HOLE_HU = (28.0, 38.0)
BLACK_HOLE_RADIUS = 0.35  # of the haematoma's radius


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def gcs_group(gcs: NDArray[np.float64]) -> NDArray[np.float64]:
    """GCS 13-15 -> 0 (mild), 9-12 -> 1 (moderate), 3-8 -> 2 (severe)."""
    return np.where(gcs >= 13, 0.0, np.where(gcs >= 9, 1.0, 2.0))


def draw_clinical(rng: np.random.Generator, n: int) -> dict[str, NDArray[np.float64]]:
    """The clinical variables of ``n`` patients (see the module)."""
    age = np.clip(rng.normal(65.0, 13.0, n), 25.0, 95.0).round()
    male = (rng.random(n) < 0.6).astype(float)
    hypertension = (rng.random(n) < np.clip(0.55 + 0.006 * (age - 65.0), 0.2, 0.9)).astype(float)
    antithrombotic = (rng.random(n) < np.clip(0.15 + 0.006 * (age - 65.0), 0.03, 0.5)).astype(float)
    anticoagulated = antithrombotic * (rng.random(n) < 0.4)
    gcs = np.clip(15.0 - np.round(rng.gamma(1.2, 2.5, n)), 3.0, 15.0)
    fibrinogen = np.clip(rng.normal(3.0, 0.75, n), 1.0, 6.5).round(1)
    inr = 1.0 + rng.gamma(2.0, 0.04, n) + anticoagulated * rng.uniform(0.6, 1.8, n)
    platelets = np.clip(rng.normal(225.0, 60.0, n), 40.0, 500.0).round()
    onset = np.clip(np.exp(rng.normal(np.log(150.0), 0.6, n)), 20.0, 1440.0).round()
    return {
        "age": age,
        "sex_male": male,
        "hypertension": hypertension,
        "antithrombotic": antithrombotic,
        "gcs": gcs,
        "gcs_group": gcs_group(gcs),
        "fibrinogen_g_l": fibrinogen,
        "inr": np.clip(inr, 0.8, 4.5).round(2),
        "platelets_10e9_l": platelets,
        "onset_to_ct_min": onset,
    }


@lru_cache(maxsize=1)
def clinical_reference() -> dict[str, dict[str, float]]:
    """Mean and SD of each weighted variable and of the raw score, from a fixed draw."""
    values = draw_clinical(np.random.default_rng(REFERENCE_SEED), REFERENCE_SIZE)
    ref = {k: {"mean": float(values[k].mean()), "sd": float(values[k].std())} for k in values}
    raw = _raw_score(values, ref)
    ref["score"] = {"mean": float(raw.mean()), "sd": float(raw.std())}
    return ref


def _raw_score(
    values: dict[str, NDArray[np.float64]], ref: dict[str, dict[str, float]]
) -> NDArray[np.float64]:
    total = np.zeros(len(values["age"]))
    for name, weight in CLINICAL_WEIGHTS.items():
        if weight:
            total += weight * (values[name] - ref[name]["mean"]) / ref[name]["sd"]
    return total


def clinical_score(values: dict[str, NDArray[np.float64]]) -> NDArray[np.float64]:
    """The standardised clinical score ``c`` of step 2."""
    ref = clinical_reference()
    return (_raw_score(values, ref) - ref["score"]["mean"]) / ref["score"]["sd"]


@dataclass(frozen=True)
class ExpansionVariables:
    """Everything drawn for ``n`` cases except the images."""

    clinical: dict[str, NDArray[np.float64]]
    clinical_score: NDArray[np.float64]
    image: NDArray[np.float64]  # the marker latent m
    probability: NDArray[np.float64]
    label: NDArray[np.int_]
    noise: NDArray[np.float64]  # (n, 8) N(0, 1) draws for the lesion parameters
    markers: dict[str, NDArray[np.bool_]]
    satellites: NDArray[np.int_]
    growth_fraction: NDArray[np.float64]  # follow-up growth over the threshold growth


def draw_variables(n: int, seed: int) -> ExpansionVariables:
    """Draw clinical variables, latents, outcomes and markers of ``n`` cases."""
    rng = np.random.default_rng([seed, 0])
    clinical = draw_clinical(rng, n)
    score = clinical_score(clinical)
    image = rng.normal(size=n)
    eta = OUTCOME["intercept"] + OUTCOME["clinical"] * score + OUTCOME["image"] * image
    probability = _sigmoid(eta)
    label = (rng.random(n) < probability).astype(int)
    markers = {name: rng.random(n) < _sigmoid(a + k * image) for name, (a, k) in MARKERS.items()}
    a, k = SATELLITE_RATE
    satellites = np.minimum(rng.poisson(np.exp(a + k * image)), MAX_SATELLITES)
    growth = np.where(label == 1, 1.0 + rng.exponential(0.5, n), rng.uniform(-0.1, 0.9, n))
    noise = rng.normal(size=(n, 8))
    return ExpansionVariables(
        clinical, score, image, probability, label, noise, markers, satellites, growth
    )


def lesion_plan(v: ExpansionVariables, i: int) -> Haemorrhage:
    """Case ``i``'s main haematoma physics from its latent (step 5)."""
    m, e = float(v.image[i]), v.noise[i]
    volume = float(np.clip(np.exp(np.log(14.0) + 0.35 * m + 0.35 * e[0]), 3.0, 60.0))
    lobes = float(np.clip(0.18 + 0.06 * m + 0.02 * e[1], 0.06, 0.35))
    site = Site.DEEP if e[2] < 0.385 else Site.LOBAR  # Phi(0.385) = 0.65
    push = float(min(0.06 + 0.004 * volume, 0.25))
    return Haemorrhage(volume, RIM_HU, CORE_HU, HETEROGENEITY_HU, lobes, site, mass_effect=push)


def _ball(
    frames: HeadFrames, centre: NDArray[np.float64], radius: float
) -> list[tuple[int, slice, slice, NDArray[np.bool_], NDArray[np.float64]]]:
    """Per frame: the window, the pixels within ``radius`` of ``centre``, their offsets."""
    found = []
    for k, rows, cols, offset in frames.windows(centre, radius):
        found.append((k, rows, cols, np.linalg.norm(offset, axis=-1) <= radius, offset))
    return found


def paint_markers(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    bleed: PaintedLesion,
    markers: dict[str, bool],
    rng: np.random.Generator,
) -> None:
    """Paint the swirl, black hole and blend signs inside ``bleed`` (in place)."""
    centre = np.asarray(bleed.center_mm)
    radius = float(bleed.parameters["radius_mm"])
    mask = bleed.masks
    if markers.get("blend"):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for k, rows, cols, _, offset in _ball(frames, centre, 2.0 * radius):
            half = (offset @ direction > 0) & mask[k, rows, cols]
            hu[k, rows, cols][half] -= BLEND_DROP_HU
    if markers.get("swirl"):
        field = ndimage.gaussian_filter(rng.normal(size=hu.shape), (0.6, 1.6, 1.6))
        field /= max(float(field.std()), 1e-9)
        for k, rows, cols, inside, _ in _ball(frames, centre, 0.8 * radius):
            swirl = inside & mask[k, rows, cols] & (field[k, rows, cols] > 0.6)
            hu[k, rows, cols][swirl] = RIM_HU - SWIRL_DROP_HU + rng.normal(0.0, 3.0, swirl.sum())
    if markers.get("black_hole"):
        shift = rng.normal(size=3)
        shift *= 0.3 * radius / max(float(np.linalg.norm(shift)), 1e-9)
        level = float(rng.uniform(*BLACK_HOLE_HU))
        for k, rows, cols, inside, _ in _ball(frames, centre + shift, BLACK_HOLE_RADIUS * radius):
            hole = inside & mask[k, rows, cols]
            hu[k, rows, cols][hole] = level + rng.normal(0.0, 2.0, hole.sum())


def paint_case(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    v: ExpansionVariables,
    i: int,
    rng: np.random.Generator,
) -> list[PaintedLesion]:
    """Paint case ``i``'s haematoma, its markers and satellites into ``hu``, in place."""
    physics = lesion_plan(v, i)
    reach = 1.3 * radius_for_volume(physics.volume_ml)
    centre = frames.choose_centre(physics.site, reach + CENTRE_MARGIN_MM, rng)
    main = paint_haemorrhage(hu, frames, physics, centre, rng)
    paint_markers(hu, frames, main, {k: bool(x[i]) for k, x in v.markers.items()}, rng)
    painted = [main]
    radius = float(main.parameters["radius_mm"])
    for _ in range(int(v.satellites[i])):
        volume = float(rng.uniform(0.3, 1.2))
        direction = frames.brain_centre_mm - centre + rng.normal(0.0, 30.0, 3)
        direction /= max(float(np.linalg.norm(direction)), 1e-9)
        where = centre + direction * (1.25 * radius + radius_for_volume(volume) + 2.0)
        small = Haemorrhage(volume, RIM_HU + 4.0, CORE_HU, 2.0, 0.1, physics.site, 1.5, 0.0)
        painted.append(paint_haemorrhage(hu, frames, small, where, rng))
    return painted


@dataclass(frozen=True)
class ExpansionCase:
    """One written case."""

    case_id: str
    accession_number: str
    patient_id: str
    study_date: str
    folder: Path
    clinical: dict[str, float]
    label_he: int
    volume_ml: float  # planimetric, haematoma and satellites
    abc2_ml: float  # ABC/2 of the main haematoma
    markers: dict[str, bool]
    satellites: int


@dataclass(frozen=True)
class ExpansionCohort:
    """A written cohort."""

    root: Path
    seed: int
    cases: tuple[ExpansionCase, ...]
    clinical_csv: Path
    manifest: Path


def generate_expansion_cohort(
    out_dir: Path,
    n_cases: int,
    seed: int,
    *,
    rows: int = 96,
    n_slices: int = 20,
    slice_thickness_mm: float = 5.0,
) -> ExpansionCohort:
    """Write ``n_cases`` admission ICH cases under ``out_dir``; same seed, same bytes.

    Writes ``cases/<case_id>/*.dcm``, ``clinical.csv`` (keys, clinical variables,
    ``label_he``), ``ground_truth/<case_id>.npz`` and ``ground_truth/cases.csv``, and
    ``cohort.json`` (seed, version, the generative model).
    """
    template = synthetic_head_ct(
        seed, n_slices=n_slices, slice_thickness_mm=slice_thickness_mm, rows=rows, noise_hu=0.0
    )
    frames, template_hu = HeadFrames.from_datasets(template)
    v = draw_variables(n_cases, seed)
    days = np.random.default_rng([seed, 2]).integers(0, 730, n_cases)
    cases = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, 1, i])
        hu = template_hu.copy()
        painted = paint_case(hu, frames, v, i, rng)
        hu += rng.normal(0.0, SCANNER_NOISE_HU, hu.shape)
        case = _case(out_dir, seed, i, int(days[i]), v, painted, frames)
        datasets = [copy.deepcopy(ds) for ds in template]
        for k, ds in enumerate(datasets):
            write_hu(ds, hu[k])
            _identify(ds, case, seed, k)
        write_series(datasets, case.folder)
        _write_truth(out_dir / "ground_truth" / f"{case.case_id}.npz", case, painted, v, i)
        cases.append(case)
    clinical_csv = _write_tables(out_dir, cases, v)
    manifest = out_dir / "cohort.json"
    settings = {"rows": rows, "n_slices": n_slices, "slice_thickness_mm": slice_thickness_mm}
    manifest.write_text(json.dumps(_manifest(seed, n_cases, settings), indent=2) + "\n")
    return ExpansionCohort(out_dir, seed, tuple(cases), clinical_csv, manifest)


def _case(
    out_dir: Path,
    seed: int,
    i: int,
    day: int,
    v: ExpansionVariables,
    painted: list[PaintedLesion],
    frames: HeadFrames,
) -> ExpansionCase:
    """The identity, clinical row, volumes and markers of case ``i``."""
    case_id = f"ich{i:04d}"
    date = datetime.date(2023, 1, 1) + datetime.timedelta(days=day)
    union = np.any([p.masks for p in painted], axis=0)
    thickness = float(np.linalg.norm(frames.origins[1] - frames.origins[0]))
    return ExpansionCase(
        case_id,
        f"H{seed % 100000:05d}{i:05d}",
        f"DNX-{seed}-{i:04d}",
        date.strftime("%Y%m%d"),
        out_dir / "cases" / case_id,
        {k: float(x[i]) for k, x in v.clinical.items()},
        int(v.label[i]),
        frames.volume_ml(union),
        abc2_volume_ml(painted[0].masks, frames.spacing, thickness),
        {k: bool(x[i]) for k, x in v.markers.items()},
        int(v.satellites[i]),
    )


def _identify(ds: Dataset, case: ExpansionCase, seed: int, index: int) -> None:
    """Give a slice the case's patient, study, series and instance identity."""
    identify_slice(ds, f"dicomnode-ich-cohort-{seed}-{case.case_id}", index, case,
                   STUDY_DESCRIPTION)  # fmt: skip
    ds.SeriesDescription = SERIES_DESCRIPTION


def _write_truth(
    path: Path, case: ExpansionCase, painted: list[PaintedLesion], v: ExpansionVariables, i: int
) -> None:
    """Haematoma masks (main first, file order), volumes, markers and latents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    threshold = max(HE_ABSOLUTE_ML, HE_RELATIVE * case.volume_ml)
    np.savez_compressed(
        path,
        masks=np.stack([p.masks for p in painted]),
        haematoma=np.any([p.masks for p in painted], axis=0),
        volume_ml=case.volume_ml,
        abc2_ml=case.abc2_ml,
        image_latent=v.image[i],
        clinical_score=v.clinical_score[i],
        probability=v.probability[i],
        growth_ml=threshold * v.growth_fraction[i],
        label_he=v.label[i],
        **{f"marker_{k}": x for k, x in case.markers.items()},
        satellites=case.satellites,
    )


def _format(name: str, value: float) -> str:
    """Decimals where the variable has them, else a whole number."""
    if name == "inr":
        return f"{value:.2f}"
    return f"{value:.1f}" if name == "fibrinogen_g_l" else f"{int(value)}"


TABLE_COLUMNS: tuple[str, ...] = (
    "age",
    "sex_male",
    "hypertension",
    "antithrombotic",
    "gcs",
    "fibrinogen_g_l",
    "inr",
    "platelets_10e9_l",
    "onset_to_ct_min",
)
"""The clinical table's variables (``gcs_group`` is derived from ``gcs``)."""


def _write_tables(out_dir: Path, cases: list[ExpansionCase], v: ExpansionVariables) -> Path:
    """``clinical.csv`` and ``ground_truth/cases.csv``; returns the clinical table's path."""
    clinical_csv = out_dir / "clinical.csv"
    with clinical_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["case_id", "AccessionNumber", "PatientID", "StudyDate", *TABLE_COLUMNS])
        writer.writerows(
            [c.case_id, c.accession_number, c.patient_id, c.study_date]
            + [_format(k, c.clinical[k]) for k in TABLE_COLUMNS]
            for c in cases
        )
    with (out_dir / "ground_truth" / "cases.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(
            [
                "case_id",
                "volume_ml",
                "abc2_ml",
                *(f"marker_{k}" for k in MARKERS),
                "satellites",
                "image_latent",
                "clinical_score",
                "probability",
                "growth_ml",
                LABEL,
            ]
        )
        for i, c in enumerate(cases):
            threshold = max(HE_ABSOLUTE_ML, HE_RELATIVE * c.volume_ml)
            writer.writerow(
                [c.case_id, f"{c.volume_ml:.3f}", f"{c.abc2_ml:.3f}"]
                + [int(c.markers[k]) for k in MARKERS]
                + [c.satellites]
                + [f"{v.image[i]:.4f}", f"{v.clinical_score[i]:.4f}", f"{v.probability[i]:.4f}"]
                + [f"{threshold * v.growth_fraction[i]:.2f}", c.label_he]
            )
    return clinical_csv


def read_labels(cohort_dir: Path) -> dict[str, tuple[int, float]]:
    """``case_id`` -> (label_he, true probability) from ``ground_truth/cases.csv``."""
    with (cohort_dir / "ground_truth" / "cases.csv").open(encoding="utf-8") as f:
        return {
            row["case_id"]: (int(row[LABEL]), float(row["probability"]))
            for row in csv.DictReader(f)
        }


def _manifest(seed: int, n_cases: int, settings: dict[str, float]) -> dict[str, object]:
    """``cohort.json``: the seed, version, settings and the generative model."""
    return {
        "generator": "pipelines.ich_expansion.cohort",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_cases": n_cases,
        "settings": settings,
        "model": {
            "outcome_logit": OUTCOME,
            "clinical_weights_per_sd": CLINICAL_WEIGHTS,
            "clinical_reference": clinical_reference(),
            "markers_logit": MARKERS,
            "satellite_rate_log": SATELLITE_RATE,
            "haematoma": {
                "rim_hu": RIM_HU,
                "core_hu": CORE_HU,
                "swirl_drop_hu": SWIRL_DROP_HU,
                "blend_drop_hu": BLEND_DROP_HU,
                "black_hole_hu": BLACK_HOLE_HU,
            },
            "he_definition": f"growth >= {HE_ABSOLUTE_ML} mL or >= {HE_RELATIVE:.0%}",
        },
        "labels": {LABEL: "haematoma expansion: Bernoulli(sigmoid(outcome_logit))"},
    }
