"""Fixtures for real head CT data from ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import GE_HEADCT, PHILIPS_STUDY, shared_path


@pytest.fixture(scope="session")
def ge_headct_dir() -> Path:
    """The real GE head CT: 28 slices, gantry tilt 18.5 degrees, uneven spacing."""
    return shared_path(GE_HEADCT)


@pytest.fixture(scope="session")
def philips_study_dir() -> Path:
    """A whole Philips study: scout, tilted axial series, SCs and non-DICOM DIRFILEs."""
    return shared_path(PHILIPS_STUDY)
