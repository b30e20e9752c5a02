"""Calibration: the binned calibration curve and the Hosmer-Lemeshow goodness-of-fit test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2

from pipelines.evaluation.inputs import binary_outcome, probability_vector

BinStrategy = Literal["uniform", "quantile"]


@dataclass(frozen=True)
class CalibrationCurve:
    """Observed event fraction against mean predicted risk, one entry per non-empty bin."""

    mean_predicted: NDArray[np.float64]
    observed_fraction: NDArray[np.float64]
    counts: NDArray[np.int64]
    bin_edges: NDArray[np.float64]  # all n_bins + 1 edges, empty bins included


@dataclass(frozen=True)
class HosmerLemeshowGroup:
    """One risk group of the Hosmer-Lemeshow table."""

    n: int
    observed: int  # events observed
    expected: float  # sum of predicted risks
    mean_predicted: float


@dataclass(frozen=True)
class HosmerLemeshow:
    """Hosmer-Lemeshow statistic, its chi-squared degrees of freedom (groups - 2) and p."""

    statistic: float
    df: int
    p_value: float
    groups: tuple[HosmerLemeshowGroup, ...]


def calibration_curve(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10, strategy: BinStrategy = "uniform"
) -> CalibrationCurve:
    """Binned calibration curve, with the bins of scikit-learn's ``calibration_curve``.

    ``uniform``: equal-width bins on [0, 1]; ``quantile``: edges at quantiles of the
    predicted risks. Bin i holds risks in (edge_i, edge_i+1], the first also its left edge.
    Empty bins are left out of the curve.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y = binary_outcome(y_true, both_classes=False)
    p = probability_vector(y_prob, y.size)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', not {strategy!r}")
    bins = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(bins, minlength=n_bins)
    events = np.bincount(bins, weights=y, minlength=n_bins)
    risk = np.bincount(bins, weights=p, minlength=n_bins)
    kept = counts > 0
    return CalibrationCurve(
        mean_predicted=risk[kept] / counts[kept],
        observed_fraction=events[kept] / counts[kept],
        counts=counts[kept].astype(np.int64),
        bin_edges=edges,
    )


def risk_groups(y_prob: ArrayLike, groups: int = 10) -> NDArray[np.int64]:
    """Group index (0 = lowest risk) of each case, cutting at quantiles of the risks.

    As R's ``ResourceSelection::hoslem.test``: breaks at the ``groups``-quantiles, duplicate
    breaks merged, intervals closed on the right, so tied risks always share a group and
    heavy ties give fewer groups. Empty intervals are dropped; groups are numbered 0..G-1.
    """
    if groups < 3:
        raise ValueError(f"the Hosmer-Lemeshow test needs at least 3 groups, got {groups}")
    p = np.asarray(y_prob, dtype=np.float64)
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, groups + 1)))
    raw = np.searchsorted(edges[1:-1], p, side="left")
    # Interpolated quantiles can bound an interval holding no risk: number the others.
    return np.unique(raw, return_inverse=True)[1].astype(np.int64)


def hosmer_lemeshow(y_true: ArrayLike, y_prob: ArrayLike, groups: int = 10) -> HosmerLemeshow:
    """Hosmer-Lemeshow test over ``groups`` groups of predicted risk (deciles by default).

    C = sum over groups g of (O_g - E_g)^2 / (E_g (1 - E_g / n_g)), with O_g observed and
    E_g expected events (sum of risks) in group g; C follows chi-squared with G - 2 degrees
    of freedom, G the number of groups formed (Hosmer & Lemeshow, Applied Logistic
    Regression, 3rd ed., section 5.2.2). A group whose risks are all 0 or all 1 has no
    variance: it adds nothing when observed equals expected, and makes C infinite (p = 0)
    otherwise.
    """
    y = binary_outcome(y_true, both_classes=False)
    p = probability_vector(y_prob, y.size)
    index = risk_groups(p, groups)
    formed = int(index.max()) + 1
    if formed < 3:
        raise ValueError(f"the risks form only {formed} distinct groups; at least 3 are needed")
    n = np.bincount(index, minlength=formed)
    observed = np.bincount(index, weights=y, minlength=formed)
    expected = np.bincount(index, weights=p, minlength=formed)
    variance = expected * (1.0 - expected / n)
    gap = (observed - expected) ** 2
    if np.any((variance <= 0.0) & (gap > 0.0)):
        statistic = float("inf")
    else:
        safe = variance > 0.0
        statistic = float(np.sum(gap[safe] / variance[safe]))
    df = formed - 2
    return HosmerLemeshow(
        statistic=statistic,
        df=df,
        p_value=float(chi2.sf(statistic, df)),
        groups=tuple(
            HosmerLemeshowGroup(
                n=int(n[g]),
                observed=round(float(observed[g])),
                expected=float(expected[g]),
                mean_predicted=float(expected[g] / n[g]),
            )
            for g in range(formed)
        ),
    )
