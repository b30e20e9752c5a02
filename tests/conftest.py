"""Fixtures: real head CT data from ../shared; node processes a test starts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import GE_HEADCT, PHILIPS_STUDY, REPO_ROOT, NodeStarter, shared_path


@pytest.fixture(scope="session")
def ge_headct_dir() -> Path:
    """The real GE head CT: 28 slices, gantry tilt 18.5 degrees, uneven spacing."""
    return shared_path(GE_HEADCT)


@pytest.fixture(scope="session")
def philips_study_dir() -> Path:
    """A whole Philips study: scout, tilted axial series, SCs and non-DICOM DIRFILEs."""
    return shared_path(PHILIPS_STUDY)


@pytest.fixture
def serve_node() -> Iterator[NodeStarter]:
    """Starts ``dicomnode serve`` on a config, appending its stderr to a log, and returns
    the process once it listens; a node still running when the test ends is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # "<AE> listening on ..." once the node is up
        assert b"listening" in line, (line, log.read_text()[-3000:])
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(30)
