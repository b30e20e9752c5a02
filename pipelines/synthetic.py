"""Seeded synthetic head CT series, for tests and demonstrations.

``synthetic_head_ct`` draws an ellipsoidal head (scalp, skull with diploe, CSF, cortex
with sulci, white matter, deep grey nuclei, ventricles) on each slice plane in patient
coordinates, so a gantry tilt only changes the planes. Lesions are painted by
``pipelines.lesions`` (``insert_lesion`` is re-exported here for its earlier users).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
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

from pipelines.lesions import InsertedLesion as InsertedLesion  # re-exported
from pipelines.lesions import insert_lesion as insert_lesion  # re-exported
from pipelines.lesions import plane_points

BRAIN_SEMI_AXES_MM = np.array([70.0, 90.0, 65.0])  # inner skull: 140 x 180 x 130 mm (x, y, z)
HEAD_CENTRE_MM = np.array([0.0, 5.0, 80.0])  # LPS
FIELD_OF_VIEW_MM = 230.0
RESCALE_INTERCEPT = -1024.0
BITS_STORED = 12


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


def synthetic_head_ct(
    seed: int = 0,
    *,
    n_slices: int = 32,
    slice_thickness_mm: float = 5.0,
    rows: int = 256,
    gantry_tilt_deg: float = 0.0,
    noise_hu: float = 5.0,
    head_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    stack_offset_mm: float = 0.0,
) -> list[Dataset]:
    """A deterministic single-frame CT Image Storage head series, sorted inferior first.

    Square ``rows`` x ``rows`` images over a 230 mm field of view; the slices step
    ``slice_thickness_mm`` along their normal. A tilt rotates the planes about the x axis
    and steps the positions along z (by thickness / cos(tilt)), as a tilted gantry does.
    ``head_scale`` stretches the whole head (x, y, z) about its centre, so that training
    heads differ in size and shape; ``stack_offset_mm`` moves the stack's centre along z
    (a short thin-slice stack then covers the skull base or the vertex).
    """
    scale = np.asarray(head_scale, dtype=np.float64)
    if np.any(scale <= 0):
        raise ValueError(f"head_scale must be positive: {head_scale}")
    rng = np.random.default_rng(seed)
    spacing = FIELD_OF_VIEW_MM / rows
    tilt = np.radians(gantry_tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    half = (rows - 1) / 2.0 * spacing
    step_z = slice_thickness_mm / np.cos(tilt)
    parameters: tuple[object, ...] = (n_slices, slice_thickness_mm, rows, gantry_tilt_deg, noise_hu)
    if tuple(head_scale) != (1.0, 1.0, 1.0) or stack_offset_mm:
        parameters = (*parameters, tuple(head_scale), stack_offset_mm)
    ids = _identifiers(seed, parameters)
    datasets = []
    for k in range(n_slices):
        along = (k - (n_slices - 1) / 2.0) * step_z + stack_offset_mm
        centre = HEAD_CENTRE_MM + np.array([0.0, 0.0, along])
        origin = centre - half * row_dir - half * col_dir
        hu = np.zeros((rows, rows))
        for offset in (-1.0 / 3.0, 0.0, 1.0 / 3.0):  # through-plane partial volume
            points = plane_points(
                origin + offset * slice_thickness_mm * normal,
                row_dir,
                col_dir,
                (spacing, spacing),
                (rows, rows),
            )
            head_centred = (points.reshape(-1, 3) - HEAD_CENTRE_MM) / scale
            hu += _anatomy_hu(head_centred).reshape(rows, rows) / 3.0
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


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as ``folder/NNNN.dcm`` (DICOM Part 10 file), folder created."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets, start=1):
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


CALCIFICATION_SITES_MM: dict[str, tuple[float, float, float]] = {
    "choroid plexus": (9.0, 18.0, 16.0),  # glomus, in the atrium of the lateral ventricle
    "pineal": (0.0, 19.0, 4.0),  # behind the third ventricle
    "basal ganglia": (18.0, 2.0, 2.0),  # globus pallidus
    "falx": (0.0, -40.0, 45.0),  # midline, high frontal
    "vessel wall": (-26.0, -12.0, -12.0),  # middle cerebral artery, near the skull base
}
"""Typical sites of intracranial calcification in the synthetic head, head-centred mm
(x left, y posterior, z up from ``HEAD_CENTRE_MM``)."""


def site_mm(head_centred: tuple[float, float, float]) -> tuple[float, float, float]:
    """Patient (LPS) position of a head-centred point of the synthetic head."""
    x, y, z = HEAD_CENTRE_MM + np.asarray(head_centred, dtype=np.float64)
    return float(x), float(y), float(z)


def skull_base_centre_mm(radius_mm: float, lateral_mm: float = 20.0) -> tuple[float, float, float]:
    """LPS centre of a lesion of ``radius_mm`` in the synthetic head that touches the floor
    of the cranial cavity (the inner table under the temporal lobe): its lower edge reaches
    past the CSF layer into the bone, where nothing brain-like is painted."""
    floor = BRAIN_SEMI_AXES_MM[2] + 1.0  # CSF layer's outer edge, below the brain
    return site_mm((lateral_mm, 0.0, -(floor - 0.6 * radius_mm)))
