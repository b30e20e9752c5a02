"""Failures reach PACS: each failure kind gives an "analysis not performed" SR and Secondary
Capture in the source's study in a real Orthanc, dciodvfy clean; plus the pure parts
(failure kinds, notices, rejection notes, result revision UIDs) without a network."""

from __future__ import annotations

import datetime
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from dicomnode.failures import (
    RADIOLOGIST_SENTENCES,
    FailureKind,
    classify_failure,
    radiologist_sentence,
)
from dicomnode.node import Node
from dicomnode.processing import JobFailure, processor, reporting
from dicomnode.records import JobState
from model_store.registry import STORE_ROOT, ModelStoreError, load_parameters
from pipelines.base import Algorithm, NotHeadCt, Pipeline, PipelineError, PipelineUnavailable
from pipelines.blast_ct.pipeline import BlastCtParameters, BlastCtPipeline
from pipelines.hyperdense import (
    MODEL_NAME,
    MODEL_VERSION,
    HyperdenseParameters,
    HyperdenseThresholdPipeline,
)
from pipelines.outputs.common import output_identity
from pipelines.outputs.failure import NO_INFERENCE, TITLE, FailureNotice, build_failure_outputs
from pipelines.outputs.rejection import RejectedInstance, build_rejection_note
from pipelines.registry import get_pipeline
from pipelines.synthetic import synthetic_head_ct, write_series
from pipelines.volume import InconsistentSeries, VolumeLoadError
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.pacs_reports import (
    HEAD_CT_ROUTE,
    download,
    node_config,
    stored_in_study,
    storescu,
    text_values,
    wait_jobs_finished,
)

AIR_STORED = 0  # stored value of -1024 HU with the synthetic rescale intercept


# --- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), FailureKind.DISK_FULL),
        (ModelStoreError("parameters.json: sha256 differs"), FailureKind.MODEL_REFUSED),
        (PipelineUnavailable("weights not found"), FailureKind.MODEL_UNAVAILABLE),
        (PipelineError("clinical table: cannot read"), FailureKind.CLINICAL_TABLE_UNREADABLE),
        (NotHeadCt("no intracranial soft tissue found"), FailureKind.NOT_HEAD_CT),
        (VolumeLoadError("cannot decode pixel data"), FailureKind.UNLOADABLE_SERIES),
        (
            InconsistentSeries("frames have different pixel spacings"),
            FailureKind.INCONSISTENT_SERIES,
        ),
        (
            VolumeLoadError("an image lacks plane geometry (no attribute 'ImagePositionPatient')"),
            FailureKind.UNLOADABLE_SERIES,
        ),
        (ZeroDivisionError("float division by zero"), FailureKind.PIPELINE_ERROR),
        (JobFailure("refused", FailureKind.MODEL_REFUSED), FailureKind.MODEL_REFUSED),
    ],
)
def test_failure_kinds(failure: Exception, kind: FailureKind) -> None:
    assert classify_failure(failure) is kind
    try:  # the kind survives being wrapped, as the node sees it
        raise RuntimeError("pipeline hyperdense_regions failed") from failure
    except RuntimeError as wrapped:
        assert classify_failure(wrapped) is kind


def test_every_kind_has_a_sentence_for_the_radiologist() -> None:
    assert set(RADIOLOGIST_SENTENCES) == set(FailureKind)
    sentences = [radiologist_sentence(kind) for kind in FailureKind]
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert sentence.endswith(".") and "Traceback" not in sentence and len(sentence) < 200


def _headers(seed: int, n_slices: int = 3) -> list[Dataset]:
    """Instance headers (pixel data removed) of a small synthetic series."""
    datasets = synthetic_head_ct(seed=seed, n_slices=n_slices, rows=32)
    for ds in datasets:
        del ds.PixelData
    return datasets


def test_failure_notice_objects_are_valid_and_attributed(tmp_path: Path) -> None:
    headers = _headers(5)
    other_patient = _headers(6)[0]
    other_patient.SeriesInstanceUID = headers[0].SeriesInstanceUID
    notice = FailureNotice(
        "hyperdense_regions",
        radiologist_sentence(FailureKind.UNLOADABLE_SERIES),
        "series cannot be loaded: an image lacks plane geometry",
    )
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    sr, sc = build_failure_outputs([*headers, other_patient], notice, when)
    again = build_failure_outputs(headers, notice, when)
    assert [d.SOPInstanceUID for d in again] == [sr.SOPInstanceUID, sc.SOPInstanceUID]
    for ds in (sr, sc):
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.Modality
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
        assert ds.PatientID == headers[0].PatientID
        assert ds.SeriesInstanceUID != headers[0].SeriesInstanceUID
    texts = text_values(sr)
    assert any(radiologist_sentence(FailureKind.UNLOADABLE_SERIES) in t for t in texts)
    assert NO_INFERENCE in texts and "hyperdense_regions" in texts
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {str(h.SOPInstanceUID) for h in headers}  # not the other patient
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert TITLE in sc.DerivationDescription
    assert build_failure_outputs([], notice) == []
    revised = build_failure_outputs(
        headers,
        FailureNotice(notice.pipeline_name, notice.sentence, notice.detail, revision=2),
        when,
    )
    assert {d.SOPInstanceUID for d in revised}.isdisjoint({sr.SOPInstanceUID, sc.SOPInstanceUID})


def test_revision_one_keeps_the_uids_and_later_revisions_get_new_ones() -> None:
    algorithm = Algorithm("a", "1.0.0", "threshold baseline", "fixed")
    when = datetime.datetime(2026, 1, 1)
    default = output_identity("1.2.3", "p", algorithm, "seg", 901, "d", when)
    first = output_identity("1.2.3", "p", algorithm, "seg", 901, "d", when, revision=1)
    second = output_identity("1.2.3", "p", algorithm, "seg", 901, "d", when, revision=2)
    third = output_identity("1.2.3", "p", algorithm, "seg", 901, "d", when, revision=3)
    assert default == first
    uids = {first.sop_instance_uid, second.sop_instance_uid, third.sop_instance_uid}
    assert len(uids) == 3
    assert second.series_instance_uid != first.series_instance_uid
    with pytest.raises(ValueError, match="counts from 1"):
        output_identity("1.2.3", "p", algorithm, "seg", 901, "d", when, revision=0)


def test_rejection_note_references_exactly_the_rejected(tmp_path: Path) -> None:
    headers = _headers(7)
    notice = FailureNotice("hyperdense_regions", "sentence.", "detail")
    sr, sc = build_failure_outputs(headers, notice)
    rejected = [
        RejectedInstance(d.SOPClassUID, d.SOPInstanceUID, d.SeriesInstanceUID, d.StudyInstanceUID)
        for d in (sr, sc)
    ]
    note = build_rejection_note(sr, rejected, headers[0].SeriesInstanceUID, "job-2", "superseded")
    path = tmp_path / "ko.dcm"
    note.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert note.SOPClassUID == uid.KeyObjectSelectionDocumentStorage
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    items = {
        str(ref.ReferencedSOPInstanceUID): item.ValueType
        for item in note.ContentSequence
        for ref in item.get("ReferencedSOPSequence", [])
    }
    assert items == {sr.SOPInstanceUID: "COMPOSITE", sc.SOPInstanceUID: "IMAGE"}
    elsewhere = RejectedInstance(sr.SOPClassUID, "1.2.3.4", "1.2.3.5", "1.2.3.6")
    with pytest.raises(ValueError, match="studies"):
        build_rejection_note(sr, [*rejected, elsewhere], "1.2.3", "job-2", "superseded")
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_note(sr, [], "1.2.3", "job-2", "superseded")


# --- against a real Orthanc ------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-failures"))
    pacs.start()
    yield pacs
    pacs.stop()


def _series(seed: int, description: str = "HEAD") -> list[Dataset]:
    """A small synthetic head CT series of its own patient and study."""
    datasets = synthetic_head_ct(seed=seed, n_slices=8, rows=64)
    for ds in datasets:
        ds.SeriesDescription = description
    return datasets


def _unloadable() -> list[Dataset]:
    """No slice has a position: the series cannot be placed in space."""
    datasets = _series(41)
    for ds in datasets:
        del ds.ImagePositionPatient
    return datasets


def _inconsistent() -> list[Dataset]:
    """One slice has another pixel spacing: not one acquisition."""
    datasets = _series(42)
    datasets[3].PixelSpacing = [0.5, 0.5]
    return datasets


def _not_head_ct() -> list[Dataset]:
    """Air only: no skull, no brain."""
    datasets = _series(43)
    for ds in datasets:
        ds.PixelData = np.full((ds.Rows, ds.Columns), AIR_STORED, "<u2").tobytes()
    return datasets


def _tampered_store(folder: Path) -> Path:
    """A copy of the model store whose threshold parameters were edited after hashing."""
    root = folder / "model_store"
    shutil.copytree(STORE_ROOT / MODEL_NAME, root / MODEL_NAME)
    parameters = root / MODEL_NAME / MODEL_VERSION / "parameters.json"
    parameters.write_text(parameters.read_text().replace("55", "45", 1))
    return root


def _assert_notice(
    orthanc: Orthanc, sources: list[Dataset], kind: FailureKind, pipeline: str, folder: Path
) -> None:
    """The source study holds exactly one failure SR and one SC, saying ``kind``."""
    stored = stored_in_study(orthanc, str(sources[0].StudyInstanceUID))
    classes = sorted(tags["SOPClassUID"] for tags in stored.values())
    assert classes == sorted([uid.ComprehensiveSRStorage, uid.SecondaryCaptureImageStorage])
    for sop_uid, tags in stored.items():
        ds = download(orthanc, sop_uid, folder)
        assert dciodvfy_errors(folder / f"{sop_uid}.dcm") == [], (kind, tags["SOPClassUID"])
        assert ds.PatientID == sources[0].PatientID
        assert pipeline in ds.SeriesDescription
        if tags["SOPClassUID"] == uid.ComprehensiveSRStorage:
            texts = " ".join(text_values(ds))
            assert radiologist_sentence(kind) in texts and NO_INFERENCE in texts
            assert pipeline in texts
        else:
            assert radiologist_sentence(kind) in ds.DerivationDescription


def test_failures_reach_pacs(orthanc: Orthanc, tmp_path: Path) -> None:
    cases = {
        FailureKind.UNLOADABLE_SERIES: _unloadable(),
        FailureKind.INCONSISTENT_SERIES: _inconsistent(),
        FailureKind.NOT_HEAD_CT: _not_head_ct(),
    }
    model_cases = {
        FailureKind.MODEL_REFUSED: _series(44),
        FailureKind.MODEL_UNAVAILABLE: _series(45, "NOWEIGHTS"),
    }
    tampered = _tampered_store(tmp_path)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()

    def model_pipelines(name: str) -> Pipeline:
        """The tampered threshold store and BLAST-CT without its weights."""
        if name == "blast_ct":
            return BlastCtPipeline(BlastCtParameters(members=(1,), weights_dir=no_weights))
        if name == "hyperdense_regions":
            parameters = load_parameters(MODEL_NAME, MODEL_VERSION, tampered)
            return HyperdenseThresholdPipeline(HyperdenseParameters.from_mapping(parameters))
        return get_pipeline(name)

    no_weights_route = {**HEAD_CT_ROUTE, "name": "no-weights", "pipeline": "blast_ct"}
    no_weights_route["match"] = {"series_description": "^NOWEIGHTS$"}
    plain = node_config(tmp_path / "node", orthanc)
    models = node_config(
        tmp_path / "models", orthanc, [no_weights_route, HEAD_CT_ROUTE], "blast_ct"
    )
    with (
        Node(plain, processor(plain), reporting()) as node,
        Node(models, processor(models, model_pipelines), reporting()) as model_node,
    ):
        for target, batch in ((node, cases), (model_node, model_cases)):
            for kind, datasets in batch.items():
                storescu(target, write_series(datasets, tmp_path / kind.value))
        wait_jobs_finished(node, len(cases))
        wait_jobs_finished(model_node, len(model_cases))
        for target, batch in ((node, cases), (model_node, model_cases)):
            jobs = {j.series_instance_uid: j for j in target.jobs.all()}
            for kind, datasets in batch.items():
                job = jobs[str(datasets[0].SeriesInstanceUID)]
                assert job.state is JobState.FAILED and job.reason, kind
                assert "Traceback" not in job.reason
                outputs = target.revisions.outputs(job.id)
                assert len(outputs) == 2, kind
                pipeline = job.pipeline
                _assert_notice(orthanc, datasets, kind, pipeline, tmp_path / "pacs")
        reasons = {j.series_instance_uid: j.reason or "" for j in node.jobs.all()}
        inconsistent = reasons[str(cases[FailureKind.INCONSISTENT_SERIES][0].SeriesInstanceUID)]
        assert "pixel spacing" in inconsistent


def test_unreadable_series_fails_without_notice(orthanc: Orthanc, tmp_path: Path) -> None:
    """No readable instance, nothing to attribute: the job fails with its reason only."""
    config = node_config(tmp_path / "node", orthanc, stable_age_s=3.0)
    with Node(config, processor(config), reporting()) as node:
        files = write_series(_series(46), tmp_path / "series")
        storescu(node, files)
        for path in node.store.series_paths(str(pydicom.dcmread(files[0]).SeriesInstanceUID)):
            path.write_bytes(b"not DICOM any more")
        wait_jobs_finished(node, 1)
        job = node.jobs.all()[0]
        assert job.state is JobState.FAILED and "not a readable DICOM file" in (job.reason or "")
        assert node.revisions.outputs(job.id) == []
        assert node.outbox.items() == []
