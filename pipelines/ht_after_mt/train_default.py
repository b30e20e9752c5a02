"""Regenerate the bundled default model ``model_store/ht_after_mt/1.1.0`` deterministically.

``python -m pipelines.ht_after_mt.train_default [--version 1.1.0] [--root model_store]``
generates the synthetic cohort (:data:`COHORT_CASES` cases of :data:`COHORT_ROWS` px,
seed :data:`SEED`) in a temporary folder, trains with the default settings on the CPU
with :data:`TORCH_THREADS` threads (the same seed and thread count give the same
weights), writes the version with its report and promotes it. Progress goes to stderr,
the held-out table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from model_store.registry import STORE_ROOT, promote
from pipelines.cohort import GENERATOR_VERSION, generate_cohort
from pipelines.ht_after_mt.model import MODEL_NAME
from pipelines.ht_after_mt.train import TrainingReport, train_ht_model

SEED = 2025
COHORT_CASES = 200
COHORT_ROWS = 128
TORCH_THREADS = 1
DEFAULT_VERSION = "1.1.0"


def train_default(
    version: str = DEFAULT_VERSION, root: Path = STORE_ROOT, show_progress: bool = True
) -> TrainingReport:
    """Generate the cohort, train, write and promote ``version``; returns the report."""
    torch.set_num_threads(TORCH_THREADS)
    logging.getLogger("radiomics").setLevel(logging.ERROR)  # per-lesion GLCM chatter
    bars: dict[str, object] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not show_progress:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if not isinstance(bar, tqdm):
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    with tempfile.TemporaryDirectory(prefix="ht-default-cohort-") as tmp:
        cohort = generate_cohort(Path(tmp), COHORT_CASES, SEED, rows=COHORT_ROWS)
        generated = {
            "generator": "pipelines.cohort",
            "generator_version": GENERATOR_VERSION,
            "seed": SEED,
            "n_cases": COHORT_CASES,
            "rows": COHORT_ROWS,
            "base": cohort.base,
            "script": "python -m pipelines.ht_after_mt.train_default",
            "torch_threads": TORCH_THREADS,
        }
        report = train_ht_model(
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
        f"{MODEL_NAME} {report.version}: {report.n_cases} cases, {report.n_train} training, "
        f"{report.n_test} held out; {sum(report.seconds.values()):.0f} s\n{report.table}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
