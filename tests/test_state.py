"""Durable state: SQLite records, the job queue across restarts, the spool, log hygiene."""

from __future__ import annotations

import errno
import io
import json
import threading
from pathlib import Path

import pytest
import structlog
from pydicom import uid
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicomnode import spool
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.logs import configure_logging
from dicomnode.records import Association, InstanceRecord, JobState, SeriesState
from dicomnode.state import StateStore

SERIES = "1.2.3.4"


def _instance(
    n: int, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"), at: float = 0.0
) -> InstanceRecord:
    """The ``n``-th instance of test series ``SERIES``."""
    return InstanceRecord(
        sop_instance_uid=f"{SERIES}.{n}",
        series_instance_uid=SERIES,
        study_instance_uid="1.2.3",
        sop_class_uid=uid.CTImageStorage,
        transfer_syntax_uid=uid.ExplicitVRLittleEndian,
        path=Path(f"/spool/{n}.dcm"),
        received_at=at + n,
        association=Association("CT1", "DICOMNODE"),
        modality="CT",
        body_part_examined="HEAD",
        series_description="Brain",
        protocol_name="Head",
        image_type=image_type,
    )


@pytest.fixture()
def store(tmp_path: Path) -> StateStore:
    """A fresh state store."""
    return StateStore(tmp_path / "state.sqlite3")


def test_instances_build_a_series(store: StateStore) -> None:
    """A series keeps its first instance's attributes and its latest arrival."""
    for n in range(3):
        store.record_instance(_instance(n))
    series = store.get_series(SERIES)
    assert series is not None
    assert (series.instance_count, series.first_arrival, series.last_arrival) == (3, 0.0, 2.0)
    assert series.state is SeriesState.RECEIVING
    assert series.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert (series.calling_aet, series.called_aet) == ("CT1", "DICOMNODE")
    assert store.series_paths(SERIES) == [Path(f"/spool/{n}.dcm") for n in range(3)]
    assert store.stable_series(2.5) == [series]
    assert store.stable_series(2.0) == []


def test_localizer_only_when_all_instances_are(store: StateStore) -> None:
    """``all_localizer`` holds only while every instance is a LOCALIZER."""
    store.record_instance(_instance(0, ("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert store.get_series(SERIES).all_localizer  # type: ignore[union-attr]
    store.record_instance(_instance(1))
    assert not store.get_series(SERIES).all_localizer  # type: ignore[union-attr]


def test_resent_series_goes_back_to_receiving(store: StateStore) -> None:
    """A routed series that receives instances again is assembled again."""
    jobs = JobQueue(store)
    store.record_instance(_instance(0))
    series = store.get_series(SERIES)
    assert series is not None
    assert jobs.enqueue_for_series(series, "r", "p", ["PACS"], 10.0) == 1
    assert store.get_series(SERIES).state is SeriesState.ROUTED  # type: ignore[union-attr]
    store.record_instance(_instance(0, at=20.0))
    again = store.get_series(SERIES)
    assert again is not None and again.state is SeriesState.RECEIVING
    assert again.instance_count == 1


def test_concluding_a_stale_view_does_nothing(store: StateStore) -> None:
    """If an instance arrived after the series was read, it stays receiving."""
    store.record_instance(_instance(0))
    stale = store.get_series(SERIES)
    assert stale is not None
    store.record_instance(_instance(1))
    assert JobQueue(store).enqueue_for_series(stale, "r", "p", [], 5.0) is None
    assert not store.conclude_series(stale, SeriesState.IGNORED, "x")
    assert store.get_series(SERIES).state is SeriesState.RECEIVING  # type: ignore[union-attr]


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    """A job left running when the store closed is queued again on reopening."""
    store = StateStore(tmp_path / "state.sqlite3")
    store.record_instance(_instance(0))
    series = store.get_series(SERIES)
    assert series is not None
    job_id = JobQueue(store).enqueue_for_series(series, "rule", "hyperdense_regions", ["PACS"], 1.0)
    claimed = JobQueue(store).claim(2.0)
    assert claimed is not None and claimed.id == job_id and claimed.state is JobState.RUNNING
    store.close()

    reopened = StateStore(tmp_path / "state.sqlite3")
    jobs = JobQueue(reopened)
    assert jobs.requeue_running() == 1
    again = jobs.claim(3.0)
    assert again is not None
    assert (again.id, again.attempts, again.pipeline, again.destinations) == (
        job_id, 2, "hyperdense_regions", ("PACS",)
    )  # fmt: skip
    outbox_ids = jobs.complete(again, [Path("/r/a.dcm"), Path("/r/b.dcm")], 4.0)
    assert len(outbox_ids) == 2
    assert jobs.get(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert OutboxStore(reopened).count_pending() == 2
    assert jobs.claim(5.0) is None


def test_each_job_is_claimed_once(store: StateStore) -> None:
    """Concurrent workers never take the same job."""
    jobs = JobQueue(store)
    for n in range(20):
        record = _instance(0)
        store.record_instance(
            InstanceRecord(
                **{
                    **record.__dict__,
                    "series_instance_uid": f"1.9.{n}",
                    "sop_instance_uid": f"1.9.{n}.1",
                }
            )
        )
        series = store.get_series(f"1.9.{n}")
        assert series is not None
        jobs.enqueue_for_series(series, "r", "p", [], 1.0)
    taken: list[int] = []

    def worker() -> None:
        """Claim until the queue is empty."""
        while (job := jobs.claim(2.0)) is not None:
            taken.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 21))


def test_spool_write_is_atomic(tmp_path: Path) -> None:
    """Bytes land under <study>/<series>/<sop>.dcm with no temporary file left."""
    path = spool.store_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"DICM" * 1000)
    assert path == tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert path.read_bytes() == b"DICM" * 1000
    assert list(path.parent.iterdir()) == [path]
    with pytest.raises(ValueError, match="not a valid UID"):
        spool.store_instance(tmp_path, "../etc", "1.2.3", "1.2.3.4", b"")


def test_spool_writes_parts_in_order(tmp_path: Path) -> None:
    """An instance handed as parts (header, dataset) is written as their concatenation."""
    path = spool.store_instance(tmp_path, "1.2", "1.2.3", "1.2.3.5", (b"head", b"DICM" * 99))
    assert path.read_bytes() == b"head" + b"DICM" * 99


@pytest.mark.parametrize(
    ("sop_class", "sop", "syntax"),
    [
        (uid.CTImageStorage, "1.2.3.4", uid.ExplicitVRLittleEndian),  # odd UI length
        (uid.CTImageStorage, "1.2.3.45", uid.ImplicitVRLittleEndian),  # even
        (uid.MRImageStorage, "1." + "2" * 62, uid.JPEG2000Lossless),  # 64 characters
    ],
)
def test_file_meta_is_encoded_as_pydicom_does(sop_class: str, sop: str, syntax: str) -> None:
    """The spool's File Meta encoder gives pydicom's (pynetdicom's) bytes exactly."""
    expected = encode_file_meta(
        create_file_meta(
            sop_class_uid=uid.UID(sop_class), sop_instance_uid=uid.UID(sop),
            transfer_syntax=uid.UID(syntax),
        )
    )  # fmt: skip
    encoded = spool.file_meta(
        sop_class, sop, syntax, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    )
    assert encoded == expected
    with pytest.raises(ValueError, match="not a valid UID"):
        spool.file_meta(sop_class, sop + "x", syntax, "1.2", "X")


def test_spool_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (disk full) leaves no partial or temporary file."""

    def disk_full(fd: int, data: bytes) -> None:
        """Fail as a full disk does."""
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "_write_fully", disk_full)
    with pytest.raises(OSError, match="No space"):
        spool.store_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"x")
    assert list((tmp_path / "1.2" / "1.2.3").iterdir()) == []


def test_logs_drop_patient_identifiers() -> None:
    """Patient identifiers never reach a log line, whatever their spelling."""
    stream = io.StringIO()
    configure_logging(stream=stream)
    structlog.get_logger("test").bind(series_uid="1.2.3").info(
        "received",
        PatientName="DOE^JANE",
        patient_id="123",
        PatientBirthDate="19700101",
        AccessionNumber="A1",
        job_id=7,
    )
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["series_uid"] == "1.2.3" and line["job_id"] == 7
    assert not {"PatientName", "patient_id", "PatientBirthDate", "AccessionNumber"} & set(line)
    assert "DOE" not in stream.getvalue()
