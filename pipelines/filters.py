"""In-plane median filtering of a frame stack, compiled (numba) for the 3 x 3 window.

``in_plane_median(hu, size)`` equals ``scipy.ndimage.median_filter(hu, size=(1, size,
size))`` (mode "reflect") value for value. The 3 x 3 window, the threshold baseline's
denoising, runs a compiled kernel that sorts each column of three once and takes the
median of nine as the median of (largest of the column minima, median of the column
medians, smallest of the column maxima), exact for any values. On the 127 x 332 x 298 brain box of a
tilted head CT it takes 0.03 s where scipy's general rank filter took 1.4 s (1.0-1.4 s of
the threshold baseline's 5.5 s). Other sizes use scipy.

The kernel is compiled on its first call (about 0.5 s) and cached on disk as the radiomics
kernels are (``pipelines.radiomics.kernels``: ``__pycache__`` or ``NUMBA_CACHE_DIR``);
``python -m pipelines.filters`` compiles it (the container image does at build time).
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def in_plane_median(hu: NDArray[np.floating], size: int) -> NDArray[np.floating]:
    """The median of each voxel's ``size`` x ``size`` in-plane window (axis 0 is the
    frame), edges reflected; the input's dtype."""
    if size != 3 or hu.ndim != 3 or 0 in hu.shape:
        return np.asarray(ndimage.median_filter(hu, size=(1, size, size)))
    out = np.empty(hu.shape, dtype=hu.dtype)
    _median_3x3(hu, out)  # a strided view as it is: no box-sized copy
    return out


@numba.njit(cache=True, nogil=True)
def _sort3(a: float, b: float, c: float) -> tuple[float, float, float]:
    """``a``, ``b``, ``c`` in ascending order."""
    if a > b:
        a, b = b, a
    if b > c:
        b, c = c, b
    if a > b:
        a, b = b, a
    return a, b, c


@numba.njit(cache=True, nogil=True)
def _median_3x3(hu: NDArray[np.floating], out: NDArray[np.floating]) -> None:
    """``out`` = the 3 x 3 in-plane median of ``hu`` (reflected edges: index -1 reads 0,
    index n reads n - 1)."""
    frames, rows, columns = hu.shape
    low = np.empty(columns, dtype=hu.dtype)
    mid = np.empty(columns, dtype=hu.dtype)
    high = np.empty(columns, dtype=hu.dtype)
    for z in range(frames):
        for y in range(rows):
            above = y - 1 if y > 0 else 0
            below = y + 1 if y < rows - 1 else rows - 1
            for x in range(columns):
                low[x], mid[x], high[x] = _sort3(hu[z, above, x], hu[z, y, x], hu[z, below, x])
            for x in range(columns):
                left = x - 1 if x > 0 else 0
                right = x + 1 if x < columns - 1 else columns - 1
                largest_low = max(low[left], low[x], low[right])
                middle = _sort3(mid[left], mid[x], mid[right])[1]
                smallest_high = min(high[left], high[x], high[right])
                out[z, y, x] = _sort3(largest_low, middle, smallest_high)[1]


def compile_kernels() -> None:
    """Run the kernel once on a small stack of each dtype the pipelines pass (compiles
    it, or loads it from the cache)."""
    small = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    in_plane_median(small, 3)
    in_plane_median(small.astype(np.float64), 3)


if __name__ == "__main__":
    compile_kernels()
