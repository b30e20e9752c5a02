"""The studies' pyradiomics parameter files and the number of features each gives."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from radiomics import getFeatureClasses
from radiomics.featureextractor import RadiomicsFeatureExtractor

PARAMS_DIR = Path(__file__).parent / "params"
STUDY_PARAMS: dict[str, Path] = {
    "ht_after_mt": PARAMS_DIR / "ht_after_mt.yaml",
    "iph_vs_contrast": PARAMS_DIR / "iph_vs_contrast.yaml",
    "ich_expansion": PARAMS_DIR / "ich_expansion.yaml",
}


class RadiomicsError(ValueError):
    """A parameter file, image or mask that features cannot be extracted from."""


def params_path(params: str | Path) -> Path:
    """A bundled study's file by name (``"ht_after_mt"``), or an existing YAML path."""
    if isinstance(params, str) and params in STUDY_PARAMS:
        return STUDY_PARAMS[params]
    path = Path(params)
    if not path.is_file():
        raise RadiomicsError(
            f"no pyradiomics parameter file {params!r}: give a path or one of "
            f"{sorted(STUDY_PARAMS)}"
        )
    return path


def load_extractor(params: str | Path) -> RadiomicsFeatureExtractor:
    """A pyradiomics extractor configured (and schema-validated) from ``params``.

    Each file is parsed once (again when it changes); every caller gets its own copy.
    """
    path = params_path(params).resolve()
    stat = path.stat()
    return copy.deepcopy(_parsed(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=32)
def _parsed(path: Path, mtime_ns: int, size: int) -> RadiomicsFeatureExtractor:
    """The extractor of the file ``path`` as it is at ``mtime_ns`` with ``size`` bytes."""
    return RadiomicsFeatureExtractor(str(path))


def image_count(image_type: str, custom: dict[str, Any], settings: dict[str, Any]) -> int:
    """How many derived images pyradiomics makes for one enabled image type."""
    options = {**settings, **custom}
    if image_type == "LoG":
        return len(options.get("sigma", []))
    if image_type == "Wavelet":
        per_level = 3 if options.get("force2D", False) else 7
        return per_level * int(options.get("level", 1)) + 1
    if image_type == "LBP3D":
        return int(options.get("lbp3DLevels", 2)) + 1
    return 1


def count_features(params: str | Path) -> int:
    """Number of features ``extract`` returns for ``params`` (shape counted once)."""
    extractor = load_extractor(params)
    classes = getFeatureClasses()
    shape = grey = 0
    for name, enabled in extractor.enabledFeatures.items():
        n = (
            len(enabled)
            if enabled
            else sum(not deprecated for deprecated in classes[name].getFeatureNames().values())
        )
        if name.startswith("shape"):
            shape += n
        else:
            grey += n
    images = sum(
        image_count(kind, custom or {}, extractor.settings)
        for kind, custom in extractor.enabledImagetypes.items()
    )
    return shape + grey * images


def study_feature_counts() -> dict[str, int]:
    """Feature count of each bundled study parameter file."""
    return {name: count_features(name) for name in STUDY_PARAMS}
