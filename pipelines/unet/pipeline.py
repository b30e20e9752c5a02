"""Pipeline ``hyperdense_unet``: hyperdense regions by the bundled 2-D MONAI U-Net.

The network runs on the acquired frames (it was trained on frames: a 2-D U-Net on the
frames needs no through-plane resampling of thick, tilted or unevenly spaced slices, and
trains on CPU in minutes on 96-pixel crops), so its mask is already on the frames the
SEG references. Pixels of probability >= ``threshold`` are kept where the bundle's
``brain`` rule allows:

- ``intracranial`` (version 2.0.0 on): the cranial cavity of
  ``pipelines.brain.intracranial_mask`` on the frame stack, which keeps parenchyma next to
  bone, plus the skull's faint partial-volume rim below ``RIM_PATH_HU`` (where blood
  touching the bone lies); the network decides what in it is haemorrhage-class;
- ``brain_mask`` (version 1.0.0): the old skull stripping less the pixels whose frame
  above or below is outside it.

With ``calcification`` (2.0.0 on), dense foci are told apart by the threshold baseline's
calcification rule (``pipelines.hyperdense.classify_hyperdense``: small cores above
``calcification_hu``) and reported as their own segment, never as haemorrhage, so a risk
model taking its lesion from this segmenter never scores one. 3-D connected regions of
the frame stack smaller than ``min_volume_ml`` (planimetric: pixel area times each frame's
represented thickness) are dropped; the rest are measured as the threshold baseline
measures its regions.

With ``bone`` (2.1.0 on), what a real scanner does beside the skull is undone
(:mod:`pipelines.unet.bone`): the series' HU rise toward the inner table above the
generated heads' is flattened before the network, and found regions that are ramps of the
skull or lie wholly in its partial-volume band are dropped. With ``halo`` (2.1.0 on)
found pixels in a calcification's halo are dropped. Version 3.0.0 was fine-tuned on heads
rendered with a scanner's rise (:mod:`pipelines.unet.cases`) and still needs the ``bone``
rule on the real GE head (without it 29.8 mL is called there, with it 0.13 mL). With
``foci`` (3.1.0 on) a found region that is a calcification diluted by a thick frame
(:func:`pipelines.unet.bone.partial_volume_foci`: one frame, deep, a dense core in a
blood-range halo) is calcification, not haemorrhage: the 0.13 mL left on the GE head.
With ``band`` (3.1.0 on) a found region is held to the threshold baseline's band test
(:func:`pipelines.unet.bone.skull_band`: mostly outside the brain's core and never
deeper than its band depth from the skull is the skull's band, not blood).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from pipelines.brain import RIM_PATH_HU, brain_mask, intracranial_mask
from pipelines.contract import OutputProfile
from pipelines.geometry import represented_thickness, resample_to_grid
from pipelines.hyperdense import (
    CALCIFICATION_SEGMENT,
    HYPERDENSE_PROFILE,
    HYPERDENSE_SEGMENT,
    HyperdenseParameters,
    calcification_note,
    classify_hyperdense,
)
from pipelines.measure import bounding_box, connected_regions, measure_region, structure
from pipelines.run_scope import per_run
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.stages import charged_to
from pipelines.unet.bone import (
    bone_ramps,
    calcification_halo,
    flatten_bone_rise,
    partial_volume_foci,
    skull_band,
    skull_distance,
)
from pipelines.unet.bundle import Bundle, load_bundle
from pipelines.unet.network import UNetConfig, build_unet, predict_probabilities

MODEL_NAME = "hyperdense_unet"
MODEL_VERSION = "3.1.0"
BRAIN_RULES = ("brain_mask", "intracranial")
DEFAULT_GAP_MM = 5.0  # slice gap assumed for a one-frame series


@dataclass(frozen=True)
class InferenceSettings:
    """Post-processing of the network's probabilities (stored in the bundle)."""

    threshold: float = 0.5
    min_volume_ml: float = 0.1
    connectivity: int = 26
    brain: str = "intracranial"  # one of BRAIN_RULES; 1.0.0 bundles say "brain_mask"
    calcification: bool = True  # tell calcification apart (1.0.0 bundles: no)
    bone: bool = False  # flatten the skull's HU rise, drop its ramps (2.1.0 only)
    halo: bool = False  # drop the calcifications' halos (2.1.0 on)
    foci: bool = False  # thick-frame partial-volumed calcifications apart (3.1.0 on)
    band: bool = False  # drop regions of the skull's band, as the threshold does (3.1.0 on)

    def __post_init__(self) -> None:
        """Refuse settings the pipeline cannot apply."""
        if self.brain not in BRAIN_RULES:
            raise ValueError(f"inference.brain must be one of {BRAIN_RULES}: {self.brain!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"inference.threshold must lie in (0, 1): {self.threshold}")

    def to_dict(self) -> dict[str, float | int | str | bool]:
        """JSON-ready settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InferenceSettings:
        """Settings from a manifest's ``inference`` entry (a 1.0.0 entry has no ``brain``
        or ``calcification``: it ran on the old brain mask, without calcification; before
        2.1.0 none has ``bone``; 2.1.0's ``bone`` includes the calcifications' halo; before
        3.1.0 none has ``foci`` or ``band``)."""
        return cls(
            float(values["threshold"]),
            float(values["min_volume_ml"]),
            int(values["connectivity"]),
            str(values.get("brain", "brain_mask")),
            bool(values.get("calcification", False)),
            bool(values.get("bone", False)),
            bool(values.get("halo", values.get("bone", False))),
            bool(values.get("foci", False)),
            bool(values.get("band", False)),
        )


@dataclass(frozen=True)
class FrameClasses:
    """Per-frame masks of a series: haemorrhage-class hyperdense and calcification."""

    hyperdense: NDArray[np.bool_]
    calcification: NDArray[np.bool_]


@dataclass(frozen=True)
class LoadedUNet:
    """The bundled network, its input configuration and post-processing."""

    model: UNet
    config: UNetConfig
    inference: InferenceSettings
    bundle: Bundle


def load_unet(
    version: str = MODEL_VERSION, root: Path = STORE_ROOT, device: str = "cpu"
) -> LoadedUNet:
    """The bundled U-Net of ``version``, hash-checked, in eval mode on ``device``."""
    bundle = load_bundle(MODEL_NAME, version, root)
    config = UNetConfig.from_dict(dict(bundle.manifest["network"]))
    model = build_unet(config)
    try:
        model.load_state_dict(dict(bundle.tensors))
    except RuntimeError as exc:
        raise ModelStoreError(f"{MODEL_NAME} {version}: weights do not fit ({exc})") from exc
    inference = InferenceSettings.from_dict(dict(bundle.manifest["inference"]))
    return LoadedUNet(model.to(device).eval(), config, inference, bundle)


def frame_regions(
    mask: NDArray[np.bool_],
    voxel_ml: NDArray[np.float64],
    min_volume_ml: float,
    connectivity: int = 26,
) -> list[NDArray[np.bool_]]:
    """3-D connected regions of a frame-stack mask, largest first, small ones dropped.

    ``voxel_ml`` (frames,) is each frame's pixel volume, so a region's volume is the sum
    over its pixels, as the planimetric volume of ``pipelines.measure`` counts it. The
    labels and sums are computed on the mask's bounding box, in the whole stack's raster
    order, so they are those of the whole stack (a per-voxel weight volume of the whole
    stack was 629 MB of float64 on 300 frames of 512 x 512).
    """
    if not mask.any():
        return []
    box = bounding_box(mask)
    labels, count = ndimage.label(mask[box], structure=structure(connectivity))
    weights = np.broadcast_to(voxel_ml[box[0], None, None], labels.shape)
    volumes = np.asarray(ndimage.sum(weights, labels, np.arange(1, count + 1)))
    order = [int(i) for i in np.argsort(-volumes, kind="stable") if volumes[i] >= min_volume_ml]
    regions = []
    for i in order:
        region = np.zeros(mask.shape, dtype=bool)
        region[box] = labels == i + 1
        regions.append(region)
    return regions


def _ascii(text: str) -> str:
    """``text`` with dashes made ASCII (DICOM text here is ISO 8859-1 at most)."""
    return text.replace("\u2014", "-").replace("\u2013", "-")


def frame_spacing(series: LoadedSeries) -> tuple[float, float, float]:
    """(typical gap between frames, row, column) in mm of a series' frame stack."""
    depths = series.stack.offsets[:, 0]
    gap = float(np.median(np.diff(depths))) if len(depths) > 1 else DEFAULT_GAP_MM
    dy, dx = series.stack.pixel_spacing
    return gap, float(dy), float(dx)


@dataclass(frozen=True)
class FrameRules:
    """What the bundle's rules make of a frame stack: where the network's pixels may be
    kept, the calcified pixels, the HU the network is given and (with the ``bone`` rule)
    each voxel's distance to the skull in mm, (with ``band``) the brain's core."""

    allowed: NDArray[np.bool_]
    calcified: NDArray[np.bool_]
    network_hu: NDArray[np.float32]
    skull_mm: NDArray[np.float32] | None = None
    core: NDArray[np.bool_] | None = None

    def kept(self, found: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """``found`` where allowed, calcification out and (with the ``bone`` rule) the
        skull's ramps (:func:`pipelines.unet.bone.bone_ramps`) and (with ``band``) the
        regions of the skull's band (:func:`pipelines.unet.bone.skull_band`) dropped."""
        kept = found & self.allowed & ~self.calcified
        if self.skull_mm is not None:
            kept &= ~bone_ramps(kept, self.network_hu, self.skull_mm)
            if self.core is not None:
                kept &= ~skull_band(kept, self.core, self.skull_mm)
        return np.asarray(kept)


def frame_rules(
    hu: NDArray[np.floating], spacing: tuple[float, float, float], settings: InferenceSettings
) -> FrameRules:
    """The rules of the bundle (see the module) applied to frames ``hu`` (frames in
    slice-normal order, ``spacing`` as :func:`frame_spacing`); with ``bone`` the network is
    given the frames with the skull's HU rise flattened and the skull's ramps are dropped
    from what it finds, with ``halo`` the calcifications' halos (:mod:`pipelines.unet.bone`).
    ``NotHeadCt`` when no intracranial soft tissue is found."""
    if settings.brain == "brain_mask":
        allowed = brain_mask(hu, spacing)
        if not allowed.any():
            raise NotHeadCt("no intracranial soft tissue found: not a head CT, or no skull")
        beside = np.pad(allowed, ((1, 1), (0, 0), (0, 0)), mode="edge")
        allowed &= beside[:-2] & beside[2:]  # a thick frame cuts the skull obliquely: its rim
        return FrameRules(allowed, np.zeros(hu.shape, dtype=bool), hu.astype(np.float32))
    masks = intracranial_mask(hu, spacing)
    if not masks.brain.any():
        raise NotHeadCt("no intracranial soft tissue found: not a head CT, or no skull")
    allowed = np.asarray(masks.cavity | masks.brain | (masks.skull & (hu < RIM_PATH_HU)))
    distance = skull_distance(masks.skull, spacing) if settings.bone else None
    network_hu = (
        hu.astype(np.float32) if distance is None else flatten_bone_rise(hu, distance, masks.cavity)
    )
    calcified = (
        np.asarray(classify_hyperdense(hu, masks, spacing, HyperdenseParameters())[1])
        if settings.calcification
        else np.zeros(hu.shape, dtype=bool)
    )
    if settings.halo:
        allowed &= ~calcification_halo(calcified, spacing)
    core = masks.core if settings.band and distance is not None else None
    return FrameRules(allowed, calcified, network_hu, distance, core)


def decide(
    rules: FrameRules,
    found: NDArray[np.bool_],
    settings: InferenceSettings,
    hu: NDArray[np.floating],
    spacing: tuple[float, float, float],
) -> FrameClasses:
    """Haemorrhage-class and calcification masks of frames ``hu`` from the pixels the
    network ``found`` under ``rules`` (with ``foci``, the thick frames' partial-volumed
    calcifications are moved to calcification)."""
    hyperdense = rules.kept(found)
    if settings.foci and rules.skull_mm is not None:
        foci = partial_volume_foci(hyperdense, hu, rules.skull_mm, min(spacing[1:]))
        return FrameClasses(hyperdense & ~foci, rules.calcified | foci)
    return FrameClasses(hyperdense, rules.calcified)


def classify_frames(
    unet: LoadedUNet, hu: NDArray[np.floating], spacing: tuple[float, float, float]
) -> FrameClasses:
    """Haemorrhage-class and calcification masks of frames ``hu`` by the network and the
    bundle's rules (:func:`frame_rules`, :func:`decide`)."""
    settings = unet.inference
    rules = frame_rules(hu, spacing, settings)
    found = (  # the float32 probabilities are not held while the rules run
        predict_probabilities(unet.model, unet.config, rules.network_hu, spacing[1:])
        >= settings.threshold
    )
    return decide(rules, found, settings, hu, spacing)


class UNetPipeline:
    """Pipeline ``hyperdense_unet``: hyperdense regions segmented by the U-Net."""

    name = "hyperdense_unet"

    def __init__(
        self, version: str = MODEL_VERSION, root: Path = STORE_ROOT, device: str = "auto"
    ) -> None:
        """Load the bundled network of ``version`` (hash-checked) onto ``device`` (``auto``:
        CUDA where torch sees a GPU, else the CPU); ``PipelineUnavailable`` when CUDA is
        asked for and there is none."""
        cuda = torch.cuda.is_available()
        if device == "cuda" and not cuda:
            raise PipelineUnavailable(
                "hyperdense_unet: [pipelines.hyperdense_unet] device is cuda, but torch sees "
                'no CUDA GPU here; set device = "auto" or "cpu"'
            )
        self.device = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
        self.version, self.root = version, root
        self.unet = load_unet(version, root, self.device)
        self._algorithm = Algorithm(
            name="dicomnode hyperdense U-Net",
            version=version,
            kind="learned segmenter",
            provenance=f"2-D MONAI U-Net, {_ascii(self.unet.bundle.notice)}",
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> UNetPipeline:
        """The U-Net of ``[pipelines.hyperdense_unet]`` (store folder, version, device)."""
        own = settings.hyperdense_unet
        root = own.store_root
        return cls(
            version=own.version or select_version(MODEL_NAME, root),
            root=root,
            device=str(getattr(own, "device", "auto")),
        )

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
        """The U-Net's haemorrhage-class regions as a segmenter (calcification is never
        among them): its frame mask carried onto ``series.volume``'s grid (linear between
        frames, kept from one half up), then labelled, largest first, regions below
        ``min_volume_ml`` dropped."""
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

    @charged_to("segmentation")
    def frame_classes(self, series: LoadedSeries) -> FrameClasses:
        """Haemorrhage-class and calcification masks on ``series.frame_hu`` (kept for the
        run, ``pipelines.run_scope``, so ``segment`` then ``run`` on one series segments it
        once)."""
        return per_run(
            self, series, lambda: classify_frames(self.unet, series.frame_hu, frame_spacing(series))
        )

    def segment_frames(self, series: LoadedSeries) -> NDArray[np.bool_]:
        """Thresholded U-Net probabilities where the brain rule allows, calcification out,
        on ``series.frame_hu``."""
        return self.frame_classes(series).hyperdense

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment the frames, drop small regions and measure the rest; calcification is
        its own segment."""
        started = time.monotonic()
        settings = self.unet.inference
        classes = self.frame_classes(series)
        thickness = represented_thickness(series.stack.offsets[:, 0])
        areas = np.array(
            [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
        )
        voxel_ml = areas * thickness / 1000.0
        regions = frame_regions(
            classes.hyperdense, voxel_ml, settings.min_volume_ml, settings.connectivity
        )
        segment = _measured(HYPERDENSE_SEGMENT, regions, series.frame_hu, areas, thickness)
        calcified = frame_regions(classes.calcification, voxel_ml, 0.0, 26)
        calcification = _measured(
            CALCIFICATION_SEGMENT, calcified, series.frame_hu, areas, thickness
        )
        notes = [
            f"{len(regions)} hyperdense region(s) of at least {settings.min_volume_ml:g} mL "
            f"segmented by the U-Net in {time.monotonic() - started:.1f} s",
            "settings: " + ", ".join(f"{k}={v}" for k, v in settings.to_dict().items()),
            _ascii(self.unet.bundle.notice),
        ]
        if settings.calcification:
            notes.insert(1, calcification_note(calcification))
        total = segment.total
        key_frame = total.key_frame if total else len(series.frames) // 2
        segments = [segment, calcification] if calcification.regions else [segment]
        return PipelineResult(self.algorithm, segments, key_frame, notes)


def _measured(
    segment_class: SegmentClass,
    regions: list[NDArray[np.bool_]],
    frame_hu: NDArray[np.floating],
    areas: NDArray[np.float64],
    thickness: NDArray[np.float64],
) -> SegmentResult:
    """A segment of frame-stack regions, each measured and labelled (k for the k-th),
    with their union's total."""
    labels = np.zeros(frame_hu.shape, dtype=np.int32)
    for k, region in enumerate(regions, start=1):
        labels[region & (labels == 0)] = k
    frame_mask = labels > 0
    measured = [measure_region(r, frame_hu, areas, thickness) for r in regions]
    total = measure_region(frame_mask, frame_hu, areas, thickness) if regions else None
    return SegmentResult(segment_class, frame_mask, measured, total, labels)
