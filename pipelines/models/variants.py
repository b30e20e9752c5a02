"""The HT study's seven model variants from one recipe, evaluated on held-out patients.

Jiang et al. (Sci Rep 2025) compare seven models built from three feature sources:
clinical, radiomics, DL (CNN) and their combinations (:data:`VARIANTS`). Here every
variant is one scikit-learn pipeline built from the same :class:`ModelRecipe`:

1. a ``ColumnTransformer`` applies each of the variant's blocks' own chain (the recipe's
   ``block_selection``, e.g. PCA for the CNN block) to that block's columns;
2. the recipe's ``selection`` chain runs on the concatenated result (the study's
   ANOVA -> Pearson -> LASSO, z-scoring first);
3. the recipe's classifier (the study's KNN by default).

Features come as a :class:`FeatureBlocks` table: NumPy arrays per block with their
feature names, the case and patient ids (pandas-free). Every variant takes the whole
table's matrix (:meth:`FeatureBlocks.matrix`, columns in block order with the prefixes
``clin_``, ``rad_``, ``dl_``) and uses only its blocks' columns, so one input row serves
all seven. :func:`patient_split` splits by patient; :func:`evaluate_variants` fixes each
variant's cut-off on the training cases (Youden) and reports the held-out cases in the
study's table (:func:`pipelines.evaluation.evaluation_table`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.compose import ColumnTransformer
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline

from pipelines.evaluation import EvaluationRow, evaluation_table, youden_cutoff
from pipelines.evaluation.inputs import binary_outcome
from pipelines.evaluation.roc import CiMethod
from pipelines.models.classifiers import (
    CLASSIFIERS,
    ClassifierName,
    classifier_pipeline,
    selection_chain,
)

BLOCKS: tuple[str, ...] = ("clinical", "radiomics", "dl")
BLOCK_PREFIXES: Mapping[str, str] = {"clinical": "clin_", "radiomics": "rad_", "dl": "dl_"}
VARIANTS: Mapping[str, tuple[str, ...]] = {
    "clinical": ("clinical",),
    "radiomics": ("radiomics",),
    "dl": ("dl",),
    "clinical+radiomics": ("clinical", "radiomics"),
    "dl+radiomics": ("radiomics", "dl"),
    "clinical+dl": ("clinical", "dl"),
    "combined": ("clinical", "radiomics", "dl"),
}
"""The seven models of Jiang et al. 2025 and the blocks each uses (in block order)."""

HT_BLOCK_SELECTION: Mapping[str, str] = {"clinical": "zscore", "radiomics": "zscore", "dl": "pca"}


def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class FeatureBlocks:
    """Feature blocks of the same cases, row i of every block being case ``case_ids[i]``.

    ``blocks`` maps a block name of :data:`BLOCKS` to a finite ``(n_cases, n_features)``
    array, ``feature_names`` the same names to its column names (without prefix).
    ``patient_ids`` groups cases of one patient (None: each case is its own patient).
    Arrays are copied to read-only float64.
    """

    case_ids: tuple[str, ...]
    blocks: Mapping[str, NDArray[np.float64]]
    feature_names: Mapping[str, tuple[str, ...]]
    patient_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Check the shapes, names and ids; store read-only copies."""
        ids = tuple(str(c) for c in self.case_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("case_ids must be non-empty and unique")
        unknown = sorted(set(self.blocks) - set(BLOCKS))
        if unknown or not self.blocks:
            raise ValueError(f"blocks must be among {BLOCKS}; got {sorted(self.blocks)}")
        if set(self.feature_names) != set(self.blocks):
            raise ValueError("feature_names must name the columns of exactly the given blocks")
        arrays: dict[str, NDArray[np.float64]] = {}
        names: dict[str, tuple[str, ...]] = {}
        for block in BLOCKS:
            if block not in self.blocks:
                continue
            array = np.array(self.blocks[block], dtype=np.float64)
            block_names = tuple(str(n) for n in self.feature_names[block])
            if array.ndim != 2 or array.shape[0] != len(ids) or array.shape[1] == 0:
                raise ValueError(
                    f"block {block!r} has shape {array.shape}; expected ({len(ids)}, >= 1)"
                )
            if len(block_names) != array.shape[1] or len(set(block_names)) != len(block_names):
                raise ValueError(f"block {block!r} needs {array.shape[1]} unique feature names")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"block {block!r} holds NaN or infinite values: impute first")
            arrays[block] = _frozen(array)
            names[block] = block_names
        patients = None if self.patient_ids is None else tuple(str(p) for p in self.patient_ids)
        if patients is not None and len(patients) != len(ids):
            raise ValueError(f"{len(patients)} patient ids for {len(ids)} cases")
        object.__setattr__(self, "case_ids", ids)
        object.__setattr__(self, "blocks", arrays)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "patient_ids", patients)

    @property
    def n_cases(self) -> int:
        """Number of cases (rows)."""
        return len(self.case_ids)

    @property
    def groups(self) -> tuple[str, ...]:
        """The patient of every case (the case itself when no patient ids were given)."""
        return self.case_ids if self.patient_ids is None else self.patient_ids

    @property
    def column_names(self) -> tuple[str, ...]:
        """Prefixed names of the columns of :meth:`matrix`, e.g. ``clin_age``."""
        return tuple(
            BLOCK_PREFIXES[block] + name
            for block in self.blocks
            for name in self.feature_names[block]
        )

    def matrix(self) -> NDArray[np.float64]:
        """All blocks side by side, in :data:`BLOCKS` order: the variants' input."""
        return np.hstack([self.blocks[block] for block in self.blocks])

    def columns(self, block: str) -> list[int]:
        """Column indices of ``block`` in :meth:`matrix`."""
        if block not in self.blocks:
            raise ValueError(f"no {block!r} block; the table has {sorted(self.blocks)}")
        names = list(self.blocks)
        start = sum(self.blocks[name].shape[1] for name in names[: names.index(block)])
        return list(range(start, start + self.blocks[block].shape[1]))

    def subset(self, rows: ArrayLike) -> FeatureBlocks:
        """The cases at integer positions ``rows``, in that order."""
        index = np.asarray(rows, dtype=np.int64)
        return FeatureBlocks(
            case_ids=tuple(self.case_ids[i] for i in index),
            blocks={block: array[index] for block, array in self.blocks.items()},
            feature_names=dict(self.feature_names),
            patient_ids=None
            if self.patient_ids is None
            else tuple(self.patient_ids[i] for i in index),
        )


@dataclass(frozen=True)
class ModelRecipe:
    """How to build every variant: classifier, per-block chains, joint chain, seed.

    ``block_selection`` names a chain of :data:`pipelines.models.classifiers.SELECTION_CHAINS`
    for each block (default: z-score clinical and radiomics, z-score + PCA the CNN block);
    ``selection`` the chain run on the variant's concatenated blocks (default the study's
    ANOVA -> Pearson -> LASSO; None: z-score only). ``classifier_params`` override the
    classifier's defaults (e.g. ``{"n_neighbors": 15}``).
    """

    classifier: ClassifierName = "knn"
    block_selection: Mapping[str, str] = field(default_factory=lambda: dict(HT_BLOCK_SELECTION))
    selection: str | None = "ht_single_source"
    seed: int = 0
    classifier_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse unknown classifiers, blocks and chains now rather than at fit time."""
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {self.classifier!r}; known: {CLASSIFIERS}")
        if set(self.block_selection) != set(BLOCKS):
            raise ValueError(f"block_selection must name a chain for each of {BLOCKS}")
        for chain in (*self.block_selection.values(), self.selection):
            if chain is not None:
                selection_chain(chain, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for a model manifest); :meth:`from_dict` inverts it."""
        return {
            "classifier": self.classifier,
            "block_selection": dict(self.block_selection),
            "selection": self.selection,
            "seed": self.seed,
            "classifier_params": dict(self.classifier_params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecipe:
        """The recipe of :meth:`to_dict`'s output; unknown keys are refused."""
        unknown = sorted(
            set(data) - {"classifier", "block_selection", "selection", "seed", "classifier_params"}
        )
        if unknown:
            raise ValueError(f"unknown recipe keys: {unknown}")
        return cls(**dict(data))


def build_variant(recipe: ModelRecipe, features: FeatureBlocks, variant: str) -> Pipeline:
    """The unfitted pipeline of one variant, taking ``features.matrix()`` as input."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    blocks = ColumnTransformer(
        [
            (
                block,
                selection_chain(recipe.block_selection[block], recipe.seed),
                features.columns(block),
            )
            for block in VARIANTS[variant]
        ],
        remainder="drop",
    )
    steps: list[tuple[str, Any]] = [("blocks", blocks)]
    if recipe.selection is not None:
        steps.extend(selection_chain(recipe.selection, recipe.seed).steps)
    return classifier_pipeline(
        recipe.classifier, Pipeline(steps), recipe.seed, recipe.classifier_params
    )


def fit_variants(
    recipe: ModelRecipe,
    features: FeatureBlocks,
    y: ArrayLike,
    variants: Iterable[str] = tuple(VARIANTS),
) -> dict[str, Pipeline]:
    """Each variant built from ``recipe`` and fitted on all of ``features`` (0/1 ``y``)."""
    labels = binary_outcome(y)
    if labels.size != features.n_cases:
        raise ValueError(f"{labels.size} labels for {features.n_cases} cases")
    X = features.matrix()
    fitted = {}
    for variant in variants:
        try:
            fitted[variant] = build_variant(recipe, features, variant).fit(X, labels)
        except ValueError as exc:
            raise ValueError(f"variant {variant!r} failed to fit: {exc}") from exc
    return fitted


def predict_risk(model: Pipeline, features: FeatureBlocks) -> NDArray[np.float64]:
    """The predicted probability of the event for every case."""
    return np.asarray(model.predict_proba(features.matrix())[:, 1], dtype=np.float64)


@dataclass(frozen=True)
class VariantEvaluation:
    """The held-out table (one row per variant) and the training-set cut-offs used."""

    rows: tuple[EvaluationRow, ...]
    cutoffs: Mapping[str, float]


def evaluate_variants(
    models: Mapping[str, Pipeline],
    train: FeatureBlocks,
    y_train: ArrayLike,
    test: FeatureBlocks,
    y_test: ArrayLike,
    ci_method: CiMethod = "delong",
    seed: int = 0,
) -> VariantEvaluation:
    """The HT study's table on ``test``: AUC (95% CI), sensitivity, specificity, accuracy,
    PPV, NPV, each model classified at the Youden cut-off of its training-set risks.

    The training risks are in-sample (as the study fixed its cut-off on the training
    cohort); for KNN with distance weights they are optimistic, so the cut-off can be
    high. ``seed`` seeds the bootstrap when ``ci_method="bootstrap"``.
    """
    labels_train = binary_outcome(y_train)
    labels_test = binary_outcome(y_test)
    cutoffs = {
        name: youden_cutoff(labels_train, predict_risk(model, train))
        for name, model in models.items()
    }
    scores = {name: (labels_test, predict_risk(model, test)) for name, model in models.items()}
    rows = evaluation_table(scores, cutoffs=cutoffs, ci_method=ci_method, seed=seed)
    return VariantEvaluation(rows=tuple(rows), cutoffs=cutoffs)


def evaluation_metrics(evaluation: VariantEvaluation) -> dict[str, dict[str, Any]]:
    """The table as JSON-ready dicts per variant (for a manifest): NaN ratios become None."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    out: dict[str, dict[str, Any]] = {}
    for row in evaluation.rows:
        m = row.metrics
        out[row.model] = {
            "n": row.n,
            "n_positive": row.n_positive,
            "auc": row.auc.auc,
            "auc_ci": [row.auc.low, row.auc.high],
            "ci_method": row.auc.method,
            "ci_level": row.auc.level,
            "cutoff": m.cutoff,
            "cutoff_source": "training set Youden"
            if row.cutoff_source == "given"
            else "own Youden",
            "sensitivity": number(m.sensitivity),
            "specificity": number(m.specificity),
            "accuracy": number(m.accuracy),
            "ppv": number(m.ppv),
            "npv": number(m.npv),
            "confusion": {
                "tp": m.confusion.tp,
                "fp": m.confusion.fp,
                "tn": m.confusion.tn,
                "fn": m.confusion.fn,
            },
        }
    return out


def patient_split(
    y: ArrayLike, groups: Sequence[str], test_size: float = 0.25, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Train and test row indices with no patient on both sides, stratified by outcome.

    Uses ``StratifiedGroupKFold`` with ``round(1 / test_size)`` shuffled folds (seeded) and
    takes the first fold as the test set, so ``test_size`` is met approximately (whole
    patients move together). ``groups`` holds each case's patient id.
    """
    labels = binary_outcome(y)
    patients = np.asarray([str(g) for g in groups])
    if patients.size != labels.size:
        raise ValueError(f"{patients.size} patient ids for {labels.size} cases")
    if not 0.0 < test_size <= 0.5:
        raise ValueError(f"test_size must lie in (0, 0.5], not {test_size}")
    n_splits = max(2, round(1.0 / test_size))
    if np.unique(patients).size < n_splits:
        raise ValueError(f"{np.unique(patients).size} patients cannot make {n_splits} folds")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(folds.split(np.zeros((labels.size, 1)), labels, patients))
    if set(patients[train]) & set(patients[test]):
        raise AssertionError("a patient is on both sides of the split")
    for side, rows in (("training", train), ("test", test)):
        if np.unique(labels[rows]).size < 2:
            raise ValueError(f"the {side} set lacks one outcome class; use more cases or folds")
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)
