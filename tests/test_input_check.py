"""The per-prediction input check: a case inside the training cohort's feature ranges and
acquisition is not flagged; features outside the ranges or an unseen kernel, scanner or
slice thickness are, and the SR line names them (ASCII)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from pipelines.retraining.ood import (
    DISTRIBUTION_KEY,
    InputDistribution,
    header_facts,
    manifest_input_check,
)

NAMES = ("clin_age", "rad_volume", "pc01")


def header(kernel: str = "STANDARD", thickness: float = 5.0, maker: str = "GE") -> Dataset:
    """A CT header with the three acquisition facts."""
    ds = Dataset()
    ds.Manufacturer, ds.ConvolutionKernel, ds.SliceThickness = maker, kernel, thickness
    return ds


def distribution() -> InputDistribution:
    """Training: 50 cases, ages 40-90, volumes 1-40 mL, one PCA component in +-3."""
    rng = np.random.default_rng(0)
    matrix = np.column_stack(
        [rng.uniform(40, 90, 50), rng.uniform(1, 40, 50), rng.uniform(-3, 3, 50)]
    )
    headers = [header_facts(header(thickness=t)) for t in (5.0, 5.0, 2.5)]
    return InputDistribution.from_training(NAMES, matrix, headers)


def test_inside_is_not_flagged_and_outside_is_named() -> None:
    dist = InputDistribution.from_dict(distribution().to_dict())  # the manifest round trip
    inside = dist.check(NAMES, [65.0, 10.0, 0.5], header_facts(header()))
    assert not inside.flagged and inside.score == 0.0
    assert inside.text().startswith("input check: within training")
    far = dist.check(NAMES, [65.0, 400.0, 25.0], header_facts(header()))
    assert far.flagged and far.outside == ("rad_volume", "pc01")
    assert abs(far.score - 2 / 3) < 1e-3
    assert "features outside the training range: rad_volume, pc01" in far.text()


def test_unseen_acquisition_is_flagged() -> None:
    check = distribution().check(
        NAMES, [65.0, 10.0, 0.5], header_facts(header("BONE\u00e9", 0.625, "Siemens"))
    )
    assert check.flagged and check.score == 0.0
    text = check.text()
    assert "kernel 'BONE?' not in training" in text and text.isascii()
    assert "scanner manufacturer 'Siemens' not in training" in text
    assert "slice thickness 0.625 mm outside training 2.5-5 mm" in text


def test_versions_without_a_recorded_distribution_give_no_line() -> None:
    assert manifest_input_check({}, NAMES, [1.0, 2.0, 3.0], header()) is None
    manifest = {DISTRIBUTION_KEY: distribution().to_dict()}
    line = manifest_input_check(manifest, NAMES, [65.0, 10.0, 0.5], header())
    assert line is not None and "within training" in line
