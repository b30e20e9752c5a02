"""DICOM Segmentation (binary) of a pipeline's regions, on the source frames' planes.

One segment per region (``regions.segment_plan``), each with its class's coded property,
its own Tracking ID and UID (those of its SR measurement group) and a recommended display
colour (RecommendedDisplayCIELabValue, the colour the Secondary Capture draws it in).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import Algorithm, PipelineResult
from pipelines.outputs.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    OutputIdentity,
    algorithm_family,
    patient_study_source,
    plain,
    shallow_copy,
)
from pipelines.outputs.regions import PlannedSegment, segment_plan
from pipelines.series import LoadedSeries, label_dtype


def source_frame_keys(series: LoadedSeries) -> list[tuple[str, int | None]]:
    """(SOPInstanceUID, frame number) of every frame of ``series.datasets``, in their order.

    Single-frame instances give one key each (frame number None); a multi-frame instance
    gives one key per frame, numbered from 1.
    """
    keys: list[tuple[str, int | None]] = []
    for ds in series.datasets:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            keys.append((str(ds.SOPInstanceUID), None))
        else:
            keys += [(str(ds.SOPInstanceUID), k + 1) for k in range(n_frames)]
    return keys


def seg_pixel_array(
    series: LoadedSeries, planned: Sequence[PlannedSegment]
) -> NDArray[np.unsignedinteger]:
    """The SEG's pixels in the source datasets' frame order: segment numbers as a label
    array (source frames, rows, columns) when no two segments overlap, else a stack of
    masks (source frames, rows, columns, segments).

    highdicom writes the same binary frames and SegmentsOverlap from either; the label
    array spares the stack (one byte per voxel and segment) and highdicom's overlap sum
    over it (eight bytes per voxel). The planned masks follow ``series.frames``; a source
    frame that the loader did not keep stays empty.
    """
    if not planned:
        raise ValueError("a DICOM SEG needs at least one segment; the result has none")
    for p in planned:
        if p.shape != series.frame_hu.shape:
            raise ValueError(
                f"segment masks {p.shape} do not match the frames {series.frame_hu.shape}"
            )
    places = source_places(series)
    shape = (len(source_frame_keys(series)), *series.frame_hu.shape[1:])
    labels = np.zeros(shape, dtype=label_dtype(len(planned)))
    for class_labels, first, count in class_label_arrays(planned):
        for row, frame in places:
            plane = class_labels[frame]
            found = (plane > 0) & (plane <= count)
            if not found.any():
                continue
            target = labels[row]
            if target[found].any():  # segments of two classes overlap
                return seg_mask_stack(series, planned)
            target[found] = plane[found] + (first - 1)
    return labels


def source_places(series: LoadedSeries) -> list[tuple[int, int]]:
    """(source frame, frame of ``series.frames``) of every source frame the loader kept."""
    index = {(f.sop_instance_uid, f.frame_number): i for i, f in enumerate(series.frames)}
    keys = source_frame_keys(series)
    return [(row, index[key]) for row, key in enumerate(keys) if key in index]


def class_label_arrays(
    planned: Sequence[PlannedSegment],
) -> list[tuple[NDArray[np.integer], int, int]]:
    """Per class with regions: its frame labels (region k as k), the segment number of its
    first region and its number of regions (segments numbered consecutively per class)."""
    classes: dict[int, tuple[NDArray[np.integer], int, int]] = {}
    for p in planned:
        if p.labels is None or p.region_index is None:
            continue
        labels, first, count = classes.get(p.class_index, (p.labels, p.number, 0))
        classes[p.class_index] = (labels, first, count + 1)
    return list(classes.values())


def seg_mask_stack(series: LoadedSeries, planned: Sequence[PlannedSegment]) -> NDArray[np.uint8]:
    """Masks as (source frames, rows, columns, segments), in the source datasets' order,
    filled one segment at a time (for segments that overlap)."""
    places = source_places(series)
    rows = [row for row, _ in places]
    frames = [frame for _, frame in places]
    pixels = np.zeros(
        (len(source_frame_keys(series)), *series.frame_hu.shape[1:], len(planned)), dtype=np.uint8
    )
    for number, p in enumerate(planned):
        pixels[rows, :, :, number] = p.mask[frames]
    return pixels


def with_shared_pixel_measures(source: Dataset) -> Dataset:
    """``source``, or for a multi-frame source that keeps its pixel measures per frame
    (as legacy-converted instances may), a shallow copy with them shared: highdicom reads
    them from the shared functional groups only.
    """
    if "PerFrameFunctionalGroupsSequence" not in source:
        return source
    shared = source.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared:
        return source
    per_frame = source.PerFrameFunctionalGroupsSequence
    spacings = {tuple(str(v) for v in f.PixelMeasuresSequence[0].PixelSpacing) for f in per_frame}
    if len(spacings) != 1:
        raise ValueError(f"frames of {source.SOPInstanceUID} differ in pixel spacing")
    new_shared = Dataset()
    new_shared.update(shared)
    new_shared.PixelMeasuresSequence = per_frame[0].PixelMeasuresSequence
    completed = shallow_copy(source)
    completed.SharedFunctionalGroupsSequence = [new_shared]
    return completed


def segment_description(
    planned: PlannedSegment, algorithm: Algorithm, seg_sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    """Segment Sequence item: coded class, automatic algorithm, tracking ID and UID (the
    SR group's), recommended display colour."""
    identification = hd.AlgorithmIdentificationSequence(
        name=plain(algorithm.name),
        family=algorithm_family(algorithm),
        version=plain(algorithm.version),
        source=MANUFACTURER,
    )
    return hd.seg.SegmentDescription(
        segment_number=planned.number,
        segment_label=plain(planned.label),
        segmented_property_category=planned.segment.category,
        segmented_property_type=planned.segment.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        tracking_uid=planned.tracking_uid(seg_sop_instance_uid),
        tracking_id=plain(planned.label),
        display_color=planned.display_colour(),
    )


def build_seg(
    series: LoadedSeries,
    result: PipelineResult,
    identity: OutputIdentity,
    content_label: str = "HYPERDENSE",
    plan: Sequence[PlannedSegment] | None = None,
) -> hd.seg.Segmentation:
    """Binary SEG, one segment per region (``regions.segment_plan``, or ``plan`` when the
    caller made it already), every source frame kept.

    highdicom adds the source scanner and itself as Contributing Equipment.
    """
    planned = segment_plan(result) if plan is None else plan
    descriptions = [
        segment_description(p, result.algorithm, identity.sop_instance_uid) for p in planned
    ]
    return hd.seg.Segmentation(
        source_images=[
            with_shared_pixel_measures(patient_study_source(series.datasets[0])),
            *series.datasets[1:],
        ],
        pixel_array=seg_pixel_array(series, planned),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_description=plain(result.algorithm.notice),
        content_label=content_label,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        series_description=identity.series_description,
        content_date=identity.content_date,
        content_time=identity.content_time,
    )
