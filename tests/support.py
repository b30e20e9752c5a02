"""Helpers shared by the tests: where the shared data is, free loopback ports, tools, and
what the tests of a node process share (its config, sending to it, its state, waiting)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.ports import free_port as free_port  # re-exported: the tests' helper

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DICOMNODE_SHARED", REPO_ROOT.parent / "shared"))
GE_HEADCT = SHARED_DIR / "data" / "headct_ge_tilt"
PHILIPS_STUDY = SHARED_DIR / "data" / "phantom_study_philips" / "S21610"

NodeStarter = Callable[[Path, Path], subprocess.Popen[bytes]]
"""The ``serve_node`` fixture (conftest): ``dicomnode serve`` on a config, logging to a file."""


def shared_path(path: Path) -> Path:
    """Return ``path`` or skip the test, saying which shared file is missing."""
    if not path.exists():
        pytest.skip(
            f"needs {path} from ../shared (real head CT data); it is absent on this machine"
        )
    return path


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


PACS_TOML = """
[destinations.PACS]
ae_title = "PACS"
host = "127.0.0.1"
port = {port}
"""


def node_toml(port: int, pipeline: str, *, pacs_port: int | None = None, extra: str = "") -> str:
    """A node's config (TOML): it takes series from STORESCU on loopback ``port`` and
    routes every CT series to ``pipeline``, its results to the PACS on ``pacs_port`` (no
    destination without); ``extra`` (TOML) follows. Spool and state lie beside the config."""
    pacs = "" if pacs_port is None else PACS_TOML.format(port=pacs_port)
    return f"""spool_dir = "spool"
state_dir = "state"
stable_age_s = 0.5
poll_interval_s = 0.05

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"
{pacs}
[[routes]]
name = "ct"
pipeline = "{pipeline}"
destinations = [{'"PACS"' if pacs else ""}]

[routes.match]
modality = ["CT"]
{extra}"""


def storescu(port: int, paths: list[Path]) -> None:
    """Send ``paths`` to the node (AE title DICOMNODE) on loopback ``port`` with DCMTK storescu."""
    sent = subprocess.run(
        [require_tool("storescu", "dcmtk"), "-aec", "DICOMNODE", "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr


def as_new_series(paths: list[Path], folder: Path, patient_id: str | None = None) -> list[Path]:
    """``paths`` copied into ``folder`` as another study and series (new UIDs), of patient
    ``patient_id`` when given."""
    folder.mkdir()
    study, series, copies = generate_uid(), generate_uid(), []
    for path in paths:
        ds = pydicom.dcmread(path)
        if patient_id is not None:
            ds.PatientID = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name, enforce_file_format=True)
        copies.append(folder / path.name)
    return copies


def state_rows(state: Path, query: str) -> list[sqlite3.Row]:
    """Rows of the state database of a node whose ``state_dir`` is ``state`` (read only);
    none before the node made it."""
    database = state / "dicomnode.sqlite3"
    if not database.exists():
        return []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return db.execute(query).fetchall()


def wait_for(
    condition: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 240.0,
    poll_s: float = 0.05,
) -> None:
    """Poll ``condition`` until true; fail, with the tail of the node's ``log``, if the
    node ``process`` exits or ``timeout_s`` passes (``what``: what did not happen)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the node exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:]}"
        time.sleep(poll_s)
