"""The learned segmenter (U-Net 3.1.0) on held-out lesions: skull base, 45-50 HU, small,
thick and thin slices, the real GE head CT (skipped without ../shared); no false positive
(<= 0.1 mL, the issue's limit) on a normal generated head of 5 mm or 1 mm slices, flat or
rendered with a scanner's rise toward the skull of the GE head's size; a calcified choroid
plexus labelled calcification, never haemorrhage. On the real GE head (skipped without
../shared) the skull-base haematoma is found whole, and the normal head is called
haemorrhage-free within 0.1 mL (2.0.0: 180 mL, 2.1.0: 0.80 mL, 3.0.0: 0.13 mL, a thick
frame's diluted calcification; 3.1.0: 0.0). The generated 1 mm head of seed 901 is where
3.0.0 called 0.13 mL of the skull's band haemorrhage (bench/segmenter_eval_results.md).

Held-out: generated heads and lesions of seeds 900 and up (training templates use seeds
0-299 of ``pipelines.synthetic`` and lesions of the (0, stream, i) seed streams).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.hyperdense import CALCIFICATION_SEGMENT, HYPERDENSE_SEGMENT
from pipelines.lesions import insert_lesion, radius_for_volume, skull_base_centre
from pipelines.series import LoadedSeries
from pipelines.synthetic import CALCIFICATION_SITES_MM, site_mm, synthetic_head_ct
from pipelines.unet import UNetPipeline
from pipelines.unet.cases import ge_like_rise, make_painted_case, render_rise
from pipelines.volume import load_datasets
from tests.support import GE_HEADCT, shared_path

ROWS = 192
NORMAL_FP_LIMIT_ML = 0.1
SEED = 930


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """The tests share a small CPU."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet() -> UNetPipeline:
    """The bundled learned segmenter on the CPU."""
    return UNetPipeline(device="cpu")


def frame_truth(
    series: LoadedSeries, datasets: list[Dataset], masks: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Painter masks (dataset order) in the series' frame order."""
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    return np.asarray(masks[[index[f.sop_instance_uid] for f in series.frames]])


def painted_scores(
    unet: UNetPipeline, datasets: list[Dataset], centre: tuple[float, float, float] | None,
    volume_ml: float, hu: float, seed: int,
) -> tuple[float, float]:  # fmt: skip
    """Paint a lesion, segment, and return the haemorrhage-class segment's Dice and the
    fraction of the lesion it covers."""
    lesion = insert_lesion(
        datasets, center_mm=centre, radius_mm=radius_for_volume(volume_ml), hu=hu, seed=seed
    )
    series = load_datasets(datasets)
    truth = frame_truth(series, datasets, lesion.masks)
    result = unet.run(series)
    assert result.segments[0].segment == HYPERDENSE_SEGMENT
    found = result.segments[0].frame_mask
    overlap = np.count_nonzero(found & truth)
    return float(2.0 * overlap / (found.sum() + truth.sum())), float(overlap / truth.sum())


def painted_dice(
    unet: UNetPipeline, datasets: list[Dataset], centre: tuple[float, float, float] | None,
    volume_ml: float, hu: float, seed: int,
) -> float:  # fmt: skip
    """The Dice of :func:`painted_scores`."""
    return painted_scores(unet, datasets, centre, volume_ml, hu, seed)[0]


@pytest.mark.parametrize(
    ("what", "volume_ml", "hu", "minimum"),
    [
        ("skull base", 4.0, 85.0, 0.8),  # the threshold's old skull rule erased these
        ("random", 5.0, 50.0, 0.7),  # below the threshold's 55 HU floor
        ("random", 0.5, 70.0, 0.6),  # small
    ],
)
def test_held_out_lesions_on_5mm_slices(
    unet: UNetPipeline, what: str, volume_ml: float, hu: float, minimum: float
) -> None:
    datasets = synthetic_head_ct(SEED, rows=ROWS)
    rng = np.random.default_rng(SEED)
    radius = radius_for_volume(volume_ml)
    centre = skull_base_centre(datasets, radius, rng) if what == "skull base" else None
    dice = painted_dice(unet, datasets, centre, volume_ml, hu, SEED + 1)
    assert dice >= minimum, f"{what} {volume_ml} mL {hu} HU: Dice {dice:.3f}"


def test_held_out_lesion_on_thin_tilted_slices(unet: UNetPipeline) -> None:
    datasets = synthetic_head_ct(
        SEED + 2, rows=ROWS, n_slices=40, slice_thickness_mm=1.0, gantry_tilt_deg=15.0
    )
    dice = painted_dice(unet, datasets, site_mm((-30.0, 10.0, 0.0)), 3.0, 65.0, SEED + 3)
    assert dice >= 0.8, f"1 mm tilted: Dice {dice:.3f}"


def test_normal_head_has_no_false_positive(unet: UNetPipeline) -> None:
    series = load_datasets(synthetic_head_ct(SEED + 4, rows=ROWS))
    result = unet.run(series)
    total = result.segments[0].total
    volume = 0.0 if total is None else total.volume_ml
    assert volume <= NORMAL_FP_LIMIT_ML, f"{volume:.3f} mL called hyperdense on a normal head"


def test_normal_head_of_thin_slices_has_no_false_positive_at_the_skull_base(
    unet: UNetPipeline,
) -> None:
    """Frames of 1 mm cut along the skull base: the skull's band is not haemorrhage
    (3.0.0 called 0.13 mL there on this head)."""
    datasets = synthetic_head_ct(901, rows=ROWS, n_slices=150, slice_thickness_mm=1.0)
    result = unet.run(load_datasets(datasets))
    total = result.segments[0].total
    volume = 0.0 if total is None else total.volume_ml
    assert volume <= NORMAL_FP_LIMIT_ML, f"{volume:.3f} mL called hyperdense (1 mm)"


@pytest.mark.parametrize(("thickness", "n_slices"), [(5.0, 32), (1.0, 40)])
def test_normal_head_with_a_scanner_rise_has_no_false_positive(
    unet: UNetPipeline, thickness: float, n_slices: int
) -> None:
    """A held-out generated head rendered with a rise toward the skull of the real GE
    head's size (what U-Net 2.0.0 called haemorrhage on real heads)."""
    datasets = synthetic_head_ct(
        SEED + 7, rows=ROWS, n_slices=n_slices, slice_thickness_mm=thickness
    )
    render_rise(datasets, ge_like_rise(thickness), thickness)
    result = unet.run(load_datasets(datasets))
    total = result.segments[0].total
    volume = 0.0 if total is None else total.volume_ml
    assert volume <= NORMAL_FP_LIMIT_ML, f"{volume:.3f} mL called hyperdense ({thickness:g} mm)"


def test_calcified_choroid_plexus_is_calcification_not_haemorrhage(unet: UNetPipeline) -> None:
    datasets = synthetic_head_ct(SEED + 5, rows=ROWS)
    focus = insert_lesion(
        datasets,
        center_mm=site_mm(CALCIFICATION_SITES_MM["choroid plexus"]),
        radius_mm=3.5,
        hu=300.0,
        seed=SEED + 5,
        irregular=False,
    )
    series = load_datasets(datasets)
    truth = frame_truth(series, datasets, focus.masks)
    result = unet.run(series)
    assert not (result.segments[0].frame_mask & truth).any()
    calcification = [s for s in result.segments if s.segment == CALCIFICATION_SEGMENT]
    assert calcification, result.notes
    labelled = np.count_nonzero(calcification[0].frame_mask & truth) / truth.sum()
    assert labelled >= 0.5
    assert any("calcif" in note and "never scored" in note for note in result.notes)


def test_real_ge_head_skull_base_haematoma_is_found() -> None:
    files = sorted(shared_path(GE_HEADCT).glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM files in {GE_HEADCT}")
    unet = UNetPipeline(device="cpu")
    datasets = [pydicom.dcmread(p) for p in files]
    radius = radius_for_volume(4.0)
    centre = skull_base_centre(datasets, radius, np.random.default_rng(SEED + 6))
    _, covered = painted_scores(unet, datasets, centre, 4.0, 85.0, SEED + 6)
    assert covered >= 0.8, f"GE skull base 85 HU: {covered:.0%} of the lesion found"


def test_real_ge_normal_head_skull_rise_is_not_haemorrhage() -> None:
    files = sorted(shared_path(GE_HEADCT).glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM files in {GE_HEADCT}")
    result = UNetPipeline(device="cpu").run(load_datasets([pydicom.dcmread(p) for p in files]))
    total = result.segments[0].total
    volume = 0.0 if total is None else total.volume_ml
    assert volume <= NORMAL_FP_LIMIT_ML, f"{volume:.2f} mL called hyperdense on the GE head"


def test_training_cases_are_generated_reproducible_and_keep_calcification_apart() -> None:
    first = make_painted_case(SEED, 0, 3)
    again = make_painted_case(SEED, 0, 3)
    assert first.source == "synthetic"
    np.testing.assert_array_equal(first.hu, again.hu)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not (first.mask & first.calcification).any()
    assert first.hu.shape == first.mask.shape == first.calcification.shape
