"""Haematoma volume by the ABC/2 rule, as the expansion studies measure it.

ABC/2 (Kothari et al.; Lee et al. write it 0.523 x D1 x D2 x D3):

- D1 (A): the greatest diameter of the haematoma on the slice where its area is largest;
- D2 (B): its greatest extent on that slice perpendicular to D1;
- D3 (C): the number of slices holding haematoma times the slice spacing (the
  craniocaudal extent; Kothari's weighting of partial slices is not applied, so thick
  slices that graze the haematoma's poles make ABC/2 exceed the planimetric volume);
- volume = ``ABC_FACTOR`` x D1 x D2 x D3 (pi / 6 = 0.5236: the ellipsoid in its box).

Diameters are measured between pixel centres plus one pixel (edge to edge), so a
one-pixel haematoma measures one pixel across. Pure functions of a mask and spacings.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import ConvexHull, QhullError

ABC_FACTOR = 0.523
MM3_PER_ML = 1000.0


def _hull_points(points: NDArray[np.float64]) -> NDArray[np.float64]:
    """The convex hull's vertices (all points when they are fewer than 3 or collinear)."""
    if len(points) < 3:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return points


def diameters_mm(
    frame_mask: NDArray[np.bool_], spacing_mm: tuple[float, float]
) -> tuple[float, float]:
    """(D1, D2) of one frame's mask: greatest diameter and greatest perpendicular extent."""
    if not frame_mask.any():
        return 0.0, 0.0
    dr, dc = spacing_mm
    idx = np.argwhere(frame_mask).astype(np.float64)
    points = np.column_stack([idx[:, 0] * dr, idx[:, 1] * dc])
    hull = _hull_points(points)
    gaps = hull[:, None, :] - hull[None, :, :]
    lengths = np.linalg.norm(gaps, axis=-1)
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    pixel = 0.5 * (dr + dc)
    d1 = float(lengths[i, j])
    if d1 == 0.0:
        return pixel, pixel
    along = gaps[i, j] / d1
    across = np.array([-along[1], along[0]])
    projected = points @ across
    return d1 + pixel, float(projected.max() - projected.min()) + pixel


def abc2_diameters_mm(
    mask: NDArray[np.bool_], spacing_mm: tuple[float, float], slice_spacing_mm: float
) -> tuple[float, float, float]:
    """(D1, D2, D3) in mm of a haematoma mask (frames, rows, columns); zeros when empty."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be (frames, rows, columns), not shape {mask.shape}")
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        return 0.0, 0.0, 0.0
    d1, d2 = diameters_mm(mask[int(np.argmax(areas))], spacing_mm)
    return d1, d2, float((areas > 0).sum()) * slice_spacing_mm


def abc2_volume_ml(
    mask: NDArray[np.bool_], spacing_mm: tuple[float, float], slice_spacing_mm: float
) -> float:
    """ABC/2 volume in mL: ``ABC_FACTOR`` x D1 x D2 x D3 (see the module)."""
    d1, d2, d3 = abc2_diameters_mm(mask, spacing_mm, slice_spacing_mm)
    return ABC_FACTOR * d1 * d2 * d3 / MM3_PER_ML
