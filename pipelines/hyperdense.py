"""Hyperdense regions of head CT by fixed HU thresholds: the baseline pipeline.

Acute blood (50-90 HU) and iodinated contrast staining (up to a few hundred HU) are
brighter than brain (grey matter ~40 HU, white matter ~30 HU). The pipeline finds the
cranial cavity (``pipelines.brain.intracranial_mask``), denoises in-plane, keeps voxels
within an HU window in regions that begin in the brain's core and regrow to the bone they
touch, tells calcification (small cores above ``calcification_hu``) apart as its own
segment, drops small connected regions and measures the rest. ``segment`` returns the
haemorrhage-class regions only, so a risk model that takes its lesion from it never
scores a calcification. Nothing is trained: every parameter is a fixed threshold.
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
    SegmentResult,
)
from pipelines.brain import RIM_PATH_HU, Intracranial, intracranial_mask
from pipelines.contract import OutputProfile, Writer
from pipelines.filters import in_plane_median
from pipelines.measure import bounding_box, measure_segment, structure
from pipelines.run_scope import per_run, run_scope
from pipelines.series import LoadedSeries, label_dtype
from pipelines.settings import PipelinesSettings
from pipelines.stages import stage

MODEL_NAME = "hyperdense_threshold"
MODEL_VERSION = "1.1.0"

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
CALCIFICATION_SEGMENT = SegmentClass(
    label="Calcification",
    category=CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
    property_type=CodedConcept.from_code(codes.SCT.PathologicCalcification),
)
"""Dense foci told apart from blood (SNOMED CT 18115005, calcified structure): choroid
plexus, pineal, basal ganglia, falx and vessel-wall calcification. Reported, never scored."""


CALCIFICATION_WINDOW_MM = 1.5
"""Side of the in-plane window whose mean HU defines a calcified core: 3x3 pixels of a
0.5 mm image (the HUmax window), one pixel of a coarse one, so that scanner noise on a
contrast stain does not reach ``calcification_hu`` while a 2 mm calcification does."""

CALCIFICATION_MIN_VOXELS = 2
"""A calcified core has at least this many voxels: a single voxel is noise."""


@dataclass(frozen=True)
class HyperdenseParameters:
    """The pipeline's fixed thresholds.

    ``low_hu`` 55 sits above grey matter (~40 HU plus noise after denoising) and below
    most acute blood; ``high_hu`` 300 keeps contrast staining and stays below bone.
    ``median_size_px`` is the side of the in-plane median filter. Regions are 3-D
    connected with ``connectivity`` 6, 18 or 26 (26: diagonal neighbours join, so a
    lesion cut obliquely by thick slices stays one region) and kept from
    ``min_volume_ml`` up (0.1 mL drops noise specks).

    A region must begin in the brain's core (``RIM_EROSION_MM`` from the skull's rim) and
    grows back from there through hyperdense voxels for ``regrow_mm``, so a haematoma
    touching bone keeps the part beside the bone while the skull's partial-volume band,
    which never reaches the core, is not taken. Dense foci whose 3-D connected core of
    at least ``calcification_hu`` is at most ``calcification_core_max_ml`` are
    calcification, with their partial-volume halo of ``calcification_halo_mm``; a larger
    dense core stays hyperdense. The core is taken on the in-plane mean over
    ``CALCIFICATION_WINDOW_MM`` (3x3 pixels at 0.5 mm, the HUmax window); 180 HU is above
    contrast staining (90-160 HU, whose windowed mean stays under ~170 HU with scanner
    noise) and blood, while a calcified choroid plexus or pineal (200-1000 HU) clears it
    even at 5 mm partial volume. A region with less than ``band_core_fraction`` of its
    volume in the brain's core that never reaches ``band_depth_mm`` from the skull is the
    skull's partial-volume band, not blood.
    """

    low_hu: float = 55.0
    high_hu: float = 300.0
    median_size_px: int = 3
    min_volume_ml: float = 0.1
    connectivity: int = 26
    regrow_mm: float = 4.0
    calcification_hu: float = 180.0
    calcification_core_max_ml: float = 1.0
    calcification_halo_mm: float = 2.0
    band_core_fraction: float = 0.25
    band_depth_mm: float = 7.0

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
        if not self.low_hu < self.calcification_hu:
            raise ValueError(
                f"calcification_hu {self.calcification_hu} must be above low_hu {self.low_hu}"
            )
        for name in (
            "regrow_mm",
            "calcification_core_max_ml",
            "calcification_halo_mm",
            "band_core_fraction",
            "band_depth_mm",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative: {getattr(self, name)}")

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


@dataclass(frozen=True)
class SegmentedClasses:
    """Labelled regions on the grid: hyperdense (haemorrhage class) and calcification,
    each 0 for background and 1..count largest first."""

    hyperdense: NDArray[np.unsignedinteger]  # each in the smallest type holding its count
    hyperdense_count: int
    calcification: NDArray[np.unsignedinteger]
    calcification_count: int


def _steps(distance_mm: float, pixel_mm: float) -> int:
    """Whole pixel steps covering ``distance_mm``."""
    return int(np.ceil(distance_mm / pixel_mm - 1e-6))


def _grow(seeds: NDArray[np.bool_], within: NDArray[np.bool_], steps: int) -> NDArray[np.bool_]:
    """``seeds`` grown ``steps`` face-neighbour steps through ``within`` (3-D)."""
    if steps < 1 or not seeds.any():
        return seeds.copy()
    grown = ndimage.binary_dilation(
        seeds, structure=ndimage.generate_binary_structure(3, 1), iterations=steps, mask=within
    )
    return np.asarray(grown | seeds)


def _in_hu_window(hu: NDArray[np.floating], p: HyperdenseParameters) -> NDArray[np.bool_]:
    """Voxels whose in-plane median (``median_size_px``) lies in ``low_hu``-``high_hu``."""
    denoised = in_plane_median(hu, p.median_size_px)
    return np.asarray((denoised >= p.low_hu) & (denoised <= p.high_hu))


def _large_enough(
    mask: NDArray[np.bool_], voxel_ml: float, min_volume_ml: float
) -> NDArray[np.bool_]:
    """The 26-connected parts of ``mask`` of at least ``min_volume_ml``."""
    labels, count = ndimage.label(mask, structure=structure(26))
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml
    sizes[0] = 0.0
    return np.asarray((sizes >= min_volume_ml)[labels])


def _calcified(
    hu: NDArray[np.floating],
    brain: NDArray[np.bool_],
    window: NDArray[np.bool_],
    pixel: float,
    voxel_ml: float,
    p: HyperdenseParameters,
) -> NDArray[np.bool_]:
    """Dense brain cores (in-plane mean over ``CALCIFICATION_WINDOW_MM`` of at least
    ``calcification_hu``) of at most ``calcification_core_max_ml`` and at least
    ``CALCIFICATION_MIN_VOXELS``, with their halo through ``window``."""
    side = max(1, 2 * round((CALCIFICATION_WINDOW_MM / pixel - 1) / 2) + 1)
    local_mean = ndimage.uniform_filter(hu.astype(np.float32), size=(1, side, side))
    dense = brain & (local_mean >= p.calcification_hu)
    del local_mean
    labels, count = ndimage.label(dense, structure=structure(26))
    if not count:
        return np.zeros(dense.shape, dtype=bool)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)
    accepted = (voxels * voxel_ml <= p.calcification_core_max_ml) & (
        voxels >= CALCIFICATION_MIN_VOXELS
    )
    accepted[0] = False
    cores = accepted[labels]
    del labels
    return _grow(cores, cores | window, _steps(p.calcification_halo_mm, pixel))


def classify_hyperdense(
    hu: NDArray[np.floating],
    masks: Intracranial,
    spacing: tuple[float, float, float],
    p: HyperdenseParameters,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Haemorrhage-class hyperdense voxels and calcification voxels of an HU volume
    (axis 0 along the slice normal, ``spacing`` in mm).

    Hyperdense: voxels whose in-plane median lies in ``low_hu``-``high_hu``, in regions
    whose part in the brain's core is at least ``min_volume_ml`` and that regrow
    ``regrow_mm`` from it through the cavity and the skull's faint rim (below
    ``RIM_PATH_HU``), so blood touching bone is kept whole. Dense brain cores (in-plane
    mean over ``CALCIFICATION_WINDOW_MM`` of at least ``calcification_hu``) of at most
    ``calcification_core_max_ml`` are calcified, with a ``calcification_halo_mm`` halo
    through hyperdense voxels; the two classes never overlap.
    """
    brain = masks.brain
    out_hyper, out_calc = np.zeros(hu.shape, dtype=bool), np.zeros(hu.shape, dtype=bool)
    if not brain.any():
        return out_hyper, out_calc
    box = ndimage.find_objects((brain | masks.cavity).astype(np.uint8))[0]
    sub_brain, sub_core, sub_cavity = brain[box], masks.core[box], masks.cavity[box]
    pixel = min(spacing[1], spacing[2])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # Each step is a function, so that its box-sized temporaries (float32 filtered HU,
    # int32 labels) are freed when it returns, not held to the end.
    in_range = _in_hu_window(hu[box], p)
    window = sub_brain & in_range
    seeds = _large_enough(window & sub_core, voxel_ml, p.min_volume_ml)
    reclaimable = (sub_cavity | (masks.skull[box] & (hu[box] < RIM_PATH_HU))) & in_range
    del in_range
    candidates = _grow(seeds, reclaimable, _steps(p.regrow_mm, pixel)) | (window & sub_core)
    del seeds, reclaimable
    calcified = _calcified(hu[box], sub_brain, window, pixel, voxel_ml, p)
    out_hyper[box] = candidates & ~calcified
    out_calc[box] = calcified
    return out_hyper, out_calc


def drop_skull_band(
    labels: NDArray[np.int32],
    count: int,
    masks: Intracranial,
    spacing: tuple[float, float, float],
    p: HyperdenseParameters,
) -> tuple[NDArray[np.int32], int]:
    """Labels without the regions that are the skull's partial-volume band (see
    :class:`HyperdenseParameters`), renumbered 1..n in their order."""
    if count == 0:
        return labels, 0
    margin = [int(np.ceil(p.band_depth_mm / step)) + 1 for step in spacing]
    within = bounding_box(labels > 0)  # the regions' box: the whole volume need not be read
    kept = []
    for index, box in enumerate(ndimage.find_objects(labels[within], max_label=count), start=1):
        if box is None:
            continue
        wide = tuple(
            slice(max(w.start + b.start - m, 0), min(w.start + b.stop + m, n))
            for w, b, m, n in zip(within, box, margin, labels.shape, strict=True)
        )
        region = labels[wide] == index
        core_fraction = np.count_nonzero(region & masks.core[wide]) / np.count_nonzero(region)
        if core_fraction >= p.band_core_fraction:
            kept.append(index)
            continue
        depth = ndimage.distance_transform_edt(~masks.skull[wide], sampling=spacing)
        if float(depth[region].max()) >= p.band_depth_mm:
            kept.append(index)
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[np.asarray(kept, dtype=np.intp)] = np.arange(1, len(kept) + 1, dtype=np.int32)
    out = np.zeros(labels.shape, dtype=np.int32)
    out[within] = lookup[labels[within]]
    return out, len(kept)


def label_regions(
    mask: NDArray[np.bool_],
    slice_voxel_ml: NDArray[np.float64],
    min_volume_ml: float,
    connectivity: int,
) -> tuple[NDArray[np.int32], int]:
    """3-D connected regions of a mask of at least ``min_volume_ml``, each voxel counting
    its slice's voxel volume (``slice_voxel_ml`` along axis 0); labels 1..n largest first
    (0 background). The work is done on the mask's bounding box: labels are numbered in
    raster order, which a box keeps, so the result is the whole volume's."""
    out = np.zeros(mask.shape, dtype=np.int32)
    if not mask.any():
        return out, 0
    box = bounding_box(mask)
    labels, count = ndimage.label(mask[box], structure=structure(connectivity), output=np.int32)
    sizes = np.zeros(count + 1, dtype=np.float64)
    for plane, voxel_ml in zip(labels, slice_voxel_ml[box[0]], strict=True):  # no weight volume
        sizes += np.bincount(plane.ravel(), minlength=count + 1) * voxel_ml
    sizes = sizes[1:]
    kept = np.nonzero(sizes >= min_volume_ml)[0]
    kept = kept[np.argsort(-sizes[kept], kind="stable")]
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    out[box] = lookup[labels]
    return out, len(kept)


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
        """Labelled haemorrhage-class hyperdense regions on ``series.volume``'s grid,
        largest first; calcifications are not among them (:meth:`segment_classes`)."""
        classes = self.segment_classes(series)
        return classes.hyperdense.astype(np.int32), classes.hyperdense_count

    def segment_classes(self, series: LoadedSeries) -> SegmentedClasses:
        """Hyperdense and calcification regions on the grid (kept for the run,
        ``pipelines.run_scope``, so ``segment`` then ``run`` on one series segments it
        once)."""
        return per_run(self, series, lambda: self._segment_classes(series))

    def _segment_classes(self, series: LoadedSeries) -> SegmentedClasses:
        """:meth:`segment_classes`, computed."""
        with stage("segmentation"):
            volume = series.volume
            masks = intracranial_mask(volume.hu, volume.spacing)
            if not masks.brain.any():
                raise NotHeadCt("no intracranial soft tissue found: not a head CT, or no skull")
            hyperdense, calcified = classify_hyperdense(
                volume.hu, masks, volume.spacing, self.parameters
            )
            voxel_ml = np.full(volume.hu.shape[0], volume.voxel_volume_ml)
            labels, count = label_regions(
                hyperdense, voxel_ml, self.parameters.min_volume_ml, self.parameters.connectivity
            )
            labels, count = drop_skull_band(labels, count, masks, volume.spacing, self.parameters)
            calc_labels, calc_count = label_regions(calcified, voxel_ml, 0.0, 26)
        return SegmentedClasses(  # kept for the run: a quarter of int32's size
            labels.astype(label_dtype(count)),
            count,
            calc_labels.astype(label_dtype(calc_count)),
            calc_count,
        )

    def run(
        self, series: LoadedSeries, segmented: tuple[NDArray[np.int32], int] | None = None
    ) -> PipelineResult:
        """Segment (unless ``segmented``, the output of :meth:`segment`, is given), map the
        regions onto the source frames and measure them.

        A region that no acquired frame crosses (it exists only between two planes, by
        interpolation) cannot be shown or measured on the images and is dropped.
        """
        with run_scope():  # one segmentation for the regions and the calcifications
            labels, count = segmented if segmented is not None else self.segment(series)
            segment = measure_segment(series, HYPERDENSE_SEGMENT, labels, count)
            classes = self.segment_classes(series)
            calcification = measure_segment(
                series, CALCIFICATION_SEGMENT, classes.calcification, classes.calcification_count
            )
        regions, total = segment.regions, segment.total
        notes = [
            f"{len(regions)} hyperdense region(s) of at least "
            f"{self.parameters.min_volume_ml:g} mL on the acquired frames"
            + (
                f" ({count - len(regions)} between frames only, dropped)"
                if count > len(regions)
                else ""
            ),
            calcification_note(calcification),
            "parameters: " + ", ".join(f"{k}={v}" for k, v in self.parameters.to_dict().items()),
        ]
        key_frame = total.key_frame if total else len(series.frames) // 2
        segments = [segment, calcification] if calcification.regions else [segment]
        return PipelineResult(self.algorithm, segments, key_frame, notes)


def calcification_note(calcification: SegmentResult) -> str:
    """What the outputs say about calcified foci: found apart from blood, never scored."""
    n = len(calcification.regions)
    if n == 0 or calcification.total is None:
        return "no calcification found"
    return (
        f"{n} calcified focus/foci ({calcification.total.volume_ml:.2f} mL, dense core "
        "above the calcification threshold: choroid plexus, pineal, basal ganglia, falx or "
        "vessel wall type) reported as calcification, not as haemorrhage, and never scored"
    )
