"""A generated admission-ICH case for ``dicomnode demo --pipeline ich_expansion``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipelines.ich_expansion.cohort import generate_expansion_cohort

DEMO_ROWS = 128
DEMO_SLICES = 20


def demo_case(folder: Path, seed: int = 1) -> list[Path]:
    """Write one generated admission NCCT with a spontaneous ICH (the expansion cohort's
    first case of ``seed``) into ``folder``; returns the DICOM files written."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ich-expansion-demo-") as tmp:
        cohort = generate_expansion_cohort(Path(tmp), 1, seed, rows=DEMO_ROWS, n_slices=DEMO_SLICES)
        sources = sorted(p for p in cohort.cases[0].folder.rglob("*") if p.is_file())
        written = []
        for path in sources:
            target = folder / path.name
            shutil.copyfile(path, target)
            written.append(target)
    return written
