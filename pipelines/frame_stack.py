"""The acquired frames placed on the orthogonal grid's in-plane lattice, and back.

A tilted series' frames are shifted in-plane from one to the next. Placing each frame at
its whole-pixel offset on the grid's (row, column) lattice, without interpolating between
frames, gives a stack on which 3-D operations see the anatomy as acquired; a mask computed
there is taken to the grid by giving each grid plane the mask of its nearest frame, so
that every frame reads back exactly its own mask (``pipelines.geometry.grid_to_frames``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipelines.geometry import AIR_HU, grid_to_frame_indices, represented_thickness
from pipelines.series import LoadedSeries


def placed_frames(series: LoadedSeries) -> NDArray[np.float32]:
    """Frame HU (n_frames, grid rows, grid columns) at whole-pixel offsets; air elsewhere."""
    grid = series.grid
    out = np.full((len(series.frames), grid.shape[1], grid.shape[2]), AIR_HU, dtype=np.float32)
    rows, cols = series.frame_hu.shape[1:]
    for k, (_, r0, c0) in enumerate(grid_to_frame_indices(series.stack, grid)):
        r, c = max(r0, 0), max(c0, 0)
        src = series.frame_hu[k, r - r0 : rows, c - c0 : cols]
        out[k, r : r + src.shape[0], c : c + src.shape[1]] = src[
            : grid.shape[1] - r, : grid.shape[2] - c
        ]
    return out


def stack_spacing(series: LoadedSeries) -> tuple[float, float, float]:
    """Typical (median) gap between frames, and the in-plane pixel spacing, in mm."""
    gaps = np.diff(series.stack.offsets[:, 0])
    gap = float(np.median(gaps)) if len(gaps) else float(series.volume.spacing[0])
    return gap, float(series.grid.spacing[1]), float(series.grid.spacing[2])


def frame_voxel_ml(series: LoadedSeries) -> NDArray[np.float64]:
    """Each frame's voxel volume in mL: pixel area times the thickness it represents."""
    dy, dx = series.grid.spacing[1], series.grid.spacing[2]
    return np.asarray(represented_thickness(series.stack.offsets[:, 0]) * dy * dx / 1000.0)


def nearest_frame(series: LoadedSeries) -> NDArray[np.intp]:
    """For each grid plane, the index of the frame nearest to it along the normal."""
    depths = series.stack.offsets[:, 0]
    grid = series.grid
    planes = grid.origin[0] + np.arange(grid.shape[0]) * grid.spacing[0]
    return np.asarray(np.argmin(np.abs(planes[:, None] - depths[None, :]), axis=1))


def placed_to_grid(series: LoadedSeries, placed: NDArray[np.generic]) -> NDArray[np.generic]:
    """A placed-frame array (n_frames, grid rows, grid columns) on the grid, nearest frame.

    Each frame's own grid plane (the one ``grid_to_frames`` samples) holds that frame's
    values even where two frames are equally near.
    """
    out = np.asarray(placed[nearest_frame(series)])
    for k, (i, _, _) in enumerate(grid_to_frame_indices(series.stack, series.grid)):
        if 0 <= i < out.shape[0]:
            out[i] = placed[k]
    return out
