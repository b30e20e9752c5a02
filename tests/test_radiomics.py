"""Radiomics extraction: pyradiomics' baseline, feature counts, cropping, errors."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.typing import NDArray

from pipelines.radiomics import (
    STUDY_PARAMS,
    RadiomicsError,
    count_features,
    extract,
    extract_series,
    study_feature_counts,
)
from pipelines.radiomics.engine import _Pool
from pipelines.radiomics.extract import _filter_margin, _resampling_margin
from pipelines.radiomics.images import bounding_box, grow
from pipelines.radiomics.lbp3d import icosphere, lbp3d_maps, sphere_samples
from pipelines.radiomics.log import log_box
from pipelines.radiomics.matrices import ANGLES, Matrices, covers
from pipelines.radiomics.texture import bin_edges
from pipelines.synthetic import insert_lesion, synthetic_head_ct
from pipelines.volume import load_datasets
from tests.support import SHARED_DIR, shared_path

# pykwalify loads pyradiomics' schema functions with the deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

BASELINE = SHARED_DIR / "data" / "radiomics_baseline"
# Settings of pyradiomics' baseline (its general_info): original image, no resampling.
BASELINE_PARAMS = """
imageType: {Original: {}}
featureClass: {shape: , firstorder: , glcm: , glrlm: , glszm: , gldm: , ngtdm: }
setting: {binWidth: 25, voxelArrayShift: 2000, distances: [1], gldm_a: 0, label: 1,
          additionalInfo: false}
"""
RADIOMICS_PIPELINES = (
    "ht_after_mt",
    "iph_vs_contrast",
    "ich_expansion_hybrid",
    "ais_prognosis_mri",
)
"""Every pipeline that extracts radiomics features."""
# Mesh-based shape features changed after the baseline was made (pyradiomics 1.3): stock
# pyradiomics 3.0.1 differs from it there by up to 0.1%, exactly as we do.
MESH_FEATURES = {"MeshVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity"}
# Small sets that exercise each path of the crop: resampled (grid from the whole mask) and
# not resampled (filter reach, the sentinel for the |HU|-scaled maps, LBP-3D).
RESAMPLED_PARAMS = """
imageType: {Original: {}, LoG: {sigma: [1.0, 3.0]}, Wavelet: {}, Square: {},
            Exponential: {}, LBP3D: {binWidth: 0.5}}
featureClass: {shape: , firstorder: , glcm: , glszm: }
setting: {binWidth: 25, resampledPixelSpacing: [1, 1, 1], interpolator: sitkBSpline,
          padDistance: 5, voxelArrayShift: 1000, additionalInfo: false}
"""
NATIVE_PARAMS = """
imageType: {Original: {}, LoG: {sigma: [1.0]}, Wavelet: {}, Gradient: {}, SquareRoot: {},
            Logarithm: {}, LBP3D: {binWidth: 0.5}}
featureClass: {firstorder: , glcm: , glszm: }
setting: {binWidth: 25, voxelArrayShift: 1000, additionalInfo: false}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    """A parameter file in ``tmp_path``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def phantom(
    shape: tuple[int, int, int] = (24, 112, 112), seed: int = 0
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Noisy soft tissue, a bright rim and air, with an irregular 50-90 HU blob."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = np.array(shape) / 2.0
    r = np.sqrt(((z - centre[0]) * 2.5) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    volume = np.where(r < 40, 35.0, np.where(r < 46, 900.0, -1000.0))
    volume += rng.normal(0.0, 6.0, shape)
    wobble = 6.0 + 1.5 * np.sin(3 * np.arctan2(y - centre[1], x - centre[2]))
    mask = r < wobble
    volume[mask] = 70.0 + rng.normal(0.0, 10.0, int(mask.sum()))
    volume[0, 0, 0] = 2500.0  # the largest |HU|, far from the ROI
    return volume.astype(np.float32), mask


SPACING = (2.5, 0.8, 0.8)
Features = tuple[dict[str, float], dict[str, float]]  # cropped, whole volume


def baseline(case: str) -> dict[str, float]:
    """pyradiomics' baseline feature values of ``case``."""
    values = {}
    for path in sorted((BASELINE / "baseline").glob("baseline_*.csv")):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if case not in rows[0]:
            continue
        column = rows[0].index(case)
        for row in rows[1:]:
            if not row[0].startswith("diagnostics_") and row[column]:
                values[row[0]] = float(row[column])
    return values


@pytest.mark.shared
@pytest.mark.parametrize("case", ["brain1", "lung1"])
def test_reproduces_pyradiomics_baseline(tmp_path: Path, case: str) -> None:
    """All 107 original-image features of pyradiomics' own test case match its baseline."""
    image = sitk.ReadImage(str(shared_path(BASELINE / f"{case}_image.nrrd")))
    label = sitk.ReadImage(str(BASELINE / f"{case}_label.nrrd"))
    assert np.allclose(np.abs(image.GetDirection()), np.eye(3).ravel())
    features = extract(
        sitk.GetArrayFromImage(image),
        tuple(image.GetSpacing()[::-1]),
        sitk.GetArrayFromImage(label),
        write(tmp_path, "baseline", BASELINE_PARAMS),
    )
    expected = baseline(case)
    assert len(expected) == 107
    assert features.keys() == expected.keys()
    for name, value in expected.items():
        rtol = 2e-3 if name.rsplit("_", 1)[1] in MESH_FEATURES else 1e-6
        assert math.isclose(features[name], value, rel_tol=rtol, abs_tol=1e-9), name


def test_study_feature_counts() -> None:
    """Each study's file lands near its published count (1834, 1316, 107 x 15 maps)."""
    counts = study_feature_counts()
    assert counts.keys() == STUDY_PARAMS.keys()
    assert 1700 <= counts["ht_after_mt"] <= 1900
    assert counts["iph_vs_contrast"] == 1316
    assert 1500 <= counts["ich_expansion"] <= 1700


@pytest.fixture(scope="module")
def resampled_pair(tmp_path_factory: pytest.TempPathFactory) -> Features:
    """Cropped and uncropped features of the phantom with the resampled set."""
    params = write(tmp_path_factory.mktemp("p"), "resampled", RESAMPLED_PARAMS)
    volume, mask = phantom()
    return (
        extract(volume, SPACING, mask, params),
        extract(volume, SPACING, mask, params, crop=False),
    )


def test_crop_really_crops() -> None:
    """The phantom is wider than the ROI plus either margin, so the crop is a real one."""
    volume, mask = phantom()
    box = bounding_box(mask)
    settings = {"padDistance": 5, "resampledPixelSpacing": [1, 1, 1]}
    native = {"LoG": {"sigma": [1.0]}, "Wavelet": {}, "Gradient": {}}
    for margin in (
        _resampling_margin(SPACING, settings),
        _filter_margin(SPACING, native, {}, {}),
    ):
        crop = grow(box, margin, volume.shape)
        assert any(hi - lo < n for (lo, hi), n in zip(crop, volume.shape, strict=True))


def test_crop_matches_whole_volume_resampled(resampled_pair: Features) -> None:
    """With 1 mm resampling the cropped extraction equals stock pyradiomics on the volume."""
    cropped, whole = resampled_pair
    assert cropped.keys() == whole.keys()
    assert len(cropped) == 14 + (18 + 24 + 16) * (1 + 2 + 8 + 2 + 3)
    for name, value in whole.items():
        assert math.isclose(cropped[name], value, rel_tol=1e-9, abs_tol=1e-12), name


def test_crop_matches_whole_volume_native(tmp_path: Path) -> None:
    """Without resampling, filter margins and the |HU| sentinel keep every value too."""
    params = write(tmp_path, "native", NATIVE_PARAMS)
    volume, mask = phantom(seed=1)
    cropped = extract(volume, SPACING, mask, params)
    whole = extract(volume, SPACING, mask, params, crop=False)
    assert cropped.keys() == whole.keys()
    assert len(cropped) == (18 + 24 + 16) * (1 + 1 + 8 + 1 + 2 + 3)
    for name, value in whole.items():
        assert math.isclose(cropped[name], value, rel_tol=1e-9, abs_tol=1e-12), name


def assert_same(ours: dict[str, float], stock: dict[str, float], rel: float = 1e-9) -> None:
    """Same feature names, every value within ``rel`` of stock's."""
    assert ours.keys() == stock.keys()
    for name, value in stock.items():
        assert math.isclose(ours[name], value, rel_tol=rel, abs_tol=1e-12), name


@pytest.mark.parametrize("study", sorted(STUDY_PARAMS))
def test_study_files_match_stock_pyradiomics(study: str) -> None:
    """Each study file on a generated case: pooled and in-process runs give stock's values."""
    volume, mask = phantom(shape=(20, 160, 160), seed=4)  # in-plane the crop is a real one
    box = bounding_box(mask)
    margin = _resampling_margin(SPACING, {"padDistance": 10, "resampledPixelSpacing": [1, 1, 1]})
    assert all(lo > 0 for lo, _ in grow(box, margin, volume.shape)[1:])
    stock = extract(volume, SPACING, mask, study, crop=False)
    pooled = extract(volume, SPACING, mask, study, workers=2)
    assert len(stock) == count_features(study)
    assert_same(pooled, stock, rel=1e-6)
    # The texture features are batched over a task's images, and pooled tasks hold fewer
    # images: the sums differ in their order only.
    assert_same(extract(volume, SPACING, mask, study, workers=1), pooled, rel=1e-12)


PIPELINE_PARAMS = sorted(Path(__file__).parents[1].glob("pipelines/*/params/*.yaml"))


@pytest.mark.parametrize("path", PIPELINE_PARAMS, ids=[p.stem for p in PIPELINE_PARAMS])
def test_every_parameter_file_matches_stock(path: Path) -> None:
    """Every parameter file the pipelines ship, on a generated case (z-scored for the MRI
    file, which bins z-scores): in-process extraction gives stock's values."""
    volume, mask = phantom(shape=(20, 96, 96), seed=5)
    if path.stem.endswith("_mri"):
        volume = ((volume - volume[mask].mean()) / volume[mask].std()).astype(np.float32)
    stock = extract(volume, SPACING, mask, path, crop=False)
    assert len(stock) == count_features(path)
    assert_same(extract(volume, SPACING, mask, path, workers=1), stock, rel=1e-6)


@pytest.mark.parametrize(
    "where",
    [
        (slice(0, 5), slice(0, 14), slice(0, 12)),  # at the volume's first corner
        (slice(14, 20), slice(80, 96), slice(84, 96)),  # at its last corner
        (slice(9, 10), slice(40, 52), slice(40, 55)),  # one slice thick: z not resampled
    ],
)
def test_resampling_grid_at_the_edges(where: tuple[slice, slice, slice]) -> None:
    """The grid worked out from the crop is the whole-volume one where pyradiomics clips it."""
    volume, _ = phantom(shape=(20, 96, 96), seed=5)
    mask = np.zeros(volume.shape, bool)
    mask[where] = True
    mask[where] &= np.random.default_rng(5).random(mask[where].shape) < 0.8
    stock = extract(volume, SPACING, mask, "iph_vs_contrast", crop=False)
    assert_same(extract(volume, SPACING, mask, "iph_vs_contrast", workers=1), stock)


@pytest.mark.parametrize(
    ("values", "options"),
    [
        (np.array([54.0, 166.0, 75.0, 99.9]), {"binWidth": 25}),  # the documented example
        (np.array([-1000.0, -3.5, 0.0, 25.0, 50.0]), {"binWidth": 25}),  # edges on values
        (np.array([75.0, 75.0, 75.0]), {"binWidth": 25}),  # flat on an edge: one bin
        (np.array([0.3, 0.31, 2.7]), {"binWidth": 0.5}),
        (np.array([1.0, 2.0, 3.5, 9.0]), {"binCount": 4}),
    ],
)
def test_bin_edges_are_pyradiomics(values: NDArray[np.float64], options: dict[str, float]) -> None:
    """The numpy bin edges and discretisation are pyradiomics' own, on every kind of range."""
    from radiomics import imageoperations

    expected = np.asarray(imageoperations.getBinEdges(values, **options))
    edges = bin_edges(values, options)
    assert np.array_equal(edges, expected)
    assert np.array_equal(np.digitize(values, edges), np.digitize(values, expected))


def test_a_dead_worker_does_not_lose_the_extraction(tmp_path: Path) -> None:
    """Worker processes killed between extractions: the next one still gives stock's values."""
    params = write(tmp_path, "resampled", RESAMPLED_PARAMS)
    volume, mask = phantom(shape=(16, 64, 64), seed=6)
    first = extract(volume, SPACING, mask, params, workers=2)
    pool = _Pool.get(2)
    for process in list(pool._processes.values()):  # the pool's workers
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    # This extraction's tasks run here, measured in one batch: sums in another order only.
    assert_same(extract(volume, SPACING, mask, params, workers=2), first, rel=1e-12)
    assert extract(volume, SPACING, mask, params, workers=2) == first  # a fresh pool


def test_count_matches_extraction(resampled_pair: Features, tmp_path: Path) -> None:
    """``count_features`` counts what ``extract`` returns."""
    assert count_features(write(tmp_path, "resampled", RESAMPLED_PARAMS)) == len(resampled_pair[0])


def test_deterministic(tmp_path: Path) -> None:
    """The same input gives the same values, bit for bit."""
    params = write(tmp_path, "native", NATIVE_PARAMS)
    volume, mask = phantom(shape=(16, 64, 64), seed=2)
    assert extract(volume, SPACING, mask, params) == extract(volume, SPACING, mask, params)


@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (lambda m: np.zeros_like(m), "empty"),
        (lambda m: np.pad(np.ones((1, 1, 1), bool), [(5, 10), (5, 10), (5, 10)]), "single"),
        (lambda m: np.pad(np.ones((1, 1, 6), bool), [(5, 10), (5, 10), (5, 5)]), "dimensions"),
        (lambda m: m[:-1], "shape"),
        (lambda m: m.astype(np.int32) * 2, "empty"),  # label 1 asked, label 2 given
    ],
)
def test_bad_masks_raise_clearly(
    make_mask: Callable[[NDArray[np.bool_]], NDArray[np.generic]], message: str
) -> None:
    """Masks features cannot be computed on raise RadiomicsError saying why."""
    volume = np.zeros((16, 16, 16), np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[4:8, 4:8, 4:8] = True
    with pytest.raises(RadiomicsError, match=message):
        extract(volume, (1.0, 1.0, 1.0), make_mask(mask), "ht_after_mt")  # type: ignore[arg-type]


def test_bad_inputs_raise_clearly() -> None:
    """Unknown parameter files, bad spacing and NaN in the ROI are refused."""
    volume, mask = phantom(shape=(8, 24, 24))
    with pytest.raises(RadiomicsError, match="parameter file"):
        extract(volume, SPACING, mask, "no_such_study")
    with pytest.raises(RadiomicsError, match="spacing"):
        extract(volume, (0.0, 1.0, 1.0), mask, "ht_after_mt")
    volume[mask] = np.nan
    with pytest.raises(RadiomicsError, match="non-finite"):
        extract(volume, SPACING, mask, "ht_after_mt")


def test_extract_series_uses_the_volume_grid(tmp_path: Path) -> None:
    """The LoadedSeries wrapper gives what ``extract`` gives on ``series.volume``."""
    datasets = synthetic_head_ct(1, n_slices=12, rows=128)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=8.0, hu=70.0, seed=1)
    series = load_datasets(datasets)
    mask = lesion.masks  # untilted 5 mm series: frames and grid coincide
    assert mask.shape == series.volume.hu.shape
    params = write(tmp_path, "small", RESAMPLED_PARAMS.replace("LBP3D: {binWidth: 0.5}", ""))
    features = extract_series(series, mask, params)
    assert features == extract(series.volume.hu, series.volume.spacing, mask, params)
    assert math.isclose(
        features["original_shape_VoxelVolume"] / 1000.0, lesion.volume_ml, rel_tol=0.05
    )


@pytest.mark.filterwarnings("ignore:Precision loss occurred in moment calculation")
def test_lbp3d_of_a_flat_image() -> None:
    """Worked example: all 42 signs 1 give m1 = 42 sqrt(42) / (4 pi), and m2 is uniform."""
    vertices = icosphere(1, 1.0)
    assert vertices.shape == (42, 3)
    assert np.allclose(np.linalg.norm(vertices, axis=1), 1.0)
    image = sitk.GetImageFromArray(np.full((9, 9, 9), 40.0))
    mask_arr = np.zeros((9, 9, 9), np.uint8)
    mask_arr[3:6, 3:6, 3:6] = 1
    maps = dict(
        (name, sitk.GetArrayFromImage(m))
        for m, name in lbp3d_maps(image, sitk.GetImageFromArray(mask_arr))
    )
    inside = mask_arr == 1
    assert np.allclose(maps["lbp-3D-m1"][inside], 42 * math.sqrt(42) / (4 * math.pi))
    assert np.ptp(maps["lbp-3D-m2"][inside]) < 1e-12


def test_lbp3d_matches_pyradiomics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where trimesh is installed, pyradiomics' own filter (old sph_harm restored) agrees."""
    pytest.importorskip("trimesh", reason="pyradiomics' LBP-3D needs trimesh (not installed)")
    import scipy.special
    from radiomics import imageoperations

    monkeypatch.setattr(
        scipy.special,
        "sph_harm",
        lambda m, n, a, b: scipy.special.sph_harm_y(n, m, b, a),
        raising=False,
    )
    volume, mask = phantom(shape=(12, 32, 32))
    image, roi = (
        sitk.GetImageFromArray(volume.astype(np.float64)),
        sitk.GetImageFromArray(mask.astype(np.uint8)),
    )
    theirs = {
        name: sitk.GetArrayFromImage(m) for m, name, _ in imageoperations.getLBP3DImage(image, roi)
    }
    ours = {name: sitk.GetArrayFromImage(m) for m, name in lbp3d_maps(image, roi)}
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert np.allclose(ours[name][mask], theirs[name][mask], rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("name", RADIOMICS_PIPELINES)
def test_pool_size_comes_from_the_settings(name: str) -> None:
    """``[pipelines.radiomics] workers`` goes with every pipeline that extracts radiomics
    features, built from the settings (each passes it to its extractions)."""
    from pydantic import ValidationError

    from pipelines.registry import get_pipeline
    from pipelines.settings import PipelinesSettings, RadiomicsSettings

    with pytest.raises(ValidationError, match="workers"):
        RadiomicsSettings(workers=0)
    three = PipelinesSettings(radiomics=RadiomicsSettings(workers=3))
    assert vars(get_pipeline(name, three))["radiomics_workers"] == 3
    assert vars(get_pipeline(name, PipelinesSettings()))["radiomics_workers"] == 1


FIRST_EXTRACTION = {
    "ich_expansion_hybrid": """
from pipelines.ich_expansion.cohort import generate_expansion_cohort
from pipelines.ich_expansion_hybrid.pipeline import IchExpansionHybridPipeline as Built
from pipelines.volume import load_series

case = generate_expansion_cohort(Path(sys.argv[1]), 1, 1, rows=64, n_slices=12).cases[0]
Built.from_settings(SETTINGS).run(load_series(sorted(case.folder.glob("*.dcm"))))
""",
    "ais_prognosis_mri": """
from pipelines.ais_prognosis_mri.pipeline import AisPrognosisMriPipeline as Built
from pipelines.ais_prognosis_mri.synthetic_mri import Infarct, StudySpec, study_datasets
from pipelines.volume import load_datasets

spec = StudySpec(seed=4, infarct=Infarct((32.0, -8.0, 5.0), 15.0, severity=0.7, onset_h=8.0))
study = {role: load_datasets(group) for role, group in study_datasets(spec).items()}
Built.from_settings(SETTINGS).run_study(study)
""",
}
"""A new process's first extraction, by a pipeline built from settings with a pool of 2
(the generated case is small: 64 px, 12 or 16 slices)."""
CHILD_HEAD = """
import sys
from pathlib import Path

from pipelines.settings import PipelinesSettings, RadiomicsSettings

SETTINGS = PipelinesSettings(radiomics=RadiomicsSettings(workers=2))
"""
CHILD_TAIL = """
from pipelines.radiomics.engine import _Pool  # the pool the extraction made, if any

print(_Pool._size)
"""


@pytest.mark.parametrize("name", sorted(FIRST_EXTRACTION))
def test_the_first_extraction_of_a_new_process_uses_the_pool_size_of_the_settings(
    name: str, tmp_path: Path
) -> None:
    """A new process builds the pipeline ``name`` from settings with ``workers = 2`` and
    runs it once: its first extraction (several derived images: several tasks) is shared
    out to a pool of 2 worker processes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = CHILD_HEAD + FIRST_EXTRACTION[name] + CHILD_TAIL  # -c: no script for the
    # forkserver to run again in each worker (a file would be, as the main module)
    found = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.split() == ["2"]


def _extract_in_child(params: str, queue: multiprocessing.Queue[int]) -> None:
    """Pooled extraction in a child process; reports the feature count."""
    volume, mask = phantom(shape=(16, 64, 64), seed=7)
    queue.put(len(extract(volume, SPACING, mask, params, workers=2)))


def test_a_process_that_extracted_still_exits(tmp_path: Path) -> None:
    """A multiprocessing child extracts in its own process (a pool of its own would keep
    it from exiting: multiprocessing joins a child's children before closing its pools)."""
    params = str(write(tmp_path, "resampled", RESAMPLED_PARAMS))
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[int] = context.Queue()
    child = context.Process(target=_extract_in_child, args=(params, queue))
    child.start()
    assert queue.get(timeout=300) == count_features(params)
    child.join(timeout=60)
    exited = child.exitcode
    if exited is None:
        child.kill()
    assert exited == 0


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.5, 5.5])
@pytest.mark.parametrize("shape", [(40, 52, 61), (6, 9, 30)])
def test_matrix_log_is_itks_to_the_bit(sigma: float, shape: tuple[int, int, int]) -> None:
    """The matrix LoG on a box equals SimpleITK's recursive LoG there, every float32 bit."""
    block = np.random.default_rng(int(sigma * 10)).normal(40.0, 300.0, shape)
    box = [(n // 5, n - n // 4) for n in shape]
    stock = sitk.LaplacianRecursiveGaussianImageFilter()
    stock.SetNormalizeAcrossScale(True)
    stock.SetSigma(sigma)
    expected = sitk.GetArrayFromImage(stock.Execute(sitk.GetImageFromArray(block)))
    ours = log_box(block, sigma, box)
    assert ours.dtype == expected.dtype == np.float32
    assert np.array_equal(ours, expected[tuple(slice(lo, hi) for lo, hi in box)])


@pytest.mark.parametrize(
    ("shape", "levels", "fill", "gldm_a"),
    [
        ((5, 6, 7), 3, 0.8, 0),
        ((10, 12, 9), 2, 0.9, 0),
        ((20, 20, 20), 5, 0.7, 1),
        ((8, 30, 30), 1, 0.95, 0),
        ((12, 12, 12), 40, 0.6, 0),
        ((2, 7, 8), 4, 1.0, 2),
        ((9, 11, 10), 6, 0.8, 3),
    ],
)
def test_shared_matrices_are_pyradiomics_c(
    shape: tuple[int, int, int], levels: int, fill: float, gldm_a: int
) -> None:
    """The compiled matrices equal pyradiomics' C ones, count for count, on random ROIs
    (one grey level, many, GLDM alpha 0 to 2, a 2-voxel-thin box)."""
    rng = np.random.default_rng(levels)
    roi = rng.random(shape) < fill
    binned = np.where(roi, rng.integers(1, levels + 1, shape), 0)
    _assert_matrices_are_c(binned, roi, gldm_a)


def _blob(shape: tuple[int, int, int], radius: float) -> NDArray[np.bool_]:
    """An ellipsoid filling ``radius`` of the box's half-widths."""
    centred = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape]
    z, y, x = np.meshgrid(*centred, indexing="ij")
    return np.asarray(z**2 + y**2 + x**2 <= radius**2)


def _special_rois() -> dict[str, tuple[NDArray[np.int_], NDArray[np.bool_]]]:
    """Binned images of the kernel's edge cases: (grey levels, ROI), the box being the
    ROI's bounding box, as the texture classes get it (``covers``: 2 voxels or more
    along each axis; thinner boxes run pyradiomics' own class)."""
    rng = np.random.default_rng(11)
    tiny = np.zeros((2, 2, 2), dtype=bool)
    tiny[0, 0, 0] = tiny[1, 1, 0] = tiny[1, 1, 1] = True
    large = _blob((60, 70, 70), 1.0)  # ~ 150 000 voxels
    smooth = np.indices(large.shape).sum(0) // 9 % 7 + 1  # big zones, long runs
    gaps = np.array([1, 4, 9])[rng.integers(0, 3, (14, 15, 16))]  # levels 2, 3, 5-8 absent
    return {
        "three voxels": (np.array([[[1, 0], [0, 0]], [[0, 0], [2, 1]]]), tiny),
        "full 2 x 2 x 2": (rng.integers(1, 3, (2, 2, 2)), np.ones((2, 2, 2), dtype=bool)),
        "levels absent": (gaps, _blob(gaps.shape, 1.0)),
        "one level": (np.ones((7, 8, 9), dtype=int), _blob((7, 8, 9), 1.0)),
        "large ROI, smooth": (np.where(large, smooth, 0), large),
        "large ROI, noisy": (np.where(large, rng.integers(1, 33, large.shape), 0), large),
    }


@pytest.mark.parametrize("case", list(_special_rois()))
def test_shared_matrices_edge_cases_are_pyradiomics_c(case: str) -> None:
    """Three voxels, a full 2-voxel cube, grey levels absent from the ROI, one level, large
    ROIs (runs across the box, zones of ~10^4 voxels, and 32 noisy levels): pyradiomics'
    C counts."""
    binned, roi = _special_rois()[case]
    assert covers({}, roi.shape)
    assert all(len(np.unique(i)) == n for i, n in zip(np.nonzero(roi), roi.shape, strict=True))
    _assert_matrices_are_c(np.where(roi, binned, 0), roi, 0)


def test_shared_matrices_on_random_sparse_rois_are_pyradiomics_c() -> None:
    """200 random ROIs in boxes of 2-6 voxels a side (their bounding boxes), 5 to 90 %
    filled: isolated voxels (NGTDM counts them), angles on which no line holds two ROI
    voxels (pyradiomics' C drops them from the GLRLM), GLDM alpha 0-2."""
    rng = np.random.default_rng(5)
    tested = 0
    while tested < 200:
        shape = tuple(int(n) for n in rng.integers(2, 7, 3))
        roi = rng.random(shape) < rng.uniform(0.05, 0.9)
        if any(len(np.unique(i)) != n for i, n in zip(np.nonzero(roi), shape, strict=True)):
            continue  # the box must be the ROI's bounding box
        binned = np.where(roi, rng.integers(1, int(rng.integers(1, 6)) + 1, shape), 0)
        _assert_matrices_are_c(binned, roi, int(rng.integers(0, 3)))
        tested += 1


def _assert_matrices_are_c(binned: NDArray[np.int_], roi: NDArray[np.bool_], gldm_a: int) -> None:
    from radiomics import cMatrices

    ng = int(binned.max())
    ours = Matrices(binned, roi, ng, float(gldm_a))
    one = np.array([1])
    shape = roi.shape
    glcm, angles = cMatrices.calculate_glcm(binned, roi, one, ng, False, 0)
    glrlm, _ = cMatrices.calculate_glrlm(binned, roi, ng, max(shape), False, 0)
    assert np.array_equal(angles, ANGLES)
    stock = {
        "glcm": glcm,
        "glrlm": glrlm,
        "glszm": cMatrices.calculate_glszm(binned, roi, ng, int(roi.sum()), False, 0),
        "gldm": cMatrices.calculate_gldm(binned, roi, one, ng, gldm_a, False, 0),
        "ngtdm": cMatrices.calculate_ngtdm(binned, roi, one, ng, False, 0),
    }
    for name, matrix in stock.items():
        assert ours.get(name).shape == matrix.shape, name
        assert np.allclose(ours.get(name), matrix, rtol=1e-12, atol=0), name


def test_kernels_cache_their_compiled_code_in_numba_cache_dir(tmp_path: Path) -> None:
    """``python -m pipelines.radiomics.kernels`` compiles every kernel into
    ``NUMBA_CACHE_DIR`` (deploy/Containerfile, the systemd units); a later process loads
    all of them from there and compiles none."""
    import subprocess
    import sys

    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pipelines.radiomics.kernels"], env=environment, cwd=root, check=True
    )
    cached = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert cached == {"matrices._kernel", "matrices._zones", "lbp3d._passes"}
    count = (
        "from pipelines.radiomics import lbp3d, matrices\n"
        "from pipelines.radiomics.kernels import compile_kernels\n"
        "compile_kernels()\n"
        "kernels = (matrices._kernel, lbp3d._passes)\n"  # (_kernel calls _zones)
        "print(sum(sum(k.stats.cache_hits.values()) for k in kernels),"
        " sum(sum(k.stats.cache_misses.values()) for k in kernels))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", count], env=environment, cwd=root, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    assert found.stdout.split() == ["2", "0"]


LESION_PARAMS = """
imageType: {Original: {}, LoG: {sigma: [1.0, 2.5]}, Square: {}}
featureClass: {shape: , firstorder: , glcm: , glrlm: , glszm: , gldm: , ngtdm: }
setting: {binWidth: 25, resampledPixelSpacing: [1, 1, 1], interpolator: sitkBSpline,
          padDistance: 10, voxelArrayShift: 1000, additionalInfo: false}
"""


@pytest.mark.parametrize(
    ("radius_mm", "hu", "thickness_mm", "slices"),
    [(4.2, 60.0, 1.0, 40), (12.0, 85.0, 5.0, 24), (26.7, 70.0, 5.0, 32)],
)
def test_generated_lesions_match_stock(
    tmp_path: Path, radius_mm: float, hu: float, thickness_mm: float, slices: int
) -> None:
    """Generated haemorrhages of ~0.3, 7 and 80 mL (1 and 5 mm slices): every feature of
    the fast path (matrix LoG, shared matrices, batched first order) is stock's to 1e-6."""
    datasets = synthetic_head_ct(
        int(radius_mm), n_slices=slices, slice_thickness_mm=thickness_mm, rows=128
    )
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=radius_mm, hu=hu, seed=2)
    volume = load_datasets(datasets).volume
    params = write(tmp_path, "lesion", LESION_PARAMS)
    stock = extract(volume.hu, volume.spacing, lesion.masks, params, crop=False)
    ours = extract(volume.hu, volume.spacing, lesion.masks, params, workers=1)
    assert len(stock) == 14 + 93 * 4
    assert_same(ours, stock, rel=1e-6)


@pytest.mark.parametrize("case", ["noisy", "flat", "at the edge"])
def test_sphere_samples_are_map_coordinates(case: str) -> None:
    """The LBP-3D samples by separable taps are scipy's cubic ``map_coordinates`` values;
    ties with the centre voxel (a flat image) and ROIs at the image edge take scipy's own."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(3)
    image = rng.normal(40.0, 30.0, (20, 24, 26)) if case == "noisy" else np.full((20, 24, 26), 40.0)
    roi = np.zeros(image.shape, bool)
    roi[(slice(0, 6) if case == "at the edge" else slice(5, 14)), 6:18, 7:20] = True
    voxels = np.nonzero(roi)
    vertices = icosphere(1, 1.0)
    expected = map_coordinates(image, (np.array(voxels).T[None] + vertices[:, None]).T, order=3)
    ours = sphere_samples(image, voxels, vertices)
    if case == "noisy":
        assert np.allclose(ours, expected, rtol=1e-12, atol=1e-10)
    else:
        assert np.array_equal(ours >= image[voxels][:, None], expected >= image[voxels][:, None])
        assert np.allclose(ours, expected, rtol=1e-12, atol=1e-10)


def _texture_images(shape: tuple[int, int, int]) -> list[tuple[str, NDArray[np.float64]]]:
    """Derived-image stand-ins: many levels, one level, levels with gaps, two levels."""
    rng = np.random.default_rng(7)
    noisy = rng.normal(40.0, 120.0, shape)
    gaps = np.where(rng.random(shape) < 0.5, 10.0, 160.0) + rng.normal(0.0, 3.0, shape)
    two = np.where(np.indices(shape)[2] < shape[2] // 2, 5.0, 30.0)
    return [("noisy", noisy), ("flat", np.full(shape, 42.0)), ("gaps", gaps), ("two", two)]


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((9, 11, 10), {"binWidth": 25}),
        ((6, 14, 12), {"binWidth": 10, "gldm_a": 1}),
        ((7, 9, 8), {"binCount": 16}),
        ((7, 9, 8), {"binWidth": 25, "weightingNorm": "euclidean"}),  # pyradiomics' classes
        ((7, 9, 8), {"binWidth": 25, "symmetricalGLCM": False}),  # pyradiomics' GLCM
    ],
)
def test_batched_texture_features_are_pyradiomics(
    shape: tuple[int, int, int], options: dict[str, object]
) -> None:
    """Every texture feature of images batched together (different level counts, one
    level, empty levels in between) equals pyradiomics' class on each image alone."""
    from radiomics import getFeatureClasses

    from pipelines.radiomics.texture import image_features

    rng = np.random.default_rng(len(shape) + shape[0])
    roi = rng.random(shape) < 0.7
    roi[shape[0] // 2, shape[1] // 2, :] = True  # neighbours in every direction
    mask = sitk.GetImageFromArray(roi.astype(np.uint8))
    settings = {"label": 1, **options}
    derived = [(sitk.GetImageFromArray(a), name, settings) for name, a in _texture_images(shape)]
    classes = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
    ours = image_features(derived, mask, {name: None for name in classes})
    stock: dict[str, float] = {}
    for image, name, _ in derived:
        for class_name in classes:
            values = getFeatureClasses()[class_name](image, mask, **settings).execute()
            stock |= {f"{name}_{class_name}_{k}": float(v) for k, v in values.items()}
    assert ours.keys() == stock.keys()
    for name, value in stock.items():
        same = math.isclose(ours[name], value, rel_tol=1e-9, abs_tol=1e-12)
        assert same or (math.isnan(value) and math.isnan(ours[name])), name


@pytest.mark.parametrize(
    ("shape", "start", "step", "size"),
    [
        ((32, 40, 38), (4.2, 3.7, -0.4), (1 / 0.9, 1 / 0.9, 0.2), (20, 25, 160)),  # z mirrored
        ((12, 30, 30), (-0.45, 0.3, 2.0), (0.5, 0.75, 0.33), (60, 35, 30)),  # edges
        ((1, 20, 20), (2.0, 2.0, 0.0), (0.7, 0.7, 1.0), (20, 20, 1)),  # one slice
        ((10, 10, 10), (5.0, -3.0, 2.0), (1.0, 1.0, 1.0), (12, 12, 12)),  # some points outside
    ],
)
def test_bspline_resampling_is_itks(
    shape: tuple[int, int, int],
    start: tuple[float, float, float],
    step: tuple[float, float, float],
    size: tuple[int, int, int],
) -> None:
    """The separable B-spline resampling equals SimpleITK's ``ResampleImageFilter`` (and
    its coefficients ITK's decomposition, to the bit)."""
    from pipelines.radiomics.bspline import decomposition, resample_bspline

    values = np.random.default_rng(shape[0]).normal(40.0, 300.0, shape)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.9, 0.8, 5.0))
    image.SetOrigin((-3.0, 12.5, 40.0))
    expected_coefficients = sitk.GetArrayFromImage(sitk.BSplineDecomposition(image, 3))
    assert np.array_equal(decomposition(values), expected_coefficients)
    resample = sitk.ResampleImageFilter()
    resample.SetOutputSpacing([s * k for s, k in zip(image.GetSpacing(), step, strict=True)])
    resample.SetOutputDirection(image.GetDirection())
    resample.SetOutputOrigin(image.TransformContinuousIndexToPhysicalPoint(start))
    resample.SetSize(size)
    resample.SetOutputPixelType(sitk.sitkFloat64)
    resample.SetInterpolator(sitk.sitkBSpline)
    expected = sitk.GetArrayFromImage(resample.Execute(image))
    ours = resample_bspline(image, start, step, size)
    assert ours.shape == expected.shape
    assert np.allclose(ours, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["noisy", "integers", "flat"])
def test_first_order_shortcuts_are_pyradiomics_getters(kind: str) -> None:
    """The batch's shared energy and masked mean deviations equal pyradiomics' getters
    on the same batch, to the bit."""
    from radiomics.firstorder import RadiomicsFirstOrder

    from pipelines.radiomics.firstorder import _Batch

    rng = np.random.default_rng(11)
    values = {
        "noisy": rng.normal(40.0, 30.0, (6, 4001)),
        "integers": np.round(rng.normal(40.0, 30.0, (4, 999))),
        "flat": np.full((3, 50), 7.0),
    }[kind]
    p_i = np.full((len(values), 4), 0.25)
    for feature in ("Energy", "TotalEnergy", "RootMeanSquared", "MeanAbsoluteDeviation"):
        ours = getattr(_Batch(values, p_i, 1000.0, (1.0, 0.9, 5.0)), f"get{feature}FeatureValue")()
        stock = getattr(RadiomicsFirstOrder, f"get{feature}FeatureValue")(
            _Batch(values, p_i, 1000.0, (1.0, 0.9, 5.0))
        )
        assert np.array_equal(ours, stock), feature
    batch = _Batch(values, p_i, 1000.0, (1.0, 0.9, 5.0))
    stock = RadiomicsFirstOrder.getRobustMeanAbsoluteDeviationFeatureValue(batch)
    assert np.array_equal(batch.getRobustMeanAbsoluteDeviationFeatureValue(), stock)
