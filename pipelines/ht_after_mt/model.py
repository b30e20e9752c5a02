"""The trained HT-after-thrombectomy model as stored in the model store, and how a case's
features become its input row.

A version (``model_store/ht_after_mt/<version>/``, written by
:func:`pipelines.ht_after_mt.train.train_ht_model`) holds the seven variants and the
CNN features' PCA as skops files, the fine-tuned CNN as safetensors, and in its manifest
the imputation values, the CNN input settings, the radiomics parameter file's name and
sha256, the kept radiomics features and the training-set cut-offs. :meth:`HtModel.load`
checks every hash (``model_store.artefacts.load_model``) and that the radiomics
parameter file is the one the model was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.decomposition import PCA

from model_store.artefacts import ModelArtefact, load_model
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.base import PipelineError
from pipelines.cnn import CnnClassifier, InputConfig, build_classifier, case_features
from pipelines.ht_after_mt.features import (
    CLINICAL_VARIABLES,
    CaseFeatures,
    ImputationPolicy,
    input_config_from_dict,
    resolve_params,
)
from pipelines.models import FeatureBlocks, predict_risk
from pipelines.radiomics.params import params_path
from pipelines.stages import charged_to

MODEL_NAME = "ht_after_mt"
PRIMARY = "combined"
OUTCOME = "haemorrhagic transformation"
CNN_KEY = "cnn"
PCA_KEY = "dl_pca"


def params_sha256(params: str | Path) -> str:
    """sha256 of a radiomics parameter file (a bundled study's name or a path)."""
    return sha256_hex(params_path(resolve_params(params)).read_bytes())


def dl_names(n_components: int) -> tuple[str, ...]:
    """Names of the CNN block's PCA components: ``pc01``, ``pc02``, ..."""
    return tuple(f"pc{i + 1:02d}" for i in range(n_components))


def feature_blocks(
    case_ids: Sequence[str],
    clinical: NDArray[np.float64],
    radiomics: NDArray[np.float64],
    radiomics_names: Sequence[str],
    dl: NDArray[np.float64],
    patient_ids: Sequence[str] | None = None,
) -> FeatureBlocks:
    """The variants' input table: clinical, radiomics and PCA-reduced CNN blocks."""
    return FeatureBlocks(
        case_ids=tuple(case_ids),
        blocks={"clinical": clinical, "radiomics": radiomics, "dl": dl},
        feature_names={
            "clinical": CLINICAL_VARIABLES,
            "radiomics": tuple(radiomics_names),
            "dl": dl_names(dl.shape[1]),
        },
        patient_ids=None if patient_ids is None else tuple(patient_ids),
    )


def radiomics_row(values: Mapping[str, float], names: Sequence[str]) -> list[float]:
    """The kept radiomics features in training order; refuses missing or non-finite ones."""
    missing = [n for n in names if n not in values]
    if missing:
        raise PipelineError(f"radiomics lacks {len(missing)} trained features, e.g. {missing[0]}")
    row = [float(values[n]) for n in names]
    bad = [n for n, v in zip(names, row, strict=True) if not np.isfinite(v)]
    if bad:
        raise PipelineError(f"radiomics feature {bad[0]} is not finite for this lesion")
    return row


@dataclass(frozen=True)
class Prediction:
    """One case's risk from every stored variant, and the clinical variables imputed."""

    risks: Mapping[str, float]
    imputed: tuple[str, ...]
    features: FeatureBlocks


@dataclass(frozen=True)
class HtModel:
    """A loaded, verified model version and the objects its prediction needs."""

    artefact: ModelArtefact
    cnn: CnnClassifier
    pca: PCA
    imputation: ImputationPolicy
    cnn_input: InputConfig
    radiomics_params: str
    radiomics_names: tuple[str, ...]

    @property
    def version(self) -> str:
        """The model version."""
        return self.artefact.version

    @property
    def cutoff(self) -> float:
        """The combined model's cut-off (Youden on its training cases)."""
        return self.artefact.cutoff

    @property
    def notice(self) -> str:
        """The manifest's notice ("trained on synthetic data - not for clinical use")."""
        return self.artefact.notice

    @classmethod
    def load(cls, version: str | None = None, root: Path = STORE_ROOT) -> HtModel:
        """The promoted (else latest) version, or ``version``, hash-checked."""
        artefact = load_model(MODEL_NAME, version, root)
        manifest = artefact.manifest
        for key in ("cnn", "radiomics", "imputation"):
            if key not in manifest:
                raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: manifest lacks {key!r}")
        radiomics: Mapping[str, Any] = manifest["radiomics"]
        params = str(radiomics["params"])
        if params_sha256(params) != radiomics["params_sha256"]:
            raise ModelStoreError(
                f"{MODEL_NAME} {artefact.version}: the radiomics parameter file {params!r} "
                "differs from the one the model was trained with; retrain the model"
            )
        cnn_meta: Mapping[str, Any] = manifest["cnn"]
        cnn = build_classifier(str(cnn_meta["backbone"]))
        try:
            cnn.load_state_dict(artefact.weights(CNN_KEY))
        except RuntimeError as exc:
            raise ModelStoreError(f"{CNN_KEY}.safetensors does not fit the CNN: {exc}") from exc
        pca = artefact.estimators.get(PCA_KEY)
        if not isinstance(pca, PCA):
            raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: no {PCA_KEY} PCA stored")
        return cls(
            artefact=artefact,
            cnn=cnn.eval(),
            pca=pca,
            imputation=ImputationPolicy.from_dict(manifest["imputation"]),
            cnn_input=input_config_from_dict(cnn_meta["input"]),
            radiomics_params=params,
            radiomics_names=tuple(radiomics["features"]),
        )

    def features(self, case_id: str, case: CaseFeatures) -> tuple[FeatureBlocks, list[str]]:
        """The one-row input table of a case, and the clinical variables imputed."""
        clinical, imputed = self.imputation.apply(case.clinical)
        deep = case_features(self.cnn, [case.cnn_input]).astype(np.float64)
        return (
            feature_blocks(
                [case_id],
                np.array([clinical]),
                np.array([radiomics_row(case.radiomics, self.radiomics_names)]),
                self.radiomics_names,
                self.pca.transform(deep),
            ),
            imputed,
        )

    @charged_to("model")
    def predict(self, case_id: str, case: CaseFeatures) -> Prediction:
        """The risk of every stored variant for one case."""
        blocks, imputed = self.features(case_id, case)
        names = list(self.artefact.manifest["cutoffs"])
        risks = {
            name: float(predict_risk(self.artefact.estimators[name], blocks)[0]) for name in names
        }
        return Prediction(risks, tuple(imputed), blocks)
