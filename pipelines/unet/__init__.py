"""The trainable hyperdense-region segmenter: a 2-D MONAI U-Net on the acquired frames.

Data flow: ``cases.make_painted_cases`` (generated heads with painted lesions and
calcifications; ``data.make_cases`` is the 1.0.0 recipe, still used by the slice
classifier) -> ``train.train_unet`` (Dice + BCE) -> ``bundle.save_bundle`` (safetensors +
hashed manifest in the model store) -> ``pipeline.UNetPipeline`` (load, segment the frames
inside the cranial cavity, tell calcification apart, clean up, measure).
"""

from pipelines.unet.bundle import Bundle, load_bundle, save_bundle
from pipelines.unet.cases import PaintedCase, make_painted_case, make_painted_cases
from pipelines.unet.data import LesionCase, make_case, make_cases
from pipelines.unet.network import UNetConfig, build_unet, predict_probabilities
from pipelines.unet.pipeline import (
    MODEL_NAME,
    MODEL_VERSION,
    FrameClasses,
    FrameRules,
    InferenceSettings,
    LoadedUNet,
    UNetPipeline,
    classify_frames,
    frame_regions,
    frame_rules,
    load_unet,
)

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "Bundle",
    "FrameClasses",
    "FrameRules",
    "InferenceSettings",
    "LesionCase",
    "LoadedUNet",
    "PaintedCase",
    "UNetConfig",
    "UNetPipeline",
    "build_unet",
    "classify_frames",
    "frame_regions",
    "frame_rules",
    "load_bundle",
    "load_unet",
    "make_case",
    "make_cases",
    "make_painted_case",
    "make_painted_cases",
    "predict_probabilities",
    "save_bundle",
]
