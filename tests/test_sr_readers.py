"""The SEG and SR as the viewers' readers see them: dcmqi's ``tid1500reader`` (what 3D
Slicer uses for TID 1500) returns each region's group with its own segment, finding,
site, measurements and the coded risk; ``segimage2itkimage`` reads one segment per
region with its colour; dciodvfy finds no error; every text is ASCII.

The case is generated (``pipelines.synthetic``) with spheres as regions and a
``RiskPrediction`` built directly: no model runs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.sr import CodedConcept
from numpy.typing import NDArray
from pydicom.sr.codedict import codes

from pipelines.base import (
    Algorithm,
    HeatMap,
    PipelineResult,
    RiskPrediction,
    SegmentClass,
    SegmentResult,
)
from pipelines.geometry import represented_thickness
from pipelines.measure import measure_region, measure_segment
from pipelines.outputs import build_outputs
from pipelines.outputs.common import plain
from pipelines.outputs.regions import (
    FINDING_CALCIFICATION,
    FINDING_CONTRAST_STAINING,
    FINDING_HAEMORRHAGE,
    region_label_array,
    scored_region,
    segment_plan,
)
from pipelines.series import LoadedSeries
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_datasets
from tests.dciodvfy import dciodvfy_errors

pytestmark = pytest.mark.filterwarnings("ignore:The string")

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
CATEGORY = CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
HAEMORRHAGE = SegmentClass("Haemorrhage", CATEGORY, FINDING_HAEMORRHAGE)
CALCIFICATION = SegmentClass("Calcification", CATEGORY, FINDING_CALCIFICATION)
STAINING = SegmentClass("Contrast staining", CATEGORY, FINDING_CONTRAST_STAINING)
NOTICE = "trained on synthetic data \u2014 not for clinical use"
RISK = RiskPrediction(
    outcome="haemorrhagic transformation",
    probability=0.734,
    cutoff=0.42,
    model_name="ht_after_mt combined",
    model_version="2.1.0",
    notice=NOTICE,
    imputed=("NIHSS",),
    scored_reason="the largest haemorrhage",
)
# (x, y, z offset from the head centre in mm (LPS: +x is the patient's left), radius mm)
SPHERES = {
    "haemorrhage 1": ((-35.0, 0.0, 0.0), 14.0),
    "haemorrhage 2": ((38.0, 10.0, 10.0), 8.0),
    "calcification": ((0.0, 25.0, 0.0), 5.0),
}


def dcmqi_tool(name: str) -> str:
    """Path of a dcmqi command (installed beside the interpreter by ``pip install dcmqi``)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found: pip install dcmqi (the dev extra)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def frame_points(series: LoadedSeries) -> NDArray[np.float64]:
    """Patient coordinates (mm) of every frame pixel, shape (frames, rows, columns, 3)."""
    n, rows, cols = series.frame_hu.shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    index = np.stack([np.zeros_like(rr), rr, cc, np.ones_like(rr)]).reshape(4, -1)
    return np.stack(
        [(series.frame_affines[f] @ index)[:3].T.reshape(rows, cols, 3) for f in range(n)]
    )


def segment_of(
    series: LoadedSeries, segment: SegmentClass, masks: list[NDArray[np.bool_]]
) -> SegmentResult:
    """A class whose regions are ``masks`` (largest first), measured by the project's
    measurement function; region labels left to the writers (they label the parts)."""
    thickness = represented_thickness(series.stack.offsets[:, 0])
    areas = np.array(
        [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
    )
    regions = [measure_region(m, series.frame_hu, areas, thickness) for m in masks]
    union = np.zeros(series.frame_hu.shape, dtype=bool)
    for mask in masks:
        union |= mask
    total = measure_region(union, series.frame_hu, areas, thickness) if masks else None
    return SegmentResult(segment, union, regions, total)


@pytest.fixture(scope="module")
def series() -> LoadedSeries:
    """A generated 5 mm head CT, 20 slices of 128 x 128."""
    return load_datasets(synthetic_head_ct(3, n_slices=20, rows=128))


@pytest.fixture(scope="module")
def masks(series: LoadedSeries) -> dict[str, NDArray[np.bool_]]:
    """The spheres of ``SPHERES`` on the frames."""
    points = frame_points(series)
    centre = np.array([0.0, 5.0, 80.0])  # pipelines.synthetic.HEAD_CENTRE_MM
    return {
        name: np.linalg.norm(points - (centre + np.array(offset)), axis=-1) < radius
        for name, (offset, radius) in SPHERES.items()
    }


@pytest.fixture(scope="module")
def result(series: LoadedSeries, masks: dict[str, NDArray[np.bool_]]) -> PipelineResult:
    """Two haemorrhages (right, left), one calcification, no contrast staining, a risk
    on the first haemorrhage and one heat map."""
    segments = [
        segment_of(series, HAEMORRHAGE, [masks["haemorrhage 1"], masks["haemorrhage 2"]]),
        segment_of(series, CALCIFICATION, [masks["calcification"]]),
        segment_of(series, STAINING, []),
    ]
    total = segments[0].total
    assert total is not None
    heat = np.zeros(series.frame_hu.shape[1:], dtype=np.float32)
    heat[40:60, 40:60] = 1.0
    return PipelineResult(
        Algorithm(
            name="dicomnode test segmenter",
            version="1.0.0",
            kind="learned segmenter",
            provenance=f"spheres placed by the test; {NOTICE}",
        ),
        segments,
        key_frame=total.key_frame,
        risk=RISK,
        heatmaps=[HeatMap(total.key_frame, heat, "Grad-CAM \u2014 positive class")],
    )


@pytest.fixture(scope="module")
def written(
    series: LoadedSeries, result: PipelineResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """SEG, SC, SR and the saliency SC, saved as files."""
    folder = tmp_path_factory.mktemp("readers")
    outputs = build_outputs(series, result, pipeline_name="test", content_datetime=WHEN)
    paths = {}
    for name, ds in zip(("seg", "sc", "sr", "saliency"), outputs, strict=True):
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def dcmqi_sr(written: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """What dcmqi's ``tid1500reader`` returns for the SR (its JSON)."""
    out = tmp_path_factory.mktemp("tid1500") / "sr.json"
    subprocess.run(
        [
            dcmqi_tool("tid1500reader"),
            "--inputDICOM",
            str(written["sr"]),
            "--outputMetadata",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return json.loads(out.read_text())


def code(item: dict[str, str]) -> tuple[str, str]:
    """(scheme, value) of a dcmqi JSON code."""
    return item["CodingSchemeDesignator"], item["CodeValue"]


def measurement(group: dict[str, Any], meaning: str, derivation: str = "") -> dict[str, Any]:
    """The one measurement item of ``group`` named ``meaning`` (with ``derivation``)."""
    found = [
        m
        for m in group["measurementItems"]
        if m["quantity"]["CodeMeaning"] == meaning
        and m.get("derivationModifier", {}).get("CodeMeaning", "") == derivation
    ]
    assert len(found) == 1, (meaning, derivation, group["TrackingIdentifier"])
    return found[0]


@pytest.mark.parametrize("name", ["seg", "sc", "sr", "saliency"])
def test_dciodvfy_reports_no_errors(written: dict[str, Path], name: str) -> None:
    assert dciodvfy_errors(written[name]) == []


def test_dcmqi_reads_one_group_per_region_with_its_own_segment(
    dcmqi_sr: Any, written: dict[str, Path], result: PipelineResult
) -> None:
    seg = pydicom.dcmread(written["seg"], stop_before_pixels=True)
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    groups = {g["TrackingIdentifier"]: g for g in dcmqi_sr["Measurements"]}
    assert list(groups) == [
        "Haemorrhage 1",
        "Haemorrhage 2",
        "Haemorrhage total",
        "Calcification 1",
        "Contrast staining",
    ]
    with_segment = [g for g in groups.values() if "ReferencedSegment" in g]
    assert [g["ReferencedSegment"] for g in with_segment] == [1, 2, 3, 4]
    assert len({g["TrackingUniqueIdentifier"] for g in groups.values()}) == 5
    for group in with_segment:
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        segment = segments[group["ReferencedSegment"]]
        assert segment.SegmentLabel == group["TrackingIdentifier"]
        assert segment.TrackingUID == group["TrackingUniqueIdentifier"]
    assert "ReferencedSegment" not in groups["Haemorrhage total"]

    haemorrhage, calcification = groups["Haemorrhage 1"], groups["Calcification 1"]
    assert code(haemorrhage["Finding"]) == ("SCT", "50960005")
    assert code(groups["Haemorrhage 2"]["Finding"]) == ("SCT", "50960005")
    assert code(calcification["Finding"]) == ("SCT", "18115005")
    assert code(groups["Contrast staining"]["Finding"]) == ("DCM", "111428")
    for group in with_segment:
        assert code(group["FindingSite"]) == ("SCT", "128319008")
    assert code(haemorrhage["Laterality"]) == ("SCT", "24028007")  # right
    assert code(groups["Haemorrhage 2"]["Laterality"]) == ("SCT", "7771000")  # left
    assert "Laterality" not in calcification  # on the midline

    region = result.segments[0].regions[0]
    volume = measurement(haemorrhage, "Volume")
    assert float(volume["value"]) == pytest.approx(region.volume_ml, abs=1e-3)
    assert code(volume["units"]) == ("UCUM", "ml")
    mean = measurement(haemorrhage, "Attenuation Coefficient", "Mean")
    assert float(mean["value"]) == pytest.approx(region.hu_mean, abs=1e-3)
    assert code(mean["units"]) == ("UCUM", "[hnsf'U]")
    hu_max = measurement(haemorrhage, "Attenuation Coefficient", "Maximum")
    assert float(hu_max["value"]) == pytest.approx(region.hu_max, abs=1e-3)
    total = result.segments[0].total
    assert total is not None
    assert float(measurement(groups["Haemorrhage total"], "Volume")["value"]) == pytest.approx(
        total.volume_ml, abs=1e-3
    )
    assert float(measurement(groups["Contrast staining"], "Volume")["value"]) == 0.0


def test_dcmqi_reads_the_risk_as_a_coded_measurement(dcmqi_sr: Any) -> None:
    groups = {g["TrackingIdentifier"]: g for g in dcmqi_sr["Measurements"]}
    scored = groups["Haemorrhage 1"]
    probability = measurement(scored, "Probability")
    assert float(probability["value"]) == pytest.approx(73.4)
    assert code(probability["units"]) == ("UCUM", "%")
    cutoff = measurement(scored, "Threshold Value")
    assert float(cutoff["value"]) == pytest.approx(42.0)
    for item in (probability, cutoff):
        model = item["measurementAlgorithmIdentification"]
        assert model["AlgorithmName"] == "ht_after_mt combined"
        assert model["AlgorithmVersion"] == "2.1.0"
        assert model["AlgorithmParameters"] == ["trained on synthetic data - not for clinical use"]
        outcomes = [
            m["modifierValue"]
            for m in item["measurementModifiers"]
            if m["modifier"]["CodeMeaning"] == "Finding"
        ]
        assert [o["CodeMeaning"] for o in outcomes] == ["haemorrhagic transformation"]
    category = [
        e["conceptValue"]
        for e in scored["qualitativeEvaluations"]
        if e["conceptCode"]["CodeMeaning"] == "Lesion Risk"
    ]
    assert [code(c) for c in category] == [("SCT", "15508007")]  # High risk
    for name, group in groups.items():
        if name != "Haemorrhage 1":
            quantities = {m["quantity"]["CodeMeaning"] for m in group["measurementItems"]}
            assert not quantities & {"Probability", "Threshold Value"}, name


def test_segimage2itkimage_reads_one_segment_per_region_with_its_colour(
    written: dict[str, Path], result: PipelineResult, tmp_path: Path
) -> None:
    subprocess.run(
        [
            dcmqi_tool("segimage2itkimage"),
            "--inputDICOM",
            str(written["seg"]),
            "--outputDirectory",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    attributes = [a for group in meta["segmentAttributes"] for a in group]
    labels = [a["SegmentLabel"] for a in attributes]
    assert labels == ["Haemorrhage 1", "Haemorrhage 2", "Calcification 1", "Contrast staining"]
    colours = [tuple(a["recommendedDisplayRGBValue"]) for a in attributes]
    assert colours[0] == colours[1]  # one class, one colour
    assert colours[0][0] > 200 > colours[0][2]  # haemorrhage: red
    assert colours[2][0] > 200 and colours[2][2] > 200  # calcification: white
    counts = []
    for number in range(1, len(meta["segmentAttributes"]) + 1):
        image = sitk.ReadImage(str(tmp_path / f"{number}.nrrd"))
        counts.append(int(np.count_nonzero(sitk.GetArrayFromImage(image))))
    planned = segment_plan(result)
    assert counts == [int(p.mask.sum()) for p in planned]
    assert counts[0] > counts[1] > counts[2] > 0 == counts[3]


def test_every_text_is_ascii_and_the_notice_keeps_its_dash(written: dict[str, Path]) -> None:
    for name, path in written.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "SpecificCharacterSet" not in ds or ds.SpecificCharacterSet in (
            "ISO_IR 100",
            "ISO_IR 192",
        ), name
        strings = [
            str(element.value)
            for element in ds.iterall()
            if element.VR in ("LO", "LT", "ST", "UT", "SH", "PN") and element.VM == 1
        ]
        assert all(s.isascii() and "?" not in s for s in strings), name
    sr = pydicom.dcmread(written["sr"])
    texts = [
        str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence
    ]  # fmt: skip
    assert "Model: ht_after_mt combined 2.1.0 - trained on synthetic data - not for " in (
        " ".join(texts)
    )
    assert "Scored region: Haemorrhage 1 (" in " ".join(texts)
    assert "mL): the largest haemorrhage" in " ".join(texts)


def test_plain_transliterates_instead_of_question_marks() -> None:
    assert plain(NOTICE) == "trained on synthetic data - not for clinical use"
    assert plain("HU \u2265 55, 5 \u00b5L, M\u00fcller \u00d7 2") == "HU >= 55, 5 uL, Muller x 2"
    assert plain("\u4e2d") == "?"


def test_region_labels_come_from_the_pipeline_or_from_the_connected_parts(
    series: LoadedSeries, result: PipelineResult
) -> None:
    haemorrhage = result.segments[0]
    found = region_label_array(haemorrhage)
    assert found.max() == 2
    assert (found == 1).sum() > (found == 2).sum() > 0
    swapped = np.where(found == 1, 2, np.where(found == 2, 1, 0)).astype(np.int32)
    given = SegmentResult(
        haemorrhage.segment,
        haemorrhage.frame_mask,
        haemorrhage.regions,
        haemorrhage.total,
        region_labels=swapped,
    )
    np.testing.assert_array_equal(region_label_array(given), swapped)
    with pytest.raises(ValueError, match="region labels"):
        region_label_array(
            SegmentResult(
                haemorrhage.segment,
                haemorrhage.frame_mask,
                haemorrhage.regions,
                haemorrhage.total,
                region_labels=swapped[:-1],
            )
        )


def test_scored_region_defaults_to_the_largest_and_is_checked(result: PipelineResult) -> None:
    assert scored_region(result) == (0, 0)
    assert scored_region(replace(result, risk=replace(RISK, scored_region=(1, 0)))) == (1, 0)
    assert scored_region(replace(result, risk=None)) is None
    with pytest.raises(ValueError, match="region 3 of segment 0"):
        scored_region(replace(result, risk=replace(RISK, scored_region=(0, 3))))


def test_the_risk_follows_the_scored_region(series: LoadedSeries, result: PipelineResult) -> None:
    moved = replace(result, risk=replace(RISK, scored_region=(0, 1)), heatmaps=())
    sr = build_outputs(series, moved, pipeline_name="test", content_datetime=WHEN)[2]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = {str(g.tracking_identifier): g for g in report.get_volumetric_roi_measurement_groups()}
    probability = CodedConcept.from_code(codes.DCM.Probability)
    assert not groups["Haemorrhage 1"].get_measurements(name=probability)
    (found,) = groups["Haemorrhage 2"].get_measurements(name=probability)
    assert found.value == pytest.approx(73.4)
    assert groups["Haemorrhage 2"].referenced_segment is not None
    assert groups["Haemorrhage 2"].referenced_segment.referenced_segment_numbers == [2]


def test_measured_segments_carry_their_region_labels(series: LoadedSeries) -> None:
    """``measure_segment`` labels the frames with its own regions, which the SEG uses."""
    grid = np.zeros(series.volume.hu.shape, dtype=np.int32)
    middle = int(series.volume.hu.shape[0]) // 2
    grid[middle - 2 : middle + 2, 40:60, 30:50] = 1  # larger: region 1
    grid[middle - 1 : middle + 1, 70:80, 80:90] = 2
    measured = measure_segment(series, HAEMORRHAGE, grid, 2)
    assert measured.region_labels is not None
    assert len(measured.regions) == 2
    labels = region_label_array(measured)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels > 0, measured.frame_mask)
    for k, region in enumerate(measured.regions, start=1):
        assert int(np.argmax((labels == k).sum(axis=(1, 2)))) == region.key_frame


def test_a_risk_without_any_region_is_stated_in_text_only(
    series: LoadedSeries, result: PipelineResult
) -> None:
    empty = replace(result, segments=[segment_of(series, STAINING, [])], heatmaps=())
    sr = build_outputs(series, empty, pipeline_name="test", content_datetime=WHEN)[2]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert [m.value for m in group.get_measurements()] == [0.0]
    assert not group.get_qualitative_evaluations(name=codes.DCM.LesionRisk)
    texts = " ".join(str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence)
    assert "Risk of haemorrhagic transformation: 73%" in texts
    assert "Scored region" not in texts
