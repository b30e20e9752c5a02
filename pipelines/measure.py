"""Pure measurements of segmented regions: components, volume, HU statistics, key frame.

Volumes come from a mask on the orthogonal grid; HU statistics and the key frame come
from the source frames as acquired (``LoadedSeries.frame_hu`` and a frame mask), so the
numbers are those a reader gets contouring the original slices.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.base import RegionMeasurements, SegmentClass, SegmentResult
from pipelines.geometry import grid_to_frames, represented_thickness
from pipelines.series import LoadedSeries, label_dtype
from pipelines.stages import charged_to

HU_MAX_WINDOW_PX = 3
"""Side of the in-plane window whose mean defines HUmax (Jiang et al. 2025: 3x3 pixels)."""


def structure(connectivity: int) -> NDArray[np.bool_]:
    """3-D neighbourhood for labelling: 6 (faces), 18 (faces, edges) or 26 (all)."""
    ranks = {6: 1, 18: 2, 26: 3}
    if connectivity not in ranks:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    return np.asarray(ndimage.generate_binary_structure(3, ranks[connectivity]))


def connected_regions(
    mask: NDArray[np.bool_],
    voxel_volume_ml: float,
    min_volume_ml: float,
    connectivity: int = 26,
) -> tuple[NDArray[np.int32], int]:
    """Label the 3-D connected regions of ``mask`` of at least ``min_volume_ml``.

    Returns the label array (0 background, 1..n largest first, smaller regions dropped)
    and n.
    """
    out = np.zeros(mask.shape, dtype=np.int32)
    if not mask.any():
        return out, 0
    box = bounding_box(mask)
    labels, count = ndimage.label(mask[box], structure=structure(connectivity))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_volume_ml
    kept = np.nonzero(sizes >= min_volume_ml)[0]
    kept = kept[np.argsort(-sizes[kept], kind="stable")]
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    out[box] = lookup[labels]
    return out, len(kept)


def bounding_box(mask: NDArray[np.bool_], margin: int | tuple[int, ...] = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding a non-empty ``mask``, widened by ``margin``
    voxels (one for every axis, or one per axis) and clipped to the array."""
    margins = (margin,) * mask.ndim if isinstance(margin, int) else margin
    box = []
    for axis, grow in enumerate(margins):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        where = np.flatnonzero(mask.any(axis=others))
        box.append(
            slice(max(int(where[0]) - grow, 0), min(int(where[-1]) + grow + 1, mask.shape[axis]))
        )
    return tuple(box)


def mean_hu(hu: NDArray[np.floating], mask: NDArray[np.bool_]) -> float:
    """Mean HU over the mask's voxels; NaN for an empty mask."""
    return float(hu[mask].mean()) if mask.any() else float("nan")


def hu_max(hu: NDArray[np.floating], mask: NDArray[np.bool_]) -> float:
    """HUmax: the highest in-plane 3x3 mean of HU centred on a voxel of the mask.

    ``hu`` and ``mask`` are (frames, rows, columns); the window may reach past the region's
    edge (it is centred on a region voxel) and repeats edge pixels at the image border.
    NaN for an empty mask.
    """
    if not mask.any():
        return float("nan")
    half = HU_MAX_WINDOW_PX // 2
    box = (slice(None), *bounding_box(mask, margin=half)[1:])
    size = (1, HU_MAX_WINDOW_PX, HU_MAX_WINDOW_PX)
    means = ndimage.uniform_filter(hu[box].astype(np.float64), size=size, mode="nearest")
    return float(means[mask[box]].max())


def largest_frame(
    frame_mask: NDArray[np.bool_], pixel_area_mm2: NDArray[np.float64]
) -> tuple[int, float]:
    """The frame where the mask's area is largest (first on ties) and that area in mm2."""
    areas = frame_mask.sum(axis=(1, 2)) * np.asarray(pixel_area_mm2, dtype=np.float64)
    key = int(np.argmax(areas))
    return key, float(areas[key])


def measure_region(
    frame_mask: NDArray[np.bool_],
    frame_hu: NDArray[np.floating],
    pixel_area_mm2: NDArray[np.float64],
    thickness_mm: NDArray[np.float64],
) -> RegionMeasurements:
    """Measure a region on the acquired frames, as a reader would on the images.

    Volume is planimetric (Cavalieri): each frame's mask area times the thickness the
    frame represents (half the gap to each neighbouring plane), so it is the volume of
    exactly what the SEG shows. HU statistics and the key frame come from the frames too.
    """
    key, area = largest_frame(frame_mask, pixel_area_mm2)
    areas = frame_mask.sum(axis=(1, 2)) * np.asarray(pixel_area_mm2, dtype=np.float64)
    return RegionMeasurements(
        volume_ml=float(np.sum(areas * thickness_mm)) / 1000.0,
        hu_max=hu_max(frame_hu, frame_mask),
        hu_mean=mean_hu(frame_hu, frame_mask),
        key_frame=key,
        key_area_mm2=area,
    )


@charged_to("segmentation")  # mapping the grid's regions onto the frames
def measure_segment(
    series: LoadedSeries, segment: SegmentClass, labels: NDArray[np.integer], count: int
) -> SegmentResult:
    """Map labelled grid regions ``1..count`` onto the source frames and measure them.

    A region that no acquired frame crosses (it exists only between two planes, by
    interpolation) cannot be shown or measured on the images and is dropped; the result's
    regions are those kept, in label order.
    """
    thickness = represented_thickness(series.stack.offsets[:, 0])
    areas = np.array(
        [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
    )
    kept = np.zeros(labels.shape, dtype=bool)
    region_labels = np.zeros(series.frame_hu.shape, dtype=label_dtype(count))
    regions = []
    for i in range(1, count + 1):
        grid_mask = labels == i
        frame_mask = grid_to_frames(series, grid_mask)
        if frame_mask.any():
            kept |= grid_mask
            regions.append(measure_region(frame_mask, series.frame_hu, areas, thickness))
            region_labels[frame_mask & (region_labels == 0)] = len(regions)
    frame_mask = grid_to_frames(series, kept)
    total = measure_region(frame_mask, series.frame_hu, areas, thickness) if regions else None
    region_labels[~frame_mask] = 0
    return SegmentResult(segment, frame_mask, regions, total, region_labels)
