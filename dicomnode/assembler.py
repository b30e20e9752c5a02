"""Assembly: a series is complete when its content shows it (:mod:`.completeness`, per the
trust of its rule) or, failing that, when its last instance is older than
``stable_age_s``; it is then routed to a job or marked ignored."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from dicomnode.completeness import CompletenessPolicy, Verdict, is_complete
from dicomnode.config import NodeConfig
from dicomnode.jobs import JobQueue
from dicomnode.records import SeriesInfo, SeriesState
from dicomnode.routing import Ignored, Routed, route
from dicomnode.series_facts import SeriesFactsStore
from dicomnode.state import StateStore
from dicomnode.studies import StudyAssembler

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Decision:
    """What assembly did with one complete series; ``job_id`` when it was queued."""

    series: SeriesInfo
    outcome: Routed | Ignored
    job_id: int | None


class Assembler:
    """Finds complete series and hands them to routing."""

    def __init__(self, config: NodeConfig, store: StateStore, jobs: JobQueue) -> None:
        """Use ``config``'s stable age and rules on ``store``'s series."""
        self.config = config
        self.store = store
        self.jobs = jobs
        self.facts = SeriesFactsStore(store)
        self.studies = StudyAssembler(config, store, jobs)  # level = "study" rules

    def policy_for(self, series: SeriesInfo) -> CompletenessPolicy:
        """The completeness policy of the rule ``series`` would go to, else the node's."""
        settings = self.config.completeness
        outcome = route(series, self.config.routes)
        if isinstance(outcome, Routed):
            rule = next(r for r in self.config.routes if r.name == outcome.rule)
            settings = rule.completeness or settings
        return settings.policy(self.config.stable_age_s)

    def judge_series(self, now: float) -> list[tuple[SeriesInfo, Verdict]]:
        """Series still receiving that are complete, with the evidence that says so."""
        complete = []
        for series in self.store.stable_series(now):
            facts = self.facts.series_facts(
                series.series_instance_uid, series.instance_count, series.last_arrival
            )
            verdict = is_complete(facts, self.policy_for(series), now)
            if verdict.complete:
                complete.append((series, verdict))
        return complete

    def find_complete_series(self, now: float) -> list[SeriesInfo]:
        """Series still receiving that are complete by content or by the stable age."""
        return [series for series, _ in self.judge_series(now)]

    def assemble(self, now: float) -> list[Decision]:
        """Route every complete series: queue a job or record why it is ignored."""
        decisions = []
        judged = self.judge_series(now)
        complete = {series.series_instance_uid: (series, verdict) for series, verdict in judged}
        for series, verdict in judged:
            bound = log.bind(
                study_uid=series.study_instance_uid, series_uid=series.series_instance_uid
            )
            outcome = route(series, self.config.routes)
            if isinstance(outcome, Routed) and self.studies.handles(outcome.rule):
                decisions += [
                    Decision(d.series, d.outcome, d.job_id)
                    for d in self.studies.assemble(series, outcome, now, complete)
                ]
                continue
            job_id = None
            if isinstance(outcome, Routed):
                job_id = self.jobs.enqueue_for_series(
                    series, outcome.rule, outcome.pipeline, outcome.destinations, now
                )
                moved = job_id is not None
            else:
                moved = self.store.conclude_series(series, SeriesState.IGNORED, outcome.reason)
            if not moved:
                bound.info("series received more instances while assembling; waiting")
                continue
            self.facts.record_completion(
                series.series_instance_uid, verdict, series.last_arrival,
                series.instance_count, now,
            )  # fmt: skip
            bound = bound.bind(
                completed_by=verdict.evidence, completeness=verdict.detail,
                waited_s=round(now - series.last_arrival, 3),
            )  # fmt: skip
            if isinstance(outcome, Routed):
                bound.info(
                    "series routed",
                    rule=outcome.rule,
                    pipeline=outcome.pipeline,
                    job_id=job_id,
                    instances=series.instance_count,
                )
            else:
                bound.info("series ignored", reason=outcome.reason)
            decisions.append(Decision(series, outcome, job_id))
        return decisions
