"""The areas of a series and what the Rad-score reads from each: the same functions run
at training and at inference.

- areas: every region of the configured segmenter (``pipelines.contract.Segmenter``,
  by default the threshold baseline ``hyperdense_regions``, whose regions exclude
  calcification, so a calcified focus is never classified) that an acquired frame
  crosses, largest first, measured on the frames as the SR reports them (volume, HUmax,
  mean HU, largest cross-section);
- radiomics: ``pipelines.radiomics.extract_series`` on each area's grid mask with the
  model's parameter file;
- repeat segmentations (training only, for the ICC filter): what two other readers
  would have drawn, made by perturbing the area's mask (:func:`reader_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.base import PipelineError, RegionMeasurements
from pipelines.contract import LabelledRegions, Segmenter
from pipelines.geometry import grid_to_frames, represented_thickness
from pipelines.measure import measure_region
from pipelines.radiomics import RadiomicsError, extract_series
from pipelines.series import LoadedSeries
from pipelines.stages import charged_to

PARAMS_DIR = Path(__file__).parent / "params"
BUNDLED_PARAMS: dict[str, Path] = {
    "iph_vs_contrast_original": PARAMS_DIR / "iph_vs_contrast_original.yaml",
}
"""This package's radiomics parameter files by name (beside ``pipelines.radiomics``')."""

READER_GROW_FLOOR_HU = 45.0
"""A generous reader's outline takes in neighbours down to this HU (1 voxel in-plane)."""
READER_TIGHT_HU = 62.0
"""A strict reader leaves out area voxels below this HU (the pale partial-volume rim)."""
READER_MIN_KEPT = 0.5
"""A strict outline keeps at least this fraction of the area, else it is an erosion."""


@dataclass(frozen=True)
class Area:
    """One hyperdense area: its grid and frame masks and its measurements."""

    grid_mask: NDArray[np.bool_]  # on series.volume's grid
    frame_mask: NDArray[np.bool_]  # on series.frames
    measurements: RegionMeasurements


def frame_geometry(series: LoadedSeries) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pixel area (mm2) and represented thickness (mm) of every acquired frame."""
    thickness = represented_thickness(series.stack.offsets[:, 0])
    areas = np.array(
        [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
    )
    return areas, thickness


@charged_to("segmentation")
def find_areas(
    series: LoadedSeries, segmenter: Segmenter, labels: LabelledRegions | None = None
) -> list[Area]:
    """The segmenter's regions that an acquired frame crosses, largest first, measured.

    ``labels`` is ``segmenter.segment(series)`` when the caller has it already.
    """
    grid_labels, count = labels if labels is not None else segmenter.segment(series)
    pixel_area, thickness = frame_geometry(series)
    areas = []
    for label in range(1, count + 1):
        grid_mask = grid_labels == label
        frame_mask = grid_to_frames(series, grid_mask)
        if frame_mask.any():
            measured = measure_region(frame_mask, series.frame_hu, pixel_area, thickness)
            areas.append(Area(grid_mask, frame_mask, measured))
    return areas


def resolve_params(params: str | Path) -> str | Path:
    """A name of :data:`BUNDLED_PARAMS` as its path; anything else as given."""
    return BUNDLED_PARAMS.get(params, params) if isinstance(params, str) else params


@charged_to("features")
def area_radiomics(
    series: LoadedSeries, grid_mask: NDArray[np.bool_], params: str | Path, workers: int = 1
) -> dict[str, float]:
    """pyradiomics features of one area (with a pool of ``workers``); ``PipelineError``
    when it cannot be measured."""
    try:
        return extract_series(series, grid_mask, resolve_params(params), workers=workers)
    except RadiomicsError as exc:
        raise PipelineError(f"radiomics of a hyperdense area failed: {exc}") from exc


def reader_masks(
    hu: NDArray[np.floating], grid_mask: NDArray[np.bool_]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Two repeat segmentations of an area, as other readers would draw it.

    A generous reader: the mask grown by one voxel in-plane into voxels of at least
    :data:`READER_GROW_FLOOR_HU`. A strict reader: the mask without its voxels below
    :data:`READER_TIGHT_HU` (threshold jitter), or, when that keeps less than
    :data:`READER_MIN_KEPT` of it, the mask eroded by one voxel in-plane (if anything
    is left). Pure: the volume's HU on its grid and the mask in, two masks out.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    generous = grid_mask | (
        ndimage.binary_dilation(grid_mask, in_plane) & (hu >= READER_GROW_FLOOR_HU)
    )
    strict = grid_mask & (hu >= READER_TIGHT_HU)
    if strict.sum() < READER_MIN_KEPT * grid_mask.sum():
        eroded = ndimage.binary_erosion(grid_mask, in_plane)
        strict = eroded if eroded.any() else grid_mask
    return generous, strict
