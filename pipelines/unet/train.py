"""Train the hyperdense-region U-Net on generated head CTs and bundle it.

``python -m pipelines.unet.train --out model_store/hyperdense_unet/3.0.0 --version 3.0.0
--seed 0 --threads 2`` draws the training cases (``pipelines.unet.cases``, generated heads
only, stream 0), trains on random crops of the frames at the working spacing (``crop``
pixels square; ``lesion_fraction`` of them centred near a lesion pixel, ``hard_fraction``
on a hard negative: a calcification or the brain within ``EDGE_PX`` of its edge, where the
scanner's rise toward the skull lies; the rest on a random brain pixel; left-right flips)
with MONAI's ``DiceCELoss`` (Dice + binary cross-entropy, as Lee et al.; Dice over the
whole batch) and Adam with a cosine schedule, then picks the
probability threshold with the best pooled Dice on validation cases (stream 2), scores
the held-out cases (stream 1) through the pipeline's own rules
(:func:`pipelines.unet.pipeline.frame_rules`, small regions dropped) and writes the
bundle with its manifest (sha256, data recipe, seeds, notice). Every random number comes
from ``seed``; on one CPU thread the same seed gives the same weights. ``--device cuda``
trains on a GPU where there is one. Version 1.0.0 was trained by this module's earlier
recipe (``pipelines.unet.data``, see its manifest), 2.0.0 on heads without the scanner's
rise toward the skull (96 cases, 1500 steps, hard negatives within 4 pixels of the edge).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from numpy.typing import NDArray
from scipy import ndimage

from model_store.artefacts import label_table_bytes, training_data_hash
from model_store.registry import STORE_ROOT
from pipelines.unet.bundle import load_bundle, save_bundle
from pipelines.unet.cases import PaintedCase, make_painted_cases
from pipelines.unet.data import LesionCase
from pipelines.unet.network import (
    AIR_HU,
    UNetConfig,
    build_unet,
    predict_probabilities,
    resample_frames,
    window,
    working_size,
)
from pipelines.unet.pipeline import (
    MODEL_NAME,
    MODEL_VERSION,
    FrameRules,
    InferenceSettings,
    frame_regions,
    frame_rules,
)

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.3-0.9, validation picks
NOTICE = "trained on synthetic data - not for clinical use"
EDGE_PX = 9  # hard negatives: brain pixels this close to its edge (the skull's rise, 8 mm)

log = structlog.get_logger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; recorded in the bundle's manifest."""

    cases: int = 128
    held_out: int = 12
    validation: int = 8
    seed: int = 0
    steps: int = 3000
    batch_size: int = 16
    crop: int = 96
    lr: float = 1e-3
    lesion_fraction: float = 0.5
    hard_fraction: float = 0.25
    min_volume_ml: float = 0.1
    bone: bool = False  # the bone rule of pipelines.unet.bone at validation and inference
    init_from: str | None = None  # start from this bundled version's weights (fine-tuning)
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
    hard_px: list[NDArray[np.intp]] = field(default_factory=list)
    brain_px: list[NDArray[np.intp]] = field(default_factory=list)

    def add(self, case: PaintedCase, spacing_mm: float) -> None:
        """Resample a case's frames and masks and index its lesion, hard-negative and
        brain pixels."""
        size = working_size(case.hu.shape[1:], case.spacing, spacing_mm)
        hu = resample_frames(case.hu, size).numpy()
        mask = resample_frames(case.mask.astype(np.float32), size).numpy() >= 0.5
        brain = resample_frames(case.brain.astype(np.float32), size).numpy() >= 0.5
        calcified = resample_frames(case.calcification.astype(np.float32), size).numpy() > 0
        for k in range(len(hu)):
            if not brain[k].any():
                continue
            edge = brain[k] & ~ndimage.binary_erosion(brain[k], iterations=EDGE_PX)
            self.hu.append(hu[k])
            self.mask.append(mask[k])
            self.lesion_px.append(np.argwhere(mask[k]))
            self.hard_px.append(np.concatenate([np.argwhere(calcified[k]), np.argwhere(edge)[::5]]))
            self.brain_px.append(np.argwhere(brain[k])[::7])

    def batch(
        self, rng: np.random.Generator, size: int, crop: int, fractions: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` crops (HU, mask) of ``crop`` pixels square; ``fractions`` are the
        shares centred on a lesion and on a hard negative."""
        positive = [i for i, px in enumerate(self.lesion_px) if len(px)]
        hard = [i for i, px in enumerate(self.hard_px) if len(px)]
        images = np.full((size, crop, crop), AIR_HU, dtype=np.float32)
        masks = np.zeros((size, crop, crop), dtype=np.float32)
        for b in range(size):
            draw = rng.random()
            if positive and draw < fractions[0]:
                k = int(rng.choice(positive))
                centre = self.lesion_px[k][rng.integers(len(self.lesion_px[k]))]
                centre = centre + rng.integers(-crop // 4, crop // 4 + 1, 2)
            elif hard and draw < fractions[0] + fractions[1]:
                k = int(rng.choice(hard))
                centre = self.hard_px[k][rng.integers(len(self.hard_px[k]))]
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


def case_spacing(case: LesionCase) -> tuple[float, float, float]:
    """(typical slice gap, row, column) of a case's frames, in mm."""
    return float(np.median(case.thickness_mm)), case.spacing[0], case.spacing[1]


def _scored(
    model: UNet, config: UNetConfig, case: LesionCase, rules: InferenceSettings
) -> tuple[NDArray[np.float32], FrameRules]:
    """A case's probabilities and the pipeline's rules applied to its frames."""
    applied = frame_rules(case.hu, case_spacing(case), rules)
    probabilities = predict_probabilities(model, config, applied.network_hu, case.spacing)
    return probabilities, applied


def _kept(found: NDArray[np.bool_], case: LesionCase, min_volume_ml: float) -> NDArray[np.bool_]:
    """``found`` less its 3-D regions smaller than ``min_volume_ml`` (planimetric)."""
    voxel_ml = case.thickness_mm * case.spacing[0] * case.spacing[1] / 1000.0
    kept = np.zeros(found.shape, dtype=bool)
    for region in frame_regions(found, voxel_ml, min_volume_ml):
        kept |= region
    return kept


def choose_threshold(
    model: UNet, config: UNetConfig, cases: Sequence[LesionCase], rules: InferenceSettings
) -> float:
    """The threshold of ``THRESHOLDS`` with the best pooled Dice on ``cases`` under the
    pipeline's rules (``rules``' own threshold is not used)."""
    overlap = np.zeros(len(THRESHOLDS))
    total = np.zeros(len(THRESHOLDS))
    for case in cases:
        probabilities, applied = _scored(model, config, case, rules)
        for i, threshold in enumerate(THRESHOLDS):
            found = _kept(applied.kept(probabilities >= threshold), case, rules.min_volume_ml)
            overlap[i] += (found & case.mask).sum()
            total[i] += found.sum() + case.mask.sum()
    return THRESHOLDS[int(np.argmax(2.0 * overlap / np.maximum(total, 1.0)))]


def evaluate(
    model: UNet, config: UNetConfig, cases: Sequence[LesionCase], rules: InferenceSettings
) -> Evaluation:
    """Score ``model`` on ``cases`` at their own frames, as the pipeline keeps its pixels
    (probability >= ``rules.threshold`` where the rules allow, small regions dropped)."""
    dices, fps = [], []
    overlap = total = 0
    for case in cases:
        probabilities, applied = _scored(model, config, case, rules)
        found = _kept(applied.kept(probabilities >= rules.threshold), case, rules.min_volume_ml)
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


def train_unet(
    settings: TrainSettings, progress: Progress | None = None, device: str = "cpu"
) -> TrainingRun:
    """Train the U-Net as the module describes; returns the model in eval mode on the CPU."""
    started = time.monotonic()
    report = progress or (lambda message: None)
    config = settings.network
    cases = make_painted_cases(settings.cases, settings.seed, stream=0)
    report(f"{len(cases)} training cases drawn")
    pool = _Pool()
    for case in cases:
        pool.add(case, config.spacing_mm)
    model = build_unet(config, settings.seed)
    if settings.init_from is not None:
        model.load_state_dict(dict(load_bundle(MODEL_NAME, settings.init_from).tensors))
        report(f"weights of {MODEL_NAME} {settings.init_from} loaded")
    model = model.to(device)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    rng = np.random.default_rng([settings.seed, 7])
    recent: list[float] = []
    fractions = (settings.lesion_fraction, settings.hard_fraction)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps)
        model.train()
        for step in range(1, settings.steps + 1):
            hu, target = pool.batch(rng, settings.batch_size, settings.crop, fractions)
            loss = loss_fn(model(window(hu.to(device), config.windows)), target.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            recent = [*recent[-49:], float(loss.detach())]
            if step % 100 == 0 or step == settings.steps:
                report(f"step {step}/{settings.steps}: loss {np.mean(recent):.4f}")
    model = model.cpu().eval()
    rules = InferenceSettings(min_volume_ml=settings.min_volume_ml, bone=settings.bone)
    validation = make_painted_cases(settings.validation, settings.seed, stream=2)
    threshold = choose_threshold(model, config, validation, rules)
    report(f"threshold {threshold:g} chosen on {len(validation)} validation cases")
    rules = replace(rules, threshold=threshold)
    held = make_painted_cases(settings.held_out, settings.seed, stream=1)
    evaluation = evaluate(model, config, held, rules)
    report(f"held-out Dice: mean {evaluation.mean_dice:.3f}, pooled {evaluation.pooled_dice:.3f}")
    return TrainingRun(
        model,
        settings,
        evaluation,
        tuple(c.case_id for c in cases),
        {"synthetic": len(cases)},
        time.monotonic() - started,
        float(np.mean(recent)),
        threshold,
    )


def bundle_entries(
    run: TrainingRun, inference: dict[str, float | int | str | bool]
) -> dict[str, Any]:
    """The manifest entries that say what trained the network and how it scored."""
    s = run.settings
    recipe = {k: v for k, v in asdict(s).items() if k != "network"}
    return {
        "notice": NOTICE,
        "provenance": NOTICE,
        "network": {"architecture": "monai.networks.nets.UNet (2-D)", **s.network.to_dict()},
        "inference": inference,
        "training": {
            "data": (
                "generated head CTs of pipelines.unet.cases only (pipelines.synthetic heads: "
                "0.6-7 mm slices, tilt 0-20 deg, 192/256 px, head scale 0.88-1.12, noise "
                "0-6 HU baked + 0-5 HU added) with lesions of pipelines.lesions: 45-95 HU "
                "blobs (random, touching skull base or convexity, beside a ventricle), "
                "haemorrhages (rim 45-66 HU, core to 95 HU), 50-160 HU stains, 0.3-80 mL; "
                "calcifications 180-700 HU at choroid plexus, pineal, basal ganglia, falx, "
                "vessel wall as negatives; a scanner's HU rise toward the skull added to the "
                "cranial cavity by 3-D distance to the skull in 80% of the cases (partial "
                "volume 5-45 HU, 0.6-2 mm + 0.15 x slice thickness, exponential; cupping "
                "2-18 HU, 8-18 mm, Gaussian), over the lesions (they carry it) or, in 35% "
                "of those cases, under them (they keep their painted HU); no real image"
            ),
            "seed": s.seed,
            "training_cases": len(run.training_case_ids),
            "training_cases_by_base": run.sources,
            "held_out_cases": s.held_out,
            "validation_cases": s.validation,
            "training_seed_stream": [s.seed, 0],
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
    inference = InferenceSettings(
        threshold=run.threshold, min_volume_ml=run.settings.min_volume_ml, bone=run.settings.bone
    ).to_dict()
    return save_bundle(
        out,
        MODEL_NAME,
        version,
        run.model.state_dict(),
        bundle_entries(run, inference),
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
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--init-from", default=None, help="bundled version to fine-tune")
    parser.add_argument("--version", default=MODEL_VERSION)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing bundle")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: torch sees no CUDA GPU here")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    settings = TrainSettings(
        cases=args.cases,
        held_out=args.held_out,
        validation=args.validation,
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        init_from=args.init_from,
    )
    log.info(
        "training", device=device, **{k: v for k, v in asdict(settings).items() if k != "network"}
    )
    run = train_unet(settings, progress=lambda message: log.info(message), device=device)
    folder = write_unet_bundle(run, args.out, args.version, replace=args.replace)
    log.info("bundle written", folder=str(folder), **run.held_out.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
