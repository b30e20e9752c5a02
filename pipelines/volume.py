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
from pydicom.pixels import pixel_array

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
NAMED_INSTANCES_MAX = 5  # instances named in a failure reason; the rest are counted


class VolumeLoadError(Exception):
    """A series cannot be turned into a volume; the message says why."""


class InconsistentSeries(VolumeLoadError):
    """The instances of a series do not form one acquisition (several series, patients,
    studies, frames of reference, orientations, matrix sizes or pixel spacings)."""


@dataclass(frozen=True)
class _Frame:
    """One frame's place and rescale, read from the headers before any pixel is
    decoded (pixels are then decoded one instance at a time straight into the series'
    HU array, so no frame is held twice)."""

    dataset: Dataset
    frame_number: int | None
    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]  # Rows, Columns
    rescale: tuple[np.float32, np.float32]  # slope, intercept


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
    """Load the files of one series; see ``load_datasets``. The datasets read are the
    series' own: their encoded pixel data is dropped once decoded."""
    return load_datasets(read_datasets(paths), slice_spacing_mm, drop_pixel_data=True)


def load_datasets(
    datasets: Sequence[Dataset],
    slice_spacing_mm: float | None = None,
    *,
    drop_pixel_data: bool = False,
) -> LoadedSeries:
    """Turn the instances of one series into frames and an orthogonal HU volume.

    ``slice_spacing_mm`` is the grid spacing along the slice normal; by default the
    smallest gap between frames (so no acquired plane is undersampled).
    ``drop_pixel_data``: delete each image's PixelData once it is decoded (the series
    then holds its pixels once, as ``frame_hu``; the writers read only the headers); the
    caller's datasets are changed, so only for datasets the caller does not reuse.
    """
    check_one_series(datasets)
    images = [ds for ds in datasets if not is_localizer(ds)]
    if not images:
        raise VolumeLoadError("the series holds no image other than localizers")
    check_same_value(images, "frames of reference", ("FrameOfReferenceUID",))
    without_pixels = [ds for ds in images if "PixelData" not in ds]
    if without_pixels:
        raise VolumeLoadError(
            f"{len(without_pixels)} of {len(images)} instances carry no pixel data: "
            + _names(without_pixels)
        )
    frames = _all_frames(images)
    _check_consistent(frames)
    stack, order = plane_stack(
        np.stack([f.position for f in frames]), frames[0].orientation, frames[0].pixel_spacing
    )
    frames = [frames[i] for i in order]
    if len(frames) > 1 and np.min(np.diff(stack.offsets[:, 0])) < 1e-3:
        raise InconsistentSeries(
            "two frames lie on the same plane (duplicate or mixed acquisitions)"
        )
    frame_hu = _hounsfield(frames, len(images), drop_pixel_data)
    sources = [(f.dataset, f.frame_number, f.position) for f in frames]
    spacing = slice_spacing_mm or default_slice_spacing(stack)
    grid = orthogonal_grid(stack, frame_hu.shape[1:], spacing)
    volume = Volume(resample_to_grid(frame_hu, stack, grid), grid.affine(stack.basis))
    kept = list(dict.fromkeys(id(ds) for ds, _, _ in sources))
    by_id = {id(ds): ds for ds, _, _ in sources}
    return LoadedSeries(
        datasets=[by_id[i] for i in kept],
        frames=[
            SourceFrame(str(ds.SOPInstanceUID), number, position)
            for ds, number, position in sources
        ],
        frame_hu=frame_hu,
        frame_affines=frame_affines(stack),
        volume=volume,
        gantry_tilt_deg=tilt_degrees(stack),
        stack=stack,
        grid=grid,
    )


def instance_name(ds: Dataset) -> str:
    """How a failure reason names an instance: SOP Instance UID and InstanceNumber."""
    sop = ds.get("SOPInstanceUID", "(no SOP Instance UID)")
    return f"{sop} (InstanceNumber {ds.get('InstanceNumber', '?')})"


def _names(datasets: Sequence[Dataset]) -> str:
    """The first few instances' names, and how many more there are."""
    named = ", ".join(instance_name(ds) for ds in datasets[:NAMED_INSTANCES_MAX])
    rest = len(datasets) - NAMED_INSTANCES_MAX
    return named + (f" and {rest} more" if rest > 0 else "")


def _value_key(ds: Dataset, keywords: Sequence[str]) -> tuple[str, ...]:
    """The stripped string values of ``keywords`` in ``ds`` (``""`` when absent)."""
    return tuple(str(ds.get(keyword, "") or "").strip() for keyword in keywords)


def check_same_value(datasets: Sequence[Dataset], what: str, keywords: Sequence[str]) -> None:
    """Refuse a series whose instances differ in ``keywords``; the reason counts the
    instances per distinct value and never shows the values themselves."""
    counts: dict[tuple[str, ...], int] = {}
    for ds in datasets:
        key = _value_key(ds, keywords)
        counts[key] = counts.get(key, 0) + 1
    if len(counts) > 1:
        sizes = " and ".join(str(n) for n in sorted(counts.values(), reverse=True))
        raise InconsistentSeries(
            f"the series mixes {len(counts)} {what} ({' / '.join(keywords)} differ: "
            f"{sizes} instances)"
        )


def check_one_series(datasets: Sequence[Dataset]) -> None:
    """One patient (PatientID with its issuer), one study and one series UID."""
    check_same_value(datasets, "patients", ("PatientID", "IssuerOfPatientID"))
    check_same_value(datasets, "studies", ("StudyInstanceUID",))
    check_same_value(datasets, "series", ("SeriesInstanceUID",))


def _all_frames(images: Sequence[Dataset]) -> list[_Frame]:
    """Frames of every image, from the headers; refuses the series naming each instance
    that fails (with those that cannot be decoded either, when any fails)."""
    frames: list[_Frame] = []
    failed: dict[int, str] = {}
    for index, ds in enumerate(images):
        try:
            frames.extend(_frames_of(ds))
        except VolumeLoadError as exc:
            failed[index] = str(exc)
    if failed:
        for index, ds in enumerate(images):  # name the undecodable ones as well
            if index not in failed:
                try:
                    _decode(ds)
                except VolumeLoadError as exc:
                    failed[index] = str(exc)
        raise _unusable([(images[i], why) for i, why in sorted(failed.items())], len(images))
    return frames


def _unusable(failed: Sequence[tuple[Dataset, str]], total: int) -> VolumeLoadError:
    """The failure naming the first few unusable instances and why, counting the rest."""
    details = "; ".join(f"{instance_name(ds)}: {why}" for ds, why in failed[:NAMED_INSTANCES_MAX])
    rest = len(failed) - NAMED_INSTANCES_MAX
    return VolumeLoadError(
        f"{len(failed)} of {total} instances cannot be used: {details}"
        + (f" and {rest} more" if rest > 0 else "")
    )


def _frames_of(ds: Dataset) -> list[_Frame]:
    """The frames of a single-frame or multi-frame instance, with their geometry."""
    try:
        shape = (int(ds.Rows), int(ds.Columns))
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise VolumeLoadError(f"an image lacks its matrix size ({exc})") from exc
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [_enhanced_frame(ds, i, shape) for i in range(count)]
    if count != 1:
        raise VolumeLoadError("a multi-frame instance without functional groups cannot be placed")
    try:
        return [
            _Frame(
                ds,
                None,
                np.asarray(ds.ImagePositionPatient, dtype=np.float64),
                np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
                (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                shape,
                _rescale(ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)),
            )
        ]
    except AttributeError as exc:
        raise VolumeLoadError(f"an image lacks plane geometry ({exc})") from exc


def _enhanced_frame(ds: Dataset, index: int, shape: tuple[int, int]) -> _Frame:
    """One frame of an enhanced multi-frame instance, geometry from functional groups."""

    def item(sequence: str) -> Dataset:
        per_frame = ds.PerFrameFunctionalGroupsSequence[index]
        if sequence in per_frame:
            return per_frame[sequence][0]
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and sequence in shared[0]:
            return shared[0][sequence][0]
        raise VolumeLoadError(f"frame {index + 1} has no {sequence}")

    if index >= len(ds.PerFrameFunctionalGroupsSequence):
        raise VolumeLoadError(f"frame {index + 1} has no functional groups")
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
        shape,
        _rescale(slope, intercept),
    )


def _decode(ds: Dataset) -> NDArray[np.generic]:
    """Decoded stored values, or a ``VolumeLoadError`` naming the transfer syntax.

    Not ``ds.pixel_array``: that keeps a decoded copy in the dataset, which stays with
    the loaded series for as long as its outputs are written."""
    try:
        return np.asarray(pixel_array(ds))
    except Exception as exc:  # codecs raise many types; all mean "cannot decode"
        meta = getattr(ds, "file_meta", Dataset())
        syntax = meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", str(syntax))
        raise VolumeLoadError(f"cannot decode pixel data ({name}): {exc}") from exc


def _rescale(slope: float | str, intercept: float | str) -> tuple[np.float32, np.float32]:
    """RescaleSlope and RescaleIntercept as float32; a slope or intercept that is not a
    finite number, or a slope that is not positive, is refused."""
    try:
        slope_value, intercept_value = float(slope), float(intercept)
    except (TypeError, ValueError) as exc:
        raise VolumeLoadError("RescaleSlope or RescaleIntercept is not one number") from exc
    if not (np.isfinite(slope_value) and np.isfinite(intercept_value)) or slope_value <= 0:
        raise VolumeLoadError(
            f"RescaleSlope {slope_value:g} / RescaleIntercept {intercept_value:g} unusable"
        )
    with np.errstate(over="ignore"):
        rescale = np.float32(slope_value), np.float32(intercept_value)
    if not np.all(np.isfinite(rescale)):
        raise VolumeLoadError(f"RescaleSlope {slope_value:g} overflows the HU values")
    return rescale


def _hounsfield(
    frames: Sequence[_Frame], instances: int, drop_pixel_data: bool
) -> NDArray[np.float32]:
    """The frames' HU values in their order: each instance decoded once and each of its
    frames rescaled straight into its place (``stored.astype(float32) * slope +
    intercept``), its PixelData then deleted when ``drop_pixel_data``; refuses the series
    naming each instance that cannot be decoded or whose values overflow."""
    hu = np.empty((len(frames), *frames[0].shape), dtype=np.float32)
    places: dict[int, list[tuple[int, _Frame]]] = {}
    for place, frame in enumerate(frames):
        places.setdefault(id(frame.dataset), []).append((place, frame))
    failed: list[tuple[Dataset, str]] = []
    for placed in places.values():
        ds = placed[0][1].dataset
        try:
            stored = _decode(ds)
            stored = stored[np.newaxis] if stored.ndim == 2 else stored
            for place, frame in placed:
                _rescale_into(hu[place], stored[(frame.frame_number or 1) - 1], frame.rescale)
            if drop_pixel_data:
                del ds.PixelData
        except (VolumeLoadError, IndexError) as exc:
            failed.append((ds, str(exc) if isinstance(exc, VolumeLoadError) else "too few frames"))
    if failed:
        raise _unusable(failed, instances)
    return hu


def _rescale_into(
    plane: NDArray[np.float32], stored: NDArray[np.generic], rescale: tuple[np.float32, np.float32]
) -> None:
    """Write ``stored`` in HU into ``plane``; values that overflow are refused."""
    if stored.shape != plane.shape:
        raise VolumeLoadError(f"pixel data is {stored.shape}, not Rows x Columns {plane.shape}")
    slope, intercept = rescale
    plane[...] = stored
    with np.errstate(over="ignore", invalid="ignore"):
        plane *= slope
        plane += intercept
    if not np.all(np.isfinite(plane)):
        raise VolumeLoadError(f"RescaleSlope {float(slope):g} overflows the HU values")


def _check_consistent(frames: Sequence[_Frame]) -> None:
    """All frames share orientation, pixel spacing and matrix size, or the series is refused."""
    first = frames[0]
    for frame in frames[1:]:
        if np.max(np.abs(frame.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise InconsistentSeries("frames have more than one orientation")
        if frame.shape != first.shape:
            raise InconsistentSeries("frames have different matrix sizes")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise InconsistentSeries("frames have different pixel spacings")
