"""Demo hook: one generated MRI study (DWI, ADC, FLAIR, T1) as the node should receive it."""

from __future__ import annotations

import pathlib

from pipelines.ais_prognosis_mri.cohort import draw_case
from pipelines.ais_prognosis_mri.synthetic_mri import write_study

DEMO_COHORT_SEED = 9001

STUDY_ROLES: dict[str, dict[str, object]] = {
    "dwi": {"series_description": "(?i)dwi|diffusion|trace", "diffusion_b_value": 1000},
    "adc": {"image_type_contains": ["ADC"]},
    "flair": {"series_description": "(?i)flair", "required": False},
    "t1": {"series_description": "(?i)^t1", "required": False},
}
"""The study-level roles the demo's routing rule recognises the series by (as the example
config's ``mri-stroke-study`` rule does)."""


def demo_case(folder: pathlib.Path, seed: int = 1) -> list[pathlib.Path]:
    """Write case ``seed`` of the demo cohort (4 series, 16 slices each) into ``folder``
    (``folder/<role>/NNNN.dcm``) and return every file, series by series."""
    case = draw_case(DEMO_COHORT_SEED, seed)
    written = write_study(case.spec, folder)
    return [path for paths in written.values() for path in paths]
