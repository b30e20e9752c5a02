"""Fine-tuning a backbone with a binary head, as the studies do.

Jiang et al. (HT after thrombectomy): SGD, lr 1e-3, batch 8, binary cross-entropy,
50 epochs, RandomResizedCrop and horizontal flip. Pei et al. (MRI prognosis): Adam,
lr 5e-4, weight decay 1e-4. SGD momentum is not given by the study; 0.9 is used.
Training draws every random number from ``seed`` without touching the global RNG, so a
run on the CPU is repeatable.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from pipelines.cnn.networks import CnnClassifier, default_device


class OptimizerName(StrEnum):
    """The studies' optimisers."""

    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class OptimizerDefaults:
    """A study's optimiser settings."""

    lr: float
    weight_decay: float
    momentum: float = 0.0


STUDY_DEFAULTS = {
    OptimizerName.SGD: OptimizerDefaults(lr=1e-3, weight_decay=0.0, momentum=0.9),
    OptimizerName.ADAM: OptimizerDefaults(lr=5e-4, weight_decay=1e-4),
}


@dataclass(frozen=True)
class EpochProgress:
    """Reported to the progress callback after each epoch."""

    epoch: int  # 1-based
    epochs: int
    loss: float  # mean training loss of the epoch
    accuracy: float  # training accuracy of the epoch (on augmented samples)


ProgressCallback = Callable[[EpochProgress], None]


def random_resized_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """RandomResizedCrop and horizontal flip of a batch (B, C, H, W), as one resampling.

    Each sample gets a crop of ``scale`` of its area and aspect in ``ratio``, at a random
    place, resized back to (H, W), and is mirrored left-right with probability 0.5.
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator, device=generator.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    tx = (1 - sx) * (2 * u[:, 2] - 1)
    ty = (1 - sy) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = (sx * flip).to(x.device)
    theta[:, 0, 2] = tx.to(x.device)
    theta[:, 1, 1] = sy.to(x.device)
    theta[:, 1, 2] = ty.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _optimizer(
    model: CnnClassifier, name: OptimizerName, lr: float | None, weight_decay: float | None
) -> torch.optim.Optimizer:
    d = STUDY_DEFAULTS[name]
    lr = d.lr if lr is None else lr
    wd = d.weight_decay if weight_decay is None else weight_decay
    if name is OptimizerName.SGD:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=d.momentum, weight_decay=wd)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


def fine_tune(
    model: CnnClassifier,
    samples: torch.Tensor,
    labels: NDArray[np.integer] | NDArray[np.bool_] | torch.Tensor,
    *,
    optimizer: OptimizerName | str = OptimizerName.SGD,
    lr: float | None = None,
    weight_decay: float | None = None,
    epochs: int = 50,
    batch_size: int = 8,
    augment: bool = True,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    device: torch.device | None = None,
) -> CnnClassifier:
    """A copy of ``model`` trained on ``samples`` (N, 3, H, W) with binary ``labels`` (N,).

    Loss: binary cross-entropy on the head's logit. ``lr`` and ``weight_decay`` default
    to the chosen optimiser's study settings (``STUDY_DEFAULTS``). ``model`` itself is not
    changed; the result is in eval mode on ``device`` (default: CUDA if available).
    Samples of one case belong to the same side of any train/test split: split by case
    before calling this.
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32).reshape(-1)
    if samples.ndim != 4 or samples.shape[0] != y.shape[0]:
        raise ValueError(f"samples {tuple(samples.shape)} and labels {tuple(y.shape)} disagree")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    device = device or default_device()
    trained = copy.deepcopy(model).to(device)
    n = samples.shape[0]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        order_rng = torch.Generator().manual_seed(seed)
        augment_rng = torch.Generator(device=device).manual_seed(seed + 1)
        opt = _optimizer(trained, OptimizerName(optimizer), lr, weight_decay)
        for epoch in range(1, epochs + 1):
            trained.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for idx in torch.randperm(n, generator=order_rng).split(batch_size):
                if idx.numel() < 2 < n:
                    continue  # batch norm needs two samples; the last one waits a turn
                x = samples[idx].to(device)
                t = y[idx].to(device)
                if augment:
                    x = random_resized_crop_flip(x, augment_rng)
                logits = trained(x).reshape(-1)
                loss = F.binary_cross_entropy_with_logits(logits, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * idx.numel()
                correct += int(((logits.detach() > 0).float() == t).sum())
                seen += idx.numel()
            if progress is not None:
                progress(EpochProgress(epoch, epochs, loss_sum / seen, correct / seen))
    return trained.eval()


@torch.no_grad()
def predict_proba(
    model: CnnClassifier, samples: torch.Tensor, batch_size: int = 16
) -> NDArray[np.float64]:
    """Positive-class probability of each sample (N,)."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(x.to(device))).reshape(-1).cpu() for x in samples.split(batch_size)]
    return torch.cat(out).double().numpy()
