"""Pre- and post-processing of BLAST-CT v1 around the network, on numpy arrays.

The network expects (z, y, x) axes running along +z, +y, +x of the patient (LPS) at
1 mm, HU windowed to -15..100 and scaled to [-1, 1]. Our volume is an orthogonal grid
along the slice normal and the in-plane directions (gantry tilt already removed), so only
an axis permutation and flips are needed before resampling; the way back is nearest
neighbour onto the same grid, then the inverse permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

WINDOW_HU = (-15.0, 100.0)
RESOLUTION_MM = 1.0


@dataclass(frozen=True)
class Reorientation:
    """Array axes ``order`` of the source, each then reversed where ``flip`` is true."""

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def apply(self, array: NDArray[np.generic]) -> NDArray[np.generic]:
        """Source array (3-D) -> reoriented array."""
        out = np.transpose(array, self.order)
        return np.ascontiguousarray(
            out[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]
        )

    def undo(self, array: NDArray[np.generic]) -> NDArray[np.generic]:
        """Reoriented array (3-D, or with leading channel axes) -> source axes."""
        lead = array.ndim - 3
        flipped = array[
            (Ellipsis, *(slice(None, None, -1) if f else slice(None) for f in self.flip))
        ]
        inverse = np.argsort(self.order)
        return np.ascontiguousarray(
            np.transpose(flipped, (*range(lead), *(lead + int(i) for i in inverse)))
        )

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Source voxel spacing in reoriented axis order."""
        return (spacing[self.order[0]], spacing[self.order[1]], spacing[self.order[2]])


def radiological(affine: NDArray[np.float64]) -> Reorientation:
    """The permutation and flips that make array axes run along +z, +y, +x (LPS).

    For patient axes z, y, x in turn, the source axis with the largest direction cosine
    along it is taken (each source axis once), reversed if that cosine is negative.
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    order: list[int] = []
    flip: list[bool] = []
    for patient_axis in (2, 1, 0):
        cosines = np.abs(directions[patient_axis]).copy()
        cosines[order] = -1.0
        k = int(np.argmax(cosines))
        order.append(k)
        flip.append(bool(directions[patient_axis, k] < 0))
    return Reorientation((order[0], order[1], order[2]), (flip[0], flip[1], flip[2]))


def resampled_size(n: int, spacing: float) -> int:
    """Samples along an axis of ``n`` voxels at ``spacing`` once resampled to 1 mm."""
    return round((n - 1) * spacing / RESOLUTION_MM + 1)


def _linear_axis(array: NDArray[np.float64], axis: int, spacing: float) -> NDArray[np.float64]:
    """Linear resampling of one axis to 1 mm, origin kept; NaN beyond half a voxel out."""
    n = array.shape[axis]
    u = np.arange(resampled_size(n, spacing)) * (RESOLUTION_MM / spacing)
    i0 = np.clip(np.floor(u).astype(np.intp), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = np.clip(u - i0, 0.0, 1.0)
    shape = [1, 1, 1]
    shape[axis] = len(u)
    w = w.reshape(shape)
    out = np.take(array, i0, axis=axis) * (1.0 - w) + np.take(array, i1, axis=axis) * w
    outside = (u > n - 0.5).reshape(shape)
    return np.where(outside, np.nan, out)


def resample_to_1mm(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> NDArray[np.float32]:
    """Trilinear resampling of an axis-aligned volume to 1 mm, as the reference does.

    Separable linear interpolation in float64 (equal to trilinear); samples more than half
    a voxel beyond the last source voxel take the volume's minimum; values are then
    truncated toward zero, as the reference's int16 output type does.
    """
    out = np.asarray(hu, dtype=np.float64)
    for axis in range(3):
        out = _linear_axis(out, axis, spacing[axis])
    out = np.where(np.isnan(out), float(np.min(hu)), out)
    return np.trunc(out).astype(np.float32)


def window(hu: NDArray[np.float32]) -> NDArray[np.float32]:
    """Clip to -15..100 HU and map linearly to [-1, 1], in float32 as the reference."""
    low, high = WINDOW_HU
    v = np.clip(hu.astype(np.float32), np.float32(low), np.float32(high))
    return np.asarray(
        (np.float32(2.0) * v - np.float32(low) - np.float32(high)) / np.float32(high - low),
        dtype=np.float32,
    )


def nearest_from_1mm(
    values: NDArray[np.generic], shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> NDArray[np.generic]:
    """Nearest-neighbour sample of a 1 mm array (..., z, y, x) on a grid of ``shape`` and
    ``spacing`` with the same origin; points beyond half a voxel of it get zero."""
    index = []
    valid = []
    for n, s, m in zip(shape, spacing, values.shape[-3:], strict=True):
        k = np.floor(np.arange(n) * s / RESOLUTION_MM + 0.5).astype(np.intp)
        valid.append(k < m)
        index.append(np.minimum(k, m - 1))
    out = values[(Ellipsis, *np.ix_(*index))]
    mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(mask, out, np.zeros((), dtype=values.dtype))
