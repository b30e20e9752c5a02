"""Network inputs from a lesion: key frame, square ROI crop, 2.5-D channels, window, resize.

The studies feed a 2-D ImageNet network the lesion's largest cross-section: Jiang et al.
(HT after thrombectomy) the largest ROI slice, Pei et al. (MRI prognosis) the 2.5-D stack
of slices n-2, n, n+2 as three channels, Lu et al. (haematoma expansion) the largest slice
and the slices +-3 around it as separate 2-D samples. ``InputConfig`` covers all three:
``channel_offsets`` picks the frames stacked as channels of one sample, ``sample_offsets``
the samples of a case. Frames are those of ``LoadedSeries.frame_hu`` (as acquired).
``lesion_margin_mm`` keeps only the lesion (and a margin) on each channel, so the network,
and its Grad-CAM, can only use the lesion itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from scipy.ndimage import distance_transform_edt

from pipelines.series import LoadedSeries

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRAIN_WINDOW_HU = (0.0, 80.0)
"""Brain window; Lee et al. (haematoma expansion) use (0, 100)."""


@dataclass(frozen=True)
class InputConfig:
    """How a case becomes network input; the default is the 2.5-D (n-2, n, n+2) sample."""

    window: tuple[float, float] = BRAIN_WINDOW_HU  # HU mapped to [0, 1], clipped outside
    size: int = 224  # side of the square network input, pixels
    margin_mm: float = 10.0  # context around the lesion's bounding box, each side
    min_side_mm: float = 32.0  # smallest crop side, so a tiny lesion keeps some context
    channel_offsets: tuple[int, int, int] = (-2, 0, 2)  # frames of one sample's 3 channels
    sample_offsets: tuple[int, ...] = (0,)  # sample centres around the key frame
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # None: the whole crop; else every channel keeps only the pixels within this distance
    # (mm) of the lesion on its own frame, the rest set to the window's low end (black).
    lesion_margin_mm: float | None = None

    def __post_init__(self) -> None:
        """Reject settings that cannot give a valid input."""
        if not self.window[1] > self.window[0]:
            raise ValueError(f"window must be (low, high) with high > low, not {self.window}")
        if self.size < 8:
            raise ValueError(f"input size must be at least 8 pixels, not {self.size}")
        if len(self.channel_offsets) != 3:
            raise ValueError("channel_offsets must name 3 frames (one per RGB channel)")
        if not self.sample_offsets or 0 not in self.sample_offsets:
            raise ValueError("sample_offsets must include 0 (the key frame)")
        if self.margin_mm < 0 or self.min_side_mm < 0:
            raise ValueError("margin_mm and min_side_mm must not be negative")
        if self.lesion_margin_mm is not None and self.lesion_margin_mm < 0:
            raise ValueError("lesion_margin_mm must not be negative")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")


TWO_POINT_FIVE_D = InputConfig()
"""Pei et al.: one sample per case, channels = frames n-2, n, n+2."""

SLICES_AROUND_LARGEST = InputConfig(
    channel_offsets=(0, 0, 0), sample_offsets=(-3, -2, -1, 0, 1, 2, 3)
)
"""Lu et al.: the largest slice and the slices +-3 from it, each a grey 2-D sample."""


@dataclass(frozen=True)
class CropBox:
    """A square region of a frame: rows ``row0:row0+side``, columns ``col0:col0+side``."""

    row0: int
    col0: int
    side: int

    @property
    def rows(self) -> slice:
        """Row slice into the frame."""
        return slice(self.row0, self.row0 + self.side)

    @property
    def cols(self) -> slice:
        """Column slice into the frame."""
        return slice(self.col0, self.col0 + self.side)


@dataclass(frozen=True)
class CaseInput:
    """A case ready for the network, and where it came from on the frames."""

    samples: torch.Tensor  # (n_samples, 3, size, size) float32, normalised
    key_frame: int  # frame of the largest lesion cross-section
    key_sample: int  # index of the sample centred on the key frame
    sample_centres: tuple[int, ...]  # frame each sample is centred on
    sample_frames: tuple[tuple[int, ...], ...]  # frames stacked as each sample's channels
    crop: CropBox  # the ROI on every frame, in frame pixels
    frame_shape: tuple[int, int]  # (rows, columns) of the frames


def largest_frame(mask: NDArray[np.bool_]) -> int:
    """Index of the frame with the largest lesion area (first one on a tie)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be (frames, rows, columns), not shape {mask.shape}")
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        raise ValueError("the lesion mask is empty")
    return int(np.argmax(areas))


def clamped_frames(centre: int, offsets: tuple[int, ...], n_frames: int) -> tuple[int, ...]:
    """Frames ``centre + offset``, clamped to ``[0, n_frames - 1]`` at the ends of the stack."""
    return tuple(min(max(centre + o, 0), n_frames - 1) for o in offsets)


def square_crop(
    frame_mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    margin_mm: float,
    min_side_mm: float,
) -> CropBox:
    """Square box around the lesion on one frame, with margin, kept inside the frame.

    The side is the larger bounding-box extent plus the margin on both sides, at least
    ``min_side_mm``, at most the frame's smaller dimension. The box is centred on the
    lesion's bounding box and shifted inward where it would leave the frame, so it holds
    the whole lesion whenever the lesion fits in such a square.
    """
    if not frame_mask.any():
        raise ValueError("the lesion mask is empty on the key frame")
    rows, cols = frame_mask.shape
    r = np.flatnonzero(frame_mask.any(axis=1))
    c = np.flatnonzero(frame_mask.any(axis=0))
    r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
    dr, dc = pixel_spacing_mm
    side = max(
        r1 - r0 + 2 * round(margin_mm / dr),
        c1 - c0 + 2 * round(margin_mm / dc),
        round(min_side_mm / min(dr, dc)),
    )
    side = min(side, rows, cols)
    top = (r0 + r1 - side) // 2
    left = (c0 + c1 - side) // 2
    top = min(max(top, 0), rows - side)
    left = min(max(left, 0), cols - side)
    return CropBox(row0=top, col0=left, side=side)


def window_unit(hu: NDArray[np.floating], window: tuple[float, float]) -> NDArray[np.float32]:
    """HU clipped to ``window`` and scaled to [0, 1]."""
    low, high = window
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def lesion_only(
    hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    margin_mm: float,
    fill_hu: float,
) -> NDArray[np.float64]:
    """``hu`` (..., rows, columns) with every pixel farther than ``margin_mm`` from the
    lesion ``mask`` of its own frame set to ``fill_hu``; a frame without lesion is all
    ``fill_hu``."""
    if hu.shape != mask.shape:
        raise ValueError(f"images {hu.shape} and masks {mask.shape} differ in shape")
    flat_hu = hu.reshape(-1, *hu.shape[-2:]).astype(np.float64)
    flat_mask = mask.reshape(-1, *mask.shape[-2:])
    out = np.full(flat_hu.shape, fill_hu, dtype=np.float64)
    for i, (image, region) in enumerate(zip(flat_hu, flat_mask, strict=True)):
        if region.any():
            near = distance_transform_edt(~region, sampling=pixel_spacing_mm) <= margin_mm
            out[i][near] = image[near]
    return out.reshape(hu.shape)


def to_network_input(
    unit: NDArray[np.float32],
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """(n, 3, h, w) images in [0, 1] -> (n, 3, size, size), normalised per channel.

    Bilinear resampling (antialiased when shrinking), then ``(x - mean) / std``.
    """
    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def crop_samples(
    frame_hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    crop: CropBox,
    sample_frames: tuple[tuple[int, ...], ...],
    config: InputConfig,
) -> torch.Tensor:
    """(n_samples, 3, size, size): each sample's frames (its channels) cropped to ``crop``,
    kept near the lesion when ``config.lesion_margin_mm`` is set, windowed, resized and
    normalised."""
    stack = np.stack([frame_hu[list(f), crop.rows, crop.cols] for f in sample_frames])
    if config.lesion_margin_mm is not None:
        masks = np.stack([mask[list(f), crop.rows, crop.cols] for f in sample_frames])
        stack = lesion_only(
            stack, masks, pixel_spacing_mm, config.lesion_margin_mm, config.window[0]
        )
    return to_network_input(window_unit(stack, config.window), config.size, config.mean, config.std)


def prepare_frames(
    frame_hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    config: InputConfig = TWO_POINT_FIVE_D,
) -> CaseInput:
    """Network input of one case from its frames in HU and a lesion mask on those frames."""
    if frame_hu.shape != mask.shape:
        raise ValueError(f"frames {frame_hu.shape} and mask {mask.shape} differ in shape")
    n_frames = frame_hu.shape[0]
    key = largest_frame(mask)
    crop = square_crop(mask[key], pixel_spacing_mm, config.margin_mm, config.min_side_mm)
    centres = dict.fromkeys(clamped_frames(key, config.sample_offsets, n_frames))
    sample_frames = tuple(
        tuple(clamped_frames(c, config.channel_offsets, n_frames)) for c in centres
    )
    return CaseInput(
        samples=crop_samples(frame_hu, mask, pixel_spacing_mm, crop, sample_frames, config),
        key_frame=key,
        key_sample=list(centres).index(key),
        sample_centres=tuple(centres),
        sample_frames=sample_frames,
        crop=crop,
        frame_shape=(int(frame_hu.shape[1]), int(frame_hu.shape[2])),
    )


FILL_MARGIN_MM = 1.0
"""Pixels within this distance of the lesion are filled too (its partial-volume rim)."""
FILL_RING_MM = 5.0
"""The fill is the median of the tissue in this ring beyond the filled pixels."""


def fill_lesion(
    hu: NDArray[np.floating], mask: NDArray[np.bool_], pixel_spacing_mm: tuple[float, float]
) -> NDArray[np.float64]:
    """``hu`` (frames, rows, columns) with each frame's lesion, and the pixels within
    ``FILL_MARGIN_MM`` of it, set to the median of the ring ``FILL_RING_MM`` wide around
    them on that frame (the tissue the lesion lies in); frames without lesion, or with
    no ring left inside the image, unchanged."""
    if hu.shape != mask.shape:
        raise ValueError(f"images {hu.shape} and masks {mask.shape} differ in shape")
    out = hu.astype(np.float64, copy=True)
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        distance = distance_transform_edt(~mask[k], sampling=pixel_spacing_mm)
        fill = distance <= FILL_MARGIN_MM
        ring = ~fill & (distance <= FILL_MARGIN_MM + FILL_RING_MM)
        if ring.any():
            out[k][fill] = np.median(out[k][ring])
    return out


def lesion_free_samples(
    frame_hu: NDArray[np.floating],
    mask: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    case: CaseInput,
    config: InputConfig,
) -> torch.Tensor:
    """The samples of ``case`` (made from these frames and ``mask`` with ``config``) as
    they would be without the lesion: same crop and frames, the lesion filled with the
    tissue around it (:func:`fill_lesion`), and, for a lesion-only input
    (``lesion_margin_mm``), nothing kept, so every pixel is at the window's low end. The
    reference of Grad-CAM relative to no lesion."""
    frames = sorted({f for channels in case.sample_frames for f in channels})
    crop = case.crop
    hu = np.asarray(frame_hu[frames, crop.rows, crop.cols])
    lesion = np.asarray(mask[frames, crop.rows, crop.cols], dtype=bool)
    filled = fill_lesion(hu, lesion, pixel_spacing_mm)
    local = {f: i for i, f in enumerate(frames)}
    sample_frames = tuple(tuple(local[f] for f in channels) for channels in case.sample_frames)
    whole = CropBox(0, 0, crop.side)
    return crop_samples(
        filled, np.zeros_like(lesion), pixel_spacing_mm, whole, sample_frames, config
    )


def frame_pixel_spacing(series: LoadedSeries, frame: int) -> tuple[float, float]:
    """(row, column) pixel spacing in mm of one frame, from its index-to-patient affine."""
    affine = series.frame_affines[frame]
    return float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))


def prepare_case(
    series: LoadedSeries, mask: NDArray[np.bool_], config: InputConfig = TWO_POINT_FIVE_D
) -> CaseInput:
    """Network input of a loaded series and a lesion mask on its frames."""
    key = largest_frame(mask)
    return prepare_frames(series.frame_hu, mask, frame_pixel_spacing(series, key), config)
