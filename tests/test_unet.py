"""The bundled hyperdense U-Net: hash-checked loading, held-out Dice, and the node end to end."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom import uid

from dicomnode.processing import run_pipeline
from model_store.registry import STORE_ROOT, ModelStoreError
from pipelines.registry import get_pipeline, pipeline_names
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from pipelines.unet import (
    MODEL_NAME,
    MODEL_VERSION,
    UNetPipeline,
    frame_regions,
    load_unet,
    make_cases,
    predict_probabilities,
)
from pipelines.unet.cases import make_painted_cases
from pipelines.unet.train import TrainSettings, evaluate, train_unet, write_unet_bundle
from pipelines.volume import load_datasets, load_series
from tests.dciodvfy import dciodvfy_errors

HELD_OUT_SEED = 20250917  # never used for training (the bundle was trained with seed 0)
MIN_DICE = 0.85
NOTICE = "trained on synthetic data - not for clinical use"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """The tests share a small CPU."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipeline() -> UNetPipeline:
    """The pipeline with the bundled network."""
    return UNetPipeline()


def test_bundle_loads_hash_checked_and_says_what_trained_it(tmp_path: Path) -> None:
    unet = load_unet()
    manifest = unet.bundle.manifest
    assert manifest["version"] == MODEL_VERSION == "3.1.0"
    assert manifest["derived_from"]["version"] == "3.0.0"  # the same weights, more rules
    assert manifest["notice"] == NOTICE and manifest["provenance"].isascii()
    assert manifest["training"]["seed"] == 0
    assert manifest["training"]["training_cases_by_base"] == {"synthetic": 96}
    assert manifest["training"]["recipe"]["init_from"] == "2.0.0"
    assert "no real image" in manifest["training"]["data"]
    assert "rise toward the skull" in manifest["training"]["data"]
    assert (
        manifest["inference"]["brain"] == "intracranial"
        and manifest["inference"]["calcification"]
        and manifest["inference"]["bone"]
        and manifest["inference"]["halo"]
        and manifest["inference"]["foci"]
        and manifest["inference"]["band"]
    )
    validation = manifest["threshold_validation"]
    assert manifest["inference"]["threshold"] == validation["chosen"] > 0.9
    assert validation["at_chosen"]["normal_fp_ml_max"] <= 0.1
    assert manifest["metrics"]["held_out"]["pooled_dice"] >= MIN_DICE
    assert sum(p.numel() for p in unet.model.parameters()) < 1_000_000
    shutil.copytree(STORE_ROOT / MODEL_NAME, tmp_path / MODEL_NAME)
    weights = tmp_path / MODEL_NAME / MODEL_VERSION / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="sha256"):
        load_unet(root=tmp_path)


def test_held_out_synthetic_dice() -> None:
    unet = load_unet()
    cases = [c for c in make_painted_cases(5, HELD_OUT_SEED, stream=1) if c.mask.any()][:3]
    assert len(cases) >= 2
    result = evaluate(unet.model, unet.config, cases, unet.inference)
    assert result.pooled_dice >= MIN_DICE, result.summary()
    for case, outside in zip(cases, result.false_positive_ml, strict=True):
        # pixels outside the painted mask: the edge of a found lesion, no lesion elsewhere
        assert outside <= 0.1 + 0.15 * case.volume_ml(case.mask), (case.case_id, outside)


def test_version_1_still_loads_and_runs_on_its_old_rules() -> None:
    old = UNetPipeline("1.0.0", device="cpu")
    assert old.unet.inference.brain == "brain_mask" and not old.unet.inference.calcification
    series = load_datasets(synthetic_head_ct(33, rows=128, n_slices=12))
    result = old.run(series)
    assert result.algorithm.version == "1.0.0"
    assert result.segments[0].frame_mask.shape == series.frame_hu.shape


def test_version_3_0_0_keeps_its_rules() -> None:
    """3.1.0's region rules (``foci``, ``band``) are off for a manifest that lacks them."""
    rules = load_unet("3.0.0").inference
    assert rules.threshold == 0.9 and rules.bone and rules.halo
    assert not rules.foci and not rules.band


def test_training_writes_an_ascii_noticed_hashed_bundle(tmp_path: Path) -> None:
    settings = TrainSettings(cases=2, held_out=1, validation=1, steps=2, batch_size=2, crop=32)
    run = train_unet(settings)
    folder = write_unet_bundle(run, tmp_path / MODEL_NAME / "9.0.0", "9.0.0")
    loaded = load_unet("9.0.0", tmp_path)
    assert loaded.bundle.manifest["notice"] == NOTICE
    assert loaded.bundle.manifest["training"]["recipe"]["steps"] == 2
    assert (folder / "weights.safetensors").is_file()


def test_inference_is_deterministic() -> None:
    unet = load_unet()
    case = make_cases(1, HELD_OUT_SEED + 1, ge_fraction=0.0)[0]
    frames = case.hu[::4]
    first = predict_probabilities(unet.model, unet.config, frames, case.spacing)
    second = predict_probabilities(unet.model, unet.config, frames, case.spacing)
    assert first.shape == frames.shape
    np.testing.assert_array_equal(first, second)


def test_frame_regions_drop_small_and_sort_by_volume() -> None:
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[0:2, 2:5, 2:5] = True  # 18 voxels
    mask[1, 10:15, 10:15] = True  # 25 voxels, one frame
    mask[2, 18, 18] = True  # 1 voxel
    voxel_ml = np.array([0.01, 0.01, 0.05])
    regions = frame_regions(mask, voxel_ml, min_volume_ml=0.1)
    assert [int(r.sum()) for r in regions] == [25, 18]
    assert not any(r[2, 18, 18] for r in regions)


def test_unet_is_registered() -> None:
    assert "hyperdense_unet" in pipeline_names()
    chosen = get_pipeline("hyperdense_unet")
    assert chosen.algorithm.name == "dicomnode hyperdense U-Net"
    assert chosen.algorithm.kind == "learned segmenter"
    assert "synthetic" in chosen.algorithm.provenance


def test_end_to_end_seg_sc_sr(pipeline: UNetPipeline, tmp_path: Path) -> None:
    datasets = synthetic_head_ct(31, gantry_tilt_deg=12.0)
    radius = (3.0 * 12.0 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=radius, hu=75.0, seed=5)
    paths = write_series(datasets, tmp_path / "in")
    series = load_series(paths)
    result = pipeline.run(series)
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    inserted = lesion.masks[[index[f.sop_instance_uid] for f in series.frames]]
    found = result.segments[0].frame_mask
    dice = 2.0 * np.count_nonzero(found & inserted) / (found.sum() + inserted.sum())
    assert dice >= 0.8
    total = result.segments[0].total
    assert total is not None and abs(total.volume_ml - lesion.volume_ml) / lesion.volume_ml < 0.2

    written = run_pipeline(paths, "hyperdense_unet", tmp_path / "out")
    classes = [pydicom.dcmread(p).SOPClassUID for p in written]
    assert classes[0] == uid.SegmentationStorage
    assert classes[-1] == uid.Comprehensive3DSRStorage
    assert uid.SecondaryCaptureImageStorage in classes
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
    seg = hd.seg.segread(written[0])
    algorithm = seg.SegmentSequence[0].SegmentAlgorithmName
    assert algorithm == "dicomnode hyperdense U-Net"
