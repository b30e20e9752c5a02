"""Fuzz run: mutated datasets over real C-STORE associations and mutated PDUs over raw
TCP, sent to a node on loopback; then checks that the node still serves.

Datasets: instances of a generated head CT (``pipelines.synthetic``), encoded Explicit VR
Little Endian, then mutated as bytes (bit flips anywhere or in the header, truncation
anywhere or inside the pixel data, an element's length field, VR or tag rewritten,
garbage inserted), as values (Rows, Columns, BitsAllocated, SamplesPerPixel,
NumberOfFrames, PixelData length, RescaleSlope/Intercept NaN/inf/0, Modality, UIDs,
PatientID) or as transfer syntax (bytes declared as another syntax, a deflated stream
with flipped bits, a small deflate bomb, a SOP class the data does not have). Each is sent
exactly as mutated: pynetdicom streams the bytes of the file without decoding them.

PDUs: A-ASSOCIATE-RQ with flipped bits, wrong lengths, wrong item types or truncated;
PDUs of every type number as the first PDU; and, inside an accepted association,
P-DATA-TF with corrupted PDU or PDV lengths, context IDs, message control headers and
command bytes, or an unexpected PDU.

Everything is seeded (``--seed``) and bounded (``--datasets``, ``--pdus``,
``--time-limit``). It records the status histogram (overall and per mutation), the PDU
replies, node crashes (the process exiting, tracebacks or non-JSON lines in its log),
whether the node answers C-ECHO and stores a valid series afterwards (every instance
Success and recorded in its state), and its peak resident memory.

Run from the repository root (2 shared cores: about 6-9 minutes at the defaults)::

    .venv/bin/python -m bench.fuzz --datasets 10000 --pdus 2000 --seed 0

It writes ``bench/results/fuzz-<UTC time>.json``; exit status 0 when the node never
crashed and still served afterwards.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF

from bench.peers import (
    NODE_AE,
    REPO,
    STORESCU,
    VERIFICATION,
    NodeProcess,
    echo_ok,
    free_port,
    log_summary,
    missing_tools,
    node_config_toml,
    peak_rss_mb,
    progress,
    state_rows,
    store_files,
    wait_idle,
    write_results,
)
from pipelines.synthetic import synthetic_head_ct, write_series

RESULTS_DIR = REPO / "bench" / "results"
FUZZ_AE = "FUZZSCU"
SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
)
CLASSES = (uid.CTImageStorage, uid.MRImageStorage)
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ALL_VRS = (
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV", b"\x00\x00", b"zz",
)  # fmt: skip
PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)
ASSOCIATE_RQ, ASSOCIATE_AC = 0x01, 0x02
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}  # fmt: skip
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.9999.1"
NOT_ACCEPTED = "association not accepted"
PDATA_SHARE = 0.5  # of the PDU cases, the first half are P-DATA-TF inside an association


@dataclass(frozen=True)
class Settings:
    """One run's parameters."""

    datasets: int = 10_000
    pdus: int = 2_000
    seed: int = 0
    rows: int = 64
    slices: int = 8
    time_limit_s: float = 900.0
    per_association: int = 250
    bomb_mb: int = 32
    recovery_timeout_s: float = 120.0
    pdu_wait_budget_s: float = 120.0
    work: Path | None = None
    results_dir: Path = RESULTS_DIR


@dataclass(frozen=True)
class Case:
    """One mutated instance: bytes after the file meta, and what the file meta declares."""

    kind: str
    data: bytes
    sop_class: str
    sop_instance: str
    syntax: str


@dataclass(frozen=True)
class Element:
    """Where one top-level element of an Explicit VR Little Endian stream lies."""

    offset: int
    vr: bytes
    header: int
    length: int


def elements(data: bytes) -> list[Element]:
    """The top-level elements of an Explicit VR Little Endian stream (defined lengths)."""
    found: list[Element] = []
    offset = 0
    while offset + 8 <= len(data):
        vr = data[offset + 4 : offset + 6]
        if vr in LONG_LENGTH_VRS:
            if offset + 12 > len(data):
                break
            header, length = 12, struct.unpack_from("<I", data, offset + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", data, offset + 6)[0]
        if length == 0xFFFFFFFF:
            break
        found.append(Element(offset, vr, header, length))
        offset += header + length
    return found


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    """A dataset's bytes (no file meta) in the given encoding."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, ds)
    return buffer.getvalue()


class Mutator:
    """Seeded mutations of one base series; each method returns a :class:`Case`."""

    def __init__(self, base: Sequence[Dataset], rng: np.random.Generator, bomb_mb: int) -> None:
        """Keep the base datasets and their Explicit VR Little Endian bytes."""
        self.base = list(base)
        self.encoded = [encode(ds) for ds in self.base]
        self.rng = rng
        self.bomb_mb = bomb_mb
        self.kinds: dict[str, Callable[[int], Case]] = {
            "bitflip": self.bitflip,
            "bitflip_header": self.bitflip_header,
            "truncate": self.truncate,
            "truncate_pixels": self.truncate_pixels,
            "length_field": self.length_field,
            "vr": self.vr,
            "tag": self.tag,
            "insert_garbage": self.insert_garbage,
            "value": self.value,
            "syntax_mismatch": self.syntax_mismatch,
            "deflate_flip": self.deflate_flip,
            "sop_class_mismatch": self.sop_class_mismatch,
            "deflate_bomb": self.deflate_bomb,
        }
        # a bomb is rare: it is the one kind that is large
        self.weights = np.array([1.0 if k != "deflate_bomb" else 0.05 for k in self.kinds])
        self.weights /= self.weights.sum()

    def draw(self) -> Case:
        """A random mutation of a random base instance."""
        kind = list(self.kinds)[int(self.rng.choice(len(self.kinds), p=self.weights))]
        return self.kinds[kind](int(self.rng.integers(len(self.base))))

    def _case(self, kind: str, index: int, data: bytes, syntax: str = uid.ExplicitVRLittleEndian,
              sop_class: str = uid.CTImageStorage) -> Case:  # fmt: skip
        """A case declaring the base instance's SOP Instance UID."""
        return Case(kind, data, sop_class, str(self.base[index].SOPInstanceUID), syntax)

    def _flip(self, data: bytes, start: int, end: int) -> bytes:
        """Flip 1 to 16 random bits in ``data[start:end]``."""
        out = bytearray(data)
        for _ in range(int(self.rng.integers(1, 17))):
            bit = int(self.rng.integers(start * 8, max(end * 8, start * 8 + 1)))
            out[min(bit // 8, len(out) - 1)] ^= 1 << (bit % 8)
        return bytes(out)

    def _pixel_offset(self, index: int) -> int:
        """Offset of the Pixel Data element in the base bytes."""
        return self.encoded[index].find(PIXEL_DATA_TAG)

    def _element(self, index: int) -> Element:
        """A random top-level element of a base instance."""
        found = elements(self.encoded[index])
        return found[int(self.rng.integers(len(found)))]

    def bitflip(self, index: int) -> Case:
        """Bits flipped anywhere."""
        data = self.encoded[index]
        return self._case("bitflip", index, self._flip(data, 0, len(data)))

    def bitflip_header(self, index: int) -> Case:
        """Bits flipped before the pixel data (tags, VRs, lengths, values)."""
        data = self.encoded[index]
        return self._case("bitflip_header", index, self._flip(data, 0, self._pixel_offset(index)))

    def truncate(self, index: int) -> Case:
        """Cut anywhere."""
        data = self.encoded[index]
        return self._case("truncate", index, data[: int(self.rng.integers(0, len(data)))])

    def truncate_pixels(self, index: int) -> Case:
        """Cut inside the pixel data value, or just after its header."""
        data = self.encoded[index]
        start = self._pixel_offset(index) + 12
        return self._case(
            "truncate_pixels", index, data[: int(self.rng.integers(start, len(data)))]
        )

    def length_field(self, index: int) -> Case:
        """One element's length rewritten: 0, odd, off by one, undefined, huge, random."""
        element = self._element(index)
        data = bytearray(self.encoded[index])
        long = element.header == 12
        limit = 0xFFFFFFFF if long else 0xFFFF
        choices = [0, 1, element.length + 1, max(element.length - 1, 0), limit, limit // 2,
                   int(self.rng.integers(0, limit))]  # fmt: skip
        new = choices[int(self.rng.integers(len(choices)))]
        if long:
            struct.pack_into("<I", data, element.offset + 8, new)
        else:
            struct.pack_into("<H", data, element.offset + 6, new)
        return self._case("length_field", index, bytes(data))

    def vr(self, index: int) -> Case:
        """One element's VR replaced by another (changing how its length is read)."""
        element = self._element(index)
        data = bytearray(self.encoded[index])
        data[element.offset + 4 : element.offset + 6] = ALL_VRS[
            int(self.rng.integers(len(ALL_VRS)))
        ]
        return self._case("vr", index, bytes(data))

    def tag(self, index: int) -> Case:
        """One element's tag replaced: random, out of order, a duplicate or a group length."""
        element = self._element(index)
        data = bytearray(self.encoded[index])
        choices = [
            (int(self.rng.integers(0, 0x10000)), int(self.rng.integers(0, 0x10000))),
            (0x0008, 0x0000), (0x7FE0, 0x0010), (0xFFFE, 0xE000), (0x0002, 0x0010),
            (0x0010, 0x0010),
        ]  # fmt: skip
        group, elem = choices[int(self.rng.integers(len(choices)))]
        struct.pack_into("<HH", data, element.offset, group, elem)
        return self._case("tag", index, bytes(data))

    def insert_garbage(self, index: int) -> Case:
        """Random bytes inserted between two elements."""
        element = self._element(index)
        data = self.encoded[index]
        junk = self.rng.bytes(int(self.rng.integers(1, 64)))
        return self._case(
            "insert_garbage", index, data[: element.offset] + junk + data[element.offset :]
        )

    def value(self, index: int) -> Case:
        """A value made inconsistent with the rest (pixel geometry, rescale, UIDs ...)."""
        ds = copy.deepcopy(self.base[index])
        rows = int(ds.Rows)
        edits: list[Callable[[Dataset], None]] = [
            lambda d: setattr(d, "Rows", rows * 2),
            lambda d: setattr(d, "Columns", rows + 1),
            lambda d: setattr(d, "Rows", 0),
            lambda d: setattr(d, "BitsAllocated", 8),
            lambda d: setattr(d, "BitsAllocated", 32),
            lambda d: setattr(d, "BitsStored", 40),
            lambda d: setattr(d, "SamplesPerPixel", 3),
            lambda d: setattr(d, "NumberOfFrames", 7),
            lambda d: setattr(d, "PixelData", b""),
            lambda d: setattr(d, "PixelData", bytes(d.PixelData)[:-2]),
            lambda d: setattr(d, "PixelData", bytes(d.PixelData) + b"\0\0\0\0"),
            lambda d: setattr(d, "RescaleSlope", "NaN"),
            lambda d: setattr(d, "RescaleSlope", "1e308"),
            lambda d: setattr(d, "RescaleSlope", "0"),
            lambda d: setattr(d, "RescaleSlope", "-1"),
            lambda d: setattr(d, "RescaleIntercept", "inf"),
            lambda d: setattr(d, "Modality", "MR"),
            lambda d: setattr(d, "Modality", ""),
            lambda d: setattr(d, "SOPClassUID", uid.MRImageStorage),
            lambda d: setattr(d, "SOPInstanceUID", "1.2.3.abc"),
            lambda d: setattr(d, "SeriesInstanceUID", "9" * 70),
            lambda d: setattr(d, "StudyInstanceUID", ""),
            lambda d: delattr(d, "SOPInstanceUID"),
            lambda d: delattr(d, "PixelData"),
            lambda d: setattr(d, "PatientID", "OTHER-PATIENT"),
            lambda d: setattr(d, "PatientName", "X" * 5000),
            lambda d: setattr(d, "ImageType", ["DERIVED", "SECONDARY", "LOCALIZER"]),
            lambda d: setattr(d, "ImagePositionPatient", ["nan", "0", "0"]),
            lambda d: setattr(d, "PixelSpacing", ["0", "0"]),
            lambda d: setattr(d, "PhotometricInterpretation", "YBR_FULL"),
        ]
        with warnings.catch_warnings():  # the values are meant to be invalid
            warnings.simplefilter("ignore")
            edits[int(self.rng.integers(len(edits)))](ds)
            return self._case("value", index, encode(ds))

    def syntax_mismatch(self, index: int) -> Case:
        """Bytes of one transfer syntax declared as another."""
        data = self.encoded[index]
        choice = int(self.rng.integers(3))
        if choice == 0:
            return self._case("syntax_mismatch", index, data, uid.ImplicitVRLittleEndian)
        if choice == 1:
            return self._case("syntax_mismatch", index, data, uid.ExplicitVRBigEndian)
        return self._case("syntax_mismatch", index, data, uid.DeflatedExplicitVRLittleEndian)

    def deflate_flip(self, index: int) -> Case:
        """A valid deflated stream with bits flipped, or cut short."""
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = compressor.compress(self.encoded[index]) + compressor.flush()
        if self.rng.random() < 0.5:
            stream = self._flip(stream, 0, len(stream))
        else:
            stream = stream[: int(self.rng.integers(0, len(stream)))]
        return self._case("deflate_flip", index, stream, uid.DeflatedExplicitVRLittleEndian)

    def sop_class_mismatch(self, index: int) -> Case:
        """A CT instance sent under the MR Image Storage context."""
        return self._case("sop_class_mismatch", index, self.encoded[index],
                          sop_class=uid.MRImageStorage)  # fmt: skip

    def deflate_bomb(self, index: int) -> Case:
        """A deflated dataset whose private OB element inflates to ``bomb_mb`` MiB."""
        head = self.encoded[index][: self._pixel_offset(index)]
        size = self.bomb_mb * 1024 * 1024
        element = struct.pack("<HH2sHI", 0x0099, 0x1010, b"OB", 0, size)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = compressor.compress(head + element)
        chunk = bytes(1024 * 1024)
        for _ in range(self.bomb_mb):
            stream += compressor.compress(chunk)
        stream += compressor.flush()
        return self._case("deflate_bomb", index, stream, uid.DeflatedExplicitVRLittleEndian)


def part10_file(case: Case, path: Path) -> Path:
    """Write the case as a Part 10 file: a valid file meta, then the mutated bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.UID(case.sop_class)
    meta.MediaStorageSOPInstanceUID = uid.UID(case.sop_instance)
    meta.TransferSyntaxUID = uid.UID(case.syntax)
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + case.data)
    return path


def _no_delay(event: Event) -> None:
    """Turn Nagle's algorithm off on the sending socket (else ~40 ms per instance)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DatasetSender:
    """Sends cases over associations it re-opens when the node ends one."""

    def __init__(self, port: int, per_association: int) -> None:
        """Request one context per (SOP class, transfer syntax) so each is accepted."""
        self.port = port
        self.per_association = per_association
        self.ae = AE(ae_title=FUZZ_AE)
        for sop_class in CLASSES:
            for syntax in SYNTAXES:
                self.ae.add_requested_context(sop_class, [syntax])
        self.ae.acse_timeout = self.ae.network_timeout = 10.0
        self.ae.dimse_timeout = 30.0
        self.assoc: Association | None = None
        self.used = 0
        self.associations = 0
        self.not_established = 0

    def send(self, path: Path) -> str:
        """Send one file; the status as ``0xNNNN`` or why there is none."""
        if self.assoc is None or not self.assoc.is_established or self.used >= self.per_association:
            self.close()
            self.assoc = self.ae.associate(
                "127.0.0.1", self.port, ae_title=NODE_AE,
                evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
            )  # fmt: skip
            self.associations += 1
            self.used = 0
            if not self.assoc.is_established:
                self.not_established += 1
                self.assoc = None
                return "association not established"
        self.used += 1
        chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never decode them
        try:
            response = self.assoc.send_c_store(path)
        except (ValueError, AttributeError) as exc:
            return f"not sendable: {type(exc).__name__}"
        finally:  # pynetdicom's setting is process-wide: other senders must not inherit it
            _config.STORE_SEND_CHUNKED_DATASET = chunked
        status = response.get("Status") if response else None
        if status is None:
            return "no response (aborted or timed out)"
        return f"0x{int(status):04X}"

    def close(self) -> None:
        """Release the current association."""
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def _item(kind: int, body: bytes) -> bytes:
    """A PDU item or sub-item: type, reserved, 16-bit length, body."""
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: str = FUZZ_AE, called: str = NODE_AE) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification (context 1) and CT (context 3)."""
    contexts = b""
    for context_id, abstract in ((1, VERIFICATION), (3, uid.CTImageStorage)):
        body = bytes([context_id, 0, 0, 0]) + _item(0x30, abstract.encode())
        contexts += _item(0x20, body + _item(0x40, uid.ImplicitVRLittleEndian.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, IMPLEMENTATION_UID))
    body = (
        struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
        + bytes(32) + _item(0x10, APPLICATION_CONTEXT) + contexts + user
    )  # fmt: skip
    return struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + body


def echo_pdata(context_id: int = 1) -> bytes:
    """A valid P-DATA-TF carrying a C-ECHO-RQ command."""
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    out = b""
    for pdata in message.encode_msg(context_id, 16372):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += pdu.encode()
    return out


class PduFuzzer:
    """Raw TCP connections carrying mutated PDUs; records what the node answers."""

    def __init__(self, port: int, rng: np.random.Generator) -> None:
        """Fuzz the node on loopback ``port``."""
        self.port = port
        self.rng = rng
        self.rq = associate_rq()
        self.pdata = echo_pdata()

    def _flip(self, data: bytes) -> bytes:
        """Flip 1 to 8 random bits."""
        out = bytearray(data)
        for _ in range(int(self.rng.integers(1, 9))):
            bit = int(self.rng.integers(len(out) * 8))
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    def mutate_rq(self) -> tuple[str, bytes]:
        """A mutated A-ASSOCIATE-RQ."""
        data = bytearray(self.rq)
        choice = int(self.rng.integers(6))
        if choice == 0:
            return "rq_bitflip", self._flip(self.rq)
        if choice == 1:
            return "rq_truncate", self.rq[: int(self.rng.integers(1, len(self.rq)))]
        if choice == 2:
            struct.pack_into(">I", data, 2, int(self.rng.choice([0, 1, 0xFFFFFFFF, len(data) * 3])))
            return "rq_pdu_length", bytes(data)
        if choice == 3:  # an item's length (application context item starts at 74)
            offset = 74 + 2 + 4 * int(self.rng.integers(0, 4))
            struct.pack_into(
                ">H", data, min(offset, len(data) - 2), int(self.rng.integers(0x10000))
            )
            return "rq_item_length", bytes(data)
        if choice == 4:
            data[74] = int(self.rng.integers(256))
            return "rq_item_type", bytes(data)
        data[10:42] = self.rng.bytes(32)
        return "rq_ae_titles", bytes(data)

    def mutate_pdata(self) -> tuple[str, bytes]:
        """A mutated P-DATA-TF (or an unexpected PDU) to send inside an association."""
        data = bytearray(self.pdata)
        choice = int(self.rng.integers(7))
        if choice == 0:
            struct.pack_into(
                ">I", data, 2, int(self.rng.choice([0, 4, 0xFFFFFFFF, len(data) + 100]))
            )
            return "pdata_pdu_length", bytes(data)
        if choice == 1:
            struct.pack_into(">I", data, 6, int(self.rng.choice([0, 1, 0xFFFFFFFF, 1000])))
            return "pdata_pdv_length", bytes(data)
        if choice == 2:
            data[10] = int(self.rng.choice([0, 2, 5, 255]))
            return "pdata_context_id", bytes(data)
        if choice == 3:
            data[11] = int(self.rng.integers(256))
            return "pdata_control_header", bytes(data)
        if choice == 4:
            return "pdata_command_bitflip", bytes(data[:12]) + self._flip(bytes(data[12:]))
        if choice == 5:
            return "unexpected_pdu", self.rq if self.rng.random() < 0.5 else bytes(
                [6, 0, 0, 0, 0, 4, 0, 0, 0, 0]
            )
        kind = int(self.rng.integers(256))
        body = self.rng.bytes(int(self.rng.integers(0, 64)))
        return "pdata_random_type", struct.pack(">BBI", kind, 0, len(body)) + body

    def random_first_pdu(self) -> tuple[str, bytes]:
        """A PDU of any type number, with a random body, as the first thing sent."""
        kind = int(self.rng.integers(256))
        body = self.rng.bytes(int(self.rng.integers(0, 128)))
        return "first_pdu_random", struct.pack(">BBI", kind, 0, len(body)) + body

    def _reply(self, sock: socket.socket, timeout_s: float) -> str:
        """The type of the first PDU the node answers, or how the connection ended."""
        sock.settimeout(timeout_s)
        try:
            head = sock.recv(6)
        except TimeoutError:
            return "no reply (timeout)"
        except ConnectionError:
            return "connection reset"
        if not head:
            return "closed"
        return PDU_NAMES.get(head[0], f"PDU type 0x{head[0]:02X}")

    def _read_pdu(self, sock: socket.socket) -> bytes:
        """Read one whole PDU (the A-ASSOCIATE-AC)."""
        head = b""
        while len(head) < 6:
            part = sock.recv(6 - len(head))
            if not part:
                return head
            head += part
        length = struct.unpack(">I", head[2:6])[0]
        body = b""
        while len(body) < length:
            part = sock.recv(min(65536, length - len(body)))
            if not part:
                break
            body += part
        return head + body

    def one(self, in_association: bool, timeout_s: float) -> tuple[str, str]:
        """Run one PDU case on a new connection: (mutation kind, node's reply).

        ``in_association``: a mutated P-DATA-TF (or unexpected PDU) after a valid
        association; otherwise a mutated A-ASSOCIATE-RQ or a random first PDU.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
            if in_association:
                sock.sendall(self.rq)
                sock.settimeout(5.0)
                accepted = self._read_pdu(sock)
                if not accepted or accepted[0] != ASSOCIATE_AC:
                    return "association for pdata", NOT_ACCEPTED
                kind, data = self.mutate_pdata()
            elif self.rng.random() < 0.7:
                kind, data = self.mutate_rq()
            else:
                kind, data = self.random_first_pdu()
            try:
                sock.sendall(data)
            except ConnectionError:
                return kind, "connection reset"
            return kind, self._reply(sock, timeout_s)


def _seconds_until_echo(port: int, timeout_s: float) -> float | None:
    """Seconds until the node answers C-ECHO again, ``None`` if not within ``timeout_s``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if echo_ok(port, timeout_s=2.0):
            return time.monotonic() - began
        time.sleep(0.5)
    return None


def run(settings: Settings) -> dict[str, Any]:
    """Start a node, fuzz it, check it still serves, and return the summary."""
    missing = missing_tools([STORESCU])
    if missing:
        raise RuntimeError(f"missing tools: {', '.join(missing)} (apt-get install dcmtk)")
    work = settings.work or Path(tempfile.mkdtemp(prefix="dicomnode-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    base = synthetic_head_ct(seed=settings.seed, n_slices=settings.slices, rows=settings.rows)
    mutator = Mutator(base, rng, settings.bomb_mb)
    port = free_port()
    config = node_config_toml(work, port, None, stable_age_s=2.0)
    node = NodeProcess(config, port, work / "node.log")
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    pdu_replies: Counter[str] = Counter()
    pdu_by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    blocked_waits: list[float] = []
    began = time.monotonic()
    node.start()
    sender = DatasetSender(port, settings.per_association)
    case_path = work / "case.dcm"
    sent = pdus = 0
    node_died_at: str | None = None
    try:
        while sent < settings.datasets and time.monotonic() - began < settings.time_limit_s:
            case = mutator.draw()
            status = sender.send(part10_file(case, case_path))
            statuses[status] += 1
            by_kind[case.kind][status] += 1
            sent += 1
            if sent % 1000 == 0:
                progress(f"{sent} datasets sent: {dict(statuses.most_common(4))}")
            if not node.alive():
                node_died_at = f"dataset case {sent} ({case.kind})"
                break
        sender.close()
        dataset_seconds = time.monotonic() - began
        fuzzer = PduFuzzer(port, rng)
        wait_budget = settings.pdu_wait_budget_s
        while (
            node_died_at is None and pdus < settings.pdus
            and time.monotonic() - began < settings.time_limit_s
        ):  # fmt: skip
            # P-DATA cases first (they need an association), then A-ASSOCIATE-RQ ones
            in_association = pdus < settings.pdus * PDATA_SHARE
            try:
                kind, reply = fuzzer.one(in_association, timeout_s=0.3)
            except OSError as exc:
                kind, reply = "connect", f"cannot connect: {type(exc).__name__}"
            pdu_replies[reply] += 1
            pdu_by_kind[kind][reply] += 1
            pdus += 1
            if not node.alive():
                node_died_at = f"PDU case {pdus} ({kind})"
            elif reply == NOT_ACCEPTED and wait_budget > 0:
                # earlier cases hold the node's association slots: wait for them to free
                waited = time.monotonic()
                _seconds_until_echo(port, min(wait_budget, 45.0))
                blocked_waits.append(round(time.monotonic() - waited, 1))
                wait_budget -= time.monotonic() - waited
        fuzz_seconds = time.monotonic() - began
        alive = node.alive()
        echo_after = alive and echo_ok(port)
        recovered_s = _seconds_until_echo(port, settings.recovery_timeout_s) if alive else None
        alive = node.alive()
        valid = write_series(
            synthetic_head_ct(seed=settings.seed + 1, n_slices=settings.slices, rows=settings.rows),
            work / "valid",
        )
        stored = store_files(port, valid) if alive and recovered_s is not None else None
        state_file = work / "state" / "dicomnode.sqlite3"
        valid_uids = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in valid
        }
        recorded = {
            str(r[0]) for r in state_rows(state_file, "SELECT sop_instance_uid FROM instances")
        } & valid_uids
        still_busy = wait_idle(state_file, 120.0) if alive else {"node": 1}
        jobs = Counter(str(r[0]) for r in state_rows(state_file, "SELECT state FROM jobs"))
        peak = peak_rss_mb(node.pid) if alive else None
    finally:
        exit_code = node.stop()
    stored_ok = stored is not None and len(stored.acknowledged()) == len(valid)
    summary: dict[str, Any] = {
        "harness": "fuzz",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "work": str(work),
        "datasets_sent": sent,
        "pdus_sent": pdus,
        "dataset_seconds": round(dataset_seconds, 1),
        "datasets_per_s": round(sent / max(dataset_seconds, 1e-9), 1),
        "fuzz_seconds": round(fuzz_seconds, 1),
        "status_histogram": dict(statuses.most_common()),
        "status_by_mutation": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
        "associations": sender.associations,
        "associations_not_established": sender.not_established,
        "pdu_replies": dict(pdu_replies.most_common()),
        "pdu_blocked_waits_s": blocked_waits,
        "pdu_replies_by_mutation": {
            k: dict(v.most_common()) for k, v in sorted(pdu_by_kind.items())
        },
        "node_died_at": node_died_at,
        "node_alive_after": alive,
        "echo_right_after": echo_after,
        "seconds_until_echo_after": None if recovered_s is None else round(recovered_s, 1),
        "valid_series_stored_after": stored_ok,
        "valid_series_recorded": f"{len(recorded)}/{len(valid)}",
        "jobs_after": dict(jobs),
        "still_busy_after": still_busy,
        "node_peak_rss_mb": None if peak is None else round(peak, 1),
        "node_exit_code_on_sigterm": exit_code,
        "node_log": log_summary(node.log_path),
    }
    crashes = summary["node_log"]["counts"].get("thread_crashes", 0)
    summary["passed"] = bool(
        alive and recovered_s is not None and stored_ok and len(recorded) == len(valid)
        and crashes == 0
    )  # fmt: skip
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the summary, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=10_000, help="mutated datasets to send")
    parser.add_argument("--pdus", type=int, default=2_000, help="mutated PDUs to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for both parts")
    parser.add_argument("--bomb-mb", type=int, default=32, help="inflated size of a deflate bomb")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom's complaints about the harness's own mutants
    settings = Settings(
        datasets=args.datasets, pdus=args.pdus, seed=args.seed, time_limit_s=args.time_limit,
        bomb_mb=args.bomb_mb, work=args.work, results_dir=args.results_dir,
    )  # fmt: skip
    summary = run(settings)
    path = write_results(summary, settings.results_dir, "fuzz")
    shown = {
        k: v
        for k, v in summary.items()
        if k not in ("status_by_mutation", "pdu_replies_by_mutation")
    }
    sys.stdout.write(json.dumps(shown, indent=2) + f"\nwrote {path}\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
