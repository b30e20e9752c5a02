"""Secondary Capture: the key frame in a brain window with the segments overlaid and a
text panel naming the algorithm, its measurements and its notice."""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy.ndimage import binary_erosion

from pipelines.base import PipelineResult
from pipelines.outputs.classification import classification_lines
from pipelines.outputs.common import (
    MANUFACTURER,
    OutputIdentity,
    contributing_equipment,
    patient_study_source,
    plain,
    risk_lines,
    source_dataset,
    summary_lines,
)
from pipelines.outputs.regions import Rgb, class_colour
from pipelines.series import LoadedSeries

BRAIN_WINDOW = (40.0, 80.0)  # level, width in HU
MR_WINDOW_PERCENTILES = (1.0, 99.5)  # MR has no calibrated unit: the series' own range


def display_window(series: LoadedSeries) -> tuple[float, float]:
    """(level, width) the frames are shown with: the brain window for CT, for other
    modalities (MR) the series' 1st-99.5th percentile of signal."""
    if str(series.reference.get("Modality", "CT")) == "CT":
        return BRAIN_WINDOW
    low, high = np.percentile(series.frame_hu, MR_WINDOW_PERCENTILES)
    return float(low + high) / 2.0, max(float(high - low), 1.0)


OVERLAY_ALPHA = 0.4
TEXT_COLOUR = (255, 255, 255)
NOTICE_COLOUR = (255, 90, 90)
RISK_COLOUR = (255, 210, 80)
_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive direction per LPS axis


def window_to_uint8(hu: NDArray[np.floating], level: float, width: float) -> NDArray[np.uint8]:
    """Linear window of HU values to 0..255."""
    low = level - width / 2.0
    scaled = np.clip((hu.astype(np.float64) - low) / width, 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def overlay_segments(
    gray: NDArray[np.uint8], masks: list[NDArray[np.bool_]], colours: list[Rgb]
) -> NDArray[np.uint8]:
    """RGB image of ``gray`` with each mask filled semi-transparently in its colour and
    outlined."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float64)
    for mask, rgb_colour in zip(masks, colours, strict=True):
        colour = np.array(rgb_colour, dtype=np.float64)
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour
        rgb[mask & ~binary_erosion(mask)] = colour
    return np.rint(rgb).astype(np.uint8)


def text_panel(
    width: int, lines: list[str], colours: list[tuple[int, int, int]]
) -> NDArray[np.uint8]:
    """Black RGB panel ``width`` wide with ``lines`` wrapped to fit, each in its colour."""
    size = max(12, width // 36)
    font = ImageFont.load_default(size=size)
    chars_per_line = max(20, int(width / (size * 0.55)))
    wrapped: list[tuple[str, tuple[int, int, int]]] = []
    for line, colour in zip(lines, colours, strict=True):
        wrapped += [(part, colour) for part in textwrap.wrap(line, chars_per_line) or [""]]
    line_height = int(size * 1.35)
    panel = Image.new("RGB", (width, line_height * len(wrapped) + size), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    for row, (text, colour) in enumerate(wrapped):
        draw.text((size // 2, size // 2 + row * line_height), text, fill=colour, font=font)
    return np.asarray(panel, dtype=np.uint8)


def patient_orientation(source: Dataset, frame_number: int | None) -> tuple[str, str]:
    """Nearest-axis PatientOrientation letters of the rows and columns of a frame."""
    if frame_number is None:
        cosines = [float(v) for v in source.ImageOrientationPatient]
    else:
        group = source.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" not in group:
            group = source.PerFrameFunctionalGroupsSequence[frame_number - 1]
        cosines = [float(v) for v in group.PlaneOrientationSequence[0].ImageOrientationPatient]

    def letter(direction: list[float]) -> str:
        axis = int(np.argmax(np.abs(direction)))
        return _LETTERS[axis][int(direction[axis] > 0)]

    return letter(cosines[:3]), letter(cosines[3:])


def sc_pixels(series: LoadedSeries, result: PipelineResult) -> NDArray[np.uint8]:
    """The key frame windowed and overlaid (each class in its SEG display colour), with
    the summary panel below it."""
    key = result.key_frame
    gray = window_to_uint8(series.frame_hu[key], *display_window(series))
    segment_colours = [class_colour(i, s.segment) for i, s in enumerate(result.segments)]
    image = overlay_segments(gray, [s.frame_mask[key] for s in result.segments], segment_colours)
    lines = summary_lines(result)
    colours = [TEXT_COLOUR, *segment_colours]
    colours += [NOTICE_COLOUR, TEXT_COLOUR]
    extra = risk_lines(result)
    lines += extra
    colours += [RISK_COLOUR] * len(extra)
    for line, colour in classification_lines(result):
        lines.append(line)
        colours.append(colour)
    return np.concatenate([image, text_panel(image.shape[1], lines, colours)], axis=0)


def build_sc(
    series: LoadedSeries, result: PipelineResult, identity: OutputIdentity
) -> hd.sc.SCImage:
    """RGB Secondary Capture of ``result.key_frame`` (window W80/L40) with a text panel."""
    derivation = plain(f"Key frame, window W80/L40, overlay: {result.algorithm.name}")
    return secondary_capture(
        series, result.key_frame, sc_pixels(series, result), identity, derivation
    )


def secondary_capture(
    series: LoadedSeries,
    frame_index: int,
    pixels: NDArray[np.uint8],
    identity: OutputIdentity,
    derivation: str,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of ``pixels`` drawn from ``series.frames[frame_index]``.

    Patient and study come from the frame's instance (StudyDescription included); the
    instance (and frame) is referenced in SourceImageSequence.
    """
    frame = series.frames[frame_index]
    source = source_dataset(series, frame_index)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=patient_study_source(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation(source, frame.frame_number),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(source),
        series_description=identity.series_description,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        content_date=identity.content_date,
        content_time=identity.content_time,
    )
    if "StudyDescription" in source:
        sc.StudyDescription = source.StudyDescription
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined  # tells validators Laterality is moot
    else:
        sc.Laterality = ""  # Type 2C, empty: unknown whether the part is paired
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = derivation[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame.frame_number is not None:
        reference.ReferencedFrameNumber = frame.frame_number
    sc.SourceImageSequence = [reference]
    return sc
