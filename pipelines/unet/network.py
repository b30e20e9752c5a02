"""The 2-D MONAI U-Net for hyperdense regions: configuration, input and inference.

Frames are resampled in-plane to ``UNetConfig.spacing_mm`` (0.9 mm: a 230-250 mm head
field of view becomes 256-280 pixels whatever the matrix), windowed into one channel
per ``UNetConfig.windows`` (the brain window 0-100 HU of Lee et al., and a wide window
-100..300 HU that keeps 90-160 HU contrast apart from bone), passed through the U-Net
frame by frame, and the probabilities taken back to each frame's own matrix. Resampling
both ways is bilinear with pixel-area alignment (``align_corners=False``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from numpy.typing import NDArray

AIR_HU = -1024.0


@dataclass(frozen=True)
class UNetConfig:
    """Architecture and input of the network (stored in the bundle's manifest)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 0  # >0 ends in a one-channel norm + PReLU: it would not learn
    spacing_mm: float = 0.9
    windows: tuple[tuple[float, float], ...] = ((0.0, 100.0), (-100.0, 300.0))

    def __post_init__(self) -> None:
        """Refuse a configuration the network cannot be built from."""
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("strides must have one entry fewer than channels")
        if self.spacing_mm <= 0 or not self.windows:
            raise ValueError("spacing_mm must be positive and windows non-empty")
        if any(high <= low for low, high in self.windows):
            raise ValueError(f"each window must be (low, high) with high > low: {self.windows}")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (the total down-sampling)."""
        return int(np.prod(self.strides))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UNetConfig:
        """The configuration written by :meth:`to_dict`."""
        return cls(
            channels=tuple(int(c) for c in values["channels"]),
            strides=tuple(int(s) for s in values["strides"]),
            num_res_units=int(values["num_res_units"]),
            spacing_mm=float(values["spacing_mm"]),
            windows=tuple((float(lo), float(hi)) for lo, hi in values["windows"]),
        )


def build_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A 2-D MONAI U-Net with one logit per pixel, weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(
            spatial_dims=2,
            in_channels=len(config.windows),
            out_channels=1,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
        )


def resample_frames(
    frames: NDArray[np.floating] | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Bilinear in-plane resampling of (n, rows, cols) to (n, *size), float32."""
    x = torch.as_tensor(np.asarray(frames, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) == size:
        return x[:, 0]
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)[:, 0]


def working_size(
    shape: tuple[int, int], spacing: tuple[float, float], target_mm: float
) -> tuple[int, int]:
    """Matrix of a frame of ``shape`` and pixel ``spacing`` at ``target_mm`` pixels."""
    return (
        max(1, round(shape[0] * spacing[0] / target_mm)),
        max(1, round(shape[1] * spacing[1] / target_mm)),
    )


def window(hu: torch.Tensor, windows: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """Channels (..., C, H, W) of ``hu`` (..., H, W) mapped to [0, 1] by each window."""
    return torch.stack([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in windows], dim=-3)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    config: UNetConfig,
    hu: NDArray[np.floating],
    spacing: tuple[float, float],
    batch_size: int = 4,
) -> NDArray[np.float32]:
    """Lesion probability of every pixel of frames ``hu`` (n, rows, cols) of ``spacing``,
    computed on the device the model's weights are on."""
    model.eval()
    device = next(model.parameters()).device
    rows, cols = int(hu.shape[1]), int(hu.shape[2])
    size = working_size((rows, cols), spacing, config.spacing_mm)
    work = resample_frames(hu, size)
    m = config.multiple
    pad = ((-size[0]) % m, (-size[1]) % m)
    work = F.pad(work, (0, pad[1], 0, pad[0]), value=AIR_HU)
    out = []
    for batch in work.split(batch_size):
        logits = model(window(batch.to(device), config.windows))[:, 0, : size[0], : size[1]]
        out.append(torch.sigmoid(logits).cpu())
    probabilities = resample_frames(torch.cat(out), (rows, cols))
    return np.asarray(probabilities.numpy(), dtype=np.float32)
