"""Trained models in the model store: scikit-learn objects via skops, weights via safetensors.

A trained model version is a folder ``model_store/<name>/<version>/`` of:

- ``manifest.json`` (schema and hash checks in :mod:`model_store.registry`) with, besides
  ``name``, ``version``, ``kind`` ("trained model") and ``provenance``: ``created`` (UTC,
  ISO 8601), ``recipe``, ``feature_names`` (the estimators' input columns, in order),
  ``training_data_hash`` (:func:`training_data_hash`), ``metrics``, ``notice`` (e.g.
  :data:`SYNTHETIC_NOTICE`), ``primary`` (the estimator the node uses), ``cutoffs``
  (risk cut-off per estimator, ``risk >= cutoff`` is positive) and ``files``;
- ``<key>.skops``: one fitted scikit-learn object per key, written by skops (no pickle);
- ``<key>.safetensors``: one dict of named torch tensors per key (CNN weights).

Loading checks every hash first, then opens skops files only when each type they hold
that skops does not trust by default is in :func:`trusted_types`: the project's own
estimators and a fixed list of scikit-learn internals, computed once and checked against
what the file declares. torch is imported only to save or read weights.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import skops.io as sio
from safetensors import SafetensorError
from sklearn.base import BaseEstimator

from model_store.registry import (
    MANIFEST,
    STORE_ROOT,
    ModelStoreError,
    artefact_dir,
    check_name,
    select_version,
    sha256_hex,
    verified_files,
    version_key,
    write_manifest,
)

if TYPE_CHECKING:
    import torch

FILE_MODE = 0o644
DIR_MODE = 0o755
SYNTHETIC_NOTICE = "trained on synthetic data — not for clinical use"
TRAINED_KIND = "trained model"
SKOPS = "skops"
SAFETENSORS = "safetensors"
TRAINED_KEYS = (
    "created",
    "recipe",
    "feature_names",
    "training_data_hash",
    "metrics",
    "notice",
    "primary",
    "cutoffs",
)

SKLEARN_INTERNAL_TYPES = frozenset(
    {
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "sklearn.model_selection._split.StratifiedKFold",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.tree._tree.Tree",
    }
)
"""scikit-learn helper types that our pipelines hold and skops does not trust by default:
fitted calibrators of the SVM, KNN's search trees and metric, the LASSO's CV splitter,
the forests' trees. They are data containers of scikit-learn itself."""

TRUSTED_PACKAGES = ("pipelines.selection", "pipelines.models")
"""Packages whose exported estimator classes (``__all__``) skops may rebuild."""


class UntrustedTypesError(ModelStoreError):
    """A skops file holds a type outside :func:`trusted_types`."""


@cache
def trusted_types() -> frozenset[str]:
    """The types, beyond skops' defaults, that artefacts may hold (fully qualified names).

    :data:`SKLEARN_INTERNAL_TYPES` plus every ``BaseEstimator`` subclass exported by the
    packages of :data:`TRUSTED_PACKAGES` (imported here, on first use).
    """
    names = set(SKLEARN_INTERNAL_TYPES)
    for package in TRUSTED_PACKAGES:
        module = importlib.import_module(package)
        for attribute in getattr(module, "__all__", ()):
            value = getattr(module, attribute)
            if inspect.isclass(value) and issubclass(value, BaseEstimator):
                names.add(f"{value.__module__}.{value.__qualname__}")
    return frozenset(names)


def check_trusted(found: Iterable[str], filename: str, trusted: frozenset[str]) -> list[str]:
    """Return ``found`` (sorted) if all of it is trusted, else raise naming the file."""
    types = sorted(found)
    refused = [name for name in types if name not in trusted]
    if refused:
        raise UntrustedTypesError(
            f"{filename}: holds types outside the trusted list: {', '.join(refused)}; "
            "refusing to load it"
        )
    return types


def label_table_bytes(case_ids: Sequence[str], labels: Sequence[Any]) -> bytes:
    """A canonical CSV (``case_id,label``, rows sorted by case id, LF endings, UTF-8).

    Use it as ``table`` of :func:`training_data_hash` when the labels are in memory
    rather than in a labels/clinical file.
    """
    if len(case_ids) != len(labels):
        raise ValueError(f"{len(case_ids)} case ids for {len(labels)} labels")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("case_id", "label"))
    for case, label in sorted(zip(map(str, case_ids), labels, strict=True)):
        writer.writerow((case, label.item() if hasattr(label, "item") else label))
    return buffer.getvalue().encode("utf-8")


def training_data_hash(case_ids: Iterable[str], table: bytes) -> str:
    """sha256 identifying a training set: its case ids and its label/clinical table.

    Defined as ``sha256(id_1 LF id_2 LF ... id_n LF NUL table)`` with the ids UTF-8,
    unique and sorted by code point, and ``table`` the bytes of the labels/clinical file
    as read (or :func:`label_table_bytes`). Ids may not contain LF or NUL.
    """
    ids = [str(case) for case in case_ids]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError("training case ids must be non-empty and unique")
    if any("\n" in case or "\0" in case for case in ids):
        raise ValueError("a case id contains a line feed or NUL")
    payload = "".join(f"{case}\n" for case in sorted(ids)).encode("utf-8")
    return sha256_hex(payload + b"\0" + table)


@dataclass(frozen=True)
class TrainingRecord:
    """What a trained version's manifest records besides its files."""

    recipe: Mapping[str, Any]
    feature_names: tuple[str, ...]
    training_data_hash: str
    metrics: Mapping[str, Any]
    cutoffs: Mapping[str, float]
    primary: str
    notice: str = SYNTHETIC_NOTICE
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further JSON-ready manifest entries (e.g. cohort size); may not shadow a key."""


@dataclass(frozen=True)
class ModelArtefact:
    """A loaded, verified trained model version."""

    name: str
    version: str
    manifest: Mapping[str, Any]
    estimators: Mapping[str, Any]
    weight_files: Mapping[str, bytes]

    @property
    def primary(self) -> Any:
        """The estimator the node uses (the manifest's ``primary``)."""
        return self.estimators[self.manifest["primary"]]

    @property
    def cutoff(self) -> float:
        """The primary estimator's risk cut-off."""
        return float(self.manifest["cutoffs"][self.manifest["primary"]])

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The estimators' input columns, in order."""
        return tuple(self.manifest["feature_names"])

    @property
    def notice(self) -> str:
        """The manifest's notice, to be carried by every output (SR, SC)."""
        return str(self.manifest["notice"])

    def weights(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of ``<key>.safetensors`` (hash already checked); needs torch."""
        filename = f"{key}.{SAFETENSORS}"
        if filename not in self.weight_files:
            raise ModelStoreError(f"{self.name} {self.version}: no weights {filename}")
        try:
            from safetensors.torch import load
        except ImportError as exc:
            raise ModelStoreError(f"{filename}: reading weights needs torch ({exc})") from exc
        try:
            return dict(load(self.weight_files[filename]))
        except SafetensorError as exc:
            raise ModelStoreError(f"{filename}: not a safetensors file ({exc})") from exc


def _skops_bytes(key: str, estimator: Any, trusted: frozenset[str]) -> tuple[bytes, list[str]]:
    data = sio.dumps(estimator)
    types = check_trusted(sio.get_untrusted_types(data=data), f"{key}.{SKOPS}", trusted)
    return data, types


def _tensor_bytes(key: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ModelStoreError(f"{key}.{SAFETENSORS}: saving weights needs torch ({exc})") from exc
    if not tensors:
        raise ModelStoreError(f"{key}.{SAFETENSORS}: no tensors to save")
    return bytes(save({str(name): tensor.contiguous() for name, tensor in tensors.items()}))


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder: so that its new entries survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file, readable by all (0644), and fsync it."""
    path.write_bytes(data)
    os.chmod(path, FILE_MODE)
    fsync_path(path)


def save_model(
    name: str,
    version: str,
    estimators: Mapping[str, Any],
    record: TrainingRecord,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    root: Path = STORE_ROOT,
) -> Path:
    """Write a new trained version to ``root/<name>/<version>/`` and return its folder.

    Versions are immutable: an existing folder is refused. The folder is written beside
    its final place (a hidden ``.<version>-*`` staging folder), every file fsynced, made
    readable by all (folders 0755, files 0644) and renamed into place, so a reader (and a
    process killed mid-write) never sees half a version.
    """
    check_name(name, "model name")
    version_key(version)
    weights = dict(tensors or {})
    keys = [check_name(key, "estimator key") for key in estimators]
    for key in weights:
        check_name(key, "weights key")
    if record.primary not in estimators:
        raise ModelStoreError(f"primary estimator {record.primary!r} is not among {keys}")
    if set(record.cutoffs) - set(estimators):
        raise ModelStoreError("cut-offs given for estimators that are not saved")
    clash = set(record.extra) & {*TRAINED_KEYS, "schema_version", "name", "version", "files"}
    if clash:
        raise ModelStoreError(f"extra manifest entries shadow reserved keys: {sorted(clash)}")
    final = (root / name / version).resolve()
    if final.exists():
        raise ModelStoreError(
            f"{final}: version {version} of {name} exists; versions are immutable"
        )
    trusted = trusted_types()
    files: dict[str, bytes] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, estimator in estimators.items():
        data, types = _skops_bytes(key, estimator, trusted)
        files[f"{key}.{SKOPS}"] = data
        entries[f"{key}.{SKOPS}"] = {"format": SKOPS, "types": types}
    for key, tensor_dict in weights.items():
        files[f"{key}.{SAFETENSORS}"] = _tensor_bytes(key, tensor_dict)
        entries[f"{key}.{SAFETENSORS}"] = {"format": SAFETENSORS}
    for filename, data in files.items():
        entries[filename] = {"sha256": sha256_hex(data), "bytes": len(data), **entries[filename]}
    manifest = {
        "name": name,
        "version": version,
        "kind": TRAINED_KIND,
        "provenance": record.notice,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe": dict(record.recipe),
        "feature_names": list(record.feature_names),
        "training_data_hash": record.training_data_hash,
        "metrics": dict(record.metrics),
        "notice": record.notice,
        "primary": record.primary,
        "cutoffs": {key: float(value) for key, value in record.cutoffs.items()},
        **dict(record.extra),
        "files": entries,
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        for filename, data in files.items():
            _write_synced(staging / filename, data)
        os.chmod(write_manifest(staging, manifest), FILE_MODE)
        fsync_path(staging / MANIFEST)
        os.chmod(staging, DIR_MODE)
        fsync_path(staging)
        staging.rename(final)
        fsync_path(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final


def load_model(name: str, version: str | None = None, root: Path = STORE_ROOT) -> ModelArtefact:
    """Load a trained version (default: the promoted, else the latest), all hashes checked.

    Raises :class:`ModelStoreError` naming the file for a changed or missing file, an
    unsupported manifest schema, or a manifest that is not a trained model's;
    :class:`UntrustedTypesError` for a skops file holding an untrusted type.
    """
    chosen = select_version(name, root) if version is None else version
    manifest, contents = verified_files(name, chosen, root)
    path = artefact_dir(name, chosen, root) / MANIFEST
    if manifest["kind"] != TRAINED_KIND:
        raise ModelStoreError(f"{path}: kind {manifest['kind']!r} is not {TRAINED_KIND!r}")
    missing = [key for key in TRAINED_KEYS if key not in manifest]
    if missing:
        raise ModelStoreError(f"{path}: the manifest lacks {', '.join(map(repr, missing))}")
    trusted = trusted_types()
    estimators: dict[str, Any] = {}
    weight_files: dict[str, bytes] = {}
    for filename, data in contents.items():
        kind = manifest["files"][filename].get("format")
        stem = filename.rsplit(".", 1)[0]
        if kind == SKOPS and filename.endswith(f".{SKOPS}"):
            types = check_trusted(sio.get_untrusted_types(data=data), filename, trusted)
            try:
                estimators[stem] = sio.loads(data, trusted=types)
            except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
                raise ModelStoreError(f"{filename}: not a readable skops file ({exc})") from exc
        elif kind == SAFETENSORS and filename.endswith(f".{SAFETENSORS}"):
            weight_files[filename] = data
        else:
            raise ModelStoreError(f"{path}: {filename} has unknown format {kind!r}")
    if manifest["primary"] not in estimators:
        raise ModelStoreError(f"{path}: primary estimator {manifest['primary']!r} is not saved")
    return ModelArtefact(
        name=name,
        version=chosen,
        manifest=manifest,
        estimators=estimators,
        weight_files=weight_files,
    )
