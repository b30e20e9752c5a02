"""Pipeline ``blast_ct``: the pretrained BLAST-CT v1 DeepMedic ensemble on head CT.

Read top to bottom in ``BlastCtPipeline.run``: reorient and resample the orthogonal grid
to 1 mm, window, run the members fully convolutionally and average their softmax, take
the argmax, map the labels back onto the grid by nearest neighbour, drop small regions,
and measure each class on the acquired frames. torch is imported only when the ensemble
is first needed, so listing the pipelines stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from pipelines.base import (
    Algorithm,
    PipelineError,
    PipelineResult,
    PipelineUnavailable,
    SegmentClass,
    SegmentResult,
)
from pipelines.blast_ct.preprocess import (
    nearest_from_1mm,
    radiological,
    resample_to_1mm,
    window,
)
from pipelines.blast_ct.segments import CLASS_SEGMENTS, HAEMORRHAGE_CLASSES, HAEMORRHAGE_SEGMENT
from pipelines.contract import OutputProfile, Writer
from pipelines.measure import connected_regions, measure_segment
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.stages import charged_to

if TYPE_CHECKING:
    from pipelines.blast_ct.network import DeepMedic

MODEL_VERSION = "1.0.0"
SOURCE = "biomedia-mira/blast-ct commit 361e8c7 (v1 weights)"
CPU_MEMBERS = (1, 2)
CPU_BOX = (8, 320, 320)  # z chunks of 8 planes, columns wider than a head
CUDA_BOX = (192, 384, 384)  # the whole 1 mm head in one chunk

BLAST_CT_PROFILE = OutputProfile(
    seg_title="HAEMORRHAGE SEG BLAST-CT",
    sc_title="HAEMORRHAGE SUMMARY BLAST-CT",
    sr_title="HAEMORRHAGE REPORT BLAST-CT",
    saliency_title="SALIENCY BLAST-CT",
    segments=CLASS_SEGMENTS,
    writers=frozenset({Writer.SEG, Writer.SC, Writer.SR}),
)
"""BLAST-CT's outputs: its four lesion classes, titled as haemorrhage, not hyperdensity."""


@dataclass(frozen=True)
class BlastCtParameters:
    """Run-time choices; ``None`` picks by device.

    ``members``: 1-based member numbers in summation order (default all 12 on CUDA,
    ``CPU_MEMBERS`` on CPU). ``box``: (z, y, x), the planes of each streamed z chunk and
    the largest y-x column of the full-resolution pathway; it bounds memory and does not
    change the numbers beyond float rounding. Regions (``connectivity``-connected) smaller
    than ``min_volume_ml`` are dropped; with ``largest_only`` only each class's largest
    region is kept.
    """

    members: tuple[int, ...] | None = None
    device: str | None = None
    box: tuple[int, int, int] | None = None
    min_volume_ml: float = 0.1
    largest_only: bool = False
    connectivity: int = 26
    weights_dir: Path | None = None

    def __post_init__(self) -> None:
        """Refuse values the pipeline cannot use."""
        if self.members is not None and (
            not self.members or any(not 1 <= m <= 12 for m in self.members)
        ):
            raise ValueError(f"members must be a non-empty selection of 1..12: {self.members}")
        if self.min_volume_ml < 0:
            raise ValueError(f"min_volume_ml must not be negative: {self.min_volume_ml}")
        if self.box is not None and min(self.box) < 1:
            raise ValueError(f"box sides must be positive: {self.box}")


class BlastCtPipeline:
    """Pipeline ``blast_ct``: IPH, EAH, oedema and IVH segments by the BLAST-CT v1 ensemble."""

    name = "blast_ct"

    def __init__(self, parameters: BlastCtParameters | None = None) -> None:
        """Resolve device and members now; load and hash-check the weights on first run.

        ``PipelineUnavailable`` when CUDA is asked for and torch sees no GPU."""
        import torch

        self.parameters = p = parameters or BlastCtParameters()
        cuda = torch.cuda.is_available()
        if p.device == "cuda" and not cuda:
            raise PipelineUnavailable(
                "BLAST-CT: [pipelines.blast_ct] device is cuda, but torch sees no CUDA GPU "
                'here; set device = "auto" or "cpu"'
            )
        self.device = torch.device(p.device or ("cuda" if cuda else "cpu"))
        on_cuda = self.device.type == "cuda"
        self.members = p.members or (tuple(range(1, 13)) if on_cuda else CPU_MEMBERS)
        self.box = p.box or (CUDA_BOX if on_cuda else CPU_BOX)
        self._models: list[DeepMedic] | None = None
        n = len(self.members)
        self._algorithm = Algorithm(
            name=f"BLAST-CT v1 (DeepMedic ensemble, {n} member{'s' if n > 1 else ''})",
            version=MODEL_VERSION,
            kind="learned segmenter",
            provenance=(
                f"pretrained weights from {SOURCE}, members "
                f"{', '.join(map(str, self.members))}, trained by the BLAST-CT authors on "
                "their own data; Apache-2.0, Copyright 2020 Imperial College London; "
                "network re-implemented in dicomnode, weights unmodified"
            ),
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> BlastCtPipeline:
        """The ensemble of ``[pipelines.blast_ct]`` (weights folder, device, members)."""
        own = settings.blast_ct
        return cls(
            BlastCtParameters(
                members=own.members,
                device=None if own.device == "auto" else own.device,
                min_volume_ml=own.min_volume_ml,
                weights_dir=own.weights_dir,
            )
        )

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def profile(self) -> OutputProfile:
        """SEG of the four classes, summary SC and report SR, titled as haemorrhage."""
        return BLAST_CT_PROFILE

    @property
    def segment_class(self) -> SegmentClass:
        """The coded class of the regions as a segmenter: any haemorrhage class."""
        return HAEMORRHAGE_SEGMENT

    @charged_to("segmentation")
    def segment(self, series: LoadedSeries) -> tuple[NDArray[np.int32], int]:
        """As a segmenter of a risk model: the haemorrhage classes (IPH, EAH, IVH; not
        oedema) together, labelled by connected region, largest first."""
        p = self.parameters
        haemorrhage = np.isin(self.labels(series), HAEMORRHAGE_CLASSES)
        return connected_regions(
            haemorrhage, series.volume.voxel_volume_ml, p.min_volume_ml, p.connectivity
        )

    def models(self) -> list[DeepMedic]:
        """The ensemble members, hash-checked and loaded on first use."""
        if self._models is None:
            from pipelines.blast_ct.weights import load_ensemble

            self._models = load_ensemble(self.members, self.device, self.parameters.weights_dir)
        return self._models

    def check(self) -> None:
        """Hash-check and load the ensemble members now; ``PipelineUnavailable`` when a
        file is missing, changed or does not fit the network."""
        try:
            self.models()
        except PipelineUnavailable:
            raise
        except (PipelineError, OSError, RuntimeError, ValueError) as exc:
            raise PipelineUnavailable(f"BLAST-CT v1 weights refused: {exc}") from exc

    def probability_sum(self, image: NDArray[np.float32]) -> NDArray[np.float32]:
        """Summed member softmax (5, z, y, x) on a windowed 1 mm image."""
        from pipelines.blast_ct.inference import ensemble_sum

        return ensemble_sum(self.models(), image, self.box, self.device)

    @charged_to("segmentation")
    def labels(self, series: LoadedSeries) -> NDArray[np.uint8]:
        """Network class (0..4) of every voxel of ``series.volume``'s grid."""
        volume = series.volume
        orient = radiological(volume.affine)
        hu = np.asarray(orient.apply(volume.hu), dtype=np.float32)
        spacing = orient.spacing(volume.spacing)
        summed = self.probability_sum(window(resample_to_1mm(hu, spacing)))
        labels_1mm = np.argmax(summed, axis=0).astype(np.uint8)
        shape = (hu.shape[0], hu.shape[1], hu.shape[2])
        return np.asarray(orient.undo(nearest_from_1mm(labels_1mm, shape, spacing)), np.uint8)

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment the four classes, clean each up and measure it on the source frames."""
        labels = self.labels(series)
        segments = [
            self._segment(series, labels == index, segment)
            for index, segment in enumerate(CLASS_SEGMENTS, start=1)
        ]
        largest = max(segments, key=lambda s: s.total.volume_ml if s.total else 0.0)
        key_frame = largest.total.key_frame if largest.total else len(series.frames) // 2
        p = self.parameters
        notes = [
            f"{s.segment.label}: {len(s.regions)} region(s), "
            f"{s.total.volume_ml if s.total else 0.0:.2f} mL"
            for s in segments
        ] + [
            f"members {', '.join(map(str, self.members))} on {self.device.type}; regions of "
            f"at least {p.min_volume_ml:g} mL ({p.connectivity}-connected)"
            + ("; largest region per class only" if p.largest_only else "")
        ]
        return PipelineResult(self.algorithm, segments, key_frame, notes)

    def _segment(
        self, series: LoadedSeries, mask: NDArray[np.bool_], segment: SegmentClass
    ) -> SegmentResult:
        """Cleaned-up regions of one class, measured as the threshold baseline does.

        Regions that no acquired frame crosses are dropped (they cannot be shown).
        """
        p = self.parameters
        regions_map, count = connected_regions(
            mask, series.volume.voxel_volume_ml, p.min_volume_ml, p.connectivity
        )
        if p.largest_only:
            count = min(count, 1)
        return measure_segment(series, segment, regions_map, count)
