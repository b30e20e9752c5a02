"""Regenerate the bundled default model ``model_store/iph_vs_contrast/1.0.0`` deterministically.

``python -m pipelines.iph_vs_contrast.train_default [--version 1.0.0] [--root model_store]``
generates the synthetic cohort (:data:`COHORT_CASES` cases of :data:`COHORT_ROWS` px and
:data:`COHORT_SLICES` slices, seed :data:`SEED`) in a temporary folder, trains with the
default settings on one CPU thread, writes the version with its report
(``<root>/iph_vs_contrast/<version>.report.md``) and promotes it. Progress goes to
stderr, the held-out table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from model_store.registry import STORE_ROOT, promote
from pipelines.iph_vs_contrast.cohort import GENERATOR_VERSION, generate_iph_cohort
from pipelines.iph_vs_contrast.model import MODEL_NAME
from pipelines.iph_vs_contrast.train import TrainingReport, train_iph_model

SEED = 2026
COHORT_CASES = 150
COHORT_ROWS = 96
COHORT_SLICES = 16
DEFAULT_VERSION = "1.0.0"


def train_default(
    version: str = DEFAULT_VERSION, root: Path = STORE_ROOT, show_progress: bool = True
) -> TrainingReport:
    """Generate the cohort, train, write and promote ``version``; returns the report."""
    logging.getLogger("radiomics").setLevel(logging.ERROR)  # per-area GLCM chatter

    def progress(stage: str, done: int, total: int) -> None:
        if show_progress and (done % 10 == 0 or done == total):
            sys.stderr.write(f"{stage}: {done}/{total}\n")

    with tempfile.TemporaryDirectory(prefix="iph-default-cohort-") as tmp:
        generate_iph_cohort(Path(tmp), COHORT_CASES, SEED, rows=COHORT_ROWS, n_slices=COHORT_SLICES)
        generated = {
            "generator": "pipelines.iph_vs_contrast.cohort",
            "generator_version": GENERATOR_VERSION,
            "seed": SEED,
            "n_cases": COHORT_CASES,
            "rows": COHORT_ROWS,
            "n_slices": COHORT_SLICES,
            "script": "python -m pipelines.iph_vs_contrast.train_default",
        }
        report = train_iph_model(
            Path(tmp),
            root=root,
            version=version,
            seed=SEED,
            progress=progress,
            extra={"training_cohort": generated},
        )
    promote(MODEL_NAME, version, root)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train the default model and write its held-out table to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--root", type=Path, default=STORE_ROOT)
    args = parser.parse_args(argv)
    report = train_default(args.version, args.root)
    sys.stdout.write(
        f"{MODEL_NAME} {report.version}: {report.n_cases} cases, {report.n_areas} areas, "
        f"{report.n_train} training, {report.n_test} held out; "
        f"{sum(report.seconds.values()):.0f} s\n{report.table}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
