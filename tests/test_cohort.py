"""Synthetic cohort: determinism, lesion physics, headers vs table, outcome model, pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from pipelines.cohort import (
    CLINICAL_WEIGHTS,
    GENERATOR_VERSION,
    OUTCOME,
    Cohort,
    draw_variables,
    generate_cohort,
)
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.lesions import (
    ContrastStain,
    Haemorrhage,
    HeadFrames,
    LesionKind,
    PaintedLesion,
    Site,
    paint_contrast,
    paint_haemorrhage,
)
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_series

SEED = 11
ROWS, SLICES = 128, 16
SINGLE_SOURCE_AUC = (0.64, 0.78)  # documented: about 0.71 each
COMBINED_AUC = 0.84  # documented: about 0.88


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Twelve small cases."""
    return generate_cohort(tmp_path_factory.mktemp("cohort"), 12, SEED, rows=ROWS, n_slices=SLICES)


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def hu_of(case_folder: Path) -> NDArray[np.float64]:
    """HU (n, rows, cols) of a case's files in file order."""
    datasets = [pydicom.dcmread(p) for p in sorted(case_folder.glob("*.dcm"))]
    return np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )


def irregularity(masks: NDArray[np.bool_]) -> float:
    """1 - solidity (area over convex hull area) of the largest cross-section."""
    section = masks[int(np.argmax(masks.sum(axis=(1, 2))))]
    pixels = np.argwhere(section)
    corners = np.concatenate([pixels + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))])
    return 1.0 - float(section.sum()) / float(ConvexHull(corners).volume)


def test_same_seed_same_files_other_seed_other_cohort(cohort: Cohort, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", 12, SEED, rows=ROWS, n_slices=SLICES)
    assert files_of(again.root) == files_of(cohort.root)
    other = generate_cohort(tmp_path / "other", 2, SEED + 1, rows=ROWS, n_slices=SLICES)
    first = pydicom.dcmread(sorted(other.cases[0].folder.glob("*.dcm"))[0])
    mine = pydicom.dcmread(sorted(cohort.cases[0].folder.glob("*.dcm"))[0])
    assert first.StudyInstanceUID != mine.StudyInstanceUID
    assert first.PixelData != mine.PixelData


def test_layout_and_manifest(cohort: Cohort) -> None:
    manifest = json.loads(cohort.manifest.read_text())
    assert (manifest["seed"], manifest["version"], manifest["n_cases"]) == (
        SEED,
        GENERATOR_VERSION,
        12,
    )
    assert manifest["model"]["outcome_logit"] == OUTCOME
    assert manifest["model"]["clinical_weights_per_sd"] == CLINICAL_WEIGHTS
    for case in cohort.cases:
        files = sorted(case.folder.glob("*.dcm"))
        assert len(files) == SLICES
        truth = np.load(cohort.root / "ground_truth" / f"{case.case_id}.npz")
        assert truth["masks"].shape == (len(case.lesions), len(files), ROWS, ROWS)
        assert list(truth["sop_instance_uids"]) == [
            pydicom.dcmread(f).SOPInstanceUID for f in files
        ]
        assert np.array_equal(truth["contrast"] | truth["haemorrhage"], truth["masks"].any(axis=0))
        assert {str(k) for k in truth["kinds"]} == {
            "contrast": {"contrast"},
            "haemorrhage": {"haemorrhage"},
            "mixed": {"contrast", "haemorrhage"},
        }[case.pattern]
        assert all(lesion.volume_ml > 0.2 for lesion in case.lesions)


def test_clinical_table_matches_headers(cohort: Cohort) -> None:
    with cohort.clinical_csv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cohort.cases)
    studies, patients = set(), set()
    for row, case in zip(rows, cohort.cases, strict=True):
        datasets = [pydicom.dcmread(p) for p in sorted(case.folder.glob("*.dcm"))]
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        ds = datasets[0]
        assert ds.AccessionNumber == row["AccessionNumber"] == case.accession_number
        assert ds.PatientID == row["PatientID"]
        assert ds.StudyDate == row["StudyDate"]
        assert ds.PatientAge == f"{int(row['age']):03d}Y"
        assert ds.PatientSex == ("M" if row["sex_male"] == "1" else "F")
        assert row["label_ht"] in ("0", "1") and row["label_iph"] == row["label_ht"]
        assert 3 <= int(row["aspects"]) <= 10 and 2 <= int(row["nihss"]) <= 40
        studies.add(ds.StudyInstanceUID)
        patients.add(ds.PatientID)
    assert len(studies) == len(patients) == len(cohort.cases)


@pytest.fixture(scope="module")
def head() -> tuple[HeadFrames, NDArray[np.float64]]:
    """A noise-free synthetic head: frames and HU."""
    return HeadFrames.from_datasets(synthetic_head_ct(0, n_slices=16, rows=192, noise_hu=0.0))


def painted(
    head: tuple[HeadFrames, NDArray[np.float64]], kind: LesionKind, seed: int, push: float = 0.2
) -> tuple[PaintedLesion, NDArray[np.float64]]:
    """A lesion of typical parameters painted into a copy of ``head``: lesion and HU."""
    frames, clean = head
    rng = np.random.default_rng(seed)
    hu = clean.copy()
    if kind is LesionKind.CONTRAST:
        stain = ContrastStain(6.0, 120.0, Site.CORTICAL if seed % 2 else Site.DEEP)
        centre = frames.choose_centre(stain.site, 16.0, rng)
        return paint_contrast(hu, frames, stain, centre, rng), hu
    bleed = Haemorrhage(6.0, 58.0, 76.0, 5.0, 0.25, Site.DEEP, mass_effect=push)
    centre = frames.choose_centre(bleed.site, 16.0, rng)
    return paint_haemorrhage(hu, frames, bleed, centre, rng), hu


def test_lesion_kinds_differ_in_physics(head: tuple[HeadFrames, NDArray[np.float64]]) -> None:
    stats: dict[LesionKind, list[tuple[float, float, float]]] = {k: [] for k in LesionKind}
    noise = np.random.default_rng(0)
    for kind in LesionKind:
        for seed in range(4):
            lesion, hu = painted(head, kind, seed)
            values = hu[lesion.masks] + noise.normal(0.0, 5.0, int(lesion.masks.sum()))
            stats[kind].append((values.mean(), values.std(), irregularity(lesion.masks)))
            assert 4.0 <= lesion.volume_ml <= 8.0 or lesion.parameters["site"] == "cortical"
    contrast, bleed = (np.array(stats[k]) for k in (LesionKind.CONTRAST, LesionKind.HAEMORRHAGE))
    assert contrast[:, 0].min() > bleed[:, 0].max()  # mean HU
    assert bleed[:, 0].min() >= 50.0 and bleed[:, 0].max() <= 90.0
    assert contrast[:, 1].max() < bleed[:, 1].min()  # HU spread
    assert contrast[:, 2].mean() + 0.05 < bleed[:, 2].mean()  # outline irregularity


def test_contrast_is_sharp_and_haemorrhage_pushes_the_brain(
    head: tuple[HeadFrames, NDArray[np.float64]],
) -> None:
    frames, clean = head
    stain, stained = painted(head, LesionKind.CONTRAST, 0)
    assert np.array_equal(stained[~stain.masks], clean[~stain.masks])  # no edge, no push
    bleed, pushed = painted(head, LesionKind.HAEMORRHAGE, 0)
    still, _ = painted(head, LesionKind.HAEMORRHAGE, 0, push=0.0)
    assert np.array_equal(bleed.masks, still.masks)
    beyond_edge = ~ndimage.binary_dilation(bleed.masks, iterations=2)
    blurred = (np.abs(pushed - clean) > 0) & ~bleed.masks & ~beyond_edge
    assert blurred.sum() > 0.2 * bleed.masks.sum()  # a partial-volume edge
    moved = (np.abs(pushed - clean) > 10.0) & beyond_edge
    assert moved.sum() > 20  # grey-white and ventricle borders displaced outside the edge
    k, r, c = np.nonzero(moved)
    offsets = frames.position_of(np.stack([k, r, c], axis=1)) - np.asarray(bleed.center_mm)
    assert np.linalg.norm(offsets, axis=1).max() < 4.5 * float(bleed.parameters["radius_mm"])


def test_cohort_lesions_follow_their_kind(cohort: Cohort) -> None:
    means: dict[LesionKind, list[float]] = {k: [] for k in LesionKind}
    for case in cohort.cases:
        hu = hu_of(case.folder)
        for lesion in case.lesions:
            means[lesion.kind].append(float(hu[lesion.masks].mean()))
    assert means[LesionKind.CONTRAST] and means[LesionKind.HAEMORRHAGE]
    assert min(means[LesionKind.CONTRAST]) > 85.0
    assert min(means[LesionKind.HAEMORRHAGE]) > 45.0 and max(means[LesionKind.HAEMORRHAGE]) < 90.0


def test_each_source_carries_signal_and_fusion_helps() -> None:
    v = draw_variables(4000, seed=1)
    clinical = np.column_stack(list(v.clinical.values()))
    sources = {"clinical": clinical, "texture": v.texture[:, None], "shape": v.shape[:, None]}
    sources["combined"] = np.column_stack([clinical, v.texture, v.shape])
    train, test = slice(0, 2000), slice(2000, None)
    auc = {}
    for name, x in sources.items():
        z = StandardScaler().fit(x[train]).transform(x)
        model = LogisticRegression(max_iter=1000).fit(z[train], v.label[train])
        auc[name] = roc_auc_score(v.label[test], model.decision_function(z[test]))
        if name == "clinical":  # the directions of effect
            coef = dict(zip(v.clinical, model.coef_[0], strict=True))
            assert all(
                np.sign(coef[k]) == np.sign(w) for k, w in CLINICAL_WEIGHTS.items() if abs(w) >= 0.3
            )
    low, high = SINGLE_SOURCE_AUC
    assert all(low <= auc[k] <= high for k in ("clinical", "texture", "shape")), auc
    assert auc["combined"] >= COMBINED_AUC, auc
    assert auc["combined"] - max(auc[k] for k in ("clinical", "texture", "shape")) > 0.1, auc
    assert 0.3 < v.label.mean() < 0.55
    assert {"contrast", "haemorrhage", "mixed"} == set(v.pattern)


def test_threshold_pipeline_finds_the_lesions(cohort: Cohort) -> None:
    pipeline = HyperdenseThresholdPipeline()
    dice = []
    for case in cohort.cases:
        series = load_series(sorted(case.folder.glob("*.dcm")))
        truth = np.load(cohort.root / "ground_truth" / f"{case.case_id}.npz")
        index = {str(uid): i for i, uid in enumerate(truth["sop_instance_uids"])}
        inserted = truth["masks"].any(axis=0)[[index[f.sop_instance_uid] for f in series.frames]]
        found = pipeline.run(series).segments[0].frame_mask
        dice.append(2.0 * np.count_nonzero(found & inserted) / (found.sum() + inserted.sum()))
    assert min(dice[:4]) > 0.7, dice  # measured: 0.98, 0.93, 0.93, 0.83
    assert np.mean(dice) > 0.85, dice  # measured: 0.89, lowest 0.70 (a lobar haemorrhage)


@pytest.mark.shared
def test_lesions_in_the_real_ge_head_ct(ge_headct_dir: Path, tmp_path: Path) -> None:
    cohort = generate_cohort(tmp_path, 2, SEED, base="ge")
    original = pydicom.dcmread(sorted(ge_headct_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    uids = set()
    for case in cohort.cases:
        files = sorted(case.folder.glob("*.dcm"))
        assert len(files) == len(list(ge_headct_dir.glob("*.dcm")))
        ds = pydicom.dcmread(files[0])
        assert ds.Manufacturer == original.Manufacturer and ds.ImageType[0] == "DERIVED"
        assert ds.StudyInstanceUID != original.StudyInstanceUID and ds.PatientID == case.patient_id
        uids.add(ds.SeriesInstanceUID)
        hu = hu_of(case.folder)
        for lesion in case.lesions:
            assert lesion.masks.shape == hu.shape and lesion.volume_ml > 0.5
            assert hu[lesion.masks].mean() > 50.0
    assert len(uids) == 2
