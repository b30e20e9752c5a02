"""Saliency Secondary Captures: a heat map (e.g. Grad-CAM) over its source frame, with a
colour scale (the ramp from low to high heat, labelled) beside it, and the risk it
explains, the model and its notice burned in."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

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


COLOUR_BAR_WIDTH = 0.05  # of the frame's width
COLOUR_BAR_HEIGHT = 0.6  # of the frame's height
COLOUR_BAR_LABELS = ("high", "low")  # at the top and the bottom of the bar


def colour_bar(height: int, width: int) -> NDArray[np.uint8]:
    """A vertical colour scale ``height`` x ``width`` (RGB): ``RAMP`` from low heat at the
    bottom (``HEAT_FLOOR``, the lowest heat drawn) to 1 at the top, fully opaque."""
    values = np.linspace(1.0, HEAT_FLOOR, max(height, 2))[:height]
    column = heat_colours(values)
    return np.rint(np.repeat(column[:, None, :], width, axis=1)).astype(np.uint8)


def with_colour_bar(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """``image`` (RGB) with a labelled colour scale burned in at its right edge: the bar,
    outlined in white, with "high" above and "low" below it."""
    rows, cols = image.shape[:2]
    bar_w = max(4, round(COLOUR_BAR_WIDTH * cols))
    bar_h = max(8, round(COLOUR_BAR_HEIGHT * rows))
    font_size = max(8, cols // 40)
    left = cols - bar_w - max(2, cols // 64)
    top = (rows - bar_h) // 2
    out = image.copy()
    out[top : top + bar_h, left : left + bar_w] = colour_bar(bar_h, bar_w)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left - 1, top - 1, left + bar_w, top + bar_h), outline=TEXT_COLOUR)
    font = ImageFont.load_default(size=font_size)
    high, low = COLOUR_BAR_LABELS
    for text, y in ((high, top - font_size - 3), (low, top + bar_h + 2)):
        width = draw.textlength(text, font=font)
        x = min(max(0, left + bar_w / 2 - width / 2), cols - width)
        draw.text((x, max(0, min(y, rows - font_size - 1))), text, fill=TEXT_COLOUR, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def saliency_pixels(
    series: LoadedSeries, result: PipelineResult, heatmap: HeatMap
) -> NDArray[np.uint8]:
    """The heat map over its frame in the series' display window (brain window for CT),
    with its colour scale, and a text panel below."""
    gray = window_to_uint8(series.frame_hu[heatmap.frame], *display_window(series))
    image = with_colour_bar(overlay_heat(gray, heatmap.heat))
    lines = [plain(heatmap.label), *risk_lines(result), result.algorithm.notice]
    colours = [TEXT_COLOUR] + [RISK_COLOUR] * (len(lines) - 2) + [NOTICE_COLOUR]
    return np.concatenate([image, text_panel(image.shape[1], lines, colours)], axis=0)


def build_saliency_sc(
    series: LoadedSeries, result: PipelineResult, heatmap: HeatMap, identity: OutputIdentity
) -> hd.sc.SCImage:
    """RGB Secondary Capture of one heat map on its source frame."""
    level, width = display_window(series)
    derivation = (
        f"{plain(heatmap.label)} over the source frame, window W{width:.0f}/L{level:.0f}, "
        f"colour scale low {HEAT_FLOOR:g} (blue) to high 1 (red)"
    )
    return secondary_capture(
        series, heatmap.frame, saliency_pixels(series, result, heatmap), identity, derivation
    )
