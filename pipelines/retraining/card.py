"""The model card of a stored version, from its (hash-checked) manifest and the gate's
verdict stored beside it (``model_store.lifecycle``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model_store.lifecycle import read_gate
from model_store.registry import MANIFEST_HASH_KEY
from pipelines.base import ModelCard


def _cohort_size(manifest: Mapping[str, Any]) -> int | None:
    """Training cases: the split's training list, else the cohort's size."""
    split = manifest.get("split")
    if isinstance(split, dict) and isinstance(split.get("train"), list):
        return len(split["train"])
    cohort = manifest.get("cohort")
    size = cohort.get("n_cases") if isinstance(cohort, dict) else None
    return size if isinstance(size, int) else None


def model_card(manifest: Mapping[str, Any], root: Path) -> ModelCard:
    """The card of the version ``manifest`` describes, in the store ``root``."""
    name, version = str(manifest["name"]), str(manifest["version"])
    gate = read_gate(name, version, root)
    slope = gate.metrics.get("calibration_slope") if gate is not None else None
    primary = str(manifest["primary"])
    return ModelCard(
        name=name,
        version=version,
        artefact_sha256=str(manifest[MANIFEST_HASH_KEY]),
        training_cohort_sha256=str(manifest["training_data_hash"]),
        training_cohort_size=_cohort_size(manifest),
        cutoff=float(manifest["cutoffs"][primary]),
        calibration_slope=float(slope) if isinstance(slope, int | float) else None,
        created=str(manifest["created"]),
    )
