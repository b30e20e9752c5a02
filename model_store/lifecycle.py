"""A model's life after training: candidates, the promotion gate's verdict, the version in
service, its shadow, rollback and the audit trail.

Files beside a model's version folders (``<root>/<name>/``):

- ``<version>.gate.json``: the promotion gate's verdict on a candidate (passed, reasons,
  metrics), written by the retraining service; a version without one is a candidate that
  was never evaluated.
- ``promoted.json``: ``{"version": ..., "shadow": ..., "history": [...]}``; ``version``
  is what :func:`model_store.registry.promoted_version` reads (the format stays the
  one-key file it was), ``shadow`` a version run beside it without sending anything,
  ``history`` every promotion and rollback (newest last).
- ``audit.jsonl``: one JSON line per action (promote, forced promote, rollback, shadow),
  who, when, why.

Every file is written whole or not at all (:func:`atomic_write`: temporary file, fsync,
rename, fsync of the folder), readable by all (0644), so a kill -9 at any point leaves
either the old file or the new one. A version is only listed once its folder holds a
complete manifest (``save_model`` renames a finished folder into place); staging folders
left by a killed run (``.<version>-*``) are never listed and :func:`clean_staging`
removes them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model_store.registry import (
    PROMOTED,
    STORE_ROOT,
    ModelStoreError,
    check_name,
    list_versions,
    load_manifest,
    promoted_version,
    select_version,
    verified_files,
    version_key,
)

GATE_SUFFIX = ".gate.json"
AUDIT = "audit.jsonl"
FILE_MODE = 0o644
DIR_MODE = 0o755
STAGING_PREFIX = "."


@dataclass(frozen=True)
class GateRecord:
    """The promotion gate's verdict on one candidate, as stored beside it."""

    version: str
    passed: bool
    reasons: tuple[str, ...]
    metrics: Mapping[str, Any]
    evaluated: str  # UTC, ISO 8601

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "version": self.version,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "metrics": dict(self.metrics),
            "evaluated": self.evaluated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateRecord:
        """Read the stored form back."""
        return cls(
            version=str(data["version"]),
            passed=bool(data["passed"]),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
            metrics=dict(data.get("metrics", {})),
            evaluated=str(data.get("evaluated", "")),
        )


@dataclass(frozen=True)
class VersionStatus:
    """One stored version and where it stands."""

    version: str
    created: str
    status: str  # "in service", "shadow", "passed gate", "failed gate", "not evaluated"
    reasons: tuple[str, ...]
    training_cases: int | None


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename or a new entry in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all, mode 0644 (see the module)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")


def model_dir(name: str, root: Path = STORE_ROOT) -> Path:
    """The folder of all versions of ``name``."""
    return root / check_name(name, "model name")


def gate_path(name: str, version: str, root: Path = STORE_ROOT) -> Path:
    """Where the gate's verdict on ``version`` is stored."""
    version_key(version)
    return model_dir(name, root) / f"{version}{GATE_SUFFIX}"


def write_gate(name: str, record: GateRecord, root: Path = STORE_ROOT) -> Path:
    """Store the gate's verdict beside the candidate."""
    return atomic_write(gate_path(name, record.version, root), _json_bytes(record.to_dict()))


def read_gate(name: str, version: str, root: Path = STORE_ROOT) -> GateRecord | None:
    """The gate's verdict on ``version``, or None when it was never evaluated."""
    path = gate_path(name, version, root)
    if not path.is_file():
        return None
    try:
        return GateRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelStoreError(f"{path}: unreadable gate record ({exc})") from exc


def read_service(name: str, root: Path = STORE_ROOT) -> dict[str, Any]:
    """The whole ``promoted.json`` (empty when nothing was ever promoted)."""
    path = model_dir(name, root) / PROMOTED
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"{path}: unreadable promotion record ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path}: the promotion record is not a JSON object")
    return data


def _write_service(name: str, data: Mapping[str, Any], root: Path) -> Path:
    return atomic_write(model_dir(name, root) / PROMOTED, _json_bytes(data))


def audit(name: str, action: str, root: Path = STORE_ROOT, **details: Any) -> dict[str, Any]:
    """Append one action to ``audit.jsonl`` (fsynced) and return the entry."""
    entry = {"at": now_iso(), "model": name, "action": action, **details}
    path = model_dir(name, root) / AUDIT
    fresh = not path.exists()
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if fresh:
        os.chmod(path, FILE_MODE)
        fsync_dir(path.parent)
    return entry


def read_audit(name: str, root: Path = STORE_ROOT) -> list[dict[str, Any]]:
    """Every audited action, oldest first."""
    path = model_dir(name, root) / AUDIT
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def promote_version(
    name: str,
    version: str,
    root: Path = STORE_ROOT,
    *,
    by: str,
    reason: str = "",
    force: bool = False,
) -> GateRecord | None:
    """Put ``version`` in service; it must load with valid hashes and have passed the gate.

    A candidate that failed the gate, or was never evaluated, needs ``force`` and a
    ``reason``; the forced promotion is audited with the gate's reasons. Returns the
    gate record (None when there is none). The running node picks the change up on its
    next job (``pipelines.registry``).
    """
    verified_files(name, version, root)
    gate = read_gate(name, version, root)
    if gate is None or not gate.passed:
        why = (
            "was never evaluated by the gate"
            if gate is None
            else "failed the gate: " + ("; ".join(gate.reasons))
        )
        if not force:
            raise ModelStoreError(
                f"{name} {version} {why}; promote it with --force and a --reason if you must"
            )
        if not reason.strip():
            raise ModelStoreError(f"{name} {version} {why}: a forced promotion needs a reason")
    data = read_service(name, root)
    previous = data.get("version")
    history = list(data.get("history", []))
    action = "forced promote" if gate is None or not gate.passed else "promote"
    history.append({"action": action, "version": version, "previous": previous, "at": now_iso()})
    data.update(version=version, history=history)
    if data.get("shadow") == version:
        data["shadow"] = None
    _write_service(name, data, root)
    audit(
        name, action, root, version=version, previous=previous, by=by, reason=reason,
        gate_reasons=list(gate.reasons) if gate else ["not evaluated"],
    )  # fmt: skip
    return gate


def rollback(name: str, root: Path = STORE_ROOT, *, by: str, reason: str = "") -> str:
    """Put back the version that was in service before the current one; returns it."""
    data = read_service(name, root)
    current = data.get("version")
    history = list(data.get("history", []))
    earlier = [
        entry["previous"]
        for entry in reversed(history)
        if entry.get("version") == current
        and entry.get("previous")
        and entry.get("action") != "rollback"
    ]
    if current is None or not earlier:
        raise ModelStoreError(f"{name}: no earlier version in service to roll back to")
    target = str(earlier[0])
    verified_files(name, target, root)
    history.append({"action": "rollback", "version": target, "previous": current, "at": now_iso()})
    data.update(version=target, history=history)
    _write_service(name, data, root)
    audit(name, "rollback", root, version=target, previous=current, by=by, reason=reason)
    return target


def set_shadow(
    name: str, version: str | None, root: Path = STORE_ROOT, *, by: str, reason: str = ""
) -> None:
    """Run ``version`` in shadow beside the version in service (None: stop the shadow)."""
    if version is not None:
        verified_files(name, version, root)
        if version == promoted_version(name, root):
            raise ModelStoreError(f"{name} {version} is in service; it cannot also be its shadow")
    data = read_service(name, root)
    if "version" not in data:
        data["version"] = select_version(name, root)
    data["shadow"] = version
    _write_service(name, data, root)
    audit(name, "shadow", root, version=version, by=by, reason=reason)


def shadow_version(name: str, root: Path = STORE_ROOT) -> str | None:
    """The version running in shadow, if any."""
    value = read_service(name, root).get("shadow")
    return None if value is None else str(value)


def next_version(name: str, root: Path = STORE_ROOT) -> str:
    """The next minor version after the latest stored one (``1.0.0`` -> ``1.1.0``)."""
    versions = list_versions(name, root)
    staged = [
        entry.name[1:].split("-", 1)[0]
        for entry in model_dir(name, root).glob(f"{STAGING_PREFIX}*-*")
        if entry.is_dir()
    ]
    numbers = [version_key(v) for v in versions]
    numbers += [version_key(v) for v in staged if v.replace(".", "").isdigit()]
    if not numbers:
        return "1.0.0"
    top = max(numbers)
    return f"{top[0]}.{(top[1] if len(top) > 1 else 0) + 1}.0"


def clean_staging(name: str, root: Path = STORE_ROOT) -> list[str]:
    """Remove staging folders and files a killed run left behind; returns their names."""
    folder = model_dir(name, root)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.glob(f"{STAGING_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return sorted(removed)


def version_statuses(name: str, root: Path = STORE_ROOT) -> list[VersionStatus]:
    """Every stored version of ``name`` with where it stands, oldest first."""
    service = read_service(name, root)
    stored = list_versions(name, root)
    in_service = service.get("version") or (select_version(name, root) if stored else None)
    shadow = service.get("shadow")
    rows = []
    for version in stored:
        manifest = load_manifest(name, version, root)
        gate = read_gate(name, version, root)
        if version == in_service:
            status = "in service"
        elif version == shadow:
            status = "shadow"
        elif gate is None:
            status = "not evaluated"
        else:
            status = "passed gate" if gate.passed else "failed gate"
        cohort = manifest.get("cohort")
        size = cohort.get("n_cases") if isinstance(cohort, dict) else None
        rows.append(
            VersionStatus(
                version=version,
                created=str(manifest.get("created", "")),
                status=status,
                reasons=gate.reasons if gate else (),
                training_cases=int(size) if isinstance(size, int) else None,
            )
        )
    return rows


def service_stamp(name: str, root: Path = STORE_ROOT) -> tuple[int, int, int] | None:
    """(mtime ns, size, inode) of ``promoted.json``: changes whenever a promotion,
    rollback or shadow change is written (each replaces the file); None without one."""
    try:
        stat = (model_dir(name, root) / PROMOTED).stat()
    except (OSError, ModelStoreError):
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def history(name: str, root: Path = STORE_ROOT) -> Sequence[Mapping[str, Any]]:
    """Every promotion and rollback recorded in ``promoted.json``, oldest first."""
    return list(read_service(name, root).get("history", []))
