"""Labels derived from follow-up imaging on generated pairs with known truth: linking
windows, rigid registration quality, HT persistence, contrast clearance and haematoma
expansion by both volume rules (the full agreement figure: ``bench/label_agreement.py``)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from pipelines.followup.derive import HE_WINDOW, HT_WINDOW, derive_labels, expansion, in_window
from pipelines.followup.pairs import KINDS, PairKind, generate_pair
from pipelines.volume import load_datasets

LABELS = ("ht_persists", "contrast_cleared", "expansion_planimetric", "expansion_abc2")


def test_follow_up_windows() -> None:
    mt = datetime(2026, 3, 1, 9, 0)
    assert in_window(mt, mt + timedelta(hours=24), HT_WINDOW)
    assert not in_window(mt, mt + timedelta(hours=12), HT_WINDOW)
    assert not in_window(mt, mt + timedelta(hours=73), HT_WINDOW)
    assert in_window(mt, mt + timedelta(hours=36), HE_WINDOW)
    assert not in_window(mt, mt + timedelta(hours=37), HE_WINDOW)
    assert not in_window(mt, mt - timedelta(hours=24), HE_WINDOW)


def test_expansion_rules_absolute_and_relative() -> None:
    assert expansion(20.0, 26.0)[0]  # +6 mL (30 %)
    assert not expansion(20.0, 25.9)[0]  # +5.9 mL, 29.5 %
    assert expansion(3.0, 4.0)[0]  # +33.3 %
    assert not expansion(3.0, 3.9)[0]  # +30 %, +0.9 mL


@pytest.mark.parametrize("kind", KINDS)
def test_derived_labels_agree_with_the_truth(kind: PairKind) -> None:
    pair = generate_pair(11, kind)
    derived = derive_labels(load_datasets(pair.baseline), load_datasets(pair.followup))
    for label in LABELS:
        assert getattr(derived, label) == getattr(pair.truth, label), (label, derived.evidence)
    assert derived.evidence["registration_ncc"] > 0.95  # the shifted head was registered
    assert max(abs(v) for v in pair.truth.shift_mm) > 0.5
    assert all(0.5 <= value <= 1.0 for value in derived.confidence.values())
    assert derived.evidence["baseline_ml"] > 0
