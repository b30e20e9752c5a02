"""Training the hybrid expansion model on an expansion cohort and writing it to the store.

The cohort is :func:`pipelines.ich_expansion.cohort.generate_expansion_cohort`'s (labels
and the oracle from ``ground_truth/cases.csv``). :func:`train_hybrid_model`:

1. describes every case (:func:`pipelines.ich_expansion_hybrid.features.hybrid_features`
   with the threshold segmenter and the packaged ImageNet Lite0 weights);
2. splits by patient (stratified, 25% held out);
3. for each source (radiomics, CNN, both concatenated), on the training cases only: the
   features finite in every case, a univariate pre-filter (the ``PREFILTER`` features of
   each source with the largest |AUC - 0.5|), sequential forward selection
   (``pipelines.selection.ForwardSelector``: linear SVM, 5-fold stratified CV AUC, up to
   ``MAX_SELECTED`` features, stopping when a feature adds less than ``SFS_TOL``), then
   an SVM grid search (C x kernel, 5-fold stratified CV AUC) with Platt probabilities;
4. evaluates on the held-out cases (AUC with DeLong 95% CI; sensitivity, specificity,
   accuracy, PPV, NPV at each model's training Youden cut-off; DeLong of combined
   against each source) with the oracle beside them;
5. saves the version and writes ``<version>.report.md`` beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from model_store.artefacts import SYNTHETIC_NOTICE, TrainingRecord, save_model, training_data_hash
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.base import PipelineError
from pipelines.evaluation import delong_test, evaluation_table, to_markdown, youden_cutoff
from pipelines.evaluation.roc import auc
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.ich_expansion.cohort import read_labels
from pipelines.ich_expansion_hybrid.features import (
    PACKAGED_WEIGHTS,
    RADIOMICS_PARAMS,
    cnn_names,
    feature_row,
    frozen_backbone,
    hybrid_features,
)
from pipelines.ich_expansion_hybrid.model import (
    MODEL_NAME,
    OUTCOME,
    PRIMARY,
    SOURCES,
    radiomics_params_sha256,
)
from pipelines.models import patient_split
from pipelines.selection.sequential import ForwardSelector
from pipelines.volume import load_series

PREFILTER = 15
MAX_SELECTED = 6
SFS_TOL = 0.005
GRID = {"svc__C": [0.1, 1.0, 10.0], "svc__kernel": ["linear", "rbf"]}
TEST_SIZE = 0.25
CV_FOLDS = 5

Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    """The default progress callback: report nothing."""


@dataclass(frozen=True)
class HybridCohort:
    """Described cases (with a haematoma), in case-id order."""

    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: NDArray[np.int_]
    oracle: NDArray[np.float64]
    names: dict[str, tuple[str, ...]]  # source -> feature names (finite in every case)
    matrix: dict[str, NDArray[np.float64]]  # source -> (n, p)
    skipped: Mapping[str, str]
    table_bytes: bytes


def extract_hybrid_cohort(cohort_dir: Path, progress: Progress = _quiet) -> HybridCohort:
    """Describe every case of ``cohort_dir`` (step 1)."""
    truth = read_labels(cohort_dir)
    folders = sorted(p for p in (cohort_dir / "cases").iterdir() if p.is_dir())
    segmenter = HyperdenseThresholdPipeline()
    network, _ = frozen_backbone(None)
    rows: list[dict[str, float]] = []
    ids: list[str] = []
    patients: list[str] = []
    skipped: dict[str, str] = {}
    for done, folder in enumerate(folders, start=1):
        series = load_series(sorted(p for p in folder.rglob("*") if p.is_file()))
        try:
            described = hybrid_features(series, segmenter, network)
        except PipelineError as exc:
            skipped[folder.name] = str(exc)
        else:
            rows.append(feature_row(described))
            ids.append(folder.name)
            patients.append(str(series.reference.get("PatientID", "")) or folder.name)
        progress("features", done, len(folders))
    labels = np.array([truth[i][0] for i in ids], dtype=int)
    oracle = np.array([truth[i][1] for i in ids], dtype=np.float64)
    cnn = set(cnn_names(len([k for k in rows[0] if k.startswith("cnn_")])))
    names: dict[str, tuple[str, ...]] = {}
    matrix: dict[str, NDArray[np.float64]] = {}
    for source in ("radiomics", "cnn"):
        keys = [k for k in rows[0] if (k in cnn) == (source == "cnn") and all(k in r for r in rows)]
        values = np.array([[r[k] for k in keys] for r in rows], dtype=np.float64)
        keep = np.all(np.isfinite(values), axis=0) & (np.ptp(values, axis=0) > 0)
        names[source] = tuple(k for k, x in zip(keys, keep, strict=True) if x)
        matrix[source] = values[:, keep]
    names["combined"] = names["radiomics"] + names["cnn"]
    matrix["combined"] = np.hstack([matrix["radiomics"], matrix["cnn"]])
    table = "".join(f"{i},{y}\n" for i, y in zip(ids, labels, strict=True)).encode()
    return HybridCohort(tuple(ids), tuple(patients), labels, oracle, names, matrix, skipped, table)


def prefilter(x: NDArray[np.float64], y: NDArray[np.int_], k: int) -> list[int]:
    """The ``k`` columns with the largest |AUC - 0.5| on (x, y)."""
    strength = [abs(auc(y, x[:, j]) - 0.5) for j in range(x.shape[1])]
    return [int(j) for j in np.argsort(strength)[::-1][:k]]


@dataclass(frozen=True)
class SourceFit:
    """One source's selection and fitted SVM."""

    features: tuple[str, ...]
    model: Pipeline
    means: dict[str, float]
    sfs_scores: list[float]
    params: dict[str, Any]


def fit_source(data: HybridCohort, source: str, train: NDArray[np.int64], seed: int) -> SourceFit:
    """Pre-filter, forward selection and SVM grid search on the training cases (step 3)."""
    y = data.labels[train]
    if source == "combined":
        columns = [
            data.names["combined"].index(data.names[s][j])
            for s in ("radiomics", "cnn")
            for j in prefilter(data.matrix[s][train], y, PREFILTER)
        ]
    else:
        columns = prefilter(data.matrix[source][train], y, PREFILTER)
    x = data.matrix[source][train][:, columns]
    folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed)
    selector = ForwardSelector(
        make_pipeline(StandardScaler(), SVC(kernel="linear", C=0.1)),
        n_features_to_select=min(MAX_SELECTED, len(columns)),
        tol=SFS_TOL,
        cv=folds,
        random_state=seed,
    ).fit(x, y)
    chosen = [columns[j] for j in selector.order_]
    names = tuple(data.names[source][j] for j in chosen)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), SVC(probability=True, random_state=seed)),
        GRID,
        scoring="roc_auc",
        cv=folds,
    ).fit(data.matrix[source][train][:, chosen], y)
    means = {
        n: float(data.matrix[source][train][:, j].mean())
        for n, j in zip(names, chosen, strict=True)
    }
    return SourceFit(
        names, search.best_estimator_, means, list(selector.scores_), search.best_params_
    )


def _scores(
    data: HybridCohort, source: str, fit: SourceFit, rows: NDArray[np.int64]
) -> NDArray[np.float64]:
    cols = [data.names[source].index(n) for n in fit.features]
    return np.asarray(fit.model.predict_proba(data.matrix[source][rows][:, cols])[:, 1])


@dataclass(frozen=True)
class HybridReport:
    """What a training run wrote and measured."""

    folder: Path
    version: str
    n_cases: int
    table: str
    report_path: Path
    held_out_auc: Mapping[str, float]
    seconds: Mapping[str, float]


def train_hybrid_model(
    cohort_dir: Path,
    *,
    root: Path = STORE_ROOT,
    version: str,
    seed: int = 0,
    progress: Progress = _quiet,
    cohort: Mapping[str, Any] | None = None,
) -> HybridReport:
    """Train on ``cohort_dir`` and write ``root/ich_expansion_hybrid/<version>/``."""
    if (root / MODEL_NAME / version).exists():
        raise ModelStoreError(f"{MODEL_NAME} {version} exists in {root}; versions are immutable")
    started = time.perf_counter()
    data = extract_hybrid_cohort(Path(cohort_dir), progress)
    described = time.perf_counter()
    train, test = patient_split(data.labels, data.patient_ids, TEST_SIZE, seed)
    fits = {s: fit_source(data, s, train, seed) for s in SOURCES}
    y_train, y_test = data.labels[train], data.labels[test]
    cutoffs = {s: youden_cutoff(y_train, _scores(data, s, fits[s], train)) for s in SOURCES}
    test_scores = {s: _scores(data, s, fits[s], test) for s in SOURCES}
    labels = {"radiomics": "radiomics (SFS + SVM)", "cnn": "CNN, frozen Lite0 (SFS + SVM)",
              "combined": "combined radiomics + CNN (SFS + SVM)"}  # fmt: skip
    oracle = "oracle (generator's true probability)"
    models = {labels[s]: (y_test, test_scores[s]) for s in SOURCES}
    models[oracle] = (y_test, data.oracle[test])
    given = {labels[s]: cutoffs[s] for s in SOURCES}
    given[oracle] = youden_cutoff(y_train, data.oracle[train])
    rows = evaluation_table(models, given)
    seconds = {"features": described - started, "fit": time.perf_counter() - described}
    info = dict(cohort or {})
    lines = [
        f"# {MODEL_NAME} {version}: held-out evaluation",
        "",
        f"**{SYNTHETIC_NOTICE}.**",
        "",
        f"Outcome: {OUTCOME} (label_he). Cohort: `pipelines.ich_expansion.cohort` (seed "
        f"{info.get('seed')}, {info.get('n_cases')} cases of {info.get('rows')} px x "
        f"{info.get('n_slices')} slices; generative model in that module's docstring). Cases "
        f"described: {len(data.case_ids)}; training {len(train)} ({int(y_train.sum())} HE), "
        f"held out {len(test)} ({int(y_test.sum())} HE), split by patient (seed {seed}). "
        f"Radiomics: `{RADIOMICS_PARAMS}.yaml` ({len(data.names['radiomics'])} usable "
        f"features); CNN: {PACKAGED_WEIGHTS}, frozen, largest slice +-3.",
        "",
        "AUC with DeLong 95% CI; the other columns at each model's Youden cut-off on its "
        "training cases.",
        "",
        to_markdown(rows),
    ]
    for s in SOURCES:
        lines.append(f"- {s}: selected {', '.join(fits[s].features)}; SVM {fits[s].params}")
    lines.append("")
    for other in ("radiomics", "cnn"):
        d = delong_test(y_test, test_scores[PRIMARY], test_scores[other])
        lines.append(f"DeLong, combined vs {other} (held out): difference {d.difference:+.3f}, "
                     f"p = {d.p_value:.2g}.")  # fmt: skip
    lines += ["", f"One split seed tried ({seed}). Training took "
              f"{sum(seconds.values()):.0f} s on the CPU.", ""]  # fmt: skip
    report = "\n".join(lines)
    record = TrainingRecord(
        recipe={
            "prefilter": f"top {PREFILTER} |AUC-0.5| per source",
            "selection": f"ForwardSelector(linear SVM, {CV_FOLDS}-fold AUC, <= {MAX_SELECTED}, "
            f"tol {SFS_TOL})",
            "classifier": f"SVC grid {GRID}, {CV_FOLDS}-fold AUC",
        },
        feature_names=fits[PRIMARY].features,
        training_data_hash=training_data_hash([data.case_ids[i] for i in train], data.table_bytes),
        metrics={
            "held_out": {r.model: {"auc": r.auc.auc, "ci": [r.auc.low, r.auc.high]} for r in rows}
        },
        cutoffs=cutoffs,
        primary=PRIMARY,
        notice=SYNTHETIC_NOTICE,
        extra={
            "outcome": OUTCOME,
            "selection": {
                s: {
                    "features": list(f.features),
                    "means": f.means,
                    "sfs_scores": f.sfs_scores,
                    "svm": f.params,
                }
                for s, f in fits.items()
            },
            "radiomics_params": RADIOMICS_PARAMS,
            "radiomics_params_sha256": radiomics_params_sha256(),
            "cnn": {"backbone": "efficientnet_lite0", "weights": PACKAGED_WEIGHTS},
            "segmenter_in_training": "hyperdense_regions",
            "split": {
                "train": [data.case_ids[i] for i in train],
                "test": [data.case_ids[i] for i in test],
            },
            "skipped_cases": dict(data.skipped),
            "training_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "report": {"file": f"{version}.report.md", "sha256": sha256_hex(report.encode())},
            "training_cohort": info,
        },
    )
    folder = save_model(
        MODEL_NAME, version, {s: f.model for s, f in fits.items()}, record, None, root
    )
    report_path = folder.parent / f"{version}.report.md"
    report_path.write_text(report, encoding="utf-8")
    held = {s: auc(y_test, test_scores[s]) for s in SOURCES} | {
        "oracle": auc(y_test, data.oracle[test])
    }
    return HybridReport(
        folder, version, len(data.case_ids), to_markdown(rows), report_path, held, seconds
    )
