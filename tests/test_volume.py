"""Volume loading: tilt, uneven spacing, localizers, multi-frame, every CT transfer syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from pipelines.geometry import grid_to_frame_indices, grid_to_frames
from pipelines.series import LoadedSeries
from pipelines.volume import VolumeLoadError, load_datasets, load_series
from tests.support import require_tool


def _ge_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def ge_series(ge_headct_dir: Path) -> LoadedSeries:
    return load_series(_ge_files(ge_headct_dir))


def test_ge_tilt_and_uneven_spacing(ge_series: LoadedSeries) -> None:
    assert len(ge_series.frames) == 28
    assert ge_series.gantry_tilt_deg == pytest.approx(18.5, abs=0.05)
    gaps = np.diff(ge_series.stack.offsets[:, 0])
    assert gaps.min() == pytest.approx(1.08, abs=0.01)
    assert gaps.max() == pytest.approx(7.0, abs=0.01)
    # In-plane shift per mm along the normal is tan(tilt): the stack is sheared.
    shear = np.diff(ge_series.stack.offsets[:, 1]) / gaps
    assert np.allclose(shear, -np.tan(np.radians(18.5)), atol=1e-3)
    # Every frame keeps its acquired position and HU.
    for frame, ds in zip(ge_series.frames, ge_series.datasets, strict=True):
        assert np.allclose(frame.position, np.asarray(ds.ImagePositionPatient, dtype=float))
        assert frame.sop_instance_uid == ds.SOPInstanceUID


def test_grid_and_frame_affines_agree(ge_series: LoadedSeries) -> None:
    """A frame pixel lies within half a voxel of the grid voxel it is sampled from."""
    inverse = np.linalg.inv(ge_series.volume.affine)
    nearest = grid_to_frame_indices(ge_series.stack, ge_series.grid)
    rng = np.random.default_rng(0)
    for k in (0, 13, 14, 27):
        for r, c in rng.integers(0, 512, size=(5, 2)):
            index = inverse @ ge_series.frame_affines[k] @ np.array([0.0, r, c, 1.0])
            assert np.all(np.abs(index[:3] - (nearest[k] + [0, r, c])) <= 0.5 + 1e-6)


def test_grid_round_trip_to_frames(ge_series: LoadedSeries) -> None:
    """Thresholding the grid and sampling it back matches thresholding the frames."""
    on_frames = grid_to_frames(ge_series, ge_series.volume.hu > 300)
    direct = ge_series.frame_hu > 300
    dice = 2 * (on_frames & direct).sum() / (on_frames.sum() + direct.sum())
    assert dice > 0.95


def test_localizer_in_series_is_left_out(ge_headct_dir: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in _ge_files(ge_headct_dir)]
    scout = pydicom.dcmread(_ge_files(ge_headct_dir)[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    series = load_datasets([scout, *datasets])
    assert len(series.frames) == 28
    assert scout.SOPInstanceUID not in {f.sop_instance_uid for f in series.frames}


def _reencode(tool: list[str], src: Path, dst: Path) -> None:
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("name", "tool", "expected_syntax"),
    [
        ("jpeg-lossless-sv1", ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70"),
        ("jpeg-lossless", ["dcmcjpeg", "+el"], "1.2.840.10008.1.2.4.57"),
        ("jpeg-ls", ["dcmcjpls"], "1.2.840.10008.1.2.4.80"),
        ("rle", ["dcmcrle"], "1.2.840.10008.1.2.5"),
        ("deflate", ["dcmconv", "+td"], "1.2.840.10008.1.2.1.99"),
    ],
)
def test_dcmtk_transfer_syntaxes_give_the_same_volume(
    ge_headct_dir: Path,
    ge_series: LoadedSeries,
    tmp_path: Path,
    name: str,
    tool: list[str],
    expected_syntax: str,
) -> None:
    executable = require_tool(tool[0], "dcmtk")
    for src in _ge_files(ge_headct_dir):
        _reencode([executable, *tool[1:]], src, tmp_path / src.name)
    files = _ge_files(tmp_path)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == expected_syntax
    series = load_series(files)
    assert np.array_equal(series.frame_hu, ge_series.frame_hu), name
    assert np.array_equal(series.volume.hu, ge_series.volume.hu), name


def test_jpeg2000_gives_the_same_volume(
    ge_headct_dir: Path, ge_series: LoadedSeries, tmp_path: Path
) -> None:
    for src in _ge_files(ge_headct_dir):
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(tmp_path / src.name)
    series = load_series(_ge_files(tmp_path))
    assert np.array_equal(series.volume.hu, ge_series.volume.hu)


def test_enhanced_multiframe_gives_the_same_volume(
    ge_headct_dir: Path, ge_series: LoadedSeries, tmp_path: Path
) -> None:
    legacy = [pydicom.dcmread(p) for p in _ge_files(ge_headct_dir)]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    series = load_series([path])
    assert len(series.datasets) == 1
    assert sorted(f.frame_number or 0 for f in series.frames) == list(range(1, 29))
    assert np.array_equal(series.frame_hu, ge_series.frame_hu)
    assert np.allclose(series.volume.affine, ge_series.volume.affine)
    assert np.array_equal(series.volume.hu, ge_series.volume.hu)


def test_unreadable_and_inconsistent_series_fail_with_a_reason(
    ge_headct_dir: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(VolumeLoadError, match="not a readable DICOM file"):
        load_series([junk])
    datasets = [pydicom.dcmread(p) for p in _ge_files(ge_headct_dir)[:3]]
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(VolumeLoadError, match="more than one orientation"):
        load_datasets(datasets)
    duplicate = [pydicom.dcmread(p) for p in _ge_files(ge_headct_dir)[:2]]
    duplicate[1].ImagePositionPatient = duplicate[0].ImagePositionPatient
    with pytest.raises(VolumeLoadError, match="same plane"):
        load_datasets(duplicate)
