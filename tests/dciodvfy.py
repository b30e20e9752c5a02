"""Run dicom3tools' ``dciodvfy`` on a file and collect what it reports."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import require_tool


def dciodvfy_lines(path: Path) -> list[str]:
    """Every line ``dciodvfy`` writes about ``path`` (it reports on stderr)."""
    tool = require_tool("dciodvfy", "dicom3tools")
    completed = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (completed.stderr + completed.stdout).splitlines() if line]


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that start with "Error"."""
    return [line for line in dciodvfy_lines(path) if line.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that start with "Warning"."""
    return [line for line in dciodvfy_lines(path) if line.startswith("Warning")]
