"""Result revisions in the durable state: revisions follow the series content, superseded
objects are found after a restart, and a job overtaken by a newer one sends nothing."""

from __future__ import annotations

from pathlib import Path

from pydicom import uid

from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.records import Association, InstanceRecord, Job, JobState
from dicomnode.revisions import (
    Delivery,
    OutputRecord,
    RevisionStore,
    group_retractions,
    series_fingerprint,
)
from dicomnode.state import StateStore

SERIES = "1.2.3.4"
STUDY = "1.2.3"


def _new_job(store: StateStore, jobs: JobQueue, n: int) -> Job:
    """Receive instance ``n`` of ``SERIES`` and queue and claim a job for the series."""
    store.record_instance(
        InstanceRecord(
            sop_instance_uid=f"{SERIES}.{n}",
            series_instance_uid=SERIES,
            study_instance_uid=STUDY,
            sop_class_uid=uid.CTImageStorage,
            transfer_syntax_uid=uid.ExplicitVRLittleEndian,
            path=Path(f"/spool/{n}.dcm"),
            received_at=float(n),
            association=Association("CT1", "DICOMNODE"),
            modality="CT",
            body_part_examined="HEAD",
            series_description="Brain",
            protocol_name="Head",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        )
    )
    series = store.get_series(SERIES)
    assert series is not None
    job_id = jobs.enqueue_for_series(series, "head-ct", "hyperdense_regions", ["PACS"], n)
    assert job_id is not None
    claimed = jobs.claim(float(n))
    assert claimed is not None and claimed.id == job_id
    return claimed


def _outputs(job: Job, tag: str) -> list[OutputRecord]:
    """Three objects (SEG, SC, SR) of one job."""
    classes = (
        uid.SegmentationStorage,
        uid.SecondaryCaptureImageStorage,
        uid.Comprehensive3DSRStorage,
    )
    return [
        OutputRecord(job.id, c, f"9.{tag}.{i}", f"9.{tag}.s{i}", STUDY, Path(f"/r/{tag}{i}.dcm"))
        for i, c in enumerate(classes)
    ]


def test_fingerprint_follows_names_and_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "1.dcm", tmp_path / "2.dcm"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = series_fingerprint([a, b])
    assert series_fingerprint([b, a]) == first
    b.write_bytes(b"TWO")
    assert series_fingerprint([a, b]) != first
    assert series_fingerprint([a]) != first
    assert series_fingerprint([a, tmp_path / "missing.dcm"]) != series_fingerprint([a])


def test_revisions_supersede_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    jobs, revisions = JobQueue(store), RevisionStore(store)
    first = _new_job(store, jobs, 1)
    assert revisions.assign_revision(first, "print-a") == 1
    assert revisions.superseded_by(first) == []
    rev1 = _outputs(first, "a")
    revisions.finish(first, JobState.DONE, None, rev1, [Delivery(r.path, ("PACS",)) for r in rev1],
                     [], 1.0)  # fmt: skip
    assert len(OutboxStore(store).items()) == 3
    unchanged = _new_job(store, jobs, 2)
    assert revisions.assign_revision(unchanged, "print-a") == 1  # re-sent as it was
    revisions.finish(unchanged, JobState.DONE, None, rev1, [], [], 2.0)
    store.close()

    store = StateStore(path)  # restart
    jobs, revisions = JobQueue(store), RevisionStore(store)
    changed = _new_job(store, jobs, 3)
    assert revisions.assign_revision(changed, "print-b") == 2
    assert revisions.assign_revision(changed, "print-b") == 2  # taken again: same
    superseded = revisions.superseded_by(changed)
    assert {r.sop_instance_uid for r in superseded} == {r.sop_instance_uid for r in rev1}
    assert len(superseded) == 6 and {r.destinations for r in superseded} == {("PACS",)}
    groups = group_retractions(superseded)
    assert len(groups) == 1 and groups[0].destinations == ("PACS",)
    note = Delivery(Path("/r/ko.dcm"), groups[0].destinations)
    revisions.finish(changed, JobState.FAILED, "not a head CT", _outputs(changed, "b")[:2],
                     [note], superseded, 3.0)  # fmt: skip
    assert revisions.superseded_by(changed) == []
    assert len(revisions.retracted_by(changed.id)) == 6
    assert jobs.get(changed.id).state is JobState.FAILED  # type: ignore[union-attr]
    later = _new_job(store, jobs, 4)
    assert revisions.assign_revision(later, "print-a") == 3  # back to old bytes: still new
    assert [r.sop_instance_uid for r in revisions.superseded_by(later)] == ["9.b.0", "9.b.1"]
    store.close()


def test_a_job_overtaken_by_a_newer_one_sends_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    jobs, revisions = JobQueue(store), RevisionStore(store)
    older = _new_job(store, jobs, 1)
    newer = _new_job(store, jobs, 2)
    revisions.finish(newer, JobState.DONE, None, _outputs(newer, "n"), [], [], 3.0)
    assert revisions.newer_finished_job(older) == newer.id
    assert revisions.newer_finished_job(newer) is None
    revisions.finish(older, JobState.DONE, None, _outputs(older, "o"), [], [], 4.0, newer.id)
    assert {r.sop_instance_uid for r in revisions.retracted_by(newer.id)} == {
        "9.o.0", "9.o.1", "9.o.2",
    }  # fmt: skip
    assert OutboxStore(store).items() == []
    store.close()
