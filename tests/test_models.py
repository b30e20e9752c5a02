"""Classifiers, Rad-score and nomogram, the HT study's seven variants, patient-level split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score

from pipelines.evaluation import to_markdown, youden_cutoff
from pipelines.models import (
    CLASSIFIERS,
    VARIANTS,
    ClassifierName,
    FeatureBlocks,
    ModelRecipe,
    classifier_pipeline,
    evaluate_variants,
    evaluation_metrics,
    fit_variants,
    linear_predictor_terms,
    logistic_nomogram,
    nomogram,
    patient_split,
    predict_risk,
    rad_score,
)

SEED = 7


def named_blocks(n: int = 160, seed: int = 0) -> tuple[FeatureBlocks, NDArray[np.int64]]:
    """make_classification's columns shared out to clinical, radiomics and DL blocks."""
    X, y = make_classification(
        n_samples=n,
        n_features=18,
        n_informative=5,
        n_redundant=2,
        class_sep=1.5,
        shuffle=True,
        random_state=seed,
    )
    features = FeatureBlocks(
        case_ids=tuple(f"C{i:04d}" for i in range(n)),
        blocks={"clinical": X[:, :4], "radiomics": X[:, 4:11], "dl": X[:, 11:]},
        feature_names={
            "clinical": ("age", "nihss", "aspects", "sex"),
            "radiomics": tuple(f"glcm_{i}" for i in range(7)),
            "dl": tuple(f"avgpool_{i}" for i in range(7)),
        },
    )
    return features, y.astype(np.int64)


def independent_blocks(n_patients: int, seed: int) -> tuple[FeatureBlocks, NDArray[np.int64]]:
    """Three blocks, each with informative columns whose noise is independent given the
    outcome (so each source adds signal), plus pure-noise columns; 1-2 cases a patient."""
    rng = np.random.default_rng(seed)
    cases_per_patient = rng.integers(1, 3, n_patients)
    patient_label = rng.integers(0, 2, n_patients)
    patients = np.repeat(np.arange(n_patients), cases_per_patient)
    y = patient_label[patients]
    n = y.size
    design = {"clinical": (3, 3), "radiomics": (4, 12), "dl": (4, 20)}  # informative, noise
    blocks, names = {}, {}
    for block, (informative, noise) in design.items():
        signal = rng.normal(size=(n, informative)) + 0.6 * y[:, None]
        blocks[block] = np.hstack([signal, rng.normal(size=(n, noise))])
        names[block] = tuple(f"{block[:3]}{i}" for i in range(informative + noise))
    features = FeatureBlocks(
        case_ids=tuple(f"case{i:04d}" for i in range(n)),
        blocks=blocks,
        feature_names=names,
        patient_ids=tuple(f"P{p:04d}" for p in patients),
    )
    return features, y.astype(np.int64)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_each_classifier_fits_and_predicts_probabilities(name: ClassifierName) -> None:
    features, y = named_blocks()
    X = features.matrix()
    params = {"n_estimators": 50} if name in {"random_forest", "gradient_boosting"} else None
    model = classifier_pipeline(name, "ht_single_source", random_state=SEED, params=params)
    assert [step for step, _ in model.steps] == ["zscore", "anova", "pearson", "lasso", "clf"]
    model.fit(X, y)
    proba = model.predict_proba(X)
    assert proba.shape == (y.size, 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert roc_auc_score(y, proba[:, 1]) > 0.8
    again = classifier_pipeline(name, "ht_single_source", random_state=SEED, params=params)
    np.testing.assert_array_equal(again.fit(X, y).predict_proba(X), proba)


def test_chain_without_zscore_gets_one_and_unknown_names_are_refused() -> None:
    steps = [step for step, _ in classifier_pipeline("knn", "ich_expansion_hybrid").steps]
    assert steps == ["zscore", "forward", "clf"]
    assert [s for s, _ in classifier_pipeline("svm", None).steps] == ["zscore", "clf"]
    with pytest.raises(ValueError, match="unknown classifier"):
        classifier_pipeline("xgboost", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown selection chain"):
        classifier_pipeline("knn", "boruta")


def test_nomogram_by_hand() -> None:
    """log-odds = 0.5 + 2 x0 - x1 with x0 in [0, 1], x1 in [0, 4]: x1 spans 4 logits (100
    points), x0 2 logits (50 points), so 25 points a logit and offset 0.5 - 4."""
    nomo = nomogram([2.0, -1.0], 0.5, [0.0, 0.0], [1.0, 4.0], ["a", "b"])
    assert nomo.points_per_logit == 25.0
    assert nomo.offset == -3.5
    np.testing.assert_allclose(nomo.points([[1.0, 0.0], [0.0, 4.0]]), [[50, 100], [0, 0]])
    total = nomo.total_points([[1.0, 0.0]])
    assert total[0] == 150.0
    assert nomo.probability(total)[0] == pytest.approx(1 / (1 + math.exp(-2.5)))
    with pytest.raises(ValueError, match="nothing to scale"):
        nomogram([0.0], 0.0, [0.0], [1.0])


def test_rad_score_and_nomogram_reproduce_the_logistic_model() -> None:
    features, y = named_blocks(seed=3)
    X = features.matrix()
    model = classifier_pipeline("logistic", "ht_single_source", random_state=SEED).fit(X, y)
    terms = linear_predictor_terms(model, features.column_names)
    assert 0 < len(terms.feature_names) < X.shape[1]
    assert set(terms.feature_names) <= set(features.column_names)
    np.testing.assert_allclose(rad_score(terms, X), model.decision_function(X), atol=1e-10)

    nomo = logistic_nomogram(model, X, features.column_names)
    kept = X[:, terms.columns]
    points = nomo.points(kept)
    assert points.min() == pytest.approx(0.0, abs=1e-9)
    assert points.max() == pytest.approx(100.0)
    assert np.all(points.min(axis=0) > -1e-9)
    assert np.all(points.max(axis=0) < 100.0 + 1e-9)
    np.testing.assert_allclose(
        nomo.probability(nomo.total_points(kept)), model.predict_proba(X)[:, 1], atol=1e-10
    )

    pca = classifier_pipeline("logistic", "pca").fit(X, y)
    with pytest.raises(ValueError, match="neither a z-score nor a feature selector"):
        linear_predictor_terms(pca)
    with pytest.raises(ValueError, match="not a LogisticRegression"):
        linear_predictor_terms(classifier_pipeline("knn", None).fit(X, y))


def test_seven_variants_from_one_recipe_and_fusion_wins_on_held_out_patients() -> None:
    features, y = independent_blocks(n_patients=320, seed=SEED)
    train, test = patient_split(y, features.groups, test_size=0.3, seed=SEED)
    recipe = ModelRecipe(classifier="knn", seed=SEED, classifier_params={"n_neighbors": 25})
    models = fit_variants(recipe, features.subset(train), y[train])
    assert list(models) == list(VARIANTS)
    for variant, model in models.items():
        used = [name for name, _, _ in model.named_steps["blocks"].transformers]
        assert tuple(used) == VARIANTS[variant]

    evaluation = evaluate_variants(
        models, features.subset(train), y[train], features.subset(test), y[test]
    )
    auc = {row.model: row.auc.auc for row in evaluation.rows}
    for single in ("clinical", "radiomics", "dl"):
        assert auc["combined"] > auc[single] + 0.03, auc
    assert auc["combined"] > 0.8
    for row in evaluation.rows:
        assert row.cutoff_source == "given"
        assert row.n == test.size
        assert row.auc.low < row.auc.auc < row.auc.high
        training_risk = predict_risk(models[row.model], features.subset(train))
        assert row.metrics.cutoff == youden_cutoff(y[train], training_risk)
        assert evaluation.cutoffs[row.model] == row.metrics.cutoff
    table = to_markdown(evaluation.rows)
    assert "| combined |" in table and "AUC (95% CI)" in table
    metrics = evaluation_metrics(evaluation)
    assert metrics["combined"]["auc"] == auc["combined"]
    assert metrics["combined"]["cutoff_source"] == "training set Youden"


def test_recipe_round_trip_and_refusals() -> None:
    recipe = ModelRecipe(classifier="svm", selection=None, seed=3)
    assert ModelRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown selection chain"):
        ModelRecipe(selection="boruta")
    with pytest.raises(ValueError, match="block_selection"):
        ModelRecipe(block_selection={"clinical": "zscore"})
    with pytest.raises(ValueError, match="unknown recipe keys"):
        ModelRecipe.from_dict({"classifier": "knn", "folds": 3})


def test_feature_blocks_checks() -> None:
    features, _ = named_blocks(n=20)
    assert features.column_names[:2] == ("clin_age", "clin_nihss")
    assert features.column_names[4] == "rad_glcm_0"
    assert features.columns("dl") == list(range(11, 18))
    sub = features.subset([3, 1])
    assert sub.case_ids == ("C0003", "C0001")
    np.testing.assert_array_equal(sub.matrix(), features.matrix()[[3, 1]])
    bad = np.array(features.blocks["clinical"])
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FeatureBlocks(features.case_ids, {"clinical": bad}, {"clinical": ("a", "b", "c", "d")})
    with pytest.raises(ValueError, match="shape"):
        FeatureBlocks(("a", "b"), {"dl": np.zeros((3, 1))}, {"dl": ("x",)})
    with pytest.raises(ValueError, match="blocks must be among"):
        FeatureBlocks(("a",), {"mri": np.zeros((1, 1))}, {"mri": ("x",)})


@pytest.mark.parametrize("seed", range(4))
def test_patient_split_keeps_patients_whole_and_classes_balanced(seed: int) -> None:
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(200), rng.integers(1, 4, 200))
    y = (rng.random(200) < 0.3).astype(int)[patients]
    groups = [f"P{p}" for p in patients]
    train, test = patient_split(y, groups, test_size=0.25, seed=seed)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).size == y.size
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert abs(test.size / y.size - 0.25) < 0.05
    assert abs(y[test].mean() - y.mean()) < 0.05
    assert abs(y[train].mean() - y.mean()) < 0.05


def test_patient_split_refusals() -> None:
    with pytest.raises(ValueError, match="test_size"):
        patient_split([0, 1] * 10, [str(i) for i in range(20)], test_size=0.8)
    with pytest.raises(ValueError, match="patients cannot make"):
        patient_split([0, 1] * 10, ["A", "B"] * 10, test_size=0.25)
