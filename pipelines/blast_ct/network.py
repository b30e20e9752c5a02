"""The BLAST-CT v1 DeepMedic network, written from the published description.

Three pathways see the same input at integer subsampling factors 5, 3 and 1; each is
eight pre-activation blocks (batch norm, dropout, PReLU, valid 3x3x3 convolution, plus a
centre-cropped identity residual where the channel count is unchanged). Their outputs are
upsampled by nearest neighbour, concatenated (factor 5, 3, 1) and classified voxel-wise by
three 1x1x1 blocks. Module names follow the published state dicts so that they load with
``strict=True``: ``path(5, 5, 5)0.path.1.bn.weight`` ... ``fully_connected.2.conv.weight``.

``DeepMedic.forward`` is the reference's patch computation (110^3 in, 30^3 logits out);
``pipelines.blast_ct.inference`` runs the same layers fully convolutionally on a volume.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FEATURE_MAPS = (30, 30, 40, 40, 40, 40, 50, 50)
FULLY_CONNECTED = (250, 250)
HEAD_DROPOUT = (0.0, 0.5, 0.5)
FACTORS = (5, 3, 1)  # pathway order in the state dict and in the concatenation
NUM_CLASSES = 5
PATCH = 110  # test-time input patch side
OUTPUT = 30  # test-time output tile side
PATHWAY_DEPTH = len(FEATURE_MAPS)  # each valid 3x3x3 convolution removes one voxel per side
HEAD_ROWS = 1 << 18  # voxels per matrix product in the head


class Block(nn.Module):
    """BN -> dropout -> PReLU (one slope) -> valid conv, plus a cropped identity residual."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, dropout: float = 0.0
    ) -> None:
        """A block of ``kernel``-sided cubic convolution without bias."""
        super().__init__()
        self.bn = nn.BatchNorm3d(in_channels)
        self.dropout = nn.Dropout(dropout)
        self.prelu = nn.PReLU(num_parameters=1)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, bias=False)
        self.residual = in_channels == out_channels
        self.crop = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to (batch, channels, z, y, x); each axis shrinks by kernel - 1."""
        out = self.conv(self.prelu(self.dropout(self.bn(x))))
        if self.residual:
            c = self.crop
            out = out + (x[:, :, c:-c, c:-c, c:-c] if c else x)
        return out


class Pathway(nn.Module):
    """Eight 3x3x3 blocks at one subsampling factor; 16 voxels are lost per axis."""

    def __init__(self, factor: int, in_channels: int = 1) -> None:
        """Blocks ``1``..``8`` with ``FEATURE_MAPS`` output channels."""
        super().__init__()
        self.factor = factor
        channels = (in_channels, *FEATURE_MAPS)
        self.path = nn.Sequential(
            OrderedDict(
                (str(i + 1), Block(channels[i], channels[i + 1], 3))
                for i in range(len(FEATURE_MAPS))
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """Run the blocks on an already subsampled input."""
        out: Tensor = self.path(x)
        return out


def pathway_name(index: int, factor: int) -> str:
    """The state-dict name of pathway ``index`` with subsampling ``factor``."""
    return f"path({factor}, {factor}, {factor}){index}"


class DeepMedic(nn.Module):
    """BLAST-CT v1 DeepMedic: pathways at factors 5, 3, 1 and a 1x1x1 head of 250, 250, 5."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        """The published architecture (config.json of BLAST-CT v1)."""
        super().__init__()
        for index, factor in enumerate(FACTORS):
            self.add_module(pathway_name(index, factor), Pathway(factor, in_channels))
        widths = (FEATURE_MAPS[-1] * len(FACTORS), *FULLY_CONNECTED, num_classes)
        self.fully_connected = nn.Sequential(
            *(Block(widths[i], widths[i + 1], 1, HEAD_DROPOUT[i]) for i in range(len(widths) - 1))
        )

    @property
    def pathways(self) -> Sequence[Pathway]:
        """The pathways in concatenation order (factor 5, 3, 1)."""
        return [
            module
            for name, module in self.named_children()
            if name != "fully_connected" and isinstance(module, Pathway)
        ]

    def head(self, features: Sequence[Tensor]) -> Tensor:
        """Logits (batch, 5, z, y, x) from pathway outputs of equal size, in pathway order.

        The 1x1x1 blocks are evaluated as matrix products over voxels, ``HEAD_ROWS`` at a
        time: the same arithmetic as ``self.fully_connected``, several times faster on CPU
        and with bounded memory.
        """
        x = torch.cat(list(features), dim=1)
        batch, channels, *size = x.shape
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, channels)
        out = torch.empty((rows.shape[0], NUM_CLASSES), dtype=x.dtype, device=x.device)
        for start in range(0, rows.shape[0], HEAD_ROWS):
            out[start : start + HEAD_ROWS] = self._head_rows(rows[start : start + HEAD_ROWS])
        return out.view(batch, *size, NUM_CLASSES).permute(0, 4, 1, 2, 3)

    def _head_rows(self, x: Tensor) -> Tensor:
        """The 1x1x1 blocks on (voxels, channels) rows (eval mode: dropout is the identity).

        Batch norm is applied as one multiply-add with its folded scale and shift, PReLU
        in place; both equal the modules' arithmetic up to float rounding.
        """
        for block in self.fully_connected:
            assert isinstance(block, Block)
            bn = block.bn
            assert bn.running_mean is not None and bn.running_var is not None
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            y = F.leaky_relu_(torch.addcmul(shift, x, scale), float(block.prelu.weight))
            y = F.linear(y, block.conv.weight.flatten(1))
            x = y.add_(x) if block.residual else y
        return x

    def forward(self, patch: Tensor) -> Tensor:
        """Logits (batch, 5, 30, 30, 30) of input patches (batch, 1, 110, 110, 110).

        Per pathway of factor s: centre crop of side s * (ceil(30 / s) + 16), keep every
        s-th voxel from offset s // 2, run the blocks, repeat each voxel s times per axis
        and centre-crop to 30.
        """
        if tuple(patch.shape[2:]) != (PATCH,) * 3:
            raise ValueError(f"patches must be {PATCH}^3, not {tuple(patch.shape[2:])}")
        features = []
        for pathway in self.pathways:
            s = pathway.factor
            size = s * (-(-OUTPUT // s) + 2 * PATHWAY_DEPTH)
            lo = PATCH // 2 - size // 2
            crop = patch[:, :, lo : lo + size, lo : lo + size, lo : lo + size]
            sub = crop[:, :, s // 2 :: s, s // 2 :: s, s // 2 :: s]
            out = pathway(sub)
            if s > 1:
                out = upsample(out, s)
            off = (out.shape[2] - OUTPUT) // 2
            features.append(out[:, :, off : off + OUTPUT, off : off + OUTPUT, off : off + OUTPUT])
        return self.head(features)


def upsample(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling of (batch, channels, z, y, x): each voxel repeated."""
    for axis in (2, 3, 4):
        x = torch.repeat_interleave(x, factor, dim=axis)
    return x
