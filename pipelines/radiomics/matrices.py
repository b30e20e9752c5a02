"""pyradiomics' texture matrices (GLCM, GLRLM, GLSZM, GLDM, NGTDM) of one binned image,
all from one compiled pass over the ROI (numba).

pyradiomics' C extension builds each class's matrix in a loop of its own. Here one
compiled kernel (``_kernel``) visits the ROI's voxels of the padded box once and fills
all five: for each of the 13 neighbour offsets the GLCM pair, GLDM dependence and NGTDM
neighbour sum (both senses of the offset), and the GLRLM run through the voxel (its length
carried from the voxel behind, counted where the run ends); then GLSZM zones as
26-connected flood fills of one level. The matrices have the layout, angle order and size
of pyradiomics' C functions for distance 1 in 3-D, with its rules for isolated voxels and
for angles without two ROI voxels on a line; ``covers`` says which settings that is. The
kernel is compiled once per machine and cached on disk (``cache=True``: ``__pycache__``
beside this file, or ``NUMBA_CACHE_DIR`` where the package folder is read-only, as in
deploy/Containerfile; ``pipelines.radiomics.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

# pyradiomics' 13 angles for distance 1 in 3-D (array axes z, y, x), in its order.
ANGLES = np.array(
    [
        (1, 1, 1),
        (1, 1, 0),
        (1, 1, -1),
        (1, 0, 1),
        (1, 0, 0),
        (1, 0, -1),
        (1, -1, 1),
        (1, -1, 0),
        (1, -1, -1),
        (0, 1, 1),
        (0, 1, 0),
        (0, 1, -1),
        (0, 0, 1),
    ]
)
_DEPENDENCE_COLUMNS = 2 * 26 + 1  # the width of pyradiomics' GLDM for 26 neighbours
_LONGEST_RUN = np.iinfo(np.int16).max  # the kernel counts run lengths in int16


def covers(options: dict[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether these matrices are pyradiomics' for these settings and this image."""
    distances = list(options.get("distances", [1]))
    return (
        distances == [1]
        and not options.get("force2D", False)
        and not options.get("voxelBased", False)
        and len(shape) == 3
        and min(shape) > 1
        and max(shape) <= _LONGEST_RUN
    )


@dataclass
class Matrices:
    """Every texture matrix of one binned image, made on first use of any of them."""

    binned: NDArray[np.int_]  # grey level per voxel (1..Ng inside the ROI)
    roi: NDArray[np.bool_]
    ng: int
    gldm_a: float = 0.0
    _made: dict[str, NDArray[np.float64]] = field(default_factory=dict)

    def get(self, name: str) -> NDArray[np.float64]:
        """pyradiomics' C output for class ``name`` (glcm, glrlm, glszm, gldm, ngtdm)."""
        if not self._made:
            self._made = all_matrices(self.binned, self.roi, self.ng, self.gldm_a)
        return self._made[name]


def all_matrices(
    binned: NDArray[np.int_], roi: NDArray[np.bool_], ng: int, gldm_a: float
) -> dict[str, NDArray[np.float64]]:
    """The five matrices, each with pyradiomics' leading batch axis of 1."""
    padded = np.pad(np.where(roi, binned, 0).astype(np.int32), 1)  # 0: outside the ROI
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    glcm, glrlm, zone_sizes, gldm, ngtdm = _kernel(
        padded.ravel(), ANGLES @ strides, ng, float(gldm_a), max(roi.shape), _DEPENDENCE_COLUMNS
    )
    no_pairs = np.flatnonzero(~glcm.any((0, 1)))  # angles without two neighbouring voxels
    if len(no_pairs):
        voxels = np.argwhere(roi)
        for a in no_pairs:
            if _one_per_line(voxels, ANGLES[a]):
                glrlm[:, :, a] = 0  # pyradiomics' C drops the angle: "segmentation is 2D"
    return {
        "glcm": glcm[None],
        "glrlm": glrlm[None],
        "glszm": zone_sizes[None],
        "gldm": gldm[None],
        "ngtdm": ngtdm[None],
    }


def _one_per_line(voxels: NDArray[np.intp], angle: NDArray[np.int_]) -> bool:
    """Whether no line along ``angle`` through the box holds two of ``voxels`` (their
    indices): each voxel's line is where it meets the 0 plane of the angle's first
    moving axis (that component is +1)."""
    moving = int(np.flatnonzero(angle)[0])
    meets = voxels - voxels[:, moving : moving + 1] * angle[None, :]
    return len(np.unique(meets, axis=0)) == len(voxels)


@numba.njit(cache=True, nogil=True)
def _kernel(
    levels: NDArray[np.int32],
    steps: NDArray[np.int64],
    ng: int,
    gldm_a: float,
    longest: int,
    dependence_columns: int,
) -> tuple[
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
]:
    """The five matrices of the flat padded box ``levels`` (0 outside the ROI and on the
    1-voxel border; ``steps``: the 13 angles' flat offsets): GLCM (Ng, Ng, 13), GLRLM
    (Ng, longest, 13), GLSZM (Ng, largest zone), GLDM (Ng, 53), NGTDM (Ng, 3)."""
    angles = len(steps)
    glcm = np.zeros((ng, ng, angles), dtype=np.int32)
    runs = np.zeros((ng * longest + 1) * angles)  # GLRLM after a slot per angle for "no
    # run ends here" (one per angle: consecutive updates never wait on the same cell)
    run = np.empty((len(levels), angles), dtype=np.int16)  # run length up to each ROI voxel
    gldm = np.zeros((ng, dependence_columns))
    ngtdm = np.zeros((ng, 3))
    for g in range(ng):
        ngtdm[g, 2] = g + 1
    # Branch-free counting where the outcome is data-dependent (neighbours in or out of the
    # ROI, of the same level or not): the images' levels change every few voxels.
    for v in range(len(levels)):
        g = levels[v]
        if g == 0:
            continue
        dependence = 0
        neighbour_sum = 0
        neighbour_count = 0
        for a in range(angles):
            step = steps[a]
            ahead = levels[v + step]
            behind = levels[v - step]
            if ahead > 0:
                glcm[g - 1, ahead - 1, a] += 1
            neighbour_sum += ahead + behind
            neighbour_count += (ahead > 0) + (behind > 0)
            dependence += ((ahead > 0) & (abs(ahead - g) <= gldm_a)) + (
                (behind > 0) & (abs(behind - g) <= gldm_a)
            )
            # every step is forward in flat order: the voxel behind is already counted
            length = run[v - step, a] * (behind == g) + 1
            run[v, a] = length
            ends = ahead != g
            runs[a + ends * (((g - 1) * longest + length) * angles)] += 1
        gldm[g - 1, dependence] += 1
        ngtdm[g - 1, 0] += 1  # every voxel, as pyradiomics' C counts it (no neighbour: 0 apart)
        if neighbour_count > 0:
            ngtdm[g - 1, 1] += abs(g - neighbour_sum / neighbour_count)
    glrlm = runs[angles:].reshape((ng, longest, angles))
    return glcm.astype(np.float64), glrlm, _zones(levels, steps, ng), gldm, ngtdm


@numba.njit(cache=True, nogil=True)
def _zones(levels: NDArray[np.int32], steps: NDArray[np.int64], ng: int) -> NDArray[np.float64]:
    """Size-zone matrix: the 26-connected zones of each level (flood fills), by level and
    size, sizes up to the largest zone (pyradiomics' C trims the rest)."""
    open_ = levels.copy()  # a voxel's level until its zone is found, then 0
    stack = np.empty(len(levels), dtype=np.int64)
    zone_level = np.empty(len(levels), dtype=np.int64)
    zone_size = np.empty(len(levels), dtype=np.int64)
    zones = 0
    for start in range(len(levels)):
        g = open_[start]
        if g == 0:
            continue
        open_[start] = 0
        stack[0] = start
        top = 1
        size = 0
        while top > 0:
            top -= 1
            v = stack[top]
            size += 1
            for step in steps:
                for w in (v + step, v - step):
                    if open_[w] == g:
                        open_[w] = 0
                        stack[top] = w
                        top += 1
        zone_level[zones] = g
        zone_size[zones] = size
        zones += 1
    largest = 1
    for z in range(zones):
        largest = max(largest, zone_size[z])
    out = np.zeros((ng, largest))
    for z in range(zones):
        out[zone_level[z] - 1, zone_size[z] - 1] += 1
    return out
