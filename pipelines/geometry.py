"""Pure geometry of CT frames: plane frames, orthogonal resampling, and the way back.

Frames of a CT series are parallel planes. With gantry tilt, each frame's origin is
shifted in-plane relative to its neighbours, so the stack is sheared; with uneven slice
spacing, the planes are not equidistant. Pipelines work on an orthogonal grid whose axes
are the slice normal, the column direction and the row direction; results go back onto
the frames by nearest-neighbour sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

if TYPE_CHECKING:
    from pipelines.series import LoadedSeries

AIR_HU = -1024.0


@dataclass(frozen=True)
class PlaneStack:
    """Parallel frames in the orthonormal basis (normal, column direction, row direction).

    ``offsets[k]`` are frame k's origin coordinates (d, u, v) in mm along the normal, the
    column direction (down the rows) and the row direction (along the columns).
    ``pixel_spacing`` is (between rows, between columns) as DICOM PixelSpacing.
    """

    row_direction: NDArray[np.float64]  # ImageOrientationPatient[:3]
    column_direction: NDArray[np.float64]  # ImageOrientationPatient[3:]
    pixel_spacing: tuple[float, float]
    offsets: NDArray[np.float64]  # (n_frames, 3), ascending d

    @property
    def normal(self) -> NDArray[np.float64]:
        """Unit slice normal, row direction x column direction."""
        n = np.cross(self.row_direction, self.column_direction)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    @property
    def basis(self) -> NDArray[np.float64]:
        """3x3 matrix whose columns are (normal, column direction, row direction)."""
        return np.stack([self.normal, self.column_direction, self.row_direction], axis=1)


def plane_stack(
    positions: NDArray[np.float64],
    orientation: NDArray[np.float64],
    pixel_spacing: tuple[float, float],
) -> tuple[PlaneStack, NDArray[np.intp]]:
    """Build a ``PlaneStack`` from ImagePositionPatient rows and one orientation.

    Returns the stack and the order (indices into ``positions``) that sorts the frames
    along the normal.
    """
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    coords = np.asarray(positions, dtype=np.float64) @ np.stack([normal, col, row], axis=1)
    order = np.argsort(coords[:, 0], kind="stable")
    stack = PlaneStack(row, col, (float(pixel_spacing[0]), float(pixel_spacing[1])), coords[order])
    return stack, order


def tilt_degrees(stack: PlaneStack) -> float:
    """Angle between the stacking direction (first to last origin) and the normal."""
    if len(stack.offsets) < 2:
        return 0.0
    step = stack.offsets[-1] - stack.offsets[0]
    if step[0] <= 0:
        return 0.0
    return float(np.degrees(np.arctan2(np.hypot(step[1], step[2]), step[0])))


def frame_affines(stack: PlaneStack) -> NDArray[np.float64]:
    """Per-frame 4x4 affines mapping (0, row, column) indices to patient mm."""
    dy, dx = stack.pixel_spacing
    affines = np.zeros((len(stack.offsets), 4, 4))
    for k, origin in enumerate(stack.offsets):
        affines[k, :3, 0] = stack.normal
        affines[k, :3, 1] = stack.column_direction * dy
        affines[k, :3, 2] = stack.row_direction * dx
        affines[k, :3, 3] = stack.basis @ origin
        affines[k, 3, 3] = 1.0
    return affines


@dataclass(frozen=True)
class Grid:
    """An orthogonal grid in the stack's basis: origin (d, u, v) and spacing (mm)."""

    origin: NDArray[np.float64]  # (3,) in (d, u, v)
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def affine(self, basis: NDArray[np.float64]) -> NDArray[np.float64]:
        """4x4 mapping a grid index (slice, row, column) to patient mm."""
        affine = np.eye(4)
        affine[:3, :3] = basis * np.asarray(self.spacing)
        affine[:3, 3] = basis @ self.origin
        return affine


def default_slice_spacing(stack: PlaneStack, minimum_mm: float = 0.5) -> float:
    """The smallest gap between consecutive frames, not below ``minimum_mm``."""
    gaps = np.diff(stack.offsets[:, 0])
    if len(gaps) == 0:
        return 1.0
    return float(max(gaps.min(), minimum_mm))


def orthogonal_grid(stack: PlaneStack, frame_shape: tuple[int, int], slice_mm: float) -> Grid:
    """The smallest orthogonal grid holding every frame, in-plane spacing kept."""
    dy, dx = stack.pixel_spacing
    rows, cols = frame_shape
    lo = stack.offsets.min(axis=0)
    hi = stack.offsets.max(axis=0)
    n_slices = int(np.floor((hi[0] - lo[0]) / slice_mm + 1e-6)) + 1
    n_rows = int(np.ceil((hi[1] - lo[1]) / dy - 1e-6)) + rows
    n_cols = int(np.ceil((hi[2] - lo[2]) / dx - 1e-6)) + cols
    return Grid(lo.copy(), (slice_mm, dy, dx), (n_slices, n_rows, n_cols))


def resample_to_grid(
    frames: NDArray[np.float32], stack: PlaneStack, grid: Grid
) -> NDArray[np.float32]:
    """Resample frames (n, rows, cols) onto ``grid``: in-plane shift, then linear along d.

    Points outside every frame read as air (-1024 HU). Plane by plane: only the two
    shifted frames bracketing the current grid plane are held besides the result.
    """
    dy, dx = stack.pixel_spacing
    rows, cols = frames.shape[1:]
    canvas = np.full(grid.shape[1:], AIR_HU, dtype=np.float32)
    placed: dict[int, NDArray[np.float32]] = {}

    def shifted(k: int) -> NDArray[np.float32]:
        """Frame ``k`` placed on the grid's rows and columns."""
        if k not in placed:
            canvas[:rows, :cols] = frames[k]
            shift = (
                (stack.offsets[k, 1] - grid.origin[1]) / dy,
                (stack.offsets[k, 2] - grid.origin[2]) / dx,
            )
            placed[k] = ndimage.shift(
                canvas, shift, order=1, mode="constant", cval=AIR_HU, prefilter=False
            )
        return placed[k]

    depths = stack.offsets[:, 0]
    targets = grid.origin[0] + np.arange(grid.shape[0]) * grid.spacing[0]
    upper = np.clip(np.searchsorted(depths, targets, side="left"), 0, len(depths) - 1)
    lower = np.clip(upper - 1, 0, len(depths) - 1)
    out = np.empty(grid.shape, dtype=np.float32)
    for i, target in enumerate(targets):
        lo, hi = int(lower[i]), int(upper[i])
        for k in [k for k in placed if k not in (lo, hi)]:
            del placed[k]  # the targets ascend: no later plane needs it
        if hi == lo or abs(depths[hi] - target) < 1e-6:
            out[i] = shifted(hi)
            continue
        weight = (target - depths[lo]) / (depths[hi] - depths[lo])
        out[i] = (1.0 - weight) * shifted(lo) + weight * shifted(hi)
    return out


def represented_thickness(depths: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per plane: half the gap to the previous plus half the gap to the next plane.

    ``depths`` are positions along the normal in any order; an end plane counts its own
    gap to its single neighbour. A lone plane gets zero.
    """
    order = np.argsort(depths)
    gaps = np.diff(depths[order])
    if len(gaps) == 0:
        return np.zeros(len(depths))
    before = np.concatenate([[gaps[0]], gaps])
    after = np.concatenate([gaps, [gaps[-1]]])
    thickness = np.empty(len(depths))
    thickness[order] = (before + after) / 2.0
    return thickness


def grid_to_frame_indices(stack: PlaneStack, grid: Grid) -> NDArray[np.intp]:
    """For each frame, the nearest grid (slice, row offset, column offset) as integers."""
    rel = (stack.offsets - grid.origin) / np.asarray(grid.spacing)
    return np.rint(rel).astype(np.intp)


def sample_grid_on_frames(
    values: NDArray[np.generic], stack: PlaneStack, grid: Grid, frame_shape: tuple[int, int]
) -> NDArray[np.generic]:
    """Nearest-neighbour sample of a grid array at every frame pixel.

    Returns an array (n_frames, rows, cols) of ``values``'s dtype; pixels whose nearest
    grid point lies outside the grid get zero.
    """
    rows, cols = frame_shape
    out = np.zeros((len(stack.offsets), rows, cols), dtype=values.dtype)
    for k, (i, r0, c0) in enumerate(grid_to_frame_indices(stack, grid)):
        if not 0 <= i < grid.shape[0]:
            continue
        src = values[i, max(r0, 0) : r0 + rows, max(c0, 0) : c0 + cols]
        out[
            k, max(-r0, 0) : max(-r0, 0) + src.shape[0], max(-c0, 0) : max(-c0, 0) + src.shape[1]
        ] = src
    return out


def grid_to_frames(series: LoadedSeries, mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """A boolean mask on ``series.volume``'s grid, sampled (nearest) on every source frame."""
    if mask.shape != series.volume.hu.shape:
        raise ValueError(f"mask shape {mask.shape} is not the volume's {series.volume.hu.shape}")
    frame_shape = (int(series.frame_hu.shape[1]), int(series.frame_hu.shape[2]))
    sampled = sample_grid_on_frames(mask, series.stack, series.grid, frame_shape)
    return sampled.astype(bool, copy=False)  # no copy of a boolean mask
