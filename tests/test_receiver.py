"""Receiver and node over real associations: DCMTK peers, spool, routing, delivery."""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomnode import journal as journal_module
from dicomnode import spool
from dicomnode.config import AllowedCaller, NodeConfig, RouteMatch, RouteRule, default_config
from dicomnode.echo import echo
from dicomnode.node import JobSpec, Node
from dicomnode.records import JobState, OutboxState, SeriesState
from dicomnode.routing import LOCALIZER_REASON, NO_RULE_REASON, SECONDARY_CAPTURE_REASON
from dicomnode.status import Status
from tests.scp import storage_scp
from tests.support import free_port, require_tool

GE_FILES = 28
PHILIPS_INSTANCES = {"localizer": 1, "axial": 54, "secondary capture": 5}


def copy_first(spec: JobSpec) -> list[Path]:
    """A stand-in pipeline: copy the series' first instance to the output folder."""
    result = spec.output_dir / "result.dcm"
    shutil.copy(spec.instance_paths[0], result)
    return [result]


def _config(tmp_path: Path) -> NodeConfig:
    """Node on a free port; GE head CT (body part HEAD) routed to a PACS on another."""
    config = default_config(tmp_path, free_port())
    config.destinations["PACS"].port = free_port()
    config.routes = [
        RouteRule(
            name="head",
            match=RouteMatch(modality=["CT"], body_part_examined=["HEAD"]),
            pipeline="copy",
            destinations=["PACS"],
        )
    ]
    config.stable_age_s = 1.0
    config.poll_interval_s = 0.1
    config.outbox.initial_delay_s = 0.2
    return config


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    """A running node using :func:`copy_first` as its pipeline."""
    with Node(_config(tmp_path), copy_first) as running:
        yield running


def _storescu(node: Node, folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu on a folder (``+sd``) against the node."""
    tool = require_tool("storescu", "dcmtk")
    port = str(node.config.node.port)
    return subprocess.run(
        [tool, "-aec", "DICOMNODE", "+sd", *options, "127.0.0.1", port, str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def test_echo_and_rejections(tmp_path: Path) -> None:
    """echoscu succeeds; unknown AE titles and hosts other than the allowed one are rejected."""
    echoscu = require_tool("echoscu", "dcmtk")
    config = _config(tmp_path)
    config.allowed_callers.append(AllowedCaller(ae_title="PINNED", host="192.0.2.7"))
    with Node(config, copy_first):
        port = str(config.node.port)
        ok = subprocess.run(
            [echoscu, "-aec", "DICOMNODE", "127.0.0.1", port], capture_output=True, check=False
        )
        assert ok.returncode == 0, ok.stderr
        for title in ("INTRUDER", "PINNED"):
            refused = subprocess.run(
                [echoscu, "-aet", title, "-aec", "DICOMNODE", "127.0.0.1", port],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert refused.returncode != 0
            assert "Calling AE Title Not Recognized" in refused.stderr  # a real A-ASSOCIATE-RJ
        assert echo("127.0.0.1", config.node.port, "DICOMNODE", "PYNETDICOM")
        assert not echo("127.0.0.1", config.node.port, "DICOMNODE", "INTRUDER")
    assert not echo("127.0.0.1", config.node.port, "DICOMNODE", "PYNETDICOM", timeout_s=2)


def test_storescu_series_is_spooled_and_recorded(node: Node, ge_headct_dir: Path) -> None:
    """Every instance is on disk and recorded when storescu returns, bytes as sent."""
    done = _storescu(node, ge_headct_dir, "+sp", "*.dcm")
    assert done.returncode == 0, done.stderr
    assert node.store is not None
    for source in sorted(ge_headct_dir.glob("*.dcm")):
        ds = dcmread(source, stop_before_pixels=True)
        spooled = node.store.instance_path(ds.SOPInstanceUID)
        assert spooled == spool.instance_path(
            node.config.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert _dataset_bytes(spooled) == _dataset_bytes(source)
    (series,) = node.store.all_series()
    assert series.instance_count == GE_FILES
    assert series.modality == "CT" and series.body_part_examined == "HEAD"
    assert series.calling_aet == "STORESCU" and series.called_aet == "DICOMNODE"


def test_study_is_assembled_routed_and_delivered(
    node: Node, ge_headct_dir: Path, philips_study_dir: Path
) -> None:
    """After the stable age the GE series is processed and delivered; Philips scout,
    secondary captures and the unmatched axial series are ignored with their reasons."""
    with storage_scp(node.config.destinations["PACS"].port) as pacs:
        assert _storescu(node, ge_headct_dir, "+sp", "*.dcm").returncode == 0
        # +sp "I*" skips Philips' DIRFILE index files, which are not images.
        done = _storescu(node, philips_study_dir, "+r", "+sp", "I*")
        assert done.returncode == 0, done.stderr
        assert node.wait_idle(timeout=15)
    assert node.store is not None
    by_reason = {s.reason: s for s in node.store.all_series()}
    assert by_reason[None].state is SeriesState.ROUTED
    assert by_reason[None].instance_count == GE_FILES
    for reason, count in [
        (LOCALIZER_REASON, PHILIPS_INSTANCES["localizer"]),
        (SECONDARY_CAPTURE_REASON, PHILIPS_INSTANCES["secondary capture"]),
        (NO_RULE_REASON, PHILIPS_INSTANCES["axial"]),
    ]:
        assert by_reason[reason].state is SeriesState.IGNORED
        assert by_reason[reason].instance_count == count
    (job,) = node.jobs.all()
    assert job.state is JobState.DONE and job.pipeline == "copy"
    (item,) = node.outbox.items()
    assert item.state is OutboxState.SENT and item.path.parent.name == str(job.id)
    assert len(pacs.received) == 1


def test_pipeline_failure_fails_the_job(tmp_path: Path, ge_headct_dir: Path) -> None:
    """An exception from the pipeline fails its job with the message as reason."""

    def broken(spec: JobSpec) -> list[Path]:
        """A pipeline that cannot cope."""
        raise RuntimeError(f"cannot segment {len(spec.instance_paths)} frames")

    with Node(_config(tmp_path), broken) as node:
        assert _storescu(node, ge_headct_dir, "+sp", "*.dcm").returncode == 0
        assert node.wait_idle(timeout=10)
        (job,) = node.jobs.all()
    assert job.state is JobState.FAILED and job.reason == f"cannot segment {GE_FILES} frames"


def _send(node: Node, ds: Dataset) -> int:
    """C-STORE one dataset to the node with pynetdicom; return the status."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "spool"])
def test_disk_full_answers_out_of_resources(
    tmp_path: Path, ge_headct_dir: Path, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    """ENOSPC while journaling (or, without the journal, spooling) answers 0xA700 and
    records nothing."""

    def disk_full(*args: object) -> None:
        """Fail as a full disk does."""
        raise OSError(errno.ENOSPC, "No space left on device")

    if journal:
        monkeypatch.setattr(journal_module, "_write_at", disk_full)
    else:
        monkeypatch.setattr(spool, "_write_fully", disk_full)
    config = _config(tmp_path)
    config.node.journal.enabled = journal
    with Node(config, copy_first) as node:
        ds = dcmread(ge_headct_dir / "01.dcm")
        assert _send(node, ds) == Status.OUT_OF_RESOURCES
        assert node.store is not None and node.store.all_series() == []
        assert node.is_idle()
    assert not list(config.spool_dir.rglob("*.dcm"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_unusable_datasets_are_refused(node: Node, ge_headct_dir: Path) -> None:
    """A dataset without its UIDs, or with a malformed one, is refused and not spooled."""
    ds = dcmread(ge_headct_dir / "01.dcm")
    del ds.SeriesInstanceUID
    assert _send(node, ds) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    ds = dcmread(ge_headct_dir / "01.dcm")
    ds.StudyInstanceUID = "../../etc"
    assert _send(node, ds) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert not list(node.config.spool_dir.rglob("*.dcm"))
