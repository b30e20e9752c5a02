"""CNN features and Grad-CAM for the risk models: input preparation from a lesion mask,
MONAI 2-D backbones by name, fine-tuning with a binary head, pooled-feature export with
PCA, Grad-CAM on the source frame (plain, or relative to a no-lesion reference input),
the lesion heat maps every risk pipeline draws, and weights as safetensors.

Data flow: ``inputs.prepare_case`` -> ``networks.build_classifier`` ->
``training.fine_tune`` -> ``features.case_features`` -> ``features.fit_pca``;
``lesion_maps.lesion_heat_maps`` (on ``gradcam.grad_cam``) for the Secondary Captures;
``weights`` to store the network.
"""

from pipelines.cnn.features import case_features, fit_pca, sample_features
from pipelines.cnn.gradcam import (
    NEGATIVE,
    POSITIVE,
    CamResult,
    RegionHeat,
    grad_cam,
    peak_distance_mm,
    restrict_to_region,
)
from pipelines.cnn.inputs import (
    SLICES_AROUND_LARGEST,
    TWO_POINT_FIVE_D,
    CaseInput,
    CropBox,
    InputConfig,
    largest_frame,
    lesion_free_samples,
    prepare_case,
    prepare_frames,
)
from pipelines.cnn.lesion_maps import (
    HEAT_MARGIN_MM,
    HEATMAP_REACH,
    lesion_frame_offsets,
    lesion_grad_cams,
    lesion_heat_maps,
)
from pipelines.cnn.networks import (
    SPECS,
    BackboneName,
    CnnClassifier,
    build_classifier,
    default_device,
)
from pipelines.cnn.training import EpochProgress, OptimizerName, fine_tune, predict_proba
from pipelines.cnn.weights import load_backbone_weights, load_classifier, save_classifier

__all__ = [
    "HEATMAP_REACH",
    "HEAT_MARGIN_MM",
    "NEGATIVE",
    "POSITIVE",
    "SLICES_AROUND_LARGEST",
    "SPECS",
    "TWO_POINT_FIVE_D",
    "BackboneName",
    "CamResult",
    "CaseInput",
    "CnnClassifier",
    "CropBox",
    "EpochProgress",
    "InputConfig",
    "OptimizerName",
    "RegionHeat",
    "build_classifier",
    "case_features",
    "default_device",
    "fine_tune",
    "fit_pca",
    "grad_cam",
    "largest_frame",
    "lesion_frame_offsets",
    "lesion_free_samples",
    "lesion_grad_cams",
    "lesion_heat_maps",
    "load_backbone_weights",
    "load_classifier",
    "peak_distance_mm",
    "predict_proba",
    "prepare_case",
    "prepare_frames",
    "restrict_to_region",
    "sample_features",
    "save_classifier",
]
