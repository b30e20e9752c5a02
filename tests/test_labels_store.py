"""Outcome labels: a CSV/JSON feed validated whole, derived labels with evidence, a
radiologist's confirm/overrule through the CLI, every change in the audit trail, and
patient IDs only as salted hashes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.labels import (
    LabelError,
    audit_trail,
    import_labels,
    labels,
    patient_hash,
    record_derived,
)


def write_config(base: Path) -> Path:
    """A minimal node config (its state_dir holds the label store)."""
    path = base / "node.toml"
    path.write_text('spool_dir = "spool"\nstate_dir = "state"\n[[allowed_callers]]\n'
                    'ae_title = "STORESCU"\n', encoding="utf-8")  # fmt: skip
    return path


def run(*argv: str) -> tuple[int, str]:
    """Run the CLI; its exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, out.getvalue()


def test_feed_is_validated_whole_and_audited(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = tmp_path / "bad.csv"
    bad.write_text("study_key,outcome,value\nA1,ht,1\nA2,mrs_90d,9\nA3,colour,1\n")
    with pytest.raises(LabelError) as caught:
        import_labels(state, bad, "clerk")
    assert "row 3: mrs_90d value 9 outside 0-6" in str(caught.value)
    assert "row 4: unknown outcome 'colour'" in str(caught.value)
    assert labels(state) == []  # nothing imported
    feed = tmp_path / "feed.json"
    rows = [
        {"study_key": "A1", "outcome": "ht", "value": 1},
        {"study_key": "A2", "outcome": "mrs_90d", "value": "3"},
    ]
    feed.write_text(json.dumps(rows))
    assert import_labels(state, feed, "clerk") == 2
    assert [(label.study_key, label.value, label.status) for label in labels(state)] == [
        ("A1", 1, "imported"), ("A2", 3, "imported"),
    ]  # fmt: skip
    assert [entry["action"] for entry in audit_trail(state)] == ["import", "import"]


def test_derived_label_confirmed_and_overruled_through_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    state = tmp_path / "state"
    salt = "site-secret"
    hashed = patient_hash("PAT-0001", salt)
    assert "PAT-0001" not in hashed and hashed != patient_hash("PAT-0001", "other")
    evidence = {"baseline_ml": 2.3, "followup_ml": 2.5, "registration_ncc": 0.999}
    record_derived(state, "ACC1", "ht", True, 0.93, evidence, patient=hashed)
    record_derived(state, "ACC2", "haematoma_expansion", False, 0.61, evidence)
    status, out = run("labels", "list", "--config", str(config))
    assert status == 0 and "ACC1 ht=1 (derived, derived confidence 0.93)" in out
    assert run("labels", "confirm", "ACC1", "ht", "--config", str(config), "--by", "dr a")[0] == 0
    status, _ = run("labels", "overrule", "ACC2", "haematoma_expansion", "1",
                    "--config", str(config), "--by", "dr b")  # fmt: skip
    assert status == 2  # a reason is required
    status, out = run("labels", "overrule", "ACC2", "haematoma_expansion", "1", "--config",
                      str(config), "--by", "dr b", "--reason", "growth on thin slices")  # fmt: skip
    assert status == 0 and "overruled ACC2 haematoma_expansion=1" in out
    record_derived(state, "ACC2", "haematoma_expansion", False, 0.7, evidence)  # kept
    by_key = {label.study_key: label for label in labels(state)}
    assert by_key["ACC1"].status == "confirmed" and by_key["ACC1"].value == 1
    assert by_key["ACC2"].status == "overruled" and by_key["ACC2"].value == 1
    assert by_key["ACC1"].evidence == evidence and by_key["ACC1"].confidence == 0.93
    trail = audit_trail(state)
    assert [(e["action"], e["who"]) for e in trail] == [
        ("derive", "follow-up derivation"), ("derive", "follow-up derivation"),
        ("confirm", "dr a"), ("overrule", "dr b"),
    ]  # fmt: skip
    assert trail[-1]["old_value"] == 0 and trail[-1]["new_value"] == 1
    assert trail[-1]["reason"] == "growth on thin slices"
