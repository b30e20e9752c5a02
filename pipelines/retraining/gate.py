"""The promotion gate: is a retrained candidate fit to replace the model in service?

Pure functions of the held-out outcomes and the two models' risks on the same cases.
A candidate passes when all of these hold (:class:`GatePolicy`):

1. **Enough events**: at least ``min_events`` events (and as many non-events) among the
   held-out cases; fewer cannot decide anything and the gate says so first.
2. **Non-inferior discrimination**: with DeLong's paired test on the same held-out cases,
   the lower bound of the one-sided ``level`` confidence interval of
   ``AUC(candidate) - AUC(in service)`` lies above ``-margin``. Without a model in
   service (or without its risks) this criterion is not applied and the verdict says so.
3. **Calibration slope within bounds**: the slope of the logistic recalibration
   ``logit P(y = 1) = a + b logit(risk)`` (Cox 1958) lies in
   ``[slope_min, slope_max]``; 1 is perfect, below 1 the risks are too extreme
   (overfitting), above 1 too timid. A slope that cannot be fitted (separation) fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

from pipelines.evaluation import auc_ci_delong, delong_test, fit_logit

RISK_CLIP = 1e-6
"""Risks are clipped to [1e-6, 1 - 1e-6] before the logit (0 and 1 have none)."""


@dataclass(frozen=True)
class GatePolicy:
    """The gate's thresholds (``[retraining]`` ``margin``, ``slope_min``, ``slope_max``,
    ``min_events``, ``level``)."""

    margin: float = 0.05
    slope_min: float = 0.5
    slope_max: float = 2.0
    min_events: int = 10
    level: float = 0.95


@dataclass(frozen=True)
class GateDecision:
    """The verdict: passed or not, each failed criterion in words, and the figures."""

    passed: bool
    reasons: tuple[str, ...]
    metrics: dict[str, Any] = field(default_factory=dict)


def calibration_slope(y_true: ArrayLike, risk: ArrayLike) -> float:
    """The calibration slope ``b`` of ``logit P(y) = a + b logit(risk)`` (see the module).

    Raises ``ValueError`` when the recalibration cannot be fitted (separation).
    """
    p = np.clip(np.asarray(risk, dtype=np.float64), RISK_CLIP, 1.0 - RISK_CLIP)
    logit = np.log(p / (1.0 - p))
    fit = fit_logit(y_true, logit[:, None])
    return float(fit.params[1])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate_gate(
    y_true: ArrayLike,
    candidate: ArrayLike,
    in_service: ArrayLike | None,
    policy: GatePolicy,
) -> GateDecision:
    """Apply the gate (see the module) to the held-out outcomes and both models' risks."""
    y: NDArray[np.int_] = np.asarray(y_true, dtype=int)
    cand = np.asarray(candidate, dtype=np.float64)
    events, non_events = int(y.sum()), int(y.size - y.sum())
    metrics: dict[str, Any] = {"n_held_out": int(y.size), "events": events}
    reasons: list[str] = []
    if min(events, non_events) < policy.min_events:
        reasons.append(
            f"too few held-out events to decide: {events} events and {non_events} non-events, "
            f"at least {policy.min_events} of each are required"
        )
    if events == 0 or non_events == 0:
        return GateDecision(False, tuple(reasons), metrics)
    ci = auc_ci_delong(y, cand, policy.level)
    metrics.update(auc=ci.auc, auc_low=ci.low, auc_high=ci.high)
    try:
        slope = calibration_slope(y, cand)
    except ValueError as exc:
        reasons.append(f"calibration slope cannot be estimated: {exc}")
        metrics["calibration_slope"] = None
    else:
        metrics["calibration_slope"] = _finite(slope)
        if not policy.slope_min <= slope <= policy.slope_max:
            reasons.append(
                f"calibration slope {slope:.2f} outside [{policy.slope_min}, {policy.slope_max}]"
            )
    if in_service is None:
        metrics["non_inferiority"] = "not applied: no model in service to compare with"
    else:
        test = delong_test(y, cand, np.asarray(in_service, dtype=np.float64))
        lower = test.difference - float(norm.ppf(policy.level)) * test.se
        metrics.update(
            auc_in_service=test.auc_b,
            auc_difference=test.difference,
            difference_lower_bound=lower,
            delong_p=test.p_value,
            margin=policy.margin,
        )
        if lower <= -policy.margin:
            reasons.append(
                f"not shown non-inferior to the model in service: AUC {test.auc_a:.3f} vs "
                f"{test.auc_b:.3f}, difference {test.difference:+.3f}, one-sided "
                f"{policy.level:.0%} lower bound {lower:+.3f} not above -{policy.margin}"
            )
    return GateDecision(not reasons, tuple(reasons), metrics)
