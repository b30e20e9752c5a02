"""Trained networks as model-store versions: safetensors weights plus a hashed manifest.

A bundle is ``<root>/<name>/<version>/`` holding ``weights.safetensors`` and
``manifest.json`` (written by ``model_store.registry.write_manifest``: it lists the
weights' sha256 and its own). The manifest says what trained the network (``notice``,
``training``), how it was built (``network``) and how it scored (``metrics``). Loading
goes through ``model_store.registry.verified_files``, so a changed byte is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from model_store.artefacts import SYNTHETIC_NOTICE
from model_store.registry import (
    STORE_ROOT,
    ModelStoreError,
    check_name,
    sha256_hex,
    verified_files,
    version_key,
    write_manifest,
)

WEIGHTS = "weights.safetensors"
KIND = "trained network"


@dataclass(frozen=True)
class Bundle:
    """A loaded, hash-checked bundle: its manifest and its tensors."""

    name: str
    version: str
    manifest: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]

    @property
    def notice(self) -> str:
        """What trained the network, for every output to carry."""
        return str(self.manifest["notice"])


def save_bundle(
    folder: Path,
    name: str,
    version: str,
    tensors: Mapping[str, torch.Tensor],
    entries: Mapping[str, Any],
    *,
    replace: bool = False,
) -> Path:
    """Write ``tensors`` and a manifest (``entries`` merged in) to ``folder``.

    An existing bundle is refused unless ``replace``; the folder then holds exactly the
    two files (any other file in it is removed by the caller's choice of folder: an
    unexpected file makes the bundle fail to load).
    """
    check_name(name, "model name")
    version_key(version)
    if (folder / WEIGHTS).exists() and not replace:
        raise ModelStoreError(f"{folder}: a bundle exists; versions are immutable")
    data = bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS).write_bytes(data)
    manifest = {
        "name": name,
        "version": version,
        "kind": KIND,
        "provenance": SYNTHETIC_NOTICE,
        "notice": SYNTHETIC_NOTICE,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(entries),
        "files": {WEIGHTS: {"sha256": sha256_hex(data), "bytes": len(data)}},
    }
    write_manifest(folder, manifest)
    return folder


def load_bundle(name: str, version: str, root: Path = STORE_ROOT) -> Bundle:
    """The bundle ``root/name/version`` after every hash check (``ModelStoreError``)."""
    manifest, contents = verified_files(name, version, root)
    if manifest["kind"] != KIND or WEIGHTS not in contents:
        raise ModelStoreError(f"{name} {version}: not a {KIND} bundle with {WEIGHTS}")
    return Bundle(name, version, manifest, load(contents[WEIGHTS]))


def derive_bundle(
    name: str,
    source: str,
    version: str,
    inference: Mapping[str, Any],
    entries: Mapping[str, Any],
    root: Path = STORE_ROOT,
) -> Path:
    """A new version ``root/name/version`` holding version ``source``'s weights (hash
    checked) with its manifest's ``inference`` entries updated by ``inference`` and
    ``entries`` merged in (``derived_from`` names the source): a version whose change is
    in the rules, not in the weights."""
    bundle = load_bundle(name, source, root)
    manifest = {
        k: v
        for k, v in bundle.manifest.items()
        if k not in ("name", "version", "created", "files", "schema_version", "manifest_sha256")
    }
    manifest["inference"] = {**dict(manifest["inference"]), **dict(inference)}
    manifest.update(entries)
    return save_bundle(root / name / version, name, version, bundle.tensors, manifest)
