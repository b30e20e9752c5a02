"""The stored ``ais_prognosis_mri`` model: clinical, radiomics (LASSO Rad-score), DL
(2.5-D CNN score) and the combined "CRD" logistic model with its nomogram.

A version (``model_store/ais_prognosis_mri/<version>/``, written by
:func:`pipelines.ais_prognosis_mri.train.train_model`) holds the four logistic models as
skops files (``clinical``, ``radiomics``, ``dl``, ``crd``), the fine-tuned CNN as
safetensors (``cnn``) and in its manifest the radiomics parameter file's sha256, the
radiomics feature names, the imputation values, the CNN backbone and the nomogram's
variable ranges (training minimum and maximum).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from model_store.artefacts import ModelArtefact, load_model
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.ais_prognosis_mri.features import CLINICAL_VARIABLES, RADIOMICS_PARAMS
from pipelines.base import PipelineError
from pipelines.cnn import CaseInput, CnnClassifier, build_classifier
from pipelines.models.classifiers import Nomogram, linear_predictor_terms, nomogram
from pipelines.stages import charged_to

MODEL_NAME = "ais_prognosis_mri"
PRIMARY = "crd"
OUTCOME = "poor outcome (mRS 3-6)"
CNN_KEY = "cnn"
BACKBONE = "resnet10_half"
BACKBONE_TITLE = "half-width ResNet-10"
STUDY_BACKBONE = "ResNet-101"
"""The study's backbone; the small ResNet-10 keeps the bundled weights at ~5 MB."""
CRD_VARIABLES = ("nihss", "ich", "rad_score", "dl_score")
CRD_LABELS = {
    "nihss": "NIHSS",
    "ich": "ICH",
    "rad_score": "Rad-score",
    "dl_score": "DL score",
}
LOGIT_LIMIT = 1e-6


def params_sha256() -> str:
    """sha256 of the bundled radiomics parameter file."""
    return sha256_hex(RADIOMICS_PARAMS.read_bytes())


def logit(p: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities, clipped away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_LIMIT, 1 - LOGIT_LIMIT)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


@torch.no_grad()
def dl_score(cnn: CnnClassifier, case: CaseInput) -> float:
    """The CNN's logit for the case's key sample (the DL score)."""
    cnn.eval()
    device = next(cnn.parameters()).device
    x = case.samples[case.key_sample : case.key_sample + 1].to(device)
    return float(cnn(x).reshape(-1)[0])


@dataclass(frozen=True)
class Prediction:
    """One study's probabilities, CRD inputs and nomogram points."""

    probabilities: Mapping[str, float]  # clinical, radiomics, dl, crd
    crd_inputs: Mapping[str, float]  # NIHSS, ICH, Rad-score, DL score
    points: Mapping[str, float]  # nomogram points per CRD variable
    total_points: float
    imputed: tuple[str, ...]


@dataclass(frozen=True)
class MriModel:
    """A loaded, hash-checked model version."""

    artefact: ModelArtefact
    cnn: CnnClassifier
    radiomics_names: tuple[str, ...]
    imputation: Mapping[str, float]
    nomogram: Nomogram

    @property
    def version(self) -> str:
        """The model version."""
        return self.artefact.version

    @property
    def cutoff(self) -> float:
        """The CRD model's cut-off (Youden on its training cases)."""
        return self.artefact.cutoff

    @property
    def notice(self) -> str:
        """The manifest's notice ("trained on synthetic data - not for clinical use")."""
        return self.artefact.notice

    @classmethod
    def load(cls, version: str | None = None, root: Path = STORE_ROOT) -> MriModel:
        """The promoted (else latest) version, or ``version``, every hash checked."""
        artefact = load_model(MODEL_NAME, version, root)
        manifest: Mapping[str, Any] = artefact.manifest
        for key in ("radiomics", "imputation", "nomogram", "cnn"):
            if key not in manifest:
                raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: manifest lacks {key!r}")
        if manifest["radiomics"]["params_sha256"] != params_sha256():
            raise ModelStoreError(
                f"{MODEL_NAME} {artefact.version}: the radiomics parameter file "
                f"{RADIOMICS_PARAMS.name} differs from the one the model was trained with"
            )
        cnn = build_classifier(str(manifest["cnn"]["backbone"]))
        try:
            cnn.load_state_dict(artefact.weights(CNN_KEY))
        except RuntimeError as exc:
            raise ModelStoreError(f"{CNN_KEY}.safetensors does not fit the CNN: {exc}") from exc
        crd = artefact.estimators[PRIMARY]
        ranges = manifest["nomogram"]
        terms = linear_predictor_terms(crd, CRD_VARIABLES)
        chart = nomogram(terms.coef, terms.intercept, ranges["low"], ranges["high"], CRD_VARIABLES)
        return cls(
            artefact=artefact,
            cnn=cnn.eval(),
            radiomics_names=tuple(manifest["radiomics"]["features"]),
            imputation={k: float(v) for k, v in manifest["imputation"].items()},
            nomogram=chart,
        )

    @charged_to("model")
    def predict(
        self, clinical: Mapping[str, float], radiomics: Mapping[str, float], case: CaseInput
    ) -> Prediction:
        """Every stored model's probability for one study and the CRD nomogram points."""
        missing = [n for n in self.radiomics_names if n not in radiomics]
        if missing:
            raise PipelineError(
                f"radiomics lacks {len(missing)} trained features, e.g. {missing[0]}"
            )
        row = np.array([[float(radiomics[n]) for n in self.radiomics_names]])
        if not np.all(np.isfinite(row)):
            raise PipelineError("a radiomics feature of the infarct ROI is not finite")
        imputed = tuple(v for v in CLINICAL_VARIABLES if v not in clinical)
        values = {v: float(clinical.get(v, self.imputation[v])) for v in CLINICAL_VARIABLES}
        est = self.artefact.estimators
        radiomics_model: Pipeline = est["radiomics"]
        rad = float(radiomics_model.decision_function(row)[0])
        deep = dl_score(self.cnn, case)
        crd_row = np.array([[values["nihss"], values["ich"], rad, deep]])
        probabilities = {
            "clinical": float(
                est["clinical"].predict_proba([[values["nihss"], values["ich"]]])[0, 1]
            ),
            "radiomics": float(radiomics_model.predict_proba(row)[0, 1]),
            "dl": float(est["dl"].predict_proba([[deep]])[0, 1]),
            "crd": float(est["crd"].predict_proba(crd_row)[0, 1]),
        }  # fmt: skip
        points = self.nomogram.points(crd_row)[0]
        return Prediction(
            probabilities=probabilities,
            crd_inputs=dict(zip(CRD_VARIABLES, crd_row[0].tolist(), strict=True)),
            points=dict(zip(CRD_VARIABLES, points.tolist(), strict=True)),
            total_points=float(points.sum()),
            imputed=imputed,
        )
