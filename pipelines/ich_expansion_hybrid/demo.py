"""A generated admission-ICH case for ``dicomnode demo --pipeline ich_expansion_hybrid``
(the expansion cohort's case, as for ``ich_expansion``)."""

from __future__ import annotations

from pathlib import Path

from pipelines.ich_expansion.demo import demo_case as expansion_case


def demo_case(folder: Path, seed: int = 1) -> list[Path]:
    """Write one generated admission NCCT with a spontaneous ICH into ``folder``;
    returns the DICOM files written."""
    return expansion_case(folder, seed)
