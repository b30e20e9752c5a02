"""Checks a received instance must pass before it is answered Success.

Pure functions on the parsed dataset, its transfer syntax and SOP class: nothing here
decodes pixels or touches the disk. Each failed check is a :class:`Refusal` carrying its
own DIMSE status (see :mod:`dicomnode.status` and README "C-STORE statuses") and a
reason for the log that names attributes and numbers, never attribute values that could
identify a patient.

What is checked, in order: every element (nested ones included) has a known VR and a
length its VR allows, checked on the raw bytes without converting values; Modality
matches the SOP class; the Image Pixel attributes are present, in range and consistent;
the decoded size is under the cap; Pixel Data is present, non-empty and either native
with the exact length the attributes require (one padding byte allowed) or encapsulated
with well-formed items, non-empty fragments, at least one fragment per frame and
consistent offset tables; Rescale Slope and Intercept (top level and in functional
groups) are finite, the slope positive and the rescaled range representable. Deflated
datasets are measured by :func:`check_inflated_size` before anything inflates them whole.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import uid
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import VR

from dicomnode.status import Status

# What reading a malformed dataset from the network can raise (pydicom parses lazily).
DECODE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    EOFError,
    OverflowError,
    NotImplementedError,
    struct.error,
    OSError,  # pydicom reading a malformed sequence item from memory
)

PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
ITEM_TAG = 0xFFFEE000
SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM_HEADER_BYTES = 8
BOT_ENTRY_BYTES = 4
EOT_ENTRY_BYTES = 8
INFLATE_CHUNK_BYTES = 1 << 20  # most output held at once while measuring an inflation
INFLATE_INPUT_BYTES = 1 << 14  # input fed per step, so re-fed tails stay small
ALLOWED_BITS_ALLOCATED = frozenset({1, 8, 16, 32})
BITS_PER_BYTE = 8
KNOWN_VRS = frozenset(vr.value for vr in VR)
FIXED_VR_SIZES: dict[str, int] = {
    "US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "UV": 8, "SV": 8,
    "OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8,
}  # fmt: skip
MAX_RESCALED_MAGNITUDE = 3.0e38  # just under float32's largest value: HU arrays are float32

SAMPLES_FOR_PHOTOMETRIC: dict[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_PARTIAL_420": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
}
# Native YBR_FULL_422 stores two luminance and two chroma values per pair of pixels.
NATIVE_SAMPLES_OVERRIDE: dict[str, int] = {"YBR_FULL_422": 2}

REQUIRED_MODALITY: dict[str, str] = {
    uid.CTImageStorage: "CT",
    uid.EnhancedCTImageStorage: "CT",
    uid.LegacyConvertedEnhancedCTImageStorage: "CT",
    uid.MRImageStorage: "MR",
    uid.EnhancedMRImageStorage: "MR",
    uid.LegacyConvertedEnhancedMRImageStorage: "MR",
}
IMAGE_STORAGE_CLASSES = frozenset(
    {
        *REQUIRED_MODALITY,
        uid.SecondaryCaptureImageStorage,
        uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the status to answer and the reason to log."""

    status: Status
    reason: str


@dataclass(frozen=True)
class PixelAttributes:
    """The Image Pixel attributes that fix the size of Pixel Data."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    photometric: str

    def decoded_bytes(self) -> int:
        """Bytes of the decoded pixels (bit-packed when Bits Allocated is 1)."""
        values = self.rows * self.columns * self.samples * self.frames
        if self.bits_allocated == 1:
            return (values + BITS_PER_BYTE - 1) // BITS_PER_BYTE
        return values * (self.bits_allocated // BITS_PER_BYTE)

    def native_bytes(self) -> int:
        """Length native Pixel Data must have, before the padding byte."""
        samples = NATIVE_SAMPLES_OVERRIDE.get(self.photometric, self.samples)
        values = self.rows * self.columns * samples * self.frames
        if self.bits_allocated == 1:
            return (values + BITS_PER_BYTE - 1) // BITS_PER_BYTE
        return values * (self.bits_allocated // BITS_PER_BYTE)


def check_inflated_size(deflated: bytes, max_bytes: int) -> Refusal | None:
    """Inflate a raw deflate stream in bounded chunks, refusing it past ``max_bytes``.

    Only a counter grows: each output chunk is dropped once counted and the input is fed
    in small pieces, so a deflate bomb costs at most :data:`INFLATE_CHUNK_BYTES` of memory
    and time linear in the cap.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for start in range(0, len(deflated), INFLATE_INPUT_BYTES):
            pending = deflated[start : start + INFLATE_INPUT_BYTES]
            while not inflater.eof:
                produced = len(inflater.decompress(pending, INFLATE_CHUNK_BYTES))
                total += produced
                if total > max_bytes:
                    return Refusal(
                        Status.OUT_OF_RESOURCES_INFLATED_SIZE,
                        f"deflated dataset inflates beyond the cap of {max_bytes} bytes",
                    )
                pending = inflater.unconsumed_tail
                if not pending and produced < INFLATE_CHUNK_BYTES:
                    break  # this piece is used up and no output is held back
            if inflater.eof:
                break
    except zlib.error as exc:
        return Refusal(Status.DEFLATE_STREAM_INVALID, f"corrupt deflate stream ({exc})")
    if not inflater.eof:
        return Refusal(Status.DEFLATE_STREAM_INVALID, "deflate stream is truncated")
    return None


def _structure_problem(elem: RawDataElement) -> str:
    """What is wrong with a raw element's VR or length (``""`` when nothing): an unknown
    VR, or a length that is not a multiple of its fixed-size VR's value size."""
    if elem.VR is None:
        return ""
    if elem.VR not in KNOWN_VRS:
        return "unknown VR"
    size = FIXED_VR_SIZES.get(elem.VR)
    if size and elem.length != UNDEFINED_LENGTH and elem.length % size:
        return f"length {elem.length} for {elem.VR}"
    return ""


def _is_sequence(tag: int, elem: DataElement | RawDataElement | None) -> bool:
    """Whether an element is a sequence; in implicit VR by the dictionary, or for
    unknown tags by an undefined length outside Pixel Data."""
    if elem is None:
        return False
    if elem.VR is not None:
        return bool(elem.VR == "SQ")
    if dictionary_has_tag(tag):
        return bool(dictionary_VR(tag) == "SQ")
    return isinstance(elem, RawDataElement) and elem.length == UNDEFINED_LENGTH


def check_parses(ds: Dataset) -> Refusal | None:
    """Every element, nested ones included, has a known VR and a length its VR allows.

    Raw elements are checked without converting their values (cheap: a few microseconds
    per element); sequences are converted to reach their items.
    """
    for tag in list(ds.keys()):
        try:
            elem = ds.get_item(tag)
            problem = _structure_problem(elem) if isinstance(elem, RawDataElement) else ""
            if problem:
                return Refusal(
                    Status.CANNOT_UNDERSTAND_UNDECODABLE, f"element {Tag(tag)}: {problem}"
                )
            value = ds[tag].value if _is_sequence(tag, elem) else None
            for item in value if isinstance(value, Sequence) else ():
                nested = check_parses(item)
                if nested is not None:
                    return nested
        except DECODE_ERRORS as exc:
            return Refusal(
                Status.CANNOT_UNDERSTAND_UNDECODABLE,
                f"cannot decode element {Tag(tag)} ({type(exc).__name__})",
            )
    return None


def check_modality(ds: Dataset, sop_class: str) -> Refusal | None:
    """Modality is one value and the one the SOP class requires."""
    value = ds.get("Modality")
    if value is None or isinstance(value, MultiValue) or not str(value).strip():
        return Refusal(
            Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS, "Modality missing or not one value"
        )
    required = REQUIRED_MODALITY.get(sop_class)
    modality = str(value).strip().upper()
    if required is not None and modality != required:
        return Refusal(
            Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
            f"Modality {modality!r} but the SOP class requires {required}",
        )
    return None


def _single_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute holding exactly one value, else ``default`` if absent, else None."""
    if keyword not in ds:
        return default
    value = ds[keyword].value
    if value is None or value == "":
        return default
    if isinstance(value, MultiValue | list) or not isinstance(value, int):
        return None
    return int(value)


def _inconsistent(reason: str) -> Refusal:
    """A refusal for the Image Pixel attributes."""
    return Refusal(Status.IMAGE_PIXEL_MODULE_INCONSISTENT, reason)


def pixel_attributes(ds: Dataset) -> PixelAttributes | Refusal:
    """The Image Pixel attributes, checked for presence, range and consistency."""
    values: dict[str, int | None] = {
        keyword: _single_int(ds, keyword)
        for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit")
    }
    values["SamplesPerPixel"] = _single_int(ds, "SamplesPerPixel")
    values["PixelRepresentation"] = _single_int(ds, "PixelRepresentation")
    values["NumberOfFrames"] = _single_int(ds, "NumberOfFrames", default=1)
    for keyword, value in values.items():
        if value is None:
            return _inconsistent(f"{keyword} missing or not one integer")
    rows, columns = values["Rows"] or 0, values["Columns"] or 0
    allocated, stored = values["BitsAllocated"] or 0, values["BitsStored"] or 0
    samples, frames = values["SamplesPerPixel"] or 0, values["NumberOfFrames"] or 0
    if rows <= 0 or columns <= 0:
        return _inconsistent(f"Rows {rows} and Columns {columns} must both be positive")
    if allocated not in ALLOWED_BITS_ALLOCATED:
        return _inconsistent(f"BitsAllocated {allocated} is not one of 1, 8, 16, 32")
    if not 1 <= stored <= allocated:
        return _inconsistent(f"BitsStored {stored} is not within 1..BitsAllocated {allocated}")
    if values["HighBit"] != stored - 1:
        return _inconsistent(f"HighBit {values['HighBit']} is not BitsStored - 1 ({stored - 1})")
    if values["PixelRepresentation"] not in (0, 1):
        return _inconsistent(f"PixelRepresentation {values['PixelRepresentation']} is not 0 or 1")
    if frames < 1:
        return _inconsistent(f"NumberOfFrames {frames} is not positive")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    expected_samples = SAMPLES_FOR_PHOTOMETRIC.get(photometric)
    if expected_samples is None:
        return _inconsistent("PhotometricInterpretation missing or not a known value")
    if samples != expected_samples:
        return _inconsistent(
            f"SamplesPerPixel {samples} but {photometric} needs {expected_samples}"
        )
    if samples > 1 and _single_int(ds, "PlanarConfiguration", default=0) not in (0, 1):
        return _inconsistent("PlanarConfiguration is not 0 or 1")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != frames:
        return _inconsistent(
            f"{len(per_frame)} per-frame functional group items for NumberOfFrames {frames}"
        )
    return PixelAttributes(rows, columns, samples, allocated, frames, photometric)


def check_decoded_size(attrs: PixelAttributes, max_bytes: int) -> Refusal | None:
    """The decoded pixels fit under the configured cap."""
    size = attrs.decoded_bytes()
    if size > max_bytes:
        return Refusal(
            Status.OUT_OF_RESOURCES_DECODED_SIZE,
            f"decoded pixels would take {size} bytes, over the cap of {max_bytes}",
        )
    return None


def _pixel_element(ds: Dataset) -> tuple[bytes, bool] | None:
    """Pixel Data's value bytes and whether it had undefined length; None if absent."""
    if PIXEL_DATA_TAG not in ds:
        return None
    elem = ds.get_item(PIXEL_DATA_TAG)
    if isinstance(elem, RawDataElement):
        undefined = elem.length == UNDEFINED_LENGTH
        value = elem.value
    elif isinstance(elem, DataElement):
        undefined = bool(elem.is_undefined_length)
        value = elem.value
    else:
        return None
    return (value if isinstance(value, bytes) else b""), undefined


@dataclass(frozen=True)
class Encapsulated:
    """The item structure of encapsulated Pixel Data."""

    basic_offset_table: bytes
    fragment_offsets: tuple[int, ...]  # of each fragment's item tag, from the first one
    fragment_lengths: tuple[int, ...]


def parse_encapsulated(value: bytes) -> Encapsulated:
    """Split encapsulated Pixel Data into its items; ``ValueError`` says what is malformed."""
    items: list[tuple[int, int]] = []
    offset = 0
    while offset < len(value):
        if offset + ITEM_HEADER_BYTES > len(value):
            raise ValueError("an item header is truncated")
        group, element, length = struct.unpack_from("<HHI", value, offset)
        tag = (group << 16) | element
        if tag == SEQUENCE_DELIMITER_TAG:
            break
        if tag != ITEM_TAG:
            raise ValueError(f"found tag ({group:04X},{element:04X}) where an item was expected")
        if length == UNDEFINED_LENGTH:
            raise ValueError("an item has undefined length")
        if offset + ITEM_HEADER_BYTES + length > len(value):
            raise ValueError("an item runs past the end of Pixel Data")
        items.append((offset, length))
        offset += ITEM_HEADER_BYTES + length
    if not items:
        raise ValueError("no Basic Offset Table item")
    bot_offset, bot_length = items[0]
    bot_start = bot_offset + ITEM_HEADER_BYTES
    fragments = items[1:]
    first = fragments[0][0] if fragments else 0
    return Encapsulated(
        basic_offset_table=value[bot_start : bot_start + bot_length],
        fragment_offsets=tuple(start - first for start, _ in fragments),
        fragment_lengths=tuple(length for _, length in fragments),
    )


def _check_offsets(offsets: list[int], frames: int, fragments: tuple[int, ...], name: str) -> str:
    """Problem with an offset table (``""`` when none): one entry per frame, from 0,
    increasing, each at a fragment's item tag."""
    if len(offsets) != frames:
        return f"{name} has {len(offsets)} entries for {frames} frames"
    if offsets[0] != 0 or any(b <= a for a, b in itertools.pairwise(offsets)):
        return f"{name} does not start at 0 and increase"
    starts = set(fragments)
    if any(o not in starts for o in offsets):
        return f"{name} points between fragments"
    return ""


def check_encapsulation(
    ds: Dataset, value: bytes, attrs: PixelAttributes, syntax: uid.UID
) -> Refusal | None:
    """Encapsulated Pixel Data: items, fragments and offset tables agree with the frames."""
    try:
        parsed = parse_encapsulated(value)
    except ValueError as exc:
        return Refusal(Status.PIXEL_DATA_ENCAPSULATION_INVALID, f"encapsulated Pixel Data: {exc}")
    problem = ""
    count = len(parsed.fragment_lengths)
    bot = parsed.basic_offset_table
    if count == 0:
        problem = "no fragment"
    elif any(length == 0 for length in parsed.fragment_lengths):
        problem = "an empty fragment"
    elif count < attrs.frames:
        problem = f"{count} fragments for {attrs.frames} frames"
    elif syntax in uid.RLETransferSyntaxes and count != attrs.frames:
        problem = f"RLE needs one fragment per frame: {count} fragments for {attrs.frames} frames"
    elif len(bot) % BOT_ENTRY_BYTES:
        problem = f"Basic Offset Table length {len(bot)} is not a multiple of 4"
    elif bot:
        entries = list(struct.unpack(f"<{len(bot) // BOT_ENTRY_BYTES}I", bot))
        problem = _check_offsets(
            entries, attrs.frames, parsed.fragment_offsets, "Basic Offset Table"
        )
    if not problem and "ExtendedOffsetTable" in ds:
        problem = _check_extended(ds, attrs.frames, parsed)
    if problem:
        return Refusal(
            Status.PIXEL_DATA_ENCAPSULATION_INVALID, f"encapsulated Pixel Data: {problem}"
        )
    return None


def _check_extended(ds: Dataset, frames: int, parsed: Encapsulated) -> str:
    """Problem with the Extended Offset Table and its lengths (``""`` when none)."""
    table = ds.ExtendedOffsetTable or b""
    lengths = ds.get("ExtendedOffsetTableLengths") or b""
    if parsed.basic_offset_table:
        return "both a Basic and an Extended Offset Table"
    if len(table) != frames * EOT_ENTRY_BYTES or len(lengths) != len(table):
        return f"Extended Offset Table or its lengths do not have {frames} entries"
    offsets = list(struct.unpack(f"<{frames}Q", table))
    if any(n == 0 for n in struct.unpack(f"<{frames}Q", lengths)):
        return "Extended Offset Table Lengths has a zero length"
    return _check_offsets(offsets, frames, parsed.fragment_offsets, "Extended Offset Table")


def check_pixel_data(ds: Dataset, attrs: PixelAttributes, transfer_syntax: str) -> Refusal | None:
    """Pixel Data is present, non-empty and shaped as the attributes and syntax require."""
    found = _pixel_element(ds)
    if found is None:
        return Refusal(Status.PIXEL_DATA_MISSING, "the SOP class needs Pixel Data and it is absent")
    value, undefined = found
    if not value:
        return Refusal(Status.PIXEL_DATA_EMPTY, "Pixel Data has zero length")
    syntax = uid.UID(transfer_syntax)
    if syntax.is_encapsulated:
        if not undefined:
            return Refusal(
                Status.PIXEL_DATA_ENCAPSULATION_INVALID,
                f"{syntax.name} needs encapsulated (undefined length) Pixel Data",
            )
        return check_encapsulation(ds, value, attrs, syntax)
    if undefined:
        return Refusal(
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            f"encapsulated Pixel Data in the native syntax {syntax.name}",
        )
    expected = attrs.native_bytes()
    padded = expected + (expected % 2)
    if len(value) not in (expected, padded):
        return Refusal(
            Status.PIXEL_DATA_LENGTH_MISMATCH,
            f"Pixel Data has {len(value)} bytes; {attrs.rows}x{attrs.columns}x"
            f"{attrs.samples} samples x {attrs.frames} frames at {attrs.bits_allocated} bits "
            f"needs {expected}",
        )
    return None


def _rescale_sources(ds: Dataset) -> Iterator[tuple[str, Dataset]]:
    """Each dataset that may carry Rescale Slope/Intercept, named for the log."""
    yield "", ds
    for group, label in (
        ("SharedFunctionalGroupsSequence", "shared functional groups"),
        ("PerFrameFunctionalGroupsSequence", "frame"),
    ):
        for index, item in enumerate(ds.get(group) or ()):
            for transform in item.get("PixelValueTransformationSequence") or ():
                where = label if group.startswith("Shared") else f"{label} {index + 1}"
                yield f" ({where})", transform


def _number(value: object) -> float | None:
    """One finite-or-not float from a DS value; None when not a single number."""
    if isinstance(value, MultiValue | list | tuple) or value is None or value == "":
        return None
    try:
        return float(str(value))
    except ValueError:
        return None


def check_rescale(ds: Dataset, bits_stored: int) -> Refusal | None:
    """Rescale Slope and Intercept wherever present: one finite number each, slope > 0,
    and the rescaled range of ``bits_stored`` bits representable as float32."""
    for where, source in _rescale_sources(ds):
        slope_present = "RescaleSlope" in source
        intercept_present = "RescaleIntercept" in source
        slope = _number(source.get("RescaleSlope")) if slope_present else 1.0
        intercept = _number(source.get("RescaleIntercept")) if intercept_present else 0.0
        for keyword, number in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
            if number is None:
                return Refusal(Status.RESCALE_INVALID, f"{keyword}{where} is not one number")
            if not math.isfinite(number):
                return Refusal(Status.RESCALE_INVALID, f"{keyword}{where} is {number}")
        assert slope is not None and intercept is not None
        if slope <= 0:
            return Refusal(Status.RESCALE_INVALID, f"RescaleSlope{where} is {slope}, not positive")
        if slope * float(2**bits_stored) + abs(intercept) > MAX_RESCALED_MAGNITUDE:
            return Refusal(
                Status.RESCALE_INVALID,
                f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g}{where} overflow",
            )
    return None


def check_instance(
    ds: Dataset, transfer_syntax: str, sop_class: str, max_decoded_bytes: int
) -> Refusal | None:
    """All instance checks, first failure wins; ``None`` when the instance may be stored.

    ``sop_class`` is the presentation context's abstract syntax (already checked equal to
    the dataset's SOP Class UID by the receiver).
    """
    problem = check_parses(ds)
    if problem is not None:
        return problem
    try:
        problem = check_modality(ds, sop_class)
        if problem is not None or sop_class not in IMAGE_STORAGE_CLASSES:
            return problem
        attrs = pixel_attributes(ds)
        if isinstance(attrs, Refusal):
            return attrs
        return (
            check_decoded_size(attrs, max_decoded_bytes)
            or check_pixel_data(ds, attrs, transfer_syntax)
            or check_rescale(ds, int(ds.BitsStored))
        )
    except DECODE_ERRORS as exc:
        return Refusal(
            Status.CANNOT_UNDERSTAND_UNDECODABLE, f"cannot read the dataset ({type(exc).__name__})"
        )
