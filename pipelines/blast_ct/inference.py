"""BLAST-CT inference: fully convolutional over boxes of a volume, and the reference tiling.

In the reference tool, output tile i along an axis covers voxels [30 i, 30 i + 30) and its
110^3 input patch starts at 30 i - 40; the factor-s pathway samples that patch every s
voxels from offset s // 2, which in volume coordinates is the fixed lattice
{s m + s // 2}, and output voxel x takes the coarse value of lattice point
m = floor(x / s). Tile borders are multiples of 30, hence of 3 and 5, so the lattice and
this assignment are the same in every tile. ``box_logits`` therefore computes any box of
the output directly: per pathway it gathers the lattice points the box needs (indices
clamped to the volume, which is the reference's edge padding), runs the blocks once and
repeats each coarse voxel s times. ``reference_logits`` is the reference's patch-by-patch
computation, kept to show that both give the same numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from pipelines.blast_ct.network import (
    NUM_CLASSES,
    OUTPUT,
    PATCH,
    DeepMedic,
    upsample,
)
from pipelines.blast_ct.prepared import Box, PreparedMember, footprint, lattice

REFERENCE_BATCH = 32


def box_logits(model: DeepMedic, image: Tensor, box: Box) -> Tensor:
    """Logits (1, 5, *box size) of ``model`` on a normalised image (1, 1, z, y, x)."""
    shape = image.shape[2:]
    features = []
    for pathway in model.pathways:
        s = pathway.factor
        sub = image
        for axis, ((start, stop), n) in enumerate(zip(box, shape, strict=True)):
            points = lattice(start // s, -(-stop // s), s, n, image.device)
            sub = sub.index_select(2 + axis, points)
        out = pathway(sub.contiguous(memory_format=torch.channels_last_3d))
        if s > 1:
            out = upsample(out, s)
        crops = tuple(slice(a - (a // s) * s, b - (a // s) * s) for a, b in box)
        features.append(out[(slice(None), slice(None), *crops)])
    return model.head(features)


def reference_logits(model: DeepMedic, image: Tensor, batch: int = REFERENCE_BATCH) -> Tensor:
    """Logits (1, 5, z, y, x) computed as the reference tool does, patch by patch.

    Tile centres 15 + 30 i for i = 0 .. floor(S / 30) per axis, 110^3 patches cut from the
    edge-padded image, batched ``batch`` at a time in z, y, x order, tiles written without
    overlap and the result cropped to the image.
    """
    shape = tuple(int(n) for n in image.shape[2:])
    counts = [n // OUTPUT + 1 for n in shape]
    margin = PATCH // 2 - OUTPUT // 2
    padded_np = np.pad(
        image[0, 0].cpu().numpy(),
        [(margin, c * OUTPUT - n + margin) for n, c in zip(shape, counts, strict=True)],
        mode="edge",
    )
    padded = torch.from_numpy(padded_np).to(image.device)
    out = torch.zeros((1, NUM_CLASSES, *(c * OUTPUT for c in counts)), device=image.device)
    starts = list(itertools.product(*(range(0, c * OUTPUT, OUTPUT) for c in counts)))
    for i in range(0, len(starts), batch):
        chunk = starts[i : i + batch]
        patches = torch.stack(
            [padded[z : z + PATCH, y : y + PATCH, x : x + PATCH] for z, y, x in chunk]
        )[:, None]
        logits = model(patches)
        for (z, y, x), tile in zip(chunk, logits, strict=True):
            out[0, :, z : z + OUTPUT, y : y + OUTPUT, x : x + OUTPUT] = tile
    return out[:, :, : shape[0], : shape[1], : shape[2]]


def ensemble_sum(
    models: Sequence[DeepMedic],
    image: NDArray[np.float32],
    size: Sequence[int],
    device: torch.device,
) -> NDArray[np.float32]:
    """Sum of the members' softmax probabilities (5, z, y, x) on a normalised image.

    Each member's softmax is added to a float32 running sum in member order, as the
    reference ensemble does. Its argmax is the reference's label; divided by the number
    of members it is the reference's probability. The members run prepared
    (``pipelines.blast_ct.prepared``) over the image's footprint, in z chunks of
    ``size[0]`` planes and y-x columns of at most ``size[1]`` x ``size[2]``; the
    constant-background probabilities fill the rest.
    """
    if not models:
        raise ValueError("an ensemble needs at least one member")
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    volume = volume.to(device)
    area = footprint(image)
    total = np.empty((NUM_CLASSES, *image.shape), dtype=np.float32)
    with torch.inference_mode(), _deterministic(device):
        members = [PreparedMember(model) for model in models]
        total[:] = _summed(torch.softmax(m.background_logits, dim=1) for m in members)
        if area.empty:
            return total
        (_, _), (y0, y1), (x0, x1) = area.region
        for index, member in enumerate(members):
            for (z0, z1), logits in member.logit_chunks(volume, area, size):
                p = torch.softmax(logits, dim=1)[0].cpu().numpy()
                target = total[:, z0:z1, y0:y1, x0:x1]
                if index == 0:
                    target[...] = p
                else:
                    target += p
    return total


def _summed(probabilities: Iterable[Tensor]) -> NDArray[np.float32]:
    """Running float32 sum (5, z, y, x) of (1, 5, z, y, x) tensors, in order."""
    total: Tensor | None = None
    for p in probabilities:
        total = p if total is None else total + p
    assert total is not None
    return np.asarray(total[0].cpu().numpy(), dtype=np.float32)


class _deterministic:
    """Context: cuDNN without autotuning and with deterministic kernels (no-op on CPU)."""

    def __init__(self, device: torch.device) -> None:
        """Remember whether the device is CUDA."""
        self.cuda = device.type == "cuda"
        self.saved = (False, False)

    def __enter__(self) -> None:
        """Switch cuDNN to deterministic, non-benchmarking mode."""
        if self.cuda:
            backend = torch.backends.cudnn
            self.saved = (backend.benchmark, backend.deterministic)
            backend.benchmark, backend.deterministic = False, True

    def __exit__(self, *exc: object) -> None:
        """Restore the previous cuDNN flags."""
        if self.cuda:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.saved
