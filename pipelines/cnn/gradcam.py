"""Grad-CAM of the CNN (``monai.visualize.GradCAM``) placed back on the source frame.

The map is computed on one sample (by default the one centred on the key frame) at the
backbone's last convolutional stage (``BackboneSpec.cam_layer``: ``layer4`` for the
ResNets and SEResNeXt-50, ``head_act`` for EfficientNet-Lite0), resized to the crop and
written into a zero image of the frame's size, so a Secondary Capture can overlay it on
the frame as acquired. :func:`restrict_to_region` keeps a map near the lesion it explains
(a risk model shows heat only on and around the lesion it scored) and says how much of
the map's heat lay there.

With a ``reference`` input (:func:`pipelines.cnn.inputs.lesion_free_samples`: the
same input without the lesion), the map is Grad-CAM relative to that reference: the
layer's activations minus those the reference gives, weighted by the class gradients as
usual. The input equals the reference away from the lesion, so the map holds only what
the lesion changes in the layer (for a lesion-only input, ``InputConfig.lesion_margin_mm``,
the reference is all black and the black surround adds nothing by itself):
plain Grad-CAM credits the surround with the activations every input shares (biases,
padding edges), and its peak lay a median 5.4 mm, up to 50 mm, from the lesion
(``bench/gradcam_placement.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from numpy.typing import NDArray
from scipy.ndimage import distance_transform_edt
from torch import nn

from pipelines.cnn.inputs import CaseInput, CropBox
from pipelines.cnn.networks import CnnClassifier

POSITIVE, NEGATIVE = 1, 0


@dataclass(frozen=True)
class CamResult:
    """A Grad-CAM heat map in [0, 1] (1 = strongest evidence for the class)."""

    frame_index: int  # source frame the map belongs to (the sample's centre frame)
    crop: CropBox
    heat_crop: NDArray[np.float32]  # (crop.side, crop.side)
    heat_frame: NDArray[np.float32]  # (rows, columns) of the frame, zero outside the crop


class _ReferenceGradCAM(GradCAM):
    """MONAI's Grad-CAM on the activation difference to a reference input."""

    def __init__(self, nn_module: nn.Module, target_layers: str, reference: torch.Tensor) -> None:
        super().__init__(nn_module=nn_module, target_layers=target_layers, postprocessing=_unit_max)
        self.reference = reference

    def compute_map(  # type: ignore[override]
        self,
        x: torch.Tensor,
        class_idx: int | None = None,
        retain_graph: bool = False,
        layer_idx: int = -1,
    ) -> torch.Tensor:
        """ReLU(sum_k w_k (A_k(x) - A_k(reference))), w_k the mean gradient of the class
        score over layer k at ``x``."""
        reference = self.reference.to(x.device).expand_as(x)
        _, base, _ = self.nn_module(reference, class_idx=class_idx)
        base_acti = base[layer_idx].detach()
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph)
        weights = grad[layer_idx].mean(dim=(2, 3), keepdim=True)
        return F.relu((weights * (acti[layer_idx] - base_acti)).sum(1, keepdim=True))


class _TwoClass(nn.Module):
    """The one-logit classifier seen as two classes: (negative, positive) = (-z, z)."""

    def __init__(self, model: CnnClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.cat([-z, z], dim=1)


def _unit_max(x: torch.Tensor) -> torch.Tensor:
    """Scale a non-negative map to a maximum of 1 (an all-zero map stays zero)."""
    peak = float(x.detach().max())
    return x / peak if peak > 0 else torch.zeros_like(x)


def grad_cam(
    model: CnnClassifier,
    case: CaseInput,
    *,
    class_index: int = POSITIVE,
    sample: int | None = None,
    target_layer: str | None = None,
    reference: torch.Tensor | None = None,
) -> CamResult:
    """Grad-CAM of one sample of ``case`` for ``class_index`` (POSITIVE or NEGATIVE).

    ``target_layer`` is a module name inside ``model`` (default ``model.cam_layer``).
    ``reference`` (1, 3, size, size): the map is relative to this input (see the
    module); None: plain Grad-CAM. The map is rectified, scaled to a maximum of 1
    (MONAI's default post-processing inverts it, so it is not used) and resized
    bilinearly to the crop.
    """
    if class_index not in (POSITIVE, NEGATIVE):
        raise ValueError(f"class_index must be {POSITIVE} or {NEGATIVE}, not {class_index}")
    index = case.key_sample if sample is None else sample
    device = next(model.parameters()).device
    wrapper = _TwoClass(model).train(model.training)  # MONAI restores the wrapper's mode
    layer = f"model.{target_layer or model.cam_layer}"
    cam = (
        GradCAM(nn_module=wrapper, target_layers=layer, postprocessing=_unit_max)
        if reference is None
        else _ReferenceGradCAM(wrapper, layer, reference)
    )
    x = case.samples[index : index + 1].to(device)
    heat = cam(x, class_idx=class_index).detach()
    model.zero_grad(set_to_none=True)
    side = case.crop.side
    heat = F.interpolate(heat.float(), size=(side, side), mode="bilinear", align_corners=False)
    heat_crop = np.nan_to_num(heat[0, 0].cpu().numpy().clip(0.0, 1.0)).astype(np.float32)
    heat_frame = np.zeros(case.frame_shape, dtype=np.float32)
    heat_frame[case.crop.rows, case.crop.cols] = heat_crop
    return CamResult(case.sample_centres[index], case.crop, heat_crop, heat_frame)


@dataclass(frozen=True)
class RegionHeat:
    """A frame's heat map kept near a region, and how much of the map lay there."""

    heat: NDArray[np.float32]  # (rows, columns), zero beyond ``margin_mm`` of the region
    share: float  # share of the whole map's heat within the margin (0 for an empty map)


def peak_distance_mm(
    heat: NDArray[np.floating], region: NDArray[np.bool_], pixel_spacing_mm: tuple[float, float]
) -> float:
    """Euclidean distance (mm) from the map's peak (its first maximum) to ``region`` on one
    frame; 0 when the peak lies in the region."""
    if heat.shape != region.shape:
        raise ValueError(f"heat map {heat.shape} and region {region.shape} differ in shape")
    if not region.any():
        raise ValueError("the region is empty on this frame: no distance to it")
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return float(distance_transform_edt(~region, sampling=pixel_spacing_mm)[peak])


def restrict_to_region(
    heat: NDArray[np.floating],
    region: NDArray[np.bool_],
    pixel_spacing_mm: tuple[float, float],
    margin_mm: float,
) -> RegionHeat:
    """``heat`` kept within ``margin_mm`` (Euclidean, in mm) of ``region`` on one frame.

    The kept part is not rescaled, so its values stay those of the whole map; ``share``
    says how much of the map's heat the kept part holds.
    """
    if heat.shape != region.shape:
        raise ValueError(f"heat map {heat.shape} and region {region.shape} differ in shape")
    if not region.any():
        raise ValueError("the region is empty on this frame: no heat map belongs there")
    distance = distance_transform_edt(~region, sampling=pixel_spacing_mm)
    near = distance <= margin_mm
    kept = np.where(near, heat, 0.0).astype(np.float32)
    total = float(np.sum(heat))
    return RegionHeat(kept, float(np.sum(kept)) / total if total > 0 else 0.0)
