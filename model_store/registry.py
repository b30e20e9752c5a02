"""Load versioned artefacts from the model store, checking them against their manifest.

Layout: ``model_store/<name>/<version>/manifest.json`` names the model (name, version,
kind, provenance) and lists its files with their sha256; ``load_parameters`` reads
``parameters.json`` only after its hash matches, so an edited file cannot be used silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STORE_ROOT = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
PARAMETERS = "parameters.json"


class ModelStoreError(Exception):
    """An artefact is missing, malformed or does not match its manifest."""


def artefact_dir(name: str, version: str, root: Path = STORE_ROOT) -> Path:
    """The folder of one model version, refusing names that would leave the store."""
    folder = (root / name / version).resolve()
    if root.resolve() not in folder.parents:
        raise ModelStoreError(f"model {name!r} version {version!r} is outside the model store")
    if not folder.is_dir():
        raise ModelStoreError(f"model {name!r} version {version!r} is not in {root}")
    return folder


def load_manifest(name: str, version: str, root: Path = STORE_ROOT) -> dict[str, Any]:
    """The manifest of one model version, checked to name that model and version."""
    path = artefact_dir(name, version, root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelStoreError(f"{path}: the manifest is not a JSON object")
    for key in ("name", "version", "kind", "provenance", "files"):
        if key not in manifest:
            raise ModelStoreError(f"{path}: the manifest lacks {key!r}")
    if (manifest["name"], manifest["version"]) != (name, version):
        raise ModelStoreError(
            f"{path}: the manifest names {manifest['name']} {manifest['version']}, "
            f"not {name} {version}"
        )
    return manifest


def verified_bytes(name: str, version: str, filename: str, root: Path = STORE_ROOT) -> bytes:
    """A file of one model version, after its sha256 matched the manifest's."""
    manifest = load_manifest(name, version, root)
    entry = manifest["files"].get(filename)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise ModelStoreError(f"{name} {version}: {filename} is not listed in the manifest")
    path = artefact_dir(name, version, root) / filename
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(f"{name} {version}: cannot read {filename} ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ModelStoreError(
            f"{name} {version}: {filename} has sha256 {digest}, but the manifest records "
            f"{entry['sha256']}; the file was changed after it was registered"
        )
    return data


def load_parameters(name: str, version: str, root: Path = STORE_ROOT) -> dict[str, Any]:
    """The verified ``parameters.json`` of one model version, as a dict."""
    try:
        parameters = json.loads(verified_bytes(name, version, PARAMETERS, root))
    except json.JSONDecodeError as exc:
        raise ModelStoreError(f"{name} {version}: {PARAMETERS} is not JSON ({exc})") from exc
    if not isinstance(parameters, dict):
        raise ModelStoreError(f"{name} {version}: {PARAMETERS} is not a JSON object")
    return parameters
