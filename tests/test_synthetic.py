"""Synthetic head CT: determinism, headers, HU ranges, tilt geometry, lesion insertion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pipelines.geometry import represented_thickness
from pipelines.lesions import insert_lesion
from pipelines.synthetic import HEAD_CENTRE_MM, synthetic_head_ct, write_series
from pipelines.volume import load_datasets


def sphere_ml(radius_mm: float) -> float:
    """Volume of a sphere in mL."""
    return 4.0 / 3.0 * math.pi * radius_mm**3 / 1000.0


def hu_of(ds: Dataset) -> np.ndarray:
    """Rescaled pixel values."""
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def patch(datasets: list[Dataset], offset_mm: tuple[float, float, float], half: int) -> np.ndarray:
    """HU of a (2 half + 1)^2 patch of an untilted series at a head-centred offset."""
    point = HEAD_CENTRE_MM + np.asarray(offset_mm)
    k = int(np.argmin([abs(float(ds.ImagePositionPatient[2]) - point[2]) for ds in datasets]))
    ds = datasets[k]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    r = round((point[1] - float(ds.ImagePositionPatient[1])) / dy)
    c = round((point[0] - float(ds.ImagePositionPatient[0])) / dx)
    return hu_of(ds)[r - half : r + half + 1, c - half : c + half + 1]


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    """A small untilted synthetic series."""
    return synthetic_head_ct(3, n_slices=24, rows=192)


def test_same_seed_same_series_other_seed_other_series(series: list[Dataset]) -> None:
    again = synthetic_head_ct(3, n_slices=24, rows=192)
    other = synthetic_head_ct(4, n_slices=24, rows=192)
    assert [ds.PixelData for ds in again] == [ds.PixelData for ds in series]
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in series]
    assert again[0].StudyInstanceUID == series[0].StudyInstanceUID
    assert other[0].StudyInstanceUID != series[0].StudyInstanceUID
    assert other[0].PatientID != series[0].PatientID
    assert other[0].PixelData != series[0].PixelData
    tilted = synthetic_head_ct(3, n_slices=24, rows=192, gantry_tilt_deg=10.0)
    assert tilted[0].StudyInstanceUID == series[0].StudyInstanceUID
    assert tilted[0].SeriesInstanceUID != series[0].SeriesInstanceUID


def test_headers_are_a_ct_head_series(series: list[Dataset], tmp_path: Path) -> None:
    ds = series[0]
    assert ds.SOPClassUID == CTImageStorage
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "HEAD"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 0)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert 0.5 <= float(ds.PixelSpacing[0]) <= 1.25
    for keyword in ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "KVP"):
        assert ds.get(keyword)
    assert len({d.SOPInstanceUID for d in series}) == len(series)
    assert len({d.SeriesInstanceUID for d in series}) == 1
    paths = write_series(series, tmp_path / "series")
    read = pydicom.dcmread(paths[5])
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.MediaStorageSOPInstanceUID == series[5].SOPInstanceUID
    assert np.array_equal(read.pixel_array, series[5].pixel_array)


def test_hu_ranges_of_the_tissues(series: list[Dataset]) -> None:
    white = patch(series, (35.0, -45.0, 25.0), 5)
    assert 25.0 <= white.mean() <= 32.0
    assert 3.5 <= white.std() <= 7.0  # noise
    assert 35.0 <= patch(series, (24.0, 2.0, 2.0), 2).mean() <= 45.0  # deep grey nucleus
    assert 0.0 <= patch(series, (9.0, -2.0, 16.0), 1).mean() <= 12.0  # lateral ventricle
    assert abs(patch(series, (0.0, -99.5, 0.0), 0).mean() - 40.0) < 20.0  # scalp
    middle = hu_of(series[len(series) // 2])
    assert 700.0 <= middle.max() <= 1500.0  # cortical bone
    assert abs(middle[:8, :8].mean() + 1000.0) < 5.0  # air


def test_tilted_series_geometry() -> None:
    tilt, thickness = 15.0, 5.0
    datasets = synthetic_head_ct(1, n_slices=8, rows=128, gantry_tilt_deg=tilt)
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    angle = math.radians(tilt)
    assert np.allclose(iop, [1, 0, 0, 0, math.cos(angle), -math.sin(angle)], atol=1e-6)
    assert float(datasets[0].GantryDetectorTilt) == tilt
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps[:, :2], 0.0, atol=1e-5)  # positions step along z only
    assert np.allclose(steps[:, 2], thickness / math.cos(angle), atol=1e-5)
    normal = np.cross(iop[:3], iop[3:])
    assert np.allclose(steps @ normal, thickness, atol=1e-5)
    assert load_datasets(datasets).gantry_tilt_deg == pytest.approx(tilt, abs=0.01)


def test_represented_thickness_uses_half_gaps() -> None:
    depths = np.array([9.0, 0.0, 4.0, 16.0, 8.0])  # any order
    assert represented_thickness(depths) == pytest.approx([4.0, 4.0, 4.0, 7.0, 2.5])
    assert represented_thickness(np.array([3.0])) == pytest.approx([0.0])


def test_spherical_lesion_volume_and_values() -> None:
    datasets = synthetic_head_ct(5, n_slices=24, rows=192)
    before = [hu_of(ds) for ds in datasets]
    x, y, z = HEAD_CENTRE_MM + np.array([35.0, -40.0, 20.0])
    centre = (float(x), float(y), float(z))
    lesion = insert_lesion(
        datasets, center_mm=centre, radius_mm=14.0, hu=70.0, seed=1, irregular=False
    )
    assert lesion.volume_ml == pytest.approx(sphere_ml(14.0), rel=0.08)
    after = [hu_of(ds) for ds in datasets]
    inside = np.concatenate([a[m] for a, m in zip(after, lesion.masks, strict=True)])
    assert abs(inside.mean() - 70.0) < 1.0
    assert 1.0 < inside.std() < 6.0  # heterogeneity
    for b, a, m in zip(before, after, lesion.masks, strict=True):
        assert np.array_equal(a[~m], b[~m])


def test_irregular_lesion_is_deterministic_and_sphere_sized() -> None:
    volumes = []
    for _ in range(2):
        datasets = synthetic_head_ct(5, n_slices=24, rows=192)
        lesion = insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=65.0, seed=8)
        volumes.append(lesion.volume_ml)
    assert volumes[0] == volumes[1]
    assert volumes[0] == pytest.approx(sphere_ml(12.0), rel=0.35)


def test_lesion_spares_bone_and_follows_patient_coordinates_when_tilted() -> None:
    datasets = synthetic_head_ct(2, n_slices=16, rows=128, gantry_tilt_deg=20.0)
    bone_before = [hu_of(ds) > 300 for ds in datasets]
    centre = HEAD_CENTRE_MM + np.array([60.0, 0.0, 0.0])  # reaches into the skull
    lesion = insert_lesion(
        datasets, center_mm=tuple(centre), radius_mm=15.0, hu=80.0, seed=2, irregular=False
    )
    assert lesion.masks.any()
    for ds, bone, mask in zip(datasets, bone_before, lesion.masks, strict=True):
        assert not (mask & bone).any()
        assert np.array_equal(hu_of(ds) > 300, bone)
        origin = np.asarray(ds.ImagePositionPatient, dtype=float)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        r, c = np.nonzero(mask)
        spacing = float(ds.PixelSpacing[0])
        points = origin + np.outer(r * spacing, iop[3:]) + np.outer(c * spacing, iop[:3])
        assert np.all(np.linalg.norm(points - centre, axis=1) <= 15.0 + 1e-6)


@pytest.mark.shared
def test_lesion_in_real_signed_ge_series(ge_headct_dir: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted(ge_headct_dir.glob("*.dcm"))]
    before = [ds.pixel_array.copy() for ds in datasets]
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=16.0, hu=70.0, seed=4)
    assert 0.65 * sphere_ml(16.0) <= lesion.volume_ml <= 1.35 * sphere_ml(16.0)
    changed = 0
    for ds, old, mask in zip(datasets, before, lesion.masks, strict=True):
        new = ds.pixel_array
        assert new.dtype == np.int16
        assert np.array_equal(new[~mask], old[~mask])
        if mask.any():
            changed += 1
            assert abs(float(new[mask].mean()) - 70.0) < 2.0
    assert changed >= 3
