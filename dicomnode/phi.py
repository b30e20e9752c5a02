"""Scrub patient identifiers from text: the values of the datasets this process handled.

Dropping identifying *keys* from a log event (``dicomnode.logs``) is not enough: library
warnings and exception messages carry the *values* themselves (highdicom warns with a
one-component PatientName; pydicom's warnings on malformed elements print the value or
the raw element bytes). So every place that reads a dataset first hands it to
:func:`remember_identifiers` (or :func:`remember_encoded` / :func:`remember_files`), and
the log pipeline passes every string through :func:`scrub`, which replaces:

- each remembered identifying value, and each piece of it (person-name components,
  multi-values, a birth date's reformatted forms such as ``1970-01-01``), matched
  case-insensitively, with :data:`REDACTED`;
- Python ``bytes`` reprs (``b'...'``), ``\\xNN`` escape runs and spaced hex dumps, which is
  how libraries print raw dataset bytes, with :data:`BYTES_REDACTED`.

Limits, on purpose:

- values shorter than :data:`MIN_VALUE_LENGTH` (3) characters are not remembered: "1",
  "M" or "JO" would blank unrelated text everywhere and identify nobody on their own;
- values shorter than :data:`WORD_BOUNDARY_BELOW` (6) characters are only replaced as a
  whole word (not inside a longer run of letters and digits), so an ID "123" does not
  blank "51234"; longer values are replaced wherever they occur;
- the registry is bounded (:data:`MAX_VALUES`, least recently seen dropped first): it
  protects the log lines about the datasets being handled now, not all of history;
- raw bytes are decoded as Latin-1 and as UTF-8 (both forms are remembered); other
  character sets are matched through the value pydicom decodes, when it is decoded.

The registry is one per process (logging is process-wide too); it is thread-safe, and its
single compiled pattern is rebuilt lazily, only after the set of values changed.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

REDACTED = "[identifier removed]"
BYTES_REDACTED = "[bytes removed]"
MIN_VALUE_LENGTH = 3
WORD_BOUNDARY_BELOW = 6
MAX_VALUES = 1024
TRIE_VALUE_LENGTH = 64  # the longest value of a DICOM PN component group, LO or SH
PENDING_VALUES = 64  # new values matched one by one before the trie is rebuilt
SALVAGE_LIMIT_BYTES = 1 << 20  # how much of an undecodable deflated dataset to inflate

PERSON_NAME_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ResponsiblePerson",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
)
DATE_KEYWORDS: tuple[str, ...] = ("PatientBirthDate",)
OTHER_KEYWORDS: tuple[str, ...] = (
    "PatientID",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientBirthTime",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
)
IDENTIFYING_KEYWORDS: tuple[str, ...] = PERSON_NAME_KEYWORDS + DATE_KEYWORDS + OTHER_KEYWORDS


def _tag(keyword: str) -> BaseTag:
    """The tag of a dictionary keyword (all keywords above are in pydicom's dictionary)."""
    number = tag_for_keyword(keyword)
    if number is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return Tag(number)


_KEYWORD_OF_TAG: dict[BaseTag, str] = {_tag(k): k for k in IDENTIFYING_KEYWORDS}
_CHARSET_TAG = _tag("SpecificCharacterSet")
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}  # \\ = ^: where ISO 2022 escapes are reset
# Sequences whose items carry more identifiers (other IDs, the requested procedure's
# accession number); read one level deep.
NESTED_SEQUENCE_KEYWORDS: tuple[str, ...] = ("OtherPatientIDsSequence", "RequestAttributesSequence")
_PADDING = " \x00\t\r\n"
_DIGITS = re.compile(r"\d")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

# How libraries print raw bytes: bytes/bytearray reprs, escape runs, spaced hex dumps.
_BYTES_PATTERN = re.compile(
    r"(?<![A-Za-z0-9_])b'(?:[^'\\\n]|\\.)*'"
    r'|(?<![A-Za-z0-9_])b"(?:[^"\\\n]|\\.)*"'
    r"|(?:\\x[0-9a-fA-F]{2}){4,}"
    r"|(?<![0-9A-Za-z])(?:[0-9a-fA-F]{2}[ \t]+){7,}[0-9a-fA-F]{2}(?![0-9A-Za-z])"
)


def date_forms(value: str) -> set[str]:
    """A date and the ways software commonly re-prints it.

    ``19700101`` (or ``1970-01-01``, ``1970.01.01``...) gives ``19700101``,
    ``1970-01-01``, ``1970/01/01``, ``1970.01.01``, ``01/01/1970``, ``01.01.1970``,
    ``01-01-1970`` and ``1970, 1, 1`` (``datetime.date`` repr). Anything that does not hold
    eight digits is returned as is.
    """
    digits = "".join(_DIGITS.findall(value))
    forms = {value}
    if len(digits) != 8:
        return forms
    y, m, d = digits[:4], digits[4:6], digits[6:]
    forms.update(
        {
            digits,
            f"{y}-{m}-{d}",
            f"{y}/{m}/{d}",
            f"{y}.{m}.{d}",
            f"{d}/{m}/{y}",
            f"{m}/{d}/{y}",
            f"{d}.{m}.{y}",
            f"{d}-{m}-{y}",
            f"{y}, {int(m)}, {int(d)}",
        }
    )
    return forms


def value_forms(keyword: str, text: str) -> set[str]:
    """Every string to scrub for one attribute's value ``text`` (possibly multi-valued).

    The whole value, each of its values (``\\`` separated), the runs between control
    characters and the escaped ``repr`` of a value holding them, for person names each
    component group and component (and the components joined by spaces), for dates their
    reformatted forms; padding stripped, and pieces shorter than :data:`MIN_VALUE_LENGTH`
    left out.
    """
    forms: set[str] = set()
    pieces = [text, *text.split("\\")]
    pieces += [part for piece in pieces for part in _CONTROL.split(piece)]
    forms.update(repr(piece)[1:-1] for piece in pieces if _CONTROL.search(piece))
    for piece in pieces:
        piece = piece.strip(_PADDING)
        forms.add(piece)
        if keyword in PERSON_NAME_KEYWORDS:
            for group in piece.split("="):
                components = [c.strip(_PADDING) for c in group.split("^")]
                forms.add(group.strip(_PADDING))
                forms.update(components)
                forms.add(" ".join(c for c in components if c))
        if keyword in DATE_KEYWORDS:
            forms.update(date_forms(piece))
    return {f for f in forms if len(f) >= MIN_VALUE_LENGTH}


def _encodings(ds: Dataset) -> list[str]:
    """The Python codecs of the dataset's Specific Character Set, read from its raw bytes
    (ASCII, the default repertoire, when absent or unreadable)."""
    if _CHARSET_TAG not in ds:
        return ["iso8859"]
    try:
        value = ds.get_item(_CHARSET_TAG).value
    except (ValueError, TypeError, KeyError, AttributeError, EOFError, OSError):
        return ["iso8859"]
    if isinstance(value, bytes | bytearray):
        names = bytes(value).decode("ascii", errors="ignore").split("\\")
    elif isinstance(value, str):
        names = value.split("\\")
    else:
        names = [str(v) for v in value or ()]
    try:
        return pydicom.charset.convert_encodings([n.strip() for n in names] or [""])
    except (LookupError, ValueError):
        return ["iso8859"]


def _element_texts(
    element: DataElement | RawDataElement, encodings: Sequence[str] = ("iso8859",)
) -> list[str]:
    """The value of an element as text, without converting a raw element through pydicom.

    Raw bytes are decoded with the dataset's character set, as Latin-1 and as UTF-8 (every
    distinct result is kept), so that warnings raised by a later conversion cannot print a
    form not remembered here.
    """
    value = element.value
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        texts = {raw.decode("latin-1"), raw.decode("utf-8", errors="ignore")}
        with contextlib.suppress(LookupError, ValueError):  # then Latin-1 and UTF-8 stand
            texts.add(pydicom.charset.decode_bytes(raw, encodings, _PN_DELIMITERS))
        return sorted(texts)
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return ["\\".join(str(v) for v in value)]
    return [str(value)]


def identifying_values(ds: Dataset, nested: bool = True) -> set[str]:
    """The identifying values of ``ds`` and their pieces (also in the items of
    :data:`NESTED_SEQUENCE_KEYWORDS` when ``nested``); never raises for a malformed
    element, which is read as the bytes that were sent."""
    found: set[str] = set()
    encodings = _encodings(ds)
    for tag, keyword in _KEYWORD_OF_TAG.items():
        if tag not in ds:
            continue
        try:
            element = ds.get_item(tag)
        except (ValueError, TypeError, KeyError, AttributeError, EOFError, OSError):
            continue
        for text in _element_texts(element, encodings):
            found.update(value_forms(keyword, text))
    for keyword in NESTED_SEQUENCE_KEYWORDS if nested else ():
        try:
            items = list(ds.get(keyword) or ())
        except (ValueError, TypeError, KeyError, AttributeError, EOFError, OSError):
            continue
        for item in items:
            found |= identifying_values(item, nested=False)
    return found


def salvage_identifying_values(data: bytes, implicit_vr: bool, little_endian: bool) -> set[str]:
    """Identifying values readable from an encoded dataset that does not decode fully.

    Elements are read one after the other until the encoding breaks; what was read before
    the break is kept.
    """
    found: set[str] = set()
    elements = data_element_generator(io.BytesIO(data), implicit_vr, little_endian)
    while True:
        try:
            element = next(elements)
        except StopIteration:
            return found
        except (ValueError, TypeError, KeyError, EOFError, OSError, OverflowError, IndexError):
            return found
        keyword = _KEYWORD_OF_TAG.get(Tag(element.tag))
        if keyword is not None:
            for text in _element_texts(element):
                found.update(value_forms(keyword, text))


def _inflate_prefix(data: bytes) -> bytes:
    """As much of a deflated dataset as inflates, up to :data:`SALVAGE_LIMIT_BYTES`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        return inflater.decompress(data, SALVAGE_LIMIT_BYTES)
    except zlib.error:
        return b""


class IdentifierRegistry:
    """A bounded, thread-safe set of identifying strings and the patterns that find them.

    Most values are matched by one trie-shaped pattern; compiling it takes a noticeable
    time with many values (about 0.1 s for :data:`MAX_VALUES`), so it is not rebuilt for
    every new value: a value added since the last build, and every value longer than
    :data:`TRIE_VALUE_LENGTH`, has its own small pattern, applied (longest first) before
    the trie. The trie is rebuilt once :data:`PENDING_VALUES` values wait for it.
    """

    def __init__(self, max_values: int = MAX_VALUES) -> None:
        """Remember at most ``max_values`` strings, dropping the least recently seen."""
        self._max_values = max_values
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        self._singles: dict[str, re.Pattern[str]] = {}  # value -> its own pattern
        self._pending = 0  # values of trie length among the singles
        self._dirty = False

    def add(self, values: Iterable[str]) -> None:
        """Remember ``values`` (case-insensitively); too short ones are ignored."""
        with self._lock:
            for value in values:
                if len(value) < MIN_VALUE_LENGTH:
                    continue
                key = value.lower()
                if key in self._values:
                    self._values.move_to_end(key)
                    continue
                self._values[key] = None
                self._singles[key] = _single_pattern(key)
                if len(key) <= TRIE_VALUE_LENGTH:
                    self._pending += 1
                    self._dirty = self._dirty or self._pending >= PENDING_VALUES
                if len(self._values) > self._max_values:
                    evicted, _ = self._values.popitem(last=False)
                    if self._singles.pop(evicted, None) is not None and (
                        len(evicted) <= TRIE_VALUE_LENGTH
                    ):
                        self._pending -= 1

    def __len__(self) -> int:
        """How many strings are remembered."""
        with self._lock:
            return len(self._values)

    def clear(self) -> None:
        """Forget every value."""
        with self._lock:
            self._values.clear()
            self._singles.clear()
            self._pattern = None
            self._pending = 0
            self._dirty = False

    def pattern(self) -> re.Pattern[str] | None:
        """The trie pattern of the remembered values of at most
        :data:`TRIE_VALUE_LENGTH` characters, rebuilt when enough are pending."""
        with self._lock:
            return self._trie_locked()

    def _trie_locked(self) -> re.Pattern[str] | None:
        """:meth:`pattern`, the lock held."""
        if self._dirty:
            self._pattern = _compile([v for v in self._values if len(v) <= TRIE_VALUE_LENGTH])
            self._singles = {k: p for k, p in self._singles.items() if len(k) > TRIE_VALUE_LENGTH}
            self._pending = 0
            self._dirty = False
        return self._pattern

    def scrub(self, text: str) -> str:
        """``text`` with remembered values and raw bytes replaced."""
        text = _BYTES_PATTERN.sub(BYTES_REDACTED, text)
        with self._lock:
            trie = self._trie_locked()
            singles = [self._singles[k] for k in sorted(self._singles, key=len, reverse=True)]
        for single in singles:
            text = single.sub(REDACTED, text)
        return text if trie is None else trie.sub(REDACTED, text)


def _single_pattern(value: str) -> re.Pattern[str]:
    """The case-insensitive pattern of one value (a whole word when it is short)."""
    literal = re.escape(value)
    if len(value) < WORD_BOUNDARY_BELOW:
        literal = "(?<![0-9A-Za-z])" + literal + "(?![0-9A-Za-z])"
    return re.compile(literal, re.IGNORECASE)


def _trie_pattern(values: Iterable[str]) -> str:
    """A regular expression matching any of ``values``, built as a trie so that matching
    costs about the length of the text, not the number of values; longer matches first."""
    root: dict[str, Any] = {}
    for value in values:
        node = root
        for char in value:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict[str, Any]) -> str:
        alternatives = [re.escape(ch) + render(child) for ch, child in node.items() if ch]
        if not alternatives:
            return ""
        ends_here = "" in node
        if len(alternatives) == 1 and not ends_here:
            return alternatives[0]
        group = "(?:" + "|".join(alternatives) + ")"
        return group + "?" if ends_here else group

    return render(root)


def _compile(values: Sequence[str]) -> re.Pattern[str] | None:
    """One case-insensitive pattern: long values anywhere, short ones as whole words.

    The trie nests one group per branching character, and both its rendering and
    Python's regular-expression parser recurse once per nested group: a value of a few
    hundred characters (a corrupted length field makes a PatientName swallow the rest of
    its dataset) would raise ``RecursionError`` in every later log call. So ``values``
    must be at most :data:`TRIE_VALUE_LENGTH` characters long (every well-formed
    identifying value is); :class:`IdentifierRegistry` matches longer ones one by one.
    """
    if any(len(v) > TRIE_VALUE_LENGTH for v in values):
        raise ValueError(f"a value is longer than {TRIE_VALUE_LENGTH} characters")
    long = [v for v in values if len(v) >= WORD_BOUNDARY_BELOW]
    short = [v for v in values if len(v) < WORD_BOUNDARY_BELOW]
    parts = []
    if long:
        parts.append(_trie_pattern(long))
    if short:
        parts.append("(?<![0-9A-Za-z])" + _trie_pattern(short) + "(?![0-9A-Za-z])")
    if not parts:
        return None
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


REGISTRY = IdentifierRegistry()


def scrub(text: str) -> str:
    """``text`` without any identifier this process has seen, nor raw dataset bytes."""
    return REGISTRY.scrub(text)


def remember_identifiers(ds: Dataset) -> None:
    """Remember the identifying values of ``ds``, read without converting its elements,
    so that nothing logged afterwards (warnings included) can carry them."""
    REGISTRY.add(identifying_values(ds))


def remember_encoded(data: bytes, transfer_syntax: str) -> None:
    """Remember what identifying values can be read from an encoded dataset that failed to
    decode (as sent in a C-STORE, in ``transfer_syntax``)."""
    ts = pydicom.uid.UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        data = _inflate_prefix(data)
    implicit = ts == pydicom.uid.ImplicitVRLittleEndian
    little = ts != pydicom.uid.ExplicitVRBigEndian
    REGISTRY.add(salvage_identifying_values(data, implicit, little))


_FILE_TAGS: list[BaseTag | int] = [*_KEYWORD_OF_TAG, Tag(0x0008, 0x0005)]


def remember_files(paths: Iterable[Path]) -> None:
    """Remember the identifying values of DICOM files (headers only); unreadable files
    are skipped here and reported by whoever reads them next."""
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_FILE_TAGS)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, TypeError):
            continue
        remember_identifiers(header)
