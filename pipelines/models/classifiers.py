"""The studies' classifiers as seeded scikit-learn pipelines: z-score, selection, model.

Five classifiers are named (:data:`CLASSIFIERS`): KNN (Jiang et al. 2025), logistic
regression (the IPH-vs-contrast Rad-score, Pei et al.'s and Lee et al.'s fusion models),
SVM with probabilities (Lu et al. 2024), random forest and gradient boosting (compared in
Jiang et al.). :func:`classifier_pipeline` appends one to a selection chain of
:mod:`pipelines.selection.recipes` (named in :data:`SELECTION_CHAINS`), z-scoring first
when the chain does not. Every random step is seeded from one ``random_state``.

For logistic regression, :func:`linear_predictor_terms` expresses the fitted model on the
input features (undoing the z-scores and feature selection), :func:`rad_score` is the
linear predictor, and :func:`nomogram` / :class:`Nomogram` turn it into points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_array, check_is_fitted

from pipelines.selection import recipes

ClassifierName = Literal["knn", "logistic", "svm", "random_forest", "gradient_boosting"]
CLASSIFIERS: tuple[ClassifierName, ...] = (
    "knn",
    "logistic",
    "svm",
    "random_forest",
    "gradient_boosting",
)
CLASSIFIER_STEP = "clf"


def _zscore(random_state: int) -> Pipeline:
    """z-score only (no selection)."""
    return Pipeline([("zscore", StandardScaler())])


def _zscore_pca(random_state: int) -> Pipeline:
    """z-score, then PCA keeping 95% of the variance (Jiang et al.'s CNN-block reduction)."""
    return Pipeline(
        [
            ("zscore", StandardScaler()),
            ("pca", PCA(n_components=0.95, random_state=random_state)),
        ]
    )


def _ich_expansion_hybrid(random_state: int) -> Pipeline:
    """Lu et al. 2024 forward selection scored by an SVM's cross-validated AUC."""
    return recipes.ich_expansion_hybrid(random_state=random_state)


SELECTION_CHAINS: Mapping[str, Callable[[int], Pipeline]] = {
    "zscore": _zscore,
    "pca": _zscore_pca,
    "ht_radiomics": lambda seed: recipes.ht_radiomics(random_state=seed),
    "ht_single_source": lambda seed: recipes.ht_single_source(random_state=seed),
    "iph_vs_contrast": lambda seed: recipes.iph_vs_contrast(random_state=seed),
    "ais_prognosis_mri": lambda seed: recipes.ais_prognosis_mri(random_state=seed),
    "ich_expansion_hybrid": _ich_expansion_hybrid,
}
"""Selection chains by name, each a function of the seed returning an unfitted pipeline.

Chains that need data beyond the training rows (the ICC filter's readers) are built with
:mod:`pipelines.selection.recipes` directly and passed to :func:`classifier_pipeline`.
"""


def selection_chain(name: str, random_state: int = 0) -> Pipeline:
    """The unfitted selection chain ``name`` of :data:`SELECTION_CHAINS`, seeded."""
    try:
        factory = SELECTION_CHAINS[name]
    except KeyError:
        raise ValueError(
            f"unknown selection chain {name!r}; known: {', '.join(sorted(SELECTION_CHAINS))}"
        ) from None
    return factory(random_state)


def make_classifier(
    name: ClassifierName, random_state: int = 0, params: Mapping[str, Any] | None = None
) -> BaseEstimator:
    """An unfitted, seeded classifier with ``predict_proba``; ``params`` override defaults.

    Defaults: KNN with 5 equally weighted neighbours (deterministic: no seed needed;
    distance weights would make every training risk 0 or 1 and a training cut-off useless);
    logistic regression with an L2 penalty, C = 1; SVM with an RBF kernel and Platt
    probabilities (``CalibratedClassifierCV``, sigmoid, 5-fold, one SVM refit on all rows:
    scikit-learn's replacement of ``SVC(probability=True)``; ``params`` go to the SVC);
    random forest of 500 trees; gradient boosting of 100 depth-3 trees.
    """
    extra = dict(params or {})
    if name == "knn":
        return KNeighborsClassifier(**{"n_neighbors": 5, **extra})
    if name == "logistic":
        return LogisticRegression(**{"max_iter": 1000, "random_state": random_state, **extra})
    if name == "svm":
        svm = SVC(**{"random_state": random_state, **extra})
        return CalibratedClassifierCV(svm, method="sigmoid", cv=5, ensemble=False)
    if name == "random_forest":
        return RandomForestClassifier(
            **{"n_estimators": 500, "random_state": random_state, "n_jobs": 1, **extra}
        )
    if name == "gradient_boosting":
        return GradientBoostingClassifier(**{"random_state": random_state, **extra})
    raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")


def _has_zscore(steps: Sequence[tuple[str, Any]]) -> bool:
    return any(isinstance(step, StandardScaler) for _, step in steps)


def classifier_pipeline(
    name: ClassifierName,
    selection: str | Pipeline | None = "ht_single_source",
    random_state: int = 0,
    params: Mapping[str, Any] | None = None,
) -> Pipeline:
    """An unfitted ``Pipeline``: the selection chain's steps, then the classifier ``clf``.

    ``selection`` names a chain of :data:`SELECTION_CHAINS`, or is an unfitted pipeline
    (e.g. a recipe with an ICC filter), or None for z-scoring alone. A chain without a
    top-level ``StandardScaler`` gets one in front.
    """
    if selection is None:
        chain = _zscore(random_state)
    elif isinstance(selection, str):
        chain = selection_chain(selection, random_state)
    else:
        chain = selection
    steps = list(chain.steps)
    if CLASSIFIER_STEP in dict(steps):
        raise ValueError(f"the selection chain already has a step named {CLASSIFIER_STEP!r}")
    if not _has_zscore(steps):
        steps = [("zscore", StandardScaler()), *steps]
    return Pipeline([*steps, (CLASSIFIER_STEP, make_classifier(name, random_state, params))])


@dataclass(frozen=True)
class LinearTerms:
    """A logistic model on its input features: ``log-odds = intercept + X @ coef``."""

    feature_names: tuple[str, ...]
    coef: NDArray[np.float64]
    intercept: float
    columns: NDArray[np.int64]
    """Index of each term's feature among the pipeline's input columns."""


def linear_predictor_terms(
    pipeline: Pipeline, feature_names: Sequence[str] | None = None
) -> LinearTerms:
    """The fitted logistic pipeline's coefficients on the raw input features.

    The steps before ``clf`` may only be ``StandardScaler`` and feature selectors
    (``SelectorMixin``): both are undone exactly, so the Rad-score and a nomogram can be
    read in the variables' own units. A PCA or any other transform raises ``ValueError``.
    """
    model = pipeline[-1]
    if not isinstance(model, LogisticRegression):
        raise ValueError(f"the last step is {type(model).__name__}, not a LogisticRegression")
    check_is_fitted(model, "coef_")
    if model.coef_.shape[0] != 1:
        raise ValueError("only a binary logistic model has one linear predictor")
    n_in = int(pipeline[0].n_features_in_)
    names = (
        [f"x{i}" for i in range(n_in)] if feature_names is None else [str(n) for n in feature_names]
    )
    if len(names) != n_in:
        raise ValueError(f"{len(names)} feature names for {n_in} input features")
    columns = np.arange(n_in)
    shift = np.zeros(n_in)
    scale = np.ones(n_in)
    for step_name, step in pipeline.steps[:-1]:
        if isinstance(step, StandardScaler):
            mean = np.zeros(columns.size) if step.mean_ is None else step.mean_
            sd = np.ones(columns.size) if step.scale_ is None else step.scale_
            shift = shift + scale * mean
            scale = scale * sd
        elif isinstance(step, SelectorMixin):
            mask = step.get_support()
            columns, shift, scale = columns[mask], shift[mask], scale[mask]
        else:
            raise ValueError(
                f"step {step_name!r} ({type(step).__name__}) is neither a z-score nor a "
                "feature selector, so the model has no terms on the input features"
            )
    beta = np.asarray(model.coef_, dtype=np.float64).ravel()
    coef = beta / scale
    intercept = float(model.intercept_[0] - np.sum(beta * shift / scale))
    return LinearTerms(
        feature_names=tuple(names[i] for i in columns),
        coef=coef,
        intercept=intercept,
        columns=columns.astype(np.int64),
    )


def rad_score(terms: LinearTerms, X: ArrayLike) -> NDArray[np.float64]:
    """The Rad-score (linear predictor, log-odds) of each row of the pipeline's input ``X``.

    Equals ``pipeline.decision_function(X)`` for the pipeline the terms came from.
    """
    X_ = check_array(X, dtype=np.float64)
    return np.asarray(terms.intercept + X_[:, terms.columns] @ terms.coef, dtype=np.float64)


@dataclass(frozen=True)
class Nomogram:
    """Points of a logistic model, as on a printed nomogram (Harrell's ``rms::nomogram``).

    Each variable's contribution ``coef x value`` is shifted to 0 at the low end of its
    range and scaled so that the variable with the widest contribution spans 0-100 points.
    ``total points -> probability`` is then exact: ``log-odds = offset + total /
    points_per_logit``. Values outside ``[low, high]`` give points outside the axis, and
    the mapping still holds.
    """

    feature_names: tuple[str, ...]
    coef: NDArray[np.float64]
    intercept: float
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    points_per_logit: float
    offset: float
    """Log-odds at 0 total points: intercept plus every variable's lowest contribution."""

    def points(self, X: ArrayLike) -> NDArray[np.float64]:
        """Points of every variable (columns in ``feature_names`` order) for each row."""
        X_ = check_array(X, dtype=np.float64)
        if X_.shape[1] != self.coef.size:
            raise ValueError(f"X has {X_.shape[1]} columns, the nomogram {self.coef.size}")
        floor = np.minimum(self.coef * self.low, self.coef * self.high)
        return np.asarray((X_ * self.coef - floor) * self.points_per_logit, dtype=np.float64)

    def total_points(self, X: ArrayLike) -> NDArray[np.float64]:
        """The sum of the variables' points of each row."""
        return np.asarray(self.points(X).sum(axis=1), dtype=np.float64)

    def probability(self, total_points: ArrayLike) -> NDArray[np.float64]:
        """The model's probability at a total of points (the nomogram's bottom axes)."""
        total = np.asarray(total_points, dtype=np.float64)
        log_odds = self.offset + total / self.points_per_logit
        return np.asarray(1.0 / (1.0 + np.exp(-log_odds)), dtype=np.float64)


def nomogram(
    coef: ArrayLike,
    intercept: float,
    low: ArrayLike,
    high: ArrayLike,
    feature_names: Sequence[str] | None = None,
) -> Nomogram:
    """The nomogram of ``log-odds = intercept + x @ coef`` over the ranges ``[low, high]``.

    Ranges are usually the training data's minimum and maximum of each variable.
    """
    c = np.asarray(coef, dtype=np.float64).ravel()
    lo = np.asarray(low, dtype=np.float64).ravel()
    hi = np.asarray(high, dtype=np.float64).ravel()
    if not c.size or lo.shape != c.shape or hi.shape != c.shape:
        raise ValueError(
            f"coef, low and high need one equal nonzero length: {c.size}, {lo.size}, {hi.size}"
        )
    if np.any(hi < lo) or not np.all(np.isfinite(np.concatenate([c, lo, hi]))):
        raise ValueError("every range needs finite low <= high and every coefficient is finite")
    names = tuple(f"x{i}" for i in range(c.size)) if feature_names is None else tuple(feature_names)
    if len(names) != c.size:
        raise ValueError(f"{len(names)} names for {c.size} coefficients")
    span = np.abs(c) * (hi - lo)
    widest = float(span.max())
    if widest <= 0.0:
        raise ValueError("no variable changes the log-odds over its range: nothing to scale")
    floor = np.minimum(c * lo, c * hi)
    return Nomogram(
        feature_names=names,
        coef=c,
        intercept=float(intercept),
        low=lo,
        high=hi,
        points_per_logit=100.0 / widest,
        offset=float(intercept) + float(floor.sum()),
    )


def logistic_nomogram(
    pipeline: Pipeline, X_train: ArrayLike, feature_names: Sequence[str] | None = None
) -> Nomogram:
    """The nomogram of a fitted logistic pipeline on its input variables.

    Ranges are the minimum and maximum of each kept variable in ``X_train`` (the
    pipeline's input, raw units); see :func:`linear_predictor_terms` for the allowed steps.
    """
    terms = linear_predictor_terms(pipeline, feature_names)
    X_ = check_array(X_train, dtype=np.float64)[:, terms.columns]
    return nomogram(
        terms.coef, terms.intercept, X_.min(axis=0), X_.max(axis=0), terms.feature_names
    )
