"""Train the hyperdense-region U-Net on painted head CTs and bundle it.

``python -m pipelines.unet.train --out model_store/hyperdense_unet/1.0.0 --cases 64
--seed 0`` draws the training cases (``pipelines.unet.data``, stream 0) and held-out cases
(stream 1), trains on random crops of the frames at the working spacing (``crop`` pixels
square; ``lesion_fraction`` of them centred near a lesion pixel, the rest on a random
brain pixel; left-right flips) with MONAI's ``DiceCELoss`` (Dice + binary cross-entropy,
as Lee et al.; Dice over the whole batch) and Adam at lr 1e-3, then picks the probability
threshold with the best pooled Dice on validation cases (stream 2), scores the held-out
cases through :func:`pipelines.unet.network.predict_probabilities` on their own frames
and writes the bundle. Every random number comes from ``seed``; on one CPU thread the
same seed gives the same weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from numpy.typing import NDArray

from model_store.artefacts import label_table_bytes, training_data_hash
from model_store.registry import STORE_ROOT
from pipelines.unet.bundle import save_bundle
from pipelines.unet.data import LesionCase, ge_available, make_cases
from pipelines.unet.network import (
    AIR_HU,
    UNetConfig,
    build_unet,
    predict_probabilities,
    resample_frames,
    window,
    working_size,
)
from pipelines.unet.pipeline import MODEL_NAME, MODEL_VERSION, InferenceSettings

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.3-0.9, validation picks

log = structlog.get_logger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; recorded in the bundle's manifest."""

    cases: int = 64
    held_out: int = 12
    validation: int = 6
    seed: int = 0
    ge_fraction: float = 0.25
    steps: int = 2000
    batch_size: int = 16
    crop: int = 96
    lr: float = 1e-3
    lesion_fraction: float = 0.6
    network: UNetConfig = field(default_factory=UNetConfig)


@dataclass(frozen=True)
class Evaluation:
    """Dice of thresholded probabilities against the painted masks, per case and pooled."""

    case_ids: tuple[str, ...]
    sources: tuple[str, ...]
    dice: tuple[float, ...]  # NaN for a case with neither truth nor prediction
    pooled_dice: float
    false_positive_ml: tuple[float, ...]  # predicted volume outside the truth, per case

    @property
    def mean_dice(self) -> float:
        """Mean per-case Dice over the cases that hold a lesion or a prediction."""
        values = [d for d in self.dice if not np.isnan(d)]
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        by_source = {}
        for source in sorted(set(self.sources)):
            values = [
                d for d, s in zip(self.dice, self.sources, strict=True) if s == source and d == d
            ]
            by_source[source] = round(float(np.mean(values)), 4) if values else None
        return {
            "cases": len(self.case_ids),
            "mean_dice": round(self.mean_dice, 4),
            "pooled_dice": round(self.pooled_dice, 4),
            "mean_dice_by_source": by_source,
            "per_case_dice": [None if d != d else round(d, 4) for d in self.dice],
            "max_false_positive_ml": round(max(self.false_positive_ml, default=0.0), 3),
        }


@dataclass
class _Pool:
    """Training frames at the working spacing, with where to centre crops."""

    hu: list[NDArray[np.float32]] = field(default_factory=list)  # per frame (H, W)
    mask: list[NDArray[np.bool_]] = field(default_factory=list)
    lesion_px: list[NDArray[np.intp]] = field(default_factory=list)  # (m, 2) per frame
    brain_px: list[NDArray[np.intp]] = field(default_factory=list)

    def add(self, case: LesionCase, spacing_mm: float) -> None:
        """Resample a case's frames and masks and index its lesion and brain pixels."""
        size = working_size(case.hu.shape[1:], case.spacing, spacing_mm)
        hu = resample_frames(case.hu, size).numpy()
        mask = resample_frames(case.mask.astype(np.float32), size).numpy() >= 0.5
        brain = resample_frames(case.brain.astype(np.float32), size).numpy() >= 0.5
        for k in range(len(hu)):
            if not brain[k].any():
                continue
            self.hu.append(hu[k])
            self.mask.append(mask[k])
            self.lesion_px.append(np.argwhere(mask[k]))
            self.brain_px.append(np.argwhere(brain[k])[::7])

    def batch(
        self, rng: np.random.Generator, size: int, crop: int, lesion_fraction: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` crops (HU, mask) of ``crop`` pixels square."""
        positive = [i for i, px in enumerate(self.lesion_px) if len(px)]
        images = np.full((size, crop, crop), AIR_HU, dtype=np.float32)
        masks = np.zeros((size, crop, crop), dtype=np.float32)
        for b in range(size):
            if positive and rng.random() < lesion_fraction:
                k = int(rng.choice(positive))
                centre = self.lesion_px[k][rng.integers(len(self.lesion_px[k]))]
                centre = centre + rng.integers(-crop // 4, crop // 4 + 1, 2)
            else:
                k = int(rng.integers(len(self.hu)))
                centre = self.brain_px[k][rng.integers(len(self.brain_px[k]))]
            _paste(images[b], self.hu[k], centre)
            _paste(masks[b], self.mask[k].astype(np.float32), centre)
            if rng.random() < 0.5:
                images[b], masks[b] = images[b, :, ::-1], masks[b, :, ::-1]
        return torch.from_numpy(images), torch.from_numpy(masks)[:, None]


def _paste(
    target: NDArray[np.float32], source: NDArray[np.float32], centre: NDArray[np.intp]
) -> None:
    """Copy the window of ``source`` centred on ``centre`` into ``target`` (clipped)."""
    side = target.shape[0]
    r0, c0 = int(centre[0]) - side // 2, int(centre[1]) - side // 2
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, source.shape[0]), min(c0 + side, source.shape[1])
    if re > rs and ce > cs:
        target[rs - r0 : re - r0, cs - c0 : ce - c0] = source[rs:re, cs:ce]


def dice(found: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """2|A and B| / (|A| + |B|); NaN when both are empty."""
    total = int(found.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int((found & truth).sum()) / total


def choose_threshold(model: UNet, config: UNetConfig, cases: Sequence[LesionCase]) -> float:
    """The threshold of ``THRESHOLDS`` with the best pooled Dice on ``cases`` (brain only)."""
    overlap = np.zeros(len(THRESHOLDS))
    total = np.zeros(len(THRESHOLDS))
    for case in cases:
        p = predict_probabilities(model, config, case.hu, case.spacing)
        for i, threshold in enumerate(THRESHOLDS):
            found = (p >= threshold) & case.brain
            overlap[i] += (found & case.mask).sum()
            total[i] += found.sum() + case.mask.sum()
    return THRESHOLDS[int(np.argmax(2.0 * overlap / np.maximum(total, 1.0)))]


def evaluate(
    model: UNet, config: UNetConfig, cases: Sequence[LesionCase], threshold: float
) -> Evaluation:
    """Score ``model`` on ``cases`` at their own frames (probability >= threshold, brain)."""
    dices, fps = [], []
    overlap = total = 0
    for case in cases:
        found = predict_probabilities(model, config, case.hu, case.spacing) >= threshold
        found &= case.brain
        dices.append(dice(found, case.mask))
        overlap += int((found & case.mask).sum())
        total += int(found.sum()) + int(case.mask.sum())
        fps.append(case.volume_ml(found & ~case.mask))
    return Evaluation(
        tuple(c.case_id for c in cases),
        tuple(c.source for c in cases),
        tuple(dices),
        2.0 * overlap / total if total else float("nan"),
        tuple(fps),
    )


@dataclass(frozen=True)
class TrainingRun:
    """A trained network and what the run measured."""

    model: UNet
    settings: TrainSettings
    held_out: Evaluation
    training_case_ids: tuple[str, ...]
    sources: dict[str, int]
    seconds: float
    final_loss: float
    threshold: float


def train_unet(settings: TrainSettings, progress: Progress | None = None) -> TrainingRun:
    """Train the U-Net as the module describes; returns the model in eval mode."""
    started = time.monotonic()
    report = progress or (lambda message: None)
    config = settings.network
    cases = make_cases(settings.cases, settings.seed, stream=0, ge_fraction=settings.ge_fraction)
    report(f"{len(cases)} training cases drawn")
    pool = _Pool()
    for case in cases:
        pool.add(case, config.spacing_mm)
    model = build_unet(config, settings.seed)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    rng = np.random.default_rng([settings.seed, 7])
    recent: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps)
        model.train()
        for step in range(1, settings.steps + 1):
            hu, target = pool.batch(
                rng, settings.batch_size, settings.crop, settings.lesion_fraction
            )
            loss = loss_fn(model(window(hu, config.windows)), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            recent = [*recent[-49:], float(loss.detach())]
            if step % 100 == 0 or step == settings.steps:
                report(f"step {step}/{settings.steps}: loss {np.mean(recent):.4f}")
    model.eval()
    validation = make_cases(
        settings.validation, settings.seed, stream=2, ge_fraction=settings.ge_fraction
    )
    threshold = choose_threshold(model, config, validation)
    report(f"threshold {threshold:g} chosen on {len(validation)} validation cases")
    held = make_cases(settings.held_out, settings.seed, stream=1, ge_fraction=settings.ge_fraction)
    evaluation = evaluate(model, config, held, threshold)
    report(f"held-out Dice: mean {evaluation.mean_dice:.3f}, pooled {evaluation.pooled_dice:.3f}")
    sources = {s: sum(c.source == s for c in cases) for s in sorted({c.source for c in cases})}
    return TrainingRun(
        model,
        settings,
        evaluation,
        tuple(c.case_id for c in cases),
        sources,
        time.monotonic() - started,
        float(np.mean(recent)),
        threshold,
    )


def bundle_entries(run: TrainingRun, inference: dict[str, float | int]) -> dict[str, Any]:
    """The manifest entries that say what trained the network and how it scored."""
    s = run.settings
    recipe = {k: v for k, v in asdict(s).items() if k != "network"}
    return {
        "network": {"architecture": "monai.networks.nets.UNet (2-D)", **s.network.to_dict()},
        "inference": inference,
        "training": {
            "data": (
                "painted head CTs of pipelines.unet.data: synthetic head CT of "
                "pipelines.synthetic and, where present, the real GE head CT of the shared "
                "data folder, with haemorrhages and 50-160 HU stains of pipelines.lesions"
            ),
            "seed": s.seed,
            "training_cases": len(run.training_case_ids),
            "training_cases_by_base": run.sources,
            "held_out_cases": s.held_out,
            "validation_cases": s.validation,
            "validation_seed_stream": [s.seed, 2],
            "threshold_from_validation": run.threshold,
            "held_out_seed_stream": [s.seed, 1],
            "training_data_hash": training_data_hash(
                run.training_case_ids,
                label_table_bytes(run.training_case_ids, [1] * len(run.training_case_ids)),
            ),
            "recipe": {
                **recipe,
                "loss": "monai DiceCELoss(sigmoid, batch Dice) = Dice + BCE",
                "optimiser": "Adam, cosine schedule",
            },
            "seconds": round(run.seconds, 1),
            "final_loss": round(run.final_loss, 4),
            "threads": torch.get_num_threads(),
        },
        "metrics": {"held_out": run.held_out.summary()},
    }


def write_unet_bundle(
    run: TrainingRun, out: Path, version: str = MODEL_VERSION, *, replace: bool = False
) -> Path:
    """Write the run's weights and manifest to ``out`` (a model-store version folder)."""
    return save_bundle(
        out,
        MODEL_NAME,
        version,
        run.model.state_dict(),
        bundle_entries(run, InferenceSettings(threshold=run.threshold).to_dict()),
        replace=replace,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, evaluate and bundle the U-Net."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.unet.train", description=__doc__)
    parser.add_argument("--out", type=Path, default=STORE_ROOT / MODEL_NAME / MODEL_VERSION)
    parser.add_argument("--cases", type=int, default=TrainSettings.cases)
    parser.add_argument("--held-out", type=int, default=TrainSettings.held_out)
    parser.add_argument("--validation", type=int, default=TrainSettings.validation)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--ge-fraction", type=float, default=TrainSettings.ge_fraction)
    parser.add_argument("--version", default=MODEL_VERSION)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replace", action="store_true", help="overwrite an existing bundle")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(
        cases=args.cases,
        held_out=args.held_out,
        validation=args.validation,
        seed=args.seed,
        steps=args.steps,
        ge_fraction=args.ge_fraction,
    )
    log.info(
        "training",
        ge_head_ct=ge_available(),
        **{k: v for k, v in asdict(settings).items() if k != "network"},
    )
    run = train_unet(settings, progress=lambda message: log.info(message))
    folder = write_unet_bundle(run, args.out, args.version, replace=args.replace)
    log.info("bundle written", folder=str(folder), **run.held_out.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
