"""Feature selectors against independent references (published examples, scipy, brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import stats
from sklearn.datasets import make_classification
from sklearn.feature_selection import SequentialFeatureSelector, f_classif
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline

from pipelines.selection import (
    PCA,
    AnovaFilter,
    CorrelationFilter,
    ForwardSelector,
    ICCFilter,
    LassoSelector,
    MannWhitneyFilter,
    MRMRSelector,
    StandardScaler,
    icc,
    rad_score,
    recipes,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
    dtype=float,
)
# Their Table 4.
SHROUT_FLEISS_ICC = {
    "ICC(1,1)": 0.17,
    "ICC(2,1)": 0.29,
    "ICC(3,1)": 0.71,
    "ICC(1,k)": 0.44,
    "ICC(2,k)": 0.62,
    "ICC(3,k)": 0.91,
}


def _data(n: int = 120, p: int = 12, seed: int = 0) -> tuple[NDArray[np.float64], NDArray]:
    X, y = make_classification(
        n_samples=n,
        n_features=p,
        n_informative=3,
        n_redundant=2,
        shuffle=False,
        random_state=seed,
    )
    return X, y


# ---------------------------------------------------------------- ICC


@pytest.mark.parametrize(("form", "published"), SHROUT_FLEISS_ICC.items())
def test_icc_reproduces_shrout_fleiss_worked_example(form: str, published: float) -> None:
    readers = [SHROUT_FLEISS[:, [j]] for j in range(4)]
    assert icc(readers, form)[0] == pytest.approx(published, abs=0.005)


def _ss_resid(design: NDArray[np.float64], v: NDArray[np.float64]) -> float:
    coef = np.linalg.lstsq(design, v, rcond=None)[0]
    return float(((v - design @ coef) ** 2).sum())


def test_icc_matches_two_way_anova_fitted_by_least_squares() -> None:
    rng = np.random.default_rng(1)
    n, k, p = 15, 3, 4
    truth = rng.normal(size=(n, p)) * np.array([1.0, 0.3, 2.0, 0.1])
    ratings = [truth + rng.normal(scale=0.4, size=(n, p)) + 0.2 * j for j in range(k)]
    case = np.repeat(np.eye(n), k, axis=0)  # rows ordered case-major, reader-minor
    reader = np.tile(np.eye(k), (n, 1))
    ones = np.ones((n * k, 1))
    for f in range(p):
        v = np.stack([r[:, f] for r in ratings], axis=1).ravel()
        ss_total = _ss_resid(ones, v)
        ss_within = _ss_resid(case, v)
        ss_cases = ss_total - ss_within
        ss_readers = ss_total - _ss_resid(np.column_stack([ones, reader[:, 1:]]), v)
        ss_error = _ss_resid(np.column_stack([case, reader[:, 1:]]), v)
        bms, wms = ss_cases / (n - 1), ss_within / (n * (k - 1))
        jms, ems = ss_readers / (k - 1), ss_error / ((n - 1) * (k - 1))
        expected = {
            "ICC(1,1)": (bms - wms) / (bms + (k - 1) * wms),
            "ICC(2,1)": (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n),
            "ICC(3,1)": (bms - ems) / (bms + (k - 1) * ems),
        }
        for form, value in expected.items():
            assert icc(ratings, form)[f] == pytest.approx(value, rel=1e-10)


def test_icc_filter_keeps_reproducible_features_and_works_on_other_rows() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(40, 5))
    noise = np.array([0.0, 0.1, 0.5, 1.0, 3.0])
    reader1 = truth + rng.normal(size=truth.shape) * noise
    reader2 = truth + rng.normal(size=truth.shape) * noise
    X, y = _data(p=5)  # training rows: not the reliability cases
    filt = ICCFilter([reader1, reader2], threshold=0.75).fit(X, y)
    np.testing.assert_allclose(filt.icc_, icc([reader1, reader2], "ICC(2,1)"))
    assert filt.icc_[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(filt.get_support(), filt.icc_ >= 0.75)
    assert filt.get_support()[:2].all() and not filt.get_support()[-1]
    assert filt.transform(X).shape == (120, int(filt.get_support().sum()))
    consistency = ICCFilter([reader1, reader2 + 5.0], form="ICC(3,1)").fit(X)
    np.testing.assert_allclose(consistency.icc_, icc([reader1, reader2], "ICC(3,1)"))
    given = ICCFilter(icc_values=filt.icc_, threshold=0.8).fit(X)
    np.testing.assert_array_equal(given.get_support(), filt.icc_ >= 0.8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"ratings": [np.ones((4, 3))] * 2, "icc_values": np.ones(3)}, "exactly one"),
        ({"ratings": [np.ones((4, 3))]}, "at least 2 readers"),
        ({"ratings": [np.ones((4, 3)), np.ones((5, 3))]}, "same shape"),
        ({"ratings": [np.ones((4, 2))] * 2}, "cover 2 features"),
        ({"icc_values": np.ones(3), "threshold": 1.5}, "threshold"),
        ({"ratings": [np.eye(3)] * 2, "form": "ICC(4,1)"}, "form must be"),
    ],
)
def test_icc_filter_refuses_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ICCFilter(**kwargs).fit(np.ones((6, 3)))


# ---------------------------------------------------------------- univariate


def test_mann_whitney_matches_scipy_column_by_column() -> None:
    X, y = _data()
    X[:, 5] = np.round(X[:, 5])  # ties
    filt = MannWhitneyFilter().fit(X, y)
    for j in range(X.shape[1]):
        ref = stats.mannwhitneyu(X[y == 0, j], X[y == 1, j])
        assert filt.statistic_[j] == pytest.approx(ref.statistic)
        assert filt.pvalues_[j] == pytest.approx(ref.pvalue)
    np.testing.assert_array_equal(filt.get_support(), filt.pvalues_ < 0.05)
    assert 0 < filt.get_support().sum() < X.shape[1]
    X[:, 0] = 1.0  # constant: undefined p-value, never kept
    assert not MannWhitneyFilter().fit(X, y).get_support()[0]


def test_mann_whitney_needs_a_binary_outcome() -> None:
    X, _ = _data()
    with pytest.raises(ValueError, match="binary outcome"):
        MannWhitneyFilter().fit(X, np.arange(X.shape[0]) % 3)
    with pytest.raises(ValueError, match="alpha"):
        MannWhitneyFilter(alpha=1.5).fit(X, np.arange(X.shape[0]) % 2)


def test_anova_matches_f_classif_and_top_k() -> None:
    X, y = _data()
    f, p = f_classif(X, y)
    by_p = AnovaFilter().fit(X, y)
    np.testing.assert_allclose(by_p.scores_, f)
    np.testing.assert_allclose(by_p.pvalues_, p)
    np.testing.assert_array_equal(by_p.get_support(), p < 0.05)
    top = AnovaFilter(alpha=None, k=4).fit(X, y)
    assert set(top.get_support(indices=True)) == set(np.argsort(-f)[:4])
    both = AnovaFilter(alpha=0.05, k=2).fit(X, y)
    assert set(both.get_support(indices=True)) == set(np.argsort(-f)[:2])
    with pytest.raises(ValueError, match="set alpha, k or both"):
        AnovaFilter(alpha=None).fit(X, y)


# ---------------------------------------------------------------- correlation


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_correlation_filter_leaves_no_pair_above_threshold(method: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(80, 4))
    X = np.column_stack([base + rng.normal(scale=s, size=base.shape) for s in (0.1, 0.2, 0.6)])
    filt = CorrelationFilter(0.9, method=method).fit(X)  # type: ignore[arg-type]
    corr = stats.spearmanr if method == "spearman" else stats.pearsonr
    kept = filt.get_support(indices=True)
    for i, j in itertools.combinations(kept, 2):
        assert abs(corr(X[:, i], X[:, j])[0]) <= 0.9
    assert 4 <= kept.size < X.shape[1]
    # every dropped feature had a partner above the threshold
    for d in filt.dropped_:
        assert max(abs(corr(X[:, d], X[:, o])[0]) for o in range(12) if o != d) > 0.9


def _hub_example() -> tuple[NDArray[np.float64], NDArray]:
    """a and b nearly identical; b also carries some of c: b is the more redundant."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(200, 3))
    a = z[:, 0]
    b = z[:, 0] + 0.15 * z[:, 2]
    c = z[:, 2]
    y = (z[:, 0] + 1.5 * z[:, 2] + rng.normal(scale=0.5, size=200) > 0).astype(int)
    return np.column_stack([a, b, c]), y


def test_correlation_filter_drops_the_more_redundant_member() -> None:
    X, _ = _hub_example()
    r = np.abs(stats.spearmanr(X).statistic)
    assert r[0, 1] > 0.9 and r[1, 2] > r[0, 2]  # the construction holds
    filt = CorrelationFilter(0.9).fit(X)
    assert filt.dropped_ == [1]
    assert list(filt.get_support()) == [True, False, True]


def test_correlation_filter_relevance_rule_drops_the_less_relevant_member() -> None:
    X, y = _hub_example()
    rel = [abs(stats.spearmanr(X[:, j], y).statistic) for j in range(2)]
    assert rel[0] < rel[1]
    filt = CorrelationFilter(0.9, drop="relevance").fit(X, y)
    assert filt.dropped_ == [0]
    with pytest.raises(ValueError, match="needs y"):
        CorrelationFilter(drop="relevance").fit(X)


# ---------------------------------------------------------------- mRMR


def _mrmr_brute_force(X: NDArray[np.float64], y: NDArray, k: int, quotient: bool) -> list[int]:
    p = X.shape[1]
    rel = [stats.f_oneway(X[y == 0, j], X[y == 1, j]).statistic for j in range(p)]
    corr = [[abs(stats.pearsonr(X[:, i], X[:, j])[0]) for j in range(p)] for i in range(p)]
    chosen = [int(np.argmax(rel))]
    while len(chosen) < k:
        best, best_score = -1, -np.inf
        for j in range(p):
            if j in chosen:
                continue
            red = sum(corr[j][s] for s in chosen) / len(chosen)
            score = rel[j] / red if quotient else rel[j] - red
            if score > best_score:
                best, best_score = j, score
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("scheme", ["quotient", "difference"])
def test_mrmr_matches_brute_force_greedy(scheme: str) -> None:
    X, y = _data(n=100, p=8, seed=5)
    sel = MRMRSelector(k=4, scheme=scheme).fit(X, y)  # type: ignore[arg-type]
    assert sel.ranking_ == _mrmr_brute_force(X, y, 4, scheme == "quotient")
    assert sorted(sel.ranking_) == list(sel.get_support(indices=True))


def test_mrmr_mutual_information_relevance_and_small_inputs() -> None:
    X, y = _data(n=100, p=8, seed=5)
    sel = MRMRSelector(k=3, relevance="mutual_info", random_state=0).fit(X, y)
    assert sel.ranking_[0] == int(np.argmax(sel.relevance_))
    assert MRMRSelector(k=20).fit(X, y).get_support().all()  # fewer than k: all kept
    with pytest.raises(ValueError, match="k must be"):
        MRMRSelector(k=0).fit(X, y)


# ---------------------------------------------------------------- LASSO


def _sparse_logistic(seed: int = 6) -> tuple[NDArray[np.float64], NDArray, list[int]]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 20))
    informative = [2, 7, 11]
    logit = 1.5 * X[:, 2] - 1.5 * X[:, 7] + 1.2 * X[:, 11]
    y = (rng.random(300) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y, informative


def test_lasso_equals_independent_logistic_regression_cv() -> None:
    X, y, informative = _sparse_logistic()
    sel = LassoSelector(cv=5, Cs=10, random_state=0).fit(X, y)
    ref = LogisticRegressionCV(
        Cs=10,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        l1_ratios=(1.0,),
        solver="liblinear",
        scoring="neg_log_loss",
        max_iter=1000,
        random_state=0,
        use_legacy_attributes=False,
    ).fit(X, y)
    np.testing.assert_array_equal(sel.get_support(), ref.coef_.ravel() != 0)
    np.testing.assert_allclose(sel.coef_, ref.coef_.ravel())
    assert set(informative) <= set(sel.get_support(indices=True))
    # lambda at minimum error admits some noise, but with clearly smaller weights
    assert set(np.argsort(-np.abs(sel.coef_))[:3]) == set(informative)
    np.testing.assert_allclose(sel.rad_score(X), ref.decision_function(X))
    kept = sel.get_support()
    np.testing.assert_allclose(
        rad_score(sel.transform(X), sel.coef_[kept], sel.intercept_), ref.decision_function(X)
    )


def test_rad_score_formula_and_errors() -> None:
    X = np.array([[1.0, 2.0], [0.0, -1.0]])
    np.testing.assert_allclose(rad_score(X, [0.5, -0.25], -0.487), [-0.487, -0.237])
    with pytest.raises(ValueError, match="2 features but there are 3"):
        rad_score(X, [1.0, 2.0, 3.0], 0.0)
    with pytest.raises(ValueError, match="binary outcome"):
        LassoSelector().fit(np.ones((9, 2)), np.arange(9) % 3)


# ---------------------------------------------------------------- forward selection


def _tiny_problem() -> tuple[NDArray[np.float64], NDArray]:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(90, 5))
    y = (X[:, 1] + 0.8 * X[:, 3] + rng.normal(scale=0.7, size=90) > 0).astype(int)
    return X, y


def test_forward_selection_matches_exhaustive_search_and_sklearn() -> None:
    X, y = _tiny_problem()
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    model = LogisticRegression()
    sel = ForwardSelector(model, n_features_to_select=2, cv=folds).fit(X, y)
    pairs = {
        pair: cross_val_score(model, X[:, list(pair)], y, cv=folds, scoring="roc_auc").mean()
        for pair in itertools.combinations(range(5), 2)
    }
    assert tuple(sorted(sel.order_)) == max(pairs, key=pairs.__getitem__) == (1, 3)
    assert sel.scores_[-1] == pytest.approx(max(pairs.values()))
    ref = SequentialFeatureSelector(model, n_features_to_select=2, scoring="roc_auc", cv=folds)
    np.testing.assert_array_equal(sel.get_support(), ref.fit(X, y).get_support())


def test_forward_selection_stops_on_tolerance() -> None:
    X, y = _tiny_problem()
    sel = ForwardSelector(tol=0.02, cv=3).fit(X, y)
    assert sel.order_[:2] in ([1, 3], [3, 1])
    assert len(sel.order_) < 5
    assert all(b - a >= 0.02 for a, b in itertools.pairwise(sel.scores_))
    with pytest.raises(ValueError, match="n_features_to_select"):
        ForwardSelector(n_features_to_select=9).fit(X, y)


# ---------------------------------------------------------------- composition


def test_all_selectors_compose_in_one_pipeline_under_cross_validation() -> None:
    X, y = make_classification(
        n_samples=150, n_features=25, n_informative=4, n_redundant=3, random_state=8
    )
    rng = np.random.default_rng(8)
    readers = [X[:40] + rng.normal(scale=0.1, size=(40, 25)) for _ in range(2)]
    pipe = Pipeline(
        [
            ("icc", ICCFilter(readers, threshold=0.75)),
            ("zscore", StandardScaler()),
            ("mann_whitney", MannWhitneyFilter(alpha=0.2)),
            ("anova", AnovaFilter(alpha=0.2)),
            ("spearman", CorrelationFilter(0.9)),
            ("mrmr", MRMRSelector(k=8)),
            ("lasso", LassoSelector(cv=3, Cs=5)),
            ("pca", PCA(n_components=0.99)),
            ("forward", ForwardSelector(n_features_to_select=2, cv=3)),
            ("clf", LogisticRegression()),
        ]
    )
    auc = cross_val_score(
        pipe, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0), scoring="roc_auc"
    )
    assert auc.mean() > 0.75
    pipe.fit(X, y)
    assert pipe[:-1].get_feature_names_out().size == 2


def test_recipes_fit_and_name_their_features() -> None:
    X, y = _data(n=120, p=16, seed=9)
    for recipe in (
        recipes.ht_radiomics(icc_values=np.full(16, 0.9)),
        recipes.ht_single_source(),
        recipes.ht_combined(dl_columns=list(range(8, 16))),
        recipes.iph_vs_contrast(),
        recipes.ais_prognosis_mri(),
    ):
        out = recipe.fit_transform(X, y)
        assert 0 < out.shape[1] == recipe.get_feature_names_out().size
    hybrid = recipes.ich_expansion_hybrid(tol=0.01).fit(X[:, :6], y)
    assert 0 < hybrid.transform(X[:, :6]).shape[1] <= 6


def test_pandas_output_keeps_feature_names() -> None:
    pd = pytest.importorskip("pandas")
    X, y = _data()
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])
    out = AnovaFilter().set_output(transform="pandas").fit(frame, y).transform(frame)
    assert list(out.columns) == [
        c for c, keep in zip(frame.columns, f_classif(X, y)[1] < 0.05, strict=True) if keep
    ]


def test_pandas_names_flow_through_a_pipeline_and_are_checked() -> None:
    pd = pytest.importorskip("pandas")
    X, y = _data(p=6)
    names = [f"f{j}" for j in range(6)]
    frame = pd.DataFrame(X, columns=names)
    readers = [frame.iloc[:30] + 0.01 * j for j in range(2)]
    pipe = Pipeline([("icc", ICCFilter(readers)), ("lasso", LassoSelector(cv=3, Cs=5))]).set_output(
        transform="pandas"
    )
    out = pipe.fit(frame, y).transform(frame)
    assert list(out.columns) == list(pipe.get_feature_names_out())
    assert set(out.columns) <= set(names)
    renamed = [readers[0], readers[1].rename(columns={"f0": "other"})]
    with pytest.raises(ValueError, match="reader 2's columns differ"):
        ICCFilter(renamed).fit(frame, y)
