"""Outcome labels derived from the follow-up CTs in the case store, and the labelled
stored cases the retraining service trains on (:func:`labelled_cases`).

Cases of the same patient (same salted PatientID hash) are linked when the later one was
acquired within a follow-up window after the earlier one (``pipelines.followup.derive``:
HT 18-72 h, expansion 24 +- 12 h; the first follow-up in the window is used). For a
baseline with candidate regions, each linked pair gives, from the stored volumes and
regions (``labels_from_masks``):

- ``ht`` (HT window): the hyperdense region persists; ``contrast_cleared``: it cleared;
- ``haematoma_expansion`` (expansion window): growth >= 6 mL or >= 33 % by planimetry
  (the ABC/2 verdict is kept in the evidence).

Each label is recorded with its evidence (both volumes, the registration quality, the
follow-up's key and the hours between) and confidence (``dicomnode.labels.record_derived``);
a study already labelled for that outcome (imported, derived, confirmed or overruled)
is left as it is. Runs in the retraining service, never in the receiving node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from numpy.typing import NDArray

from dicomnode.case_store import StoredCase, list_cases, load_record
from dicomnode.labels import labels, record_derived
from pipelines.followup.derive import (
    HE_WINDOW,
    HT_WINDOW,
    DerivedLabels,
    Window,
    in_window,
    labels_from_masks,
)
from pipelines.retraining.trainable import RecordedCase
from pipelines.series import Volume

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Link:
    """A baseline case, its follow-up and the hours between."""

    baseline: StoredCase
    followup: StoredCase
    hours: float


def link_followups(cases: Sequence[StoredCase], window: Window) -> list[Link]:
    """For each case, the first later case of the same patient within ``window``."""
    dated = sorted((c.acquired_at, c.key, c) for c in cases if c.acquired_at is not None)
    links = []
    for i, (base_at, _, base) in enumerate(dated):
        for later_at, _, later in dated[i + 1 :]:
            if later.patient == base.patient and in_window(base_at, later_at, window):
                hours = (later_at - base_at).total_seconds() / 3600.0
                links.append(Link(base, later, round(hours, 2)))
                break
    return links


def _volume(root: Path, key: str) -> tuple[Volume, NDArray[np.bool_]]:
    record = load_record(root, key)
    hu = np.asarray(record.arrays["volume_hu"], dtype=np.float32)
    volume = Volume(hu, np.asarray(record.arrays["volume_affine"], dtype=np.float64))
    return volume, np.asarray(record.arrays["regions"]).astype(bool)


def derive_store_labels(root: Path, state_dir: Path) -> int:
    """Derive and record the labels of every linked pair not labelled yet; returns how
    many labels were recorded."""
    cases = list_cases(root)
    done = {(label.study_key, label.outcome) for label in labels(state_dir)}
    wanted: dict[tuple[str, str], Link] = {}
    for outcomes, window in ((("ht", "contrast_cleared"), HT_WINDOW),
                             (("haematoma_expansion",), HE_WINDOW)):  # fmt: skip
        for link in link_followups(cases, window):
            for outcome in outcomes:
                if (link.baseline.key, outcome) not in done:
                    wanted[(link.baseline.key, outcome)] = link
    recorded = 0
    derived: dict[tuple[str, str], DerivedLabels | None] = {}
    for (key, outcome), link in sorted(wanted.items()):
        pair = (link.baseline.key, link.followup.key)
        if pair not in derived:
            base_volume, base_mask = _volume(root, link.baseline.key)
            fu_volume, fu_mask = _volume(root, link.followup.key)
            if not base_mask.any():
                derived[pair] = None
            else:
                derived[pair] = labels_from_masks(base_volume, base_mask, fu_volume, fu_mask)
        result = derived[pair]
        if result is None:
            continue  # no candidate region at baseline: nothing to persist or grow
        field = {"ht": "ht_persists", "contrast_cleared": "contrast_cleared",
                 "haematoma_expansion": "expansion_planimetric"}[outcome]  # fmt: skip
        evidence = {
            **result.evidence,
            "expansion_abc2": result.expansion_abc2,
            "followup_key": link.followup.key,
            "hours": link.hours,
        }
        record_derived(
            state_dir, key, outcome, bool(getattr(result, field)),
            float(result.confidence[field]), evidence, patient=link.baseline.patient,
        )  # fmt: skip
        recorded += 1
    log.info("follow-up labels derived", links=len(wanted), recorded=recorded)
    return recorded


def labelled_cases(
    root: Path, state_dir: Path, pipeline: str, outcome: str
) -> tuple[RecordedCase, ...]:
    """The stored cases of ``pipeline`` with an ``outcome`` label, with their records."""
    values = {
        label.study_key: label.value for label in labels(state_dir) if label.outcome == outcome
    }
    return tuple(
        RecordedCase(
            case.key, case.patient, values[case.key], case.header, load_record(root, case.key)
        )
        for case in list_cases(root)
        if case.pipeline == pipeline and case.key in values
    )
