"""Every pipeline's settings, validated with the node configuration.

The TOML section ``[pipelines.<name>]`` of the node config holds the settings of pipeline
``<name>`` (``dicomnode.config.NodeConfig.pipelines``); unknown pipelines and unknown keys
are errors, reported with their field path (``pipelines.blast_ct.members: ...``). The
settings are built once, with the config, and passed explicitly to the pipeline
factories (``pipelines.registry.get_pipeline``); no pipeline reads the environment.

Relative paths are taken relative to the config file (the validation context's
``base_dir``). A folder that is named but does not exist is a configuration error; files
missing from an existing folder (weights, a model version) make the pipeline unavailable
at start, and the node then runs its default pipeline in its place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from model_store.registry import STORE_ROOT

Device = Literal["cpu", "cuda", "auto"]
"""Where a network runs: ``auto`` takes CUDA when torch sees a GPU, else the CPU."""

SegmenterName = Literal["hyperdense_regions", "hyperdense_unet", "blast_ct"]
"""The pipelines that can act as the lesion segmenter of a risk model."""

BLAST_CT_ENSEMBLE_SIZE = 12
_VERSION = re.compile(r"^\d+(\.\d+)*$")


def _resolved(value: Path | None, info: ValidationInfo) -> Path | None:
    """``value`` made absolute against the config file's folder, when one is known."""
    if value is None:
        return None
    path = value.expanduser()
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _existing_folder(value: Path | None, info: ValidationInfo) -> Path | None:
    """A folder that exists (relative: to the config file)."""
    path = _resolved(value, info)
    if path is not None and not path.is_dir():
        raise ValueError(f"folder does not exist: {path}")
    return path


def _version(value: str | None) -> str | None:
    """A model version of dot-separated integers, like 1.0.0."""
    if value is not None and not _VERSION.match(value):
        raise ValueError(f"version {value!r} is not dot-separated integers like 1.0.0")
    return value


def _members(value: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A non-empty selection of distinct BLAST-CT members 1..12."""
    if value is None:
        return None
    if not value:
        raise ValueError("give at least one member, or leave members out for the default")
    wrong = [m for m in value if not 1 <= m <= BLAST_CT_ENSEMBLE_SIZE]
    if wrong:
        raise ValueError(f"members are 1..{BLAST_CT_ENSEMBLE_SIZE}, not {wrong}")
    if len(set(value)) != len(value):
        raise ValueError(f"members repeat: {list(value)}")
    return value


ExistingFolder = Annotated[Path | None, AfterValidator(_existing_folder)]
ResolvedPath = Annotated[Path | None, AfterValidator(_resolved)]
Version = Annotated[str | None, AfterValidator(_version)]
Members = Annotated[tuple[int, ...] | None, AfterValidator(_members)]


class _Settings(BaseModel):
    """Base of every pipeline's settings: unknown keys are errors; immutable, hashable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StoredModelSettings(_Settings):
    """A pipeline whose model lives in a model store.

    ``model_store_dir``: the store folder (default: the bundled ``model_store/``), e.g.
    the ``--root`` of ``dicomnode train``. ``version``: the model version (default: the
    promoted one, else the latest).
    """

    model_store_dir: ExistingFolder = None
    version: Version = None

    @property
    def store_root(self) -> Path:
        """The model store folder to read."""
        return self.model_store_dir or STORE_ROOT


class HyperdenseSettings(StoredModelSettings):
    """``[pipelines.hyperdense_regions]``: the threshold baseline's stored parameters."""


class UNetSettings(StoredModelSettings):
    """``[pipelines.hyperdense_unet]``: the bundled 2-D U-Net. ``device``: ``auto`` (CUDA
    where torch sees a GPU, else the CPU), ``cpu`` or ``cuda``."""

    device: Device = "auto"


class BlastCtSettings(_Settings):
    """``[pipelines.blast_ct]``: where the BLAST-CT v1 weights are and how to run them.

    ``weights_dir``: the folder holding ``saved_models/model_1.pt`` .. ``model_12.pt``
    (default ``../shared/models/blast_ct_v1`` beside the repository). ``members``: which
    of the 12 members run (default: all 12 on CUDA, 1 and 2 on the CPU). Regions smaller
    than ``min_volume_ml`` are dropped.
    """

    weights_dir: ExistingFolder = None
    device: Device = "auto"
    members: Members = None
    min_volume_ml: float = Field(default=0.1, ge=0)


class HtAfterMtSettings(StoredModelSettings):
    """``[pipelines.ht_after_mt]``: the risk model, its clinical table and its segmenter.

    ``clinical_table``: CSV or JSON of clinical variables (absent: every table variable
    is imputed; a table that cannot be read fails open, see the README). ``segmenter``:
    the pipeline whose regions give the lesion that is scored.
    """

    clinical_table: ResolvedPath = None
    segmenter: SegmenterName = "hyperdense_unet"


class IphVsContrastSettings(StoredModelSettings):
    """``[pipelines.iph_vs_contrast]``: the Rad-score model and the segmenter whose
    regions are the hyperdense areas it classifies (no network of its own: a learned
    segmenter runs where that segmenter's settings say)."""

    segmenter: SegmenterName = "hyperdense_unet"


class IchExpansionSettings(StoredModelSettings):
    """``[pipelines.ich_expansion]``: the expansion model, its clinical table (CSV or JSON
    keyed by AccessionNumber or PatientID + StudyDate; fails open), its haematoma
    segmenter and where its networks run."""

    clinical_table: ResolvedPath = None
    segmenter: SegmenterName = "hyperdense_unet"
    device: Device = "cpu"


class IchExpansionHybridSettings(StoredModelSettings):
    """``[pipelines.ich_expansion_hybrid]``: the hybrid expansion model, its haematoma
    segmenter, the CNN weights (a safetensors EfficientNet-Lite0 backbone; default: the
    packaged ImageNet weights, the ones the bundled model was trained with) and where the
    network runs."""

    segmenter: SegmenterName = "hyperdense_unet"
    cnn_weights: ResolvedPath = None
    device: Device = "cpu"


class AisPrognosisMriSettings(StoredModelSettings):
    """``[pipelines.ais_prognosis_mri]``: the MRI prognosis model (study-level), where its
    CNN runs and the clinical table (CSV: ``study_instance_uid`` or ``accession_number``,
    ``nihss``, ``ich``) giving NIHSS and ICH (absent: both imputed and listed)."""

    clinical_table: ResolvedPath = None
    device: Device = "cpu"


class RadiomicsSettings(_Settings):
    """``[pipelines.radiomics]``: shared by every pipeline that extracts radiomics
    features. ``workers``: processes the derived images (LoG scales, wavelet
    decompositions, ...) of one extraction are shared out to (default 1: all in the
    pipeline's own process; a pool gains only where cores are idle, bench/README.md).
    Each such pipeline takes it from the settings it is built from and passes it to
    every extraction it runs."""

    workers: int = Field(default=1, ge=1, le=16)


class PipelinesSettings(_Settings):
    """``[pipelines]``: one section per pipeline, each optional, and ``radiomics``."""

    hyperdense_regions: HyperdenseSettings = HyperdenseSettings()
    hyperdense_unet: UNetSettings = UNetSettings()
    blast_ct: BlastCtSettings = BlastCtSettings()
    ht_after_mt: HtAfterMtSettings = HtAfterMtSettings()
    iph_vs_contrast: IphVsContrastSettings = IphVsContrastSettings()
    ich_expansion: IchExpansionSettings = IchExpansionSettings()
    ich_expansion_hybrid: IchExpansionHybridSettings = IchExpansionHybridSettings()
    ais_prognosis_mri: AisPrognosisMriSettings = AisPrognosisMriSettings()
    radiomics: RadiomicsSettings = RadiomicsSettings()
