"""Pipeline ``iph_vs_contrast``: the per-area cohort, the Rad-score's training, the
bundled model and the SEG / SC / SR it writes (no network: see test_iph_vs_contrast_node)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.sr.codedict import codes
from scipy import ndimage

from model_store.registry import STORE_ROOT, load_manifest
from pipelines.base import PipelineUnavailable
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.iph_vs_contrast import IphVsContrastPipeline
from pipelines.iph_vs_contrast.cohort import (
    generate_iph_cohort,
    oracle_probability,
    write_iph_case,
)
from pipelines.iph_vs_contrast.demo import DEMO_AREAS, demo_case
from pipelines.iph_vs_contrast.features import find_areas, reader_masks
from pipelines.iph_vs_contrast.model import MODEL_NAME, IphModel
from pipelines.iph_vs_contrast.train import train_iph_model
from pipelines.outputs import build_outputs
from pipelines.settings import PipelinesSettings
from pipelines.synthetic import synthetic_head_ct, write_series
from pipelines.volume import load_series
from tests.dciodvfy import dciodvfy_errors

NOTICE = "trained on synthetic data - not for clinical use"
BASELINES = ("HUmax alone", "Volume alone")


def _texts(ds: pydicom.Dataset) -> str:
    """Every TEXT value of an SR content tree, one per line."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.append(str(item.TextValue))
        found.append(_texts(item))
    return "\n".join(found)


@pytest.fixture(autouse=True, scope="module")
def _quiet_radiomics() -> None:
    logging.getLogger("radiomics").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def pipeline() -> IphVsContrastPipeline:
    built = IphVsContrastPipeline()
    built.check()
    return built


def test_cohort_areas_are_separate_labelled_and_reproducible(tmp_path: Path) -> None:
    first = write_iph_case(tmp_path / "a", 2026, 1)
    again = write_iph_case(tmp_path / "b", 2026, 1)
    assert [p.read_bytes() for p in sorted(first.folder.glob("*.dcm"))] == [
        p.read_bytes() for p in sorted(again.folder.glob("*.dcm"))
    ]
    assert len(first.areas) >= 2
    for k, area in enumerate(first.areas):
        v = area.variables
        assert v.label in (0, 1)
        assert v.probability == pytest.approx(float(oracle_probability(v.texture, v.shape)))
        grown = ndimage.binary_dilation(area.mask, np.ones((3, 3, 3), dtype=bool))
        for other in first.areas[k + 1 :]:
            assert not (grown & other.mask).any(), "areas touch: they would be one region"
    series = load_series(sorted(first.folder.glob("*.dcm")))
    assert len(find_areas(series, HyperdenseThresholdPipeline())) == len(first.areas)


def test_reader_masks_are_a_generous_and_a_strict_outline() -> None:
    hu = np.full((3, 12, 12), 30.0)
    hu[1, 3:9, 3:9] = 58.0  # pale rim ...
    hu[1, 4:8, 4:8] = 80.0  # ... dense core
    hu[1, 2, 3:9] = 50.0  # brighter neighbours a generous reader takes in
    mask = hu >= 55.0
    generous, strict = reader_masks(hu, mask)
    assert (generous & mask).sum() == mask.sum() and generous.sum() > mask.sum()
    assert not (generous & (hu < 45.0)).any()
    assert (strict & ~mask).sum() == 0 and strict.sum() == 16  # the core only


def test_training_writes_a_loadable_model_with_its_report(tmp_path: Path) -> None:
    generate_iph_cohort(tmp_path / "cohort", 12, 77, rows=64, n_slices=10)
    report = train_iph_model(
        tmp_path / "cohort",
        root=tmp_path / "store",
        seed=77,
        cv=3,
        extra_splits=0,
        reliability_areas=6,
        folds_out=(1, 3),
    )
    assert report.n_train + report.n_test == report.n_areas >= 14
    text = (tmp_path / "store" / MODEL_NAME / "1.0.0.report.md").read_text()
    for row in ("Rad-score", *BASELINES, "Oracle (generative model)", "Hosmer-Lemeshow"):
        assert row in text
    model = IphModel.load("1.0.0", tmp_path / "store")
    assert model.notice.replace("\u2014", "-") == NOTICE
    zero = dict.fromkeys(model.feature_names, 0.0)
    verdict = model.classify(zero)
    assert verdict.probability == pytest.approx(1.0 / (1.0 + np.exp(-verdict.rad_score)))
    assert verdict.haemorrhage == (verdict.rad_score >= model.score_cutoff)


def test_bundled_model_beats_each_single_feature_on_every_patient_split() -> None:
    manifest = load_manifest(MODEL_NAME, "1.0.0", STORE_ROOT)
    held_out = manifest["metrics"]["held_out"]
    rad = held_out["Rad-score"]["auc"]
    assert all(rad > held_out[name]["auc"] for name in BASELINES)
    assert held_out["Oracle (generative model)"]["auc"] >= 0.75
    for split in manifest["metrics"]["extra_splits"]:
        assert all(split["Rad-score"] > split[name] for name in BASELINES)
    assert manifest["radiomics"]["icc_kept"] < len(manifest["radiomics"]["features"])
    assert (STORE_ROOT / MODEL_NAME / "1.0.0.report.md").is_file()


def test_pipeline_classifies_each_area_and_writes_valid_seg_sc_sr(
    pipeline: IphVsContrastPipeline, tmp_path: Path
) -> None:
    series = load_series(demo_case(tmp_path / "case"))
    result = pipeline.run(series)
    labels = [s.segment.label for s in result.segments]
    assert labels == ["Haemorrhage", "Contrast staining"]
    assert [len(s.regions) for s in result.segments] == [1, 1]  # DEMO_AREAS: one of each
    assert [d.label for d in DEMO_AREAS] == [1, 0]
    verdicts = {c.region: c for c in result.classifications}
    assert verdicts[(0, 0)].is_positive and not verdicts[(1, 0)].is_positive
    outputs = build_outputs(series, result, pipeline_name=pipeline.name, profile=pipeline.profile)
    paths = []
    for k, ds in enumerate(outputs):
        path = tmp_path / f"out{k}.dcm"
        ds.save_as(path)
        paths.append(path)
        assert dciodvfy_errors(path) == [], ds.Modality
    seg, sc, sr = (pydicom.dcmread(p) for p in paths)
    assert NOTICE in str(seg.ContentDescription)
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert set(segments) == {"Haemorrhage 1", "Contrast staining 1"}
    assert segments["Haemorrhage 1"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    assert segments["Contrast staining 1"].SegmentedPropertyTypeCodeSequence[0].CodeValue == (
        "111428"
    )
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[0] > series.frame_hu.shape[1]
    report = hd.sr.srread(paths[2])
    assert NOTICE in _texts(sr)
    groups = {
        str(g.tracking_identifier): g
        for g in report.content.get_volumetric_roi_measurement_groups()
    }
    assert set(groups) == {"Haemorrhage 1", "Contrast staining 1"}
    for name, expected in (("Haemorrhage 1", "50960005"), ("Contrast staining 1", "111428")):
        group = groups[name]
        names = [m.name.meaning for m in group.get_measurements()]
        assert "Rad-score" in names and "Threshold Value" in names and "Probability" in names
        assert "Volume" in names
        (classified,) = group.get_qualitative_evaluations(name=codes.SCT.Classification)
        assert classified.value.value == expected
    cutoff = groups["Haemorrhage 1"].get_measurements(name=codes.DCM.ThresholdValue)[0].value
    assert float(cutoff) == pytest.approx(pipeline.model.score_cutoff, abs=1e-3)
    read = _tid1500(paths[2], tmp_path / "sr.json")  # what 3D Slicer reads
    by_region = {
        g["TrackingIdentifier"]: {m["quantity"]["CodeMeaning"] for m in g["measurementItems"]}
        for g in read["Measurements"]
    }
    assert all({"Rad-score", "Threshold Value", "Probability"} <= v for v in by_region.values())


def _tid1500(sr: Path, out: Path) -> dict[str, Any]:
    """dcmqi's ``tid1500reader`` JSON of an SR (skips where dcmqi is not installed)."""
    beside = Path(sys.executable).parent / "tid1500reader"
    tool = str(beside) if beside.exists() else shutil.which("tid1500reader")
    if tool is None:
        pytest.skip("tid1500reader not found: pip install dcmqi (the dev extra)")
    subprocess.run(
        [tool, "--inputDICOM", str(sr), "--outputMetadata", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_a_series_without_hyperdense_areas_gives_empty_classes(
    pipeline: IphVsContrastPipeline, tmp_path: Path
) -> None:
    files = write_series(synthetic_head_ct(seed=3, n_slices=12, rows=96), tmp_path / "clean")
    series = load_series(files)
    result = pipeline.run(series)
    assert [s.total for s in result.segments] == [None, None]
    assert not result.classifications
    outputs = build_outputs(series, result, pipeline_name=pipeline.name, profile=pipeline.profile)
    assert [ds.Modality for ds in outputs] == ["SEG", "OT", "SR"]


def test_a_changed_model_file_makes_the_pipeline_unavailable(tmp_path: Path) -> None:
    shutil.copytree(STORE_ROOT / MODEL_NAME, tmp_path / MODEL_NAME)
    stored = tmp_path / MODEL_NAME / "1.0.0" / "radscore.skops"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(PipelineUnavailable, match="refused"):
        IphVsContrastPipeline(root=tmp_path).check()


def test_settings_name_the_segmenter_and_refuse_unknown_keys() -> None:
    settings = PipelinesSettings.model_validate({"iph_vs_contrast": {"segmenter": "blast_ct"}})
    assert settings.iph_vs_contrast.segmenter == "blast_ct"
    with pytest.raises(ValidationError, match="iph_vs_contrast"):
        PipelinesSettings.model_validate({"iph_vs_contrast": {"threshold": 0.5}})
