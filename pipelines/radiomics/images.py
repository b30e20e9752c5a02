"""Numpy volumes and masks as SimpleITK images, the crop around a ROI and its resampling.

Arrays have axis order (slice, row, column) with spacing in that order, as
``pipelines.series.Volume`` gives them; SimpleITK orders (x, y, z) = (column, row,
slice), so spacing and direction columns are reversed on the way in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import imageoperations

from pipelines.radiomics.bspline import resample_bspline

Box = tuple[tuple[int, int], ...]  # per axis (start, stop), array order


def to_image(
    array: NDArray[np.generic],
    spacing_mm: Sequence[float],
    *,
    direction: NDArray[np.float64] | None = None,
    start: Sequence[int] = (0, 0, 0),
) -> sitk.Image:
    """``array`` as an image whose voxel 0 sits at index ``start`` of a grid at the origin.

    ``direction`` is the 3x3 matrix whose columns are the unit vectors of the slice, row
    and column axes (identity by default). Images of sub-blocks of one grid made with
    their ``start`` share that grid's physical space.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    axes = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    image.SetDirection([float(v) for v in axes[:, ::-1].ravel()])
    image.SetOrigin([float(v) for v in axes @ (np.asarray(start) * spacing)])
    return image


def bounding_box(roi: NDArray[np.bool_]) -> Box:
    """The ROI's bounding box, per axis (first, last + 1)."""
    box = []
    for axis in range(roi.ndim):
        hit = np.flatnonzero(roi.any(axis=tuple(a for a in range(roi.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def grow(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` widened by ``margin`` voxels per axis, clipped to ``shape``."""
    return tuple(
        (max(lo - m, 0), min(hi + m, n)) for (lo, hi), m, n in zip(box, margin, shape, strict=True)
    )


def slices(box: Box) -> tuple[slice, ...]:
    """``box`` as an index into an array."""
    return tuple(slice(lo, hi) for lo, hi in box)


def outside_corner(crop: Box, box: Box) -> tuple[int, ...] | None:
    """A corner of ``crop`` outside ``box`` (crop-relative index); None if there is none."""
    for corner in np.ndindex(*(2,) * len(crop)):
        index = [lo if c == 0 else hi - 1 for (lo, hi), c in zip(crop, corner, strict=True)]
        if any(not lo <= i < hi for i, (lo, hi) in zip(index, box, strict=True)):
            return tuple(i - lo for i, (lo, _) in zip(index, crop, strict=True))
    return None


def resample_crop(
    image: sitk.Image,
    mask: sitk.Image,
    start: Sequence[int],
    shape: Sequence[int],
    settings: dict[str, Any],
) -> tuple[sitk.Image, sitk.Image]:
    """pyradiomics' ``resampleImage`` of the whole volume, from a crop of image and mask.

    ``image`` and ``mask`` (label ``settings["label"]``) are the block at array index
    ``start`` of a volume of array shape ``shape``. pyradiomics aligns the resampling grid
    to the mask's voxel 0 and clips it to the mask's extent, so the grid is worked out for
    the whole volume here (the same arithmetic) and the crop, holding the ROI and what the
    interpolator reaches, is resampled onto it.
    """
    label = int(settings.get("label", 1))
    spacing = np.array(mask.GetSpacing())
    target = np.array(settings["resampledPixelSpacing"], dtype=float)
    target = np.where(target == 0, spacing, target)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(mask)
    offset = np.array(start[::-1])  # (x, y, z)
    found = np.array(statistics.GetBoundingBox(label))
    low, size = found[:3] + offset, found[3:]
    target = np.where(size != 1, target, spacing)
    if np.allclose(np.array(image.GetSpacing()), target):  # no interpolation: crop-invariant
        return imageoperations.resampleImage(image, mask, **settings)
    ratio = spacing / target
    pad = settings.get("padDistance", 5)
    lower = np.floor((low - 0.5) * ratio - pad)
    upper = np.ceil((low + size - 0.5) * ratio + pad)
    most = np.ceil(np.array(shape[::-1]) * ratio) - 1
    lower = np.where(lower < 0, 0, lower)
    upper = np.where(upper > most, most, upper)
    origin_index = 0.5 * (target - spacing) / spacing + lower / ratio - offset
    interpolator = settings.get("interpolator", sitk.sitkBSpline)
    if isinstance(interpolator, str):
        interpolator = getattr(sitk, interpolator, sitk.sitkBSpline)
    resample = sitk.ResampleImageFilter()
    resample.SetOutputSpacing(target.tolist())
    resample.SetOutputDirection(mask.GetDirection())
    resample.SetSize(np.array(upper - lower + 1, dtype="int").tolist())
    resample.SetOutputOrigin(mask.TransformContinuousIndexToPhysicalPoint(origin_index.tolist()))
    resample.SetOutputPixelType(image.GetPixelID())
    resample.SetInterpolator(interpolator)
    if interpolator == sitk.sitkBSpline and image.GetPixelID() == sitk.sitkFloat64:
        values = resample_bspline(image, origin_index, target / spacing, resample.GetSize())
        resampled_image = sitk.GetImageFromArray(values)
        resampled_image.SetSpacing(resample.GetOutputSpacing())
        resampled_image.SetOrigin(resample.GetOutputOrigin())
        resampled_image.SetDirection(resample.GetOutputDirection())
    else:
        resampled_image = resample.Execute(image)
    resample.SetOutputPixelType(mask.GetPixelID())
    resample.SetInterpolator(sitk.sitkNearestNeighbor)
    return resampled_image, resample.Execute(mask)
