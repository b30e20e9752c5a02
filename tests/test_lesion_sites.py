"""Lesions where the threshold baseline used to lose them, and calcification told apart.

Small generated heads (128 x 128, 5 mm) keep these fast; the GE-based cases need
../shared and are skipped without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipelines.base import PipelineError, PipelineResult
from pipelines.geometry import grid_to_frames
from pipelines.ht_after_mt.features import find_lesion
from pipelines.hyperdense import (
    CALCIFICATION_SEGMENT,
    HYPERDENSE_SEGMENT,
    HyperdenseParameters,
    HyperdenseThresholdPipeline,
)
from pipelines.lesions import insert_lesion, skull_base_centre
from pipelines.series import LoadedSeries
from pipelines.synthetic import (
    CALCIFICATION_SITES_MM,
    site_mm,
    skull_base_centre_mm,
    synthetic_head_ct,
)
from pipelines.volume import load_datasets

ROWS = 128
CALCIFICATION_HU = 300.0
CALCIFICATION_RADIUS_MM = 3.0
HAEMATOMA_HU = 85.0


def small_head(seed: int) -> list[Dataset]:
    """A fast generated head: 128 x 128 pixels, 32 slices of 5 mm."""
    return synthetic_head_ct(seed, rows=ROWS)


def dice(found: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks on the same frames."""
    return float(2.0 * np.count_nonzero(found & truth) / (found.sum() + truth.sum()))


def frame_truth(series: LoadedSeries, datasets: Sequence[Dataset], masks: np.ndarray) -> np.ndarray:
    """Per-dataset masks of a painter, reordered to the series' frames."""
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    return np.asarray(masks[[index[f.sop_instance_uid] for f in series.frames]])


def segment_of(result: PipelineResult, label: str) -> np.ndarray | None:
    """The frame mask of the result's segment called ``label``, or None."""
    for segment in result.segments:
        if segment.segment.label == label:
            return np.asarray(segment.frame_mask)
    return None


@pytest.fixture(scope="module")
def pipeline() -> HyperdenseThresholdPipeline:
    """The baseline with its stored parameters."""
    return HyperdenseThresholdPipeline()


def test_skull_base_haematoma_is_found(pipeline: HyperdenseThresholdPipeline) -> None:
    datasets = small_head(5)
    radius = 9.0
    lesion = insert_lesion(
        datasets, center_mm=skull_base_centre_mm(radius), radius_mm=radius, hu=HAEMATOMA_HU, seed=2
    )
    series = load_datasets(datasets)
    result = pipeline.run(series)
    truth = frame_truth(series, datasets, lesion.masks)
    assert result.segments[0].segment == HYPERDENSE_SEGMENT
    assert dice(result.segments[0].frame_mask, truth) >= 0.8
    assert len(result.segments[0].regions) == 1


def test_normal_head_has_no_haemorrhage_region(pipeline: HyperdenseThresholdPipeline) -> None:
    series = load_datasets(small_head(6))
    result = pipeline.run(series)
    assert result.segments[0].total is None
    assert len(result.segments) == 1  # no calcification either: the synthetic head has none
    with pytest.raises(PipelineError, match="no lesion: no risk computed"):
        find_lesion(series, pipeline)


@pytest.mark.parametrize("site", sorted(CALCIFICATION_SITES_MM))
def test_calcification_is_labelled_and_never_scored(
    pipeline: HyperdenseThresholdPipeline, site: str
) -> None:
    datasets = small_head(7)
    calcification = insert_lesion(
        datasets,
        center_mm=site_mm(CALCIFICATION_SITES_MM[site]),
        radius_mm=CALCIFICATION_RADIUS_MM,
        hu=CALCIFICATION_HU,
        seed=3,
        irregular=False,
    )
    series = load_datasets(datasets)
    result = pipeline.run(series)
    truth = frame_truth(series, datasets, calcification.masks)
    calcified = segment_of(result, CALCIFICATION_SEGMENT.label)
    assert calcified is not None, result.notes
    assert np.count_nonzero(calcified & truth) >= 0.8 * truth.sum()
    assert not (result.segments[0].frame_mask & truth).any()
    assert result.segments[0].total is None
    assert any("calcif" in note and "never scored" in note for note in result.notes)
    with pytest.raises(PipelineError, match="no lesion: no risk computed"):
        find_lesion(series, pipeline)


def test_haematoma_beside_calcified_choroid_plexus_is_the_scored_region(
    pipeline: HyperdenseThresholdPipeline,
) -> None:
    datasets = small_head(8)
    plexus = CALCIFICATION_SITES_MM["choroid plexus"]
    calcification = insert_lesion(
        datasets, center_mm=site_mm(plexus), radius_mm=4.0, hu=CALCIFICATION_HU, seed=4,
        irregular=False,
    )  # fmt: skip
    beside = (plexus[0] + 16.0, plexus[1], plexus[2])  # lateral to the atrium, touching it
    haematoma = insert_lesion(datasets, center_mm=site_mm(beside), radius_mm=12.0, hu=70.0, seed=5)
    series = load_datasets(datasets)
    lesion = find_lesion(series, pipeline)
    scored = lesion.frame_mask
    haem_truth = frame_truth(series, datasets, haematoma.masks)
    calc_truth = frame_truth(series, datasets, calcification.masks)
    assert dice(scored, haem_truth) >= 0.8
    assert not (scored & calc_truth).any()
    result = pipeline.run(series)
    calcified = segment_of(result, CALCIFICATION_SEGMENT.label)
    assert (
        calcified is not None and np.count_nonzero(calcified & calc_truth) >= 0.8 * calc_truth.sum()
    )


def test_segment_and_run_agree(pipeline: HyperdenseThresholdPipeline) -> None:
    datasets = small_head(9)
    insert_lesion(datasets, center_mm=None, radius_mm=10.0, hu=65.0, seed=6)
    series = load_datasets(datasets)
    labels, count = pipeline.segment(series)
    assert count == 1
    result = pipeline.run(series, (labels, count))
    np.testing.assert_array_equal(
        result.segments[0].frame_mask, grid_to_frames(series, labels == 1)
    )


def test_new_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="calcification_hu"):
        HyperdenseParameters(low_hu=50.0, calcification_hu=40.0)
    with pytest.raises(ValueError, match="regrow_mm"):
        HyperdenseParameters(regrow_mm=-1.0)
    stored = HyperdenseThresholdPipeline().parameters
    assert stored == HyperdenseParameters()


@pytest.mark.shared
def test_real_head_skull_base_haematoma_is_found(
    pipeline: HyperdenseThresholdPipeline, ge_headct_dir: Path
) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted(ge_headct_dir.glob("*.dcm"))]
    radius = 10.0
    centre = skull_base_centre(datasets, radius, np.random.default_rng(21))
    lesion = insert_lesion(datasets, center_mm=centre, radius_mm=radius, hu=HAEMATOMA_HU, seed=21)
    series = load_datasets(datasets)
    found = find_lesion(series, pipeline)
    truth = frame_truth(series, datasets, lesion.masks)
    assert dice(found.frame_mask, truth) >= 0.8


@pytest.mark.shared
def test_real_head_calcifications_are_not_haemorrhage(
    pipeline: HyperdenseThresholdPipeline, ge_headct_dir: Path
) -> None:
    series = load_datasets([pydicom.dcmread(p) for p in sorted(ge_headct_dir.glob("*.dcm"))])
    result = pipeline.run(series)
    calcified = [s for s in result.segments if s.segment == CALCIFICATION_SEGMENT]
    assert calcified and calcified[0].total is not None
    assert max(r.hu_max for r in calcified[0].regions) > 200.0  # the dense plexus foci
    hyperdense = result.segments[0]
    assert all(r.hu_max < 200.0 for r in hyperdense.regions)


@pytest.mark.parametrize(("hu", "volume"), [(130.0, 0.7), (160.0, 1.5)])
def test_contrast_stain_stays_hyperdense(
    pipeline: HyperdenseThresholdPipeline, hu: float, volume: float
) -> None:
    datasets = small_head(10)
    radius = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    stain = insert_lesion(datasets, center_mm=None, radius_mm=radius, hu=hu, seed=12)
    series = load_datasets(datasets)
    result = pipeline.run(series)
    truth = frame_truth(series, datasets, stain.masks)
    assert dice(result.segments[0].frame_mask, truth) >= 0.8
    assert segment_of(result, CALCIFICATION_SEGMENT.label) is None
