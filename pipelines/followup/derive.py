"""Derive outcome labels from a baseline head CT and its follow-up.

1. **Linking** (:func:`in_window`): a follow-up of the same patient (the caller matches
   the salted PatientID hash) whose acquisition lies within a configured window after
   the baseline, e.g. 18-72 h after thrombectomy, or 24 h +- 12 h for haematoma
   expansion.
2. **Registration** (:func:`register_rigid`): SimpleITK rigid (Euler 3-D) registration
   of the follow-up to the baseline, mean squares on the images clipped to
   [-50, 150] HU (skull and brain), two resolution levels; its quality is the normalised
   cross-correlation of the registered images inside the baseline's head
   (``registration_ncc``, 1 = identical).
3. **Regions**: the hyperdense regions of each scan (threshold baseline
   ``hyperdense_regions``, on each scan's own grid); the follow-up's are resampled onto
   the baseline grid (nearest neighbour) through the registration.
4. **Labels** (:func:`derive_labels`):

   - *persistence*: the fraction of the baseline hyperdense volume covered at follow-up
     (within :data:`PERSIST_DILATION_VOXELS` voxels) is at least
     :data:`PERSIST_FRACTION`. HT after MT = persists; contrast staining = cleared
     (does not persist).
   - *haematoma expansion*: growth >= 6 mL or >= 33 % of the baseline volume, by
     planimetry (voxel count) and by ABC/2 (A: longest in-plane diameter on the frame
     of largest area, B: longest diameter perpendicular to A on that frame, C: slices
     with lesion x slice spacing; volume = A B C / 2).

   Each label's **confidence** is the product of the registration quality (NCC clipped
   to [0, 1]) and how far its measure lies from its threshold (1 beyond twice the
   decision band, down to 0.5 on the threshold): a label decided by a hair on a poor
   registration is flagged for a radiologist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.contract import Segmenter
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.series import LoadedSeries, Volume

CLIP_HU = (-50.0, 150.0)
PERSIST_FRACTION = 0.3
PERSIST_DILATION_VOXELS = 2
HE_ABSOLUTE_ML = 6.0
HE_RELATIVE = 0.33
CONFIDENCE_BAND = 0.5  # relative distance from a threshold that gives full confidence
SHRINK_FACTORS = (2, 1)
SMOOTHING_SIGMAS = (1.0, 0.0)
ITERATIONS = 200


@dataclass(frozen=True)
class Window:
    """A follow-up window in hours after the baseline (inclusive)."""

    min_hours: float
    max_hours: float


HT_WINDOW = Window(18.0, 72.0)
HE_WINDOW = Window(12.0, 36.0)  # 24 h +- 12 h


def in_window(baseline: datetime, followup: datetime, window: Window) -> bool:
    """Whether ``followup`` lies within ``window`` after ``baseline``."""
    hours = (followup - baseline).total_seconds() / 3600.0
    return window.min_hours <= hours <= window.max_hours


def volume_image(volume: Volume, values: NDArray[np.generic] | None = None) -> sitk.Image:
    """A SimpleITK image of ``values`` (default: the HU) on ``volume``'s grid."""
    array = volume.hu if values is None else values
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # index (col, row, slice)
    axes = volume.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)  # (slice, row, column)
    directions = axes / spacing  # columns: slice, row, column directions
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetOrigin(tuple(float(v) for v in volume.affine[:3, 3]))
    ordered = np.stack([directions[:, 2], directions[:, 1], directions[:, 0]], axis=1)
    image.SetDirection(tuple(float(v) for v in ordered.flatten()))
    return image


@dataclass(frozen=True)
class Registration:
    """A rigid follow-up -> baseline transform and its quality."""

    transform: sitk.Transform
    ncc: float  # normalised cross-correlation inside the baseline head after registration
    metric: float  # final mean squares metric


def _clipped(image: sitk.Image) -> sitk.Image:
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, *CLIP_HU)


def register_rigid(baseline: Volume, followup: Volume) -> Registration:
    """Register ``followup`` to ``baseline`` (see the module); deterministic."""
    fixed, moving = _clipped(volume_image(baseline)), _clipped(volume_image(followup))
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=ITERATIONS
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS))
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    registered = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, CLIP_HU[0])
    a = sitk.GetArrayFromImage(fixed).astype(np.float64)
    b = sitk.GetArrayFromImage(registered).astype(np.float64)
    head = a > CLIP_HU[0]
    ncc = float(np.corrcoef(a[head], b[head])[0, 1]) if head.sum() > 1 else 0.0
    return Registration(transform, ncc, float(method.GetMetricValue()))


def resample_mask(
    mask: NDArray[np.bool_], source: Volume, target: Volume, transform: sitk.Transform
) -> NDArray[np.bool_]:
    """``mask`` on ``source``'s grid, resampled onto ``target``'s (nearest neighbour);
    ``transform`` maps target points to source points (as registration returns it)."""
    image = volume_image(source, mask.astype(np.uint8))
    out = sitk.Resample(image, volume_image(target), transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(bool)


def abc2_ml(mask: NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    """ABC/2 volume (mL) of ``mask`` (slice, row, column) with ``spacing`` (mm)."""
    areas = mask.sum(axis=(1, 2))
    if not areas.any():
        return 0.0
    frame = int(np.argmax(areas))
    rows, cols = np.nonzero(mask[frame])
    points = np.stack([rows * spacing[1], cols * spacing[2]], axis=1)
    deltas = points[:, None, :] - points[None, :, :]
    distances = np.linalg.norm(deltas, axis=-1)
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    a = float(distances[i, j]) + min(spacing[1], spacing[2])
    if a <= min(spacing[1], spacing[2]):
        b = a
    else:
        axis = (points[j] - points[i]) / max(float(distances[i, j]), 1e-9)
        normal = np.array([-axis[1], axis[0]])
        across = points @ normal
        b = float(across.max() - across.min()) + min(spacing[1], spacing[2])
    c = int(np.count_nonzero(areas)) * spacing[0]
    return a * b * c / 2.0 / 1000.0


def _confidence(ncc: float, value: float, threshold: float) -> float:
    """Registration quality times the relative distance of ``value`` from ``threshold``."""
    distance = abs(value - threshold) / max(abs(threshold), 1e-9)
    margin = 0.5 + 0.5 * min(1.0, distance / (2 * CONFIDENCE_BAND))
    return round(float(np.clip(ncc, 0.0, 1.0)) * margin, 3)


def expansion(baseline_ml: float, followup_ml: float) -> tuple[bool, float]:
    """Haematoma expansion (growth >= 6 mL or >= 33 %) and the decisive ratio
    (the larger of growth / 6 mL and relative growth / 0.33; >= 1 is expansion)."""
    growth = followup_ml - baseline_ml
    relative = growth / baseline_ml if baseline_ml > 0 else float("inf")
    ratio = max(growth / HE_ABSOLUTE_ML, relative / HE_RELATIVE)
    return ratio >= 1.0, ratio


@dataclass(frozen=True)
class DerivedLabels:
    """Labels derived from one baseline/follow-up pair, with their evidence."""

    ht_persists: bool  # HT after MT: the hyperdense region persists
    contrast_cleared: bool  # contrast staining: cleared at follow-up
    expansion_planimetric: bool
    expansion_abc2: bool
    evidence: dict[str, float]
    confidence: dict[str, float]


def derive_labels(
    baseline: LoadedSeries, followup: LoadedSeries, segmenter: Segmenter | None = None
) -> DerivedLabels:
    """The labels of a linked pair (see the module); ``segmenter`` default: the threshold
    baseline."""
    seg = segmenter or HyperdenseThresholdPipeline()
    base_mask = seg.segment(baseline)[0] > 0
    fu_mask = seg.segment(followup)[0] > 0
    return labels_from_masks(baseline.volume, base_mask, followup.volume, fu_mask)


def labels_from_masks(
    baseline: Volume, base_mask: NDArray[np.bool_], followup: Volume, fu_mask: NDArray[np.bool_]
) -> DerivedLabels:
    """The labels of a linked pair from each scan's volume and hyperdense regions on its
    grid (as the node's case store keeps them): steps 2 to 4 of the module."""
    registration = register_rigid(baseline, followup)
    fu_on_base = resample_mask(fu_mask, followup, baseline, registration.transform)
    base_ml = float(base_mask.sum()) * baseline.voxel_volume_ml
    fu_ml = float(fu_mask.sum()) * followup.voxel_volume_ml
    near = ndimage.binary_dilation(base_mask, iterations=PERSIST_DILATION_VOXELS)
    covered = float((fu_on_base & near).sum()) * baseline.voxel_volume_ml
    fraction = min(1.0, covered / base_ml) if base_ml > 0 else 0.0
    persists = base_ml > 0 and fraction >= PERSIST_FRACTION
    base_abc, fu_abc = (
        abc2_ml(base_mask, baseline.spacing),
        abc2_ml(fu_mask, followup.spacing),
    )
    he_plan, ratio_plan = expansion(base_ml, fu_ml)
    he_abc, ratio_abc = expansion(base_abc, fu_abc)
    ncc = registration.ncc
    evidence = {
        "baseline_ml": round(base_ml, 3),
        "followup_ml": round(fu_ml, 3),
        "baseline_abc2_ml": round(base_abc, 3),
        "followup_abc2_ml": round(fu_abc, 3),
        "persisting_fraction": round(fraction, 3),
        "registration_ncc": round(ncc, 4),
        "registration_metric": round(registration.metric, 3),
    }
    persist_conf = _confidence(ncc, fraction, PERSIST_FRACTION)
    confidence = {
        "ht_persists": persist_conf,
        "contrast_cleared": persist_conf,
        "expansion_planimetric": _confidence(ncc, ratio_plan, 1.0),
        "expansion_abc2": _confidence(ncc, ratio_abc, 1.0),
    }
    return DerivedLabels(
        persists, base_ml > 0 and not persists, he_plan, he_abc, evidence, confidence
    )
