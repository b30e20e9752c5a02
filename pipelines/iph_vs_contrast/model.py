"""The trained Rad-score as stored in the model store, and how an area's radiomics become
its Rad-score, probability and class.

A version (``model_store/iph_vs_contrast/<version>/``, written by
:func:`pipelines.iph_vs_contrast.train.train_iph_model`) holds the fitted selection chain
(ICC filter -> z-score -> mRMR -> LASSO logistic) as one skops file, and in its manifest
the radiomics parameter file's name and sha256, the input features, the Rad-score
formula and its Youden cut-off (on the Rad-score scale; the manifest's ``cutoffs`` hold
the same cut-off as a probability). :meth:`IphModel.load` checks every hash
(``model_store.artefacts.load_model``) and that the parameter file is the one the model
was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.pipeline import Pipeline

from model_store.artefacts import ModelArtefact, load_model
from model_store.registry import STORE_ROOT, ModelStoreError, sha256_hex
from pipelines.base import PipelineError
from pipelines.iph_vs_contrast.features import resolve_params
from pipelines.radiomics.params import params_path
from pipelines.stages import charged_to

MODEL_NAME = "iph_vs_contrast"
PRIMARY = "radscore"
OUTCOME = "intraparenchymal haemorrhage"


def params_sha256(params: str | Path) -> str:
    """sha256 of a radiomics parameter file (a bundled name or a path)."""
    return sha256_hex(params_path(resolve_params(params)).read_bytes())


def rad_scores(recipe: Pipeline, X: ArrayLike) -> NDArray[np.float64]:
    """Rad-score of each row of ``X`` (the recipe's input features): the selection steps'
    output fed to the LASSO's ``intercept + sum(coef x feature)``."""
    selected = recipe[:-1].transform(np.asarray(X, dtype=np.float64))
    return np.asarray(recipe[-1].rad_score(selected), dtype=np.float64)


def sigmoid(x: float) -> float:
    """Logistic function of one value."""
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class AreaVerdict:
    """The model's verdict on one area."""

    rad_score: float
    probability: float  # of haemorrhage: sigmoid(Rad-score)
    haemorrhage: bool  # Rad-score at or above the cut-off


@dataclass(frozen=True)
class IphModel:
    """A loaded, verified model version."""

    artefact: ModelArtefact
    recipe: Pipeline
    radiomics_params: str
    feature_names: tuple[str, ...]
    score_cutoff: float  # Youden cut-off on the Rad-score scale

    @property
    def version(self) -> str:
        """The model version."""
        return self.artefact.version

    @property
    def notice(self) -> str:
        """The manifest's notice ("trained on synthetic data - not for clinical use")."""
        return self.artefact.notice

    @property
    def cutoff(self) -> float:
        """The cut-off as a probability of haemorrhage."""
        return sigmoid(self.score_cutoff)

    @classmethod
    def load(cls, version: str | None = None, root: Path = STORE_ROOT) -> IphModel:
        """The promoted (else latest) version, or ``version``, hash-checked."""
        artefact = load_model(MODEL_NAME, version, root)
        manifest = artefact.manifest
        for key in ("radiomics", "rad_score"):
            if key not in manifest:
                raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: manifest lacks {key!r}")
        radiomics: Mapping[str, Any] = manifest["radiomics"]
        params = str(radiomics["params"])
        if params_sha256(params) != radiomics["params_sha256"]:
            raise ModelStoreError(
                f"{MODEL_NAME} {artefact.version}: the radiomics parameter file {params!r} "
                "differs from the one the model was trained with; retrain the model"
            )
        recipe = artefact.primary
        if not isinstance(recipe, Pipeline):
            raise ModelStoreError(f"{MODEL_NAME} {artefact.version}: {PRIMARY} is no pipeline")
        return cls(
            artefact=artefact,
            recipe=recipe,
            radiomics_params=params,
            feature_names=tuple(str(n) for n in radiomics["features"]),
            score_cutoff=float(manifest["rad_score"]["cutoff"]),
        )

    def row(self, radiomics: Mapping[str, float]) -> list[float]:
        """The trained features in training order; refuses missing or non-finite ones."""
        missing = [n for n in self.feature_names if n not in radiomics]
        if missing:
            raise PipelineError(
                f"radiomics lacks {len(missing)} trained features, e.g. {missing[0]}"
            )
        row = [float(radiomics[n]) for n in self.feature_names]
        bad = [n for n, v in zip(self.feature_names, row, strict=True) if not np.isfinite(v)]
        if bad:
            raise PipelineError(f"radiomics feature {bad[0]} is not finite for this area")
        return row

    @charged_to("model")
    def classify(self, radiomics: Mapping[str, float]) -> AreaVerdict:
        """Rad-score, probability and class of one area."""
        score = float(rad_scores(self.recipe, [self.row(radiomics)])[0])
        return AreaVerdict(score, sigmoid(score), score >= self.score_cutoff)
