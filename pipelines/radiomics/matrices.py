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

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, sparse
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
    longest = max(roi.shape)
    inner = tuple(slice(1, -1) for _ in roi.shape)
    padded = np.zeros(tuple(n + 2 for n in roi.shape), dtype=np.int32)  # 0: outside the ROI
    padded[inner][roi] = binned[roi]
    levels = padded.ravel()
    walk = _roi_walk(roi.shape, np.packbits(roi).tobytes())
    level = levels[walk.where]
    ahead, behind = levels[walk.ahead], levels[walk.behind]
    if gldm_a == 0:  # (0, outside the ROI, never equals a level)
        dependence = np.sum(ahead == level, 0) + np.sum(behind == level, 0)
    else:
        dependence = sum(
            np.sum((other > 0) & (np.abs(other - level) <= gldm_a), 0) for other in (ahead, behind)
        )
    neighbour_sum = ahead.sum(0) + behind.sum(0)
    neighbour_count = np.sum(ahead > 0, 0) + np.sum(behind > 0, 0)
    cells = (ng + 1) ** 2  # GLCM cell: angle, level * (ng + 1) + neighbour's level
    pairs = (np.arange(len(ANGLES))[:, None] * cells + level * (ng + 1) + ahead).ravel()
    glcm = np.bincount(pairs, minlength=len(ANGLES) * cells).reshape(len(ANGLES), ng + 1, ng + 1)
    glcm = glcm[:, 1:, 1:].transpose(1, 2, 0)
    return {
        "glcm": glcm[None].astype(np.float64),
        "glrlm": _runs(levels[walk.runs], walk.run_angle, ng, longest)[None],
        "glszm": _zones(padded, ng, level, ahead == level, walk)[None],
        "gldm": _dependence(level, dependence, ng)[None],
        "ngtdm": _neighbourhood(level, neighbour_sum, neighbour_count, ng)[None],
    }


@dataclass(frozen=True)
class _Walk:
    """Flat indices into the padded box (1-voxel border) of one ROI, shared by every
    image measured on it."""

    where: NDArray[np.intp]  # the ROI's voxels
    ahead: NDArray[np.intp]  # (angles, voxels): each voxel's neighbour along the angle
    ahead_position: NDArray[np.intp]  # (angles, voxels): its place in ``where`` (-1: none)
    behind: NDArray[np.intp]  # (angles, voxels): and against it
    runs: NDArray[np.intp]  # ``_lines`` through the ROI's voxels, one outside voxel after each
    run_angle: NDArray[np.intp]  # the angle of each entry of ``runs``


@functools.lru_cache(maxsize=4)
def _roi_walk(shape: tuple[int, ...], packed: bytes) -> _Walk:
    """The index arrays of the ROI of ``shape`` whose voxels are the bits ``packed``."""
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=int(np.prod(shape)))
    inside = np.pad(bits.reshape(shape).astype(bool), 1)
    where = np.flatnonzero(inside)
    strides = np.cumprod((1, *inside.shape[:0:-1]))[::-1]  # (z, y, x) strides in voxels
    steps = (ANGLES @ strides)[:, None]
    lines = _lines(inside.shape)
    on_line = inside.ravel()[lines]
    keep = on_line | np.concatenate([[False], on_line[:-1]])  # ROI voxels, and a separator
    angle = np.flatnonzero(keep) // (len(lines) // len(ANGLES))
    position = np.full(inside.size, -1, dtype=np.intp)
    position[where] = np.arange(len(where))
    ahead = where + steps
    return _Walk(where, ahead, position[ahead], where - steps, lines[keep], angle)


def _runs(
    along: NDArray[np.int32], angle: NDArray[np.intp], ng: int, longest: int
) -> NDArray[np.float64]:
    """Run-length matrix of every angle from the levels ``along`` the lines of ``_Walk``
    (``angle``: each entry's): runs are the stretches of one level > 0 (separators 0)."""
    starts = np.concatenate([[0], np.flatnonzero(along[1:] != along[:-1]) + 1])
    lengths = np.diff(starts, append=len(along))
    values = along[starts]
    keep = values > 0
    flat = ((values[keep] - 1) * longest + lengths[keep] - 1) * len(ANGLES) + angle[starts[keep]]
    counts = np.bincount(flat, minlength=ng * longest * len(ANGLES))
    return counts.reshape(ng, longest, len(ANGLES)).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _lines(shape: tuple[int, ...]) -> NDArray[np.int64]:
    """Flat indices into a padded volume of ``shape`` (1-voxel border) that walk, for each
    angle in turn, every line of the inner box along that angle, voxel after voxel, each
    line followed by a border voxel (level 0). Each angle's block has the same length
    (padded with border voxels)."""
    inner = tuple(n - 2 for n in shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    blocks = [_walk(offset, inner, strides) for offset in ANGLES]
    width = max(len(b) for b in blocks)  # every angle's block padded to one length
    return np.concatenate([np.pad(b, (0, width - len(b))) for b in blocks])


def _walk(
    offset: NDArray[np.int_], inner: tuple[int, ...], strides: tuple[int, ...]
) -> NDArray[np.int64]:
    """The lines along ``offset`` (first non-zero component +1) through the inner box:
    each line is indexed by where it meets the first moving axis' 0 plane (which may lie
    outside the box) and walked along that axis; cells outside the box are dropped, but
    one border voxel (flat index 0) ends every line."""
    moving = int(np.flatnonzero(offset)[0])
    steps = inner[moving]
    others = [k for k in range(3) if k != moving]
    starts = [
        np.arange(
            -(steps - 1) if offset[k] > 0 else 0, inner[k] + (steps - 1 if offset[k] < 0 else 0)
        )
        for k in others
    ]
    grid = np.meshgrid(*starts, np.arange(steps), indexing="ij", sparse=True)
    time = grid[2]
    flat = np.zeros(1, dtype=np.int64)
    valid = np.ones(1, dtype=bool)
    for k, start in zip(others, grid[:2], strict=True):
        position = start + offset[k] * time
        valid = valid & (position >= 0) & (position < inner[k])
        flat = flat + (position + 1) * strides[k]
    flat = flat + (time + 1) * strides[moving]
    shape = np.broadcast_shapes(flat.shape, valid.shape)
    flat = np.broadcast_to(flat, shape)
    valid = np.broadcast_to(valid, shape)
    end = np.zeros((*shape[:2], 1), dtype=np.int64)
    walk = np.concatenate([np.where(valid, flat, 0), end], axis=-1)
    keep = np.concatenate([valid, np.ones_like(end, dtype=bool)], axis=-1)
    keep &= np.concatenate([valid.any(axis=-1, keepdims=True)] * (shape[2] + 1), axis=-1)
    return walk[keep]


def _zones(
    padded: NDArray[np.int32],
    ng: int,
    level: NDArray[np.int32],
    same: NDArray[np.bool_],
    walk: _Walk,
) -> NDArray[np.float64]:
    """Size-zone matrix: the 26-connected zones of each level, by whichever is cheaper:
    ``ndimage.label`` on each level's bounding box (work ~ levels x box), or the
    connected components of the graph of same-level neighbours (~ voxels + links;
    ``same``: (angles, voxels), the neighbour ahead has the voxel's level)."""
    links = int(np.count_nonzero(same))
    if 2 * (len(level) + links) < ng * padded.size:
        sizes = _linked_zone_sizes(level, same, walk, ng)
    else:
        sizes = _labelled_zone_sizes(padded, ng)
    largest = max((int(z.max()) for z in sizes if len(z)), default=1)  # pyradiomics' C trims
    out = np.zeros((ng, largest))  # the sizes past the largest zone
    for g, found in enumerate(sizes):
        out[g] = np.bincount(found - 1, minlength=largest)
    return out


def _labelled_zone_sizes(padded: NDArray[np.int32], ng: int) -> list[NDArray[np.int64]]:
    """The sizes of each level's zones (level 1 first), by ``ndimage.label``."""
    connected = np.ones((3, 3, 3), dtype=bool)
    sizes: list[NDArray[np.int64]] = []
    for g, box in enumerate(ndimage.find_objects(padded, max_label=ng), start=1):
        if box is None:  # a level absent from the ROI
            sizes.append(np.zeros(0, dtype=np.int64))
            continue
        labels, found = ndimage.label(padded[box] == g, structure=connected)
        sizes.append(np.bincount(labels.ravel(), minlength=found + 1)[1:])
    return sizes


def _linked_zone_sizes(
    level: NDArray[np.int32], same: NDArray[np.bool_], walk: _Walk, ng: int
) -> list[NDArray[np.int64]]:
    """The sizes of each level's zones (level 1 first), as connected components."""
    count = len(level)
    source = np.broadcast_to(np.arange(count), same.shape)[same]
    graph = sparse.coo_array(
        (np.ones(len(source), dtype=np.int8), (source, walk.ahead_position[same])),
        shape=(count, count),
    )
    found, zone = connected_components(graph, directed=False)
    zone_size = np.bincount(zone, minlength=found)
    zone_level = np.zeros(found, dtype=np.int64)
    zone_level[zone] = level
    order = np.argsort(zone_level, kind="stable")
    bounds = np.searchsorted(zone_level[order], np.arange(1, ng + 2))
    return [zone_size[order[bounds[g] : bounds[g + 1]]] for g in range(ng)]


def _dependence(
    level: NDArray[np.int32], dependence: NDArray[np.int32], ng: int
) -> NDArray[np.float64]:
    """Dependence matrix: voxels by level and number of dependent neighbours."""
    flat = (level - 1) * _DEPENDENCE_COLUMNS + dependence
    return (
        np.bincount(flat, minlength=ng * _DEPENDENCE_COLUMNS)
        .reshape(ng, _DEPENDENCE_COLUMNS)
        .astype(np.float64)
    )


def _neighbourhood(
    level: NDArray[np.int32],
    neighbour_sum: NDArray[np.int32],
    neighbour_count: NDArray[np.int32],
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
