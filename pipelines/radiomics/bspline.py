"""ITK's cubic B-spline resampling onto an axis-aligned grid, as three matrix products.

SimpleITK's ``ResampleImageFilter`` with ``sitkBSpline`` evaluates, for every output
voxel, the 4 x 4 x 4 coefficients around it (``BSplineInterpolateImageFunction``). When
the output grid has the input's direction, the weights of each axis depend on that
axis' output index only, so the resampled block is the coefficient array multiplied by
one weight matrix per axis. The coefficients are ITK's (``decomposition``: the
recursion of ``BSplineDecompositionImageFilter`` run on all lines of an axis at once,
equal to the bit); the weights, the support (floor of the float-rounded index), the
mirror boundary and the "inside the buffer" test are those of ITK's interpolator, so
values agree with ITK's to rounding (about 1e-13 relative).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

ORDER = 3


def resample_bspline(
    image: sitk.Image,
    first_index: Sequence[float],
    step: Sequence[float],
    size: Sequence[int],
) -> NDArray[np.float64]:
    """``image`` (float64) sampled at continuous index ``first_index + step * k`` for
    ``k`` in ``size`` per axis (all x, y, z); array order (z, y, x). Points outside the
    image are 0, as ITK's default pixel."""
    coefficients = decomposition(sitk.GetArrayViewFromImage(image))
    out = coefficients
    for axis in range(3):  # x, y, z: array axes 2, 1, 0
        length = coefficients.shape[2 - axis]
        positions = float(first_index[axis]) + float(step[axis]) * np.arange(
            int(size[axis]), dtype=np.float64
        )
        weights = axis_weights(length, positions)
        used = np.flatnonzero(weights.any(axis=0))
        if len(used) == 0:
            used = np.zeros(1, dtype=np.int64)
        lo, hi = int(used[0]), int(used[-1]) + 1
        out = np.moveaxis(
            np.tensordot(
                weights[:, lo:hi], np.take(out, range(lo, hi), axis=2 - axis), ([1], [2 - axis])
            ),
            0,
            2 - axis,
        )
    return np.ascontiguousarray(out)


def axis_weights(length: int, positions: NDArray[np.float64]) -> NDArray[np.float64]:
    """(positions x length) weights of one axis' coefficients: ITK's cubic weights at
    its region of support, mirrored at the ends, zero for points outside the image."""
    start = np.floor(positions.astype(np.float32)).astype(np.int64) - ORDER // 2
    w = positions - (start + 1)
    w3 = (1.0 / 6.0) * w * w * w
    w0 = (1.0 / 6.0) + 0.5 * w * (w - 1.0) - w3
    w2 = w + w0 - 2.0 * w3
    w1 = 1.0 - w0 - w2 - w3
    out = np.zeros((len(positions), length))
    rows = np.arange(len(positions))
    period = 2 * length - 2
    for k, wk in enumerate((w0, w1, w2, w3)):
        at = start + k
        if length == 1:
            at = np.zeros_like(at)
        else:
            at = np.where(at < 0, -at - period * (-at // period), at - period * (at // period))
            at = np.where(at >= length, period - at, at)
        np.add.at(out, (rows, at), wk)
    inside = (positions >= -0.5) & (positions < length - 0.5)
    out[~inside] = 0.0
    return out


POLE = float(np.sqrt(3.0) - 2.0)  # the cubic B-spline's pole
TOLERANCE = 1e-10  # ITK's BSplineDecompositionImageFilter default


def decomposition(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """ITK's ``BSplineDecompositionImageFilter`` (order 3): each axis in turn (x, y, z =
    array axes 2, 1, 0), its 1-D recursion run on all lines of that axis at once."""
    out = np.array(values, dtype=np.float64)
    for axis in (2, 1, 0):
        out = np.moveaxis(_lines_to_coefficients(np.moveaxis(out, axis, 0)), 0, axis)
    return np.ascontiguousarray(out)


def _lines_to_coefficients(c: NDArray[np.float64]) -> NDArray[np.float64]:
    """``DataToCoefficients1D`` along axis 0 (one pole), lines along the other axes."""
    length = c.shape[0]
    if length == 1:
        return c
    z = POLE
    c = c * ((1.0 - z) * (1.0 - 1.0 / z))
    c = np.ascontiguousarray(c)
    horizon = int(np.ceil(np.log(TOLERANCE) / np.log(abs(z))))
    zn = z
    if horizon < length:
        total = c[0].copy()
        for n in range(1, horizon):
            total += zn * c[n]
            zn *= z
        c[0] = total
    else:
        iz = 1.0 / z
        z2n = z ** float(length - 1)
        total = c[0] + z2n * c[length - 1]
        z2n *= z2n * iz
        for n in range(1, length - 1):
            total += (zn + z2n) * c[n]
            zn *= z
            z2n *= iz
        c[0] = total / (1.0 - zn * zn)
    for n in range(1, length):
        c[n] += z * c[n - 1]
    c[length - 1] = (z / (z * z - 1.0)) * (z * c[length - 2] + c[length - 1])
    for n in range(length - 2, -1, -1):
        c[n] = z * (c[n + 1] - c[n])
    return c
