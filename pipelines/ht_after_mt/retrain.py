"""``ht_after_mt`` as a trainable pipeline of the retraining service
(``pipelines.retraining.trainable``): train a candidate with the same code as
``dicomnode train`` and score the same held-out patients with the version in service.

The version in service describes each held-out case with its own settings (radiomics
parameters, CNN input) as it would at inference; a case it cannot describe (no lesion)
leaves the comparison, which is then made on the cases both models scored.

The cohort is a folder, the node's labelled stored cases (``casedata``: trained on the
features and CNN inputs computed at inference, with the settings they were computed
with, which then describe the folder's cases too), or both. A cohort smaller than
``nested_cv_below`` is judged by nested cross-validation (``pipelines.retraining.nested``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray

from model_store.artefacts import SYNTHETIC_NOTICE
from model_store.registry import ModelStoreError, list_versions, select_version
from pipelines.base import CaseRecord, PipelineError
from pipelines.ht_after_mt.casedata import features_from_record, scored
from pipelines.ht_after_mt.features import (
    CNN_INPUT,
    CaseFeatures,
    ClinicalTable,
    input_config_from_dict,
    input_config_to_dict,
)
from pipelines.ht_after_mt.features import case_features as describe_case
from pipelines.ht_after_mt.model import MODEL_NAME, PRIMARY, HtModel
from pipelines.ht_after_mt.train import (
    INNER_FOLDS,
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
from pipelines.retraining.nested import outer_folds
from pipelines.retraining.ood import (
    DISTRIBUTION_KEY,
    InputDistribution,
    header_facts,
)
from pipelines.retraining.trainable import (
    CandidateEvaluation,
    Cohort,
    RecordedCase,
    TrainOptions,
)
from pipelines.volume import load_series

C_GRID = (0.01, 0.05, 0.2)
"""The logistic regression's C values nested cross-validation chooses among."""


@dataclass(frozen=True)
class ServiceScores:
    """The version in service's risks on the held-out cases it could describe."""

    version: str | None
    risks: dict[str, float]
    note: str


def _folder_features(
    cohort_dir: Path, case_id: str, model: HtModel, table: ClinicalTable
) -> CaseFeatures:
    series = load_series(
        sorted(p for p in (cohort_dir / "cases" / case_id).rglob("*") if p.is_file())
    )
    row = table.lookup_dataset(series.reference)
    return describe_case(
        series, row, HyperdenseThresholdPipeline(), model.radiomics_params, model.cnn_input
    )


def _same_inputs(model: HtModel, record: CaseRecord) -> bool:
    """Whether ``record`` was described with ``model``'s radiomics and CNN input settings."""
    return record.inputs.get("radiomics_params") == model.radiomics_params and dict(
        record.inputs.get("cnn_input", {})
    ) == input_config_to_dict(model.cnn_input)


def service_scores(cohort: Cohort, case_ids: tuple[str, ...], root: Path) -> ServiceScores:
    """Risks of the version in service (promoted, else latest) on ``case_ids``: a folder
    case described again with its settings, a stored case from its stored features when
    they were computed with the same settings."""
    if not list_versions(MODEL_NAME, root):
        return ServiceScores(None, {}, "no model in service")
    try:
        version = select_version(MODEL_NAME, root)
        model = HtModel.load(version, root)
    except ModelStoreError as exc:
        return ServiceScores(None, {}, f"the model in service cannot be loaded: {exc}")
    stored = {case.case_id: case.record for case in cohort.records}
    table = ClinicalTable.read(_table_path(cohort.folder)) if cohort.folder is not None else None
    risks: dict[str, float] = {}
    for case_id in case_ids:
        try:
            if case_id in stored:
                if not _same_inputs(model, stored[case_id]):
                    continue
                case = features_from_record(stored[case_id])
            elif cohort.folder is not None and table is not None:
                case = _folder_features(cohort.folder, case_id, model, table)
            else:
                continue
        except PipelineError:
            continue
        risks[case_id] = model.predict(case_id, case).risks[PRIMARY]
    skipped = len(case_ids) - len(risks)
    note = f"version {version} scored {len(risks)} of {len(case_ids)} held-out cases"
    return ServiceScores(
        version, risks, note + (f" ({skipped} not describable)" if skipped else "")
    )


def records_features(
    records: tuple[RecordedCase, ...], settings: TrainingSettings
) -> tuple[CohortFeatures, TrainingSettings]:
    """The stored cases' features, and the settings they were computed with (those of
    most scored cases; a case described otherwise or not scored is skipped)."""
    skipped: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    for case in records:
        if scored(case.record):
            kinds[_inputs_key(case.record)] += 1
        else:
            skipped[case.case_id] = "no lesion was scored at inference"
    if not kinds:
        raise ValueError("no stored case has a scored lesion: nothing to train on")
    chosen = kinds.most_common(1)[0][0]
    used = []
    for case in records:
        if case.case_id in skipped:
            continue
        if _inputs_key(case.record) != chosen:
            skipped[case.case_id] = "described with other radiomics or CNN input settings"
        else:
            used.append(case)
    inputs = used[0].record.inputs
    settings = replace(
        settings,
        radiomics_params=str(inputs["radiomics_params"]),
        cnn_input=input_config_from_dict(inputs["cnn_input"]),
    )
    described = [features_from_record(case.record) for case in used]
    labels_json = json.dumps([[c.case_id, c.label] for c in used]).encode()
    data = CohortFeatures(
        tuple(c.case_id for c in used),
        tuple(c.patient for c in used),
        np.asarray([c.label for c in used], dtype=int),
        tuple(d.clinical for d in described),
        tuple(d.radiomics for d in described),
        tuple(d.cnn_input for d in described),
        skipped,
        labels_json,
    )
    return data, settings


def _inputs_key(record: CaseRecord) -> str:
    inputs = record.inputs
    return json.dumps([inputs.get("radiomics_params"), inputs.get("cnn_input")], sort_keys=True)


def combined(parts: list[CohortFeatures]) -> CohortFeatures:
    """One cohort of several (stored cases and a cohort folder)."""
    if len(parts) == 1:
        return parts[0]
    return CohortFeatures(
        tuple(i for p in parts for i in p.case_ids),
        tuple(i for p in parts for i in p.patient_ids),
        np.concatenate([p.labels for p in parts]),
        tuple(c for p in parts for c in p.clinical),
        tuple(r for p in parts for r in p.radiomics),
        tuple(c for p in parts for c in p.cnn_inputs),
        {k: v for p in parts for k, v in p.skipped.items()},
        b"".join(p.table_bytes for p in parts),
    )


def training_distribution(cohort: Cohort, fitted: FittedModel) -> InputDistribution:
    """The training cases' feature ranges and acquisition facts (first file's header of a
    folder case, the stored header of a stored case)."""
    stored = {case.case_id: dict(case.header) for case in cohort.records}
    headers = []
    for case_id in fitted.train.case_ids:
        if case_id in stored:
            headers.append(stored[case_id])
            continue
        assert cohort.folder is not None
        first = min(p for p in (cohort.folder / "cases" / case_id).rglob("*") if p.is_file())
        headers.append(header_facts(pydicom.dcmread(first, stop_before_pixels=True)))
    return InputDistribution.from_training(
        fitted.train.column_names, fitted.train.matrix(), headers
    )


@dataclass(frozen=True)
class HtRetrainer:
    """The HT-after-MT risk model, retrainable (see the module)."""

    options: TrainOptions
    model_name: str = MODEL_NAME
    label_outcome: str = "ht"

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

    def train_candidate(self, cohort: Cohort, *, version: str, root: Path) -> CandidateEvaluation:
        """Describe (stored cases: from their stored features, whose settings then apply
        to the folder's cases too), split by patient, fit, save the candidate; score the
        held-out cases with the candidate and with the version in service before it."""
        settings = self.settings()
        seed = self.options.seed
        parts: list[CohortFeatures] = []
        if cohort.records:
            stored, settings = records_features(cohort.records, settings)
            parts.append(stored)
        if cohort.folder is not None:
            parts.append(extract_cohort(cohort.folder, settings))
        if not parts:
            raise ValueError("the cohort has no cases")
        data = combined(parts)
        if len(data.case_ids) < 8:
            raise ValueError(f"only {len(data.case_ids)} cases have a lesion: too few to train on")
        folds, nested_note = None, ""
        if len(data.case_ids) < self.options.nested_cv_below:
            settings = replace(settings, c_grid=C_GRID)
            try:
                folds = outer_folds(data.labels, data.patient_ids, self.options.outer_folds, seed)
            except ValueError as exc:
                nested_note = f"no nested cross-validation ({exc}); "
        fitted: FittedModel = fit_ht_model(data, settings, seed)
        if folds is None:
            held_out, y_true = fitted.test.case_ids, fitted.y_test
            risks = predict_risk(fitted.models[PRIMARY], fitted.test)
            split = (
                f"{nested_note}split by patient, {settings.test_size:.0%} held out (seed {seed})"
            )
        else:
            held_out, y_true = data.case_ids, data.labels
            risks = out_of_fold_risks(data, settings, seed, folds)
            split = (
                f"nested cross-validation: {len(folds)} outer folds by patient, every case "
                f"held out once; C of {list(C_GRID)} chosen by {INNER_FOLDS}-fold inner CV "
                f"on each outer training side; the saved version is fitted on a "
                f"{1 - settings.test_size:.0%} training split (seed {seed}), whose held-out "
                "table is shown"
            )
        service = service_scores(cohort, held_out, root)
        n_cases = len(data.case_ids) + len(data.skipped)
        folder, _, _ = save_fitted(
            fitted, data, settings, version=version, seed=seed, root=root,
            extra={
                "cohort": {"n_cases": n_cases, "source": cohort.describe()},
                "retrained_from": service.version,
                "evaluation": split,
                DISTRIBUTION_KEY: training_distribution(cohort, fitted).to_dict(),
            },
            seconds={},
        )  # fmt: skip
        keep = [i for i, case in enumerate(held_out) if case in service.risks or not service.risks]
        in_service = np.array([service.risks[held_out[i]] for i in keep]) if service.risks else None
        return CandidateEvaluation(
            model_name=MODEL_NAME,
            version=version,
            folder=folder,
            notice=SYNTHETIC_NOTICE,
            held_out_ids=tuple(held_out[i] for i in keep),
            y_true=y_true[keep],
            candidate=risks[keep],
            in_service=in_service,
            service_version=service.version,
            service_note=service.note,
            table=fitted.evaluation.rows,
            n_cases=n_cases,
            n_train=fitted.train.n_cases,
            split=f"{split}; {service.note}",
        )


def out_of_fold_risks(
    data: CohortFeatures,
    settings: TrainingSettings,
    seed: int,
    folds: list[tuple[NDArray[np.int64], NDArray[np.int64]]],
) -> NDArray[np.float64]:
    """Each case's risk from the model fitted, the whole way, on the other outer folds."""
    risks = np.full(len(data.case_ids), np.nan)
    for train, test in folds:
        fold = fit_ht_model(data, settings, seed, split=(train, test))
        risks[test] = predict_risk(fold.models[PRIMARY], fold.test)
    return risks
