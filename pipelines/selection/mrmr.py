"""Minimum-redundancy maximum-relevance (mRMR) selection of the top k features.

The IPH-vs-contrast study keeps the top 10 mRMR features of the reproducible radiomics
before its LASSO. The variant is not published; the one here follows Ding & Peng
(2005), whose schemes for continuous features are FCQ (F-statistic relevance divided
by mean |correlation| redundancy, the default: scale-free and deterministic) and FCD (F
minus mean |r|); mutual-information relevance (MID/MIQ-like) is also available.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin, f_classif, mutual_info_classif
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data

from pipelines.selection._checks import check_choice, check_positive_int
from pipelines.selection.redundancy import CorrelationMethod, abs_correlation

REDUNDANCY_FLOOR = 1e-6
"""Smallest redundancy a quotient divides by, so an uncorrelated feature scores finitely."""


class MRMRSelector(SelectorMixin, BaseEstimator):
    """Greedy mRMR: select ``k`` features, each maximising relevance against redundancy.

    The first feature is the most relevant. Each next one maximises, over the features
    not yet selected, ``relevance(f) / max(mean_s |r(f, s)|, REDUNDANCY_FLOOR)``
    (``scheme="quotient"``) or ``relevance(f) - mean_s |r(f, s)|`` (``"difference"``),
    the mean running over the already selected features s. Ties go to the earlier column.

    Parameters
    ----------
    k : int, default 10
        Number of features to select (10 in the IPH-vs-contrast study); all are kept when
        fewer than k reach the selector.
    relevance : {"f", "mutual_info"}, default "f"
        ANOVA F statistic (``f_classif``) or ``mutual_info_classif`` (k-NN estimator,
        nats; with ``"difference"`` it is subtracted from a correlation, so mind scales).
    redundancy : {"pearson", "spearman"}, default "pearson"
        Correlation used for redundancy.
    scheme : {"quotient", "difference"}, default "quotient"
    n_neighbors : int, default 3
        Neighbours of the mutual-information estimator.
    random_state : int, default 0
        Seed of the mutual-information estimator's jitter.

    Attributes
    ----------
    relevance_ : ndarray of shape (n_features,)
    ranking_ : list of int
        Selected column indices in the order they were selected.
    scores_ : list of float
        The criterion value of each selected feature when it was selected (for the first,
        its relevance).
    """

    def __init__(
        self,
        k: int = 10,
        *,
        relevance: Literal["f", "mutual_info"] = "f",
        redundancy: CorrelationMethod = "pearson",
        scheme: Literal["quotient", "difference"] = "quotient",
        n_neighbors: int = 3,
        random_state: int = 0,
    ) -> None:
        self.k = k
        self.relevance = relevance
        self.redundancy = redundancy
        self.scheme = scheme
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def __sklearn_tags__(self) -> Tags:
        """Declare that ``fit`` needs ``y``."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: ArrayLike, y: ArrayLike) -> MRMRSelector:
        """Rank features by the greedy mRMR criterion and keep the first ``k``."""
        X_, y_ = validate_data(self, X, y, dtype=np.float64)
        check_positive_int(self.k, "k")
        check_positive_int(self.n_neighbors, "n_neighbors")
        check_choice(self.relevance, "relevance", ("f", "mutual_info"))
        check_choice(self.redundancy, "redundancy", ("pearson", "spearman"))
        check_choice(self.scheme, "scheme", ("quotient", "difference"))
        if np.unique(y_).size < 2:
            raise ValueError("MRMRSelector needs at least 2 outcome classes in y, got one class")
        if self.relevance == "f":
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = f_classif(X_, y_)[0]
        else:
            rel = mutual_info_classif(
                X_, y_, n_neighbors=self.n_neighbors, random_state=self.random_state
            )
        self.relevance_ = np.nan_to_num(np.asarray(rel, dtype=np.float64), nan=0.0)
        r = abs_correlation(X_, self.redundancy)
        first = int(np.argmax(self.relevance_))
        self.ranking_ = [first]
        self.scores_ = [float(self.relevance_[first])]
        remaining = np.ones(X_.shape[1], dtype=bool)
        remaining[first] = False
        for _ in range(min(self.k, X_.shape[1]) - 1):
            candidates = np.flatnonzero(remaining)
            red = r[np.ix_(candidates, np.asarray(self.ranking_))].mean(axis=1)
            rel_c = self.relevance_[candidates]
            if self.scheme == "quotient":
                score = rel_c / np.maximum(red, REDUNDANCY_FLOOR)
            else:
                score = rel_c - red
            best = int(np.argmax(score))
            self.ranking_.append(int(candidates[best]))
            self.scores_.append(float(score[best]))
            remaining[candidates[best]] = False
        return self

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "ranking_")
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.ranking_] = True
        return mask
