"""Radiomics feature extraction with pyradiomics: one parameter file per study."""

from pipelines.radiomics.engine import configure, default_workers
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
    "configure",
    "count_features",
    "default_workers",
    "extract",
    "extract_series",
    "study_feature_counts",
]
