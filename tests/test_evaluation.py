"""Each statistic of ``pipelines.evaluation`` against an independent reference.

References: brute-force O(m n) DeLong written here from the 1988 definitions; Hanley &
McNeil's (Radiology 1982;143:29) published CT rating data; scikit-learn and statsmodels;
hand computations of the confusion matrix, the Hosmer-Lemeshow statistic, net benefit and
AIC.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import statsmodels.api as sm
from numpy.typing import NDArray
from scipy.stats import chi2, norm
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import roc_auc_score

from pipelines.evaluation import (
    aic,
    auc,
    auc_ci_bootstrap,
    auc_ci_delong,
    bootstrap_aucs,
    calibration_curve,
    compare_nested_logit,
    decision_curve,
    delong_covariance,
    delong_test,
    evaluation_table,
    fit_logit,
    hosmer_lemeshow,
    likelihood_ratio_test,
    metrics_at_cutoff,
    metrics_at_youden,
    net_benefit,
    risk_groups,
    to_csv,
    to_markdown,
    youden_cutoff,
)


def case_markers() -> tuple[NDArray[np.int64], list[NDArray[np.float64]]]:
    """113 seeded cases (41 events) and three markers: continuous, 5-level graded (heavy
    ties) and weak, so DeLong's tie handling and correlated curves are exercised."""
    rng = np.random.default_rng(2010)
    y = np.zeros(113, dtype=np.int64)
    y[rng.choice(113, size=41, replace=False)] = 1
    continuous = np.round(rng.gamma(2.0, 0.1, 113) + 0.12 * y, 2)
    graded = np.clip(np.round(rng.normal(2.0 + 1.0 * y, 1.2)), 1, 5)
    weak = np.round(rng.lognormal(2.5 + 0.3 * y, 0.8), 1)
    return y, [continuous, graded.astype(np.float64), weak]


def brute_force_delong(
    y: NDArray[np.int64], scores: list[NDArray[np.float64]]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """DeLong et al. 1988 from the definitions: psi over all m x n pairs, then V10, V01."""
    k = len(scores)
    v10, v01, aucs = [], [], []
    for s in scores:
        x = s[y == 1]
        z = s[y == 0]
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # one per event
        v01.append(psi.mean(axis=0))  # one per non-event
    m, n = len(v10[0]), len(v01[0])
    cov = np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            s10 = sum((v10[r][i] - aucs[r]) * (v10[c][i] - aucs[c]) for i in range(m)) / (m - 1)
            s01 = sum((v01[r][j] - aucs[r]) * (v01[c][j] - aucs[c]) for j in range(n)) / (n - 1)
            cov[r, c] = s10 / m + s01 / n
    return np.array(aucs), cov


def simulated_scores(
    n: int, seed: int, ties: bool = False
) -> tuple[NDArray[np.int64], list[NDArray[np.float64]]]:
    """Outcome and three correlated scores of different strength."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.int64)
    base = rng.normal(size=n) + 1.2 * y
    scores = [base, base + rng.normal(size=n), 0.4 * y + rng.normal(size=n)]
    if ties:
        scores = [np.round(s) for s in scores]
    return y, scores


# ── AUC and DeLong ──────────────────────────────────────────────────────────


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_brute_force_definition(ties: bool) -> None:
    y, scores = simulated_scores(90, seed=1, ties=ties)
    got = delong_covariance(y, scores)
    aucs, cov = brute_force_delong(y, scores)
    np.testing.assert_allclose(got.aucs, aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.covariance, cov, rtol=1e-10, atol=1e-15)


def test_delong_test_equals_the_brute_force_definition() -> None:
    y, scores = simulated_scores(120, seed=2, ties=True)
    aucs, cov = brute_force_delong(y, scores[:2])
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (aucs[0] - aucs[1]) / se
    test = delong_test(y, scores[0], scores[1])
    assert test.difference == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert test.se == pytest.approx(se, rel=1e-10)
    assert test.z == pytest.approx(z, rel=1e-10)
    assert test.p_value == pytest.approx(2 * (1 - norm.cdf(abs(z))), rel=1e-9)


def test_delong_test_of_a_score_against_a_monotone_transform_is_null() -> None:
    y, scores = simulated_scores(60, seed=3)
    test = delong_test(y, scores[0], np.exp(scores[0]))
    assert (test.difference, test.z, test.p_value) == (0.0, 0.0, 1.0)


def test_hanley_mcneil_ct_ratings() -> None:
    """Hanley & McNeil 1982, Table 1: 109 CT images rated 1-5; they give AUC 0.893, SE 0.032.

    Their SE comes from an exponential approximation, DeLong's is nonparametric: close, not
    equal.
    """
    normal = [33, 6, 6, 11, 2]
    abnormal = [3, 2, 2, 11, 33]
    ratings = np.arange(1, 6)
    y = np.r_[np.zeros(sum(normal)), np.ones(sum(abnormal))]
    s = np.r_[np.repeat(ratings, normal), np.repeat(ratings, abnormal)]
    ci = auc_ci_delong(y, s)
    assert round(ci.auc, 3) == 0.893
    assert ci.se == pytest.approx(0.032, abs=0.002)
    _, cov = brute_force_delong(y.astype(np.int64), [s.astype(np.float64)])
    assert ci.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)


def test_auc_equals_scikit_learn() -> None:
    y, scores = simulated_scores(150, seed=4, ties=True)
    for s in scores:
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-14)
        assert auc_ci_delong(y, s).auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auc_ci_bootstrap(y, s, n_bootstrap=10).auc == pytest.approx(
            roc_auc_score(y, s), abs=1e-12
        )


def test_delong_interval_is_clipped_to_the_unit_interval() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    ci = auc_ci_delong(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert (ci.auc, ci.low, ci.high) == (1.0, 1.0, 1.0)


# ── Bootstrap ───────────────────────────────────────────────────────────────


def test_bootstrap_replicates_are_stratified_resamples_scored_by_scikit_learn() -> None:
    y, scores = simulated_scores(80, seed=5, ties=True)
    s = scores[1]
    got = bootstrap_aucs(y, s, n_bootstrap=25, seed=11)
    rng = np.random.default_rng(11)
    pos, neg = s[y == 1], s[y == 0]
    pos_idx = rng.integers(0, pos.size, size=(25, pos.size))
    neg_idx = rng.integers(0, neg.size, size=(25, neg.size))
    for b in range(25):
        yy = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        ss = np.r_[pos[pos_idx[b]], neg[neg_idx[b]]]
        assert got[b] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)


def test_bootstrap_interval_is_deterministic_and_close_to_delongs() -> None:
    y, markers = case_markers()
    first = auc_ci_bootstrap(y, markers[0], n_bootstrap=2000, seed=7)
    again = auc_ci_bootstrap(y, markers[0], n_bootstrap=2000, seed=7)
    other = auc_ci_bootstrap(y, markers[0], n_bootstrap=2000, seed=8)
    delong = auc_ci_delong(y, markers[0])
    assert first == again
    assert first != other
    assert first.method == "bootstrap"
    assert first.auc == pytest.approx(delong.auc, abs=1e-12)
    assert first.low < delong.auc < first.high
    assert first.low == pytest.approx(delong.low, abs=0.03)
    assert first.high == pytest.approx(delong.high, abs=0.03)
    assert first.se == pytest.approx(delong.se, rel=0.15)


# ── Cut-offs ────────────────────────────────────────────────────────────────

TINY_Y = [0, 0, 1, 0, 0, 1, 0, 1, 1, 1]
TINY_SCORE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def test_youden_metrics_on_a_hand_computed_example() -> None:
    """By hand: J = 0.2, 0.4, 0.6, 0.4, 0.6, 0.4, 0.4 at cut-offs 0.95 ... 0.5, 0.3.

    0.8 and 0.6 tie at J = 0.6 (0.8 - 0.2 is 0.6000000000000001 in floating point); the
    higher, more specific cut-off wins: TP 3 (0.8, 0.9, 0.95), FN 2, TN 5, FP 0.
    """
    assert youden_cutoff(TINY_Y, TINY_SCORE) == 0.8
    m = metrics_at_youden(TINY_Y, TINY_SCORE)
    assert (m.confusion.tp, m.confusion.fp, m.confusion.tn, m.confusion.fn) == (3, 0, 5, 2)
    assert np.array_equal(m.confusion.as_array(), [[5, 0], [2, 3]])
    assert (m.sensitivity, m.specificity, m.accuracy, m.ppv) == (0.6, 1.0, 0.8, 1.0)
    assert m.npv == pytest.approx(5 / 7)
    assert m.youden_index == pytest.approx(0.6)


def test_metrics_at_a_given_cutoff_on_a_hand_computed_example() -> None:
    """Cut-off 0.5: positives 0.5, 0.6, 0.7, 0.8, 0.9, 0.95 -> TP 4, FP 2, TN 3, FN 1."""
    m = metrics_at_cutoff(TINY_Y, TINY_SCORE, 0.5)
    assert (m.confusion.tp, m.confusion.fp, m.confusion.tn, m.confusion.fn) == (4, 2, 3, 1)
    assert (m.sensitivity, m.specificity, m.accuracy) == (0.8, 0.6, 0.7)
    assert (m.ppv, m.npv) == (pytest.approx(4 / 6), 0.75)
    nobody = metrics_at_cutoff(TINY_Y, TINY_SCORE, 2.0)
    assert math.isnan(nobody.ppv) and nobody.specificity == 1.0 and nobody.sensitivity == 0.0


def test_youden_equals_brute_force_search() -> None:
    y, scores = simulated_scores(70, seed=8, ties=True)
    for s in scores:
        best = max(
            np.unique(s)[::-1],
            key=lambda c: (
                np.sum(s[y == 1] >= c) * (y == 0).sum() - np.sum(s[y == 0] >= c) * y.sum()
            ),
        )
        assert youden_cutoff(y, s) == best


# ── Calibration ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_curve_matches_scikit_learn(strategy: str) -> None:
    rng = np.random.default_rng(9)
    p = rng.beta(2, 5, 300)
    y = (rng.random(300) < p).astype(int)
    curve = calibration_curve(y, p, n_bins=10, strategy=strategy)  # type: ignore[arg-type]
    observed, predicted = sk_calibration_curve(y, p, n_bins=10, strategy=strategy)
    np.testing.assert_allclose(curve.observed_fraction, observed, atol=1e-12)
    np.testing.assert_allclose(curve.mean_predicted, predicted, atol=1e-12)
    assert curve.counts.sum() == 300


def test_calibration_curve_on_a_hand_counted_example() -> None:
    p = [0.05, 0.15, 0.12, 0.55, 0.6, 0.95]
    y = [0, 0, 1, 1, 0, 1]
    curve = calibration_curve(y, p, n_bins=2)  # bins [0, 0.5], (0.5, 1]
    assert curve.counts.tolist() == [3, 3]
    np.testing.assert_allclose(curve.observed_fraction, [1 / 3, 2 / 3])
    np.testing.assert_allclose(curve.mean_predicted, [0.32 / 3, 2.1 / 3])


def hand_hosmer_lemeshow(y: list[int], p: list[float], size: int) -> float:
    """The two-term Pearson form over consecutive groups of ``size`` sorted risks."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    total = 0.0
    for start in range(0, len(p), size):
        members = order[start : start + size]
        o1 = sum(y[i] for i in members)
        e1 = sum(p[i] for i in members)
        o0 = len(members) - o1
        e0 = len(members) - e1
        total += (o1 - e1) ** 2 / e1 + (o0 - e0) ** 2 / e0
    return total


def test_hosmer_lemeshow_on_a_hand_computation() -> None:
    """20 cases in 4 groups of 5 (df 2, where the chi-squared tail is exp(-C / 2))."""
    p = [0.05, 0.08, 0.10, 0.12, 0.15, 0.20, 0.22, 0.25, 0.30, 0.33,
         0.40, 0.45, 0.50, 0.55, 0.60, 0.70, 0.75, 0.80, 0.85, 0.90]  # fmt: skip
    y = [0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    hl = hosmer_lemeshow(y, p, groups=4)
    assert [g.n for g in hl.groups] == [5, 5, 5, 5]
    assert [g.observed for g in hl.groups] == [1, 2, 2, 4]
    assert hl.groups[0].expected == pytest.approx(0.50)
    assert hl.df == 2
    assert hl.statistic == pytest.approx(hand_hosmer_lemeshow(y, p, 5), rel=1e-12)
    assert hl.p_value == pytest.approx(math.exp(-hl.statistic / 2), rel=1e-12)


def test_hosmer_lemeshow_deciles_on_a_hand_computation() -> None:
    rng = np.random.default_rng(10)
    p = rng.uniform(0.02, 0.9, 100)
    y = (rng.random(100) < p).astype(int)
    hl = hosmer_lemeshow(y, p)
    assert hl.df == 8 and [g.n for g in hl.groups] == [10] * 10
    assert hl.statistic == pytest.approx(hand_hosmer_lemeshow(y.tolist(), p.tolist(), 10))
    assert hl.p_value == pytest.approx(chi2.sf(hl.statistic, 8))


def test_hosmer_lemeshow_rarely_rejects_a_calibrated_model() -> None:
    """Outcomes drawn from the model's own risks: p < 0.05 in about 5% of 200 samples."""
    rng = np.random.default_rng(12)
    rejections = 0
    for _ in range(200):
        p = 1 / (1 + np.exp(-rng.normal(-0.5, 1.2, 400)))
        y = (rng.random(400) < p).astype(int)
        rejections += hosmer_lemeshow(y, p).p_value < 0.05
    assert rejections <= 20  # P(X > 20) < 0.1% for X ~ Binomial(200, 0.05)
    miscalibrated = 1 / (1 + np.exp(-rng.normal(-0.5, 1.2, 400)))
    y = (rng.random(400) < miscalibrated).astype(int)
    assert hosmer_lemeshow(y, np.clip(miscalibrated * 1.8, 0, 0.99)).p_value < 0.001


def test_hosmer_lemeshow_keeps_tied_risks_together() -> None:
    """Four risk levels x 25 cases. Decile breaks 0.1 (x3), 0.3 (x2), 0.4, 0.5 (x2), 0.7 (x3)
    merge to 0.1, 0.3, 0.4, 0.5, 0.7; as R's ``cut(include.lowest = TRUE)`` the first group
    is [0.1, 0.3] and (0.3, 0.4] is empty: three groups of 50, 25, 25, so df = 1."""
    p = np.repeat([0.1, 0.3, 0.5, 0.7], 25)
    assert np.array_equal(risk_groups(p, 10), np.repeat([0, 1, 2], [50, 25, 25]))
    y = np.zeros(100, dtype=int)
    y[[0, 1, 25, 26, 27, 28, 29, 30, 31, 50, 51, 52, 53, 54, 55, 56, 57, 58, 75]] = 1
    hl = hosmer_lemeshow(y, p)
    assert hl.df == 1 and [g.n for g in hl.groups] == [50, 25, 25]
    assert [g.observed for g in hl.groups] == [9, 9, 1]
    expected = [10.0, 12.5, 17.5]
    by_hand = sum(
        (o - e) ** 2 / e + ((n - o) - (n - e)) ** 2 / (n - e)
        for o, e, n in zip([9, 9, 1], expected, [50, 25, 25], strict=True)
    )
    assert hl.statistic == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="distinct groups"):
        hosmer_lemeshow([0, 1, 0, 1], [0.2, 0.2, 0.6, 0.6])


# ── Decision curve ──────────────────────────────────────────────────────────


def test_net_benefit_on_a_hand_computation() -> None:
    """pt 0.35: treated 0.9 (event), 0.8 (not), 0.4 (event): NB = 2/5 - 1/5 * 0.35/0.65.
    pt 0.2 adds 0.3 (not): 2/5 - 2/5 * 0.25; pt 0.85 treats 0.9 only: 1/5."""
    y = [1, 0, 1, 0, 0]
    p = [0.9, 0.8, 0.4, 0.3, 0.1]
    assert net_benefit(y, p, [0.35])[0] == pytest.approx(2 / 5 - 1 / 5 * 0.35 / 0.65)
    curve = decision_curve(y, p, [0.2, 0.35, 0.85])
    np.testing.assert_allclose(
        curve.model, [2 / 5 - 2 / 5 * 0.25, 2 / 5 - 1 / 5 * 0.35 / 0.65, 1 / 5]
    )
    np.testing.assert_allclose(
        curve.treat_all, [0.4 - 0.6 * 0.25, 0.4 - 0.6 * 0.35 / 0.65, 0.4 - 0.6 * 0.85 / 0.15]
    )
    assert np.array_equal(curve.treat_none, [0.0, 0.0, 0.0])


def test_net_benefit_equals_the_formula_over_the_default_thresholds() -> None:
    rng = np.random.default_rng(13)
    p = rng.beta(2, 4, 250)
    y = (rng.random(250) < p).astype(int)
    curve = decision_curve(y, p)
    assert curve.thresholds[0] == 0.01 and curve.thresholds[-1] == 0.99
    for pt, nb in zip(curve.thresholds, curve.model, strict=True):
        tp = sum(1 for pi, yi in zip(p, y, strict=True) if pi >= pt and yi == 1)
        fp = sum(1 for pi, yi in zip(p, y, strict=True) if pi >= pt and yi == 0)
        assert nb == pytest.approx(tp / 250 - fp / 250 * pt / (1 - pt), abs=1e-12)
    # Treating everyone is the model with every risk above the threshold.
    np.testing.assert_allclose(curve.treat_all, net_benefit(y, np.ones(250), curve.thresholds))
    with pytest.raises(ValueError, match="strictly between"):
        net_benefit(y, p, [0.0, 0.5])


# ── Nested logistic models ──────────────────────────────────────────────────


def logistic_data(n: int, seed: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    risk = 1 / (1 + np.exp(-(-0.4 + 0.9 * x[:, 0] + 0.5 * x[:, 1])))
    return (rng.random(n) < risk).astype(np.int64), x


def test_lr_test_against_the_intercept_equals_statsmodels_llr() -> None:
    y, x = logistic_data(300, seed=14)
    reference = sm.Logit(y, sm.add_constant(x)).fit(disp=0)
    test = compare_nested_logit(y, None, x)
    assert test.df == 3
    assert test.statistic == pytest.approx(reference.llr, rel=1e-8)
    assert test.p_value == pytest.approx(reference.llr_pvalue, rel=1e-6)


def test_lr_test_of_nested_models_equals_twice_the_log_likelihood_gain() -> None:
    y, x = logistic_data(300, seed=15)
    small = sm.Logit(y, sm.add_constant(x[:, :1])).fit(disp=0)
    large = sm.Logit(y, sm.add_constant(x)).fit(disp=0)
    test = compare_nested_logit(y, x[:, 0], x)
    statistic = 2 * (large.llf - small.llf)
    assert test.df == 2
    assert test.statistic == pytest.approx(statistic, rel=1e-8)
    assert test.p_value == pytest.approx(math.exp(-statistic / 2), rel=1e-6)  # df 2
    same = likelihood_ratio_test(fit_logit(y, x[:, :1]), fit_logit(y, x))
    assert same.statistic == pytest.approx(statistic, rel=1e-8)


def test_aic_is_2k_minus_2_llf() -> None:
    y, x = logistic_data(200, seed=16)
    fit = fit_logit(y, x)
    reference = sm.Logit(y, sm.add_constant(x)).fit(disp=0)
    assert fit.n_params == 4
    assert fit.aic == pytest.approx(2 * 4 - 2 * reference.llf, rel=1e-10)
    assert fit.aic == pytest.approx(reference.aic, rel=1e-10)
    assert aic(-100.0, 3) == 206.0


def test_nested_models_refuse_bad_designs() -> None:
    y, x = logistic_data(100, seed=17)
    with pytest.raises(ValueError, match="not nested"):
        compare_nested_logit(y, x[:, 2], x[:, :2])
    with pytest.raises(ValueError, match="more parameters"):
        likelihood_ratio_test(fit_logit(y, x), fit_logit(y, x[:, :1]))
    with pytest.raises(ValueError, match="cannot be fitted"):
        fit_logit([0, 0, 0, 1, 1, 1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


# ── Report ──────────────────────────────────────────────────────────────────


def test_evaluation_table_rows_markdown_and_csv() -> None:
    y, (s100b, wfns, _) = case_markers()
    rows = evaluation_table({"s100b": (y, s100b), "wfns": (y, wfns)}, cutoffs={"wfns": 3.0})
    first, second = rows
    assert first.model == "s100b" and first.cutoff_source == "youden"
    assert first.auc == auc_ci_delong(y, s100b)
    assert first.metrics == metrics_at_youden(y, s100b)
    assert second.cutoff_source == "given" and second.metrics == metrics_at_cutoff(y, wfns, 3.0)
    assert (first.n, first.n_positive) == (113, 41)

    markdown = to_markdown(rows)
    lines = markdown.splitlines()
    assert lines[0] == (
        "| Model | AUC (95% CI) | Cut-off | Sensitivity | Specificity | Accuracy | PPV | NPV |"
    )
    m = first.metrics
    values = [m.cutoff, m.sensitivity, m.specificity, m.accuracy, m.ppv, m.npv]
    expected = " | ".join(f"{v:.3f}" for v in values)
    assert lines[2] == f"| s100b | {first.auc.format(3)} | {expected} |"

    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [r["model"] for r in parsed] == ["s100b", "wfns"]
    assert float(parsed[0]["auc"]) == first.auc.auc
    assert int(parsed[1]["tp"]) == second.metrics.confusion.tp
    assert parsed[1]["cutoff_source"] == "given"

    boot = evaluation_table({"s100b": (y, s100b)}, ci_method="bootstrap", n_bootstrap=200)
    assert boot[0].auc.method == "bootstrap"
    with pytest.raises(ValueError, match="unknown models"):
        evaluation_table({"s100b": (y, s100b)}, cutoffs={"combined": 0.5})


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        auc_ci_delong([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="paired"):
        delong_test([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="probabilities"):
        hosmer_lemeshow([0, 1, 0, 1], [0.1, 1.2, 0.3, 0.4])
