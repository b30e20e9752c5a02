"""Unit tests of the pure instance checks, the series-level checks and the status table."""

from __future__ import annotations

import copy
import hashlib
import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from dicomnode import spool, validation
from dicomnode.status import Status, status_table_markdown
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import VolumeLoadError, load_datasets

ROWS = 32
CAP = 1 << 20
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    """Four small synthetic head CT slices (never modified: tests copy them)."""
    return synthetic_head_ct(3, n_slices=4, rows=ROWS)


def _wire(ds: Dataset, syntax: str = uid.ExplicitVRLittleEndian) -> Dataset:
    """``ds`` encoded as a peer would send it and decoded as the receiver does."""
    ts = uid.UID(syntax)
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert data is not None
    return decode(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def _check(ds: Dataset, syntax: str = uid.ExplicitVRLittleEndian) -> Status | None:
    """The status :func:`validation.check_instance` gives ``ds`` after the wire."""
    refusal = validation.check_instance(_wire(ds, syntax), syntax, ds.SOPClassUID, CAP)
    return None if refusal is None else refusal.status


def _mutated(base: Dataset, change: Callable[[Dataset], None]) -> Dataset:
    """A deep copy of ``base`` with ``change`` applied."""
    ds = copy.deepcopy(base)
    change(ds)
    return ds


def _set(**values: object) -> Callable[[Dataset], None]:
    """A change that sets (or, for ``None``, deletes) attributes."""

    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return change


def _pixels(length_change: int) -> Callable[[Dataset], None]:
    """A change that cuts or extends Pixel Data by ``length_change`` bytes."""

    def change(ds: Dataset) -> None:
        data = bytes(ds.PixelData)
        ds.PixelData = data[:length_change] if length_change < 0 else data + b"\0" * length_change

    return change


NATIVE_CASES: dict[str, tuple[Callable[[Dataset], None], Status]] = {
    "truncated by 2 bytes": (_pixels(-2), Status.PIXEL_DATA_LENGTH_MISMATCH),
    "4 bytes too long": (_pixels(4), Status.PIXEL_DATA_LENGTH_MISMATCH),
    "zero length": (_set(PixelData=b""), Status.PIXEL_DATA_EMPTY),
    "absent": (_set(PixelData=None), Status.PIXEL_DATA_MISSING),
    "rows do not match": (_set(Rows=ROWS + 1), Status.PIXEL_DATA_LENGTH_MISMATCH),
    "columns do not match": (_set(Columns=ROWS // 2), Status.PIXEL_DATA_LENGTH_MISMATCH),
    "8 bits for 16-bit data": (
        _set(BitsAllocated=8, BitsStored=8, HighBit=7),
        Status.PIXEL_DATA_LENGTH_MISMATCH,
    ),
    "two frames declared": (_set(NumberOfFrames=2), Status.PIXEL_DATA_LENGTH_MISMATCH),
    "zero rows": (_set(Rows=0), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
    "no columns": (_set(Columns=None), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
    "12 bits allocated": (
        _set(BitsAllocated=12, BitsStored=12, HighBit=11),
        Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
    ),
    "bits stored over allocated": (
        _set(BitsStored=17, HighBit=16),
        Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
    ),
    "high bit not stored - 1": (_set(HighBit=15), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
    "pixel representation 2": (
        _set(PixelRepresentation=2),
        Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
    ),
    "3 samples for monochrome": (
        _set(SamplesPerPixel=3),
        Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
    ),
    "unknown photometric": (
        _set(PhotometricInterpretation="FOO"),
        Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
    ),
    "zero frames": (_set(NumberOfFrames=0), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
    "slope NaN": (_set(RescaleSlope="NaN"), Status.RESCALE_INVALID),
    "slope inf": (_set(RescaleSlope="inf"), Status.RESCALE_INVALID),
    "slope 0": (_set(RescaleSlope="0"), Status.RESCALE_INVALID),
    "slope -0": (_set(RescaleSlope="-0"), Status.RESCALE_INVALID),
    "slope 1e308": (_set(RescaleSlope="1e308"), Status.RESCALE_INVALID),
    "slope negative": (_set(RescaleSlope="-1"), Status.RESCALE_INVALID),
    "slope two values": (_set(RescaleSlope=["1", "2"]), Status.RESCALE_INVALID),
    "intercept NaN": (_set(RescaleIntercept="NaN"), Status.RESCALE_INVALID),
    "MR modality in a CT class": (_set(Modality="MR"), Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS),
    "no modality": (_set(Modality=None), Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS),
}


def test_a_good_slice_passes_in_every_native_syntax(slices: list[Dataset]) -> None:
    """The unmodified slice passes in each native syntax, deflate included."""
    for syntax in (
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    ):
        assert _check(slices[0], syntax) is None, syntax


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_native_refusals(slices: list[Dataset], case: str) -> None:
    """Each malformed native slice gets its own status."""
    change, expected = NATIVE_CASES[case]
    assert _check(_mutated(slices[0], change)) == expected


def test_one_padding_byte_is_allowed(slices: list[Dataset]) -> None:
    """8-bit data of odd length may carry one trailing padding byte; two may not."""
    ds = copy.deepcopy(slices[0])
    ds.Rows, ds.Columns = 3, 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(9)  # pydicom pads it to 10 on the wire
    assert _check(ds) is None
    ds.PixelData = bytes(12)
    assert _check(ds) == Status.PIXEL_DATA_LENGTH_MISMATCH


def _encapsulated(base: Dataset, fragments: list[bytes], frames: int = 1, **kw: object) -> Dataset:
    """``base`` with encapsulated Pixel Data built from ``fragments`` (one per frame)."""
    ds = copy.deepcopy(base)
    ds.PixelData = encapsulate(fragments, **kw)  # type: ignore[arg-type]
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = frames
    return ds


def _status(ds: Dataset, syntax: str) -> Status | None:
    """check_instance on ``ds`` as is (encapsulated data is sent in its own syntax)."""
    refusal = validation.check_instance(_wire(ds), syntax, ds.SOPClassUID, CAP)
    return None if refusal is None else refusal.status


def test_encapsulation(slices: list[Dataset]) -> None:
    """Encapsulated Pixel Data must be items with non-empty fragments, one per frame at
    least, and offset tables that agree; native data in a compressed syntax is refused."""
    rle, jpeg = uid.RLELossless, uid.JPEG2000Lossless
    ok = _encapsulated(slices[0], [b"ab", b"cd"], frames=2, has_bot=True)
    assert _status(ok, rle) is None
    assert _status(ok, jpeg) is None
    two_fragments = _encapsulated(slices[0], [b"ab", b"cd"], frames=1, has_bot=False)
    assert _status(two_fragments, jpeg) is None
    encaps_invalid = Status.PIXEL_DATA_ENCAPSULATION_INVALID
    assert _status(two_fragments, rle) == encaps_invalid  # RLE: one fragment per frame
    two_bot_entries = _encapsulated(slices[0], [b"ab", b"cd"], frames=1, has_bot=True)
    assert _status(two_bot_entries, jpeg) == encaps_invalid
    assert _status(_encapsulated(slices[0], [b"ab"], frames=3), jpeg) == encaps_invalid
    assert _status(slices[0], jpeg) == encaps_invalid  # native bytes, compressed syntax
    assert _check(_encapsulated(slices[0], [b"ab"])) == encaps_invalid  # the reverse
    empty_fragment = _encapsulated(slices[0], [b"ab"])
    empty_fragment.PixelData = empty_fragment.PixelData + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    assert _status(empty_fragment, jpeg) == encaps_invalid
    only_bot = _encapsulated(slices[0], [b"ab"])
    only_bot.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    assert _status(only_bot, jpeg) == encaps_invalid
    bad_bot = _encapsulated(slices[0], [b"ab", b"cd"], frames=2)
    bad_bot.PixelData = (
        b"\xfe\xff\x00\xe0\x04\x00\x00\x00\x00\x00\x00\x00" + bytes(bad_bot.PixelData)[8:]
    )
    assert _status(bad_bot, jpeg) == encaps_invalid  # one BOT entry for two frames


def test_parse_encapsulated_reports_structure() -> None:
    """Offsets are those of the fragments' item tags, from the first fragment."""
    parsed = validation.parse_encapsulated(encapsulate([b"abcd", b"ef"], has_bot=True))
    assert parsed.fragment_lengths == (4, 2)
    assert parsed.fragment_offsets == (0, 12)
    assert struct.unpack("<2I", parsed.basic_offset_table) == (0, 12)
    for broken, why in [
        (b"\xfe\xff\x00\xe0", "truncated"),
        (b"\x00\x00\x00\x00\x00\x00\x00\x00", "where an item was expected"),
        (b"\xfe\xff\x00\xe0\xff\xff\xff\xff", "undefined length"),
        (b"\xfe\xff\x00\xe0\x10\x00\x00\x00ab", "past the end"),
        (b"", "no Basic Offset Table"),
    ]:
        with pytest.raises(ValueError, match=why):
            validation.parse_encapsulated(broken)


def test_extended_offset_table(slices: list[Dataset]) -> None:
    """A consistent Extended Offset Table passes; one with the wrong count does not."""
    pixel_data, offsets, lengths = encapsulate_extended([b"ab", b"cd"])
    ds = _encapsulated(slices[0], [b"ab", b"cd"], frames=2)
    ds.PixelData = pixel_data
    ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
    assert _status(ds, uid.JPEG2000Lossless) is None
    ds.ExtendedOffsetTable = offsets[:8]
    assert _status(ds, uid.JPEG2000Lossless) == Status.PIXEL_DATA_ENCAPSULATION_INVALID


def test_enhanced_functional_group_rescale(slices: list[Dataset]) -> None:
    """Per-frame Pixel Value Transformation values are checked like top-level ones."""
    ds = copy.deepcopy(slices[0])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = "0", "-1024"
    item = Dataset()
    item.PixelValueTransformationSequence = Sequence([transform])
    ds.PerFrameFunctionalGroupsSequence = Sequence([item])
    ds.NumberOfFrames = 1
    refusal = validation.check_rescale(_wire(ds), 12)
    assert refusal is not None and refusal.status == Status.RESCALE_INVALID
    assert "frame 1" in refusal.reason
    ds.PerFrameFunctionalGroupsSequence = Sequence([item, item])
    assert _check(ds) == Status.IMAGE_PIXEL_MODULE_INCONSISTENT  # 2 items, 1 frame


def test_decoded_size_cap(slices: list[Dataset]) -> None:
    """Rows x Columns x frames x bytes over the cap is refused before anything else."""
    ds = _encapsulated(slices[0], [b"ab"])
    ds.Rows = ds.Columns = 4096
    refusal = validation.check_instance(_wire(ds), uid.JPEG2000Lossless, ds.SOPClassUID, CAP)
    assert refusal is not None and refusal.status == Status.OUT_OF_RESOURCES_DECODED_SIZE


def test_inflated_size_is_capped_while_inflating() -> None:
    """A deflate bomb is refused past the cap; corrupt or truncated streams are named."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(bytes(64 << 20)) + compressor.flush()
    assert len(bomb) < 100_000
    refusal = validation.check_inflated_size(bomb, CAP)
    assert refusal is not None and refusal.status == Status.OUT_OF_RESOURCES_INFLATED_SIZE
    assert validation.check_inflated_size(bomb, 64 << 20) is None
    corrupt = validation.check_inflated_size(b"\xff" * 64, CAP)
    assert corrupt is not None and corrupt.status == Status.DEFLATE_STREAM_INVALID
    truncated = validation.check_inflated_size(bomb[: len(bomb) // 2], 64 << 20)
    assert truncated is not None and truncated.status == Status.DEFLATE_STREAM_INVALID


def test_undecodable_element_is_named(slices: list[Dataset]) -> None:
    """An element whose bytes cannot be converted is refused naming its tag only."""
    data = encode(slices[0], False, True)
    assert data is not None
    at = data.find(b"\x28\x00\x10\x00")  # (0028,0010) Rows, US
    broken = data[: at + 6] + b"\x03\x00" + data[at + 8 :]  # length 3 for a US
    ds = decode(io.BytesIO(broken), False, True)
    refusal = validation.check_instance(ds, uid.ExplicitVRLittleEndian, uid.CTImageStorage, CAP)
    assert refusal is not None and refusal.status == Status.CANNOT_UNDERSTAND_UNDECODABLE
    assert "(0028,0010)" in refusal.reason


def test_spooled_dataset_hash_skips_file_meta(tmp_path: Path, slices: list[Dataset]) -> None:
    """The hash of a spooled file equals that of the dataset bytes alone."""
    path = tmp_path / "x.dcm"
    slices[0].save_as(path, enforce_file_format=True)
    body = encode(slices[0], False, True)
    assert body is not None
    assert spool.dataset_sha256(path) == hashlib.sha256(body).hexdigest()


def test_series_level_checks(slices: list[Dataset]) -> None:
    """One patient, study and frame of reference per series; reasons count instances and
    never show identifiers; undecodable slices and bad rescale values are named."""
    assert load_datasets(slices).frame_hu.shape[0] == len(slices)
    cases = [
        ("PatientID", "OTHER-PATIENT-ID", r"mixes 2 patients .*3 and 1 instances"),
        ("IssuerOfPatientID", "OTHER-ISSUER", r"mixes 2 patients"),
        ("StudyInstanceUID", "1.2.3.4", r"mixes 2 studies"),
        ("FrameOfReferenceUID", "1.2.3.5", r"mixes 2 frames of reference"),
    ]
    for keyword, value, reason in cases:
        datasets = copy.deepcopy(slices)
        setattr(datasets[2], keyword, value)
        with pytest.raises(VolumeLoadError, match=reason) as caught:
            load_datasets(datasets)
        assert value not in str(caught.value)
    broken = copy.deepcopy(slices)
    broken[1].PixelData = bytes(broken[1].PixelData)[:100]
    broken[3].RescaleSlope = "0"
    with pytest.raises(VolumeLoadError) as caught:
        load_datasets(broken)
    message = str(caught.value)
    assert message.startswith("2 of 4 instances cannot be used")
    for index in (1, 3):
        assert f"{broken[index].SOPInstanceUID} (InstanceNumber {index + 1})" in message
    missing = copy.deepcopy(slices)
    del missing[0].PixelData
    with pytest.raises(VolumeLoadError, match="1 of 4 instances carry no pixel data"):
        load_datasets(missing)


def test_rescale_overflow_is_refused_in_volume(slices: list[Dataset]) -> None:
    """A slope that makes HU values overflow float32 fails rather than giving inf."""
    datasets = copy.deepcopy(slices)
    datasets[0].RescaleSlope = "1e308"
    with pytest.raises(VolumeLoadError, match="overflows the HU values"):
        load_datasets(datasets)
    assert np.isfinite(load_datasets(slices).frame_hu).all()


def test_readme_status_table_matches_the_enum() -> None:
    """README's "C-STORE statuses" section holds exactly the table rendered from Status."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- status-table:start -->\n(.*?)\n<!-- status-table:end -->", text, re.S)
    assert found is not None, "README.md lacks the status table markers"
    assert found.group(1) == status_table_markdown(), (
        "README status table is stale; replace it with dicomnode.status.status_table_markdown()"
    )


def test_private_sequences_pass_in_both_vr_encodings(slices: list[Dataset]) -> None:
    """A private undefined-length sequence is walked, not refused, explicit or implicit;
    a bad length inside one is found."""
    ds = copy.deepcopy(slices[0])
    ds.add_new(0x00090010, "LO", "ACME")
    item = Dataset()
    item.add_new(0x00091001, "US", 7)
    ds.add_new(0x00091010, "SQ", Sequence([item]))
    ds[0x00091010].is_undefined_length = True
    assert _check(ds, uid.ImplicitVRLittleEndian) is None
    assert _check(ds) is None
    for undefined in (True, False):
        ds[0x00091010].is_undefined_length = undefined
        data = encode(ds, False, True)
        assert data is not None
        at = data.index(b"\x09\x00\x01\x10US")  # the nested private US
        broken = data[: at + 6] + b"\x03\x00" + data[at + 8 :]  # length 3
        try:  # undefined-length items are read at once: the receiver catches this
            parsed = decode(io.BytesIO(broken), False, True)
        except validation.DECODE_ERRORS:
            assert undefined
            continue
        refusal = validation.check_instance(parsed, uid.ExplicitVRLittleEndian, ds.SOPClassUID, CAP)
        assert refusal is not None and refusal.status == Status.CANNOT_UNDERSTAND_UNDECODABLE
        assert "(0009,1001)" in refusal.reason
