"""CNN weights as safetensors: a classifier's state dict with its backbone name, and a
site's ImageNet backbone weights. No pickle is read or written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipelines.cnn.networks import BackboneName, CnnClassifier, build_classifier

FORMAT = "dicomnode-cnn-classifier/1"
_HEAD_PREFIXES = ("fc.", "last_linear.", "_fc.")


def save_classifier(model: CnnClassifier, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` (safetensors), naming its backbone."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "backbone": str(model.backbone)})


def load_classifier(path: Path, device: torch.device | None = None) -> CnnClassifier:
    """Rebuild the classifier saved at ``path``, in eval mode, on ``device`` (default CPU).

    Raises ``ValueError`` when the file is not a classifier saved by ``save_classifier``
    or its tensors do not fit the backbone it names.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format {metadata.get('format')!r})")
    model = build_classifier(BackboneName(metadata["backbone"]))
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit backbone {metadata['backbone']}: {error}") from error
    return model.to(device or torch.device("cpu")).eval()


def load_backbone_weights(model: CnnClassifier, path: Path) -> None:
    """Load a backbone state dict (e.g. ImageNet weights) from ``path`` into ``model.features``.

    The file's own classification layer (``fc``, ``last_linear``, ``_fc``) is ignored;
    every other backbone tensor must be present with the right shape.
    """
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(_HEAD_PREFIXES)}
    try:
        model.features.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit backbone {model.backbone}: {error}") from error
