"""A BLAST-CT member prepared for inference on a volume: the arithmetic of ``DeepMedic``
in eval mode, rearranged for speed, streamed along z, and the volume's background skipped
where provably constant.

Rearranged: every tensor and weight is channels-last 3-D (oneDNN's fast layout; a
default-layout weight turns a channels-last input back to the slow layout), convolutions
on the CPU go to oneDNN whatever their size (``convolve``), batch norm is one multiply-add
with its folded scale and shift, PReLU (one slope) is an in-place leaky ReLU, and the
1x1x1 head runs as channels-last 1x1x1 convolutions. A batch norm whose input is a
convolution's output and nothing else (the head's first one, after each pathway's last
block; the head's last one, after its residual block) is folded into that convolution:
its scale multiplies the weights' output channels and the residual, its shift becomes the
bias (``fold_norm``). Channels that a batch norm scales by zero are constants after it:
their share of the next convolution moves into its bias, and a channel that nothing reads
then is not computed (``pruned``; the head reads 47-143 of its 150 input channels across
the published members: 13 % of member 1's multiply-accumulates on the GE head, 27 % of
member 2's). Numbers equal the modules' up to float rounding.

Streamed: each pathway runs once over its footprint, plane chunk by plane chunk along z
(``PathwayStream``): every block keeps the last two planes of its activated input (and
one plane of its residual input), so consecutive chunks share them instead of recomputing
2 x 8 planes of valid-convolution margin per box edge.

Skipped: the window maps everything below -15 HU to ``BACKGROUND`` (-1), so air and fat
around the head are one constant. The factor-s pathway's coarse voxel m reads lattice
points s (m - 8) + s // 2 .. s (m + 8) + s // 2 (clamped to the volume); where none of
them lies in the bounding box of the non-background voxels, every input it reads is the
background and its output is the pathway's output on a constant background, computed
once (``Footprint``). Each pathway therefore runs only on its coarse footprint, the head
only on the footprints' union; the rest takes the constant values. Inside that box, the
factor-1 output at a voxel is the constant wherever no non-background voxel lies within 8
voxels (Chebyshev) of it (``Footprint.varying``, about half of the GE head's region):
each z chunk of that pathway runs only in y-x windows that cover where its output varies
on the chunk's planes (``Footprint.fine_windows``: the bounding box, cut in two wherever
that saves multiply-accumulates, margins included), and the frame-wide planes it carries
into the next chunk hold each block's constant-background input elsewhere. The head runs
voxel by voxel only where the factor-1 output varies; elsewhere its input is constant on
each cell of the factor-3 and factor-5 lattices (7 x 7 x 7 cells per 15 x 15 x 15
voxels), so it runs once per cell and the cell's logits are copied to its voxels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage
from torch import Tensor
from torch.nn import functional as F

from pipelines.blast_ct.network import (
    FACTORS,
    FEATURE_MAPS,
    NUM_CLASSES,
    PATHWAY_DEPTH,
    Block,
    DeepMedic,
)

BACKGROUND = -1.0
"""The windowed value of every voxel below -15 HU."""

CHANNELS_LAST = torch.channels_last_3d
ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_VALID = ([0, 0, 0], [1, 1, 1], [1, 1, 1], 1)  # padding, stride, dilation, groups
HEAD_VOXELS = 1 << 18  # voxels per z slab of the 1x1x1 head (bounds its 250-channel memory)
ALIGN = 15  # the head's y-x frame starts and ends on multiples of every factor (5, 3, 1)

Range = tuple[int, int]
"""Half-open index range (start, stop) along one axis."""

Box = tuple[Range, Range, Range]
"""Half-open ranges along (z, y, x)."""


@dataclass(frozen=True)
class PreparedBlock:
    """One pre-activation block in eval mode: scale-shift (``None``: folded away into the
    previous convolution), leaky ReLU, convolution (plus a bias where constant input
    channels or the next batch norm are folded in), residual (times ``residual_scale``
    where that norm is folded in)."""

    scale: Tensor | None
    shift: Tensor | None
    slope: float
    weight: Tensor
    bias: Tensor | None
    crop: int | None  # residual centre crop; None: no residual
    residual_scale: Tensor | None = None
    folded: bool = False  # the next batch norm is folded in

    def activate(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Scale-shift and leaky ReLU of ``x`` into ``out`` (a new tensor if ``None``)."""
        if self.scale is not None and self.shift is not None:
            return F.leaky_relu_(torch.addcmul(self.shift, x, self.scale, out=out), self.slope)
        if out is None:
            return F.leaky_relu(x, self.slope)
        return torch._C._nn.leaky_relu(x, self.slope, out=out)

    def add_residual(self, out: Tensor, x: Tensor) -> None:
        """Add the (cropped) residual input ``x`` to the convolution's output in place."""
        if self.residual_scale is None:
            out.add_(x)
        else:
            out.addcmul_(x, self.residual_scale)

    def __call__(self, x: Tensor) -> Tensor:
        """The block on a whole channels-last (1, channels, z, y, x) tensor."""
        if self.crop is None and self.scale is None:
            y = F.leaky_relu_(x, self.slope)  # x is not needed again: activate in place
        else:
            y = self.activate(x)
        out = convolve(y, self.weight, self.bias)
        del y
        if self.crop is not None:
            c = self.crop
            self.add_residual(out, x[:, :, c:-c, c:-c, c:-c] if c else x)
        return out


def convolve(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Valid convolution, channels-last out.

    On the CPU oneDNN is called directly: torch's dispatcher sends 3-D inputs with
    batch x channels x depth x height <= 20480 (the coarse pathways' boxes) and
    one-channel inputs to its slow reference kernel, whose output is in the default layout.
    """
    if x.device.type == "cpu" and ONEDNN:
        out: Tensor = torch.ops.aten.mkldnn_convolution(x, weight, bias, *ONEDNN_VALID)
    else:
        out = F.conv3d(x, weight, bias)
    return out.contiguous(memory_format=CHANNELS_LAST)


def norm_affine(block: Block) -> tuple[Tensor, Tensor]:
    """A block's batch norm (eval mode) as per-channel scale and shift, shape (channels,)."""
    bn = block.bn
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale.detach(), shift.detach()


def prepare_block(block: Block) -> PreparedBlock:
    """Fold a block's batch norm into scale and shift; its weight channels-last."""
    scale, shift = norm_affine(block)
    shape = (1, -1, 1, 1, 1)
    return PreparedBlock(
        scale=scale.reshape(shape).clone(),
        shift=shift.reshape(shape).clone(),
        slope=float(block.prelu.weight),
        weight=block.conv.weight.detach().contiguous(memory_format=CHANNELS_LAST),
        bias=None,
        crop=block.crop if block.residual else None,
    )


def fold_norm(block: PreparedBlock, scale: Tensor, shift: Tensor) -> PreparedBlock:
    """``block`` followed by the per-channel affine ``scale`` x + ``shift`` of its output,
    as one block: exact, since the affine is applied to the convolution's output (plus the
    residual) and nothing reads the unscaled output."""
    if block.folded:
        raise ValueError("a block takes one folded norm")
    weight = flushed(block.weight * scale.reshape(-1, 1, 1, 1, 1))
    residual = None if block.crop is None else flushed(scale.reshape(1, -1, 1, 1, 1))
    bias = shift if block.bias is None else block.bias * scale + shift
    return replace(
        block,
        weight=weight.contiguous(memory_format=CHANNELS_LAST),
        bias=flushed(bias),
        residual_scale=residual,
        folded=True,
    )


def pruned(
    blocks: Sequence[PreparedBlock], needed: Tensor, inputs: Tensor
) -> tuple[list[PreparedBlock], Tensor]:
    """Unfolded blocks that compute only the output channels ``needed`` (bool, the last
    block's outputs) and the channels those depend on, from input channels ``inputs``
    (bool, the first block's), with the kept output channels (bool).

    A channel that a batch norm scales by zero is a constant after that norm and its
    leaky ReLU (the published members have them mostly at the end of each pathway and
    in the head's first norm), so its share of the convolution is a constant: it moves
    into the bias and the channel is not read. A channel no later block reads is not
    computed, unless a residual carries it to one that does (a residual block keeps its
    input's channels). Exact up to float rounding.
    """
    kept: list[Tensor] = [needed] * (len(blocks) + 1)
    required = needed
    for k in range(len(blocks) - 1, -1, -1):
        block = blocks[k]
        assert block.scale is not None and not block.folded
        read = block.scale.flatten() != 0
        if block.crop is not None:
            required = required | read
            kept[k + 1] = required
        else:
            kept[k + 1] = required
            required = read
        if not bool(kept[k + 1].any()):  # keep a channel: no convolution without outputs
            kept[k + 1] = kept[k + 1].clone()
            kept[k + 1][0] = True
    if bool((required & ~inputs).any()):
        raise ValueError("the blocks read input channels that are not given")
    kept[0] = inputs
    out = []
    for k, block in enumerate(blocks):
        assert block.scale is not None and block.shift is not None
        if block.crop is not None:
            kept[k + 1] = kept[k]
        scale, shift = block.scale.flatten(), block.shift.flatten()
        constant = (scale == 0).to(block.weight.dtype)
        value = F.leaky_relu(shift, block.slope) * constant
        weight = block.weight.contiguous()
        bias = block.bias
        if bool(constant.any()):
            share = (weight * value.reshape(1, -1, 1, 1, 1)).sum(dim=(1, 2, 3, 4))
            bias = share if bias is None else bias + share
            weight = weight * (1 - constant).reshape(1, -1, 1, 1, 1)
        rows, cols = kept[k + 1], kept[k]
        shape = (1, -1, 1, 1, 1)
        out.append(
            replace(
                block,
                scale=scale[cols].reshape(shape).clone(),
                shift=shift[cols].reshape(shape).clone(),
                weight=weight[rows][:, cols].contiguous(memory_format=CHANNELS_LAST),
                bias=None if bias is None else bias[rows].clone(),
            )
        )
    return out, kept[-1]


def flushed(values: Tensor) -> Tensor:
    """A copy with subnormal floats (|v| < 1.18e-38) set to zero: a folded product of two
    small numbers can be subnormal, and the CPU computes with subnormals up to 50 times
    slower (a coarse pathway's last convolution took 4x as long); zeroing them changes no
    result beyond float32 rounding."""
    return values.masked_fill(values.abs() < torch.finfo(values.dtype).tiny, 0.0)


def unnormed(block: PreparedBlock) -> PreparedBlock:
    """``block`` whose batch norm has been folded into the previous convolution."""
    return replace(block, scale=None, shift=None)


def _prepared(blocks: torch.nn.Sequential) -> list[PreparedBlock]:
    """The blocks of a sequence, prepared."""
    return [prepare_block(block) for block in blocks if isinstance(block, Block)]


def run_blocks(blocks: Sequence[PreparedBlock], x: Tensor) -> Tensor:
    """Blocks in order on a channels-last tensor."""
    for block in blocks:
        x = block(x)
    return x


def widened(window: tuple[Range, Range], margin: int) -> tuple[Range, Range]:
    """A y-x window grown by ``margin`` on every side."""
    (ya, yb), (xa, xb) = window
    return ((ya - margin, yb + margin), (xa - margin, xb + margin))


class BlockStream:
    """One block applied to consecutive plane chunks of its input along z, each chunk in
    one or more y-x windows of the block's input ``frame`` (absolute coordinates).

    The first chunk (at least 3 planes) gives 2 planes fewer; every later chunk as many
    planes as it has: the last two activated planes and the last input plane (for the
    residual) of every window are kept in frame-wide planes, which is exactly the margin
    the valid 3x3x3 convolution and the centre-cropped residual read across the chunk
    border. Frame positions no window of a chunk covered keep the block's input on a
    constant background (``constant``, (1, channels, 1, 1, 1)): a chunk's windows must
    cover every position of its planes where the input differs from it.
    """

    def __init__(self, block: PreparedBlock, frame: tuple[Range, Range], constant: Tensor) -> None:
        """A stream of ``block`` over ``frame`` that has seen no plane yet."""
        self.block = block
        self.origin = (frame[0][0], frame[1][0])
        self.size = (frame[0][1] - frame[0][0], frame[1][1] - frame[1][0])
        self.constant = constant
        self.activated_constant = block.activate(constant)
        self.activated: Tensor | None = None  # last 2 activated planes of the previous chunk
        self.last_input: Tensor | None = None  # its last input plane (residual blocks)
        self.next: tuple[Tensor, Tensor | None] | None = None

    def begin(self) -> None:
        """Start a chunk: the planes carried into the next one start as the constant."""

        def planes(value: Tensor, count: int) -> Tensor:
            shape = (1, int(value.shape[1]), count, *self.size)
            return value.expand(shape).contiguous(memory_format=CHANNELS_LAST)

        residual = planes(self.constant, 1) if self.block.crop is not None else None
        self.next = (planes(self.activated_constant, 2), residual)

    def end(self) -> None:
        """Finish a chunk: its carried planes become the next chunk's."""
        assert self.next is not None
        self.activated, self.last_input = self.next
        self.next = None

    def __call__(self, x: Tensor, window: tuple[Range, Range]) -> Tensor:
        """Output planes of the chunk's input ``x`` (1, channels, planes, y, x) that covers
        ``window`` of the frame."""
        assert self.next is not None, "begin() a chunk first"
        block = self.block
        area = (
            slice(None),
            slice(None),
            slice(None),
            *(slice(a - o, b - o) for (a, b), o in zip(window, self.origin, strict=True)),
        )
        carried = 0 if self.activated is None else 2
        _, channels, planes, rows, cols = x.shape
        y = torch.empty(
            (1, channels, carried + planes, rows, cols),
            dtype=x.dtype,
            device=x.device,
            memory_format=CHANNELS_LAST,
        )
        if self.activated is not None:
            y[:, :, :2].copy_(self.activated[area])
        block.activate(x, out=y[:, :, carried:])
        out = convolve(y, block.weight, block.bias)
        activated, last_input = self.next
        activated[area] = y[:, :, -2:]
        del y
        if block.crop is not None:
            assert last_input is not None
            centre = (slice(None), slice(None), slice(None), slice(1, -1), slice(1, -1))
            if self.last_input is None:
                block.add_residual(out, x[:, :, 1:-1, 1:-1, 1:-1])
            else:
                block.add_residual(out[:, :, :1], self.last_input[area][centre])
                block.add_residual(out[:, :, 1:], x[:, :, : planes - 1, 1:-1, 1:-1])
            last_input[area] = x[:, :, -1:]
        return out


class PathwayStream:
    """A pathway's blocks streamed along z over the y-x ``frame`` of its output: the first
    chunk gives ``2 PATHWAY_DEPTH`` planes fewer than it has, every later chunk as many as
    it has. ``inputs``: each block's input on a constant background."""

    def __init__(
        self, blocks: Sequence[PreparedBlock], frame: tuple[Range, Range], inputs: Sequence[Tensor]
    ) -> None:
        """Streams of every block, none fed yet."""
        self.frame = frame
        self.streams = [
            BlockStream(block, widened(frame, PATHWAY_DEPTH - k), constant)
            for k, (block, constant) in enumerate(zip(blocks, inputs, strict=True))
        ]

    def __call__(self, x: Tensor, windows: Sequence[tuple[Range, Range]]) -> list[Tensor]:
        """Output planes of the next input chunk ``x`` (1, channels, planes, frame rows +
        2 ``PATHWAY_DEPTH``, frame columns + 2 ``PATHWAY_DEPTH``) in each of the output
        ``windows``, which must cover every position of the chunk's output planes where
        the output is not the constant-background one (then so is every block's input
        outside them on the planes carried into the next chunk: ``Footprint.fine_window``)."""
        for stream in self.streams:
            stream.begin()
        outputs = []
        (fy, _), (fx, _) = self.frame
        for window in windows:
            (ya, yb), (xa, xb) = window
            y = x[
                :,
                :,
                :,
                ya - fy : yb - fy + 2 * PATHWAY_DEPTH,
                xa - fx : xb - fx + 2 * PATHWAY_DEPTH,
            ]
            for k, stream in enumerate(self.streams):
                y = stream(y, widened(window, PATHWAY_DEPTH - k))
            outputs.append(y)
        for stream in self.streams:
            stream.end()
        return outputs


@dataclass(frozen=True)
class Footprint:
    """Where a volume's logits can differ from the constant-background ones.

    ``coarse[s]``: per axis, the coarse indices of the factor-s pathway that read a
    non-background voxel; ``region``: the voxels where any pathway does (the bounding box
    of the three, upsampled), empty ranges when the volume is all background;
    ``varying``: the voxels (z, y, x) whose factor-1 output reads a non-background voxel
    (``None``: all of the factor-1 pathway's footprint).
    """

    shape: tuple[int, int, int]
    coarse: dict[int, tuple[Range, Range, Range]]
    region: Box
    varying: NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)

    @property
    def empty(self) -> bool:
        """Whether every voxel takes the background logits."""
        return any(b <= a for a, b in self.region)

    def fine_varying(self, box: Box) -> NDArray[np.bool_]:
        """Where the factor-1 output varies within ``box`` (inside the volume)."""
        part = tuple(slice(a, b) for a, b in box)
        if self.varying is not None:
            return np.ascontiguousarray(self.varying[part])
        inside = np.zeros(tuple(b - a for a, b in box), dtype=bool)
        fine = tuple(
            slice(max(f0 - a, 0), max(min(f1, b) - a, 0))
            for (a, b), (f0, f1) in zip(box, self.coarse[1], strict=True)
        )
        inside[fine] = True
        return inside

    def fine_windows(self, planes: Range) -> list[tuple[Range, Range]]:
        """Windows that cover the varying factor-1 output on ``planes`` (see
        ``fine_window``: a chunk streamed in them is exact) at fewer multiply-accumulates
        than their bounding box (``covering_windows``)."""
        (fy0, fy1), (fx0, fx1) = self.coarse[1][1:]
        varying = np.any(self.fine_varying((planes, (fy0, fy1), (fx0, fx1))), axis=0)
        return covering_windows(varying, (fy0, fx0))

    def fine_window(self, planes: Range) -> tuple[Range, Range] | None:
        """The y-x bounding box of the varying factor-1 output on ``planes`` (``None``
        where it varies nowhere there).

        A chunk of these planes streamed in this window is exact: outside it the output
        is the constant, and so is every block's input on the planes the chunk carries
        into the next one (block k's input at p varies only if a non-background voxel
        lies within k - 1 of p, and p is at most 9 - k planes past the chunk's last
        output plane, so that plane varies at p's y and x).
        """
        (fy0, fy1), (fx0, fx1) = self.coarse[1][1:]
        varying = np.any(self.fine_varying((planes, (fy0, fy1), (fx0, fx1))), axis=0)
        rows, cols = np.flatnonzero(varying.any(axis=1)), np.flatnonzero(varying.any(axis=0))
        if not rows.size:
            return None
        return (
            (fy0 + int(rows[0]), fy0 + int(rows[-1]) + 1),
            (fx0 + int(cols[0]), fx0 + int(cols[-1]) + 1),
        )


CUT_STEP = 8  # y-x windows are cut at multiples of this many voxels from their start
BLOCK_MACS = tuple(a * b * 27 for a, b in itertools.pairwise((1, *FEATURE_MAPS)))


def window_cost(rows: int, cols: int) -> int:
    """Multiply-accumulates per plane of the factor-1 pathway computing a rows x cols
    window (each block on the window widened by its valid-convolution margin)."""
    depth = len(BLOCK_MACS)
    return sum(
        (rows + 2 * (depth - 1 - k)) * (cols + 2 * (depth - 1 - k)) * macs
        for k, macs in enumerate(BLOCK_MACS)
    )


def covering_windows(
    varying: NDArray[np.bool_], origin: tuple[int, int]
) -> list[tuple[Range, Range]]:
    """Windows (absolute y-x ranges; ``origin`` is the mask's first row and column) that
    cover every true pixel of ``varying`` (rows, cols), by recursive bisection: a window
    is cut in two along y or x where the two parts' bounding boxes cost fewer
    multiply-accumulates, margins included, than the window (``window_cost``)."""
    rows, cols = np.flatnonzero(varying.any(axis=1)), np.flatnonzero(varying.any(axis=0))
    if not rows.size:
        return []
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = varying[y0:y1, x0:x1]
    best, parts = window_cost(y1 - y0, x1 - x0), None
    for axis in (0, 1):
        for cut in range(CUT_STEP, box.shape[axis] - CUT_STEP + 1, CUT_STEP):
            halves = np.split(box, [cut], axis=axis)
            cost = 0
            for half in halves:
                r, c = np.flatnonzero(half.any(axis=1)), np.flatnonzero(half.any(axis=0))
                cost += window_cost(int(r[-1] - r[0]) + 1, int(c[-1] - c[0]) + 1) if r.size else 0
            if cost < best:
                best, parts = cost, (axis, cut, halves)
    if parts is None:
        return [((origin[0] + y0, origin[0] + y1), (origin[1] + x0, origin[1] + x1))]
    axis, cut, halves = parts
    second = (
        (origin[0] + y0 + cut, origin[1] + x0)
        if axis == 0
        else (origin[0] + y0, origin[1] + x0 + cut)
    )
    return [
        *covering_windows(halves[0], (origin[0] + y0, origin[1] + x0)),
        *covering_windows(halves[1], second),
    ]


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
    varying = ndimage.maximum_filter(
        foreground.view(np.uint8), size=2 * PATHWAY_DEPTH + 1, mode="nearest"
    ).view(bool)
    return Footprint(shape, coarse, (region[0], region[1], region[2]), varying)


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


def split(span: Range, most: int) -> list[Range]:
    """``span`` cut into the fewest even pieces of at most ``most`` indices."""
    start, stop = span
    count = max(-(-(stop - start) // most), 1)
    edges = [start + round(i * (stop - start) / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def fold_chain(
    blocks: Sequence[PreparedBlock], following: tuple[Tensor, Tensor] | None = None
) -> list[PreparedBlock]:
    """Blocks with every foldable batch norm folded into the convolution before it.

    Block i + 1's norm folds into block i where block i + 1 has no residual (then block
    i's output is read by that norm alone); ``following`` (scale, shift) is the norm
    that alone reads the last block's output.
    """
    out = list(blocks)
    for i in range(len(out) - 1):
        after = out[i + 1]
        if after.crop is None and after.scale is not None and after.shift is not None:
            out[i] = fold_norm(out[i], after.scale.flatten(), after.shift.flatten())
            out[i + 1] = unnormed(after)
    if following is not None:
        out[-1] = fold_norm(out[-1], *following)
    return out


def constant_inputs(blocks: Sequence[PreparedBlock], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Each block's input (1, channels, 1, 1, 1) and the output on a constant input ``x``
    (1, 1, 17, 17, 17): the values every position far enough inside it takes."""
    inputs = []
    for block in blocks:
        c = (int(x.shape[2]) - 1) // 2
        inputs.append(x[:, :, c : c + 1, c : c + 1, c : c + 1].clone())
        x = block(x)
    return inputs, x


def cells(start: int, stop: int, factors: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The cells of ``start`` .. ``stop`` - 1 on which the coarse pathways (``factors``)
    are all constant: (each cell's first index, each index's cell)."""
    index = np.arange(start, stop)
    new = (index == start) | np.any([index % s == 0 for s in factors], axis=0)
    first = index[new]
    return torch.from_numpy(first), torch.from_numpy(np.cumsum(new) - 1)


def aligned(window: tuple[Range, Range]) -> tuple[Range, Range]:
    """A y-x window widened to multiples of ``ALIGN``."""
    (ya, yb), (xa, xb) = window
    return ((ya - ya % ALIGN, -(-yb // ALIGN) * ALIGN), (xa - xa % ALIGN, -(-xb // ALIGN) * ALIGN))


class PreparedMember:
    """One member ready to compute the logits of a volume's footprint (see the module text)."""

    def __init__(self, model: DeepMedic) -> None:
        """Prepare and fold the blocks and compute the constant-background outputs."""
        head = _prepared(model.fully_connected)
        assert head[0].scale is not None
        read = head[0].scale.flatten() != 0
        paths: list[tuple[int, list[PreparedBlock]]] = []
        kept = []
        start = 0
        for pathway in model.pathways:
            blocks = _prepared(pathway.path)
            part = slice(start, start + int(blocks[-1].weight.shape[0]))
            start = part.stop
            one = torch.ones(1, dtype=torch.bool, device=read.device)
            blocks, outputs = pruned(blocks, read[part], one)
            paths.append((pathway.factor, blocks))
            kept.append(outputs)
        classes = torch.ones(NUM_CLASSES, dtype=torch.bool, device=read.device)
        head, _ = pruned(head, classes, torch.cat(kept))
        first = head[0]
        assert first.scale is not None and first.shift is not None and first.crop is None
        scale, shift = first.scale.flatten(), first.shift.flatten()
        self.pathways: list[tuple[int, list[PreparedBlock]]] = []
        start = 0
        for factor, blocks in paths:
            part = slice(start, start + int(blocks[-1].weight.shape[0]))
            start = part.stop
            self.pathways.append((factor, fold_chain(blocks, (scale[part], shift[part]))))
        self.head = fold_chain([unnormed(first), *head[1:]])
        device = first.weight.device
        side = 2 * PATHWAY_DEPTH + 1
        flat = torch.full((1, 1, side, side, side), BACKGROUND, device=device)
        with torch.inference_mode():
            runs = [
                constant_inputs(blocks, flat.contiguous(memory_format=CHANNELS_LAST))
                for _, blocks in self.pathways
            ]
            self.inputs = [inputs for inputs, _ in runs]
            self.constants = [output for _, output in runs]
            self.background_logits = run_blocks(self.head, torch.cat(self.constants, dim=1))
        widths = (int(c.shape[1]) for c in self.constants)
        self.channels = [0, *itertools.accumulate(widths)]  # pathways' channel edges in the head
        (index,) = (i for i, (s, _) in enumerate(self.pathways) if s == 1)
        self.fine = (self.pathways[index][1], self.inputs[index], self.constants[index])

    def logit_chunks(
        self, volume: Tensor, area: Footprint, size: Sequence[int]
    ) -> Iterator[tuple[Range, Tensor]]:
        """Logits of the footprint's region of a windowed volume (1, 1, z, y, x), in order
        of z chunks of at most ``size[0]`` planes: ((start, stop), (1, 5, planes, region's
        rows, region's columns)).

        The coarse pathways run first over their whole footprints; the factor-1 pathway is
        streamed chunk by chunk over the windows where it varies, in columns of at most
        ``size[1]`` x ``size[2]``. Where its output varies, the head runs voxel by voxel;
        elsewhere its input is constant on each cell of the coarse lattices and it runs
        once per cell. The coarse outputs' frame in y and x is the region widened to
        multiples of ``ALIGN``, so that each coarse value fills s x s voxels by a broadcast
        copy.
        """
        (z0, z1), (y0, y1), (x0, x1) = area.region
        frame = aligned(((y0, y1), (x0, x1)))
        rows, cols = (b - a for a, b in frame)
        coarse = {
            s: self._coarse(volume, area, s, blocks, inputs, constant, frame)
            for (s, blocks), inputs, constant in zip(
                self.pathways, self.inputs, self.constants, strict=True
            )
            if s > 1
        }
        cell_logits, (z_cell, y_cell, x_cell) = self._cell_logits(coarse, area.region, frame)
        fine = FineStreams(volume, area, *self.fine, size[1:])
        step = max(HEAD_VOXELS // (rows * cols), 1)
        for za in range(z0, z1, size[0]):
            zb = min(za + size[0], z1)
            fine.advance(za, zb)
            out = torch.empty((1, NUM_CLASSES, zb - za, y1 - y0, x1 - x0), device=volume.device)
            for j in range(0, zb - za, step):
                planes = range(za + j, min(za + j + step, zb))
                target = out[:, :, j : j + len(planes)]
                z = z_cell[planes.start - z0 : planes.stop - z0]
                target[0] = cell_logits[:, z[:, None, None], y_cell[None, :, None], x_cell]
                if fine.window is not None:
                    self._varying_logits(target, coarse, fine, area, planes, frame)
            yield (za, zb), out

    def _cell_logits(
        self, coarse: dict[int, tuple[int, Tensor]], region: Box, frame: Sequence[Range]
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The logits of a constant factor-1 output over ``region``, once per cell of the
        coarse lattices (where every coarse pathway is constant): (logits (5, z cells,
        y cells, x cells), each region voxel's cell along z, y and x)."""
        device = self.background_logits.device
        (z_first, z_cell), (y_first, y_cell), (x_first, x_cell) = (
            cells(a, b, list(coarse)) for a, b in region
        )
        logits = torch.empty((NUM_CLASSES, len(z_first), len(y_first), len(x_first)), device=device)
        step = max(HEAD_VOXELS // (len(y_first) * len(x_first)), 1)
        for start in range(0, len(z_first), step):
            firsts = z_first[start : start + step]
            head_input = torch.empty(
                (1, self.channels[-1], len(firsts), len(y_first), len(x_first)),
                device=device,
                memory_format=CHANNELS_LAST,
            )
            for (s, _), (lo, hi), constant in zip(
                self.pathways, itertools.pairwise(self.channels), self.constants, strict=True
            ):
                part = head_input[:, lo:hi]
                if s == 1:
                    part.copy_(constant.expand_as(part))
                    continue
                plane, values = coarse[s]
                z, y, x = (
                    (index // s - origin).to(device)
                    for index, origin in (
                        (firsts, plane),
                        (y_first - frame[0][0], 0),
                        (x_first - frame[1][0], 0),
                    )
                )
                part[0] = values[0][:, z[:, None, None], y[None, :, None], x]
            logits[:, start : start + len(firsts)] = run_blocks(self.head, head_input)[0]
        return logits, (z_cell.to(device), y_cell.to(device), x_cell.to(device))

    def _varying_logits(
        self,
        target: Tensor,
        coarse: dict[int, tuple[int, Tensor]],
        fine: FineStreams,
        area: Footprint,
        planes: range,
        frame: Sequence[Range],
    ) -> None:
        """Overwrite ``target``'s voxels where the factor-1 output varies with the head's
        logits there, computed voxel by voxel."""
        assert fine.window is not None
        (ya, yb), (xa, xb) = fine.window
        varying = area.fine_varying(((planes.start, planes.stop), (ya, yb), (xa, xb)))
        if not varying.any():
            return
        mask = torch.from_numpy(varying).to(target.device)
        box = aligned(fine.window)
        slab = torch.empty(
            (1, self.channels[-1], len(planes), *(b - a for a, b in box)),
            device=target.device,
            memory_format=CHANNELS_LAST,
        )
        origin = (box[0][0], box[1][0])
        offset = (origin[0] - frame[0][0], origin[1] - frame[1][0])
        for (s, _), (first, stop) in zip(
            self.pathways, itertools.pairwise(self.channels), strict=True
        ):
            part = slab[:, first:stop]
            if s == 1:
                fine.fill(part, planes, origin)
            else:
                _upsample_planes(part, coarse[s], planes, s, offset)
        inside = (slice(ya - origin[0], yb - origin[0]), slice(xa - origin[1], xb - origin[1]))
        rows = slab[0][(slice(None), slice(None), *inside)].permute(1, 2, 3, 0)[mask]
        count, channels = (int(n) for n in rows.shape)
        logits = run_blocks(self.head, rows.view(1, count, 1, 1, channels).permute(0, 4, 1, 2, 3))
        (y0, _), (x0, _) = area.region[1:]
        place = (slice(None), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        target[0][(slice(None), *place)].permute(1, 2, 3, 0)[mask] = logits.reshape(
            NUM_CLASSES, count
        ).t()

    @staticmethod
    def _coarse(
        volume: Tensor,
        area: Footprint,
        s: int,
        blocks: Sequence[PreparedBlock],
        inputs: Sequence[Tensor],
        constant: Tensor,
        frame: Sequence[Range],
    ) -> tuple[int, Tensor]:
        """(first coarse plane, output (1, channels, planes, frame rows / s, frame cols / s))
        of the factor-s pathway: the region's coarse planes, the head frame's coarse rows
        and columns; computed on the pathway's footprint, the constant elsewhere."""
        z0, z1 = area.region[0]
        need = [(z0 // s, -(-z1 // s)), *((a // s, b // s) for a, b in frame)]
        sizes = [b - a for a, b in need]
        out = constant.expand(1, -1, *sizes).contiguous(memory_format=CHANNELS_LAST)
        run = [
            (max(a, v0), min(b, v1)) for (a, b), (v0, v1) in zip(need, area.coarse[s], strict=True)
        ]
        if all(b > a for a, b in run):
            window = (run[1], run[2])
            stream = PathwayStream(blocks, window, inputs)
            source = lattice_input(volume, s, run)
            chunk = max(HEAD_VOXELS // max(int(source.shape[3] * source.shape[4]), 1), 1)
            fed = 0
            for za, zb in split(run[0], chunk):
                stop = zb - run[0][0] + 2 * PATHWAY_DEPTH
                (planes,) = stream(source[:, :, fed:stop], [window])
                fed = stop
                region = [(za, zb), *run[1:]]
                place = tuple(
                    slice(a - n0, b - n0) for (a, b), (n0, _) in zip(region, need, strict=True)
                )
                out[(slice(None), slice(None), *place)] = planes
        return need[0][0], out


def _upsample_planes(
    target: Tensor,
    coarse: tuple[int, Tensor],
    planes: range,
    s: int,
    offset: tuple[int, int],
) -> None:
    """Fill ``target`` (1, channels, len(planes), rows, cols), whose first row and column
    lie ``offset`` voxels (multiples of ``ALIGN``) past the coarse output's, with the
    nearest coarse values: plane z takes coarse plane floor(z / s), each coarse value an
    s x s patch."""
    first, values = coarse
    rows, cols = (int(n) // s for n in target.shape[3:])
    oy, ox = (o // s for o in offset)
    for k, z in enumerate(planes):
        source = values[0, :, z // s - first].permute(1, 2, 0)  # (coarse rows, cols, channels)
        source = source[oy : oy + rows, ox : ox + cols]
        plane = target[0, :, k].permute(1, 2, 0)  # (rows, cols, channels), a strided view
        blocks = plane.unflatten(1, (-1, s)).unflatten(0, (-1, s))
        blocks.copy_(source[:, None, :, None, :])


class FineStreams:
    """The factor-1 pathway streamed along z, one z chunk at a time, over windows that
    cover where its output varies on the chunk's planes (``Footprint.fine_windows``), in
    y-x columns of at most ``most`` (rows, columns)."""

    def __init__(
        self,
        volume: Tensor,
        area: Footprint,
        blocks: Sequence[PreparedBlock],
        inputs: Sequence[Tensor],
        constant: Tensor,
        most: Sequence[int],
    ) -> None:
        """A stream over the pathway's footprint, not fed yet."""
        self.area = area
        self.constant = constant
        self.most = most
        self.span = area.coarse[1][0]
        frame = (area.coarse[1][1], area.coarse[1][2])
        running = min(b - a for a, b in area.coarse[1]) > 0
        self.source = lattice_input(volume, 1, area.coarse[1]) if running else None
        self.stream = PathwayStream(blocks, frame, inputs)
        self.fed = 0
        self.planes: Range = (0, 0)
        self.window: tuple[Range, Range] | None = None
        self.columns: list[tuple[Range, Range]] = []
        self.outputs: list[Tensor] = []

    def advance(self, start: int, stop: int) -> None:
        """Compute the output planes ``start`` .. ``stop`` - 1 within the footprint; every
        call continues where the last one stopped."""
        first, last = max(start, self.span[0]), min(stop, self.span[1])
        self.planes, self.window, self.columns, self.outputs = (first, last), None, [], []
        if last <= first or self.source is None:
            return
        windows = self.area.fine_windows((first, last))
        if windows:
            self.window = (
                (min(ys[0] for ys, _ in windows), max(ys[1] for ys, _ in windows)),
                (min(xs[0] for _, xs in windows), max(xs[1] for _, xs in windows)),
            )
        self.columns = [
            (ry, rx)
            for ys, xs in windows
            for ry in split(ys, self.most[0])
            for rx in split(xs, self.most[1])
        ]
        end = last - self.span[0] + 2 * PATHWAY_DEPTH
        self.outputs = self.stream(self.source[:, :, self.fed : end], self.columns)
        self.fed = end

    def fill(self, target: Tensor, planes: range, origin: tuple[int, int]) -> None:
        """Write planes ``planes`` of the pathway's output into ``target`` (1, channels,
        len(planes), rows, cols) whose first row and column are ``origin``: the computed
        values in the chunk's window, the constant elsewhere."""
        target.copy_(self.constant.expand_as(target))
        low, high = max(planes.start, self.planes[0]), min(planes.stop, self.planes[1])
        if high <= low:
            return
        inside = slice(low - planes.start, high - planes.start)
        oy, ox = origin
        for ((ya, yb), (xa, xb)), output in zip(self.columns, self.outputs, strict=True):
            source = output[:, :, low - self.planes[0] : high - self.planes[0]]
            place = (inside, slice(ya - oy, yb - oy), slice(xa - ox, xb - ox))
            target[(slice(None), slice(None), *place)] = source


def lattice_input(volume: Tensor, s: int, run: Sequence[Range]) -> Tensor:
    """The lattice samples that coarse ranges ``run`` of the factor-s pathway read, by one
    gather (``index_select`` along each axis of a 5-D tensor is orders of magnitude
    slower on the CPU)."""
    z, y, x = (
        lattice(a, b, s, int(n), volume.device)
        for (a, b), n in zip(run, volume.shape[2:], strict=True)
    )
    return volume[0, 0][z[:, None, None], y[None, :, None], x[None, None, :]][None, None]
