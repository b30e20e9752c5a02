"""Series completeness by content: judge a series complete from what it says about itself.

The receiver records a few header facts of every instance (:class:`InstanceFacts`); the
assembler asks :func:`is_complete` whether the facts of a series, under the policy of its
rule (:class:`CompletenessSettings`, ``[completeness]`` in the TOML), show that every
instance has arrived, and starts the series at once when they do. The idle timer
(``stable_age_s``) stays the fallback for series that say nothing.

Evidence, strongest first, and what each one trusts:

- ``enhanced_frames``: every instance of the series is one enhanced multi-frame object
  (Enhanced / Legacy Converted Enhanced CT or MR) holding all of its NumberOfFrames
  frames; a concatenation is complete when InConcatenationTotalNumber instances of it
  arrived. Trusts that the scanner puts one volume in one object.
- ``images_in_acquisition``: as many instances arrived as ImagesInAcquisition (0020,1002)
  declares, all instances declaring the same number. Trusts that the scanner sends the
  whole acquisition in this series. Per-acquisition counts of a series of several
  acquisitions (step-and-shoot CT numbers each rotation) are not evidence: they cannot
  show that no further acquisition follows.
- ``number_of_slices``: the series holds NumberOfSlices (0054,0081) instances.
- ``association_release``: the sender released the association after its last instance
  of the series, and no other open association had sent instances of it. Trusts that
  the sender sends a series in one association; senders that open one association per
  instance defeat it, so by default it also needs contiguous positions.
- ``contiguous_positions`` is supporting evidence only: the slice positions projected on
  the slice normal are uniformly spaced without a gap. Alone it is weak: a series sent in
  slice order is contiguous at every moment, and nothing in a CT header gives the scan
  range, so a series cut short at either end still looks contiguous.

A study-level rule's study is whole by its own evidence (``study_related_counts``,
``study_release``: :mod:`dicomnode.study_completeness`), judged once each of its series
is complete by the evidence above.

A short grace (``grace_s``) after the last arrival absorbs instances re-ordered across
concurrent associations. A series that grows after it was judged complete goes back to
receiving and is processed again as a new revision (:mod:`dicomnode.revisions`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydicom import uid
from pydicom.dataset import Dataset


class Evidence(StrEnum):
    """What showed a series complete."""

    ENHANCED_FRAMES = "enhanced_frames"
    IMAGES_IN_ACQUISITION = "images_in_acquisition"
    NUMBER_OF_SLICES = "number_of_slices"
    ASSOCIATION_RELEASE = "association_release"
    STABLE_AGE = "stable_age"
    # Study level (dicomnode.study_completeness): when a study-level rule's study is whole.
    STUDY_RELATED_COUNTS = "study_related_counts"
    STUDY_RELEASE = "study_release"


CONTENT_EVIDENCE: tuple[Evidence, ...] = (
    Evidence.ENHANCED_FRAMES,
    Evidence.IMAGES_IN_ACQUISITION,
    Evidence.NUMBER_OF_SLICES,
    Evidence.ASSOCIATION_RELEASE,
)
DEFAULT_TRUST: tuple[Evidence, ...] = (
    Evidence.ENHANCED_FRAMES,
    Evidence.IMAGES_IN_ACQUISITION,
    Evidence.NUMBER_OF_SLICES,
    Evidence.STUDY_RELATED_COUNTS,
)
DEFAULT_GRACE_S = 0.5

ENHANCED_CLASSES = frozenset(
    {
        uid.EnhancedCTImageStorage,
        uid.LegacyConvertedEnhancedCTImageStorage,
        uid.EnhancedMRImageStorage,
        uid.LegacyConvertedEnhancedMRImageStorage,
        uid.EnhancedMRColorImageStorage,
    }
)

MIN_CONTIGUOUS_SLICES = 3  # two positions always have "uniform" spacing
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of one stack agree to this
DUPLICATE_POSITION_MM = 0.01  # two slices closer than this share a position
SPACING_TOLERANCE_MM = 0.05  # absolute slack on each gap ...
SPACING_TOLERANCE_FRACTION = 0.05  # ... or this fraction of the median gap, the larger
POSITION_DECIMALS = 4  # mm; what is kept of a position along the normal


class CompletenessSettings(BaseModel):
    """``[completeness]`` (and ``[routes.completeness]`` per rule): which evidence is
    trusted to start a series before ``stable_age_s``; an empty ``trust`` turns
    content-based completeness off."""

    model_config = ConfigDict(extra="forbid")

    trust: list[Evidence] = Field(default_factory=lambda: list(DEFAULT_TRUST))
    grace_s: float = Field(default=DEFAULT_GRACE_S, ge=0)
    release_needs_contiguous_positions: bool = True

    def policy(self, stable_age_s: float) -> CompletenessPolicy:
        """The policy for :func:`is_complete` with the node's fallback stable age."""
        trusted = frozenset(e for e in self.trust if e is not Evidence.STABLE_AGE)
        return CompletenessPolicy(
            trust=trusted,
            grace_s=self.grace_s,
            stable_age_s=stable_age_s,
            release_needs_contiguous_positions=self.release_needs_contiguous_positions,
        )


@dataclass(frozen=True)
class CompletenessPolicy:
    """Which evidence completes a series, the grace after the last arrival, and the
    stable age after which any series is complete."""

    trust: frozenset[Evidence]
    grace_s: float
    stable_age_s: float
    release_needs_contiguous_positions: bool = True


@dataclass(frozen=True)
class InstanceFacts:
    """What one instance's header says about the size and shape of its series."""

    sop_instance_uid: str
    sop_class_uid: str
    acquisition_number: str | None = None
    images_in_acquisition: int | None = None
    number_of_slices: int | None = None
    number_of_frames: int | None = None
    concatenation_uid: str | None = None
    in_concatenation_total: int | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient, 6 values
    position_mm: float | None = None  # ImagePositionPatient along the slice normal


@dataclass(frozen=True)
class SeriesFacts:
    """The facts of a series still receiving: its instances' facts, when its last
    instance arrived and when an association that sent it was last released."""

    instance_count: int
    last_arrival: float
    released_at: float | None
    instances: tuple[InstanceFacts, ...]


@dataclass(frozen=True)
class Verdict:
    """Whether a series is complete; ``evidence`` says by what, ``detail`` says why."""

    complete: bool
    evidence: Evidence | None
    detail: str


def _positive_int(ds: Dataset, keyword: str) -> int | None:
    """A positive integer attribute, ``None`` when absent, empty or malformed."""
    try:
        value = ds.get(keyword)
        number = None if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and number > 0 else None


def _text(ds: Dataset, keyword: str) -> str | None:
    """A stripped string attribute, ``None`` when absent, empty or malformed."""
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError):
        return None
    text = "" if value is None else str(value).strip()
    return text or None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued decimal attribute of exactly ``count`` finite values, else ``None``."""
    try:
        values = tuple(float(v) for v in (ds.get(keyword) or ()))
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float]:
    """The slice normal: row direction x column direction (ImageOrientationPatient)."""
    r, c = orientation[:3], orientation[3:6]
    return (
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    )


def position_along_normal(position: Sequence[float], orientation: Sequence[float]) -> float:
    """ImagePositionPatient projected on the slice normal, in mm."""
    normal = slice_normal(orientation)
    return sum(p * n for p, n in zip(position, normal, strict=True))


def instance_facts(ds: Dataset, sop_instance_uid: str, sop_class_uid: str) -> InstanceFacts:
    """Read the facts of one received dataset; malformed values count as absent."""
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    position = _floats(ds, "ImagePositionPatient", 3)
    along = None
    if orientation is not None and position is not None:
        along = round(position_along_normal(position, orientation), POSITION_DECIMALS)
    return InstanceFacts(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        acquisition_number=_text(ds, "AcquisitionNumber"),
        images_in_acquisition=_positive_int(ds, "ImagesInAcquisition"),
        number_of_slices=_positive_int(ds, "NumberOfSlices"),
        number_of_frames=_positive_int(ds, "NumberOfFrames"),
        concatenation_uid=_text(ds, "ConcatenationUID"),
        in_concatenation_total=_positive_int(ds, "InConcatenationTotalNumber"),
        orientation=orientation,
        position_mm=along,
    )


def _enhanced(instances: Sequence[InstanceFacts]) -> Verdict | None:
    """Complete when every instance is an enhanced multi-frame object and every
    concatenation has all its instances."""
    if not instances or any(
        f.sop_class_uid not in ENHANCED_CLASSES or f.number_of_frames is None for f in instances
    ):
        return None
    concatenations: dict[str, list[InstanceFacts]] = {}
    for facts in instances:
        if facts.concatenation_uid is not None:
            concatenations.setdefault(facts.concatenation_uid, []).append(facts)
    for members in concatenations.values():
        totals = {f.in_concatenation_total for f in members}
        if len(totals) != 1 or None in totals or len(members) < min(t or 0 for t in totals):
            return None
    frames = sum(f.number_of_frames or 0 for f in instances)
    return Verdict(
        True, Evidence.ENHANCED_FRAMES, f"{len(instances)} enhanced object(s), {frames} frames"
    )


def _images_in_acquisition(instances: Sequence[InstanceFacts]) -> tuple[Verdict | None, str]:
    """Complete when the series' one acquisition has the images it declares; else why not.

    A series of several acquisitions (a step-and-shoot head CT numbers each rotation) is
    complete only when every instance declares the same number and the whole series
    reaches it (scanners that write the series' total): each acquisition reaching its
    own count cannot show that no further acquisition follows.
    """
    declared = {f.images_in_acquisition for f in instances}
    if not instances or declared == {None}:
        return None, "no ImagesInAcquisition"
    if len(declared) != 1:
        acquisitions = {f.acquisition_number for f in instances}
        if len(acquisitions) > 1:
            return None, f"{len(acquisitions)} acquisitions: how many follow is unknown"
        return None, "instances declare different ImagesInAcquisition"
    (expected,) = declared
    assert expected is not None
    acquisitions = {f.acquisition_number for f in instances}
    detail = f"{len(instances)} of {expected} images"
    if len(acquisitions) > 1:
        detail += f" in {len(acquisitions)} acquisitions"
    if len(instances) < expected:
        return None, detail
    return Verdict(True, Evidence.IMAGES_IN_ACQUISITION, detail), ""


def _number_of_slices(instances: Sequence[InstanceFacts]) -> tuple[Verdict | None, str]:
    """Complete when the series holds the NumberOfSlices its instances declare."""
    declared = {f.number_of_slices for f in instances} - {None}
    if not declared:
        return None, "no NumberOfSlices"
    if len(declared) != 1:
        return None, "instances declare different NumberOfSlices"
    (expected,) = declared
    assert expected is not None
    if len(instances) < expected:
        return None, f"{len(instances)} of {expected} slices"
    return Verdict(True, Evidence.NUMBER_OF_SLICES, f"{len(instances)} of {expected} slices"), ""


def contiguous_positions(instances: Sequence[InstanceFacts]) -> tuple[bool, str]:
    """Whether the slices share one orientation and their positions along the normal
    are uniformly spaced without a gap or a duplicate; with the reason when not.

    Supporting evidence only (see the module's docstring): it cannot see a series cut
    short at either end.
    """
    if len(instances) < MIN_CONTIGUOUS_SLICES:
        return False, f"fewer than {MIN_CONTIGUOUS_SLICES} slices"
    first = instances[0].orientation
    if first is None or any(f.position_mm is None for f in instances):
        return False, "slices without position or orientation"
    for facts in instances:
        other = facts.orientation
        if other is None or max(abs(a - b) for a, b in zip(first, other, strict=True)) > (
            ORIENTATION_TOLERANCE
        ):
            return False, "slices of different orientations"
    positions = sorted(f.position_mm for f in instances if f.position_mm is not None)
    gaps = [b - a for a, b in itertools.pairwise(positions)]
    if min(gaps) < DUPLICATE_POSITION_MM:
        return False, "two slices at one position"
    median = sorted(gaps)[len(gaps) // 2]
    slack = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)
    if any(abs(gap - median) > slack for gap in gaps):
        return False, f"non-uniform spacing (gaps {min(gaps):.2f}-{max(gaps):.2f} mm)"
    return True, f"{len(positions)} slices {median:.2f} mm apart, no gap"


def _association_release(
    facts: SeriesFacts, policy: CompletenessPolicy
) -> tuple[Verdict | None, str]:
    """Complete when released after the last arrival (and contiguous when required)."""
    if facts.released_at is None or facts.released_at < facts.last_arrival:
        return None, "association not released since the last instance"
    detail = "released after the last instance"
    if policy.release_needs_contiguous_positions:
        contiguous, why = contiguous_positions(facts.instances)
        if not contiguous:
            return None, f"released, but {why}"
        detail += f"; {why}"
    return Verdict(True, Evidence.ASSOCIATION_RELEASE, detail), ""


def is_complete(facts: SeriesFacts, policy: CompletenessPolicy, now: float) -> Verdict:
    """Judge a series still receiving: complete by the first trusted evidence that holds
    once ``grace_s`` passed since its last instance, else after ``stable_age_s``."""
    idle = now - facts.last_arrival
    if idle < policy.grace_s:
        return Verdict(False, None, f"within the {policy.grace_s:g} s grace")
    waiting: list[str] = []
    instances = facts.instances
    if Evidence.ENHANCED_FRAMES in policy.trust:
        verdict = _enhanced(instances)
        if verdict is not None:
            return verdict
    if Evidence.IMAGES_IN_ACQUISITION in policy.trust:
        verdict, why = _images_in_acquisition(instances)
        if verdict is not None:
            return verdict
        waiting.append(why)
    if Evidence.NUMBER_OF_SLICES in policy.trust:
        verdict, why = _number_of_slices(instances)
        if verdict is not None:
            return verdict
        waiting.append(why)
    if Evidence.ASSOCIATION_RELEASE in policy.trust:
        verdict, why = _association_release(facts, policy)
        if verdict is not None:
            return verdict
        waiting.append(why)
    if idle >= policy.stable_age_s:
        return Verdict(
            True, Evidence.STABLE_AGE, f"no instance for {idle:.1f} s (stable age fallback)"
        )
    return Verdict(False, None, "; ".join(waiting) or "content-based completeness off")
