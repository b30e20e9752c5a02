"""The case store: what a risk pipeline's run keeps for retraining, pseudonymised; the
model's risk rebuilt from it; labels derived from a stored follow-up; retention; cohort
export and import between sites (refusing duplicates and corrupt archives)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.case_exchange import export_cases, import_cases
from dicomnode.case_labels import derive_store_labels, labelled_cases
from dicomnode.case_store import (
    CaseStoreError,
    CaseStoreSettings,
    list_cases,
    load_record,
    prune,
    study_key,
)
from dicomnode.labels import audit_trail, labels
from dicomnode.processing import case_keeper, run_pipeline
from model_store.registry import STORE_ROOT, load_manifest
from pipelines.base import Algorithm, CaseRecord, Pipeline, PipelineResult
from pipelines.cohort import generate_cohort
from pipelines.contract import OutputProfile
from pipelines.followup.pairs import generate_pair
from pipelines.ht_after_mt.casedata import features_from_record
from pipelines.ht_after_mt.model import PRIMARY, HtModel
from pipelines.registry import pipeline_factory
from pipelines.retraining.trainable import Cohort, TrainOptions, get_trainable
from pipelines.run_scope import keeping_cases
from pipelines.series import LoadedSeries
from pipelines.settings import HtAfterMtSettings, PipelinesSettings
from pipelines.volume import load_series

SALT = "case-store-test-salt"


def _write(datasets: list, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for index, ds in enumerate(datasets):
        paths.append(folder / f"{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CaseStoreSettings, dict]:
    """Two generated pairs (HT, contrast) run through ``ht_after_mt`` with a case store."""
    base = tmp_path_factory.mktemp("casestore")
    settings = CaseStoreSettings(folder=base / "cases", salt=SALT)
    # the threshold segmenter: these 96 px, 2.4 mm heads are below the U-Net's training
    # sizes (192/256 px), where it calls a 0.14 mL partial-volume line at the skull base
    segmenter = PipelinesSettings(ht_after_mt=HtAfterMtSettings(segmenter="hyperdense_regions"))
    build, keep = pipeline_factory(segmenter), case_keeper(settings)
    studies = {}
    for seed, kind in ((5, "ht"), (6, "contrast")):
        pair = generate_pair(seed, kind)
        for name, datasets in (("baseline", pair.baseline), ("followup", pair.followup)):
            paths = _write(datasets, base / f"{seed}-{name}")
            run_pipeline(paths, "ht_after_mt", base / "out", pipelines=build, keep=keep)
            studies[(kind, name)] = datasets[0]
    return base, settings, studies


def test_a_run_keeps_features_inputs_and_prediction_without_identifiers(
    stored: tuple[Path, CaseStoreSettings, dict],
) -> None:
    _, settings, studies = stored
    root = settings.root()
    cases = {case.key: case for case in list_cases(root)}
    baseline = studies[("ht", "baseline")]
    key = study_key(str(baseline.StudyInstanceUID), SALT)
    case = cases[key]
    assert case.scored and case.prediction is not None
    assert case.header["manufacturer"] and case.header["slice_thickness_mm"] == 5.0
    assert case.acquired_at is not None and case.acquired_at.year == 2026
    meta = (root / key / "case.json").read_text()
    for ds in studies.values():  # no identifier in file names or records
        for value in (ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber, ds.SeriesInstanceUID):
            assert str(value) not in meta and str(value) not in " ".join(os.listdir(root))
    record = load_record(root, key)
    assert record.arrays["volume_hu"].dtype == np.int16 and record.arrays["regions"].any()
    # the stored inputs reproduce the prediction of the version that made it
    model = HtModel.load(case.prediction["model_version"])
    again = model.predict(key, features_from_record(record)).risks[PRIMARY]
    assert again == pytest.approx(case.prediction["probability"], abs=1e-6)
    # a follow-up without lesion (the stain cleared) is kept, unscored, for the labels
    cleared = study_key(str(studies[("contrast", "followup")].StudyInstanceUID), SALT)
    assert not cases[cleared].scored and not load_record(root, cleared).arrays["regions"].any()


@dataclass
class Recorded:
    """A real pipeline whose results the test keeps (what ``run_pipeline`` got from it)."""

    pipeline: Pipeline
    results: list[PipelineResult]

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self.pipeline.name

    @property
    def algorithm(self) -> Algorithm:
        """The pipeline's algorithm."""
        return self.pipeline.algorithm

    @property
    def profile(self) -> OutputProfile:
        """The pipeline's profile."""
        return self.pipeline.profile

    def check(self) -> None:
        """The pipeline's check."""
        self.pipeline.check()

    def run(self, series: LoadedSeries) -> PipelineResult:
        """The pipeline's result, kept."""
        self.results.append(self.pipeline.run(series))
        return self.results[-1]


def test_a_job_without_a_case_store_builds_no_case_record(tmp_path: Path) -> None:
    """The record (an int16 copy of the volume, the regions, the model inputs: ~240 MB on
    a 300-slice series) is built only for a job whose node keeps it."""
    build = pipeline_factory(
        PipelinesSettings(ht_after_mt=HtAfterMtSettings(segmenter="hyperdense_regions"))
    )
    results: list[PipelineResult] = []
    paths = _write(generate_pair(5, "ht").baseline, tmp_path / "in")
    kept: list[CaseRecord | None] = []

    def keep(pipeline: str, reference: Dataset, result: PipelineResult) -> None:
        kept.append(result.case_record)

    for keeper in (None, keep):
        run_pipeline(
            paths, "ht_after_mt", tmp_path / "out", keep=keeper,
            pipelines=lambda name: Recorded(build(name), results),
        )  # fmt: skip
    without, with_store = results
    assert without.risk is not None and without.case_record is None
    assert with_store.case_record is not None and kept == [with_store.case_record]
    assert "volume_hu" in with_store.case_record.arrays and with_store.risk == without.risk
    series = load_series(paths)  # a pipeline run outside a job keeps nothing either
    assert build("ht_after_mt").run(series).case_record is None
    with keeping_cases():
        assert build("ht_after_mt").run(series).case_record is not None


def test_labels_derived_from_stored_follow_ups(
    stored: tuple[Path, CaseStoreSettings, dict], tmp_path: Path
) -> None:
    _, settings, studies = stored
    state = tmp_path / "state"
    assert derive_store_labels(settings.root(), state) == 6  # 2 pairs x 3 outcomes
    found = {(label.study_key, label.outcome): label for label in labels(state)}
    ht = study_key(str(studies[("ht", "baseline")].StudyInstanceUID), SALT)
    stain = study_key(str(studies[("contrast", "baseline")].StudyInstanceUID), SALT)
    assert found[(ht, "ht")].value == 1 and found[(stain, "ht")].value == 0
    assert found[(stain, "contrast_cleared")].value == 1
    assert found[(ht, "haematoma_expansion")].value == 0
    evidence = found[(ht, "ht")].evidence
    assert evidence["registration_ncc"] > 0.95 and 20 <= evidence["hours"] <= 30
    assert derive_store_labels(settings.root(), state) == 0  # labelled once
    cohort = labelled_cases(settings.root(), state, "ht_after_mt", "ht")
    assert sorted((c.case_id, c.label) for c in cohort) == sorted([(ht, 1), (stain, 0)])


def test_export_import_round_trip_refuses_duplicates_and_corruption(
    stored: tuple[Path, CaseStoreSettings, dict], tmp_path: Path
) -> None:
    _, settings, _ = stored
    state = tmp_path / "state"
    derive_store_labels(settings.root(), state)
    archive = tmp_path / "export.tar.gz"
    assert export_cases(settings.root(), state, archive) == 4
    other, other_state = tmp_path / "site-b", tmp_path / "state-b"
    assert import_cases(other, other_state, archive, "tester") == 4
    assert {c.key for c in list_cases(other)} == {c.key for c in list_cases(settings.root())}
    assert len([label for label in labels(other_state) if label.outcome == "ht"]) == 2
    assert {row["action"] for row in audit_trail(other_state)} == {"import"}
    with pytest.raises(CaseStoreError, match="already in the store"):
        import_cases(other, other_state, archive, "tester")

    corrupt = tmp_path / "corrupt.tar.gz"  # one array file altered, the manifest kept
    with tarfile.open(archive) as source, tarfile.open(corrupt, "w:gz") as target:
        altered = False
        for member in source.getmembers():
            handle = source.extractfile(member)
            assert handle is not None
            data = handle.read()
            if member.name.endswith("arrays.npz") and not altered:
                data, altered = data[:-10] + b"0123456789", True
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    fresh = tmp_path / "site-c"
    with pytest.raises(CaseStoreError, match=r"sha256 differs from the manifest \(corrupt\)"):
        import_cases(fresh, tmp_path / "state-c", corrupt, "tester")
    assert list_cases(fresh) == [] and labels(tmp_path / "state-c") == []
    with pytest.raises(CaseStoreError, match="not a readable case archive"):
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(b"not a tar")
        import_cases(fresh, tmp_path / "state-c", bad, "tester")


def test_retention_by_age_and_count(
    stored: tuple[Path, CaseStoreSettings, dict], tmp_path: Path
) -> None:
    _, settings, _ = stored
    copy = tmp_path / "cases"
    import_cases(copy, tmp_path / "state", _export(settings, tmp_path), "tester")
    by_count = settings.model_copy(update={"folder": copy, "max_cases": 3, "retention_days": None})
    assert prune(by_count) == 1 and len(list_cases(copy)) == 3
    by_age = by_count.model_copy(update={"max_cases": None, "retention_days": 30.0})
    assert prune(by_age) == 0
    assert prune(by_age, now=time.time() + 31 * 86400) == 3 and list_cases(copy) == []


def _export(settings: CaseStoreSettings, tmp_path: Path) -> Path:
    archive = tmp_path / "all.tar.gz"
    export_cases(settings.root(), tmp_path / "export-state", archive)
    with tarfile.open(archive) as opened:
        handle = opened.extractfile("manifest.json")
        assert handle is not None
        assert len(json.loads(handle.read())["cases"]) == 4
    return archive


def test_stored_cases_and_a_cohort_folder_train_one_candidate(
    stored: tuple[Path, CaseStoreSettings, dict], tmp_path: Path
) -> None:
    _, settings, _ = stored
    state = tmp_path / "state"
    derive_store_labels(settings.root(), state)
    records = labelled_cases(settings.root(), state, "ht_after_mt", "ht")
    folder = generate_cohort(tmp_path / "cohort", 12, 4, rows=64, n_slices=12).root
    store = tmp_path / "store"
    shutil.copytree(STORE_ROOT / "ht_after_mt" / "1.1.0", store / "ht_after_mt" / "1.1.0")
    trainable = get_trainable("ht_after_mt", TrainOptions(epochs=1, test_size=0.3))
    evaluation = trainable.train_candidate(Cohort(folder, records), version="1.2.0", root=store)
    manifest = load_manifest("ht_after_mt", "1.2.0", store)
    assert manifest["cohort"]["source"] == f"folder {folder} + 2 labelled cases of the case store"
    assert set(manifest["split"]["train"] + manifest["split"]["test"]) >= {
        case.case_id for case in records
    }  # the stored cases were trained or judged on, beside the folder's
    assert manifest["cnn"]["input"]["size"] == records[0].record.inputs["cnn_input"]["size"]
    assert evaluation.in_service is not None  # 1.1.0 scored the held-out cases
