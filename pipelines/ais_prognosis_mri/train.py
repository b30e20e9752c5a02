"""Training of the ``ais_prognosis_mri`` models on a synthetic cohort, and their report.

Each case of the cohort (:mod:`.cohort`) is drawn (DWI and ADC; FLAIR and T1 add nothing
the features read), loaded, prepared (:func:`.imaging.prepare_study`) and described
(:mod:`.features`) exactly as the node does. A stratified 7:3 split (the study's) holds
out the test cases. On the training cases: the clinical model (logistic, NIHSS + ICH),
the radiomics model (z-score, LASSO logistic with 5-fold CV at minimum binomial
deviance; its linear predictor is the Rad-score), the 2.5-D CNN (fine-tuned with Adam
lr 5e-4, weight decay 1e-4, the study's settings; its logit is the DL score) and the DL
model (logistic on the DL score), then the CRD model (logistic on NIHSS, ICH, Rad-score,
DL score) shown as a nomogram; the CRD and DL models are fitted on out-of-fold
Rad-scores and DL scores of the training cases (2-fold cross-fitting: models that did not
see a case score it), so that they weigh each score as it behaves on new cases.
Cut-offs are Youden on the training cases; the report
gives each model's held-out AUC (DeLong 95 % CI), sensitivity, specificity, PPV and NPV,
DeLong's test of CRD against each single-source model, and the oracle AUC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from model_store.artefacts import TrainingRecord, label_table_bytes, save_model, training_data_hash
from model_store.registry import STORE_ROOT
from pipelines.ais_prognosis_mri.cohort import OUTCOME_MODEL, CohortCase
from pipelines.ais_prognosis_mri.features import (
    CLINICAL_VARIABLES,
    CNN_INPUT,
    RADIOMICS_PARAMS,
    cnn_input,
    radiomics_features,
)
from pipelines.ais_prognosis_mri.imaging import prepare_study
from pipelines.ais_prognosis_mri.model import (
    BACKBONE,
    BACKBONE_TITLE,
    CNN_KEY,
    CRD_VARIABLES,
    MODEL_NAME,
    PRIMARY,
    STUDY_BACKBONE,
    params_sha256,
)
from pipelines.ais_prognosis_mri.synthetic_mri import ROLE_ADC, ROLE_DWI, series_datasets
from pipelines.base import PipelineError
from pipelines.cnn import CaseInput, CnnClassifier, build_classifier, fine_tune
from pipelines.evaluation import auc, auc_ci_delong, delong_test, metrics_at_cutoff, youden_cutoff
from pipelines.volume import load_datasets

TEST_FRACTION = 0.3
CNN_EPOCHS = 6
CNN_BATCH = 16
CROSS_FIT_FOLDS = 2
MODELS = ("clinical", "radiomics", "dl", PRIMARY)
TITLES = {"clinical": "Clinical", "radiomics": "Radiomics", "dl": "DL", PRIMARY: "CRD (combined)"}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CaseData:
    """One case's features and label."""

    case: CohortCase
    radiomics: dict[str, float]
    cnn: CaseInput


@dataclass(frozen=True)
class TrainingReport:
    """What training wrote and measured."""

    version: str
    folder: Path
    n_cases: int
    n_train: int
    n_test: int
    skipped: int
    table: str
    seconds: dict[str, float]


def describe_case(case: CohortCase) -> CaseData | None:
    """Features of one generated case; ``None`` when the threshold finds no infarct."""
    series = {
        role: load_datasets(series_datasets(case.spec, role)) for role in (ROLE_DWI, ROLE_ADC)
    }
    try:
        study = prepare_study(series)
        if study.count == 0:
            return None
        return CaseData(case, radiomics_features(study), cnn_input(study))
    except PipelineError:
        return None


def logistic() -> Pipeline:
    """z-score then a (mildly L2-penalised) logistic regression."""
    return Pipeline([("z", StandardScaler()), ("clf", LogisticRegression(C=1.0, max_iter=1000))])


def lasso(seed: int) -> Pipeline:
    """Constant features dropped, z-score, LASSO logistic (5-fold CV, minimum deviance)."""
    return Pipeline(
        [
            ("variance", VarianceThreshold(1e-12)),
            ("z", StandardScaler()),
            (
                "clf",
                LogisticRegressionCV(
                    Cs=12, cv=5, penalty="l1", solver="liblinear", scoring="neg_log_loss",
                    max_iter=2000, random_state=seed,
                ),
            ),
        ]
    )  # fmt: skip


def _train_cnn(
    samples: torch.Tensor, y: np.ndarray, seed: int, epochs: int, progress: Progress | None
) -> CnnClassifier:
    """The 2.5-D CNN fine-tuned on ``samples`` (Adam, the study's settings), on the CPU."""
    return fine_tune(
        build_classifier(BACKBONE, seed=seed), samples, y, optimizer="adam", epochs=epochs,
        batch_size=CNN_BATCH, seed=seed, device=torch.device("cpu"),
        progress=(lambda e: progress("cnn epochs", e.epoch, e.epochs)) if progress else None,
    )  # fmt: skip


def _dl_scores(cnn: CnnClassifier, samples: torch.Tensor) -> np.ndarray:
    """The CNN's logit (DL score) of each sample."""
    with torch.no_grad():
        scores = [cnn(x).reshape(-1).numpy() for x in samples.split(32)]
    return np.concatenate(scores).astype(np.float64)


def _row(name: str, y: np.ndarray, p: np.ndarray, cutoff: float) -> str:
    """One markdown table row: AUC (95 % CI), sensitivity, specificity, PPV, NPV."""
    ci = auc_ci_delong(y, p)
    m = metrics_at_cutoff(y, p, cutoff)
    return (
        f"| {name} | {ci.auc:.3f} ({ci.low:.3f}-{ci.high:.3f}) | {m.sensitivity:.3f} | "
        f"{m.specificity:.3f} | {m.ppv:.3f} | {m.npv:.3f} | {cutoff:.3f} |"
    )


def report_table(
    y: np.ndarray, probabilities: dict[str, np.ndarray], cutoffs: dict[str, float], oracle: float
) -> str:
    """The study's table shape on the held-out cases, DeLong tests and the oracle AUC."""
    lines = [
        "| Model | AUC (95% CI, DeLong) | Sensitivity | Specificity | PPV | NPV | Cut-off |",
        "|---|---|---|---|---|---|---|",
        *(_row(TITLES[m], y, probabilities[m], cutoffs[m]) for m in MODELS),
        f"| Oracle (generative model's linear predictor) | {oracle:.3f} | | | | | |",
        "",
        "| DeLong test | AUC difference | z | p |",
        "|---|---|---|---|",
    ]
    for m in MODELS[:-1]:
        test = delong_test(y, probabilities[PRIMARY], probabilities[m])
        lines.append(
            f"| CRD vs {TITLES[m]} | {test.difference:+.3f} | {test.z:.2f} | {test.p_value:.3f} |"
        )
    return "\n".join(lines) + "\n"


def train_model(
    cases: Sequence[CohortCase],
    *,
    root: Path = STORE_ROOT,
    version: str = "1.0.0",
    seed: int = 0,
    epochs: int = CNN_EPOCHS,
    progress: Progress | None = None,
    extra: dict[str, object] | None = None,
) -> TrainingReport:
    """Describe ``cases``, train the four models, write ``version`` and its report."""
    clock = {"start": time.monotonic()}
    data: list[CaseData] = []
    for index, case in enumerate(cases, start=1):
        described = describe_case(case)
        if described is not None:
            data.append(described)
        if progress is not None:
            progress("features", index, len(cases))
    clock["features"] = time.monotonic()
    names = sorted(set.intersection(*(set(d.radiomics) for d in data)))
    y = np.array([d.case.poor_outcome for d in data])
    clinical = np.array([[d.case.clinical[v] for v in CLINICAL_VARIABLES] for d in data])
    radiomics = np.array([[d.radiomics[n] for n in names] for d in data])
    samples = torch.cat([d.cnn.samples[d.cnn.key_sample : d.cnn.key_sample + 1] for d in data])
    lp = np.array([d.case.linear_predictor for d in data])
    train, test = train_test_split(
        np.arange(len(data)), test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    clinical_model = logistic().fit(clinical[train], y[train])
    radiomics_model = lasso(seed).fit(radiomics[train], y[train])
    rad = radiomics_model.decision_function(radiomics)
    cnn = _train_cnn(samples[train], y[train], seed, epochs, progress)
    deep = _dl_scores(cnn, samples)
    # The CRD model and the DL model learn from out-of-fold scores of the training cases
    # (scores of models that did not see the case), as they will meet new cases.
    folds = StratifiedKFold(CROSS_FIT_FOLDS, shuffle=True, random_state=seed)
    rad_oof = np.zeros(len(train))
    deep_oof = np.zeros(len(train))
    for fold, (fit, held) in enumerate(folds.split(train, y[train])):
        rows_fit, rows_held = train[fit], train[held]
        fold_lasso = lasso(seed).fit(radiomics[rows_fit], y[rows_fit])
        rad_oof[held] = fold_lasso.decision_function(radiomics[rows_held])
        fold_cnn = _train_cnn(samples[rows_fit], y[rows_fit], seed + 1 + fold, epochs, progress)
        deep_oof[held] = _dl_scores(fold_cnn, samples[rows_held])
    clock["cnn"] = time.monotonic()
    dl_model = logistic().fit(deep_oof[:, None], y[train])
    crd_x = np.column_stack([clinical, rad, deep])
    crd_train = np.column_stack([clinical[train], rad_oof, deep_oof])
    crd_model = logistic().fit(crd_train, y[train])
    probabilities = {
        "clinical": clinical_model.predict_proba(clinical)[:, 1],
        "radiomics": radiomics_model.predict_proba(radiomics)[:, 1],
        "dl": dl_model.predict_proba(deep[:, None])[:, 1],
        PRIMARY: crd_model.predict_proba(crd_x)[:, 1],
    }
    cutoffs = {m: float(youden_cutoff(y[train], p[train])) for m, p in probabilities.items()}
    held_out = {m: p[test] for m, p in probabilities.items()}
    oracle = float(auc(y[test], lp[test]))
    table = report_table(y[test], held_out, cutoffs, oracle)
    train_table = report_table(
        y[train], {m: p[train] for m, p in probabilities.items()}, cutoffs,
        float(auc(y[train], lp[train])),
    )  # fmt: skip
    kept = int(np.count_nonzero(radiomics_model[-1].coef_))
    metrics: dict[str, dict[str, float]] = {
        m: {
            "auc_test": float(auc(y[test], held_out[m])),
            "auc_train": float(auc(y[train], p[train])),
        }
        for m, p in probabilities.items()
    }
    metrics["oracle"] = {"auc_test": oracle}
    ids = [d.case.case_id for d in data]
    record = TrainingRecord(
        recipe={
            "clinical": "logistic regression: NIHSS, ICH",
            "radiomics": "LASSO logistic (5-fold CV, minimum binomial deviance) -> Rad-score",
            "dl": f"2.5-D {BACKBONE_TITLE} (MONAI; study: {STUDY_BACKBONE}), DWI slices "
            "n-2, n, n+2; logistic on its logit",
            "crd": "logistic regression: NIHSS, ICH, Rad-score, DL score (nomogram)",
        },
        feature_names=CRD_VARIABLES,
        training_data_hash=training_data_hash(ids, label_table_bytes(ids, y.tolist())),
        metrics=metrics,
        cutoffs=cutoffs,
        primary=PRIMARY,
        extra={
            "radiomics": {
                "params": RADIOMICS_PARAMS.name,
                "params_sha256": params_sha256(),
                "features": names,
                "lasso_kept": kept,
            },
            "imputation": {
                v: float(np.median(clinical[train, i])) for i, v in enumerate(CLINICAL_VARIABLES)
            },
            "nomogram": {
                "low": crd_train.min(axis=0).tolist(),
                "high": crd_train.max(axis=0).tolist(),
            },
            "cnn": {
                "backbone": BACKBONE,
                "input_size": CNN_INPUT.size,
                "epochs": epochs,
                "optimizer": "adam lr 5e-4 weight decay 1e-4",
            },
            "split": {"train": len(train), "test": len(test), "seed": seed},
            **(extra or {}),
        },
    )
    folder = save_model(
        MODEL_NAME,
        version,
        {
            "clinical": clinical_model,
            "radiomics": radiomics_model,
            "dl": dl_model,
            PRIMARY: crd_model,
        },
        record,
        tensors={CNN_KEY: {k: v.detach().cpu() for k, v in cnn.state_dict().items()}},
        root=root,
    )  # fmt: skip
    clock["end"] = time.monotonic()
    seconds = {
        "features": clock["features"] - clock["start"],
        "cnn": clock["cnn"] - clock["features"],
        "rest": clock["end"] - clock["cnn"],
    }
    report = _report_text(
        version, len(cases), len(data), len(train), len(test), table, train_table, kept,
        len(names), seconds, extra or {},
    )  # fmt: skip
    (root / MODEL_NAME / f"{version}.report.md").write_text(report, encoding="utf-8")
    return TrainingReport(
        version, folder, len(cases), len(train), len(test), len(cases) - len(data), table, seconds
    )


def _report_text(
    version: str,
    n_cases: int,
    n_used: int,
    n_train: int,
    n_test: int,
    table: str,
    train_table: str,
    kept: int,
    n_features: int,
    seconds: dict[str, float],
    extra: dict[str, object],
) -> str:
    """The report kept beside the model."""
    model = ", ".join(f"{k} {v:g}" for k, v in OUTCOME_MODEL.items())
    return f"""# {MODEL_NAME} {version}: poor outcome (mRS 3-6) after ischaemic stroke, from MRI

Trained on synthetic data - not for clinical use. Regenerate with
`python -m pipelines.ais_prognosis_mri.train_default`.

## Cohort and generative model
{n_cases} synthetic MRI studies (`pipelines/ais_prognosis_mri/cohort.py`,
`synthetic_mri.py`; {extra.get("training_cohort", "")}); {n_cases - n_used} without an
infarct found by the ADC/DWI threshold were left out, {n_used} used: {n_train} training,
{n_test} held out (stratified 7:3, the study's split).
Outcome poor ~ Bernoulli(sigmoid(lp)), lp = intercept + NIHSS + ICH + ln(volume) +
severity terms ({model}); NIHSS grows with infarct volume; severity (ADC drop) is the
image-borne signal.

## Models
Clinical: logistic (NIHSS, ICH). Radiomics: {n_features} pyradiomics features
({RADIOMICS_PARAMS.name}: original + LoG 2, 3 mm; shape, first order, GLCM; 1 mm resampling)
of the threshold ROI on the N4-corrected z-scored DWI -> LASSO logistic (5-fold CV,
minimum deviance; {kept} features kept) -> Rad-score. DL: 2.5-D {BACKBONE_TITLE} (MONAI
`{BACKBONE}`: basic blocks [1, 1, 1, 1], widths 32-256, a small member of the study's
{STUDY_BACKBONE} family so that the bundled weights stay ~5 MB; random initialisation: no
ImageNet ResNet weights offline) on DWI slices n-2, n, n+2, {CNN_INPUT.size} px, Adam. CRD: logistic
(NIHSS, ICH, Rad-score, DL score), shown as a nomogram, fitted (with the DL model) on
2-fold out-of-fold Rad-scores and DL scores of the training cases. Cut-offs: Youden on
training.

## Held-out table ({n_test} cases)
{table}
## Training cases ({n_train})
{train_table}
Time: features {seconds["features"]:.0f} s, CNN {seconds["cnn"]:.0f} s, rest {seconds["rest"]:.0f} s
(1 torch thread).
"""
