"""CNN features from the global pooling layer, per case, and their PCA reduction.

Jiang et al. export the 2048 avgpool features of the fine-tuned ResNet152 and reduce them
by PCA; Lu et al. take the last hidden layer of frozen ImageNet networks over the largest
slice and the slices +-3. A case's feature vector is the mean over its samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.decomposition import PCA

from pipelines.cnn.inputs import CaseInput
from pipelines.cnn.networks import CnnClassifier


@torch.no_grad()
def sample_features(
    model: CnnClassifier, samples: torch.Tensor, batch_size: int = 16
) -> NDArray[np.float32]:
    """Pooled backbone features of each sample, shape (N, feature_dim)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.features(x.to(device)).cpu() for x in samples.split(batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def case_features(
    model: CnnClassifier, cases: Sequence[CaseInput], batch_size: int = 16
) -> NDArray[np.float32]:
    """One feature vector per case (the mean over its samples), shape (n_cases, dim)."""
    if not cases:
        raise ValueError("no cases given")
    return np.stack(
        [sample_features(model, c.samples, batch_size).mean(axis=0) for c in cases]
    ).astype(np.float32)


def fit_pca(features: NDArray[np.floating], n_components: int, seed: int = 0) -> PCA:
    """PCA fitted on training-case features (n_cases, dim).

    ``n_components`` is capped at the largest number the data allow, min(n_cases, dim).
    Apply it to any case with ``pca.transform``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (cases, dim), not shape {features.shape}")
    k = min(n_components, *features.shape)
    return PCA(n_components=k, random_state=seed).fit(features)
