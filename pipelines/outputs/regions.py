"""Which segment of the SEG each region becomes, with its label, tracking UID, colour,
finding and finding site: the one plan that the SEG, SC and SR writers share.

One SEG segment per REGION (not per class). A TID 1500 measurement group can reference a
segment, never a part of one, so only a segment per region lets each region's group
reference exactly its own voxels; 3D Slicer (through dcmqi) and OHIF list SEG segments
by label and colour, so each region is also shown and toggled on its own there. The
segment's Tracking ID and UID are the SR group's, which is how readers pair them. A class
that found nothing keeps one empty segment, so the SEG and SR still say it was looked for.

Finding sites are coarse and documented: every region lies in the intracranial structure
(SCT 128319008); laterality (SCT Right / Left) comes from the side of the head's midline
the region's centroid lies on, when it lies more than ``MIDLINE_MARGIN_MM`` from it. The
midline is the mean patient x of the head's soft tissue on the region's key frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from scipy import ndimage

from pipelines.base import PipelineResult, RegionMeasurements, SegmentClass, SegmentResult
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries, label_dtype

Rgb = tuple[int, int, int]

FINDING_HAEMORRHAGE = CodedConcept.from_code(codes.SCT.Hemorrhage)  # SCT 50960005
FINDING_CALCIFICATION = CodedConcept.from_code(codes.SCT.PathologicCalcification)  # 18115005
FINDING_CONTRAST_STAINING = CodedConcept.from_code(codes.DCM.Extravasation)  # DCM 111428
SITE_INTRACRANIAL = CodedConcept.from_code(codes.SCT.IntracranialStructure)  # SCT 128319008
LATERALITY_RIGHT = CodedConcept.from_code(codes.SCT.Right)
LATERALITY_LEFT = CodedConcept.from_code(codes.SCT.Left)
MIDLINE_MARGIN_MM = 5.0
HEAD_TISSUE_HU = -200.0  # above this: scalp, skull, brain (the head); below: air

# Overlay and recommended display colours (sRGB) by finding; other classes by position.
FINDING_COLOURS: dict[tuple[str, str], Rgb] = {
    (FINDING_HAEMORRHAGE.scheme_designator, FINDING_HAEMORRHAGE.value): (255, 40, 40),
    (FINDING_CONTRAST_STAINING.scheme_designator, FINDING_CONTRAST_STAINING.value): (255, 200, 0),
    (FINDING_CALCIFICATION.scheme_designator, FINDING_CALCIFICATION.value): (230, 230, 230),
}
SEGMENT_COLOURS: tuple[Rgb, ...] = (
    (255, 40, 40),
    (255, 200, 0),
    (0, 200, 255),
    (60, 220, 60),
    (220, 80, 255),
)
LABEL_LENGTH = 64  # SegmentLabel and Tracking Identifier are LO / UT; keep both within LO


@dataclass(frozen=True)
class PlannedSegment:
    """One SEG segment: a region of a class, or the empty segment of a class."""

    number: int  # SEG segment number, from 1
    class_index: int  # index into PipelineResult.segments
    region_index: int | None  # index into that class's regions; None: the class is empty
    label: str  # SegmentLabel and Tracking Identifier, e.g. "Hyperdense region 1"
    segment: SegmentClass
    measurements: RegionMeasurements | None  # None for an empty class
    # The class's frame labels (``region_label_array``), shared by its regions; None for
    # an empty class. Each region's mask is made when asked for (``mask``), so a plan of
    # many regions does not hold a whole-series mask per region.
    labels: NDArray[np.integer] | None
    colour: Rgb
    shape: tuple[int, ...]  # (n_frames, rows, columns) on LoadedSeries.frames
    # The region's bounding box in ``labels``; None when it has no voxel (or no region).
    box: tuple[slice, ...] | None = None

    @property
    def mask(self) -> NDArray[np.bool_]:
        """The segment's mask on the source frames, (n_frames, rows, columns)."""
        mask = np.zeros(self.shape, dtype=bool)
        if self.labels is not None and self.region_index is not None and self.box is not None:
            mask[self.box] = self.labels[self.box] == self.region_index + 1
        return mask

    def voxels(self) -> tuple[NDArray[np.intp], ...]:
        """(frames, rows, columns) indices of the segment's voxels, as ``np.nonzero(mask)``
        gives them, found within its box."""
        if self.labels is None or self.region_index is None or self.box is None:
            return tuple(np.zeros(0, dtype=np.intp) for _ in self.shape)
        found = np.nonzero(self.labels[self.box] == self.region_index + 1)
        return tuple(index + int(part.start) for index, part in zip(found, self.box, strict=True))

    @property
    def finding(self) -> CodedConcept:
        """The TID 1500 Finding: the segment class's property type."""
        return self.segment.property_type

    def tracking_uid(self, seg_sop_instance_uid: str) -> str:
        """Tracking UID of the segment and of its SR group (a function of SEG and label)."""
        return derive_uid(seg_sop_instance_uid, "tracking", str(self.number), self.label)

    def display_colour(self) -> hd.color.CIELabColor:
        """``colour`` as the SEG's RecommendedDisplayCIELabValue."""
        return hd.color.CIELabColor.from_rgb(*self.colour)


def class_colour(index: int, segment: SegmentClass) -> Rgb:
    """Colour of a class: by its finding when known, else by its position."""
    key = (segment.property_type.scheme_designator, segment.property_type.value)
    return FINDING_COLOURS.get(key, SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)])


def region_label_array(segment: SegmentResult) -> NDArray[np.integer]:
    """Frame labels of ``segment``'s regions: 0 outside, k inside ``regions[k - 1]``.

    The pipeline's own labels when it gave them; otherwise the 26-connected parts of the
    frame mask, largest first, the k-th largest being region k, and any part beyond the
    number of regions joined to the region whose key frame is nearest to it.
    """
    if segment.region_labels is not None:
        if segment.region_labels.shape != segment.frame_mask.shape:
            raise ValueError(
                f"region labels {segment.region_labels.shape} do not match the segment "
                f"mask {segment.frame_mask.shape}"
            )
        labels = segment.region_labels
        return np.where(segment.frame_mask, labels, np.zeros((), dtype=labels.dtype))
    wanted = len(segment.regions)
    out = np.zeros(segment.frame_mask.shape, dtype=label_dtype(wanted))
    if wanted == 0 or not segment.frame_mask.any():
        return out
    if wanted == 1:
        out[segment.frame_mask] = 1
        return out
    parts, count = ndimage.label(segment.frame_mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    key_frames = np.array([r.key_frame for r in segment.regions])
    for rank, part in enumerate(order):
        if rank < wanted:
            out[parts == part] = rank + 1
        else:
            centre = float(np.mean(np.nonzero(parts == part)[0]))
            out[parts == part] = int(np.argmin(np.abs(key_frames - centre))) + 1
    return out


def region_label(segment: SegmentClass, region_index: int | None) -> str:
    """``"<class label> <k>"`` for region k (from 1); the class label for an empty class."""
    if region_index is None:
        return segment.label[:LABEL_LENGTH]
    suffix = f" {region_index + 1}"
    return segment.label[: LABEL_LENGTH - len(suffix)] + suffix


def segment_plan(result: PipelineResult) -> list[PlannedSegment]:
    """The SEG's segments: every region of every class in order, an empty class as one."""
    if not result.segments:
        raise ValueError("a DICOM SEG needs at least one segment; the result has none")
    planned: list[PlannedSegment] = []
    for class_index, segment in enumerate(result.segments):
        colour = class_colour(class_index, segment.segment)
        if not segment.regions:
            planned.append(
                PlannedSegment(
                    number=len(planned) + 1,
                    class_index=class_index,
                    region_index=None,
                    label=region_label(segment.segment, None),
                    segment=segment.segment,
                    measurements=None,
                    labels=None,
                    colour=colour,
                    shape=segment.frame_mask.shape,
                )
            )
            continue
        labels = region_label_array(segment)
        boxes = ndimage.find_objects(labels, max_label=len(segment.regions))
        for region_index, measurements in enumerate(segment.regions):
            planned.append(
                PlannedSegment(
                    number=len(planned) + 1,
                    class_index=class_index,
                    region_index=region_index,
                    label=region_label(segment.segment, region_index),
                    segment=segment.segment,
                    measurements=measurements,
                    labels=labels,
                    colour=colour,
                    shape=segment.frame_mask.shape,
                    box=boxes[region_index],
                )
            )
    return planned


def laterality(series: LoadedSeries, voxels: tuple[NDArray[np.intp], ...], key_frame: int) -> int:
    """-1 (patient right), +1 (patient left) or 0 (within the midline margin, or unknown).

    ``voxels``: the region's (frames, rows, columns) indices on the frames. The region's
    centroid and the head's midline are both in patient x (LPS: +x is the patient's
    left); the midline is the mean x of the head's tissue on ``key_frame``.
    """
    frames, rows, cols = voxels
    head_rows, head_cols = np.nonzero(series.frame_hu[key_frame] > HEAD_TISSUE_HU)
    if frames.size == 0 or head_rows.size == 0:
        return 0
    affines = np.asarray(series.frame_affines)[frames]
    region_x = np.mean(affines[:, 0, 1] * rows + affines[:, 0, 2] * cols + affines[:, 0, 3])
    affine = series.frame_affines[key_frame]
    head_x = float(np.mean(affine[0, 1] * head_rows + affine[0, 2] * head_cols) + affine[0, 3])
    offset = float(region_x) - head_x
    if abs(offset) <= MIDLINE_MARGIN_MM:
        return 0
    return 1 if offset > 0 else -1


def finding_site(series: LoadedSeries, planned: PlannedSegment) -> hd.sr.FindingSite:
    """Intracranial structure, with the laterality of the region when it has one."""
    if planned.measurements is None:
        return hd.sr.FindingSite(anatomic_location=SITE_INTRACRANIAL)
    side = laterality(series, planned.voxels(), planned.measurements.key_frame)
    if side == 0:
        return hd.sr.FindingSite(anatomic_location=SITE_INTRACRANIAL)
    return hd.sr.FindingSite(
        anatomic_location=SITE_INTRACRANIAL,
        laterality=LATERALITY_LEFT if side > 0 else LATERALITY_RIGHT,
    )


def scored_region(result: PipelineResult) -> tuple[int, int] | None:
    """(class index, region index) of the region the risk model scored; None without a
    risk or without any region. A risk that names no region scored the first class's
    largest region (the rule of the risk pipelines that predate ``scored_region``)."""
    risk = result.risk
    if risk is None:
        return None
    if risk.scored_region is not None:
        class_index, region_index = risk.scored_region
        if not 0 <= class_index < len(result.segments) or not 0 <= region_index < len(
            result.segments[class_index].regions
        ):
            raise ValueError(
                f"the risk names region {region_index} of segment {class_index}, which the "
                "result does not hold"
            )
        return class_index, region_index
    for class_index, segment in enumerate(result.segments):
        if segment.regions:
            return class_index, 0
    return None
