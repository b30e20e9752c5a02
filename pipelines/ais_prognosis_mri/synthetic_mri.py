"""Seeded synthetic brain MRI studies of acute ischaemic stroke, for training, tests and demos.

One study holds four series on one frame of reference (the patient did not move): DWI
(trace, b = 1000 s/mm2), its ADC map, FLAIR and T1 spin echo, axial, 5 mm slices, at
1.5 T or 3 T. The head is the ellipsoidal phantom of ``pipelines.synthetic`` (scalp,
skull, CSF, cortex, white matter, deep grey nuclei, ventricles) seen with MR contrasts.

Generative model of the images (documented in the model's report):

- Tissue parameters per contrast (:data:`TISSUES`): T1 SE signal, FLAIR signal, T2 (b = 0)
  signal and ADC (1e-6 mm2/s: white matter 750, grey matter 850, CSF 3000).
- DWI b = 1000 is ``S0 * exp(-b * ADC)``; the ADC map is stored in 1e-6 mm2/s (integer).
- The infarct is an ellipsoid (semi-axes from its volume, random elongation) whose ADC is
  ``adc_core`` at its centre rising towards normal tissue at its edge (``ADC_RIM_RISE``);
  ``adc_core`` is 600 - 220 x ``severity`` (380-600), so a more severe infarct is darker on
  ADC and brighter on DWI. The infarct's T2 (b = 0) signal rises a little (vasogenic
  oedema). On FLAIR it is invisible before ~3 h and fully bright after ~9 h (DWI-FLAIR
  mismatch): ``flair_fraction = clip((onset_h - 3) / 6, 0, 1)``. On T1 it is slightly dark.
- A smooth multiplicative bias field ``exp(sum of random low-order polynomial terms)``,
  RMS amplitude :data:`BIAS_AMPLITUDE` per field strength (3 T: stronger), on DWI, b = 0,
  FLAIR and T1 (the ADC map is a ratio of two images with the same field: unbiased).
- Gaussian noise, lower at 3 T (:data:`NOISE_SIGMA`); a slight Gaussian blur (partial
  volume).

Headers follow what scanners write: MR Image Storage (or Enhanced MR Image Storage,
one multi-frame instance per series), ScanningSequence / SequenceVariant, SequenceName
(``*ep_b1000t``, ``*tir2d1_16``, ``*se2d1``), RepetitionTime, EchoTime, InversionTime,
MagneticFieldStrength, DiffusionBValue, ImageType (DIFFUSION TRACEW / ADC) and
SeriesDescription ("DWI b1000", "ADC", "FLAIR", "T1 SE").
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from scipy import ndimage

from pipelines.lesions import plane_points

BRAIN_SEMI_AXES_MM = np.array([70.0, 90.0, 65.0])  # as pipelines.synthetic (x, y, z)
HEAD_CENTRE_MM = np.array([0.0, 5.0, 80.0])  # LPS
FIELD_OF_VIEW_MM = 220.0
SLICE_THICKNESS_MM = 5.0
B_VALUE = 1000.0  # s/mm2
ADC_UNIT = 1e-6  # mm2/s per stored ADC value
ADC_RIM_RISE = 0.35  # fraction of the core-to-normal ADC gap reached at the infarct's edge
ADC_CORE_MAX = 600.0  # ADC at severity 0
ADC_SEVERITY_DROP = 220.0  # ADC drop from severity 0 to 1
BITS_STORED = 12
MAX_STORED = 2**BITS_STORED - 1

FLAIR_VISIBLE_FROM_H = 3.0
FLAIR_FULL_AFTER_H = 9.0


@dataclass(frozen=True)
class Tissue:
    """MR properties of one tissue: T1 SE, FLAIR and T2 (b = 0) signal, ADC (1e-6 mm2/s)."""

    t1: float
    flair: float
    t2: float
    adc: float


TISSUES: dict[str, Tissue] = {
    "air": Tissue(0.0, 0.0, 0.0, 0.0),
    "scalp": Tissue(1400.0, 700.0, 300.0, 200.0),  # fat: bright on T1
    "skull": Tissue(60.0, 40.0, 20.0, 0.0),
    "csf": Tissue(250.0, 80.0, 2000.0, 3000.0),
    "grey": Tissue(600.0, 900.0, 1100.0, 850.0),
    "white": Tissue(850.0, 650.0, 900.0, 750.0),
    "nuclei": Tissue(650.0, 850.0, 1000.0, 800.0),
}
INFARCT_T1 = 480.0
INFARCT_T2_RISE = 1.25  # T2 (b = 0) signal of the infarct relative to its tissue
INFARCT_FLAIR_GAIN = 750.0  # FLAIR signal added when fully visible

FIELD_STRENGTHS_T = (1.5, 3.0)
BIAS_AMPLITUDE = {1.5: 0.10, 3.0: 0.22}
NOISE_SIGMA = {1.5: 22.0, 3.0: 14.0}
ADC_NOISE = {1.5: 35.0, 3.0: 22.0}

ROLE_DWI, ROLE_ADC, ROLE_FLAIR, ROLE_T1 = "dwi", "adc", "flair", "t1"
ROLES = (ROLE_DWI, ROLE_ADC, ROLE_FLAIR, ROLE_T1)


@dataclass(frozen=True)
class Protocol:
    """Acquisition parameters of one series, as written into its headers."""

    description: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    repetition_time_ms: float
    echo_time_ms: float
    image_type: tuple[str, ...]
    series_number: int
    matrix_scale: float = 1.0  # matrix relative to the DWI's (FLAIR, T1: finer)
    inversion_time_ms: float | None = None
    b_value: float | None = None


PROTOCOLS: dict[str, Protocol] = {
    ROLE_DWI: Protocol(
        "DWI b1000", "*ep_b1000t", ("EP",), ("SK", "SP"), 5200.0, 89.0,
        ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"), 4, b_value=B_VALUE,
    ),
    ROLE_ADC: Protocol(
        "ADC", "*ep_b0_1000", ("EP",), ("SK", "SP"), 5200.0, 89.0,
        ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), 5,
    ),
    ROLE_FLAIR: Protocol(
        "FLAIR", "*tir2d1_16", ("SE", "IR"), ("SK", "SP", "MP"), 9000.0, 100.0,
        ("ORIGINAL", "PRIMARY", "M", "NORM"), 3, matrix_scale=1.25, inversion_time_ms=2500.0,
    ),
    ROLE_T1: Protocol(
        "T1 SE", "*se2d1", ("SE",), ("SK", "SP"), 500.0, 10.0,
        ("ORIGINAL", "PRIMARY", "M", "NORM"), 2, matrix_scale=1.25,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Infarct:
    """The infarct of a study: centre (head-centred mm), volume, shape, severity, age."""

    centre_mm: tuple[float, float, float]
    volume_ml: float
    elongation: tuple[float, float, float] = (1.0, 1.0, 1.0)  # relative semi-axes
    severity: float = 0.5  # 0..1: deeper ADC drop
    onset_h: float = 4.0  # hours from onset to MRI (FLAIR visibility)

    @property
    def adc_core(self) -> float:
        """ADC at the infarct's centre (1e-6 mm2/s)."""
        return ADC_CORE_MAX - ADC_SEVERITY_DROP * float(np.clip(self.severity, 0.0, 1.0))

    @property
    def semi_axes_mm(self) -> NDArray[np.float64]:
        """Semi-axes of the ellipsoid holding ``volume_ml``."""
        e = np.asarray(self.elongation, dtype=np.float64)
        radius = (3.0 * self.volume_ml * 1000.0 / (4.0 * np.pi * float(np.prod(e)))) ** (1 / 3)
        return np.asarray(radius * e, dtype=np.float64)

    @property
    def flair_fraction(self) -> float:
        """How visible the infarct is on FLAIR, 0 (not yet) to 1 (fully)."""
        span = FLAIR_FULL_AFTER_H - FLAIR_VISIBLE_FROM_H
        return float(np.clip((self.onset_h - FLAIR_VISIBLE_FROM_H) / span, 0.0, 1.0))


@dataclass(frozen=True)
class StudySpec:
    """Everything that makes one synthetic MRI study."""

    seed: int
    infarct: Infarct | None
    field_strength_t: float = 1.5
    rows: int = 64
    n_slices: int = 16
    enhanced: bool = False  # one Enhanced MR Image Storage instance per series
    patient_age: int = 70
    patient_sex: str = "M"
    roles: tuple[str, ...] = ROLES
    extra: dict[str, str] = field(default_factory=dict)


def _inside(p: NDArray[np.float64], axes: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Points (N, 3) inside the axis-aligned ellipsoid with semi-axes ``axes``."""
    return np.asarray(np.sum((p / axes) ** 2, axis=-1) <= 1.0)


def tissue_labels(p: NDArray[np.float64]) -> NDArray[np.str_]:
    """The tissue name (a key of :data:`TISSUES`) at head-centred points (N, 3), mm."""
    a = BRAIN_SEMI_AXES_MM
    labels = np.full(len(p), "air", dtype="<U6")
    labels[_inside(p, a + 12.0)] = "scalp"
    labels[_inside(p, a + 7.0)] = "skull"
    labels[_inside(p, a + 1.0)] = "csf"
    brain = _inside(p, a)
    labels[brain] = "grey"
    radius = np.linalg.norm(p, axis=-1) + 1e-9
    theta = np.arccos(np.clip(p[:, 2] / radius, -1.0, 1.0))
    phi = np.arctan2(p[:, 1], p[:, 0])
    sulci = brain & ~_inside(p, a - 8.0) & (np.cos(9 * theta) * np.cos(11 * phi) > 0.75)
    labels[sulci] = "csf"
    labels[_inside(p, a - 4.0) & ~sulci] = "white"
    for side in (-1.0, 1.0):
        labels[_inside(p - [side * 24.0, 2.0, 2.0], np.array([8.0, 16.0, 12.0]))] = "nuclei"
        labels[_inside(p - [side * 9.0, -2.0, 16.0], np.array([5.0, 28.0, 9.0]))] = "csf"
    labels[_inside(p - [0.0, 4.0, 2.0], np.array([1.5, 12.0, 8.0]))] = "csf"
    return labels


def infarct_weight(p: NDArray[np.float64], infarct: Infarct | None) -> NDArray[np.float64]:
    """Per point (N, 3 head-centred mm): 0 outside the infarct, else 1 - r/R in (0, 1]
    (1 at the centre), where r/R is the normalised ellipsoidal radius."""
    if infarct is None:
        return np.zeros(len(p))
    r = np.sqrt(np.sum(((p - infarct.centre_mm) / infarct.semi_axes_mm) ** 2, axis=-1))
    return np.where(r <= 1.0, 1.0 - r, 0.0)


def contrasts(p: NDArray[np.float64], infarct: Infarct | None) -> dict[str, NDArray[np.float64]]:
    """Noise-free T1, FLAIR, b0, DWI b1000 and ADC at head-centred points (N, 3).

    The infarct replaces grey matter, white matter and nuclei only (not CSF or skull).
    """
    labels = tissue_labels(p)
    out = {
        name: np.array([getattr(TISSUES[t], name) for t in TISSUES])[
            np.searchsorted(np.array(list(TISSUES)), labels, sorter=np.argsort(list(TISSUES)))
        ]
        for name in ("t1", "flair", "t2", "adc")
    }
    weight = infarct_weight(p, infarct)
    brain = np.isin(labels, ["grey", "white", "nuclei"])
    lesion = (weight > 0) & brain
    if infarct is not None and lesion.any():
        w = weight[lesion]
        normal = out["adc"][lesion]
        rise = ADC_RIM_RISE * (1.0 - np.clip(w * 2.0, 0.0, 1.0))  # edge rises towards normal
        out["adc"][lesion] = infarct.adc_core + (normal - infarct.adc_core) * rise
        out["t2"][lesion] *= INFARCT_T2_RISE
        out["t1"][lesion] = INFARCT_T1
        out["flair"][lesion] += INFARCT_FLAIR_GAIN * infarct.flair_fraction
    out["dwi"] = out["t2"] * np.exp(-B_VALUE * out["adc"] * ADC_UNIT)
    out["lesion"] = lesion.astype(np.float64)
    return out


def bias_field(
    p: NDArray[np.float64], rng: np.random.Generator, amplitude: float
) -> NDArray[np.float64]:
    """A smooth multiplicative field at head-centred points: exp of a random polynomial of
    degree 2 in the normalised coordinates, scaled to RMS log-amplitude ``amplitude``."""
    q = p / (BRAIN_SEMI_AXES_MM + 12.0)
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    terms = np.stack([x, y, z, x * y, y * z, x * z, x * x, y * y, z * z], axis=1)
    coef = rng.normal(0.0, 1.0, terms.shape[1])
    log_field = terms @ coef
    inside = np.abs(q).max(axis=1) <= 1.0
    rms = float(np.sqrt(np.mean(log_field[inside] ** 2))) if inside.any() else 1.0
    return np.asarray(np.exp(log_field * amplitude / max(rms, 1e-9)), dtype=np.float64)


def _study_ids(spec: StudySpec) -> dict[str, str]:
    """Study and frame-of-reference UIDs derived from the seed."""
    root = f"dicomnode-synthetic-mri-{spec.seed}"
    return {
        "root": root,
        "study": generate_uid(entropy_srcs=[root, "study"]),
        "frame_of_reference": generate_uid(entropy_srcs=[root, "frame"]),
    }


def _series_images(
    spec: StudySpec, role: str, field_map_seed: int
) -> tuple[NDArray[np.float64], list[NDArray[np.float64]], float]:
    """Stored values (slices, rows, cols), slice origins and pixel spacing of a role."""
    protocol = PROTOCOLS[role]
    rows = round(spec.rows * protocol.matrix_scale)
    spacing = FIELD_OF_VIEW_MM / rows
    half = (rows - 1) / 2.0 * spacing
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    strength = spec.field_strength_t
    rng = np.random.default_rng([spec.seed, ROLES.index(role)])
    images, origins = [], []
    for k in range(spec.n_slices):
        centre = HEAD_CENTRE_MM + np.array([0.0, 0.0, (k - (spec.n_slices - 1) / 2.0) * 5.0])
        origin = centre - half * row_dir - half * col_dir
        points = plane_points(origin, row_dir, col_dir, (spacing, spacing), (rows, rows))
        p = points.reshape(-1, 3) - HEAD_CENTRE_MM
        c = contrasts(p, spec.infarct)
        if role == ROLE_ADC:
            value = c["adc"] + rng.normal(0.0, ADC_NOISE[strength], len(p))
            value[c["t2"] <= 0.0] = 0.0
        else:
            key = {ROLE_DWI: "dwi", ROLE_FLAIR: "flair", ROLE_T1: "t1"}[role]
            gain = 1.0 if strength == 1.5 else 1.15
            coefficients = np.random.default_rng([spec.seed, field_map_seed])  # one field
            field = bias_field(p, coefficients, BIAS_AMPLITUDE[strength])
            value = c[key] * gain * field + rng.normal(0.0, NOISE_SIGMA[strength], len(p))
        image = ndimage.gaussian_filter(value.reshape(rows, rows), 0.5)
        images.append(np.abs(image))
        origins.append(origin)
    return np.stack(images), origins, spacing


def _header(spec: StudySpec, ids: dict[str, str], role: str, sop_class: str) -> Dataset:
    """Patient, study, series, equipment and MR modules shared by a series' instances."""
    protocol = PROTOCOLS[role]
    ds = Dataset()
    day = (datetime.date(2024, 1, 1) + datetime.timedelta(days=spec.seed % 366)).strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
    ds.StudyTime = "101500"
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"1015{protocol.series_number:02d}"
    ds.AccessionNumber = f"MRI{spec.seed:06d}"
    ds.Modality = "MR"
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = f"Synthetic MR {spec.field_strength_t:g}T"
    ds.InstitutionName = "dicomnode synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI BRAIN STROKE (SYNTHETIC)"
    ds.SeriesDescription = protocol.description
    ds.ProtocolName = protocol.description
    ds.PatientName = f"SYNTHETIC^MRI{spec.seed}"
    ds.PatientID = f"DN-MRI-{spec.seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = spec.patient_sex
    ds.PatientAge = f"{spec.patient_age:03d}Y"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ids["study"]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ids["root"], role, str(spec.enhanced)])
    ds.FrameOfReferenceUID = ids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = protocol.series_number
    ds.AcquisitionNumber = 1
    ds.MagneticFieldStrength = f"{spec.field_strength_t:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    for key, value in spec.extra.items():
        setattr(ds, key, value)
    return ds


def _mr_acquisition(ds: Dataset, protocol: Protocol, strength: float) -> None:
    """MR Image module attributes of a single-frame instance."""
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = "IR" if protocol.inversion_time_ms else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = protocol.sequence_name
    ds.RepetitionTime = f"{protocol.repetition_time_ms:g}"
    ds.EchoTime = f"{protocol.echo_time_ms:g}"
    if protocol.inversion_time_ms is not None:
        ds.InversionTime = f"{protocol.inversion_time_ms:g}"
    ds.EchoTrainLength = 1 if protocol.scanning_sequence == ("EP",) else 16
    ds.ImagingFrequency = f"{42.577 * strength:.4f}"
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = f"{SLICE_THICKNESS_MM:g}"
    ds.SpacingBetweenSlices = f"{SLICE_THICKNESS_MM:g}"
    if protocol.b_value is not None:
        ds.DiffusionBValue = protocol.b_value
        ds.DiffusionDirectionality = "ISOTROPIC"


def _stored(image: NDArray[np.float64]) -> NDArray[np.uint16]:
    """Image values rounded and clipped to the 12-bit stored range."""
    return np.clip(np.rint(image), 0, MAX_STORED).astype("<u2")


def series_datasets(spec: StudySpec, role: str) -> list[Dataset]:
    """The instances of one role's series (single-frame, or one enhanced instance)."""
    ids = _study_ids(spec)
    protocol = PROTOCOLS[role]
    images, origins, spacing = _series_images(spec, role, field_map_seed=99)
    stored = _stored(images)
    if spec.enhanced:
        return [_enhanced(spec, ids, role, stored, origins, spacing)]
    datasets = []
    for k, origin in enumerate(origins):
        ds = _header(spec, ids, role, MRImageStorage)
        uid = generate_uid(entropy_srcs=[ids["root"], role, str(k)])
        ds.file_meta = _file_meta(MRImageStorage, uid)
        ds.SOPInstanceUID = uid
        ds.ImageType = list(protocol.image_type)
        _mr_acquisition(ds, protocol, spec.field_strength_t)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
        ds.SliceLocation = f"{origin[2]:.4f}"
        ds.Rows = ds.Columns = stored.shape[1]
        ds.WindowCenter = str(int(np.percentile(stored, 99) // 2))
        ds.WindowWidth = str(max(int(np.percentile(stored, 99)), 2))
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def _file_meta(sop_class: UID, uid: UID) -> FileMetaDataset:
    """Part 10 file meta of an instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _item(**values: object) -> Dataset:
    """One sequence item with the given attributes."""
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _enhanced(
    spec: StudySpec,
    ids: dict[str, str],
    role: str,
    stored: NDArray[np.uint16],
    origins: Sequence[NDArray[np.float64]],
    spacing: float,
) -> Dataset:
    """One Enhanced MR Image Storage instance holding every slice of a role as frames."""
    protocol = PROTOCOLS[role]
    ds = _header(spec, ids, role, EnhancedMRImageStorage)
    uid = generate_uid(entropy_srcs=[ids["root"], role, "enhanced"])
    ds.file_meta = _file_meta(EnhancedMRImageStorage, uid)
    ds.SOPInstanceUID = uid
    derived = protocol.image_type[0] == "DERIVED"
    contrast = "ADC" if role == ROLE_ADC else "NONE"  # value 4: derived pixel contrast
    ds.ImageType = [protocol.image_type[0], "PRIMARY", protocol.image_type[2], contrast]
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionDateTime = f"{ds.AcquisitionDate}{ds.AcquisitionTime}"
    ds.ImageComments = ""
    ds.PulseSequenceName = protocol.sequence_name.lstrip("*")
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if protocol.scanning_sequence == ("EP",) else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.MagneticFieldStrength = f"{spec.field_strength_t:g}"
    ds.ImagingFrequency = f"{42.577 * spec.field_strength_t:.4f}"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "DIFFUSION" if role in (ROLE_DWI, ROLE_ADC) else (
        "FLUID_ATTENUATED" if role == ROLE_FLAIR else "T1"
    )  # fmt: skip
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.Rows = ds.Columns = stored.shape[1]
    ds.NumberOfFrames = stored.shape[0]
    dimension_uid = generate_uid(entropy_srcs=[ids["root"], role, "dimension"])
    ds.DimensionOrganizationSequence = DicomSequence(
        [_item(DimensionOrganizationUID=dimension_uid)]
    )
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00200032,
                FunctionalGroupPointer=0x00209113,
                DimensionDescriptionLabel="Image Position",
            )
        ]
    )
    timing = _item(
        RepetitionTime=protocol.repetition_time_ms,
        FlipAngle=90.0,
    )
    echo = _item(EffectiveEchoTime=protocol.echo_time_ms)
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=[spacing, spacing], SliceThickness=SLICE_THICKNESS_MM,
                   SpacingBetweenSlices=SLICE_THICKNESS_MM)]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])]
        ),
        MRTimingAndRelatedParametersSequence=DicomSequence([timing]),
        MREchoSequence=DicomSequence([echo]),
        MRModifierSequence=DicomSequence(
            [_item(InversionRecovery="YES" if protocol.inversion_time_ms else "NO",
                   FlowCompensation="NONE", Spoiling="NONE", T2Preparation="NO",
                   SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
                   PartialFourier="NO", ParallelAcquisition="NO")]
        ),
        MRImagingModifierSequence=DicomSequence(
            [_item(MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
                   TransmitterFrequency=42.577 * spec.field_strength_t,
                   PixelBandwidth=1500.0)]
        ),
        MRReceiveCoilSequence=DicomSequence(
            [_item(ReceiveCoilName="HEAD", ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
                   MultiCoilDefinitionSequence=DicomSequence(), MultiCoilConfiguration="HEAD")]
        ),
        MRTransmitCoilSequence=DicomSequence(
            [_item(TransmitCoilName="BODY", TransmitCoilType="BODY")]
        ),
        MRFOVGeometrySequence=DicomSequence(
            [_item(InPlanePhaseEncodingDirection="COLUMN",
                   MRAcquisitionFrequencyEncodingSteps=stored.shape[1],
                   MRAcquisitionPhaseEncodingStepsInPlane=stored.shape[1], PercentSampling=100.0,
                   PercentPhaseFieldOfView=100.0)]
        ),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleIntercept=0.0, RescaleSlope=1.0, RescaleType="US")]
        ),
        FrameVOILUTSequence=DicomSequence(
            [_item(WindowCenter=float(np.percentile(stored, 99) // 2),
                   WindowWidth=float(max(np.percentile(stored, 99), 2)))]
        ),
        FrameAnatomySequence=DicomSequence(
            [_item(FrameLaterality="B", AnatomicRegionSequence=DicomSequence(
                [_item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")]
            ))]
        ),
    )  # fmt: skip
    if protocol.inversion_time_ms is not None:
        shared.MRModifierSequence[0].InversionTimes = [protocol.inversion_time_ms]
    if role in (ROLE_DWI, ROLE_ADC):
        shared.MRDiffusionSequence = DicomSequence(
            [_item(DiffusionBValue=B_VALUE if protocol.b_value else 0.0,
                   DiffusionDirectionality="ISOTROPIC")]
        )  # fmt: skip
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k, origin in enumerate(origins):
        frames.append(
            _item(
                FrameContentSequence=DicomSequence(
                    [_item(DimensionIndexValues=[k + 1], StackID="1", InStackPositionNumber=k + 1,
                           FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                           FrameReferenceDateTime=ds.AcquisitionDateTime,
                           FrameAcquisitionDuration=100.0)]
                ),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=[float(v) for v in origin])]
                ),
                MRImageFrameTypeSequence=DicomSequence(
                    [_item(FrameType=list(ds.ImageType), PixelPresentation="MONOCHROME",
                           VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
                           ComplexImageComponent="MAGNITUDE",
                           AcquisitionContrast=ds.AcquisitionContrast)]
                ),
            )
        )  # fmt: skip
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    if derived:
        ds.ImageType[0] = "DERIVED"
    ds.PixelData = stored.tobytes()
    return ds


def study_datasets(spec: StudySpec) -> dict[str, list[Dataset]]:
    """Every role's series of the study, by role."""
    return {role: series_datasets(spec, role) for role in spec.roles}


def write_study(spec: StudySpec, folder: Path) -> dict[str, list[Path]]:
    """Write the study as ``folder/<role>/NNNN.dcm``; the paths by role."""
    written: dict[str, list[Path]] = {}
    for role, datasets in study_datasets(spec).items():
        target = folder / role
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, ds in enumerate(datasets, start=1):
            path = target / f"{index:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written[role] = paths
    return written
