"""The trained expansion model as stored in the model store, and one case's prediction.

A version (``model_store/ich_expansion/<version>/``, written by
:mod:`pipelines.ich_expansion.train`) holds:

- ``slice_head.safetensors``: the per-slice expansion score's linear head on the frozen
  ImageNet EfficientNet-Lite0 features (the L2 logistic regression fitted on training
  slices; the mean of the cross-fitting folds' heads), so that the network
  ``backbone -> head`` gives each haematoma frame's expansion logit and Grad-CAM can
  explain it;
- ``clinical.skops``, ``image.skops``, ``integrated.skops``: the forward-selected
  clinical logistic model, the nDL-only model and the integrated model (nDL + the
  selected clinical variables), each a scikit-learn pipeline (z-score, logistic);
- in the manifest: the selected clinical variables, the imputation medians, the network
  input, the LRT and AIC of the integrated model against the clinical one, cut-offs.

nDL (Lee et al.) is the area-weighted mean of the haematoma frames' expansion scores:
``sum_k p_k A_k / sum_k A_k`` (``pipelines.slice_classifier.normalised_dl_score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_store.artefacts import ModelArtefact, load_model
from model_store.registry import STORE_ROOT, ModelStoreError
from pipelines.cnn import CnnClassifier, build_classifier
from pipelines.ich_expansion.clinical import MODEL_VARIABLES
from pipelines.ich_expansion.features import CNN_INPUT, Haematoma, frame_inputs
from pipelines.series import LoadedSeries
from pipelines.slice_classifier.classifier import normalised_dl_score
from pipelines.stages import charged_to

MODEL_NAME = "ich_expansion"
PRIMARY = "integrated"
VARIANT_NAMES = ("clinical", "image", "integrated")
OUTCOME = "haematoma expansion"
HEAD_KEY = "slice_head"
BACKBONE = "efficientnet_lite0"
NDL = "ndl"


def slice_head_tensors(weight: NDArray[np.float64], bias: float) -> dict[str, torch.Tensor]:
    """The network's linear head (``weight``, ``bias`` of the per-slice logit)."""
    return {
        "weight": torch.tensor(np.asarray(weight, dtype=np.float64)[None, :], dtype=torch.float32),
        "bias": torch.tensor([float(bias)], dtype=torch.float32),
    }


def expansion_network(head: Mapping[str, torch.Tensor]) -> CnnClassifier:
    """ImageNet EfficientNet-Lite0 (frozen) with the stored per-slice head."""
    network = build_classifier(BACKBONE, pretrained=True)
    try:
        network.head.load_state_dict(dict(head))
    except RuntimeError as exc:
        raise ModelStoreError(f"{HEAD_KEY}.safetensors does not fit the network: {exc}") from exc
    return network.eval()


def slice_scores(network: CnnClassifier, samples: torch.Tensor) -> NDArray[np.float64]:
    """Expansion probability of each sample (one per haematoma frame)."""
    device = next(network.parameters()).device
    with torch.no_grad():
        logits = torch.cat([network(x.to(device)).cpu() for x in samples.split(16)])
    return torch.sigmoid(logits).reshape(-1).numpy().astype(np.float64)


@dataclass(frozen=True)
class ImputationMedians:
    """Training medians of the clinical variables (0/1 variables: their mode)."""

    values: Mapping[str, float]

    def apply(self, row: Mapping[str, float | None]) -> tuple[dict[str, float], list[str]]:
        """``row`` with each missing variable filled, and the names filled."""
        filled: dict[str, float] = {}
        imputed: list[str] = []
        for name in MODEL_VARIABLES:
            value = row.get(name)
            if value is None:
                filled[name] = float(self.values[name])
                imputed.append(name)
            else:
                filled[name] = float(value)
        return filled, imputed


@dataclass(frozen=True)
class Prediction:
    """One case's nDL, its per-frame scores and every variant's risk."""

    ndl: float
    frame_scores: NDArray[np.float64]  # per haematoma frame (Haematoma.frames order)
    risks: Mapping[str, float]
    imputed: tuple[str, ...]


def variant_columns(variant: str, selected: Sequence[str]) -> list[str]:
    """The input columns of a variant: clinical (selected), image (nDL), integrated."""
    if variant == "clinical":
        return list(selected)
    if variant == "image":
        return [NDL]
    return [NDL, *selected]


@dataclass(frozen=True)
class ExpansionModel:
    """A loaded, verified model version."""

    artefact: ModelArtefact
    network: CnnClassifier
    selected: tuple[str, ...]
    imputation: ImputationMedians

    @property
    def version(self) -> str:
        """The model version."""
        return self.artefact.version

    @property
    def cutoff(self) -> float:
        """The integrated model's cut-off (Youden on its training cases)."""
        return self.artefact.cutoff

    @property
    def notice(self) -> str:
        """The manifest's notice."""
        return self.artefact.notice

    @property
    def manifest(self) -> Mapping[str, Any]:
        """The verified manifest."""
        return self.artefact.manifest

    @classmethod
    def load(cls, version: str | None = None, root: Path = STORE_ROOT) -> ExpansionModel:
        """The promoted (else latest) version, or ``version``, hash-checked."""
        artefact = load_model(MODEL_NAME, version, root)
        manifest = artefact.manifest
        for key in ("clinical_selection", "imputation"):
            if key not in manifest:
                raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: manifest lacks {key!r}")
        missing = [v for v in VARIANT_NAMES if v not in artefact.estimators]
        if missing:
            raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: no estimator {missing[0]}")
        return cls(
            artefact=artefact,
            network=expansion_network(artefact.weights(HEAD_KEY)),
            selected=tuple(manifest["clinical_selection"]["selected"]),
            imputation=ImputationMedians(dict(manifest["imputation"])),
        )

    @charged_to("model")
    def predict(
        self,
        series: LoadedSeries,
        haematoma: Haematoma,
        clinical: Mapping[str, float | None],
    ) -> Prediction:
        """nDL of the haematoma frames and the risk of every variant."""
        inputs = frame_inputs(series, haematoma, CNN_INPUT)
        scores = slice_scores(self.network, inputs.samples)
        ndl = normalised_dl_score(scores, haematoma.areas_mm2[list(haematoma.frames)])
        filled, imputed = self.imputation.apply(clinical)
        row = {**filled, NDL: ndl}
        risks = {}
        for variant in VARIANT_NAMES:
            x = np.array([[row[c] for c in variant_columns(variant, self.selected)]])
            risks[variant] = float(self.artefact.estimators[variant].predict_proba(x)[0, 1])
        return Prediction(ndl, scores, risks, tuple(imputed))
