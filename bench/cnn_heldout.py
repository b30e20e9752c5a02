"""The ``ht_after_mt`` CNN on held-out cases: the bundled fine-tuned network beside a
frozen ImageNet EfficientNet-Lite0 with a logistic head on its pooled features (the
low-variance candidate: 1281 trained numbers), same inputs, one run.

Cases: the bundled model's training cohort (``pipelines.cohort``, seed 2025, 200 cases,
128 px) split as its manifest records (150 training, 50 held out), and a fresh held-out
cohort (seed ``--seed``, ``--held`` cases). Each case's lesion is found by the threshold
baseline, as in training, and the CNN input is the model's (2.5-D, lesion only). The
frozen head's C is chosen by 5-fold cross-validation on the training cases only. AUC with
DeLong 95% CI on each held-out set and on both pooled.

Run: ``OMP_NUM_THREADS=2 python -m bench.cnn_heldout [--held 120] [--threads 2]``;
results in ``cnn_heldout_results.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store.registry import promoted_version
from pipelines.base import PipelineError
from pipelines.cnn import build_classifier, predict_proba, prepare_case, sample_features
from pipelines.cohort import generate_cohort
from pipelines.evaluation import auc_ci_delong
from pipelines.ht_after_mt.features import find_lesion
from pipelines.ht_after_mt.model import MODEL_NAME, HtModel
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.volume import load_series

TRAINING_SEED, TRAINING_CASES, ROWS = 2025, 200, 128
C_GRID = (0.001, 0.003, 0.01, 0.03)
RESULTS = Path(__file__).with_name("cnn_heldout_results.md")


def cohort_inputs(
    work: Path, cases: int, seed: int, model: HtModel
) -> tuple[list[str], NDArray[np.int_], torch.Tensor]:
    """Case ids, HT labels and CNN inputs (one sample each) of a generated cohort."""
    cohort = generate_cohort(work, cases, seed, rows=ROWS)
    with cohort.clinical_csv.open(encoding="utf-8", newline="") as f:
        labels = {row["case_id"]: int(row["label_ht"]) for row in csv.DictReader(f)}
    segmenter = HyperdenseThresholdPipeline()
    ids, y, samples = [], [], []
    for case in cohort.cases:
        series = load_series(sorted(case.folder.glob("*.dcm")))
        try:
            lesion = find_lesion(series, segmenter, None)
        except PipelineError:
            continue
        ids.append(case.case_id)
        y.append(labels[case.case_id])
        samples.append(prepare_case(series, lesion.frame_mask, model.cnn_input).samples[:1])
    return ids, np.asarray(y, dtype=int), torch.cat(samples)


def frozen_head(features: NDArray[np.float32], y: NDArray[np.int_], seed: int) -> Pipeline:
    """z-score and L2 logistic regression, C chosen by 5-fold CV AUC on these cases."""

    def fitted(c: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    cv_auc = {
        c: roc_auc_score(
            y, cross_val_predict(fitted(c), features, y, cv=folds, method="predict_proba")[:, 1]
        )
        for c in C_GRID
    }
    return fitted(max(cv_auc, key=cv_auc.__getitem__)).fit(features, y)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build both cohorts' inputs, score both networks, write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=120)
    parser.add_argument("--seed", type=int, default=9200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HtModel.load(promoted_version(MODEL_NAME))
    split = model.artefact.manifest["split"]
    with tempfile.TemporaryDirectory(prefix="cnn-heldout-") as tmp:
        ids, y, x = cohort_inputs(Path(tmp) / "train", TRAINING_CASES, TRAINING_SEED, model)
        _, y_new, x_new = cohort_inputs(Path(tmp) / "held", args.held, args.seed, model)
    row = {case_id: i for i, case_id in enumerate(ids)}
    train = np.array([row[c] for c in split["train"] if c in row])
    test = np.array([row[c] for c in split["test"] if c in row])
    frozen = build_classifier("efficientnet_lite0", pretrained=True)
    features, features_new = sample_features(frozen, x), sample_features(frozen, x_new)
    head = frozen_head(features[train], y[train], TRAINING_SEED)
    scores = {
        f"bundled fine-tuned Lite0 ({model.version}), its head": (
            predict_proba(model.cnn, x[test]),
            predict_proba(model.cnn, x_new),
        ),
        f"frozen ImageNet Lite0 + logistic head (C={head[-1].C:g})": (
            head.predict_proba(features[test])[:, 1],
            head.predict_proba(features_new)[:, 1],
        ),
    }
    lines = [
        f"| CNN | split held-out ({len(test)}, {int(y[test].sum())} positive) "
        f"| seed {args.seed} ({len(y_new)}, {int(y_new.sum())} positive) | pooled |",
        "|---|---|---|---|",
    ]
    for name, (on_split, on_new) in scores.items():
        cells = [
            auc_ci_delong(y[test], on_split),
            auc_ci_delong(y_new, on_new),
            auc_ci_delong(np.r_[y[test], y_new], np.r_[on_split, on_new]),
        ]
        lines.append(
            f"| {name} | " + " | ".join(f"{a.auc:.3f} ({a.low:.3f}-{a.high:.3f})" for a in cells)
            + " |"
        )  # fmt: skip
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
