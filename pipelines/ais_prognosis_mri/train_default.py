"""Regenerate the bundled model ``model_store/ais_prognosis_mri/1.0.0`` deterministically.

``python -m pipelines.ais_prognosis_mri.train_default [--version 1.0.0] [--root model_store]``
draws the synthetic cohort (:data:`COHORT_CASES` cases, seed :data:`SEED`), trains on the
CPU with one torch thread, writes the version with its report and promotes it. The
held-out table goes to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk
import torch

from model_store.registry import STORE_ROOT, promote
from pipelines.ais_prognosis_mri.cohort import GENERATOR_VERSION, draw_cohort
from pipelines.ais_prognosis_mri.model import MODEL_NAME
from pipelines.ais_prognosis_mri.train import TrainingReport, train_model

SEED = 2026
COHORT_CASES = 200
COHORT_ROWS = 64
COHORT_SLICES = 16
TORCH_THREADS = 1
DEFAULT_VERSION = "1.0.0"


def train_default(
    version: str = DEFAULT_VERSION, root: Path = STORE_ROOT, seed: int = SEED
) -> TrainingReport:
    """Draw the cohort, train, write and promote ``version``; returns the report."""
    torch.set_num_threads(TORCH_THREADS)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(TORCH_THREADS)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    cases = draw_cohort(seed, COHORT_CASES, COHORT_ROWS, COHORT_SLICES)

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or done % 20 == 0:
            sys.stderr.write(f"{stage}: {done}/{total}\n")

    report = train_model(
        cases,
        root=root,
        version=version,
        seed=0,
        progress=progress,
        extra={
            "training_cohort": {
                "generator": "pipelines.ais_prognosis_mri.cohort",
                "generator_version": GENERATOR_VERSION,
                "seed": seed,
                "n_cases": COHORT_CASES,
                "rows": COHORT_ROWS,
                "slices": COHORT_SLICES,
                "script": "python -m pipelines.ais_prognosis_mri.train_default",
            }
        },
    )
    promote(MODEL_NAME, version, root)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train the default model and write its held-out table to stdout."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--root", type=Path, default=STORE_ROOT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    report = train_default(args.version, args.root, args.seed)
    sys.stdout.write(
        f"{MODEL_NAME} {report.version}: {report.n_cases} cases ({report.skipped} without "
        f"infarct), {report.n_train} training, {report.n_test} held out\n{report.table}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
