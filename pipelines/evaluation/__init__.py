"""Statistics for risk models: the figures the studies of ``docs/seeds.md`` report.

Discrimination (AUC with DeLong or bootstrap CI, DeLong's paired test), classification at
a cut-off (Youden or stored), calibration (binned curve, Hosmer-Lemeshow), clinical
utility (decision curve net benefit), nested logistic models (likelihood ratio, AIC), and
the model comparison table. Every function is pure: arrays in, frozen dataclasses out.
Outcomes are 0/1 with 1 the event; higher scores mean higher risk.
"""

from pipelines.evaluation.bootstrap import auc_ci_bootstrap, bootstrap_aucs
from pipelines.evaluation.calibration import (
    CalibrationCurve,
    HosmerLemeshow,
    HosmerLemeshowGroup,
    calibration_curve,
    hosmer_lemeshow,
    risk_groups,
)
from pipelines.evaluation.decision_curve import DecisionCurve, decision_curve, net_benefit
from pipelines.evaluation.delong import (
    DelongEstimate,
    DelongTest,
    auc_ci_delong,
    delong_covariance,
    delong_test,
)
from pipelines.evaluation.nested import (
    LikelihoodRatioTest,
    LogitFit,
    aic,
    compare_nested_logit,
    fit_logit,
    likelihood_ratio_test,
)
from pipelines.evaluation.report import EvaluationRow, evaluation_table, to_csv, to_markdown
from pipelines.evaluation.roc import AucInterval, auc
from pipelines.evaluation.thresholds import (
    ClassificationMetrics,
    ConfusionMatrix,
    metrics_at_cutoff,
    metrics_at_youden,
    youden_cutoff,
)

__all__ = [
    "AucInterval",
    "CalibrationCurve",
    "ClassificationMetrics",
    "ConfusionMatrix",
    "DecisionCurve",
    "DelongEstimate",
    "DelongTest",
    "EvaluationRow",
    "HosmerLemeshow",
    "HosmerLemeshowGroup",
    "LikelihoodRatioTest",
    "LogitFit",
    "aic",
    "auc",
    "auc_ci_bootstrap",
    "auc_ci_delong",
    "bootstrap_aucs",
    "calibration_curve",
    "compare_nested_logit",
    "decision_curve",
    "delong_covariance",
    "delong_test",
    "evaluation_table",
    "fit_logit",
    "hosmer_lemeshow",
    "likelihood_ratio_test",
    "metrics_at_cutoff",
    "metrics_at_youden",
    "net_benefit",
    "risk_groups",
    "to_csv",
    "to_markdown",
    "youden_cutoff",
]
