"""The MRI prognosis pipeline through a real node: a whole generated MRI study (DWI, ADC,
FLAIR, T1) sent series by series with DCMTK storescu is processed ONCE, after its last
series, and one SEG, one SC, one SR and the Grad-CAM SCs reach a real Orthanc."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import uid
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.completeness import Evidence
from dicomnode.config import NodeConfig, StudyRole
from dicomnode.node import Node
from dicomnode.processing import processor
from dicomnode.records import JobState, SeriesState
from dicomnode.series_facts import SeriesFactsStore
from dicomnode.studies import assign_roles, first_header
from pipelines.ais_prognosis_mri.cohort import draw_case
from pipelines.ais_prognosis_mri.synthetic_mri import StudySpec, write_study
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.pacs_reports import text_values
from tests.support import free_port, require_tool

NOTICE = "trained on synthetic data - not for clinical use"
ROLES = {
    "dwi": {"series_description": "(?i)dwi|trace", "diffusion_b_value": 1000},
    "adc": {"image_type_contains": ["ADC"]},
    "flair": {"series_description": "(?i)flair", "required": False},
    "t1": {"series_description": "(?i)^t1", "required": False},
}


def _config(
    base: Path,
    pacs: Orthanc,
    study_stable_age_s: float,
    stable_age_s: float = 0.8,
    trust: list[str] | None = None,
) -> NodeConfig:
    """A node with the study-level MRI rule; ``trust``: the rule's own completeness trust."""
    rule_completeness = {} if trust is None else {"completeness": {"trust": trust}}
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            "destinations": {
                "PACS": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
            },
            "routes": [
                {
                    "name": "mri-stroke",
                    "match": {"modality": "MR"},
                    "pipeline": "ais_prognosis_mri",
                    "destinations": ["PACS"],
                    "level": "study",
                    "roles": ROLES,
                    "study_stable_age_s": study_stable_age_s,
                    **rule_completeness,
                }
            ],
            "stable_age_s": stable_age_s,
            "poll_interval_s": 0.1,
            "spool_dir": str(base / "spool"),
            "state_dir": str(base / "state"),
            "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
        }
    )


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, node: Node) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        failed = [j.reason for j in node.jobs.all() if j.state is JobState.FAILED]
        assert not failed, f"job failed: {failed}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _storescu(node: Node, paths: list[Path]) -> None:
    executable = require_tool("storescu", "dcmtk")
    result = subprocess.run(
        [executable, "-aec", node.config.node.ae_title, "127.0.0.1",
         str(node.config.node.port), *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_study(draw_case(9001, 1).spec, tmp_path_factory.mktemp("mri-study"))


def test_mri_study_is_processed_once_after_its_last_series(
    tmp_path: Path, orthanc: Orthanc, study: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, orthanc, study_stable_age_s=60.0)
    with Node(config, processor(config)) as node:
        for role in ("t1", "flair", "adc"):  # three series, each complete on its own
            _storescu(node, study[role])
            time.sleep(2 * config.stable_age_s)
        time.sleep(1.0)
        assert node.jobs.all() == [], "the study was queued before its DWI arrived"
        assert node.store is not None
        waiting = [s for s in node.store.all_series() if s.state is SeriesState.RECEIVING]
        assert len(waiting) == 3
        sent_last = time.time()
        _storescu(node, study["dwi"])
        _wait(lambda: node.is_idle() and len(orthanc.get("/instances")) >= 6, 55, "results", node)
        jobs = node.jobs.all()
        assert len(jobs) == 1 and jobs[0].state is JobState.DONE
        assert {s.state for s in node.store.all_series()} == {SeriesState.ROUTED}
        dwi = pydicom.dcmread(study["dwi"][0])
        assert jobs[0].series_instance_uid == dwi.SeriesInstanceUID
        with node.store.transaction() as db:
            created = db.execute("SELECT created_at FROM jobs").fetchone()[0]
        assert created >= sent_last

    stored = orthanc.instances()
    classes = [t["SOPClassUID"] for t in stored]
    assert classes.count(uid.Comprehensive3DSRStorage) == 1  # one SR for the study
    assert classes.count(uid.SegmentationStorage) == 1
    assert classes.count(uid.SecondaryCaptureImageStorage) == 4  # summary + 3 Grad-CAM
    paths = [
        orthanc.download(t["SOPInstanceUID"], tmp_path / f"{i}.dcm") for i, t in enumerate(stored)
    ]
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
    objects = {str(pydicom.dcmread(p).SOPClassUID): p for p in paths}

    seg = hd.seg.segread(objects[uid.SegmentationStorage])
    assert seg.StudyInstanceUID == dwi.StudyInstanceUID
    assert str(seg.SegmentSequence[0].SegmentLabel).startswith("Infarct ROI")
    source_series = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert source_series == {str(dwi.SeriesInstanceUID)}

    sr_ds = pydicom.dcmread(objects[uid.Comprehensive3DSRStorage])
    texts = " | ".join(text_values(sr_ds))
    assert "Nomogram (CRD) points: NIHSS" in texts
    assert "Rad-score" in texts and "DL score" in texts
    assert NOTICE in texts
    report = hd.sr.srread(objects[uid.Comprehensive3DSRStorage]).content
    group = report.get_volumetric_roi_measurement_groups()[0]
    probability = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
    assert probability and 0.0 <= float(probability[0].value) <= 100.0
    volume = group.get_measurements(name=codes.SCT.Volume)[0].value
    assert float(volume) > 0.5
    assert "170969009" in str(sr_ds)  # Prognosis bad (mRS 3-6), coded


def test_study_missing_its_required_dwi_is_ignored_after_the_study_stable_age(
    tmp_path: Path, orthanc: Orthanc, study: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, orthanc, study_stable_age_s=2.0)
    with Node(config, processor(config)) as node:
        _storescu(node, study["flair"] + study["adc"])
        assert node.store is not None
        _wait(lambda: node.store is not None and node.is_idle(), 20, "ignored", node)
        series = node.store.all_series()
        assert {s.state for s in series} == {SeriesState.IGNORED}
        assert all("required role(s) dwi missing" in (s.reason or "") for s in series)
        assert node.jobs.all() == []


def test_enhanced_mr_instances_are_received_and_fill_their_roles(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    spec = StudySpec(seed=12, infarct=None, enhanced=True, roles=("dwi", "adc"), n_slices=8)
    files = write_study(spec, tmp_path / "enhanced")
    config = _config(tmp_path, orthanc, study_stable_age_s=600.0)
    with Node(config, processor(config)) as node:
        _storescu(node, files["dwi"] + files["adc"])
        assert node.store is not None
        series = node.store.all_series()
        assert len(series) == 2 and all(s.instance_count == 1 for s in series)
        assert {s.sop_class_uid for s in series} == {uid.EnhancedMRImageStorage}
        headers = {
            s.series_instance_uid: first_header(node.store.series_paths(s.series_instance_uid))
            for s in series
        }
        roles = assign_roles(
            {k: h for k, h in headers.items() if h is not None},
            {name: StudyRole.model_validate(role) for name, role in ROLES.items()},
        )
        dwi = pydicom.dcmread(files["dwi"][0], stop_before_pixels=True)
        assert roles["dwi"] == dwi.SeriesInstanceUID and set(roles) == {"dwi", "adc"}
        time.sleep(3 * config.stable_age_s)
        assert node.jobs.all() == []  # waits for the optional FLAIR and T1 (600 s)


def _declare_counts(
    study: dict[str, list[Path]], folder: Path, **study_wide: int
) -> dict[str, list[Path]]:
    """A copy of ``study`` under new UIDs in which every series is one acquisition that
    declares its ImagesInAcquisition (as a scanner's series may), with ``study_wide``
    attributes (e.g. NumberOfStudyRelatedSeries) on every instance; the files by role."""
    written: dict[str, list[Path]] = {}
    study_uid = generate_uid()
    for role, paths in study.items():
        series_uid = generate_uid()
        written[role] = []
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AcquisitionNumber = 1
            ds.ImagesInAcquisition = len(paths)
            for keyword, value in study_wide.items():
                setattr(ds, keyword, value)
            target = folder / role / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            written[role].append(target)
    return written


def _queued_after(node: Node) -> float:
    """Seconds from the study's last instance recorded to its one job queued."""
    assert node.store is not None
    with node.store.transaction() as db:
        (last,) = db.execute("SELECT max(last_arrival) FROM series").fetchone()
        (created,) = db.execute("SELECT created_at FROM jobs").fetchone()
    return float(created) - float(last)


def test_a_study_complete_by_content_is_processed_without_waiting_the_stable_age(
    tmp_path: Path, orthanc: Orthanc, study: dict[str, list[Path]]
) -> None:
    files = _declare_counts(study, tmp_path / "declared")
    config = _config(tmp_path, orthanc, study_stable_age_s=600.0, stable_age_s=30.0)
    with Node(config, processor(config)) as node:
        _storescu(node, [path for paths in files.values() for path in paths])
        dwi = pydicom.dcmread(files["dwi"][0], stop_before_pixels=True)
        study_uid = str(dwi.StudyInstanceUID)

        def delivered() -> bool:
            stored = [t for t in orthanc.instances() if t.get("StudyInstanceUID") == study_uid]
            return node.is_idle() and len(stored) >= 6

        _wait(delivered, 25, "the results before the 30 s stable age", node)
        [job] = node.jobs.all()
        assert job.state is JobState.DONE and job.series_instance_uid == dwi.SeriesInstanceUID
        assert _queued_after(node) < 5.0
        assert node.store is not None
        for series in node.store.all_series():
            [completion] = SeriesFactsStore(node.store).completions(series.series_instance_uid)
            assert completion.evidence is Evidence.IMAGES_IN_ACQUISITION
            assert completion.detail.endswith("study: every role filled")


def test_a_study_without_optional_roles_is_whole_by_its_declared_size_or_the_release(
    tmp_path: Path, orthanc: Orthanc, study: dict[str, list[Path]]
) -> None:
    required = {role: study[role] for role in ("dwi", "adc")}
    cases = [  # (the rule's trust, the study's own attributes)
        (None, {"NumberOfStudyRelatedSeries": 2}),
        (["images_in_acquisition", "study_release"], {}),
    ]
    for index, (trust, study_wide) in enumerate(cases):
        files = _declare_counts(required, tmp_path / f"case{index}", **study_wide)
        config = _config(
            tmp_path / f"node{index}", orthanc, study_stable_age_s=600.0, stable_age_s=30.0,
            trust=trust,
        )  # fmt: skip
        with Node(config, processor(config)) as node:
            _storescu(node, files["dwi"] + files["adc"])
            _wait(lambda n=node: len(n.jobs.all()) == 1, 10, "the study's job", node)
            assert _queued_after(node) < 5.0
