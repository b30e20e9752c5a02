"""Every risk SR carries the model card: name, version, artefact hash, training-cohort
hash and size, cut-off, calibration slope (from the gate's verdict) and date; the SR
stays dciodvfy-clean and ASCII."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from model_store.lifecycle import GateRecord, write_gate
from model_store.registry import STORE_ROOT, load_manifest
from pipelines.cohort import generate_cohort
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.outputs import build_outputs
from pipelines.volume import load_series
from tests.dciodvfy import dciodvfy_errors

MODEL = "ht_after_mt"


def test_risk_sr_carries_the_model_card(tmp_path: Path) -> None:
    shutil.copytree(STORE_ROOT / MODEL / "1.0.0", tmp_path / "store" / MODEL / "1.0.0")
    store = tmp_path / "store"
    write_gate(MODEL, GateRecord("1.0.0", True, (), {"calibration_slope": 0.87}, "t"), store)
    cohort = generate_cohort(tmp_path / "cohort", 3, 5, rows=64, n_slices=12)
    case = next(c for c in cohort.cases if c.lesions)
    series = load_series(sorted(case.folder.glob("*.dcm")))
    result = HtAfterMtPipeline(root=store, heatmap_reach=0).run(series)
    assert result.risk is not None and result.risk.model_card is not None
    card = result.risk.model_card
    manifest = load_manifest(MODEL, "1.0.0", store)
    assert card.artefact_sha256 == manifest["manifest_sha256"]
    assert card.training_cohort_sha256 == manifest["training_data_hash"]
    assert card.training_cohort_size == len(manifest["split"]["train"])
    assert card.calibration_slope == 0.87
    outputs = build_outputs(series, result, pipeline_name=MODEL)
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    texts: list[str] = []
    pydicom.dcmread(path).walk(
        lambda _ds, elem: texts.append(str(elem.value)) if elem.keyword == "TextValue" else None
    )
    expected = (
        f"model card: {MODEL} 1.0.0; artefact sha256 {card.artefact_sha256[:16]}; "
        f"training cohort sha256 {card.training_cohort_sha256[:16]}, "
        f"{card.training_cohort_size} cases; cut-off {card.cutoff:.3f}; "
        f"calibration slope 0.87; created {manifest['created']}"
    )
    assert texts.count(expected) >= 2  # algorithm parameter and the report's TEXT line
    assert all(value.isascii() for value in texts)
    assert dciodvfy_errors(path) == []
