"""Helpers of the supersede and failure-notice tests: a node in front of a real Orthanc,
DCMTK storescu to feed it, and readers of what Orthanc ended with."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode.config import NodeConfig
from dicomnode.node import Node
from tests.orthanc import Orthanc
from tests.support import free_port, require_tool

HEAD_CT_ROUTE = {
    "name": "head-ct",
    "match": {"modality": "CT", "body_part_examined": ["HEAD", "BRAIN"]},
    "pipeline": "hyperdense_regions",
    "destinations": ["PACS"],
}


def node_config(
    base: Path,
    pacs: Orthanc,
    routes: Sequence[dict[str, Any]] = (HEAD_CT_ROUTE,),
    default_pipeline: str = "hyperdense_regions",
    stable_age_s: float = 1.0,
) -> NodeConfig:
    """A node on a free loopback port, sending to ``pacs``; series are stable after
    ``stable_age_s``."""
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            "destinations": {
                "PACS": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
            },
            "routes": list(routes),
            "default_pipeline": default_pipeline,
            "stable_age_s": stable_age_s,
            "poll_interval_s": 0.1,
            "spool_dir": str(base / "spool"),
            "state_dir": str(base / "state"),
            "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
        }
    )


def storescu(node: Node, paths: Sequence[Path]) -> None:
    """Send ``paths`` to ``node`` with DCMTK storescu; fail on any refusal."""
    executable = require_tool("storescu", "dcmtk")
    completed = subprocess.run(
        [executable, "-aec", node.config.node.ae_title, "127.0.0.1",
         str(node.config.node.port), *map(str, paths)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s until it holds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_jobs_finished(node: Node, count: int, timeout_s: float = 120.0) -> None:
    """Wait until ``count`` jobs exist and the node is idle (everything sent)."""
    wait_for(
        lambda: node.is_idle() and len(node.jobs.all()) >= count,
        timeout_s,
        f"{count} finished jobs and an empty outbox",
    )


def stored_in_study(pacs: Orthanc, study_uid: str) -> dict[str, dict[str, str]]:
    """Orthanc's simplified tags of every instance of one study, by SOP Instance UID."""
    tags = [t for t in pacs.instances() if t.get("StudyInstanceUID") == study_uid]
    return {t["SOPInstanceUID"]: t for t in tags}


def download(pacs: Orthanc, sop_uid: str, folder: Path) -> Dataset:
    """One instance as Orthanc stored it, written under ``folder`` and read back."""
    folder.mkdir(parents=True, exist_ok=True)
    path = pacs.download(sop_uid, folder / f"{sop_uid}.dcm")
    return pydicom.dcmread(path)


def text_values(ds: Dataset) -> list[str]:
    """Every TEXT value of an SR content tree, depth first."""
    values: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            values.append(str(item.TextValue))
        values += text_values(item)
    return values


def referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs an SR or KOS content tree references (IMAGE and COMPOSITE)."""
    found: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
        found |= referenced_instances(item)
    return found
