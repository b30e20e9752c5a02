"""A seeded synthetic cohort of post-thrombectomy head CTs with clinical data and outcomes.

Generative model (version ``GENERATOR_VERSION``); every number below is also written to
``cohort.json``. For each case:

1. Clinical variables, with marginals typical of thrombectomy cohorts and the HT study's
   list (``draw_clinical``): age ~ N(68, 11) in 30-95; male 56%; hypertension (62%,
   rising with age), diabetes 22%, atrial fibrillation (35%, rising with age), CAD 15%,
   hyperlipidaemia 30%, smoking and drinking (more in men); NIHSS ~ Gamma(5, 3.2) in
   2-40; ASPECTS = 10 - Binomial(10, p) in 3-10 with p rising with NIHSS; thrombolysis
   32%; anterior circulation 85%; glucose lognormal about 6.8 mmol/L (x1.4 with
   diabetes); onset to recanalisation lognormal about 330 min; pass number 1 + Poisson(0.8)
   up to 6; mTICI >= 2b 88%, falling with each pass; aspiration catheter 50%; stent 15%.
2. The clinical score ``c``: the sum of ``CLINICAL_WEIGHTS`` (per standard deviation,
   signs as the studies report: older age, higher NIHSS, lower ASPECTS, thrombolysis,
   hypertension, diabetes, glucose, AF, later recanalisation, more passes, no mTICI 2b,
   stenting and anterior circulation raise the risk) over the z-scored variables, divided
   by its standard deviation; means and SDs come from a fixed reference draw.
3. Two image latents, independent of ``c`` and of each other, both N(0, 1): texture ``t``
   and shape ``s``.
4. The outcome, haemorrhagic transformation (HT, the HT study's label: hyperattenuation
   persisting at 24-72 h), ``label_ht`` ~ Bernoulli(sigmoid(b0 + bc c + bt t + bs s)) with
   ``OUTCOME`` coefficients b0 = -0.45, bc = bt = bs = 1.3. A logistic regression on one
   source alone then reaches an AUC of about 0.71 (40 000 draws: clinical 0.717, texture
   0.710, shape 0.713) and on all three 0.88 (the true probability: 0.882); prevalence
   about 44%. The IPH study's label (hyperdense area persisting beyond 48 h =
   haemorrhage, not contrast) names the same follow-up finding, so ``label_iph`` equals
   ``label_ht``. The lesion's pattern (below) is what the image shows, not the label.
5. The image, from ``t`` and ``s`` plus noise: the pattern is contrast if
   t + N(0, 0.6) < -0.45, haemorrhage if above 0.55, else mixed (contrast with a
   haemorrhagic component of 30-60% of the volume). Volume = exp(ln 6 + 0.5 s + N(0,
   0.25)) mL in 1.5-40. Contrast HU = 125 - 12 t + N(0, 8) in 90-160 (cortical or deep,
   50:50). Haemorrhage rim HU = 58 + 2 t + N(0, 2) in 52-66, core HU = rim + 14 + 4 t +
   N(0, 3) up to 90, heterogeneity SD = 5 + 1.5 t + N(0, 0.7) in 2-9 HU, lobulation =
   0.25 + 0.06 s + N(0, 0.02) in 0.1-0.4, mass effect 0.08 + 0.01 x volume up to 0.25
   (deep 60%, lobar 40%). The physics are those of ``pipelines.lesions``.

So texture (HU level, spread, pattern) carries ``t``, shape (outline, volume) carries
``s``, the clinical table carries ``c``, each with noise; only their fusion predicts well.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.lesions import (
    CENTRE_MARGIN_MM,
    ContrastStain,
    Haemorrhage,
    HeadFrames,
    LesionKind,
    PaintedLesion,
    Site,
    paint_contrast,
    paint_haemorrhage,
    radius_for_volume,
    write_hu,
)
from pipelines.synthetic import synthetic_head_ct, write_series

GENERATOR_VERSION = "1.0.0"
SCANNER_NOISE_HU = 5.0  # added to the synthetic base after painting
REFERENCE_SEED, REFERENCE_SIZE = 20240101, 50000
GE_HEADCT = Path("data") / "headct_ge_tilt"

CLINICAL_WEIGHTS: dict[str, float] = {
    "age": 0.20,
    "nihss": 0.45,
    "aspects": -0.40,
    "thrombolysis": 0.25,
    "hypertension": 0.15,
    "diabetes": 0.10,
    "glucose_mmol_l": 0.35,
    "atrial_fibrillation": 0.25,
    "onset_to_recanalisation_min": 0.30,
    "pass_number": 0.30,
    "mtici_2b_or_better": -0.25,
    "stent_implantation": 0.10,
    "anterior_circulation": 0.10,
    "sex_male": 0.0,
    "coronary_artery_disease": 0.0,
    "hyperlipidaemia": 0.0,
    "smoking": 0.0,
    "drinking": 0.0,
    "aspiration_catheter": 0.0,
}
OUTCOME = {"intercept": -0.45, "clinical": 1.3, "texture": 1.3, "shape": 1.3}
PATTERN_CUTS = (-0.45, 0.55)  # texture + N(0, 0.6): contrast below, haemorrhage above
LABELS = ("label_ht", "label_iph")


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Logistic function."""
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def _logit(p: float) -> float:
    """Log-odds of ``p``."""
    return float(np.log(p / (1.0 - p)))


def draw_clinical(rng: np.random.Generator, n: int) -> dict[str, NDArray[np.float64]]:
    """``n`` draws of the clinical variables (binary ones as 0/1); see the module."""
    age = np.clip(np.rint(rng.normal(68.0, 11.0, n)), 30, 95)
    male = (rng.random(n) < 0.56).astype(float)

    def yes(p: float | NDArray[np.float64]) -> NDArray[np.float64]:
        return (rng.random(n) < p).astype(float)

    nihss = np.clip(np.rint(rng.gamma(5.0, 3.2, n)), 2, 40)
    diabetes = yes(0.22)
    passes = np.minimum(1 + rng.poisson(0.8, n), 6).astype(float)
    return {
        "age": age,
        "sex_male": male,
        "hypertension": yes(_sigmoid(_logit(0.62) + 0.04 * (age - 68.0))),
        "diabetes": diabetes,
        "atrial_fibrillation": yes(_sigmoid(_logit(0.35) + 0.06 * (age - 68.0))),
        "coronary_artery_disease": yes(0.15),
        "hyperlipidaemia": yes(0.30),
        "smoking": yes(np.where(male > 0, 0.35, 0.10)),
        "drinking": yes(np.where(male > 0, 0.30, 0.08)),
        "nihss": nihss,
        "aspects": np.clip(
            10 - rng.binomial(10, np.clip(0.17 + 0.01 * (nihss - 16), 0.02, 0.6)), 3, 10
        ),
        "thrombolysis": yes(0.32),
        "anterior_circulation": yes(0.85),
        "glucose_mmol_l": np.round(np.exp(rng.normal(np.log(6.8) + 0.35 * diabetes, 0.22)), 1),
        "onset_to_recanalisation_min": np.rint(np.exp(rng.normal(np.log(330.0), 0.45, n))),
        "pass_number": passes,
        "mtici_2b_or_better": yes(_sigmoid(_logit(0.88) - 0.45 * (passes - 1))),
        "aspiration_catheter": yes(0.5),
        "stent_implantation": yes(0.15),
    }


@lru_cache(maxsize=1)
def clinical_reference() -> dict[str, dict[str, float]]:
    """Means and SDs of the variables and the score's SD, from a fixed reference draw."""
    values = draw_clinical(np.random.default_rng(REFERENCE_SEED), REFERENCE_SIZE)
    mean = {k: float(v.mean()) for k, v in values.items()}
    sd = {k: float(v.std()) for k, v in values.items()}
    raw = _raw_score(values, mean, sd)
    return {"mean": mean, "sd": sd, "score": {"mean": float(raw.mean()), "sd": float(raw.std())}}


def _raw_score(
    values: dict[str, NDArray[np.float64]], mean: dict[str, float], sd: dict[str, float]
) -> NDArray[np.float64]:
    """Weighted sum of the z-scored variables."""
    return np.asarray(
        sum(w * (values[k] - mean[k]) / sd[k] for k, w in CLINICAL_WEIGHTS.items() if w)
    )


def clinical_score(values: dict[str, NDArray[np.float64]]) -> NDArray[np.float64]:
    """The standardised clinical score ``c`` of the outcome model."""
    ref = clinical_reference()
    raw = _raw_score(values, ref["mean"], ref["sd"])
    return np.asarray((raw - ref["score"]["mean"]) / ref["score"]["sd"])


@dataclass(frozen=True)
class CohortVariables:
    """Everything drawn for ``n`` cases except the images: the model's oracle variables."""

    clinical: dict[str, NDArray[np.float64]]
    clinical_score: NDArray[np.float64]
    texture: NDArray[np.float64]
    shape: NDArray[np.float64]
    probability: NDArray[np.float64]
    label: NDArray[np.int_]
    pattern: NDArray[np.str_]  # "contrast", "haemorrhage" or "mixed"
    physics_noise: NDArray[np.float64]  # (n, 8) N(0, 1) draws for the lesion parameters


def draw_variables(n: int, seed: int) -> CohortVariables:
    """Draw the clinical variables, latents, outcomes and lesion patterns of ``n`` cases."""
    rng = np.random.default_rng([seed, 0])
    clinical = draw_clinical(rng, n)
    score = clinical_score(clinical)
    texture, shape = rng.normal(size=(2, n))
    eta = OUTCOME["intercept"] + OUTCOME["clinical"] * score
    eta = eta + OUTCOME["texture"] * texture + OUTCOME["shape"] * shape
    probability = _sigmoid(eta)
    label = (rng.random(n) < probability).astype(int)
    cue = texture + rng.normal(0.0, 0.6, n)
    pattern = np.where(
        cue < PATTERN_CUTS[0], "contrast", np.where(cue > PATTERN_CUTS[1], "haemorrhage", "mixed")
    )
    noise = rng.normal(size=(n, 8))
    return CohortVariables(clinical, score, texture, shape, probability, label, pattern, noise)


def lesion_plan(v: CohortVariables, i: int) -> list[ContrastStain | Haemorrhage]:
    """Case ``i``'s lesion physics from its latents (contrast first in a mixture)."""
    t, s, e = float(v.texture[i]), float(v.shape[i]), v.physics_noise[i]
    volume = float(np.clip(np.exp(np.log(6.0) + 0.5 * s + 0.25 * e[0]), 1.5, 40.0))
    return lesion_physics(volume, str(v.pattern[i]), t, s, e)


def lesion_physics(
    volume: float, pattern: str, t: float, s: float, e: Sequence[float] | NDArray[np.float64]
) -> list[ContrastStain | Haemorrhage]:
    """The contrast stain and/or haemorrhage of one hyperdense area of ``volume`` mL and
    ``pattern`` ("contrast", "haemorrhage" or a mixture), from its texture ``t`` and
    shape ``s`` latents and its physics noise ``e`` (8 normal draws; ``e[0]`` is left to
    the caller's volume): contrast first in a mixture."""
    mixed = 0.45 + 0.15 * float(np.tanh(e[1]))  # haemorrhagic share of a mixture
    fraction = {"contrast": 0.0, "haemorrhage": 1.0}.get(pattern, mixed)
    plan: list[ContrastStain | Haemorrhage] = []
    if fraction < 1.0:
        hu = float(np.clip(125.0 - 12.0 * t + 8.0 * e[2], 90.0, 160.0))
        site = Site.CORTICAL if e[3] > 0 else Site.DEEP
        plan.append(ContrastStain(volume * (1.0 - fraction), hu, site))
    if fraction > 0.0:
        rim = float(np.clip(58.0 + 2.0 * t + 2.0 * e[4], 52.0, 66.0))
        core = float(np.clip(rim + 14.0 + 4.0 * t + 3.0 * e[5], rim + 5.0, 90.0))
        spread = float(np.clip(5.0 + 1.5 * t + 0.7 * e[6], 2.0, 9.0))
        lobes = float(np.clip(0.25 + 0.06 * s + 0.02 * e[7], 0.1, 0.4))
        push = float(min(0.08 + 0.01 * volume, 0.25))
        site = plan[0].site if plan else Site.DEEP if e[3] < 0.25 else Site.LOBAR
        plan.append(
            Haemorrhage(volume * fraction, rim, core, spread, lobes, site, mass_effect=push)
        )
    return plan


def paint_case(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    plan: list[ContrastStain | Haemorrhage],
    rng: np.random.Generator,
) -> list[PaintedLesion]:
    """Paint a case's lesions into ``hu`` in place; a mixture's bleed abuts its stain.

    The first lesion's centre is drawn at its site; a haemorrhagic component is centred
    one stain radius plus 0.4 of its own radius away, in a random direction leaning
    towards the brain's centre (so that a cortical stain's bleed stays in the brain).
    """
    painted: list[PaintedLesion] = []
    for physics in plan:
        reach = 1.3 * radius_for_volume(physics.volume_ml)
        if painted:
            stain = painted[0]
            inward = frames.brain_centre_mm - np.asarray(stain.center_mm)
            direction = inward / max(float(np.linalg.norm(inward)), 1e-9)
            direction += 0.7 * rng.normal(size=3) / np.sqrt(3.0)
            direction /= np.linalg.norm(direction)
            gap = float(stain.parameters["radius_mm"]) + 0.4 * radius_for_volume(physics.volume_ml)
            offset = gap * direction
            centre = np.asarray(stain.center_mm) + offset
        else:
            centre = frames.choose_centre(physics.site, reach + CENTRE_MARGIN_MM, rng)
        if isinstance(physics, ContrastStain):
            painted.append(paint_contrast(hu, frames, physics, centre, rng))
        else:
            painted.append(paint_haemorrhage(hu, frames, physics, centre, rng))
    return painted


class CaseIdentity(Protocol):
    """Who and when a generated case is: what its slices' identity is made from."""

    @property
    def case_id(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def accession_number(self) -> str: ...
    @property
    def study_date(self) -> str: ...
    @property
    def clinical(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class CohortCase:
    """One written case."""

    case_id: str
    accession_number: str
    patient_id: str
    study_date: str
    folder: Path  # out_dir/cases/<case_id>
    pattern: str
    lesions: tuple[PaintedLesion, ...]
    clinical: dict[str, float]
    label_ht: int


@dataclass(frozen=True)
class Cohort:
    """A written cohort: its cases and the files that describe them."""

    root: Path
    seed: int
    base: str
    cases: tuple[CohortCase, ...]
    clinical_csv: Path
    manifest: Path


def shared_dir() -> Path:
    """``$DICOMNODE_SHARED``, or ``../shared`` beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared"
    return Path(os.environ.get("DICOMNODE_SHARED", default))


def generate_cohort(
    out_dir: Path,
    n_cases: int,
    seed: int,
    *,
    base: Literal["synthetic", "ge"] = "synthetic",
    rows: int = 256,
    n_slices: int = 24,
    slice_thickness_mm: float = 5.0,
    gantry_tilt_deg: float = 0.0,
) -> Cohort:
    """Write ``n_cases`` cases under ``out_dir``; the same seed writes the same bytes.

    Writes ``cases/<case_id>/*.dcm`` (one series per case, own patient, study and
    UIDs), ``clinical.csv`` (keys, clinical variables, labels), ``ground_truth/<case_id>
    .npz`` (per-lesion frame masks in file order, kinds, volumes, latents) with
    ``ground_truth/cases.csv``, and ``cohort.json`` (seed, version, model). With
    ``base="ge"`` the lesions go into the real GE head CT of ``shared_dir()``; ``rows``,
    ``n_slices``, thickness and tilt then come from that series.
    """
    if base == "ge":
        folder = shared_dir() / GE_HEADCT
        if not folder.is_dir():
            raise FileNotFoundError(f"base 'ge' needs the GE head CT in {folder}")
        template: list[Dataset] = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        noise = 0.0
    else:
        template = synthetic_head_ct(
            seed,
            n_slices=n_slices,
            slice_thickness_mm=slice_thickness_mm,
            rows=rows,
            gantry_tilt_deg=gantry_tilt_deg,
            noise_hu=0.0,
        )
        noise = SCANNER_NOISE_HU
    frames, template_hu = HeadFrames.from_datasets(template)
    variables = draw_variables(n_cases, seed)
    days = np.random.default_rng([seed, 2]).integers(0, 730, n_cases)
    cases = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, 1, i])
        hu = template_hu.copy()
        lesions = paint_case(hu, frames, lesion_plan(variables, i), rng)
        if noise:
            hu += rng.normal(0.0, noise, hu.shape)
        case = _case(out_dir, seed, i, int(days[i]), variables, lesions)
        datasets = [copy.deepcopy(ds) for ds in template]
        for k, ds in enumerate(datasets):
            write_hu(ds, hu[k])
            _identify(ds, case, seed, k, derived=base == "ge")
        write_series(datasets, case.folder)
        _write_truth(out_dir / "ground_truth" / f"{case.case_id}.npz", case, datasets, variables, i)
        cases.append(case)
    clinical_csv = _write_tables(out_dir, cases, variables)
    manifest = out_dir / "cohort.json"
    settings = {"rows": rows, "n_slices": n_slices, "slice_thickness_mm": slice_thickness_mm}
    settings["gantry_tilt_deg"] = gantry_tilt_deg
    manifest.write_text(json.dumps(_manifest(seed, n_cases, base, settings), indent=2) + "\n")
    return Cohort(out_dir, seed, base, tuple(cases), clinical_csv, manifest)


def _case(
    out_dir: Path,
    seed: int,
    i: int,
    day: int,
    v: CohortVariables,
    lesions: list[PaintedLesion],
) -> CohortCase:
    """The identity, clinical row and lesions of case ``i``."""
    case_id = f"case{i:04d}"
    date = datetime.date(2023, 1, 1) + datetime.timedelta(days=day)
    return CohortCase(
        case_id,
        f"A{seed % 100000:05d}{i:05d}",
        f"DNC-{seed}-{i:04d}",
        date.strftime("%Y%m%d"),
        out_dir / "cases" / case_id,
        str(v.pattern[i]),
        tuple(lesions),
        {k: float(x[i]) for k, x in v.clinical.items()},
        int(v.label[i]),
    )


def identify_slice(
    ds: Dataset, entropy: str, index: int, case: CaseIdentity, description: str
) -> None:
    """Give slice ``index`` of a cohort case its patient, study, series and instance
    identity; UIDs derive from ``entropy`` (generator, seed and case id)."""
    uid = generate_uid(entropy_srcs=[entropy, "instance", str(index)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[entropy, "frame"])
    ds.PatientID = case.patient_id
    ds.PatientName = f"SYNTHETIC^{case.case_id.upper()}"
    ds.PatientAge = f"{int(case.clinical['age']):03d}Y"
    ds.PatientSex = "M" if case.clinical["sex_male"] else "F"
    ds.AccessionNumber = case.accession_number
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = case.study_date
    ds.StudyDescription = description
    ds.StudyID = case.case_id[-4:]


def _identify(ds: Dataset, case: CohortCase, seed: int, index: int, *, derived: bool) -> None:
    """Give a slice the case's patient, study, series and instance identity."""
    entropy = f"dicomnode-cohort-{seed}-{case.case_id}"
    identify_slice(ds, entropy, index, case, "CT HEAD AFTER THROMBECTOMY (SYNTHETIC COHORT)")
    if derived:
        ds.ImageType = ["DERIVED", *list(ds.ImageType)[1:]]
        ds.DerivationDescription = "synthetic lesion painted by dicomnode pipelines.lesions"


def _write_truth(
    path: Path, case: CohortCase, datasets: list[Dataset], v: CohortVariables, i: int
) -> None:
    """Per-lesion and per-kind frame masks (file order), volumes and latents of a case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    masks = np.stack([lesion.masks for lesion in case.lesions])
    kinds = np.array([str(lesion.kind) for lesion in case.lesions])
    per_kind = {str(k): masks[kinds == str(k)].any(axis=0) for k in LesionKind}
    np.savez_compressed(
        path,
        masks=masks,
        kinds=kinds,
        volumes_ml=np.array([lesion.volume_ml for lesion in case.lesions]),
        sop_instance_uids=np.array([str(ds.SOPInstanceUID) for ds in datasets]),
        texture=v.texture[i],
        shape=v.shape[i],
        clinical_score=v.clinical_score[i],
        probability=v.probability[i],
        label_ht=v.label[i],
        **per_kind,
    )


def _write_tables(out_dir: Path, cases: list[CohortCase], v: CohortVariables) -> Path:
    """``clinical.csv`` and ``ground_truth/cases.csv``; returns the clinical table's path."""
    clinical_csv = out_dir / "clinical.csv"
    with clinical_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        names = list(cases[0].clinical) if cases else list(CLINICAL_WEIGHTS)
        writer.writerow(["case_id", "AccessionNumber", "PatientID", "StudyDate", *names, *LABELS])
        writer.writerows(
            [c.case_id, c.accession_number, c.patient_id, c.study_date]
            + [_format(k, c.clinical[k]) for k in names]
            + [c.label_ht, c.label_ht]
            for c in cases
        )
    with (out_dir / "ground_truth" / "cases.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(
            [
                *("case_id", "pattern", "contrast_ml", "haemorrhage_ml", "texture", "shape"),
                *("clinical_score", "probability", "label_ht"),
            ]
        )
        for i, c in enumerate(cases):
            ml = {str(k): sum(x.volume_ml for x in c.lesions if x.kind is k) for k in LesionKind}
            latents = (v.texture[i], v.shape[i], v.clinical_score[i], v.probability[i])
            writer.writerow(
                [c.case_id, c.pattern, f"{ml['contrast']:.3f}", f"{ml['haemorrhage']:.3f}"]
                + [f"{x:.4f}" for x in latents]
                + [c.label_ht]
            )
    return clinical_csv


def _format(name: str, value: float) -> str:
    """Glucose with one decimal, every other variable as an integer."""
    return f"{value:.1f}" if name == "glucose_mmol_l" else f"{int(value)}"


def _manifest(seed: int, n_cases: int, base: str, settings: dict[str, float]) -> dict[str, object]:
    """``cohort.json``: the seed, version, settings and the generative model."""
    return {
        "generator": "pipelines.cohort",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_cases": n_cases,
        "base": base,
        "settings": settings,
        "model": {
            "outcome_logit": OUTCOME,
            "clinical_weights_per_sd": CLINICAL_WEIGHTS,
            "clinical_reference": clinical_reference(),
            "pattern_cuts": PATTERN_CUTS,
            "lesion_defaults": {
                "contrast": asdict(ContrastStain(1.0, 100.0)),
                "haemorrhage": asdict(Haemorrhage(1.0, 55.0, 70.0, 5.0, 0.2)),
            },
        },
        "labels": {
            "label_ht": "haemorrhagic transformation (HT study): Bernoulli(sigmoid(outcome_logit))",
            "label_iph": "hyperdensity persisting > 48 h (IPH study): the same finding as label_ht",
        },
    }
