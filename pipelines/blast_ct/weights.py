"""Where the BLAST-CT v1 weights are, whether they are the published ones, and loading them.

The weights are third-party files that the project never commits: the folder is the
setting ``[pipelines.blast_ct] weights_dir``, by default ``../shared/models/blast_ct_v1``
next to the repository. ``model_store/blast_ct_v1/manifest.json`` pins each file's sha256; a file
that is missing makes the segmenter unavailable, one that differs is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.base import ModelRefused, PipelineUnavailable
from pipelines.blast_ct.network import DeepMedic

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_PATH = REPO_ROOT / "model_store" / "blast_ct_v1" / "manifest.json"
SETTING = "[pipelines.blast_ct] weights_dir"
DEFAULT_DIR = REPO_ROOT.parent / "shared" / "models" / "blast_ct_v1"
ENSEMBLE_SIZE = 12


class BlastCtUnavailable(PipelineUnavailable):
    """The weight files are not where the node looks for them; the message says where."""


class WeightsChanged(ModelRefused):
    """A weight file differs from the one the manifest pins."""


def weights_dir(configured: Path | None = None) -> Path:
    """The configured weights folder, else ``../shared/models/blast_ct_v1``."""
    return DEFAULT_DIR if configured is None else configured


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, Any]:
    """The project's manifest of the BLAST-CT v1 files."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: not a BLAST-CT manifest (no 'files' object)")
    return manifest


def member_file(index: int) -> str:
    """Manifest name of ensemble member ``index`` (1-based, the reference's numbering)."""
    if not 1 <= index <= ENSEMBLE_SIZE:
        raise ValueError(f"BLAST-CT v1 has members 1..{ENSEMBLE_SIZE}, not {index}")
    return f"saved_models/model_{index}.pt"


def verified_path(folder: Path, name: str, manifest: Mapping[str, Any]) -> Path:
    """``folder / name`` after its sha256 matched the manifest's."""
    expected = manifest["files"][name]["sha256"]
    path = folder / name
    if not path.is_file():
        raise BlastCtUnavailable(
            f"BLAST-CT v1 weights not found: {path} is missing. Put the 12 files "
            f"saved_models/model_1.pt .. model_12.pt of biomedia-mira/blast-ct "
            f"(commit {manifest.get('source', {}).get('commit', '?')}) under {folder}, "
            f"or set {SETTING} to the folder that holds them"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise WeightsChanged(
            f"{path} has sha256 {digest}, but model_store/blast_ct_v1/manifest.json pins "
            f"{expected}: it is not the published BLAST-CT v1 file; refusing to use it"
        )
    return path


def flush_subnormals(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set subnormal floats (|v| < 1.18e-38) to zero.

    Several published members hold many subnormal weights (dead channels); the CPU runs
    subnormal arithmetic up to 50 times slower, while zeroing them changes no result
    beyond float32 rounding.
    """
    tiny = torch.finfo(torch.float32).tiny
    return {
        k: v.masked_fill(v.abs() < tiny, 0.0) if v.is_floating_point() else v
        for k, v in state.items()
    }


def load_member(path: Path, device: torch.device) -> DeepMedic:
    """One member from its published state dict, strictly, in eval mode on ``device``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DeepMedic()
    model.load_state_dict(flush_subnormals(state), strict=True)
    return model.eval().to(device)


def load_ensemble(
    members: Sequence[int], device: torch.device, folder: Path | None = None
) -> list[DeepMedic]:
    """Members (1-based indices, in the given order), each hash-checked, then loaded."""
    folder = weights_dir(folder)
    manifest = load_manifest()
    return [load_member(verified_path(folder, member_file(i), manifest), device) for i in members]
