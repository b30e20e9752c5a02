"""The vectorised 3 x 3 in-plane median equals scipy's median filter value for value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipelines.filters import in_plane_median

SHAPES = [(1, 1, 1), (1, 1, 6), (2, 5, 1), (3, 2, 2), (2, 7, 9), (4, 33, 40), (37, 9, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_3x3_equals_scipy(shape: tuple[int, int, int], dtype: type) -> None:
    rng = np.random.default_rng(sum(shape))
    for ties in (False, True):  # ties: few distinct values, as integer HU have
        hu = rng.normal(40.0, 30.0, size=shape).astype(dtype)
        if ties:
            hu = np.round(hu / 20.0).astype(dtype)
        expected = ndimage.median_filter(hu, size=(1, 3, 3))
        got = in_plane_median(hu, 3)
        assert got.dtype == expected.dtype
        assert np.array_equal(got, expected)


def test_median_of_a_strided_view_and_other_sizes() -> None:
    hu = np.random.default_rng(1).normal(size=(5, 30, 30)).astype(np.float32)
    view = hu[1:4, 3:25, 2:28:2]
    assert np.array_equal(in_plane_median(view, 3), ndimage.median_filter(view, size=(1, 3, 3)))
    for size in (1, 5):  # scipy's path
        assert np.array_equal(
            in_plane_median(hu, size), ndimage.median_filter(hu, size=(1, size, size))
        )
