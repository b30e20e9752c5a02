"""Radiomics feature extraction with pyradiomics: one parameter file per study."""

from pipelines.radiomics.extract import extract, extract_series
from pipelines.radiomics.params import (
    STUDY_PARAMS,
    RadiomicsError,
    count_features,
    study_feature_counts,
)

__all__ = [
    "STUDY_PARAMS",
    "RadiomicsError",
    "count_features",
    "extract",
    "extract_series",
    "study_feature_counts",
]
