"""Regenerate the bundled model ``model_store/ich_expansion_hybrid/1.0.0`` deterministically.

``python -m pipelines.ich_expansion_hybrid.train_default [--version 1.0.0] [--root DIR]``
generates the synthetic admission-ICH cohort (:data:`COHORT_CASES` cases, seed
:data:`SEED`; the expansion cohort of ``pipelines.ich_expansion.cohort``), trains on the
CPU with one thread, writes the version with its report and promotes it.
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
from pipelines.ich_expansion.cohort import GENERATOR_VERSION, generate_expansion_cohort
from pipelines.ich_expansion_hybrid.model import MODEL_NAME
from pipelines.ich_expansion_hybrid.train import HybridReport, train_hybrid_model

SEED = 2025
COHORT_CASES = 120
COHORT_ROWS = 96
COHORT_SLICES = 20
DEFAULT_VERSION = "1.0.0"


def train_default(version: str = DEFAULT_VERSION, root: Path = STORE_ROOT) -> HybridReport:
    """Generate the cohort, train, write and promote ``version``; returns the report."""
    torch.set_num_threads(1)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="ich-hybrid-cohort-") as tmp:
        generate_expansion_cohort(
            Path(tmp), COHORT_CASES, SEED, rows=COHORT_ROWS, n_slices=COHORT_SLICES
        )
        cohort = {
            "generator": "pipelines.ich_expansion.cohort",
            "generator_version": GENERATOR_VERSION,
            "seed": SEED,
            "n_cases": COHORT_CASES,
            "rows": COHORT_ROWS,
            "n_slices": COHORT_SLICES,
            "script": "python -m pipelines.ich_expansion_hybrid.train_default",
        }
        report = train_hybrid_model(Path(tmp), root=root, version=version, cohort=cohort)
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
        f"{MODEL_NAME} {report.version}: {report.n_cases} cases; "
        f"{sum(report.seconds.values()):.0f} s\n{report.table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
