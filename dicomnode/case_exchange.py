"""Cohort export and import between sites that pool cases (``dicomnode cases export|import``).

An export is a gzip tar archive:

- ``manifest.json``: format, when, and for every file its sha256 and size;
- ``cases/<key>/case.json`` and ``cases/<key>/arrays.npz`` of each exported case;
- ``labels.json``: the exported cases' labels (``study_key``, ``outcome``, ``value``).

Nothing in it names a patient or study (keys and patient hashes are salted hashes of the
exporting site; see ``dicomnode.case_store``). An import is all or nothing: the archive
is refused, saying why, when a member is not a plain file at an expected path, a file is
missing, unlisted or differs from its sha256, a case's ``case.json`` is not a case
record of its key, or a case is already in the store (duplicate). The cases are then
renamed into the store and their labels imported with an audit line
(``dicomnode.labels.import_rows``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.case_store import (
    ARRAYS,
    CASE_JSON,
    CaseStoreError,
    list_cases,
    load_record,
    read_meta,
)
from dicomnode.labels import LabelError, import_rows, labels

MANIFEST = "manifest.json"
LABELS = "labels.json"
EXPORT_FORMAT = "dicomnode-cases-1"
_CASE_MEMBER = re.compile(rf"^cases/([0-9a-f]{{32}})/({re.escape(CASE_JSON)}|{re.escape(ARRAYS)})$")


def _add(archive: tarfile.TarFile, name: str, data: bytes, files: dict[str, Any]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def export_cases(root: Path, state_dir: Path, out: Path, keys: Sequence[str] = ()) -> int:
    """Write the cases ``keys`` (all when empty) and their labels to ``out``; returns the
    number of cases exported."""
    cases = {case.key for case in list_cases(root)}
    chosen = sorted(keys) if keys else sorted(cases)
    unknown = [key for key in chosen if key not in cases]
    if unknown:
        raise CaseStoreError(f"no such case(s): {', '.join(unknown)}")
    for key in chosen:
        load_record(root, key)  # refuses a case whose arrays no longer match
    rows = [
        {"study_key": label.study_key, "outcome": label.outcome, "value": label.value}
        for label in labels(state_dir)
        if label.study_key in set(chosen)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        _write_archive(partial, root, chosen, rows)
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return len(chosen)


def _write_archive(
    partial: Path, root: Path, chosen: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    files: dict[str, Any] = {}
    with tarfile.open(partial, "w:gz") as archive:
        for key in chosen:
            for name in (CASE_JSON, ARRAYS):
                _add(archive, f"cases/{key}/{name}", (root / key / name).read_bytes(), files)
        _add(archive, LABELS, json.dumps(rows, sort_keys=True).encode(), files)
        manifest = {
            "format": EXPORT_FORMAT,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cases": list(chosen),
            "files": files,
        }
        data = json.dumps(manifest, sort_keys=True, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(data), 0o644
        archive.addfile(info, io.BytesIO(data))


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member of the archive as bytes; refuses anything but plain files."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                if not member.isfile():
                    raise CaseStoreError(f"{path}: member {member.name!r} is not a plain file")
                if member.name in members:
                    raise CaseStoreError(f"{path}: member {member.name!r} appears twice")
                handle = archive.extractfile(member)
                if handle is None:
                    raise CaseStoreError(f"{path}: member {member.name!r} cannot be read")
                members[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CaseStoreError(f"{path}: not a readable case archive ({exc})") from exc
    return members


def _check(path: Path, members: dict[str, bytes]) -> tuple[list[str], list[dict[str, Any]]]:
    """The archive's case keys and label rows, once every check of the module passed."""
    if MANIFEST not in members:
        raise CaseStoreError(f"{path}: no {MANIFEST}: not a case export")
    try:
        manifest = json.loads(members.pop(MANIFEST))
        files: dict[str, Any] = manifest["files"]
        keys = [str(k) for k in manifest["cases"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CaseStoreError(f"{path}: {MANIFEST} unreadable ({exc})") from exc
    if manifest.get("format") != EXPORT_FORMAT:
        raise CaseStoreError(f"{path}: format {manifest.get('format')!r}, not {EXPORT_FORMAT}")
    problems = []
    for name in sorted(set(files) - set(members)):
        problems.append(f"{name}: listed but missing")
    for name in sorted(set(members) - set(files)):
        problems.append(f"{name}: not listed in the manifest")
    for name in sorted(set(files) & set(members)):
        if name != LABELS and not _CASE_MEMBER.match(name):
            problems.append(f"{name}: unexpected path")
        elif hashlib.sha256(members[name]).hexdigest() != files[name].get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (corrupt)")
    expected = {f"cases/{k}/{n}" for k in keys for n in (CASE_JSON, ARRAYS)} | {LABELS}
    for name in sorted(expected - set(files)):
        problems.append(f"{name}: missing from the manifest")
    if problems:
        raise CaseStoreError(f"{path}: refused, nothing imported:\n  " + "\n  ".join(problems))
    try:
        rows: list[dict[str, Any]] = json.loads(members[LABELS])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseStoreError(f"{path}: {LABELS} unreadable ({exc})") from exc
    unknown = sorted({str(r.get("study_key")) for r in rows} - set(keys))
    if unknown:
        raise CaseStoreError(f"{path}: labels of cases not in the archive: {', '.join(unknown)}")
    return keys, rows


def import_cases(root: Path, state_dir: Path, path: Path, who: str) -> int:
    """Import an export into the store (see the module); returns the cases imported."""
    members = _read_members(path)
    keys, rows = _check(path, members)
    present = {case.key for case in list_cases(root)}
    duplicates = sorted(set(keys) & present)
    if duplicates:
        raise CaseStoreError(
            f"{path}: refused, nothing imported: {len(duplicates)} case(s) already in the "
            f"store: {', '.join(duplicates)}"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        for key in keys:
            (staging / key).mkdir()
            for name in (CASE_JSON, ARRAYS):
                (staging / key / name).write_bytes(members[f"cases/{key}/{name}"])
            read_meta(staging / key)  # a case record of its key
            load_record(staging, key)  # its arrays match the sha256 it records
        try:
            import_rows(state_dir, rows, who, f"cohort import {path.name}")
        except LabelError as exc:
            raise CaseStoreError(str(exc)) from exc
        for key in keys:
            (staging / key).rename(root / key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(keys)
