"""Univariate filters against a binary outcome: Mann-Whitney U and ANOVA F.

Jiang et al. (2025) keep radiomic features with a Mann-Whitney U p < 0.05 before the
correlation and LASSO steps, and run an ANOVA F filter first in the per-source and
combined models. P-values are per feature, uncorrected for multiple testing, as in the
study.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin, f_classif
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data

from pipelines.selection._checks import (
    binary_target,
    check_choice,
    check_open_unit,
    check_positive_int,
)


class MannWhitneyFilter(SelectorMixin, BaseEstimator):
    """Keep the features whose two-sample Mann-Whitney U test has p < ``alpha``.

    The test compares the feature's values in the two outcome classes
    (``scipy.stats.mannwhitneyu``, first class = the lower label, so ``statistic_`` is U
    of the negatives for 0/1 labels).

    Parameters
    ----------
    alpha : float, default 0.05
        Significance level; features with p < alpha are kept.
    alternative : {"two-sided", "less", "greater"}, default "two-sided"
    method : {"auto", "asymptotic", "exact"}, default "auto"
        Passed to scipy: exact p-values for small samples without ties, else the normal
        approximation with tie correction.
    use_continuity : bool, default True
        Continuity correction of the normal approximation (scipy's default).

    Attributes
    ----------
    statistic_, pvalues_ : ndarray of shape (n_features,)
        U statistic and p-value per feature; a feature constant in both classes has an
        undefined p-value, stored as 1.0 (never kept).
    classes_ : ndarray of shape (2,)
    """

    def __init__(
        self,
        alpha: float = 0.05,
        *,
        alternative: Literal["two-sided", "less", "greater"] = "two-sided",
        method: Literal["auto", "asymptotic", "exact"] = "auto",
        use_continuity: bool = True,
    ) -> None:
        self.alpha = alpha
        self.alternative = alternative
        self.method = method
        self.use_continuity = use_continuity

    def __sklearn_tags__(self) -> Tags:
        """Declare that ``fit`` needs ``y``."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: ArrayLike, y: ArrayLike) -> MannWhitneyFilter:
        """Test every feature between the two classes of ``y``."""
        X_, y_ = validate_data(self, X, y, dtype=np.float64)
        check_open_unit(self.alpha, "alpha")
        check_choice(self.alternative, "alternative", ("two-sided", "less", "greater"))
        check_choice(self.method, "method", ("auto", "asymptotic", "exact"))
        positive, self.classes_ = binary_target(y_, "MannWhitneyFilter")
        result = stats.mannwhitneyu(
            X_[~positive],
            X_[positive],
            alternative=self.alternative,
            method=self.method,
            use_continuity=self.use_continuity,
            axis=0,
        )
        self.statistic_ = np.asarray(result.statistic, dtype=np.float64)
        self.pvalues_ = np.nan_to_num(np.asarray(result.pvalue, dtype=np.float64), nan=1.0)
        return self

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "pvalues_")
        return np.asarray(self.pvalues_ < self.alpha, dtype=bool)


class AnovaFilter(SelectorMixin, BaseEstimator):
    """Keep features by the one-way ANOVA F test of the feature across outcome classes.

    With two classes this is the two-sample t test (F = t^2). Computed by
    ``sklearn.feature_selection.f_classif``.

    Parameters
    ----------
    alpha : float or None, default 0.05
        Keep features with p < alpha; None disables the p-value rule.
    k : int or None, default None
        Keep at most the k features with the largest F among those passing ``alpha``
        (ties: the earlier column). None disables the cap. At least one of ``alpha`` and
        ``k`` must be set; ``AnovaFilter(alpha=None, k=20)`` is plain top-k.

    Attributes
    ----------
    scores_, pvalues_ : ndarray of shape (n_features,)
        F statistic and p-value; constant features get F = 0 and p = 1.
    classes_ : ndarray of the outcome classes
    """

    def __init__(self, alpha: float | None = 0.05, *, k: int | None = None) -> None:
        self.alpha = alpha
        self.k = k

    def __sklearn_tags__(self) -> Tags:
        """Declare that ``fit`` needs ``y``."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: ArrayLike, y: ArrayLike) -> AnovaFilter:
        """Compute F and p of every feature against the classes of ``y``."""
        X_, y_ = validate_data(self, X, y, dtype=np.float64)
        if self.alpha is None and self.k is None:
            raise ValueError("set alpha, k or both; with neither every feature would be kept")
        if self.alpha is not None:
            check_open_unit(self.alpha, "alpha")
        if self.k is not None:
            check_positive_int(self.k, "k")
        self.classes_ = np.unique(y_)
        if self.classes_.size < 2:
            raise ValueError("AnovaFilter needs at least 2 outcome classes in y, got one class")
        with np.errstate(divide="ignore", invalid="ignore"):
            f, p = f_classif(X_, y_)
        self.scores_ = np.nan_to_num(np.asarray(f, dtype=np.float64), nan=0.0)
        self.pvalues_ = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)
        return self

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "pvalues_")
        mask = np.ones(self.pvalues_.shape, dtype=bool)
        if self.alpha is not None:
            mask &= self.pvalues_ < self.alpha
        if self.k is not None and mask.sum() > self.k:
            candidates = np.flatnonzero(mask)
            order = np.argsort(-self.scores_[candidates], kind="stable")
            mask[:] = False
            mask[candidates[order[: self.k]]] = True
        return mask
