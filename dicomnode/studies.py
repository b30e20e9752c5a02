"""Study-level routing: the series of one study, each in a role, make ONE job.

A routing rule with ``level = "study"`` (``config.RouteRule``) names roles (``dwi``,
``adc``, ``flair``, ``t1`` ...) and how each is recognised from its series' first
instance (``config.StudyRole``: SeriesDescription or SequenceName regex, ImageType
values, DiffusionBValue). Assembly (:class:`StudyAssembler`) sees each complete series
routed to such a rule and waits, leaving it ``receiving``, until:

- every required role is filled by a complete series (complete by its content or its
  stable age, under the rule's trust: :mod:`dicomnode.completeness`) and the study is
  whole (:mod:`dicomnode.study_completeness`: every role filled, its declared size
  reached, the sender's release, or nothing received for the rule's
  ``study_stable_age_s``; optional roles are then left out): ONE job is queued, on the
  series of the first required role (the anchor), and every role's series is routed,
  with the evidence that completed it;
- or the study has been quiet for ``study_stable_age_s`` with a required role missing:
  its series are ignored, the reason naming the missing roles.

When the job runs, :func:`study_paths` gives it every role's files and
:func:`run_study_job` loads them by role and runs the pipeline's ``run_study``; the
outputs are written on the reference role's series, once for the study.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.completeness import Verdict
from dicomnode.config import NodeConfig, RouteRule, StudyRole
from dicomnode.failures import FailureKind, classify_failure
from dicomnode.jobs import JobQueue
from dicomnode.records import Job, SeriesInfo, SeriesState
from dicomnode.routing import Ignored, Routed, matches
from dicomnode.series_facts import SeriesFactsStore
from dicomnode.state import StateStore
from dicomnode.study_completeness import StudyFacts, StudySeries, declared_count, judge_study
from pipelines.base import Pipeline, PipelineError
from pipelines.contract import StudyPipeline, is_study_pipeline
from pipelines.outputs import build_outputs
from pipelines.series import LoadedSeries
from pipelines.stages import stage
from pipelines.volume import VolumeLoadError, load_datasets, read_datasets

log = structlog.get_logger(__name__)

B_VALUE_TOLERANCE = 1.0  # s/mm2
DIFFUSION_GROUP = "MRDiffusionSequence"


class StudyJobFailure(Exception):
    """A study job could not produce results; ``kind`` for the failure notices."""

    def __init__(self, reason: str, kind: FailureKind = FailureKind.PIPELINE_ERROR) -> None:
        """A failure of ``kind`` with the admin ``reason``."""
        super().__init__(reason)
        self.kind = kind


def b_values(header: Dataset) -> set[float]:
    """DiffusionBValue of an instance: top level, or in its shared / first per-frame
    MR Diffusion functional group (enhanced MR)."""
    found: set[float] = set()
    if "DiffusionBValue" in header:
        found.add(float(header.DiffusionBValue))
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = header.get(group) or []
        if items and DIFFUSION_GROUP in items[0]:
            for item in items[0][DIFFUSION_GROUP]:
                if "DiffusionBValue" in item:
                    found.add(float(item.DiffusionBValue))
    return found


def _text(header: Dataset, keyword: str) -> str:
    """A header value as text ('' when absent)."""
    return str(header.get(keyword, "") or "")


def role_matches(header: Dataset, role: StudyRole) -> bool:
    """Whether a series' first instance ``header`` fills ``role`` (pure)."""
    image_type = {str(v).strip().upper() for v in header.get("ImageType", []) or []}
    modality = _text(header, "Modality").strip().upper()
    checks = [
        role.modality is None or modality in {m.strip().upper() for m in role.modality},
        role.series_description is None
        or re.search(role.series_description, _text(header, "SeriesDescription")) is not None,
        role.sequence_name is None
        or re.search(role.sequence_name, _text(header, "SequenceName")) is not None,
        {v.strip().upper() for v in role.image_type_contains or ()} <= image_type,
        role.diffusion_b_value is None
        or any(abs(b - role.diffusion_b_value) <= B_VALUE_TOLERANCE for b in b_values(header)),
    ]
    return all(checks)


def assign_roles(headers: Mapping[str, Dataset], roles: Mapping[str, StudyRole]) -> dict[str, str]:
    """Role -> series UID: for each role in order, the first series (by SeriesNumber,
    then UID) not yet taken whose header fills it (pure)."""

    def order(uid: str) -> tuple[int, str]:
        number = headers[uid].get("SeriesNumber")
        return (int(number) if number is not None else 0, uid)

    taken: dict[str, str] = {}
    for name, role in roles.items():
        for uid in sorted(headers, key=order):
            if uid not in taken.values() and role_matches(headers[uid], role):
                taken[name] = uid
                break
    return taken


def study_rule(config: NodeConfig, name: str) -> RouteRule | None:
    """The study-level rule called ``name``, or ``None``."""
    for rule in config.routes:
        if rule.name == name and rule.level == "study":
            return rule
    return None


def first_header(paths: Sequence[Path]) -> Dataset | None:
    """The header (no pixel data) of the first readable file of ``paths``."""
    for path in paths:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue
    return None


def study_series_uids(store: StateStore, study_uid: str) -> list[str]:
    """Every series of ``study_uid`` the node holds, any state."""
    with store.transaction() as db:
        rows = db.execute(
            "SELECT series_instance_uid FROM series WHERE study_instance_uid = ?", (study_uid,)
        ).fetchall()
    return [str(row[0]) for row in rows]


@dataclass(frozen=True)
class StudyOutcome:
    """What assembly did with one series of a study rule (``job_id`` when queued)."""

    series: SeriesInfo
    outcome: Routed | Ignored
    job_id: int | None


class StudyAssembler:
    """Waits for the series of each study routed to a study-level rule; queues one job."""

    def __init__(self, config: NodeConfig, store: StateStore, jobs: JobQueue) -> None:
        """Use ``config``'s rules and stable ages on ``store``'s series."""
        self.config = config
        self.store = store
        self.jobs = jobs
        self.facts = SeriesFactsStore(store)
        self._headers: dict[str, Dataset] = {}
        self._waiting: dict[str, str] = {}  # study UID -> what it waits for (logged once)

    def handles(self, rule_name: str) -> bool:
        """Whether ``rule_name`` is a study-level rule."""
        return study_rule(self.config, rule_name) is not None

    def _header(self, series_uid: str) -> Dataset | None:
        """The first instance header of a series (read once, then cached)."""
        if series_uid not in self._headers:
            header = first_header(self.store.series_paths(series_uid))
            if header is None:
                return None
            self._headers[series_uid] = header
        return self._headers[series_uid]

    def assemble(
        self,
        series: SeriesInfo,
        routed: Routed,
        now: float,
        complete: Mapping[str, tuple[SeriesInfo, Verdict]],
    ) -> list[StudyOutcome]:
        """Consider the study of the complete ``series`` routed to a study rule;
        ``complete``: every series found complete (by its content or its stable age) in
        this pass, as judged, with its verdict, by series UID."""
        rule = study_rule(self.config, routed.rule)
        if rule is None:
            raise KeyError(f"no study-level rule {routed.rule!r}")
        study_uid = series.study_instance_uid
        bound = log.bind(study_uid=study_uid, rule=rule.name)
        receiving: dict[str, SeriesInfo] = {}
        for uid in study_series_uids(self.store, study_uid):
            info = self.store.get_series(uid)
            if (
                info is not None
                and info.state is SeriesState.RECEIVING
                and matches(info, rule.match)
            ):
                receiving[uid] = info
        headers = {uid: h for uid in receiving if (h := self._header(uid)) is not None}
        roles = assign_roles(headers, rule.roles)
        if series.series_instance_uid not in roles.values():
            reason = f"no role of study rule {rule.name} ({', '.join(rule.roles)})"
            if self.store.conclude_series(series, SeriesState.IGNORED, reason):
                self._forget([series.series_instance_uid])
                return [StudyOutcome(series, Ignored(reason), None)]
            return []
        required = [name for name, r in rule.roles.items() if r.required]
        missing = [name for name in required if name not in roles]
        facts = self._facts(rule, roles, receiving, headers, complete)
        trust = (rule.completeness or self.config.completeness).policy(self.config.stable_age_s)
        verdict = judge_study(facts, trust.trust, now, rule.study_stable_age_s)
        if verdict.complete:
            return self._queue(rule, routed, facts, receiving, verdict.detail, now, bound)
        last = max(info.last_arrival for info in receiving.values())
        quiet = last <= now - rule.study_stable_age_s
        if quiet and missing:
            reason = (
                f"study incomplete: required role(s) {', '.join(missing)} missing after "
                f"{rule.study_stable_age_s:g} s without new instances"
            )
            outcomes = []
            for uid in roles.values():
                if self.store.conclude_series(receiving[uid], SeriesState.IGNORED, reason):
                    outcomes.append(StudyOutcome(receiving[uid], Ignored(reason), None))
            bound.warning("study ignored", reason=reason)
            self._forget(roles.values())
            self._waiting.pop(study_uid, None)
            return outcomes
        waiting_for = ", ".join(verdict.waiting_for)
        if self._waiting.get(study_uid) != waiting_for:
            self._waiting[study_uid] = waiting_for
            bound.info("study waiting", waiting_for=waiting_for, roles=sorted(roles))
        return []

    def _facts(
        self,
        rule: RouteRule,
        roles: Mapping[str, str],
        receiving: Mapping[str, SeriesInfo],
        headers: Mapping[str, Dataset],
        complete: Mapping[str, tuple[SeriesInfo, Verdict]],
    ) -> StudyFacts:
        """What study completeness needs to know of the study of ``receiving``; a series
        that received an instance since it was judged complete counts as incomplete."""

        def verdict(info: SeriesInfo) -> Verdict | None:
            judged, found = complete.get(info.series_instance_uid, (None, None))
            if judged is None or (judged.last_arrival, judged.instance_count) != (
                info.last_arrival,
                info.instance_count,
            ):
                return None
            return found

        study_uid = next(iter(receiving.values())).study_instance_uid
        held = [
            info
            for uid in study_series_uids(self.store, study_uid)
            if (info := self.store.get_series(uid)) is not None
        ]
        released = self.facts.release_times(list(receiving))
        return StudyFacts(
            rule_roles=tuple(rule.roles),
            required=tuple(name for name, r in rule.roles.items() if r.required),
            roles=dict(roles),
            series={
                uid: StudySeries(uid, verdict(info), info.last_arrival, released.get(uid))
                for uid, info in receiving.items()
            },
            declared_series=declared_count(headers.values(), "NumberOfStudyRelatedSeries"),
            declared_instances=declared_count(headers.values(), "NumberOfStudyRelatedInstances"),
            held_series=len(held),
            held_instances=sum(info.instance_count for info in held),
        )

    def _queue(
        self,
        rule: RouteRule,
        routed: Routed,
        facts: StudyFacts,
        receiving: Mapping[str, SeriesInfo],
        why: str,
        now: float,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> list[StudyOutcome]:
        """Queue the study's one job on the anchor series (the first required role's);
        route every role's series and keep the evidence that completed each."""
        roles = facts.roles
        anchor = receiving[roles[facts.required[0]]]
        job_id = self.jobs.enqueue_for_series(
            anchor, rule.name, routed.pipeline, routed.destinations, now
        )
        if job_id is None:
            return []  # an instance arrived meanwhile: wait for it
        outcomes = [StudyOutcome(anchor, routed, job_id)]
        for uid in roles.values():
            if uid != anchor.series_instance_uid:
                if not self.store.conclude_series(receiving[uid], SeriesState.ROUTED, None):
                    continue  # an instance arrived meanwhile: it is judged again
                outcomes.append(StudyOutcome(receiving[uid], routed, job_id))
        verdicts = {uid: v for uid in roles.values() if (v := facts.series[uid].verdict)}
        for outcome in outcomes:
            info = outcome.series
            verdict = verdicts[info.series_instance_uid]
            self.facts.record_completion(
                info.series_instance_uid,
                replace(verdict, detail=f"{verdict.detail}; study: {why}"),
                info.last_arrival, info.instance_count, now,
            )  # fmt: skip
        bound.info(
            "study routed", pipeline=routed.pipeline, job_id=job_id, study_complete=why,
            roles={name: receiving[uid].instance_count for name, uid in roles.items()},
            completed_by={name: verdicts[uid].evidence for name, uid in roles.items()},
        )  # fmt: skip
        self._forget(roles.values())
        self._waiting.pop(anchor.study_instance_uid, None)
        return outcomes

    def _forget(self, series_uids: Iterable[str]) -> None:
        """Drop cached headers of series that left assembly."""
        for uid in series_uids:
            self._headers.pop(uid, None)


def study_paths(config: NodeConfig, store: StateStore, job: Job) -> tuple[Path, ...] | None:
    """Every role's files of a study job (the anchor's first), or ``None`` for a series job."""
    rule = study_rule(config, job.rule)
    if rule is None:
        return None
    headers = {}
    paths: dict[str, list[Path]] = {}
    for uid in study_series_uids(store, job.study_instance_uid):
        paths[uid] = store.series_paths(uid)
        header = first_header(paths[uid])
        if header is not None:
            headers[uid] = header
    roles = assign_roles(headers, rule.roles)
    chosen = [job.series_instance_uid, *(u for u in roles.values() if u != job.series_instance_uid)]
    return tuple(path for uid in chosen for path in paths.get(uid, []))


def series_by_role(
    paths: Sequence[Path], roles: Mapping[str, StudyRole]
) -> dict[str, LoadedSeries]:
    """Load the files of a study job and give each role its series."""
    by_series: dict[str, list[Dataset]] = {}
    for ds in read_datasets(paths):
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    assigned = assign_roles({uid: group[0] for uid, group in by_series.items()}, roles)
    return {name: load_datasets(by_series[uid]) for name, uid in assigned.items()}


PipelineFactory = Callable[[str], Pipeline]


def run_study_job(
    paths: Sequence[Path],
    rule: RouteRule,
    pipeline_name: str,
    output_dir: Path,
    build: PipelineFactory,
    revision: int = 1,
) -> list[Path]:
    """Run the study pipeline ``pipeline_name`` on the study's files; write its outputs
    (on the reference role's series) and return them. Failures: :class:`StudyJobFailure`."""
    try:
        pipeline = build(pipeline_name)
        if not is_study_pipeline(pipeline):
            raise StudyJobFailure(
                f"rule {rule.name} is study-level but pipeline {pipeline_name} is not "
                "(it has no run_study)"
            )
        study: StudyPipeline = pipeline  # type: ignore[assignment]
        with stage("load"):
            loaded = series_by_role(paths, rule.roles)
        missing = [r for r in study.required_roles if r not in loaded]
        if missing:
            raise StudyJobFailure(
                f"the study lacks the {', '.join(missing)} series its pipeline needs",
                FailureKind.UNLOADABLE_SERIES,
            )
        with stage("other"):  # what the pipeline does not charge to its own stages
            result = study.run_study(loaded)
    except StudyJobFailure:
        raise
    except (PipelineError, VolumeLoadError, OSError, ValueError, RuntimeError) as exc:
        raise StudyJobFailure(
            f"pipeline {pipeline_name} failed: {exc}", classify_failure(exc)
        ) from exc
    reference = loaded[study.reference_role]
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with stage("writers"):
        for dataset in build_outputs(
            reference, result, pipeline_name=pipeline_name, profile=study.profile, revision=revision
        ):
            path = output_dir / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            written.append(path)
    log.info(
        "study pipeline finished", pipeline=pipeline_name, roles=sorted(loaded),
        series_uid=str(reference.reference.SeriesInstanceUID), outputs=len(written),
    )  # fmt: skip
    return written
