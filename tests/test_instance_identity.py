"""SOP Instance UID identity in the state: never moved, identical is a no-op, changed
content replaces and marks the series; older databases gain the new columns."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomnode.config import default_config
from dicomnode.node import Node
from dicomnode.records import Association, InstanceRecord, RecordOutcome, SeriesState
from dicomnode.state import InstanceConflict, StateStore
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct
from tests.support import free_port

SERIES, STUDY = "1.2.3.4", "1.2.3"


def _record(n: int, sha256: str | None = "a" * 64, at: float = 1.0) -> InstanceRecord:
    """Instance ``n`` of the test series."""
    return InstanceRecord(
        sop_instance_uid=f"{SERIES}.{n}",
        series_instance_uid=SERIES,
        study_instance_uid=STUDY,
        sop_class_uid=uid.CTImageStorage,
        transfer_syntax_uid=uid.ExplicitVRLittleEndian,
        path=Path(f"/spool/{STUDY}/{SERIES}/{n}.dcm"),
        received_at=at,
        association=Association("CT1", "DICOMNODE"),
        modality="CT",
        body_part_examined="HEAD",
        series_description="Brain",
        protocol_name="Head",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        sha256=sha256,
    )


@pytest.fixture()
def store(tmp_path: Path) -> StateStore:
    """An empty state database."""
    return StateStore(tmp_path / "state.sqlite3")


def test_outcomes_and_revision(store: StateStore) -> None:
    """New, unchanged and replaced instances; content_changes counts them."""
    assert store.record_instance(_record(1)) is RecordOutcome.NEW
    assert store.record_instance(_record(2)) is RecordOutcome.NEW
    series = store.get_series(SERIES)
    assert series is not None and series.content_changes == 0 and series.instance_count == 2
    assert store.record_instance(_record(1, at=5.0)) is RecordOutcome.UNCHANGED
    series = store.get_series(SERIES)
    assert series is not None and series.last_arrival == 1.0  # nothing rewritten
    assert store.conclude_series(series, SeriesState.ROUTED, None)
    assert store.record_instance(_record(1, at=6.0)) is RecordOutcome.UNCHANGED
    series = store.get_series(SERIES)
    assert series is not None and series.state is SeriesState.ROUTED  # not re-opened
    assert store.record_instance(_record(1, "b" * 64, at=7.0)) is RecordOutcome.REPLACED
    series = store.get_series(SERIES)
    assert series is not None and series.state is SeriesState.RECEIVING
    assert series.content_changes == 1 and series.instance_count == 2
    stored = store.stored_instance(f"{SERIES}.1")
    assert stored is not None and stored.sha256 == "b" * 64
    assert store.conclude_series(series, SeriesState.ROUTED, None)
    assert store.record_instance(_record(3, at=8.0)) is RecordOutcome.NEW  # late instance
    series = store.get_series(SERIES)
    assert series is not None and series.content_changes == 2
    assert series.state is SeriesState.RECEIVING


def test_uid_in_another_series_or_study_is_never_moved(store: StateStore) -> None:
    """Recording a stored UID under another series or study raises and changes nothing."""
    store.record_instance(_record(1))
    for change in ({"series_instance_uid": "1.2.3.9"}, {"study_instance_uid": "1.2.9"}):
        moved = dataclasses.replace(_record(1, "c" * 64), **change)
        with pytest.raises(InstanceConflict) as caught:
            store.record_instance(moved)
        assert caught.value.existing.series_instance_uid == SERIES
    stored = store.stored_instance(f"{SERIES}.1")
    assert stored is not None and stored.series_instance_uid == SERIES
    assert stored.sha256 == "a" * 64
    assert store.get_series("1.2.3.9") is None


def test_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    """A database made before sha256 and content_changes existed opens, keeps its rows, and
    records an instance whose hash was unknown as replaced."""
    path = tmp_path / "old.sqlite3"
    store = StateStore(path)
    store.record_instance(_record(1))
    store.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE instances DROP COLUMN sha256")
    db.execute("ALTER TABLE series DROP COLUMN content_changes")
    db.commit()
    db.close()
    reopened = StateStore(path)
    stored = reopened.stored_instance(f"{SERIES}.1")
    assert stored is not None and stored.sha256 is None
    series = reopened.get_series(SERIES)
    assert series is not None and series.content_changes == 0 and series.instance_count == 1
    assert reopened.record_instance(_record(1)) is RecordOutcome.REPLACED
    assert reopened.record_instance(_record(1)) is RecordOutcome.UNCHANGED


def test_identical_resend_of_an_instance_stored_before_hashes(tmp_path: Path) -> None:
    """An instance recorded without a hash (older database) is compared by the hash of its
    spooled file: an identical re-send over the network rewrites nothing."""
    config = default_config(tmp_path, free_port())
    config.routes = []
    ds = synthetic_head_ct(11, n_slices=1, rows=32)[0]
    with Node(config, lambda spec: []) as node:
        assert _send(node, ds) == Status.SUCCESS
        assert node.store is not None
        with node.store.transaction() as db:
            db.execute("UPDATE instances SET sha256 = NULL")
        path = node.store.instance_path(str(ds.SOPInstanceUID))
        assert path is not None
        written = path.stat().st_mtime_ns
        assert _send(node, ds) == Status.SUCCESS
        assert path.stat().st_mtime_ns == written
        stored = node.store.stored_instance(str(ds.SOPInstanceUID))
        assert stored is not None and stored.sha256 is None  # nothing recorded either
        ds.WindowWidth = "90"
        assert _send(node, ds) == Status.SUCCESS
        assert path.stat().st_mtime_ns != written
        series = node.store.get_series(str(ds.SeriesInstanceUID))
        assert series is not None and series.content_changes == 1


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
