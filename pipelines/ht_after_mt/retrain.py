"""``ht_after_mt`` as a trainable pipeline of the retraining service
(``pipelines.retraining.trainable``): train a candidate with the same code as
``dicomnode train`` and score the same held-out patients with the version in service.

The version in service describes each held-out case with its own settings (radiomics
parameters, CNN input) as it would at inference; a case it cannot describe (no lesion)
leaves the comparison, which is then made on the cases both models scored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom

from model_store.artefacts import SYNTHETIC_NOTICE
from model_store.registry import ModelStoreError, list_versions, select_version
from pipelines.base import PipelineError
from pipelines.ht_after_mt.features import CNN_INPUT, ClinicalTable
from pipelines.ht_after_mt.features import case_features as describe_case
from pipelines.ht_after_mt.model import MODEL_NAME, PRIMARY, HtModel
from pipelines.ht_after_mt.train import (
    CohortFeatures,
    FittedModel,
    TrainingSettings,
    _table_path,
    extract_cohort,
    fit_ht_model,
    save_fitted,
)
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.models import predict_risk
from pipelines.retraining.ood import (
    DISTRIBUTION_KEY,
    InputDistribution,
    header_facts,
)
from pipelines.retraining.trainable import CandidateEvaluation, TrainOptions
from pipelines.volume import load_series


@dataclass(frozen=True)
class ServiceScores:
    """The version in service's risks on the held-out cases it could describe."""

    version: str | None
    risks: dict[str, float]
    note: str


def service_scores(cohort_dir: Path, case_ids: tuple[str, ...], root: Path) -> ServiceScores:
    """Risks of the version in service (promoted, else latest) on ``case_ids``."""
    if not list_versions(MODEL_NAME, root):
        return ServiceScores(None, {}, "no model in service")
    try:
        version = select_version(MODEL_NAME, root)
        model = HtModel.load(version, root)
    except ModelStoreError as exc:
        return ServiceScores(None, {}, f"the model in service cannot be loaded: {exc}")
    table = ClinicalTable.read(_table_path(cohort_dir))
    segmenter = HyperdenseThresholdPipeline()
    risks: dict[str, float] = {}
    for case_id in case_ids:
        folder = cohort_dir / "cases" / case_id
        series = load_series(sorted(p for p in folder.rglob("*") if p.is_file()))
        row = table.lookup_dataset(series.reference)
        try:
            case = describe_case(series, row, segmenter, model.radiomics_params, model.cnn_input)
        except PipelineError:
            continue
        risks[case_id] = model.predict(case_id, case).risks[PRIMARY]
    skipped = len(case_ids) - len(risks)
    note = f"version {version} scored {len(risks)} of {len(case_ids)} held-out cases"
    return ServiceScores(
        version, risks, note + (f" ({skipped} not describable)" if skipped else "")
    )


def training_distribution(cohort_dir: Path, fitted: FittedModel) -> InputDistribution:
    """The training cases' feature ranges and acquisition facts (first file's header)."""
    headers = []
    for case_id in fitted.train.case_ids:
        first = min(p for p in (cohort_dir / "cases" / case_id).rglob("*") if p.is_file())
        headers.append(header_facts(pydicom.dcmread(first, stop_before_pixels=True)))
    return InputDistribution.from_training(
        fitted.train.column_names, fitted.train.matrix(), headers
    )


@dataclass(frozen=True)
class HtRetrainer:
    """The HT-after-MT risk model, retrainable (see the module)."""

    options: TrainOptions
    model_name: str = MODEL_NAME

    @classmethod
    def from_options(cls, options: TrainOptions) -> HtRetrainer:
        """The trainer with the run's options."""
        return cls(options)

    def settings(self) -> TrainingSettings:
        """``dicomnode train``'s settings with the run's epochs, CNN size and split."""
        return TrainingSettings(
            cnn_input=replace(CNN_INPUT, size=self.options.cnn_input_size),
            epochs=self.options.epochs,
            test_size=self.options.test_size,
        )

    def train_candidate(self, cohort_dir: Path, *, version: str, root: Path) -> CandidateEvaluation:
        """Describe, split by patient, fit, save the candidate; score the held-out cases
        with the candidate and with the version in service before it."""
        settings = self.settings()
        seed = self.options.seed
        data: CohortFeatures = extract_cohort(cohort_dir, settings)
        if len(data.case_ids) < 8:
            raise ValueError(f"only {len(data.case_ids)} cases have a lesion: too few to train on")
        fitted: FittedModel = fit_ht_model(data, settings, seed)
        held_out = fitted.test.case_ids
        service = service_scores(cohort_dir, held_out, root)
        n_cases = len(data.case_ids) + len(data.skipped)
        folder, _, _ = save_fitted(
            fitted, data, settings, version=version, seed=seed, root=root,
            extra={
                "cohort": {"n_cases": n_cases},
                "retrained_from": service.version,
                DISTRIBUTION_KEY: training_distribution(cohort_dir, fitted).to_dict(),
            },
            seconds={},
        )  # fmt: skip
        risks = predict_risk(fitted.models[PRIMARY], fitted.test)
        keep = [i for i, case in enumerate(held_out) if case in service.risks or not service.risks]
        in_service = np.array([service.risks[held_out[i]] for i in keep]) if service.risks else None
        return CandidateEvaluation(
            model_name=MODEL_NAME,
            version=version,
            folder=folder,
            notice=SYNTHETIC_NOTICE,
            held_out_ids=tuple(held_out[i] for i in keep),
            y_true=fitted.y_test[keep],
            candidate=risks[keep],
            in_service=in_service,
            service_version=service.version,
            service_note=service.note,
            table=fitted.evaluation.rows,
            n_cases=n_cases,
            n_train=fitted.train.n_cases,
            split=f"split by patient, {settings.test_size:.0%} held out (seed {seed}); "
            + service.note,
        )
