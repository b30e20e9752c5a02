"""Region measurements: components, volume, HU statistics, HUmax and key frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.measure import (
    connected_regions,
    hu_max,
    largest_frame,
    mean_hu,
    measure_region,
)


def brute_force_hu_max(hu: np.ndarray, mask: np.ndarray) -> float:
    """Max over mask voxels of the 3x3 in-plane window mean, edges repeated."""
    padded = np.pad(hu.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    best = -math.inf
    for k, r, c in zip(*np.nonzero(mask), strict=True):
        best = max(best, float(padded[k, r : r + 3, c : c + 3].mean()))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_hu_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hu = rng.normal(40.0, 20.0, (3, 9, 11)).astype(np.float32)
    mask = rng.random(hu.shape) > 0.7
    mask[0, 0, 0] = True  # a corner voxel: the window repeats the edge
    assert hu_max(hu, mask) == pytest.approx(brute_force_hu_max(hu, mask), abs=1e-4)


def test_hu_max_window_is_in_plane_only() -> None:
    hu = np.zeros((3, 5, 5))
    hu[0] = 900.0  # a bright neighbouring slice must not leak into the window
    hu[1, 1:4, 1:4] = 70.0
    mask = np.zeros(hu.shape, dtype=bool)
    mask[1, 2, 2] = True
    assert hu_max(hu, mask) == pytest.approx(70.0)


def test_hu_max_and_mean_of_empty_mask_are_nan() -> None:
    hu = np.ones((2, 4, 4))
    empty = np.zeros(hu.shape, dtype=bool)
    assert math.isnan(hu_max(hu, empty))
    assert math.isnan(mean_hu(hu, empty))


def test_connected_regions_drop_small_and_order_largest_first() -> None:
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[0:2, 0:3, 0:3] = True  # 18 voxels
    mask[1:4, 10:15, 10:15] = True  # 75 voxels
    mask[3, 0, 19] = True  # 1 voxel
    labels, count = connected_regions(mask, voxel_volume_ml=0.01, min_volume_ml=0.1)
    assert count == 2
    assert np.count_nonzero(labels == 1) == 75
    assert np.count_nonzero(labels == 2) == 18
    assert not labels[3, 0, 19]


def test_connectivity_decides_whether_diagonal_voxels_join() -> None:
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert connected_regions(mask, 1.0, 0.0, connectivity=26)[1] == 1
    assert connected_regions(mask, 1.0, 0.0, connectivity=6)[1] == 2
    with pytest.raises(ValueError, match="connectivity"):
        connected_regions(mask, 1.0, 0.0, connectivity=8)


def test_connected_regions_of_empty_mask() -> None:
    labels, count = connected_regions(np.zeros((2, 3, 3), dtype=bool), 1.0, 0.1)
    assert count == 0
    assert not labels.any()


def test_volume_mean_and_largest_frame() -> None:
    mask = np.zeros((3, 4, 4), dtype=bool)
    mask[0, :2, :2] = True  # 4 pixels
    mask[2, :3, :3] = True  # 9 pixels
    hu = np.where(mask, 60.0, 20.0)
    assert mean_hu(hu, mask) == pytest.approx(60.0)
    # frame 0 has larger pixels, so its 4 pixels outweigh frame 2's 9
    assert largest_frame(mask, np.array([3.0, 1.0, 1.0])) == (0, pytest.approx(12.0))
    result = measure_region(mask, hu, np.ones(3), np.array([5.0, 5.0, 2.0]))
    # planimetric volume: 4 px x 1 mm2 x 5 mm + 9 px x 1 mm2 x 2 mm = 38 mm3
    assert result.volume_ml == pytest.approx(0.038)
    assert result.key_frame == 2
    assert result.key_area_mm2 == pytest.approx(9.0)
    assert result.hu_mean == pytest.approx(60.0)
