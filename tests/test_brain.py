"""The intracranial extraction and the region labelling work on boxes (the head's rows
and columns, the mask's extent) and must give exactly what the whole volume gives."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.brain import Intracranial, head_box, intracranial_mask, intracranial_on_frames
from pipelines.hyperdense import label_regions
from pipelines.measure import structure
from pipelines.synthetic import synthetic_head_ct
from pipelines.unet.pipeline import frame_regions
from pipelines.volume import load_datasets

HEADS = [  # seed, rows, slices, thickness mm, tilt deg, head scale, stack offset mm
    (3, 128, 20, 5.0, 0.0, (1.0, 1.0, 1.0), 0.0),
    (4, 128, 24, 5.0, 20.0, (0.9, 1.1, 1.0), 0.0),
    (5, 160, 30, 2.5, 12.0, (1.0, 1.0, 1.0), -40.0),  # thin slices over the skull base
    (6, 128, 16, 5.0, 0.0, (1.45, 1.45, 1.0), 0.0),  # the head touches the field's edges
    (7, 96, 18, 5.0, -15.0, (0.7, 0.8, 0.9), 25.0),  # a small head toward the vertex
]


def _same(got: Intracranial, whole: Intracranial) -> None:
    for name in ("brain", "core", "skull", "cavity"):
        a, b = getattr(got, name), getattr(whole, name)
        assert a.shape == b.shape
        assert np.array_equal(a, b), f"{name}: {np.count_nonzero(a != b)} voxels differ"


@pytest.mark.parametrize("head", HEADS, ids=[f"seed{h[0]}" for h in HEADS])
def test_intracranial_mask_on_the_head_box_equals_the_whole_frames(
    head: tuple[int, int, int, float, float, tuple[float, float, float], float],
) -> None:
    seed, rows, slices, thickness, tilt, scale, offset = head
    datasets = synthetic_head_ct(
        seed, rows=rows, n_slices=slices, slice_thickness_mm=thickness,
        gantry_tilt_deg=tilt, head_scale=scale, stack_offset_mm=offset,
    )  # fmt: skip
    series = load_datasets(datasets)
    volume = series.volume
    box = head_box(volume.hu, volume.spacing)
    assert box is not None
    rows, columns = box[1].stop - box[1].start, box[2].stop - box[2].start
    if max(scale[:2]) < 1.2:  # the head leaves air around it: the box is smaller
        assert rows * columns < 0.9 * volume.hu.shape[1] * volume.hu.shape[2]
    got = intracranial_mask(volume.hu, volume.spacing)
    assert got.brain.any(), "the generated head has a brain"
    _same(got, intracranial_on_frames(volume.hu, volume.spacing))
    spacing = (thickness, *volume.spacing[1:])
    _same(
        intracranial_mask(series.frame_hu, spacing),
        intracranial_on_frames(series.frame_hu, spacing),
    )


def test_intracranial_mask_of_air_is_empty() -> None:
    air = np.full((4, 64, 64), -1000.0, dtype=np.float32)
    got = intracranial_mask(air, (5.0, 0.5, 0.5))
    _same(got, intracranial_on_frames(air, (5.0, 0.5, 0.5)))
    assert not got.skull.any()


def _labels_whole(
    mask: NDArray[np.bool_], slice_ml: NDArray[np.float64], min_ml: float, connectivity: int
) -> tuple[NDArray[np.int32], int]:
    """What ``label_regions`` promises, computed on the whole volume."""
    labels, count = ndimage.label(mask, structure=structure(connectivity))
    sizes = np.array([slice_ml[np.nonzero(labels == i)[0]].sum() for i in range(1, count + 1)])
    kept = [i + 1 for i in sorted(np.nonzero(sizes >= min_ml)[0], key=lambda i: -sizes[i])]
    out = np.zeros(mask.shape, dtype=np.int32)
    for new, old in enumerate(kept, start=1):
        out[labels == old] = new
    return out, len(kept)


@pytest.mark.parametrize("seed", range(6))
def test_label_regions_on_the_mask_box_equals_the_whole_volume(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(6, 14)), int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    mask = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 8))):  # blobs anywhere, some at the edges
        low = [int(rng.integers(0, n)) for n in shape]
        high = [min(lo + int(rng.integers(1, 6)), n) for lo, n in zip(low, shape, strict=True)]
        mask[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))] = True
    mask &= rng.random(shape) < 0.8
    slice_ml = rng.uniform(0.001, 0.003, size=shape[0])
    min_ml = float(rng.choice([0.0, 0.01, 0.03]))
    for connectivity in (6, 26):
        labels, count = label_regions(mask, slice_ml, min_ml, connectivity)
        expected, expected_count = _labels_whole(mask, slice_ml, min_ml, connectivity)
        assert count == expected_count
        assert np.array_equal(labels, expected)


def test_label_regions_of_an_empty_mask() -> None:
    labels, count = label_regions(np.zeros((3, 5, 5), dtype=bool), np.ones(3), 0.0, 26)
    assert count == 0 and labels.shape == (3, 5, 5) and not labels.any()


@pytest.mark.parametrize("seed", range(4))
def test_frame_regions_on_the_mask_box_equal_the_whole_stack(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(6, 14)), int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    mask = (rng.random(shape) < 0.1) | (rng.random(shape) < 0.5) & (np.indices(shape)[1] > 25)
    frame_ml = rng.uniform(0.001, 0.003, size=shape[0])
    regions = frame_regions(mask, frame_ml, 0.002)
    labels, count = ndimage.label(mask, structure=structure(26))  # the whole stack
    volumes = [frame_ml[np.nonzero(labels == i)[0]].sum() for i in range(1, count + 1)]
    kept = [i for i in sorted(range(count), key=lambda i: -volumes[i]) if volumes[i] >= 0.002]
    assert kept, "the random mask has a region above the minimum"
    assert len(regions) == len(kept)
    for region, i in zip(regions, kept, strict=True):
        assert region.shape == shape and np.array_equal(region, labels == i + 1)
    assert frame_regions(np.zeros(shape, dtype=bool), frame_ml, 0.0) == []
