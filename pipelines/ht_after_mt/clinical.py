"""Clinical variables of the HT-after-thrombectomy model: where they come from, which values
are plausible, and why a variable was imputed.

The table fails open. A table that cannot be read (missing, unreadable, not UTF-8 text,
not CSV or JSON), a study with no row, two rows for the same study (which one applies is
ambiguous), a malformed row (more or fewer cells than the header), a cell that is not a
number or yes/no, and a value outside its plausible range never stop the pipeline: the
affected variables are missing, the model imputes them with its training medians/modes,
and every one is reported with its reason (:class:`pipelines.base.ClinicalIssue`) in the
SR and the Secondary Capture. Reasons never quote key cells (AccessionNumber, PatientID,
StudyDate) or header identifiers; they quote only the offending clinical value.

Plausible ranges (:data:`PLAUSIBLE_RANGES`; outside: treated as missing and listed):

=============================== ================== =========================================
variable                        range              why
=============================== ================== =========================================
age                             0-120 years        human lifespan (header PatientAge, or age
                                                   from PatientBirthDate and StudyDate, or
                                                   the table's ``age``)
sex_male                        0 or 1             header PatientSex M/F, table yes/no/M/F
hypertension ... stent_implant. 0 or 1             yes/no variables
nihss                           0-42, whole        the NIH Stroke Scale's range
aspects                         0-10, whole        the ASPECTS range
glucose_mmol_l                  1-50 mmol/L        below 1 is not compatible with a
                                                   conscious patient, above 50 beyond any
                                                   reported admission value; mg/dL values
                                                   (e.g. 120) fall outside and are listed
onset_to_recanalisation_min     0-2880 min         up to 48 h (late-window thrombectomy is
                                                   done up to 24 h)
pass_number                     0-20, whole        device passes of one procedure
=============================== ================== =========================================

Delimiters: comma, semicolon and tab are detected from the header row (the delimiter
that splits it into the most known column names; ``csv.Sniffer`` when none is known).
With a semicolon or tab delimiter, a variable cell written with a decimal comma
(``7,2``) is read as ``7.2``, as spreadsheets of comma-decimal locales write it; with a
comma delimiter a comma can only be a separator, so no such reading is made.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from pipelines.base import ClinicalIssue

HEADER_VARIABLES: tuple[str, ...] = ("age", "sex_male")
"""Clinical variables read from the DICOM header (PatientAge, PatientSex)."""

TABLE_VARIABLES: tuple[str, ...] = (
    "hypertension",
    "diabetes",
    "atrial_fibrillation",
    "coronary_artery_disease",
    "hyperlipidaemia",
    "smoking",
    "drinking",
    "nihss",
    "aspects",
    "thrombolysis",
    "anterior_circulation",
    "glucose_mmol_l",
    "onset_to_recanalisation_min",
    "pass_number",
    "mtici_2b_or_better",
    "aspiration_catheter",
    "stent_implantation",
)
"""Clinical variables read from the clinical table (the HT study's list, as the cohort
generator names them; HUmax >= 90 and subarachnoid HIM are image findings, left out)."""

CLINICAL_VARIABLES: tuple[str, ...] = HEADER_VARIABLES + TABLE_VARIABLES

KEY_ACCESSION = "AccessionNumber"
KEY_PATIENT = "PatientID"
KEY_DATE = "StudyDate"
KEY_COLUMNS: tuple[str, ...] = (KEY_ACCESSION, KEY_PATIENT, KEY_DATE)
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "missing", "unknown"})
_TRUE = frozenset({"1", "yes", "y", "true", "t", "m", "male"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "female"})
DELIMITERS: tuple[str, ...] = (",", ";", "\t")
_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d+,\d+\s*$")
_DICOM_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER = {"Y": 365.25, "M": 365.25 / 12.0, "W": 7.0, "D": 1.0}


@dataclass(frozen=True)
class PlausibleRange:
    """The values a clinical variable can take; anything else is treated as missing."""

    low: float
    high: float
    unit: str = ""
    whole: bool = False  # whole numbers only (scores, counts, yes/no)

    def problem(self, value: float) -> str | None:
        """Why ``value`` is not plausible, or None when it is."""
        unit = f" {self.unit}" if self.unit else ""
        if not math.isfinite(value) or not self.low <= value <= self.high:
            return f"value {value:g} outside plausible range {self.low:g}-{self.high:g}{unit}"
        if self.whole and value != int(value):
            return f"value {value:g} is not a whole number ({self.low:g}-{self.high:g}{unit})"
        return None


BINARY = PlausibleRange(0.0, 1.0, "(no/yes)", whole=True)
PLAUSIBLE_RANGES: Mapping[str, PlausibleRange] = {
    **dict.fromkeys(CLINICAL_VARIABLES, BINARY),
    "age": PlausibleRange(0.0, 120.0, "years"),
    "nihss": PlausibleRange(0.0, 42.0, whole=True),
    "aspects": PlausibleRange(0.0, 10.0, whole=True),
    "glucose_mmol_l": PlausibleRange(1.0, 50.0, "mmol/L"),
    "onset_to_recanalisation_min": PlausibleRange(0.0, 2880.0, "min"),
    "pass_number": PlausibleRange(0.0, 20.0, whole=True),
}
"""Each clinical variable's plausible range (see the module's table)."""

NO_TABLE = "no clinical table configured"
NO_ROW = "no row for this study in the clinical table"
DUPLICATE_ROWS = "duplicate rows for this study in the clinical table (which one applies?)"
ABSENT = "absent from the clinical table"
EMPTY = "missing (empty or NA) in the clinical table"
NOT_A_VALUE = "cell is neither a number nor yes/no"


class ClinicalTableError(ValueError):
    """A clinical table that cannot be read, or (strict mode) one with ambiguous keys.

    ``reason`` says what is wrong without the file's path or any cell of a key column,
    so it can be shown in an output; ``str()`` prefixes the source for admins.
    """

    def __init__(self, reason: str, source: str | None = None) -> None:
        """Keep ``reason``; the message is ``source: reason``."""
        self.reason = reason
        super().__init__(f"{source}: {reason}" if source else reason)


# --- cells -------------------------------------------------------------------------


def clinical_value(raw: object, name: str = "value") -> float | None:
    """A table cell as a number; None when missing. ``yes``/``no``, ``M``/``F`` are 1/0.

    Raises :class:`ClinicalTableError` for text that is none of these (the text itself is
    not quoted: a shifted row could hold an identifier there).
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, int | float):
        return None if math.isnan(float(raw)) else float(raw)
    text = str(raw).strip().lower()
    if text in MISSING_TOKENS:
        return None
    if text in _TRUE and not text.isdigit():
        return 1.0
    if text in _FALSE and not text.isdigit():
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ClinicalTableError(f"{name}: {NOT_A_VALUE}") from None
    return None if math.isnan(value) else value


def checked_value(raw: object, name: str, present: bool = True) -> tuple[float | None, str | None]:
    """A cell of variable ``name`` as a plausible value, else None and the reason.

    ``present`` is False when the row has no such column (reason :data:`ABSENT`).
    """
    if not present:
        return None, ABSENT
    try:
        value = clinical_value(raw, name)
    except ClinicalTableError:
        return None, NOT_A_VALUE
    if value is None:
        return None, EMPTY
    problem = PLAUSIBLE_RANGES[name].problem(value)
    return (None, problem) if problem else (value, None)


# --- the table ---------------------------------------------------------------------


def _key(value: object) -> str:
    """A key cell, stripped."""
    return str(value).strip() if value is not None else ""


def _date_key(value: object) -> str:
    """A date key without separators (2024-08-01 -> 20240801)."""
    return _key(value).replace("-", "").replace(".", "").replace("/", "")


_CANONICAL = {name.lower(): name for name in (*KEY_COLUMNS, *CLINICAL_VARIABLES)}


def canonical_column(name: object) -> str:
    """A header cell as the known column it names (case and spaces ignored), else as is."""
    text = _key(name)
    return _CANONICAL.get(text.lower(), text)


def detect_delimiter(text: str) -> str:
    """The delimiter (comma, semicolon, tab) that splits the header into most known columns.

    When no split names a known column, ``csv.Sniffer`` decides; comma if it cannot.
    """
    header = text.split("\n", 1)[0]

    def known(delimiter: str) -> int:
        cells = next(csv.reader([header], delimiter=delimiter), [])
        return sum(canonical_column(c) in _CANONICAL.values() for c in cells)

    best = max(DELIMITERS, key=known)
    if known(best) > 0:
        return best
    try:
        return csv.Sniffer().sniff(text[:4096], delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        return ","


def _decimal_comma(cell: object) -> object:
    """``7,2`` as ``7.2``; anything else unchanged."""
    if isinstance(cell, str) and _DECIMAL_COMMA.match(cell):
        return cell.strip().replace(",", ".")
    return cell


@dataclass(frozen=True)
class TableRow:
    """One row of the table: its number (1 = first data row), cells, and what is wrong."""

    number: int
    cells: dict[str, Any]
    problem: str | None = None  # e.g. "it has 5 cells where the header has 7"


@dataclass(frozen=True)
class RowLookup:
    """The row of one study, or why there is none (``reason`` is then set)."""

    row: dict[str, Any] | None
    reason: str = ""

    @classmethod
    def of(cls, row: Mapping[str, Any] | None) -> RowLookup:
        """A plain row (or none: :data:`NO_ROW`)."""
        return cls(None, NO_ROW) if row is None else cls(dict(row))


def _read_text(path: Path) -> str:
    """The file as text: UTF-16 with a BOM, else UTF-8 (BOM optional)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClinicalTableError("file not found", str(path)) from None
    except PermissionError:
        raise ClinicalTableError("permission denied", str(path)) from None
    except IsADirectoryError:
        raise ClinicalTableError("a folder, not a file", str(path)) from None
    except OSError as exc:
        raise ClinicalTableError(f"cannot read the file ({exc.strerror})", str(path)) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ClinicalTableError("not valid UTF-16 text", str(path)) from None
    if b"\x00" in data:
        raise ClinicalTableError("a binary file, not a CSV or JSON table", str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ClinicalTableError(
            "not UTF-8 text (save the table as UTF-8 CSV)", str(path)
        ) from None
    if not text.strip():
        raise ClinicalTableError("the file is empty", str(path))
    return text


def _json_rows(text: str, source: str) -> list[TableRow]:
    """Rows of a JSON table: a list of objects, or ``{"rows": [...]}``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClinicalTableError(f"not valid JSON (line {exc.lineno})", source) from None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ClinicalTableError("JSON is not a list of objects or {'rows': [...]}", source)
    return [
        TableRow(n, {canonical_column(k): v for k, v in r.items()}) for n, r in enumerate(rows, 1)
    ]


def _csv_rows(text: str, source: str) -> list[TableRow]:
    """Rows of a CSV table with a header row; the delimiter is detected."""
    delimiter = detect_delimiter(text)
    try:
        records = list(csv.reader(text.splitlines(), delimiter=delimiter))
    except csv.Error as exc:
        raise ClinicalTableError(f"not a readable CSV table ({exc})", source) from None
    records = [r for r in records if any(cell.strip() for cell in r)]
    if not records:
        raise ClinicalTableError("no header row", source)
    header = [canonical_column(c) for c in records[0]]
    rows = []
    for number, cells in enumerate(records[1:], start=1):
        problem = None
        if len(cells) != len(header):
            problem = f"it has {len(cells)} cells where the header has {len(header)}"
        values: dict[str, Any] = dict(zip(header, cells, strict=False))
        if delimiter != ",":
            values = {
                k: _decimal_comma(v) if k in PLAUSIBLE_RANGES else v for k, v in values.items()
            }
        rows.append(TableRow(number, values, problem))
    return rows


class ClinicalTable:
    """Rows of clinical variables, found by AccessionNumber or PatientID + StudyDate.

    ``strict`` (training): a duplicate key or a malformed row raises
    :class:`ClinicalTableError`. Otherwise (the node) they are kept, and :meth:`find`
    reports them for the study they concern.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any] | TableRow],
        source: str = "clinical table",
        *,
        strict: bool = True,
    ) -> None:
        """Index ``rows`` (dicts of column -> cell, or :class:`TableRow`)."""
        self.source = source
        self.table_rows = [
            r if isinstance(r, TableRow) else TableRow(n, dict(r)) for n, r in enumerate(rows, 1)
        ]
        self.rows = [r.cells for r in self.table_rows]
        self._by_accession: dict[str, list[TableRow]] = {}
        self._by_patient_date: dict[tuple[str, str], list[TableRow]] = {}
        for row in self.table_rows:
            if strict and row.problem:
                raise ClinicalTableError(f"row {row.number} is malformed: {row.problem}", source)
            accession = _key(row.cells.get(KEY_ACCESSION))
            patient, date = _key(row.cells.get(KEY_PATIENT)), _date_key(row.cells.get(KEY_DATE))
            if accession:
                self._index(self._by_accession, accession, row, KEY_ACCESSION, strict)
            if patient and date:
                key_name = f"{KEY_PATIENT} + {KEY_DATE}"
                self._index(self._by_patient_date, (patient, date), row, key_name, strict)
        if self.table_rows and not self._by_accession and not self._by_patient_date:
            raise ClinicalTableError(
                f"no row has an {KEY_ACCESSION} or a {KEY_PATIENT} + {KEY_DATE} key", source
            )

    def _index(
        self,
        index: dict[Any, list[TableRow]],
        key: object,
        row: TableRow,
        key_name: str,
        strict: bool,
    ) -> None:
        """Add ``row`` under ``key``; in strict mode a second row for a key raises."""
        found = index.setdefault(key, [])
        if strict and found:
            raise ClinicalTableError(
                f"rows {found[0].number} and {row.number} have the same {key_name}", self.source
            )
        found.append(row)

    @classmethod
    def read(cls, path: Path, *, strict: bool = True) -> ClinicalTable:
        """A ``.json`` table (a list of objects, or ``{"rows": [...]}``), else a CSV table
        with a header row (comma, semicolon or tab: detected)."""
        path = Path(path)
        text = _read_text(path)
        if path.suffix.lower() == ".json":
            rows = _json_rows(text, str(path))
        else:
            rows = _csv_rows(text, str(path))
        return cls(rows, str(path), strict=strict)

    def find(
        self, accession: str | None, patient_id: str | None, study_date: str | None
    ) -> RowLookup:
        """The row of this study (by AccessionNumber first, else PatientID + StudyDate), or
        why there is none usable: no row, duplicate rows, a malformed row."""
        found: list[TableRow] = []
        if accession and _key(accession) in self._by_accession:
            found = self._by_accession[_key(accession)]
        else:
            key = (_key(patient_id), _date_key(study_date))
            if all(key):
                found = self._by_patient_date.get(key, [])
        if not found:
            return RowLookup(None, NO_ROW)
        if len(found) > 1:
            return RowLookup(None, DUPLICATE_ROWS)
        if found[0].problem:
            return RowLookup(None, f"the row for this study is malformed: {found[0].problem}")
        return RowLookup(found[0].cells)

    def find_dataset(self, ds: Dataset) -> RowLookup:
        """:meth:`find` with the study's AccessionNumber, PatientID and StudyDate."""
        return self.find(
            str(ds.get("AccessionNumber", "") or ""),
            str(ds.get("PatientID", "") or ""),
            str(ds.get("StudyDate", "") or ""),
        )

    def lookup(
        self, accession: str | None, patient_id: str | None, study_date: str | None
    ) -> dict[str, Any] | None:
        """The usable row of this study, else None (see :meth:`find` for why)."""
        return self.find(accession, patient_id, study_date).row

    def lookup_dataset(self, ds: Dataset) -> dict[str, Any] | None:
        """The usable row of the study ``ds`` belongs to, else None."""
        return self.find_dataset(ds).row


# --- header ------------------------------------------------------------------------


def header_age(ds: Dataset) -> float | None:
    """PatientAge (``nnnY``, ``nnnM``, ``nnnW``, ``nnnD``) in years; None when absent."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}.get(text[-1])
    return None if per_year is None else float(text[:-1]) / per_year


def _dicom_date(value: object) -> datetime.date | None:
    """A DA value (YYYYMMDD) as a date; None when absent or malformed."""
    text = str(value or "").strip()
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def checked_header_age(ds: Dataset) -> tuple[float | None, str | None]:
    """Age in years from PatientAge, else from PatientBirthDate and StudyDate (or
    AcquisitionDate, SeriesDate), with the reason when present but not usable.

    ``(None, None)``: the header does not state the age. The birth date itself is never
    part of a reason.
    """
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if text:
        match = _DICOM_AGE.match(text)
        if match is None:
            return None, "header PatientAge is not a DICOM age string (nnnY/M/W/D)"
        age = int(match.group(1)) * _DAYS_PER[match.group(2)] / 365.25
        origin = "header PatientAge"
    else:
        born = _dicom_date(ds.get("PatientBirthDate"))
        when = next(
            (
                d
                for d in (
                    _dicom_date(ds.get(k)) for k in ("StudyDate", "AcquisitionDate", "SeriesDate")
                )
                if d is not None
            ),
            None,
        )
        if born is None or when is None:
            return None, None
        age = round((when - born).days / 365.25, 1)
        origin = "age from the header's birth date"
    problem = PLAUSIBLE_RANGES["age"].problem(age)
    return (None, f"{origin}: {problem}") if problem else (age, None)


def header_sex_male(ds: Dataset) -> float | None:
    """1 for PatientSex M, 0 for F; None for O, empty or absent."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {"M": 1.0, "F": 0.0}.get(sex)


# --- one case --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicalValues:
    """Every clinical variable of a case (None: missing, to be imputed) and the issues:
    one per missing variable (why) and one per value not taken from its first source."""

    values: Mapping[str, float | None]
    issues: tuple[ClinicalIssue, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        """The variables without a value, in :data:`CLINICAL_VARIABLES` order."""
        return tuple(n for n in CLINICAL_VARIABLES if self.values.get(n) is None)


def screen_clinical(ds: Dataset, found: RowLookup | Mapping[str, Any] | None) -> ClinicalValues:
    """The clinical variables of the case ``ds`` belongs to, checked and explained.

    ``found``: the study's row lookup (a plain row, or None for no row, also accepted).
    Header age/sex come first; the table's are used when the header lacks them or states
    an implausible age. Nothing here raises on bad data: each problem becomes an issue.
    """
    lookup = found if isinstance(found, RowLookup) else RowLookup.of(found)
    row = lookup.row
    values: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for name in CLINICAL_VARIABLES:
        if row is None:
            values[name], reasons[name] = None, lookup.reason or NO_ROW
        else:
            value, reason = checked_value(row.get(name), name, name in row)
            values[name] = value
            if reason:
                reasons[name] = reason
    issues: list[ClinicalIssue] = []
    age, age_problem = checked_header_age(ds)
    for name, from_header, header_problem in (
        ("age", age, age_problem),
        ("sex_male", header_sex_male(ds), None),
    ):
        if from_header is not None:
            values[name] = from_header
            reasons.pop(name, None)
        elif header_problem and values[name] is not None:
            issues.append(
                ClinicalIssue(name, f"{header_problem}; the clinical table's value used", False)
            )
        elif header_problem:
            reasons[name] = f"{header_problem}; table: {reasons.get(name, ABSENT)}"
        elif values[name] is None:
            reasons[name] = f"not in the header; {reasons.get(name, ABSENT)}"
    issues += [ClinicalIssue(name, reasons[name]) for name in CLINICAL_VARIABLES if name in reasons]
    return ClinicalValues(values, tuple(issues))


def clinical_values(
    ds: Dataset, row: RowLookup | Mapping[str, Any] | None
) -> dict[str, float | None]:
    """Every clinical variable of a case (None when missing or implausible): header first
    for age/sex. :func:`screen_clinical` also says why."""
    return dict(screen_clinical(ds, row).values)
