"""Radiomics features of one ROI with pyradiomics, computed on a crop around the ROI.

Stock pyradiomics filters the whole volume before it looks at the ROI. ``extract`` uses a
block of image and mask around the ROI instead, wide enough that every feature is the one
stock pyradiomics computes on the whole volume (``crop=False`` runs exactly that, the
reference the crop is tested against), and computes the derived images' features with
``pipelines.radiomics.engine`` (worker processes, one discretisation per image):

- with resampling (the bundled files): pyradiomics resamples only the ROI's bounding box
  plus ``padDistance``, on a grid fixed by the whole mask's extent. That grid is worked
  out for the whole volume (``images.resample_crop``) and the block, the region plus the
  B-spline's reach, resampled onto it, so the resampled block, and all that follows, is
  the stock one.
- without resampling: the block reaches as far as each filter does (LoG 18 sigma, where
  ITK's recursive filter output stops changing). Square, square root, logarithm and
  exponential scale by the image's largest |HU|: they run in a pass of their own, on a
  copy whose corner outside the ROI's bounding box holds the volume's largest |HU|.

LBP-3D maps come from ``pipelines.radiomics.lbp3d`` (pyradiomics' own needs a removed
SciPy function) and are measured as pyradiomics measures its derived images.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pywt
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

from pipelines.radiomics.engine import LBP3D, run_tasks, tasks_for
from pipelines.radiomics.images import (
    Box,
    bounding_box,
    grow,
    outside_corner,
    resample_crop,
    slices,
    to_image,
)
from pipelines.radiomics.lbp3d import lbp3d_maps
from pipelines.radiomics.params import RadiomicsError, load_extractor
from pipelines.series import LoadedSeries

POINTWISE = frozenset({"Square", "SquareRoot", "Logarithm", "Exponential"})
LOG_REACH_SIGMAS = 18.0  # ITK's recursive LoG output is bit-identical beyond this
SPLINE_REACH_VOXELS = 32  # cubic B-spline prefilter (pole 0.268): 0.268**32 < 1e-18
ROI_LABEL = 1  # label of the binary mask handed to pyradiomics


def extract(
    volume_hu: NDArray[np.floating],
    spacing_mm: tuple[float, float, float],
    mask: NDArray[np.bool_] | NDArray[np.integer],
    params: str | Path,
    *,
    label: int = 1,
    direction: NDArray[np.float64] | None = None,
    crop: bool = True,
    workers: int = 1,
) -> dict[str, float]:
    """Features of the ROI ``mask`` (True voxels, or voxels equal to ``label``).

    ``volume_hu`` and ``mask`` have axis order (slice, row, column) with ``spacing_mm``
    in that order; ``direction`` (3x3, columns the unit axis vectors) defaults to the
    identity, which pyradiomics' index-space features do not depend on. ``params`` is a
    bundled study name or a pyradiomics YAML path. Raises ``RadiomicsError`` for a mask
    features cannot be computed on. ``crop=False`` runs stock pyradiomics on the whole
    volume (the reference); ``workers`` is the size of the worker pool the derived images
    are shared out to (1: all in this process; a pipeline passes its settings'
    ``[pipelines.radiomics] workers``).
    """
    roi = _roi(volume_hu, spacing_mm, mask, label)
    extractor = load_extractor(params)
    settings: dict[str, Any] = {**extractor.settings, "label": ROI_LABEL}
    types = dict(extractor.enabledImagetypes)
    lbp = types.pop(LBP3D, None)
    features = dict(extractor.enabledFeatures)
    texture = {k: v for k, v in features.items() if not k.startswith("shape")}
    resampled = bool(settings.get("interpolator")) and bool(settings.get("resampledPixelSpacing"))
    _check_roi_dimensions(roi, settings)

    volume = np.asarray(volume_hu)
    full_box = tuple((0, n) for n in volume.shape)
    box = bounding_box(roi)
    margin = (
        _resampling_margin(spacing_mm, settings)
        if resampled
        else _filter_margin(spacing_mm, types, lbp, settings)
    )
    crop = crop and _crop_invariant(settings)
    region = grow(box, margin, volume.shape) if crop else full_box
    block = volume[slices(region)].astype(np.float64)  # float64: B-spline and filters
    image = to_image(block, spacing_mm, direction=direction, start=_starts(region))
    mask_image = to_image(
        roi[slices(region)].astype(np.uint8), spacing_mm, direction=direction, start=_starts(region)
    )

    if not crop:
        return _reference(settings, types, lbp, features, texture, image, mask_image, resampled)
    # pyradiomics' getMask: its cast (its label search is moot: the block holds the ROI)
    mask_image = sitk.Cast(mask_image, sitk.sitkUInt32)
    if resampled:
        image, mask_image = resample_crop(
            image, mask_image, _starts(region), volume.shape, settings
        )
    bounds = _checked_box(mask_image, settings)  # pyradiomics' array (computeShape's)
    box_xyz = tuple(int(v) for v in bounds)
    main = {k: v for k, v in types.items() if resampled or k not in POINTWISE}
    if lbp is not None:
        main[LBP3D] = lbp
    tasks = tasks_for(image, mask_image, box_xyz, main, settings, texture, pooled=workers > 1)
    pointwise = {k: v for k, v in types.items() if k not in main}
    if pointwise:
        sentinel = _with_sentinel(image, volume, region, box)
        tasks += tasks_for(
            sentinel, mask_image, box_xyz, pointwise, settings, texture, pooled=False
        )
    shape = {k: v for k, v in features.items() if k.startswith("shape")}

    def shape_features() -> dict[str, float]:
        shaper = copy.copy(extractor)
        shaper.enabledFeatures = shape
        values = shaper.computeShape(image, mask_image, bounds, **settings)
        return {k: float(v) for k, v in values.items()}

    return run_tasks(tasks, workers, shape_features)


def _crop_invariant(settings: dict[str, Any]) -> bool:
    """Whether the crop gives stock values: not with whole-image normalisation or resegmenting."""
    return not settings.get("normalize") and settings.get("resegmentRange") is None


def _reference(
    settings: dict[str, Any],
    types: dict[str, Any],
    lbp: dict[str, Any] | None,
    features: dict[str, Any],
    texture: dict[str, Any],
    image: sitk.Image,
    mask: sitk.Image,
    resampled: bool,
) -> dict[str, float]:
    """Stock pyradiomics ``execute`` on the images as given (and LBP-3D as it measures maps)."""
    out = _run(settings, types, features, image, mask)
    if lbp is not None:
        out |= _lbp3d_features(image, mask, settings, lbp, texture, resampled)
    return out


def extract_series(
    series: LoadedSeries,
    mask: NDArray[np.bool_] | NDArray[np.integer],
    params: str | Path,
    *,
    label: int = 1,
    workers: int = 1,
) -> dict[str, float]:
    """``extract`` on ``series.volume`` (with a pool of ``workers``); ``mask`` lies on
    that volume's grid."""
    volume = series.volume
    spacing = volume.spacing
    direction = volume.affine[:3, :3] / np.asarray(spacing)
    return extract(
        volume.hu, spacing, mask, params, label=label, direction=direction, workers=workers
    )


def _roi(
    volume_hu: NDArray[np.floating],
    spacing_mm: tuple[float, float, float],
    mask: NDArray[np.bool_] | NDArray[np.integer],
    label: int,
) -> NDArray[np.bool_]:
    """The binary ROI, after checking volume, spacing and mask agree and are usable."""
    volume_hu = np.asarray(volume_hu)
    mask = np.asarray(mask)
    if volume_hu.ndim != 3:
        raise RadiomicsError(f"the volume must be 3-D (slice, row, column), not {volume_hu.shape}")
    if mask.shape != volume_hu.shape:
        raise RadiomicsError(f"mask shape {mask.shape} differs from volume shape {volume_hu.shape}")
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise RadiomicsError(f"spacing must be three positive lengths in mm, not {spacing_mm}")
    roi = mask.astype(bool) if mask.dtype == np.bool_ else mask == label
    n = int(roi.sum())
    if n == 0:
        raise RadiomicsError(f"the mask is empty (no voxel equals label {label})")
    if n == 1:
        raise RadiomicsError("the mask holds a single voxel: no texture or shape to measure")
    if not np.all(np.isfinite(volume_hu[roi])):
        raise RadiomicsError("the volume holds non-finite values inside the mask")
    return roi


def _check_roi_dimensions(roi: NDArray[np.bool_], settings: dict[str, Any]) -> None:
    """pyradiomics' ``minimumROIDimensions``, checked before any work is done."""
    needed = int(settings.get("minimumROIDimensions", 2))
    extents = [hi - lo for lo, hi in bounding_box(roi)]
    if sum(e > 1 for e in extents) < needed:
        raise RadiomicsError(
            f"the mask spans {extents} voxels: fewer than the {needed} dimensions wider than "
            "one voxel that minimumROIDimensions asks for"
        )


def _checked_box(mask: sitk.Image, settings: dict[str, Any]) -> NDArray[np.int_]:
    """``imageoperations.checkMask`` for a mask on the image's own grid (the crop's image
    and mask are made on one grid, so its geometry check cannot fail): pyradiomics' checks
    of the ROI's dimensions and size, with its messages, and the ROI's bounding box as it
    gives it, (L_x, U_x, L_y, U_y, L_z, U_z), from the mask's array alone (pyradiomics'
    ``LabelStatisticsImageFilter`` measures the image too)."""
    label = settings.get("label", 1)
    roi = sitk.GetArrayViewFromImage(mask) == label
    if not roi.any():
        raise RadiomicsError(f"pyradiomics rejected the ROI: Label ({label:g}) not present in mask")
    box = np.array([v for lo, hi in reversed(bounding_box(roi)) for v in (lo, hi - 1)])
    dims = int(np.sum((box[1::2] - box[0::2] + 1) > 1))
    needed = settings.get("minimumROIDimensions", 2)
    if dims == 0:
        problem = (
            "mask only contains 1 segmented voxel! Cannot extract features for a single voxel."
        )
    elif dims < needed:
        problem = (
            f"mask has too few dimensions (number of dimensions {dims}, minimum required {needed})"
        )
    elif settings.get("minimumROISize") is not None and roi.sum() <= settings["minimumROISize"]:
        problem = (
            f"Size of the ROI is too small (minimum size: {settings['minimumROISize']:g}, "
            f"ROI size: {roi.sum():g}"
        )
    else:
        return box
    raise RadiomicsError(f"pyradiomics rejected the ROI: {problem}")


def _starts(region: Box) -> tuple[int, ...]:
    """Index of a region's first voxel."""
    return tuple(lo for lo, _ in region)


def _resampling_margin(
    spacing_mm: tuple[float, float, float], settings: dict[str, Any]
) -> list[int]:
    """Voxels beyond the ROI that pyradiomics' resampling grid and its B-spline reach."""
    pad = float(settings.get("padDistance", 5))
    target = settings["resampledPixelSpacing"][::-1]  # pyradiomics gives (x, y, z)
    return [
        math.ceil((pad + 1.0) * (t if t > 0 else s) / s + 0.5) + 2 + SPLINE_REACH_VOXELS
        for s, t in zip(spacing_mm, target, strict=True)
    ]


def _filter_margin(
    spacing_mm: tuple[float, float, float],
    types: dict[str, Any],
    lbp: dict[str, Any] | None,
    settings: dict[str, Any],
) -> list[int]:
    """Voxels beyond the ROI that each enabled filter reaches, per axis."""
    margins = []
    for s in spacing_mm:
        reach = 1
        for kind, custom in types.items():
            options = {**settings, **(custom or {})}
            if kind == "LoG":
                sigmas = options.get("sigma") or [0.0]
                reach = max(reach, math.ceil(LOG_REACH_SIGMAS * max(sigmas) / s))
            elif kind == "Wavelet":
                levels = int(options.get("start_level", 0)) + int(options.get("level", 1))
                length = pywt.Wavelet(options.get("wavelet", "coif1")).dec_len
                reach = max(reach, length * 2**levels)
            elif kind == "Gradient":
                reach = max(reach, 2)
        if lbp is not None:
            radius = float({**settings, **lbp}.get("lbp3DIcosphereRadius", 1))
            reach = max(reach, math.ceil(radius) + 2 + SPLINE_REACH_VOXELS)
        margins.append(reach)
    return margins


def _with_sentinel(
    image: sitk.Image, volume: NDArray[np.floating], region: Box, box: Box
) -> sitk.Image:
    """``image`` whose crop corner outside the ROI box holds the volume's largest |HU|.

    Square, square root, logarithm and exponential scale each voxel by the image's
    largest |value|; with it in the crop, ROI voxels get the whole-volume values.
    """
    corner = outside_corner(region, box)
    if corner is None:  # the crop is the whole volume
        return image
    arr = sitk.GetArrayFromImage(image)
    arr[corner] = float(volume.flat[int(np.argmax(np.abs(volume)))])
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def _run(
    settings: dict[str, Any],
    types: dict[str, Any],
    features: dict[str, Any],
    image: sitk.Image,
    mask: sitk.Image,
) -> dict[str, float]:
    """One pyradiomics run with these image types and feature classes; features only."""
    extractor = RadiomicsFeatureExtractor(**settings)
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**{k: (v or {}) for k, v in types.items()})
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**features)
    try:
        result = extractor.execute(image, mask, label=ROI_LABEL)
    except ValueError as error:  # pyradiomics' mask checks (e.g. ROI lost in resampling)
        raise RadiomicsError(f"pyradiomics rejected the ROI: {error}") from error
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def _lbp3d_features(
    image: sitk.Image,
    mask: sitk.Image,
    settings: dict[str, Any],
    custom: dict[str, Any],
    texture: dict[str, Any],
    resampled: bool,
) -> dict[str, float]:
    """Features of the LBP-3D maps, on the (resampled) image pyradiomics would filter."""
    options = {**settings, **(custom or {})}
    if resampled:
        image, mask = imageoperations.resampleImage(image, mask, **options)
    plain = {**options, "resampledPixelSpacing": None, "interpolator": None}
    maps = lbp3d_maps(
        image,
        mask,
        label=ROI_LABEL,
        levels=int(options.get("lbp3DLevels", 2)),
        radius=float(options.get("lbp3DIcosphereRadius", 1)),
        subdivision=int(options.get("lbp3DIcosphereSubdivision", 1)),
    )
    out: dict[str, float] = {}
    for lbp_image, name in maps:
        values = _run(plain, {"Original": {}}, texture, lbp_image, mask)
        out |= {name + k.removeprefix("original"): v for k, v in values.items()}
    return out
