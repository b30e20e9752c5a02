"""Grad-CAM heat maps of a lesion: the one method every risk pipeline draws.

For a lesion mask on the frames a network reads (``InputConfig``), the maps are drawn on
the lesion's largest cross-section and, on each side, the nearest frame within
``reach`` that holds lesion (:func:`lesion_frame_offsets`: never a frame without
lesion). Each is Grad-CAM relative to no lesion (:func:`lesion_grad_cams`): the
network's input centred on that frame against the same input with the lesion filled
with the tissue around it (``inputs.lesion_free_samples``; for a lesion-only input,
an all-black crop), so the map holds only what the lesion changes in the layer.
:func:`lesion_heat_maps` keeps each map within ``margin_mm`` of the lesion (a display
choice), and its label says so, with the share of the map's heat kept and where the raw
peak lies. The Secondary Capture writer (``pipelines.outputs.saliency``) burns in the
colour scale.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from pipelines.base import HeatMap
from pipelines.cnn.gradcam import (
    POSITIVE,
    CamResult,
    grad_cam,
    peak_distance_mm,
    restrict_to_region,
)
from pipelines.cnn.inputs import InputConfig, largest_frame, lesion_free_samples, prepare_frames
from pipelines.cnn.networks import CnnClassifier

HEATMAP_REACH = 2
"""Heat maps: the key frame and, on each side, the nearest frame within this many frames
that holds lesion."""
HEAT_MARGIN_MM = 2.0
"""Heat is shown within this distance of the lesion (a display choice; each label states
the share of the map's heat kept and where the raw peak lies)."""


def lesion_frame_offsets(
    frame_mask: NDArray[np.bool_], key: int, reach: int = HEATMAP_REACH
) -> tuple[int, ...]:
    """Offsets from the key frame of the frames a heat map may be drawn on: the key frame
    (the lesion's largest cross-section) and, on each side, the nearest frame within
    ``reach`` that holds lesion pixels. Never a frame without lesion."""
    if not frame_mask[key].any():
        raise ValueError(f"the key frame {key} holds no lesion pixel")
    offsets = [0]
    for direction in (-1, 1):
        for step in range(1, reach + 1):
            frame = key + direction * step
            if 0 <= frame < frame_mask.shape[0] and frame_mask[frame].any():
                offsets.append(direction * step)
                break
    return tuple(sorted(offsets))


def lesion_grad_cams(
    model: CnnClassifier,
    frame_hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    config: InputConfig,
    class_index: int = POSITIVE,
    *,
    reach: int = HEATMAP_REACH,
    layer: str | None = None,
    relative: bool = True,
) -> list[CamResult]:
    """The raw Grad-CAM maps of the lesion ``mask`` (on ``frame_hu``'s frames), one per
    heat-map frame (:func:`lesion_frame_offsets`), each on the input ``config`` makes
    centred on that frame, at ``layer`` (default the network's ``cam_layer``), relative
    to the input without the lesion (``relative``; else plain Grad-CAM)."""
    offsets = lesion_frame_offsets(mask, largest_frame(mask), reach)
    config = replace(config, sample_offsets=offsets)
    case = prepare_frames(frame_hu, mask, pixel_spacing_mm, config)
    reference = (
        lesion_free_samples(frame_hu, mask, pixel_spacing_mm, case, config) if relative else None
    )
    return [
        grad_cam(
            model,
            case,
            sample=sample,
            class_index=class_index,
            target_layer=layer,
            reference=None if reference is None else reference[sample : sample + 1],
        )
        for sample in range(len(case.sample_centres))
    ]


def lesion_heat_maps(
    model: CnnClassifier,
    frame_hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    config: InputConfig,
    title: str,
    class_index: int = POSITIVE,
    *,
    lesion: str = "lesion",
    reach: int = HEATMAP_REACH,
    layer: str | None = None,
    margin_mm: float = HEAT_MARGIN_MM,
) -> list[HeatMap]:
    """:func:`lesion_grad_cams` kept within ``margin_mm`` of ``lesion`` (its name in the
    label) on each map's frame; a map with no heat there is not drawn. The label is
    ``title`` (the network and the evidence shown) with the margin, the share of the
    map's heat kept and the raw peak's distance to the lesion."""
    maps = []
    for cam in lesion_grad_cams(
        model, frame_hu, mask, pixel_spacing_mm, config, class_index, reach=reach, layer=layer
    ):
        region = mask[cam.frame_index]
        kept = restrict_to_region(cam.heat_frame, region, pixel_spacing_mm, margin_mm)
        if kept.share == 0:  # no evidence on the lesion here: nothing to show
            continue
        peak = peak_distance_mm(cam.heat_frame, region, pixel_spacing_mm)
        where = "inside" if peak == 0 else f"{peak:.1f} mm from"
        label = (
            f"{title}, shown within {margin_mm:g} mm of the {lesion} ({100 * kept.share:.0f}% "
            f"of the map's heat lies there; its peak {where} the {lesion})"
        )
        maps.append(HeatMap(frame=cam.frame_index, heat=kept.heat, label=label))
    return maps
