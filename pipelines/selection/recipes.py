"""The studies' selection chains as scikit-learn pipelines (classifier not included).

Each function returns an unfitted ``Pipeline`` of the steps in the published order, with
the published parameters; a classifier is appended by the caller (``Pipeline([...,
("clf", model)])`` or ``make_pipeline(recipe, model)``). Reliability filtering needs
readers' matrices that are not part of the training rows, so it is added only when an
ICC vector is given (see :mod:`pipelines.selection.icc`). Unpublished choices (PCA size,
forward-selection stop) are parameters with the defaults stated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from numpy.typing import ArrayLike
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipelines.selection.icc import ICCFilter
from pipelines.selection.lasso import LassoSelector
from pipelines.selection.mrmr import MRMRSelector
from pipelines.selection.redundancy import CorrelationFilter
from pipelines.selection.sequential import ForwardSelector
from pipelines.selection.univariate import AnovaFilter, MannWhitneyFilter


def _with_icc(
    steps: list[tuple[str, Any]], icc_values: ArrayLike | None, threshold: float
) -> Pipeline:
    """Prefix ``steps`` with an ICC filter when ICCs are given."""
    if icc_values is not None:
        steps = [("icc", ICCFilter(icc_values=icc_values, threshold=threshold)), *steps]
    return Pipeline(steps)


def ht_radiomics(icc_values: ArrayLike | None = None, random_state: int = 0) -> Pipeline:
    """Jiang et al. 2025 radiomics: ICC >= 0.75, z-score, Mann-Whitney p < 0.05,
    Spearman |r| > 0.9 greedy removal, LASSO (10-fold, minimum error)."""
    return _with_icc(
        [
            ("zscore", StandardScaler()),
            ("mann_whitney", MannWhitneyFilter(alpha=0.05)),
            ("spearman", CorrelationFilter(0.9, method="spearman")),
            ("lasso", LassoSelector(cv=10, random_state=random_state)),
        ],
        icc_values,
        0.75,
    )


def ht_single_source(random_state: int = 0) -> Pipeline:
    """Jiang et al. 2025 per-source models (clinical, radiomics or DL alone):
    z-score, ANOVA p < 0.05, Pearson |r| > 0.9, LASSO (10-fold)."""
    return Pipeline(
        [
            ("zscore", StandardScaler()),
            ("anova", AnovaFilter(alpha=0.05)),
            ("pearson", CorrelationFilter(0.9, method="pearson")),
            ("lasso", LassoSelector(cv=10, random_state=random_state)),
        ]
    )


def ht_combined(
    dl_columns: Sequence[int] | Sequence[str],
    n_components: int | float = 0.95,
    random_state: int = 0,
) -> Pipeline:
    """Jiang et al. 2025 combined model: PCA -> ANOVA -> Pearson -> LASSO (5-fold).

    PCA reduces only the CNN block (``dl_columns``: the 2048 avgpool features, z-scored
    first); clinical and radiomics columns pass through unchanged. The number of
    components is not published: by default the components explaining 95% of the
    block's variance. Everything is then z-scored and filtered as in the per-source
    models.
    """
    dl_block = Pipeline(
        [
            ("zscore", StandardScaler()),
            ("pca", PCA(n_components=n_components, random_state=random_state)),
        ]
    )
    return Pipeline(
        [
            (
                "dl_pca",
                ColumnTransformer([("dl", dl_block, list(dl_columns))], remainder="passthrough"),
            ),
            ("zscore", StandardScaler()),
            ("anova", AnovaFilter(alpha=0.05)),
            ("pearson", CorrelationFilter(0.9, method="pearson")),
            ("lasso", LassoSelector(cv=5, random_state=random_state)),
        ]
    )


def iph_vs_contrast(icc_values: ArrayLike | None = None, random_state: int = 0) -> Pipeline:
    """IPH vs contrast extravasation: ICC > 0.80 (intra and inter: pass their minimum),
    z-score, mRMR top 10, LASSO logistic regression (10-fold)."""
    return _with_icc(
        [
            ("zscore", StandardScaler()),
            ("mrmr", MRMRSelector(k=10)),
            ("lasso", LassoSelector(cv=10, random_state=random_state)),
        ],
        icc_values,
        0.80,
    )


def ais_prognosis_mri(icc_values: ArrayLike | None = None, random_state: int = 0) -> Pipeline:
    """Pei et al. 2025 radiomics: ICC > 0.75, z-score, LASSO (5-fold, minimum binomial
    deviance); the Rad-score is ``LassoSelector.rad_score``."""
    return _with_icc(
        [
            ("zscore", StandardScaler()),
            ("lasso", LassoSelector(cv=5, scoring="neg_log_loss", random_state=random_state)),
        ],
        icc_values,
        0.75,
    )


def ich_expansion_hybrid(
    estimator: Any = None, tol: float = 1e-3, random_state: int = 0
) -> Pipeline:
    """Lu et al. 2024: z-score, sequential forward selection scored by an SVM's
    cross-validated AUC (stratified 5-fold). The stop is not published: additions stop
    when the AUC gains less than ``tol``. ``estimator`` defaults to ``SVC()``."""
    model = SVC() if estimator is None else estimator
    return Pipeline(
        [
            ("zscore", StandardScaler()),
            (
                "forward",
                ForwardSelector(model, tol=tol, scoring="roc_auc", random_state=random_state),
            ),
        ]
    )
