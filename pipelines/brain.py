"""Skull stripping of head CT: the intracranial soft tissue (brain and CSF) as a mask.

Two classical recipes that need no training:

- ``brain_mask`` (the original one, still used to place painted lesions and by the U-Net
  pipeline): threshold the skull together with every >= ``RIM_HU`` voxel connected to it,
  fill the region it encloses slice by slice, keep soft-tissue HU inside it, erode a few
  mm away from the rim and keep the largest 3-D connected component. It loses blood that
  touches bone: an 85 HU haematoma on the skull base joins the "rim" and is erased.
- ``intracranial_mask`` (the threshold baseline's since issue 8): the skull is bone in
  bodies of at least ``SKULL_MIN_ML`` (a calcification is not skull) plus its
  partial-volume band traced through voxels above blood (``RIM_PATH_HU``) and a faint rim
  bounded to ``RIM_MAX_MM``, never stepping up from the cranial floor; the cavity it
  encloses is kept whole (``Intracranial.cavity``) beside the eroded core where a
  hyperdense region must begin, so a region regrows to the bone it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.measure import bounding_box

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


# --- intracranial extraction that keeps parenchyma next to bone ---------------------------

SKULL_MIN_ML = 1.0
"""Smallest 3-D connected body of bone (``BONE_HU``) taken as skull. The vault and the skull
base are hundreds of mL and their fragments on a thick slice a few mL; a calcification
(choroid plexus, pineal, basal ganglia, falx) is a fraction of a mL, so a dense body inside
the cranial cavity smaller than this stays intracranial and is labelled calcification."""

RIM_MAX_MM = 2.0
"""How far, in-plane, the skull's partial-volume rim (``RIM_HU`` voxels reached from bone)
may extend. The old rule took every >= ``RIM_HU`` voxel connected to bone however far, which
swallowed an 85 HU haematoma touching the skull base; bounded, a haematoma touching bone
loses at most this margin, and the brain's reconstruction (``RECONSTRUCT_MM``) and the
hyperdense regrowth take the rest back."""

RIM_PATH_HU = 100.0
"""The skull's partial-volume band is traced from bone through face-connected voxels of at
least this HU: above acute blood (45-95 HU), so a haematoma touching the skull is no path
(even at 95 HU fewer than a sixth of its voxels pass with scanner noise, far below what
percolates), while the band's denser part (100-400 HU), however wide a thick oblique slice
makes it, joins the skull. Raw HU, not a median: a median closes the one-pixel CSF line
between the skull and a cortical contrast stain. The faint edge (``RIM_HU``) is then
added within ``RIM_MAX_MM``."""

RECONSTRUCT_MM = 1.0
"""In-plane distance over which the eroded brain core grows back into the intracranial soft
tissue. Kept short: the skull's faint partial-volume tail (50-80 HU) lies there. Parenchyma
next to bone is not lost for that: a hyperdense region regrows through the whole cavity
(``Intracranial.cavity``) from its part in the core."""


@dataclass(frozen=True)
class Intracranial:
    """Intracranial masks of a frame stack (axis 0 along the slice normal).

    ``cavity``: all skull-enclosed soft tissue, up to the skull's rim; ``core``: the largest
    3-D body of ``cavity`` at least ``RIM_EROSION_MM`` away from anything else (where a
    hyperdense region must begin); ``brain``: ``core`` grown ``RECONSTRUCT_MM`` back
    into ``cavity``; ``skull``: bone and its partial-volume band. Calcifications are
    intracranial, not skull.
    """

    brain: NDArray[np.bool_]
    core: NDArray[np.bool_]
    skull: NDArray[np.bool_]
    cavity: NDArray[np.bool_]


def skull_bone(hu: NDArray[np.floating], spacing: tuple[float, float, float]) -> NDArray[np.bool_]:
    """Bone (``BONE_HU``) in 3-D connected bodies of at least ``SKULL_MIN_ML``."""
    labels, count = ndimage.label(hu >= BONE_HU, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel()) * float(np.prod(spacing)) / 1000.0
    sizes[0] = 0.0
    return np.asarray((sizes >= SKULL_MIN_ML)[labels])


def bounded_rim(band: NDArray[np.bool_], hu: NDArray[np.floating], steps: int) -> NDArray[np.bool_]:
    """``band`` plus the ``RIM_HU`` voxels reached from it in ``steps`` steps, each one
    in-plane or down from the frame above (axis 0 ascends along the slice normal, toward
    the vertex on an axial series).

    The downward step takes the caps that a thick slice grazing the vault shows under the
    bone; there is no upward step, so blood lying on the cranial floor in the frame above
    the skull base is never rim."""
    if steps < 1 or not band.any():
        return band.copy()
    allowed = hu >= RIM_HU
    grown = band.copy()
    in_plane = ndimage.generate_binary_structure(2, 1)[np.newaxis]
    for _ in range(steps):
        step = ndimage.binary_dilation(grown, structure=in_plane)
        step[:-1] |= grown[1:]
        step &= allowed
        if not (step & ~grown).any():
            break
        grown |= step
    return grown


def intracranial_mask(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> Intracranial:
    """The cranial cavity's soft tissue of a frame stack, parenchyma next to bone kept.

    ``hu`` is (frames, rows, columns) as acquired, frames in slice-normal order and placed
    on a common in-plane grid, ``spacing`` (typical gap between frames, row, column) in mm.
    Working on the acquired frames avoids the bridging that interpolating a tilted series
    onto an orthogonal grid makes between the skull of one frame and the brain of the next.
    The work is done at about ``WORKING_PIXEL_MM`` in-plane and taken back by repetition,
    and only in the in-plane box of what is not air (:func:`head_box`): the masks are
    those of the whole frames (``tests/test_brain.py`` holds the two equal).
    """
    box = head_box(hu, spacing)
    if box is None:
        empty = np.zeros(hu.shape, dtype=bool)
        return Intracranial(empty, empty.copy(), empty.copy(), empty.copy())
    return _intracranial_in(hu, spacing, box)


def intracranial_on_frames(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> Intracranial:
    """:func:`intracranial_mask` computed on the whole frames (no box)."""
    return _intracranial_in(hu, spacing, (slice(None),) * 3)


def _intracranial_in(
    hu: NDArray[np.floating], spacing: tuple[float, float, float], box: tuple[slice, ...]
) -> Intracranial:
    """The masks of ``hu`` computed in ``box`` (whose first row and column lie on the
    subsampling lattice), false outside it; each is taken back to full resolution
    straight into its whole-volume array, so no box-sized copy of the four is held."""
    step = _working_step(spacing)
    part = hu[box]
    coarse = _coarse_intracranial(
        part[:, ::step, ::step], (spacing[0], spacing[1] * step, spacing[2] * step)
    )
    soft = part >= SOFT_TISSUE_LOW_HU
    masks = []
    for mask, soft_only in zip(coarse, (True, True, False, True), strict=True):
        up = np.repeat(np.repeat(mask, step, axis=1), step, axis=2)[
            :, : part.shape[1], : part.shape[2]
        ]
        whole = np.zeros(hu.shape, dtype=bool)
        whole[box] = up & soft if soft_only else up
        masks.append(whole)
    return Intracranial(*masks)


def _working_step(spacing: tuple[float, float, float]) -> int:
    """In-plane subsampling that brings the pixel to about ``WORKING_PIXEL_MM``."""
    return max(1, int(WORKING_PIXEL_MM / min(spacing[1], spacing[2]) + 1e-6))


def _closing_half_width(spacing: tuple[float, float, float]) -> tuple[int, int]:
    """Half-width, in pixels of ``spacing``, of the skull's in-plane closing."""
    return (
        max(1, round(BONE_CLOSING_MM / spacing[1])),
        max(1, round(BONE_CLOSING_MM / spacing[2])),
    )


def head_box(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> tuple[slice, ...] | None:
    """All frames, and the rows and columns of every voxel that is not air
    (``SOFT_TISSUE_LOW_HU``) widened by a margin the extraction cannot see past (the
    closing's reach and one subsampling cell, in working pixels), with its first row and
    column on the subsampling lattice; None when every voxel is air.

    Nothing of the extraction starts below ``SOFT_TISSUE_LOW_HU`` and no step reaches
    further in-plane than the margin, so the masks in the box are those of the whole
    frames. The frames are all kept: the holes are filled slice by slice, and a first or
    last frame counts as border."""
    step = _working_step(spacing)
    half_width = _closing_half_width((spacing[0], spacing[1] * step, spacing[2] * step))
    tissue = hu >= SOFT_TISSUE_LOW_HU
    if not tissue.any():
        return None
    margin = tuple(step * (2 * reach + 2) for reach in half_width)
    rows, columns = bounding_box(tissue, (0, *margin))[1:]
    return (
        slice(None),
        slice(rows.start - rows.start % step, rows.stop),
        slice(columns.start - columns.start % step, columns.stop),
    )


def _coarse_intracranial(
    hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]:
    """``intracranial_mask`` at the given resolution: (brain, core, skull, cavity)."""
    empty = np.zeros(hu.shape, dtype=bool)
    bone = skull_bone(hu, spacing)
    if not bone.any():
        return empty, empty, empty, empty
    pixel = min(spacing[1], spacing[2])
    dense_band = hu >= RIM_PATH_HU
    labels, _ = ndimage.label(dense_band | bone)
    touching = np.unique(labels[bone])
    band = np.isin(labels, touching[touching > 0])
    skull_mask = bounded_rim(band, hu, max(1, round(RIM_MAX_MM / pixel)))
    closed = _in_plane_closing(skull_mask, _closing_half_width(spacing))
    filled = ndimage.binary_fill_holes(closed, structure=_IN_PLANE)
    inside = filled & ~closed & (hu >= SOFT_TISSUE_LOW_HU)
    if not inside.any():
        return empty, empty, empty, empty
    box = ndimage.find_objects(inside.astype(np.uint8))[0]
    distance = ndimage.distance_transform_edt(np.pad(inside[box], 1), sampling=spacing)
    deep = np.zeros(hu.shape, dtype=bool)
    deep[box] = distance[1:-1, 1:-1, 1:-1] > RIM_EROSION_MM
    labels, count = ndimage.label(deep)
    if count == 0:
        return empty, empty, skull_mask, empty
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    core = np.asarray(labels == int(np.argmax(sizes)))
    brain = ndimage.binary_dilation(
        core, structure=_IN_PLANE, iterations=max(1, round(RECONSTRUCT_MM / pixel)), mask=inside
    )
    return np.asarray(brain | core), core, skull_mask, np.asarray(inside)
