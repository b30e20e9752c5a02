"""DeLong's nonparametric AUC variance, its confidence interval, and the paired test.

DeLong, DeLong & Clarke-Pearson (Biometrics 1988;44:837) estimate the covariance of
correlated AUCs from placement values (structural components). The fast algorithm of
Sun & Xu (IEEE Signal Process Lett 2014;21:1389) obtains every placement value from three
midrank computations, O(k N log N) for k scores on N cases instead of O(k m n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

from pipelines.evaluation.inputs import binary_outcome, confidence_level, score_vector
from pipelines.evaluation.roc import AucInterval


@dataclass(frozen=True)
class DelongEstimate:
    """AUCs of k scores on the same cases and their k x k DeLong covariance matrix."""

    aucs: NDArray[np.float64]
    covariance: NDArray[np.float64]


@dataclass(frozen=True)
class DelongTest:
    """DeLong's test of H0: AUC_a = AUC_b for two scores on the same cases."""

    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    se: float  # standard error of the difference
    z: float
    p_value: float  # two-sided


def delong_covariance(y_true: ArrayLike, y_scores: Sequence[ArrayLike]) -> DelongEstimate:
    """AUCs and DeLong covariance of several scores on the same cases (fast DeLong).

    With m events and n non-events, the placement value of event i is the fraction of
    non-events it outranks, V10_i = (Z_i - X_i) / n, and that of non-event j is
    V01_j = 1 - (Z_j - Y_j) / m, where Z are midranks among all cases and X, Y midranks
    within events and within non-events (Sun & Xu 2014, eq. 9-11). The covariance is
    S10 / m + S01 / n, S10 and S01 being the sample covariances (ddof=1) of the placement
    values across the k scores.
    """
    y = binary_outcome(y_true)
    if len(y_scores) == 0:
        raise ValueError("at least one score is needed")
    scores = np.vstack([score_vector(s, y.size, f"y_scores[{i}]") for i, s in enumerate(y_scores)])
    positives = scores[:, y == 1]
    negatives = scores[:, y == 0]
    m = positives.shape[1]
    n = negatives.shape[1]
    tz = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    tx = rankdata(positives, axis=1)
    ty = rankdata(negatives, axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((scores.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((scores.shape[0],) * 2)
    return DelongEstimate(aucs=np.asarray(aucs), covariance=np.asarray(s10 / m + s01 / n))


def auc_ci_delong(y_true: ArrayLike, y_score: ArrayLike, level: float = 0.95) -> AucInterval:
    """AUC with a Wald interval from DeLong's variance, clipped to [0, 1] (as pROC does)."""
    level = confidence_level(level)
    estimate = delong_covariance(y_true, [y_score])
    value = float(estimate.aucs[0])
    se = math.sqrt(max(float(estimate.covariance[0, 0]), 0.0))
    half = float(norm.ppf(0.5 + level / 2.0)) * se
    return AucInterval(
        auc=value,
        se=se,
        low=max(0.0, value - half),
        high=min(1.0, value + half),
        level=level,
        method="delong",
    )


def delong_test(y_true: ArrayLike, y_score_a: ArrayLike, y_score_b: ArrayLike) -> DelongTest:
    """DeLong's z test for two correlated ROC curves (two scores on the same cases).

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab), p two-sided. When the two
    scores rank the cases identically the difference and its variance are both 0 and the
    result is z = 0, p = 1.
    """
    estimate = delong_covariance(y_true, [y_score_a, y_score_b])
    auc_a, auc_b = (float(a) for a in estimate.aucs)
    cov = estimate.covariance
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    difference = auc_a - auc_b
    if variance <= 0.0:
        if difference != 0.0:
            raise ValueError("the AUC difference has zero variance but is not zero")
        return DelongTest(auc_a, auc_b, 0.0, 0.0, 0.0, 1.0)
    se = math.sqrt(variance)
    z = difference / se
    return DelongTest(auc_a, auc_b, difference, se, z, float(2.0 * norm.sf(abs(z))))
