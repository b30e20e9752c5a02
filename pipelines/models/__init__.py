"""Risk models: the studies' classifiers as scikit-learn pipelines and the HT variants.

- :mod:`pipelines.models.classifiers`: KNN, logistic regression, SVM, random forest and
  gradient boosting after z-scoring and a selection chain; the logistic model's
  Rad-score and nomogram points.
- :mod:`pipelines.models.variants`: the HT study's seven variants (clinical, radiomics,
  DL and their combinations) from one recipe, a patient-level split and the held-out
  evaluation table.

Fitted models are saved and loaded by :mod:`model_store.artefacts`.
"""

from pipelines.models.classifiers import (
    CLASSIFIERS,
    SELECTION_CHAINS,
    ClassifierName,
    LinearTerms,
    Nomogram,
    classifier_pipeline,
    linear_predictor_terms,
    logistic_nomogram,
    make_classifier,
    nomogram,
    rad_score,
    selection_chain,
)
from pipelines.models.variants import (
    BLOCK_PREFIXES,
    BLOCKS,
    VARIANTS,
    FeatureBlocks,
    ModelRecipe,
    VariantEvaluation,
    build_variant,
    evaluate_variants,
    evaluation_metrics,
    fit_variants,
    patient_split,
    predict_risk,
)

__all__ = [
    "BLOCKS",
    "BLOCK_PREFIXES",
    "CLASSIFIERS",
    "SELECTION_CHAINS",
    "VARIANTS",
    "ClassifierName",
    "FeatureBlocks",
    "LinearTerms",
    "ModelRecipe",
    "Nomogram",
    "VariantEvaluation",
    "build_variant",
    "classifier_pipeline",
    "evaluate_variants",
    "evaluation_metrics",
    "fit_variants",
    "linear_predictor_terms",
    "logistic_nomogram",
    "make_classifier",
    "nomogram",
    "patient_split",
    "predict_risk",
    "rad_score",
    "selection_chain",
]
