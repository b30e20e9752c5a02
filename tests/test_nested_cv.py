"""Nested cross-validation for small cohorts (``pipelines.retraining.nested``): outer
folds by patient hold every case out once, the inner folds choose a recipe on the outer
training side only, and the retraining service judges a small cohort's candidate on the
out-of-fold risks of all its cases."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model_store.registry import STORE_ROOT
from pipelines.cohort import generate_cohort
from pipelines.ht_after_mt.train import default_recipe
from pipelines.models import FeatureBlocks
from pipelines.retraining.nested import choose_by_inner_cv, outer_folds
from pipelines.retraining.trainable import Cohort, TrainOptions, get_trainable


def test_outer_folds_hold_every_case_out_once_and_keep_patients_whole() -> None:
    rng = np.random.default_rng(0)
    patients = [f"p{i // 2}" for i in range(40)]  # two studies per patient
    y = np.repeat(rng.integers(0, 2, 20), 2)
    folds = outer_folds(y, patients, 5, seed=1)
    assert len(folds) == 5
    held = np.concatenate([test for _, test in folds])
    assert sorted(held.tolist()) == list(range(40))
    for train, test in folds:
        assert not {patients[i] for i in train} & {patients[i] for i in test}
        assert set(y[test]) == {0, 1}
    few = outer_folds([1, 1, 1, 0, 0, 0, 0, 0], [f"p{i}" for i in range(8)], 5, seed=0)
    assert len(few) == 3  # lowered to the 3 patients with an event
    with pytest.raises(ValueError, match="2 patients per outcome"):
        outer_folds([1, 0, 0, 0], ["a", "b", "c", "d"], 5, seed=0)


def test_the_inner_folds_choose_the_recipe_that_generalises() -> None:
    rng = np.random.default_rng(3)
    n = 60
    y = rng.integers(0, 2, n)
    signal = y + rng.normal(0, 0.6, n)
    blocks = FeatureBlocks(
        tuple(f"c{i}" for i in range(n)),
        {
            "clinical": np.column_stack([signal, rng.normal(size=(n, 3))]),
            "radiomics": rng.normal(size=(n, 4)),
            "dl": rng.normal(size=(n, 2)),
        },
        {"clinical": ("s", "a", "b", "c"), "radiomics": ("r1", "r2", "r3", "r4"),
         "dl": ("d1", "d2")},
        tuple(f"p{i}" for i in range(n)),
    )  # fmt: skip
    logistic = default_recipe(0)
    one_neighbour = replace(logistic, classifier="knn", classifier_params={"n_neighbors": 1})
    recipes = {"1-nn": one_neighbour, "logistic": logistic}
    assert choose_by_inner_cv(recipes, blocks, y, "combined", 3, seed=0) == "logistic"


def test_a_small_cohort_is_judged_on_every_case_out_of_fold(tmp_path: Path) -> None:
    cohort = generate_cohort(tmp_path / "cohort", 16, 3, rows=64, n_slices=12)
    store = tmp_path / "store"
    shutil.copytree(STORE_ROOT / "ht_after_mt" / "1.1.0", store / "ht_after_mt" / "1.1.0")
    options = TrainOptions(epochs=1, cnn_input_size=32, test_size=0.3, nested_cv_below=100,
                           outer_folds=3)  # fmt: skip
    trainable = get_trainable("ht_after_mt", options)
    evaluation = trainable.train_candidate(Cohort(cohort.root), version="1.2.0", root=store)
    assert "nested cross-validation: 3 outer folds" in evaluation.split
    assert len(evaluation.y_true) == len(evaluation.held_out_ids) >= 8
    assert evaluation.n_train < len(evaluation.y_true)  # more judged than the split holds out
    assert np.isfinite(evaluation.candidate).all()
    assert 0 < evaluation.y_true.sum() < len(evaluation.y_true)
    assert evaluation.in_service is not None and len(evaluation.in_service) == len(
        evaluation.y_true
    )
