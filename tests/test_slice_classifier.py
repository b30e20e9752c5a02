"""Haemorrhage-present slice classifier: nDL by hand, the bundle, determinism, held-out AUC."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store.registry import STORE_ROOT, ModelStoreError
from pipelines.cnn.networks import BackboneName, build_classifier
from pipelines.evaluation import auc_ci_delong
from pipelines.slice_classifier import (
    MODEL_NAME,
    MODEL_VERSION,
    SliceClassifier,
    SliceInputConfig,
    load_slice_classifier,
    normalised_dl_score,
    slice_inputs,
)
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from pipelines.unet import make_cases
from pipelines.volume import load_series

HELD_OUT_SEED = 20250918  # never used for training (the bundle was trained with seed 0)
AUC_BOUND = 0.90  # the training run measured a held-out AUC well above this; see manifest


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """The tests share a small CPU."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def classifier() -> SliceClassifier:
    """The bundled classifier."""
    return load_slice_classifier()


def test_ndl_matches_a_hand_computation() -> None:
    scores = np.array([0.1, 0.9, 0.6, 0.3])
    areas = np.array([0.0, 200.0, 100.0, 50.0])
    # (0.1*0 + 0.9*200 + 0.6*100 + 0.3*50) / (0 + 200 + 100 + 50) = 255 / 350
    assert normalised_dl_score(scores, areas) == pytest.approx(255.0 / 350.0)
    assert normalised_dl_score(scores, np.array([0.0, 0.0, 10.0, 0.0])) == pytest.approx(0.6)
    assert math.isnan(normalised_dl_score(scores, np.zeros(4)))
    with pytest.raises(ValueError, match="areas"):
        normalised_dl_score(scores, areas[:3])
    with pytest.raises(ValueError, match="non-negative"):
        normalised_dl_score(scores, -areas)


def test_inputs_are_windowed_and_centred() -> None:
    config = SliceInputConfig(spacing_mm=2.0, size=64)
    hu = np.full((2, 100, 100), 50.0, dtype=np.float32)
    x = slice_inputs(hu, (1.0, 1.0), config)
    assert tuple(x.shape) == (2, 3, 64, 64)
    centre = x[0, 0, 32, 32] * config.std[0] + config.mean[0]
    assert float(centre) == pytest.approx(0.5, abs=1e-5)  # 50 HU in the 0-100 window
    corner = x[0, 0, 0, 0] * config.std[0] + config.mean[0]
    assert float(corner) == pytest.approx(0.0, abs=1e-5)  # padded with air
    with pytest.raises(ValueError, match="multiple of 32"):
        SliceInputConfig(size=100)


def test_bundle_is_small_hash_checked_and_seresnext_selectable(tmp_path: Path) -> None:
    folder = STORE_ROOT / MODEL_NAME / MODEL_VERSION
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20_000_000
    bundle = load_slice_classifier().bundle
    assert bundle is not None
    assert bundle.notice == "trained on synthetic data — not for clinical use"
    assert bundle.manifest["metrics"]["held_out_slices"]["auc"] > AUC_BOUND
    shutil.copytree(STORE_ROOT / MODEL_NAME, tmp_path / MODEL_NAME)
    weights = tmp_path / MODEL_NAME / MODEL_VERSION / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="sha256"):
        load_slice_classifier(root=tmp_path)
    config = SliceInputConfig.for_backbone(BackboneName.SERESNEXT50, size=64)
    study = SliceClassifier(build_classifier(BackboneName.SERESNEXT50), config)
    p = study.probabilities(np.zeros((2, 64, 64), dtype=np.float32), (3.6, 3.6))
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))


def test_probabilities_are_deterministic_and_auc_holds(classifier: SliceClassifier) -> None:
    cases = make_cases(4, HELD_OUT_SEED, ge_fraction=0.0)
    scores, labels = [], []
    for case in cases:
        keep = case.brain.any(axis=(1, 2))
        scores.append(classifier.probabilities(case.hu[keep], case.spacing))
        labels.append(case.positive_frames[keep].astype(int))
    first = classifier.probabilities(cases[0].hu[:6], cases[0].spacing)
    np.testing.assert_array_equal(
        first, classifier.probabilities(cases[0].hu[:6], cases[0].spacing)
    )
    y = np.concatenate(labels)
    assert 0 < y.sum() < len(y)
    auc = auc_ci_delong(y, np.concatenate(scores))
    assert auc.auc > AUC_BOUND, auc


def test_patient_score_weights_by_the_mask(classifier: SliceClassifier, tmp_path: Path) -> None:
    datasets = synthetic_head_ct(41, n_slices=20)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=2)
    series = load_series(write_series(datasets, tmp_path / "in"))
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    mask = lesion.masks[[index[f.sop_instance_uid] for f in series.frames]]
    score = classifier.patient_score(series, mask)
    assert score.probabilities.shape == (len(series.frames),)
    expected = normalised_dl_score(score.probabilities, score.areas_mm2)
    assert score.ndl == pytest.approx(expected)
    assert score.ndl > 0.5
    assert np.all(score.areas_mm2[~mask.any(axis=(1, 2))] == 0)
