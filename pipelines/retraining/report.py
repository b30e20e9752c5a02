"""The retraining report: one HTML page and its PNG figures (matplotlib, Agg backend).

For the candidate and the model in service on the same held-out cases: ROC curves with
their AUC and DeLong 95% CI (and a pointwise 95% bootstrap band for the candidate), the
calibration curve with the Hosmer-Lemeshow test and the calibration slope, decision
curves (net benefit against treat-all and treat-none), the study's held-out table,
DeLong's paired comparison, the gate's verdict, and a warning when the held-out set has
too few events to decide. Writing is the only side effect; the figures are built from
pure functions of ``pipelines.evaluation``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_curve

from pipelines.evaluation import (
    EvaluationRow,
    auc_ci_delong,
    calibration_curve,
    decision_curve,
    delong_test,
    hosmer_lemeshow,
    to_markdown,
)
from pipelines.retraining.gate import GateDecision

ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"
DECISION_PNG = "decision_curve.png"
REPORT_HTML = "report.html"
FIGURES = (ROC_PNG, CALIBRATION_PNG, DECISION_PNG)
BAND_REPLICATES = 200
FPR_GRID = np.linspace(0.0, 1.0, 101)
CALIBRATION_BINS = 5
HL_GROUPS = 5
DPI = 100


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows (risks on the same held-out cases, in one order)."""

    model_name: str
    version: str
    notice: str
    y_true: NDArray[np.int_]
    candidate: NDArray[np.float64]
    in_service: NDArray[np.float64] | None
    service_version: str | None
    table: Sequence[EvaluationRow]
    gate: GateDecision
    min_events: int
    n_train: int
    n_cases: int
    split: str  # how the cases were split, in words


def _roc_band(y: NDArray[np.int_], risk: NDArray[np.float64], seed: int = 0) -> NDArray[np.float64]:
    """Pointwise 95% bootstrap band of the ROC's TPR on :data:`FPR_GRID` (2 x grid)."""
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(BAND_REPLICATES):
        pick = rng.integers(0, y.size, y.size)
        if np.unique(y[pick]).size < 2:
            continue
        fpr, tpr, _ = roc_curve(y[pick], risk[pick])
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    return np.percentile(np.array(curves), [2.5, 97.5], axis=0)


def _models(inputs: ReportInputs) -> list[tuple[str, NDArray[np.float64]]]:
    models = [(f"candidate {inputs.version}", inputs.candidate)]
    if inputs.in_service is not None:
        models.append((f"in service {inputs.service_version}", inputs.in_service))
    return models


def plot_roc(inputs: ReportInputs, path: Path) -> Path:
    """ROC curves with AUC (DeLong 95% CI) and the candidate's bootstrap band."""
    fig, ax = plt.subplots(figsize=(5, 5))
    y = inputs.y_true
    for index, (label, risk) in enumerate(_models(inputs)):
        fpr, tpr, _ = roc_curve(y, risk)
        ci = auc_ci_delong(y, risk)
        ax.step(fpr, tpr, where="post", label=f"{label}: AUC {ci.format(2)}")
        if index == 0:
            low, high = _roc_band(y, risk)
            ax.fill_between(FPR_GRID, low, high, alpha=0.2, label="candidate 95% bootstrap band")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, held-out cases")
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def hosmer_lemeshow_text(y: NDArray[np.int_], risk: NDArray[np.float64]) -> str:
    """The Hosmer-Lemeshow test in words, or why it cannot be computed on these risks."""
    try:
        test = hosmer_lemeshow(y, risk, groups=HL_GROUPS)
    except ValueError as exc:
        return f"Hosmer-Lemeshow not computable ({exc})"
    return f"Hosmer-Lemeshow {test.statistic:.1f} (df {test.df}), p {test.p_value:.2f}"


def plot_calibration(inputs: ReportInputs, path: Path) -> Path:
    """Binned calibration curves with the Hosmer-Lemeshow test of each model."""
    fig, ax = plt.subplots(figsize=(5, 5))
    y = inputs.y_true
    for label, risk in _models(inputs):
        curve = calibration_curve(y, risk, n_bins=CALIBRATION_BINS)
        ax.plot(
            curve.mean_predicted, curve.observed_fraction, marker="o",
            label=f"{label}: {hosmer_lemeshow_text(y, risk)}",
        )  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    ax.set(xlabel="predicted risk", ylabel="observed fraction", title="Calibration")
    ax.legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_decision(inputs: ReportInputs, path: Path) -> Path:
    """Decision curves: net benefit of each model, treat-all and treat-none."""
    fig, ax = plt.subplots(figsize=(5, 4))
    y = inputs.y_true
    curve = None
    for label, risk in _models(inputs):
        curve = decision_curve(y, risk)
        ax.plot(curve.thresholds, curve.model, label=label)
    if curve is not None:
        ax.plot(curve.thresholds, curve.treat_all, linestyle="--", label="treat all")
        ax.plot(curve.thresholds, curve.treat_none, linestyle=":", color="grey", label="treat none")
    prevalence = float(np.mean(y))
    ax.set_ylim(-0.05, max(prevalence, 0.05) * 1.1)
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curves")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def too_small_warning(y_true: NDArray[np.int_], min_events: int) -> str | None:
    """The warning shown when the held-out set has fewer than ``min_events`` of a class."""
    events = int(np.sum(y_true))
    non_events = int(y_true.size - events)
    if min(events, non_events) >= min_events:
        return None
    return (
        f"The held-out set is too small to decide: {events} events and {non_events} "
        f"non-events (at least {min_events} of each are needed). Its AUC, calibration and "
        "comparison cannot tell a better model from a worse one."
    )


def comparison_text(inputs: ReportInputs) -> str:
    """DeLong's paired comparison with the model in service, in words."""
    if inputs.in_service is None:
        return "No model in service to compare with."
    test = delong_test(inputs.y_true, inputs.candidate, inputs.in_service)
    return (
        f"Candidate {inputs.version} AUC {test.auc_a:.3f} vs in service "
        f"{inputs.service_version} AUC {test.auc_b:.3f} on the same {inputs.y_true.size} "
        f"held-out cases: difference {test.difference:+.3f} (SE {test.se:.3f}), "
        f"DeLong z {test.z:.2f}, p {test.p_value:.3f}."
    )


def _markdown_table_html(markdown: str) -> str:
    """The evaluation table's Markdown rendered as an HTML table."""
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head, body = rows[0], rows[2:]
    out = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join([*out, "</table>"])


def _metrics_html(metrics: Mapping[str, object]) -> str:
    items = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in metrics.items()
    )
    return f"<ul>{items}</ul>"


def ascii_text(text: str) -> str:
    """``text`` in ASCII: dashes become ``-``, other non-ASCII characters ``?``."""
    return text.replace("\u2014", "-").replace("\u2013", "-").encode("ascii", "replace").decode()


def write_report(inputs: ReportInputs, folder: Path) -> Path:
    """Write ``report.html`` and its figures into ``folder``; returns the HTML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plot_roc(inputs, folder / ROC_PNG)
    plot_calibration(inputs, folder / CALIBRATION_PNG)
    plot_decision(inputs, folder / DECISION_PNG)
    warning = too_small_warning(inputs.y_true, inputs.min_events)
    verdict = "passed" if inputs.gate.passed else "failed"
    title = f"{html.escape(inputs.model_name)} {html.escape(inputs.version)}"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in inputs.gate.reasons)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "</head><body>",
        f"<h1>{title}: retraining report</h1>",
        f"<p><strong>{html.escape(ascii_text(inputs.notice))}</strong></p>",
        f"<p>Cases: {inputs.n_cases}; training {inputs.n_train}; held out "
        f"{inputs.y_true.size} ({int(inputs.y_true.sum())} events). "
        f"{html.escape(inputs.split)}</p>",
    ]
    if warning:
        parts.append(f'<p class="warning"><strong>Warning:</strong> {html.escape(warning)}</p>')
    parts += [
        f"<h2>Promotion gate: {verdict}</h2>",
        f"<ul>{reasons}</ul>" if reasons else "<p>Every criterion met.</p>",
        _metrics_html(inputs.gate.metrics),
        "<h2>Calibration (Hosmer-Lemeshow)</h2>",
        "<ul>"
        + "".join(
            f"<li>{html.escape(label)}: "
            f"{html.escape(hosmer_lemeshow_text(inputs.y_true, risk))}</li>"
            for label, risk in _models(inputs)
        )
        + "</ul>",
        "<h2>Comparison with the model in service (DeLong)</h2>",
        f"<p>{html.escape(comparison_text(inputs))}</p>",
        "<h2>Held-out table</h2>",
        _markdown_table_html(to_markdown(inputs.table)) if inputs.table else "<p>(no table)</p>",
        "<h2>Figures</h2>",
        *(f'<p><img src="{name}" alt="{name}"></p>' for name in FIGURES),
        "</body></html>",
    ]
    path = folder / REPORT_HTML
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
