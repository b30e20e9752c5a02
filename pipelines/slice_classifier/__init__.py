"""Haemorrhage-present slice classifier (MONAI backbones of ``pipelines.cnn``) and nDL.

Data flow: ``pipelines.unet.data.make_cases`` (painted head CTs) ->
``train.train_slice_classifier`` (fine-tuning, held-out AUC) -> bundle in the model store
-> ``classifier.load_slice_classifier`` -> ``SliceClassifier.patient_score`` (per-frame
probabilities and the area-weighted patient score nDL of a segmenter's mask).
"""

from pipelines.slice_classifier.classifier import (
    MODEL_NAME,
    MODEL_VERSION,
    PatientScore,
    SliceClassifier,
    SliceInputConfig,
    load_slice_classifier,
    normalised_dl_score,
    slice_inputs,
)

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "PatientScore",
    "SliceClassifier",
    "SliceInputConfig",
    "load_slice_classifier",
    "normalised_dl_score",
    "slice_inputs",
]
