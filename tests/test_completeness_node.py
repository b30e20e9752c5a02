"""Completeness by content on a real node: DCMTK storescu sends, the node starts the
series without waiting for the stable age when its content shows it complete, and a
real Orthanc receives the results (and the next revision when the series grows)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from dicomnode.completeness import CompletenessSettings, Evidence
from dicomnode.config import NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor, reporting
from dicomnode.records import JobState, SeriesState
from dicomnode.series_facts import Completion, SeriesFactsStore
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from tests.orthanc import Orthanc
from tests.pacs_reports import (
    download,
    node_config,
    referenced_instances,
    stored_in_study,
    storescu,
    wait_for,
    wait_jobs_finished,
)
from tests.support import require_tool

LONG_STABLE_AGE_S = 60.0  # far longer than any test below may wait
STARTED_WITHIN_S = 10.0  # a series complete by content is queued well within this
ROWS = 64
N = 16  # slices of each series (a lesion needs about 80 mm of head)
KOS = uid.KeyObjectSelectionDocumentStorage


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-completeness"))
    pacs.start()
    yield pacs
    pacs.stop()


def _head_ct(seed: int, n_slices: int, declared: int | None) -> list[Dataset]:
    """A synthetic head CT with a lesion; ``declared`` sets ImagesInAcquisition."""
    datasets = synthetic_head_ct(seed=seed, n_slices=n_slices, rows=ROWS)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=seed)
    if declared is not None:
        for ds in datasets:
            ds.ImagesInAcquisition = declared
    return datasets


def _config(
    base: Path, pacs: Orthanc, stable_age_s: float = LONG_STABLE_AGE_S, **completeness: Any
) -> NodeConfig:
    config = node_config(base, pacs, stable_age_s=stable_age_s)
    if completeness:
        settings = CompletenessSettings.model_validate(completeness)
        config = config.model_copy(update={"completeness": settings})
    return config


def _completions(node: Node, series_uid: str) -> list[Completion]:
    assert node.store is not None
    return SeriesFactsStore(node.store).completions(series_uid)


def _wait_queued(node: Node, count: int, timeout_s: float) -> float:
    """Wait until ``count`` jobs exist; return when (monotonic) that was seen."""
    wait_for(lambda: len(node.jobs.all()) >= count, timeout_s, f"{count} queued job(s)")
    return time.monotonic()


def test_images_in_acquisition_starts_at_once(orthanc: Orthanc, tmp_path: Path) -> None:
    """The issue's test: a series with ImagesInAcquisition set is processed (results in
    PACS) without waiting for the 60 s stable age."""
    datasets = _head_ct(seed=51, n_slices=N, declared=N)
    files = write_series(datasets, tmp_path / "series")
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    config = _config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        storescu(node, files)
        acknowledged = time.monotonic()
        queued = _wait_queued(node, 1, STARTED_WITHIN_S)
        wait_jobs_finished(node, 1, timeout_s=LONG_STABLE_AGE_S / 2)
        in_pacs = time.monotonic() - acknowledged
        (job,) = node.jobs.all()
        assert job.state is JobState.DONE
        assert len(stored_in_study(orthanc, study_uid)) == 3  # SEG, SC, SR
        (completion,) = _completions(node, series_uid)
    assert completion.evidence is Evidence.IMAGES_IN_ACQUISITION
    assert completion.instance_count == N and f"{N} of {N} images" in completion.detail
    assert queued - acknowledged < STARTED_WITHIN_S
    assert in_pacs < LONG_STABLE_AGE_S / 2


def test_a_series_missing_an_instance_waits_for_the_stable_age(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    stable_age_s = 3.0
    datasets = _head_ct(seed=52, n_slices=N, declared=N)
    files = write_series(datasets, tmp_path / "series")
    series_uid = str(datasets[0].SeriesInstanceUID)
    config = _config(tmp_path / "node", orthanc, stable_age_s=stable_age_s)
    with Node(config, processor(config), reporting()) as node:
        storescu(node, files[:3] + files[4:])
        acknowledged = time.monotonic()
        time.sleep(stable_age_s / 2)
        series = node.store.get_series(series_uid) if node.store else None
        assert series is not None and series.state is SeriesState.RECEIVING
        assert node.jobs.all() == []
        queued = _wait_queued(node, 1, 4 * stable_age_s)
        wait_jobs_finished(node, 1, timeout_s=30)
        (completion,) = _completions(node, series_uid)
    assert queued - acknowledged >= stable_age_s - 0.5  # the 0.5 s: storescu's own exit
    assert completion.evidence is Evidence.STABLE_AGE and completion.instance_count == N - 1


def test_association_release_completes_a_contiguous_series(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """No count in the headers: the sender's release after the last instance of a series
    with contiguous positions starts it; a series sent with a gap is left to the timer."""
    whole = _head_ct(seed=53, n_slices=N, declared=None)
    gapped = _head_ct(seed=54, n_slices=N, declared=None)
    whole_files = write_series(whole, tmp_path / "whole")
    gapped_files = write_series(gapped, tmp_path / "gapped")
    config = _config(tmp_path / "node", orthanc, trust=["association_release"])
    with Node(config, processor(config), reporting()) as node:
        storescu(node, gapped_files[:4] + gapped_files[5:])
        storescu(node, whole_files)
        acknowledged = time.monotonic()
        queued = _wait_queued(node, 1, STARTED_WITHIN_S)
        wait_for(
            lambda: node.jobs.all()[0].state is JobState.DONE
            and node.outbox.count_pending() == 0,
            30, "the job done and its results sent",
        )  # fmt: skip
        (job,) = node.jobs.all()
        assert job.series_instance_uid == str(whole[0].SeriesInstanceUID)
        (completion,) = _completions(node, job.series_instance_uid)
        assert node.store is not None
        gapped_series = node.store.get_series(str(gapped[0].SeriesInstanceUID))
        assert gapped_series is not None and gapped_series.state is SeriesState.RECEIVING
    assert completion.evidence is Evidence.ASSOCIATION_RELEASE
    assert f"{N} slices" in completion.detail
    assert queued - acknowledged < STARTED_WITHIN_S


def _storescu_required_contexts(node: Node, paths: Sequence[Path]) -> None:
    """Send with DCMTK storescu proposing only the files' own SOP classes (``-R``)."""
    completed = subprocess.run(
        [require_tool("storescu", "dcmtk"), "-R", "-aec", node.config.node.ae_title,
         "127.0.0.1", str(node.config.node.port), *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr


def test_one_enhanced_object_starts_at_once(orthanc: Orthanc, tmp_path: Path) -> None:
    slices = _head_ct(seed=55, n_slices=N, declared=None)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(),
        instance_number=1,
    )  # fmt: skip
    enhanced.BodyPartExamined = "HEAD"  # the converter leaves it out; the rule needs it
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    config = _config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        _storescu_required_contexts(node, [path])
        acknowledged = time.monotonic()
        queued = _wait_queued(node, 1, STARTED_WITHIN_S)
        wait_jobs_finished(node, 1, timeout_s=30)
        assert node.jobs.all()[0].state is JobState.DONE
        (completion,) = _completions(node, str(enhanced.SeriesInstanceUID))
    assert completion.evidence is Evidence.ENHANCED_FRAMES
    assert completion.instance_count == 1 and f"{N} frames" in completion.detail
    assert queued - acknowledged < STARTED_WITHIN_S


def test_a_series_that_grows_after_early_completion_gets_revision_2(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Processed as soon as its declared images arrived; two more images of the series
    that arrive later make revision 2, and PACS gets a note retracting revision 1."""
    datasets = _head_ct(seed=56, n_slices=N + 2, declared=N)
    files = write_series(datasets, tmp_path / "series")
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    config = _config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        storescu(node, files[:N])
        wait_jobs_finished(node, 1, timeout_s=LONG_STABLE_AGE_S / 2)
        first = node.jobs.all()[0]
        revision1 = {r.sop_instance_uid for r in node.revisions.outputs(first.id)}
        assert set(stored_in_study(orthanc, study_uid)) == revision1

        storescu(node, files[N:])
        wait_jobs_finished(node, 2, timeout_s=LONG_STABLE_AGE_S / 2)
        second = node.jobs.all()[1]
        revision2 = {r.sop_instance_uid for r in node.revisions.outputs(second.id)}
        assert len(revision2) == 3 and revision2.isdisjoint(revision1)
        assert [node.revisions.revision_of(j) for j in node.jobs.all()] == [1, 2]
        stored = stored_in_study(orthanc, study_uid)
        notes = [s for s, tags in stored.items() if tags["SOPClassUID"] == KOS]
        assert len(notes) == 1
        assert referenced_instances(download(orthanc, notes[0], tmp_path / "pacs")) == revision1
        assert set(stored) == revision1 | revision2 | set(notes)
        completions = _completions(node, series_uid)
    assert [c.evidence for c in completions] == [Evidence.IMAGES_IN_ACQUISITION] * 2
    assert [c.instance_count for c in completions] == [N, N + 2]
