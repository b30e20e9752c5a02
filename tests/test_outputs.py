"""Output writers on the real gantry-tilted GE head CT: SEG, SC and SR are valid
(dciodvfy), read back with highdicom, and get the same UIDs for the same input."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import (
    Algorithm,
    HeatMap,
    PipelineResult,
    RegionMeasurements,
    RiskPrediction,
    SegmentClass,
    SegmentResult,
)
from pipelines.outputs import build_outputs, derive_uid
from pipelines.outputs.common import ds_value
from pipelines.series import LoadedSeries
from pipelines.volume import load_datasets, load_series, read_datasets
from tests.dciodvfy import dciodvfy_errors

pytestmark = [pytest.mark.shared, pytest.mark.filterwarnings("ignore:The string")]

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
PIPELINE = "dicomnode-hyperdense"
HYPERDENSE = SegmentClass(
    label="Hyperdense region",
    category=CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
    property_type=CodedConcept.from_code(codes.SCT.Hemorrhage),
)


def algorithm(version: str = "1.0.0") -> Algorithm:
    """The threshold baseline's identity, at ``version``."""
    return Algorithm(
        name="dicomnode hyperdense threshold baseline",
        version=version,
        kind="threshold baseline",
        provenance="fixed HU thresholds from the literature; no training data",
    )


@pytest.fixture(scope="module")
def series(ge_headct_dir: Path) -> LoadedSeries:
    """The GE series as the project's loader gives it (28 tilted frames)."""
    return load_series(sorted(ge_headct_dir.glob("*.dcm")))


def frame_points(series: LoadedSeries) -> NDArray[np.float64]:
    """Patient coordinates (mm) of every frame pixel, shape (frames, rows, columns, 3)."""
    n, rows, cols = series.frame_hu.shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    index = np.stack([np.zeros_like(rr), rr, cc, np.ones_like(rr)]).reshape(4, -1)
    return np.stack(
        [(series.frame_affines[f] @ index)[:3].T.reshape(rows, cols, 3) for f in range(n)]
    )


def region(series: LoadedSeries, mask: NDArray[np.bool_], volume_ml: float) -> RegionMeasurements:
    """Measurements of ``mask`` made by hand (volume given analytically)."""
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    pixel_mm2 = float(np.prod(np.linalg.norm(series.frame_affines[key][:3, 1:3], axis=0)))
    hu = series.frame_hu[mask]
    return RegionMeasurements(
        volume_ml=volume_ml,
        hu_max=float(hu.max()),
        hu_mean=float(hu.mean()),
        key_frame=key,
        key_area_mm2=float(areas[key]) * pixel_mm2,
    )


def sphere_result(series: LoadedSeries, version: str = "1.0.0") -> PipelineResult:
    """Two spheres (radius 12 and 8 mm, ~7.2 and ~2.1 mL) in the brain, one segment."""
    points = frame_points(series)
    masks = []
    regions = []
    for frame, row, col, radius in ((14, 300, 300, 12.0), (15, 250, 200, 8.0)):
        centre = (series.frame_affines[frame] @ np.array([0.0, row, col, 1.0]))[:3]
        mask = np.linalg.norm(points - centre, axis=-1) < radius
        masks.append(mask)
        regions.append(region(series, mask, 4.0 / 3.0 * np.pi * radius**3 / 1000.0))
    union = masks[0] | masks[1]
    total = region(series, union, regions[0].volume_ml + regions[1].volume_ml)
    segment = SegmentResult(HYPERDENSE, union, regions, total)
    return PipelineResult(algorithm(version), [segment], key_frame=total.key_frame)


def empty_result(series: LoadedSeries) -> PipelineResult:
    """One segment with nothing in it."""
    mask = np.zeros(series.frame_hu.shape, dtype=bool)
    return PipelineResult(algorithm(), [SegmentResult(HYPERDENSE, mask, [], None)], key_frame=14)


def text_values(item: pydicom.Dataset) -> list[str]:
    """Every TEXT content item's value anywhere in an SR content tree."""
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += text_values(child)
    return found


@pytest.fixture(scope="module")
def result(series: LoadedSeries) -> PipelineResult:
    """The two-sphere result."""
    return sphere_result(series)


@pytest.fixture(scope="module")
def written(
    series: LoadedSeries, result: PipelineResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """SEG, SC and SR of the two-sphere result, saved as files."""
    folder = tmp_path_factory.mktemp("outputs")
    outputs = build_outputs(series, result, pipeline_name=PIPELINE, content_datetime=WHEN)
    paths = {}
    for name, ds in zip(("seg", "sc", "sr"), outputs, strict=True):
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("name", ["seg", "sc", "sr"])
def test_dciodvfy_reports_no_errors(written: dict[str, Path], name: str) -> None:
    assert dciodvfy_errors(written[name]) == []


def test_outputs_are_new_series_in_the_source_study(
    series: LoadedSeries, written: dict[str, Path]
) -> None:
    datasets = [pydicom.dcmread(written[n]) for n in ("seg", "sc", "sr")]
    source = series.reference
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 3
    assert [int(ds.SeriesNumber) for ds in datasets] == [901, 902, 903]
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.StudyDescription == source.StudyDescription
        assert ds.Manufacturer == "dicomnode"
        assert ds.ManufacturerModelName == PIPELINE
        assert ds.SoftwareVersions == "1.0.0"
        assert ds.ContentDate == "20240506"
        assert ds.SeriesDescription.endswith("(baseline)")


def test_seg_frames_lie_on_the_source_planes_and_mask_round_trips(
    series: LoadedSeries, result: PipelineResult, written: dict[str, Path]
) -> None:
    seg = hd.seg.segread(written["seg"])
    assert seg.SegmentationType == "BINARY"
    # One segment per region (two spheres), every source frame kept for each.
    assert int(seg.NumberOfFrames) == 2 * len(series.datasets)
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    for item in seg.PerFrameFunctionalGroupsSequence:
        source_uid = item.DerivationImageSequence[0].SourceImageSequence[0]
        source = by_uid[source_uid.ReferencedSOPInstanceUID]
        position = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(v) for v in position], [float(v) for v in source.ImagePositionPatient]
        )
        np.testing.assert_allclose(
            [float(v) for v in orientation.ImageOrientationPatient],
            [float(v) for v in source.ImageOrientationPatient],
        )
    pixels = seg.get_pixels_by_source_instance(
        [f.sop_instance_uid for f in series.frames], segment_numbers=[1, 2]
    ).astype(bool)
    np.testing.assert_array_equal(pixels[..., 0] | pixels[..., 1], result.segments[0].frame_mask)
    assert not (pixels[..., 0] & pixels[..., 1]).any()
    assert pixels[..., 0].sum() > pixels[..., 1].sum() > 0  # region 1 is the larger sphere
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == [
        "Hyperdense region 1",
        "Hyperdense region 2",
    ]
    description = seg.get_segment_description(1)
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    identification = description.algorithm_identification
    assert identification is not None
    assert identification[0].AlgorithmVersion == "1.0.0"


def test_sr_holds_the_measurements_notice_and_references(
    result: PipelineResult, written: dict[str, Path]
) -> None:
    sr = hd.sr.srread(written["sr"])
    seg = pydicom.dcmread(written["seg"], stop_before_pixels=True)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [
        "Hyperdense region 1",
        "Hyperdense region 2",
    ]
    (total_group,) = report.get_image_measurement_groups()
    assert str(total_group.tracking_identifier) == "Hyperdense region total"
    total = result.segments[0].total
    assert total is not None
    volume = total_group.get_measurements(name=codes.SCT.Volume)[0]
    assert volume.value == pytest.approx(ds_value(total.volume_ml))
    assert volume.unit == CodedConcept("ml", "UCUM", "milliliter")
    for number, group in enumerate(groups, start=1):
        assert group.referenced_segment is not None
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.referenced_segment.referenced_segment_numbers == [number]
        region_volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert region_volume.value == pytest.approx(
            ds_value(result.segments[0].regions[number - 1].volume_ml)
        )
    text = text_values(sr)
    assert "NOT FOR DIAGNOSTIC USE" in text
    assert any("threshold baseline" in line for line in text)
    assert sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_sc_shows_the_overlay_on_the_key_frame(
    series: LoadedSeries, result: PipelineResult, written: dict[str, Path]
) -> None:
    sc = pydicom.dcmread(written["sc"])
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.BurnedInAnnotation == "YES"
    key = series.frames[result.key_frame]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == key.sop_instance_uid
    rows = series.frame_hu.shape[1]
    pixels = sc.pixel_array
    assert pixels.shape[0] > rows  # text panel below the image
    inside = pixels[:rows][result.segments[0].frame_mask[result.key_frame]].astype(int)
    assert np.all(inside[:, 0] > inside[:, 2])  # tinted red


def test_same_input_same_uids_new_version_new_uids(series: LoadedSeries) -> None:
    def uids(version: str) -> list[tuple[str, str]]:
        outputs = build_outputs(series, sphere_result(series, version), pipeline_name=PIPELINE)
        return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in outputs]

    first, again, other = uids("1.0.0"), uids("1.0.0"), uids("1.1.0")
    assert first == again
    assert not {u for pair in first for u in pair} & {u for pair in other for u in pair}


def test_empty_mask_gives_valid_objects(series: LoadedSeries, tmp_path: Path) -> None:
    result = empty_result(series)
    outputs = build_outputs(series, result, pipeline_name=PIPELINE)
    for name, ds in zip(("seg", "sc", "sr"), outputs, strict=True):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert int(seg.NumberOfFrames) == len(series.datasets)
    pixels = seg.get_pixels_by_source_instance([f.sop_instance_uid for f in series.frames])
    assert not pixels.any()
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert [m.value for m in group.get_measurements()] == [0.0]
    assert "Hyperdense region: none found" in text_values(sr)


def test_enhanced_multiframe_source(ge_headct_dir: Path, tmp_path: Path) -> None:
    """The GE series as one legacy-converted enhanced CT (pixel measures per frame)."""
    singles = read_datasets(sorted(ge_headct_dir.glob("*.dcm")))
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles,
        series_instance_uid=hd.UID(),
        series_number=5,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    converted.save_as(tmp_path / "enhanced.dcm")
    enhanced = load_datasets([pydicom.dcmread(tmp_path / "enhanced.dcm")])
    result = sphere_result(enhanced)
    outputs = build_outputs(enhanced, result, pipeline_name=PIPELINE)
    for name, ds in zip(("seg", "sc", "sr"), outputs, strict=True):
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg.get_pixels_by_source_frame(
        converted.SOPInstanceUID,
        [int(f.frame_number or 0) for f in enhanced.frames],
        segment_numbers=[1, 2],
    ).astype(bool)
    np.testing.assert_array_equal(pixels[..., 0] | pixels[..., 1], result.segments[0].frame_mask)


def test_derive_uid_is_a_pure_function_of_its_parts() -> None:
    uid = derive_uid("1.2.3", "pipeline", "1.0.0", "seg")
    assert uid == derive_uid("1.2.3", "pipeline", "1.0.0", "seg")
    assert uid != derive_uid("1.2.3", "pipeline", "1.0.0", "sr")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


def test_risk_goes_into_the_sr_and_heat_maps_into_saliency_captures(
    series: LoadedSeries, result: PipelineResult, tmp_path: Path
) -> None:
    heat = np.zeros(series.frame_hu.shape[1:], dtype=np.float32)
    heat[280:320, 280:320] = 1.0
    risk = RiskPrediction(
        outcome="haemorrhagic transformation",
        probability=0.734,
        cutoff=0.42,
        model_name="ht_after_mt combined",
        model_version="1.0.0",
        notice="trained on synthetic data \u2014 not for clinical use",
        imputed=("NIHSS", "ASPECTS"),
    )
    maps = [HeatMap(14, heat, "Grad-CAM, frame 15"), HeatMap(15, heat, "Grad-CAM, frame 16")]
    with_risk = replace(result, risk=risk, heatmaps=maps)
    outputs = build_outputs(series, with_risk, pipeline_name=PIPELINE, content_datetime=WHEN)
    assert len(outputs) == 5
    paths = []
    for number, ds in enumerate(outputs):
        paths.append(tmp_path / f"{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        assert dciodvfy_errors(paths[-1]) == [], number
    sr = hd.sr.srread(paths[2])
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    scored = sr.content.get_volumetric_roi_measurement_groups()[0]  # the largest region
    (probability,) = scored.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(73.4)
    (cutoff,) = scored.get_measurements(name=codes.DCM.ThresholdValue)
    assert cutoff.value == pytest.approx(42.0)
    (category,) = scored.get_qualitative_evaluations(name=codes.DCM.LesionRisk)
    assert category.value == codes.SCT.HighRisk
    text = " ".join(text_values(sr))
    assert "Risk of haemorrhagic transformation: 73%" in text
    assert "trained on synthetic data - not for clinical use" in text
    assert "NIHSS, ASPECTS" in text
    saliency = [pydicom.dcmread(p) for p in paths[3:]]
    assert saliency[0].SeriesInstanceUID == saliency[1].SeriesInstanceUID
    assert saliency[0].SeriesInstanceUID != outputs[1].SeriesInstanceUID
    assert [ds.InstanceNumber for ds in saliency] == [1, 2]
    assert saliency[0].SourceImageSequence[0].ReferencedSOPInstanceUID == (
        series.frames[14].sop_instance_uid
    )
    pixels = saliency[0].pixel_array
    assert pixels[300, 300, 0] > pixels[300, 300, 2]  # hot: red over blue
    assert pixels[50, 50, 0] == pixels[50, 50, 2]  # no heat: grey
