"""LASSO (L1 logistic regression) with the penalty chosen by k-fold cross-validation.

All three radiomics studies finish selection with a LASSO whose lambda minimises the
cross-validated error (Jiang et al.: 10-fold, 5-fold in the combined model; IPH vs
contrast: 10-fold; Pei et al.: 5-fold, minimum binomial deviance), keep the features
with nonzero coefficients and report a Rad-score = intercept + sum(coef x feature).
scikit-learn parametrises the penalty as C = 1 / (n_samples x lambda); the C with the
best mean cross-validated score is the lambda at minimum error. Features must be
z-scored first (``StandardScaler``), since the L1 penalty is not scale-invariant.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.utils import Tags
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from pipelines.selection._checks import binary_target, check_choice, check_positive_int


def rad_score(X: ArrayLike, coef: ArrayLike, intercept: float) -> NDArray[np.float64]:
    """Rad-score of each row: ``intercept + X @ coef`` (the log-odds of the LASSO model).

    ``X`` holds the features the coefficients refer to, in the same order and with the
    same standardisation as when they were fitted; e.g. the IPH-vs-contrast study's
    published formula is ``rad_score(X9, coefs, -0.487)``.
    """
    X_ = check_array(X, dtype=np.float64)
    c = np.asarray(coef, dtype=np.float64).ravel()
    if X_.shape[1] != c.size:
        raise ValueError(f"X has {X_.shape[1]} features but there are {c.size} coefficients")
    return np.asarray(float(intercept) + X_ @ c, dtype=np.float64)


class LassoSelector(SelectorMixin, BaseEstimator):
    """Keep the features with a nonzero coefficient in a cross-validated L1 logistic model.

    Fits ``LogisticRegressionCV`` with a pure L1 penalty (``l1_ratios=(1.0,)``) over a
    grid of C, on seeded, shuffled stratified folds, refits at the best C on all rows.

    Parameters
    ----------
    cv : int or CV splitter, default 10
        Folds: an int gives ``StratifiedKFold(cv, shuffle=True, random_state)``.
    Cs : int or array-like, default 20
        Grid of C (an int gives that many values log-spaced in [1e-4, 1e4]).
    scoring : str, default "neg_log_loss"
        Cross-validated criterion to maximise; "neg_log_loss" is the minimum binomial
        deviance (glmnet's default for a binary outcome); "roc_auc" or "accuracy" are the
        alternatives some studies use.
    solver : {"liblinear", "saga"}, default "liblinear"
        liblinear suits small cohorts but penalises the intercept slightly; saga does not.
    max_iter : int, default 1000
    tol : float, default 1e-4
    class_weight : dict, "balanced" or None, default None
    random_state : int, default 0
        Seeds the folds and the solver.

    Attributes
    ----------
    estimator_ : LogisticRegressionCV
        The fitted model.
    coef_ : ndarray of shape (n_features,)
        Coefficients at the chosen C (zero for dropped features), on the input scale.
    intercept_ : float
    C_ : float
        The chosen inverse penalty.
    n_iter_ : int
        The most solver iterations any fold and C needed (compare with ``max_iter``).
    classes_ : ndarray of shape (2,)
        The coefficients are the log-odds of ``classes_[1]``.
    """

    def __init__(
        self,
        *,
        cv: int | Any = 10,
        Cs: int | ArrayLike = 20,
        scoring: str = "neg_log_loss",
        solver: Literal["liblinear", "saga"] = "liblinear",
        max_iter: int = 1000,
        tol: float = 1e-4,
        class_weight: dict[Any, float] | str | None = None,
        random_state: int = 0,
    ) -> None:
        self.cv = cv
        self.Cs = Cs
        self.scoring = scoring
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state

    def __sklearn_tags__(self) -> Tags:
        """Declare that ``fit`` needs ``y``."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: ArrayLike, y: ArrayLike) -> LassoSelector:
        """Cross-validate the penalty, refit on all rows, keep the nonzero coefficients."""
        X_, y_ = validate_data(self, X, y, dtype=np.float64)
        check_choice(self.solver, "solver", ("liblinear", "saga"))
        check_positive_int(self.max_iter, "max_iter")
        _, self.classes_ = binary_target(y_, "LassoSelector")
        folds = self.cv
        if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
            if folds < 2:
                raise ValueError(f"cv must be >= 2 folds, not {folds}")
            folds = StratifiedKFold(int(folds), shuffle=True, random_state=self.random_state)
        self.estimator_ = LogisticRegressionCV(
            Cs=self.Cs,
            cv=folds,
            l1_ratios=(1.0,),
            solver=self.solver,
            scoring=self.scoring,
            max_iter=self.max_iter,
            tol=self.tol,
            class_weight=self.class_weight,
            random_state=self.random_state,
            use_legacy_attributes=False,
        ).fit(X_, y_)
        self.coef_ = np.asarray(self.estimator_.coef_, dtype=np.float64).ravel()
        self.intercept_ = float(np.ravel(self.estimator_.intercept_)[0])
        self.C_ = float(np.ravel(self.estimator_.C_)[0])
        self.n_iter_ = int(np.max(self.estimator_.n_iter_))
        return self

    def rad_score(self, X: ArrayLike) -> NDArray[np.float64]:
        """Rad-score ``intercept_ + sum(coef_ x feature)`` of ``X`` (the input features)."""
        check_is_fitted(self, "coef_")
        X_ = validate_data(self, X, dtype=np.float64, reset=False)
        return rad_score(X_, self.coef_, self.intercept_)

    def _get_support_mask(self) -> NDArray[np.bool_]:
        check_is_fitted(self, "coef_")
        return np.asarray(self.coef_ != 0.0, dtype=bool)
