"""pyradiomics' texture matrices (GLCM, GLRLM, GLSZM, GLDM, NGTDM) of one binned image,
all from one walk over the 13 neighbour directions.

pyradiomics' C extension builds each class's matrix in a loop of its own. Here each
neighbour offset is gathered once, as whole-array numpy operations over the ROI's voxels,
and serves every class: GLCM pairs (one ``bincount``), GLDM dependence and NGTDM
neighbour sums (counts over both senses of the offset), GLRLM runs (each voxel linked to
its predecessor in the run, run starts found by pointer jumping), and GLSZM zones
(connected components of the same-level links, ``scipy.sparse.csgraph``). The matrices
have the layout, angle order and size of pyradiomics' C functions for distance 1 in 3-D;
``covers`` says which settings that is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components

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


def covers(options: dict[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether these matrices are pyradiomics' for these settings and this image."""
    distances = list(options.get("distances", [1]))
    return (
        distances == [1]
        and not options.get("force2D", False)
        and not options.get("voxelBased", False)
        and len(shape) == 3
        and min(shape) > 1
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
            self._made = _all_matrices(self.binned, self.roi, self.ng, self.gldm_a)
        return self._made[name]


def _all_matrices(
    binned: NDArray[np.int_], roi: NDArray[np.bool_], ng: int, gldm_a: float
) -> dict[str, NDArray[np.float64]]:
    """The five matrices, each with pyradiomics' leading batch axis of 1."""
    count = int(roi.sum())
    longest = max(roi.shape)
    inner = tuple(slice(1, -1) for _ in roi.shape)
    padded = np.zeros(tuple(n + 2 for n in roi.shape), dtype=np.int64)  # 0: outside the ROI
    padded[inner][roi] = binned[roi]
    number = np.full(padded.shape, -1, dtype=np.int64)  # ROI voxel number, -1 outside
    number[inner][roi] = np.arange(count)
    levels, numbers = padded.ravel(), number.ravel()
    where = np.flatnonzero(number >= 0)  # the ROI's voxels in the padded volume, in order
    strides = np.array(padded.strides) // padded.itemsize
    level = levels[where]
    pairs = np.empty((len(ANGLES), count), dtype=np.int64)  # level * (ng + 1) + neighbour's
    glrlm = np.empty((ng, longest, len(ANGLES)))
    dependence = np.zeros(count, dtype=np.int64)
    neighbour_sum = np.zeros(count, dtype=np.int64)
    neighbour_count = np.zeros(count, dtype=np.int64)
    zones: list[NDArray[np.int64]] = []  # same-level links (voxel, neighbour)
    voxels = np.arange(count)
    for a, offset in enumerate(ANGLES):
        step = int(offset @ strides)
        ahead, behind = levels[where + step], levels[where - step]
        pairs[a] = level * (ng + 1) + ahead
        for other in (ahead, behind):
            dependence += (other > 0) & (np.abs(other - level) <= gldm_a)
            neighbour_sum += other
            neighbour_count += other > 0
        linked = ahead == level
        zones.append(np.stack([voxels[linked], numbers[where[linked] + step]]))
        previous = np.where(behind == level, numbers[where - step], voxels)
        glrlm[:, :, a] = _runs(previous, level, ng, longest)
    glcm = np.stack([np.bincount(p, minlength=(ng + 1) ** 2) for p in pairs], axis=-1).reshape(
        ng + 1, ng + 1, len(ANGLES)
    )[1:, 1:]
    return {
        "glcm": glcm[None].astype(np.float64),
        "glrlm": glrlm[None],
        "glszm": _zones(level, np.concatenate(zones, axis=1), ng, count)[None],
        "gldm": _dependence(level, dependence, ng)[None],
        "ngtdm": _neighbourhood(level, neighbour_sum, neighbour_count, ng)[None],
    }


def _runs(
    previous: NDArray[np.int64], level: NDArray[np.int64], ng: int, longest: int
) -> NDArray[np.float64]:
    """Run-length matrix along one direction: ``previous`` is each voxel's predecessor in
    its run (itself at a run's start); pointer jumping finds every run's start."""
    start = previous
    while True:
        further = start[start]
        if np.array_equal(further, start):
            break
        start = further
    lengths = np.bincount(start, minlength=len(level))
    first = np.flatnonzero(lengths)
    flat = (level[first] - 1) * longest + lengths[first] - 1
    return np.bincount(flat, minlength=ng * longest).reshape(ng, longest).astype(np.float64)


def _zones(
    level: NDArray[np.int64], links: NDArray[np.int64], ng: int, count: int
) -> NDArray[np.float64]:
    """Size-zone matrix: 26-connected zones of one level, as connected components."""
    ones = np.ones(links.shape[1], dtype=np.int8)
    graph = csr_array((ones, (links[0], links[1])), shape=(count, count))
    _, labels = connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(labels)
    zone_level = np.zeros(len(sizes), dtype=np.int64)
    zone_level[labels] = level
    largest = int(sizes.max())  # pyradiomics' C trims the sizes past the largest zone
    flat = (zone_level - 1) * largest + sizes - 1
    return np.bincount(flat, minlength=ng * largest).reshape(ng, largest).astype(np.float64)


def _dependence(
    level: NDArray[np.int64], dependence: NDArray[np.int64], ng: int
) -> NDArray[np.float64]:
    """Dependence matrix: voxels by level and number of dependent neighbours."""
    flat = (level - 1) * _DEPENDENCE_COLUMNS + dependence
    return (
        np.bincount(flat, minlength=ng * _DEPENDENCE_COLUMNS)
        .reshape(ng, _DEPENDENCE_COLUMNS)
        .astype(np.float64)
    )


def _neighbourhood(
    level: NDArray[np.int64],
    neighbour_sum: NDArray[np.int64],
    neighbour_count: NDArray[np.int64],
    ng: int,
) -> NDArray[np.float64]:
    """Neighbourhood grey-tone difference matrix: per level the voxels with a neighbour,
    the sum of |level - mean neighbour level| and the level."""
    has = neighbour_count > 0
    difference = np.abs(level[has] - neighbour_sum[has] / neighbour_count[has])
    out = np.zeros((ng, 3))
    out[:, 0] = np.bincount(level[has] - 1, minlength=ng)
    out[:, 1] = np.bincount(level[has] - 1, weights=difference, minlength=ng)
    out[:, 2] = np.arange(1, ng + 1)
    return out
