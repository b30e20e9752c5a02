"""Decision curve analysis (Vickers & Elkin, Med Decis Making 2006;26:565).

At threshold probability pt a case is treated when its predicted risk is at or above pt,
and net benefit = TP/n - FP/n * pt / (1 - pt): true positives credited, false positives
charged at the odds of pt. Treat-all uses prevalence - (1 - prevalence) * pt / (1 - pt);
treat-none is 0 at every threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipelines.evaluation.inputs import binary_outcome, probability_vector

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
"""Threshold probabilities 0.01, 0.02, ..., 0.99."""


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of the model and of the two default strategies at each threshold."""

    thresholds: NDArray[np.float64]
    model: NDArray[np.float64]
    treat_all: NDArray[np.float64]
    treat_none: NDArray[np.float64]


def _threshold_array(thresholds: ArrayLike) -> NDArray[np.float64]:
    pt = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if pt.ndim != 1 or pt.size == 0:
        raise ValueError("thresholds must be a non-empty 1-D sequence")
    if np.any(~np.isfinite(pt) | (pt <= 0.0) | (pt >= 1.0)):
        raise ValueError("threshold probabilities must lie strictly between 0 and 1")
    return pt


def net_benefit(y_true: ArrayLike, y_prob: ArrayLike, thresholds: ArrayLike) -> NDArray[np.float64]:
    """Net benefit of treating the cases whose risk is >= pt, at each threshold pt."""
    y = binary_outcome(y_true, both_classes=False)
    p = probability_vector(y_prob, y.size)
    pt = _threshold_array(thresholds)
    treated = p[None, :] >= pt[:, None]
    tp = np.sum(treated & (y[None, :] == 1), axis=1)
    fp = np.sum(treated & (y[None, :] == 0), axis=1)
    return np.asarray(tp / y.size - fp / y.size * pt / (1.0 - pt))


def decision_curve(
    y_true: ArrayLike, y_prob: ArrayLike, thresholds: ArrayLike = DEFAULT_THRESHOLDS
) -> DecisionCurve:
    """Net benefit of the model, treat-all and treat-none over ``thresholds``."""
    y = binary_outcome(y_true, both_classes=False)
    pt = _threshold_array(thresholds)
    prevalence = float(np.mean(y))
    return DecisionCurve(
        thresholds=pt,
        model=net_benefit(y, y_prob, pt),
        treat_all=np.asarray(prevalence - (1.0 - prevalence) * pt / (1.0 - pt)),
        treat_none=np.zeros_like(pt),
    )
