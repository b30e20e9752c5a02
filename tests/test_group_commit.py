"""Group commit: concurrent stores are made durable together, each acknowledged only once
its file, folder and record are; over real associations nothing is lost or left out."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread, uid

from dicomnode import spool
from dicomnode.config import default_config
from dicomnode.group_commit import GroupCommit
from dicomnode.node import JobSpec, Node
from dicomnode.records import Association, InstanceRecord, RecordOutcome
from dicomnode.state import InstanceConflict, StateStore
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import free_port, require_tool

STUDY, SERIES = "1.2.3", "1.2.3.4"
THREADS = 8


def _record(spool_dir: Path, n: int, series: str = SERIES) -> InstanceRecord:
    """Instance ``n`` spooled as a real file (folder not yet fsynced) and its record."""
    sop = f"{SERIES}.{n}"
    path = spool.store_instance(spool_dir, STUDY, series, sop, b"DICM" * 64, sync_folder=False)
    return InstanceRecord(
        sop_instance_uid=sop, series_instance_uid=series, study_instance_uid=STUDY,
        sop_class_uid=uid.CTImageStorage, transfer_syntax_uid=uid.ExplicitVRLittleEndian,
        path=path, received_at=float(n), association=Association("CT1", "DICOMNODE"),
        modality="CT", body_part_examined="HEAD", series_description="Brain",
        protocol_name="Head", image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sha256=f"{n:064d}",
    )  # fmt: skip


def test_waiting_stores_are_committed_as_one_group(tmp_path: Path) -> None:
    """While a commit runs, the stores that arrive wait and then go in one group: every
    one recorded and answered; a conflicting one alone is refused."""
    store = StateStore(tmp_path / "state.sqlite3")
    spool_dir = tmp_path / "spool"
    taken = _record(spool_dir, 0, series="1.2.3.9")
    store.record_instance(taken)  # instance 0 belongs to another series already
    commits = GroupCommit(store)
    results: dict[int, RecordOutcome | str] = {}

    def handler(n: int) -> None:
        try:
            results[n] = commits.record(_record(spool_dir, n))
        except InstanceConflict:
            results[n] = "conflict"

    threads = [threading.Thread(target=handler, args=(n,)) for n in range(THREADS)]
    with store.transaction():  # holds the first group's commit until all have arrived
        for thread in threads:
            thread.start()
        for _ in range(500):
            if commits.waiting == THREADS - 1:
                break
            time.sleep(0.01)
        assert commits.waiting == THREADS - 1  # one leads (blocked here), the rest wait
    for thread in threads:
        thread.join(timeout=30)
    assert results == {0: "conflict", **{n: RecordOutcome.NEW for n in range(1, THREADS)}}
    assert (commits.groups, commits.instances) == (2, THREADS)
    for n in range(1, THREADS):
        assert store.instance_path(f"{SERIES}.{n}") == spool.instance_path(
            spool_dir, STUDY, SERIES, f"{SERIES}.{n}"
        )
    assert store.instance_path(f"{SERIES}.0") == taken.path  # left where it was


def test_group_failure_is_every_members(tmp_path: Path) -> None:
    """A folder that cannot be fsynced fails its whole group: nothing is recorded and
    each store raises the error, to be answered as a failure."""
    store = StateStore(tmp_path / "state.sqlite3")
    rec = _record(tmp_path / "spool", 1)
    rec.path.unlink()
    rec.path.parent.rmdir()  # the folder is gone: its fsync fails
    with pytest.raises(FileNotFoundError):
        GroupCommit(store).record(rec)
    assert store.instance_path(rec.sop_instance_uid) is None


def _nothing(spec: JobSpec) -> list[Path]:
    """No pipeline runs here (no route): ingest only."""
    raise AssertionError(f"no job expected, got {spec}")


@pytest.mark.parametrize(("rows", "slices"), [(64, 24), (512, 12)], ids=["one-pdu", "4-pdus"])
def test_concurrent_associations_are_all_acknowledged_on_disk_and_recorded(
    tmp_path: Path, rows: int, slices: int
) -> None:
    """Four storescu associations at once: every instance acknowledged with Success, on
    disk with the bytes sent and recorded; also 512 x 512 instances, each split into
    several 128 KiB PDUs read whole by the node (``door.BulkReadSocket``)."""
    storescu = require_tool("storescu", "dcmtk")
    files = write_series(synthetic_head_ct(seed=5, n_slices=slices, rows=rows), tmp_path / "in")
    config = default_config(tmp_path / "node", free_port())
    config.routes = []
    with Node(config, _nothing) as node:
        runs = []
        for i in range(4):
            command = [storescu, "-aec", "DICOMNODE", "127.0.0.1", str(config.node.port)]
            runs.append(subprocess.Popen(
                [*command, *map(str, files[i::4])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))  # fmt: skip
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        assert [run.returncode for run in runs] == [0] * 4, outputs
        assert node.store is not None
        for source in files:
            ds = dcmread(source, stop_before_pixels=True)
            spooled = node.store.instance_path(ds.SOPInstanceUID)
            assert spooled is not None and spooled.is_file()
            assert spool.dataset_sha256(spooled) == spool.dataset_sha256(source)
        (series,) = node.store.all_series()
        assert series.instance_count == len(files)
