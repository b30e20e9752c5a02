"""Nested cross-validation for small cohorts: every case is held out once.

With a small cohort, one held-out split leaves too few events to judge a candidate. The
retraining service (``[retraining] nested_cv_below``) then estimates the candidate's
performance by nested cross-validation:

- **outer** (:func:`outer_folds`): ``k`` stratified folds by patient (no patient on both
  sides); each fold's model is fitted, the whole way (CNN, PCA, variants), on the other
  folds and scores its fold, so that every case gets one out-of-fold risk;
- **inner** (:func:`choose_by_inner_cv`): inside each outer training side, a
  hyperparameter (the logistic regression's ``C``) is chosen by stratified grouped
  cross-validation AUC on that side only; the outer fold never takes part in the choice.

The gate and the report then judge the out-of-fold risks of all cases beside the version
in service's risks on the same cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.model_selection import StratifiedGroupKFold

from pipelines.evaluation import auc
from pipelines.models import FeatureBlocks, ModelRecipe, fit_variants, predict_risk

Split = tuple[NDArray[np.int64], NDArray[np.int64]]


def outer_folds(y: ArrayLike, patients: Sequence[str], k: int, seed: int) -> list[Split]:
    """``k`` (train, test) index pairs, stratified by outcome, no patient on both sides;
    ``k`` is lowered to the smaller class's patient count when the cohort is that small."""
    labels = np.asarray(y, dtype=int)
    groups = np.asarray([str(p) for p in patients])
    smallest = min(np.unique(groups[labels == c]).size for c in (0, 1))
    folds = min(k, smallest)
    if folds < 2:
        raise ValueError(f"nested cross-validation needs 2 patients per outcome, not {smallest}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = []
    for train, test in splitter.split(np.zeros((labels.size, 1)), labels, groups):
        if set(groups[train]) & set(groups[test]):
            raise AssertionError("a patient is on both sides of an outer fold")
        if np.unique(labels[test]).size < 2 or np.unique(labels[train]).size < 2:
            raise ValueError("an outer fold lacks one outcome class; use fewer folds")
        splits.append((np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)))
    return splits


def choose_by_inner_cv(
    recipes: Mapping[str, ModelRecipe],
    blocks: FeatureBlocks,
    y: ArrayLike,
    variant: str,
    k: int,
    seed: int,
) -> str:
    """The name of the recipe whose ``variant`` has the best mean inner-fold AUC on
    ``blocks`` (grouped by ``blocks.patient_ids``); the first on a tie or when the side
    is too small to fold."""
    labels = np.asarray(y, dtype=int)
    try:
        folds = outer_folds(labels, blocks.patient_ids or blocks.case_ids, k, seed)
    except ValueError:
        return next(iter(recipes))
    scores: dict[str, float] = {}
    for name, recipe in recipes.items():
        aucs = []
        for train, test in folds:
            if np.unique(labels[train]).size < 2 or np.unique(labels[test]).size < 2:
                continue
            model = fit_variants(recipe, blocks.subset(train), labels[train], (variant,))[variant]
            aucs.append(auc(labels[test], predict_risk(model, blocks.subset(test))))
        scores[name] = float(np.mean(aucs)) if aucs else 0.0
    best = max(scores.values())
    return next(name for name, score in scores.items() if score == best)
