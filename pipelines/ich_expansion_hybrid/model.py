"""The trained hybrid expansion model as stored, one case's prediction and the features
that drove it.

A version (``model_store/ich_expansion_hybrid/<version>/``) holds ``radiomics.skops``,
``cnn.skops`` and ``combined.skops`` (each a scikit-learn pipeline: z-score, SVM with
Platt probabilities, fitted by grid search on the features that sequential forward
selection kept) and, in the manifest, each model's selected feature names, their
training means, and the radiomics parameter file's sha256.

Contributions: for each feature of the combined model, the change of the probability
when that feature alone is set to its training mean (``p(x) - p(x with x_j = mean_j)``,
in probability points); the largest in magnitude are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store.artefacts import ModelArtefact, load_model
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.base import PipelineError
from pipelines.ich_expansion_hybrid.features import RADIOMICS_PARAMS
from pipelines.radiomics.params import params_path
from pipelines.stages import charged_to

MODEL_NAME = "ich_expansion_hybrid"
PRIMARY = "combined"
SOURCES = ("radiomics", "cnn", "combined")
OUTCOME = "haematoma expansion"
TOP_CONTRIBUTIONS = 3


def radiomics_params_sha256() -> str:
    """sha256 of the study's radiomics parameter file."""
    return sha256_hex(params_path(RADIOMICS_PARAMS).read_bytes())


@dataclass(frozen=True)
class Contribution:
    """How much one feature moved the combined model's probability."""

    feature: str
    value: float
    delta: float  # p(x) - p(x with this feature at its training mean)


@dataclass(frozen=True)
class HybridPrediction:
    """Each model's probability and the combined model's top contributions."""

    risks: Mapping[str, float]
    contributions: tuple[Contribution, ...]


@dataclass(frozen=True)
class HybridModel:
    """A loaded, verified model version."""

    artefact: ModelArtefact
    selected: Mapping[str, tuple[str, ...]]
    means: Mapping[str, Mapping[str, float]]

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
        """The manifest's notice."""
        return self.artefact.notice

    @classmethod
    def load(cls, version: str | None = None, root: Path = STORE_ROOT) -> HybridModel:
        """The promoted (else latest) version, or ``version``, hash-checked."""
        artefact = load_model(MODEL_NAME, version, root)
        manifest: Mapping[str, Any] = artefact.manifest
        if manifest.get("radiomics_params_sha256") != radiomics_params_sha256():
            raise ModelStoreError(
                f"{MODEL_NAME} {artefact.version}: the radiomics parameter file differs from "
                "the one the model was trained with; retrain the model"
            )
        selection = manifest.get("selection")
        if not isinstance(selection, dict) or set(SOURCES) - set(selection):
            raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: manifest lacks 'selection'")
        return cls(
            artefact,
            {k: tuple(v["features"]) for k, v in selection.items()},
            {k: dict(v["means"]) for k, v in selection.items()},
        )

    def _probability(self, source: str, row: Mapping[str, float]) -> float:
        names = self.selected[source]
        x = np.array([[row[n] for n in names]], dtype=np.float64)
        return float(self.artefact.estimators[source].predict_proba(x)[0, 1])

    @charged_to("model")
    def predict(self, row: Mapping[str, float]) -> HybridPrediction:
        """Every model's probability for one case's features, and the contributions."""
        needed = {n for names in self.selected.values() for n in names}
        missing = sorted(needed - set(row))
        if missing:
            raise PipelineError(
                f"the case lacks {len(missing)} trained features, e.g. {missing[0]}"
            )
        bad = sorted(n for n in needed if not np.isfinite(row[n]))
        if bad:
            raise PipelineError(f"feature {bad[0]} is not finite for this haematoma")
        risks = {source: self._probability(source, row) for source in SOURCES}
        found = []
        for name in self.selected[PRIMARY]:
            moved = {**row, name: self.means[PRIMARY][name]}
            delta = risks[PRIMARY] - self._probability(PRIMARY, moved)
            found.append(Contribution(name, float(row[name]), delta))
        found.sort(key=lambda c: -abs(c.delta))
        return HybridPrediction(risks, tuple(found[:TOP_CONTRIBUTIONS]))
