"""Study completeness by content: when the series of a study-level rule make a whole study.

A study-level rule (``dicomnode.studies``) waits until every required role is filled by a
complete series; each series is judged by :mod:`dicomnode.completeness` under the rule's
trust (its content, else ``stable_age_s``). The study is then complete, without waiting
for its optional roles, when:

- every role is filled;
- ``study_related_counts`` (trusted): the study declares its size, as
  NumberOfStudyRelatedSeries (0020,1206) or NumberOfStudyRelatedInstances (0020,1208),
  all its instances that declare one agreeing, and the node holds that many series (of any
  state: a localizer counts) or instances. Trusts that the sender sends the whole study;
- ``study_release`` (trusted, off by default): the association that sent the study was
  released after the study's last instance, and every series of the study was still held
  by an open association until then (it came in the same association, or overlapping
  ones). Trusts that the sender sends a study in one association; senders that open one
  association per series defeat it;
- or nothing arrived for the rule's ``study_stable_age_s`` (the fallback).

Pure functions: the caller (``StudyAssembler``) gathers the facts from the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode.completeness import Evidence, Verdict


@dataclass(frozen=True)
class StudySeries:
    """One series of a study still receiving, as study completeness sees it: its own
    completeness verdict (``None`` while it is incomplete), when its last instance came
    and when an association that sent it was last released."""

    series_uid: str
    verdict: Verdict | None
    last_arrival: float
    released_at: float | None


@dataclass(frozen=True)
class StudyFacts:
    """What is known of one study routed to a study-level rule."""

    rule_roles: tuple[str, ...]  # every role of the rule, in order
    required: tuple[str, ...]  # the rule's required roles
    roles: Mapping[str, str]  # role -> series UID, the roles filled so far
    series: Mapping[str, StudySeries]  # the study's series receiving under the rule
    declared_series: int | None  # NumberOfStudyRelatedSeries, when the study says it
    declared_instances: int | None  # NumberOfStudyRelatedInstances, likewise
    held_series: int  # series of the study the node holds, any state
    held_instances: int  # instances of those series


@dataclass(frozen=True)
class StudyVerdict:
    """Whether a study is complete and why (``detail``); ``waiting_for``: the roles whose
    series are missing or incomplete while it is not."""

    complete: bool
    detail: str
    waiting_for: tuple[str, ...] = ()


def declared_count(headers: Iterable[Dataset], keyword: str) -> int | None:
    """The one positive count ``keyword`` that the headers declaring it agree on, else
    ``None`` (absent, malformed, or two different values)."""
    values: set[int] = set()
    for header in headers:
        try:
            raw = header.get(keyword)
            value = None if raw is None or raw == "" else int(raw)
        except (TypeError, ValueError, OverflowError):
            return None
        if value is not None:
            values.add(value)
    if len(values) != 1:
        return None
    (value,) = values
    return value if value > 0 else None


def _study_related_counts(facts: StudyFacts) -> str | None:
    """Why the study's declared size is reached, or ``None``."""
    if facts.declared_series is not None and facts.held_series >= facts.declared_series:
        return f"{facts.held_series} of {facts.declared_series} study-related series"
    if facts.declared_instances is not None and facts.held_instances >= facts.declared_instances:
        return f"{facts.held_instances} of {facts.declared_instances} study-related instances"
    return None


def _study_release(facts: StudyFacts) -> str | None:
    """Why the sender's release shows the study whole, or ``None``."""
    released = [s.released_at for s in facts.series.values()]
    if not released or any(at is None for at in released):
        return None
    last = max(s.last_arrival for s in facts.series.values())
    if min(at for at in released if at is not None) < last:
        return None  # a series' association ended before the study's last instance
    return f"{len(released)} series released after the study's last instance"


def judge_study(
    facts: StudyFacts, trust: frozenset[Evidence], now: float, study_stable_age_s: float
) -> StudyVerdict:
    """Whether every required role is filled by a complete series and the study shows it
    has no more series to come (every role filled, its declared size reached, the
    sender's release, by ``trust``), or has been quiet for ``study_stable_age_s``."""
    missing = tuple(name for name in facts.required if name not in facts.roles)
    incomplete = tuple(
        name for name, uid in facts.roles.items() if facts.series[uid].verdict is None
    )
    if missing or incomplete:
        return StudyVerdict(False, "", missing + incomplete)
    if len(facts.roles) == len(facts.rule_roles):
        return StudyVerdict(True, "every role filled")
    absent = tuple(name for name in facts.rule_roles if name not in facts.roles)
    without = f"without optional role(s) {', '.join(absent)}"
    if Evidence.STUDY_RELATED_COUNTS in trust and (why := _study_related_counts(facts)):
        return StudyVerdict(True, f"{why}; {without}")
    if Evidence.STUDY_RELEASE in trust and (why := _study_release(facts)):
        return StudyVerdict(True, f"{why}; {without}")
    quiet_for = now - max(s.last_arrival for s in facts.series.values())
    if quiet_for >= study_stable_age_s:
        return StudyVerdict(True, f"no instance for {quiet_for:.1f} s; {without}")
    return StudyVerdict(False, "", absent)
