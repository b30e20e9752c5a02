"""The bad-input corpus, over real associations to a running node.

Every kind of malformed or conflicting instance is sent with a pynetdicom SCU, as bytes
we encoded (or corrupted) ourselves and sent unchanged from a Part 10 file, and must get
its own DIMSE status (and an Error Comment); series-level problems must fail their job
with their own reason. Meanwhile a good series is stored and processed, the node still
answers C-ECHO afterwards, and every acknowledged good instance is in the spool.
"""

from __future__ import annotations

import copy
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pynetdicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.dsutils import encode

from dicomnode.config import RouteMatch, RouteRule, default_config
from dicomnode.echo import echo
from dicomnode.node import JobSpec, Node
from dicomnode.records import JobState, SeriesState
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_series
from tests.support import free_port

ROWS = 32
MAX_INFLATED = 4 << 20
MAX_DECODED = 2 << 20
EXPLICIT, IMPLICIT = uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian
DEFLATED, RLE, J2K = uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless
CT, MR, SC = uid.CTImageStorage, uid.MRImageStorage, uid.SecondaryCaptureImageStorage
ENHANCED_CT = uid.EnhancedCTImageStorage


@dataclass
class Case:
    """One C-STORE to send: the context it goes on, the bytes, the status expected."""

    name: str
    body: bytes
    expected: Status
    sop_uid: str
    sop_class: str = CT
    syntax: str = EXPLICIT
    answered: int | None = None
    comment: str = field(default="")
    sent_at: float = 0.0


def load_then_copy(spec: JobSpec) -> list[Path]:
    """A stand-in pipeline: load the series as the real ones do (series-level checks
    included), then return a copy of its first instance."""
    load_series(spec.instance_paths)
    result = spec.output_dir / "result.dcm"
    shutil.copy(spec.instance_paths[0], result)
    return [result]


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    """A node on a free port routing CT HEAD series to :func:`load_then_copy`, with small
    inflate and decode caps."""
    config = default_config(tmp_path, free_port())
    config.routes = [
        RouteRule(
            name="head",
            match=RouteMatch(modality=["CT"], body_part_examined=["HEAD"]),
            pipeline="copy",
            destinations=[],
        )
    ]
    config.stable_age_s = 0.5
    config.poll_interval_s = 0.05
    config.limits.max_inflated_bytes = MAX_INFLATED
    config.limits.max_decoded_bytes = MAX_DECODED
    with Node(config, load_then_copy) as running:
        yield running


def _body(ds: Dataset, syntax: str = EXPLICIT) -> bytes:
    """``ds`` encoded in ``syntax`` as a peer would put it on the wire."""
    ts = uid.UID(syntax)
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert data is not None
    return data


def _fresh(base: Dataset) -> Dataset:
    """A copy of ``base`` in a series of its own with a new SOP Instance UID."""
    ds = copy.deepcopy(base)
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.SOPInstanceUID = uid.generate_uid()
    return ds


def _case(
    name: str,
    base: Dataset,
    change: Callable[[Dataset], None],
    expected: Status,
    sop_class: str = CT,
    syntax: str = EXPLICIT,
) -> Case:
    """A case built by changing a fresh copy of ``base`` and encoding it."""
    ds = _fresh(base)
    change(ds)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    return Case(name, _body(ds, syntax), expected, sop_uid, sop_class=sop_class, syntax=syntax)


def _set(**values: object) -> Callable[[Dataset], None]:
    """A change setting attributes (``None`` deletes one)."""

    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return change


def _encapsulated(fragments: list[bytes], frames: int = 1, **more: object) -> Callable[..., None]:
    """A change giving encapsulated Pixel Data made of ``fragments``."""

    def change(ds: Dataset) -> None:
        ds.PixelData = encapsulate(fragments, has_bot=False)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.NumberOfFrames = frames
        _set(**more)(ds)

    return change


def _raw_pixel_data(value: bytes) -> Callable[[Dataset], None]:
    """A change giving undefined-length Pixel Data holding exactly ``value``."""

    def change(ds: Dataset) -> None:
        ds.PixelData = value
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    return change


def _enhanced(base: Dataset, per_frame: list[Dataset], frames: int) -> Callable[[Dataset], None]:
    """A change making an Enhanced CT-like instance with these per-frame groups."""

    def change(ds: Dataset) -> None:
        ds.SOPClassUID = ENHANCED_CT
        ds.NumberOfFrames = frames
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.PixelData = bytes(base.PixelData) * frames

    return change


def _transform(slope: str) -> Dataset:
    """A per-frame functional group item holding a Pixel Value Transformation."""
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = slope, "-1024"
    transform.RescaleType = "HU"
    item = Dataset()
    item.PixelValueTransformationSequence = Sequence([transform])
    return item


def _bytes_case(name: str, base: Dataset, cut: Callable[[bytes], bytes], expected: Status) -> Case:
    """A case whose encoded bytes are corrupted by ``cut``."""
    ds = _fresh(base)
    return Case(name, cut(_body(ds)), expected, str(ds.SOPInstanceUID))


def _patch_at(tag: bytes, offset: int, new: bytes) -> Callable[[bytes], bytes]:
    """Corrupt the bytes at ``offset`` after the first occurrence of ``tag``."""

    def cut(data: bytes) -> bytes:
        at = data.index(tag) + offset
        return data[:at] + new + data[at + len(new) :]

    return cut


def _with_private_sequence(base: Dataset) -> Dataset:
    """``base`` with a private undefined-length sequence holding one US element."""
    ds = copy.deepcopy(base)
    ds.add_new(0x00090010, "LO", "ACME")
    item = Dataset()
    item.add_new(0x00091001, "US", 7)
    ds.add_new(0x00091010, "SQ", Sequence([item]))
    ds[0x00091010].is_undefined_length = True
    return ds


def _deflate(data: bytes) -> bytes:
    """A raw deflate stream of ``data``."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _deflate_bomb(base: Dataset, inflated_bytes: int) -> bytes:
    """A deflated dataset whose Pixel Data inflates to ``inflated_bytes`` of zeros."""
    header = copy.deepcopy(base)
    del header.PixelData
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(_body(header))]
    parts.append(
        compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", inflated_bytes))
    )
    chunk = bytes(1 << 20)
    for _ in range(inflated_bytes // len(chunk)):
        parts.append(compressor.compress(chunk))
    return b"".join(parts) + compressor.flush()


PIXEL_TAG, ROWS_TAG, MODALITY_TAG = b"\xe0\x7f\x10\x00", b"\x28\x00\x10\x00", b"\x08\x00\x60\x00"
SLOPE_TAG = b"\x28\x00\x53\x10"
EMPTY_ITEM = BOT = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an item of length 0


def instance_cases(base: Dataset) -> list[Case]:
    """Every instance-level bad input (and a few good controls), with its status."""
    pixels = bytes(base.PixelData)
    fixed_uid = _fresh(base)
    cases = [
        _case("good control", base, _set(), Status.SUCCESS),
        _case("good, implicit VR", base, _set(), Status.SUCCESS, syntax=IMPLICIT),
        _case("good, big endian", base, _set(), Status.SUCCESS, syntax=uid.ExplicitVRBigEndian),
        _case("good, deflated", base, _set(), Status.SUCCESS, syntax=DEFLATED),
        _case(
            "good, secondary capture OT",
            base,
            _set(SOPClassUID=SC, Modality="OT"),
            Status.SUCCESS,
            sop_class=SC,
        ),
        _case(
            "pixel data truncated by 2 bytes",
            base,
            _set(PixelData=pixels[:-2]),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case(
            "pixel data half its length",
            base,
            _set(PixelData=pixels[: len(pixels) // 2]),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case(
            "pixel data 4 bytes too long",
            base,
            _set(PixelData=pixels + bytes(4)),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case("zero-length pixel data", base, _set(PixelData=b""), Status.PIXEL_DATA_EMPTY),
        _case("no pixel data", base, _set(PixelData=None), Status.PIXEL_DATA_MISSING),
        _case(
            "rows do not match the data",
            base,
            _set(Rows=ROWS + 2),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case(
            "columns do not match the data",
            base,
            _set(Columns=ROWS // 2),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case(
            "8 bits allocated for 16-bit data",
            base,
            _set(BitsAllocated=8, BitsStored=8, HighBit=7),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case(
            "3 frames declared for one",
            base,
            _set(NumberOfFrames=3),
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _case("zero rows", base, _set(Rows=0), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
        _case("no columns", base, _set(Columns=None), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
        _case(
            "bits allocated 12",
            base,
            _set(BitsAllocated=12),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "bits stored over bits allocated",
            base,
            _set(BitsStored=20, HighBit=19),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "high bit not bits stored - 1",
            base,
            _set(HighBit=15),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "3 samples for MONOCHROME2",
            base,
            _set(SamplesPerPixel=3),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "RGB with one sample",
            base,
            _set(PhotometricInterpretation="RGB"),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "no photometric interpretation",
            base,
            _set(PhotometricInterpretation=None),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case(
            "pixel representation 2",
            base,
            _set(PixelRepresentation=2),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
        ),
        _case("zero frames", base, _set(NumberOfFrames=0), Status.IMAGE_PIXEL_MODULE_INCONSISTENT),
        _case("rescale slope NaN", base, _set(RescaleSlope="NaN"), Status.RESCALE_INVALID),
        _case("rescale slope inf", base, _set(RescaleSlope="inf"), Status.RESCALE_INVALID),
        _case("rescale slope 0", base, _set(RescaleSlope="0"), Status.RESCALE_INVALID),
        _case("rescale slope -0", base, _set(RescaleSlope="-0"), Status.RESCALE_INVALID),
        _case("rescale slope 1e308", base, _set(RescaleSlope="1e308"), Status.RESCALE_INVALID),
        _case("rescale slope negative", base, _set(RescaleSlope="-1"), Status.RESCALE_INVALID),
        _bytes_case(
            "rescale slope not a number",
            base,
            _patch_at(SLOPE_TAG, 8, b"ab"),
            Status.RESCALE_INVALID,
        ),
        _case(
            "rescale slope two values", base, _set(RescaleSlope=["1", "2"]), Status.RESCALE_INVALID
        ),
        _case("rescale intercept NaN", base, _set(RescaleIntercept="NaN"), Status.RESCALE_INVALID),
        _case(
            "per-frame rescale slope 0 (enhanced)",
            base,
            _enhanced(base, [_transform("1"), _transform("0")], 2),
            Status.RESCALE_INVALID,
            sop_class=ENHANCED_CT,
        ),
        _case(
            "per-frame groups do not match frames",
            base,
            _enhanced(base, [_transform("1")], 2),
            Status.IMAGE_PIXEL_MODULE_INCONSISTENT,
            sop_class=ENHANCED_CT,
        ),
        _case(
            "no SOP Instance UID",
            base,
            _set(SOPInstanceUID=None),
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
        _case(
            "SOP Instance UID of 65 characters",
            base,
            _set(SOPInstanceUID="1." + "2" * 63),
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
        _case(
            "series UID with a path",
            base,
            _set(SeriesInstanceUID="../../etc"),
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
        _case(
            "no study UID",
            base,
            _set(StudyInstanceUID=None),
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
        _case(
            "SOP class differs from the context",
            base,
            _set(),
            Status.SOP_CLASS_DIFFERS_FROM_CONTEXT,
            sop_class=MR,
        ),
        _case(
            "no SOP class UID", base, _set(SOPClassUID=None), Status.SOP_CLASS_DIFFERS_FROM_CONTEXT
        ),
        _case(
            "MR modality in a CT class",
            base,
            _set(Modality="MR"),
            Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
        ),
        _case(
            "CT modality in an MR class",
            base,
            _set(SOPClassUID=MR),
            Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
            sop_class=MR,
        ),
        _case("no modality", base, _set(Modality=None), Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS),
        _case(
            "decoded size over the cap",
            base,
            _encapsulated([b"\x01\x00"], Rows=2048, Columns=2048),
            Status.OUT_OF_RESOURCES_DECODED_SIZE,
            syntax=RLE,
        ),
        _case(
            "native syntax, encapsulated data",
            base,
            _encapsulated([pixels]),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
        ),
        _case(
            "compressed syntax, native data",
            base,
            _set(),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=J2K,
        ),
        _case(
            "encapsulated, empty fragment",
            base,
            _raw_pixel_data(BOT + b"\xfe\xff\x00\xe0\x02\x00\x00\x00ab" + EMPTY_ITEM),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=J2K,
        ),
        _case(
            "encapsulated, no fragment",
            base,
            _raw_pixel_data(b"\xfe\xff\x00\xe0\x00\x00\x00\x00"),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=J2K,
        ),
        _case(
            "encapsulated, item runs past the end",
            base,
            _raw_pixel_data(b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\x40\x00\x00\x00ab"),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=J2K,
        ),
        _case(
            "encapsulated, fewer fragments than frames",
            base,
            _encapsulated([b"ab"], frames=3),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=J2K,
        ),
        _case(
            "RLE, two fragments for one frame",
            base,
            _encapsulated([b"ab", b"cd"]),
            Status.PIXEL_DATA_ENCAPSULATION_INVALID,
            syntax=RLE,
        ),
        _bytes_case(
            "dataset truncated inside pixel data",
            base,
            lambda b: b[:-1000],
            Status.PIXEL_DATA_LENGTH_MISMATCH,
        ),
        _bytes_case(
            "dataset truncated inside the pixel data header",
            base,
            lambda b: b[: b.index(PIXEL_TAG) + 6],
            Status.PIXEL_DATA_MISSING,
        ),
        _bytes_case(
            "Rows with a 3-byte length",
            base,
            _patch_at(ROWS_TAG, 6, b"\x03\x00"),
            Status.CANNOT_UNDERSTAND_UNDECODABLE,
        ),
        _bytes_case(
            "Modality with an unknown VR",
            base,
            _patch_at(MODALITY_TAG, 4, b"ZZ"),
            Status.CANNOT_UNDERSTAND_UNDECODABLE,
        ),
        _bytes_case(
            "corrupt item in a nested sequence",
            _with_private_sequence(base),
            _patch_at(b"\x09\x00\x01\x10US", 6, b"\x03\x00"),
            Status.CANNOT_UNDERSTAND_UNDECODABLE,
        ),
        _bytes_case(
            "garbage bytes",
            base,
            lambda b: b"\x00\x01 not a dataset at all",
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
        Case(
            "deflate bomb",
            _deflate_bomb(fixed_uid, 4 * MAX_INFLATED),
            Status.OUT_OF_RESOURCES_INFLATED_SIZE,
            str(fixed_uid.SOPInstanceUID),
            syntax=DEFLATED,
        ),
        Case(
            "corrupt deflate stream",
            b"\xff" * 256,
            Status.DEFLATE_STREAM_INVALID,
            uid.generate_uid(),
            syntax=DEFLATED,
        ),
        Case(
            "truncated deflate stream",
            _deflate(_body(_fresh(base)))[:500],
            Status.DEFLATE_STREAM_INVALID,
            uid.generate_uid(),
            syntax=DEFLATED,
        ),
    ]
    return cases


def _part10(folder: Path, index: int, case: Case) -> Path:
    """A Part 10 file holding ``case.body`` unchanged, meta naming its context."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.UID(case.sop_class)
    meta.MediaStorageSOPInstanceUID = uid.UID(
        case.sop_uid if 0 < len(case.sop_uid) <= 64 else "1.2.3"
    )
    meta.TransferSyntaxUID = uid.UID(case.syntax)
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = folder / f"{index:03d}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + case.body)
    return path


def send_cases(node: Node, cases: list[Case], folder: Path) -> None:
    """Send every case on one association, recording status and Error Comment."""
    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="PYNETDICOM")
    for context in sorted({(c.sop_class, c.syntax) for c in cases}):
        ae.add_requested_context(context[0], context[1])
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for index, case in enumerate(cases):
            case.sent_at = time.time()
            response = assoc.send_c_store(_part10(folder, index, case))
            assert "Status" in response, f"{case.name}: no response"
            case.answered = int(response.Status)
            case.comment = str(response.get("ErrorComment", ""))
    finally:
        assoc.release()


def _series(count: int) -> list[Dataset]:
    """``count`` synthetic slices in a new series, with fresh SOP Instance UIDs."""
    series_uid = uid.generate_uid()
    datasets = synthetic_head_ct(7, n_slices=count, rows=ROWS)
    for ds in datasets:
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, uid.generate_uid()
    return datasets


def _series_cases(
    series: list[Dataset], name: str, expected: Status = Status.SUCCESS
) -> list[Case]:
    """Cases sending each instance of ``series`` as is."""
    return [
        Case(f"{name} {i}", _body(ds), expected, str(ds.SOPInstanceUID))
        for i, ds in enumerate(series)
    ]


def _rle_garbage(ds: Dataset) -> Case:
    """``ds`` in RLE with one non-empty fragment that is not an RLE image: it passes the
    receiver's structural checks and fails decoding in the job."""
    broken = copy.deepcopy(ds)
    _encapsulated([b"\x01\x00\x00\x00" + bytes(60)])(broken)
    del broken.NumberOfFrames
    return Case(
        "undecodable slice", _body(broken), Status.SUCCESS, str(ds.SOPInstanceUID), syntax=RLE
    )


SERIES_PROBLEMS: dict[str, tuple[str, str | None]] = {
    # name: (attribute changed on one slice, job failure reason expected)
    "two patients": (
        "PatientID",
        "mixes 2 patients (PatientID / IssuerOfPatientID differ: 2 and 1",
    ),
    "two issuers": ("IssuerOfPatientID", "mixes 2 patients"),
    "two studies": ("StudyInstanceUID", "mixes 2 studies (StudyInstanceUID differ: 2 and 1"),
    "two frames of reference": ("FrameOfReferenceUID", "mixes 2 frames of reference"),
    "two slices on one plane": ("ImagePositionPatient", "two frames lie on the same plane"),
    "undecodable slice": ("PixelData", "1 of 3 instances cannot be used"),
}


def test_bad_input_corpus(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bad input gets its own status or job failure reason; nothing good is lost."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    base = synthetic_head_ct(5, n_slices=1, rows=ROWS)[0]
    good = _series(4)
    identity = _series(3)
    cases = instance_cases(base)
    cases[10:10] = _series_cases(good, "good series")
    problem_series: dict[str, list[Dataset]] = {}
    for name, (keyword, _) in SERIES_PROBLEMS.items():
        series = _series(3)
        problem_series[name] = series
        if keyword == "ImagePositionPatient":
            series[1].ImagePositionPatient = series[0].ImagePositionPatient
        elif keyword != "PixelData":
            setattr(series[1], keyword, uid.generate_uid() if "UID" in keyword else "OTHER")
        sent = _series_cases(series, name)
        if keyword == "PixelData":
            sent[1] = _rle_garbage(series[1])
        cases += sent
    cases += _series_cases(identity, "identity series")
    moved = copy.deepcopy(identity[0])
    moved.SeriesInstanceUID = uid.generate_uid()
    other_study = copy.deepcopy(identity[0])
    other_study.StudyInstanceUID = uid.generate_uid()
    changed = copy.deepcopy(identity[2])
    changed.WindowCenter = "35"
    cases += [
        Case(
            "UID already in another series",
            _body(moved),
            Status.DUPLICATE_SOP_INSTANCE,
            str(moved.SOPInstanceUID),
        ),
        Case(
            "UID already in another study",
            _body(other_study),
            Status.DUPLICATE_SOP_INSTANCE,
            str(other_study.SOPInstanceUID),
        ),
        Case(
            "UID re-sent with identical bytes",
            _body(identity[1]),
            Status.SUCCESS,
            str(identity[1].SOPInstanceUID),
        ),
        Case(
            "UID re-sent with different bytes",
            _body(changed),
            Status.SUCCESS,
            str(changed.SOPInstanceUID),
        ),
        Case(
            "good series instance re-sent identical",
            _body(good[0]),
            Status.SUCCESS,
            str(good[0].SOPInstanceUID),
        ),
    ]
    # Let the identity series be stored (and identical re-sends compared) before the
    # identity cases: they are sent in order on one association, so this holds.
    send_cases(node, cases, tmp_path / "corpus")

    wrong = [
        f"{c.name}: 0x{c.answered or 0:04X} (expected 0x{c.expected:04X}, {c.comment})"
        for c in cases
        if c.answered != c.expected
    ]
    assert not wrong, "\n".join(wrong)
    bad_kinds = {c.name for c in cases if c.expected != Status.SUCCESS}
    assert len(bad_kinds) + len(SERIES_PROBLEMS) + 2 >= 40  # + identical/different re-send
    assert all(c.comment for c in cases if c.expected != Status.SUCCESS)
    assert node.wait_idle(timeout=20)
    assert echo("127.0.0.1", node.config.node.port, "DICOMNODE", "PYNETDICOM")

    store = node.store
    assert store is not None
    spooled = {p.name for p in node.config.spool_dir.rglob("*.dcm")}
    for case in cases:
        stored = store.instance_path(case.sop_uid) if case.sop_uid else None
        if case.expected == Status.SUCCESS:
            assert stored is not None and stored.is_file(), case.name
        elif case.expected != Status.DUPLICATE_SOP_INSTANCE:
            assert stored is None and f"{case.sop_uid}.dcm" not in spooled, case.name
    # the duplicate stays in its first series, the other series never appears
    kept = store.instance_path(str(identity[0].SOPInstanceUID))
    assert kept is not None and kept.parent.name == str(identity[0].SeriesInstanceUID)
    assert store.get_series(str(moved.SeriesInstanceUID)) is None
    assert len(list(node.config.spool_dir.rglob(f"{identity[0].SOPInstanceUID}.dcm"))) == 1

    jobs = {job.series_instance_uid: job for job in node.jobs.all()}
    good_series = store.get_series(str(good[0].SeriesInstanceUID))
    assert good_series is not None and good_series.instance_count == len(good)
    assert good_series.state is SeriesState.ROUTED and good_series.content_changes == 0
    assert (
        sum(j.series_instance_uid == good_series.series_instance_uid for j in node.jobs.all()) == 1
    )
    assert jobs[good_series.series_instance_uid].state is JobState.DONE
    identity_series = store.get_series(str(identity[0].SeriesInstanceUID))
    assert identity_series is not None and identity_series.content_changes == 1
    assert identity_series.instance_count == len(identity)
    assert jobs[identity_series.series_instance_uid].state is JobState.DONE
    resent = next(c for c in cases if c.name == "UID re-sent with identical bytes")
    unchanged_path = store.instance_path(resent.sop_uid)
    assert unchanged_path is not None and unchanged_path.stat().st_mtime < resent.sent_at
    changed_path = store.instance_path(str(changed.SOPInstanceUID))
    assert changed_path is not None and changed_path.read_bytes().endswith(_body(changed))
    for name, (_, reason) in SERIES_PROBLEMS.items():
        job = jobs[str(problem_series[name][0].SeriesInstanceUID)]
        assert job.state is JobState.FAILED, name
        assert reason is not None and reason in (job.reason or ""), (name, job.reason)
    undecodable = str(problem_series["undecodable slice"][1].SOPInstanceUID)
    assert undecodable in (
        jobs[str(problem_series["undecodable slice"][0].SeriesInstanceUID)].reason or ""
    )
