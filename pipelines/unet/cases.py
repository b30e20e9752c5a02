"""Training and held-out cases of the learned segmenter (U-Net 2.0.0): generated heads only.

Every case is drawn from its own seed, on a generated head (``pipelines.synthetic``) whose
acquisition is drawn per template: slices of 0.6-7 mm (a thin-slice stack covers a part of
the head, at the skull base, the vertex or between), gantry tilt of 0-20 degrees, 192 or
256 pixel matrices, the head stretched 0.88-1.12 along each axis, and scanner noise baked
in (0-6 HU) and added after painting (0-5 HU). Lesions (``pipelines.lesions``) cover what
the issue asks of a segmenter:

- irregular blobs of 45-95 HU (``insert_lesion``) anywhere in the brain, touching the
  skull base or the convexity (their edge reaches the bone), or beside a lateral
  ventricle;
- haemorrhages with a 45-66 HU rim rising to a core of up to 95 HU, a partial-volume edge
  and mass effect (``paint_haemorrhage``), deep or lobar;
- contrast stains of 50-160 HU (``paint_contrast``), deep or cortical;

of 0.3-80 mL (log-uniform). Calcifications (180-700 HU, 1.2-4 mm) at the typical sites
(choroid plexus, pineal, basal ganglia, falx, vessel wall) are painted as negatives and
kept in their own mask. Nothing here reads the shared data folder: the real head CT is
only ever an evaluation base (``bench/segmenter_eval.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.brain import Intracranial, intracranial_mask
from pipelines.geometry import represented_thickness
from pipelines.lesions import (
    CENTRE_MARGIN_MM,
    ContrastStain,
    Haemorrhage,
    HeadFrames,
    Site,
    datasets_hu,
    insert_lesion,
    paint_contrast,
    paint_haemorrhage,
    radius_for_volume,
)
from pipelines.synthetic import CALCIFICATION_SITES_MM, HEAD_CENTRE_MM, synthetic_head_ct
from pipelines.unet.data import LesionCase

THICKNESSES_MM = (0.6, 1.0, 2.0, 3.0, 5.0, 7.0)
TILTS_DEG = (0.0, 10.0, 20.0)
MATRICES = (192, 256)
COVERAGE_MM = 130.0  # a stack of thick slices covers this much of the head
MAX_FRAMES = 40  # a thin-slice stack has at most this many frames (a part of the head)
STACK_OFFSET_MM = (-55.0, 45.0)  # where a partial stack's centre may lie (z, head-centred)
HEAD_SCALE = (0.88, 1.12)
BAKED_NOISE_HU = (0.0, 6.0)
ADDED_NOISE_HU = (0.0, 5.0)
ADDED_NOISE_FRACTION = 0.6

VOLUME_ML = (0.3, 80.0)  # log-uniform
BLOB_HU = (45.0, 95.0)
RIM_HU = (45.0, 66.0)
CORE_ABOVE_RIM_HU = (5.0, 30.0)
CORE_MAX_HU = 95.0
STAIN_HU = (50.0, 160.0)
EMPTY_FRACTION = 0.15
TWO_LESION_FRACTION = 0.3

CALCIFICATION_FRACTION = 0.5
CALCIFICATION_HU = (180.0, 700.0)
CALCIFICATION_RADIUS_MM = (1.2, 4.0)
CALCIFICATION_JITTER_MM = 3.0

TOUCH_DEPTH = (0.5, 0.8)  # a touching lesion's centre lies this many radii from the skull
SKULL_BASE_FRACTION = 0.4  # skull-base sites: the lowest fraction of the cavity's frames
VENTRICLE_MM = ((9.0, -2.0, 16.0), (-9.0, -2.0, 16.0))  # head-centred lateral ventricles

TEMPLATES_PER_STREAM = 16

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PaintedCase(LesionCase):
    """A generated case: lesion mask (positives) and calcification mask (negatives)."""

    calcification: NDArray[np.bool_]
    description: str


@dataclass(frozen=True)
class Template:
    """A lesion-free generated series and what painting needs of it."""

    datasets: tuple[Dataset, ...]
    frames: HeadFrames
    masks: Intracranial
    skull_distance_mm: NDArray[np.float64]  # (frames, rows, cols) distance to the skull
    spacing: tuple[float, float, float]  # (slice gap, row, column) mm
    scale: tuple[float, float, float]
    description: str


@dataclass(frozen=True)
class TemplateSpec:
    """The acquisition of a generated template series."""

    thickness: float
    n_slices: int
    tilt: float
    rows: int
    noise: float
    scale: tuple[float, float, float]
    offset: float


def template_spec(seed: int, stream: int, index: int) -> TemplateSpec:
    """The acquisition of template ``index`` of (seed, stream), drawn from that seed."""
    rng = np.random.default_rng([seed, stream, 10_000 + index])
    thickness = float(rng.choice(THICKNESSES_MM))
    n_slices = min(round(COVERAGE_MM / thickness), MAX_FRAMES)
    partial = n_slices * thickness < COVERAGE_MM - 10.0
    sx, sy, sz = (round(float(v), 3) for v in rng.uniform(*HEAD_SCALE, 3))
    return TemplateSpec(
        thickness=thickness,
        n_slices=n_slices,
        tilt=float(rng.choice(TILTS_DEG)),
        rows=int(rng.choice(MATRICES)),
        noise=round(float(rng.uniform(*BAKED_NOISE_HU)), 2),
        scale=(sx, sy, sz),
        offset=round(float(rng.uniform(*STACK_OFFSET_MM)), 1) if partial else 0.0,
    )


@cache
def make_template(seed: int, stream: int, index: int) -> Template:
    """Generate template ``index`` of (seed, stream) and its intracranial masks."""
    spec = template_spec(seed, stream, index)
    datasets = synthetic_head_ct(
        seed * 1000 + stream * 100 + index,
        n_slices=spec.n_slices,
        slice_thickness_mm=spec.thickness,
        rows=spec.rows,
        gantry_tilt_deg=spec.tilt,
        noise_hu=spec.noise,
        head_scale=spec.scale,
        stack_offset_mm=spec.offset,
    )
    frames, hu = HeadFrames.from_datasets(datasets)
    spacing = (spec.thickness, frames.spacing[0], frames.spacing[1])
    masks = intracranial_mask(hu, spacing)
    distance = np.asarray(ndimage.distance_transform_edt(~masks.skull, sampling=spacing))
    description = (
        f"{spec.thickness:g} mm x {spec.n_slices}, tilt {spec.tilt:g}, {spec.rows} px, "
        f"noise {spec.noise:g} HU, scale {spec.scale}, offset {spec.offset:g} mm"
    )
    return Template(tuple(datasets), frames, masks, distance, spacing, spec.scale, description)


def touching_centre(
    template: Template, radius_mm: float, rng: np.random.Generator, *, skull_base: bool
) -> tuple[float, float, float] | None:
    """A centre (LPS) from which a lesion of ``radius_mm`` reaches the skull: a brain-core
    voxel ``TOUCH_DEPTH`` radii from it, among the lowest frames of the cavity for the skull
    base, anywhere for the convexity; None where no voxel qualifies."""
    masks, distance = template.masks, template.skull_distance_mm
    low, high = TOUCH_DEPTH
    near = masks.core & (distance >= low * radius_mm) & (distance <= high * radius_mm)
    if skull_base:
        frames = np.nonzero(masks.cavity.any(axis=(1, 2)))[0]
        if len(frames) == 0:
            return None
        top = frames[0] + max(1, int(SKULL_BASE_FRACTION * (frames[-1] - frames[0] + 1)))
        near[top:] = False
    candidates = np.argwhere(near[:, ::2, ::2]) * np.array([1, 2, 2])
    if len(candidates) == 0:
        return None
    centre = template.frames.position_of(candidates[rng.integers(len(candidates))][None])[0]
    return float(centre[0]), float(centre[1]), float(centre[2])


def _head_site(template: Template, head_centred: tuple[float, float, float]) -> NDArray[np.float64]:
    """LPS position of a head-centred point of a (stretched) generated head."""
    return np.asarray(HEAD_CENTRE_MM + np.asarray(head_centred) * np.asarray(template.scale))


def _paint_blob(
    datasets: list[Dataset], template: Template, volume: float, rng: np.random.Generator
) -> tuple[NDArray[np.bool_], str] | None:
    """An irregular 45-95 HU blob anywhere, touching the skull or beside a ventricle."""
    radius = radius_for_volume(volume)
    hu = float(rng.uniform(*BLOB_HU))
    where = rng.choice(["random", "skull base", "convexity", "ventricle"], p=[0.4, 0.3, 0.15, 0.15])
    centre: tuple[float, float, float] | None = None
    if where in ("skull base", "convexity"):
        centre = touching_centre(template, radius, rng, skull_base=where == "skull base")
        if centre is None:
            where = "random"
    elif where == "ventricle":
        ventricle = VENTRICLE_MM[int(rng.integers(2))]
        side = np.sign(ventricle[0])
        lateral = side * (abs(ventricle[0]) + 4.0 + 0.7 * radius)
        point = _head_site(template, (lateral, ventricle[1] + rng.uniform(-15, 15), ventricle[2]))
        centre = (float(point[0]), float(point[1]), float(point[2]))
    try:
        lesion = insert_lesion(
            datasets, center_mm=centre, radius_mm=radius, hu=hu, seed=int(rng.integers(2**31))
        )
    except ValueError:
        return None
    return lesion.masks, f"blob {hu:.0f} HU {lesion.volume_ml:.2f} mL {where}"


def _paint_calcifications(
    datasets: list[Dataset], template: Template, rng: np.random.Generator
) -> tuple[NDArray[np.bool_], list[str]]:
    """One to three calcified foci at typical sites (negatives), their mask."""
    mask = np.zeros((len(datasets), *datasets[0].pixel_array.shape), dtype=bool)
    names = sorted(CALCIFICATION_SITES_MM)
    chosen = rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)
    described = []
    for k in chosen:
        where = np.asarray(CALCIFICATION_SITES_MM[names[int(k)]])
        jitter = rng.uniform(-CALCIFICATION_JITTER_MM, CALCIFICATION_JITTER_MM, 3)
        x, y, z = (float(v) for v in where + jitter)
        centre = _head_site(template, (x, y, z))
        hu = float(rng.uniform(*CALCIFICATION_HU))
        focus = insert_lesion(
            datasets,
            center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
            radius_mm=float(rng.uniform(*CALCIFICATION_RADIUS_MM)),
            hu=hu,
            seed=int(rng.integers(2**31)),
            irregular=False,
        )
        if focus.masks.any():
            mask |= focus.masks
            described.append(f"calcification {names[int(k)]} {hu:.0f} HU")
    return mask, described


def make_painted_case(seed: int, stream: int, index: int) -> PaintedCase:
    """Case ``index`` of (seed, stream): a template of the stream, lesions, calcifications
    and noise, all drawn from the seed (seed, stream, index)."""
    rng = np.random.default_rng([seed, stream, index])
    template = make_template(seed, stream, index % TEMPLATES_PER_STREAM)
    datasets = copy.deepcopy(list(template.datasets))
    described: list[str] = [template.description]
    calcification = np.zeros((len(datasets), *template.masks.cavity.shape[1:]), dtype=bool)
    if rng.random() < CALCIFICATION_FRACTION:
        calcification, names = _paint_calcifications(datasets, template, rng)
        described += names
    mask = np.zeros(calcification.shape, dtype=bool)
    volumes: list[float] = []
    plans: list[tuple[str, float]] = []
    if rng.random() >= EMPTY_FRACTION:
        count = 2 if rng.random() < TWO_LESION_FRACTION else 1
        for _ in range(count):
            volume = float(np.exp(rng.uniform(*np.log(VOLUME_ML))))
            plans.append(
                (str(rng.choice(["blob", "haemorrhage", "stain"], p=[0.45, 0.35, 0.2])), volume)
            )
    for kind, volume in plans:
        if kind == "blob":
            painted = _paint_blob(datasets, template, volume, rng)
            if painted is not None:
                mask |= painted[0]
                described.append(painted[1])
    hu = datasets_hu(datasets)
    for kind, volume in plans:
        if kind == "blob":
            continue
        clearance = 1.3 * radius_for_volume(volume) + CENTRE_MARGIN_MM
        site = (
            Site.DEEP
            if rng.random() < 0.5
            else (Site.LOBAR if kind == "haemorrhage" else Site.CORTICAL)
        )
        try:
            centre = template.frames.choose_centre(site, clearance, rng)
        except ValueError:
            continue
        if kind == "haemorrhage":
            rim = float(rng.uniform(*RIM_HU))
            bleed = Haemorrhage(
                volume_ml=volume,
                rim_hu=rim,
                core_hu=min(rim + float(rng.uniform(*CORE_ABOVE_RIM_HU)), CORE_MAX_HU),
                heterogeneity_hu=float(rng.uniform(2.0, 8.0)),
                lobulation=float(rng.uniform(0.1, 0.4)),
                site=site,
                mass_effect=min(0.08 + 0.01 * volume, 0.25),
            )
            painted_lesion = paint_haemorrhage(hu, template.frames, bleed, centre, rng)
        else:
            stain = ContrastStain(
                volume,
                float(rng.uniform(*STAIN_HU)),
                site,
                lobulation=float(rng.uniform(0.02, 0.15)),
            )
            painted_lesion = paint_contrast(hu, template.frames, stain, centre, rng)
        mask |= painted_lesion.masks
        described.append(f"{kind} {painted_lesion.volume_ml:.2f} mL {site}")
    mask &= ~calcification
    if mask.any():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        volumes = [template.frames.volume_ml(labels == i) for i in range(1, count + 1)]
    if rng.random() < ADDED_NOISE_FRACTION:
        hu = hu + rng.normal(0.0, float(rng.uniform(*ADDED_NOISE_HU)), hu.shape)
    return PaintedCase(
        f"u2-{seed}-{stream}-{index:04d}",
        "synthetic",
        hu.astype(np.float32),
        mask,
        template.masks.cavity | template.masks.brain,
        template.frames.spacing,
        represented_thickness(template.frames.origins @ template.frames.normal),
        tuple(volumes),
        calcification,
        "; ".join(described),
    )


def make_painted_cases(
    count: int, seed: int, *, stream: int = 0, progress: Progress | None = None
) -> list[PaintedCase]:
    """``count`` cases of (seed, stream): training is stream 0, validation 2, held-out 1."""
    cases = []
    for i in range(count):
        cases.append(make_painted_case(seed, stream, i))
        if progress is not None:
            progress(f"case {i + 1}/{count}: {cases[-1].description}")
    return cases
