"""Classification at a cut-off: confusion matrix, sensitivity, specificity, PPV, NPV.

A case is called positive when its score is at or above the cut-off (``score >= cutoff``),
the convention of scikit-learn's ``roc_curve``. The Youden cut-off maximises
J = sensitivity + specificity - 1 over the observed scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import confusion_matrix

from pipelines.evaluation.inputs import binary_outcome, score_vector


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of a binary classification (positive = event predicted)."""

    tp: int
    fp: int
    tn: int
    fn: int

    def as_array(self) -> NDArray[np.int64]:
        """scikit-learn's layout: rows true 0/1, columns predicted 0/1, ``[[tn, fp], [fn, tp]]``."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Diagnostic accuracy at one cut-off. A ratio with a zero denominator is NaN."""

    cutoff: float
    confusion: ConfusionMatrix
    sensitivity: float
    specificity: float
    accuracy: float
    ppv: float
    npv: float

    @property
    def youden_index(self) -> float:
        """J = sensitivity + specificity - 1."""
        return self.sensitivity + self.specificity - 1.0


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def metrics_at_cutoff(
    y_true: ArrayLike, y_score: ArrayLike, cutoff: float
) -> ClassificationMetrics:
    """Confusion matrix and accuracy measures calling ``score >= cutoff`` positive.

    Use it with a model's stored cut-off (e.g. a Rad-score cut-off fixed on training data)
    to evaluate validation or test cases.
    """
    y = binary_outcome(y_true, both_classes=False)
    s = score_vector(y_score, y.size)
    if math.isnan(cutoff):
        raise ValueError("cutoff is NaN")
    predicted = (s >= cutoff).astype(np.int64)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    return ClassificationMetrics(
        cutoff=float(cutoff),
        confusion=ConfusionMatrix(tp=tp, fp=fp, tn=tn, fn=fn),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        accuracy=(tp + tn) / y.size,
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
    )


def youden_cutoff(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The observed score that maximises Youden's J when used as ``score >= cutoff``.

    J is compared exactly, as the integer tp * n - fp * m (m events, n non-events), and
    ties go to the highest such cut-off (the more specific rule). The returned value is a
    score of the data; pROC reports the midpoint between it and the next lower score,
    which classifies the same cases.
    """
    y = binary_outcome(y_true)
    s = score_vector(y_score, y.size)
    positives = np.sort(s[y == 1])
    negatives = np.sort(s[y == 0])
    m, n = positives.size, negatives.size
    candidates = np.unique(s)[::-1]
    tp = m - np.searchsorted(positives, candidates, side="left")
    fp = n - np.searchsorted(negatives, candidates, side="left")
    j = tp.astype(np.int64) * n - fp.astype(np.int64) * m
    return float(candidates[int(np.argmax(j))])


def metrics_at_youden(y_true: ArrayLike, y_score: ArrayLike) -> ClassificationMetrics:
    """Confusion matrix and accuracy measures at the Youden cut-off of these cases."""
    return metrics_at_cutoff(y_true, y_score, youden_cutoff(y_true, y_score))
