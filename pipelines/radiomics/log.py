"""SimpleITK's ``LaplacianRecursiveGaussianImageFilter`` on the ROI's box, as matrix products.

pyradiomics' LoG image is ITK's recursive (Deriche IIR) Gaussian: per axis d, the second
derivative along d, then smoothing along the other axes in ITK's axis order, each pass
rounded to float32, the three summed in float32. Every 1-D pass is linear in its line,
boundary handling included (ITK extends each line's end values), so it is the product of
the line with a fixed matrix: that matrix is made once per (sigma, order, length) by
running the recursion on unit impulses, and each pass keeps only the output rows inside
the ROI's box (later passes and the features read no others). On 1 mm voxels the values
are ITK's to the last float32 bit (tested); other spacings use ITK itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.signal import lfilter, lfiltic

# Deriche's constants as ITK's RecursiveGaussianImageFilter sets them: (A1, B1, A2, B2)
# for the Gaussian (order 0) and its second derivative (order 2), and the shared W, L.
_GAUSS = (1.3530, 1.8151, -0.3531, 0.0902)
_SECOND = (-1.3563, 5.2318, 0.3446, -2.2355)
_W1, _L1, _W2, _L2 = 0.6681, -1.3932, 2.0787, -1.3732

Coefficients = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float, float]
Recursion = tuple[
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
]


def exact_spacing(spacing: Sequence[float]) -> bool:
    """Whether the matrix LoG reproduces ITK's on this spacing (1 mm in every axis)."""
    return all(s == 1.0 for s in spacing)


def log_box(
    block: NDArray[np.floating], sigma: float, box: Sequence[tuple[int, int]]
) -> NDArray[np.float32]:
    """ITK's normalised LoG of ``block`` (1 mm voxels, axes z, y, x) on ``box`` only.

    ``box`` is per array axis (first, last + 1); the result has the box's shape.
    """
    lengths = block.shape
    source = np.asarray(block, dtype=np.float64)
    total: NDArray[np.float32] | None = None
    for axis in (2, 1, 0):  # ITK's x, y, z: the derivative axis
        part: NDArray[np.floating] = source
        for step, along in enumerate([axis] + [a for a in (2, 1, 0) if a != axis]):
            lo, hi = box[along]
            matrix = _matrix(sigma, 2 if step == 0 else 0, lengths[along])[lo:hi]
            part = _apply(part, along, matrix)
        total = _apply_sum(total, part)
    assert total is not None
    return total


def _apply_sum(
    total: NDArray[np.float32] | None, part: NDArray[np.floating]
) -> NDArray[np.float32]:
    """ITK's float32 accumulation of the three second-derivative images."""
    part32 = np.asarray(part, dtype=np.float32)
    return part32 if total is None else total + part32


def _apply(
    values: NDArray[np.floating], axis: int, matrix: NDArray[np.float64]
) -> NDArray[np.float32]:
    """``matrix`` applied to every line of ``values`` along ``axis``, rounded to float32."""
    moved = np.moveaxis(values, axis, -1)
    out = np.matmul(moved, matrix.T)  # float32 input is promoted: ITK filters in double
    return np.moveaxis(out, -1, axis).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _matrix(sigma: float, order: int, length: int) -> NDArray[np.float64]:
    """The (length x length) matrix of ITK's 1-D recursive filter on lines of ``length``."""
    if length < 4:
        raise ValueError(f"ITK's recursive Gaussian needs 4 voxels along each axis, not {length}")
    impulses = _filter_lines(np.eye(length), _recursion(sigma, order))
    matrix = impulses.T.copy()
    matrix.setflags(write=False)
    return matrix


@functools.cache
def _recursion(sigma: float, order: int) -> Recursion:
    """The filter's causal numerator, denominator and state for a constant 1 before the
    line, and the anti-causal ones (for a constant 1 after it), made once per setting."""
    n, d, m, causal_gain, anticausal_gain = _coefficients(sigma, order)
    shifted = np.concatenate([[0.0], m])
    return (
        n,
        d,
        lfiltic(n, d, y=np.full(4, causal_gain), x=np.ones(3)),
        shifted,
        lfiltic(shifted, d, y=np.full(4, anticausal_gain), x=np.ones(4)),
    )


def _filter_lines(lines: NDArray[np.float64], recursion: Recursion) -> NDArray[np.float64]:
    """ITK's ``RecursiveSeparableImageFilter::FilterDataArray`` on each row of ``lines``.

    Causal and anti-causal 4th-order recursions; beyond each end the input is taken
    equal to the end value and the output to that value's steady-state response.
    """
    n, d, causal_state, shifted, anticausal_state = recursion
    first, last = lines[:, :1], lines[:, -1:]
    causal = lfilter(n, d, lines, axis=-1, zi=first * causal_state)[0]
    reverse = lfilter(shifted, d, lines[:, ::-1], axis=-1, zi=last * anticausal_state)[0]
    return np.asarray(causal + reverse[:, ::-1], dtype=np.float64)


def _coefficients(sigma: float, order: int) -> Coefficients:
    """ITK's ``RecursiveGaussianImageFilter::SetUp`` on 1 mm voxels, normalised across
    scale: numerator N, denominator (1, D1..D4), anti-causal numerator M, and the
    causal and anti-causal responses to a constant 1."""
    cos1, cos2 = math.cos(_W1 / sigma), math.cos(_W2 / sigma)
    exp1, exp2 = math.exp(_L1 / sigma), math.exp(_L2 / sigma)
    d4 = exp1 * exp1 * exp2 * exp2
    d3 = -2 * cos1 * exp1 * exp2 * exp2
    d3 += -2 * cos2 * exp2 * exp1 * exp1
    d2 = 4 * cos2 * cos1 * exp1 * exp2
    d2 += exp1 * exp1 + exp2 * exp2
    d1 = -2 * (exp2 * cos2 + exp1 * cos1)
    sd = 1.0 + d1 + d2 + d3 + d4
    dd = d1 + 2 * d2 + 3 * d3 + 4 * d4
    ed = d1 + 4 * d2 + 9 * d3 + 16 * d4
    gauss, sn0, dn0, en0 = _numerator(sigma, *_GAUSS)
    if order == 0:
        alpha0 = 2 * sn0 / sd - gauss[0]
        n = [v * (1.0 / alpha0) for v in gauss]
    else:
        second, sn2, dn2, en2 = _numerator(sigma, *_SECOND)
        beta = -(2 * sn2 - sd * second[0]) / (2 * sn0 - sd * gauss[0])
        n = [a + beta * b for a, b in zip(second, gauss, strict=True)]
        sn, dn, en = sn2 + beta * sn0, dn2 + beta * dn0, en2 + beta * en0
        alpha2 = en * sd * sd - ed * sn * sd - 2 * dn * dd * sd + 2 * dd * dd * sn
        alpha2 /= sd * sd * sd
        n = [v * (sigma**2 / alpha2) for v in n]
    m = [n[1] - d1 * n[0], n[2] - d2 * n[0], n[3] - d3 * n[0], -d4 * n[0]]
    return (
        np.array(n),
        np.array([1.0, d1, d2, d3, d4]),
        np.array(m),
        sum(n) / sd,
        sum(m) / sd,
    )


def _numerator(
    sigma: float, a1: float, b1: float, a2: float, b2: float
) -> tuple[list[float], float, float, float]:
    """ITK's ``ComputeNCoefficients``: N0..N3 and their sums SN, DN, EN."""
    sin1, sin2 = math.sin(_W1 / sigma), math.sin(_W2 / sigma)
    cos1, cos2 = math.cos(_W1 / sigma), math.cos(_W2 / sigma)
    exp1, exp2 = math.exp(_L1 / sigma), math.exp(_L2 / sigma)
    n0 = a1 + a2
    n1 = exp2 * (b2 * sin2 - (a2 + 2 * a1) * cos2)
    n1 += exp1 * (b1 * sin1 - (a1 + 2 * a2) * cos1)
    n2 = (a1 + a2) * cos2 * cos1
    n2 -= b1 * cos2 * sin1 + b2 * cos1 * sin2
    n2 *= 2 * exp1 * exp2
    n2 += a2 * exp1 * exp1 + a1 * exp2 * exp2
    n3 = exp2 * exp1 * exp1 * (b2 * sin2 - a2 * cos2)
    n3 += exp1 * exp2 * exp2 * (b1 * sin1 - a1 * cos1)
    return [n0, n1, n2, n3], n0 + n1 + n2 + n3, n1 + 2 * n2 + 3 * n3, n1 + 4 * n2 + 9 * n3
