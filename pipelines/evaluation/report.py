"""The model comparison table in the HT study's format, as rows, Markdown or CSV.

Columns as in Jiang et al. (Sci Rep 2025): AUC (95% CI), sensitivity, specificity,
accuracy, PPV, NPV, each model at its Youden cut-off or at a given (e.g. stored) cut-off.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from numpy.typing import ArrayLike

from pipelines.evaluation.bootstrap import auc_ci_bootstrap
from pipelines.evaluation.delong import auc_ci_delong
from pipelines.evaluation.inputs import binary_outcome
from pipelines.evaluation.roc import AucInterval, CiMethod
from pipelines.evaluation.thresholds import (
    ClassificationMetrics,
    metrics_at_cutoff,
    youden_cutoff,
)

CutoffSource = Literal["youden", "given"]

CSV_COLUMNS = (
    "model",
    "n",
    "n_positive",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
    "ci_method",
    "ci_level",
    "cutoff",
    "cutoff_source",
    "sensitivity",
    "specificity",
    "accuracy",
    "ppv",
    "npv",
    "tp",
    "fp",
    "tn",
    "fn",
)


@dataclass(frozen=True)
class EvaluationRow:
    """One model's line of the table."""

    model: str
    n: int
    n_positive: int
    auc: AucInterval
    metrics: ClassificationMetrics
    cutoff_source: CutoffSource


def evaluation_table(
    models: Mapping[str, tuple[ArrayLike, ArrayLike]],
    cutoffs: Mapping[str, float] | None = None,
    ci_method: CiMethod = "delong",
    level: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> list[EvaluationRow]:
    """Evaluate each model's ``(y_true, y_score)`` in the order given.

    A model named in ``cutoffs`` is classified at that cut-off (``score >= cutoff``), the
    others at the Youden cut-off of their own cases. The AUC interval is DeLong's or the
    stratified bootstrap's (``n_bootstrap`` replicates from ``seed``).
    """
    given = dict(cutoffs or {})
    unknown = sorted(set(given) - set(models))
    if unknown:
        raise ValueError(f"cut-offs given for unknown models: {unknown}")
    rows = []
    for name, (y_true, y_score) in models.items():
        y = binary_outcome(y_true)
        if ci_method == "delong":
            interval = auc_ci_delong(y, y_score, level)
        elif ci_method == "bootstrap":
            interval = auc_ci_bootstrap(y, y_score, level, n_bootstrap, seed)
        else:
            raise ValueError(f"ci_method must be 'delong' or 'bootstrap', not {ci_method!r}")
        source: CutoffSource = "given" if name in given else "youden"
        cutoff = given[name] if name in given else youden_cutoff(y, y_score)
        rows.append(
            EvaluationRow(
                model=name,
                n=int(y.size),
                n_positive=int(y.sum()),
                auc=interval,
                metrics=metrics_at_cutoff(y, y_score, cutoff),
                cutoff_source=source,
            )
        )
    return rows


def _number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def to_markdown(rows: Sequence[EvaluationRow], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table: model, AUC (CI), cut-off and the five ratios."""
    if not rows:
        raise ValueError("no rows to render")
    percent = round(rows[0].auc.level * 100)
    header = (
        "Model",
        f"AUC ({percent}% CI)",
        "Cut-off",
        "Sensitivity",
        "Specificity",
        "Accuracy",
        "PPV",
        "NPV",
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        m = row.metrics
        cells = (
            row.model,
            row.auc.format(digits),
            _number(m.cutoff, digits),
            *(_number(v, digits) for v in (m.sensitivity, m.specificity, m.accuracy, m.ppv, m.npv)),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[EvaluationRow]) -> str:
    """CSV with a header (``CSV_COLUMNS``), full precision and the confusion counts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        m = row.metrics
        c = m.confusion
        writer.writerow(
            (
                row.model,
                row.n,
                row.n_positive,
                repr(row.auc.auc),
                repr(row.auc.low),
                repr(row.auc.high),
                row.auc.method,
                repr(row.auc.level),
                repr(m.cutoff),
                row.cutoff_source,
                *(repr(v) for v in (m.sensitivity, m.specificity, m.accuracy, m.ppv, m.npv)),
                c.tp,
                c.fp,
                c.tn,
                c.fn,
            )
        )
    return buffer.getvalue()
