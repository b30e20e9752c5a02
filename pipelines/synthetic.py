"""Seeded synthetic head CT series and lesion insertion, for tests and demonstrations.

``synthetic_head_ct`` draws an ellipsoidal head (scalp, skull with diploe, CSF, cortex
with sulci, white matter, deep grey nuclei, ventricles) on each slice plane in patient
coordinates, so a gantry tilt only changes the planes. ``insert_lesion`` paints a blob
defined in patient coordinates into any series, synthetic or real, and reports its mask
and volume on the series' own frames.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from pipelines.brain import brain_mask
from pipelines.geometry import represented_thickness

BRAIN_SEMI_AXES_MM = np.array([70.0, 90.0, 65.0])  # inner skull: 140 x 180 x 130 mm (x, y, z)
HEAD_CENTRE_MM = np.array([0.0, 5.0, 80.0])  # LPS
FIELD_OF_VIEW_MM = 230.0
RESCALE_INTERCEPT = -1024.0
BITS_STORED = 12
BRAIN_LIKE_HU = (-5.0, 90.0)  # voxels a lesion may replace
HETEROGENEITY_HU = 3.0  # standard deviation of the lesion's voxel-wise HU variation
CENTRE_MARGIN_MM = 4.0  # clearance between a lesion chosen by seed and the brain's edge


@dataclass(frozen=True)
class InsertedLesion:
    """Where a lesion was painted: per-dataset masks (input order) and its volume."""

    masks: NDArray[np.bool_]  # (n_datasets, rows, columns)
    volume_ml: float
    center_mm: tuple[float, float, float]  # LPS
    radius_mm: float
    hu: float


def _inside(p: NDArray[np.float64], axes: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Points (N, 3) inside the axis-aligned ellipsoid with semi-axes ``axes``."""
    return np.asarray(np.sum((p / axes) ** 2, axis=-1) <= 1.0)


def _anatomy_hu(p: NDArray[np.float64]) -> NDArray[np.float64]:
    """Noise-free HU at head-centred points (N, 3) in mm."""
    a = BRAIN_SEMI_AXES_MM
    hu = np.full(len(p), -1000.0)
    head = np.nonzero(_inside(p, a + 12.0))[0]
    q = p[head]
    layers = np.full(len(q), 40.0)  # scalp and soft tissue
    layers[_inside(q, a + 7.0)] = 1350.0  # outer table
    layers[_inside(q, a + 5.5)] = 650.0  # diploe
    layers[_inside(q, a + 2.5)] = 1350.0  # inner table
    layers[_inside(q, a + 1.0)] = 6.0  # subarachnoid CSF
    brain = _inside(q, a)
    layers[brain] = _brain_hu(q[brain])
    hu[head] = layers
    return hu


def _brain_hu(p: NDArray[np.float64]) -> NDArray[np.float64]:
    """Noise-free HU at head-centred points (N, 3) inside the brain."""
    a = BRAIN_SEMI_AXES_MM
    hu = np.full(len(p), 40.0)  # cortex
    radius = np.linalg.norm(p, axis=-1) + 1e-9
    theta = np.arccos(np.clip(p[:, 2] / radius, -1.0, 1.0))
    phi = np.arctan2(p[:, 1], p[:, 0])
    sulci = ~_inside(p, a - 8.0) & (np.cos(9 * theta) * np.cos(11 * phi) > 0.75)
    hu[sulci] = 6.0
    hu[_inside(p, a - 4.0) & ~sulci] = 28.0  # white matter
    for side in (-1.0, 1.0):
        hu[_inside(p - [side * 24.0, 2.0, 2.0], np.array([8.0, 16.0, 12.0]))] = 38.0  # nuclei
        hu[_inside(p - [side * 9.0, -2.0, 16.0], np.array([5.0, 28.0, 9.0]))] = 5.0  # ventricles
    hu[_inside(p - [0.0, 4.0, 2.0], np.array([1.5, 12.0, 8.0]))] = 5.0  # third ventricle
    return hu


def _plane_points(
    origin: NDArray[np.float64],
    row_dir: NDArray[np.float64],
    col_dir: NDArray[np.float64],
    spacing: tuple[float, float],
    shape: tuple[int, int],
) -> NDArray[np.float64]:
    """LPS position (rows, cols, 3) of every pixel; spacing is (between rows, columns)."""
    r = np.arange(shape[0])[:, None, None] * spacing[0] * col_dir
    c = np.arange(shape[1])[None, :, None] * spacing[1] * row_dir
    return np.asarray(origin + r + c, dtype=np.float64)


def synthetic_head_ct(
    seed: int = 0,
    *,
    n_slices: int = 32,
    slice_thickness_mm: float = 5.0,
    rows: int = 256,
    gantry_tilt_deg: float = 0.0,
    noise_hu: float = 5.0,
) -> list[Dataset]:
    """A deterministic single-frame CT Image Storage head series, sorted inferior first.

    Square ``rows`` x ``rows`` images over a 230 mm field of view; the slices step
    ``slice_thickness_mm`` along their normal. A tilt rotates the planes about the x axis
    and steps the positions along z (by thickness / cos(tilt)), as a tilted gantry does.
    """
    rng = np.random.default_rng(seed)
    spacing = FIELD_OF_VIEW_MM / rows
    tilt = np.radians(gantry_tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    half = (rows - 1) / 2.0 * spacing
    step_z = slice_thickness_mm / np.cos(tilt)
    ids = _identifiers(seed, (n_slices, slice_thickness_mm, rows, gantry_tilt_deg, noise_hu))
    datasets = []
    for k in range(n_slices):
        centre = HEAD_CENTRE_MM + np.array([0.0, 0.0, (k - (n_slices - 1) / 2.0) * step_z])
        origin = centre - half * row_dir - half * col_dir
        hu = np.zeros((rows, rows))
        for offset in (-1.0 / 3.0, 0.0, 1.0 / 3.0):  # through-plane partial volume
            points = _plane_points(
                origin + offset * slice_thickness_mm * normal,
                row_dir,
                col_dir,
                (spacing, spacing),
                (rows, rows),
            )
            hu += _anatomy_hu(points.reshape(-1, 3) - HEAD_CENTRE_MM).reshape(rows, rows) / 3.0
        hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0.0, noise_hu, hu.shape)
        stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, 2**BITS_STORED - 1).astype("<u2")
        ds = _header(ids, k, seed)
        _set_geometry(ds, origin, row_dir, col_dir, spacing, slice_thickness_mm, gantry_tilt_deg)
        ds.SliceLocation = f"{centre[2]:.2f}"
        ds.Rows = ds.Columns = rows
        ds.PixelData = stored.tobytes()
        datasets.append(ds)
    return datasets


def _identifiers(seed: int, parameters: tuple[object, ...]) -> dict[str, str]:
    """Patient, study, frame-of-reference and series UIDs derived from the seed."""
    study = f"dicomnode-synthetic-{seed}"
    series = f"{study}-{parameters}"
    return {
        "study": generate_uid(entropy_srcs=[study, "study"]),
        "frame_of_reference": generate_uid(entropy_srcs=[series, "frame"]),
        "series": generate_uid(entropy_srcs=[series, "series"]),
        "entropy": series,
    }


def _header(ids: dict[str, str], index: int, seed: int) -> Dataset:
    """Patient, study, series, equipment and pixel modules of one synthetic slice."""
    uid = generate_uid(entropy_srcs=[ids["entropy"], str(index)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    day = (datetime.date(2024, 1, 1) + datetime.timedelta(days=seed % 366)).strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
    ds.StudyTime = ds.SeriesTime = "093000"
    ds.ContentTime = ds.AcquisitionTime = f"0930{index % 60:02d}"
    ds.AccessionNumber = f"SYN{seed:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = "Synthetic Head CT"
    ds.InstitutionName = "dicomnode synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST (SYNTHETIC)"
    ds.SeriesDescription = "Head axial (synthetic)"
    ds.PatientName = f"SYNTHETIC^HEAD{seed}"
    ds.PatientID = f"DN-SYN-{seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ids["study"]
    ds.SeriesInstanceUID = ids["series"]
    ds.FrameOfReferenceUID = ids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_geometry(
    ds: Dataset,
    origin: NDArray[np.float64],
    row_dir: NDArray[np.float64],
    col_dir: NDArray[np.float64],
    spacing: float,
    thickness: float,
    tilt_deg: float,
) -> None:
    """Image plane module attributes and the gantry tilt."""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
    ds.ImageOrientationPatient = [f"{v:.7f}" for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.SliceThickness = f"{thickness:g}"
    ds.GantryDetectorTilt = f"{tilt_deg:g}"


@dataclass(frozen=True)
class _Plane:
    """Geometry and HU of one dataset's frame."""

    origin: NDArray[np.float64]
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    spacing: tuple[float, float]
    hu: NDArray[np.float64]

    @property
    def normal(self) -> NDArray[np.float64]:
        """Unit normal, row direction x column direction."""
        return np.asarray(np.cross(self.row_dir, self.col_dir), dtype=np.float64)


def _plane(ds: Dataset) -> _Plane:
    """Read the plane geometry and rescaled HU of a single-frame image."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1))
    return _Plane(
        np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        orientation[:3],
        orientation[3:],
        (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        hu + float(ds.get("RescaleIntercept", 0)),
    )


def insert_lesion(
    datasets: Sequence[Dataset],
    *,
    center_mm: tuple[float, float, float] | None,
    radius_mm: float,
    hu: float,
    seed: int,
    irregular: bool = True,
) -> InsertedLesion:
    """Paint a lesion of ``hu`` into the datasets' pixel data, in place.

    The blob is a sphere of ``radius_mm`` about ``center_mm`` (LPS), or, when
    ``irregular``, a star-shaped body whose radius varies smoothly with direction. Only
    voxels whose HU lies in ``BRAIN_LIKE_HU`` before insertion are replaced, by ``hu`` plus
    Gaussian heterogeneity. With ``center_mm`` None the centre is drawn from the seed
    inside the brain. Stored values are written back with each dataset's rescale and
    pixel representation, clipped to its BitsStored range.
    """
    rng = np.random.default_rng(seed)
    planes = [_plane(ds) for ds in datasets]
    radius_of = _radius_function(rng, radius_mm, irregular)
    reach = radius_of.reach
    centre = (
        np.asarray(center_mm, dtype=np.float64)
        if center_mm is not None
        else _centre_in_brain(planes, reach + CENTRE_MARGIN_MM, rng)
    )
    masks = np.zeros((len(planes), *planes[0].hu.shape), dtype=bool)
    for k, (ds, plane) in enumerate(zip(datasets, planes, strict=True)):
        if abs(float(np.dot(centre - plane.origin, plane.normal))) > reach:
            continue
        offset = (
            _plane_points(plane.origin, plane.row_dir, plane.col_dir, plane.spacing, plane.hu.shape)
            - centre
        )
        distance = np.linalg.norm(offset, axis=-1)
        inside = distance <= radius_of(offset / np.maximum(distance, 1e-9)[..., None])
        low, high = BRAIN_LIKE_HU
        masks[k] = inside & (plane.hu >= low) & (plane.hu <= high)
        if masks[k].any():
            painted = plane.hu.copy()
            painted[masks[k]] = hu + rng.normal(0.0, HETEROGENEITY_HU, int(masks[k].sum()))
            _write_hu(ds, painted)
    depths = np.array([float(np.dot(p.origin, p.normal)) for p in planes])
    areas = np.array([p.spacing[0] * p.spacing[1] for p in planes])
    volume = float(np.sum(masks.sum(axis=(1, 2)) * areas * represented_thickness(depths))) / 1000.0
    return InsertedLesion(
        masks, volume, (float(centre[0]), float(centre[1]), float(centre[2])), radius_mm, hu
    )


@dataclass(frozen=True)
class _RadiusFunction:
    """Radius as a function of unit direction: R * exp(sum c_k P_l(u . d_k))."""

    radius: float
    directions: NDArray[np.float64]  # (K, 3) unit vectors
    weights: NDArray[np.float64]  # (K,)
    degrees: NDArray[np.int_]  # (K,) Legendre degree 2 or 3

    @property
    def reach(self) -> float:
        """An upper bound of the radius over all directions (|P_l| <= 1)."""
        return float(self.radius * np.exp(np.abs(self.weights).sum()))

    def __call__(self, unit: NDArray[np.float64]) -> NDArray[np.float64]:
        """Radius (mm) along each unit vector of ``unit`` (..., 3)."""
        exponent = np.zeros(unit.shape[:-1])
        for d, w, degree in zip(self.directions, self.weights, self.degrees, strict=True):
            x = unit @ d
            exponent += w * (0.5 * (3 * x**2 - 1) if degree == 2 else 0.5 * (5 * x**3 - 3 * x))
        return np.asarray(self.radius * np.exp(exponent))


def _radius_function(rng: np.random.Generator, radius: float, irregular: bool) -> _RadiusFunction:
    """A sphere, or four random smooth lobes of modest amplitude."""
    count = 4 if irregular else 0
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True) + 1e-12
    weights = rng.normal(0.0, 0.08, count)
    degrees = rng.choice([2, 3], size=count)
    return _RadiusFunction(radius, directions, weights, degrees)


def _centre_in_brain(
    planes: Sequence[_Plane], clearance_mm: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """A brain voxel at least ``clearance_mm`` from the brain's edge, drawn by ``rng``.

    The frames are stacked in normal order as if they were orthogonal (a tilt shears the
    stack by a few per cent at most, absorbed by the clearance margin).
    """
    normal = planes[0].normal
    depths = np.array([float(np.dot(p.origin, normal)) for p in planes])
    order = np.argsort(depths)
    gap = float(np.median(np.diff(depths[order]))) if len(planes) > 1 else 1.0
    spacing = (gap, planes[0].spacing[0], planes[0].spacing[1])
    stack = np.stack([planes[i].hu for i in order])
    brain = brain_mask(stack, spacing)
    distance = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(distance >= clearance_mm)
    if len(candidates) == 0:
        raise ValueError(f"no brain voxel is {clearance_mm:.1f} mm from the brain's edge")
    k, r, c = candidates[rng.integers(len(candidates))]
    p = planes[order[k]]
    return np.asarray(p.origin + r * p.spacing[0] * p.col_dir + c * p.spacing[1] * p.row_dir)


def _write_hu(ds: Dataset, hu: NDArray[np.float64]) -> None:
    """Store HU as the dataset's stored values (rescale, representation, BitsStored)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError("insert_lesion needs uncompressed pixel data")
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    signed = int(ds.PixelRepresentation) == 1
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{int(ds.BitsAllocated) // 8}")
    stored = np.clip(np.rint((hu - intercept) / slope), low, high).astype(dtype)
    ds.PixelData = stored.tobytes()


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as ``folder/NNNN.dcm`` (DICOM Part 10 file), folder created."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets, start=1):
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
