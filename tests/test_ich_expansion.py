"""Pipeline ``ich_expansion``: the admission-ICH cohort, ABC/2, clinical screening,
forward selection, the bundled model and its outputs (SEG, SC, SR, Grad-CAM SCs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest
from pipelines.base import PipelineUnavailable
from pipelines.cnn import largest_frame, lesion_grad_cams, peak_distance_mm
from pipelines.cnn.inputs import frame_pixel_spacing
from pipelines.hyperdense import HYPERDENSE_SEGMENT, HyperdenseThresholdPipeline
from pipelines.ich_expansion.clinical import MODEL_VARIABLES, screen_clinical
from pipelines.ich_expansion.cohort import (
    MARKERS,
    draw_variables,
    generate_expansion_cohort,
)
from pipelines.ich_expansion.demo import demo_case
from pipelines.ich_expansion.features import CNN_INPUT, find_haematoma, scored_frame_mask
from pipelines.ich_expansion.geometry import abc2_volume_ml, diameters_mm
from pipelines.ich_expansion.model import MODEL_NAME, ExpansionModel
from pipelines.ich_expansion.pipeline import (
    ABC2_METHOD,
    HEATMAP_LAYER,
    NDL_CONCEPT,
    IchExpansionPipeline,
)
from pipelines.ich_expansion.train import forward_select, train_expansion_model
from pipelines.outputs import build_outputs
from pipelines.outputs.common import summary_lines
from pipelines.registry import get_pipeline
from pipelines.slice_classifier.classifier import load_slice_classifier
from pipelines.volume import load_series
from tests.dciodvfy import dciodvfy_errors

NOTICE = "trained on synthetic data - not for clinical use"
PLACEMENT_SEED, PLACEMENT_CASES = 9301, 6  # the bundled model was trained on seed 2024
PEAK_NEAR_MM = 5.0
PEAK_NEAR_SHARE = {"key frame": 0.8, "all": 0.7}
"""Raw Grad-CAM peaks within 5 mm of the haematoma; ``bench/gradcam_placement.py
--pipeline ich_expansion`` (40 held-out cases): 100% relative to no haematoma at
``_blocks.2``; plain Grad-CAM at the head (the method before) 28%, so this test fails on
it."""


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_case(tmp_path_factory.mktemp("ich-demo"), seed=1)


@pytest.fixture(scope="module")
def pipeline() -> IchExpansionPipeline:
    built = IchExpansionPipeline()
    built.check()
    return built


def test_abc2_of_an_ellipsoid_is_near_its_volume() -> None:
    z, y, x = np.mgrid[-15:16, -25:26, -25:26]
    mask = (x / 20.0) ** 2 + (y / 15.0) ** 2 + (z / 12.0) ** 2 <= 1.0
    truth = 4.0 / 3.0 * np.pi * 20 * 15 * 12 / 1000.0
    assert abc2_volume_ml(mask, (1.0, 1.0), 1.0) == pytest.approx(truth, rel=0.15)
    y2, x2 = np.mgrid[-30:31, -30:31]
    ellipse = (x2 / 20.0) ** 2 + (y2 / 8.0) ** 2 <= 1.0  # pixels of 0.5 mm
    d1, d2 = diameters_mm(ellipse, (0.5, 0.5))
    assert d1 == pytest.approx(20.5, abs=0.01)  # 40 pixel gaps + one pixel, edge to edge
    assert d2 == pytest.approx(8.5, abs=0.01)
    assert abc2_volume_ml(np.zeros((3, 5, 5), dtype=bool), (1.0, 1.0), 5.0) == 0.0


def test_generative_model_ties_markers_and_outcome_to_the_latents() -> None:
    v = draw_variables(20000, seed=5)
    assert 0.25 <= v.label.mean() <= 0.40
    high, low = v.image > 1.0, v.image < -1.0
    for name in MARKERS:
        assert v.markers[name][high].mean() > v.markers[name][low].mean() + 0.3, name
    assert v.satellites[high].mean() > v.satellites[low].mean()
    assert np.corrcoef(v.clinical_score, v.image)[0, 1] == pytest.approx(0.0, abs=0.03)
    c = v.clinical
    assert c["age"].min() >= 25 and c["age"].max() <= 95
    assert set(np.unique(c["gcs_group"])) <= {0.0, 1.0, 2.0}
    assert c["fibrinogen_g_l"].min() >= 1.0 and c["inr"].max() <= 4.5
    # Low fibrinogen raises the risk (Lee et al.): fewer HE among the highest fibrinogen.
    top = c["fibrinogen_g_l"] > np.quantile(c["fibrinogen_g_l"], 0.8)
    bottom = c["fibrinogen_g_l"] < np.quantile(c["fibrinogen_g_l"], 0.2)
    assert v.label[bottom].mean() > v.label[top].mean()


def test_cohort_writes_the_same_bytes_and_truth_volumes(tmp_path: Path) -> None:
    first = generate_expansion_cohort(tmp_path / "a", 3, seed=9, rows=64, n_slices=16)
    second = generate_expansion_cohort(tmp_path / "b", 3, seed=9, rows=64, n_slices=16)
    for a, b in zip(first.cases, second.cases, strict=True):
        files_a = sorted(a.folder.glob("*.dcm"))
        assert [p.read_bytes() for p in files_a] == [
            p.read_bytes() for p in sorted(b.folder.glob("*.dcm"))
        ]
        assert a.volume_ml > 1.0 and a.abc2_ml > 0.5 * a.volume_ml
        ds = pydicom.dcmread(files_a[0])
        assert ds.SeriesDescription == "ICH ADMISSION NCCT 5mm" and ds.Rows == 64
        truth = np.load(first.root / "ground_truth" / f"{a.case_id}.npz")
        assert int(truth["label_he"]) == a.label_he
        assert truth["haematoma"].shape == (16, 64, 64)
    header = first.clinical_csv.read_text().splitlines()[0]
    assert "label_he" not in header and "fibrinogen_g_l" in header


def test_clinical_screening_imputes_implausible_values_with_reasons(
    demo_files: list[Path],
) -> None:
    ds = pydicom.dcmread(demo_files[0])
    row = {"gcs": "7", "fibrinogen_g_l": "300", "inr": "1,1", "platelets_10e9_l": "x"}
    screened = screen_clinical(ds, row)
    assert screened.values["gcs_group"] == 2.0
    assert screened.values["age"] is not None  # from the header
    assert screened.values["fibrinogen_g_l"] is None  # mg/dL, outside 0.3-12 g/L
    reasons = {i.variable: i.reason for i in screened.issues}
    assert "outside plausible range" in reasons["fibrinogen_g_l"]
    assert "neither a number" in reasons["platelets_10e9_l"]
    assert reasons["onset_to_ct_min"].startswith("absent")
    none = screen_clinical(ds, None)
    assert set(MODEL_VARIABLES) - {"age", "sex_male"} <= {i.variable for i in none.issues}


def test_forward_selection_takes_the_signal_and_leaves_the_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    y = (rng.random(600) < 1 / (1 + np.exp(-(1.5 * x[:, 1] - 1.0 * x[:, 3])))).astype(int)
    steps = forward_select(y, x, ["a", "b", "c", "d"])
    assert [s.variable for s in steps] == ["b", "d"]
    assert all(s.p_value < 0.05 for s in steps)


def test_bundled_model_scores_a_generated_case_and_writes_valid_outputs(
    pipeline: IchExpansionPipeline, demo_files: list[Path], tmp_path: Path
) -> None:
    series = load_series(demo_files)
    result = pipeline.run(series)
    risk = result.risk
    assert risk is not None and 0.0 <= risk.probability <= 1.0
    assert risk.notice.startswith("trained on synthetic data")
    assert result.algorithm.notice == NOTICE
    assert set(risk.imputed) == set(MODEL_VARIABLES) - {"age", "sex_male"}  # no table
    labels = {m.label: m.value for m in risk.measurements}
    assert labels["Haematoma volume (planimetric)"] == pytest.approx(
        result.segments[0].total.volume_ml  # type: ignore[union-attr]
    )
    assert 0.0 <= labels["nDL"] <= 1.0
    frames = {h.frame for h in result.heatmaps}
    assert result.key_frame in frames
    assert all(result.segments[0].frame_mask[f].any() for f in frames)
    assert all(h.label.startswith("Grad-CAM relative to no haematoma") for h in result.heatmaps)
    assert all("mm of the haematoma (" in h.label for h in result.heatmaps)
    assert any(NOTICE in line for line in summary_lines(result))  # SC panels show these
    outputs = build_outputs(series, result, pipeline_name=pipeline.name, profile=pipeline.profile)
    assert len(outputs) == 3 + len(result.heatmaps)
    for i, ds in enumerate(outputs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.Modality
    seg = next(ds for ds in outputs if ds.Modality == "SEG")
    assert seg.ContentDescription == NOTICE
    saliency = [ds for ds in outputs if ds.SeriesDescription.startswith("SALIENCY")]
    assert len(saliency) == len(result.heatmaps)
    assert all("colour scale low" in ds.DerivationDescription for ds in saliency)
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    volumes = group.get_measurements(name=codes.SCT.Volume)
    abc2 = [m for m in volumes if m.method is not None and m.method == ABC2_METHOD]
    assert len(abc2) == 1 and float(abc2[0].value) == pytest.approx(
        labels["Haematoma volume (ABC/2)"], rel=1e-3
    )
    assert abc2[0].unit.value == "ml"
    (ndl,) = group.get_measurements(name=NDL_CONCEPT)
    assert float(ndl.value) == pytest.approx(labels["nDL"], abs=1e-3)
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert float(probability.value) == pytest.approx(100 * risk.probability, abs=1e-3)
    texts = [
        str(item.TextValue)
        for item in sr.ContentSequence[-1].ContentSequence
        if item.ValueType == "TEXT"
    ]
    assert any(NOTICE in text for text in texts)
    assert any(text.startswith("Haematoma volume (ABC/2): ") for text in texts)


def test_registry_builds_the_pipeline_from_its_settings() -> None:
    built = get_pipeline("ich_expansion")
    assert isinstance(built, IchExpansionPipeline)
    assert built.segmenter.name == "hyperdense_unet"  # the learned segmenter by default


def test_a_changed_model_file_makes_the_pipeline_unavailable(tmp_path: Path) -> None:
    shutil.copytree(STORE_ROOT / MODEL_NAME, tmp_path / MODEL_NAME)
    head = next((tmp_path / MODEL_NAME).glob("*/slice_head.safetensors"))
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(PipelineUnavailable, match="refused"):
        IchExpansionPipeline(root=tmp_path).check()


def test_training_writes_a_loadable_version_with_its_report(tmp_path: Path) -> None:
    """A small cohort: the version, its report and manifest are written, the saved
    model loads hash-checked and predicts in [0, 1], and a version is never overwritten."""
    cohort = generate_expansion_cohort(tmp_path / "cohort", 28, seed=4, rows=64, n_slices=14)
    store = tmp_path / "store"
    report = train_expansion_model(
        cohort.root, root=store, version="0.1.0", seed=0, repeat_seeds=()
    )
    assert report.n_cases >= 20
    text = report.report_path.read_text(encoding="utf-8")
    for row in ("clinical (forward-selected)", "image (nDL)", "integrated", "oracle"):
        assert row in text
    assert "likelihood-ratio" in text and "AIC clinical" in text
    manifest = load_manifest(MODEL_NAME, "0.1.0", store)
    assert manifest["primary"] == "integrated"
    assert manifest["clinical_selection"]["selected"]
    model = ExpansionModel.load("0.1.0", store)
    series = load_series(sorted(cohort.cases[0].folder.glob("*.dcm")))
    built = IchExpansionPipeline("0.1.0", root=store)
    result = built.run(series)
    assert result.risk is None or 0.0 <= result.risk.probability <= 1.0
    assert model.selected == tuple(manifest["clinical_selection"]["selected"])
    with pytest.raises(ModelStoreError, match="immutable"):
        train_expansion_model(cohort.root, root=store, version="0.1.0", repeat_seeds=())


def test_raw_grad_cam_peak_lies_on_the_haematoma_in_held_out_cases(tmp_path: Path) -> None:
    """The maps before the SC's display margin, on generated cases the model never saw:
    each one's peak is measured against the scored haematoma on its frame (an empty map
    counts as off the haematoma)."""
    cohort = generate_expansion_cohort(tmp_path, PLACEMENT_CASES, PLACEMENT_SEED)
    model = ExpansionModel.load()
    classifier = load_slice_classifier()
    segmenter = HyperdenseThresholdPipeline()
    near: dict[str, list[bool]] = {"key frame": [], "all": []}
    for case in cohort.cases:
        series = load_series(sorted(case.folder.glob("*.dcm")))
        haematoma = find_haematoma(series, segmenter, classifier, HYPERDENSE_SEGMENT)
        mask = scored_frame_mask(haematoma)
        spacing = frame_pixel_spacing(series, largest_frame(mask))
        cams = lesion_grad_cams(
            model.network, series.frame_hu, mask, spacing, CNN_INPUT, layer=HEATMAP_LAYER
        )
        assert all(mask[cam.frame_index].any() for cam in cams)
        for cam in cams:
            ok = bool(cam.heat_frame.any()) and (
                peak_distance_mm(cam.heat_frame, mask[cam.frame_index], spacing) <= PEAK_NEAR_MM
            )
            near["all"].append(ok)
            if cam.frame_index == haematoma.key_frame:
                near["key frame"].append(ok)
    assert len(near["key frame"]) == PLACEMENT_CASES
    for maps, floor in PEAK_NEAR_SHARE.items():
        assert np.mean(near[maps]) >= floor, (maps, near[maps])
