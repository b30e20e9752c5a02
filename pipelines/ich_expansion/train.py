"""Training the expansion model on a cohort and writing it to the model store.

A cohort folder is what :func:`pipelines.ich_expansion.cohort.generate_expansion_cohort`
writes: ``cases/<case_id>/`` (one series each), ``clinical.csv`` (keys and clinical
variables) and ``ground_truth/cases.csv`` (``label_he`` and the generator's true
probability, the oracle). :func:`train_expansion_model`:

1. describes every case: the haematoma by the threshold segmenter ``hyperdense_regions``
   and the bundled haemorrhage-slice classifier, the frozen ImageNet EfficientNet-Lite0
   features of every haematoma frame, the screened clinical variables (a case without
   haematoma is left out and listed);
2. splits by patient (stratified, 25% held out);
3. on the training cases: the per-slice expansion score, an L2 logistic regression
   (``SLICE_C``) on the z-scored frame features with the case's label, and nDL; the
   training cases' nDL is cross-fitted (5 folds by case) so that the models fitted on it
   see nDL as it is on unseen cases; the imputation medians; the clinical model by
   forward selection (logistic, a variable enters while its likelihood-ratio p <
   ``P_ENTER``); the image model (nDL), the integrated model (nDL + the selected
   clinical variables); the LRT and AIC of integrated against clinical;
4. evaluates on the held-out cases (AUC with DeLong 95% CI; sensitivity, specificity,
   accuracy, PPV, NPV at each model's training Youden cut-off; DeLong tests of the
   integrated model against each single source) with the oracle beside them; the same
   fit is repeated over ``REPEAT_SEEDS`` other splits and their held-out AUCs reported;
5. saves the version and writes ``<version>.report.md`` beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store.artefacts import SYNTHETIC_NOTICE, TrainingRecord, save_model, training_data_hash
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.base import PipelineError, SegmentClass
from pipelines.cnn import build_classifier
from pipelines.evaluation import (
    EvaluationRow,
    compare_nested_logit,
    delong_test,
    evaluation_table,
    fit_logit,
    likelihood_ratio_test,
    to_markdown,
    youden_cutoff,
)
from pipelines.evaluation.roc import auc
from pipelines.ht_after_mt.clinical import ClinicalTable
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.ich_expansion.clinical import MODEL_VARIABLES, screen_clinical
from pipelines.ich_expansion.cohort import read_labels
from pipelines.ich_expansion.features import (
    CNN_INPUT,
    find_haematoma,
    frame_inputs,
    pooled_features,
)
from pipelines.ich_expansion.model import (
    BACKBONE,
    HEAD_KEY,
    MODEL_NAME,
    NDL,
    OUTCOME,
    PRIMARY,
    VARIANT_NAMES,
    slice_head_tensors,
    variant_columns,
)
from pipelines.models import patient_split
from pipelines.slice_classifier.classifier import load_slice_classifier, normalised_dl_score
from pipelines.volume import load_series

SLICE_C = 0.005
P_ENTER = 0.05
OOF_FOLDS = 5
TEST_SIZE = 0.25
REPEAT_SEEDS = (1, 2, 3, 4)
BINARY_VARIABLES = frozenset({"sex_male", "hypertension", "antithrombotic"})

Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    """The default progress callback: report nothing."""


@dataclass(frozen=True)
class CohortFeatures:
    """The described cases (with a haematoma), in case-id order."""

    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: NDArray[np.int_]
    oracle: NDArray[np.float64]  # the generator's true probability
    clinical: tuple[Mapping[str, float | None], ...]
    frame_features: tuple[NDArray[np.float64], ...]  # (n_frames, dim) per case
    frame_areas: tuple[NDArray[np.float64], ...]  # (n_frames,) mm2 per case
    skipped: Mapping[str, str]
    table_bytes: bytes


def extract_cohort(cohort_dir: Path, progress: Progress = _quiet) -> CohortFeatures:
    """Describe every case of ``cohort_dir`` (step 1 of the module)."""
    table_path = cohort_dir / "clinical.csv"
    table = ClinicalTable.read(table_path)
    truth = read_labels(cohort_dir)
    folders = sorted(p for p in (cohort_dir / "cases").iterdir() if p.is_dir())
    segmenter = HyperdenseThresholdPipeline()
    classifier = load_slice_classifier()
    backbone = build_classifier(BACKBONE, pretrained=True)
    segment_class = SegmentClass("Haematoma", segmenter.segment_class.category,
                                 segmenter.segment_class.property_type)  # fmt: skip
    out: dict[str, list[Any]] = {k: [] for k in ("id", "pid", "y", "p", "c", "f", "a")}
    skipped: dict[str, str] = {}
    for done, folder in enumerate(folders, start=1):
        series = load_series(sorted(p for p in folder.rglob("*") if p.is_file()))
        try:
            haematoma = find_haematoma(series, segmenter, classifier, segment_class)
        except PipelineError as exc:
            skipped[folder.name] = str(exc)
        else:
            inputs = frame_inputs(series, haematoma, CNN_INPUT)
            label, probability = truth[folder.name]
            out["id"].append(folder.name)
            out["pid"].append(str(series.reference.get("PatientID", "")) or folder.name)
            out["y"].append(label)
            out["p"].append(probability)
            out["c"].append(
                screen_clinical(series.reference, table.find_dataset(series.reference)).values
            )
            out["f"].append(pooled_features(backbone, inputs.samples))
            out["a"].append(haematoma.areas_mm2[list(haematoma.frames)])
        progress("features", done, len(folders))
    return CohortFeatures(
        tuple(out["id"]), tuple(out["pid"]), np.asarray(out["y"], dtype=int),
        np.asarray(out["p"], dtype=np.float64), tuple(out["c"]), tuple(out["f"]),
        tuple(out["a"]), skipped, table_path.read_bytes(),
    )  # fmt: skip


SliceHead = tuple[NDArray[np.float64], float]
"""A per-slice linear head on raw backbone features: (weights, bias) of the logit."""


def fit_slice_model(
    data: CohortFeatures, cases: Sequence[int] | NDArray[np.int64], seed: int
) -> SliceHead:
    """The per-slice expansion score fitted on the frames of ``cases``: an L2 logistic
    regression on z-scored features, the z-scoring folded into the weights."""
    x = np.vstack([data.frame_features[i] for i in cases])
    y = np.concatenate([np.full(len(data.frame_features[i]), data.labels[i]) for i in cases])
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=SLICE_C, max_iter=5000, random_state=seed)
    model.fit(scaler.transform(x), y)
    weight = model.coef_.reshape(-1) / scaler.scale_
    return weight, float(model.intercept_[0]) - float(np.dot(weight, scaler.mean_))


def case_ndl(
    data: CohortFeatures, cases: Sequence[int] | NDArray[np.int64], head: SliceHead
) -> NDArray[np.float64]:
    """nDL of each of ``cases`` under the per-slice ``head``."""
    weight, bias = head
    return np.array(
        [
            normalised_dl_score(
                1.0 / (1.0 + np.exp(-(data.frame_features[i] @ weight + bias))),
                data.frame_areas[i],
            )
            for i in cases
        ]
    )


def cross_fitted_ndl(
    data: CohortFeatures, train: NDArray[np.int64], seed: int
) -> tuple[NDArray[np.float64], SliceHead]:
    """Out-of-fold nDL of the training cases (``OOF_FOLDS`` stratified folds) and the
    bagged head: the mean of the fold heads (the mean of their logits), which scores new
    cases on the scale the out-of-fold scores have."""
    result = np.zeros(len(train))
    heads: list[SliceHead] = []
    folds = StratifiedKFold(n_splits=OOF_FOLDS, shuffle=True, random_state=seed)
    for inner, outer in folds.split(train, data.labels[train]):
        head = fit_slice_model(data, train[inner], seed)
        result[outer] = case_ndl(data, train[outer], head)
        heads.append(head)
    weight = np.mean([h[0] for h in heads], axis=0)
    return result, (weight, float(np.mean([h[1] for h in heads])))


def impute_medians(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Training medians (modes for 0/1 variables) of the clinical variables."""
    medians = {}
    for name in MODEL_VARIABLES:
        seen = np.array([r[name] for r in rows if r.get(name) is not None], dtype=np.float64)
        if seen.size == 0:
            raise ValueError(f"no training case has {name}")
        value = float(np.median(seen))
        medians[name] = float(seen.mean() > 0.5) if name in BINARY_VARIABLES else value
    return medians


def clinical_matrix(
    rows: Sequence[Mapping[str, float | None]], medians: Mapping[str, float]
) -> NDArray[np.float64]:
    """(n, len(MODEL_VARIABLES)) clinical values, missing ones imputed."""
    return np.array(
        [[medians[k] if r.get(k) is None else float(r[k]) for k in MODEL_VARIABLES] for r in rows]  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class SelectionStep:
    """One forward-selection step: the variable that entered and its LRT p-value."""

    variable: str
    p_value: float
    aic: float


def forward_select(
    y: NDArray[np.int_], x: NDArray[np.float64], names: Sequence[str], p_enter: float = P_ENTER
) -> list[SelectionStep]:
    """Forward selection of a logistic model: the variable with the smallest LRT p-value
    enters while it is below ``p_enter``."""
    chosen: list[int] = []
    steps: list[SelectionStep] = []
    current = fit_logit(y, None)
    while len(chosen) < len(names):
        best: tuple[float, int, Any] | None = None
        for j in range(len(names)):
            if j in chosen:
                continue
            try:
                fit = fit_logit(y, x[:, [*chosen, j]])
            except ValueError:
                continue
            p = likelihood_ratio_test(current, fit).p_value
            if best is None or p < best[0]:
                best = (p, j, fit)
        if best is None or best[0] >= p_enter:
            break
        chosen.append(best[1])
        current = best[2]
        steps.append(SelectionStep(names[best[1]], best[0], current.aic))
    return steps


def logistic() -> Pipeline:
    """z-score, then an unpenalised logistic regression (the study's models)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1e6, max_iter=5000))


@dataclass(frozen=True)
class Fit:
    """One fit on one split."""

    train: NDArray[np.int64]
    test: NDArray[np.int64]
    slice_model: SliceHead
    medians: dict[str, float]
    steps: list[SelectionStep]
    models: dict[str, Pipeline]
    cutoffs: dict[str, float]
    test_scores: dict[str, NDArray[np.float64]]
    train_scores: dict[str, NDArray[np.float64]]
    lrt: dict[str, float]


def fit_split(data: CohortFeatures, seed: int) -> Fit:
    """Split, fit every part on the training side and score the held-out side."""
    train, test = patient_split(data.labels, data.patient_ids, TEST_SIZE, seed)
    y_train = data.labels[train]
    ndl = np.zeros(len(data.labels))
    ndl[train], slice_model = cross_fitted_ndl(data, train, seed)
    ndl[test] = case_ndl(data, test, slice_model)
    medians = impute_medians([data.clinical[i] for i in train])
    clinical = clinical_matrix(data.clinical, medians)
    steps = forward_select(y_train, clinical[train], MODEL_VARIABLES)
    if not steps:  # keep a clinical model: the best single variable
        steps = forward_select(y_train, clinical[train], MODEL_VARIABLES, p_enter=1.0)[:1]
    selected = [s.variable for s in steps]
    table = {name: clinical[:, j] for j, name in enumerate(MODEL_VARIABLES)} | {NDL: ndl}
    models: dict[str, Pipeline] = {}
    cutoffs: dict[str, float] = {}
    test_scores: dict[str, NDArray[np.float64]] = {}
    train_scores: dict[str, NDArray[np.float64]] = {}
    for variant in VARIANT_NAMES:
        x = np.column_stack([table[c] for c in variant_columns(variant, selected)])
        models[variant] = logistic().fit(x[train], y_train)
        train_scores[variant] = models[variant].predict_proba(x[train])[:, 1]
        test_scores[variant] = models[variant].predict_proba(x[test])[:, 1]
        cutoffs[variant] = youden_cutoff(y_train, train_scores[variant])
    reduced = np.column_stack([table[c][train] for c in selected])
    lrt = compare_nested_logit(y_train, reduced, np.column_stack([reduced, ndl[train]]))
    summary = {
        "statistic": lrt.statistic, "df": float(lrt.df), "p_value": lrt.p_value,
        "aic_clinical": lrt.reduced.aic, "aic_integrated": lrt.full.aic,
        "aic_image": fit_logit(y_train, ndl[train]).aic,
    }  # fmt: skip
    return Fit(train, test, slice_model, medians, steps, models, cutoffs, test_scores,
               train_scores, summary)  # fmt: skip


def held_out_rows(data: CohortFeatures, fit: Fit) -> list[EvaluationRow]:
    """The held-out table: each model at its training cut-off, then the oracle."""
    y = data.labels[fit.test]
    names = {"clinical": "clinical (forward-selected)", "image": "image (nDL)",
             "integrated": "integrated (nDL + clinical)"}  # fmt: skip
    models = {names[v]: (y, fit.test_scores[v]) for v in VARIANT_NAMES}
    models["oracle (generator's true probability)"] = (y, data.oracle[fit.test])
    cutoffs = {names[v]: fit.cutoffs[v] for v in VARIANT_NAMES}
    cutoffs["oracle (generator's true probability)"] = youden_cutoff(
        data.labels[fit.train], data.oracle[fit.train]
    )
    return evaluation_table(models, cutoffs)


@dataclass(frozen=True)
class TrainingReport:
    """What a training run wrote and measured."""

    folder: Path
    version: str
    n_cases: int
    table: str
    report_path: Path
    held_out_auc: Mapping[str, float]
    repeats: Mapping[int, Mapping[str, float]]
    fit: Fit
    seconds: Mapping[str, float]


def report_name(version: str) -> str:
    """File name of a version's held-out report, beside its folder."""
    return f"{version}.report.md"


def _aucs(data: CohortFeatures, fit: Fit) -> dict[str, float]:
    y = data.labels[fit.test]
    found = {v: auc(y, fit.test_scores[v]) for v in VARIANT_NAMES}
    return found | {"oracle": auc(y, data.oracle[fit.test])}


def _report(
    version: str, data: CohortFeatures, fit: Fit, seed: int,
    repeats: Mapping[int, Mapping[str, float]], seconds: Mapping[str, float],
    cohort: Mapping[str, Any],
) -> str:  # fmt: skip
    """The Markdown report."""
    y_test = data.labels[fit.test]
    rows = held_out_rows(data, fit)
    lines = [
        f"# {MODEL_NAME} {version}: held-out evaluation",
        "",
        f"**{SYNTHETIC_NOTICE}.**",
        "",
        f"Outcome: {OUTCOME} (label_he: growth >= 6 mL or >= 33%). Cohort: "
        f"`pipelines.ich_expansion.cohort` (generator {cohort.get('generator_version')}, seed "
        f"{cohort.get('seed')}, {cohort.get('n_cases')} cases of {cohort.get('rows')} px x "
        f"{cohort.get('n_slices')} slices; its generative model is in that module's docstring "
        "and in the manifest). Cases described: "
        f"{len(data.case_ids)}"
        + (f" ({len(data.skipped)} without haematoma left out)" if data.skipped else "")
        + f"; training {len(fit.train)} ({int(data.labels[fit.train].sum())} HE), held out "
        f"{len(fit.test)} ({int(y_test.sum())} HE), split by patient (seed {seed}).",
        "",
        "AUC with DeLong 95% CI; sensitivity, specificity, accuracy, PPV and NPV at each "
        "model's Youden cut-off on its training cases (the oracle's on the training cases' "
        "true probabilities).",
        "",
        to_markdown(rows),
        f"Clinical forward selection (training; a variable enters while its LRT p < {P_ENTER}; "
        "when none does, the best single one is kept): "
        + ", ".join(f"{s.variable} (p={s.p_value:.2g})" for s in fit.steps)
        + ".",
        "",
        "Integrated vs clinical on the training cases (nDL cross-fitted): likelihood-ratio "
        f"chi2 = {fit.lrt['statistic']:.2f}, df = {int(fit.lrt['df'])}, "
        f"p = {fit.lrt['p_value']:.2g}; "
        f"AIC clinical {fit.lrt['aic_clinical']:.1f}, image {fit.lrt['aic_image']:.1f}, "
        f"integrated {fit.lrt['aic_integrated']:.1f}.",
        "",
    ]
    for other in ("clinical", "image"):
        test = delong_test(y_test, fit.test_scores["integrated"], fit.test_scores[other])
        lines.append(
            f"DeLong, integrated vs {other} (held out): difference {test.difference:+.3f}, "
            f"p = {test.p_value:.2g}."
        )
    lines += ["", f"Held-out AUC over {1 + len(repeats)} patient splits (seeds tried):", "",
              "| split seed | clinical | image (nDL) | integrated | oracle |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s, a in {seed: _aucs(data, fit), **repeats}.items():
        lines.append(
            f"| {s} | {a['clinical']:.3f} | {a['image']:.3f} | {a['integrated']:.3f} | "
            f"{a['oracle']:.3f} |"
        )
    lines += ["", f"The node uses `{PRIMARY}` at cut-off {fit.cutoffs[PRIMARY]:.3f}. Training "
              f"took {sum(seconds.values()):.0f} s on the CPU.", ""]  # fmt: skip
    return "\n".join(lines)


def train_expansion_model(
    cohort_dir: Path,
    *,
    root: Path = STORE_ROOT,
    version: str,
    seed: int = 0,
    progress: Progress = _quiet,
    cohort: Mapping[str, Any] | None = None,
    repeat_seeds: Sequence[int] = REPEAT_SEEDS,
) -> TrainingReport:
    """Train on ``cohort_dir`` and write ``root/ich_expansion/<version>/`` (see the module)."""
    if (root / MODEL_NAME / version).exists():
        raise ModelStoreError(f"{MODEL_NAME} {version} exists in {root}; versions are immutable")
    started = time.perf_counter()
    data = extract_cohort(Path(cohort_dir), progress)
    described = time.perf_counter()
    if len(data.case_ids) < 20:
        raise ValueError(f"only {len(data.case_ids)} cases have a haematoma: too few to train on")
    fit = fit_split(data, seed)
    repeats = {s: _aucs(data, fit_split(data, s)) for s in repeat_seeds}
    seconds = {"features": described - started, "fit": time.perf_counter() - described}
    info = dict(cohort or {})
    report = _report(version, data, fit, seed, repeats, seconds, info)
    head = slice_head_tensors(*fit.slice_model)
    selected = [s.variable for s in fit.steps]
    rows = held_out_rows(data, fit)
    record = TrainingRecord(
        recipe={
            "slice_model": f"L2 logistic C={SLICE_C} on z-scored frozen {BACKBONE} "
            "features of each haematoma frame",
            "clinical": f"forward selection, LRT p < {P_ENTER}",
            "variants": "z-score + logistic regression",
        },
        feature_names=(NDL, *selected),
        training_data_hash=training_data_hash(
            [data.case_ids[i] for i in fit.train], data.table_bytes
        ),
        metrics={
            "held_out": {r.model: {"auc": r.auc.auc, "ci": [r.auc.low, r.auc.high]} for r in rows},
            "lrt": fit.lrt,
        },
        cutoffs=fit.cutoffs,
        primary=PRIMARY,
        notice=SYNTHETIC_NOTICE,
        extra={
            "outcome": OUTCOME,
            "clinical_selection": {
                "candidates": list(MODEL_VARIABLES),
                "selected": selected,
                "steps": [
                    {"variable": s.variable, "p_value": s.p_value, "aic": s.aic} for s in fit.steps
                ],
            },
            "imputation": fit.medians,
            "cnn": {
                "backbone": BACKBONE,
                "weights": "ImageNet (efficientnet-lite0-pytorch-"
                "model), frozen; linear head trained",
                "window_hu": list(CNN_INPUT.window),
                "size": CNN_INPUT.size,
            },
            "slice_classifier": "slice_classifier 1.0.0 (bundled), confirm >= 0.5",
            "segmenter_in_training": "hyperdense_regions",
            "split": {
                "train": [data.case_ids[i] for i in fit.train],
                "test": [data.case_ids[i] for i in fit.test],
            },
            "skipped_cases": dict(data.skipped),
            "training_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "report": {"file": report_name(version), "sha256": sha256_hex(report.encode())},
            "training_cohort": info,
        },
    )
    estimators: dict[str, Any] = dict(fit.models)
    folder = save_model(MODEL_NAME, version, estimators, record, {HEAD_KEY: head}, root)
    report_path = folder.parent / report_name(version)
    report_path.write_text(report, encoding="utf-8")
    return TrainingReport(
        folder, version, len(data.case_ids), to_markdown(rows), report_path,
        _aucs(data, fit), repeats, fit, seconds,
    )  # fmt: skip
