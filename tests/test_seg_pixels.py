"""The SEG's pixels: segments that do not overlap go to highdicom as one label array,
segments of two classes that overlap as a stack of masks; either way each segment reads
back as its region's mask on every source frame, with the right SegmentsOverlap, and the
label array holds one byte per voxel, not one per voxel and segment.

The series is generated (``pipelines.synthetic``, 12 slices of 64 x 64, tilted); the
regions are boxes placed by hand.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr import CodedConcept
from numpy.typing import NDArray
from pydicom.sr.codedict import codes

from pipelines.base import Algorithm, PipelineResult, SegmentClass, SegmentResult
from pipelines.geometry import represented_thickness
from pipelines.measure import measure_region
from pipelines.outputs import build_outputs
from pipelines.outputs.regions import segment_plan
from pipelines.outputs.seg import seg_pixel_array
from pipelines.series import LoadedSeries
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_datasets

pytestmark = pytest.mark.filterwarnings("ignore:The string")

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
CATEGORY = CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
LESION = SegmentClass("Lesion", CATEGORY, CodedConcept.from_code(codes.SCT.Hemorrhage))
CALCIFIED = SegmentClass(
    "Calcification", CATEGORY, CodedConcept.from_code(codes.SCT.PathologicCalcification)
)
ALGORITHM = Algorithm("test boxes", "1.0.0", "test regions", "placed by hand")


@pytest.fixture(scope="module")
def series() -> LoadedSeries:
    """12 tilted slices of 64 x 64."""
    return load_datasets(synthetic_head_ct(4, n_slices=12, rows=64, gantry_tilt_deg=12.0))


def box(series: LoadedSeries, frames: slice, rows: slice, cols: slice) -> NDArray[np.bool_]:
    """A box-shaped mask on the frames."""
    mask = np.zeros(series.frame_hu.shape, dtype=bool)
    mask[frames, rows, cols] = True
    return mask


def segment(
    series: LoadedSeries, kind: SegmentClass, masks: list[NDArray[np.bool_]]
) -> SegmentResult:
    """A class of regions ``masks`` (disjoint), measured, with its region labels."""
    thickness = represented_thickness(series.stack.offsets[:, 0])
    areas = np.array(
        [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
    )
    labels = np.zeros(series.frame_hu.shape, dtype=np.int32)
    for k, mask in enumerate(masks, start=1):
        labels[mask] = k
    union = labels > 0
    regions = [measure_region(m, series.frame_hu, areas, thickness) for m in masks]
    total = measure_region(union, series.frame_hu, areas, thickness)
    return SegmentResult(kind, union, regions, total, labels)


def read_back(seg: hd.seg.Segmentation, series: LoadedSeries, count: int) -> NDArray[np.bool_]:
    """Every segment's mask on the series' frames, (frames, rows, columns, segments)."""
    pixels = seg.get_pixels_by_source_instance(
        [f.sop_instance_uid for f in series.frames], segment_numbers=list(range(1, count + 1))
    )
    return np.asarray(pixels).astype(bool)


def test_segments_apart_are_one_label_array_and_read_back(series: LoadedSeries) -> None:
    lesions = [box(series, slice(2, 6), slice(20, 30), slice(20, 30)),
               box(series, slice(5, 9), slice(35, 40), slice(30, 44))]  # fmt: skip
    calcified = [box(series, slice(7, 8), slice(10, 12), slice(10, 12))]
    segments = [segment(series, LESION, lesions), segment(series, CALCIFIED, calcified)]
    result = PipelineResult(ALGORITHM, segments, key_frame=4)
    planned = segment_plan(result)
    pixels = seg_pixel_array(series, planned)
    assert pixels.shape == series.frame_hu.shape and pixels.dtype == np.uint8
    seg = build_outputs(series, result, pipeline_name="boxes", content_datetime=WHEN)[0]
    assert seg.SegmentsOverlap == "NO" and int(seg.NumberOfFrames) == 3 * len(series.frames)
    found = read_back(seg, series, 3)
    for number, mask in enumerate([*lesions, *calcified]):
        np.testing.assert_array_equal(found[..., number], mask)
        np.testing.assert_array_equal(planned[number].mask, mask)
        np.testing.assert_array_equal(planned[number].voxels(), np.nonzero(mask))


def test_segments_of_two_classes_that_overlap_are_a_stack_and_read_back(
    series: LoadedSeries,
) -> None:
    lesion = box(series, slice(2, 6), slice(20, 30), slice(20, 30))
    calcified = box(series, slice(4, 5), slice(28, 33), slice(28, 33))  # shares voxels
    segments = [segment(series, LESION, [lesion]), segment(series, CALCIFIED, [calcified])]
    result = PipelineResult(ALGORITHM, segments, key_frame=4)
    pixels = seg_pixel_array(series, segment_plan(result))
    assert pixels.shape == (*series.frame_hu.shape, 2)
    seg = build_outputs(series, result, pipeline_name="boxes", content_datetime=WHEN)[0]
    assert seg.SegmentsOverlap == "YES"
    found = read_back(seg, series, 2)
    np.testing.assert_array_equal(found[..., 0], lesion)
    np.testing.assert_array_equal(found[..., 1], calcified)
