"""Demo hook of ``iph_vs_contrast``: one generated post-thrombectomy head CT holding a
haemorrhage and a contrast stain, as the node receives it."""

from __future__ import annotations

from pathlib import Path

from pipelines.iph_vs_contrast.cohort import AreaVariables, write_iph_case

DEMO_COHORT_SEED = 9000  # apart from the training cohort's seed
DEMO_ROWS = 256  # 0.9 mm pixels: the Secondary Capture's text panel is legible
DEMO_AREAS = (
    # texture, shape, oracle probability, label, pattern, lesion-parameter noise
    AreaVariables(1.4, 0.8, 0.93, 1, "haemorrhage", (0.5, 0.0, 0.0, -1.0, 0.0, 0.5, 0.0, 0.0)),
    AreaVariables(-1.4, 0.3, 0.15, 0, "contrast", (0.3, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0)),
)
"""A clear haemorrhage (dense core, lobulated, 6 mL) and a clear contrast stain (deep)."""


def demo_case(folder: Path, seed: int = 1) -> list[Path]:
    """Write one generated case (a CT series of 16 frames of :data:`DEMO_ROWS` px with
    :data:`DEMO_AREAS`) into ``folder``; returns the files written, in slice order."""
    case = write_iph_case(folder, DEMO_COHORT_SEED + seed, 0, rows=DEMO_ROWS, areas=DEMO_AREAS)
    return sorted(case.folder.glob("*.dcm"))
