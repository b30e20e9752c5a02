"""Haemorrhage-present slice classifier and the area-weighted patient score (nDL).

Lee et al. (haematoma expansion, 2024) flag the slices that hold haematoma with an
SEResNeXt-50 and weight each slice's deep-learning score by the slice's haematoma area
to give a normalised patient-level score. Here a slice is one acquired frame; its input
is the frame resampled in-plane to ``SliceInputConfig.spacing_mm``, centre-cropped (or
padded with air) to ``size`` pixels square, and windowed into three channels: the
study's brain window 0-100 HU, a blood window -20..180 HU and a wide window -100..300 HU,
normalised by the backbone's mean and standard deviation. The backbone is any of
``pipelines.cnn.networks`` (SEResNeXt-50 as the study; the bundled default is the
ImageNet-pretrained EfficientNet-Lite0, 4.7 M parameters instead of 26 M).

nDL, as computed by :func:`normalised_dl_score`::

    nDL = sum_k p_k * A_k / sum_k A_k

with p_k the slice score of frame k (here its haemorrhage-present probability) and A_k
the haematoma area of frame k in mm2 (pixels of the haematoma mask times pixel area).
It is the area-weighted mean slice score, in [0, 1]; slices without haematoma carry no
weight. With no haematoma on any slice the score is undefined and NaN is returned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from model_store.registry import STORE_ROOT, ModelStoreError
from pipelines.cnn.inputs import IMAGENET_MEAN, IMAGENET_STD
from pipelines.cnn.networks import (
    LITE0_MEAN,
    LITE0_STD,
    BackboneName,
    CnnClassifier,
    build_classifier,
)
from pipelines.cnn.training import predict_proba
from pipelines.series import LoadedSeries
from pipelines.unet.bundle import Bundle, load_bundle
from pipelines.unet.network import AIR_HU, resample_frames, window, working_size

MODEL_NAME = "slice_classifier"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class SliceInputConfig:
    """How a frame becomes the classifier's input (stored in the bundle)."""

    spacing_mm: float = 1.8
    size: int = 128
    windows: tuple[tuple[float, float], ...] = ((0.0, 100.0), (-20.0, 180.0), (-100.0, 300.0))
    mean: tuple[float, float, float] = LITE0_MEAN
    std: tuple[float, float, float] = LITE0_STD

    def __post_init__(self) -> None:
        """Refuse settings that cannot give a valid input."""
        if len(self.windows) != 3 or any(hi <= lo for lo, hi in self.windows):
            raise ValueError(
                f"three windows (low, high) with high > low are needed: {self.windows}"
            )
        if self.size < 32 or self.size % 32 or self.spacing_mm <= 0:
            raise ValueError("size must be a positive multiple of 32 and spacing_mm positive")

    @classmethod
    def for_backbone(cls, backbone: BackboneName | str, **values: Any) -> SliceInputConfig:
        """The input for ``backbone``: Lite0 normalisation for Lite0, ImageNet otherwise."""
        lite = BackboneName(backbone) is BackboneName.EFFICIENTNET_LITE0
        mean, std = (LITE0_MEAN, LITE0_STD) if lite else (IMAGENET_MEAN, IMAGENET_STD)
        return cls(mean=mean, std=std, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SliceInputConfig:
        """Settings written by :meth:`to_dict`."""
        mean = tuple(float(v) for v in values["mean"])
        std = tuple(float(v) for v in values["std"])
        return cls(
            spacing_mm=float(values["spacing_mm"]),
            size=int(values["size"]),
            windows=tuple((float(lo), float(hi)) for lo, hi in values["windows"]),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
        )


def slice_inputs(
    hu: NDArray[np.floating], spacing: tuple[float, float], config: SliceInputConfig
) -> torch.Tensor:
    """Network inputs (n, 3, size, size) of frames ``hu`` (n, rows, cols) of ``spacing``."""
    size = working_size((int(hu.shape[1]), int(hu.shape[2])), spacing, config.spacing_mm)
    work = resample_frames(hu, size)
    side = config.size
    pads = []
    for have in size:  # centre crop or pad each in-plane axis to ``side``
        extra = side - have
        pads.append((extra // 2, extra - extra // 2))
    work = F.pad(work, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), value=AIR_HU)
    x = window(work, config.windows)
    mean = torch.tensor(config.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(config.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def normalised_dl_score(
    slice_scores: NDArray[np.floating], areas_mm2: NDArray[np.floating]
) -> float:
    """nDL = sum(p_k A_k) / sum(A_k); NaN when no slice has haematoma area (see module)."""
    p = np.asarray(slice_scores, dtype=np.float64).reshape(-1)
    a = np.asarray(areas_mm2, dtype=np.float64).reshape(-1)
    if p.shape != a.shape:
        raise ValueError(f"{p.size} slice scores for {a.size} slice areas")
    if np.any(a < 0) or np.any((p < 0) | (p > 1)):
        raise ValueError("areas must be non-negative and scores in [0, 1]")
    total = float(a.sum())
    return float(np.dot(p, a) / total) if total > 0 else float("nan")


@dataclass(frozen=True)
class PatientScore:
    """Per-frame probabilities and haematoma areas (frame order), and their nDL."""

    probabilities: NDArray[np.float64]
    areas_mm2: NDArray[np.float64]
    ndl: float


@dataclass(frozen=True)
class SliceClassifier:
    """A trained slice classifier and its input settings."""

    model: CnnClassifier
    config: SliceInputConfig
    bundle: Bundle | None = None

    def probabilities(
        self, hu: NDArray[np.floating], spacing: tuple[float, float], batch_size: int = 16
    ) -> NDArray[np.float64]:
        """Haemorrhage-present probability of each frame of ``hu`` (n, rows, cols)."""
        return predict_proba(self.model, slice_inputs(hu, spacing, self.config), batch_size)

    def patient_score(self, series: LoadedSeries, frame_mask: NDArray[np.bool_]) -> PatientScore:
        """Slice probabilities of ``series``'s frames and nDL weighted by ``frame_mask``.

        ``frame_mask`` (n_frames, rows, cols) is the haematoma on ``series.frame_hu`` (a
        segmenter's ``SegmentResult.frame_mask``).
        """
        if frame_mask.shape != series.frame_hu.shape:
            raise ValueError(f"mask {frame_mask.shape} is not the frames' {series.frame_hu.shape}")
        p = self.probabilities(series.frame_hu, series.stack.pixel_spacing)
        pixel = np.array(
            [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
        )
        areas = frame_mask.sum(axis=(1, 2)) * pixel
        return PatientScore(p, areas, normalised_dl_score(p, areas))


def load_slice_classifier(version: str = MODEL_VERSION, root: Path = STORE_ROOT) -> SliceClassifier:
    """The bundled classifier of ``version``, hash-checked, in eval mode on the CPU."""
    bundle = load_bundle(MODEL_NAME, version, root)
    network = dict(bundle.manifest["network"])
    model = build_classifier(BackboneName(network["backbone"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in bundle.tensors.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelStoreError(f"{MODEL_NAME} {version}: weights do not fit ({exc})") from exc
    return SliceClassifier(model.eval(), SliceInputConfig.from_dict(network["input"]), bundle)
