"""The node end to end: DCMTK storescu -> node -> SEG, SC, SR -> a real Orthanc PACS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.sr.codedict import codes

from dicomnode.config import NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor
from dicomnode.records import JobState, OutboxState, SeriesState
from pipelines.synthetic import InsertedLesion, insert_lesion, synthetic_head_ct, write_series
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.support import free_port, require_tool

OUTPUT_CLASSES = {
    uid.SegmentationStorage: "seg",
    uid.SecondaryCaptureImageStorage: "sc",
    uid.Comprehensive3DSRStorage: "sr",
}


def _wait(
    condition: Callable[[], bool], timeout_s: float, what: str, node: Node | None = None
) -> None:
    """Poll ``condition``; fail at once, with the reason, if the node fails a job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if node is not None and node.jobs is not None:
            failed = [j.reason for j in node.jobs.all() if j.state is JobState.FAILED]
            assert not failed, f"job failed: {failed}"
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


def _config(base: Path, pacs: Orthanc) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            "destinations": {
                "PACS": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
            },
            "routes": [
                {
                    "name": "head-ct",
                    "match": {"modality": "CT", "body_part_examined": ["HEAD", "BRAIN"]},
                    "pipeline": "hyperdense_regions",
                    "destinations": ["PACS"],
                }
            ],
            "stable_age_s": 1.0,
            "poll_interval_s": 0.1,
            "spool_dir": str(base / "spool"),
            "state_dir": str(base / "state"),
            "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
        }
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[Node]:
    config = _config(tmp_path_factory.mktemp("node"), orthanc)
    with Node(config, processor(config)) as running:
        yield running


@pytest.fixture(scope="module")
def ge_case(
    ge_headct_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Path], InsertedLesion]:
    datasets = [pydicom.dcmread(p) for p in sorted(ge_headct_dir.glob("*.dcm"))]
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=13.0, hu=68.0, seed=3)
    return write_series(datasets, tmp_path_factory.mktemp("ge-case")), lesion


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A generated head CT with a 70 HU lesion: runs where ../shared is absent."""
    datasets = synthetic_head_ct(seed=11, n_slices=24, rows=256)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=11)
    return write_series(datasets, tmp_path_factory.mktemp("synthetic-case"))


def storescu(
    node: Node, *paths: Path, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    executable = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [executable, *options, "-aec", node.config.node.ae_title, "127.0.0.1",
         str(node.config.node.port), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _send_and_wait(node: Node, pacs: Orthanc, files: list[Path]) -> None:
    result = storescu(node, *files)
    assert result.returncode == 0, result.stderr
    _wait(lambda: node.is_idle() and len(pacs.get("/instances")) >= 3, 300, "results", node)


def test_ge_head_ct_comes_back_as_seg_sc_sr(
    node: Node, orthanc: Orthanc, ge_case: tuple[list[Path], InsertedLesion], tmp_path: Path
) -> None:
    files, lesion = ge_case
    _send_and_wait(node, orthanc, files)
    sources = [pydicom.dcmread(p) for p in files]
    stored = {OUTPUT_CLASSES[t["SOPClassUID"]]: t for t in orthanc.instances()}
    assert set(stored) == {"seg", "sc", "sr"}
    paths = {
        kind: orthanc.download(tags["SOPInstanceUID"], tmp_path / f"{kind}.dcm")
        for kind, tags in stored.items()
    }
    for kind, path in paths.items():
        assert dciodvfy_errors(path) == [], kind

    seg = hd.seg.segread(paths["seg"])
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    found = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    mask = found[..., 0].astype(bool)
    # One segment per region, every frame kept for each: the lesion first, and the
    # calcified choroid plexus of this head labelled apart (issue 8).
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    assert labels[0] == "Hyperdense region 1"
    assert any(label.startswith("Calcification") for label in labels)
    assert seg.NumberOfFrames == len(sources) * len(labels)
    positions = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: np.asarray(
            f.PlanePositionSequence[0].ImagePositionPatient, dtype=float
        )
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    for ds in sources:
        assert np.allclose(positions[ds.SOPInstanceUID], ds.ImagePositionPatient, atol=1e-3)
    dice = 2 * (mask & lesion.masks).sum() / (mask.sum() + lesion.masks.sum())
    assert dice >= 0.8, f"Dice {dice:.3f}"

    report = hd.sr.srread(paths["sr"]).content
    groups = {str(g.tracking_identifier): g for g in report.get_volumetric_roi_measurement_groups()}
    # Region 1 is the largest region: the lesion (the others are calcifications).
    largest = groups["Hyperdense region 1"]
    volume = largest.get_measurements(name=codes.SCT.Volume)[0].value
    assert abs(float(volume) - lesion.volume_ml) <= 0.1 * lesion.volume_ml, (
        volume,
        lesion.volume_ml,
    )


def test_outbox_waits_for_pacs_and_resending_makes_no_duplicates(
    node: Node, orthanc: Orthanc, tmp_path: Path
) -> None:
    datasets = synthetic_head_ct(seed=21, n_slices=12, rows=128)
    insert_lesion(datasets, center_mm=None, radius_mm=10.0, hu=70.0, seed=21)
    files = write_series(datasets, tmp_path / "series")
    jobs_before = len(node.jobs.all())
    in_pacs_before = len(orthanc.get("/instances"))
    orthanc.stop()
    try:
        assert storescu(node, *files).returncode == 0

        def waiting_after_failures() -> bool:
            pending = [i for i in node.outbox.items() if i.state is OutboxState.PENDING]
            return len(pending) == 3 and all(node.outbox.attempts(i.id) for i in pending)

        _wait(waiting_after_failures, 120, "results waiting in the outbox after failed attempts")
    finally:
        orthanc.start()
    _wait(
        lambda: node.is_idle() and len(orthanc.get("/instances")) == in_pacs_before + 3,
        120,
        "delivery after restart",
    )
    before = sorted(t["SOPInstanceUID"] for t in orthanc.instances())
    _send_and_wait(node, orthanc, files)  # identical bytes: Success, nothing to redo
    assert sorted(t["SOPInstanceUID"] for t in orthanc.instances()) == before
    assert len(node.jobs.all()) == jobs_before + 1


def test_philips_study_only_axial_series_is_processed(
    node: Node, orthanc: Orthanc, philips_study_dir: Path
) -> None:
    result = storescu(node, philips_study_dir, options=("+sd", "+r", "+sp", "I*"))
    assert result.returncode == 0, result.stderr
    _wait(node.is_idle, 300, "the Philips study to be processed", node)
    series = {s.series_description.strip(): s for s in node.store.all_series()}  # type: ignore[union-attr]
    axial = next(s for s in series.values() if s.instance_count == 54)
    assert axial.state is SeriesState.ROUTED
    ignored = {s.reason for s in series.values() if s.state is SeriesState.IGNORED}
    assert ignored == {"localizer/scout series", "secondary capture"}
    jobs = [j for j in node.jobs.all() if j.series_instance_uid == axial.series_instance_uid]
    assert jobs and jobs[-1].state is JobState.DONE, jobs


@pytest.mark.parametrize(
    ("tool", "propose"),
    [(["dcmcjpls"], "-xt"), (["dcmcjpeg", "+e1"], "-xs"), (["dcmcrle"], "-xr")],
)
def test_compressed_series_is_received_and_processed(
    node: Node,
    orthanc: Orthanc,
    ge_case: tuple[list[Path], InsertedLesion],
    tmp_path: Path,
    tool: list[str],
    propose: str,
) -> None:
    """A series sent in a compressed transfer syntax is stored as sent and processed."""
    files, _ = ge_case
    executable = require_tool(tool[0], "dcmtk")
    encoded = []
    for src in files:
        subprocess.run([executable, *tool[1:], str(src), str(tmp_path / src.name)], check=True)
        encoded.append(tmp_path / src.name)
    done_before = sum(j.state is JobState.DONE for j in node.jobs.all())
    result = storescu(node, *encoded, options=(propose,))
    assert result.returncode == 0, result.stderr
    _wait(lambda: sum(j.state is JobState.DONE for j in node.jobs.all()) > done_before, 120,
          "the compressed series' job", node)  # fmt: skip
    syntax = pydicom.dcmread(encoded[0]).file_meta.TransferSyntaxUID
    spooled = node.store.series_paths(pydicom.dcmread(encoded[0]).SeriesInstanceUID)  # type: ignore[union-attr]
    assert pydicom.dcmread(spooled[0]).file_meta.TransferSyntaxUID == syntax


def test_risk_pipeline_returns_risk_sr_and_gradcam_captures(
    orthanc: Orthanc, synthetic_case: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The default pipeline (ht_after_mt): SR with the risk, Grad-CAM SCs, all valid."""
    files = synthetic_case
    base = tmp_path_factory.mktemp("risk-node")
    config = _config(base, orthanc)
    config.routes[0].pipeline = "ht_after_mt"
    with Node(config, processor(config)) as risk_node:
        assert storescu(risk_node, *files).returncode == 0
        _wait(risk_node.is_idle, 300, "the risk pipeline's results", risk_node)
        sent = [item.path for item in risk_node.outbox.items()]
    assert 4 <= len(sent) <= 6  # SEG, SC, SR and one Grad-CAM SC per lesion frame (1-3)
    for path in sent:
        assert dciodvfy_errors(path) == [], path.name
    stored = {t["SOPInstanceUID"] for t in orthanc.instances()}
    datasets = [pydicom.dcmread(p) for p in sent]
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= stored
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    probability = [  # in the group of the scored region, as a coded measurement
        m.value
        for g in report.get_volumetric_roi_measurement_groups()
        for m in g.get_measurements(name=codes.DCM.Probability)
    ]
    assert len(probability) == 1 and 0.0 <= float(probability[0]) <= 100.0
    texts = " ".join(
        str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    )  # fmt: skip
    assert "trained on synthetic data - not for clinical use" in texts
    saliency = [ds for ds in datasets if ds.get("SeriesDescription", "").startswith("SALIENCY")]
    assert len(saliency) == len(sent) - 3
    assert len({ds.SeriesInstanceUID for ds in saliency}) == 1
