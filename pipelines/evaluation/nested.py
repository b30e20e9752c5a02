"""Nested logistic models: maximum-likelihood fits (statsmodels), AIC and the LR test.

Used to ask whether adding a source (e.g. the DL score to the clinical variables, as in
Lee et al. 2024) improves the fit: the likelihood-ratio statistic 2 (llf_full -
llf_reduced) follows chi-squared with as many degrees of freedom as parameters added.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from pipelines.evaluation.inputs import binary_outcome

_NESTING_TOLERANCE = 1e-8
"""Largest relative residual of a reduced-model column projected on the full design."""


@dataclass(frozen=True)
class LogitFit:
    """A fitted logistic model: coefficients, log-likelihood and size."""

    params: NDArray[np.float64]  # intercept first when one was added
    llf: float
    n_params: int  # estimated coefficients, intercept included
    n_obs: int

    @property
    def aic(self) -> float:
        """Akaike's information criterion, 2k - 2 llf."""
        return aic(self.llf, self.n_params)


@dataclass(frozen=True)
class LikelihoodRatioTest:
    """Likelihood-ratio test of a reduced logistic model against a full one nesting it."""

    statistic: float  # 2 (llf_full - llf_reduced)
    df: int  # n_params_full - n_params_reduced
    p_value: float
    reduced: LogitFit
    full: LogitFit


def aic(llf: float, n_params: int) -> float:
    """Akaike's information criterion from a log-likelihood and the number of parameters."""
    return 2.0 * n_params - 2.0 * llf


def design_matrix(
    x: ArrayLike | None, n_obs: int, add_constant: bool = True
) -> NDArray[np.float64]:
    """Predictors as an (n, p) float matrix, with a leading column of ones if asked.

    ``x`` may be None or have no columns (intercept-only model), be 1-D (one predictor)
    or 2-D.
    """
    if x is None:
        columns = np.empty((n_obs, 0))
    else:
        columns = np.asarray(x, dtype=np.float64)
        if columns.ndim == 1:
            columns = columns[:, None]
    if columns.ndim != 2 or columns.shape[0] != n_obs:
        raise ValueError(f"predictors must have {n_obs} rows, got shape {columns.shape}")
    if not np.all(np.isfinite(columns)):
        raise ValueError("predictors hold NaN or infinite values")
    if add_constant:
        columns = np.column_stack([np.ones(n_obs), columns])
    if columns.shape[1] == 0:
        raise ValueError("the model has no parameter: add a constant or predictors")
    return columns


def fit_logit(y_true: ArrayLike, x: ArrayLike | None, add_constant: bool = True) -> LogitFit:
    """Fit a logistic regression by maximum likelihood (statsmodels ``Logit``, Newton).

    Raises ``ValueError`` under complete or quasi-complete separation and when the
    optimiser does not converge, since the log-likelihood would then mean nothing.
    """
    y = binary_outcome(y_true)
    design = design_matrix(x, y.size, add_constant)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            result = sm.Logit(y, design).fit(disp=0, maxiter=100)
        except (PerfectSeparationWarning, ConvergenceWarning) as problem:
            raise ValueError(f"logistic regression cannot be fitted: {problem}") from problem
    if not result.mle_retvals.get("converged", False):
        raise ValueError("logistic regression did not converge")
    return LogitFit(
        params=np.asarray(result.params, dtype=np.float64),
        llf=float(result.llf),
        n_params=design.shape[1],
        n_obs=y.size,
    )


def likelihood_ratio_test(reduced: LogitFit, full: LogitFit) -> LikelihoodRatioTest:
    """LR test of two fitted logistic models on the same cases, ``reduced`` nested in ``full``.

    The caller vouches for the nesting; ``compare_nested_logit`` checks it from the data.
    """
    if reduced.n_obs != full.n_obs:
        raise ValueError(f"models fitted on {reduced.n_obs} and {full.n_obs} cases")
    df = full.n_params - reduced.n_params
    if df < 1:
        raise ValueError("the full model must have more parameters than the reduced one")
    statistic = max(2.0 * (full.llf - reduced.llf), 0.0)
    return LikelihoodRatioTest(
        statistic=statistic,
        df=df,
        p_value=float(chi2.sf(statistic, df)),
        reduced=reduced,
        full=full,
    )


def _is_nested(reduced: NDArray[np.float64], full: NDArray[np.float64]) -> bool:
    """Whether every column of ``reduced`` lies in the column space of ``full``."""
    if reduced.shape[1] == 0:
        return True
    coef, *_ = np.linalg.lstsq(full, reduced, rcond=None)
    residual = np.linalg.norm(full @ coef - reduced, axis=0)
    scale = np.maximum(np.linalg.norm(reduced, axis=0), 1.0)
    return bool(np.all(residual <= _NESTING_TOLERANCE * scale * math.sqrt(reduced.shape[0])))


def compare_nested_logit(
    y_true: ArrayLike,
    x_reduced: ArrayLike | None,
    x_full: ArrayLike,
    add_constant: bool = True,
) -> LikelihoodRatioTest:
    """Fit both logistic models and test the reduced one against the full one.

    Refuses designs that are not nested (a reduced column outside the span of the full
    design). Each fit carries its AIC (``LikelihoodRatioTest.reduced.aic``, ``.full.aic``).
    """
    y = binary_outcome(y_true)
    small = design_matrix(x_reduced, y.size, add_constant)
    large = design_matrix(x_full, y.size, add_constant)
    if not _is_nested(small, large):
        raise ValueError("the reduced model is not nested in the full model")
    return likelihood_ratio_test(fit_logit(y, small, False), fit_logit(y, large, False))
