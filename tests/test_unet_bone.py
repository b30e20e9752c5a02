"""The U-Net's bone rule (pipelines.unet.bone) on constructed frame stacks: the skull's
HU rise is flattened, a lesion's plateau is not; ramps of the skull, regions inside its
band and a calcification's halo are dropped, a lesion touching bone is kept; a thick
frame's partial-volumed calcification is told from blood and from a contrast stain; a
region of the skull's band that never reaches the brain's core is dropped, a haematoma
touching bone and reaching into the core is kept."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipelines.unet.bone import (
    REFERENCE_RISE_HU,
    bone_ramps,
    calcification_halo,
    flatten_bone_rise,
    partial_volume_foci,
    skull_band,
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


def _disc(frames: slice, centre: tuple[int, int], radius_mm: float) -> NDArray[np.bool_]:
    """A disc of ``radius_mm`` about ``centre`` (pixels) on ``frames`` of the 9-frame head."""
    yy, xx = np.mgrid[:400, :400]
    mask = np.zeros((9, 400, 400), dtype=bool)
    mask[frames] = np.hypot(yy - centre[0], xx - centre[1]) * SPACING[1] < radius_mm
    return mask


def test_a_thick_frame_partial_volumed_calcification_is_a_focus_and_blood_is_not() -> None:
    hu, skull = head(rise_hu=0.0)
    distance = skull_distance(skull, SPACING)
    # one 4 mm frame, deep: a 1 mm core of 170 HU in a 3 mm halo of 65 HU (GE's 0.13 mL)
    focus = _disc(slice(4, 5), (200, 200), 3.0)
    hu[focus] = 65.0
    hu[_disc(slice(4, 5), (200, 200), 1.0)] = 170.0
    # the same core and halo held by two frames, a blood plateau of 90 HU with noise on one
    # frame, a contrast stain's plateau of 140 HU on one frame, a focus beside the skull
    two_frames = _disc(slice(2, 4), (120, 200), 3.0)
    hu[two_frames] = 65.0
    hu[_disc(slice(2, 4), (120, 200), 1.0)] = 170.0
    blood = _disc(slice(6, 7), (280, 200), 3.0)
    hu[blood] = 90.0 + np.random.default_rng(2).normal(0.0, 5.0, int(blood.sum()))
    stain = _disc(slice(6, 7), (200, 120), 3.0)
    hu[stain] = 140.0
    near_skull = _disc(slice(6, 7), (200, 200 + int(84 / SPACING[1])), 3.0) & ~skull
    hu[near_skull] = 65.0
    hu[_disc(slice(6, 7), (200, 200 + int(84 / SPACING[1])), 1.0)] = 170.0
    found = focus | two_frames | blood | stain | near_skull
    foci = partial_volume_foci(found, hu, distance, SPACING[1])
    assert foci[focus].all()
    assert not foci[two_frames | blood | stain | near_skull].any()


def test_a_region_of_the_skull_band_is_dropped_and_a_haematoma_touching_bone_kept() -> None:
    hu, skull = head(rise_hu=0.0)
    distance = skull_distance(skull, SPACING)
    core = np.asarray(distance > 3.0) & cavity_of(hu, skull)
    # a flat sheet along the inner table, 1-3 mm deep; a 6 mm haematoma touching the bone
    sheet = np.zeros(hu.shape, dtype=bool)
    sheet[3:6] = (distance[4] > 0.5) & (distance[4] < 3.0) & (np.arange(400)[:, None] < 60)
    haematoma = _disc(slice(3, 6), (200, 400 - 200 - int(84 / SPACING[1])), 6.0) & ~skull
    assert distance[haematoma].min() <= 1.0 and distance[haematoma].max() > 7.0
    dropped = skull_band(sheet | haematoma, core, distance)
    assert dropped[sheet].all()
    assert not dropped[haematoma].any()
