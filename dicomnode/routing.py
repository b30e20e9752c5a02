"""Routing: pure functions deciding what happens to a complete series."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import uid

from dicomnode.config import RouteMatch, RouteRule
from dicomnode.records import SeriesInfo

LOCALIZER_REASON = "localizer/scout series"
SECONDARY_CAPTURE_REASON = "secondary capture"
NO_RULE_REASON = "no rule matched"

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        uid.SecondaryCaptureImageStorage,
        uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)


@dataclass(frozen=True)
class Routed:
    """The series goes to ``pipeline``; results to ``destinations``."""

    rule: str
    pipeline: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class Ignored:
    """The series is not processed, for ``reason``."""

    reason: str


def _one_of(value: str, allowed: Sequence[str] | None) -> bool:
    """Case-insensitive membership; ``None`` allows anything."""
    return allowed is None or value.strip().upper() in {a.strip().upper() for a in allowed}


def _searches(pattern: str | None, value: str) -> bool:
    """Regex search; ``None`` allows anything."""
    return pattern is None or re.search(pattern, value) is not None


def matches(series: SeriesInfo, match: RouteMatch) -> bool:
    """Whether every condition given in ``match`` holds for ``series``."""
    image_type = {part.strip().upper() for part in series.image_type}
    wanted = {part.strip().upper() for part in match.image_type_contains or ()}
    return (
        _one_of(series.modality, match.modality)
        and _one_of(series.body_part_examined, match.body_part_examined)
        and _searches(match.series_description, series.series_description)
        and _searches(match.protocol_name, series.protocol_name)
        and wanted <= image_type
        and _one_of(series.calling_aet, match.calling_ae_title)
        and _one_of(series.called_aet, match.called_ae_title)
    )


def route(series: SeriesInfo, rules: Sequence[RouteRule]) -> Routed | Ignored:
    """Decide a series' fate: localizers and secondary captures are ignored, then the
    first rule that matches wins."""
    if series.all_localizer:
        return Ignored(LOCALIZER_REASON)
    if series.sop_class_uid in SECONDARY_CAPTURE_CLASSES:
        return Ignored(SECONDARY_CAPTURE_REASON)
    for rule in rules:
        if matches(series, rule.match):
            return Routed(rule.name, rule.pipeline, tuple(rule.destinations))
    return Ignored(NO_RULE_REASON)
