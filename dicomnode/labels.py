"""Outcome labels of the retraining store, with an audit trail.

A SQLite database (``<state_dir>/retraining.sqlite``) holds one row per study and
outcome (``labels``) and every change to it (``label_audit``: who, when, what, old and
new value, why). Labels come from three sources:

- ``import``: a CSV or JSON feed (:func:`import_labels`), each row validated
  (:func:`validate_row`); a file with any invalid row is refused whole, listing the rows;
- ``derived``: from follow-up imaging (``pipelines.followup.derive``), with its evidence
  and confidence (:func:`record_derived`);
- ``radiologist``: a derived label confirmed or overruled through the CLI
  (:func:`confirm`, :func:`overrule`; ``dicomnode labels confirm|overrule``).

Studies are keyed by AccessionNumber (or StudyInstanceUID); patients only ever by a
salted hash (:func:`patient_hash`), never by name or raw ID.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATABASE = "retraining.sqlite"
OUTCOMES: Mapping[str, tuple[int, int]] = {
    "ht": (0, 1),  # haemorrhagic transformation after thrombectomy
    "haematoma_expansion": (0, 1),
    "contrast_cleared": (0, 1),
    "mrs_90d": (0, 6),  # modified Rankin Scale at 90 days
}
"""Outcome name -> (lowest, highest) allowed integer value."""
KEY_COLUMNS = ("study_key", "outcome", "value")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    study_key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    value INTEGER NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    confidence REAL,
    evidence TEXT,
    patient_hash TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (study_key, outcome)
);
CREATE TABLE IF NOT EXISTS label_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    who TEXT NOT NULL,
    study_key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    action TEXT NOT NULL,
    old_value INTEGER,
    new_value INTEGER,
    reason TEXT NOT NULL
);
"""


class LabelError(Exception):
    """A label feed or change that cannot be applied; the message lists why."""


@dataclass(frozen=True)
class Label:
    """One stored label."""

    study_key: str
    outcome: str
    value: int
    source: str
    status: str  # "imported", "derived", "confirmed", "overruled"
    confidence: float | None
    evidence: dict[str, Any]


def patient_hash(patient_id: str, salt: str) -> str:
    """The salted sha256 of a PatientID, to link a patient's studies without the ID."""
    if not salt:
        raise LabelError("a salt is needed to hash patient IDs")
    return hashlib.sha256(f"{salt}\0{patient_id}".encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
def open_store(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """The label database (created on first use), committed on success."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(state_dir / DATABASE)) as db:
        db.executescript(_SCHEMA)
        with db:
            yield db


def validate_row(row: Mapping[str, Any], line: int) -> tuple[str, str, int] | str:
    """``(study_key, outcome, value)`` of a feed row, or what is wrong with it."""
    missing = [c for c in KEY_COLUMNS if str(row.get(c, "")).strip() == ""]
    if missing:
        return f"row {line}: missing {', '.join(missing)}"
    key, outcome = str(row["study_key"]).strip(), str(row["outcome"]).strip()
    if outcome not in OUTCOMES:
        return f"row {line}: unknown outcome {outcome!r} (known: {', '.join(OUTCOMES)})"
    try:
        value = int(str(row["value"]).strip())
    except ValueError:
        return f"row {line}: value {row['value']!r} is not an integer"
    low, high = OUTCOMES[outcome]
    if not low <= value <= high:
        return f"row {line}: {outcome} value {value} outside {low}-{high}"
    return key, outcome, value


def _rows(path: Path) -> list[Mapping[str, Any]]:
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LabelError(f"{path}: a JSON feed is a list of objects")
        return data
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _set(
    db: sqlite3.Connection, key: str, outcome: str, value: int, *, source: str, status: str,
    who: str, action: str, reason: str, confidence: float | None = None,
    evidence: Mapping[str, Any] | None = None, patient: str | None = None,
) -> None:  # fmt: skip
    """Write one label and its audit line (without ``evidence``, the stored evidence,
    confidence and patient hash are kept)."""
    old = db.execute(
        "SELECT value, confidence, evidence, patient_hash FROM labels "
        "WHERE study_key = ? AND outcome = ?",
        (key, outcome),
    ).fetchone()
    if evidence is None and old is not None:  # a decision keeps the derivation's evidence
        confidence, evidence, patient = old[1], json.loads(old[2] or "{}"), old[3]
    db.execute(
        "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (key, outcome, value, source, status, confidence,
         json.dumps(dict(evidence or {}), sort_keys=True), patient, _now()),
    )  # fmt: skip
    db.execute(
        "INSERT INTO label_audit (at, who, study_key, outcome, action, old_value, new_value, "
        "reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (_now(), who, key, outcome, action, None if old is None else old[0], value, reason),
    )


def import_labels(state_dir: Path, path: Path, who: str) -> int:
    """Import a CSV/JSON feed (columns ``study_key``, ``outcome``, ``value``); all rows
    valid or none imported. Returns the number of labels written."""
    try:
        rows = _rows(path)
    except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: unreadable label feed ({exc})") from exc
    return import_rows(state_dir, rows, who, f"feed {path.name}")


def import_rows(state_dir: Path, rows: Sequence[Mapping[str, Any]], who: str, source: str) -> int:
    """Import label rows (as a feed's) from ``source``; all valid or none imported."""
    checked = [validate_row(row, line) for line, row in enumerate(rows, start=2)]
    problems = [item for item in checked if isinstance(item, str)]
    if problems:
        raise LabelError(f"{source}: {len(problems)} invalid row(s), nothing imported:\n  "
                         + "\n  ".join(problems))  # fmt: skip
    with open_store(state_dir) as db:
        for key, outcome, value in (item for item in checked if not isinstance(item, str)):
            _set(db, key, outcome, value, source="import", status="imported", who=who,
                 action="import", reason=source)  # fmt: skip
    return len(checked)


def record_derived(
    state_dir: Path, key: str, outcome: str, value: bool, confidence: float,
    evidence: Mapping[str, Any], patient: str | None = None,
) -> None:  # fmt: skip
    """Store a label derived from follow-up imaging, unless a radiologist already decided."""
    with open_store(state_dir) as db:
        row = db.execute(
            "SELECT status FROM labels WHERE study_key = ? AND outcome = ?", (key, outcome)
        ).fetchone()
        if row is not None and row[0] in {"confirmed", "overruled"}:
            return
        _set(db, key, outcome, int(value), source="derived", status="derived",
             who="follow-up derivation", action="derive", reason="follow-up imaging",
             confidence=confidence, evidence=evidence, patient=patient)  # fmt: skip


def _current(db: sqlite3.Connection, key: str, outcome: str) -> int:
    row = db.execute(
        "SELECT value FROM labels WHERE study_key = ? AND outcome = ?", (key, outcome)
    ).fetchone()
    if row is None:
        raise LabelError(f"no {outcome} label for study {key}")
    return int(row[0])


def confirm(state_dir: Path, key: str, outcome: str, who: str, reason: str = "") -> int:
    """A radiologist confirms the stored label; returns its value."""
    with open_store(state_dir) as db:
        value = _current(db, key, outcome)
        _set(db, key, outcome, value, source="radiologist", status="confirmed", who=who,
             action="confirm", reason=reason)  # fmt: skip
    return value


def overrule(state_dir: Path, key: str, outcome: str, value: int, who: str, reason: str) -> None:
    """A radiologist replaces the stored label (a reason is required)."""
    if not reason.strip():
        raise LabelError("overruling a label needs a reason")
    checked = validate_row({"study_key": key, "outcome": outcome, "value": value}, 0)
    if isinstance(checked, str):
        raise LabelError(checked.replace("row 0: ", ""))
    with open_store(state_dir) as db:
        _current(db, key, outcome)
        _set(db, key, outcome, value, source="radiologist", status="overruled", who=who,
             action="overrule", reason=reason)  # fmt: skip


def labels(state_dir: Path) -> list[Label]:
    """Every stored label, by study and outcome."""
    with open_store(state_dir) as db:
        rows = db.execute(
            "SELECT study_key, outcome, value, source, status, confidence, evidence FROM labels "
            "ORDER BY study_key, outcome"
        ).fetchall()
    return [Label(r[0], r[1], int(r[2]), r[3], r[4], r[5], json.loads(r[6] or "{}")) for r in rows]


def audit_trail(state_dir: Path) -> list[dict[str, Any]]:
    """Every change, oldest first."""
    with open_store(state_dir) as db:
        cursor = db.execute("SELECT * FROM label_audit ORDER BY id")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
