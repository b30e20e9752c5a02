"""Skull stripping of head CT: the intracranial soft tissue (brain and CSF) as a mask.

A classical recipe that needs no training: threshold the skull together with its
partial-volume rim, fill the region it encloses slice by slice, keep soft-tissue HU inside
it, erode a few mm away from the rim and keep the largest 3-D connected component.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

BONE_HU = 400.0
"""Lowest HU taken as bone. Cortical bone is 700-1500 HU; 400 keeps thin skull while
staying above acute blood (50-90 HU) and contrast staining (up to ~300 HU)."""

RIM_HU = 80.0
"""Voxels of at least this HU that touch the bone in 3-D are the skull's partial-volume
rim (thick slices cut the skull obliquely near the vertex and the skull base, smearing
bone into the adjacent brain). 80 HU is above grey matter (~40 HU) and most acute blood,
so a parenchymal lesion is only absorbed where it touches the skull."""

SOFT_TISSUE_LOW_HU = -20.0
"""Lowest HU of intracranial soft tissue: CSF is 0-15 HU, so -20 allows for image noise
while leaving out fat (about -100 HU) and air (-1000 HU) of sinuses and mastoids."""

BONE_CLOSING_MM = 3.0
"""Half-width of the in-plane (square) closing that bridges small gaps in the skull (sutures, thin
temporal squama, partial volume) so that the skull encloses the brain on each slice."""

RIM_EROSION_MM = 3.0
"""Voxels closer than this to anything that is not intracranial soft tissue are dropped,
clearing what remains of the partial-volume rim below ``RIM_HU``."""

WORKING_PIXEL_MM = 1.0
"""In-plane pixel size the mask is computed at: 512x512 images (about 0.5 mm) are
subsampled by two, which keeps the skull ring closed and quarters the work."""

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def skull(hu: NDArray[np.floating]) -> NDArray[np.bool_]:
    """Bone (``BONE_HU``) plus every voxel of at least ``RIM_HU`` connected to it in 3-D."""
    labels, _ = ndimage.label(hu >= RIM_HU)
    touching = np.unique(labels[hu >= BONE_HU])
    return np.asarray(np.isin(labels, touching[touching > 0]))


def _in_plane_closing(mask: NDArray[np.bool_], half_width: tuple[int, int]) -> NDArray[np.bool_]:
    """Per-slice closing by a square of (2 * half_width + 1) pixels, with box filters."""
    size = (1, 2 * half_width[0] + 1, 2 * half_width[1] + 1)
    pad = ((0, 0), (half_width[0], half_width[0]), (half_width[1], half_width[1]))
    dilated = ndimage.uniform_filter(np.pad(mask, pad).astype(np.float32), size) > 1e-3
    eroded = ndimage.uniform_filter(dilated.astype(np.float32), size) > 1.0 - 1e-3
    return np.asarray(
        eroded[:, pad[1][0] : eroded.shape[1] - pad[1][1], pad[2][0] : eroded.shape[2] - pad[2][1]]
        | mask
    )


def brain_mask(hu: NDArray[np.floating], spacing: tuple[float, float, float]) -> NDArray[np.bool_]:
    """Intracranial soft tissue of an orthogonal HU volume (axis 0 along the slice normal).

    ``spacing`` is the voxel size in mm along (slice, row, column). Returns a boolean mask
    of ``hu``'s shape: the largest 3-D connected component of skull-enclosed brain and CSF,
    at least ``RIM_EROSION_MM`` away from anything else. The work is done on a grid
    subsampled in-plane to about ``WORKING_PIXEL_MM`` and taken back by repetition.
    """
    step = max(1, int(WORKING_PIXEL_MM / min(spacing[1], spacing[2]) + 1e-6))
    coarse = _coarse_brain_mask(
        hu[:, ::step, ::step], (spacing[0], spacing[1] * step, spacing[2] * step)
    )
    full = np.repeat(np.repeat(coarse, step, axis=1), step, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    return np.asarray(full & (hu >= SOFT_TISSUE_LOW_HU) & (hu < BONE_HU))


def _coarse_brain_mask(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> NDArray[np.bool_]:
    """``brain_mask`` at the given resolution, without subsampling."""
    bone = skull(hu)
    if not bone.any():
        return np.zeros(hu.shape, dtype=bool)
    half_width = (
        max(1, round(BONE_CLOSING_MM / spacing[1])),
        max(1, round(BONE_CLOSING_MM / spacing[2])),
    )
    closed = _in_plane_closing(bone, half_width)
    filled = ndimage.binary_fill_holes(closed, structure=_IN_PLANE)
    inside = filled & ~closed & (hu >= SOFT_TISSUE_LOW_HU)
    if not inside.any():
        return np.zeros(hu.shape, dtype=bool)
    box = ndimage.find_objects(inside.astype(np.uint8))[0]
    distance = ndimage.distance_transform_edt(np.pad(inside[box], 1), sampling=spacing)
    core = np.zeros(hu.shape, dtype=bool)
    core[box] = distance[1:-1, 1:-1, 1:-1] > RIM_EROSION_MM
    labels, count = ndimage.label(core)
    if count == 0:
        return core
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))
