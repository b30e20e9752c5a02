"""Routing: pure decisions on series attributes."""

from __future__ import annotations

import dataclasses

from pydicom import uid

from dicomnode.config import RouteMatch, RouteRule
from dicomnode.records import SeriesInfo, SeriesState
from dicomnode.routing import (
    LOCALIZER_REASON,
    NO_RULE_REASON,
    SECONDARY_CAPTURE_REASON,
    Ignored,
    Routed,
    route,
)

HEAD_CT = SeriesInfo(
    series_instance_uid="1.2.3.4",
    study_instance_uid="1.2.3",
    modality="CT",
    body_part_examined="HEAD",
    series_description="Brain 5mm",
    protocol_name="1.1 Head routine",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    all_localizer=False,
    sop_class_uid=uid.CTImageStorage,
    calling_aet="CT1",
    called_aet="DICOMNODE",
    first_arrival=0.0,
    last_arrival=1.0,
    state=SeriesState.RECEIVING,
    reason=None,
    instance_count=30,
)


def _rule(name: str, **match: object) -> RouteRule:
    """A rule sending to pipeline ``p-<name>`` with the given match conditions."""
    return RouteRule(name=name, pipeline=f"p-{name}", match=RouteMatch.model_validate(match))


def test_first_matching_rule_wins() -> None:
    """Rules are tried in order."""
    rules = [_rule("mr", modality="MR"), _rule("a", modality="ct"), _rule("b")]
    assert route(HEAD_CT, rules) == Routed("a", "p-a", ())


def test_all_given_conditions_must_match() -> None:
    """Every condition of a rule must hold; regexes are searched."""
    assert isinstance(
        route(HEAD_CT, [_rule("x", modality="CT", body_part_examined="CHEST")]), Ignored
    )
    good = _rule(
        "x",
        modality=["CT"],
        body_part_examined=["head", "brain"],
        series_description="(?i)brain",
        protocol_name="Head",
        image_type_contains=["axial"],
        calling_ae_title="CT1",
        called_ae_title="DICOMNODE",
    )
    assert isinstance(route(HEAD_CT, [good]), Routed)
    for field, value in [
        ("series_description", "^Bone"),
        ("protocol_name", "Chest"),
        ("image_type_contains", ["LOCALIZER"]),
        ("calling_ae_title", "CT2"),
        ("called_ae_title", "OTHER"),
    ]:
        rule = good.model_copy(update={"match": good.match.model_copy(update={field: value})})
        assert route(HEAD_CT, [rule]) == Ignored(NO_RULE_REASON), field


def test_localizers_and_secondary_captures_are_ignored() -> None:
    """Scouts and secondary captures are never routed, whatever the rules say."""
    catch_all = [_rule("all")]
    scout = dataclasses.replace(HEAD_CT, all_localizer=True)
    assert route(scout, catch_all) == Ignored(LOCALIZER_REASON)
    for sop_class in (
        uid.SecondaryCaptureImageStorage,
        uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    ):
        sc = dataclasses.replace(HEAD_CT, sop_class_uid=sop_class)
        assert route(sc, catch_all) == Ignored(SECONDARY_CAPTURE_REASON)


def test_no_rules_means_ignored() -> None:
    """Without a matching rule a series is ignored with that reason."""
    assert route(HEAD_CT, []) == Ignored(NO_RULE_REASON)
