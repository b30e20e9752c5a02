"""``ich_expansion`` in a real node: DCMTK storescu -> node -> Orthanc, and ``dicomnode run``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import uid
from pydicom.sr.codedict import codes

from dicomnode.config import NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor
from pipelines.ich_expansion.demo import demo_case
from pipelines.ich_expansion.pipeline import ABC2_METHOD, NDL_CONCEPT, PLANIMETRY
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.support import free_port, require_tool
from tests.test_end_to_end import _wait

NOTICE = "trained on synthetic data - not for clinical use"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_case(tmp_path_factory.mktemp("ich-case"), seed=3)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


def _config(base: Path, pacs: Orthanc) -> NodeConfig:
    """The example's ICH route before the generic head-CT route."""
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            "destinations": {
                "PACS": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
            },
            "routes": [
                {
                    "name": "ich-admission-ncct",
                    "match": {
                        "modality": "CT",
                        "series_description": r"(?i)\b(ich|haemorrhage)\b.*\badmission\b",
                    },
                    "pipeline": "ich_expansion",
                    "destinations": ["PACS"],
                },
                {
                    "name": "head-ct",
                    "match": {"modality": "CT"},
                    "pipeline": "hyperdense_regions",
                    "destinations": ["PACS"],
                },
            ],
            "stable_age_s": 1.0,
            "poll_interval_s": 0.1,
            "spool_dir": str(base / "spool"),
            "state_dir": str(base / "state"),
            "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
        }
    )


def test_admission_ncct_comes_back_with_expansion_sr_seg_and_gradcam(
    case: list[Path], orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = _config(tmp_path_factory.mktemp("node"), orthanc)
    storescu = require_tool("storescu", "dcmtk")
    with Node(config, processor(config)) as node:
        sent = subprocess.run(
            [storescu, "-aec", "DICOMNODE", "127.0.0.1", str(config.node.port),
             *map(str, case)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        _wait(node.is_idle, 240, "the expansion results", node)
        paths = [item.path for item in node.outbox.items()]
    stored = {t["SOPInstanceUID"] for t in orthanc.instances()}
    datasets = [pydicom.dcmread(p) for p in paths]
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= stored
    classes = [str(ds.SOPClassUID) for ds in datasets]
    assert classes.count(uid.SegmentationStorage) == 1
    assert classes.count(uid.Comprehensive3DSRStorage) == 1
    saliency = [ds for ds in datasets if str(ds.SeriesDescription).startswith("SALIENCY")]
    assert 1 <= len(saliency) <= 3
    assert classes.count(uid.SecondaryCaptureImageStorage) == 1 + len(saliency)
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name

    seg = hd.seg.Segmentation.from_dataset(
        next(ds for ds in datasets if ds.Modality == "SEG"), copy=False
    )
    assert seg.ContentDescription == NOTICE
    assert str(seg.SegmentSequence[0].SegmentLabel).startswith("Haematoma by hyperdense_unet")
    source = {str(pydicom.dcmread(p).SOPInstanceUID) for p in case}
    assert seg.StudyInstanceUID == pydicom.dcmread(case[0]).StudyInstanceUID
    referenced = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == source

    sr = next(ds for ds in datasets if ds.Modality == "SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    volumes = {
        m.method.value if m.method else "": float(m.value)
        for m in group.get_measurements(name=codes.SCT.Volume)
    }
    assert volumes[PLANIMETRY.value] > 0.5 and volumes[ABC2_METHOD.value] > 0.5
    assert {m.unit.value for m in group.get_measurements(name=codes.SCT.Volume)} == {"ml"}
    (ndl,) = group.get_measurements(name=NDL_CONCEPT)
    assert 0.0 <= float(ndl.value) <= 1.0
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert 0.0 <= float(probability.value) <= 100.0
    (category,) = [q for q in group.get_qualitative_evaluations() if q.name == codes.DCM.LesionRisk]
    assert category.value in (codes.SCT.HighRisk, codes.SCT.LowRisk)
    texts = " ".join(
        str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    )  # fmt: skip
    assert NOTICE in texts and "Risk of haematoma expansion" in texts
    assert len({ds.SeriesInstanceUID for ds in saliency}) == 1


def test_dicomnode_run_processes_a_generated_case(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    demo_case(folder, seed=2)
    config = tmp_path / "node.toml"
    config.write_text(
        'spool_dir = "spool"\nstate_dir = "state"\n[node]\nae_title = "DICOMNODE"\n\n'
        '[[allowed_callers]]\nae_title = "STORESCU"\n\n'
        '[[routes]]\nname = "ich"\n'
        'pipeline = "ich_expansion"\n[routes.match]\nmodality = ["CT"]\n'
        'series_description = "(?i)admission"\n\n[pipelines.ich_expansion]\n'
        'device = "cpu"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "run", str(folder), "--out",
         str(tmp_path / "out"), "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))]
    descriptions = {str(ds.SeriesDescription) for ds in outputs}
    assert any(d.startswith("ICH EXPANSION REPORT") for d in descriptions), descriptions
    assert any(d.startswith("SALIENCY GRAD-CAM ICH EXPANSION") for d in descriptions)
