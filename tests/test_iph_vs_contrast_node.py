"""``iph_vs_contrast`` through a real node (DCMTK storescu in, Orthanc out) and through
``dicomnode run``, on a generated case: no ../shared needed."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import uid
from pydicom.sr.codedict import codes

from dicomnode.cli import main
from dicomnode.config import NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor
from dicomnode.records import JobState
from pipelines.iph_vs_contrast.demo import demo_case
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.support import free_port, require_tool

NOTICE = "trained on synthetic data - not for clinical use"
ROUTE_DESCRIPTION = "(?i)post.?thrombectomy"  # the rule of deploy/dicomnode.example.toml
OUTPUT_CLASSES = {
    uid.SegmentationStorage: "seg",
    uid.SecondaryCaptureImageStorage: "sc",
    uid.Comprehensive3DSRStorage: "sr",
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_radiomics() -> None:
    logging.getLogger("radiomics").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_case(tmp_path_factory.mktemp("iph-case"))


def _route() -> dict[str, object]:
    return {
        "name": "post-thrombectomy-ncct",
        "match": {
            "modality": "CT",
            "body_part_examined": ["HEAD", "BRAIN"],
            "series_description": ROUTE_DESCRIPTION,
        },
        "pipeline": "iph_vs_contrast",
        "destinations": ["PACS"],
    }


def _destination(pacs: Orthanc) -> dict[str, object]:
    return {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}


def test_node_sends_seg_sc_sr_of_every_area_to_the_pacs(
    case: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("iph-node")
    pacs = Orthanc(tmp_path_factory.mktemp("iph-orthanc"))
    pacs.start()
    try:
        config = NodeConfig.model_validate(
            {
                "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
                "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
                "destinations": {
                    "PACS": {
                        "ae_title": pacs.ae_title,
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                },
                "routes": [_route()],
                "stable_age_s": 1.0,
                "poll_interval_s": 0.1,
                "spool_dir": str(base / "spool"),
                "state_dir": str(base / "state"),
                "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
            }
        )
        with Node(config, processor(config)) as node:
            sent = subprocess.run(
                [require_tool("storescu", "dcmtk"), "-aec", "DICOMNODE", "127.0.0.1",
                 str(config.node.port), *map(str, case)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            _wait_for_results(node, pacs)
            stored = {OUTPUT_CLASSES[t["SOPClassUID"]]: t for t in pacs.instances()
                      if t["SOPClassUID"] in OUTPUT_CLASSES}  # fmt: skip
        assert set(stored) == {"seg", "sc", "sr"}
        folder = base / "from-pacs"
        folder.mkdir()
        paths = {
            kind: pacs.download(tags["SOPInstanceUID"], folder / f"{kind}.dcm")
            for kind, tags in stored.items()
        }
    finally:
        pacs.stop()
    for kind, path in paths.items():
        assert dciodvfy_errors(path) == [], kind
    source = pydicom.dcmread(case[0])
    seg = hd.seg.segread(paths["seg"])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    coded = {
        str(s.SegmentLabel): str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for s in seg.SegmentSequence
    }
    assert coded == {"Haemorrhage 1": "50960005", "Contrast staining 1": "111428"}
    assert NOTICE in str(seg.ContentDescription)
    sc = pydicom.dcmread(paths["sc"])
    assert "IPH VS CONTRAST SUMMARY" in str(sc.SeriesDescription)
    assert sc.SamplesPerPixel == 3 and sc.BurnedInAnnotation == "YES"
    sr = pydicom.dcmread(paths["sr"])
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = {str(g.tracking_identifier): g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"Haemorrhage 1", "Contrast staining 1"}
    haemorrhage = groups["Haemorrhage 1"]
    probability = haemorrhage.get_measurements(name=codes.DCM.Probability)[0].value
    cutoff = haemorrhage.get_measurements(name=codes.DCM.ThresholdValue)[0].value
    assert float(probability) > 50.0 and float(cutoff) < 0.0
    classes = {
        name: g.get_qualitative_evaluations(name=codes.SCT.Classification)[0].value.meaning
        for name, g in groups.items()
    }
    assert classes == {"Haemorrhage 1": "Hemorrhage", "Contrast staining 1": "Extravasation"}
    texts = " ".join(
        str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    )  # fmt: skip
    assert NOTICE in texts and "Rad-score" in texts


def _wait_for_results(node: Node, pacs: Orthanc, timeout_s: float = 120.0) -> None:
    """Until the node is idle with three objects in the PACS; fails at once on a failed job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failed = [j.reason for j in node.jobs.all() if j.state is JobState.FAILED]
        assert not failed, f"job failed: {failed}"
        if node.is_idle() and len(pacs.get("/instances")) >= len(OUTPUT_CLASSES):
            return
        time.sleep(0.25)
    raise AssertionError("timed out waiting for the results in the PACS")


def test_run_routes_a_folder_to_the_pipeline(
    case: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""spool_dir = "spool"
state_dir = "state"

[node]
ae_title = "DICOMNODE"
port = {free_port()}

[[allowed_callers]]
ae_title = "STORESCU"

[destinations.PACS]
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}

[[routes]]
name = "post-thrombectomy-ncct"
pipeline = "iph_vs_contrast"
destinations = ["PACS"]

[routes.match]
modality = ["CT"]
body_part_examined = ["HEAD", "BRAIN"]
series_description = "{ROUTE_DESCRIPTION}"

[pipelines.iph_vs_contrast]
segmenter = "hyperdense_regions"
"""
    )
    folder = case[0].parent
    assert main(["run", str(folder), "--out", str(tmp_path / "out"), "--config", str(config)]) == 0
    assert "processed" in capsys.readouterr().out
    outputs = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))]
    assert {OUTPUT_CLASSES[ds.SOPClassUID] for ds in outputs} == {"seg", "sc", "sr"}
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    assert "IPH VS CONTRAST REPORT" in str(sr.SeriesDescription)
