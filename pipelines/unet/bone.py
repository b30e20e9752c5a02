"""What the skull does to the HU beside it on a real head CT, and how the U-Net is kept
from reading it as haemorrhage.

On a real head CT the brain grows denser toward the inner table: beam hardening (cupping)
and the partial volume of bone in thick, tilted frames lift the cortex by 10-30 HU within
a centimetre of the skull (the real GE head: median 28 HU deep, 36 HU at 8-12 mm, 49 HU
at 2-3 mm, 61 HU at 1-2 mm from the skull). The generated heads the network was trained
on rise only by their grey-matter ribbon (``REFERENCE_RISE_HU``), so on a real head the
network read that rim as haemorrhage. Two steps, both on the acquired frames:

- :func:`flatten_bone_rise`, before the network: the series' own rise (median HU of the
  cranial cavity by distance to the skull over the whole series, above the deep brain's
  median) less the reference is subtracted, so the network sees the rise it was trained
  on. A median over a shell that wraps the skull is not moved by a lesion covering a
  minority of it, and a lesion's HU stays above its shell's after the shift. The profile
  is the whole series' (per slab of three frames, an 18 mL haematoma at the skull base
  lifted its own slab's medians and was flattened away).
- :func:`bone_ramps`, after it: a found region that lies within ``RAMP_REACH_MM`` of the
  skull and whose HU falls away from the skull by at least ``RAMP_SLOPE_HU_PER_MM`` is the
  skull's partial-volume and beam-hardening ramp, not blood: blood is a plateau whatever
  its distance to bone, and a lesion reaching deeper than ``RAMP_REACH_MM`` is never
  tested. A region lying wholly in the skull's partial-volume band (no voxel in the
  cavity) is bone, not blood, and dropped too.
- :func:`calcification_halo`: the voxels within ``CALCIFICATION_HALO_MM`` of a
  calcification carry its blurred edge (the scanner's point spread), not blood.
- :func:`partial_volume_foci`: a calcification smaller than the slice is diluted by the
  frame's thickness below the calcification rule's 180 HU; what the network finds of it
  is a region held by one frame, away from the skull, with a dense core above blood's
  range in a halo of blood-range HU (the real GE head: one 4 mm frame, core 168 HU,
  median 74 HU, 0.13 mL). A haematoma (45-95 HU) has no such core and a contrast stain
  (130-160 HU) is a plateau whose median lies above blood's range.
- :func:`skull_band`: the threshold baseline's band test on what the network finds: a
  region with less than ``band_core_fraction`` of its volume in the brain's core that
  never reaches ``band_depth_mm`` from the skull is tissue of the skull's band (on thin
  frames cut along the skull base the network called grey matter of 41 HU there, 0.13 mL
  on a generated 1 mm head), not blood: a haematoma touching bone reaches into the core.
"""

from __future__ import annotations

import itertools

import edt
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.hyperdense import CALCIFICATION_WINDOW_MM, HyperdenseParameters
from pipelines.measure import bounding_box

SHELL_EDGES_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 25.0)
"""Distance-to-skull shells (mm) of the rise profile; deep brain lies beyond the last."""

REFERENCE_RISE_HU = (14.0, 14.0, 12.0, 11.0, 5.0, 2.0, 0.0, 0.0, 0.0, 0.0)
"""Rise of each shell's median above the deep brain in the generated training heads: the
90th percentile over 3-frame slabs of four generated heads (1, 3, 5 and 7 mm slices)."""

DISTANCE_CAP_MM = SHELL_EDGES_MM[-1]
"""Distances to the skull are kept up to here: beyond it lies the deep brain (the shells'
end), and a region reaching it is no ramp (``RAMP_REACH_MM`` is shorter)."""

MIN_SHELL_VOXELS = 200
"""Fewest voxels a shell needs for its median (a shell with fewer is not flattened)."""

RAMP_REACH_MM = 10.0
"""Beyond this distance from the skull the real rise has faded (GE: 4 HU above the
reference at 12-16 mm); a region reaching deeper is no ramp of the skull."""

RAMP_SLOPE_HU_PER_MM = 2.0
"""A region whose HU falls by this much per mm away from the skull (least squares over its
voxels) is a ramp; the real rise falls 3-13 HU/mm, noise on a 0.1 mL region moves a
plateau's slope by well under 1 HU/mm."""


FOCUS_CORE_HU = 120.0
"""A dense core this high (in-plane mean over ``CALCIFICATION_WINDOW_MM``) is above acute
blood (45-95 HU plus noise) and is the issue's calcification core (> ~120 HU)."""

FOCUS_MEDIAN_HU = 100.0
"""A partial-volumed focus is mostly halo: its median lies in blood's range, below this;
a contrast stain's plateau (130-160 HU) lies above it."""

CALCIFICATION_HALO_MM = 1.5
"""A calcification's edge is spread over about this distance by the scanner's point spread
(a head kernel's FWHM is 0.8-1.2 mm): its halo there reads 60-150 HU."""


def calcification_halo(
    calcified: NDArray[np.bool_], spacing: tuple[float, float, float]
) -> NDArray[np.bool_]:
    """Voxels (not calcified) within ``CALCIFICATION_HALO_MM`` of a calcified voxel (the
    distance is computed on the calcifications' box grown by the halo: no voxel outside it
    is that close)."""
    halo = np.zeros(calcified.shape, dtype=bool)
    if not calcified.any():
        return halo
    box = bounding_box(
        calcified, tuple(int(np.ceil(CALCIFICATION_HALO_MM / s)) + 1 for s in spacing)
    )
    distance = ndimage.distance_transform_edt(~calcified[box], sampling=spacing)
    halo[box] = (distance > 0) & (distance <= CALCIFICATION_HALO_MM)
    return halo


def skull_distance(
    skull: NDArray[np.bool_], spacing: tuple[float, float, float]
) -> NDArray[np.float32]:
    """Distance (mm) of every voxel of a frame stack to the nearest skull voxel, capped at
    ``DISTANCE_CAP_MM`` (every use reads distances only up to there). The ``edt`` package's
    float32 transform: on 300 frames of 512 x 512 it adds the 300 MB of its result where
    scipy's adds 2 GB (its int32 feature transform and float64 distances), in a tenth of
    the time, equal to 2e-5 mm."""
    if not skull.any():
        return np.full(skull.shape, DISTANCE_CAP_MM, dtype=np.float32)
    distance = edt.edt(~skull, anisotropy=spacing, black_border=False, parallel=1)
    return np.asarray(np.minimum(distance, DISTANCE_CAP_MM, out=distance), dtype=np.float32)


def shell_medians(hu: NDArray[np.floating], distance: NDArray[np.floating]) -> NDArray[np.float64]:
    """Median of ``hu`` in each shell of ``SHELL_EDGES_MM`` by ``distance`` (NaN: fewer
    than ``MIN_SHELL_VOXELS``); both are the cavity's voxels, as flat arrays."""
    out = np.full(len(SHELL_EDGES_MM) - 1, np.nan)
    shell = np.searchsorted(np.asarray(SHELL_EDGES_MM), distance, side="right") - 1
    for i in range(len(out)):
        values = hu[shell == i]
        if values.size >= MIN_SHELL_VOXELS:
            out[i] = float(np.median(values))
    return out


def flatten_bone_rise(
    hu: NDArray[np.floating], distance: NDArray[np.floating], cavity: NDArray[np.bool_]
) -> NDArray[np.float32]:
    """``hu`` with the cavity's rise toward the skull above ``REFERENCE_RISE_HU`` removed
    (``distance`` as :func:`skull_distance`). Works on the cavity's voxels as flat arrays:
    no whole-volume temporaries beside the result."""
    flat = np.array(hu, dtype=np.float32)
    cavity_hu, cavity_mm = flat[cavity], distance[cavity]
    deep = cavity_hu[cavity_mm >= SHELL_EDGES_MM[-1]]
    if deep.size < MIN_SHELL_VOXELS:
        return flat
    baseline = float(np.median(deep))
    excess = shell_medians(cavity_hu, cavity_mm) - baseline - np.asarray(REFERENCE_RISE_HU)
    excess = np.clip(np.nan_to_num(excess, nan=0.0), 0.0, None)
    centres = [(a + b) / 2.0 for a, b in itertools.pairwise(SHELL_EDGES_MM)]
    flat[cavity] = cavity_hu - np.interp(cavity_mm, centres, excess, right=0.0).astype(np.float32)
    return flat


def bone_ramps(
    found: NDArray[np.bool_], hu: NDArray[np.floating], distance: NDArray[np.floating]
) -> NDArray[np.bool_]:
    """The 3-D connected regions of ``found`` that are ramps of the skull or lie wholly in
    it (``distance`` 0; see the module)."""
    labels, count = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros(found.shape, dtype=bool)
    region = labels[found] - 1  # per found voxel, in one order for all three
    d = distance[found].astype(np.float64)
    h = hu[found].astype(np.float64)
    n = np.bincount(region, minlength=count).astype(np.float64)
    mean_d = np.bincount(region, d, count) / n
    mean_h = np.bincount(region, h, count) / n
    var_d = np.bincount(region, d * d, count) / n - mean_d**2
    cov = np.bincount(region, d * h, count) / n - mean_d * mean_h
    slope = np.where(var_d > 1e-6, cov / np.maximum(var_d, 1e-6), 0.0)
    reach = np.full(count, -np.inf)
    np.maximum.at(reach, region, d)
    ramp = (reach <= RAMP_REACH_MM) & ((slope <= -RAMP_SLOPE_HU_PER_MM) | (reach <= 0.0))
    return np.asarray(np.concatenate([[False], ramp])[labels])


def partial_volume_foci(
    found: NDArray[np.bool_],
    hu: NDArray[np.floating],
    distance: NDArray[np.floating],
    pixel_mm: float,
) -> NDArray[np.bool_]:
    """The 3-D connected regions of ``found`` that are calcifications diluted by a thick
    frame (see the module): held by one frame, no voxel within ``RAMP_REACH_MM`` of the
    skull (``distance`` as :func:`skull_distance`: the skull's own partial volume is the
    ramp rule's), an in-plane mean over ``CALCIFICATION_WINDOW_MM`` (pixels of
    ``pixel_mm``; the calcification rule's window) of at least ``FOCUS_CORE_HU`` and a
    median HU below ``FOCUS_MEDIAN_HU``."""
    side = max(1, 2 * round((CALCIFICATION_WINDOW_MM / pixel_mm - 1) / 2) + 1)
    foci = np.zeros(found.shape, dtype=bool)
    labels, _ = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or box[0].stop - box[0].start != 1:
            continue
        region = labels[box] == i
        if float(distance[box][region].min()) <= RAMP_REACH_MM:
            continue
        values = hu[box][region]
        if float(np.median(values)) >= FOCUS_MEDIAN_HU:
            continue
        grown = tuple(
            slice(max(s.start - side // 2, 0), s.stop + side // 2) if axis else s
            for axis, s in enumerate(box)
        )
        local = ndimage.uniform_filter(np.asarray(hu[grown], dtype=np.float32), (1, side, side))
        inner = tuple(
            slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown, strict=True)
        )
        if float(local[inner][region].max()) >= FOCUS_CORE_HU:
            foci[box] |= region
    return foci


def skull_band(
    found: NDArray[np.bool_], core: NDArray[np.bool_], distance: NDArray[np.floating]
) -> NDArray[np.bool_]:
    """The 3-D connected regions of ``found`` with less than the threshold baseline's
    ``band_core_fraction`` of their voxels in the brain's ``core`` that never reach its
    ``band_depth_mm`` from the skull (``distance`` as :func:`skull_distance`)."""
    p = HyperdenseParameters()
    labels, count = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros(found.shape, dtype=bool)
    region = labels[found] - 1
    n = np.bincount(region, minlength=count).astype(np.float64)
    in_core = np.bincount(region, core[found].astype(np.float64), count) / n
    depth = np.full(count, -np.inf)
    np.maximum.at(depth, region, distance[found].astype(np.float64))
    band = (in_core < p.band_core_fraction) & (depth < p.band_depth_mm)
    return np.asarray(np.concatenate([[False], band])[labels])
