"""Load one CT series from DICOM files into a ``LoadedSeries``.

Handles single-frame and enhanced (or legacy-converted enhanced) multi-frame CT, every
transfer syntax pydicom can decode with the installed plugins (JPEG lossless, JPEG-LS and
JPEG 2000 through pylibjpeg; RLE natively; deflate on reading), gantry tilt and uneven
slice spacing (resampled onto an orthogonal grid), and localizers mixed into the series
(left out). Anything it cannot load raises ``VolumeLoadError`` with a reason an admin can
read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.geometry import (
    default_slice_spacing,
    frame_affines,
    orthogonal_grid,
    plane_stack,
    resample_to_grid,
    tilt_degrees,
)
from pipelines.series import LoadedSeries, SourceFrame, Volume

ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines between frames


class VolumeLoadError(Exception):
    """A series cannot be turned into a volume; the message says why."""


class InconsistentSeries(VolumeLoadError):
    """The instances of a series do not form one acquisition (several series, patients,
    studies, frames of reference, orientations, matrix sizes or pixel spacings)."""


@dataclass(frozen=True)
class _Frame:
    """One decoded frame before sorting."""

    dataset: Dataset
    frame_number: int | None
    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    hu: NDArray[np.float32]


def read_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read DICOM files (pixel data included), refusing unreadable ones by name."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise VolumeLoadError(f"{Path(path).name}: not a readable DICOM file ({exc})") from exc
    return datasets


def is_localizer(ds: Dataset) -> bool:
    """True for scout/localizer images (ImageType value 3 LOCALIZER)."""
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    return "LOCALIZER" in image_type


def load_series(paths: Sequence[Path], slice_spacing_mm: float | None = None) -> LoadedSeries:
    """Load the files of one series; see ``load_datasets``."""
    return load_datasets(read_datasets(paths), slice_spacing_mm)


def load_datasets(
    datasets: Sequence[Dataset], slice_spacing_mm: float | None = None
) -> LoadedSeries:
    """Turn the instances of one series into frames and an orthogonal HU volume.

    ``slice_spacing_mm`` is the grid spacing along the slice normal; by default the
    smallest gap between frames (so no acquired plane is undersampled).
    """
    images = [ds for ds in datasets if "PixelData" in ds and not is_localizer(ds)]
    if not images:
        raise VolumeLoadError("the series holds no image other than localizers")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
    if len(series_uids) > 1:
        raise InconsistentSeries(f"the files belong to {len(series_uids)} different series")
    frames = [frame for ds in images for frame in _frames_of(ds)]
    _check_consistent(frames)
    stack, order = plane_stack(
        np.stack([f.position for f in frames]), frames[0].orientation, frames[0].pixel_spacing
    )
    frames = [frames[i] for i in order]
    if len(frames) > 1 and np.min(np.diff(stack.offsets[:, 0])) < 1e-3:
        raise InconsistentSeries(
            "two frames lie on the same plane (duplicate or mixed acquisitions)"
        )
    frame_hu = np.stack([f.hu for f in frames])
    spacing = slice_spacing_mm or default_slice_spacing(stack)
    grid = orthogonal_grid(stack, frame_hu.shape[1:], spacing)
    volume = Volume(resample_to_grid(frame_hu, stack, grid), grid.affine(stack.basis))
    kept = list(dict.fromkeys(id(f.dataset) for f in frames))
    by_id = {id(f.dataset): f.dataset for f in frames}
    return LoadedSeries(
        datasets=[by_id[i] for i in kept],
        frames=[
            SourceFrame(str(f.dataset.SOPInstanceUID), f.frame_number, f.position) for f in frames
        ],
        frame_hu=frame_hu,
        frame_affines=frame_affines(stack),
        volume=volume,
        gantry_tilt_deg=tilt_degrees(stack),
        stack=stack,
        grid=grid,
    )


def _frames_of(ds: Dataset) -> list[_Frame]:
    """Decode a single-frame or multi-frame instance into frames with geometry."""
    pixels = _decode(ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        return [_enhanced_frame(ds, i, pixels[i]) for i in range(pixels.shape[0])]
    if pixels.ndim != 2:
        raise VolumeLoadError("a multi-frame instance without functional groups cannot be placed")
    try:
        return [
            _Frame(
                ds,
                None,
                np.asarray(ds.ImagePositionPatient, dtype=np.float64),
                np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
                (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                _rescale(pixels, ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)),
            )
        ]
    except AttributeError as exc:
        raise VolumeLoadError(f"an image lacks plane geometry ({exc})") from exc


def _enhanced_frame(ds: Dataset, index: int, pixels: NDArray[np.generic]) -> _Frame:
    """One frame of an enhanced multi-frame instance, geometry from functional groups."""

    def item(sequence: str) -> Dataset:
        per_frame = ds.PerFrameFunctionalGroupsSequence[index]
        if sequence in per_frame:
            return per_frame[sequence][0]
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and sequence in shared[0]:
            return shared[0][sequence][0]
        raise VolumeLoadError(f"frame {index + 1} has no {sequence}")

    measures = item("PixelMeasuresSequence")
    try:
        transform = item("PixelValueTransformationSequence")
        slope, intercept = transform.RescaleSlope, transform.RescaleIntercept
    except VolumeLoadError:
        slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
    return _Frame(
        ds,
        index + 1,
        np.asarray(item("PlanePositionSequence").ImagePositionPatient, dtype=np.float64),
        np.asarray(item("PlaneOrientationSequence").ImageOrientationPatient, dtype=np.float64),
        (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
        _rescale(pixels, slope, intercept),
    )


def _decode(ds: Dataset) -> NDArray[np.generic]:
    """Decoded stored values, or a ``VolumeLoadError`` naming the transfer syntax."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # codecs raise many types; all mean "cannot decode"
        meta = getattr(ds, "file_meta", Dataset())
        syntax = meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", str(syntax))
        raise VolumeLoadError(f"cannot decode pixel data ({name}): {exc}") from exc


def _rescale(
    pixels: NDArray[np.generic], slope: float | str, intercept: float | str
) -> NDArray[np.float32]:
    """Stored values to Hounsfield units."""
    return pixels.astype(np.float32) * np.float32(float(slope or 1)) + np.float32(
        float(intercept or 0)
    )


def _check_consistent(frames: Sequence[_Frame]) -> None:
    """All frames share orientation, pixel spacing and matrix size, or the series is refused."""
    first = frames[0]
    for frame in frames[1:]:
        if np.max(np.abs(frame.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise InconsistentSeries("frames have more than one orientation")
        if frame.hu.shape != first.hu.shape:
            raise InconsistentSeries("frames have different matrix sizes")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise InconsistentSeries("frames have different pixel spacings")
