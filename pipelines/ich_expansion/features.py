"""What the expansion model reads from one admission NCCT: the haematoma, its volumes,
the haemorrhage-slice classifier's verdict per frame and the network input of every
haematoma frame.

1. The configured segmenter (``pipelines.contract.Segmenter``) labels the haemorrhage;
   all its regions together (the haematoma and any satellites) are the haematoma.
2. The haemorrhage-slice classifier (``pipelines.slice_classifier``) gives each frame's
   probability of holding haemorrhage; the haematoma frames are the segmented frames it
   confirms (probability >= ``SLICE_CONFIRM``), always including the largest
   cross-section (so a segmented haematoma is never dropped whole).
3. Each haematoma frame becomes one grey 2-D network input: the frame cropped to a
   square around the haematoma's largest cross-section (10 mm margin, at least 40 mm),
   windowed 0-100 HU (the study's window), resized to ``CNN_INPUT.size``.
4. Volumes: planimetric (the segmented voxels of the acquired frames) and ABC/2 of the
   largest region (``pipelines.ich_expansion.geometry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from pipelines.base import PipelineError, SegmentClass, SegmentResult
from pipelines.cnn import CaseInput, CnnClassifier, InputConfig, prepare_frames
from pipelines.cnn.inputs import frame_pixel_spacing, largest_frame
from pipelines.cnn.networks import LITE0_MEAN, LITE0_STD
from pipelines.contract import LabelledRegions, Segmenter
from pipelines.ich_expansion.geometry import ABC_FACTOR, MM3_PER_ML, abc2_diameters_mm
from pipelines.measure import measure_segment
from pipelines.series import LoadedSeries
from pipelines.slice_classifier.classifier import SliceClassifier
from pipelines.stages import charged_to

SLICE_CONFIRM = 0.5
STUDY_WINDOW_HU = (0.0, 100.0)
CNN_INPUT = InputConfig(
    window=STUDY_WINDOW_HU,
    size=128,
    margin_mm=10.0,
    min_side_mm=40.0,
    channel_offsets=(0, 0, 0),
    mean=LITE0_MEAN,
    std=LITE0_STD,
)
"""Grey 2-D input of one frame (the study's window); samples: the haematoma frames."""


@dataclass(frozen=True)
class Haematoma:
    """The segmented haematoma of a series and what the model reads from it."""

    segment: SegmentResult  # all regions of the segmenter, on the acquired frames
    labels: LabelledRegions
    areas_mm2: NDArray[np.float64]  # per frame
    slice_probability: NDArray[np.float64]  # haemorrhage-present, per segmented frame (0 else)
    frames: tuple[int, ...]  # the haematoma frames the model scores, ascending
    key_frame: int  # largest cross-section
    abc2_mm: tuple[float, float, float]  # D1, D2, D3 of the largest region

    @property
    def volume_ml(self) -> float:
        """Planimetric volume of all regions."""
        return self.segment.total.volume_ml if self.segment.total else 0.0

    @property
    def abc2_ml(self) -> float:
        """ABC/2 volume of the largest region: 0.523 x D1 x D2 x D3."""
        d1, d2, d3 = self.abc2_mm
        return ABC_FACTOR * d1 * d2 * d3 / MM3_PER_ML


def scored_frame_mask(haematoma: Haematoma) -> NDArray[np.bool_]:
    """The haematoma on the frames the model scores (``haematoma.frames``), empty on the
    others: where its heat maps may be drawn."""
    mask = haematoma.segment.frame_mask.copy()
    unscored = np.ones(len(mask), dtype=bool)
    unscored[list(haematoma.frames)] = False
    mask[unscored] = False
    return mask


def slice_spacing_mm(series: LoadedSeries) -> float:
    """Distance between consecutive acquired frames (median), in mm."""
    offsets = np.sort(np.asarray(series.stack.offsets[:, 0], dtype=np.float64))
    gaps = np.diff(offsets)
    return float(np.median(gaps)) if gaps.size else 1.0


def confirmed_frames(
    areas_mm2: NDArray[np.float64], probability: NDArray[np.float64], key_frame: int
) -> tuple[int, ...]:
    """Segmented frames the slice classifier confirms, and always the key frame."""
    keep = (areas_mm2 > 0) & (probability >= SLICE_CONFIRM)
    keep[key_frame] = True
    return tuple(int(k) for k in np.flatnonzero(keep))


@charged_to("segmentation")
def find_haematoma(
    series: LoadedSeries,
    segmenter: Segmenter,
    classifier: SliceClassifier,
    segment_class: SegmentClass,
    labels: LabelledRegions | None = None,
) -> Haematoma:
    """The haematoma of ``series`` (see the module); ``PipelineError`` when none."""
    grid, count = labels if labels is not None else segmenter.segment(series)
    segment = measure_segment(series, segment_class, grid, count)
    if segment.total is None or not segment.frame_mask.any():
        raise PipelineError(
            f"no haematoma: segmenter {segmenter.name} found no haemorrhage on the acquired "
            "frames; the expansion model needs one to score"
        )
    pixel = np.array(
        [np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]) for a in series.frame_affines]
    )
    areas = segment.frame_mask.sum(axis=(1, 2)) * pixel
    segmented = np.flatnonzero(areas > 0)  # the classifier only needs to confirm these
    probability = np.zeros(len(areas), dtype=np.float64)
    probability[segmented] = classifier.probabilities(
        series.frame_hu[segmented], series.stack.pixel_spacing
    )
    key = largest_frame(segment.frame_mask)
    largest = segment.region_labels == 1 if segment.region_labels is not None else None
    main = largest if largest is not None and largest.any() else segment.frame_mask
    abc = abc2_diameters_mm(main, frame_pixel_spacing(series, key), slice_spacing_mm(series))
    return Haematoma(
        segment=segment,
        labels=(grid, count),
        areas_mm2=areas.astype(np.float64),
        slice_probability=probability,
        frames=confirmed_frames(areas, probability, key),
        key_frame=key,
        abc2_mm=abc,
    )


def frame_inputs(
    series: LoadedSeries, haematoma: Haematoma, config: InputConfig = CNN_INPUT
) -> CaseInput:
    """One network sample per haematoma frame (``haematoma.frames`` order)."""
    offsets = tuple(k - haematoma.key_frame for k in haematoma.frames)
    config = InputConfig(
        window=config.window,
        size=config.size,
        margin_mm=config.margin_mm,
        min_side_mm=config.min_side_mm,
        channel_offsets=config.channel_offsets,
        sample_offsets=offsets,
        mean=config.mean,
        std=config.std,
    )
    spacing = frame_pixel_spacing(series, haematoma.key_frame)
    return prepare_frames(series.frame_hu, haematoma.segment.frame_mask, spacing, config)


def pooled_features(model: CnnClassifier, samples: torch.Tensor) -> NDArray[np.float64]:
    """The frozen backbone's pooled features of each sample, (n, dim)."""
    model.eval()
    with torch.no_grad():
        out = [model.features(x) for x in samples.split(16)]
    return torch.cat(out).numpy().astype(np.float64)
