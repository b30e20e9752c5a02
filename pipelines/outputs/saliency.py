"""Saliency Secondary Captures: a heat map (e.g. Grad-CAM) over its source frame, with the
risk it explains, the model and its notice burned in."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import NDArray

from pipelines.base import HeatMap, PipelineResult
from pipelines.outputs.common import OutputIdentity, plain, risk_lines
from pipelines.outputs.sc import (
    NOTICE_COLOUR,
    RISK_COLOUR,
    TEXT_COLOUR,
    display_window,
    secondary_capture,
    text_panel,
    window_to_uint8,
)
from pipelines.series import LoadedSeries

HEAT_FLOOR = 0.2  # heat below this is not drawn, so the anatomy stays readable
HEAT_ALPHA = 0.5
# Colour ramp of the heat map: blue (low) -> yellow -> red (high).
RAMP = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)


def heat_colours(heat: NDArray[np.floating]) -> NDArray[np.float64]:
    """RGB (0..255) of heat values in [0, 1] along ``RAMP``, linearly interpolated."""
    position = np.clip(heat, 0.0, 1.0) * (len(RAMP) - 1)
    low = np.minimum(np.floor(position).astype(int), len(RAMP) - 2)
    weight = (position - low)[..., None]
    return (1.0 - weight) * RAMP[low] + weight * RAMP[low + 1]


def overlay_heat(gray: NDArray[np.uint8], heat: NDArray[np.floating]) -> NDArray[np.uint8]:
    """``gray`` in RGB with ``heat`` blended where it reaches ``HEAT_FLOOR``."""
    if heat.shape != gray.shape:
        raise ValueError(f"heat map {heat.shape} does not match the frame {gray.shape}")
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float64)
    shown = heat >= HEAT_FLOOR
    rgb[shown] = (1.0 - HEAT_ALPHA) * rgb[shown] + HEAT_ALPHA * heat_colours(heat[shown])
    return np.rint(rgb).astype(np.uint8)


def saliency_pixels(
    series: LoadedSeries, result: PipelineResult, heatmap: HeatMap
) -> NDArray[np.uint8]:
    """The heat map over its frame in a brain window, with a text panel below."""
    gray = window_to_uint8(series.frame_hu[heatmap.frame], *display_window(series))
    image = overlay_heat(gray, heatmap.heat)
    lines = [plain(heatmap.label), *risk_lines(result), result.algorithm.notice]
    colours = [TEXT_COLOUR] + [RISK_COLOUR] * (len(lines) - 2) + [NOTICE_COLOUR]
    return np.concatenate([image, text_panel(image.shape[1], lines, colours)], axis=0)


def build_saliency_sc(
    series: LoadedSeries, result: PipelineResult, heatmap: HeatMap, identity: OutputIdentity
) -> hd.sc.SCImage:
    """RGB Secondary Capture of one heat map on its source frame."""
    level, width = display_window(series)
    derivation = f"{plain(heatmap.label)} over the source frame, window W{width:.0f}/L{level:.0f}"
    return secondary_capture(
        series, heatmap.frame, saliency_pixels(series, result, heatmap), identity, derivation
    )
