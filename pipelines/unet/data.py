"""Training cases for the learned segmenters: head CTs with painted hyperdense lesions.

A case is a head CT series (its frames as acquired, in HU) and the per-frame mask of
every lesion painted into it. The base is either the synthetic head CT of
``pipelines.synthetic`` (tilt 0-20 degrees, 3 or 5 mm slices, scanner noise 3-7 HU added
after painting) or the real GE head CT of the shared data folder (its own noise). Lesions
come from ``pipelines.lesions``: half are haemorrhages (lobulated, heterogeneous, rim
50-66 HU rising to a core of up to 90 HU, partial-volume edge, mass effect), half are
homogeneous, sharp-edged stains of 50-160 HU at deep or cortical sites (contrast staining
at 90-160 HU, and at 50-90 HU blobs like a uniform haematoma). Volumes are log-uniform in
1.5-40 mL; a case holds one lesion (70%) or two, and ``EMPTY_FRACTION`` of the cases
none. Every number is drawn from the case's own seed, so a case is reproducible alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pydicom
from numpy.typing import NDArray

from pipelines.cohort import GE_HEADCT, shared_dir
from pipelines.geometry import represented_thickness
from pipelines.lesions import (
    CENTRE_MARGIN_MM,
    ContrastStain,
    Haemorrhage,
    HeadFrames,
    Site,
    paint_contrast,
    paint_haemorrhage,
    radius_for_volume,
)
from pipelines.synthetic import synthetic_head_ct

VOLUME_ML = (1.5, 40.0)  # log-uniform
STAIN_HU = (50.0, 160.0)
RIM_HU = (50.0, 66.0)
CORE_ABOVE_RIM_HU = (5.0, 25.0)  # core = rim + this, at most 90 HU
NOISE_HU = (3.0, 7.0)  # scanner noise added to a synthetic base after painting
TILTS_DEG = (0.0, 12.0, 20.0)
THICKNESSES_MM = (3.0, 5.0)
COVERAGE_MM = 125.0  # a synthetic stack covers this much along its normal
EMPTY_FRACTION = 0.1

Source = str  # "synthetic" or "ge"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class LesionCase:
    """One case: frames (as acquired, file order), their lesion mask and the brain.

    ``hu`` and ``mask`` are (frames, rows, columns); ``spacing`` is the pixel spacing
    (between rows, between columns) in mm; ``brain`` is where a lesion may lie.
    """

    case_id: str
    source: Source
    hu: NDArray[np.float32]
    mask: NDArray[np.bool_]
    brain: NDArray[np.bool_]
    spacing: tuple[float, float]
    thickness_mm: NDArray[np.float64]  # (frames,): represented thickness of each frame
    lesion_volumes_ml: tuple[float, ...]

    def volume_ml(self, mask: NDArray[np.bool_]) -> float:
        """Planimetric volume of a mask on the case's frames."""
        areas = mask.sum(axis=(1, 2)) * self.spacing[0] * self.spacing[1]
        return float(np.sum(areas * self.thickness_mm)) / 1000.0

    @property
    def positive_frames(self) -> NDArray[np.bool_]:
        """Frames that hold lesion (the slice classifier's positives)."""
        return np.asarray(self.mask.any(axis=(1, 2)))


@dataclass(frozen=True)
class _Template:
    """A lesion-free base series: its geometry and HU."""

    frames: HeadFrames
    hu: NDArray[np.float64]
    source: Source


@cache
def _synthetic_template(tilt_deg: float, thickness_mm: float) -> _Template:
    """The noise-free synthetic head CT with this tilt and slice thickness."""
    datasets = synthetic_head_ct(
        0,
        n_slices=round(COVERAGE_MM / thickness_mm),
        slice_thickness_mm=thickness_mm,
        rows=256,
        gantry_tilt_deg=tilt_deg,
        noise_hu=0.0,
    )
    frames, hu = HeadFrames.from_datasets(datasets)
    return _Template(frames, hu, "synthetic")


@cache
def _ge_template() -> _Template | None:
    """The real GE head CT of the shared data folder, or None where it is absent."""
    folder = shared_dir() / GE_HEADCT
    paths = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if not paths:
        return None
    frames, hu = HeadFrames.from_datasets([pydicom.dcmread(p) for p in paths])
    return _Template(frames, hu, "ge")


def ge_available() -> bool:
    """Whether the real GE head CT can be used as a base."""
    return _ge_template() is not None


def draw_lesions(rng: np.random.Generator) -> list[ContrastStain | Haemorrhage]:
    """A case's lesion physics (see the module); empty for a lesion-free case."""
    if rng.random() < EMPTY_FRACTION:
        return []
    count = 1 if rng.random() < 0.7 else 2
    plan: list[ContrastStain | Haemorrhage] = []
    for _ in range(count):
        volume = float(np.exp(rng.uniform(*np.log(VOLUME_ML))))
        if rng.random() < 0.5:
            rim = float(rng.uniform(*RIM_HU))
            core = min(rim + float(rng.uniform(*CORE_ABOVE_RIM_HU)), 90.0)
            site = Site.DEEP if rng.random() < 0.6 else Site.LOBAR
            plan.append(
                Haemorrhage(
                    volume_ml=volume,
                    rim_hu=rim,
                    core_hu=core,
                    heterogeneity_hu=float(rng.uniform(2.0, 9.0)),
                    lobulation=float(rng.uniform(0.1, 0.4)),
                    site=site,
                    mass_effect=min(0.08 + 0.01 * volume, 0.25),
                )
            )
        else:
            site = Site.CORTICAL if rng.random() < 0.5 else Site.DEEP
            hu = float(rng.uniform(*STAIN_HU))
            plan.append(ContrastStain(volume, hu, site, lobulation=float(rng.uniform(0.02, 0.15))))
    return plan


def make_case(case_id: str, source: Source, seed: Sequence[int]) -> LesionCase:
    """Paint the lesions drawn from ``seed`` into a base of ``source``.

    Raises ``FileNotFoundError`` for ``source="ge"`` where the GE head CT is absent.
    """
    rng = np.random.default_rng(list(seed))
    if source == "ge":
        template = _ge_template()
        if template is None:
            raise FileNotFoundError(f"the GE head CT is not in {shared_dir() / GE_HEADCT}")
        noise = 0.0
    else:
        tilt = float(rng.choice(TILTS_DEG))
        thickness = float(rng.choice(THICKNESSES_MM))
        template = _synthetic_template(tilt, thickness)
        noise = float(rng.uniform(*NOISE_HU))
    hu = template.hu.copy()
    mask = np.zeros(hu.shape, dtype=bool)
    volumes = []
    for physics in draw_lesions(rng):
        clearance = 1.3 * radius_for_volume(physics.volume_ml) + CENTRE_MARGIN_MM
        centre = template.frames.choose_centre(physics.site, clearance, rng)
        if isinstance(physics, ContrastStain):
            painted = paint_contrast(hu, template.frames, physics, centre, rng)
        else:
            painted = paint_haemorrhage(hu, template.frames, physics, centre, rng)
        mask |= painted.masks
        volumes.append(painted.volume_ml)
    if noise:
        hu += rng.normal(0.0, noise, hu.shape)
    return LesionCase(
        case_id,
        template.source,
        hu.astype(np.float32),
        mask,
        template.frames.depth_mm > 0,
        template.frames.spacing,
        represented_thickness(template.frames.origins @ template.frames.normal),
        tuple(volumes),
    )


def make_cases(
    count: int,
    seed: int,
    *,
    stream: int = 0,
    ge_fraction: float = 0.25,
    progress: Progress | None = None,
) -> list[LesionCase]:
    """``count`` cases from ``seed``; case i is drawn from the seed (seed, stream, i).

    About ``ge_fraction`` of them (every case whose index falls on that share) use the
    GE head CT as base when it is present, the rest the synthetic head CT. Different
    ``stream`` values give disjoint cases (training 0, held-out 1).
    """
    use_ge = ge_available() and ge_fraction > 0
    every = max(1, round(1.0 / ge_fraction)) if use_ge else 0
    cases = []
    for i in range(count):
        source = "ge" if every and i % every == every - 1 else "synthetic"
        cases.append(make_case(f"s{seed}-{stream}-{i:04d}", source, (seed, stream, i)))
        if progress is not None:
            progress(f"case {i + 1}/{count} ({source})")
    return cases
