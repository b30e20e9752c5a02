"""Image preparation of an MRI study: resampling onto the DWI grid, N4 bias correction,
z-score, and the infarct ROI on DWI/ADC.

Every function is pure (arrays and volumes in, arrays out). Data flow, as
:func:`prepare_study` composes it:

1. Registration: the series of one study share a frame of reference (one session, the
   patient in the scanner), so each is resampled onto the DWI volume grid with the
   identity transform (SimpleITK, linear); a series on another frame of reference is
   refused (:class:`pipelines.base.PipelineError`), not guessed.
2. N4 bias-field correction (SimpleITK ``N4BiasFieldCorrectionImageFilter``) of DWI, FLAIR
   and T1, fitted on the image shrunk by :data:`N4_SHRINK` (fast) and applied at full
   resolution. The ADC map is a ratio of two images that share the field: not corrected.
3. z-score of DWI, FLAIR and T1 within the head mask (Otsu on the DWI).
4. Infarct ROI: ``ADC < 620e-6 mm2/s`` (:data:`ADC_THRESHOLD`, the RAPID core threshold)
   with DWI hyperintensity (DWI above :data:`DWI_RATIO` x the brain's median DWI), inside
   the head mask; connected regions of at least :data:`MIN_REGION_ML`, largest first.

The 1 mm isotropic resampling of the study is done where it matters, per feature: the
radiomics parameters (``pipelines/radiomics/params/ais_prognosis_mri.yaml``) resample the
ROI's neighbourhood to 1 x 1 x 1 mm (B-spline) before any feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.base import PipelineError
from pipelines.measure import connected_regions
from pipelines.series import LoadedSeries, Volume
from pipelines.stages import charged_to

ADC_THRESHOLD = 620.0  # 1e-6 mm2/s: ischaemic core (RAPID's ADC < 620e-6 mm2/s)
ADC_FLOOR = 100.0  # below: background, skull, no tissue
DWI_RATIO = 1.3  # DWI hyperintensity: above 1.3 x the brain's median DWI signal
MIN_REGION_ML = 0.3
N4_SHRINK = 4
N4_ITERATIONS = (5, 5, 5, 5)  # four fitting levels (coarse to fine) of 5 iterations
ROI_ALGORITHM = "threshold ADC<620e-6 mm2/s with DWI hyperintensity"

ROLE_DWI, ROLE_ADC, ROLE_FLAIR, ROLE_T1 = "dwi", "adc", "flair", "t1"
REQUIRED_ROLES = (ROLE_DWI, ROLE_ADC)
OPTIONAL_ROLES = (ROLE_FLAIR, ROLE_T1)
CORRECTED_ROLES = (ROLE_DWI, ROLE_FLAIR, ROLE_T1)


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image of ``volume`` (x = column, y = row, z = slice), geometry kept."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    axes = volume.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)  # (slice, row, column)
    directions = axes / spacing  # columns: slice, row, column unit vectors
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetOrigin(tuple(float(v) for v in volume.affine[:3, 3]))
    matrix = np.stack([directions[:, 2], directions[:, 1], directions[:, 0]], axis=1)
    image.SetDirection(tuple(float(v) for v in matrix.ravel()))
    return image


def resample_onto(moving: Volume, reference: Volume) -> NDArray[np.float32]:
    """``moving`` resampled (linear, identity transform) onto ``reference``'s grid."""
    out = sitk.Resample(to_sitk(moving), to_sitk(reference), sitk.Transform(), sitk.sitkLinear, 0.0)
    return np.asarray(sitk.GetArrayFromImage(out), dtype=np.float32)


def head_mask(dwi: NDArray[np.floating]) -> NDArray[np.bool_]:
    """The head on the DWI: Otsu threshold, holes filled per slice, largest component."""
    values = np.asarray(dwi, dtype=np.float32)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    mask = sitk.GetArrayFromImage(otsu.Execute(sitk.GetImageFromArray(values))).astype(bool)
    mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    labels, count = ndimage.label(mask)
    if count == 0:
        raise PipelineError("the DWI holds no head (no signal above its Otsu threshold)")
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def n4_correct(
    image: NDArray[np.floating],
    mask: NDArray[np.bool_],
    spacing: tuple[float, float, float],
    shrink: int = N4_SHRINK,
) -> NDArray[np.float32]:
    """N4 bias-field correction of ``image`` (slice, row, column), fitted inside ``mask``
    on the image shrunk in-plane by ``shrink``, the field applied at full resolution."""
    full = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    full.SetSpacing((spacing[2], spacing[1], spacing[0]))
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(full)
    factors = [shrink, shrink, 1]
    small = sitk.Shrink(full, factors)
    small_mask = sitk.Shrink(mask_image, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    corrector.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(full))
    return np.asarray(image / np.exp(log_field), dtype=np.float32)


def zscore(image: NDArray[np.floating], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """``image`` minus its mean inside ``mask``, over its standard deviation there."""
    inside = image[mask]
    sd = float(inside.std())
    if sd <= 0:
        raise PipelineError("an image is constant inside the head: cannot z-score it")
    return np.asarray((image - float(inside.mean())) / sd, dtype=np.float32)


def infarct_mask(
    dwi: NDArray[np.floating], adc: NDArray[np.floating], head: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """``ADC_FLOOR < ADC < ADC_THRESHOLD`` and DWI above ``DWI_RATIO`` x the median DWI of
    the tissue (ADC in the normal range), inside ``head``, opened in-plane once."""
    tissue = head & (adc > ADC_FLOOR) & (adc < 1500.0)
    if not tissue.any():
        raise PipelineError("the ADC map shows no brain tissue (values not in 1e-6 mm2/s?)")
    reference = float(np.median(dwi[tissue]))
    mask = head & (adc > ADC_FLOOR) & (adc < ADC_THRESHOLD) & (dwi > DWI_RATIO * reference)
    in_plane = np.zeros((1, 3, 3), dtype=bool)
    in_plane[0] = ndimage.generate_binary_structure(2, 1)
    return np.asarray(ndimage.binary_opening(mask, structure=in_plane))


@dataclass(frozen=True)
class PreparedStudy:
    """The study on the DWI grid: corrected, normalised images and the infarct ROI."""

    reference: LoadedSeries  # the DWI series: the grid and the frames outputs refer to
    images: Mapping[str, NDArray[np.float32]]  # role -> image on the DWI volume grid
    zscored: Mapping[str, NDArray[np.float32]]  # DWI, FLAIR, T1: N4-corrected, z-scored
    head: NDArray[np.bool_]
    labels: NDArray[np.int32]  # infarct regions 1..count, largest first
    count: int

    @property
    def roi(self) -> NDArray[np.bool_]:
        """Every infarct region together."""
        return np.asarray(self.labels > 0)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing of the DWI grid (slice, row, column), mm."""
        return self.reference.volume.spacing


def frame_of_reference(series: LoadedSeries) -> str:
    """The series' FrameOfReferenceUID ('' when absent)."""
    return str(series.reference.get("FrameOfReferenceUID", ""))


@charged_to("segmentation")
def prepare_study(series_by_role: Mapping[str, LoadedSeries]) -> PreparedStudy:
    """Resample every role onto the DWI grid, correct, normalise and segment the infarct."""
    missing = [role for role in REQUIRED_ROLES if role not in series_by_role]
    if missing:
        raise PipelineError(f"the study lacks its {' and '.join(missing)} series")
    dwi = series_by_role[ROLE_DWI]
    for role, series in series_by_role.items():
        if frame_of_reference(series) != frame_of_reference(dwi):
            raise PipelineError(
                f"the {role} series is on another frame of reference than the DWI: "
                "the node resamples series of one session only, it does not register them"
            )
    images = {ROLE_DWI: np.asarray(dwi.volume.hu, dtype=np.float32)}
    for role, series in series_by_role.items():
        if role != ROLE_DWI:
            images[role] = resample_onto(series.volume, dwi.volume)
    head = head_mask(images[ROLE_DWI])
    spacing = dwi.volume.spacing
    zscored = {
        role: zscore(n4_correct(images[role], head, spacing), head)
        for role in CORRECTED_ROLES
        if role in images
    }
    mask = infarct_mask(images[ROLE_DWI], images[ROLE_ADC], head)
    labels, count = connected_regions(mask, dwi.volume.voxel_volume_ml, MIN_REGION_ML)
    return PreparedStudy(dwi, images, zscored, head, labels, count)
