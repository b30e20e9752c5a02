"""The loaded-series data model shared by every pipeline stage.

A CT series arrives as frames (single-frame instances, or the frames of one enhanced
multi-frame instance). Pipelines work on ``Volume.hu``, an orthogonal grid resampled from
those frames; outputs are written back on the frames' own planes (``SourceFrame``), so a
viewer overlays them on the images as they were acquired, gantry tilt included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.geometry import Grid, PlaneStack


def label_dtype(count: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type holding labels 0..``count``: a (frames, rows, columns)
    label array of a 300-slice series is 79 MB as uint8, 315 MB as int32."""
    if count < 2**8:
        return np.uint8
    if count < 2**16:
        return np.uint16
    return np.uint32


@dataclass(frozen=True)
class SourceFrame:
    """Identity and geometry of one acquired frame, in patient coordinates (LPS, mm)."""

    sop_instance_uid: str
    frame_number: int | None  # 1-based frame in a multi-frame instance; None for single-frame
    position: NDArray[np.float64]  # ImagePositionPatient of the frame's first pixel, shape (3,)


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units on an orthogonal grid.

    ``hu`` has shape (slices, rows, columns). ``affine`` maps a voxel index (slice, row,
    column) to patient coordinates (LPS, mm); its columns are the slice-normal, column and
    row direction vectors scaled by spacing, its last column the origin.
    """

    hu: NDArray[np.float32]
    affine: NDArray[np.float64]  # 4x4

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along (slice, row, column)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class LoadedSeries:
    """One series as loaded: its datasets, its acquired frames and its resampled volume.

    ``frames`` and ``frame_hu`` follow the slice-normal order (ascending position along the
    normal); ``datasets`` are the image instances kept (localizers excluded): one per
    frame, in frame order, for single-frame series; the one instance for an enhanced
    multi-frame series. Loaded from files (``pipelines.volume.load_series``) they hold no
    pixel data: it was decoded into ``frame_hu``; the writers reference them by their
    headers. ``stack`` and ``grid`` relate frames and volume.
    """

    datasets: Sequence[Dataset]
    frames: Sequence[SourceFrame]
    frame_hu: NDArray[np.float32]  # (n_frames, rows, columns) HU as acquired
    frame_affines: NDArray[np.float64]  # (n_frames, 4, 4): (0, row, col) index -> patient mm
    volume: Volume
    gantry_tilt_deg: float
    stack: PlaneStack
    grid: Grid

    @property
    def reference(self) -> Dataset:
        """The dataset whose patient, study and equipment modules outputs copy."""
        return self.datasets[0]
