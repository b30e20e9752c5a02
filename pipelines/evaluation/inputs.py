"""Checks shared by every statistic: binary outcomes, score and probability vectors.

Each function returns a clean NumPy array or raises ``ValueError`` with the reason, so
the statistics themselves never see a label other than 0/1, a missing score, or two
vectors of different lengths.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def binary_outcome(y_true: ArrayLike, *, both_classes: bool = True) -> NDArray[np.int64]:
    """Return ``y_true`` as a 1-D int array of 0/1 labels (1 = event, e.g. HT present).

    Booleans and 0.0/1.0 floats are accepted. With ``both_classes`` (the default) an
    outcome with no events or no non-events is refused: no ROC statistic is defined on it.
    """
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    values = np.unique(y)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"y_true must hold 0/1 labels (1 = event), got values {values[:10]}")
    if both_classes and values.size < 2:
        raise ValueError("y_true must hold both classes (events and non-events)")
    return y.astype(np.int64)


def score_vector(y_score: ArrayLike, n: int, name: str = "y_score") -> NDArray[np.float64]:
    """Return ``y_score`` as a finite 1-D float array of length ``n`` (higher = more risk)."""
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.size != n:
        raise ValueError(f"{name} has {s.size} values for {n} outcomes: they must be paired")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return s


def probability_vector(y_prob: ArrayLike, n: int, name: str = "y_prob") -> NDArray[np.float64]:
    """Return ``y_prob`` as a 1-D float array of ``n`` predicted risks in [0, 1]."""
    p = score_vector(y_prob, n, name)
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return p


def confidence_level(level: float) -> float:
    """Return ``level`` after checking that it lies strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    return float(level)
