"""Sequential forward selection by cross-validated score.

Lu et al. (2024) select among concatenated radiomics and CNN features by sequential
forward selection before an SVM. The criterion here is the mean score of ``estimator``
over seeded stratified folds, the same criterion as scikit-learn's
``SequentialFeatureSelector(direction="forward")``, whose selection it reproduces; this
class also records the order of the additions and the score after each.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, clone
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data


class ForwardSelector(SelectorMixin, BaseEstimator):
    """Add features one at a time, each time the one that most raises the CV score.

    Starting from no feature, every step scores each remaining feature added to the
    selected set by the mean of ``cross_val_score(estimator, X[:, set], y, cv, scoring)``
    and adds the best (ties: the earlier column). It stops at ``n_features_to_select``,
    or, when ``tol`` is set, as soon as the best addition raises the score by less than
    ``tol`` (the first feature is always added).

    Parameters
    ----------
    estimator : classifier or None, default None
        Model scored on each candidate set; None means
        ``LogisticRegression(max_iter=1000)``. The hybrid haematoma study uses an SVM.
    n_features_to_select : "auto", int or float, default "auto"
        An int is a number of features, a float in (0, 1) a fraction of them. "auto"
        selects half of the features when ``tol`` is None, otherwise runs until the gain
        falls below ``tol`` (scikit-learn's convention).
    tol : float or None, default None
        Smallest gain in score that justifies another feature.
    scoring : str, default "roc_auc"
        A scikit-learn scorer name.
    cv : int or CV splitter, default 5
        An int gives ``StratifiedKFold(cv, shuffle=True, random_state)``.
    random_state : int, default 0
    n_jobs : int or None, default None
        Parallel folds in ``cross_val_score``.

    Attributes
    ----------
    order_ : list of int
        Selected column indices in the order they were added.
    scores_ : list of float
        Mean CV score after each addition.
    """

    def __init__(
        self,
        estimator: Any = None,
        *,
        n_features_to_select: Literal["auto"] | int | float = "auto",
        tol: float | None = None,
        scoring: str = "roc_auc",
        cv: int | Any = 5,
        random_state: int = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.estimator = estimator
        self.n_features_to_select = n_features_to_select
        self.tol = tol
        self.scoring = scoring
        self.cv = cv
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _target_count(self, n_features: int) -> int:
        """Number of features to select before any ``tol`` stop."""
        n = self.n_features_to_select
        if n == "auto":
            return n_features if self.tol is not None else max(1, n_features // 2)
        if isinstance(n, bool) or not isinstance(n, (int, float, np.integer)):
            raise ValueError(f'n_features_to_select must be "auto", an int or a float, not {n!r}')
        if isinstance(n, float):
            if not 0.0 < n < 1.0:
                raise ValueError(f"a fractional n_features_to_select must be in (0, 1), not {n}")
            return max(1, round(n * n_features))
        if not 1 <= n <= n_features:
            raise ValueError(f"n_features_to_select must be in [1, {n_features}], not {n}")
        return int(n)

    def __sklearn_tags__(self) -> Tags:
        """Declare that ``fit`` needs ``y``."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: ArrayLike, y: ArrayLike) -> ForwardSelector:
        """Run the forward search on ``X``, ``y``."""
        X_, y_ = validate_data(self, X, y, dtype=np.float64)
        target = self._target_count(X_.shape[1])
        if self.tol is not None and not isinstance(self.tol, (int, float)):
            raise ValueError(f"tol must be a number or None, not {self.tol!r}")
        folds = self.cv
        if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
            folds = StratifiedKFold(int(folds), shuffle=True, random_state=self.random_state)
        model = LogisticRegression(max_iter=1000) if self.estimator is None else self.estimator
        self.order_: list[int] = []
        self.scores_: list[float] = []
        while len(self.order_) < target:
            candidates = [j for j in range(X_.shape[1]) if j not in self.order_]
            means = [
                float(
                    cross_val_score(
                        clone(model),
                        X_[:, [*self.order_, j]],
                        y_,
                        cv=folds,
                        scoring=self.scoring,
                        n_jobs=self.n_jobs,
                    ).mean()
                )
                for j in candidates
            ]
            best = int(np.argmax(means))
            if self.tol is not None and self.order_ and means[best] - self.scores_[-1] < self.tol:
                break
            self.order_.append(candidates[best])
            self.scores_.append(means[best])
        return self

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "order_")
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.order_] = True
        return mask
