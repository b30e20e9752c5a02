"""The U-Net's bone rule (pipelines.unet.bone) on constructed frame stacks: the skull's
HU rise is flattened, a lesion's plateau is not; ramps of the skull, regions inside its
band and a calcification's halo are dropped, a lesion touching bone is kept."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipelines.unet.bone import (
    REFERENCE_RISE_HU,
    bone_ramps,
    calcification_halo,
    flatten_bone_rise,
    skull_distance,
)

SPACING = (4.0, 0.5, 0.5)


def head(rise_hu: float, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """A 9-frame stack: a 2 mm skull ring round a brain of 28 HU (noise 4 HU) that rises by
    ``rise_hu`` toward the skull (exponential, 4 mm); returns (HU, skull)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:400, :400]
    radius = np.hypot(yy - 200, xx - 200) * SPACING[1]
    skull = np.broadcast_to((radius >= 90.0) & (radius < 92.0), (9, 400, 400)).copy()
    depth = np.clip(90.0 - radius, 0.0, None)
    brain = 28.0 + rise_hu * np.exp(-depth / 4.0)
    hu = np.where(radius < 90.0, brain, np.where(radius < 92.0, 1000.0, -1000.0))
    hu = np.broadcast_to(hu, (9, 400, 400)) + rng.normal(0.0, 4.0, (9, 400, 400))
    return hu.astype(np.float32), skull


def cavity_of(hu: NDArray[np.float32], skull: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The soft tissue inside the ring."""
    yy, xx = np.mgrid[:400, :400]
    inside = np.hypot(yy - 200, xx - 200) * SPACING[1] < 90.0
    return np.asarray(np.broadcast_to(inside, hu.shape) & ~skull & (hu > -20))


def test_flattening_removes_the_rise_beyond_the_reference_and_keeps_a_plateau() -> None:
    hu, skull = head(rise_hu=30.0)
    yy, xx = np.mgrid[:400, :400]
    lesion = np.broadcast_to(np.hypot(yy - 200, xx - 30) * SPACING[1] < 6.0, hu.shape) & (hu < 500)
    hu[lesion & cavity_of(hu, skull)] = 50.0
    cavity = cavity_of(hu, skull)
    distance = skull_distance(skull, SPACING)
    flat = flatten_bone_rise(hu, distance, cavity)
    shell = cavity & ~lesion & (distance >= 2.0) & (distance < 3.0)
    assert np.median(hu[shell]) - 28.0 > REFERENCE_RISE_HU[2] + 5.0
    assert abs(np.median(flat[shell]) - 28.0 - REFERENCE_RISE_HU[2]) <= 2.0
    deep = cavity & (distance > 30.0)
    np.testing.assert_array_equal(flat[deep], hu[deep])
    # the lesion, a minority of every shell, stays well above the flattened brain beside it
    beside = cavity & ~lesion & (distance >= 4.0) & (distance < 8.0)
    assert np.median(flat[lesion & cavity & (distance >= 4.0)]) - np.median(flat[beside]) > 12.0


def test_a_head_without_excess_rise_is_unchanged() -> None:
    hu, skull = head(rise_hu=0.0)
    cavity = cavity_of(hu, skull)
    flat = flatten_bone_rise(hu, skull_distance(skull, SPACING), cavity)
    np.testing.assert_allclose(flat, hu, atol=0.5)  # the medians' noise, no rise


def test_a_ramp_of_the_skull_is_dropped_and_a_lesion_touching_it_kept() -> None:
    hu, skull = head(rise_hu=30.0)
    distance = skull_distance(skull, SPACING)
    yy, xx = np.mgrid[:400, :400]
    ramp = np.zeros(hu.shape, dtype=bool)
    ramp[3:6] = (np.abs(yy - 200) < 20) & (xx > 200 + 80 / SPACING[1]) & (xx < 200 + 90 / 0.5)
    lesion = np.zeros(hu.shape, dtype=bool)
    lesion[3:6] = np.hypot(yy - 200, xx - (200 - 84 / SPACING[1])) * SPACING[1] < 6.0
    lesion &= ~skull
    hu[lesion] = 50.0 + np.random.default_rng(1).normal(0.0, 4.0, int(lesion.sum()))
    assert distance[lesion].min() <= 0.5 and distance[ramp].max() <= 10.0
    dropped = bone_ramps(ramp | lesion, hu, distance)
    assert dropped[ramp].all()
    assert not dropped[lesion].any()


def test_a_region_wholly_in_the_skull_band_is_dropped() -> None:
    hu, skull = head(rise_hu=0.0)
    inside_band = skull & (np.arange(400)[None, None, :] > 300)
    dropped = bone_ramps(inside_band, hu, skull_distance(skull, SPACING))
    assert dropped[inside_band].all()


def test_calcification_halo_is_a_thin_shell() -> None:
    calcified = np.zeros((3, 40, 40), dtype=bool)
    calcified[1, 18:22, 18:22] = True
    halo = calcification_halo(calcified, (4.0, 0.5, 0.5))
    assert not (halo & calcified).any()
    assert halo[1, 17, 20] and halo[1, 16, 20] and halo[1, 15, 20]
    assert not halo[1, 14, 20] and not halo[0].any() and not halo[2].any()
    assert not calcification_halo(np.zeros((2, 5, 5), dtype=bool), SPACING).any()
