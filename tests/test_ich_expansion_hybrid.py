"""Pipeline ``ich_expansion_hybrid``: the bundled model on a generated case, its outputs,
its CNN-weights rule, and a real node (DCMTK storescu in, Orthanc out)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
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
from pipelines.base import PipelineUnavailable
from pipelines.evaluation.roc import auc
from pipelines.ich_expansion_hybrid.demo import demo_case
from pipelines.ich_expansion_hybrid.model import TOP_CONTRIBUTIONS
from pipelines.ich_expansion_hybrid.pipeline import (
    CNN_RISK,
    RADIOMICS_RISK,
    IchExpansionHybridPipeline,
)
from pipelines.ich_expansion_hybrid.train import HybridCohort, fit_source, prefilter
from pipelines.outputs import build_outputs
from pipelines.volume import load_series
from tests.dciodvfy import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.support import free_port, require_tool
from tests.test_end_to_end import _wait

NOTICE = "trained on synthetic data - not for clinical use"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_case(tmp_path_factory.mktemp("hybrid-case"), seed=1)


def _sr_texts(sr: pydicom.Dataset) -> list[str]:
    return [
        str(item.TextValue)
        for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    ]


def _drivers(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> list[str]:
    return [
        str(m.name.meaning)
        for m in group.get_measurements()
        if str(m.name.value).startswith("HECONTRIB")
    ]


def test_bundled_model_reports_the_probability_and_its_drivers(
    case: list[Path], tmp_path: Path
) -> None:
    pipeline = IchExpansionHybridPipeline()
    pipeline.check()
    series = load_series(case)
    result = pipeline.run(series)
    risk = result.risk
    assert risk is not None and 0.0 <= risk.probability <= 1.0
    assert result.algorithm.notice == NOTICE
    assert "Lite0 ImageNet packaged" in result.algorithm.name
    drivers = [m for m in risk.measurements if m.label.startswith("Driver")]
    assert 1 <= len(drivers) <= TOP_CONTRIBUTIONS
    sizes = [abs(m.value) for m in drivers]
    assert sizes == sorted(sizes, reverse=True)
    outputs = build_outputs(series, result, pipeline_name=pipeline.name, profile=pipeline.profile)
    assert sorted(str(ds.Modality) for ds in outputs) == ["OT", "SEG", "SR"]
    for i, ds in enumerate(outputs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.Modality
    seg = next(ds for ds in outputs if ds.Modality == "SEG")
    assert seg.ContentDescription == NOTICE
    assert "Lite0 ImageNet packaged" in str(seg.SegmentSequence[0].SegmentAlgorithmName)
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert len(group.get_measurements(name=RADIOMICS_RISK)) == 1
    assert len(group.get_measurements(name=CNN_RISK)) == 1
    assert len(_drivers(group)) == len(drivers)
    texts = _sr_texts(sr)
    assert any(NOTICE in t for t in texts)
    assert any(t.startswith("Driver 1: ") for t in texts)


def test_other_cnn_weights_than_the_trained_ones_make_it_unavailable(tmp_path: Path) -> None:
    weights = tmp_path / "site_lite0.safetensors"
    weights.write_bytes(b"not read: the model was trained on other weights")
    pipeline = IchExpansionHybridPipeline(cnn_weights=weights)
    assert "site_lite0" in pipeline.algorithm.name
    with pytest.raises(PipelineUnavailable, match="retrain"):
        pipeline.check()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


def test_node_routes_the_admission_ncct_to_the_hybrid_model(
    case: list[Path], orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("node")
    config = NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            "destinations": {
                "PACS": {"ae_title": orthanc.ae_title, "host": "127.0.0.1",
                         "port": orthanc.dicom_port}
            },
            "routes": [
                {
                    "name": "ich-admission-ncct",
                    "match": {"modality": "CT", "series_description": r"(?i)admission"},
                    "pipeline": "ich_expansion_hybrid",
                    "destinations": ["PACS"],
                }
            ],
            "stable_age_s": 1.0,
            "poll_interval_s": 0.1,
            "spool_dir": str(base / "spool"),
            "state_dir": str(base / "state"),
            "outbox": {"initial_delay_s": 0.3, "max_delay_s": 1.0, "max_attempts": 100},
        }
    )  # fmt: skip
    storescu = require_tool("storescu", "dcmtk")
    with Node(config, processor(config)) as node:
        sent = subprocess.run(
            [storescu, "-aec", "DICOMNODE", "127.0.0.1", str(config.node.port),
             *map(str, case)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        _wait(node.is_idle, 240, "the hybrid results", node)
        paths = [item.path for item in node.outbox.items()]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= {
        t["SOPInstanceUID"] for t in orthanc.instances()
    }
    assert sorted(str(ds.SOPClassUID) for ds in datasets) == sorted(
        [uid.SegmentationStorage, uid.SecondaryCaptureImageStorage, uid.Comprehensive3DSRStorage]
    )
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert 0.0 <= float(probability.value) <= 100.0
    assert _drivers(group)
    assert any(NOTICE in t for t in _sr_texts(sr))


def test_selection_keeps_the_informative_feature_of_each_source() -> None:
    """Pre-filter, forward selection and the SVM grid on a table with one informative
    radiomics and one informative CNN column among noise."""
    rng = np.random.default_rng(3)
    n = 160
    y = (rng.random(n) < 0.4).astype(int)
    radiomics = rng.normal(size=(n, 30))
    cnn = rng.normal(size=(n, 40))
    radiomics[:, 7] += 1.5 * y
    cnn[:, 12] += 1.5 * y
    names = {
        "radiomics": tuple(f"r{j}" for j in range(30)),
        "cnn": tuple(f"cnn_{j:04d}" for j in range(40)),
    }
    names["combined"] = names["radiomics"] + names["cnn"]
    matrix = {"radiomics": radiomics, "cnn": cnn, "combined": np.hstack([radiomics, cnn])}
    data = HybridCohort(
        tuple(f"c{i}" for i in range(n)), tuple(f"p{i}" for i in range(n)), y,
        np.full(n, 0.5), names, matrix, {}, b"",
    )  # fmt: skip
    assert prefilter(radiomics, y, 3)[0] == 7
    fit = fit_source(data, "combined", np.arange(n), seed=0)
    assert {"r7", "cnn_0012"} <= set(fit.features)
    assert set(fit.means) == set(fit.features)
    assert fit.params["svc__kernel"] in ("linear", "rbf") and len(fit.features) <= 6
    assert (
        float(
            auc(
                y,
                fit.model.predict_proba(
                    matrix["combined"][:, [names["combined"].index(f) for f in fit.features]]
                )[:, 1],
            )
        )
        > 0.5
    )


def test_dicomnode_run_processes_a_generated_case(case: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'spool_dir = "spool"\nstate_dir = "state"\n[node]\nae_title = "DICOMNODE"\n\n'
        '[[allowed_callers]]\nae_title = "STORESCU"\n\n[[routes]]\nname = "ich"\n'
        'pipeline = "ich_expansion_hybrid"\n[routes.match]\nmodality = ["CT"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "run", str(case[0].parent), "--out",
         str(tmp_path / "out"), "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))]
    descriptions = sorted(str(ds.SeriesDescription) for ds in outputs)
    assert len(outputs) == 3, descriptions
    assert any(d.startswith("ICH EXPANSION HYBRID REPORT") for d in descriptions)
