"""Completeness by content, the pure judge: which evidence completes a series, when the
stable age takes over, and what the receiver reads from a header."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import uid
from pydicom.dataset import Dataset

from dicomnode.assembler import Assembler
from dicomnode.completeness import (
    CompletenessPolicy,
    CompletenessSettings,
    Evidence,
    InstanceFacts,
    SeriesFacts,
    contiguous_positions,
    instance_facts,
    is_complete,
)
from dicomnode.config import NodeConfig
from dicomnode.jobs import JobQueue
from dicomnode.records import Association, InstanceRecord
from dicomnode.routing import Routed
from dicomnode.series_facts import ReleaseTracker, SeriesFactsStore
from dicomnode.state import StateStore
from pipelines.synthetic import synthetic_head_ct

STABLE_AGE_S = 60.0
ALL_TRUSTED = frozenset(
    {
        Evidence.ENHANCED_FRAMES,
        Evidence.IMAGES_IN_ACQUISITION,
        Evidence.NUMBER_OF_SLICES,
        Evidence.ASSOCIATION_RELEASE,
    }
)
POLICY = CompletenessPolicy(trust=ALL_TRUSTED, grace_s=0.5, stable_age_s=STABLE_AGE_S)
LAST = 1000.0  # last arrival of every series below


def _slices(n: int, declared: int | None = None, *, tilt: float = 0.0) -> list[Dataset]:
    """``n`` synthetic CT slices; ``declared`` sets ImagesInAcquisition."""
    datasets = synthetic_head_ct(seed=7, n_slices=n, rows=16, gantry_tilt_deg=tilt)
    if declared is not None:
        for ds in datasets:
            ds.ImagesInAcquisition = declared
    return datasets


def _facts(datasets: list[Dataset]) -> tuple[InstanceFacts, ...]:
    return tuple(instance_facts(ds, ds.SOPInstanceUID, ds.SOPClassUID) for ds in datasets)


def _series(instances: tuple[InstanceFacts, ...], released_at: float | None = None) -> SeriesFacts:
    return SeriesFacts(len(instances), LAST, released_at, instances)


def test_images_in_acquisition_reached_completes_after_the_grace_only() -> None:
    facts = _series(_facts(_slices(8, declared=8)))
    assert not is_complete(facts, POLICY, LAST + 0.2).complete  # within the grace
    verdict = is_complete(facts, POLICY, LAST + 0.6)
    assert verdict.complete and verdict.evidence is Evidence.IMAGES_IN_ACQUISITION
    assert "8 of 8 images" in verdict.detail


def test_a_missing_instance_waits_for_the_stable_age() -> None:
    datasets = _slices(8, declared=8)
    facts = _series(_facts(datasets[:3] + datasets[4:]))
    waiting = is_complete(facts, POLICY, LAST + STABLE_AGE_S - 1)
    assert not waiting.complete and "7 of 8 images" in waiting.detail
    late = is_complete(facts, POLICY, LAST + STABLE_AGE_S)
    assert late.complete and late.evidence is Evidence.STABLE_AGE


def test_several_acquisitions_complete_only_on_the_series_total() -> None:
    """Each step-and-shoot rotation reaching its own count says nothing of the next."""
    per_rotation = _slices(6, declared=2)
    for index, ds in enumerate(per_rotation):
        ds.AcquisitionNumber = 1 + index // 2
    per_rotation[-1].ImagesInAcquisition = 1
    verdict = is_complete(_series(_facts(per_rotation)), POLICY, LAST + 1)
    assert not verdict.complete and "3 acquisitions" in verdict.detail
    totals = _slices(6, declared=6)
    for index, ds in enumerate(totals):
        ds.AcquisitionNumber = 1 + index // 2
    partial = is_complete(_series(_facts(totals[:5])), POLICY, LAST + 1)
    assert not partial.complete and "5 of 6 images in 3 acquisitions;" in partial.detail
    verdict = is_complete(_series(_facts(totals)), POLICY, LAST + 1)
    assert verdict.complete and verdict.evidence is Evidence.IMAGES_IN_ACQUISITION


def test_instances_that_disagree_on_the_count_are_not_trusted() -> None:
    datasets = _slices(8, declared=8)
    datasets[3].ImagesInAcquisition = 5
    verdict = is_complete(_series(_facts(datasets)), POLICY, LAST + 1)
    assert not verdict.complete and "different ImagesInAcquisition" in verdict.detail


def test_number_of_slices() -> None:
    datasets = _slices(6)
    for ds in datasets:
        ds.NumberOfSlices = 6
    verdict = is_complete(_series(_facts(datasets)), POLICY, LAST + 1)
    assert verdict.complete and verdict.evidence is Evidence.NUMBER_OF_SLICES
    assert not is_complete(_series(_facts(datasets[:5])), POLICY, LAST + 1).complete


def test_untrusted_evidence_is_ignored() -> None:
    facts = _series(_facts(_slices(8, declared=8)))
    policy = CompletenessSettings(trust=[]).policy(STABLE_AGE_S)
    verdict = is_complete(facts, policy, LAST + 1)
    assert not verdict.complete and verdict.detail == "content-based completeness off"
    assert is_complete(facts, policy, LAST + STABLE_AGE_S).evidence is Evidence.STABLE_AGE


def _enhanced(frames: int, concatenation: tuple[str, int] | None = None) -> InstanceFacts:
    uid_, total = concatenation or (None, None)
    return InstanceFacts(
        sop_instance_uid=uid.generate_uid(),
        sop_class_uid=uid.LegacyConvertedEnhancedCTImageStorage,
        number_of_frames=frames,
        concatenation_uid=uid_,
        in_concatenation_total=total,
    )


def test_one_enhanced_object_is_complete_and_a_concatenation_needs_all_parts() -> None:
    verdict = is_complete(_series((_enhanced(16),)), POLICY, LAST + 1)
    assert verdict.complete and verdict.evidence is Evidence.ENHANCED_FRAMES
    assert "16 frames" in verdict.detail
    part = ("1.2.3.4", 2)
    assert not is_complete(_series((_enhanced(8, part),)), POLICY, LAST + 1).complete
    both = _series((_enhanced(8, part), _enhanced(8, part)))
    assert is_complete(both, POLICY, LAST + 1).evidence is Evidence.ENHANCED_FRAMES
    single_frame = replace(_enhanced(1), sop_class_uid=uid.CTImageStorage)
    assert not is_complete(_series((single_frame,)), POLICY, LAST + 1).complete


def test_association_release_needs_contiguous_positions() -> None:
    datasets = _slices(8, tilt=12.0)  # tilted gantry: positions along the tilted normal
    whole = _facts(datasets)
    released = is_complete(_series(whole, released_at=LAST + 0.1), POLICY, LAST + 1)
    assert released.complete and released.evidence is Evidence.ASSOCIATION_RELEASE
    gap = whole[:4] + whole[5:]
    verdict = is_complete(_series(gap, released_at=LAST + 0.1), POLICY, LAST + 1)
    assert not verdict.complete and "non-uniform spacing" in verdict.detail
    before_last = is_complete(_series(whole, released_at=LAST - 1), POLICY, LAST + 1)
    assert not before_last.complete  # an instance arrived after that release
    trusting = replace(POLICY, release_needs_contiguous_positions=False)
    assert is_complete(_series(gap, released_at=LAST + 0.1), trusting, LAST + 1).complete


def test_contiguous_positions_is_weak_alone() -> None:
    """A series cut short at its end is still contiguous: why it only supports."""
    whole = _facts(_slices(8))
    assert contiguous_positions(whole)[0]
    assert contiguous_positions(whole[:5])[0]  # truncated, still "contiguous"
    assert not contiguous_positions(whole[:2])[0]
    assert not contiguous_positions(whole + whole[:1])[0]  # two slices at one position
    other = _facts(_slices(8, tilt=20.0))
    assert contiguous_positions(whole[:4] + other[4:])[1] == "slices of different orientations"


def test_malformed_header_values_say_nothing() -> None:
    ds = _slices(1)[0]
    ds.ImagesInAcquisition = "0"
    ds.ImageOrientationPatient = ["1", "0"]
    facts = instance_facts(ds, ds.SOPInstanceUID, ds.SOPClassUID)
    assert facts.images_in_acquisition is None and facts.orientation is None
    assert facts.position_mm is None and facts.acquisition_number == "1"


def test_settings_per_node_and_per_rule() -> None:
    config = NodeConfig.model_validate(
        {
            "allowed_callers": [{"ae_title": "STORESCU"}],
            "spool_dir": "/tmp/spool",
            "state_dir": "/tmp/state",
            "completeness": {"trust": ["images_in_acquisition"], "grace_s": 0.2},
            "routes": [
                {
                    "name": "head-ct",
                    "pipeline": "hyperdense_regions",
                    "completeness": {"trust": ["association_release"]},
                }
            ],
        }
    )
    assert config.completeness.trust == [Evidence.IMAGES_IN_ACQUISITION]
    rule = config.routes[0].completeness
    assert rule is not None and rule.trust == [Evidence.ASSOCIATION_RELEASE]
    assert rule.grace_s == 0.5
    with pytest.raises(ValidationError, match="trust"):
        CompletenessSettings.model_validate({"trust": ["the_scanner_said_so"]})


def test_release_tracker_waits_for_every_association_holding_the_series() -> None:
    tracker = ReleaseTracker()
    first, second = object(), object()
    tracker.stored(first, "1.2.1")
    tracker.stored(second, "1.2.1")
    tracker.stored(first, "1.2.2")
    assert tracker.released(first) == ["1.2.2"]  # 1.2.1 is still being sent by `second`
    assert tracker.released(second) == ["1.2.1"]
    tracker.stored(first, "1.2.3")
    tracker.aborted(first)
    assert tracker.released(first) == []


def test_completions_are_kept_per_decision(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    facts = SeriesFactsStore(store)
    verdict = is_complete(_series(_facts(_slices(4, declared=4))), POLICY, LAST + 1)
    facts.record_completion("1.2.9", verdict, LAST, 4, LAST + 1)
    facts.mark_released(["1.2.9"], LAST + 2)
    facts.mark_released(["1.2.9"], LAST + 1.5)  # an older release never wins
    (kept,) = facts.completions("1.2.9")
    assert kept.evidence is Evidence.IMAGES_IN_ACQUISITION and kept.instance_count == 4
    assert facts.series_facts("1.2.9", 0, LAST).released_at == LAST + 2
    store.close()


def _record(ds: Dataset, at: float, spool: Path) -> InstanceRecord:
    """The receiver's record of one synthetic slice, with its facts."""
    return InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        study_instance_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=uid.ExplicitVRLittleEndian, path=spool / f"{ds.SOPInstanceUID}.dcm",
        received_at=at, association=Association("STORESCU", "DICOMNODE"), modality="CT",
        body_part_examined="HEAD", series_description="", protocol_name="",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        facts=instance_facts(ds, ds.SOPInstanceUID, ds.SOPClassUID),
    )  # fmt: skip


def test_the_assembler_applies_the_rules_trust_and_keeps_the_evidence(tmp_path: Path) -> None:
    """The node trusts nothing but the head-CT rule trusts ImagesInAcquisition: the head
    series starts one grace after its last instance, the other waits for the stable age."""
    config = NodeConfig.model_validate(
        {
            "allowed_callers": [{"ae_title": "STORESCU"}],
            "spool_dir": str(tmp_path / "spool"),
            "state_dir": str(tmp_path / "state"),
            "stable_age_s": STABLE_AGE_S,
            "completeness": {"trust": []},
            "routes": [
                {
                    "name": "head-ct",
                    "match": {"body_part_examined": "HEAD", "series_description": "^head"},
                    "pipeline": "hyperdense_regions",
                    "completeness": {"trust": ["images_in_acquisition"]},
                },
                {"name": "other-ct", "pipeline": "hyperdense_regions"},
            ],
        }
    )
    store = StateStore(tmp_path / "state.sqlite3")
    assembler = Assembler(config, store, JobQueue(store))
    head, other = _slices(4, declared=4), synthetic_head_ct(seed=8, n_slices=4, rows=16)
    for ds in other:
        ds.ImagesInAcquisition = 4
    for ds in head + other:
        record = _record(ds, LAST, tmp_path)
        description = "head" if ds in head else "other"
        store.record_instance(replace(record, series_description=description))
    assert assembler.assemble(LAST + 0.4) == []  # within the grace
    (decision,) = assembler.assemble(LAST + 0.6)
    assert decision.series.series_instance_uid == head[0].SeriesInstanceUID
    assert isinstance(decision.outcome, Routed) and decision.outcome.rule == "head-ct"
    (kept,) = assembler.facts.completions(str(head[0].SeriesInstanceUID))
    assert kept.evidence is Evidence.IMAGES_IN_ACQUISITION and kept.detail == "4 of 4 images"
    (late,) = assembler.assemble(LAST + STABLE_AGE_S)
    assert late.series.series_instance_uid == other[0].SeriesInstanceUID
    (fallback,) = assembler.facts.completions(str(other[0].SeriesInstanceUID))
    assert fallback.evidence is Evidence.STABLE_AGE
    store.close()
