"""Training and held-out cases of the learned segmenter (U-Net 3.0.0): generated heads only.

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
kept in their own mask.

A real scanner's brain grows denser toward the inner table (the real GE head: 24-28 HU
deep, 36 HU at 8-12 mm, 49 HU at 2-3 mm, 61 HU at 1-2 mm from the skull): the inner
table's partial volume, spread further through-plane by thick frames, and beam hardening's
cupping. The generated heads are flat there, so a case draws a rise (:class:`BoneRise`,
:func:`draw_rise`: none for ``FLAT_FRACTION`` of the cases, else amplitudes and lengths
over ranges that hold the GE profile and flatter scanners) and adds it by distance to the
skull (the partial volume in 3-D on the acquired frames, so the skull base and vertex rise
through-plane; the cupping in each frame's plane) to every voxel of the cranial cavity,
normal heads and lesion-free frames included. Blood carries
the rise as brain does (lesions painted first, the rise added over them); in
``REPLACE_FRACTION`` of the cases the lesions keep their painted HU instead, as a lesion
painted into a real head lacks the rise. Version 2.0.0 was trained without the rise.
Nothing here reads the shared data folder: the real head CT is only ever an evaluation
base (``bench/segmenter_eval.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
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
    write_hu,
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

FLAT_FRACTION = 0.2  # cases without an added rise (a flat scanner, like the 2.0.0 heads)
PARTIAL_RISE_HU = (5.0, 45.0)  # the inner table's blurred edge: amplitude at the bone
PARTIAL_LENGTH_MM = (0.6, 2.0)  # its decay length, plus PARTIAL_PER_THICKNESS x thickness
PARTIAL_PER_THICKNESS = 0.15  # thick frames spread the edge through-plane
CUPPING_RISE_HU = (2.0, 18.0)  # beam hardening (cupping): amplitude at the bone
CUPPING_LENGTH_MM = (8.0, 18.0)  # its Gaussian fall-off length
REPLACE_FRACTION = 0.35  # cases whose lesions replace the risen HU (lacking the rise)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PaintedCase(LesionCase):
    """A generated case: lesion mask (positives) and calcification mask (negatives), the
    scanner's rise it was rendered with (None: flat) and whether its lesions lack it."""

    calcification: NDArray[np.bool_]
    description: str
    rise: BoneRise | None = None
    lesions_lack_rise: bool = False


@dataclass(frozen=True)
class BoneRise:
    """A scanner's HU rise toward the inner table: the partial volume of the inner table,
    by 3-D distance to the skull (exponential, ``partial_mm`` long, longer in thick frames:
    the skull base and vertex rise through-plane), and beam hardening's cupping, by
    distance to the skull in the frame's own plane (Gaussian, ``cupping_mm`` long: each
    frame is reconstructed from its own projections)."""

    partial_hu: float
    partial_mm: float
    cupping_hu: float
    cupping_mm: float

    def __call__(
        self, distance_mm: NDArray[np.floating], in_plane_mm: NDArray[np.floating]
    ) -> NDArray[np.float32]:
        """The rise (HU) at ``distance_mm`` from the skull (3-D) and ``in_plane_mm`` from
        it in the frame's plane."""
        d = np.asarray(distance_mm, dtype=np.float32)
        planar = np.asarray(in_plane_mm, dtype=np.float32)
        partial = self.partial_hu * np.exp(-d / self.partial_mm)
        cupping = self.cupping_hu * np.exp(-((planar / self.cupping_mm) ** 2))
        return np.asarray(partial + cupping, dtype=np.float32)

    def describe(self) -> str:
        """One line for a case's description."""
        return (
            f"rise {self.partial_hu:.0f} HU/{self.partial_mm:.1f} mm + "
            f"{self.cupping_hu:.0f} HU/{self.cupping_mm:.0f} mm"
        )


def draw_rise(rng: np.random.Generator, thickness_mm: float) -> BoneRise | None:
    """A rise drawn over a range that holds the real GE head's (about +35 HU at 1-2 mm,
    +23 at 2-3 mm, +10 at 8-12 mm above the deep brain) and flatter scanners; None for a
    flat scanner (``FLAT_FRACTION``)."""
    if rng.random() < FLAT_FRACTION:
        return None
    return BoneRise(
        partial_hu=float(rng.uniform(*PARTIAL_RISE_HU)),
        partial_mm=float(rng.uniform(*PARTIAL_LENGTH_MM)) + PARTIAL_PER_THICKNESS * thickness_mm,
        cupping_hu=float(rng.uniform(*CUPPING_RISE_HU)),
        cupping_mm=float(rng.uniform(*CUPPING_LENGTH_MM)),
    )


def ge_like_rise(thickness_mm: float) -> BoneRise:
    """A rise of the real GE head's size (its shell medians above the deep brain within
    about 5 HU of GE's, rendered on a generated head), for held-out normal heads."""
    return BoneRise(6.0, 1.0 + PARTIAL_PER_THICKNESS * thickness_mm, 11.0, 13.0)


def skull_distances(
    skull: NDArray[np.bool_], spacing: tuple[float, float, float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Distance (mm) of every voxel to the skull in 3-D and within its own frame (a frame
    without skull: infinitely far)."""
    distance = np.asarray(ndimage.distance_transform_edt(~skull, sampling=spacing))
    in_plane = np.full(skull.shape, np.inf)
    for k, frame in enumerate(skull):
        if frame.any():
            in_plane[k] = ndimage.distance_transform_edt(~frame, sampling=spacing[1:])
    return distance, in_plane


def render_rise(datasets: Sequence[Dataset], rise: BoneRise, thickness_mm: float) -> None:
    """Add ``rise`` to the cranial cavity of a series in place (single frames in slice
    order, ``thickness_mm`` apart), by each voxel's 3-D distance to the skull."""
    frames, hu = HeadFrames.from_datasets(datasets)
    spacing = (thickness_mm, frames.spacing[0], frames.spacing[1])
    masks = intracranial_mask(hu, spacing)
    distance, in_plane = skull_distances(masks.skull, spacing)
    hu[masks.cavity] += rise(distance[masks.cavity], in_plane[masks.cavity])
    for ds, frame in zip(datasets, hu, strict=True):
        write_hu(ds, frame)


@dataclass(frozen=True)
class Template:
    """A lesion-free generated series and what painting needs of it."""

    datasets: tuple[Dataset, ...]
    frames: HeadFrames
    masks: Intracranial
    skull_distance_mm: NDArray[np.float64]  # (frames, rows, cols) distance to the skull
    in_plane_distance_mm: NDArray[np.float64]  # the same within each frame
    spacing: tuple[float, float, float]  # (slice gap, row, column) mm
    scale: tuple[float, float, float]
    description: str
    thickness: float


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
    distance, in_plane = skull_distances(masks.skull, spacing)
    description = (
        f"{spec.thickness:g} mm x {spec.n_slices}, tilt {spec.tilt:g}, {spec.rows} px, "
        f"noise {spec.noise:g} HU, scale {spec.scale}, offset {spec.offset:g} mm"
    )
    return Template(
        tuple(datasets),
        frames,
        masks,
        distance,
        in_plane,
        spacing,
        spec.scale,
        description,
        spec.thickness,
    )


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
    rise = draw_rise(rng, template.thickness)
    replace = False
    if rise is not None:
        replace = bool(rng.random() < REPLACE_FRACTION)
        risen = template.masks.cavity & ~mask if replace else template.masks.cavity
        hu[risen] += rise(template.skull_distance_mm[risen], template.in_plane_distance_mm[risen])
        described.append(rise.describe() + (", lesions replace it" if replace else ""))
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
        rise,
        replace,
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
