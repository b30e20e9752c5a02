"""Helpers shared by the tests: where the shared data is, free loopback ports, tools."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DICOMNODE_SHARED", REPO_ROOT.parent / "shared"))
GE_HEADCT = SHARED_DIR / "data" / "headct_ge_tilt"
PHILIPS_STUDY = SHARED_DIR / "data" / "phantom_study_philips" / "S21610"


def shared_path(path: Path) -> Path:
    """Return ``path`` or skip the test, saying which shared file is missing."""
    if not path.exists():
        pytest.skip(
            f"needs {path} from ../shared (real head CT data); it is absent on this machine"
        )
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str, debian_package: str) -> str:
    """Absolute path of a real external tool (DCMTK, Orthanc, dciodvfy).

    Under CI (``CI=true``) a missing tool fails the test, since ``.ci/run`` installs it;
    elsewhere the test is skipped with the package to install.
    """
    for candidate in (f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if Path(candidate).exists():
            return candidate
    found = shutil.which(name)
    if found and ".venv" not in found:
        return found
    message = f"{name} not found: apt-get install {debian_package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
