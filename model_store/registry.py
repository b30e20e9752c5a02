"""Versioned artefacts in the model store, checked against their manifests.

Layout: ``model_store/<name>/<version>/`` holds ``manifest.json`` and the files it lists;
``model_store/<name>/promoted.json`` (optional) names the version in service. Every
manifest (schema :data:`SCHEMA_VERSION`) names the model (``name``, ``version``,
``kind``, ``provenance``) and lists every other file of its folder with its sha256.

Reading a version (:func:`verified_files`) checks, in order: the schema version, the
manifest's own sha256 (``manifest_sha256``: the sha256 of the manifest's bytes with that
hash replaced by 64 zeros, so any changed byte of the manifest is caught), that it names
the requested model and version, that no file is missing or unlisted, and every file's
sha256. Any failure raises :class:`ModelStoreError` naming the file. The hashes guard
against corruption and accidental edits, not against someone who rewrites the manifest:
that needs a signature outside this folder. The trained models' files are read by
:mod:`model_store.artefacts`; the threshold baseline's ``parameters.json`` by
:func:`load_parameters`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STORE_ROOT = Path(__file__).resolve().parent
"""The bundled model store (this package's folder); another store is named per pipeline
by its settings (``[pipelines.<name>] model_store_dir``, ``pipelines.settings``)."""
MANIFEST = "manifest.json"
PARAMETERS = "parameters.json"
PROMOTED = "promoted.json"
SCHEMA_VERSION = 1
MANIFEST_HASH_KEY = "manifest_sha256"
REQUIRED_KEYS = ("schema_version", "name", "version", "kind", "provenance", "files")

_PLACEHOLDER = "0" * 64
_HASH_FIELD = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ModelStoreError(Exception):
    """An artefact is missing, malformed or does not match its manifest."""


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 lower-case hex digits."""
    return hashlib.sha256(data).hexdigest()


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a plain file or folder name (letters, digits, ``_.+-``)."""
    if not isinstance(value, str) or not _NAME.match(value) or value in {".", ".."}:
        raise ModelStoreError(f"{what} {value!r} is not a plain name (letters, digits, _.+-)")
    return value


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a version string of dot-separated integers (``1.10.0`` > ``1.9.2``)."""
    if not _VERSION.match(version):
        raise ModelStoreError(f"version {version!r} is not dot-separated integers like 1.0.0")
    return tuple(int(part) for part in version.split("."))


def artefact_dir(name: str, version: str, root: Path = STORE_ROOT) -> Path:
    """The folder of one model version, refusing names that would leave the store."""
    folder = (root / name / version).resolve()
    if root.resolve() not in folder.parents:
        raise ModelStoreError(f"model {name!r} version {version!r} is outside the model store")
    if not folder.is_dir():
        raise ModelStoreError(f"model {name!r} version {version!r} is not in {root}")
    return folder


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON with its ``manifest_sha256`` filled in.

    ``schema_version`` is set to :data:`SCHEMA_VERSION` when absent. NaN and infinity are
    refused (they are not JSON): give missing metrics as null.
    """
    body = {key: value for key, value in manifest.items() if key != MANIFEST_HASH_KEY}
    body.setdefault("schema_version", SCHEMA_VERSION)
    body[MANIFEST_HASH_KEY] = _PLACEHOLDER
    try:
        text = json.dumps(body, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ModelStoreError(f"the manifest is not valid JSON: {exc}") from exc
    blank = (text + "\n").encode("utf-8")
    match = _HASH_FIELD.search(blank)
    if match is None:
        raise ModelStoreError(f"the manifest's {MANIFEST_HASH_KEY!r} field was not written")
    start, end = match.span(1)
    return blank[:start] + sha256_hex(blank).encode() + blank[end:]


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/manifest.json`` with its own sha256 (see :func:`manifest_bytes`)."""
    path = folder / MANIFEST
    path.write_bytes(manifest_bytes(manifest))
    return path


def _check_manifest_hash(path: Path, data: bytes) -> None:
    found = list(_HASH_FIELD.finditer(data))
    if len(found) != 1:
        raise ModelStoreError(f"{path}: the manifest has no single {MANIFEST_HASH_KEY!r}")
    start, end = found[0].span(1)
    recorded = data[start:end]
    digest = sha256_hex(data[:start] + _PLACEHOLDER.encode() + data[end:])
    if digest != recorded.decode():
        raise ModelStoreError(
            f"{path}: the manifest's sha256 is {digest}, but it records "
            f"{recorded.decode()}; the manifest was changed after it was written"
        )


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an artefact folder, after its schema version and own hash check."""
    path = folder / MANIFEST
    try:
        data = path.read_bytes()
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelStoreError(f"{path}: the manifest is not a JSON object")
    schema = manifest.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise ModelStoreError(
            f"{path}: manifest schema version {schema!r} is not supported by this dicomnode "
            f"(it reads schema version {SCHEMA_VERSION}); use a matching dicomnode release"
        )
    _check_manifest_hash(path, data)
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise ModelStoreError(f"{path}: the manifest lacks {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in files.values()
    ):
        raise ModelStoreError(f"{path}: 'files' must map each file name to {{'sha256': ...}}")
    for filename in files:
        if filename == MANIFEST:
            raise ModelStoreError(f"{path}: the manifest cannot list itself")
        check_name(filename, f"{path}: file")
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """Every file the manifest lists, read and checked against its sha256.

    A listed file that is missing or differs, and a file in the folder that the manifest
    does not list, raise :class:`ModelStoreError` naming the file.
    """
    listed: Mapping[str, Mapping[str, Any]] = manifest["files"]
    present = {entry.name for entry in folder.iterdir()} - {MANIFEST}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ModelStoreError(
            f"{folder}: {', '.join(unlisted)} not listed in {MANIFEST}; an artefact folder "
            "holds only the files its manifest pins"
        )
    contents = {}
    for filename, entry in listed.items():
        path = folder / filename
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelStoreError(f"{path}: cannot read {filename} ({exc})") from exc
        digest = sha256_hex(data)
        if digest != entry["sha256"]:
            raise ModelStoreError(
                f"{path}: {filename} has sha256 {digest}, but the manifest records "
                f"{entry['sha256']}; the file was changed after it was registered"
            )
        contents[filename] = data
    return contents


def load_manifest(name: str, version: str, root: Path = STORE_ROOT) -> dict[str, Any]:
    """The checked manifest of one model version, which must name that model and version."""
    folder = artefact_dir(name, version, root)
    manifest = read_manifest(folder)
    if (manifest["name"], manifest["version"]) != (name, version):
        raise ModelStoreError(
            f"{folder / MANIFEST}: the manifest names {manifest['name']} "
            f"{manifest['version']}, not {name} {version}"
        )
    return manifest


def verified_files(
    name: str, version: str, root: Path = STORE_ROOT
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of every file of one model version, all hashes checked."""
    manifest = load_manifest(name, version, root)
    return manifest, verify_files(artefact_dir(name, version, root), manifest)


def verified_bytes(name: str, version: str, filename: str, root: Path = STORE_ROOT) -> bytes:
    """One file of a model version, after the whole version passed :func:`verified_files`."""
    _, contents = verified_files(name, version, root)
    if filename not in contents:
        raise ModelStoreError(f"{name} {version}: {filename} is not listed in the manifest")
    return contents[filename]


def load_parameters(name: str, version: str, root: Path = STORE_ROOT) -> dict[str, Any]:
    """The verified ``parameters.json`` of one model version, as a dict."""
    try:
        parameters = json.loads(verified_bytes(name, version, PARAMETERS, root))
    except json.JSONDecodeError as exc:
        raise ModelStoreError(f"{name} {version}: {PARAMETERS} is not JSON ({exc})") from exc
    if not isinstance(parameters, dict):
        raise ModelStoreError(f"{name} {version}: {PARAMETERS} is not a JSON object")
    return parameters


def list_versions(name: str, root: Path = STORE_ROOT) -> list[str]:
    """The versions of model ``name`` that have a manifest, oldest first (by number)."""
    folder = root / check_name(name, "model name")
    if not folder.is_dir():
        return []
    versions = [
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and _VERSION.match(entry.name) and (entry / MANIFEST).is_file()
    ]
    return sorted(versions, key=version_key)


def promote(name: str, version: str, root: Path = STORE_ROOT) -> Path:
    """Mark ``version`` (which must load with valid hashes) as the one in service."""
    verified_files(name, version, root)
    path = root / name / PROMOTED
    path.write_text(json.dumps({"version": version}, indent=2) + "\n", encoding="utf-8")
    return path


def promoted_version(name: str, root: Path = STORE_ROOT) -> str | None:
    """The version named by ``<name>/promoted.json``, or None when nothing is promoted."""
    path = root / check_name(name, "model name") / PROMOTED
    if not path.is_file():
        return None
    try:
        version = json.loads(path.read_text(encoding="utf-8"))["version"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelStoreError(f"{path}: unreadable promotion record ({exc})") from exc
    if not isinstance(version, str) or version not in list_versions(name, root):
        raise ModelStoreError(f"{path}: promotes {version!r}, which is not a stored version")
    return version


def select_version(name: str, root: Path = STORE_ROOT) -> str:
    """The promoted version of ``name`` if one is promoted, else its latest."""
    promoted = promoted_version(name, root)
    if promoted is not None:
        return promoted
    versions = list_versions(name, root)
    if not versions:
        raise ModelStoreError(f"model {name!r} has no stored version in {root}")
    return versions[-1]
