"""Lesions painted into head CT frames in patient coordinates, synthetic or real series.

``insert_lesion`` paints a plain blob of one HU. ``paint_contrast`` and
``paint_haemorrhage`` paint the two hyperdense findings after thrombectomy with their own
physics, into an HU array whose geometry a ``HeadFrames`` holds:

- contrast staining: sharp edge, homogeneous (``ContrastStain.hu`` 90-160 HU plus a
  little voxel noise), smooth outline, no mass effect; at a deep (basal ganglia) site it
  is a compact blob, at a cortical site an oblate lens just under the brain's surface
  (short axis ``flattening`` times the long one, pointing outward), filling cortex and
  sulci alike, so it follows the cortical ribbon;
- haemorrhage: lobulated outline (random Legendre lobes of amplitude ``lobulation``),
  heterogeneous (``rim_hu`` at the edge rising to ``core_hu`` in the centre, plus smooth
  noise of ``heterogeneity_hu``), a partial-volume edge ``edge_mm`` wide, and mass effect:
  the surrounding brain is pushed radially outward in-plane by ``mass_effect`` times the
  lesion's radius, decaying over one radius (ventricles nearby are shifted and compressed).

Only voxels inside the brain mask whose HU is brain-like (``BRAIN_LIKE_HU``), or specks
that such voxels enclose, are painted. Every painter reports the per-frame mask, the
kind, the planimetric volume and the parameters it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.brain import brain_mask, intracranial_mask
from pipelines.geometry import represented_thickness

BRAIN_LIKE_HU = (-5.0, 90.0)  # voxels a lesion may replace
HETEROGENEITY_HU = 3.0  # standard deviation of insert_lesion's voxel-wise HU variation
CENTRE_MARGIN_MM = 4.0  # clearance between a lesion chosen by seed and the brain's edge
DEEP_LATERAL_MM = (14.0, 34.0)  # basal ganglia: distance from the brain's mid-sagittal x
DEEP_AP_MM = 25.0  # basal ganglia: greatest distance from the brain's centre front to back
LOBES, LOBE_MAX_DEGREE = 10, 6  # a haemorrhage's outline: random Legendre lobes
MIN_DEPTH_MM = 1.5  # brain kept unpainted under the brain mask's edge (the skull's rim)
SPECK_PX = 4  # enclosed non-brain-like pixels a lesion paints over
CORTICAL_DEPTH_MM = (3.0, 6.0)  # depth below the brain's edge of a cortical stain's centre


class LesionKind(StrEnum):
    """The physics a painted lesion follows."""

    CONTRAST = "contrast"
    HAEMORRHAGE = "haemorrhage"


class Site(StrEnum):
    """Where a lesion's centre is drawn: basal ganglia, cortex, or anywhere deep enough."""

    DEEP = "deep"
    CORTICAL = "cortical"
    LOBAR = "lobar"


@dataclass(frozen=True)
class InsertedLesion:
    """Where a lesion was painted: per-dataset masks (input order) and its volume."""

    masks: NDArray[np.bool_]  # (n_datasets, rows, columns)
    volume_ml: float
    center_mm: tuple[float, float, float]  # LPS
    radius_mm: float
    hu: float


@dataclass(frozen=True)
class ContrastStain:
    """Physics of iodinated contrast staining."""

    volume_ml: float  # target; the painted volume is reported by the painter
    hu: float  # 90-160
    site: Site = Site.DEEP
    noise_hu: float = 2.5
    lobulation: float = 0.03
    flattening: float = 0.5  # cortical site: short (radial) over long semi-axes


@dataclass(frozen=True)
class Haemorrhage:
    """Physics of an intraparenchymal haemorrhage."""

    volume_ml: float
    rim_hu: float  # about 50-65
    core_hu: float  # up to 90
    heterogeneity_hu: float  # standard deviation of the smooth HU variation
    lobulation: float  # 0.06-0.3
    site: Site = Site.DEEP
    edge_mm: float = 2.0  # width of the partial-volume edge
    mass_effect: float = 0.15  # radial push at the edge, as a fraction of the radius


@dataclass(frozen=True)
class PaintedLesion:
    """A painted lesion: per-frame mask (input order), kind, volume and parameters."""

    kind: LesionKind
    masks: NDArray[np.bool_]  # (n_frames, rows, columns)
    volume_ml: float
    center_mm: tuple[float, float, float]  # LPS
    parameters: dict[str, float | str]


def plane_points(
    origin: NDArray[np.float64],
    row_dir: NDArray[np.float64],
    col_dir: NDArray[np.float64],
    spacing: tuple[float, float],
    shape: tuple[int, int],
) -> NDArray[np.float64]:
    """LPS position (rows, cols, 3) of every pixel; spacing is (between rows, columns)."""
    r = np.arange(shape[0])[:, None, None] * spacing[0] * col_dir
    c = np.arange(shape[1])[None, :, None] * spacing[1] * row_dir
    return np.asarray(origin + r + c, dtype=np.float64)


@dataclass(frozen=True)
class _Plane:
    """Geometry and HU of one dataset's frame."""

    origin: NDArray[np.float64]
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    spacing: tuple[float, float]
    hu: NDArray[np.float64]

    @property
    def normal(self) -> NDArray[np.float64]:
        """Unit normal, row direction x column direction."""
        return np.asarray(np.cross(self.row_dir, self.col_dir), dtype=np.float64)


def datasets_hu(datasets: Sequence[Dataset]) -> NDArray[np.float64]:
    """Rescaled HU of single-frame datasets, stacked in their order (n, rows, cols)."""
    return np.stack([_plane(ds).hu for ds in datasets])


def _plane(ds: Dataset) -> _Plane:
    """Read the plane geometry and rescaled HU of a single-frame image."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1))
    return _Plane(
        np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        orientation[:3],
        orientation[3:],
        (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        hu + float(ds.get("RescaleIntercept", 0)),
    )


def insert_lesion(
    datasets: Sequence[Dataset],
    *,
    center_mm: tuple[float, float, float] | None,
    radius_mm: float,
    hu: float,
    seed: int,
    irregular: bool = True,
) -> InsertedLesion:
    """Paint a lesion of ``hu`` into the datasets' pixel data, in place.

    The blob is a sphere of ``radius_mm`` about ``center_mm`` (LPS), or, when
    ``irregular``, a star-shaped body whose radius varies smoothly with direction. Only
    voxels whose HU lies in ``BRAIN_LIKE_HU`` before insertion are replaced, by ``hu`` plus
    Gaussian heterogeneity. With ``center_mm`` None the centre is drawn from the seed
    inside the brain. Stored values are written back with each dataset's rescale and
    pixel representation, clipped to its BitsStored range.
    """
    rng = np.random.default_rng(seed)
    planes = [_plane(ds) for ds in datasets]
    radius_of = _radius_function(rng, radius_mm, 0.08 if irregular else 0.0, 4 * irregular)
    reach = radius_of.reach
    centre = (
        np.asarray(center_mm, dtype=np.float64)
        if center_mm is not None
        else _centre_in_brain(planes, reach + CENTRE_MARGIN_MM, rng)
    )
    masks = np.zeros((len(planes), *planes[0].hu.shape), dtype=bool)
    for k, (ds, plane) in enumerate(zip(datasets, planes, strict=True)):
        if abs(float(np.dot(centre - plane.origin, plane.normal))) > reach:
            continue
        offset = (
            plane_points(plane.origin, plane.row_dir, plane.col_dir, plane.spacing, plane.hu.shape)
            - centre
        )
        distance = np.linalg.norm(offset, axis=-1)
        inside = distance <= radius_of(offset / np.maximum(distance, 1e-9)[..., None])
        masks[k] = inside & _brain_like(plane.hu)
        if masks[k].any():
            painted = plane.hu.copy()
            painted[masks[k]] = hu + rng.normal(0.0, HETEROGENEITY_HU, int(masks[k].sum()))
            write_hu(ds, painted)
    volume = _volume_ml(masks, [p.origin for p in planes], planes[0].normal, planes[0].spacing)
    return InsertedLesion(
        masks, volume, (float(centre[0]), float(centre[1]), float(centre[2])), radius_mm, hu
    )


def _brain_like(hu: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Voxels a lesion may replace."""
    return np.asarray((hu >= BRAIN_LIKE_HU[0]) & (hu <= BRAIN_LIKE_HU[1]))


def _paintable(hu: NDArray[np.float64], depth: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Brain voxels a lesion may replace: brain-like HU, and specks that such voxels enclose.

    A speck is a hole of at most ``SPECK_PX`` pixels (noise, a small calcification); a
    larger enclosed region, such as a lesion painted before, is left alone.
    """
    brain_like = _brain_like(hu)
    labels, _ = ndimage.label(ndimage.binary_fill_holes(brain_like) & ~brain_like)
    sizes = np.bincount(labels.ravel())
    speck = (sizes <= SPECK_PX)[labels] & (labels > 0)
    return np.asarray((brain_like | speck) & (depth >= MIN_DEPTH_MM))


def _volume_ml(
    masks: NDArray[np.bool_],
    origins: Sequence[NDArray[np.float64]],
    normal: NDArray[np.float64],
    spacing: tuple[float, float],
) -> float:
    """Planimetric volume: mask area times each frame's represented thickness."""
    depths = np.array([float(np.dot(o, normal)) for o in origins])
    areas = masks.sum(axis=(1, 2)) * spacing[0] * spacing[1]
    return float(np.sum(areas * represented_thickness(depths))) / 1000.0


def _legendre(degree: int, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Legendre polynomial P_degree at ``x`` (closed forms for degrees 2 and 3)."""
    if degree == 2:
        return np.asarray(0.5 * (3 * x**2 - 1))
    if degree == 3:
        return np.asarray(0.5 * (5 * x**3 - 3 * x))
    return np.asarray(np.polynomial.legendre.legval(x, [0.0] * degree + [1.0]))


@dataclass(frozen=True)
class _RadiusFunction:
    """Radius as a function of unit direction: R * exp(sum c_k P_l(u . d_k))."""

    radius: float
    directions: NDArray[np.float64]  # (K, 3) unit vectors
    weights: NDArray[np.float64]  # (K,)
    degrees: NDArray[np.int_]  # (K,) Legendre degrees, 2 and up

    @property
    def reach(self) -> float:
        """An upper bound of the radius over all directions (|P_l| <= 1)."""
        return float(self.radius * np.exp(np.abs(self.weights).sum()))

    @property
    def sampled_reach(self) -> float:
        """The greatest radius over 400 nearly uniform directions, plus 10 per cent."""
        return 1.1 * float(self(_fibonacci_sphere()).max())

    def __call__(self, unit: NDArray[np.float64]) -> NDArray[np.float64]:
        """Radius (mm) along each unit vector of ``unit`` (..., 3)."""
        exponent = np.zeros(unit.shape[:-1])
        for d, w, degree in zip(self.directions, self.weights, self.degrees, strict=True):
            exponent += w * _legendre(int(degree), unit @ d)
        return np.asarray(self.radius * np.exp(exponent))


def _fibonacci_sphere(count: int = 400) -> NDArray[np.float64]:
    """``count`` nearly uniform unit vectors (count, 3)."""
    i = np.arange(count) + 0.5
    z = 1.0 - 2.0 * i / count
    phi = np.pi * (1.0 + 5**0.5) * i
    rho = np.sqrt(1.0 - z**2)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def _same_volume(shape: _RadiusFunction) -> _RadiusFunction:
    """``shape`` rescaled so that its volume is that of a sphere of ``shape.radius``."""
    mean_cube = float(np.mean(shape(_fibonacci_sphere()) ** 3))
    return replace(shape, radius=shape.radius**2 / mean_cube ** (1.0 / 3.0))


def _radius_function(
    rng: np.random.Generator, radius: float, amplitude: float, count: int, degrees: int = 3
) -> _RadiusFunction:
    """``count`` random smooth lobes of Legendre degree 2..``degrees``, weights N(0, amp)."""
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True) + 1e-12
    weights = rng.normal(0.0, amplitude, count)
    chosen = rng.choice(np.arange(2, degrees + 1), size=count)
    return _RadiusFunction(radius, directions, weights, chosen)


def _brain_depth(planes: Sequence[_Plane]) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Distance (mm) of each voxel to the brain's edge, on the frames sorted along the normal.

    The frames are stacked in normal order as if they were orthogonal (a tilt shears the
    stack by a few per cent at most). Returns the distances and the sorting order.
    """
    normal = planes[0].normal
    depths = np.array([float(np.dot(p.origin, normal)) for p in planes])
    order = np.argsort(depths)
    gap = float(np.median(np.diff(depths[order]))) if len(planes) > 1 else 1.0
    spacing = (gap, planes[0].spacing[0], planes[0].spacing[1])
    brain = brain_mask(np.stack([planes[i].hu for i in order]), spacing)
    distance = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=spacing)
    return np.asarray(distance[1:-1, 1:-1, 1:-1]), order


def _centre_in_brain(
    planes: Sequence[_Plane], clearance_mm: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """A brain voxel at least ``clearance_mm`` from the brain's edge, drawn by ``rng``."""
    distance, order = _brain_depth(planes)
    candidates = np.argwhere(distance >= clearance_mm)
    if len(candidates) == 0:
        raise ValueError(f"no brain voxel is {clearance_mm:.1f} mm from the brain's edge")
    k, r, c = candidates[rng.integers(len(candidates))]
    p = planes[order[k]]
    return np.asarray(p.origin + r * p.spacing[0] * p.col_dir + c * p.spacing[1] * p.row_dir)


def write_hu(ds: Dataset, hu: NDArray[np.float64]) -> None:
    """Store HU as the dataset's stored values (rescale, representation, BitsStored)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError("lesion painting needs uncompressed pixel data")
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    signed = int(ds.PixelRepresentation) == 1
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{int(ds.BitsAllocated) // 8}")
    stored = np.clip(np.rint((hu - intercept) / slope), low, high).astype(dtype)
    ds.PixelData = stored.tobytes()


@dataclass(frozen=True)
class HeadFrames:
    """Geometry of a series' frames (input order) and each voxel's depth in the brain."""

    origins: NDArray[np.float64]  # (n, 3) LPS
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    spacing: tuple[float, float]  # (between rows, between columns)
    depth_mm: NDArray[np.float32]  # (n, rows, cols): distance to the brain's edge, 0 outside
    # the brain and where the next frame up or down is outside it (thick slices cut the
    # skull obliquely: a lesion there would touch its partial-volume rim)
    brain_centre_mm: NDArray[np.float64]  # mean LPS position of the brain voxels

    @property
    def normal(self) -> NDArray[np.float64]:
        """Unit slice normal."""
        return np.asarray(np.cross(self.row_dir, self.col_dir), dtype=np.float64)

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> tuple[HeadFrames, NDArray[np.float64]]:
        """The frames' geometry and their HU (n, rows, cols), brain depth from the HU."""
        planes = [_plane(ds) for ds in datasets]
        hu = np.stack([p.hu for p in planes])
        distance, order = _brain_depth(planes)
        brain = np.pad(distance > 0, ((1, 1), (0, 0), (0, 0)), mode="edge")
        distance[~(brain[:-2] & brain[2:])] = 0.0  # over or under the skull's rim
        depth = np.empty(hu.shape, dtype=np.float32)
        depth[order] = distance
        origins = np.stack([p.origin for p in planes])
        p0 = planes[0]
        frames = cls(origins, p0.row_dir, p0.col_dir, p0.spacing, depth, np.zeros(3))
        inside = np.argwhere(depth > 0)
        sample = inside[:: max(len(inside) // 20000, 1)]
        centre = frames.position_of(sample).mean(axis=0) if len(inside) else np.zeros(3)
        return replace(frames, brain_centre_mm=centre), hu

    def volume_ml(self, masks: NDArray[np.bool_]) -> float:
        """Planimetric volume of per-frame masks."""
        return _volume_ml(masks, list(self.origins), self.normal, self.spacing)

    def choose_centre(
        self, site: Site, clearance_mm: float, rng: np.random.Generator
    ) -> NDArray[np.float64]:
        """A centre (LPS) at ``site``, drawn by ``rng``, ``clearance_mm`` inside the brain.

        Deep: ``DEEP_LATERAL_MM`` from the midline, within ``DEEP_AP_MM`` of the brain's
        centre front to back, and at least half the brain's greatest depth; cortical:
        ``CORTICAL_DEPTH_MM`` below the brain's edge (away from the stack's ends); lobar:
        anywhere ``clearance_mm`` deep. A site with no candidate falls back to lobar.
        """
        depth = self.depth_mm
        candidates = np.argwhere(depth >= clearance_mm)
        if site is Site.CORTICAL:
            low, high = CORTICAL_DEPTH_MM
            d = self.origins @ self.normal
            ends = np.minimum(d - d.min(), d.max() - d) >= 2.0 * high  # not the stack's ends
            candidates = np.argwhere((depth >= low) & (depth <= high) & ends[:, None, None])
        elif site is Site.DEEP:
            deep = candidates[depth[tuple(candidates.T)] >= 0.5 * float(depth.max())]
            x, y, _ = (self.position_of(deep) - self.brain_centre_mm).T
            low, high = DEEP_LATERAL_MM
            deep = deep[(np.abs(x) >= low) & (np.abs(x) <= high) & (np.abs(y) <= DEEP_AP_MM)]
            candidates = deep if len(deep) else candidates
        if len(candidates) == 0:
            raise ValueError(f"no brain voxel is {clearance_mm:.1f} mm from the brain's edge")
        return self.position_of(candidates[rng.integers(len(candidates))][None])[0]

    def position_of(self, indices: NDArray[np.intp]) -> NDArray[np.float64]:
        """LPS positions (m, 3) of voxel indices (m, 3) as (frame, row, column)."""
        dy, dx = self.spacing
        k, r, c = indices.T
        return np.asarray(
            self.origins[k] + (r * dy)[:, None] * self.col_dir + (c * dx)[:, None] * self.row_dir
        )

    def windows(
        self, centre: NDArray[np.float64], reach_mm: float, through_mm: float | None = None
    ) -> list[tuple[int, slice, slice, NDArray[np.float64]]]:
        """Square windows about ``centre`` on the frames within ``through_mm`` of it.

        Each is (frame k, row slice, column slice, LPS offsets of its pixels to ``centre``);
        the windows reach ``reach_mm`` in-plane, and ``through_mm`` defaults to it.
        """
        through = reach_mm if through_mm is None else through_mm
        shape = self.depth_mm.shape[1:]
        found = []
        for k, origin in enumerate(self.origins):
            rel = centre - origin
            if abs(float(rel @ self.normal)) > through:
                continue
            ranges = []
            for middle, step, size in zip(
                (rel @ self.col_dir, rel @ self.row_dir), self.spacing, shape, strict=True
            ):
                low = max(int((middle - reach_mm) / step), 0)
                ranges.append(slice(low, max(min(int((middle + reach_mm) / step) + 2, size), low)))
            rows, cols = ranges
            grid = np.mgrid[rows, cols]
            index = np.stack([np.full(grid.shape[1:], k), grid[0], grid[1]], axis=-1)
            offsets = self.position_of(index.reshape(-1, 3)).reshape(*grid.shape[1:], 3) - centre
            found.append((k, rows, cols, offsets))
        return found


def radius_for_volume(volume_ml: float) -> float:
    """Radius (mm) of a sphere of ``volume_ml``."""
    return float((3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


def paint_contrast(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    stain: ContrastStain,
    centre: NDArray[np.float64],
    rng: np.random.Generator,
) -> PaintedLesion:
    """Paint a contrast stain into ``hu`` (n, rows, cols), in place; see the module.

    At a cortical site the stain is an oblate ellipsoid of the same volume whose short
    axis points away from the brain's centre, so it lies along the cortex.
    """
    radius = radius_for_volume(stain.volume_ml)
    radius_of = _same_volume(_radius_function(rng, radius, stain.lobulation, 4))
    axis = centre - frames.brain_centre_mm
    axis /= max(float(np.linalg.norm(axis)), 1e-9)
    long, short = (1.0, 1.0)
    if stain.site is Site.CORTICAL:
        long = stain.flattening ** (-1.0 / 3.0)
        short = stain.flattening * long
    masks = np.zeros(hu.shape, dtype=bool)
    for k, rows, cols, offset in frames.windows(centre, radius_of.sampled_reach * long):
        distance = np.linalg.norm(offset, axis=-1)
        unit = offset / np.maximum(distance, 1e-9)[..., None]
        along = (unit @ axis) ** 2
        edge = radius_of(unit) / np.sqrt((1.0 - along) / long**2 + along / short**2)
        inside = (distance <= edge) & _paintable(hu[k, rows, cols], frames.depth_mm[k, rows, cols])
        window = hu[k, rows, cols]
        window[inside] = stain.hu + rng.normal(0.0, stain.noise_hu, int(inside.sum()))
        masks[k, rows, cols] = inside
    return _painted(LesionKind.CONTRAST, masks, frames, centre, radius, asdict(stain))


def paint_haemorrhage(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    bleed: Haemorrhage,
    centre: NDArray[np.float64],
    rng: np.random.Generator,
) -> PaintedLesion:
    """Push the brain aside, then paint a haemorrhage into ``hu``, in place; see the module."""
    radius = radius_for_volume(bleed.volume_ml)
    lobes = _radius_function(rng, radius, bleed.lobulation, LOBES, degrees=LOBE_MAX_DEGREE)
    radius_of = _same_volume(lobes)
    _push(hu, frames, centre, radius, bleed.mass_effect)
    masks = np.zeros(hu.shape, dtype=bool)
    sigma_px = 2.0 / frames.spacing[1]
    for k, rows, cols, offset in frames.windows(centre, radius_of.sampled_reach + bleed.edge_mm):
        distance = np.linalg.norm(offset, axis=-1)
        edge = radius_of(offset / np.maximum(distance, 1e-9)[..., None])
        alpha = np.clip(0.5 + (edge - distance) / bleed.edge_mm, 0.0, 1.0)
        window = hu[k, rows, cols]
        alpha[~_paintable(window, frames.depth_mm[k, rows, cols])] = 0.0
        smooth = ndimage.gaussian_filter(rng.normal(size=window.shape), sigma_px)
        smooth *= 2.0 * np.sqrt(np.pi) * sigma_px  # unit standard deviation
        core = np.clip(1.0 - (distance / edge) ** 2, 0.0, 1.0)
        lesion = bleed.rim_hu + (bleed.core_hu - bleed.rim_hu) * core
        lesion += bleed.heterogeneity_hu * smooth
        window[:] = alpha * lesion + (1.0 - alpha) * window
        masks[k, rows, cols] = alpha >= 0.5
    return _painted(LesionKind.HAEMORRHAGE, masks, frames, centre, radius, asdict(bleed))


def _push(
    hu: NDArray[np.float64],
    frames: HeadFrames,
    centre: NDArray[np.float64],
    radius: float,
    strength: float,
) -> None:
    """Mass effect: move brain tissue radially outward in-plane, in place.

    A pixel at in-plane distance d from the centre takes the HU from d - u(d), with
    u(d) = strength * r * min(d / r, 1) * exp(-max(d - r, 0) / r) and r the radius on that
    frame. Only brain-like voxels inside the brain exchange values, so bone stays put.
    """
    for k, rows, cols, offset in frames.windows(centre, 4.0 * radius, radius):
        through = float(np.mean(offset @ frames.normal))
        r_k = np.sqrt(max(radius**2 - through**2, 0.0))
        if r_k <= 0 or strength <= 0:
            continue
        in_plane = offset - through * frames.normal
        d = np.maximum(np.linalg.norm(in_plane, axis=-1), 1e-9)
        u = strength * r_k * np.minimum(d / r_k, 1.0) * np.exp(-np.maximum(d - r_k, 0.0) / r_k)
        source = in_plane * ((d - u) / d)[..., None] + (centre - frames.origins[k])
        dy, dx = frames.spacing
        coords = np.stack([source @ frames.col_dir / dy, source @ frames.row_dir / dx])
        moved = ndimage.map_coordinates(hu[k], coords, order=1, mode="nearest")
        window = hu[k, rows, cols]
        keep = _brain_like(window) & _brain_like(moved) & (frames.depth_mm[k, rows, cols] > 0)
        window[keep] = moved[keep]


def _painted(
    kind: LesionKind,
    masks: NDArray[np.bool_],
    frames: HeadFrames,
    centre: NDArray[np.float64],
    radius: float,
    parameters: dict[str, float | str],
) -> PaintedLesion:
    """The painter's report."""
    where = {f"center_{axis}_mm": float(v) for axis, v in zip("xyz", centre, strict=True)}
    values = {k: (str(v) if isinstance(v, StrEnum) else float(v)) for k, v in parameters.items()}
    return PaintedLesion(
        kind,
        masks,
        frames.volume_ml(masks),
        (float(centre[0]), float(centre[1]), float(centre[2])),
        {**values, **where, "radius_mm": radius},
    )


SKULL_BASE_FRACTION = 0.4
"""Skull-base sites: the lowest fraction of the frames that hold cranial cavity."""


def skull_base_centre(
    datasets: Sequence[Dataset], radius_mm: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """A lesion centre (LPS) at the skull base that a lesion of ``radius_mm`` makes touch
    bone: a cavity voxel 0.5-0.8 radii from the skull, among the lowest
    ``SKULL_BASE_FRACTION`` of the cavity's frames, drawn by ``rng``."""
    planes = [_plane(ds) for ds in datasets]
    normal = planes[0].normal
    depths = np.array([float(np.dot(p.origin, normal)) for p in planes])
    order = np.argsort(depths)
    gap = float(np.median(np.diff(depths[order]))) if len(planes) > 1 else 1.0
    spacing = (gap, planes[0].spacing[0], planes[0].spacing[1])
    hu = np.stack([planes[i].hu for i in order])
    masks = intracranial_mask(hu, spacing)
    distance = ndimage.distance_transform_edt(~masks.skull, sampling=spacing)
    frames = np.nonzero(masks.cavity.any(axis=(1, 2)))[0]
    if len(frames) == 0:
        raise ValueError("no cranial cavity found")
    top = frames[0] + max(1, int(SKULL_BASE_FRACTION * (frames[-1] - frames[0] + 1)))
    near = masks.core & (distance >= 0.5 * radius_mm) & (distance <= 0.8 * radius_mm)
    near[top:] = False
    candidates = np.argwhere(near)
    if len(candidates) == 0:
        raise ValueError(f"no skull-base voxel lies {radius_mm:.1f} mm from the skull")
    k, r, c = candidates[rng.integers(len(candidates))]
    p = planes[order[k]]
    centre = p.origin + r * p.spacing[0] * p.col_dir + c * p.spacing[1] * p.row_dir
    return float(centre[0]), float(centre[1]), float(centre[2])
