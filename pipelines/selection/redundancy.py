"""Greedy removal of redundant (highly correlated) features.

Jiang et al. (2025) drop one feature of every pair with Spearman |r| > 0.9 (radiomics)
and use Pearson in the per-source and combined models. The rule for which member of a
pair goes is not published; the one used here is documented on :class:`CorrelationFilter`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from pipelines.selection._checks import check_choice

CorrelationMethod = Literal["spearman", "pearson"]


def abs_correlation(
    X: NDArray[np.float64], method: CorrelationMethod, y: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """|r| between the columns of ``X`` (and, when ``y`` is given, its last row/column y).

    Spearman is Pearson on column ranks (average ranks for ties). Undefined correlations
    (a constant column) are 0: a constant is not redundant with anything.
    """
    data = X if y is None else np.column_stack([X, y])
    if method == "spearman":
        data = stats.rankdata(data, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.corrcoef(data, rowvar=False)
    r = np.atleast_2d(np.nan_to_num(np.abs(r), nan=0.0))
    np.fill_diagonal(r, 1.0)
    return np.asarray(r, dtype=np.float64)


class CorrelationFilter(SelectorMixin, BaseEstimator):
    """Greedy redundancy removal: no two kept features have |r| > ``threshold``.

    Rule: while some pair of remaining features has |r| > threshold, take the pair with
    the largest |r| (ties: the earliest pair in column order) and drop one member:

    - ``drop="mean_correlation"`` (default, caret's ``findCorrelation`` rule): the member
      with the higher mean |r| to the other remaining features, i.e. the more redundant
      one, recomputed after every drop;
    - ``drop="relevance"``: the member less correlated with ``y`` (same ``method``), i.e.
      the less informative one.

    An exact tie drops the later column.

    Parameters
    ----------
    threshold : float, default 0.9
        Pairs with |r| strictly above it are redundant.
    method : {"spearman", "pearson"}, default "spearman"
    drop : {"mean_correlation", "relevance"}, default "mean_correlation"

    Attributes
    ----------
    correlation_ : ndarray of shape (n_features, n_features)
        |r| between the input features.
    dropped_ : list of int
        Indices of the dropped features, in the order they were dropped.
    """

    def __init__(
        self,
        threshold: float = 0.9,
        *,
        method: CorrelationMethod = "spearman",
        drop: Literal["mean_correlation", "relevance"] = "mean_correlation",
    ) -> None:
        self.threshold = threshold
        self.method = method
        self.drop = drop

    def fit(self, X: ArrayLike, y: ArrayLike | None = None) -> CorrelationFilter:
        """Drop features greedily until no remaining pair has |r| > threshold."""
        check_choice(self.method, "method", ("spearman", "pearson"))
        check_choice(self.drop, "drop", ("mean_correlation", "relevance"))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, not {self.threshold!r}")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be in [0, 1), not {self.threshold}")
        if self.drop == "relevance":
            if y is None:
                raise ValueError('drop="relevance" needs y to rank the members of a pair')
            X_, y_ = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
            full = abs_correlation(X_, self.method, np.asarray(y_, dtype=np.float64))
            self.correlation_ = full[:-1, :-1]
            relevance = full[:-1, -1]
        else:
            X_ = validate_data(self, X, dtype=np.float64)
            self.correlation_ = abs_correlation(X_, self.method)
            relevance = np.zeros(X_.shape[1])
        self.dropped_ = self._greedy(self.correlation_, relevance)
        return self

    def _greedy(self, r: NDArray[np.float64], relevance: NDArray[np.float64]) -> list[int]:
        """Indices dropped by the documented rule, in order."""
        keep = np.ones(r.shape[0], dtype=bool)
        dropped: list[int] = []
        off = r.copy()
        np.fill_diagonal(off, 0.0)
        while True:
            live = off * np.outer(keep, keep)
            worst = float(live.max(initial=0.0))
            if worst <= self.threshold:
                return dropped
            i, j = (int(v) for v in np.argwhere(live == worst)[0])
            if self.drop == "relevance":
                victim = i if relevance[i] < relevance[j] else j
            else:
                # Same denominator (the other remaining features) for both: compare sums.
                victim = i if off[i, keep].sum() > off[j, keep].sum() else j
            keep[victim] = False
            dropped.append(victim)

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "dropped_")
        mask = np.ones(self.n_features_in_, dtype=bool)
        mask[self.dropped_] = False
        return mask
