"""Late and changed instances supersede, never overwrite: a real Orthanc keeps revision 1,
receives revision 2 with new UIDs, and an IOCM rejection note retracting revision 1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from dicomnode.node import Node
from dicomnode.processing import processor, reporting
from dicomnode.records import JobState
from pipelines.outputs.rejection import REJECTED_FOR_QUALITY_REASONS
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.pacs_reports import (
    download,
    node_config,
    referenced_instances,
    stored_in_study,
    storescu,
    wait_jobs_finished,
)

KOS = uid.KeyObjectSelectionDocumentStorage


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-supersede"))
    pacs.start()
    yield pacs
    pacs.stop()


def _changed_copy(path: Path, target: Path) -> Path:
    """``path`` with a 30 HU brighter patch: same SOP Instance UID, different bytes."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[40:50, 40:50] += 30
    ds.PixelData = pixels.astype(pixels.dtype).tobytes()
    ds.save_as(target, enforce_file_format=True)
    return target


def _check_rejection_note(
    orthanc: Orthanc, stored: dict[str, dict[str, str]], retracted: set[str], folder: Path
) -> str:
    """The one KOS in ``stored`` that retracts exactly ``retracted``; dciodvfy clean."""
    notes = []
    for sop_uid, tags in stored.items():
        if tags["SOPClassUID"] != KOS:
            continue
        ds = download(orthanc, sop_uid, folder)
        if referenced_instances(ds) == retracted:
            notes.append((sop_uid, ds, folder / f"{sop_uid}.dcm"))
    assert len(notes) == 1, f"{len(notes)} rejection notes retract exactly {len(retracted)}"
    sop_uid, note, path = notes[0]
    assert dciodvfy_errors(path) == []
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        REJECTED_FOR_QUALITY_REASONS.value,
        REJECTED_FOR_QUALITY_REASONS.scheme_designator,
        REJECTED_FOR_QUALITY_REASONS.meaning,
    )
    evidence = {
        str(instance.ReferencedSOPInstanceUID): str(series.SeriesInstanceUID)
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert set(evidence) == retracted
    for sop, series_uid in evidence.items():
        assert stored[sop]["SeriesInstanceUID"] == series_uid
    return sop_uid


def test_late_and_changed_instances_supersede(orthanc: Orthanc, tmp_path: Path) -> None:
    datasets = synthetic_head_ct(seed=31, n_slices=16, rows=128)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=31)
    files = write_series(datasets, tmp_path / "series")
    study_uid = str(datasets[0].StudyInstanceUID)
    source_uids = {str(ds.SOPInstanceUID) for ds in datasets}
    config = node_config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        # revision 1: the first half arrives and is processed after the stable age
        storescu(node, files[:8])
        wait_jobs_finished(node, 1)
        first = node.jobs.all()[0]
        revision1 = {r.sop_instance_uid for r in node.revisions.outputs(first.id)}
        assert len(revision1) == 3
        stored = stored_in_study(orthanc, study_uid)
        assert set(stored) == revision1

        # revision 2: the late instances re-open the series
        storescu(node, files[8:])
        wait_jobs_finished(node, 2)
        second = node.jobs.all()[1]
        revision2 = {r.sop_instance_uid for r in node.revisions.outputs(second.id)}
        assert len(revision2) == 3 and revision2.isdisjoint(revision1)
        stored = stored_in_study(orthanc, study_uid)
        assert revision1 | revision2 <= set(stored)
        assert not source_uids & set(stored)  # only the node's objects went to PACS
        note1 = _check_rejection_note(orthanc, stored, revision1, tmp_path / "pacs")
        assert set(stored) == revision1 | revision2 | {note1}
        for sop_uid in revision2:
            path = tmp_path / "pacs" / f"{sop_uid}.dcm"
            download(orthanc, sop_uid, tmp_path / "pacs")
            assert dciodvfy_errors(path) == [], stored[sop_uid]["SOPClassUID"]

        # revision 3: one instance re-sent with other pixel values
        storescu(node, [_changed_copy(files[4], tmp_path / "changed.dcm")])
        wait_jobs_finished(node, 3)
        third = node.jobs.all()[2]
        revision3 = {r.sop_instance_uid for r in node.revisions.outputs(third.id)}
        assert len(revision3) == 3 and revision3.isdisjoint(revision1 | revision2)
        stored = stored_in_study(orthanc, study_uid)
        note2 = _check_rejection_note(orthanc, stored, revision2, tmp_path / "pacs")
        assert set(stored) == revision1 | revision2 | revision3 | {note1, note2}

        jobs = node.jobs.all()
        assert [j.state for j in jobs] == [JobState.DONE] * 3
        assert [node.revisions.revision_of(j) for j in jobs] == [1, 2, 3]
        assert {r.sop_instance_uid for r in node.revisions.retracted_by(second.id)} == revision1
        assert {r.sop_instance_uid for r in node.revisions.retracted_by(third.id)} == revision2
        assert node.revisions.retracted_by(first.id) == []
        seg2 = [s for s in revision2 if stored[s]["SOPClassUID"] == uid.SegmentationStorage]
        assert "rev 2" in download(orthanc, seg2[0], tmp_path / "pacs").SeriesDescription


def test_series_resent_unchanged_is_not_processed_again(orthanc: Orthanc, tmp_path: Path) -> None:
    datasets = synthetic_head_ct(seed=32, n_slices=8, rows=128)
    files = write_series(datasets, tmp_path / "series")
    study_uid = str(datasets[0].StudyInstanceUID)
    config = node_config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        storescu(node, files)
        wait_jobs_finished(node, 1)
        before = set(stored_in_study(orthanc, study_uid))
        storescu(node, files)  # identical bytes: each a no-op Success
        time.sleep(2 * config.stable_age_s + 0.5)
        assert node.is_idle()
        (first,) = node.jobs.all()
        assert node.revisions.revision_of(first) == 1 and len(before) == 3
        assert set(stored_in_study(orthanc, study_uid)) == before  # no new result, no note
