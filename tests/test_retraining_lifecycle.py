"""Retraining without training: the promotion gate on generated risks, the lifecycle of
versions (gate records, promotion refused without the gate, forced promotion audited,
rollback, shadow, readable version folders), the HTML + PNG report, and the node's
pickup of a promotion without a restart."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression

from model_store.artefacts import TrainingRecord, save_model
from model_store.lifecycle import (
    GateRecord,
    clean_staging,
    next_version,
    promote_version,
    read_audit,
    rollback,
    set_shadow,
    shadow_version,
    version_statuses,
    write_gate,
)
from model_store.registry import STORE_ROOT, ModelStoreError, list_versions, promoted_version
from pipelines.evaluation import evaluation_table
from pipelines.registry import get_pipeline
from pipelines.retraining.gate import GatePolicy, calibration_slope, evaluate_gate
from pipelines.retraining.report import FIGURES, REPORT_HTML, ReportInputs, write_report
from pipelines.settings import HtAfterMtSettings, PipelinesSettings

MODEL = "toy"
POLICY = GatePolicy(margin=0.05, slope_min=0.5, slope_max=2.0, min_events=10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def risks(n: int, mean_logit: float, seed: int) -> tuple[NDArray[np.int_], NDArray[np.float64]]:
    """Calibrated risks (logit normal, SD 2) and outcomes drawn from them."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(mean_logit, 2.0, n)))
    return (rng.uniform(0, 1, n) < p).astype(int), p


def toy_version(root: Path, version: str) -> Path:
    """A tiny trained version (one logistic regression) of model ``toy``."""
    model = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    record = TrainingRecord(
        recipe={"classifier": "logistic"}, feature_names=("x",), training_data_hash="0" * 64,
        metrics={}, cutoffs={"main": 0.5}, primary="main", extra={"cohort": {"n_cases": 4}},
    )  # fmt: skip
    return save_model(MODEL, version, {"main": model}, record, root=root)


def test_gate_fails_with_too_few_events_and_passes_a_sound_candidate() -> None:
    y, service = risks(200, -1.0, 1)
    jitter = np.random.default_rng(2).normal(0, 0.01, y.size)
    sound = evaluate_gate(y, np.clip(service + jitter, 0, 1), service, POLICY)
    assert sound.passed, sound.reasons
    assert sound.metrics["events"] >= 10 and 0.5 < sound.metrics["calibration_slope"] < 2.0
    small_y, small_p = risks(30, -3.0, 2)
    few = evaluate_gate(small_y, small_p, small_p, POLICY)
    assert not few.passed and int(small_y.sum()) < 10
    assert "too few held-out events" in few.reasons[0]
    assert f"{int(small_y.sum())} events" in few.reasons[0]


def test_gate_refuses_an_inferior_or_miscalibrated_candidate() -> None:
    y, service = risks(300, -0.5, 3)
    noise = np.random.default_rng(4).uniform(0, 1, y.size)
    worse = evaluate_gate(y, noise, service, POLICY)
    assert not worse.passed
    assert any("not shown non-inferior" in r for r in worse.reasons)
    p = np.clip(service, 1e-6, 1 - 1e-6)
    extreme = 1 / (1 + np.exp(-4 * np.log(p / (1 - p))))  # slope about 1/4
    assert calibration_slope(y, extreme) < 0.5
    overfit = evaluate_gate(y, extreme, service, POLICY)
    assert any("calibration slope" in r for r in overfit.reasons)
    alone = evaluate_gate(y, service, None, POLICY)
    assert alone.passed and "not applied" in alone.metrics["non_inferiority"]


def test_versions_are_readable_and_promotion_needs_the_gate(tmp_path: Path) -> None:
    folder = toy_version(tmp_path, "1.0.0")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())
    toy_version(tmp_path, "1.1.0")
    with pytest.raises(ModelStoreError, match="never evaluated"):
        promote_version(MODEL, "1.1.0", tmp_path, by="tester")
    write_gate(MODEL, GateRecord("1.1.0", False, ("too few held-out events",), {}, "t"), tmp_path)
    with pytest.raises(ModelStoreError, match="failed the gate: too few"):
        promote_version(MODEL, "1.1.0", tmp_path, by="tester")
    with pytest.raises(ModelStoreError, match="needs a reason"):
        promote_version(MODEL, "1.1.0", tmp_path, by="tester", force=True)
    promote_version(MODEL, "1.1.0", tmp_path, by="dr x", force=True, reason="site decision")
    assert promoted_version(MODEL, tmp_path) == "1.1.0"
    forced = read_audit(MODEL, tmp_path)[-1]
    assert forced["action"] == "forced promote" and forced["reason"] == "site decision"
    assert forced["gate_reasons"] == ["too few held-out events"] and forced["by"] == "dr x"


def test_shadow_rollback_and_statuses(tmp_path: Path) -> None:
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        toy_version(tmp_path, version)
        write_gate(MODEL, GateRecord(version, True, (), {"auc": 0.8}, "t"), tmp_path)
    promote_version(MODEL, "1.0.0", tmp_path, by="a")
    set_shadow(MODEL, "1.1.0", tmp_path, by="a")
    assert shadow_version(MODEL, tmp_path) == "1.1.0"
    with pytest.raises(ModelStoreError, match="in service"):
        set_shadow(MODEL, "1.0.0", tmp_path, by="a")
    promote_version(MODEL, "1.1.0", tmp_path, by="a")
    assert shadow_version(MODEL, tmp_path) is None  # the shadow went into service
    statuses = {row.version: row.status for row in version_statuses(MODEL, tmp_path)}
    assert statuses == {"1.0.0": "passed gate", "1.1.0": "in service", "1.2.0": "passed gate"}
    assert rollback(MODEL, tmp_path, by="b", reason="flipped a case") == "1.0.0"
    assert promoted_version(MODEL, tmp_path) == "1.0.0"
    with pytest.raises(ModelStoreError, match="no earlier version"):
        rollback(MODEL, tmp_path, by="b")
    actions = [entry["action"] for entry in read_audit(MODEL, tmp_path)]
    assert actions == ["promote", "shadow", "promote", "rollback"]
    assert next_version(MODEL, tmp_path) == "1.3.0"


def test_half_written_versions_are_never_listed_and_are_cleaned(tmp_path: Path) -> None:
    toy_version(tmp_path, "1.0.0")
    staging = tmp_path / MODEL / ".1.1.0-abc123"
    staging.mkdir()
    (staging / "main.skops").write_bytes(b"partial")
    assert list_versions(MODEL, tmp_path) == ["1.0.0"]
    assert next_version(MODEL, tmp_path) == "1.2.0"  # never reuses the staged number
    assert clean_staging(MODEL, tmp_path) == [".1.1.0-abc123"]
    assert not staging.exists()


def test_report_holds_plots_table_comparison_and_small_sample_warning(tmp_path: Path) -> None:
    y, service = risks(40, -2.0, 5)
    candidate = np.clip(service + np.random.default_rng(6).normal(0, 0.1, y.size), 0, 1)
    events = int(y.sum())
    assert events < 10
    gate = evaluate_gate(y, candidate, service, POLICY)
    inputs = ReportInputs(
        model_name="ht_after_mt", version="1.1.0", notice="trained on synthetic data \u2014 not",
        y_true=y, candidate=candidate, in_service=service, service_version="1.0.0",
        table=evaluation_table({"combined": (y, candidate)}), gate=gate, min_events=10,
        n_train=120, n_cases=160, split="split by patient",
    )  # fmt: skip
    html = write_report(inputs, tmp_path / "r").read_text(encoding="ascii")
    for name in FIGURES:
        assert (tmp_path / "r" / name).read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in html
    assert "too small to decide" in html and f"{events} events" in html
    assert "DeLong z" in html and "AUC (95% CI)" in html and "Promotion gate: failed" in html
    assert (tmp_path / "r" / REPORT_HTML).name == "report.html"


def test_running_node_picks_up_a_promotion_without_restart(tmp_path: Path) -> None:
    shutil.copytree(STORE_ROOT / "ht_after_mt" / "1.0.0", tmp_path / "ht_after_mt" / "1.0.0")
    settings = PipelinesSettings(ht_after_mt=HtAfterMtSettings(model_store_dir=tmp_path))
    first = get_pipeline("ht_after_mt", settings)
    assert get_pipeline("ht_after_mt", settings) is first  # built once while nothing changes
    write_gate("ht_after_mt", GateRecord("1.0.0", True, (), {}, "t"), tmp_path)
    promote_version("ht_after_mt", "1.0.0", tmp_path, by="t")
    second = get_pipeline("ht_after_mt", settings)
    assert second is not first  # promoted.json changed: the next job builds anew
    record = json.loads((tmp_path / "ht_after_mt" / "promoted.json").read_text())
    assert record["version"] == "1.0.0" and record["history"][-1]["action"] == "promote"
    assert os.stat(tmp_path / "ht_after_mt" / "promoted.json").st_mode & 0o044 == 0o044
