"""Feature selection of the five studies as scikit-learn transformers.

Every selector is a ``SelectorMixin`` estimator: ``fit(X, y)``, ``transform``,
``get_support``, ``get_feature_names_out`` and ``set_output(transform="pandas")`` (when
pandas is installed) work as for scikit-learn's own, and they compose in a ``Pipeline``.

- :class:`ICCFilter`: reader reproducibility (ICC >= threshold), :func:`icc`;
- :class:`MannWhitneyFilter`, :class:`AnovaFilter`: univariate tests;
- :class:`CorrelationFilter`: greedy Spearman/Pearson redundancy removal;
- :class:`MRMRSelector`: minimum redundancy, maximum relevance, top k;
- :class:`LassoSelector`: L1 logistic regression with cross-validated penalty, Rad-score;
- :class:`ForwardSelector`: sequential forward selection by cross-validated score.

z-scoring is scikit-learn's ``StandardScaler`` and PCA its ``PCA`` (re-exported here);
in Jiang et al. PCA reduces the CNN feature block before the ANOVA filter of the
combined model (:func:`pipelines.selection.recipes.ht_combined`). The studies' chains
are in :mod:`pipelines.selection.recipes`.
"""

from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from pipelines.selection.icc import ICCFilter, ICCForm, icc
from pipelines.selection.lasso import LassoSelector, rad_score
from pipelines.selection.mrmr import MRMRSelector
from pipelines.selection.redundancy import CorrelationFilter, abs_correlation
from pipelines.selection.sequential import ForwardSelector
from pipelines.selection.univariate import AnovaFilter, MannWhitneyFilter

__all__ = [
    "PCA",
    "AnovaFilter",
    "CorrelationFilter",
    "ForwardSelector",
    "ICCFilter",
    "ICCForm",
    "LassoSelector",
    "MRMRSelector",
    "MannWhitneyFilter",
    "StandardScaler",
    "abs_correlation",
    "icc",
    "rad_score",
]
