"""The trainable hyperdense-region segmenter: a 2-D MONAI U-Net on the acquired frames.

Data flow: ``data.make_cases`` (painted head CTs) -> ``train.train_unet`` (Dice + BCE)
-> ``bundle.save_bundle`` (safetensors + hashed manifest in the model store) ->
``pipeline.UNetPipeline`` (load, segment the frames, clean up, measure).
"""

from pipelines.unet.bundle import Bundle, load_bundle, save_bundle
from pipelines.unet.data import LesionCase, make_case, make_cases
from pipelines.unet.network import UNetConfig, build_unet, predict_probabilities
from pipelines.unet.pipeline import (
    MODEL_NAME,
    MODEL_VERSION,
    InferenceSettings,
    LoadedUNet,
    UNetPipeline,
    frame_regions,
    load_unet,
)

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "Bundle",
    "InferenceSettings",
    "LesionCase",
    "LoadedUNet",
    "UNetConfig",
    "UNetPipeline",
    "build_unet",
    "frame_regions",
    "load_bundle",
    "load_unet",
    "make_case",
    "make_cases",
    "predict_probabilities",
    "save_bundle",
]
