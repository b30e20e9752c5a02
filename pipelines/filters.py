"""In-plane median filtering of a frame stack, vectorised for the 3 x 3 window.

``in_plane_median(hu, size)`` equals ``scipy.ndimage.median_filter(hu, size=(1, size,
size))`` (mode "reflect") value for value. The 3 x 3 window, the threshold baseline's
denoising, sorts each column of three once with elementwise minima and maxima, and takes
the median of nine as the median of (largest of the column minima, median of the column
medians, smallest of the column maxima), exact for any values. On the 127 x 332 x 298
brain box of a tilted head CT it takes about 0.1 s where scipy's general rank filter took
1.4 s. Other sizes use scipy.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FRAMES_PER_PASS = 16
"""Frames filtered at once: bounds the temporaries to a few slabs of this many frames."""


def in_plane_median(hu: NDArray[np.floating], size: int) -> NDArray[np.floating]:
    """The median of each voxel's ``size`` x ``size`` in-plane window (axis 0 is the
    frame), edges reflected; the input's dtype."""
    if size != 3 or hu.ndim != 3:
        return np.asarray(ndimage.median_filter(hu, size=(1, size, size)))
    out = np.empty(hu.shape, dtype=hu.dtype)
    for start in range(0, hu.shape[0], FRAMES_PER_PASS):
        frames = slice(start, start + FRAMES_PER_PASS)
        out[frames] = _median_3x3(hu[frames])
    return out


def _median_3x3(hu: NDArray[np.floating]) -> NDArray[np.floating]:
    """The 3 x 3 in-plane median of ``hu``; "symmetric" padding is scipy's "reflect"
    (index -1 reads 0, index n reads n - 1)."""
    padded = np.pad(hu, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    low, mid, high = _sort3(padded[:, :-2], padded[:, 1:-1], padded[:, 2:])  # each column
    del padded
    largest_low = np.maximum(np.maximum(low[..., :-2], low[..., 1:-1]), low[..., 2:])
    middle = _median3(mid[..., :-2], mid[..., 1:-1], mid[..., 2:])
    smallest_high = np.minimum(np.minimum(high[..., :-2], high[..., 1:-1]), high[..., 2:])
    return _median3(largest_low, middle, smallest_high)


def _sort3(
    a: NDArray[np.floating], b: NDArray[np.floating], c: NDArray[np.floating]
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """Elementwise smallest, middle and largest of ``a``, ``b``, ``c``."""
    low, high = np.minimum(a, b), np.maximum(a, b)
    return np.minimum(low, c), _median3(a, b, c), np.maximum(high, c)


def _median3(
    a: NDArray[np.floating], b: NDArray[np.floating], c: NDArray[np.floating]
) -> NDArray[np.floating]:
    """Elementwise middle of ``a``, ``b``, ``c``."""
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
