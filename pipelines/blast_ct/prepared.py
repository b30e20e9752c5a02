"""A BLAST-CT member prepared for inference on a volume: the arithmetic of ``DeepMedic``
in eval mode, rearranged for speed, and the volume's background skipped where provably
constant.

Rearranged: every tensor and weight is channels-last 3-D (oneDNN's fast layout; a
default-layout weight turns a channels-last input back to the slow layout), convolutions
on the CPU go to oneDNN whatever their size (``convolve``), batch norm is
one multiply-add with its folded scale and shift, PReLU (one slope) is an in-place leaky
ReLU, residuals are added in place, and the 1x1x1 head runs as channels-last 1x1x1
convolutions over slabs of the box. Numbers equal the modules' up to float rounding.

Skipped: the window maps everything below -15 HU to ``BACKGROUND`` (-1), so air and fat
around the head are one constant. The factor-s pathway's coarse voxel m reads lattice
points s (m - 8) + s // 2 .. s (m + 8) + s // 2 (clamped to the volume); where none of
them lies in the bounding box of the non-background voxels, every input it reads is the
background and its output is the pathway's output on a constant background, computed
once (``Footprint``). Where all three pathways are constant, so are the logits. Each
pathway therefore runs only on its coarse footprint, and only the footprint of the three
is tiled with boxes; the rest takes the constant values.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pipelines.blast_ct.network import FACTORS, NUM_CLASSES, PATHWAY_DEPTH, Block, DeepMedic

BACKGROUND = -1.0
"""The windowed value of every voxel below -15 HU."""

CHANNELS_LAST = torch.channels_last_3d
ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_VALID = ([0, 0, 0], [1, 1, 1], [1, 1, 1], 1)  # padding, stride, dilation, groups
HEAD_VOXELS = 1 << 18  # voxels per z slab of the 1x1x1 head (bounds its 250-channel memory)

Range = tuple[int, int]
"""Half-open index range (start, stop) along one axis."""

Box = tuple[Range, Range, Range]
"""Half-open ranges along (z, y, x)."""


@dataclass(frozen=True)
class PreparedBlock:
    """One pre-activation block in eval mode: scale-shift, leaky ReLU, convolution, residual."""

    scale: Tensor
    shift: Tensor
    slope: float
    weight: Tensor
    crop: int | None  # residual centre crop; None: no residual

    def __call__(self, x: Tensor) -> Tensor:
        """The block on a channels-last (1, channels, z, y, x) tensor."""
        y = F.leaky_relu_(torch.addcmul(self.shift, x, self.scale), self.slope)
        out = convolve(y, self.weight)
        del y
        if self.crop is not None:
            c = self.crop
            out.add_(x[:, :, c:-c, c:-c, c:-c] if c else x)
        return out


def convolve(x: Tensor, weight: Tensor) -> Tensor:
    """Valid convolution without bias, channels-last out.

    On the CPU oneDNN is called directly: torch's dispatcher sends 3-D inputs with
    batch x channels x depth x height <= 20480 (the coarse pathways' boxes) to its slow
    reference kernel, whose output is in the default layout. A one-channel input (the
    first block) stays with the dispatcher.
    """
    if x.device.type == "cpu" and ONEDNN and x.shape[1] > 1:
        out: Tensor = torch.ops.aten.mkldnn_convolution(x, weight, None, *ONEDNN_VALID)
    else:
        out = F.conv3d(x, weight)
    return out.contiguous(memory_format=CHANNELS_LAST)


def prepare_block(block: Block) -> PreparedBlock:
    """Fold a block's batch norm into scale and shift; its weight channels-last."""
    bn = block.bn
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    shape = (1, -1, 1, 1, 1)
    return PreparedBlock(
        scale=scale.detach().reshape(shape).clone(),
        shift=shift.detach().reshape(shape).clone(),
        slope=float(block.prelu.weight),
        weight=block.conv.weight.detach().contiguous(memory_format=CHANNELS_LAST),
        crop=block.crop if block.residual else None,
    )


def _prepared(blocks: torch.nn.Sequential) -> list[PreparedBlock]:
    """The blocks of a sequence, prepared."""
    return [prepare_block(block) for block in blocks if isinstance(block, Block)]


def run_blocks(blocks: Sequence[PreparedBlock], x: Tensor) -> Tensor:
    """Blocks in order on a channels-last tensor."""
    for block in blocks:
        x = block(x)
    return x


@dataclass(frozen=True)
class Footprint:
    """Where a volume's logits can differ from the constant-background ones.

    ``coarse[s]``: per axis, the coarse indices of the factor-s pathway that read a
    non-background voxel; ``region``: the voxels where any pathway does (the bounding box
    of the three, upsampled), empty ranges when the volume is all background.
    """

    shape: tuple[int, int, int]
    coarse: dict[int, tuple[Range, Range, Range]]
    region: Box

    @property
    def empty(self) -> bool:
        """Whether every voxel takes the background logits."""
        return any(b <= a for a, b in self.region)


def coarse_range(low: int, high: int, length: int, factor: int) -> Range:
    """Coarse indices m of one axis whose lattice points s (m +- 8) + s // 2, clamped to
    the axis, reach the voxels ``low`` .. ``high`` (inclusive)."""
    m = np.arange(0, (length - 1) // factor + 1)
    first = np.clip(factor * (m - PATHWAY_DEPTH) + factor // 2, 0, length - 1)
    last = np.clip(factor * (m + PATHWAY_DEPTH) + factor // 2, 0, length - 1)
    hit = m[(last >= low) & (first <= high)]
    return (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)


def footprint(image: np.ndarray) -> Footprint:
    """The footprint of a windowed 1 mm image (z, y, x)."""
    shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    foreground = image != np.float32(BACKGROUND)
    spans: list[tuple[int, int]] = []
    for axis in range(3):
        hits = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        spans.append((int(hits[0]), int(hits[-1])) if hits.size else (1, 0))
    coarse: dict[int, tuple[Range, Range, Range]] = {}
    for s in FACTORS:
        r = [
            coarse_range(lo, hi, n, s) if hi >= lo else (0, 0)
            for (lo, hi), n in zip(spans, shape, strict=True)
        ]
        coarse[s] = (r[0], r[1], r[2])
    region = []
    for axis, n in enumerate(shape):
        starts = [coarse[s][axis][0] * s for s in FACTORS if coarse[s][axis][1] > 0]
        stops = [min(coarse[s][axis][1] * s, n) for s in FACTORS if coarse[s][axis][1] > 0]
        region.append((min(starts), max(stops)) if starts else (0, 0))
    return Footprint(shape, coarse, (region[0], region[1], region[2]))


def boxes(area: Footprint, size: Sequence[int]) -> Iterator[Box]:
    """Boxes of at most ``size`` tiling the footprint's region, z outermost.

    Along each axis the factor-1 pathway's footprint is split evenly and the bands of the
    region beside it are boxes of their own: every box edge inside that footprint costs
    the full-resolution pathway 2 x 8 voxels of valid-convolution margin, edges outside it
    cost nothing there.
    """
    ranges = []
    for axis, step in enumerate(size):
        start, stop = area.region[axis]
        inner = (max(area.coarse[1][axis][0], start), min(area.coarse[1][axis][1], stop))
        if inner[1] <= inner[0]:
            inner = (start, stop)
        pieces = [(start, inner[0]), inner, (inner[1], stop)]
        edges = [start]
        for a, b in pieces:
            count = -(-(b - a) // step)
            edges += [a + round(i * (b - a) / count) for i in range(1, count + 1)]
        ranges.append(list(itertools.pairwise(edges)))
    yield from itertools.product(ranges[0], ranges[1], ranges[2])


def lattice(first: int, stop: int, factor: int, length: int, device: torch.device) -> Tensor:
    """Volume indices of coarse points ``first`` .. ``stop`` - 1 and the ``PATHWAY_DEPTH``
    extra points each side that the valid convolutions consume, clamped to the axis (the
    reference's edge padding)."""
    points = torch.arange(first - PATHWAY_DEPTH, stop + PATHWAY_DEPTH, device=device)
    return (points * factor + factor // 2).clamp_(0, length - 1)


class PreparedMember:
    """One member ready to compute logits of any box of a volume (see the module text)."""

    def __init__(self, model: DeepMedic) -> None:
        """Prepare the blocks and compute the constant-background outputs."""
        self.pathways = [(p.factor, _prepared(p.path)) for p in model.pathways]
        self.head = _prepared(model.fully_connected)
        device = self.head[0].weight.device
        side = 2 * PATHWAY_DEPTH + 1
        flat = torch.full((1, 1, side, side, side), BACKGROUND, device=device)
        with torch.inference_mode():
            self.constants = [
                run_blocks(blocks, flat.contiguous(memory_format=CHANNELS_LAST))
                for _, blocks in self.pathways
            ]
            self.background_logits = self.head_logits(torch.cat(self.constants, dim=1))

    def head_logits(self, features: Tensor) -> Tensor:
        """Logits (1, 5, z, y, x) of concatenated channels-last features, in z slabs."""
        _, _, depth, rows, cols = features.shape
        out = torch.empty((1, NUM_CLASSES, depth, rows, cols), device=features.device)
        step = max(HEAD_VOXELS // max(rows * cols, 1), 1)
        for z in range(0, depth, step):
            out[:, :, z : z + step] = run_blocks(self.head, features[:, :, z : z + step])
        return out

    def logits(self, volume: Tensor, box: Box, area: Footprint) -> Tensor:
        """Logits (1, 5, *box size) on a windowed volume (1, 1, z, y, x).

        Each pathway runs once on the coarse voxels the box needs; the head then runs on
        z slabs, each gathering its voxels' coarse values (voxel x: coarse floor(x / s))."""
        size = [b - a for a, b in box]
        coarse = []
        for (s, blocks), constant in zip(self.pathways, self.constants, strict=True):
            need = [(a // s, -(-b // s)) for a, b in box]
            output = self._pathway(volume, blocks, constant, s, need, area.coarse[s])
            picks = [
                torch.arange(a, b, device=volume.device) // s - n0
                for (a, b), (n0, _) in zip(box, need, strict=True)
            ]
            coarse.append((s, output, picks))
        channels = sum(int(c.shape[1]) for c in self.constants)
        out = torch.empty((1, NUM_CLASSES, *size), device=volume.device)
        step = max(HEAD_VOXELS // (size[1] * size[2]), 1)
        for z in range(0, size[0], step):
            depth = min(step, size[0] - z)
            slab = torch.empty(
                (1, channels, depth, size[1], size[2]),
                device=volume.device,
                memory_format=CHANNELS_LAST,
            )
            channel = 0
            for s, output, (pz, py, px) in coarse:
                width = int(output.shape[1])
                if s == 1:  # coarse voxels are the box's own: a slice, no gather
                    gathered = output[:, :, z : z + depth]
                else:
                    rows = pz[z : z + depth]
                    gathered = output[:, :, rows[:, None, None], py[:, None], px]
                slab[:, channel : channel + width].copy_(gathered)
                channel += width
            out[:, :, z : z + depth] = run_blocks(self.head, slab)
        return out

    def _pathway(
        self,
        volume: Tensor,
        blocks: Sequence[PreparedBlock],
        constant: Tensor,
        s: int,
        need: Sequence[Range],
        varying: Sequence[Range],
    ) -> Tensor:
        """Coarse output (1, 50, *need sizes) of the factor-s pathway: computed where it
        reads non-background voxels, the constant elsewhere."""
        run = [(max(a, v0), min(b, v1)) for (a, b), (v0, v1) in zip(need, varying, strict=True)]
        sizes = [b - a for a, b in need]
        if run == list(need):
            return run_blocks(blocks, self._lattice_input(volume, s, run))
        if any(b <= a for a, b in run):
            return constant.expand(1, -1, *sizes)
        out = constant.expand(1, -1, *sizes).contiguous(memory_format=CHANNELS_LAST)
        region = tuple(slice(a - n0, b - n0) for (a, b), (n0, _) in zip(run, need, strict=True))
        out[(slice(None), slice(None), *region)] = run_blocks(
            blocks, self._lattice_input(volume, s, run)
        )
        return out

    @staticmethod
    def _lattice_input(volume: Tensor, s: int, run: Sequence[Range]) -> Tensor:
        """The lattice samples that coarse ranges ``run`` of the factor-s pathway read."""
        sub = volume
        for axis, (a, b) in enumerate(run):
            n = int(volume.shape[2 + axis])
            sub = sub.index_select(2 + axis, lattice(a, b, s, n, volume.device))
        return sub.contiguous(memory_format=CHANNELS_LAST)
