"""AUC confidence interval by the stratified, seeded percentile bootstrap.

Each replicate resamples the events and the non-events separately with replacement, so
every replicate keeps the observed prevalence and both classes (no replicate is lost).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipelines.evaluation.inputs import binary_outcome, confidence_level, score_vector
from pipelines.evaluation.roc import AucInterval, midrank_auc

_CELLS_PER_BATCH = 2_000_000
"""Replicates are ranked in batches of at most this many scores, to bound memory."""


def bootstrap_aucs(
    y_true: ArrayLike, y_score: ArrayLike, n_bootstrap: int = 2000, seed: int = 0
) -> NDArray[np.float64]:
    """The AUCs of ``n_bootstrap`` stratified bootstrap replicates, reproducible by ``seed``.

    Each batch draws the events' indices, then the non-events', from one NumPy
    ``default_rng(seed)``; replicates are therefore identical for a seed and a dataset.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    y = binary_outcome(y_true)
    s = score_vector(y_score, y.size)
    positives = s[y == 1]
    negatives = s[y == 0]
    m, n = positives.size, negatives.size
    rng = np.random.default_rng(seed)
    batch = max(1, _CELLS_PER_BATCH // (m + n))
    out = np.empty(n_bootstrap, dtype=np.float64)
    for start in range(0, n_bootstrap, batch):
        size = min(batch, n_bootstrap - start)
        pos = positives[rng.integers(0, m, size=(size, m))]
        neg = negatives[rng.integers(0, n, size=(size, n))]
        out[start : start + size] = midrank_auc(pos, neg)
    return out


def auc_ci_bootstrap(
    y_true: ArrayLike,
    y_score: ArrayLike,
    level: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> AucInterval:
    """AUC with a percentile bootstrap interval; ``se`` is the replicates' standard deviation."""
    level = confidence_level(level)
    y = binary_outcome(y_true)
    s = score_vector(y_score, y.size)
    replicates = bootstrap_aucs(y, s, n_bootstrap=n_bootstrap, seed=seed)
    low, high = np.quantile(replicates, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return AucInterval(
        auc=float(midrank_auc(s[y == 1], s[y == 0])),
        se=float(np.std(replicates, ddof=1)) if n_bootstrap > 1 else 0.0,
        low=float(low),
        high=float(high),
        level=level,
        method="bootstrap",
    )
