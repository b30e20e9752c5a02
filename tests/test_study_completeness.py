"""Study completeness by content (``dicomnode.study_completeness``): a study-level rule's
study is whole when its series are complete and it shows that no series is to come."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.completeness import DEFAULT_TRUST, Evidence, Verdict
from dicomnode.study_completeness import StudyFacts, StudySeries, declared_count, judge_study

RULE_ROLES = ("dwi", "adc", "flair", "t1")
REQUIRED = ("dwi", "adc")
LAST = 1000.0
STUDY_STABLE_AGE_S = 120.0
DEFAULT = frozenset(DEFAULT_TRUST)
BY_CONTENT = Verdict(True, Evidence.IMAGES_IN_ACQUISITION, "16 of 16 images")


def _facts(
    roles: dict[str, Verdict | None],
    released: dict[str, float | None] | None = None,
    declared_series: int | None = None,
    declared_instances: int | None = None,
    held_series: int | None = None,
) -> StudyFacts:
    """A study whose roles' series (UID = role name) have these verdicts, each with 16
    instances, the last of the study arriving at ``LAST``."""
    released = released or {}
    return StudyFacts(
        rule_roles=RULE_ROLES,
        required=REQUIRED,
        roles={name: name for name in roles},
        series={
            name: StudySeries(name, verdict, LAST - i, released.get(name))
            for i, (name, verdict) in enumerate(roles.items())
        },
        declared_series=declared_series,
        declared_instances=declared_instances,
        held_series=len(roles) if held_series is None else held_series,
        held_instances=16 * len(roles),
    )


def test_a_study_with_every_role_complete_by_content_is_whole_at_once() -> None:
    facts = _facts(dict.fromkeys(RULE_ROLES, BY_CONTENT))
    verdict = judge_study(facts, DEFAULT, LAST + 0.6, STUDY_STABLE_AGE_S)
    assert verdict.complete and verdict.detail == "every role filled"


def test_an_incomplete_or_missing_required_series_keeps_it_waiting() -> None:
    incomplete = _facts({"dwi": BY_CONTENT, "adc": None, "flair": BY_CONTENT, "t1": BY_CONTENT})
    verdict = judge_study(incomplete, DEFAULT, LAST + 1000, STUDY_STABLE_AGE_S)
    assert not verdict.complete and verdict.waiting_for == ("adc",)
    missing = _facts({"adc": BY_CONTENT}, declared_series=1)
    verdict = judge_study(missing, DEFAULT, LAST + 1000, STUDY_STABLE_AGE_S)
    assert not verdict.complete and verdict.waiting_for == ("dwi",)


def test_optional_roles_are_waited_for_unless_the_study_declares_its_size() -> None:
    required_only = {"dwi": BY_CONTENT, "adc": BY_CONTENT}
    waiting = judge_study(_facts(required_only), DEFAULT, LAST + 1, STUDY_STABLE_AGE_S)
    assert not waiting.complete and waiting.waiting_for == ("flair", "t1")
    declared = _facts(required_only, declared_series=3, held_series=3)  # + a localizer
    verdict = judge_study(declared, DEFAULT, LAST + 1, STUDY_STABLE_AGE_S)
    assert verdict.complete
    assert verdict.detail == "3 of 3 study-related series; without optional role(s) flair, t1"
    short = _facts(required_only, declared_series=4, held_series=3)
    assert not judge_study(short, DEFAULT, LAST + 1, STUDY_STABLE_AGE_S).complete
    by_instances = _facts(required_only, declared_instances=32)
    assert judge_study(by_instances, DEFAULT, LAST + 1, STUDY_STABLE_AGE_S).complete
    untrusted = frozenset({Evidence.IMAGES_IN_ACQUISITION})
    assert not judge_study(declared, untrusted, LAST + 1, STUDY_STABLE_AGE_S).complete


def test_the_senders_release_completes_a_study_sent_in_one_association_when_trusted() -> None:
    required_only = {"dwi": BY_CONTENT, "adc": BY_CONTENT}
    trust = DEFAULT | {Evidence.STUDY_RELEASE}
    together = _facts(required_only, released={"dwi": LAST + 0.1, "adc": LAST + 0.1})
    verdict = judge_study(together, trust, LAST + 1, STUDY_STABLE_AGE_S)
    assert verdict.complete and verdict.detail.startswith("2 series released after")
    assert not judge_study(together, DEFAULT, LAST + 1, STUDY_STABLE_AGE_S).complete
    # dwi's association ended before adc's last instance: series per association
    apart = _facts(required_only, released={"dwi": LAST - 0.5, "adc": LAST + 0.1})
    assert not judge_study(apart, trust, LAST + 1, STUDY_STABLE_AGE_S).complete
    open_still = _facts(required_only, released={"dwi": LAST + 0.1})
    assert not judge_study(open_still, trust, LAST + 1, STUDY_STABLE_AGE_S).complete


def test_a_quiet_study_is_whole_without_its_optional_roles() -> None:
    facts = _facts({"dwi": BY_CONTENT, "adc": BY_CONTENT})
    early = judge_study(facts, DEFAULT, LAST + STUDY_STABLE_AGE_S - 1, STUDY_STABLE_AGE_S)
    assert not early.complete
    late = judge_study(facts, DEFAULT, LAST + STUDY_STABLE_AGE_S, STUDY_STABLE_AGE_S)
    assert late.complete and "without optional role(s) flair, t1" in late.detail


def test_declared_counts_must_agree_and_be_positive() -> None:
    def header(value: object) -> Dataset:
        ds = Dataset()
        if value is not None:
            ds.NumberOfStudyRelatedSeries = value
        return ds

    keyword = "NumberOfStudyRelatedSeries"
    assert declared_count([header(3), header(None), header(3)], keyword) == 3
    assert declared_count([header(3), header(4)], keyword) is None
    assert declared_count([header(0)], keyword) is None
    assert declared_count([header(None)], keyword) is None
