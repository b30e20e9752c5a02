"""Hyperdense regions of head CT by fixed HU thresholds: the baseline pipeline.

Acute blood (50-90 HU) and iodinated contrast staining (up to a few hundred HU) are
brighter than brain (grey matter ~40 HU, white matter ~30 HU). The pipeline strips the
skull, denoises in-plane, keeps brain voxels within an HU window, drops small connected
regions and measures the rest. Nothing is trained: every parameter is a fixed threshold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from highdicom.sr import CodedConcept
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from scipy import ndimage

from model_store.registry import STORE_ROOT, ModelStoreError, load_parameters, select_version
from pipelines.base import (
    Algorithm,
    NotHeadCt,
    PipelineResult,
    PipelineUnavailable,
    SegmentClass,
)
from pipelines.brain import brain_mask
from pipelines.contract import OutputProfile, Writer
from pipelines.measure import connected_regions, measure_segment
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings

MODEL_NAME = "hyperdense_threshold"
MODEL_VERSION = "1.0.0"

HYPERDENSE_SEGMENT = SegmentClass(
    label="Hyperdense region",
    category=CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
    property_type=CodedConcept.from_code(codes.SCT.Lesion),
)

HYPERDENSE_PROFILE = OutputProfile(
    seg_title="HYPERDENSE SEG",
    sc_title="HYPERDENSE SUMMARY",
    sr_title="HYPERDENSE REPORT",
    saliency_title="SALIENCY",
    segments=(HYPERDENSE_SEGMENT,),
    writers=frozenset({Writer.SEG, Writer.SC, Writer.SR}),
)
"""Outputs of the hyperdense-region segmenters (threshold baseline and U-Net)."""


@dataclass(frozen=True)
class HyperdenseParameters:
    """The pipeline's fixed thresholds.

    ``low_hu`` 55 sits above grey matter (~40 HU plus noise after denoising) and below
    most acute blood; ``high_hu`` 300 keeps contrast staining and stays below bone.
    ``median_size_px`` is the side of the in-plane median filter. Regions are 3-D
    connected with ``connectivity`` 6, 18 or 26 (26: diagonal neighbours join, so a
    lesion cut obliquely by thick slices stays one region) and kept from
    ``min_volume_ml`` up (0.1 mL drops noise specks and the smallest calcifications).
    """

    low_hu: float = 55.0
    high_hu: float = 300.0
    median_size_px: int = 3
    min_volume_ml: float = 0.1
    connectivity: int = 26

    def __post_init__(self) -> None:
        """Refuse parameters the pipeline cannot use."""
        if not self.low_hu < self.high_hu:
            raise ValueError(f"low_hu {self.low_hu} must be below high_hu {self.high_hu}")
        if self.median_size_px < 1 or self.median_size_px % 2 == 0:
            raise ValueError(f"median_size_px must be odd and positive: {self.median_size_px}")
        if self.min_volume_ml < 0:
            raise ValueError(f"min_volume_ml must not be negative: {self.min_volume_ml}")
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26: {self.connectivity}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HyperdenseParameters:
        """Parameters from a mapping; unknown keys are refused, missing ones default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown hyperdense parameters: {', '.join(unknown)}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, path: Path) -> HyperdenseParameters:
        """Parameters from a JSON object in ``path``."""
        return cls.from_mapping(json.loads(path.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict."""
        return asdict(self)


class HyperdenseThresholdPipeline:
    """Pipeline ``hyperdense_regions``: thresholded hyperdense brain regions, measured."""

    name = "hyperdense_regions"

    def __init__(
        self,
        parameters: HyperdenseParameters | None = None,
        version: str = MODEL_VERSION,
        root: Path = STORE_ROOT,
    ) -> None:
        """Use ``parameters``, or those of ``version`` in the model store ``root``
        (hash-checked)."""
        self._stored = parameters is None
        self.root = root
        self.parameters = parameters or HyperdenseParameters.from_mapping(
            load_parameters(MODEL_NAME, version, root)
        )
        self._algorithm = Algorithm(
            name="dicomnode hyperdense threshold baseline",
            version=version,
            kind="threshold baseline",
            provenance="fixed thresholds, not trained",
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> HyperdenseThresholdPipeline:
        """The baseline of ``[pipelines.hyperdense_regions]`` (store folder, version)."""
        own = settings.hyperdense_regions
        root = own.store_root
        return cls(version=own.version or select_version(MODEL_NAME, root), root=root)

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def profile(self) -> OutputProfile:
        """Hyperdense-region SEG, summary SC and report SR; no saliency."""
        return HYPERDENSE_PROFILE

    @property
    def segment_class(self) -> SegmentClass:
        """The coded class of the regions, as a segmenter of a risk model."""
        return HYPERDENSE_SEGMENT

    def check(self) -> None:
        """Re-verify the stored parameters (manifest and sha256) and that they are the ones
        in use; ``PipelineUnavailable`` otherwise. Given parameters need no store."""
        if not self._stored:
            return
        version = self.algorithm.version
        try:
            stored = HyperdenseParameters.from_mapping(
                load_parameters(MODEL_NAME, version, self.root)
            )
        except (ModelStoreError, ValueError, TypeError) as exc:
            raise PipelineUnavailable(f"{MODEL_NAME} {version} parameters refused: {exc}") from exc
        if stored != self.parameters:
            raise PipelineUnavailable(
                f"{MODEL_NAME} {version}: the stored parameters changed since the node started"
            )

    def segment(self, series: LoadedSeries) -> tuple[NDArray[np.int32], int]:
        """Labelled hyperdense regions on ``series.volume``'s grid, largest first."""
        p = self.parameters
        volume = series.volume
        brain = brain_mask(volume.hu, volume.spacing)
        if not brain.any():
            raise NotHeadCt("no intracranial soft tissue found: not a head CT, or no skull")
        box = ndimage.find_objects(brain.astype(np.uint8))[0]
        size = (1, p.median_size_px, p.median_size_px)
        denoised = ndimage.median_filter(volume.hu[box], size=size)
        hyperdense = np.zeros(brain.shape, dtype=bool)
        hyperdense[box] = brain[box] & (denoised >= p.low_hu) & (denoised <= p.high_hu)
        return connected_regions(
            hyperdense, volume.voxel_volume_ml, p.min_volume_ml, p.connectivity
        )

    def run(
        self, series: LoadedSeries, segmented: tuple[NDArray[np.int32], int] | None = None
    ) -> PipelineResult:
        """Segment (unless ``segmented``, the output of :meth:`segment`, is given), map the
        regions onto the source frames and measure them.

        A region that no acquired frame crosses (it exists only between two planes, by
        interpolation) cannot be shown or measured on the images and is dropped.
        """
        labels, count = segmented if segmented is not None else self.segment(series)
        segment = measure_segment(series, HYPERDENSE_SEGMENT, labels, count)
        regions, total = segment.regions, segment.total
        notes = [
            f"{len(regions)} hyperdense region(s) of at least "
            f"{self.parameters.min_volume_ml:g} mL on the acquired frames"
            + (
                f" ({count - len(regions)} between frames only, dropped)"
                if count > len(regions)
                else ""
            ),
            "parameters: " + ", ".join(f"{k}={v}" for k, v in self.parameters.to_dict().items()),
        ]
        key_frame = total.key_frame if total else len(series.frames) // 2
        return PipelineResult(self.algorithm, [segment], key_frame, notes)
