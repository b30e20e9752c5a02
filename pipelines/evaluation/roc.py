"""The area under the ROC curve and the interval type that both CI methods return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from pipelines.evaluation.inputs import binary_outcome, score_vector

CiMethod = Literal["delong", "bootstrap"]


@dataclass(frozen=True)
class AucInterval:
    """An AUC with its standard error and two-sided confidence interval."""

    auc: float
    se: float
    low: float
    high: float
    level: float  # e.g. 0.95
    method: CiMethod

    def format(self, digits: int = 3) -> str:
        """The study tables' form, e.g. ``0.926 (0.880-0.972)``."""
        return f"{self.auc:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn); ties between scores count one half."""
    y = binary_outcome(y_true)
    s = score_vector(y_score, y.size)
    return float(roc_auc_score(y, s))


def midrank_auc(
    positives: NDArray[np.float64], negatives: NDArray[np.float64]
) -> NDArray[np.float64]:
    """AUC of each row of paired score matrices by the Mann-Whitney rank-sum identity.

    ``positives`` is (k, m), ``negatives`` (k, n); row i of both belongs to one score
    (or one bootstrap replicate). AUC = (sum of the positives' midranks - m(m+1)/2) / (mn).
    """
    m = positives.shape[-1]
    n = negatives.shape[-1]
    ranks = rankdata(np.concatenate([positives, negatives], axis=-1), axis=-1)
    return np.asarray((ranks[..., :m].sum(axis=-1) - m * (m + 1) / 2.0) / (m * n))
