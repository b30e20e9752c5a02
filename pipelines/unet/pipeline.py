"""Pipeline ``hyperdense_unet``: hyperdense regions by the bundled 2-D MONAI U-Net.

The network runs on the acquired frames (it was trained on frames: a 2-D U-Net on the
frames needs no through-plane resampling of thick, tilted or unevenly spaced slices, and
trains on CPU in minutes on 96-pixel crops), so its mask is already on the frames the
SEG references. Pixels of probability >= ``threshold`` inside the brain are kept: the
skull stripping of ``pipelines.brain`` on the frame stack, less the pixels whose frame
above or below is outside it (where a thick frame cuts the skull obliquely, its
partial-volume rim reads 50-80 HU; the training lesions were never painted there either);
3-D connected regions of the frame stack smaller than ``min_volume_ml`` (planimetric:
pixel area times each frame's represented thickness) are dropped; the rest are measured as
the threshold baseline measures its regions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.networks.nets import UNet
from numpy.typing import NDArray
from scipy import ndimage

from model_store.registry import STORE_ROOT, ModelStoreError, select_version, verified_files
from pipelines.base import (
    Algorithm,
    NotHeadCt,
    PipelineResult,
    PipelineUnavailable,
    SegmentClass,
    SegmentResult,
)
from pipelines.brain import brain_mask
from pipelines.contract import OutputProfile
from pipelines.geometry import represented_thickness, resample_to_grid
from pipelines.hyperdense import HYPERDENSE_PROFILE, HYPERDENSE_SEGMENT
from pipelines.measure import connected_regions, measure_region, structure
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.unet.bundle import Bundle, load_bundle
from pipelines.unet.network import UNetConfig, build_unet, predict_probabilities

MODEL_NAME = "hyperdense_unet"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class InferenceSettings:
    """Post-processing of the network's probabilities (stored in the bundle)."""

    threshold: float = 0.5
    min_volume_ml: float = 0.1
    connectivity: int = 26

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InferenceSettings:
        """Settings from a manifest's ``inference`` entry."""
        return cls(
            float(values["threshold"]), float(values["min_volume_ml"]), int(values["connectivity"])
        )


@dataclass(frozen=True)
class LoadedUNet:
    """The bundled network, its input configuration and post-processing."""

    model: UNet
    config: UNetConfig
    inference: InferenceSettings
    bundle: Bundle


def load_unet(version: str = MODEL_VERSION, root: Path = STORE_ROOT) -> LoadedUNet:
    """The bundled U-Net of ``version``, hash-checked, in eval mode on the CPU."""
    bundle = load_bundle(MODEL_NAME, version, root)
    config = UNetConfig.from_dict(dict(bundle.manifest["network"]))
    model = build_unet(config)
    try:
        model.load_state_dict(dict(bundle.tensors))
    except RuntimeError as exc:
        raise ModelStoreError(f"{MODEL_NAME} {version}: weights do not fit ({exc})") from exc
    inference = InferenceSettings.from_dict(dict(bundle.manifest["inference"]))
    return LoadedUNet(model.eval(), config, inference, bundle)


def frame_regions(
    mask: NDArray[np.bool_],
    voxel_ml: NDArray[np.float64],
    min_volume_ml: float,
    connectivity: int = 26,
) -> list[NDArray[np.bool_]]:
    """3-D connected regions of a frame-stack mask, largest first, small ones dropped.

    ``voxel_ml`` (frames,) is each frame's pixel volume, so a region's volume is the sum
    over its pixels, as the planimetric volume of ``pipelines.measure`` counts it.
    """
    labels, count = ndimage.label(mask, structure=structure(connectivity))
    if count == 0:
        return []
    weights = np.broadcast_to(voxel_ml[:, None, None], mask.shape)
    volumes = np.asarray(ndimage.sum(weights, labels, np.arange(1, count + 1)))
    order = [int(i) for i in np.argsort(-volumes, kind="stable") if volumes[i] >= min_volume_ml]
    return [labels == i + 1 for i in order]


def _ascii(text: str) -> str:
    """``text`` with dashes made ASCII (DICOM text here is ISO 8859-1 at most)."""
    return text.replace("\u2014", "-").replace("\u2013", "-")


class UNetPipeline:
    """Pipeline ``hyperdense_unet``: hyperdense regions segmented by the U-Net."""

    name = "hyperdense_unet"

    def __init__(self, version: str = MODEL_VERSION, root: Path = STORE_ROOT) -> None:
        """Load the bundled network of ``version`` (hash-checked)."""
        self.version, self.root = version, root
        self.unet = load_unet(version, root)
        self._algorithm = Algorithm(
            name="dicomnode hyperdense U-Net",
            version=version,
            kind="learned segmenter",
            provenance=f"2-D MONAI U-Net, {_ascii(self.unet.bundle.notice)}",
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> UNetPipeline:
        """The U-Net of ``[pipelines.hyperdense_unet]`` (store folder, version)."""
        own = settings.hyperdense_unet
        root = own.store_root
        return cls(version=own.version or select_version(MODEL_NAME, root), root=root)

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def profile(self) -> OutputProfile:
        """Hyperdense-region SEG, summary SC and report SR, as the threshold baseline."""
        return HYPERDENSE_PROFILE

    @property
    def segment_class(self) -> SegmentClass:
        """The coded class of the regions, as a segmenter of a risk model."""
        return HYPERDENSE_SEGMENT

    def segment(self, series: LoadedSeries) -> tuple[NDArray[np.int32], int]:
        """The U-Net's regions as a segmenter: its frame mask carried onto
        ``series.volume``'s grid (linear between frames, kept from one half up), then
        labelled, largest first, regions below ``min_volume_ml`` dropped."""
        settings = self.unet.inference
        found = self.segment_frames(series).astype(np.float32)
        on_grid = resample_to_grid(found, series.stack, series.grid) >= 0.5
        return connected_regions(
            on_grid, series.volume.voxel_volume_ml, settings.min_volume_ml, settings.connectivity
        )

    def check(self) -> None:
        """Re-verify the bundle's manifest and weights (sha256); ``PipelineUnavailable``
        when a file is missing or changed (it was loaded, checked, when built)."""
        try:
            verified_files(MODEL_NAME, self.version, self.root)
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"{MODEL_NAME} {self.version} refused: {exc}") from exc

    def segment_frames(self, series: LoadedSeries) -> NDArray[np.bool_]:
        """Thresholded U-Net probabilities inside the brain, on ``series.frame_hu``."""
        hu = series.frame_hu
        spacing = series.stack.pixel_spacing
        depths = series.stack.offsets[:, 0]
        gap = float(np.median(np.diff(depths))) if len(depths) > 1 else 5.0
        brain = brain_mask(hu, (gap, spacing[0], spacing[1]))
        if not brain.any():
            raise NotHeadCt("no intracranial soft tissue found: not a head CT, or no skull")
        beside = np.pad(brain, ((1, 1), (0, 0), (0, 0)), mode="edge")
        brain &= beside[:-2] & beside[2:]  # a thick frame cuts the skull obliquely: its rim
        probabilities = predict_probabilities(self.unet.model, self.unet.config, hu, spacing)
        return np.asarray((probabilities >= self.unet.inference.threshold) & brain)

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment the frames, drop small regions and measure the rest."""
        started = time.monotonic()
        settings = self.unet.inference
        found = self.segment_frames(series)
        thickness = represented_thickness(series.stack.offsets[:, 0])
        areas = np.array(
            [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
        )
        regions = frame_regions(
            found, areas * thickness / 1000.0, settings.min_volume_ml, settings.connectivity
        )
        frame_mask = np.zeros(found.shape, dtype=bool)
        for region in regions:
            frame_mask |= region
        measured = [measure_region(r, series.frame_hu, areas, thickness) for r in regions]
        total = measure_region(frame_mask, series.frame_hu, areas, thickness) if regions else None
        notes = [
            f"{len(regions)} hyperdense region(s) of at least {settings.min_volume_ml:g} mL "
            f"segmented by the U-Net in {time.monotonic() - started:.1f} s",
            "settings: " + ", ".join(f"{k}={v}" for k, v in settings.to_dict().items()),
            _ascii(self.unet.bundle.notice),
        ]
        segment = SegmentResult(HYPERDENSE_SEGMENT, frame_mask, measured, total)
        key_frame = total.key_frame if total else len(series.frames) // 2
        return PipelineResult(self.algorithm, [segment], key_frame, notes)
