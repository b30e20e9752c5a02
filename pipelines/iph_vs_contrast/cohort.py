"""A seeded synthetic cohort for ``iph_vs_contrast``: post-thrombectomy head CTs with one
to three separate intraparenchymal hyperdense areas each, every area labelled.

The unit of the IPH-vs-contrast study is the hyperdense AREA, not the patient: each
area is haemorrhage (IPH: still there or grown beyond 48 h) or contrast staining
(cleared within 24-48 h). ``pipelines.cohort`` draws one lesion per case with a
case-level label, so this module draws several areas per case, each with its own
latents and label, and paints them with the same physics (``pipelines.lesions``:
:class:`ContrastStain`, :class:`Haemorrhage`).

Generative model (version :data:`GENERATOR_VERSION`; every number is also written to
``cohort.json``). For each case:

1. Number of areas: 1, 2 or 3 with probabilities :data:`AREA_COUNT_P` (mean 1.65, the
   study's 166 areas in 101 patients). A patient latent ``u`` ~ N(0, 1) is shared by
   the case's areas (areas of one patient resemble each other, so the held-out split
   must be by patient).
2. Per area, two latents: texture ``t = 0.5 u + sqrt(0.75) z`` (z ~ N(0, 1)) and shape
   ``s`` ~ N(0, 1).
3. The label, haemorrhage (1) or contrast (0): Bernoulli(sigmoid(b0 + bt t + bs s))
   with :data:`LABEL_LOGIT` b0 = 0.3, bt = 1.6, bs = 1.0; prevalence about 56%. The true
   probability is the oracle: its AUC (about 0.85 on 40 000 draws) bounds what any image
   model can reach.
4. The image, from ``t`` and ``s`` with noise (what the CT shows, not the label): the
   pattern is contrast if ``t + N(0, 0.6)`` < -0.45, haemorrhage if above 0.55, else
   mixed (contrast with an abutting haemorrhagic component of 30-60% of the volume).
   Volume = exp(ln 4 + 0.5 s + N(0, 0.25)) mL in 1.2-20. Contrast HU = 125 - 12 t +
   N(0, 8) in 90-160 (cortical or deep, 50:50). Haemorrhage rim HU = 58 + 2 t + N(0, 2)
   in 52-66, core HU = rim + 14 + 4 t + N(0, 3) up to 90, heterogeneity SD = 5 + 1.5 t
   + N(0, 0.7) in 2-9 HU, lobulation = 0.25 + 0.06 s + N(0, 0.02) in 0.1-0.4, mass
   effect 0.08 + 0.01 x volume up to 0.25 (deep or lobar). These are the lesion
   parameters of ``pipelines.cohort.lesion_plan`` applied per area.
5. Placement: each area's centre is drawn at its site at least the sum of the two
   areas' reaches plus :data:`AREA_GAP_MM` from every earlier area, so areas stay
   separate connected regions; an area with no room left is not painted (``cases.csv``
   counts what was painted).

So the HU level and pattern carry ``t`` and the size and outline carry ``s``: HUmax
alone or volume alone each see one latent, a radiomics signature can see both.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.cohort import lesion_physics
from pipelines.lesions import (
    CENTRE_MARGIN_MM,
    ContrastStain,
    Haemorrhage,
    HeadFrames,
    PaintedLesion,
    Site,
    paint_contrast,
    paint_haemorrhage,
    radius_for_volume,
    write_hu,
)
from pipelines.synthetic import synthetic_head_ct, write_series

GENERATOR_VERSION = "1.0.0"
DEFAULT_ROWS = 96  # 2.4 mm pixels over the 230 mm field: small, fast, HU and headers real
DEFAULT_SLICES = 16
AREA_COUNT_P = (0.5, 0.35, 0.15)  # 1, 2 or 3 areas per case
PATIENT_SHARE = 0.5  # weight of the patient latent in each area's texture
LABEL_LOGIT = {"intercept": 0.3, "texture": 1.6, "shape": 1.0}
PATTERN_CUTS = (-0.45, 0.55)  # texture + N(0, PATTERN_NOISE): contrast below, IPH above
PATTERN_NOISE = 0.6
VOLUME_ML = {"median": 4.0, "shape": 0.5, "noise": 0.25, "low": 1.2, "high": 20.0}
AREA_GAP_MM = 8.0  # at least this much brain between two areas' reaches
PLACEMENT_TRIES = 60
SCANNER_NOISE_HU = 5.0
REACH_FACTOR = 1.3  # a painted area reaches at most this many radii from its centre
STUDY_DESCRIPTION = "CT HEAD AFTER THROMBECTOMY (SYNTHETIC IPH COHORT)"
SERIES_DESCRIPTION = "Head axial post thrombectomy (synthetic)"
LABEL_NAMES = {0: "contrast", 1: "haemorrhage"}


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Logistic function."""
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class AreaVariables:
    """One area's latents, label, oracle probability and lesion-parameter noise."""

    texture: float
    shape: float
    probability: float  # of haemorrhage: the oracle
    label: int  # 1 haemorrhage, 0 contrast
    pattern: str  # "contrast", "haemorrhage" or "mixed"
    noise: tuple[float, ...]  # 8 N(0, 1) draws for the lesion parameters


def oracle_probability(texture: ArrayLike, shape: ArrayLike) -> NDArray[np.float64]:
    """The generative model's probability of haemorrhage for latents ``t`` and ``s``."""
    t, s = np.asarray(texture, dtype=np.float64), np.asarray(shape, dtype=np.float64)
    eta = LABEL_LOGIT["intercept"] + LABEL_LOGIT["texture"] * t + LABEL_LOGIT["shape"] * s
    return _sigmoid(eta)


def draw_areas(rng: np.random.Generator) -> list[AreaVariables]:
    """The areas of one case (step 1-4 of the module's model)."""
    count = int(rng.choice(len(AREA_COUNT_P), p=AREA_COUNT_P)) + 1
    patient = float(rng.normal())
    areas = []
    for _ in range(count):
        z, shape = rng.normal(size=2)
        texture = PATIENT_SHARE * patient + float(np.sqrt(1.0 - PATIENT_SHARE**2)) * float(z)
        probability = float(oracle_probability(texture, shape))
        label = int(rng.random() < probability)
        cue = texture + rng.normal(0.0, PATTERN_NOISE)
        pattern = (
            "contrast"
            if cue < PATTERN_CUTS[0]
            else "haemorrhage"
            if cue > PATTERN_CUTS[1]
            else "mixed"
        )
        noise = tuple(float(v) for v in rng.normal(size=8))
        areas.append(AreaVariables(texture, float(shape), probability, label, pattern, noise))
    return areas


def area_plan(area: AreaVariables) -> list[ContrastStain | Haemorrhage]:
    """An area's lesion physics from its latents (step 4; contrast first in a mixture)."""
    t, s, e = area.texture, area.shape, area.noise
    v = VOLUME_ML
    volume = float(
        np.clip(
            np.exp(np.log(v["median"]) + v["shape"] * s + v["noise"] * e[0]), v["low"], v["high"]
        )
    )
    return lesion_physics(volume, area.pattern, t, s, e)


def _reach_mm(plan: list[ContrastStain | Haemorrhage]) -> float:
    """How far an area (all its components) reaches from its first centre, in mm."""
    radii = [radius_for_volume(p.volume_ml) for p in plan]
    return REACH_FACTOR * (radii[0] + (2.0 * radii[1] if len(radii) > 1 else 0.0))


def _place(
    frames: HeadFrames,
    plan: list[ContrastStain | Haemorrhage],
    placed: list[tuple[NDArray[np.float64], float]],
    rng: np.random.Generator,
) -> NDArray[np.float64] | None:
    """A centre for the area, clear of every placed (centre, reach); None: no room."""
    reach = _reach_mm(plan)
    first = REACH_FACTOR * radius_for_volume(plan[0].volume_ml)
    for attempt in range(PLACEMENT_TRIES):
        site = plan[0].site if attempt < PLACEMENT_TRIES // 2 else Site.LOBAR
        try:
            centre = frames.choose_centre(site, first + CENTRE_MARGIN_MM, rng)
        except ValueError:
            return None
        if all(
            float(np.linalg.norm(centre - other)) >= reach + other_reach + AREA_GAP_MM
            for other, other_reach in placed
        ):
            return centre
    return None


def paint_area(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    plan: list[ContrastStain | Haemorrhage],
    centre: NDArray[np.float64],
    rng: np.random.Generator,
) -> list[PaintedLesion]:
    """Paint one area at ``centre``; a mixture's bleed abuts its stain, leaning inwards
    (the rule of ``pipelines.cohort.paint_case``)."""
    painted: list[PaintedLesion] = []
    for physics in plan:
        at = centre
        if painted:
            stain = painted[0]
            inward = frames.brain_centre_mm - np.asarray(stain.center_mm)
            direction = inward / max(float(np.linalg.norm(inward)), 1e-9)
            direction += 0.7 * rng.normal(size=3) / np.sqrt(3.0)
            direction /= np.linalg.norm(direction)
            gap = float(stain.parameters["radius_mm"]) + 0.4 * radius_for_volume(physics.volume_ml)
            at = np.asarray(stain.center_mm) + gap * direction
        if isinstance(physics, ContrastStain):
            painted.append(paint_contrast(hu, frames, physics, at, rng))
        else:
            painted.append(paint_haemorrhage(hu, frames, physics, at, rng))
    return painted


@dataclass(frozen=True)
class PaintedArea:
    """One painted area: its variables and the union of its components' frame masks."""

    variables: AreaVariables
    mask: NDArray[np.bool_]  # (n_frames, rows, columns), file order
    volume_ml: float


@dataclass(frozen=True)
class IphCase:
    """One written case: identity, folder, file-order SOP Instance UIDs and its areas."""

    case_id: str
    patient_id: str
    folder: Path
    sop_instance_uids: tuple[str, ...]  # file order, the masks' first axis
    areas: tuple[PaintedArea, ...]


def paint_iph_case(
    datasets: list[Dataset],
    seed: int,
    index: int,
    given: Sequence[AreaVariables] | None = None,
) -> tuple[NDArray[np.float64], list[PaintedArea]]:
    """Draw (or take ``given``) and paint the areas of case ``index`` of cohort ``seed``
    into a copy of ``datasets``' HU."""
    rng = np.random.default_rng([seed, 11, index])
    frames, hu = HeadFrames.from_datasets(datasets)
    hu = hu.copy()
    placed: list[tuple[NDArray[np.float64], float]] = []
    areas: list[PaintedArea] = []
    drawn = draw_areas(rng)
    for variables in drawn if given is None else given:
        plan = area_plan(variables)
        centre = _place(frames, plan, placed, rng)
        if centre is None:
            continue
        placed.append((centre, _reach_mm(plan)))
        painted = paint_area(hu, frames, plan, centre, rng)
        mask = np.any([p.masks for p in painted], axis=0)
        if mask.any():
            areas.append(PaintedArea(variables, mask, frames.volume_ml(mask)))
    hu += rng.normal(0.0, SCANNER_NOISE_HU, hu.shape)
    return hu, areas


def write_iph_case(
    folder: Path,
    seed: int,
    index: int,
    *,
    rows: int = DEFAULT_ROWS,
    n_slices: int = DEFAULT_SLICES,
    slice_thickness_mm: float = 5.0,
    areas: Sequence[AreaVariables] | None = None,
) -> IphCase:
    """Generate case ``index`` of cohort ``seed`` (its areas drawn, or ``areas``) and
    write its CT series into ``folder``."""
    template = synthetic_head_ct(
        seed, n_slices=n_slices, slice_thickness_mm=slice_thickness_mm, rows=rows, noise_hu=0.0
    )
    hu, painted = paint_iph_case(template, seed, index, areas)
    case_id = f"iph{index:04d}"
    patient_id = f"DNI-{seed}-{index:04d}"
    date = datetime.date(2024, 1, 1) + datetime.timedelta(days=index % 700)
    entropy = f"dicomnode-iph-cohort-{seed}-{case_id}"
    for k, ds in enumerate(template):
        write_hu(ds, hu[k])
        uid = generate_uid(entropy_srcs=[entropy, "instance", str(k)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[entropy, "frame"])
        ds.PatientID = patient_id
        ds.PatientName = f"SYNTHETIC^{case_id.upper()}"
        ds.AccessionNumber = f"I{seed % 100000:05d}{index:05d}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.StudyID = case_id[-4:]
    write_series(template, folder)
    uids = tuple(str(ds.SOPInstanceUID) for ds in template)
    return IphCase(case_id, patient_id, folder, uids, tuple(painted))


@dataclass(frozen=True)
class IphCohort:
    """A written cohort: its cases and the manifest describing the generative model."""

    root: Path
    seed: int
    cases: tuple[IphCase, ...]
    manifest: Path


def generate_iph_cohort(
    out_dir: Path,
    n_cases: int,
    seed: int,
    *,
    rows: int = DEFAULT_ROWS,
    n_slices: int = DEFAULT_SLICES,
) -> IphCohort:
    """Write ``n_cases`` cases under ``out_dir/cases/<case_id>/``, per-area truth in
    ``out_dir/ground_truth/<case_id>.npz`` and ``areas.csv``, and ``cohort.json``."""
    cases = []
    truth = out_dir / "ground_truth"
    truth.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        case = write_iph_case(
            out_dir / "cases" / f"iph{i:04d}", seed, i, rows=rows, n_slices=n_slices
        )
        masks = (
            np.stack([a.mask for a in case.areas])
            if case.areas
            else np.zeros((0, n_slices, rows, rows), dtype=bool)
        )
        np.savez_compressed(
            truth / f"{case.case_id}.npz",
            masks=masks,
            labels=np.array([a.variables.label for a in case.areas], dtype=np.int64),
            probabilities=np.array([a.variables.probability for a in case.areas]),
            sop_instance_uids=np.array(case.sop_instance_uids),
        )
        cases.append(case)
    with (out_dir / "areas.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(
            ["case_id", "area", "label", "pattern", "volume_ml", "texture", "shape", "probability"]
        )
        for case in cases:
            for k, area in enumerate(case.areas):
                v = area.variables
                writer.writerow(
                    [case.case_id, k, LABEL_NAMES[v.label], v.pattern, f"{area.volume_ml:.3f}"]
                    + [f"{x:.4f}" for x in (v.texture, v.shape, v.probability)]
                )
    manifest = out_dir / "cohort.json"
    manifest.write_text(
        json.dumps(cohort_description(seed, n_cases, rows, n_slices), indent=2) + "\n"
    )
    return IphCohort(out_dir, seed, tuple(cases), manifest)


def cohort_description(seed: int, n_cases: int, rows: int, n_slices: int) -> dict[str, object]:
    """``cohort.json``: seed, size and every constant of the generative model."""
    return {
        "generator": "pipelines.iph_vs_contrast.cohort",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_cases": n_cases,
        "settings": {"rows": rows, "n_slices": n_slices, "slice_thickness_mm": 5.0},
        "model": {
            "area_count_p": list(AREA_COUNT_P),
            "patient_share": PATIENT_SHARE,
            "label_logit": LABEL_LOGIT,
            "pattern_cuts": list(PATTERN_CUTS),
            "pattern_noise": PATTERN_NOISE,
            "volume_ml": VOLUME_ML,
            "area_gap_mm": AREA_GAP_MM,
            "scanner_noise_hu": SCANNER_NOISE_HU,
            "lesion_defaults": {
                "contrast": asdict(ContrastStain(1.0, 100.0)),
                "haemorrhage": asdict(Haemorrhage(1.0, 55.0, 70.0, 5.0, 0.2)),
            },
        },
        "labels": {
            "haemorrhage": "area persisting or growing beyond 48 h (IPH)",
            "contrast": "area cleared within 24-48 h (contrast staining)",
        },
    }


def oracle_auc_reference(draws: int = 40000, seed: int = 7) -> float:
    """AUC of the oracle probability over ``draws`` simulated areas (the bound)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    patient = rng.normal(size=draws)
    texture = PATIENT_SHARE * patient + np.sqrt(1.0 - PATIENT_SHARE**2) * rng.normal(size=draws)
    shape = rng.normal(size=draws)
    probability = oracle_probability(texture, shape)
    label = (rng.random(draws) < probability).astype(int)
    return float(roc_auc_score(label, probability))
